package main

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"mime"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// openAPI is openapi.json, decoded, with what the tests need to read it.
type openAPI struct{ root map[string]any }

func oaLoad(t *testing.T) (openAPI, []byte) {
	t.Helper()
	data, err := os.ReadFile("openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	var root map[string]any
	if err := json.Unmarshal(data, &root); err != nil {
		t.Fatalf("openapi.json: %v", err)
	}
	return openAPI{root}, data
}

// operations maps "METHOD /path" to each operation of the document.
func (d openAPI) operations() map[string]map[string]any {
	ops := map[string]map[string]any{}
	for path, item := range oaObj(d.root["paths"]) {
		for method, op := range oaObj(item) {
			if slices.Contains([]string{"get", "put", "post", "delete", "options", "head", "patch", "trace"}, method) {
				ops[strings.ToUpper(method)+" "+path] = oaObj(op)
			}
		}
	}
	return ops
}

// oaServed lists the server's routes as "METHOD /path", without the {$}.
func oaServed(s *server) map[string]bool {
	out := map[string]bool{}
	for _, p := range servedRoutes(s) {
		out[strings.TrimSuffix(p, "{$}")] = true
	}
	return out
}

// servedRoutes are the patterns of addRoutes' handle calls, read from
// main.go (a ServeMux does not list its patterns); it panics unless s's mux
// routes a request for each to that very pattern.
func servedRoutes(s *server) []string {
	src, err := os.ReadFile("main.go")
	if err != nil {
		panic(err)
	}
	var out []string
	for _, m := range regexp.MustCompile(`(?m)^\s*handle\("([^"]+)"`).FindAllStringSubmatch(string(src), -1) {
		method, path, _ := strings.Cut(strings.ReplaceAll(strings.TrimSuffix(m[1], "{$}"), "{id}", "1"), " ")
		if _, pattern := s.mux.Handler(httptest.NewRequest(method, path, nil)); pattern != m[1] {
			panic(fmt.Sprintf("main.go's route %s is served as %q", m[1], pattern))
		}
		out = append(out, m[1])
	}
	return out
}

// resolve follows "$ref" (a local JSON pointer) until node is no reference.
func (d openAPI) resolve(node any) (map[string]any, error) {
	m, _ := node.(map[string]any)
	for hops := 0; m != nil; hops++ {
		ref, isRef := m["$ref"].(string)
		if !isRef {
			return m, nil
		}
		m = d.root
		for _, part := range strings.Split(strings.TrimPrefix(ref, "#/"), "/") {
			m = oaObj(m[part])
		}
		if m == nil || !strings.HasPrefix(ref, "#/") || hops > 20 {
			return nil, fmt.Errorf("unresolvable $ref %q", ref)
		}
	}
	return nil, fmt.Errorf("not an object: %v", node)
}

func oaArr(v any) []any { l, _ := v.([]any); return l }

func oaObj(v any) map[string]any { m, _ := v.(map[string]any); return m }

// check validates v against the JSON Schema subset the document uses: $ref,
// type, enum, allOf, oneOf, required, properties,
// additionalProperties (a schema or false), minProperties, items,
// minLength, maxLength, pattern, format (date, date-time, uri), minimum,
// maximum. A
// missing schema allows anything.
func (d openAPI) check(schema, v any, at string) error {
	if schema == nil || schema == true {
		return nil
	}
	s, err := d.resolve(schema)
	if err != nil {
		return fmt.Errorf("%s: %v", at, err)
	}
	fail := func(format string, args ...any) error { return fmt.Errorf(at+": "+format, args...) }
	num := func(k string) float64 { // NaN, which compares false, when absent
		if f, ok := s[k].(float64); ok {
			return f
		}
		return math.NaN()
	}
	if t, ok := s["type"]; ok && !oaHasType(t, v) {
		return fail("%s is not of type %v", oaShort(v), t)
	}
	if e, ok := s["enum"].([]any); ok && !slices.ContainsFunc(e, func(x any) bool { return jsonEqual(x, v) }) {
		return fail("%s is not one of %v", oaShort(v), e)
	}
	for _, sub := range oaArr(s["allOf"]) {
		if err := d.check(sub, v, at); err != nil {
			return err
		}
	}
	if alts := oaArr(s["oneOf"]); alts != nil {
		n := 0
		for _, alt := range alts {
			if d.check(alt, v, at) == nil {
				n++
			}
		}
		if n != 1 {
			return fail("%s matches %d of the oneOf schemas, not 1", oaShort(v), n)
		}
	}
	switch v := v.(type) {
	case map[string]any:
		for _, k := range oaArr(s["required"]) {
			if _, ok := v[k.(string)]; !ok {
				return fail("missing required %q in %s", k, oaShort(v))
			}
		}
		if float64(len(v)) < num("minProperties") {
			return fail("fewer than %v properties", s["minProperties"])
		}
		for k, x := range v {
			sub, ok := oaObj(s["properties"])[k]
			if !ok && s["additionalProperties"] == false {
				return fail("undocumented property %q", k)
			} else if !ok {
				sub = s["additionalProperties"]
			}
			if err := d.check(sub, x, at+"."+k); err != nil {
				return err
			}
		}
	case []any:
		for i, x := range v {
			if err := d.check(s["items"], x, fmt.Sprintf("%s[%d]", at, i)); err != nil {
				return err
			}
		}
	case string:
		n := float64(utf8.RuneCountInString(v))
		p, hasPattern := s["pattern"].(string)
		switch {
		case n < num("minLength") || n > num("maxLength"):
			return fail("%q is not %v to %v characters long", v, s["minLength"], s["maxLength"])
		case hasPattern && !regexp.MustCompile(p).MatchString(v):
			return fail("%q does not match %s", v, p)
		case !oaFormatOK(s["format"], v):
			return fail("%q is not a %v", v, s["format"])
		}
	case float64:
		if v < num("minimum") || v > num("maximum") {
			return fail("%v is not from %v to %v", v, s["minimum"], s["maximum"])
		}
	}
	return nil
}

var oaJSONTypes = map[string]string{"<nil>": "null", "map[string]interface {}": "object", "[]interface {}": "array",
	"string": "string", "bool": "boolean", "float64": "number"}

func oaHasType(t, v any) bool {
	if ts, ok := t.([]any); ok {
		return slices.ContainsFunc(ts, func(t any) bool { return oaHasType(t, v) })
	}
	f, isNum := v.(float64)
	return t == oaJSONTypes[fmt.Sprintf("%T", v)] || t == "integer" && isNum && f == math.Trunc(f)
}

func oaFormatOK(format any, v string) bool {
	switch format {
	case "date":
		_, err := time.Parse(time.DateOnly, v)
		return err == nil
	case "date-time":
		_, err := time.Parse(time.RFC3339Nano, v)
		return err == nil
	case "uri":
		u, err := url.Parse(v)
		return err == nil && u.IsAbs()
	}
	return true
}

func oaShort(v any) string { b, _ := json.Marshal(v); return fmt.Sprintf("%.200s", b) }

// checkRequest checks that the document accepts a request the server
// accepted: its query parameters are documented and valid, its body valid.
func (d openAPI) checkRequest(path string, op map[string]any, rq req) error {
	params := map[string]any{}
	for _, p := range append(oaArr(oaObj(oaObj(d.root["paths"])[path])["parameters"]), oaArr(op["parameters"])...) {
		if p, err := d.resolve(p); err == nil && p["in"] == "query" {
			params[p["name"].(string)] = p["schema"]
		}
	}
	_, query, _ := strings.Cut(rq.path, "?")
	q, _ := url.ParseQuery(query)
	for k, vs := range q {
		schema, ok := params[k]
		if !ok {
			return fmt.Errorf("query parameter %q is not documented", k)
		}
		var v any = vs[0]
		switch s, _ := d.resolve(schema); s["type"] {
		case "array": // style form, explode false
			v = []any{}
			for _, x := range strings.Split(vs[0], ",") {
				v = append(v.([]any), x)
			}
		case "integer":
			if n, err := strconv.Atoi(vs[0]); err == nil {
				v = float64(n)
			}
		}
		if err := d.check(schema, v, "query "+k); err != nil {
			return err
		}
	}
	if _, isText := rq.body.(string); rq.body == nil || isText {
		return nil
	}
	var body any
	raw, _ := json.Marshal(rq.body)
	json.Unmarshal(raw, &body)
	rb, _ := d.resolve(op["requestBody"])
	return d.check(oaObj(oaObj(rb["content"])["application/json"])["schema"], body, "request body")
}

// checkResponse checks res against what op documents for its status: the
// status itself, the required headers, the media type and the body's shape.
func (d openAPI) checkResponse(op map[string]any, res response) error {
	doc, ok := oaObj(op["responses"])[strconv.Itoa(res.status)]
	if !ok {
		return fmt.Errorf("status %d is not documented (body %s)", res.status, res.body)
	}
	r, err := d.resolve(doc)
	if err != nil {
		return err
	}
	for name, h := range oaObj(r["headers"]) {
		if h, err := d.resolve(h); err == nil && h["required"] == true && res.header.Get(name) == "" {
			return fmt.Errorf("status %d without its %s header", res.status, name)
		}
	}
	content := oaObj(r["content"])
	mt, _, _ := mime.ParseMediaType(res.header.Get("Content-Type"))
	switch {
	case len(content) == 0 && len(res.body) != 0:
		return fmt.Errorf("status %d documents no body, got %s", res.status, res.body)
	case len(content) == 0:
		return nil
	case content[mt] == nil:
		return fmt.Errorf("status %d: Content-Type %q is not documented", res.status, mt)
	}
	var body any
	if err := json.Unmarshal(res.body, &body); err != nil {
		return fmt.Errorf("status %d: body is not JSON: %v", res.status, err)
	}
	return d.check(oaObj(content[mt])["schema"], body, fmt.Sprintf("%d body", res.status))
}

func TestOpenAPIRoutes(t *testing.T) {
	doc, onDisk := oaLoad(t)
	s := newTestServer(t, nil)
	if v := doc.root["openapi"]; v != "3.1.0" {
		t.Errorf("openapi = %v, want 3.1.0", v)
	}
	var compact, indented bytes.Buffer
	if json.Compact(&compact, onDisk) != nil || json.Indent(&indented, compact.Bytes(), "", "  ") != nil ||
		indented.String()+"\n" != string(onDisk) {
		t.Errorf("openapi.json is not 2-space indented JSON ending in a newline")
	}
	ops, routes := doc.operations(), oaServed(s)
	for key := range routes {
		if ops[key] == nil {
			t.Errorf("the server serves %s, which openapi.json does not document", key)
		}
	}
	ids := map[any]string{}
	for key, op := range ops {
		if !routes[key] {
			t.Errorf("openapi.json documents %s, which the server does not serve", key)
		}
		if id := op["operationId"]; id == nil || ids[id] != "" || op["summary"] == nil {
			t.Errorf("%s: operationId %v missing or also %s's, or no summary", key, id, ids[id])
		}
		ids[op["operationId"]] = key
	}
	for _, m := range regexp.MustCompile(`"\$ref": ("[^"]*")`).FindAllSubmatch(onDisk, -1) {
		if _, err := doc.resolve(map[string]any{"$ref": strings.Trim(string(m[1]), `"`)}); err != nil {
			t.Error(err)
		}
	}
	t.Run("security", func(t *testing.T) {
		// Without a token, a bearer operation is 401 and a public one is not.
		for key, op := range ops {
			method, path, _ := strings.Cut(key, " ")
			res := do(t, s, req{method: method, path: strings.ReplaceAll(path, "{id}", "1")})
			if bearer := len(oaArr(op["security"])) > 0; bearer != (res.status == http.StatusUnauthorized) {
				t.Errorf("%s without a token: %d (bearer security: %v)", key, res.status, bearer)
			} else if err := doc.checkResponse(op, res); err != nil {
				t.Errorf("%s without a token: %v", key, err)
			}
		}
	})
	if servers := oaShort(doc.root["servers"]); servers != `[{"url":"/"}]` {
		t.Errorf("servers = %s, want [{\"url\":\"/\"}]", servers)
	}
	t.Run("served", func(t *testing.T) {
		if !bytes.Equal(openapiJSON, onDisk) {
			t.Fatal("the embedded openapiJSON differs from openapi.json")
		}
		res := do(t, s, req{method: "GET", path: "/api/schema/"})
		if ct := res.header.Get("Content-Type"); res.status != http.StatusOK || ct != "application/vnd.oai.openapi+json" {
			t.Fatalf("GET /api/schema/: %d, Content-Type %q", res.status, ct)
		}
		if !bytes.Equal(res.body, onDisk) {
			t.Fatal("GET /api/schema/ body differs from openapi.json")
		}
	})
}

// oaCase is one real request for an operation of the document. The
// request's method and path default to the operation's.
type oaCase struct {
	op   string // "METHOD /documented/path"
	rq   req
	want int
}

func TestOpenAPIShapes(t *testing.T) {
	doc, _ := oaLoad(t)
	ops := doc.operations()
	s := newTestServer(t, nil)
	a, b, c, d := register(t, s), register(t, s), register(t, s), register(t, s)
	type J = map[string]any
	post := func(tok, path string, body J, want int) J {
		t.Helper()
		res := do(t, s, req{method: "POST", path: path, token: tok, body: body})
		if res.status != want {
			t.Fatalf("setup POST %s: %d %s", path, res.status, res.body)
		}
		return res.object(t)
	}
	id := func(m J) int64 { return int64(m["id"].(float64)) }
	patient := func(tok, email string) int64 {
		return id(post(tok, "/api/patients/", J{"first_name": "Ada", "email": email}, 201))
	}
	doctor := func(tok string, n int) int64 { // the directory is shared by every test: unique emails
		return id(post(tok, "/api/doctors/", J{"first_name": "Greg", "email": fmt.Sprintf("dr%d-%s@example.com", n, a.username), "specialization": "Diagnostics"}, 201))
	}
	pA, pDel, pMap, pB := patient(a.access, "ada@example.com"), patient(a.access, "del@example.com"), patient(a.access, "map@example.com"), patient(b.access, "b@example.com")
	dA, dFree, dB := doctor(a.access, 1), doctor(a.access, 2), doctor(b.access, 3)
	post(a.access, "/api/mappings/", J{"patient": pA, "doctor": dA}, 201)
	mDel := id(post(a.access, "/api/mappings/", J{"patient": pA, "doctor": dB}, 201))
	dFrozen := doctor(a.access, 5) // assigned by another user: its email is frozen
	post(b.access, "/api/mappings/", J{"patient": pB, "doctor": dFrozen}, 201)
	login := J{"username": a.username, "password": a.password}
	p1, p2 := post("", "/api/auth/login/", login, 200)["refresh"], post("", "/api/auth/login/", login, 200)["refresh"]
	// Records for the conditional cases: each read, then changed, so that
	// the first tag read is stale and the second current.
	etag := func(method, path string, body any) string {
		t.Helper()
		res := do(t, s, req{method: method, path: path, token: a.access, body: body})
		if tag := res.header.Get("ETag"); res.status == http.StatusOK && tag != "" {
			return tag
		}
		t.Fatalf("setup %s %s: %d, ETag %q, body %s", method, path, res.status, res.header.Get("ETag"), res.body)
		return ""
	}
	pTag, dTag := patient(a.access, "tag@example.com"), doctor(a.access, 4)
	pOld, dOld := etag("GET", fmt.Sprintf("/api/patients/%d/", pTag), nil), etag("GET", fmt.Sprintf("/api/doctors/%d/", dTag), nil)
	pNow, dNow := etag("PATCH", fmt.Sprintf("/api/patients/%d/", pTag), J{"last_name": "Tag"}), etag("PATCH", fmt.Sprintf("/api/doctors/%d/", dTag), J{"last_name": "Tag"})
	if pOld == pNow || dOld == dNow {
		t.Fatalf("setup: a change kept the ETag (patient %s, doctor %s)", pNow, dNow)
	}

	text := map[string]string{"Content-Type": "text/plain"}
	badHost := map[string]string{"Host": "evil.example"}
	P := func(f string, id int64) string { return fmt.Sprintf(f, id) }
	tok, n, pw := a.access, a.username+"x", "Velvet-Orchard-Candle-Drift"
	cases := []oaCase{
		{"POST /api/auth/register/", req{body: J{"username": n, "email": n + "@example.com", "name": "New", "password": pw, "password_confirm": pw}}, 201},
		{"POST /api/auth/register/", req{body: J{}}, 400},
		{"POST /api/auth/register/", req{method: "GET"}, 405},
		{"POST /api/auth/login/", req{body: login}, 200},
		{"POST /api/auth/login/", req{body: J{"username": a.username, "password": "Wrong-Password-42"}}, 401},
		{"POST /api/auth/token/refresh/", req{body: J{"refresh": p1}}, 200},
		{"POST /api/auth/token/refresh/", req{body: J{"refresh": p1}}, 401}, // blacklisted
		{"POST /api/auth/logout/", req{body: J{"refresh": p2}}, 204},
		{"POST /api/auth/logout/", req{body: J{"refresh": "x.y.z"}}, 401},
		{"GET /api/auth/me/", req{token: tok}, 200},
		{"GET /api/auth/me/", req{header: map[string]string{"Authorization": "Bearer"}}, 401},
		{"GET /api/auth/me/", req{token: "x.y.z"}, 401},

		{"GET /api/patients/", req{path: "/api/patients/?search=ada,example&ordering=-created_at,first_name&page_size=1", token: tok}, 200},
		{"GET /api/patients/", req{path: "/api/patients/?page=99", token: tok}, 404},
		{"GET /api/patients/", req{path: "/api/patients/?ordering=email", token: tok}, 400},
		{"POST /api/patients/", req{token: tok, body: J{"first_name": "<b>Bo</b>", "last_name": "B", "email": "Bo@Example.com", "date_of_birth": "1990-12-10", "phone": "+44 (20) 7946-0958"}}, 201},
		{"POST /api/patients/", req{token: tok, body: J{"first_name": "", "email": "nope", "date_of_birth": "1890-01-01"}}, 400},
		{"POST /api/patients/", req{token: tok, body: `{"first_name": "` + strings.Repeat("x", 70<<10) + `"}`}, 413},
		{"GET /api/patients/{id}/", req{path: P("/api/patients/%d/", pA), token: tok}, 200},
		{"GET /api/patients/{id}/", req{path: P("/api/patients/%d/", pB), token: tok}, 404},
		{"PUT /api/patients/{id}/", req{path: P("/api/patients/%d/", pA), token: tok, body: J{"first_name": "Ada", "email": "ada@example.com", "date_of_birth": nil}}, 200},
		{"PUT /api/patients/{id}/", req{path: P("/api/patients/%d/", pA), token: tok, body: J{"last_name": "L"}}, 400},
		{"PATCH /api/patients/{id}/", req{path: P("/api/patients/%d/", pA), token: tok, body: J{"phone": "", "last_name": "Lovelace"}}, 200},
		{"PATCH /api/patients/{id}/", req{path: P("/api/patients/%d/", pA), token: tok, body: "[1]"}, 400},
		{"DELETE /api/patients/{id}/", req{path: P("/api/patients/%d/", pDel), token: tok}, 204},
		{"DELETE /api/patients/{id}/", req{path: P("/api/patients/%d/", pDel), token: tok}, 404},
		{"GET /api/patients/{id}/", req{path: P("/api/patients/%d/", pTag), token: tok, header: map[string]string{"If-None-Match": pNow}}, 304},
		{"GET /api/patients/{id}/", req{path: P("/api/patients/%d/", pTag), token: tok, header: map[string]string{"If-None-Match": pOld}}, 200},
		{"PATCH /api/patients/{id}/", req{path: P("/api/patients/%d/", pTag), token: tok, body: J{"last_name": "Lost"}, header: map[string]string{"If-Match": pOld}}, 412},
		{"PUT /api/patients/{id}/", req{path: P("/api/patients/%d/", pTag), token: tok, body: J{"first_name": "Ada", "email": "tag@example.com"}, header: map[string]string{"If-Match": pOld}}, 412},
		{"DELETE /api/patients/{id}/", req{path: P("/api/patients/%d/", pTag), token: tok, header: map[string]string{"If-Match": pOld}}, 412},
		{"PATCH /api/patients/{id}/", req{path: P("/api/patients/%d/", pTag), token: tok, body: J{"last_name": "Kept"}, header: map[string]string{"If-Match": pOld + ", " + pNow}}, 200},

		{"GET /api/doctors/", req{path: "/api/doctors/?search=diagnostics&ordering=specialization,-id", token: tok}, 200},
		{"GET /api/doctors/", req{path: "/api/doctors/?ordering=email", token: tok}, 400},
		{"POST /api/doctors/", req{token: tok, body: J{"first_name": "Lisa", "last_name": "Cuddy", "email": "cuddy-" + a.username + "@example.com", "specialization": "Endocrinology"}}, 201},
		{"POST /api/doctors/", req{token: tok, body: J{"first_name": 7, "specialization": "ab"}}, 400},
		{"GET /api/doctors/{id}/", req{path: P("/api/doctors/%d/", dB), token: tok}, 200},
		{"GET /api/doctors/{id}/", req{path: "/api/doctors/999999999/", token: tok}, 404},
		{"PUT /api/doctors/{id}/", req{path: P("/api/doctors/%d/", dA), token: tok, body: J{"first_name": "Gregory", "email": "dr1-" + a.username + "@example.com", "specialization": "Nephrology"}}, 200},
		{"PUT /api/doctors/{id}/", req{path: P("/api/doctors/%d/", dB), token: tok, body: J{"first_name": "X", "email": "x@example.com", "specialization": "XYZ"}}, 403},
		{"PATCH /api/doctors/{id}/", req{path: P("/api/doctors/%d/", dA), token: tok, body: J{"last_name": "House"}}, 200},
		{"PATCH /api/doctors/{id}/", req{path: P("/api/doctors/%d/", dA), token: tok, body: "x", header: text}, 415},
		{"PATCH /api/doctors/{id}/", req{path: P("/api/doctors/%d/", dB), token: tok, body: J{"last_name": "X"}}, 403},
		{"DELETE /api/doctors/{id}/", req{path: P("/api/doctors/%d/", dFree), token: tok}, 204},
		{"PATCH /api/doctors/{id}/", req{path: P("/api/doctors/%d/", dFrozen), token: tok, body: J{"email": "moved-" + a.username + "@example.com"}}, 409},
		{"DELETE /api/doctors/{id}/", req{path: P("/api/doctors/%d/", dA), token: tok}, 409},
		{"GET /api/doctors/{id}/", req{path: P("/api/doctors/%d/", dTag), token: tok, header: map[string]string{"If-None-Match": dNow}}, 304},
		{"PUT /api/doctors/{id}/", req{path: P("/api/doctors/%d/", dTag), token: tok, body: J{"first_name": "Greg", "email": "dr4-" + a.username + "@example.com", "specialization": "Oncology"}, header: map[string]string{"If-Match": dOld}}, 412},
		{"PATCH /api/doctors/{id}/", req{path: P("/api/doctors/%d/", dTag), token: tok, body: J{"last_name": "Lost"}, header: map[string]string{"If-Match": dOld}}, 412},
		{"DELETE /api/doctors/{id}/", req{path: P("/api/doctors/%d/", dTag), token: tok, header: map[string]string{"If-Match": dOld}}, 412},
		{"DELETE /api/doctors/{id}/", req{path: P("/api/doctors/%d/", dTag), token: tok, header: map[string]string{"If-Match": dNow}}, 204},

		{"GET /api/mappings/", req{path: "/api/mappings/?ordering=-created_at&page_size=1", token: tok}, 200},
		{"GET /api/mappings/", req{path: "/api/mappings/?ordering=first_name", token: tok}, 400},
		{"POST /api/mappings/", req{token: tok, body: J{"patient": strconv.FormatInt(pMap, 10), "doctor": dA}}, 201},
		{"POST /api/mappings/", req{token: tok, body: J{"patient": pA, "doctor": dA}}, 400}, // the same pair
		{"GET /api/mappings/{id}/", req{path: P("/api/mappings/%d/", pA), token: tok}, 200},
		{"GET /api/mappings/{id}/", req{path: P("/api/mappings/%d/", pB), token: tok}, 404},
		{"DELETE /api/mappings/{id}/", req{path: P("/api/mappings/%d/", mDel), token: tok}, 204},
		{"DELETE /api/mappings/{id}/", req{path: P("/api/mappings/%d/", mDel), token: tok}, 404},

		{"GET /api/audit/", req{token: tok}, 200},
		{"GET /api/audit/", req{path: P("/api/audit/?action=patient.update&page_size=2&patient=%d", pA), token: tok}, 200},
		{"GET /api/audit/", req{path: "/api/audit/?patient=abc", token: tok}, 400},
		{"GET /api/audit/", req{path: P("/api/audit/?action=doctor.update&doctor=%d", dA), token: tok}, 200},
		{"GET /api/audit/", req{path: "/api/audit/?doctor=x", token: tok}, 400},
		{"GET /api/audit/", req{path: "/api/audit/?patient=0", token: tok}, 400},
		{"GET /api/audit/", req{path: "/api/audit/?login=9223372036854775808", token: tok}, 400},
		{"GET /api/audit/", req{path: "/api/audit/?login=9223372036854775807&doctor=1", token: tok}, 200},
		{"GET /api/audit/", req{path: "/api/audit/?cursor=99", token: tok}, 404},
		{"GET /api/schema/", req{}, 200},
		{"GET /api/schema/", req{header: badHost}, 400},
		{"GET /healthz", req{}, 200},
		{"GET /healthz", req{method: "POST"}, 405},
		{"GET /readyz", req{header: badHost}, 200}, // load balancers call it by IP
		{"GET /readyz", req{method: "DELETE"}, 405},

		// Last: these end c's and d's logins.
		{"POST /api/auth/logout/all/", req{token: c.access}, 204},
		{"POST /api/auth/logout/all/", req{token: c.access}, 401}, // this login ended too
		{"POST /api/auth/password/", req{token: d.access, body: J{"old_password": "Not-The-Password-1", "new_password": pw}}, 400},
		{"POST /api/auth/password/", req{token: d.access, body: J{"old_password": d.password, "new_password": pw, "new_password_confirm": pw}}, 200},
		{"POST /api/auth/password/", req{token: d.access, body: J{"old_password": pw, "new_password": d.password}}, 401}, // ended
	}

	success, failure := map[string]bool{}, map[string]bool{}
	for i, tc := range cases {
		success[tc.op] = success[tc.op] || tc.want < 400
		failure[tc.op] = failure[tc.op] || tc.want >= 400
		t.Run(fmt.Sprintf("%02d %s %d", i, tc.op, tc.want), func(t *testing.T) {
			op, rq := ops[tc.op], tc.rq
			method, path, _ := strings.Cut(tc.op, " ")
			rq.method, rq.path = cmp.Or(rq.method, method), cmp.Or(rq.path, path)
			if op == nil {
				t.Fatalf("%s is not in openapi.json", tc.op)
			}
			res := do(t, s, rq)
			if res.status != tc.want {
				t.Fatalf("%s %s: status %d, want %d; body %s", rq.method, rq.path, res.status, tc.want, res.body)
			}
			if err := doc.checkResponse(op, res); err != nil {
				t.Fatalf("%s %s: %v", rq.method, rq.path, err)
			}
			if err := doc.checkRequest(path, op, rq); tc.want < 400 && err != nil {
				t.Fatalf("%s %s: the server accepted what the document refuses: %v", rq.method, rq.path, err)
			}
		})
	}
	// Every operation, documented or served, needs both kinds of case.
	for key := range oaServed(s) {
		if _, ok := ops[key]; !ok {
			ops[key] = nil
		}
	}
	for key := range ops {
		if !success[key] || !failure[key] {
			t.Errorf("%s: the table needs a success case and an error case (have success %v, error %v)", key, success[key], failure[key])
		}
	}
}

// TestOpenAPIMalformedHTTP: a request that is not valid HTTP never reaches
// the API: Go's server answers a plain-text 400, which every operation of
// the document lists (contract v5, Errors).
func TestOpenAPIMalformedHTTP(t *testing.T) {
	doc, _ := oaLoad(t)
	srv := httptest.NewServer(newTestServer(t, nil))
	defer srv.Close()
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprint(conn, "GET /api/patients/ HTTP/1.1\r\nHost: localhost\r\nX-Note: a\x01b\r\n\r\n")
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	if ct := res.Header.Get("Content-Type"); res.StatusCode != 400 || !strings.HasPrefix(ct, "text/plain") ||
		!strings.HasPrefix(string(body), "400 Bad Request") {
		t.Fatalf("got %d %q %q, want Go's plain-text 400", res.StatusCode, ct, body)
	}
	for key, op := range doc.operations() {
		r, err := doc.resolve(oaObj(op["responses"])["400"])
		if err != nil || oaObj(r["content"])["text/plain"] == nil {
			t.Errorf("%s: no text/plain 400 documented (%v)", key, err)
		}
	}
}
