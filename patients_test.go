package main

import (
	"cmp"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lib/pq"
)

const patientsPath = "/api/patients/"

func patientPath(id int64) string { return patientsPath + strconv.FormatInt(id, 10) + "/" }

// adaBody is the full patient most tests start from.
func adaBody(email string) map[string]any {
	return map[string]any{"first_name": "Ada", "last_name": "Byron", "email": email,
		"date_of_birth": "1990-05-17", "phone": "+44 20 7946 0958"}
}

// patientWant is the wantShape pattern of a patient; id 0 means any id; dob
// TestSearchAcrossFields: search runs on the fields joined by ' ', so a
// term must never match across two fields (a literal % or _ bridging the
// join, or a term spanning it); non-ASCII terms match case-insensitively;
// terms shorter than a trigram still match.
func TestSearchAcrossFields(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	rows := []map[string]any{
		{"first_name": "Zoë", "last_name": "Straße", "email": "zoe@x.org"},
		{"first_name": "ab", "last_name": "cd", "email": "abcd@y.org"},
		{"first_name": "a%b", "last_name": "c_d", "email": "pct@y.org"},
		{"first_name": "Ωmega", "last_name": "ÉLAN", "email": "w@z.org"},
	}
	ids := make([]int64, len(rows))
	for i, r := range rows {
		ids[i], _ = mustCreate(t, s, a.access, patientsPath, r)
	}
	pick := picker(ids)
	for _, tc := range []struct {
		search string
		want   []int64
	}{
		{"zoë", pick(0)}, {"ZOË", pick(0)}, {"ß", pick(0)}, {"straße", pick(0)}, {"strasse", pick()}, {"ë", pick(0)},
		{"ωMEGA", pick(3)}, {"élan", pick(3)}, {"É", pick(3)},
		{"b%c", pick()}, {"b_c", pick()}, {"b c", pick(1, 2)}, {"ab,cd", pick(1)}, {"abcd", pick(1)},
		{"%b", pick(2)}, {"c_", pick(2)}, {"_d", pick(2)}, {"%", pick(2)}, {"_", pick(2)},
		{"a", pick(0, 1, 2, 3)}, {"y.", pick(1, 2)}, {"org cd", pick(1)}, {"zoe@x.org zoë", pick(0)}, {"@x.org straße", pick(0)},
		{"Zoë Straße", pick(0)}, {"oë s", pick(0)}, {"zoëstraße", pick()},
	} {
		t.Run(tc.search, func(t *testing.T) {
			res := do(t, s, req{method: "GET", path: patientsPath + "?search=" + url.QueryEscape(tc.search), token: a.access})
			wantPage(t, res, len(tc.want), "", "", tc.want)
		})
	}
	d, _ := mustCreate(t, s, a.access, doctorsPath, doctorBody(uniqueName("d")+"@example.com", "Ærø", "Kardiologie_ß"))
	wantPage(t, do(t, s, req{method: "GET", path: doctorsPath + "?search=" + url.QueryEscape("ærø gie_ß"), token: a.access}), 1, "", "", []int64{d})
	wantPage(t, do(t, s, req{method: "GET", path: doctorsPath + "?search=" + url.QueryEscape("ø%k"), token: a.access}), 0, "", "", nil)
}

// nil means null.
func patientWant(id int64, first, last, email string, dob any, phone string) string {
	var idv any = "<id>"
	if id != 0 {
		idv = id
	}
	return jsonText(map[string]any{"id": idv, "first_name": first, "last_name": last, "email": email,
		"date_of_birth": dob, "phone": phone, "created_at": "<stamp>", "updated_at": "<stamp>"})
}

func TestPatientAccess(t *testing.T) {
	s := newTestServer(t, nil)
	const (
		owner  = "owner"
		other  = "other"
		nobody = "nobody"
	)
	// In paths and wants, {id} is the owner's patient's id and {before} its
	// body before the request. after says what the owner must see next:
	// "same" (nothing changed), "changed" (the detail GET equals the
	// answer), "created" (one more patient), "deleted".
	cases := []struct {
		name   string
		who    string
		method string
		path   string
		body   any
		status int
		want   string
		after  string
	}{
		{"list as owner", owner, "GET", patientsPath, nil, 200,
			`{"count": 1, "next": null, "previous": null, "results": [{before}]}`, "same"},
		{"list as other", other, "GET", patientsPath, nil, 200, emptyPage, "same"},
		{"list without token", nobody, "GET", patientsPath, nil, 401, bodyUnauthenticated, "same"},

		{"create as owner", owner, "POST", patientsPath, map[string]any{"first_name": "Bo", "email": "bo@example.com"}, 201,
			patientWant(0, "Bo", "", "bo@example.com", nil, ""), "created"},
		// The other user's POST makes the other user's patient, whatever
		// owner it names; the owner's list does not change.
		{"create as other", other, "POST", patientsPath,
			map[string]any{"first_name": "Eve", "email": "ada@example.com", "owner": "{ownerID}", "owner_id": "{ownerID}"}, 201,
			patientWant(0, "Eve", "", "ada@example.com", nil, ""), "same"},
		{"create without token", nobody, "POST", patientsPath, map[string]any{"first_name": "Eve", "email": "eve@example.com"}, 401,
			bodyUnauthenticated, "same"},

		{"get as owner", owner, "GET", "/api/patients/{id}/", nil, 200, `{before}`, "same"},
		{"get as other", other, "GET", "/api/patients/{id}/", nil, 404, bodyNotFound, "same"},
		{"get without token", nobody, "GET", "/api/patients/{id}/", nil, 401, bodyUnauthenticated, "same"},

		{"put as owner", owner, "PUT", "/api/patients/{id}/", map[string]any{"first_name": "Grace", "email": "grace@example.com"}, 200,
			patientWant(thisID, "Grace", "Byron", "grace@example.com", "1990-05-17", "+44 20 7946 0958"), "changed"},
		{"put as other", other, "PUT", "/api/patients/{id}/", map[string]any{"first_name": "Eve", "email": "eve@example.com"}, 404,
			bodyNotFound, "same"},
		{"put without token", nobody, "PUT", "/api/patients/{id}/", map[string]any{"first_name": "Eve", "email": "eve@example.com"}, 401,
			bodyUnauthenticated, "same"},

		{"patch as owner", owner, "PATCH", "/api/patients/{id}/", map[string]any{"last_name": "Lovelace"}, 200,
			patientWant(thisID, "Ada", "Lovelace", "ada@example.com", "1990-05-17", "+44 20 7946 0958"), "changed"},
		{"patch as other", other, "PATCH", "/api/patients/{id}/", map[string]any{"last_name": "Hacked"}, 404, bodyNotFound, "same"},
		{"empty patch as other", other, "PATCH", "/api/patients/{id}/", nil, 404, bodyNotFound, "same"},
		{"patch without token", nobody, "PATCH", "/api/patients/{id}/", map[string]any{"last_name": "Hacked"}, 401,
			bodyUnauthenticated, "same"},

		{"delete as owner", owner, "DELETE", "/api/patients/{id}/", nil, 204, "", "deleted"},
		{"delete as other", other, "DELETE", "/api/patients/{id}/", nil, 404, bodyNotFound, "same"},
		{"delete without token", nobody, "DELETE", "/api/patients/{id}/", nil, 401, bodyUnauthenticated, "same"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			// Fresh users each time keep the counts exact.
			a, b := register(t, s), register(t, s)
			id, _ := mustCreate(t, s, a.access, patientsPath, adaBody("ada@example.com"))
			before := mustGet(t, s, a.access, patientPath(id))
			listBefore := mustGet(t, s, a.access, patientsPath)
			r := strings.NewReplacer("{id}", strconv.FormatInt(id, 10), "{before}", before,
				`"{ownerID}"`, strconv.FormatInt(a.id, 10), strconv.Itoa(thisID), strconv.FormatInt(id, 10))
			token := map[string]string{owner: a.access, other: b.access}[tc.who]
			var body any
			if tc.body != nil {
				body = r.Replace(jsonText(tc.body))
			}
			res := do(t, s, req{method: tc.method, path: r.Replace(tc.path), token: token, body: body})
			switch {
			case tc.status == http.StatusNoContent:
				wantNoContent(t, res)
			default:
				wantShape(t, res, tc.status, r.Replace(tc.want))
			}
			if tc.status == 401 && res.header.Get("WWW-Authenticate") != `Bearer realm="api"` {
				t.Errorf("401 without WWW-Authenticate: %v", res.header)
			}
			switch tc.after {
			case "same":
				wantSame(t, s, a.access, patientPath(id), before)
				wantSame(t, s, a.access, patientsPath, listBefore)
			case "changed":
				wantSame(t, s, a.access, patientPath(id), string(res.body))
				if got := res.object(t)["created_at"]; got != (response{body: []byte(before)}).object(t)["created_at"] {
					t.Errorf("created_at changed: %v, was %s", got, before)
				}
			case "created":
				newID := int64(res.object(t)["id"].(float64))
				wantSame(t, s, a.access, patientPath(newID), string(res.body))
				wantSame(t, s, a.access, patientPath(id), before)
				wantPage(t, do(t, s, req{method: "GET", path: patientsPath, token: a.access}), 2, "", "", []int64{id, newID})
			case "deleted":
				wantJSON(t, do(t, s, req{method: "GET", path: patientPath(id), token: a.access}), 404, bodyNotFound)
				wantJSON(t, do(t, s, req{method: "GET", path: patientsPath, token: a.access}), 200, emptyPage)
			}
			if tc.who == other && tc.method == "POST" {
				// The other user's new patient is theirs alone.
				newID := int64(res.object(t)["id"].(float64))
				wantSame(t, s, b.access, patientPath(newID), string(res.body))
				wantJSON(t, do(t, s, req{method: "GET", path: patientPath(newID), token: a.access}), 404, bodyNotFound)
			}
		})
	}
}

func TestPatientUnknownIDs(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	id, _ := mustCreate(t, s, a.access, patientsPath, adaBody("ada@example.com"))
	before := mustGet(t, s, a.access, patientPath(id))
	valid := map[string]any{"first_name": "Eve", "email": "eve@example.com"}
	for _, p := range []string{
		strconv.FormatInt(id+1_000_000, 10),
		"0",
		"-1",
		"abc",
		"1.5",
		"99999999999999999999",
		"1%20OR%201=1",
		"1;DROP%20TABLE%20patients",
		"%27",
	} {
		for _, method := range []string{"GET", "PUT", "PATCH", "DELETE"} {
			t.Run(method+" "+p, func(t *testing.T) {
				var body any
				if method == "PUT" || method == "PATCH" {
					body = valid
				}
				res := do(t, s, req{method: method, path: patientsPath + p + "/", token: a.access, body: body})
				wantJSON(t, res, 404, bodyNotFound)
			})
		}
		// The order of checks puts 415 and 400 before the operation's 404,
		// whatever the id looks like.
		t.Run("PUT "+p+" body checked first", func(t *testing.T) {
			res := do(t, s, req{method: "PUT", path: patientsPath + p + "/", token: a.access, body: "x",
				header: map[string]string{"Content-Type": "text/plain"}})
			wantJSON(t, res, 415, `{"detail": "Unsupported media type \"text/plain\" in request."}`)
			res = do(t, s, req{method: "PUT", path: patientsPath + p + "/", token: a.access, body: map[string]any{"first_name": ""}})
			wantJSON(t, res, 400, errs("first_name", msgBlank, "email", msgRequired))
			res = do(t, s, req{method: "PATCH", path: patientsPath + p + "/", token: a.access, body: map[string]any{"phone": "1"}})
			wantJSON(t, res, 400, errs("phone", msgPhone))
		})
	}
	wantSame(t, s, a.access, patientPath(id), before)
	wantTablesIntact(t)
}

func TestPatientListIsolation(t *testing.T) {
	s := newTestServer(t, nil)
	a, b := register(t, s), register(t, s)
	var aIDs, bIDs []int64
	for i := range 3 {
		id, _ := mustCreate(t, s, a.access, patientsPath, map[string]any{"first_name": "Shared", "email": fmt.Sprintf("p%d@example.com", i)})
		aIDs = append(aIDs, id)
	}
	for i := range 2 {
		// The same emails: unique per owner, not across owners.
		id, _ := mustCreate(t, s, b.access, patientsPath, map[string]any{"first_name": "Shared", "email": fmt.Sprintf("P%d@Example.com", i)})
		bIDs = append(bIDs, id)
	}
	for _, q := range []string{"", "?search=shared", "?search=example.com", "?ordering=-id", "?page_size=100"} {
		t.Run("a"+q, func(t *testing.T) {
			res := do(t, s, req{method: "GET", path: patientsPath + q, token: a.access})
			want := aIDs
			if q == "?ordering=-id" {
				want = []int64{aIDs[2], aIDs[1], aIDs[0]}
			}
			wantPage(t, res, 3, "", "", want)
		})
		t.Run("b"+q, func(t *testing.T) {
			res := do(t, s, req{method: "GET", path: patientsPath + q, token: b.access})
			want := bIDs
			if q == "?ordering=-id" {
				want = []int64{bIDs[1], bIDs[0]}
			}
			wantPage(t, res, 2, "", "", want)
		})
	}
	t.Run("new user", func(t *testing.T) {
		c := register(t, s)
		wantJSON(t, do(t, s, req{method: "GET", path: patientsPath, token: c.access}), 200, emptyPage)
	})
}

func TestPatientPagination(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	var ids []int64
	for i := range 25 {
		id, _ := mustCreate(t, s, a.access, patientsPath, map[string]any{
			"first_name": fmt.Sprintf("Page%02d", i), "last_name": "Turner", "email": fmt.Sprintf("n%02d@example.com", i)})
		ids = append(ids, id)
	}
	reversed := make([]int64, len(ids))
	for i, id := range ids {
		reversed[len(ids)-1-i] = id
	}
	const base = "http://localhost/api/patients/"
	cases := []struct {
		name, query    string
		count          int
		next, previous string
		ids            []int64
	}{
		{"first page by default", "", 25, base + "?page=2", "", ids[0:10]},
		{"page 1", "?page=1", 25, base + "?page=2", "", ids[0:10]},
		{"empty page means 1", "?page=", 25, base + "?page=2", "", ids[0:10]},
		{"page 2", "?page=2", 25, base + "?page=3", base, ids[10:20]},
		{"last page", "?page=3", 25, "", base + "?page=2", ids[20:25]},
		{"page size 5", "?page_size=5&page=2", 25, base + "?page=3&page_size=5", base + "?page_size=5", ids[5:10]},
		{"page size 25", "?page_size=25", 25, "", "", ids},
		{"page size 100", "?page_size=100", 25, "", "", ids},
		{"page size 0 means default", "?page_size=0", 25, base + "?page=2&page_size=0", "", ids[0:10]},
		{"negative page size means default", "?page_size=-3", 25, base + "?page=2&page_size=-3", "", ids[0:10]},
		{"page size abc means default", "?page_size=abc", 25, base + "?page=2&page_size=abc", "", ids[0:10]},
		{"page size 2.5 means default", "?page_size=2.5", 25, base + "?page=2&page_size=2.5", "", ids[0:10]},
		{"empty page size means default", "?page_size=", 25, base + "?page=2&page_size=", "", ids[0:10]},
		{"links keep search", "?search=page0&page_size=3&page=2", 10,
			base + "?page=3&page_size=3&search=page0", base + "?page_size=3&search=page0", ids[3:6]},
		{"links keep ordering", "?ordering=-id&page=2", 25, base + "?ordering=-id&page=3", base + "?ordering=-id", reversed[10:20]},
		{"links keep unknown parameters", "?foo=bar&page=2", 25, base + "?foo=bar&page=3", base + "?foo=bar", ids[10:20]},
		{"search with one page", "?search=page1", 10, "", "", ids[10:20]},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res := do(t, s, req{method: "GET", path: patientsPath + tc.query, token: a.access})
			wantPage(t, res, tc.count, tc.next, tc.previous, tc.ids)
		})
	}
	t.Run("links are absolute", func(t *testing.T) {
		page := do(t, s, req{method: "GET", path: patientsPath + "?page=2", token: a.access}).object(t)
		for _, k := range []string{"next", "previous"} {
			u, err := url.Parse(page[k].(string))
			if err != nil || !u.IsAbs() || u.Host != "localhost" || u.Path != patientsPath {
				t.Errorf("%s = %v (err %v), want an absolute URL to %s", k, page[k], err, patientsPath)
			}
		}
	})
	t.Run("results are whole patients", func(t *testing.T) {
		page := do(t, s, req{method: "GET", path: patientsPath + "?page_size=1", token: a.access})
		one := mustGet(t, s, a.access, patientPath(ids[0]))
		wantJSON(t, page, 200, fmt.Sprintf(`{"count": 25, "next": %q, "previous": null, "results": [%s]}`,
			base+"?page=2&page_size=1", one))
	})
	// Pages so large that (page-1)*page_size overflows an int must still
	// be "Invalid page.", not a negative OFFSET (500) or page 1 again.
	// "last" too: the contract takes only numbers (DRF also took "last").
	for _, p := range []string{"4", "0", "-1", "abc", "1.5", "99999999999999999999", "%27%3B", "last", "last1",
		"92233720368547760&page_size=100", "4611686018427387905&page_size=4", "9223372036854775807"} {
		t.Run("invalid page "+p, func(t *testing.T) {
			wantJSON(t, do(t, s, req{method: "GET", path: patientsPath + "?page=" + p, token: a.access}), 404, bodyInvalidPage)
		})
	}
	t.Run("empty list", func(t *testing.T) {
		b := register(t, s)
		for _, q := range []string{"", "?page=1", "?page_size=5", "?search=nothing"} {
			wantJSON(t, do(t, s, req{method: "GET", path: patientsPath + q, token: b.access}), 200, emptyPage)
		}
		wantJSON(t, do(t, s, req{method: "GET", path: patientsPath + "?page=2", token: b.access}), 404, bodyInvalidPage)
	})
	t.Run("page size capped at 100", func(t *testing.T) {
		b := register(t, s)
		var many []int64
		for i := range 105 {
			id, _ := mustCreate(t, s, b.access, patientsPath, map[string]any{"first_name": "Many", "email": fmt.Sprintf("m%03d@example.com", i)})
			many = append(many, id)
		}
		for _, size := range []string{"100", "101", "150", "1000000", "99999999999999999999"} {
			res := do(t, s, req{method: "GET", path: patientsPath + "?page_size=" + size, token: b.access})
			wantPage(t, res, 105, base+"?page=2&page_size="+size, "", many[0:100])
			res = do(t, s, req{method: "GET", path: patientsPath + "?page=2&page_size=" + size, token: b.access})
			wantPage(t, res, 105, "", base+"?page_size="+size, many[100:])
		}
		wantPage(t, do(t, s, req{method: "GET", path: patientsPath, token: b.access}), 105, base+"?page=2", "", many[0:10])
		wantPage(t, do(t, s, req{method: "GET", path: patientsPath + "?page=11", token: b.access}), 105, "", base+"?page=10", many[100:])
		wantJSON(t, do(t, s, req{method: "GET", path: patientsPath + "?page=12", token: b.access}), 404, bodyInvalidPage)
	})
}

func TestPatientSearch(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	rows := []map[string]any{
		{"first_name": "Alice", "last_name": "Smith", "email": "alice.smith@clinic.org"},
		{"first_name": "Bob", "last_name": "Alison", "email": "bob@home.net"},
		{"first_name": "Carol", "last_name": "Jones", "email": "cj@alice-corp.com"},
		{"first_name": "100%", "last_name": "Percent", "email": "pct@x.org"},
		{"first_name": "1000", "last_name": "Plain", "email": "plain@x.org"},
		{"first_name": "a_b", "last_name": "Under", "email": "u1@x.org"},
		{"first_name": "axb", "last_name": "Under", "email": "u2@x.org"},
		{"first_name": `back\slash`, "last_name": "Esc", "email": "e@x.org"},
	}
	ids := make([]int64, len(rows))
	for i, r := range rows {
		ids[i], _ = mustCreate(t, s, a.access, patientsPath, r)
	}
	pick := picker(ids)
	cases := []struct {
		search string
		want   []int64
	}{
		{"alice", pick(0, 2)},
		{"ALICE", pick(0, 2)},
		{"aLiCe", pick(0, 2)},
		{"ali", pick(0, 1, 2)},
		{"alice smith", pick(0)},
		{"alice,smith", pick(0)},
		{"alice, smith", pick(0)},
		{" alice  smith ", pick(0)},
		{"smith,alice", pick(0)},
		{"alice bob", pick()},
		{"home.net", pick(1)},
		{"jones alice-corp", pick(2)},
		{"%", pick(3)},
		{"0%", pick(3)},
		{"_", pick(5)},
		{"a_b", pick(5)},
		{`\`, pick(7)},
		{`\s`, pick(7)},
		{"under", pick(5, 6)},
		{"x.org", pick(3, 4, 5, 6, 7)},
		{"x.org under", pick(5, 6)},
		{"", pick(0, 1, 2, 3, 4, 5, 6, 7)},
		{" , ,", pick(0, 1, 2, 3, 4, 5, 6, 7)},
		{"nomatch", pick()},
		{"'", pick()},
	}
	for _, tc := range cases {
		t.Run(tc.search, func(t *testing.T) {
			res := do(t, s, req{method: "GET", path: patientsPath + "?search=" + url.QueryEscape(tc.search), token: a.access})
			wantPage(t, res, len(tc.want), "", "", tc.want)
		})
	}
	t.Run("another user's patients never match", func(t *testing.T) {
		b := register(t, s)
		wantJSON(t, do(t, s, req{method: "GET", path: patientsPath + "?search=alice", token: b.access}), 200, emptyPage)
	})
}

func TestPatientOrdering(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	rows := [][2]string{{"carl", "young"}, {"anna", "young"}, {"bert", "adams"}, {"anna", "adams"}}
	ids := make([]int64, len(rows))
	for i, r := range rows {
		ids[i], _ = mustCreate(t, s, a.access, patientsPath, map[string]any{
			"first_name": r[0], "last_name": r[1], "email": fmt.Sprintf("o%d@example.com", i)})
	}
	pick := picker(ids)
	cases := []struct {
		ordering string
		want     []int64
	}{
		{"", pick(0, 1, 2, 3)},
		{",", pick(0, 1, 2, 3)},
		{"id", pick(0, 1, 2, 3)},
		{"-id", pick(3, 2, 1, 0)},
		{"first_name", pick(1, 3, 2, 0)},
		{"-first_name", pick(0, 2, 1, 3)},
		{"last_name", pick(2, 3, 0, 1)},
		{"-last_name", pick(0, 1, 2, 3)},
		{"last_name,first_name", pick(3, 2, 1, 0)},
		{"last_name,-first_name", pick(2, 3, 0, 1)},
		{"-last_name,-id", pick(1, 0, 3, 2)},
		{"created_at", pick(0, 1, 2, 3)},
		{"-created_at", pick(3, 2, 1, 0)},
	}
	for _, tc := range cases {
		t.Run("ordering="+tc.ordering, func(t *testing.T) {
			res := do(t, s, req{method: "GET", path: patientsPath + "?ordering=" + url.QueryEscape(tc.ordering), token: a.access})
			wantPage(t, res, 4, "", "", tc.want)
		})
		// Pages past the middle are read from the end and turned round
		// (listPage): every page must still hold its own rows, in order.
		t.Run("ordering="+tc.ordering+" page by page", func(t *testing.T) {
			for _, size := range []int{1, 3, 10} {
				link := func(n int) string {
					if n < 1 || (n-1)*size >= 4 {
						return ""
					}
					q := url.Values{"ordering": {tc.ordering}, "page_size": {strconv.Itoa(size)}}
					if n > 1 {
						q.Set("page", strconv.Itoa(n))
					}
					return "http://localhost" + patientsPath + "?" + q.Encode()
				}
				for n := 1; (n-1)*size < 4; n++ {
					res := do(t, s, req{method: "GET", path: patientsPath + "?ordering=" + url.QueryEscape(tc.ordering) +
						"&page_size=" + strconv.Itoa(size) + "&page=" + strconv.Itoa(n), token: a.access})
					wantPage(t, res, 4, link(n+1), link(n-1), tc.want[(n-1)*size:min(n*size, 4)])
				}
			}
		})
	}
	for _, tc := range []struct{ ordering, field string }{
		{"nope", "nope"},
		{"email", "email"},
		{"specialization", "specialization"},
		{"phone", "phone"},
		{"owner_id", "owner_id"},
		{"first_name,nope", "nope"},
		{"FIRST_NAME", "FIRST_NAME"},
		{"id;DROP TABLE patients", "id;DROP TABLE patients"},
	} {
		t.Run("invalid "+tc.ordering, func(t *testing.T) {
			res := do(t, s, req{method: "GET", path: patientsPath + "?ordering=" + url.QueryEscape(tc.ordering), token: a.access})
			wantJSON(t, res, 400, jsonText(map[string][]string{"ordering": {`Invalid ordering field "` + tc.field + `".`}}))
		})
	}
	wantTablesIntact(t)
	t.Run("created_at sorts the time, not its text", func(t *testing.T) {
		wantTimeOrder(t, s, a.access, "patients", patientsPath+"?page_size=10", ids)
	})
}

// wantTimeOrder sets the created_at of ids[0] and ids[1] (of table) to
// 10000-01-01 and 9999-12-31, whose text sorts the other way round, and
// wants path (with ordering=created_at, or -created_at) to sort the time.
func wantTimeOrder(t *testing.T, s http.Handler, token, table, path string, ids []int64) {
	t.Helper()
	_, err := testDB.ExecContext(t.Context(), `UPDATE `+table+` SET created_at = CASE id WHEN $1 THEN timestamptz '10000-01-01Z'
		ELSE timestamptz '9999-12-31Z' END WHERE id IN ($1, $2)`, ids[0], ids[1])
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { // other tests list the shared doctors: give them times of this age back
		testDB.ExecContext(context.Background(), `UPDATE `+table+` SET created_at = now() WHERE id IN ($1, $2)`, ids[0], ids[1])
	})
	pick := picker(ids)
	for ordering, want := range map[string][]int64{"created_at": pick(2, 3, 1, 0), "-created_at": pick(0, 1, 3, 2)} {
		got := resultIDs(t, wantObject(t, do(t, s, req{method: "GET", path: path + "&ordering=" + ordering, token: token}), 200))
		if !slices.Equal(got, want) {
			t.Errorf("ordering=%s: %v, want %v", ordering, got, want)
		}
	}
}

func TestPatientValidation(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	tomorrow := time.Now().UTC().AddDate(0, 0, 1).Format(time.DateOnly)
	cases := []struct {
		name string
		body any // a map is merged over a valid body; nil/"" are sent as they are
		want string
	}{
		{"no body", nil, errs("first_name", msgRequired, "email", msgRequired)},
		{"empty object", "{}", errs("first_name", msgRequired, "email", msgRequired)},
		{"only unknown keys", `{"First_Name": "Ann", "EMAIL": "ann@example.com"}`, errs("first_name", msgRequired, "email", msgRequired)},
		{"first_name missing", map[string]any{"-": "first_name"}, errs("first_name", msgRequired)},
		{"email missing", map[string]any{"-": "email"}, errs("email", msgRequired)},

		{"first_name blank", map[string]any{"first_name": ""}, errs("first_name", msgBlank)},
		{"first_name spaces", map[string]any{"first_name": "   \t "}, errs("first_name", msgBlank)},
		{"first_name only tags", map[string]any{"first_name": "<b></b>"}, errs("first_name", msgBlank)},
		{"first_name 101 characters", map[string]any{"first_name": strN("é", 101)}, errs("first_name", msgMax100)},
		{"first_name 101 after tags", map[string]any{"first_name": "<b>" + strN("a", 101) + "</b>"}, errs("first_name", msgMax100)},
		{"first_name null", map[string]any{"first_name": json.RawMessage("null")}, errs("first_name", msgNull)},
		{"first_name number", map[string]any{"first_name": 5}, errs("first_name", msgNotString)},
		{"first_name bool", map[string]any{"first_name": true}, errs("first_name", msgNotString)},
		{"first_name list", map[string]any{"first_name": []string{"Ann"}}, errs("first_name", msgNotString)},
		{"first_name NUL", map[string]any{"first_name": "A\u0000nn"}, errs("first_name", msgNUL)},

		{"last_name 101 characters", map[string]any{"last_name": strN("ß", 101)}, errs("last_name", msgMax100)},
		{"last_name null", map[string]any{"last_name": json.RawMessage("null")}, errs("last_name", msgNull)},
		{"last_name object", map[string]any{"last_name": map[string]any{}}, errs("last_name", msgNotString)},
		{"last_name NUL", map[string]any{"last_name": "\u0000"}, errs("last_name", msgNUL)},

		{"email blank", map[string]any{"email": ""}, errs("email", msgBlank)},
		{"email spaces", map[string]any{"email": "   "}, errs("email", msgBlank)},
		{"email null", map[string]any{"email": json.RawMessage("null")}, errs("email", msgNull)},
		{"email object", map[string]any{"email": map[string]any{"a": 1}}, errs("email", msgNotString)},
		{"email number", map[string]any{"email": 42}, errs("email", msgNotString)},
		{"email NUL", map[string]any{"email": "ann\u0000@example.com"}, errs("email", msgNUL)},
		{"email no at", map[string]any{"email": "not-an-email"}, errs("email", msgEmail)},
		{"email no domain dot", map[string]any{"email": "ann@example"}, errs("email", msgEmail)},
		{"email two ats", map[string]any{"email": "ann@@example.com"}, errs("email", msgEmail)},
		{"email space", map[string]any{"email": "a nn@example.com"}, errs("email", msgEmail)},
		{"email no local part", map[string]any{"email": "@example.com"}, errs("email", msgEmail)},
		{"email leading dot", map[string]any{"email": ".ann@example.com"}, errs("email", msgEmail)},
		{"email 255 characters", map[string]any{"email": strN("a", 243) + "@example.com"}, errs("email", msgMax254)},
		// 142 characters but 272 bytes: the length is fine, the letters are not.
		{"email multi-byte", map[string]any{"email": strN("é", 130) + "@example.com"}, errs("email", msgEmail)},

		{"phone 9 digits", map[string]any{"phone": "123456789"}, errs("phone", msgPhone)},
		{"phone 16 digits", map[string]any{"phone": "1234567890123456"}, errs("phone", msgPhone)},
		{"phone letters", map[string]any{"phone": "+1 555 CALL NOW"}, errs("phone", msgPhone)},
		{"phone two pluses", map[string]any{"phone": "++15551234567"}, errs("phone", msgPhone)},
		{"phone plus at the end", map[string]any{"phone": "15551234567+"}, errs("phone", msgPhone)},
		{"phone slashes", map[string]any{"phone": "1/555/123/4567"}, errs("phone", msgPhone)},
		{"phone extension", map[string]any{"phone": "(555) 123-4567 x8"}, errs("phone", msgPhone)},
		{"phone only separators", map[string]any{"phone": "()-. "}, errs("phone", msgPhone)},
		{"phone number", map[string]any{"phone": 5551234567}, errs("phone", msgNotString)},
		{"phone null", map[string]any{"phone": json.RawMessage("null")}, errs("phone", msgNull)},
		{"phone NUL", map[string]any{"phone": "555123\u00004567"}, errs("phone", msgNUL)},

		{"date day first", map[string]any{"date_of_birth": "17/05/1990"}, errs("date_of_birth", msgDate)},
		{"date month 13", map[string]any{"date_of_birth": "1990-13-01"}, errs("date_of_birth", msgDate)},
		{"date February 30", map[string]any{"date_of_birth": "1990-02-30"}, errs("date_of_birth", msgDate)},
		{"date with time", map[string]any{"date_of_birth": "1990-05-17T00:00:00Z"}, errs("date_of_birth", msgDate)},
		{"date words", map[string]any{"date_of_birth": "yesterday"}, errs("date_of_birth", msgDate)},
		{"date number", map[string]any{"date_of_birth": 19900517}, errs("date_of_birth", msgNotString)},
		{"date NUL", map[string]any{"date_of_birth": "1990-05-17\u0000"}, errs("date_of_birth", msgNUL)},
		{"date tomorrow", map[string]any{"date_of_birth": tomorrow}, errs("date_of_birth", msgFuture)},
		{"date far future", map[string]any{"date_of_birth": "3000-01-01"}, errs("date_of_birth", msgFuture)},
		{"date 1899-12-31", map[string]any{"date_of_birth": "1899-12-31"}, errs("date_of_birth", msgBefore)},
		{"date year 1", map[string]any{"date_of_birth": "0001-01-01"}, errs("date_of_birth", msgBefore)},

		{"every field wrong", map[string]any{"first_name": "", "last_name": 1, "email": "bad", "phone": "1", "date_of_birth": "x"},
			errs("first_name", msgBlank, "last_name", msgNotString, "email", msgEmail, "phone", msgPhone, "date_of_birth", msgDate)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			body := tc.body
			if m, ok := tc.body.(map[string]any); ok {
				body = withChanges(map[string]any{"first_name": "Ann", "email": uniqueName("v") + "@example.com"}, m)
			}
			res := do(t, s, req{method: "POST", path: patientsPath, token: a.access, body: body})
			wantJSON(t, res, 400, tc.want)
		})
	}
	// Nothing above was stored.
	wantJSON(t, do(t, s, req{method: "GET", path: patientsPath, token: a.access}), 200, emptyPage)
}

func TestPatientStoredValues(t *testing.T) {
	s := newTestServer(t, nil)
	a, other := register(t, s), register(t, s)
	today := time.Now().UTC().Format(time.DateOnly)
	long := strN("a", 242) + "@example.com"
	cases := []struct {
		name string
		body map[string]any
		want string // patientWant with any id
	}{
		{"only required fields", map[string]any{"first_name": "Ann", "email": "ann@example.com"},
			patientWant(0, "Ann", "", "ann@example.com", nil, "")},
		{"every field", map[string]any{"first_name": "Ann", "last_name": "Lee", "email": "ann.lee@example.com", "date_of_birth": "1990-05-17", "phone": "+1 (555) 123-4567"},
			patientWant(0, "Ann", "Lee", "ann.lee@example.com", "1990-05-17", "+1 (555) 123-4567")},
		{"email lower-cased and trimmed", map[string]any{"first_name": "Ann", "email": "  Ann.UPPER@Example.COM "},
			patientWant(0, "Ann", "", "ann.upper@example.com", nil, "")},
		{"email 254 characters", map[string]any{"first_name": "Ann", "email": long},
			patientWant(0, "Ann", "", long, nil, "")},
		{"email with plus and apostrophe", map[string]any{"first_name": "Ann", "email": "o'brien+tag@example.co.uk"},
			patientWant(0, "Ann", "", "o'brien+tag@example.co.uk", nil, "")},
		{"names of 100 multi-byte characters", map[string]any{"first_name": strN("é", 100), "last_name": strN("日", 100), "email": "mb@example.com"},
			patientWant(0, strN("é", 100), strN("日", 100), "mb@example.com", nil, "")},
		{"names trimmed", map[string]any{"first_name": "  Ann  ", "last_name": "\tLee\n", "email": "trim@example.com"},
			patientWant(0, "Ann", "Lee", "trim@example.com", nil, "")},
		{"last_name blank", map[string]any{"first_name": "Ann", "last_name": "   ", "email": "blank@example.com"},
			patientWant(0, "Ann", "", "blank@example.com", nil, "")},
		{"tags stripped", map[string]any{"first_name": "<b>Doe</b>", "last_name": "Tom <3 Jerry", "email": "tags1@example.com"},
			patientWant(0, "Doe", "Tom <3 Jerry", "tags1@example.com", nil, "")},
		{"script stripped", map[string]any{"first_name": "<script>alert(1)</script>x", "last_name": "  <i>van</i> Dyke  ", "email": "tags2@example.com"},
			patientWant(0, "alert(1)x", "van Dyke", "tags2@example.com", nil, "")},
		{"comment and lone brackets", map[string]any{"first_name": "<!-- c -->Ann", "last_name": "a < b > c", "email": "tags3@example.com"},
			patientWant(0, "Ann", "a < b > c", "tags3@example.com", nil, "")},
		{"phone trimmed", map[string]any{"first_name": "Ann", "email": "ph1@example.com", "phone": "  555.123.4567  "},
			patientWant(0, "Ann", "", "ph1@example.com", nil, "555.123.4567")},
		{"phone 10 digits", map[string]any{"first_name": "Ann", "email": "ph2@example.com", "phone": "0123456789"},
			patientWant(0, "Ann", "", "ph2@example.com", nil, "0123456789")},
		{"phone 15 digits", map[string]any{"first_name": "Ann", "email": "ph3@example.com", "phone": "+123456789012345"},
			patientWant(0, "Ann", "", "ph3@example.com", nil, "+123456789012345")},
		{"phone dashes", map[string]any{"first_name": "Ann", "email": "ph4@example.com", "phone": "555-123-4567"},
			patientWant(0, "Ann", "", "ph4@example.com", nil, "555-123-4567")},
		{"phone empty", map[string]any{"first_name": "Ann", "email": "ph5@example.com", "phone": ""},
			patientWant(0, "Ann", "", "ph5@example.com", nil, "")},
		{"phone spaces only", map[string]any{"first_name": "Ann", "email": "ph6@example.com", "phone": "   "},
			patientWant(0, "Ann", "", "ph6@example.com", nil, "")},
		{"date 1900-01-01", map[string]any{"first_name": "Ann", "email": "d1@example.com", "date_of_birth": "1900-01-01"},
			patientWant(0, "Ann", "", "d1@example.com", "1900-01-01", "")},
		{"date today", map[string]any{"first_name": "Ann", "email": "d2@example.com", "date_of_birth": today},
			patientWant(0, "Ann", "", "d2@example.com", today, "")},
		{"date null", map[string]any{"first_name": "Ann", "email": "d3@example.com", "date_of_birth": nil},
			patientWant(0, "Ann", "", "d3@example.com", nil, "")},
		{"leap day", map[string]any{"first_name": "Ann", "email": "d4@example.com", "date_of_birth": "2000-02-29"},
			patientWant(0, "Ann", "", "d4@example.com", "2000-02-29", "")},
		{"client ids, timestamps and owners ignored", map[string]any{"first_name": "Ann", "email": "ign@example.com",
			"id": 999999999, "created_at": "2000-01-01T00:00:00Z", "updated_at": "2000-01-01T00:00:00Z",
			"owner": other.id, "owner_id": other.id, "created_by": other.id, "user": other.id},
			patientWant(0, "Ann", "", "ign@example.com", nil, "")},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res := do(t, s, req{method: "POST", path: patientsPath, token: a.access, body: tc.body})
			got := wantShape(t, res, 201, tc.want).(map[string]any)
			id := int64(got["id"].(float64))
			// What was answered is what was stored, for the caller alone.
			wantSame(t, s, a.access, patientPath(id), string(res.body))
			wantJSON(t, do(t, s, req{method: "GET", path: patientPath(id), token: other.access}), 404, bodyNotFound)
			if id == 999999999 || strings.HasPrefix(got["created_at"].(string), "2000") || strings.HasPrefix(got["updated_at"].(string), "2000") {
				t.Errorf("client values were stored: %s", res.body)
			}
		})
	}
	wantJSON(t, do(t, s, req{method: "GET", path: patientsPath, token: other.access}), 200, emptyPage)
}

func TestPatientUpdate(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	const phone = "+44 20 7946 0958"
	cases := []struct {
		name   string
		method string
		body   any
		status int
		want   string // for 200: patientWant of the result (id filled in)
	}{
		{"put without email", "PUT", map[string]any{"first_name": "Grace"}, 400, errs("email", msgRequired)},
		{"put without first_name", "PUT", map[string]any{"email": "g@example.com"}, 400, errs("first_name", msgRequired)},
		{"put empty", "PUT", map[string]any{}, 400, errs("first_name", msgRequired, "email", msgRequired)},
		{"put no body", "PUT", nil, 400, errs("first_name", msgRequired, "email", msgRequired)},
		{"put blank first_name", "PUT", map[string]any{"first_name": "", "email": "g@example.com"}, 400, errs("first_name", msgBlank)},
		{"put bad phone", "PUT", map[string]any{"first_name": "Grace", "email": "g@example.com", "phone": "12"}, 400, errs("phone", msgPhone)},
		{"put required only keeps the rest", "PUT", map[string]any{"first_name": "Grace", "email": "G@Example.com"}, 200,
			patientWant(thisID, "Grace", "Byron", "g@example.com", "1990-05-17", phone)},
		{"put clears what it names", "PUT", map[string]any{"first_name": "Grace", "email": "ada@example.com", "last_name": "", "phone": "", "date_of_birth": nil}, 200,
			patientWant(thisID, "Grace", "", "ada@example.com", nil, "")},
		{"put every field", "PUT", map[string]any{"first_name": "<b>Grace</b>", "last_name": "Hopper", "email": "grace@example.com", "date_of_birth": "1906-12-09", "phone": "555-123-4567"}, 200,
			patientWant(thisID, "Grace", "Hopper", "grace@example.com", "1906-12-09", "555-123-4567")},
		{"patch nothing", "PATCH", map[string]any{}, 200, patientWant(thisID, "Ada", "Byron", "ada@example.com", "1990-05-17", phone)},
		{"patch no body", "PATCH", nil, 200, patientWant(thisID, "Ada", "Byron", "ada@example.com", "1990-05-17", phone)},
		{"patch phone", "PATCH", map[string]any{"phone": " 0123456789 "}, 200, patientWant(thisID, "Ada", "Byron", "ada@example.com", "1990-05-17", "0123456789")},
		{"patch date null", "PATCH", map[string]any{"date_of_birth": nil}, 200, patientWant(thisID, "Ada", "Byron", "ada@example.com", nil, phone)},
		{"patch email", "PATCH", map[string]any{"email": "ADA2@example.com"}, 200, patientWant(thisID, "Ada", "Byron", "ada2@example.com", "1990-05-17", phone)},
		{"patch last_name tags", "PATCH", map[string]any{"last_name": "<em>King</em>"}, 200, patientWant(thisID, "Ada", "King", "ada@example.com", "1990-05-17", phone)},
		{"patch ignores id and timestamps", "PATCH", map[string]any{"id": 1, "created_at": "2000-01-01T00:00:00Z", "owner_id": 1}, 200,
			patientWant(thisID, "Ada", "Byron", "ada@example.com", "1990-05-17", phone)},
		{"patch blank first_name", "PATCH", map[string]any{"first_name": " "}, 400, errs("first_name", msgBlank)},
		{"patch null first_name", "PATCH", map[string]any{"first_name": nil}, 400, errs("first_name", msgNull)},
		{"patch null email", "PATCH", map[string]any{"email": nil}, 400, errs("email", msgNull)},
		{"patch bad email", "PATCH", map[string]any{"email": "BAD"}, 400, errs("email", msgEmail)},
		{"patch future date", "PATCH", map[string]any{"date_of_birth": "2999-01-01"}, 400, errs("date_of_birth", msgFuture)},
		{"patch number phone", "PATCH", map[string]any{"phone": 123}, 400, errs("phone", msgNotString)},
		{"patch one bad field changes nothing", "PATCH", map[string]any{"last_name": "Changed", "phone": "x"}, 400, errs("phone", msgPhone)},
		{"patch NUL", "PATCH", map[string]any{"last_name": "a\u0000b"}, 400, errs("last_name", msgNUL)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			id, _ := mustCreate(t, s, a.access, patientsPath, adaBody("ada@example.com"))
			defer do(t, s, req{method: "DELETE", path: patientPath(id), token: a.access})
			before := mustGet(t, s, a.access, patientPath(id))
			res := do(t, s, req{method: tc.method, path: patientPath(id), token: a.access, body: tc.body})
			if tc.status != 200 {
				wantJSON(t, res, tc.status, tc.want)
				wantSame(t, s, a.access, patientPath(id), before)
				return
			}
			want := strings.ReplaceAll(tc.want, strconv.Itoa(thisID), strconv.FormatInt(id, 10))
			got := wantShape(t, res, 200, want).(map[string]any)
			wantSame(t, s, a.access, patientPath(id), string(res.body))
			prev := response{body: []byte(before)}.object(t)
			if got["created_at"] != prev["created_at"] {
				t.Errorf("created_at changed from %v to %v", prev["created_at"], got["created_at"])
			}
			if got["updated_at"].(string) < prev["updated_at"].(string) {
				t.Errorf("updated_at went back from %v to %v", prev["updated_at"], got["updated_at"])
			}
		})
	}
}

func TestPatientEmailUnique(t *testing.T) {
	s := newTestServer(t, nil)
	a, b := register(t, s), register(t, s)
	dup := errs("email", "A patient with this email already exists.")
	first, _ := mustCreate(t, s, a.access, patientsPath, map[string]any{"first_name": "One", "email": "dup@example.com"})
	second, _ := mustCreate(t, s, a.access, patientsPath, map[string]any{"first_name": "Two", "email": "two@example.com"})
	firstBody, secondBody := mustGet(t, s, a.access, patientPath(first)), mustGet(t, s, a.access, patientPath(second))
	for _, tc := range []struct {
		name, method, path string
		body               map[string]any
	}{
		{"create same", "POST", patientsPath, map[string]any{"first_name": "X", "email": "dup@example.com"}},
		{"create other case", "POST", patientsPath, map[string]any{"first_name": "X", "email": "DUP@Example.COM"}},
		{"create with spaces", "POST", patientsPath, map[string]any{"first_name": "X", "email": " Dup@example.com "}},
		{"patch onto it", "PATCH", patientPath(second), map[string]any{"email": "Dup@example.com"}},
		{"put onto it", "PUT", patientPath(second), map[string]any{"first_name": "Two", "email": "dUp@example.com"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantJSON(t, do(t, s, req{method: tc.method, path: tc.path, token: a.access, body: tc.body}), 400, dup)
			wantSame(t, s, a.access, patientPath(first), firstBody)
			wantSame(t, s, a.access, patientPath(second), secondBody)
		})
	}
	t.Run("own email in another case", func(t *testing.T) {
		res := do(t, s, req{method: "PATCH", path: patientPath(first), token: a.access, body: map[string]any{"email": "DUP@example.com"}})
		wantShape(t, res, 200, patientWant(first, "One", "", "dup@example.com", nil, ""))
	})
	t.Run("another owner may use it", func(t *testing.T) {
		res := do(t, s, req{method: "POST", path: patientsPath, token: b.access, body: map[string]any{"first_name": "Bee", "email": "Dup@Example.com"}})
		wantShape(t, res, 201, patientWant(0, "Bee", "", "dup@example.com", nil, ""))
	})
	t.Run("free again after delete", func(t *testing.T) {
		wantNoContent(t, do(t, s, req{method: "DELETE", path: patientPath(first), token: a.access}))
		res := do(t, s, req{method: "POST", path: patientsPath, token: a.access, body: map[string]any{"first_name": "Three", "email": "dup@example.com"}})
		wantShape(t, res, 201, patientWant(0, "Three", "", "dup@example.com", nil, ""))
	})
}

func TestPatientRaceSameEmail(t *testing.T) {
	s := newTestServer(t, nil)
	for round := range 5 {
		t.Run(fmt.Sprint("round ", round), func(t *testing.T) {
			a := register(t, s)
			emails := []string{"race@example.com", "RACE@example.com", "Race@Example.com", "race@EXAMPLE.COM"}
			var rqs []req
			for _, e := range emails {
				rqs = append(rqs, req{method: "POST", path: patientsPath, token: a.access, body: jsonText(map[string]any{"first_name": "R", "email": e})})
			}
			created := 0
			for i, res := range concurrently(t, s, rqs) {
				switch res.status {
				case 201:
					created++
					wantShape(t, res, 201, patientWant(0, "R", "", "race@example.com", nil, ""))
				default:
					t.Logf("request %d", i)
					wantJSON(t, res, 400, errs("email", "A patient with this email already exists."))
				}
			}
			if created != 1 {
				t.Fatalf("%d created, want exactly 1", created)
			}
			res := do(t, s, req{method: "GET", path: patientsPath, token: a.access})
			if n := res.object(t)["count"]; n != float64(1) {
				t.Fatalf("count %v, want 1", n)
			}
		})
	}
}

func TestPatientRaceDeleteAndPatch(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	docID, _ := mustCreate(t, s, a.access, doctorsPath, doctorBody(uniqueName("race")+"@example.com", "Race", "Cardiology"))
	for round := range 5 {
		t.Run(fmt.Sprint("round ", round), func(t *testing.T) {
			id, _ := mustCreate(t, s, a.access, patientsPath, adaBody(uniqueName("p")+"@example.com"))
			mustCreate(t, s, a.access, mappingsPath, map[string]any{"patient": id, "doctor": docID})
			rqs := []req{{method: "DELETE", path: patientPath(id), token: a.access}}
			for i := range 8 {
				rqs = append(rqs, req{method: "PATCH", path: patientPath(id), token: a.access, body: jsonText(map[string]any{"last_name": fmt.Sprint("P", i)})})
			}
			for i, res := range concurrently(t, s, rqs) {
				switch {
				case i == 0:
					wantNoContent(t, res)
				case res.status == 200:
					got := res.object(t)
					if got["id"] != float64(id) || got["last_name"] != fmt.Sprint("P", i-1) || got["first_name"] != "Ada" {
						t.Errorf("PATCH %d answered %s", i, res.body)
					}
				default:
					wantJSON(t, res, 404, bodyNotFound)
				}
			}
			wantJSON(t, do(t, s, req{method: "GET", path: patientPath(id), token: a.access}), 404, bodyNotFound)
			wantJSON(t, do(t, s, req{method: "GET", path: mappingsPath + strconv.FormatInt(id, 10) + "/", token: a.access}), 404, bodyNotFound)
			var rows int
			if err := testDB.QueryRow(`SELECT (SELECT count(*) FROM patients WHERE id = $1) + (SELECT count(*) FROM mappings WHERE patient_id = $1)`, id).Scan(&rows); err != nil || rows != 0 {
				t.Fatalf("after the race: %d rows left (err %v)", rows, err)
			}
		})
	}
	wantJSON(t, do(t, s, req{method: "GET", path: patientsPath, token: a.access}), 200, emptyPage)
}

func TestPatientSQLMetacharacters(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	type row struct{ first, last, email string }
	var stored []row
	for i, inj := range injections {
		t.Run("stored "+inj, func(t *testing.T) {
			email := fmt.Sprintf("inj%d@example.com", i)
			res := do(t, s, req{method: "POST", path: patientsPath, token: a.access, body: map[string]any{"first_name": inj, "last_name": inj, "email": email}})
			wantShape(t, res, 201, patientWant(0, inj, inj, email, nil, ""))
			stored = append(stored, row{inj, inj, email})
			id := int64(res.object(t)["id"].(float64))
			res = do(t, s, req{method: "PATCH", path: patientPath(id), token: a.access, body: map[string]any{"last_name": inj + inj}})
			wantShape(t, res, 200, patientWant(id, inj, inj+inj, email, nil, ""))
			stored[len(stored)-1].last = inj + inj
		})
		t.Run("refused "+inj, func(t *testing.T) {
			for _, tc := range []struct{ field, msg string }{{"email", msgEmail}, {"phone", msgPhone}, {"date_of_birth", msgDate}} {
				body := map[string]any{"first_name": "X", "email": "x@example.com", tc.field: inj}
				wantJSON(t, do(t, s, req{method: "POST", path: patientsPath, token: a.access, body: body}), 400, errs(tc.field, tc.msg))
			}
		})
	}
	// An email may legitimately hold some metacharacters.
	t.Run("email with metacharacters", func(t *testing.T) {
		email := "o'brien%_$1+x@example.com"
		res := do(t, s, req{method: "POST", path: patientsPath, token: a.access, body: map[string]any{"first_name": "Quote", "email": email}})
		wantShape(t, res, 201, patientWant(0, "Quote", "", email, nil, ""))
		stored = append(stored, row{"Quote", "", email})
	})
	// The search, as the contract defines it, over what was stored.
	matches := func(search string) int {
		n := 0
		terms := strings.FieldsFunc(search, func(r rune) bool { return r == ' ' || r == ',' })
	rows:
		for _, r := range stored {
			for _, term := range terms {
				term = strings.ToLower(term)
				if !strings.Contains(strings.ToLower(r.first), term) && !strings.Contains(strings.ToLower(r.last), term) &&
					!strings.Contains(r.email, term) {
					continue rows
				}
			}
			n++
		}
		return n
	}
	for _, inj := range injections {
		t.Run("query "+inj, func(t *testing.T) {
			q := url.QueryEscape(inj)
			res := do(t, s, req{method: "GET", path: patientsPath + "?page_size=100&search=" + q, token: a.access})
			if res.status != 200 || res.object(t)["count"] != float64(matches(inj)) {
				t.Fatalf("search %q: status %d, body %s; want %d matches", inj, res.status, res.body, matches(inj))
			}
			wantJSON(t, do(t, s, req{method: "GET", path: patientsPath + "?page=" + q, token: a.access}), 404, bodyInvalidPage)
			res = do(t, s, req{method: "GET", path: patientsPath + "?page_size=" + q, token: a.access})
			if res.status != 200 || res.object(t)["count"] != float64(len(stored)) || len(resultIDs(t, res.object(t))) != min(10, len(stored)) {
				t.Fatalf("page_size %q: status %d, body %s", inj, res.status, res.body)
			}
			wantOrderingRefused(t, do(t, s, req{method: "GET", path: patientsPath + "?ordering=" + q, token: a.access}), inj)
		})
	}
	wantTablesIntact(t)
	res := do(t, s, req{method: "GET", path: patientsPath, token: a.access})
	if res.status != 200 || res.object(t)["count"] != float64(len(stored)) {
		t.Fatalf("after the attacks: %s, want count %d", res.body, len(stored))
	}
	var n int
	if err := testDB.QueryRow(`SELECT count(*) FROM patients WHERE owner_id = $1`, a.id).Scan(&n); err != nil || n != len(stored) {
		t.Fatalf("patients in the database: %d (err %v), want %d", n, err, len(stored))
	}
}

func TestPatientQueryNotText(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	id, _ := mustCreate(t, s, a.access, patientsPath, map[string]any{"first_name": "Nul", "email": "nul@example.com"})
	// A NUL or invalid UTF-8 in the query string is not something PostgreSQL
	// can compare; DRF drops NULs from the search and Django decodes the
	// query with replacement characters. Never a 500.
	for _, tc := range []struct {
		name, query string
		want        []int64
	}{
		{"NUL search", "?search=%00", []int64{id}},
		{"NUL inside a term", "?search=N%00ul", []int64{id}},
		{"invalid UTF-8 search", "?search=%FF", []int64{}},
		{"invalid UTF-8 inside a term", "?search=Nu%FFl", []int64{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := do(t, s, req{method: "GET", path: patientsPath + tc.query, token: a.access})
			wantPage(t, res, len(tc.want), "", "", tc.want)
		})
	}
	t.Run("NUL ordering", func(t *testing.T) {
		wantOrderingRefused(t, do(t, s, req{method: "GET", path: patientsPath + "?ordering=%00", token: a.access}), "\x00")
	})
	t.Run("NUL page", func(t *testing.T) {
		wantJSON(t, do(t, s, req{method: "GET", path: patientsPath + "?page=%00", token: a.access}), 404, bodyInvalidPage)
	})
}

// TestPatientCountRace creates and deletes one owner's patients from many
// goroutines at once (so on many database connections, each with its own
// count slot) and checks the list's count against the rows themselves.
func TestPatientCountRace(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	const workers, each = 8, 25
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				id, _ := mustCreate(t, s, a.access, patientsPath, map[string]any{
					"first_name": "Count", "email": fmt.Sprintf("c%d-%d@example.com", w, i)})
				if i%5 == 0 {
					if res := do(t, s, req{method: "DELETE", path: patientPath(id), token: a.access}); res.status != http.StatusNoContent {
						t.Errorf("delete: %d %s", res.status, res.body)
					}
				}
			}
		}()
	}
	wg.Wait()
	var rows int
	if err := testDB.QueryRowContext(t.Context(), `SELECT count(*) FROM patients WHERE owner_id = $1`, a.id).Scan(&rows); err != nil {
		t.Fatal(err)
	}
	if want := workers * each * 4 / 5; rows != want {
		t.Fatalf("%d rows, want %d", rows, want)
	}
	// Another owner's patients are not counted.
	b := register(t, s)
	other, _ := mustCreate(t, s, b.access, patientsPath, map[string]any{"first_name": "Other", "email": "other@example.com"})
	for _, q := range []string{"", "?page=3"} {
		page := do(t, s, req{method: "GET", path: patientsPath + q, token: a.access}).object(t)
		if page["count"] != float64(rows) {
			t.Errorf("GET %s: count %v, want %d", q, page["count"], rows)
		}
	}
	// Deleting an owner deletes its patients.
	if _, err := testDB.ExecContext(t.Context(), `DELETE FROM users WHERE id = $1`, a.id); err != nil {
		t.Fatalf("delete owner: %v", err)
	}
	var left int
	err := testDB.QueryRowContext(t.Context(), `SELECT count(*) FROM patients WHERE owner_id = $1`, a.id).Scan(&left)
	if err != nil || left != 0 {
		t.Fatalf("after deleting the owner: %d rows left, %v", left, err)
	}
	wantPage(t, do(t, s, req{method: "GET", path: patientsPath, token: b.access}), 1, "", "", []int64{other})
}

// auditEvent is one audit_events row, read straight from the table.
type auditEvent struct {
	action          string
	patient, doctor *int64
	fields          string
	login           *int64
	ip              string
}

// eventsOf returns the events a response's request wrote, in order.
func eventsOf(t testing.TB, res response) []auditEvent {
	t.Helper()
	rows, err := testDB.QueryContext(t.Context(), `SELECT action, patient_id, doctor_id, array_to_string(fields, ','), login_id, ip
		FROM audit_events WHERE request_id = $1 ORDER BY id`, res.header.Get("X-Request-Id"))
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []auditEvent
	for rows.Next() {
		var e auditEvent
		if err := rows.Scan(&e.action, &e.patient, &e.doctor, &e.fields, &e.login, &e.ip); err != nil {
			t.Fatal(err)
		}
		out = append(out, e)
	}
	return out
}

// wantEvents fails unless res wrote exactly want (action, patient, doctor,
// fields), each by login sid from the test client's IP.
func wantEvents(t testing.TB, res response, sid any, want ...string) {
	t.Helper()
	got := eventsOf(t, res)
	var lines []string
	for _, e := range got {
		line := e.action
		for _, id := range []*int64{e.patient, e.doctor} {
			if id != nil {
				line += fmt.Sprintf(" %d", *id)
			}
		}
		if e.fields != "" {
			line += " [" + e.fields + "]"
		}
		lines = append(lines, line)
		var login any
		if e.login != nil {
			login = *e.login
		}
		if login != sid || e.ip != "192.0.2.1" {
			t.Errorf("%s: login %v from %s, want login %v from 192.0.2.1", e.action, login, e.ip, sid)
		}
	}
	if strings.Join(lines, "; ") != strings.Join(want, "; ") {
		t.Fatalf("events %q, want %q (response %d %s)", lines, want, res.status, res.body)
	}
}

// TestAuditEvents: each request that shows or changes patient data writes
// exactly its events; one that shows or changes nothing writes none.
func TestAuditEvents(t *testing.T) {
	s := newTestServer(t, nil)
	a, b := register(t, s), register(t, s)
	sid := claimInt(t, tokenClaims(t, a.access), "sid")
	as := func(method, path string, body any) response {
		return do(t, s, req{method: method, path: path, token: a.access, body: body})
	}
	res := as("POST", patientsPath, map[string]any{"first_name": "Ada", "email": "ada-audit@example.com"})
	p := int64(wantObject(t, res, 201)["id"].(float64))
	wantEvents(t, res, sid, fmt.Sprintf("patient.create %d", p))
	q, _ := mustCreate(t, s, a.access, patientsPath, map[string]any{"first_name": "Quinn", "email": "quinn-audit@example.com"})
	d, _ := mustCreate(t, s, a.access, "/api/doctors/", map[string]any{"first_name": "Doc", "email": uniqueName("d") + "@example.com", "specialization": "Surgery"})
	theirs, _ := mustCreate(t, s, b.access, patientsPath, map[string]any{"first_name": "Bea", "email": "bea-audit@example.com"})
	for _, tc := range []struct {
		name, method, path string
		body               any
		status             int
		want               []string
	}{
		{"read", "GET", patientPath(p), nil, 200, []string{fmt.Sprintf("patient.read %d", p)}},
		{"list: one per patient shown", "GET", patientsPath + "?page_size=10", nil, 200,
			[]string{fmt.Sprintf("patient.list %d", p), fmt.Sprintf("patient.list %d", q)}},
		{"list page 2 of size 1", "GET", patientsPath + "?page_size=1&page=2", nil, 200, []string{fmt.Sprintf("patient.list %d", q)}},
		{"patch names changed fields only", "PATCH", patientPath(p), map[string]any{"last_name": "Byron", "first_name": "Ada"}, 200,
			[]string{fmt.Sprintf("patient.update %d [last_name]", p)}},
		{"put that changes nothing", "PUT", patientPath(p), map[string]any{"first_name": "Ada", "email": "ada-audit@example.com"}, 200,
			[]string{fmt.Sprintf("patient.update %d", p)}},
		{"date set", "PATCH", patientPath(p), map[string]any{"date_of_birth": "1815-12-10", "phone": ""}, 400, nil},
		{"date and phone", "PATCH", patientPath(p), map[string]any{"date_of_birth": "1915-12-10", "phone": "+44 20 7946 0958"}, 200,
			[]string{fmt.Sprintf("patient.update %d [date_of_birth,phone]", p)}},
		{"mapping create", "POST", "/api/mappings/", map[string]any{"patient": p, "doctor": d}, 201, []string{fmt.Sprintf("mapping.create %d %d", p, d)}},
		{"mapping list", "GET", "/api/mappings/", nil, 200, []string{fmt.Sprintf("mapping.list %d", p)}},
		{"a patient's mappings", "GET", mappingPath(p), nil, 200, []string{fmt.Sprintf("mapping.list %d", p)}},
		{"a patient's mappings, none", "GET", mappingPath(q), nil, 200, nil},
		{"doctor list shows no patient", "GET", "/api/doctors/", nil, 200, nil},
		{"another user's patient", "GET", patientPath(theirs), nil, 404, nil},
		{"unknown patient", "DELETE", patientPath(thisID), nil, 404, nil},
		{"invalid body", "POST", patientsPath, map[string]any{"first_name": ""}, 400, nil},
		{"bad ordering", "GET", patientsPath + "?ordering=nope", nil, 400, nil},
		{"page past the end", "GET", patientsPath + "?page=9", nil, 404, nil},
		{"delete", "DELETE", patientPath(q), nil, 204, []string{fmt.Sprintf("patient.delete %d", q)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := as(tc.method, tc.path, tc.body)
			if res.status != tc.status {
				t.Fatalf("status %d, want %d: %s", res.status, tc.status, res.body)
			}
			wantEvents(t, res, sid, tc.want...)
		})
	}
	t.Run("no token", func(t *testing.T) {
		res := do(t, s, req{method: "GET", path: patientPath(p)})
		wantUnauthorized(t, res, bodyUnauthenticated)
		wantEvents(t, res, nil)
	})
	t.Run("delete with mappings", func(t *testing.T) {
		r, _ := mustCreate(t, s, a.access, patientsPath, map[string]any{"first_name": "Rae", "email": "rae-audit@example.com"})
		d2, _ := mustCreate(t, s, a.access, "/api/doctors/", map[string]any{"first_name": "Doc", "email": uniqueName("d") + "@example.com", "specialization": "Surgery"})
		for _, doctor := range []int64{d, d2} {
			mustCreate(t, s, a.access, "/api/mappings/", map[string]any{"patient": r, "doctor": doctor})
		}
		res := as("DELETE", patientPath(r), nil)
		wantNoContent(t, res)
		var got []string
		for _, e := range eventsOf(t, res) {
			got = append(got, fmt.Sprintf("%s %d %v %v", e.action, *e.patient, jsonText(e.doctor), *e.login))
		}
		slices.Sort(got)
		want := []string{fmt.Sprintf("mapping.delete %d %d %d", r, d, sid), fmt.Sprintf("mapping.delete %d %d %d", r, d2, sid),
			fmt.Sprintf("patient.delete %d null %d", r, sid)}
		if !slices.Equal(got, want) {
			t.Fatalf("events %q, want %q", got, want)
		}
		// The trail by doctor finds the mapping removed with the patient.
		page := wantObject(t, do(t, s, req{method: "GET", path: fmt.Sprintf("/api/audit/?doctor=%d&action=mapping.delete", d2), token: a.access}), 200)
		if results := page["results"].([]any); len(results) != 1 || results[0].(map[string]any)["patient"] != float64(r) {
			t.Fatalf("?doctor=%d: %v", d2, page)
		}
	})
	t.Run("mapping delete", func(t *testing.T) {
		var m int64
		if err := testDB.QueryRowContext(t.Context(), `SELECT id FROM mappings WHERE patient_id = $1`, p).Scan(&m); err != nil {
			t.Fatal(err)
		}
		res := as("DELETE", mappingPath(m), nil)
		wantNoContent(t, res)
		wantEvents(t, res, sid, fmt.Sprintf("mapping.delete %d %d", p, d))
	})
	t.Run("account events", func(t *testing.T) {
		c := register(t, s)
		// Registering opened the account's first login: its trail says so.
		results := wantObject(t, do(t, s, req{method: "GET", path: "/api/audit/", token: c.access}), 200)["results"].([]any)
		if len(results) != 1 || results[0].(map[string]any)["action"] != "login" || results[0].(map[string]any)["patient"] != nil ||
			results[0].(map[string]any)["login"] != float64(claimInt(t, tokenClaims(t, c.access), "sid")) {
			t.Fatalf("after register: %v", results)
		}
		res := login(t, s, c.username, "a wrong password")
		wantEvents(t, res, nil, "login.failed")
		wantEvents(t, login(t, s, uniqueName("nobody"), "a wrong password"), nil, "login.failed")
		res = login(t, s, c.username, c.password)
		pair := pairOf(t, res)
		loginSID := claimInt(t, tokenClaims(t, pair.Access), "sid")
		wantEvents(t, res, loginSID, "login")
		rotated := pairOf(t, refresh(t, s, pair.Refresh))
		moveRotation(t, pair.Refresh, time.Minute)
		res = refresh(t, s, pair.Refresh)
		wantUnauthorized(t, res, blacklistedBody)
		wantEvents(t, res, loginSID, "refresh.reused")
		res = logout(t, s, rotated.Refresh) // the login has ended already: nothing changes
		wantNoContent(t, res)
		wantEvents(t, res, nil)
		first := claimInt(t, tokenClaims(t, c.access), "sid")
		res = logout(t, s, c.refresh)
		wantEvents(t, res, first, "logout")
		third := loginPair(t, s, c.username, c.password)
		thirdSID := claimInt(t, tokenClaims(t, third.Access), "sid")
		res = do(t, s, req{method: "POST", path: "/api/auth/password/", token: third.Access,
			body: map[string]any{"old_password": c.password, "new_password": "Quartz-Meadow-Lantern-88"}})
		fourth := pairOf(t, res)
		wantEvents(t, res, thirdSID, "password.change")
		res = do(t, s, req{method: "POST", path: "/api/auth/logout/all/", token: fourth.Access})
		wantEvents(t, res, claimInt(t, tokenClaims(t, fourth.Access), "sid"), "logout.all")
	})
}

// TestAuditList: GET /api/audit/ lists the caller's own events, newest
// first, and no filter or page reaches another account's.
func TestAuditList(t *testing.T) {
	s := newTestServer(t, nil)
	a, b := register(t, s), register(t, s)
	p, _ := mustCreate(t, s, a.access, patientsPath, map[string]any{"first_name": "Ada", "email": "ada-list@example.com"})
	do(t, s, req{method: "GET", path: patientPath(p), token: a.access})
	bp, _ := mustCreate(t, s, b.access, patientsPath, map[string]any{"first_name": "Bea", "email": "bea-list@example.com"})
	list := func(token, query string) map[string]any {
		return wantObject(t, do(t, s, req{method: "GET", path: "/api/audit/" + query, token: token}), 200)
	}
	page := list(a.access, "")
	results := page["results"].([]any)
	if len(page) != 3 || page["next"] != nil || page["previous"] != nil || len(results) != 3 || results[2].(map[string]any)["action"] != "login" { // register's login
		t.Fatalf("a's events: %v", page)
	}
	newest := results[0].(map[string]any)
	if newest["action"] != "patient.read" || newest["patient"] != float64(p) || newest["doctor"] != nil ||
		newest["login"] != float64(claimInt(t, tokenClaims(t, a.access), "sid")) || newest["ip"] != "192.0.2.1" ||
		!isStamp(newest["at"].(string)) || len(newest["fields"].([]any)) != 0 || newest["request_id"] == "" {
		t.Fatalf("newest event %v", newest)
	}
	if results[1].(map[string]any)["action"] != "patient.create" {
		t.Fatalf("older event %v", results[1])
	}
	bSID := fmt.Sprint(claimInt(t, tokenClaims(t, b.access), "sid"))
	for _, q := range []string{"?patient=" + fmt.Sprint(bp), "?login=" + bSID, "?action=patient.create&patient=" + fmt.Sprint(bp),
		"?page_size=100", "?search=Bea", "?user_id=" + fmt.Sprint(b.id)} {
		for _, e := range list(a.access, q)["results"].([]any) {
			if e.(map[string]any)["patient"] == float64(bp) || fmt.Sprint(e.(map[string]any)["login"]) == bSID {
				t.Fatalf("a sees b's event through %s: %v", q, e)
			}
		}
	}
	wantJSON(t, do(t, s, req{method: "GET", path: "/api/audit/?patient=" + fmt.Sprint(bp), token: a.access}), 200, emptyCursorPage)
	wantJSON(t, do(t, s, req{method: "GET", path: "/api/audit/?patient=x&login=1.5&action=patient.peek", token: a.access}), 400,
		`{"patient": ["A valid integer is required."], "login": ["A valid integer is required."],
		  "action": ["Select a valid choice. patient.peek is not one of the available choices."]}`)
	wantJSON(t, do(t, s, req{method: "GET", path: "/api/audit/?patient=0&doctor=-7&login=9223372036854775808", token: a.access}), 400,
		`{"patient": ["Ensure this value is greater than or equal to 1."], "doctor": ["Ensure this value is greater than or equal to 1."],
		  "login": ["A valid integer is required."]}`)
	if got := list(a.access, "?action=patient.create&page_size=1"); len(got["results"].([]any)) != 1 || got["next"] != nil {
		t.Fatalf("filtered by action: %v", got)
	}
}

// TestAuditActionsOneList: auditActions is the one list of actions. The
// schema's check allows exactly these, the action filter takes exactly
// these, and openapi.json's enums list exactly these.
func TestAuditActionsOneList(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	var def string
	err := testDB.QueryRowContext(t.Context(), `SELECT pg_get_constraintdef(oid) FROM pg_constraint
		WHERE conrelid = 'audit_events'::regclass AND conname = 'audit_events_action_check'`).Scan(&def)
	if err != nil {
		t.Fatal(err)
	}
	var inSchema []string
	for _, m := range regexp.MustCompile(`'([^']*)'::text`).FindAllStringSubmatch(def, -1) {
		inSchema = append(inSchema, m[1])
	}
	if !slices.Equal(slices.Sorted(slices.Values(inSchema)), slices.Sorted(slices.Values(auditActions))) {
		t.Errorf("schema.sql's check allows %q, auditActions lists %q", inSchema, auditActions)
	}
	doc, _ := oaLoad(t)
	var enums [][]any
	for _, p := range oaArr(doc.operations()["GET /api/audit/"]["parameters"]) {
		if oaObj(p)["name"] == "action" {
			enums = append(enums, oaArr(oaObj(oaObj(p)["schema"])["enum"]))
		}
	}
	event := oaObj(oaObj(oaObj(doc.root["components"])["schemas"])["AuditEvent"])
	enums = append(enums, oaArr(oaObj(oaObj(event["properties"])["action"])["enum"]))
	for _, enum := range enums {
		if fmt.Sprint(enum) != fmt.Sprint(auditActions) {
			t.Errorf("openapi.json's enum %v, want auditActions %v", enum, auditActions)
		}
	}
	if len(enums) != 2 {
		t.Errorf("found %d action enums in openapi.json, want 2", len(enums))
	}
	for _, action := range append(auditActions, inSchema...) {
		wantObject(t, do(t, s, req{method: "GET", path: "/api/audit/?action=" + url.QueryEscape(action), token: a.access}), 200)
	}
}

// emptyCursorPage is an audit page with no events.
const emptyCursorPage = `{"next": null, "previous": null, "results": []}`

// TestAuditCursor: the trail pages by cursor. Following next gives each
// event once, newest first, every link keeping the filters; an event
// written during the walk does not shift it; previous walks back page by
// page, to the event written meanwhile; a cursor the server did not make,
// in any form, is refused.
func TestAuditCursor(t *testing.T) {
	s := newTestServer(t, nil)
	a, b := register(t, s), register(t, s)
	p, _ := mustCreate(t, s, a.access, patientsPath, map[string]any{"first_name": "Ada", "email": uniqueName("cursor") + "@example.com"})
	for range 11 {
		wantObject(t, do(t, s, req{method: "GET", path: patientPath(p), token: a.access}), 200)
	}
	get := func(link string) map[string]any {
		t.Helper()
		page := wantObject(t, do(t, s, req{method: "GET", path: strings.TrimPrefix(link, "http://localhost"), token: a.access}), 200)
		if len(page) != 3 {
			t.Fatalf("page keys other than next, previous, results: %v", page)
		}
		return page
	}
	all := resultIDs(t, get(fmt.Sprintf("/api/audit/?page_size=100&patient=%d", p))) // create and 11 reads
	if len(all) != 12 || !slices.IsSortedFunc(all, func(x, y int64) int { return cmp.Compare(y, x) }) {
		t.Fatalf("all of the patient's events, newest first: %v", all)
	}
	checkLink := func(link any) string {
		t.Helper()
		u, err := url.Parse(fmt.Sprint(link))
		if q := u.Query(); err != nil || u.Host != "localhost" || u.Path != "/api/audit/" || len(q) != 4 || q.Get("patient") != fmt.Sprint(p) ||
			q.Get("page_size") != "5" || !q.Has("action") || q.Get("action") != "" || q.Get("cursor") == "" {
			t.Fatalf("link %v: want the filters, page_size and a cursor", link)
		}
		return u.String()
	}
	// action= is empty, so no filter, but a parameter kept all the same.
	link, walked, pages := fmt.Sprintf("/api/audit/?patient=%d&page_size=5&action=", p), []int64{}, []map[string]any{}
	for link != "" {
		page := get(link)
		pages = append(pages, page)
		walked = append(walked, resultIDs(t, page)...)
		if len(pages) == 1 { // written during the walk: newer than every page
			wantObject(t, do(t, s, req{method: "GET", path: patientPath(p), token: a.access}), 200)
		}
		if link = ""; page["next"] != nil {
			link = checkLink(page["next"])
		}
		if (page["previous"] == nil) != (len(pages) == 1) {
			t.Fatalf("page %d: previous %v", len(pages), page["previous"])
		}
	}
	if len(pages) != 3 || fmt.Sprint(walked) != fmt.Sprint(all) {
		t.Fatalf("walked %d pages: %v, want %v", len(pages), walked, all)
	}
	// Back from the last page: the second, the first, then the new event.
	var back [][]int64
	for prev := pages[2]["previous"]; prev != nil; {
		page := get(checkLink(prev))
		back, prev = append(back, resultIDs(t, page)), page["previous"]
		if page["next"] == nil {
			t.Fatalf("a page reached back has no next: %v", page)
		}
	}
	if len(back) != 3 || fmt.Sprint(back[:2]) != fmt.Sprint([][]int64{all[5:10], all[:5]}) || len(back[2]) != 1 || back[2][0] <= all[0] {
		t.Fatalf("walked back %v, want %v, %v, then one event newer than %d", back, all[5:10], all[:5], all[0])
	}
	// A cursor of b's trail, used by a, is a position in a's own events.
	cursorOf := func(link any) string {
		u, _ := url.Parse(fmt.Sprint(link))
		return u.Query().Get("cursor")
	}
	for range 2 {
		mustCreate(t, s, b.access, patientsPath, map[string]any{"first_name": "Bea", "email": uniqueName("cursor") + "@example.com"})
	}
	bCursor := cursorOf(wantObject(t, do(t, s, req{method: "GET", path: "/api/audit/?page_size=1", token: b.access}), 200)["next"])
	for _, e := range get("/api/audit/?page_size=100&cursor=" + bCursor)["results"].([]any) {
		if e := e.(map[string]any); e["patient"] != float64(p) && e["action"] != "login" { // register's login
			t.Fatalf("b's cursor shows a an event not of a's: %v", e)
		}
	}

	first := cursorOf(pages[0]["next"])
	enc := func(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }
	for _, c := range []string{"", "x", "5", first + "A", " " + first, first + "=", first + "\n", "\r" + first,
		base64.StdEncoding.EncodeToString([]byte("<5")), "PDV", // "<5" with padding; with stray bits (PDU is "<5")
		enc("<05"), enc("<+5"), enc("<0"), enc("<-1"), enc("=5"), enc("<"), enc("<5 "), enc("<9223372036854775808"),
		enc("p=5"), base64.StdEncoding.EncodeToString([]byte("r=1&p=5")), "' OR 1=1 --"} {
		res := do(t, s, req{method: "GET", path: "/api/audit/?cursor=" + url.QueryEscape(c), token: a.access})
		wantJSON(t, res, 404, `{"detail": "Invalid cursor"}`)
	}
	// A cursor in the server's own form pages, whoever wrote it: past the oldest, nothing.
	oldest := fmt.Sprintf("/api/audit/?patient=%d&cursor=%s", p, enc("<"+fmt.Sprint(all[11])))
	wantJSON(t, do(t, s, req{method: "GET", path: oldest, token: a.access}), 200, emptyCursorPage)
}

// TestAuditCursorKeepsFilters: next links from ?login= and ?doctor= keep
// their filter, so that a walk a page at a time shows that login's (that
// doctor's) events and no other, exactly those one page of all shows.
func TestAuditCursorKeepsFilters(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	mine, other := loginPair(t, s, a.username, a.password), loginPair(t, s, a.username, a.password)
	pid, _ := mustCreate(t, s, other.Access, patientsPath, map[string]any{"first_name": "P", "email": uniqueName("keep") + "@example.com"})
	did, _ := mustCreate(t, s, mine.Access, doctorsPath, doctorBody(uniqueName("d")+"@example.com", "House", "Nephrology"))
	otherDoctor, _ := mustCreate(t, s, other.Access, doctorsPath, doctorBody(uniqueName("d")+"@example.com", "Grey", "Surgery"))
	for _, token := range []string{mine.Access, other.Access, mine.Access, other.Access} {
		wantObject(t, do(t, s, req{method: "GET", path: patientPath(pid), token: token}), 200)
		wantObject(t, do(t, s, req{method: "PATCH", path: doctorPath(did), token: token, body: map[string]any{"last_name": uniqueName("L")}}), 200)
		wantObject(t, do(t, s, req{method: "PATCH", path: doctorPath(otherDoctor), token: token, body: map[string]any{"last_name": uniqueName("L")}}), 200)
	}
	for _, filter := range []string{
		fmt.Sprintf("login=%d", claimInt(t, tokenClaims(t, mine.Access), "sid")),
		fmt.Sprintf("doctor=%d", did),
	} {
		key, value, _ := strings.Cut(filter, "=")
		all := resultIDs(t, wantObject(t, do(t, s, req{method: "GET", path: "/api/audit/?page_size=100&" + filter, token: a.access}), 200))
		var walked []int64
		for link := "/api/audit/?page_size=2&" + filter; link != ""; {
			page := wantObject(t, do(t, s, req{method: "GET", path: strings.TrimPrefix(link, "http://localhost"), token: a.access}), 200)
			for _, e := range page["results"].([]any) {
				if got := fmt.Sprint(e.(map[string]any)[key]); got != value {
					t.Fatalf("?%s, page %s: an event with %s %s", filter, link, key, got)
				}
			}
			walked = append(walked, resultIDs(t, page)...)
			link = ""
			if page["next"] != nil {
				u, err := url.Parse(page["next"].(string))
				if link = page["next"].(string); err != nil || u.Query().Get(key) != value {
					t.Fatalf("?%s: next link %s drops the filter", filter, link)
				}
			}
		}
		if len(all) < 5 || fmt.Sprint(walked) != fmt.Sprint(all) {
			t.Fatalf("?%s: walked %v, want %v (five or more)", filter, walked, all)
		}
	}
	// A cursor that is not URL encoding is no cursor of ours: never page 1.
	for _, q := range []string{"cursor=%%%", "page_size=2&cursor=%zz", "cursor=%"} {
		wantJSON(t, do(t, s, req{method: "GET", path: "/api/audit/?" + q, token: a.access}), 404, `{"detail": "Invalid cursor"}`)
	}
}

// TestAuditStolenToken: a user logs in twice and reads different patients
// with each login; ?login=<sid> lists exactly that login's reads.
func TestAuditStolenToken(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	var ids []int64
	for i := range 3 {
		id, _ := mustCreate(t, s, a.access, patientsPath, map[string]any{"first_name": "P", "email": fmt.Sprintf("stolen%d@example.com", i)})
		ids = append(ids, id)
	}
	mine, thief := loginPair(t, s, a.username, a.password), loginPair(t, s, a.username, a.password)
	for _, read := range []struct {
		token string
		id    int64
	}{{mine.Access, ids[0]}, {thief.Access, ids[1]}, {thief.Access, ids[2]}, {mine.Access, ids[2]}} {
		wantObject(t, do(t, s, req{method: "GET", path: patientPath(read.id), token: read.token}), 200)
	}
	thiefSID := claimInt(t, tokenClaims(t, thief.Access), "sid")
	res := do(t, s, req{method: "GET", path: fmt.Sprintf("/api/audit/?login=%d", thiefSID), token: mine.Access})
	var got []string
	for _, e := range wantObject(t, res, 200)["results"].([]any) {
		got = append(got, fmt.Sprintf("%v %v", e.(map[string]any)["action"], e.(map[string]any)["patient"]))
	}
	want := []string{fmt.Sprintf("patient.read %d", ids[2]), fmt.Sprintf("patient.read %d", ids[1]), "login <nil>"}
	if strings.Join(got, "; ") != strings.Join(want, "; ") {
		t.Fatalf("the thief's login: %q, want %q", got, want)
	}
}

// TestAuditAppendOnly: the database refuses to change or remove an event,
// whoever asks (these tests connect as the table's owner), and events
// outlive the patient they name.
func TestAuditAppendOnly(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	p, _ := mustCreate(t, s, a.access, patientsPath, map[string]any{"first_name": "Gone", "email": "gone@example.com"})
	wantNoContent(t, do(t, s, req{method: "DELETE", path: patientPath(p), token: a.access}))
	for _, q := range []string{
		`UPDATE audit_events SET action = 'patient.read' WHERE patient_id = %d`,
		`DELETE FROM audit_events WHERE patient_id = %d`,
		`TRUNCATE audit_events`,
	} {
		q = strings.ReplaceAll(q, "%d", fmt.Sprint(p))
		if _, err := testDB.ExecContext(t.Context(), q); pq.As(err, "HC403") == nil {
			t.Errorf("%s: %v, want refused (HC403)", q, err)
		}
	}
	var n int
	if err := testDB.QueryRowContext(t.Context(), `SELECT count(*) FROM audit_events WHERE patient_id = $1`, p).Scan(&n); err != nil || n != 2 {
		t.Fatalf("%d events for the deleted patient (%v), want its create and delete", n, err)
	}
}

// TestAuditAtomic: when the events cannot be written, the read answers 503
// without the patient, and the change is not committed.
func TestAuditAtomic(t *testing.T) {
	db := scratchDB(t, "_audit", -1)
	s := newTestServerOn(t, db, slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	a := register(t, s)
	p, before := mustCreate(t, s, a.access, patientsPath, map[string]any{"first_name": "Kept", "email": "kept@example.com"})
	if _, err := db.ExecContext(t.Context(), `ALTER TABLE audit_events ADD CONSTRAINT no_more_events CHECK (false) NOT VALID`); err != nil {
		t.Fatal(err)
	}
	for _, rq := range []req{
		{method: "GET", path: patientPath(p)},
		{method: "GET", path: patientsPath},
		{method: "PATCH", path: patientPath(p), body: map[string]any{"first_name": "Changed"}},
		{method: "POST", path: patientsPath, body: map[string]any{"first_name": "New", "email": "new@example.com"}},
		{method: "DELETE", path: patientPath(p)},
	} {
		rq.token = a.access
		res := do(t, s, rq)
		wantUnavailable(t, res)
		if strings.Contains(string(res.body), "Kept") {
			t.Fatalf("%s %s showed the patient: %s", rq.method, rq.path, res.body)
		}
	}
	if _, err := db.ExecContext(t.Context(), `ALTER TABLE audit_events DROP CONSTRAINT no_more_events`); err != nil {
		t.Fatal(err)
	}
	wantSame(t, s, a.access, patientPath(p), before)
	wantJSON(t, do(t, s, req{method: "GET", path: patientsPath + "?search=New", token: a.access}), 200, emptyPage)
}

// TestAuditReuseRace: eight replays of a stolen refresh token at once end
// the login once and write one refresh.reused event.
func TestAuditReuseRace(t *testing.T) {
	s := newTestServer(t, nil)
	for range 3 {
		a := register(t, s)
		pairOf(t, refresh(t, s, a.refresh))
		moveRotation(t, a.refresh, time.Minute)
		var rqs []req
		for range 8 {
			rqs = append(rqs, req{method: "POST", path: "/api/auth/token/refresh/", body: jsonText(map[string]any{"refresh": a.refresh})})
		}
		for _, res := range concurrently(t, s, rqs) {
			wantUnauthorized(t, res, blacklistedBody)
		}
		var n int
		err := testDB.QueryRowContext(t.Context(), `SELECT count(*) FROM audit_events WHERE user_id = $1 AND action = 'refresh.reused'`, a.id).Scan(&n)
		if err != nil || n != 1 {
			t.Fatalf("%d refresh.reused events (%v), want 1", n, err)
		}
	}
}

const bodyChanged = `{"detail": "The record has changed since you read it."}`

// wantETag fails unless res carries the strong tag of record id at version.
func wantETag(t testing.TB, res response, id int64, version int) string {
	t.Helper()
	want := fmt.Sprintf(`"%d-%d"`, id, version)
	if got := res.header.Get("ETag"); got != want {
		t.Fatalf("ETag %q, want %q (status %d)", got, want, res.status)
	}
	return want
}

// TestETags: every response of one patient or doctor carries a strong ETag
// that changes with the record; lists and mappings carry none.
func TestETags(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	for _, kind := range []struct {
		path  string
		body  map[string]any
		patch map[string]any
	}{
		{patientsPath, adaBody(uniqueName("tag") + "@example.com"), map[string]any{"phone": "+1 555 010 0199"}},
		{doctorsPath, doctorBody(uniqueName("tag")+"@example.com", "House", "Nephrology"), map[string]any{"last_name": "Wilson"}},
	} {
		t.Run(kind.path, func(t *testing.T) {
			res := do(t, s, req{method: "POST", path: kind.path, token: a.access, body: kind.body})
			id := int64(wantObject(t, res, 201)["id"].(float64))
			one := fmt.Sprintf("%s%d/", kind.path, id)
			wantETag(t, res, id, 1)
			wantETag(t, do(t, s, req{method: "GET", path: one, token: a.access}), id, 1)
			wantETag(t, do(t, s, req{method: "PATCH", path: one, token: a.access, body: kind.patch}), id, 2)
			wantETag(t, do(t, s, req{method: "PUT", path: one, token: a.access, body: kind.body}), id, 3)
			wantETag(t, do(t, s, req{method: "GET", path: one, token: a.access}), id, 3)
			list := do(t, s, req{method: "GET", path: kind.path, token: a.access})
			if page := wantObject(t, list, 200); page["results"] == nil || list.header.Get("ETag") != "" {
				t.Fatalf("list: ETag %q, body %s; want a page and no ETag", list.header.Get("ETag"), list.body)
			}
		})
	}
}

// TestIfNoneMatch: a GET naming the current tag is 304 with the tag and no
// body, and still writes patient.read (it told the client its copy is
// current); a stale tag gets the record.
func TestIfNoneMatch(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	sid := claimInt(t, tokenClaims(t, a.access), "sid")
	id, body := mustCreate(t, s, a.access, patientsPath, adaBody(uniqueName("inm")+"@example.com"))
	get := func(header string) response {
		return do(t, s, req{method: "GET", path: patientPath(id), token: a.access, header: map[string]string{"If-None-Match": header}})
	}
	for _, header := range []string{fmt.Sprintf(`"%d-1"`, id), fmt.Sprintf(`W/"%d-1"`, id), fmt.Sprintf(`"%d-0", "%d-1"`, id, id), "*"} {
		res := get(header)
		if res.status != http.StatusNotModified || len(res.body) != 0 {
			t.Fatalf("If-None-Match %s: status %d, body %q; want 304 and no body", header, res.status, res.body)
		}
		wantETag(t, res, id, 1)
		wantEvents(t, res, sid, fmt.Sprintf("patient.read %d", id))
	}
	res := get(fmt.Sprintf(`"%d-7"`, id))
	wantETag(t, res, id, 1)
	if res.status != 200 || string(res.body) != body {
		t.Fatalf("a stale tag: status %d, body %s; want 200 %s", res.status, res.body, body)
	}
}

// TestIfMatch: a write naming no current tag is 412 and changes nothing,
// writing no event; a current one (or "*") goes on; a weak tag never
// matches; another user's record is 404 whatever the header says.
func TestIfMatch(t *testing.T) {
	s := newTestServer(t, nil)
	a, b := register(t, s), register(t, s)
	pid, pBody := mustCreate(t, s, a.access, patientsPath, adaBody(uniqueName("im")+"@example.com"))
	did, dBody := mustCreate(t, s, a.access, doctorsPath, doctorBody(uniqueName("im")+"@example.com", "House", "Nephrology"))
	as := func(tok, method, path, ifMatch string, body any) response {
		return do(t, s, req{method: method, path: path, token: tok, body: body, header: map[string]string{"If-Match": ifMatch}})
	}
	stale := func(id int64) string { return fmt.Sprintf(`"%d-9", "%d-0"`, id, id) }
	for _, tc := range []struct {
		name, method, path, ifMatch string
		body                        any
	}{
		{"stale PUT", "PUT", patientPath(pid), stale(pid), adaBody("new@example.com")},
		{"stale PATCH", "PATCH", patientPath(pid), stale(pid), map[string]any{"phone": ""}},
		{"stale DELETE", "DELETE", patientPath(pid), stale(pid), nil},
		{"weak PATCH", "PATCH", patientPath(pid), fmt.Sprintf(`W/"%d-1"`, pid), map[string]any{"phone": ""}},
		{"another patient's tag", "PATCH", patientPath(pid), fmt.Sprintf(`"%d-1"`, pid+1), map[string]any{"phone": ""}},
		{"a tag that is not UTF-8", "PATCH", patientPath(pid), "\"1-\xff\"", map[string]any{"phone": ""}},
		{"a tag of no quotes", "DELETE", patientPath(pid), fmt.Sprintf(`%d-1`, pid), nil},
		{"stale doctor PATCH", "PATCH", doctorPath(did), stale(did), map[string]any{"last_name": "X"}},
		{"stale doctor DELETE", "DELETE", doctorPath(did), stale(did), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := as(a.access, tc.method, tc.path, tc.ifMatch, tc.body)
			wantJSON(t, res, http.StatusPreconditionFailed, bodyChanged)
			wantEvents(t, res, nil)
			wantSame(t, s, a.access, patientPath(pid), pBody)
			wantSame(t, s, a.access, doctorPath(did), dBody)
		})
	}
	wantJSON(t, as(b.access, "PATCH", patientPath(pid), fmt.Sprintf(`"%d-1"`, pid), map[string]any{"phone": ""}), 404, bodyNotFound)
	wantJSON(t, as(b.access, "DELETE", patientPath(pid), "*", nil), 404, bodyNotFound)
	wantJSON(t, as(a.access, "PATCH", patientPath(999999999), "*", map[string]any{"phone": ""}), 404, bodyNotFound)

	res := as(a.access, "PATCH", patientPath(pid), fmt.Sprintf(`"%d-0", "%d-1"`, pid, pid), map[string]any{"phone": ""})
	if got := wantObject(t, res, 200); got["phone"] != "" {
		t.Fatalf("PATCH with the current tag in a list: phone %v, want \"\"", got["phone"])
	}
	tag := wantETag(t, res, pid, 2)
	if got := wantObject(t, as(a.access, "PATCH", patientPath(pid), "*", map[string]any{"last_name": "Lovelace"}), 200); got["last_name"] != "Lovelace" {
		t.Fatalf("PATCH with If-Match *: last_name %v, want Lovelace", got["last_name"])
	}
	wantJSON(t, as(a.access, "DELETE", patientPath(pid), tag, nil), http.StatusPreconditionFailed, bodyChanged)
	wantNoContent(t, as(a.access, "DELETE", patientPath(pid), fmt.Sprintf(`"%d-3"`, pid), nil))
	if got := wantObject(t, as(a.access, "PUT", doctorPath(did), fmt.Sprintf(`"%d-1"`, did), doctorBody(uniqueName("im")+"@example.com", "Cuddy", "Endocrinology")), 200); got["last_name"] != "Cuddy" {
		t.Fatalf("PUT with the current tag: last_name %v, want Cuddy", got["last_name"])
	}
	wantNoContent(t, as(a.access, "DELETE", doctorPath(did), "*", nil))
}

// TestIfMatchRace: eight PATCHes holding one tag, at once: the check and the
// write are one statement, so exactly one succeeds and the others are 412.
func TestIfMatchRace(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	id, _ := mustCreate(t, s, a.access, patientsPath, adaBody(uniqueName("race")+"@example.com"))
	var rqs []req
	for i := range 8 {
		rqs = append(rqs, req{method: "PATCH", path: patientPath(id), token: a.access,
			header: map[string]string{"If-Match": fmt.Sprintf(`"%d-1"`, id)},
			body:   jsonText(map[string]any{"phone": fmt.Sprintf("+1 555 010 01%02d", i)})})
	}
	won := 0
	for _, res := range concurrently(t, s, rqs) {
		if res.status == 200 {
			won++
			wantETag(t, res, id, 2)
			continue
		}
		wantJSON(t, res, http.StatusPreconditionFailed, bodyChanged)
	}
	var updates int
	if err := testDB.QueryRowContext(t.Context(), `SELECT count(*) FROM audit_events WHERE patient_id = $1 AND action = 'patient.update'`, id).Scan(&updates); err != nil {
		t.Fatal(err)
	}
	if won != 1 || updates != 1 {
		t.Fatalf("%d PATCHes succeeded and %d events were written, want 1 and 1", won, updates)
	}
	wantETag(t, do(t, s, req{method: "GET", path: patientPath(id), token: a.access}), id, 2)
}
