package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
)

const doctorsPath = "/api/doctors/"

func doctorPath(id int64) string { return doctorsPath + strconv.FormatInt(id, 10) + "/" }

// doctorBody is a valid doctor with the given email, last name and
// specialization.
func doctorBody(email, last, specialization string) map[string]any {
	return map[string]any{"first_name": "Gregory", "last_name": last, "email": email, "specialization": specialization}
}

// doctorWant is the wantShape pattern of a doctor; id 0 means any id.
func doctorWant(id int64, first, last, email, specialization string) string {
	var idv any = "<id>"
	if id != 0 {
		idv = id
	}
	return jsonText(map[string]any{"id": idv, "first_name": first, "last_name": last, "email": email,
		"specialization": specialization, "created_at": "<stamp>", "updated_at": "<stamp>"})
}

const msgMin3 = "Ensure this field has at least 3 characters."

func TestDoctorAccess(t *testing.T) {
	s := newTestServer(t, nil)
	const (
		creator = "creator"
		other   = "other"
		nobody  = "nobody"
	)
	// {tag} is unique to the case; the doctor has it as last name and in its
	// email, so "?search={tag}" lists it alone in the shared directory.
	// after: "same", "changed", "created" or "deleted", as in
	// TestPatientAccess.
	list := doctorsPath + "?search={tag}"
	detail := "/api/doctors/{id}/"
	cases := []struct {
		name   string
		who    string
		method string
		path   string
		body   any
		header map[string]string
		status int
		want   string
		after  string
	}{
		{"list as creator", creator, "GET", list, nil, nil, 200, `{"count": 1, "next": null, "previous": null, "results": [{before}]}`, "same"},
		{"list as other", other, "GET", list, nil, nil, 200, `{"count": 1, "next": null, "previous": null, "results": [{before}]}`, "same"},
		{"list without token", nobody, "GET", list, nil, nil, 401, bodyUnauthenticated, "same"},

		{"create as creator", creator, "POST", doctorsPath, doctorBody("b.{email}", "{tag}", "Endocrinology"), nil, 201,
			doctorWant(0, "Gregory", "{tag}", "b.{email}", "Endocrinology"), "created"},
		{"create as other", other, "POST", doctorsPath, map[string]any{"first_name": "Lisa", "last_name": "{tag}", "email": "c.{email}",
			"specialization": "Endocrinology", "created_by": "{creatorID}"}, nil, 201,
			doctorWant(0, "Lisa", "{tag}", "c.{email}", "Endocrinology"), "created"},
		{"create without token", nobody, "POST", doctorsPath, doctorBody("d.{email}", "{tag}", "Oncology"), nil, 401, bodyUnauthenticated, "same"},

		{"get as creator", creator, "GET", detail, nil, nil, 200, `{before}`, "same"},
		{"get as other", other, "GET", detail, nil, nil, 200, `{before}`, "same"},
		{"get without token", nobody, "GET", detail, nil, nil, 401, bodyUnauthenticated, "same"},

		{"put as creator", creator, "PUT", detail, map[string]any{"first_name": "Greg", "email": "{email}", "specialization": "Nephrology"}, nil, 200,
			doctorWant(thisID, "Greg", "{tag}", "{email}", "Nephrology"), "changed"},
		{"put as other", other, "PUT", detail, map[string]any{"first_name": "Eve", "email": "e.{email}", "specialization": "Hacking"}, nil, 403,
			bodyForbidden, "same"},
		{"invalid put as other", other, "PUT", detail, map[string]any{}, nil, 403, bodyForbidden, "same"},
		{"unparsable put as other", other, "PUT", detail, `{"first_name": `, nil, 403, bodyForbidden, "same"},
		{"text put as other", other, "PUT", detail, "first_name=Eve", map[string]string{"Content-Type": "text/plain"}, 403, bodyForbidden, "same"},
		{"put without token", nobody, "PUT", detail, map[string]any{"first_name": "Eve", "email": "e.{email}", "specialization": "Hacking"}, nil, 401,
			bodyUnauthenticated, "same"},

		{"patch as creator", creator, "PATCH", detail, map[string]any{"specialization": "<b>Nephrology</b>"}, nil, 200,
			doctorWant(thisID, "Gregory", "{tag}", "{email}", "Nephrology"), "changed"},
		{"patch as other", other, "PATCH", detail, map[string]any{"specialization": "Hacking"}, nil, 403, bodyForbidden, "same"},
		{"empty patch as other", other, "PATCH", detail, nil, nil, 403, bodyForbidden, "same"},
		{"patch without token", nobody, "PATCH", detail, map[string]any{"specialization": "Hacking"}, nil, 401, bodyUnauthenticated, "same"},

		{"delete as creator", creator, "DELETE", detail, nil, nil, 204, "", "deleted"},
		{"delete as other", other, "DELETE", detail, nil, nil, 403, bodyForbidden, "same"},
		{"delete without token", nobody, "DELETE", detail, nil, nil, 401, bodyUnauthenticated, "same"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a, b := register(t, s), register(t, s)
			tag := uniqueName("dr")
			email := tag + "@example.com"
			id, _ := mustCreate(t, s, a.access, doctorsPath, doctorBody(email, tag, "Diagnostics"))
			before := mustGet(t, s, a.access, doctorPath(id))
			listBefore := mustGet(t, s, a.access, doctorsPath+"?search="+tag)
			r := strings.NewReplacer("{id}", strconv.FormatInt(id, 10), "{before}", before, "{tag}", tag, "{email}", email,
				`"{creatorID}"`, strconv.FormatInt(a.id, 10), strconv.Itoa(thisID), strconv.FormatInt(id, 10))
			token := map[string]string{creator: a.access, other: b.access}[tc.who]
			var body any
			switch v := tc.body.(type) {
			case nil:
			case string:
				body = v
			default:
				body = r.Replace(jsonText(v))
			}
			res := do(t, s, req{method: tc.method, path: r.Replace(tc.path), token: token, body: body, header: tc.header})
			if tc.status == http.StatusNoContent {
				wantNoContent(t, res)
			} else {
				wantShape(t, res, tc.status, r.Replace(tc.want))
			}
			switch tc.after {
			case "same":
				wantSame(t, s, a.access, doctorPath(id), before)
				wantSame(t, s, b.access, doctorsPath+"?search="+tag, listBefore)
			case "changed":
				wantSame(t, s, b.access, doctorPath(id), string(res.body))
				if got := res.object(t)["created_at"]; got != (response{body: []byte(before)}).object(t)["created_at"] {
					t.Errorf("created_at changed: %v, was %s", got, before)
				}
			case "created":
				newID := int64(res.object(t)["id"].(float64))
				wantSame(t, s, a.access, doctorPath(newID), string(res.body))
				wantSame(t, s, a.access, doctorPath(id), before)
				wantPage(t, do(t, s, req{method: "GET", path: doctorsPath + "?search=" + tag, token: b.access}), 2, "", "", []int64{id, newID})
				// Only the new doctor's creator may change it, whatever the
				// body claimed.
				maker, outsider := a, b
				if tc.who == other {
					maker, outsider = b, a
				}
				patch := map[string]any{"last_name": "Changed"}
				wantJSON(t, do(t, s, req{method: "PATCH", path: doctorPath(newID), token: outsider.access, body: patch}), 403, bodyForbidden)
				res := do(t, s, req{method: "PATCH", path: doctorPath(newID), token: maker.access, body: patch})
				if res.status != 200 || res.object(t)["last_name"] != "Changed" {
					t.Fatalf("creator's PATCH: %d %s", res.status, res.body)
				}
			case "deleted":
				wantJSON(t, do(t, s, req{method: "GET", path: doctorPath(id), token: b.access}), 404, bodyNotFound)
				wantJSON(t, do(t, s, req{method: "GET", path: doctorsPath + "?search=" + tag, token: b.access}), 200, emptyPage)
			}
		})
	}
}

func TestDoctorUnknownIDs(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	id, _ := mustCreate(t, s, a.access, doctorsPath, doctorBody(uniqueName("dr")+"@example.com", "Known", "Diagnostics"))
	valid := map[string]any{"first_name": "Eve", "email": uniqueName("dr") + "@example.com", "specialization": "Hacking"}
	for _, p := range []string{strconv.FormatInt(id+1_000_000, 10), "0", "-1", "abc", "1.5", "99999999999999999999", "1%20OR%201=1", "%27"} {
		for _, method := range []string{"GET", "PUT", "PATCH", "DELETE"} {
			t.Run(method+" "+p, func(t *testing.T) {
				var body any
				if method == "PUT" || method == "PATCH" {
					body = valid
				}
				wantJSON(t, do(t, s, req{method: method, path: doctorsPath + p + "/", token: a.access, body: body}), 404, bodyNotFound)
			})
		}
	}
	wantTablesIntact(t)
}

func TestDoctorSearch(t *testing.T) {
	s := newTestServer(t, nil)
	a, b := register(t, s), register(t, s)
	tag := uniqueName("dr")
	rows := [][4]string{
		{"Gregory", "House", "gh." + tag + "@ppth.org", "Diagnostic Medicine"},
		{"Lisa", "Cuddy", "lc." + tag + "@ppth.org", "Endocrinology"},
		{"James", "Wilson", "jw." + tag + "@oncology.net", "Oncology"},
		{"Allison", "Cameron", "ac." + tag + "@ppth.org", "Immunology 100%"},
		{"Robert", "Chase", "rc." + tag + "@ppth.org", "Intensive_Care"},
		{"Eric", "Foreman", "ef." + tag + "@ppth.org", `Neuro\logy`},
	}
	ids := make([]int64, len(rows))
	for i, r := range rows {
		// Two creators: the directory is one list for everyone.
		creator := []account{a, b}[i%2]
		ids[i], _ = mustCreate(t, s, creator.access, doctorsPath,
			map[string]any{"first_name": r[0], "last_name": r[1], "email": r[2], "specialization": r[3]})
	}
	pick := picker(ids)
	cases := []struct {
		search string
		want   []int64
	}{
		{"", pick(0, 1, 2, 3, 4, 5)},
		{"diagnostic", pick(0)},
		{"MEDICINE", pick(0)},
		{"ONCOLOGY", pick(2)},
		{"ppth", pick(0, 1, 3, 4, 5)},
		{"ology", pick(1, 2, 3)},
		{"ology,ppth", pick(1, 3)},
		{"ology ppth", pick(1, 3)},
		{"house", pick(0)},
		{"gregory lisa", pick()},
		{"cameron 100%", pick(3)},
		{"%", pick(3)},
		{"_", pick(4)},
		{"care", pick(4)},
		{`\`, pick(5)},
		{`o\l`, pick(5)},
		{"nomatch", pick()},
	}
	for _, tc := range cases {
		t.Run(tc.search, func(t *testing.T) {
			for _, who := range []account{a, b} {
				q := url.QueryEscape(strings.ToUpper(tag) + " " + tc.search)
				res := do(t, s, req{method: "GET", path: doctorsPath + "?search=" + q, token: who.access})
				wantPage(t, res, len(tc.want), "", "", tc.want)
			}
		})
	}
	t.Run("results are whole doctors", func(t *testing.T) {
		res := do(t, s, req{method: "GET", path: doctorsPath + "?search=" + tag + "+house", token: b.access})
		wantJSON(t, res, 200, `{"count": 1, "next": null, "previous": null, "results": [`+mustGet(t, s, a.access, doctorPath(ids[0]))+`]}`)
	})
	t.Run("pages", func(t *testing.T) {
		res := do(t, s, req{method: "GET", path: doctorsPath + "?search=" + tag + "&page_size=4&page=2", token: a.access})
		wantPage(t, res, 6, "", "http://localhost/api/doctors/?page_size=4&search="+tag, ids[4:])
		wantJSON(t, do(t, s, req{method: "GET", path: doctorsPath + "?search=" + tag + "&page=3&page_size=4", token: a.access}), 404, bodyInvalidPage)
		wantJSON(t, do(t, s, req{method: "GET", path: doctorsPath + "?search=" + tag + "nothing", token: a.access}), 200, emptyPage)
	})
}

func TestDoctorOrdering(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	tag := uniqueName("dr")
	rows := [][3]string{{"carl", "young", "bbbb"}, {"anna", "young", "cccc"}, {"bert", "adams", "aaaa"}, {"anna", "adams", "bbbb"}}
	ids := make([]int64, len(rows))
	for i, r := range rows {
		ids[i], _ = mustCreate(t, s, a.access, doctorsPath, map[string]any{
			"first_name": r[0], "last_name": r[1], "email": fmt.Sprintf("o%d.%s@example.com", i, tag), "specialization": r[2]})
	}
	pick := picker(ids)
	for _, tc := range []struct {
		ordering string
		want     []int64
	}{
		{"", pick(0, 1, 2, 3)},
		{"id", pick(0, 1, 2, 3)},
		{"-id", pick(3, 2, 1, 0)},
		{"first_name", pick(1, 3, 2, 0)},
		{"-first_name", pick(0, 2, 1, 3)},
		{"last_name", pick(2, 3, 0, 1)},
		{"-last_name", pick(0, 1, 2, 3)},
		{"last_name,first_name", pick(3, 2, 1, 0)},
		{"specialization", pick(2, 0, 3, 1)},
		{"-specialization", pick(1, 0, 3, 2)},
		{"specialization,first_name", pick(2, 3, 0, 1)},
		{"-specialization,-id", pick(1, 3, 0, 2)},
		{"created_at", pick(0, 1, 2, 3)},
		{"-created_at", pick(3, 2, 1, 0)},
	} {
		t.Run("ordering="+tc.ordering, func(t *testing.T) {
			res := do(t, s, req{method: "GET", path: doctorsPath + "?search=" + tag + "&ordering=" + url.QueryEscape(tc.ordering), token: a.access})
			wantPage(t, res, 4, "", "", tc.want)
		})
	}
	for _, f := range []string{"nope", "email", "created_by", "updated_at", "specialization,nope"} {
		t.Run("invalid "+f, func(t *testing.T) {
			res := do(t, s, req{method: "GET", path: doctorsPath + "?ordering=" + url.QueryEscape(f), token: a.access})
			bad := f[strings.LastIndex(f, ",")+1:]
			wantJSON(t, res, 400, jsonText(map[string][]string{"ordering": {`Invalid ordering field "` + bad + `".`}}))
		})
	}
	t.Run("created_at sorts the time, not its text", func(t *testing.T) {
		wantTimeOrder(t, s, a.access, "doctors", doctorsPath+"?search="+tag, ids)
	})
}

func TestDoctorValidation(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	cases := []struct {
		name string
		body any // a map is merged over a valid body; "-" names a key to drop
		want string
	}{
		{"no body", nil, errs("first_name", msgRequired, "email", msgRequired, "specialization", msgRequired)},
		{"empty object", "{}", errs("first_name", msgRequired, "email", msgRequired, "specialization", msgRequired)},
		{"specialization missing", map[string]any{"-": "specialization"}, errs("specialization", msgRequired)},
		{"specialization blank", map[string]any{"specialization": ""}, errs("specialization", msgBlank)},
		{"specialization spaces", map[string]any{"specialization": "   "}, errs("specialization", msgBlank)},
		{"specialization 2 characters", map[string]any{"specialization": "ab"}, errs("specialization", msgMin3)},
		{"specialization 2 after trimming", map[string]any{"specialization": "  ab  "}, errs("specialization", msgMin3)},
		{"specialization 2 after tags", map[string]any{"specialization": "<b>ab</b>"}, errs("specialization", msgMin3)},
		{"specialization 2 multi-byte", map[string]any{"specialization": "日本"}, errs("specialization", msgMin3)},
		{"specialization 121 characters", map[string]any{"specialization": strN("ü", 121)},
			errs("specialization", "Ensure this field has no more than 120 characters.")},
		{"specialization null", map[string]any{"specialization": json.RawMessage("null")}, errs("specialization", msgNull)},
		{"specialization number", map[string]any{"specialization": 123}, errs("specialization", msgNotString)},
		{"specialization NUL", map[string]any{"specialization": "Card\u0000iology"}, errs("specialization", msgNUL)},
		{"first_name missing", map[string]any{"-": "first_name"}, errs("first_name", msgRequired)},
		{"first_name blank", map[string]any{"first_name": ""}, errs("first_name", msgBlank)},
		{"first_name 101 characters", map[string]any{"first_name": strN("é", 101)}, errs("first_name", msgMax100)},
		{"first_name number", map[string]any{"first_name": 7}, errs("first_name", msgNotString)},
		{"first_name NUL", map[string]any{"first_name": "\u0000"}, errs("first_name", msgNUL)},
		{"last_name 101 characters", map[string]any{"last_name": strN("ß", 101)}, errs("last_name", msgMax100)},
		{"last_name list", map[string]any{"last_name": []int{1}}, errs("last_name", msgNotString)},
		{"email missing", map[string]any{"-": "email"}, errs("email", msgRequired)},
		{"email invalid", map[string]any{"email": "greg@"}, errs("email", msgEmail)},
		{"email object", map[string]any{"email": map[string]any{"x": "y"}}, errs("email", msgNotString)},
		{"email 255 characters", map[string]any{"email": strN("b", 243) + "@example.com"}, errs("email", msgMax254)},
		{"email NUL", map[string]any{"email": "a\u0000@example.com"}, errs("email", msgNUL)},
		{"everything wrong", map[string]any{"first_name": true, "last_name": nil, "email": "x", "specialization": "x"},
			errs("first_name", msgNotString, "email", msgEmail, "specialization", msgMin3)},
	}
	tag := uniqueName("dr")
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			body := tc.body
			if m, ok := tc.body.(map[string]any); ok {
				body = withChanges(map[string]any{"first_name": "Greg", "last_name": tag, "email": uniqueName("dr") + "@example.com", "specialization": "Diagnostics"}, m)
			}
			wantJSON(t, do(t, s, req{method: "POST", path: doctorsPath, token: a.access, body: body}), 400, tc.want)
		})
	}
	wantJSON(t, do(t, s, req{method: "GET", path: doctorsPath + "?search=" + tag, token: a.access}), 200, emptyPage)
}

func TestDoctorStoredValues(t *testing.T) {
	s := newTestServer(t, nil)
	a, b := register(t, s), register(t, s)
	tag := uniqueName("dr")
	long := strN("c", 242-len(tag)) + tag + "@example.com" // 254 characters
	cases := []struct {
		name string
		body map[string]any
		want string
	}{
		{"required only", map[string]any{"first_name": "Greg", "email": "r." + tag + "@example.com", "specialization": "ENT"},
			doctorWant(0, "Greg", "", "r."+tag+"@example.com", "ENT")},
		{"email lower-cased", map[string]any{"first_name": "Greg", "email": " L." + strings.ToUpper(tag) + "@EXAMPLE.com ", "specialization": "ENT"},
			doctorWant(0, "Greg", "", "l."+tag+"@example.com", "ENT")},
		{"long email", map[string]any{"first_name": "Greg", "email": long, "specialization": "ENT"},
			doctorWant(0, "Greg", "", long, "ENT")},
		{"multi-byte lengths", map[string]any{"first_name": strN("é", 100), "last_name": strN("ß", 100), "email": "m." + tag + "@example.com", "specialization": strN("ü", 120)},
			doctorWant(0, strN("é", 100), strN("ß", 100), "m."+tag+"@example.com", strN("ü", 120))},
		{"three multi-byte characters", map[string]any{"first_name": "Greg", "email": "j." + tag + "@example.com", "specialization": "日本語"},
			doctorWant(0, "Greg", "", "j."+tag+"@example.com", "日本語")},
		{"tags stripped", map[string]any{"first_name": "<b>Doe</b>", "last_name": "Tom <3 Jerry", "email": "t." + tag + "@example.com", "specialization": "  <i>Cardiology</i> "},
			doctorWant(0, "Doe", "Tom <3 Jerry", "t."+tag+"@example.com", "Cardiology")},
		{"script stripped", map[string]any{"first_name": "<script>alert(1)</script>x", "email": "s." + tag + "@example.com", "specialization": "a<3b"},
			doctorWant(0, "alert(1)x", "", "s."+tag+"@example.com", "a<3b")},
		{"client fields ignored", map[string]any{"first_name": "Greg", "email": "i." + tag + "@example.com", "specialization": "ENT",
			"id": 999999999, "created_at": "2000-01-01T00:00:00Z", "updated_at": "2000-01-01T00:00:00Z", "created_by": b.id, "owner": b.id, "owner_id": b.id},
			doctorWant(0, "Greg", "", "i."+tag+"@example.com", "ENT")},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res := do(t, s, req{method: "POST", path: doctorsPath, token: a.access, body: tc.body})
			got := wantShape(t, res, 201, tc.want).(map[string]any)
			id := int64(got["id"].(float64))
			wantSame(t, s, b.access, doctorPath(id), string(res.body))
			if id == 999999999 || strings.HasPrefix(got["created_at"].(string), "2000") || strings.HasPrefix(got["updated_at"].(string), "2000") {
				t.Errorf("client values were stored: %s", res.body)
			}
			// The caller is the creator, whatever the body said.
			wantJSON(t, do(t, s, req{method: "DELETE", path: doctorPath(id), token: b.access}), 403, bodyForbidden)
			wantNoContent(t, do(t, s, req{method: "DELETE", path: doctorPath(id), token: a.access}))
		})
	}
}

func TestDoctorUpdate(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	cases := []struct {
		name   string
		method string
		body   any
		status int
		want   string // {email} is the doctor's email
	}{
		{"put without specialization", "PUT", map[string]any{"first_name": "Greg", "email": "{email}"}, 400, errs("specialization", msgRequired)},
		{"put empty", "PUT", map[string]any{}, 400, errs("first_name", msgRequired, "email", msgRequired, "specialization", msgRequired)},
		{"put short specialization", "PUT", map[string]any{"first_name": "Greg", "email": "{email}", "specialization": "xy"}, 400, errs("specialization", msgMin3)},
		{"put keeps last_name", "PUT", map[string]any{"first_name": "Greg", "email": "{EMAIL}", "specialization": "Nephrology"}, 200,
			doctorWant(thisID, "Greg", "House", "{email}", "Nephrology")},
		{"put clears last_name", "PUT", map[string]any{"first_name": "Greg", "last_name": "", "email": "n.{email}", "specialization": "Nephrology"}, 200,
			doctorWant(thisID, "Greg", "", "n.{email}", "Nephrology")},
		{"patch nothing", "PATCH", nil, 200, doctorWant(thisID, "Gregory", "House", "{email}", "Diagnostics")},
		{"patch specialization", "PATCH", map[string]any{"specialization": " Oncology "}, 200, doctorWant(thisID, "Gregory", "House", "{email}", "Oncology")},
		{"patch own email in capitals", "PATCH", map[string]any{"email": "{EMAIL}"}, 200, doctorWant(thisID, "Gregory", "House", "{email}", "Diagnostics")},
		{"patch ignores created_by", "PATCH", map[string]any{"created_by": nil, "id": 1}, 200, doctorWant(thisID, "Gregory", "House", "{email}", "Diagnostics")},
		{"patch short specialization", "PATCH", map[string]any{"specialization": "<p>ab</p>"}, 400, errs("specialization", msgMin3)},
		{"patch blank first_name", "PATCH", map[string]any{"first_name": "<i></i>"}, 400, errs("first_name", msgBlank)},
		{"patch null last_name", "PATCH", map[string]any{"last_name": nil}, 400, errs("last_name", msgNull)},
		{"patch bad email", "PATCH", map[string]any{"email": "house"}, 400, errs("email", msgEmail)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			email := uniqueName("dr") + "@example.com"
			id, _ := mustCreate(t, s, a.access, doctorsPath, doctorBody(email, "House", "Diagnostics"))
			before := mustGet(t, s, a.access, doctorPath(id))
			r := strings.NewReplacer("{email}", email, "{EMAIL}", strings.ToUpper(email), strconv.Itoa(thisID), strconv.FormatInt(id, 10))
			var body any
			if tc.body != nil {
				body = r.Replace(jsonText(tc.body))
			}
			res := do(t, s, req{method: tc.method, path: doctorPath(id), token: a.access, body: body})
			if tc.status != 200 {
				wantJSON(t, res, tc.status, r.Replace(tc.want))
				wantSame(t, s, a.access, doctorPath(id), before)
				return
			}
			got := wantShape(t, res, 200, r.Replace(tc.want)).(map[string]any)
			wantSame(t, s, a.access, doctorPath(id), string(res.body))
			if got["created_at"] != (response{body: []byte(before)}).object(t)["created_at"] {
				t.Errorf("created_at changed: %s, was %s", res.body, before)
			}
			// Still the caller's to change.
			wantNoContent(t, do(t, s, req{method: "DELETE", path: doctorPath(id), token: a.access}))
		})
	}
}

func TestDoctorEmailUnique(t *testing.T) {
	s := newTestServer(t, nil)
	a, b := register(t, s), register(t, s)
	dup := errs("email", "A doctor with this email already exists.")
	email := uniqueName("dr") + "@example.com"
	first, firstBody := mustCreate(t, s, a.access, doctorsPath, doctorBody(email, "One", "Diagnostics"))
	second, secondBody := mustCreate(t, s, b.access, doctorsPath, doctorBody(uniqueName("dr")+"@example.com", "Two", "Diagnostics"))
	firstBody, secondBody = mustGet(t, s, a.access, doctorPath(first)), mustGet(t, s, b.access, doctorPath(second))
	for _, tc := range []struct {
		name, method, path string
		who                account
		body               map[string]any
	}{
		{"same creator, same email", "POST", doctorsPath, a, doctorBody(email, "X", "Diagnostics")},
		{"another user, other case", "POST", doctorsPath, b, doctorBody(strings.ToUpper(email), "X", "Diagnostics")},
		{"patch onto it", "PATCH", doctorPath(second), b, map[string]any{"email": " " + strings.ToUpper(email)}},
		{"put onto it", "PUT", doctorPath(second), b, doctorBody(email, "Two", "Diagnostics")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantJSON(t, do(t, s, req{method: tc.method, path: tc.path, token: tc.who.access, body: tc.body}), 400, dup)
			wantSame(t, s, a.access, doctorPath(first), firstBody)
			wantSame(t, s, a.access, doctorPath(second), secondBody)
		})
	}
	t.Run("free again after delete", func(t *testing.T) {
		wantNoContent(t, do(t, s, req{method: "DELETE", path: doctorPath(first), token: a.access}))
		res := do(t, s, req{method: "POST", path: doctorsPath, token: b.access, body: doctorBody(email, "Three", "Diagnostics")})
		wantShape(t, res, 201, doctorWant(0, "Gregory", "Three", email, "Diagnostics"))
	})
}

func TestDoctorRaceSameEmail(t *testing.T) {
	s := newTestServer(t, nil)
	a, b := register(t, s), register(t, s)
	for round := range 5 {
		t.Run(fmt.Sprint("round ", round), func(t *testing.T) {
			email := uniqueName("race") + "@example.com"
			variants := []string{email, strings.ToUpper(email), " " + email, strings.ToUpper(email[:1]) + email[1:]}
			var rqs []req
			for i, e := range variants {
				who := []account{a, b}[i%2]
				rqs = append(rqs, req{method: "POST", path: doctorsPath, token: who.access, body: jsonText(doctorBody(e, "Race", "Diagnostics"))})
			}
			created := 0
			for _, res := range concurrently(t, s, rqs) {
				if res.status == 201 {
					created++
					wantShape(t, res, 201, doctorWant(0, "Gregory", "Race", email, "Diagnostics"))
					continue
				}
				wantJSON(t, res, 400, errs("email", "A doctor with this email already exists."))
			}
			if created != 1 {
				t.Fatalf("%d created, want exactly 1", created)
			}
			var n int
			if err := testDB.QueryRow(`SELECT count(*) FROM doctors WHERE email = $1`, email).Scan(&n); err != nil || n != 1 {
				t.Fatalf("%d doctors with %s (err %v)", n, email, err)
			}
		})
	}
}

func TestDoctorSQLMetacharacters(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	tag := uniqueName("dr")
	type row struct{ first, last, email, spec string }
	var stored []row
	for i, inj := range injections {
		t.Run("stored "+inj, func(t *testing.T) {
			email := fmt.Sprintf("inj%d.%s@example.com", i, tag)
			spec := "Spec " + inj
			res := do(t, s, req{method: "POST", path: doctorsPath, token: a.access,
				body: map[string]any{"first_name": inj, "last_name": inj, "email": email, "specialization": spec}})
			wantShape(t, res, 201, doctorWant(0, inj, inj, email, spec))
			stored = append(stored, row{inj, inj, email, spec})
			id := int64(res.object(t)["id"].(float64))
			if len([]rune(inj)) >= 3 {
				res = do(t, s, req{method: "PATCH", path: doctorPath(id), token: a.access, body: map[string]any{"specialization": inj}})
				wantShape(t, res, 200, doctorWant(id, inj, inj, email, inj))
				stored[len(stored)-1].spec = inj
			} else {
				res = do(t, s, req{method: "PATCH", path: doctorPath(id), token: a.access, body: map[string]any{"specialization": inj}})
				wantJSON(t, res, 400, errs("specialization", msgMin3))
			}
			body := doctorBody(inj, "X", "Diagnostics")
			wantJSON(t, do(t, s, req{method: "POST", path: doctorsPath, token: a.access, body: body}), 400, errs("email", msgEmail))
		})
	}
	t.Run("email with metacharacters", func(t *testing.T) {
		email := "o'brien%_$1." + tag + "@example.com"
		res := do(t, s, req{method: "POST", path: doctorsPath, token: a.access, body: doctorBody(email, "Quote", "Diagnostics")})
		wantShape(t, res, 201, doctorWant(0, "Gregory", "Quote", email, "Diagnostics"))
		stored = append(stored, row{"Gregory", "Quote", email, "Diagnostics"})
	})
	matches := func(search string) int {
		n := 0
		terms := strings.FieldsFunc(search, func(r rune) bool { return r == ' ' || r == ',' })
	rows:
		for _, r := range stored {
			for _, term := range terms {
				term = strings.ToLower(term)
				found := false
				for _, f := range []string{r.first, r.last, r.email, r.spec} {
					found = found || strings.Contains(strings.ToLower(f), term)
				}
				if !found {
					continue rows
				}
			}
			n++
		}
		return n
	}
	for _, inj := range injections {
		t.Run("query "+inj, func(t *testing.T) {
			search := tag + "," + inj
			res := do(t, s, req{method: "GET", path: doctorsPath + "?page_size=100&search=" + url.QueryEscape(search), token: a.access})
			if res.status != 200 || res.object(t)["count"] != float64(matches(search)) {
				t.Fatalf("search %q: status %d, body %s; want %d matches", search, res.status, res.body, matches(search))
			}
			q := url.QueryEscape(inj)
			wantJSON(t, do(t, s, req{method: "GET", path: doctorsPath + "?search=" + tag + "&page=" + q, token: a.access}), 404, bodyInvalidPage)
			res = do(t, s, req{method: "GET", path: doctorsPath + "?search=" + tag + "&page_size=" + q, token: a.access})
			if res.status != 200 || res.object(t)["count"] != float64(len(stored)) || len(resultIDs(t, res.object(t))) != min(10, len(stored)) {
				t.Fatalf("page_size %q: status %d, body %s", inj, res.status, res.body)
			}
			wantOrderingRefused(t, do(t, s, req{method: "GET", path: doctorsPath + "?ordering=" + q, token: a.access}), inj)
		})
	}
	wantTablesIntact(t)
	res := do(t, s, req{method: "GET", path: doctorsPath + "?search=" + tag, token: a.access})
	if res.status != 200 || res.object(t)["count"] != float64(len(stored)) {
		t.Fatalf("after the attacks: %s, want count %d", res.body, len(stored))
	}
}

// TestDoctorEvents: changes to the shared directory leave events in the
// actor's trail (an update names the fields it changed); a refused change
// leaves none; /api/audit/ filters by doctor.
func TestDoctorEvents(t *testing.T) {
	s := newTestServer(t, nil)
	a, b := register(t, s), register(t, s)
	sid := claimInt(t, tokenClaims(t, a.access), "sid")
	res := do(t, s, req{method: "POST", path: doctorsPath, token: a.access, body: doctorBody(uniqueName("ev")+"@example.com", "House", "Nephrology")})
	id := int64(wantObject(t, res, 201)["id"].(float64))
	wantEvents(t, res, sid, fmt.Sprintf("doctor.create %d", id))
	res = do(t, s, req{method: "PATCH", path: doctorPath(id), token: a.access, body: map[string]any{"last_name": "Wilson", "first_name": "Gregory"}})
	if got := wantObject(t, res, 200); got["last_name"] != "Wilson" {
		t.Fatalf("PATCH: last_name %v, want Wilson; body %s", got["last_name"], res.body)
	}
	wantEvents(t, res, sid, fmt.Sprintf("doctor.update %d [last_name]", id))
	res = do(t, s, req{method: "PATCH", path: doctorPath(id), token: b.access, body: map[string]any{"last_name": "Cuddy"}})
	wantJSON(t, res, 403, `{"detail": "You do not have permission to perform this action."}`)
	wantEvents(t, res, nil)
	res = do(t, s, req{method: "DELETE", path: doctorPath(id), token: a.access})
	wantNoContent(t, res)
	wantEvents(t, res, sid, fmt.Sprintf("doctor.delete %d", id))
	// a's trail holds another doctor's events too, which the filter must leave out.
	other, _ := mustCreate(t, s, a.access, doctorsPath, doctorBody(uniqueName("ev")+"@example.com", "Chase", "Surgery"))
	wantObject(t, do(t, s, req{method: "PATCH", path: doctorPath(other), token: a.access, body: map[string]any{"last_name": "Foreman"}}), 200)

	page := wantObject(t, do(t, s, req{method: "GET", path: fmt.Sprintf("/api/audit/?doctor=%d", id), token: a.access}), 200)
	var actions []string
	for _, e := range page["results"].([]any) {
		ev := e.(map[string]any)
		actions = append(actions, fmt.Sprint(ev["action"], " ", ev["doctor"], " ", ev["fields"]))
	}
	want := []string{fmt.Sprintf("doctor.delete %d []", id), fmt.Sprintf("doctor.update %d [last_name]", id), fmt.Sprintf("doctor.create %d []", id)}
	if page["next"] != nil || strings.Join(actions, "; ") != strings.Join(want, "; ") {
		t.Fatalf("audit ?doctor=%d: next %v, %q; want %q", id, page["next"], actions, want)
	}
	wantJSON(t, do(t, s, req{method: "GET", path: fmt.Sprintf("/api/audit/?doctor=%d", id), token: b.access}), 200, emptyCursorPage)
	wantJSON(t, do(t, s, req{method: "GET", path: "/api/audit/?doctor=x", token: a.access}), 400, `{"doctor": ["A valid integer is required."]}`)
}

// TestDoctorEmailFrozen: once another user's patient is assigned to a
// doctor, its creator can no longer change its email (409, nothing
// changes, no event), while the other fields still change; the creator's
// own assignments freeze nothing.
func TestDoctorEmailFrozen(t *testing.T) {
	s := newTestServer(t, nil)
	creator, other := register(t, s), register(t, s)
	d, _ := mustCreate(t, s, creator.access, doctorsPath, doctorBody(uniqueName("fz")+"@example.com", "House", "Diagnostics"))
	own, _ := mustCreate(t, s, creator.access, patientsPath, adaBody("ada@example.com"))
	mustCreate(t, s, creator.access, mappingsPath, map[string]any{"patient": own, "doctor": d})
	patch := func(body map[string]any) response {
		return do(t, s, req{method: "PATCH", path: doctorPath(d), token: creator.access, body: body})
	}
	email := uniqueName("own") + "@example.com"
	wantShape(t, patch(map[string]any{"email": email}), 200, doctorWant(d, "Gregory", "House", email, "Diagnostics"))
	theirs, _ := mustCreate(t, s, other.access, patientsPath, adaBody("ada@example.com"))
	mustCreate(t, s, other.access, mappingsPath, map[string]any{"patient": theirs, "doctor": d})
	before := mustGet(t, s, creator.access, doctorPath(d))
	const frozen = `{"detail": "Other users' patients are assigned to this doctor; its email can no longer change."}`
	wantJSON(t, patch(map[string]any{"email": uniqueName("new") + "@example.com"}), 409, frozen)
	wantJSON(t, do(t, s, req{method: "PUT", path: doctorPath(d), token: creator.access,
		body: doctorBody(uniqueName("new")+"@example.com", "House", "Diagnostics")}), 409, frozen)
	wantSame(t, s, creator.access, doctorPath(d), before)
	var events int
	if err := testDB.QueryRowContext(t.Context(), `SELECT count(*) FROM audit_events WHERE doctor_id = $1 AND action = 'doctor.update'`, d).Scan(&events); err != nil || events != 1 {
		t.Fatalf("doctor.update events: %d, %v; want 1 (the change before the freeze)", events, err)
	}
	wantShape(t, patch(map[string]any{"email": strings.ToUpper(email), "last_name": "Wilson"}), 200, doctorWant(d, "Gregory", "Wilson", email, "Diagnostics"))

	// An assignment by another user racing an email change: each ends
	// whole (no deadlock, no 500), and the email is frozen after.
	for range 10 {
		d, _ := mustCreate(t, s, creator.access, doctorsPath, doctorBody(uniqueName("rz")+"@example.com", "House", "Diagnostics"))
		p, _ := mustCreate(t, s, other.access, patientsPath, adaBody(uniqueName("rz")+"@example.com"))
		out := concurrently(t, s, []req{
			{method: "POST", path: mappingsPath, token: other.access, body: jsonText(map[string]any{"patient": p, "doctor": d})},
			{method: "PATCH", path: doctorPath(d), token: creator.access, body: jsonText(map[string]any{"email": uniqueName("rz2") + "@example.com"})},
		})
		if out[0].status != 201 || out[1].status != 200 && out[1].status != 409 {
			t.Fatalf("racing: mapping %d %s, patch %d %s", out[0].status, out[0].body, out[1].status, out[1].body)
		}
		wantJSON(t, do(t, s, req{method: "PATCH", path: doctorPath(d), token: creator.access, body: map[string]any{"email": uniqueName("rz3") + "@example.com"}}), 409, frozen)
	}
}
