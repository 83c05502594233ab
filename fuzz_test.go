package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Fuzz targets. `go test ./...` runs their seeds; to search for new inputs:
//
//	go test -run '^$' -fuzz FuzzVerifyToken -fuzztime 5m
//
// (likewise FuzzPasswordHash, FuzzRequestBody).

// FuzzVerifyToken feeds arbitrary strings to the verifier: it must never
// panic, and must accept nothing that the key did not sign.
func FuzzVerifyToken(f *testing.F) {
	s := &signer{key: []byte(testSecret), accessTTL: 15 * time.Minute, refreshTTL: 24 * time.Hour}
	now := time.Now()
	f.Add(s.sign(s.newClaims("access", 1, 1, now)))
	f.Add("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJ0b2tlbl90eXBlIjoiYWNjZXNzIn0.")
	f.Add("a.b.c")
	f.Add(strings.Repeat("A", 5000))
	f.Fuzz(func(t *testing.T, token string) {
		c, err := s.verify(token, "access", now)
		if err != nil {
			return
		}
		// Accepted: the signature must be ours over the first two parts.
		i := strings.LastIndexByte(token, '.')
		mac := hmac.New(sha256.New, []byte(testSecret))
		mac.Write([]byte(token[:i]))
		if b64.EncodeToString(mac.Sum(nil)) != token[i+1:] {
			t.Fatalf("accepted a token with a foreign signature: %q", token)
		}
		if c.TokenType != "access" || c.Exp <= now.Unix() || c.UserID <= 0 || c.SID <= 0 || !regexp.MustCompile(`^[0-9a-f]{32}$`).MatchString(c.JTI) {
			t.Fatalf("accepted invalid claims %+v", c)
		}
	})
}

// FuzzPasswordHash feeds arbitrary stored hashes to the Django hash parser:
// it must never panic, and must only accept the right password.
func FuzzPasswordHash(f *testing.F) {
	p := newPasswords(1000, 1)
	good := p.encode("secret", "saltsaltsalt")
	f.Add(good)
	f.Add("pbkdf2_sha256$$$")
	f.Add("pbkdf2_sha256$-1$salt$AAAA")
	f.Add("argon2$1$2$3")
	f.Fuzz(func(t *testing.T, encoded string) {
		// Keep each run short: a huge iteration count is valid, just slow.
		if parts := strings.Split(encoded, "$"); len(parts) > 1 && len(parts[1]) > 4 {
			return
		}
		ok, _ := p.verify("secret", encoded)
		if ok && encoded != good {
			// Another encoding of the same hash is fine; check it really is one.
			if again, _ := p.verify("not the secret", encoded); again {
				t.Fatalf("hash %q accepts two passwords", encoded)
			}
		}
	})
}

// FuzzRequestBody sends arbitrary bodies to every endpoint that reads one:
// whatever the bytes, the answer is never a 5xx.
func FuzzRequestBody(f *testing.F) {
	s := newTestServer(f, nil)
	a := register(f, s)
	for _, seed := range []string{
		`{}`, `[]`, `null`, `{"first_name": "\u0000"}`, `{"patient": 1e999, "doctor": 99999999999999999999}`,
		`{"email": {"a": 1}}`, strings.Repeat("[", 10_000), `{"a":1}{"b":2}`, "\xff\xfe",
		`{"first_name": "A", "email": "a@b.co", "date_of_birth": "2999-01-01"}`,
		`{"username": "x", "email": "x@y.zz", "name": "n", "password": "p"}`,
	} {
		f.Add(seed)
	}
	paths := []struct{ method, path, token string }{
		{"POST", "/api/auth/register/", ""},
		{"POST", "/api/auth/login/", ""},
		{"POST", "/api/auth/token/refresh/", ""},
		{"POST", "/api/auth/logout/", ""},
		{"POST", "/api/patients/", a.access},
		{"PATCH", "/api/patients/1/", a.access},
		{"POST", "/api/doctors/", a.access},
		{"PUT", "/api/doctors/1/", a.access},
		{"POST", "/api/mappings/", a.access},
	}
	f.Fuzz(func(t *testing.T, body string) {
		for _, p := range paths {
			res := do(t, s, req{method: p.method, path: p.path, token: p.token, body: body})
			if res.status >= http.StatusInternalServerError {
				t.Fatalf("%s %s with %q: %d %s", p.method, p.path, body, res.status, res.body)
			}
			if res.status != http.StatusNoContent {
				res.json(t) // every answer is JSON
			}
		}
	})
}

// hostileKV is one member of a JSON object body, its value raw JSON text.
// Bodies are built by hand so that a key may repeat and bytes go as given.
type hostileKV struct{ key, raw string }

func hostileBody(kvs []hostileKV) string {
	parts := make([]string, len(kvs))
	for i, kv := range kvs {
		parts[i] = strconv.Quote(kv.key) + ": " + kv.raw
	}
	return "{" + strings.Join(parts, ", ") + "}"
}

// hostileWith is kvs with key's value replaced by raw.
func hostileWith(kvs []hostileKV, key, raw string) []hostileKV {
	out := make([]hostileKV, len(kvs))
	for i, kv := range kvs {
		if kv.key == key {
			kv.raw = raw
		}
		out[i] = kv
	}
	return out
}

// hostileValue is the raw value of key in kvs.
func hostileValue(kvs []hostileKV, key string) string {
	for _, kv := range kvs {
		if kv.key == key {
			return kv.raw
		}
	}
	return ""
}

// hostileField is one member an endpoint reads: a string, or (pk) a
// mapping's reference; longStatus and longBody are the whole answer to a
// 60 KiB string of letters in it.
type hostileField struct {
	name       string
	pk         bool
	longStatus int
	longBody   string
}

// wrongType is the 400 for a value of the wrong JSON type; got names that
// type as DRF does (bool, list, dict, float, str).
func (f hostileField) wrongType(got string) string {
	if f.pk {
		return errs(f.name, "Incorrect type. Expected pk value, received "+got+".")
	}
	return errs(f.name, msgNotString)
}

// TestHostileInput sends every endpoint that reads a body the inputs a
// hostile client would try, field by field: NUL characters, invalid UTF-8,
// nesting past the decoder's limit, numbers no int64 or float64 holds,
// strings past every length limit and past the body cap, repeated keys and
// values of every wrong JSON type. Each answer is the contract's 4xx for
// that field, never a 5xx. (patients_test.go, doctors_test.go,
// mappings_test.go, auth_test.go and middleware_test.go cover each rule in
// detail on one endpoint; this is the cross product.)
func TestHostileInput(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	pid, _ := mustCreate(t, s, a.access, patientsPath, adaBody(uniqueName("hostile")+"@example.com"))
	did, _ := mustCreate(t, s, a.access, doctorsPath, doctorBody(uniqueName("hostile")+"@example.com", "Hostile", "Diagnostics"))

	q := func(v string) string { return jsonText(v) }
	long := strings.Repeat("a", 60<<10)
	longDigits := strings.Repeat("7", 60<<10)
	tooLong := func(field string, n int) string {
		return errs(field, fmt.Sprintf("Ensure this field has no more than %d characters.", n))
	}
	registerBase := func(t *testing.T) []hostileKV {
		n := uniqueName("hostile")
		return []hostileKV{{"username", q(n)}, {"email", q(n + "@example.com")}, {"name", q("Hostile Tester")},
			{"password", q("Harbor-Lantern-Quiet-Moss")}, {"password_confirm", q("Harbor-Lantern-Quiet-Moss")}}
	}
	loginBase := func(t *testing.T) []hostileKV {
		return []hostileKV{{"username", q(a.username)}, {"password", q(a.password)}}
	}
	// A fresh login each time: a refresh spends the token, a logout ends it.
	refreshBase := func(t *testing.T) []hostileKV { return []hostileKV{{"refresh", q(register(t, s).refresh)}} }
	patientBase := func(t *testing.T) []hostileKV {
		return []hostileKV{{"first_name", q("Ada")}, {"last_name", q("Byron")}, {"email", q(uniqueName("hostile") + "@example.com")},
			{"date_of_birth", q("1990-05-17")}, {"phone", q("+44 20 7946 0958")}}
	}
	doctorBase := func(t *testing.T) []hostileKV {
		return []hostileKV{{"first_name", q("Grace")}, {"last_name", q("Hopper")}, {"email", q(uniqueName("hostile") + "@example.com")},
			{"specialization", q("Cardiology")}}
	}
	mappingBase := func(t *testing.T) []hostileKV {
		return []hostileKV{{"patient", strconv.FormatInt(pid, 10)}, {"doctor", strconv.FormatInt(did, 10)}}
	}
	patientFields := []hostileField{
		{"first_name", false, 400, tooLong("first_name", 100)},
		{"last_name", false, 400, tooLong("last_name", 100)},
		{"email", false, 400, tooLong("email", 254)},
		{"date_of_birth", false, 400, errs("date_of_birth", msgDate)},
		{"phone", false, 400, tooLong("phone", 32)}, // at most 32 characters, then phoneRE
	}
	doctorFields := []hostileField{
		{"first_name", false, 400, tooLong("first_name", 100)},
		{"last_name", false, 400, tooLong("last_name", 100)},
		{"email", false, 400, tooLong("email", 254)},
		{"specialization", false, 400, tooLong("specialization", 120)},
	}
	// okCheck functions judge a success; value is the raw JSON the repeated
	// key's last occurrence carried.
	wantTokens := func(t *testing.T, res response, _ string) {
		if m := res.object(t); len(m) != 2 || m["access"] == nil || m["refresh"] == nil {
			t.Fatalf("body %s, want {\"refresh\", \"access\"}", res.body)
		}
	}
	wantMember := func(key string) func(*testing.T, response, string) {
		return func(t *testing.T, res response, want string) {
			m := res.object(t)
			if u, ok := m["user"].(map[string]any); ok {
				m = u
			}
			if got := jsonText(m[key]); got != want {
				t.Fatalf("%s %s, want %s; body %s", key, got, want, res.body)
			}
		}
	}
	endpoints := []struct {
		name, method, path, token string
		base                      func(*testing.T) []hostileKV
		fields                    []hostileField
		okStatus                  int
		okCheck                   func(t *testing.T, res response, value string)
	}{
		{"register", "POST", "/api/auth/register/", "", registerBase, []hostileField{
			{"username", false, 400, tooLong("username", 150)},
			{"email", false, 400, tooLong("email", 254)},
			{"name", false, 400, tooLong("name", 150)},
			{"password", false, 400, tooLong("password", 1024)},
			{"password_confirm", false, 400, errs("password_confirm", "Passwords don't match.")},
		}, 201, wantMember("username")},
		{"login", "POST", "/api/auth/login/", "", loginBase, []hostileField{
			{"username", false, 401, badCredentialsBody},
			{"password", false, 401, badCredentialsBody},
		}, 200, wantTokens},
		{"refresh", "POST", "/api/auth/token/refresh/", "", refreshBase, []hostileField{
			{"refresh", false, 401, refreshInvalidBody},
		}, 200, wantTokens},
		{"logout", "POST", "/api/auth/logout/", "", refreshBase, []hostileField{
			{"refresh", false, 401, refreshInvalidBody},
		}, 204, nil},
		{"POST patients", "POST", patientsPath, a.access, patientBase, patientFields, 201, wantMember("first_name")},
		{"PUT patient", "PUT", patientPath(pid), a.access, patientBase, patientFields, 200, wantMember("first_name")},
		{"PATCH patient", "PATCH", patientPath(pid), a.access, patientBase, patientFields, 200, wantMember("first_name")},
		{"POST doctors", "POST", doctorsPath, a.access, doctorBase, doctorFields, 201, wantMember("first_name")},
		{"PUT doctor", "PUT", doctorPath(did), a.access, doctorBase, doctorFields, 200, wantMember("first_name")},
		{"PATCH doctor", "PATCH", doctorPath(did), a.access, doctorBase, doctorFields, 200, wantMember("first_name")},
		{"POST mappings", "POST", mappingsPath, a.access, mappingBase, []hostileField{
			{"patient", true, 400, errs("patient", "Incorrect type. Expected pk value, received str.")},
			{"doctor", true, 400, errs("doctor", "Incorrect type. Expected pk value, received str.")},
		}, 201, wantMember("patient")},
	}

	const invalidUTF8 = `{"detail": "JSON parse error - invalid UTF-8"}`
	const notObject = `{"detail": "JSON parse error - the body must be a JSON object"}`
	nested := strings.Repeat("[", 10_000) + strings.Repeat("]", 10_000)
	for _, ep := range endpoints {
		t.Run(ep.name, func(t *testing.T) {
			send := func(t *testing.T, body string) response {
				t.Helper()
				return do(t, s, req{method: ep.method, path: ep.path, token: ep.token, body: body})
			}
			t.Run("1 MB string", func(t *testing.T) {
				body := hostileBody(hostileWith(ep.base(t), ep.fields[0].name, q(strings.Repeat("x", 1<<20))))
				wantJSON(t, send(t, body), 413, `{"detail": "Request body is too large."}`)
			})
			t.Run("10,000-deep array as the body", func(t *testing.T) {
				wantJSON(t, send(t, nested), 400, notObject)
			})
			for _, f := range ep.fields {
				// each is a raw value for f and the whole answer to it; a
				// want of "" is a parse error naming the nesting limit (in
				// encoding/json's words, "max depth").
				type input struct {
					name, raw string
					status    int
					want      string
				}
				nul := errs(f.name, msgNUL)
				if f.pk {
					nul = f.wrongType("str")
				}
				bigInt := f.wrongType("float")
				if f.pk {
					bigInt = invalidPKBody(f.name, "9223372036854775808")
				}
				inputs := []input{
					{"NUL", `"a\u0000b"`, 400, nul},
					{"only NUL", `"\u0000"`, 400, nul},
					{"invalid UTF-8", "\"a\xff\xfeb\"", 400, invalidUTF8},
					{"truncated UTF-8", "\"\xe2\x82\"", 400, invalidUTF8},
					{"10,000-deep array", nested, 400, ""},
					{"10,000-deep object", strings.Repeat(`{"a":`, 10_000) + "1" + strings.Repeat("}", 10_000), 400, ""},
					{"1e999", `1e999`, 400, f.wrongType("float")},
					{"-1e999", `-1e999`, 400, f.wrongType("float")},
					{"2^63", `9223372036854775808`, 400, bigInt},
					{"60 KiB string", q(long), f.longStatus, f.longBody},
					{"true", `true`, 400, f.wrongType("bool")},
					{"list", `["a"]`, 400, f.wrongType("list")},
					{"object", `{"a": "b"}`, 400, f.wrongType("dict")},
				}
				if f.pk {
					inputs = append(inputs,
						input{"60 KiB of digits", q(longDigits), 400, invalidPKBody(f.name, longDigits)},
						input{"-2^63-1 as a string", `"-9223372036854775809"`, 400, invalidPKBody(f.name, "-9223372036854775809")},
						input{"2^64 as a string", `"18446744073709551616"`, 400, invalidPKBody(f.name, "18446744073709551616")},
					)
				} else {
					inputs = append(inputs, input{"a number", `42`, 400, f.wrongType("int")})
				}
				for _, in := range inputs {
					t.Run(f.name+" "+in.name, func(t *testing.T) {
						res := send(t, hostileBody(hostileWith(ep.base(t), f.name, in.raw)))
						if in.want == "" {
							wantParseError(t, res, "max depth")
							return
						}
						wantJSON(t, res, in.status, in.want)
					})
				}
			}
			// A key given twice: the last one wins, whichever is valid.
			f := ep.fields[0]
			t.Run("duplicate key, valid last", func(t *testing.T) {
				base := ep.base(t)
				value := hostileValue(base, f.name)
				res := send(t, hostileBody(append([]hostileKV{{f.name, "true"}}, base...)))
				if ep.okStatus == http.StatusNoContent {
					wantNoContent(t, res)
					return
				}
				if res.status != ep.okStatus {
					t.Fatalf("status %d, want %d; body %s", res.status, ep.okStatus, res.body)
				}
				ep.okCheck(t, res, value)
			})
			t.Run("duplicate key, invalid last", func(t *testing.T) {
				res := send(t, hostileBody(append(ep.base(t), hostileKV{f.name, "true"})))
				wantJSON(t, res, 400, f.wrongType("bool"))
			})
		})
	}

	// Members the server does not read are ignored, however hostile their
	// numbers: id, owner and timestamps never come from a client.
	for _, path := range []string{patientPath(pid), doctorPath(did)} {
		t.Run("ignored members "+path, func(t *testing.T) {
			before := wantObject(t, do(t, s, req{method: "GET", path: path, token: a.access}), http.StatusOK)
			body := `{"id": 1e999, "owner_id": 9223372036854775808, "created_by": -1e999, "created_at": 18446744073709551616, "x": [[[[]]]]}`
			after := wantObject(t, do(t, s, req{method: "PATCH", path: path, token: a.access, body: body}), http.StatusOK)
			delete(before, "updated_at")
			delete(after, "updated_at")
			if !jsonEqual(before, after) {
				t.Fatalf("PATCH %s with ignored members changed\n%v\nto %v", path, before, after)
			}
		})
	}
}
