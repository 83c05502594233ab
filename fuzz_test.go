package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"
)

// Fuzz targets. `go test ./...` runs their seeds; to search for new inputs:
//
//	go test -run '^$' -fuzz FuzzVerifyToken -fuzztime 5m
//
// (likewise FuzzOwnClaims, FuzzPasswordHash, FuzzRequestBody).

// FuzzVerifyToken feeds arbitrary strings to the verifier: it must never
// panic, and must accept nothing that the key did not sign.
func FuzzVerifyToken(f *testing.F) {
	s := newSigner([]byte(testSecret), 15*time.Minute, 24*time.Hour)
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
		if c.TokenType != "access" || c.Exp <= now.Unix() || c.UserID <= 0 || c.SID <= 0 || !isJTI(c.JTI) {
			t.Fatalf("accepted invalid claims %+v", c)
		}
	})
}

// FuzzOwnClaims checks the reflection-free claims reader against
// encoding/json: whenever it accepts a payload, it must read exactly what
// json.Unmarshal reads.
func FuzzOwnClaims(f *testing.F) {
	s := newSigner([]byte(testSecret), 15*time.Minute, 24*time.Hour)
	tok := s.sign(s.newClaims("refresh", 42, 7, time.Now()))
	payload, _ := b64.DecodeString(strings.Split(tok, ".")[1])
	f.Add(payload)
	f.Add([]byte(`{"token_type":"access","exp":1,"iat":1,"jti":"x","user_id":1,"sid":1}`))
	f.Add([]byte(`{"token_type":"acc\"ess","exp":01,"iat":-1,"jti":"x","user_id":1,"sid":1}`))
	// Found by fuzzing: a control byte in a string, which encoding/json refuses.
	f.Add([]byte("{\"token_type\":\"\",\"exp\":0,\"iat\":0,\"jti\":\"\x05\",\"user_id\":0,\"sid\":0}"))
	f.Fuzz(func(t *testing.T, p []byte) {
		var fast, slow claims
		if !parseOwnClaims(p, &fast) {
			return
		}
		if err := json.Unmarshal(p, &slow); err != nil {
			t.Fatalf("fast reader accepted what encoding/json refuses (%v): %q", err, p)
		}
		if fast != slow {
			t.Fatalf("fast %+v, json %+v, for %q", fast, slow, p)
		}
	})
}

// FuzzPasswordHash feeds arbitrary stored hashes to the Django hash parser:
// it must never panic, and must only accept the right password.
func FuzzPasswordHash(f *testing.F) {
	p, err := newPasswords(1000, 1)
	if err != nil {
		f.Fatal(err)
	}
	good, err := p.encode("secret", "saltsaltsalt")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add("pbkdf2_sha256$$$")
	f.Add("pbkdf2_sha256$-1$salt$AAAA")
	f.Add("argon2$1$2$3")
	f.Fuzz(func(t *testing.T, encoded string) {
		// Keep each run short: a huge iteration count is valid, just slow.
		if parts := strings.Split(encoded, "$"); len(parts) > 1 && len(parts[1]) > 4 {
			return
		}
		ok, _, err := p.verify(context.Background(), "secret", encoded)
		if err == nil && ok && encoded != good {
			// Another encoding of the same hash is fine; check it really is one.
			if again, _, _ := p.verify(context.Background(), "not the secret", encoded); again {
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
