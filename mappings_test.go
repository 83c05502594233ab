package main

import (
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
)

const mappingsPath = "/api/mappings/"

func mappingPath(id int64) string { return mappingsPath + strconv.FormatInt(id, 10) + "/" }

// mappingWant is the wantShape pattern of a mapping of patient and doctor,
// whose bodies are given as JSON text; id 0 means any id.
func mappingWant(id, patientID, doctorID int64, patientBody, doctorBody string) string {
	idv := `"<id>"`
	if id != 0 {
		idv = strconv.FormatInt(id, 10)
	}
	return fmt.Sprintf(`{"id": %s, "patient": %d, "doctor": %d, "patient_detail": %s, "doctor_detail": %s, "created_at": "<stamp>"}`,
		idv, patientID, doctorID, patientBody, doctorBody)
}

// invalidPKBody is the 400 for references that do not exist, or are not the
// caller's: field, pk text, field, pk text…
func invalidPKBody(kv ...string) string {
	var pairs []string
	for i := 0; i < len(kv); i += 2 {
		pairs = append(pairs, kv[i], fmt.Sprintf(`Invalid pk "%s" - object does not exist.`, kv[i+1]))
	}
	return errs(pairs...)
}

const bodyUniqueSet = `{"non_field_errors": ["The fields patient, doctor must make a unique set."]}`

// mappingWorld is one owner's patient, a doctor someone else created, and
// a mapping between them.
type mappingWorld struct {
	owner, other           account
	patient, doctor        int64
	patientBody, docBody   string
	mapping                int64
	mappingBody, byPatient string // the mapping, and GET /api/mappings/{patient}/
}

func newMappingWorld(t *testing.T, s http.Handler) mappingWorld {
	t.Helper()
	var w mappingWorld
	w.owner, w.other = register(t, s), register(t, s)
	w.patient, _ = mustCreate(t, s, w.owner.access, patientsPath, adaBody("ada@example.com"))
	w.doctor, _ = mustCreate(t, s, w.other.access, doctorsPath, doctorBody(uniqueName("map")+"@example.com", "House", "Diagnostics"))
	w.patientBody = mustGet(t, s, w.owner.access, patientPath(w.patient))
	w.docBody = mustGet(t, s, w.owner.access, doctorPath(w.doctor))
	res := do(t, s, req{method: "POST", path: mappingsPath, token: w.owner.access, body: map[string]any{"patient": w.patient, "doctor": w.doctor}})
	got := wantShape(t, res, 201, mappingWant(0, w.patient, w.doctor, w.patientBody, w.docBody)).(map[string]any)
	w.mapping, w.mappingBody = int64(got["id"].(float64)), string(res.body)
	w.byPatient = mustGet(t, s, w.owner.access, mappingPath(w.patient))
	return w
}

func TestMappingAccess(t *testing.T) {
	s := newTestServer(t, nil)
	const (
		owner  = "owner"
		other  = "other"
		nobody = "nobody"
	)
	// {p} is the owner's patient, {m} the mapping, {d2} another doctor,
	// {before} the patient's mappings array, {p2}/{d2body} the bodies for a
	// new mapping. after: "same", "created" or "deleted".
	cases := []struct {
		name   string
		who    string
		method string
		path   string
		body   string
		status int
		want   string
		after  string
	}{
		{"list as owner", owner, "GET", mappingsPath, "", 200, `{"count": 1, "next": null, "previous": null, "results": {before}}`, "same"},
		{"list as other", other, "GET", mappingsPath, "", 200, emptyPage, "same"},
		{"list without token", nobody, "GET", mappingsPath, "", 401, bodyUnauthenticated, "same"},

		{"create as owner", owner, "POST", mappingsPath, `{"patient": {p}, "doctor": {d2}}`, 201,
			`{"id": "<id>", "patient": {p}, "doctor": {d2}, "patient_detail": {pbody}, "doctor_detail": {d2body}, "created_at": "<stamp>"}`, "created"},
		{"create as other", other, "POST", mappingsPath, `{"patient": {p}, "doctor": {d2}}`, 400,
			`{"patient": ["Invalid pk \"{p}\" - object does not exist."]}`, "same"},
		{"create as other, ids as strings", other, "POST", mappingsPath, `{"patient": "{p}", "doctor": "{d2}"}`, 400,
			`{"patient": ["Invalid pk \"{p}\" - object does not exist."]}`, "same"},
		{"create as other, existing pair", other, "POST", mappingsPath, `{"patient": {p}, "doctor": {d}}`, 400,
			`{"patient": ["Invalid pk \"{p}\" - object does not exist."]}`, "same"},
		{"create without token", nobody, "POST", mappingsPath, `{"patient": {p}, "doctor": {d2}}`, 401, bodyUnauthenticated, "same"},

		{"by patient as owner", owner, "GET", "/api/mappings/{p}/", "", 200, `{before}`, "same"},
		{"by patient as other", other, "GET", "/api/mappings/{p}/", "", 404, bodyNotFound, "same"},
		{"by patient without token", nobody, "GET", "/api/mappings/{p}/", "", 401, bodyUnauthenticated, "same"},

		{"delete as owner", owner, "DELETE", "/api/mappings/{m}/", "", 204, "", "deleted"},
		{"delete as other", other, "DELETE", "/api/mappings/{m}/", "", 404, bodyNotFound, "same"},
		{"delete without token", nobody, "DELETE", "/api/mappings/{m}/", "", 401, bodyUnauthenticated, "same"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w := newMappingWorld(t, s)
			d2, _ := mustCreate(t, s, w.owner.access, doctorsPath, doctorBody(uniqueName("map")+"@example.com", "Wilson", "Oncology"))
			listBefore := mustGet(t, s, w.owner.access, mappingsPath)
			r := strings.NewReplacer("{p}", strconv.FormatInt(w.patient, 10), "{m}", strconv.FormatInt(w.mapping, 10),
				"{d}", strconv.FormatInt(w.doctor, 10), "{d2}", strconv.FormatInt(d2, 10), "{before}", w.byPatient,
				"{pbody}", w.patientBody, "{d2body}", mustGet(t, s, w.owner.access, doctorPath(d2)))
			token := map[string]string{owner: w.owner.access, other: w.other.access}[tc.who]
			var body any
			if tc.body != "" {
				body = r.Replace(tc.body)
			}
			res := do(t, s, req{method: tc.method, path: r.Replace(tc.path), token: token, body: body})
			if tc.status == http.StatusNoContent {
				wantNoContent(t, res)
			} else {
				wantShape(t, res, tc.status, r.Replace(tc.want))
			}
			switch tc.after {
			case "same":
				wantSame(t, s, w.owner.access, mappingPath(w.patient), w.byPatient)
				wantSame(t, s, w.owner.access, mappingsPath, listBefore)
				wantSame(t, s, w.owner.access, patientPath(w.patient), w.patientBody)
			case "created":
				wantSame(t, s, w.owner.access, mappingPath(w.patient), "["+w.mappingBody+","+string(res.body)+"]")
				if n := do(t, s, req{method: "GET", path: mappingsPath, token: w.owner.access}).object(t)["count"]; n != float64(2) {
					t.Fatalf("owner's mappings: %v, want 2", n)
				}
			case "deleted":
				wantJSON(t, do(t, s, req{method: "GET", path: mappingPath(w.patient), token: w.owner.access}), 200, `[]`)
				wantJSON(t, do(t, s, req{method: "GET", path: mappingsPath, token: w.owner.access}), 200, emptyPage)
				wantJSON(t, do(t, s, req{method: "DELETE", path: mappingPath(w.mapping), token: w.owner.access}), 404, bodyNotFound)
				// The patient and the doctor stay.
				wantSame(t, s, w.owner.access, patientPath(w.patient), w.patientBody)
				wantSame(t, s, w.owner.access, doctorPath(w.doctor), w.docBody)
			}
			// The other user's own lists never show the owner's mapping.
			wantJSON(t, do(t, s, req{method: "GET", path: mappingsPath, token: w.other.access}), 200, emptyPage)
		})
	}
}

func TestMappingCreate(t *testing.T) {
	s := newTestServer(t, nil)
	a, b := register(t, s), register(t, s)
	p, _ := mustCreate(t, s, a.access, patientsPath, adaBody("ada@example.com"))
	pBody := mustGet(t, s, a.access, patientPath(p))
	var docs []int64
	var docBodies []string
	for i := range 4 {
		d, _ := mustCreate(t, s, b.access, doctorsPath, doctorBody(uniqueName("map")+"@example.com", fmt.Sprint("Doc", i), "Diagnostics"))
		docs = append(docs, d)
		docBodies = append(docBodies, mustGet(t, s, a.access, doctorPath(d)))
	}
	cases := []struct {
		name string
		body string // %[1]d is the patient, %[2]d the doctor
	}{
		{"integers", `{"patient": %[1]d, "doctor": %[2]d}`},
		{"digit strings", `{"patient": "%[1]d", "doctor": "%[2]d"}`},
		// JSON numbers have no leading zeros; digit strings may.
		{"leading zeros", `{"patient": "0%[1]d", "doctor": "00%[2]d"}`},
		{"client fields ignored", `{"patient": %[1]d, "doctor": %[2]d, "id": 999999999, "created_at": "2000-01-01T00:00:00Z", "patient_detail": {"first_name": "X"}, "owner": 1}`},
	}
	var created []string
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			body := fmt.Sprintf(tc.body, p, docs[i])
			res := do(t, s, req{method: "POST", path: mappingsPath, token: a.access, body: body})
			got := wantShape(t, res, 201, mappingWant(0, p, docs[i], pBody, docBodies[i])).(map[string]any)
			if got["id"] == float64(999999999) || strings.HasPrefix(got["created_at"].(string), "2000") {
				t.Errorf("client values were stored: %s", res.body)
			}
			created = append(created, string(res.body))
		})
	}
	t.Run("listed as created", func(t *testing.T) {
		wantJSON(t, do(t, s, req{method: "GET", path: mappingPath(p), token: a.access}), 200, "["+strings.Join(created, ",")+"]")
		wantJSON(t, do(t, s, req{method: "GET", path: mappingsPath, token: a.access}), 200,
			`{"count": 4, "next": null, "previous": null, "results": [`+strings.Join(created, ",")+`]}`)
	})
	t.Run("details follow changes", func(t *testing.T) {
		res := do(t, s, req{method: "PATCH", path: patientPath(p), token: a.access, body: map[string]any{"last_name": "King"}})
		newP := string(res.body)
		res = do(t, s, req{method: "PATCH", path: doctorPath(docs[0]), token: b.access, body: map[string]any{"specialization": "Oncology"}})
		newD := string(res.body)
		list := do(t, s, req{method: "GET", path: mappingPath(p), token: a.access})
		first := list.json(t).([]any)[0]
		want := mappingWant(0, p, docs[0], newP, newD)
		if at, ok := shapeMatch(first, response{body: []byte(want)}.json(t), "first"); !ok {
			t.Fatalf("mismatch at %s: %s\nwant %s", at, list.body, want)
		}
	})
}

func TestMappingBadReferences(t *testing.T) {
	s := newTestServer(t, nil)
	a, b := register(t, s), register(t, s)
	p, _ := mustCreate(t, s, a.access, patientsPath, adaBody("ada@example.com"))
	bp, _ := mustCreate(t, s, b.access, patientsPath, adaBody("ada@example.com"))
	d, _ := mustCreate(t, s, b.access, doctorsPath, doctorBody(uniqueName("map")+"@example.com", "House", "Diagnostics"))
	gone, _ := mustCreate(t, s, a.access, patientsPath, adaBody("gone@example.com"))
	wantNoContent(t, do(t, s, req{method: "DELETE", path: patientPath(gone), token: a.access}))
	goneDoc, _ := mustCreate(t, s, b.access, doctorsPath, doctorBody(uniqueName("map")+"@example.com", "Gone", "Diagnostics"))
	wantNoContent(t, do(t, s, req{method: "DELETE", path: doctorPath(goneDoc), token: b.access}))
	incorrect := func(field, got string) string {
		return errs(field, "Incorrect type. Expected pk value, received "+got+".")
	}
	// {p} is the caller's patient, {d} a doctor; each body's other reference
	// is valid.
	cases := []struct {
		name, body, want string
	}{
		{"patient float", `{"patient": 1.5, "doctor": {d}}`, incorrect("patient", "float")},
		{"patient whole float", `{"patient": {p}.0, "doctor": {d}}`, incorrect("patient", "float")},
		{"patient exponent", `{"patient": 1e2, "doctor": {d}}`, incorrect("patient", "float")},
		{"patient true", `{"patient": true, "doctor": {d}}`, incorrect("patient", "bool")},
		{"patient false", `{"patient": false, "doctor": {d}}`, incorrect("patient", "bool")},
		{"patient word", `{"patient": "abc", "doctor": {d}}`, incorrect("patient", "str")},
		{"patient empty string", `{"patient": "", "doctor": {d}}`, incorrect("patient", "str")},
		{"patient padded string", `{"patient": " {p}", "doctor": {d}}`, incorrect("patient", "str")},
		{"patient negative string", `{"patient": "-{p}", "doctor": {d}}`, invalidPKBody("patient", "-{p}")},
		{"patient float string", `{"patient": "{p}.0", "doctor": {d}}`, incorrect("patient", "str")},
		{"patient list", `{"patient": [{p}], "doctor": {d}}`, incorrect("patient", "list")},
		{"patient object", `{"patient": {"id": {p}}, "doctor": {d}}`, incorrect("patient", "dict")},
		{"patient null", `{"patient": null, "doctor": {d}}`, errs("patient", msgNull)},
		{"patient missing", `{"doctor": {d}}`, errs("patient", msgRequired)},
		{"doctor float", `{"patient": {p}, "doctor": 2.5}`, incorrect("doctor", "float")},
		{"doctor bool", `{"patient": {p}, "doctor": true}`, incorrect("doctor", "bool")},
		{"doctor word", `{"patient": {p}, "doctor": "house"}`, incorrect("doctor", "str")},
		{"doctor list", `{"patient": {p}, "doctor": []}`, incorrect("doctor", "list")},
		{"doctor null", `{"patient": {p}, "doctor": null}`, errs("doctor", msgNull)},
		{"doctor missing", `{"patient": {p}}`, errs("doctor", msgRequired)},
		{"both missing", `{}`, errs("patient", msgRequired, "doctor", msgRequired)},
		{"no body", ``, errs("patient", msgRequired, "doctor", msgRequired)},
		{"both wrong", `{"patient": true, "doctor": {}}`, incorrect("patient", "bool") + "|" + incorrect("doctor", "dict")},
		{"SQL in a string id", `{"patient": "{p}; DROP TABLE mappings", "doctor": {d}}`, incorrect("patient", "str")},

		{"patient of another user", `{"patient": {bp}, "doctor": {d}}`, invalidPKBody("patient", "{bp}")},
		{"patient of another user as string", `{"patient": "{bp}", "doctor": "{d}"}`, invalidPKBody("patient", "{bp}")},
		{"deleted patient", `{"patient": {gone}, "doctor": {d}}`, invalidPKBody("patient", "{gone}")},
		{"patient 0", `{"patient": 0, "doctor": {d}}`, invalidPKBody("patient", "0")},
		{"patient negative", `{"patient": -1, "doctor": {d}}`, invalidPKBody("patient", "-1")},
		{"patient 2^63", `{"patient": 9223372036854775808, "doctor": {d}}`, invalidPKBody("patient", "9223372036854775808")},
		{"patient 2^63 string", `{"patient": "9223372036854775808", "doctor": {d}}`, invalidPKBody("patient", "9223372036854775808")},
		{"patient 2^64", `{"patient": 18446744073709551616, "doctor": {d}}`, invalidPKBody("patient", "18446744073709551616")},
		{"patient huge", `{"patient": 123456789012345678901234567890, "doctor": {d}}`, invalidPKBody("patient", "123456789012345678901234567890")},
		{"deleted doctor", `{"patient": {p}, "doctor": {goneDoc}}`, invalidPKBody("doctor", "{goneDoc}")},
		{"doctor 2^63", `{"patient": {p}, "doctor": 9223372036854775808}`, invalidPKBody("doctor", "9223372036854775808")},
		{"doctor 2^63 - 1", `{"patient": {p}, "doctor": "9223372036854775807"}`, invalidPKBody("doctor", "9223372036854775807")},
		{"both missing rows", `{"patient": {gone}, "doctor": {goneDoc}}`, invalidPKBody("patient", "{gone}", "doctor", "{goneDoc}")},
		{"another's patient and a deleted doctor", `{"patient": "{bp}", "doctor": {goneDoc}}`, invalidPKBody("patient", "{bp}", "doctor", "{goneDoc}")},
	}
	r := strings.NewReplacer("{p}", strconv.FormatInt(p, 10), "{bp}", strconv.FormatInt(bp, 10), "{d}", strconv.FormatInt(d, 10),
		"{gone}", strconv.FormatInt(gone, 10), "{goneDoc}", strconv.FormatInt(goneDoc, 10))
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var body any
			if tc.body != "" {
				body = r.Replace(tc.body)
			}
			res := do(t, s, req{method: "POST", path: mappingsPath, token: a.access, body: body})
			want := r.Replace(tc.want)
			if left, right, two := strings.Cut(want, "|"); two {
				// Two field errors: merge the two objects.
				m := response{body: []byte(left)}.object(t)
				for k, v := range (response{body: []byte(right)}).object(t) {
					m[k] = v
				}
				want = jsonText(m)
			}
			wantJSON(t, res, 400, want)
		})
	}
	wantJSON(t, do(t, s, req{method: "GET", path: mappingsPath, token: a.access}), 200, emptyPage)
	wantJSON(t, do(t, s, req{method: "GET", path: mappingsPath, token: b.access}), 200, emptyPage)
	wantTablesIntact(t)
}

func TestMappingDuplicate(t *testing.T) {
	s := newTestServer(t, nil)
	w := newMappingWorld(t, s)
	for _, tc := range []struct{ name, body string }{
		{"integers", fmt.Sprintf(`{"patient": %d, "doctor": %d}`, w.patient, w.doctor)},
		{"digit strings", fmt.Sprintf(`{"patient": "%d", "doctor": "%d"}`, w.patient, w.doctor)},
		{"mixed, with the mapping's id", fmt.Sprintf(`{"doctor": %d, "patient": "%d", "id": %d}`, w.doctor, w.patient, w.mapping)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantJSON(t, do(t, s, req{method: "POST", path: mappingsPath, token: w.owner.access, body: tc.body}), 400, bodyUniqueSet)
			wantSame(t, s, w.owner.access, mappingPath(w.patient), w.byPatient)
		})
	}
	t.Run("another patient may have the same doctor", func(t *testing.T) {
		p2, _ := mustCreate(t, s, w.owner.access, patientsPath, adaBody("second@example.com"))
		res := do(t, s, req{method: "POST", path: mappingsPath, token: w.owner.access, body: map[string]any{"patient": p2, "doctor": w.doctor}})
		wantShape(t, res, 201, mappingWant(0, p2, w.doctor, mustGet(t, s, w.owner.access, patientPath(p2)), w.docBody))
	})
	t.Run("the pair again after a delete", func(t *testing.T) {
		wantNoContent(t, do(t, s, req{method: "DELETE", path: mappingPath(w.mapping), token: w.owner.access}))
		res := do(t, s, req{method: "POST", path: mappingsPath, token: w.owner.access, body: map[string]any{"patient": w.patient, "doctor": w.doctor}})
		got := wantShape(t, res, 201, mappingWant(0, w.patient, w.doctor, w.patientBody, w.docBody)).(map[string]any)
		if got["id"] == float64(w.mapping) {
			t.Errorf("the new mapping reused id %d", w.mapping)
		}
	})
}

func TestMappingRaceSamePair(t *testing.T) {
	s := newTestServer(t, nil)
	a, b := register(t, s), register(t, s)
	d, _ := mustCreate(t, s, b.access, doctorsPath, doctorBody(uniqueName("map")+"@example.com", "Race", "Diagnostics"))
	dBody := mustGet(t, s, a.access, doctorPath(d))
	for round := range 5 {
		t.Run(fmt.Sprint("round ", round), func(t *testing.T) {
			p, _ := mustCreate(t, s, a.access, patientsPath, adaBody(uniqueName("p")+"@example.com"))
			pBody := mustGet(t, s, a.access, patientPath(p))
			var rqs []req
			for i := range 8 {
				body := fmt.Sprintf(`{"patient": %d, "doctor": %d}`, p, d)
				if i%2 == 1 {
					body = fmt.Sprintf(`{"patient": "%d", "doctor": "%d"}`, p, d)
				}
				rqs = append(rqs, req{method: "POST", path: mappingsPath, token: a.access, body: body})
			}
			created := ""
			for _, res := range concurrently(t, s, rqs) {
				if res.status == 201 {
					if created != "" {
						t.Fatalf("two mappings created: %s and %s", created, res.body)
					}
					wantShape(t, res, 201, mappingWant(0, p, d, pBody, dBody))
					created = string(res.body)
					continue
				}
				wantJSON(t, res, 400, bodyUniqueSet)
			}
			if created == "" {
				t.Fatal("no mapping created")
			}
			wantJSON(t, do(t, s, req{method: "GET", path: mappingPath(p), token: a.access}), 200, "["+created+"]")
		})
	}
}

// TestMappingRaceDoctorDelete races a new assignment against the doctor's
// deletion: either the doctor goes and the assignment is refused, or the
// assignment stays and the deletion is refused, never both or neither.
func TestMappingRaceDoctorDelete(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	p, _ := mustCreate(t, s, a.access, patientsPath, adaBody("ada@example.com"))
	for round := range 8 {
		t.Run(fmt.Sprint("round ", round), func(t *testing.T) {
			d, _ := mustCreate(t, s, a.access, doctorsPath, doctorBody(uniqueName("map")+"@example.com", "Race", "Diagnostics"))
			res := concurrently(t, s, []req{
				{method: "POST", path: mappingsPath, token: a.access, body: fmt.Sprintf(`{"patient": %d, "doctor": %d}`, p, d)},
				{method: "DELETE", path: doctorPath(d), token: a.access},
			})
			switch res[1].status {
			case 204:
				wantNoContent(t, res[1])
				wantJSON(t, res[0], 400, invalidPKBody("doctor", strconv.FormatInt(d, 10)))
				wantJSON(t, do(t, s, req{method: "GET", path: doctorPath(d), token: a.access}), 404, bodyNotFound)
			default:
				wantJSON(t, res[1], 409, `{"detail": "This doctor is assigned to patients and cannot be deleted."}`)
				if res[0].status != 201 {
					t.Fatalf("mapping: %d %s", res[0].status, res[0].body)
				}
				m := int64(res[0].object(t)["id"].(float64))
				wantNoContent(t, do(t, s, req{method: "DELETE", path: mappingPath(m), token: a.access}))
				wantNoContent(t, do(t, s, req{method: "DELETE", path: doctorPath(d), token: a.access}))
			}
		})
	}
	wantJSON(t, do(t, s, req{method: "GET", path: mappingPath(p), token: a.access}), 200, `[]`)
}

func TestMappingsOfPatient(t *testing.T) {
	s := newTestServer(t, nil)
	a, b := register(t, s), register(t, s)
	p, _ := mustCreate(t, s, a.access, patientsPath, adaBody("ada@example.com"))
	p2, _ := mustCreate(t, s, a.access, patientsPath, adaBody("two@example.com"))
	empty, _ := mustCreate(t, s, a.access, patientsPath, adaBody("none@example.com"))
	bp, _ := mustCreate(t, s, b.access, patientsPath, adaBody("ada@example.com"))
	var docs []int64
	for i := range 3 {
		d, _ := mustCreate(t, s, b.access, doctorsPath, doctorBody(uniqueName("map")+"@example.com", fmt.Sprint("Doc", i), "Diagnostics"))
		docs = append(docs, d)
	}
	// Assigned out of id order: the array is oldest first.
	var bodies []string
	for _, i := range []int{2, 0, 1} {
		_, body := mustCreate(t, s, a.access, mappingsPath, map[string]any{"patient": p, "doctor": docs[i]})
		bodies = append(bodies, body)
	}
	_, other := mustCreate(t, s, a.access, mappingsPath, map[string]any{"patient": p2, "doctor": docs[0]})
	mustCreate(t, s, b.access, mappingsPath, map[string]any{"patient": bp, "doctor": docs[0]})
	cases := []struct {
		name, path string
		status     int
		want       string
	}{
		{"oldest first", mappingPath(p), 200, "[" + strings.Join(bodies, ",") + "]"},
		{"only that patient's", mappingPath(p2), 200, "[" + other + "]"},
		{"patient without mappings", mappingPath(empty), 200, `[]`},
		{"another user's patient", mappingPath(bp), 404, bodyNotFound},
		{"unknown patient", mappingPath(bp + 1_000_000), 404, bodyNotFound},
		{"zero", mappingsPath + "0/", 404, bodyNotFound},
		{"not a number", mappingsPath + "abc/", 404, bodyNotFound},
		{"huge", mappingsPath + "99999999999999999999/", 404, bodyNotFound},
		{"SQL", mappingsPath + "1%20OR%201=1/", 404, bodyNotFound},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			wantJSON(t, do(t, s, req{method: "GET", path: tc.path, token: a.access}), tc.status, tc.want)
		})
	}
	t.Run("a deleted patient", func(t *testing.T) {
		wantNoContent(t, do(t, s, req{method: "DELETE", path: patientPath(empty), token: a.access}))
		wantJSON(t, do(t, s, req{method: "GET", path: mappingPath(empty), token: a.access}), 404, bodyNotFound)
	})
}

func TestMappingDelete(t *testing.T) {
	s := newTestServer(t, nil)
	w := newMappingWorld(t, s)
	for _, tc := range []struct {
		name, path string
		token      string
	}{
		{"by another user", mappingPath(w.mapping), w.other.access},
		{"unknown id", mappingPath(w.mapping + 1_000_000), w.owner.access},
		{"zero", mappingsPath + "0/", w.owner.access},
		{"not a number", mappingsPath + "abc/", w.owner.access},
		{"huge", mappingsPath + "99999999999999999999/", w.owner.access},
		{"SQL", mappingsPath + "1%20OR%201=1/", w.owner.access},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantJSON(t, do(t, s, req{method: "DELETE", path: tc.path, token: tc.token}), 404, bodyNotFound)
			wantSame(t, s, w.owner.access, mappingPath(w.patient), w.byPatient)
		})
	}
	t.Run("by the owner", func(t *testing.T) {
		wantNoContent(t, do(t, s, req{method: "DELETE", path: mappingPath(w.mapping), token: w.owner.access}))
		wantJSON(t, do(t, s, req{method: "DELETE", path: mappingPath(w.mapping), token: w.owner.access}), 404, bodyNotFound)
		wantJSON(t, do(t, s, req{method: "GET", path: mappingPath(w.patient), token: w.owner.access}), 200, `[]`)
		wantJSON(t, do(t, s, req{method: "GET", path: mappingsPath, token: w.owner.access}), 200, emptyPage)
		wantSame(t, s, w.owner.access, patientPath(w.patient), w.patientBody)
		wantSame(t, s, w.owner.access, doctorPath(w.doctor), w.docBody)
	})
}

func TestMappingPatientDeleteCascades(t *testing.T) {
	s := newTestServer(t, nil)
	w := newMappingWorld(t, s)
	d2, _ := mustCreate(t, s, w.other.access, doctorsPath, doctorBody(uniqueName("map")+"@example.com", "Wilson", "Oncology"))
	mustCreate(t, s, w.owner.access, mappingsPath, map[string]any{"patient": w.patient, "doctor": d2})
	keep, _ := mustCreate(t, s, w.owner.access, patientsPath, adaBody("keep@example.com"))
	_, kept := mustCreate(t, s, w.owner.access, mappingsPath, map[string]any{"patient": keep, "doctor": w.doctor})
	wantNoContent(t, do(t, s, req{method: "DELETE", path: patientPath(w.patient), token: w.owner.access}))
	wantJSON(t, do(t, s, req{method: "GET", path: mappingPath(w.patient), token: w.owner.access}), 404, bodyNotFound)
	wantJSON(t, do(t, s, req{method: "GET", path: mappingsPath, token: w.owner.access}), 200,
		`{"count": 1, "next": null, "previous": null, "results": [`+kept+`]}`)
	wantJSON(t, do(t, s, req{method: "DELETE", path: mappingPath(w.mapping), token: w.owner.access}), 404, bodyNotFound)
	var n int
	if err := testDB.QueryRow(`SELECT count(*) FROM mappings WHERE patient_id = $1`, w.patient).Scan(&n); err != nil || n != 0 {
		t.Fatalf("%d mappings of the deleted patient left (err %v)", n, err)
	}
	// The doctors are untouched, and d2, no longer assigned, may go.
	wantSame(t, s, w.owner.access, doctorPath(w.doctor), w.docBody)
	wantNoContent(t, do(t, s, req{method: "DELETE", path: doctorPath(d2), token: w.other.access}))
}

func TestMappingDoctorDeleteConflict(t *testing.T) {
	s := newTestServer(t, nil)
	creator, a, b := register(t, s), register(t, s), register(t, s)
	d, _ := mustCreate(t, s, creator.access, doctorsPath, doctorBody(uniqueName("map")+"@example.com", "House", "Diagnostics"))
	dBody := mustGet(t, s, creator.access, doctorPath(d))
	pa, _ := mustCreate(t, s, a.access, patientsPath, adaBody("ada@example.com"))
	pb, _ := mustCreate(t, s, b.access, patientsPath, adaBody("ada@example.com"))
	ma, maBody := mustCreate(t, s, a.access, mappingsPath, map[string]any{"patient": pa, "doctor": d})
	_, mbBody := mustCreate(t, s, b.access, mappingsPath, map[string]any{"patient": pb, "doctor": d})
	// The contract's message, with no count: the assignments are other users'.
	const conflict = `{"detail": "This doctor is assigned to patients and cannot be deleted."}`
	unchanged := func(t *testing.T) {
		t.Helper()
		wantSame(t, s, creator.access, doctorPath(d), dBody)
	}
	t.Run("not the creator", func(t *testing.T) {
		wantJSON(t, do(t, s, req{method: "DELETE", path: doctorPath(d), token: a.access}), 403, bodyForbidden)
		unchanged(t)
	})
	t.Run("two assignments", func(t *testing.T) {
		wantJSON(t, do(t, s, req{method: "DELETE", path: doctorPath(d), token: creator.access}), 409, conflict)
		unchanged(t)
		wantJSON(t, do(t, s, req{method: "GET", path: mappingPath(pa), token: a.access}), 200, "["+maBody+"]")
		wantJSON(t, do(t, s, req{method: "GET", path: mappingPath(pb), token: b.access}), 200, "["+mbBody+"]")
	})
	t.Run("one assignment", func(t *testing.T) {
		wantNoContent(t, do(t, s, req{method: "DELETE", path: mappingPath(ma), token: a.access}))
		wantJSON(t, do(t, s, req{method: "DELETE", path: doctorPath(d), token: creator.access}), 409, conflict)
		unchanged(t)
		wantJSON(t, do(t, s, req{method: "GET", path: mappingPath(pb), token: b.access}), 200, "["+mbBody+"]")
	})
	t.Run("none left", func(t *testing.T) {
		// The last assignment goes with its patient.
		wantNoContent(t, do(t, s, req{method: "DELETE", path: patientPath(pb), token: b.access}))
		wantNoContent(t, do(t, s, req{method: "DELETE", path: doctorPath(d), token: creator.access}))
		wantJSON(t, do(t, s, req{method: "GET", path: doctorPath(d), token: creator.access}), 404, bodyNotFound)
		wantJSON(t, do(t, s, req{method: "DELETE", path: doctorPath(d), token: creator.access}), 404, bodyNotFound)
		// A's patient is still there.
		wantJSON(t, do(t, s, req{method: "GET", path: mappingPath(pa), token: a.access}), 200, `[]`)
	})
}

func TestMappingList(t *testing.T) {
	s := newTestServer(t, nil)
	a, b := register(t, s), register(t, s)
	p, _ := mustCreate(t, s, a.access, patientsPath, adaBody("ada@example.com"))
	bp, _ := mustCreate(t, s, b.access, patientsPath, adaBody("ada@example.com"))
	var ids []int64
	var first int64
	for i := range 3 {
		d, _ := mustCreate(t, s, b.access, doctorsPath, doctorBody(uniqueName("map")+"@example.com", fmt.Sprint("Doc", i), "Diagnostics"))
		m, _ := mustCreate(t, s, a.access, mappingsPath, map[string]any{"patient": p, "doctor": d})
		ids = append(ids, m)
		if i == 0 {
			first = d
		}
	}
	bm, _ := mustCreate(t, s, b.access, mappingsPath, map[string]any{"patient": bp, "doctor": first})
	const base = "http://localhost/api/mappings/"
	rev := []int64{ids[2], ids[1], ids[0]}
	cases := []struct {
		name, query    string
		count          int
		next, previous string
		ids            []int64
	}{
		{"default", "", 3, "", "", ids},
		{"ordering id", "?ordering=id", 3, "", "", ids},
		{"ordering -id", "?ordering=-id", 3, "", "", rev},
		{"ordering created_at", "?ordering=created_at", 3, "", "", ids},
		{"ordering -created_at", "?ordering=-created_at", 3, "", "", rev},
		{"ordering both", "?ordering=-created_at,id", 3, "", "", rev},
		{"empty ordering", "?ordering=", 3, "", "", ids},
		{"search is ignored", "?search=nothing-matches-this", 3, "", "", ids},
		{"page 1 of 2", "?page_size=2", 3, base + "?page=2&page_size=2", "", ids[:2]},
		{"page 2 of 2", "?page_size=2&page=2", 3, "", base + "?page_size=2", ids[2:]},
		{"page 2 keeps ordering", "?page_size=2&page=2&ordering=-id", 3, "", base + "?ordering=-id&page_size=2", rev[2:]},
		{"invalid page size", "?page_size=x", 3, "", "", ids},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			wantPage(t, do(t, s, req{method: "GET", path: mappingsPath + tc.query, token: a.access}), tc.count, tc.next, tc.previous, tc.ids)
		})
	}
	t.Run("another user's list", func(t *testing.T) {
		wantPage(t, do(t, s, req{method: "GET", path: mappingsPath, token: b.access}), 1, "", "", []int64{bm})
	})
	t.Run("empty list", func(t *testing.T) {
		c := register(t, s)
		wantJSON(t, do(t, s, req{method: "GET", path: mappingsPath, token: c.access}), 200, emptyPage)
		wantJSON(t, do(t, s, req{method: "GET", path: mappingsPath + "?page=2", token: c.access}), 404, bodyInvalidPage)
	})
	for _, pg := range []string{"3", "0", "-1", "abc"} {
		t.Run("invalid page "+pg, func(t *testing.T) {
			wantJSON(t, do(t, s, req{method: "GET", path: mappingsPath + "?page_size=2&page=" + pg, token: a.access}), 404, bodyInvalidPage)
		})
	}
	for _, f := range []string{"patient", "doctor", "first_name", "specialization", "nope"} {
		t.Run("invalid ordering "+f, func(t *testing.T) {
			res := do(t, s, req{method: "GET", path: mappingsPath + "?ordering=" + f, token: a.access})
			wantJSON(t, res, 400, jsonText(map[string][]string{"ordering": {`Invalid ordering field "` + f + `".`}}))
		})
	}
}

func TestMappingSQLMetacharacters(t *testing.T) {
	s := newTestServer(t, nil)
	w := newMappingWorld(t, s)
	for _, inj := range injections {
		t.Run(inj, func(t *testing.T) {
			for _, field := range []string{"patient", "doctor"} {
				body := map[string]any{"patient": w.patient, "doctor": w.doctor, field: inj}
				res := do(t, s, req{method: "POST", path: mappingsPath, token: w.owner.access, body: body})
				wantJSON(t, res, 400, errs(field, "Incorrect type. Expected pk value, received str."))
			}
			q := url.QueryEscape(inj)
			wantOrderingRefused(t, do(t, s, req{method: "GET", path: mappingsPath + "?ordering=" + q, token: w.owner.access}), inj)
			wantJSON(t, do(t, s, req{method: "GET", path: mappingsPath + "?page=" + q, token: w.owner.access}), 404, bodyInvalidPage)
			res := do(t, s, req{method: "GET", path: mappingsPath + "?page_size=" + q + "&search=" + q, token: w.owner.access})
			wantJSON(t, res, 200, `{"count": 1, "next": null, "previous": null, "results": `+w.byPatient+`}`)
			for _, method := range []string{"GET", "DELETE"} {
				res := do(t, s, req{method: method, path: mappingsPath + url.PathEscape(inj) + "/", token: w.owner.access})
				wantJSON(t, res, 404, bodyNotFound)
			}
		})
	}
	wantTablesIntact(t)
	wantSame(t, s, w.owner.access, mappingPath(w.patient), w.byPatient)
}
