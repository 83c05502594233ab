package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Bodies the middleware writes, as the contract words them (main_test.go
// has those that other files check too).
const (
	bodyBadHost      = `{"detail": "Invalid host header."}`
	bodyTooLarge     = `{"detail": "Request body is too large."}`
	bodyUseSlash     = `{"detail": "Use the path that ends in a slash."}`
	bodyServerFailed = `{"detail": "A server error occurred."}`
	bodyLoginFields  = `{"username": ["This field is required."], "password": ["This field is required."]}`
)

// bodyNotAllowed is the 405 body for method.
func bodyNotAllowed(method string) string {
	return fmt.Sprintf(`{"detail": "Method \"%s\" not allowed."}`, method)
}

// freezeLimiters stops the clocks of s's rate limiters at `at`, so that
// waits and Retry-After values are exact and no window rolls over mid-test.
func freezeLimiters(s *server, at time.Time) {
	for _, l := range []*limiter{s.registerLimit, s.loginLimit, s.anonLimit, s.userLimit} {
		if l != nil {
			l.now = func() time.Time { return at }
		}
	}
}

// tenPast is ten minutes into an hour (and so into an hourly window): a
// request throttled by an hourly limit whose current window is full waits
// the remaining 50 minutes and a nanosecond, which rounds up to 3001 s.
var tenPast = time.Unix(500_000*3600+600, 0)

const tenPastWait = 3001

// wantHeader fails unless res carries header key with value want.
func wantHeader(t testing.TB, res response, key, want string) {
	t.Helper()
	if got := res.header.Values(key); len(got) != 1 || got[0] != want {
		t.Fatalf("%s %q, want %q", key, got, want)
	}
}

// wantVaryOrigin fails unless Vary names Origin.
func wantVaryOrigin(t testing.TB, res response) {
	t.Helper()
	for _, v := range res.header.Values("Vary") {
		for _, f := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(f), "Origin") {
				return
			}
		}
	}
	t.Fatalf("Vary %q does not name Origin", res.header.Values("Vary"))
}

// wantNoCORS fails when res carries any CORS response header.
func wantNoCORS(t testing.TB, res response) {
	t.Helper()
	for k := range res.header {
		if strings.HasPrefix(strings.ToLower(k), "access-control-") {
			t.Fatalf("CORS header %s: %q on a response to a foreign origin", k, res.header.Values(k))
		}
	}
}

// wantSecurityHeaders fails unless res carries the headers the contract puts on
// every response, sets no cookie, and (over plain HTTP) has no HSTS.
func wantSecurityHeaders(t testing.TB, res response) {
	t.Helper()
	for key, want := range map[string]string{
		"X-Content-Type-Options":     "nosniff",
		"X-Frame-Options":            "DENY",
		"Referrer-Policy":            "same-origin",
		"Cross-Origin-Opener-Policy": "same-origin",
		"Content-Security-Policy":    "default-src 'none'; frame-ancestors 'none'",
		"Cache-Control":              "no-store",
	} {
		wantHeader(t, res, key, want)
	}
	if c := res.header.Values("Set-Cookie"); len(c) > 0 {
		t.Fatalf("Set-Cookie %q: no cookies are set", c)
	}
	if h := res.header.Get("Strict-Transport-Security"); h != "" {
		t.Fatalf("Strict-Transport-Security %q over plain HTTP", h)
	}
}

// addBoomRoute registers a route that panics, as a bug in a handler would.
func addBoomRoute(s *server) {
	s.mux.Handle("GET /api/boom/{$}", route{s: s, access: probe, h: func(http.ResponseWriter, *http.Request) error {
		panic("boom: secret internals")
	}})
}

// TestRouting pins the router down: every 404, 405 and slash variant, each
// answered in JSON before any handler work.
func TestRouting(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	const redirect = http.StatusPermanentRedirect // a slash redirect keeps its method
	tests := []struct {
		name         string
		method, path string
		auth         bool
		wantStatus   int
		wantBody     string
		wantAllow    string
		wantLocation string
	}{
		{"healthz", "GET", "/healthz", false, 200, `{"status": "ok"}`, "", ""},
		{"readyz", "GET", "/readyz", false, 200, `{"status": "ok"}`, "", ""},
		{"healthz with a slash", "GET", "/healthz/", false, 404, bodyNotFound, "", ""},
		{"readyz with a slash", "GET", "/readyz/", false, 404, bodyNotFound, "", ""},
		{"healthz by POST", "POST", "/healthz", false, 405, bodyNotAllowed("POST"), "GET, HEAD, OPTIONS", ""},
		{"readyz by DELETE", "DELETE", "/readyz", false, 405, bodyNotAllowed("DELETE"), "GET, HEAD, OPTIONS", ""},

		{"root", "GET", "/", false, 404, bodyNotFound, "", ""},
		{"api without slash", "GET", "/api", false, 404, bodyNotFound, "", ""},
		{"api root", "GET", "/api/", false, 404, bodyNotFound, "", ""},
		{"api root with token", "GET", "/api/", true, 404, bodyNotFound, "", ""},
		{"unknown api path", "GET", "/api/nurses/", false, 404, bodyNotFound, "", ""},
		{"unknown api path without slash", "POST", "/api/nurses", false, 404, bodyNotFound, "", ""},
		{"unknown auth path", "POST", "/api/auth/", false, 404, bodyNotFound, "", ""},
		{"unknown path", "GET", "/admin/", false, 404, bodyNotFound, "", ""},
		{"upper-case path", "GET", "/API/patients/", false, 404, bodyNotFound, "", ""},
		{"extra segment", "GET", "/api/patients/5/x/", false, 404, bodyNotFound, "", ""},
		{"extra segment with token", "GET", "/api/patients/5/x/", true, 404, bodyNotFound, "", ""},
		{"extra segment without slash", "DELETE", "/api/patients/5/x", true, 404, bodyNotFound, "", ""},
		{"extra segment after login", "POST", "/api/auth/login/x/", false, 404, bodyNotFound, "", ""},
		{"extra segment on mappings", "GET", "/api/mappings/1/2/", true, 404, bodyNotFound, "", ""},
		{"non-numeric patient id", "GET", "/api/patients/abc/", true, 404, bodyNotFound, "", ""},
		{"zero patient id", "GET", "/api/patients/0/", true, 404, bodyNotFound, "", ""},
		{"negative doctor id", "GET", "/api/doctors/-1/", true, 404, bodyNotFound, "", ""},
		{"doctor id beyond int64", "GET", "/api/doctors/99999999999999999999/", true, 404, bodyNotFound, "", ""},
		{"non-numeric mapping id", "DELETE", "/api/mappings/abc/", true, 404, bodyNotFound, "", ""},
		{"unknown patient id", "GET", "/api/patients/999999999/", true, 404, bodyNotFound, "", ""},
		{"known route needs a token", "GET", "/api/patients/", false, 401, bodyUnauthenticated, "", ""},

		{"PATCH on patients", "PATCH", "/api/patients/", false, 405, bodyNotAllowed("PATCH"), "GET, HEAD, POST, OPTIONS", ""},
		{"PATCH on patients with token", "PATCH", "/api/patients/", true, 405, bodyNotAllowed("PATCH"), "GET, HEAD, POST, OPTIONS", ""},
		{"DELETE on doctors", "DELETE", "/api/doctors/", false, 405, bodyNotAllowed("DELETE"), "GET, HEAD, POST, OPTIONS", ""},
		{"PUT on mappings", "PUT", "/api/mappings/", false, 405, bodyNotAllowed("PUT"), "GET, HEAD, POST, OPTIONS", ""},
		{"POST on a patient", "POST", "/api/patients/5/", false, 405, bodyNotAllowed("POST"), "DELETE, GET, HEAD, PATCH, PUT, OPTIONS", ""},
		{"POST on a doctor", "POST", "/api/doctors/5/", false, 405, bodyNotAllowed("POST"), "DELETE, GET, HEAD, PATCH, PUT, OPTIONS", ""},
		{"PATCH on a mapping", "PATCH", "/api/mappings/5/", false, 405, bodyNotAllowed("PATCH"), "DELETE, GET, HEAD, OPTIONS", ""},
		{"GET on register", "GET", "/api/auth/register/", false, 405, bodyNotAllowed("GET"), "POST, OPTIONS", ""},
		{"PATCH on login", "PATCH", "/api/auth/login/", false, 405, bodyNotAllowed("PATCH"), "POST, OPTIONS", ""},
		{"PUT on refresh", "PUT", "/api/auth/token/refresh/", false, 405, bodyNotAllowed("PUT"), "POST, OPTIONS", ""},
		{"GET on logout", "GET", "/api/auth/logout/", false, 405, bodyNotAllowed("GET"), "POST, OPTIONS", ""},
		{"POST on me", "POST", "/api/auth/me/", false, 405, bodyNotAllowed("POST"), "GET, HEAD, OPTIONS", ""},
		{"unknown method", "BREW", "/api/patients/", false, 405, bodyNotAllowed("BREW"), "GET, HEAD, POST, OPTIONS", ""},

		{"GET patients without slash", "GET", "/api/patients", false, redirect, bodyUseSlash, "", "/api/patients/"},
		{"POST patients without slash", "POST", "/api/patients", false, redirect, bodyUseSlash, "", "/api/patients/"},
		{"PATCH patients without slash", "PATCH", "/api/patients", false, redirect, bodyUseSlash, "", "/api/patients/"},
		{"DELETE patient without slash", "DELETE", "/api/patients/5", false, redirect, bodyUseSlash, "", "/api/patients/5/"},
		{"PUT doctor without slash keeps the query", "PUT", "/api/doctors/7?x=1", true, redirect, bodyUseSlash, "", "/api/doctors/7/?x=1"},
		{"list without slash keeps the query", "GET", "/api/patients?page=2&search=a%20b", true, redirect, bodyUseSlash, "", "/api/patients/?page=2&search=a%20b"},
		{"mappings of a patient without slash", "GET", "/api/mappings/3", false, redirect, bodyUseSlash, "", "/api/mappings/3/"},
		{"DELETE mapping without slash", "DELETE", "/api/mappings/3", false, redirect, bodyUseSlash, "", "/api/mappings/3/"},
		{"POST login without slash", "POST", "/api/auth/login", false, redirect, bodyUseSlash, "", "/api/auth/login/"},
		{"POST refresh without slash", "POST", "/api/auth/token/refresh", false, redirect, bodyUseSlash, "", "/api/auth/token/refresh/"},
		{"GET me without slash", "GET", "/api/auth/me", false, redirect, bodyUseSlash, "", "/api/auth/me/"},
		{"doubled slash", "POST", "/api//patients/", false, 404, bodyNotFound, "", ""},
		{"dot segments", "DELETE", "/api/patients/../doctors/5/", false, 404, bodyNotFound, "", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rq := req{method: tc.method, path: tc.path}
			if tc.auth {
				rq.token = a.access
			}
			res := do(t, s, rq)
			wantJSON(t, res, tc.wantStatus, tc.wantBody)
			if ct := res.header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q, want application/json", ct)
			}
			if got := res.header.Get("Allow"); got != tc.wantAllow {
				t.Errorf("Allow %q, want %q", got, tc.wantAllow)
			}
			if got := res.header.Get("Location"); got != tc.wantLocation {
				t.Errorf("Location %q, want %q", got, tc.wantLocation)
			}
		})
	}
}

// TestOptions: OPTIONS on a known path needs no token and answers 204 with
// Allow; a preflight from a listed origin answers 204 with the CORS headers.
func TestOptions(t *testing.T) {
	s := newTestServer(t, nil)
	tests := []struct {
		name, path, wantAllow string
	}{
		{"patients", "/api/patients/", "GET, HEAD, POST, OPTIONS"},
		{"a patient", "/api/patients/5/", "DELETE, GET, HEAD, PATCH, PUT, OPTIONS"},
		{"a mapping", "/api/mappings/5/", "DELETE, GET, HEAD, OPTIONS"},
		{"login", "/api/auth/login/", "POST, OPTIONS"},
		{"me", "/api/auth/me/", "GET, HEAD, OPTIONS"},
		{"healthz", "/healthz", "GET, HEAD, OPTIONS"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := do(t, s, req{method: "OPTIONS", path: tc.path})
			wantNoContent(t, res)
			wantHeader(t, res, "Allow", tc.wantAllow)
			wantNoCORS(t, res)
		})
	}
	t.Run("unknown path", func(t *testing.T) {
		res := do(t, s, req{method: "OPTIONS", path: "/api/nurses/"})
		wantJSON(t, res, http.StatusNotFound, bodyNotFound)
	})
	t.Run("only OPTIONS is a preflight", func(t *testing.T) {
		for _, method := range []string{"GET", "POST", "DELETE"} {
			res := do(t, s, req{method: method, path: "/api/auth/me/", header: map[string]string{
				"Origin": "http://localhost:3000", "Access-Control-Request-Method": method,
			}})
			if method == "GET" {
				wantJSON(t, res, http.StatusUnauthorized, bodyUnauthenticated)
			} else {
				wantJSON(t, res, http.StatusMethodNotAllowed, bodyNotAllowed(method))
			}
			wantHeader(t, res, "Access-Control-Allow-Origin", "http://localhost:3000")
			if m := res.header.Get("Access-Control-Allow-Methods"); m != "" {
				t.Fatalf("%s answered as a preflight: Access-Control-Allow-Methods %q", method, m)
			}
		}
	})
	t.Run("invalid token is ignored", func(t *testing.T) {
		res := do(t, s, req{method: "OPTIONS", path: "/api/patients/", token: "not.a.token"})
		wantNoContent(t, res)
		wantHeader(t, res, "Allow", "GET, HEAD, POST, OPTIONS")
	})
	for _, path := range []string{"/api/patients/", "/api/patients/5/", "/api/auth/login/", "/api/auth/me/"} {
		t.Run("preflight "+path, func(t *testing.T) {
			res := do(t, s, req{method: "OPTIONS", path: path, header: map[string]string{
				"Origin":                         "http://localhost:3000",
				"Access-Control-Request-Method":  "POST",
				"Access-Control-Request-Headers": "authorization, content-type",
			}})
			wantNoContent(t, res)
			wantHeader(t, res, "Access-Control-Allow-Origin", "http://localhost:3000")
			wantHeader(t, res, "Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, OPTIONS")
			wantHeader(t, res, "Access-Control-Allow-Headers", "Authorization, Content-Type, If-Match, If-None-Match")
			if age, err := strconv.Atoi(res.header.Get("Access-Control-Max-Age")); err != nil || age <= 0 {
				t.Fatalf("Access-Control-Max-Age %q, want a positive number of seconds", res.header.Get("Access-Control-Max-Age"))
			}
			if c := res.header.Get("Access-Control-Allow-Credentials"); c != "" {
				t.Fatalf("Access-Control-Allow-Credentials %q: no credentials header is sent", c)
			}
			wantVaryOrigin(t, res)
			wantSecurityHeaders(t, res)
		})
	}
}

// TestOptionsNotLimited: preflights and plain OPTIONS count against no limit.
func TestOptionsNotLimited(t *testing.T) {
	s := newTestServer(t, map[string]string{"RATE_ANON": "1/hour"})
	freezeLimiters(s, tenPast)
	const peer = "198.51.100.7:4000"
	preflight := map[string]string{"Origin": "http://127.0.0.1:8080", "Access-Control-Request-Method": "GET"}
	for i := range 3 {
		res := do(t, s, req{method: "OPTIONS", path: "/api/auth/me/", header: preflight, remoteAddr: peer})
		wantNoContent(t, res)
		wantHeader(t, res, "Access-Control-Allow-Origin", "http://127.0.0.1:8080")
		res = do(t, s, req{method: "OPTIONS", path: "/api/auth/me/", remoteAddr: peer})
		wantNoContent(t, res)
		if t.Failed() {
			t.Fatalf("OPTIONS round %d", i)
		}
	}
	// The anonymous budget of one is still whole, and then spent.
	wantJSON(t, do(t, s, req{method: "GET", path: "/api/auth/me/", remoteAddr: peer}), http.StatusUnauthorized, bodyUnauthenticated)
	wantThrottled(t, do(t, s, req{method: "GET", path: "/api/auth/me/", remoteAddr: peer}), tenPastWait)
	// Even over the limit, preflights still pass.
	res := do(t, s, req{method: "OPTIONS", path: "/api/auth/me/", header: preflight, remoteAddr: peer})
	wantNoContent(t, res)
}

// TestCORSThrottled: a page from an allowed origin that is throttled can
// read how long to wait and the request id (contract v5, Headers).
func TestCORSThrottled(t *testing.T) {
	s := newTestServer(t, map[string]string{"RATE_ANON": "1/hour"})
	freezeLimiters(s, tenPast)
	rq := req{method: "GET", path: "/api/patients/", header: map[string]string{"Origin": "http://localhost:3000"}, remoteAddr: "198.51.100.91:1"}
	wantJSON(t, do(t, s, rq), http.StatusUnauthorized, bodyUnauthenticated)
	res := do(t, s, rq)
	wantThrottled(t, res, tenPastWait)
	wantHeader(t, res, "Access-Control-Allow-Origin", "http://localhost:3000")
	wantHeader(t, res, "Access-Control-Expose-Headers", "ETag, Retry-After, X-Request-Id")
	if res.header.Get("Retry-After") == "" || res.header.Get("X-Request-Id") == "" {
		t.Fatalf("a 429 without Retry-After or X-Request-Id: %v", res.header)
	}
}

// TestCORS: a listed origin is echoed with Vary: Origin on every response,
// errors included; any other origin gets no CORS header, never a reflection.
func TestCORS(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	requests := []struct {
		name       string
		rq         req
		wantStatus int
		wantBody   string // "" for no body
	}{
		{"200", req{method: "GET", path: "/api/auth/me/", token: a.access}, 200, ""},
		{"healthz", req{method: "GET", path: "/healthz"}, 200, `{"status": "ok"}`},
		{"401", req{method: "GET", path: "/api/patients/"}, 401, bodyUnauthenticated},
		{"404", req{method: "GET", path: "/api/nurses/"}, 404, bodyNotFound},
		{"405", req{method: "PATCH", path: "/api/patients/"}, 405, bodyNotAllowed("PATCH")},
		{"400 bad host", req{method: "GET", path: "/api/patients/", header: map[string]string{"Host": "evil.com"}}, 400, bodyBadHost},
		{"plain OPTIONS", req{method: "OPTIONS", path: "/api/patients/"}, 204, ""},
		{"preflight", req{method: "OPTIONS", path: "/api/patients/", header: map[string]string{"Access-Control-Request-Method": "DELETE"}}, 204, ""},
	}
	check := func(t *testing.T, res response, status int, body string) {
		t.Helper()
		switch {
		case status == 200 && body == "":
			wantObject(t, res, 200)
		case body == "":
			wantNoContent(t, res)
		default:
			wantJSON(t, res, status, body)
		}
	}
	for _, origin := range []string{"http://localhost:3000", "http://127.0.0.1:3000", "http://localhost:8080", "http://127.0.0.1:8080"} {
		for _, tc := range requests {
			t.Run(origin+" "+tc.name, func(t *testing.T) {
				rq := tc.rq
				rq.header = map[string]string{"Origin": origin}
				for k, v := range tc.rq.header {
					rq.header[k] = v
				}
				res := do(t, s, rq)
				check(t, res, tc.wantStatus, tc.wantBody)
				wantHeader(t, res, "Access-Control-Allow-Origin", origin)
				wantHeader(t, res, "Access-Control-Expose-Headers", "ETag, Retry-After, X-Request-Id")
				wantVaryOrigin(t, res)
				if c := res.header.Get("Access-Control-Allow-Credentials"); c != "" {
					t.Fatalf("Access-Control-Allow-Credentials %q: no credentials header is sent", c)
				}
			})
		}
	}
	foreign := []string{
		"https://evil.example",
		"null",
		"http://localhost:3000.evil.example",
		"http://localhost:3001",
		"https://localhost:3000",
		"http://localhost:3000/",
		"http://evil.localhost:3000",
		"*",
	}
	for _, origin := range foreign {
		for _, tc := range requests {
			t.Run(origin+" "+tc.name, func(t *testing.T) {
				rq := tc.rq
				rq.header = map[string]string{"Origin": origin}
				for k, v := range tc.rq.header {
					rq.header[k] = v
				}
				res := do(t, s, rq)
				if tc.name == "preflight" {
					// Not a preflight the server honours: an ordinary OPTIONS.
					wantNoContent(t, res)
					wantHeader(t, res, "Allow", "GET, HEAD, POST, OPTIONS")
				} else {
					check(t, res, tc.wantStatus, tc.wantBody)
				}
				wantNoCORS(t, res)
			})
		}
	}
	t.Run("CORS_ALLOWED_ORIGINS replaces the default", func(t *testing.T) {
		s := newTestServer(t, map[string]string{"CORS_ALLOWED_ORIGINS": "https://app.example.com, https://admin.example.com"})
		res := do(t, s, req{method: "GET", path: "/healthz", header: map[string]string{"Origin": "https://admin.example.com"}})
		wantJSON(t, res, 200, `{"status": "ok"}`)
		wantHeader(t, res, "Access-Control-Allow-Origin", "https://admin.example.com")
		res = do(t, s, req{method: "GET", path: "/healthz", header: map[string]string{"Origin": "http://localhost:3000"}})
		wantJSON(t, res, 200, `{"status": "ok"}`)
		wantNoCORS(t, res)
	})
}

// TestSecurityHeaders: every response, success, error or panic, carries the
// hardening headers and sets no cookie.
func TestSecurityHeaders(t *testing.T) {
	s := newTestServer(t, map[string]string{"RATE_ANON": "1/hour"})
	freezeLimiters(s, tenPast)
	addBoomRoute(s)
	// Registering spends the default address's anonymous budget of one; the
	// cases below that the anonymous limit counts use addresses of their own.
	a := register(t, s)
	big := `{"username": "` + strings.Repeat("x", maxBody) + `"}`
	tests := []struct {
		name       string
		rq         req
		prior      int // identical requests sent first, to spend a budget
		wantStatus int
		wantBody   string // "" for no body, "*" for any JSON object
	}{
		{"200", req{method: "GET", path: "/api/auth/me/", token: a.access}, 0, 200, "*"},
		{"200 healthz", req{method: "GET", path: "/healthz"}, 0, 200, `{"status": "ok"}`},
		{"201", req{method: "POST", path: "/api/patients/", token: a.access, body: map[string]string{"first_name": "Ada", "email": "ada@example.com"}}, 0, 201, "*"},
		{"204 OPTIONS", req{method: "OPTIONS", path: "/api/patients/"}, 0, 204, ""},
		{"204 preflight", req{method: "OPTIONS", path: "/api/patients/", header: map[string]string{"Origin": "http://localhost:3000", "Access-Control-Request-Method": "GET"}}, 0, 204, ""},
		{"400 host", req{method: "GET", path: "/api/patients/", header: map[string]string{"Host": "evil.com"}}, 0, 400, bodyBadHost},
		{"400 fields", req{method: "POST", path: "/api/auth/login/", body: map[string]string{}, remoteAddr: "192.0.2.32:1"}, 0, 400, bodyLoginFields},
		{"401", req{method: "GET", path: "/api/auth/me/", remoteAddr: "192.0.2.33:1"}, 0, 401, bodyUnauthenticated},
		{"404", req{method: "GET", path: "/api/nurses/"}, 0, 404, bodyNotFound},
		{"405", req{method: "PATCH", path: "/api/patients/"}, 0, 405, bodyNotAllowed("PATCH")},
		{"413", req{method: "POST", path: "/api/auth/login/", body: big}, 0, 413, bodyTooLarge},
		{"415", req{method: "POST", path: "/api/auth/login/", body: `{}`, header: map[string]string{"Content-Type": "text/plain"}, remoteAddr: "192.0.2.34:1"}, 0,
			415, `{"detail": "Unsupported media type \"text/plain\" in request."}`},
		{"429", req{method: "GET", path: "/api/auth/me/", remoteAddr: "192.0.2.35:1"}, 1, 429, ""},
		{"500 panic", req{method: "GET", path: "/api/boom/"}, 0, 500, bodyServerFailed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for range tc.prior {
				do(t, s, tc.rq)
			}
			res := do(t, s, tc.rq)
			switch {
			case tc.wantStatus == 429:
				wantThrottled(t, res, tenPastWait)
			case tc.wantBody == "":
				wantNoContent(t, res)
			case tc.wantBody == "*":
				wantObject(t, res, tc.wantStatus)
			default:
				wantJSON(t, res, tc.wantStatus, tc.wantBody)
			}
			wantSecurityHeaders(t, res)
		})
	}
}

// TestStrictTransportSecurity: HSTS only over HTTPS, which a peer can only
// claim through X-Forwarded-Proto when it is a trusted proxy.
func TestStrictTransportSecurity(t *testing.T) {
	const hsts = "max-age=31536000; includeSubDomains; preload"
	s := newTestServer(t, map[string]string{"TRUSTED_PROXIES": "10.0.0.0/8"})
	tests := []struct {
		name     string
		url      string // scheme https makes httptest set r.TLS
		path     string
		peer     string
		proto    string // X-Forwarded-Proto
		wantHSTS bool
	}{
		{"plain HTTP", "http://localhost", "/healthz", "192.0.2.1:1", "", false},
		{"TLS", "https://localhost", "/healthz", "192.0.2.1:1", "", true},
		{"TLS on a 404", "https://localhost", "/api/nurses/", "192.0.2.1:1", "", true},
		{"forwarded https from an untrusted peer", "http://localhost", "/healthz", "192.0.2.1:1", "https", false},
		{"forwarded https from a trusted proxy", "http://localhost", "/healthz", "10.0.0.1:1", "https", true},
		{"forwarded HTTPS in capitals from a trusted proxy", "http://localhost", "/healthz", "10.0.0.1:1", "HTTPS", true},
		{"forwarded http from a trusted proxy", "http://localhost", "/healthz", "10.0.0.1:1", "http", false},
		{"trusted proxy without the header", "http://localhost", "/healthz", "10.0.0.1:1", "", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", tc.url+tc.path, nil)
			r.RemoteAddr = tc.peer
			if tc.proto != "" {
				r.Header.Set("X-Forwarded-Proto", tc.proto)
			}
			res := doRequest(t, s, r)
			if tc.path == "/healthz" {
				wantJSON(t, res, http.StatusOK, `{"status": "ok"}`)
			} else {
				wantJSON(t, res, http.StatusNotFound, bodyNotFound)
			}
			got := res.header.Get("Strict-Transport-Security")
			if tc.wantHSTS && got != hsts {
				t.Fatalf("Strict-Transport-Security %q, want %q", got, hsts)
			}
			if !tc.wantHSTS && got != "" {
				t.Fatalf("Strict-Transport-Security %q, want none", got)
			}
		})
	}
}

// TestHostAllowList: a Host outside ALLOWED_HOSTS is a 400, except on the
// probes, which load balancers call by IP.
func TestHostAllowList(t *testing.T) {
	tests := []struct {
		name         string
		allowedHosts string // "" for the default
		host, path   string
		wantStatus   int
	}{
		{"localhost", "", "localhost", "/api/nurses/", 404},
		{"localhost with port", "", "localhost:8000", "/api/nurses/", 404},
		{"localhost in capitals", "", "LOCALHOST:8000", "/api/nurses/", 404},
		{"localhost with a final dot", "", "localhost.", "/api/nurses/", 404},
		{"127.0.0.1", "", "127.0.0.1", "/api/nurses/", 404},
		{"127.0.0.1 with port", "", "127.0.0.1:8000", "/api/nurses/", 404},
		{"[::1]", "", "[::1]", "/api/nurses/", 404},
		{"[::1] with port", "", "[::1]:8000", "/api/nurses/", 404},
		{"evil.com", "", "evil.com", "/api/nurses/", 400},
		{"evil.com with port", "", "evil.com:8000", "/api/nurses/", 400},
		{"evil.com on a known route", "", "evil.com", "/api/patients/", 400},
		{"evil.com before a redirect", "", "evil.com", "/api/patients", 400},
		{"subdomain of localhost", "", "localhost.evil.com", "/api/nurses/", 400},
		{"bare IPv6 without brackets", "", "::1", "/api/nurses/", 400},
		{"another address", "", "10.0.0.7", "/api/nurses/", 400},
		{"empty host", "", "", "/api/nurses/", 400},
		{"evil.com on healthz", "", "evil.com", "/healthz", 200},
		{"evil.com on readyz", "", "evil.com", "/readyz", 200},
		{"an IP on healthz", "", "10.0.0.7:8000", "/healthz", 200},

		{"dot domain: bare domain", ".example.com", "example.com", "/api/nurses/", 404},
		{"dot domain: subdomain", ".example.com", "api.example.com", "/api/nurses/", 404},
		{"dot domain: deeper subdomain with port", ".example.com", "a.b.example.com:443", "/api/nurses/", 404},
		{"dot domain: suffix without a dot", ".example.com", "notexample.com", "/api/nurses/", 400},
		{"dot domain: domain as a prefix", ".example.com", "example.com.evil.org", "/api/nurses/", 400},
		{"dot domain replaces the default", ".example.com", "localhost", "/api/nurses/", 400},
		{"exact name only", "api.example.com", "www.api.example.com", "/api/nurses/", 400},
		{"exact name", "api.example.com", "api.example.com", "/api/nurses/", 404},
		{"list", "api.example.com, localhost", "localhost:8000", "/api/nurses/", 404},
		{"star allows all", "*", "evil.com", "/api/nurses/", 404},
		{"star allows an address", "*", "203.0.113.9:80", "/api/nurses/", 404},
	}
	servers := map[string]*server{}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := servers[tc.allowedHosts]
			if s == nil {
				var vars map[string]string
				if tc.allowedHosts != "" {
					vars = map[string]string{"ALLOWED_HOSTS": tc.allowedHosts}
				}
				s = newTestServer(t, vars)
				servers[tc.allowedHosts] = s
			}
			r := httptest.NewRequest("GET", "http://localhost"+tc.path, nil)
			r.Host = tc.host
			res := doRequest(t, s, r)
			switch tc.wantStatus {
			case 200:
				wantJSON(t, res, 200, `{"status": "ok"}`)
			case 400:
				wantJSON(t, res, 400, bodyBadHost)
			default:
				wantJSON(t, res, 404, bodyNotFound)
			}
		})
	}
}

// bodyRequest builds a POST with body; chunked makes its length unknown
// (ContentLength -1), as a chunked upload arrives.
func bodyRequest(path, token, body, contentType string, chunked bool) *http.Request {
	r := httptest.NewRequest("POST", "http://localhost"+path, strings.NewReader(body))
	if contentType != "" {
		r.Header.Set("Content-Type", contentType)
	}
	if token != "" {
		r.Header.Set("Authorization", "Bearer "+token)
	}
	if chunked {
		r.ContentLength = -1
		r.TransferEncoding = []string{"chunked"}
	}
	return r
}

// loginBody is a login body of exactly size bytes.
func loginBody(size int) string {
	const head, tail = `{"username": "nobody-here", "password": "`, `"}`
	return head + strings.Repeat("p", size-len(head)-len(tail)) + tail
}

// TestBodySize: bodies over 64 KiB are a 413, whether their length is
// declared or not, and the cap comes after routing and before the token.
func TestBodySize(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	tests := []struct {
		name       string
		path       string
		token      string
		body       string
		chunked    bool
		wantStatus int
		wantBody   string
	}{
		{"exactly 64 KiB", "/api/auth/login/", "", loginBody(maxBody), false, 401, badCredentialsBody},
		{"exactly 64 KiB chunked", "/api/auth/login/", "", loginBody(maxBody), true, 401, badCredentialsBody},
		{"one byte over", "/api/auth/login/", "", loginBody(maxBody + 1), false, 413, bodyTooLarge},
		{"one byte over chunked", "/api/auth/login/", "", loginBody(maxBody + 1), true, 413, bodyTooLarge},
		{"a megabyte chunked", "/api/auth/login/", "", loginBody(1 << 20), true, 413, bodyTooLarge},
		{"small chunked", "/api/auth/login/", "", `{}`, true, 400, bodyLoginFields},
		{"over, before the token is asked for", "/api/patients/", "", loginBody(maxBody + 1), false, 413, bodyTooLarge},
		{"over, chunked, before the token is asked for", "/api/patients/", "", loginBody(maxBody + 1), true, 413, bodyTooLarge},
		{"over, with a token", "/api/patients/", a.access, loginBody(maxBody + 1), true, 413, bodyTooLarge},
		{"over, to an unknown path", "/api/nurses/", "", loginBody(maxBody + 1), false, 404, bodyNotFound},
		{"over, to a wrong method", "/api/auth/me/", "", loginBody(maxBody + 1), true, 405, bodyNotAllowed("POST")},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := doRequest(t, s, bodyRequest(tc.path, tc.token, tc.body, "application/json", tc.chunked))
			wantJSON(t, res, tc.wantStatus, tc.wantBody)
		})
	}
}

// nestedBody is {"username": …} holding depth nested arrays.
func nestedBody(depth int) string {
	return `{"username": ` + strings.Repeat("[", depth) + strings.Repeat("]", depth) + `, "password": "x"}`
}

// TestBodyDecoding: bodies are JSON objects in UTF-8 with a JSON content
// type; keys match exactly and the last of two equal keys wins.
func TestBodyDecoding(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	login := func(user, password string) string {
		b, _ := json.Marshal(map[string]string{"username": user, "password": password})
		return string(b)
	}
	const ok = "*" // wantBody for a success checked by status and shape
	const parseErr = "parse"
	tests := []struct {
		name        string
		path        string
		token       bool
		body        string // "" for none
		contentType string
		wantStatus  int
		wantBody    string
	}{
		{"login", "/api/auth/login/", false, login(a.username, a.password), "application/json", 200, ok},
		{"charset parameter", "/api/auth/login/", false, login(a.username, a.password), "application/json; charset=utf-8", 200, ok},
		{"media type in capitals", "/api/auth/login/", false, login(a.username, a.password), "Application/JSON", 200, ok},
		{"unknown keys are ignored", "/api/auth/login/", false, `{"username": "` + a.username + `", "password": "` + a.password + `", "remember_me": true}`, "application/json", 200, ok},

		{"text/plain", "/api/auth/login/", false, login(a.username, a.password), "text/plain", 415, `{"detail": "Unsupported media type \"text/plain\" in request."}`},
		{"form", "/api/auth/login/", false, "username=a&password=b", "application/x-www-form-urlencoded", 415, `{"detail": "Unsupported media type \"application/x-www-form-urlencoded\" in request."}`},
		{"no content type", "/api/auth/login/", false, login(a.username, a.password), "", 415, `{"detail": "Unsupported media type \"\" in request."}`},
		{"text/plain with a token", "/api/patients/", true, `{"first_name": "Ada", "email": "ada@example.com"}`, "text/plain", 415, `{"detail": "Unsupported media type \"text/plain\" in request."}`},
		{"text/plain without a token is 401 first", "/api/patients/", false, `{"first_name": "Ada", "email": "ada@example.com"}`, "text/plain", 401, bodyUnauthenticated},

		{"empty body without content type", "/api/auth/login/", false, "", "", 400, bodyLoginFields},
		{"empty body with text/plain", "/api/auth/login/", false, "", "text/plain", 400, bodyLoginFields},
		{"blank body", "/api/auth/login/", false, " \n", "", 400, bodyLoginFields},
		{"empty patient", "/api/patients/", true, "", "", 400, `{"first_name": ["This field is required."], "email": ["This field is required."]}`},
		{"empty logout", "/api/auth/logout/", false, "", "", 400, `{"refresh": ["This field is required."]}`},

		{"invalid UTF-8 in a value", "/api/auth/login/", false, "{\"username\": \"\xff\xfe\", \"password\": \"x\"}", "application/json", 400, parseErr},
		{"invalid UTF-8 in a key", "/api/auth/login/", false, "{\"user\xc0name\": \"a\", \"password\": \"x\"}", "application/json", 400, parseErr},
		{"invalid UTF-8 in a patient", "/api/patients/", true, "{\"first_name\": \"Ad\xe9\", \"email\": \"ada@example.com\"}", "application/json", 400, parseErr},
		{"trailing object", "/api/auth/login/", false, `{"username": "a", "password": "b"} {}`, "application/json", 400, parseErr},
		{"trailing garbage", "/api/auth/login/", false, `{"username": "a", "password": "b"}x`, "application/json", 400, parseErr},
		{"trailing bracket", "/api/patients/", true, `{"first_name": "Ada", "email": "ada@example.com"}]`, "application/json", 400, parseErr},
		{"array", "/api/auth/login/", false, `[{"username": "a", "password": "b"}]`, "application/json", 400, parseErr},
		{"empty array", "/api/patients/", true, `[]`, "application/json", 400, parseErr},
		{"string", "/api/auth/login/", false, `"username"`, "application/json", 400, parseErr},
		{"number", "/api/auth/login/", false, `42`, "application/json", 400, parseErr},
		{"null", "/api/auth/login/", false, `null`, "application/json", 400, parseErr},
		{"truncated", "/api/auth/login/", false, `{"username": "a", "password": `, "application/json", 400, parseErr},
		{"single quotes", "/api/auth/login/", false, `{'username': 'a'}`, "application/json", 400, parseErr},
		{"10,000-deep nesting", "/api/auth/login/", false, nestedBody(10_000), "application/json", 400, parseErr},
		{"30,000-deep nesting", "/api/auth/login/", false, nestedBody(30_000), "application/json", 400, parseErr},

		{"duplicate key: the last wins", "/api/auth/login/", false, `{"username": "nobody", "password": "wrong", "username": "` + a.username + `", "password": "` + a.password + `"}`, "application/json", 200, ok},
		{"duplicate key: the last loses", "/api/auth/login/", false, `{"username": "` + a.username + `", "password": "` + a.password + `", "password": "wrong"}`, "application/json", 401, badCredentialsBody},
		{"keys are case-sensitive", "/api/auth/login/", false, `{"Username": "` + a.username + `", "password": "` + a.password + `"}`, "application/json", 400, `{"username": ["This field is required."]}`},
		{"keys are case-sensitive in capitals", "/api/auth/login/", false, `{"USERNAME": "` + a.username + `", "PASSWORD": "` + a.password + `"}`, "application/json", 400, bodyLoginFields},
		{"patient keys are case-sensitive", "/api/patients/", true, `{"First_Name": "Ada", "EMAIL": "ada@example.com"}`, "application/json", 400, `{"first_name": ["This field is required."], "email": ["This field is required."]}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			token := ""
			if tc.token {
				token = a.access
			}
			res := doRequest(t, s, bodyRequest(tc.path, token, tc.body, tc.contentType, false))
			switch tc.wantBody {
			case ok:
				m := wantObject(t, res, tc.wantStatus)
				if _, has := m["access"].(string); !has {
					t.Fatalf("body %s has no access token", res.body)
				}
			case parseErr:
				wantParseError(t, res, "")
			default:
				wantJSON(t, res, tc.wantStatus, tc.wantBody)
			}
		})
	}
	t.Run("duplicate patient key: the last wins", func(t *testing.T) {
		res := do(t, s, req{method: "POST", path: "/api/patients/", token: a.access,
			body: `{"first_name": "Ann", "email": "dup-keys@example.com", "first_name": "Bea"}`})
		if res.status != http.StatusCreated {
			t.Fatalf("status %d, want 201; body %s", res.status, res.body)
		}
		if got := res.object(t)["first_name"]; got != "Bea" {
			t.Fatalf("first_name %v, want Bea; body %s", got, res.body)
		}
	})
}

// TestAnonAndUserLimits: anonymous requests are limited per client address,
// authenticated ones per user, each answering 429 with a matching
// Retry-After.
func TestAnonAndUserLimits(t *testing.T) {
	t.Run("anonymous", func(t *testing.T) {
		s := newTestServer(t, map[string]string{"RATE_ANON": "2/hour"})
		freezeLimiters(s, tenPast)
		const peer = "198.51.100.20:5000"
		wantJSON(t, do(t, s, req{method: "GET", path: "/api/auth/me/", remoteAddr: peer}), 401, bodyUnauthenticated)
		wantJSON(t, do(t, s, req{method: "POST", path: "/api/auth/login/", body: map[string]string{}, remoteAddr: peer}), 400, bodyLoginFields)
		wantThrottled(t, do(t, s, req{method: "GET", path: "/api/auth/me/", remoteAddr: peer}), tenPastWait)
		// An invalid token makes an anonymous caller: the same budget.
		wantThrottled(t, do(t, s, req{method: "GET", path: "/api/patients/", token: "a.b.c", remoteAddr: peer}), tenPastWait)
		wantThrottled(t, do(t, s, req{method: "POST", path: "/api/auth/login/", body: map[string]string{}, remoteAddr: peer}), tenPastWait)
		// Another address has its own budget.
		wantJSON(t, do(t, s, req{method: "GET", path: "/api/auth/me/", remoteAddr: "198.51.100.21:5000"}), 401, bodyUnauthenticated)
		// Probes are never limited.
		for range 5 {
			wantJSON(t, do(t, s, req{method: "GET", path: "/healthz", remoteAddr: peer}), 200, `{"status": "ok"}`)
			wantJSON(t, do(t, s, req{method: "GET", path: "/readyz", remoteAddr: peer}), 200, `{"status": "ok"}`)
		}
	})
	t.Run("wait in the next window", func(t *testing.T) {
		s := newTestServer(t, map[string]string{"RATE_ANON": "2/minute"})
		// 45 s into a minute: the full window ends in 15 s.
		freezeLimiters(s, time.Unix(1_000_000*60+45, 0))
		for range 2 {
			wantJSON(t, do(t, s, req{method: "GET", path: "/api/auth/me/"}), 401, bodyUnauthenticated)
		}
		wantThrottled(t, do(t, s, req{method: "GET", path: "/api/auth/me/"}), 16)
	})
	t.Run("user", func(t *testing.T) {
		s := newTestServer(t, map[string]string{"RATE_USER": "2/hour"})
		a, b := register(t, s), register(t, s)
		// An anonymous budget of one, from after the registrations.
		s.anonLimit = newLimiter(rate{n: 1, period: time.Hour}, 100)
		freezeLimiters(s, tenPast)
		for range 2 {
			res := do(t, s, req{method: "GET", path: "/api/auth/me/", token: a.access})
			wantJSON(t, res, 200, fmt.Sprintf(`{"id": %d, "username": %q, "email": %q, "name": "Test User"}`, a.id, a.username, a.email))
		}
		wantThrottled(t, do(t, s, req{method: "GET", path: "/api/patients/", token: a.access}), tenPastWait)
		// The user's budget is not the address's: another user from the same
		// address, and an anonymous request from it, still pass.
		res := do(t, s, req{method: "GET", path: "/api/auth/me/", token: b.access})
		wantJSON(t, res, 200, fmt.Sprintf(`{"id": %d, "username": %q, "email": %q, "name": "Test User"}`, b.id, b.username, b.email))
		wantJSON(t, do(t, s, req{method: "GET", path: "/api/auth/me/"}), 401, bodyUnauthenticated)
		// A user over the limit from a new address is still over it.
		wantThrottled(t, do(t, s, req{method: "GET", path: "/api/auth/me/", token: a.access, remoteAddr: "203.0.113.200:1"}), tenPastWait)
	})
}

// TestClientIPKeys: the anonymous limit keys on the peer address, reads
// X-Forwarded-For only from a trusted proxy, and then takes the right-most
// address that is not a proxy, so that a client cannot choose its key.
func TestClientIPKeys(t *testing.T) {
	type step struct {
		peer, xff string
		wantLimit bool // true: this request is the 429
	}
	tests := []struct {
		name    string
		proxies string
		steps   []step
	}{
		{"XFF from an untrusted peer is ignored", "", []step{
			{"192.0.2.50:1000", "1.1.1.1", false},
			{"192.0.2.50:1001", "2.2.2.2", false},
			{"192.0.2.50:1002", "3.3.3.3", true},
			{"192.0.2.50:1003", "", true},
		}},
		{"XFF from a peer outside TRUSTED_PROXIES is ignored", "10.0.0.0/8", []step{
			{"192.0.2.51:1", "1.1.1.1", false},
			{"192.0.2.51:1", "10.0.0.9, 2.2.2.2", false},
			{"192.0.2.51:1", "3.3.3.3", true},
		}},
		{"right-most address through a trusted proxy", "10.0.0.0/8", []step{
			{"10.0.0.1:1", "1.2.3.4, 5.6.7.8", false},
			{"10.0.0.2:1", "5.6.7.8", false},
			{"5.6.7.8:1", "", true}, // the same client, directly
			{"1.2.3.4:1", "", false},
		}},
		{"a client cannot pick its key with a fake left part", "10.0.0.0/8", []step{
			{"10.0.0.1:1", "5.6.7.9", false},
			{"10.0.0.1:1", "9.9.9.9, 5.6.7.9", false},
			{"10.0.0.1:1", "8.8.8.8, 7.7.7.7, 5.6.7.9", true},
			{"10.0.0.1:1", "5.6.7.10", false},
		}},
		{"trusted hops are skipped", "10.0.0.0/8", []step{
			{"10.0.0.1:1", "5.6.7.11, 10.1.1.1", false},
			{"10.0.0.1:1", "5.6.7.11, 10.2.2.2, 10.3.3.3", false},
			{"5.6.7.11:1", "", true},
		}},
		{"a trusted proxy without XFF is the client", "10.0.0.0/8", []step{
			{"10.0.0.1:1", "", false},
			{"10.0.0.1:2", "", false},
			{"10.0.0.1:3", "", true},
			{"10.0.0.2:1", "", false},
		}},
		{"a single trusted address", "10.0.0.1", []step{
			{"10.0.0.1:1", "5.6.7.12", false},
			{"10.0.0.2:1", "5.6.7.12", false}, // not trusted: keys on 10.0.0.2
			{"10.0.0.2:2", "", false},
			{"10.0.0.2:3", "5.6.7.13", true},
			{"5.6.7.12:1", "", false},
			{"5.6.7.12:1", "", true},
		}},
		{"IPv6 clients in one /64 share a budget", "", []step{
			{"[2001:db8:1:2::1]:1", "", false},
			{"[2001:db8:1:2:ffff:ffff:ffff:ffff]:1", "", false},
			{"[2001:db8:1:2:abcd::9]:1", "", true},
			{"[2001:db8:1:3::1]:1", "", false},
		}},
		{"IPv6 through a trusted proxy is keyed by its /64", "10.0.0.0/8", []step{
			{"10.0.0.1:1", "2001:db8:5:6::1", false},
			{"10.0.0.1:1", "2001:db8:5:6::2", false},
			{"[2001:db8:5:6::3]:1", "", true},
		}},
		{"IPv4-mapped IPv6 counts as IPv4", "", []step{
			{"192.0.2.9:1", "", false},
			{"[::ffff:192.0.2.9]:2", "", false},
			{"192.0.2.9:3", "", true},
			{"[::ffff:192.0.2.10]:1", "", false},
		}},
		{"IPv4-mapped in XFF counts as IPv4", "10.0.0.0/8", []step{
			{"10.0.0.1:1", "::ffff:5.6.7.13", false},
			{"10.0.0.1:1", "5.6.7.13", false},
			{"5.6.7.13:1", "", true},
		}},
		{"a hop with a port is its address", "10.0.0.0/8", []step{
			{"10.0.0.1:1", "5.6.7.15:41234", false},
			{"10.0.0.1:1", "9.9.9.9, 5.6.7.15:1001, 10.0.0.7:80", false},
			{"5.6.7.15:1", "", true},
		}},
		{"an IPv6 hop with a port is its /64", "10.0.0.0/8", []step{
			{"10.0.0.1:1", "[2001:db8:7:7::1]:443", false},
			{"10.0.0.1:1", "[2001:db8:7:7::2]:8443", false},
			{"[2001:db8:7:7::3]:1", "", true},
		}},
		{"a bracketed or quoted hop without a port is its address", "10.0.0.0/8", []step{
			{"10.0.0.1:1", "[2001:db8:8:8::1]", false},
			{"10.0.0.1:1", `"2001:db8:8:8::2"`, false},
			{"[2001:db8:8:8::3]:1", "", true},
		}},
		{"a hop that is no address is the proxy's own request", "10.0.0.0/8", []step{
			{"10.0.0.1:1", "unknown", false},
			{"10.0.0.1:2", "5.6.7.16, _hidden", false},
			{"10.0.0.1:3", "", true},
			{"10.0.0.2:1", "5.6.7.16:x", false},
		}},
		{"IPv4-mapped trusted proxy", "10.0.0.0/8", []step{
			{"[::ffff:10.0.0.1]:1", "5.6.7.14", false},
			{"[::ffff:10.0.0.1]:1", "5.6.7.14", false},
			{"5.6.7.14:1", "", true},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newTestServer(t, map[string]string{"RATE_ANON": "2/hour", "TRUSTED_PROXIES": tc.proxies})
			freezeLimiters(s, tenPast)
			for i, st := range tc.steps {
				rq := req{method: "GET", path: "/api/auth/me/", remoteAddr: st.peer}
				if st.xff != "" {
					rq.header = map[string]string{"X-Forwarded-For": st.xff}
				}
				res := do(t, s, rq)
				if st.wantLimit {
					wantThrottled(t, res, tenPastWait)
				} else {
					wantJSON(t, res, http.StatusUnauthorized, bodyUnauthenticated)
				}
				if t.Failed() {
					t.Fatalf("step %d: %+v", i, st)
				}
			}
		})
	}
	t.Run("probes are never limited", func(t *testing.T) {
		s := newTestServer(t, map[string]string{"RATE_ANON": "1/hour"})
		for range 5 {
			wantJSON(t, do(t, s, req{method: "GET", path: "/healthz"}), 200, `{"status": "ok"}`)
			wantJSON(t, do(t, s, req{method: "GET", path: "/readyz"}), 200, `{"status": "ok"}`)
		}
		wantJSON(t, do(t, s, req{method: "GET", path: "/api/auth/me/"}), 401, bodyUnauthenticated)
	})
}

// TestClientIPBadHopWarns: a hop that is no address is logged, naming it,
// at most once a minute.
func TestClientIPBadHopWarns(t *testing.T) {
	needDB(t)
	var log bytes.Buffer
	s := newTestServerOn(t, testDB, slog.New(slog.NewTextHandler(&log, nil)), map[string]string{"TRUSTED_PROXIES": "10.0.0.0/8"})
	send := func(xff string) {
		rq := req{method: "GET", path: "/api/auth/me/", remoteAddr: "10.0.0.1:1", header: map[string]string{"X-Forwarded-For": xff}}
		wantJSON(t, do(t, s, rq), http.StatusUnauthorized, bodyUnauthenticated)
	}
	warnings := func() (lines []string) {
		for _, l := range strings.Split(log.String(), "\n") {
			if strings.Contains(l, "level=WARN") {
				lines = append(lines, l)
			}
		}
		return lines
	}
	send("unknown")
	send("_obfuscated")
	send("203.0.113.9:443")
	want := `level=WARN msg="X-Forwarded-For hop is no address: the request counts as the proxy's own" hop=unknown`
	if w := warnings(); len(w) != 1 || !strings.Contains(w[0], want) {
		t.Fatalf("warnings %q, want one with %s", w, want)
	}
	s.hopWarned.Add(-60) // a minute later
	send("_obfuscated")
	if w := warnings(); len(w) != 2 || !strings.HasSuffix(w[1], "hop=_obfuscated") {
		t.Fatalf("warnings a minute later %q, want a second naming _obfuscated", w)
	}
}

// mwClock is a fake clock for a limiter, starting at the start of a fixed
// window of period.
type mwClock struct {
	start time.Time
	at    time.Duration
}

func (c *mwClock) now() time.Time { return c.start.Add(c.at) }

func newMWClock(period time.Duration) *mwClock {
	return &mwClock{start: time.Unix(0, 0).Add(1000 * period)}
}

// TestLimiterSlidingWindow checks the estimate and the wait against a fake
// clock: 10 a minute, windows starting at whole minutes.
func TestLimiterSlidingWindow(t *testing.T) {
	const period = time.Minute
	key := rateKey{user: 1}
	// burst expects n allowed requests and then a refusal with wait.
	burst := func(t *testing.T, l *limiter, n int, wantWait time.Duration) {
		t.Helper()
		for i := range n {
			if wait, ok := l.allow(key); !ok {
				t.Fatalf("request %d of %d refused (wait %v)", i+1, n, wait)
			}
		}
		wait, ok := l.allow(key)
		if ok {
			t.Fatalf("request %d allowed, want refused", n+1)
		}
		// Never shorter than the exact wait; rounding the float estimate up
		// may add a nanosecond or two.
		if wait < wantWait || wait > wantWait+2 {
			t.Fatalf("wait %v, want %v", wait, wantWait)
		}
	}
	setup := func(t *testing.T) (*limiter, *mwClock) {
		t.Helper()
		c := newMWClock(period)
		l := newLimiter(rate{n: 10, period: period}, 100)
		l.now = c.now
		return l, c
	}
	t.Run("a fresh window allows n and then waits for its end", func(t *testing.T) {
		l, c := setup(t)
		c.at = 20 * time.Second
		burst(t, l, 10, 40*time.Second+1)
		// At the next window's start the previous one still counts whole.
		c.at = period
		burst(t, l, 0, 1)
		// One nanosecond on, one more: then 10×(1-e/60)+1 < 10 wants e > 6 s.
		c.at = period + 1
		burst(t, l, 1, 6*time.Second)
	})
	for _, tc := range []struct {
		into      time.Duration // how far into the next window
		wantAllow int
	}{
		{15 * time.Second, 3},  // 10×0.75 = 7.5 → 3 more
		{30 * time.Second, 5},  // 10×0.5 = 5 → 5 more
		{45 * time.Second, 8},  // 10×0.25 = 2.5 → 8 more
		{59 * time.Second, 10}, // 10×(1/60) → 10 more
	} {
		t.Run(fmt.Sprintf("previous window weighted at %v", tc.into), func(t *testing.T) {
			l, c := setup(t)
			burst(t, l, 10, period+1)
			c.at = period + tc.into
			for i := range tc.wantAllow {
				if _, ok := l.allow(key); !ok {
					t.Fatalf("request %d of %d refused", i+1, tc.wantAllow)
				}
			}
			wait, ok := l.allow(key)
			if ok {
				t.Fatalf("request %d allowed, want refused", tc.wantAllow+1)
			}
			// The wait is exact: a moment earlier is still refused, at the
			// wait it is allowed.
			if wait <= 0 {
				t.Fatalf("wait %v, want > 0", wait)
			}
			before := c.at
			c.at = before + wait - time.Millisecond
			if _, ok := l.allow(key); ok && wait > time.Millisecond {
				t.Fatalf("allowed %v before the wait of %v ended", time.Millisecond, wait)
			}
			c.at = before + wait
			if _, ok := l.allow(key); !ok {
				t.Fatalf("refused when the wait of %v ended", wait)
			}
		})
	}
	t.Run("wait within the window", func(t *testing.T) {
		l, c := setup(t)
		burst(t, l, 10, period+1)
		c.at = period + 15*time.Second
		// 7.5 + 3 = 10.5: allowed again once the previous share is 7, 3 s on.
		burst(t, l, 3, 3*time.Second+1)
		if n := throttled(3*time.Second + 1).retryAfter; n != 4 {
			t.Fatalf("Retry-After %d, want 4", n)
		}
	})
	// Retry-After is N whole seconds: a client that waits N seconds is let
	// in, one that waits N-1 is not. Requests at whole-second instants are
	// where rounding the wait down would show.
	t.Run("Retry-After is exact in whole seconds", func(t *testing.T) {
		// refusedAt builds a limiter whose key made prev requests in the
		// previous window and as many as allowed at `at` in this one, and
		// returns the wait of the refused one.
		refusedAt := func(prev int, at time.Duration) (*limiter, *mwClock, time.Duration) {
			l, c := setup(t)
			for range prev {
				l.allow(key)
			}
			c.at = period + at
			for {
				if wait, ok := l.allow(key); !ok {
					return l, c, wait
				}
			}
		}
		for prev := 1; prev <= 10; prev++ {
			for sec := range 60 {
				at := time.Duration(sec) * time.Second
				_, _, wait := refusedAt(prev, at)
				n := throttled(wait).retryAfter
				l, c, _ := refusedAt(prev, at)
				c.at += time.Duration(n) * time.Second
				if _, ok := l.allow(key); !ok {
					t.Fatalf("prev %d, at %v: refused after Retry-After %d (wait %v)", prev, at, n, wait)
				}
				l, c, _ = refusedAt(prev, at)
				c.at += time.Duration(n-1) * time.Second
				if _, ok := l.allow(key); ok {
					t.Fatalf("prev %d, at %v: allowed after %d s, but Retry-After said %d (wait %v)", prev, at, n-1, n, wait)
				}
			}
		}
	})
	t.Run("wait into the next window", func(t *testing.T) {
		l, c := setup(t)
		c.at = 50 * time.Second
		burst(t, l, 10, 10*time.Second+1)
	})
	t.Run("windows older than one period are forgotten", func(t *testing.T) {
		l, c := setup(t)
		burst(t, l, 10, period+1)
		c.at = 2 * period
		burst(t, l, 10, period+1)
	})
	t.Run("keys have their own budgets", func(t *testing.T) {
		l, _ := setup(t)
		burst(t, l, 10, period+1)
		for _, k := range []rateKey{{user: 2}, bySource(netip.MustParseAddr("192.0.2.1")), bySource(netip.MustParseAddr("2001:db8::1"))} {
			if _, ok := l.allow(k); !ok {
				t.Fatalf("key %v refused", k)
			}
		}
	})
	t.Run("undo gives one request back", func(t *testing.T) {
		l, c := setup(t)
		burst(t, l, 10, period+1)
		l.undo(key)
		burst(t, l, 1, period+1)
		// In the next window undo takes from the previous window's count.
		c.at = period
		l.undo(key)
		burst(t, l, 1, 1)
	})
	t.Run("undo on a new key takes nothing below zero", func(t *testing.T) {
		l, _ := setup(t)
		l.undo(key)
		l.undo(key)
		burst(t, l, 10, period+1)
	})
	t.Run("off", func(t *testing.T) {
		l := newLimiter(rate{}, 100)
		if l != nil {
			t.Fatalf("newLimiter(off) = %v, want nil", l)
		}
		for range 1000 {
			if wait, ok := l.allow(key); !ok || wait != 0 {
				t.Fatalf("off limiter refused (wait %v)", wait)
			}
		}
		l.undo(key)
		if n := limiterLen(l); n != 0 {
			t.Fatalf("len %d, want 0", n)
		}
	})
}

// TestThrottledMessage: the 429 body and Retry-After round a wait up to
// whole seconds, never below one.
func TestThrottledMessage(t *testing.T) {
	tests := []struct {
		wait      time.Duration
		wantAfter int
		wantMsg   string
	}{
		{0, 1, "Request was throttled. Expected available in 1 second."},
		{1, 1, "Request was throttled. Expected available in 1 second."},
		{time.Second, 1, "Request was throttled. Expected available in 1 second."},
		{time.Second + 1, 2, "Request was throttled. Expected available in 2 seconds."},
		{59 * time.Minute, 3540, "Request was throttled. Expected available in 3540 seconds."},
	}
	for _, tc := range tests {
		t.Run(tc.wait.String(), func(t *testing.T) {
			e := throttled(tc.wait)
			if e.status != http.StatusTooManyRequests || e.retryAfter != tc.wantAfter || !reflect.DeepEqual(e.body, detail(tc.wantMsg)) {
				t.Fatalf("throttled(%v) = %d %v Retry-After %d, want 429 %q Retry-After %d",
					tc.wait, e.status, e.body, e.retryAfter, tc.wantMsg, tc.wantAfter)
			}
		})
	}
}

// TestLimiterMaxKeys: memory stays bounded whatever the number of clients,
// the key touched least recently going first.
func TestLimiterMaxKeys(t *testing.T) {
	t.Run("100,000 keys into 1,000", func(t *testing.T) {
		l := newLimiter(rate{n: 1, period: time.Hour}, 1_000)
		for i := range 100_000 {
			if _, ok := l.allow(rateKey{user: int64(i + 1)}); !ok {
				t.Fatalf("key %d refused", i+1)
			}
		}
		if n := limiterLen(l); n > 1_000 || n < 500 {
			t.Fatalf("len %d, want 500 to 1000", n)
		}
		// The newest keys are the ones kept.
		for _, k := range []int64{100_000, 99_600} {
			if _, ok := l.allow(rateKey{user: k}); ok {
				t.Fatalf("key %d lost its count", k)
			}
		}
		if _, ok := l.allow(rateKey{user: 1}); !ok {
			t.Fatal("the oldest key kept its count")
		}
	})
	t.Run("a recently used key outlives untouched ones", func(t *testing.T) {
		c := newMWClock(time.Hour)
		l := newLimiter(rate{n: 1, period: time.Hour}, 4) // generations of two keys
		l.now = c.now
		k := func(i int64) rateKey { return rateKey{user: i} }
		for i := int64(1); i <= 3; i++ {
			l.allow(k(i)) // each key spends its budget of one
		}
		l.allow(k(1)) // refused, but touches key 1: it moves to the young generation
		l.allow(k(4)) // a fourth key: the young generation is full, so the old one (key 2) goes
		if n := limiterLen(l); n > 4 {
			t.Fatalf("len %d, want at most 4", n)
		}
		for _, tc := range []struct {
			key      int64
			wantKept bool
		}{{1, true}, {3, true}, {4, true}, {2, false}} {
			// A kept key has spent its budget; an evicted one starts afresh.
			_, ok := l.allow(k(tc.key))
			if ok == tc.wantKept {
				t.Fatalf("key %d: allowed %v, want kept %v", tc.key, ok, tc.wantKept)
			}
		}
	})
	t.Run("at most 100 bytes of heap per client", func(t *testing.T) {
		const keys = 100_000
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		l := newLimiter(rate{n: 10, period: time.Hour}, keys)
		for i := range keys {
			l.allow(bySource(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})))
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		perKey := float64(after.HeapAlloc-before.HeapAlloc) / keys
		t.Logf("%d keys: %.1f bytes of heap each", limiterLen(l), perKey)
		if limiterLen(l) != keys || perKey > 100 {
			t.Fatalf("%d keys at %.1f bytes each, want %d at ≤ 100", limiterLen(l), perKey, keys)
		}
	})
	t.Run("IPv6 addresses of one /64 are one key", func(t *testing.T) {
		l := newLimiter(rate{n: 1000, period: time.Hour}, 10)
		for i := range 1000 {
			ip := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 1, 8: byte(i >> 8), 15: byte(i)})
			l.allow(bySource(ip))
		}
		if n := limiterLen(l); n != 1 {
			t.Fatalf("len %d, want 1", n)
		}
	})
}

// TestLoadConfigErrors: an invalid value stops start-up with a message
// naming the variable.
func TestLoadConfigErrors(t *testing.T) {
	tests := []struct {
		name    string
		vars    map[string]string
		wantErr string // "" for no error
	}{
		{"defaults", nil, ""},
		{"PASSWORD_ITERATIONS below the floor", map[string]string{"PASSWORD_ITERATIONS": "599999"}, "PASSWORD_ITERATIONS"},
		{"PASSWORD_ITERATIONS at the floor", map[string]string{"PASSWORD_ITERATIONS": "600000"}, ""},
		{"PASSWORD_ITERATIONS not a number", map[string]string{"PASSWORD_ITERATIONS": "many"}, "PASSWORD_ITERATIONS"},
		{"RATE_ANON not a rate", map[string]string{"RATE_ANON": "abc"}, "RATE_ANON"},
		{"RATE_ANON unknown period", map[string]string{"RATE_ANON": "5/fortnight"}, "RATE_ANON"},
		{"RATE_ANON zero", map[string]string{"RATE_ANON": "0/hour"}, "RATE_ANON"},
		{"RATE_USER no period", map[string]string{"RATE_USER": "5/"}, "RATE_USER"},
		{"RATE_LOGIN off", map[string]string{"RATE_LOGIN": "off"}, ""},
		{"RATE_REGISTER per day", map[string]string{"RATE_REGISTER": "3/day"}, ""},
		{"RATE_USER per second", map[string]string{"RATE_USER": "1000000000/second"}, ""},
		{"RATE_LOGIN per minute", map[string]string{"RATE_LOGIN": "1/minute"}, ""},
		{"RATE_MAX_KEYS zero", map[string]string{"RATE_MAX_KEYS": "0"}, "RATE_MAX_KEYS"},
		{"DB_PORT not a number", map[string]string{"DB_PORT": "x"}, "DB_PORT"},
		{"DB_PORT out of range", map[string]string{"DB_PORT": "70000"}, "DB_PORT"},
		{"TRUSTED_PROXIES nonsense", map[string]string{"TRUSTED_PROXIES": "nonsense"}, "TRUSTED_PROXIES"},
		{"TRUSTED_PROXIES one bad entry", map[string]string{"TRUSTED_PROXIES": "10.0.0.0/8, 300.1.1.1"}, "TRUSTED_PROXIES"},
		{"TRUSTED_PROXIES addresses and CIDRs", map[string]string{"TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.1, 2001:db8::/32"}, ""},
		{"ACCESS_TOKEN_LIFETIME_MIN zero", map[string]string{"ACCESS_TOKEN_LIFETIME_MIN": "0"}, "ACCESS_TOKEN_LIFETIME_MIN"},
		{"REFRESH_TOKEN_LIFETIME_DAYS not a number", map[string]string{"REFRESH_TOKEN_LIFETIME_DAYS": "one"}, "REFRESH_TOKEN_LIFETIME_DAYS"},
		{"REFRESH_REUSE_GRACE_S negative", map[string]string{"REFRESH_REUSE_GRACE_S": "-1"}, "REFRESH_REUSE_GRACE_S"},
		{"DEBUG not a boolean", map[string]string{"DEBUG": "maybe"}, "DEBUG"},
		{"DEBUG True", map[string]string{"DEBUG": "True"}, ""},
		{"TLS cert without key", map[string]string{"TLS_CERT_FILE": "cert.pem"}, "TLS_KEY_FILE"},
		{"SECRET_KEY of 31 bytes", map[string]string{"SECRET_KEY": strings.Repeat("k", 31)}, "SECRET_KEY"},
		{"SECRET_KEY of 32 bytes", map[string]string{"SECRET_KEY": strings.Repeat("0123456789", 3) + "ab"}, ""},
		{"SECRET_KEY of 9 distinct characters", map[string]string{"SECRET_KEY": strings.Repeat("123456789", 8)}, "SECRET_KEY"},
		{"SECRET_KEY of 5 distinct characters in 12 distinct bytes", map[string]string{"SECRET_KEY": strings.Repeat("日本語漢字", 3)}, "SECRET_KEY"},
		{"SECRET_KEY once shown in .env.example", map[string]string{"SECRET_KEY": "change-me-to-a-long-random-string-of-48-bytes"}, "SECRET_KEY"},
		{"PASSWORD_ITERATIONS above the ceiling", map[string]string{"PASSWORD_ITERATIONS": "10000001"}, "PASSWORD_ITERATIONS"},
		{"PASSWORD_ITERATIONS at the ceiling", map[string]string{"PASSWORD_ITERATIONS": "10000000"}, ""},
		{"REFRESH_REUSE_GRACE_S above 300", map[string]string{"REFRESH_REUSE_GRACE_S": "301"}, "REFRESH_REUSE_GRACE_S"},
		{"ACCESS_TOKEN_LIFETIME_MIN that would overflow", map[string]string{"ACCESS_TOKEN_LIFETIME_MIN": "9999999999999"}, "ACCESS_TOKEN_LIFETIME_MIN"},
		{"REFRESH_TOKEN_LIFETIME_DAYS above a year", map[string]string{"REFRESH_TOKEN_LIFETIME_DAYS": "366"}, "REFRESH_TOKEN_LIFETIME_DAYS"},
		{"LOGIN_MAX_AGE_DAYS zero", map[string]string{"LOGIN_MAX_AGE_DAYS": "0"}, "LOGIN_MAX_AGE_DAYS"},
		{"LOGIN_MAX_AGE_DAYS above ten years", map[string]string{"LOGIN_MAX_AGE_DAYS": "3651"}, "LOGIN_MAX_AGE_DAYS"},
		{"RATE_MAX_KEYS above the ceiling", map[string]string{"RATE_MAX_KEYS": "10000001"}, "RATE_MAX_KEYS"},
		{"DB_SSLMODE unknown", map[string]string{"DB_SSLMODE": "sometimes"}, "DB_SSLMODE"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := loadConfig(testEnv(tc.vars))
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("loadConfig: %v, want no error", err)
			case tc.wantErr != "" && err == nil:
				t.Fatalf("loadConfig accepted %v, want an error naming %s", tc.vars, tc.wantErr)
			case tc.wantErr != "" && !strings.Contains(err.Error(), tc.wantErr):
				t.Fatalf("loadConfig: %v, want an error naming %s", err, tc.wantErr)
			}
		})
	}
	// Only the four periods, spelt out, and off: a near miss is refused with
	// the forms that would do (contract v5, Operations).
	for _, v := range []string{"10/hr", "10/h", "10/Hour", "10/minutes", "10/m", "10/sec", "10/ hour", "+10/hour", "10/hour/2",
		"1000000001/hour", "OFF", "Off", " off/hour", "10"} {
		t.Run("RATE_LOGIN="+v, func(t *testing.T) {
			_, _, err := loadConfig(testEnv(map[string]string{"RATE_LOGIN": v}))
			want := fmt.Sprintf("RATE_LOGIN: want N/second, N/minute, N/hour or N/day (N from 1 to 1,000,000,000) or off, got %q", strings.TrimSpace(v))
			if err == nil || err.Error() != want {
				t.Fatalf("loadConfig: %v, want %s", err, want)
			}
		})
	}
	for _, v := range []string{"foo", "127.0.0.1", "127.0.0.1:99999", "127.0.0.1:-1", ":http-nope"} {
		t.Run("ADDR="+v, func(t *testing.T) {
			_, _, err := loadConfig(testEnv(map[string]string{"ADDR": v}))
			if err == nil || !strings.HasPrefix(err.Error(), fmt.Sprintf("ADDR: want host:port, got %q (", v)) {
				t.Fatalf("loadConfig: %v, want an error naming ADDR", err)
			}
		})
	}
	t.Run("errors name every bad variable", func(t *testing.T) {
		_, _, err := loadConfig(testEnv(map[string]string{"RATE_ANON": "abc", "DB_PORT": "x"}))
		if err == nil || !strings.Contains(err.Error(), "RATE_ANON") || !strings.Contains(err.Error(), "DB_PORT") {
			t.Fatalf("loadConfig: %v, want an error naming RATE_ANON and DB_PORT", err)
		}
	})
	t.Run("the error does not show the secret", func(t *testing.T) {
		short := "short-secret-value"
		_, _, err := loadConfig(testEnv(map[string]string{"SECRET_KEY": short}))
		if err == nil || strings.Contains(err.Error(), short) {
			t.Fatalf("loadConfig: %v, want an error without the key", err)
		}
	})
	t.Run("unset SECRET_KEY makes a random key and warns", func(t *testing.T) {
		cfg1, warnings, err := loadConfig(testEnv(map[string]string{"SECRET_KEY": ""}))
		if err != nil {
			t.Fatalf("loadConfig: %v", err)
		}
		if len(warnings) != 1 || !strings.Contains(warnings[0], "SECRET_KEY") {
			t.Fatalf("warnings %q, want one naming SECRET_KEY", warnings)
		}
		cfg2, _, _ := loadConfig(testEnv(map[string]string{"SECRET_KEY": ""}))
		if len(cfg1.secretKey) != 64 || bytes.Equal(cfg1.secretKey, cfg2.secretKey) || bytes.Equal(cfg1.secretKey, make([]byte, 64)) {
			t.Fatalf("keys %x and %x, want two different random 64-byte keys", cfg1.secretKey, cfg2.secretKey)
		}
	})
	t.Run("a set SECRET_KEY gives no warning", func(t *testing.T) {
		cfg, warnings, err := loadConfig(testEnv(nil))
		if err != nil || len(warnings) != 0 || string(cfg.secretKey) != testSecret {
			t.Fatalf("loadConfig: %v, warnings %q, key %q", err, warnings, cfg.secretKey)
		}
	})
	t.Run("values", func(t *testing.T) {
		cfg, _, err := loadConfig(testEnv(map[string]string{
			"RATE_ANON": "7/minute", "RATE_USER": "off", "TRUSTED_PROXIES": "10.1.2.3/8, 192.0.2.1",
			"ALLOWED_HOSTS": "API.Example.com, .example.org", "PASSWORD_ITERATIONS": "700000",
		}))
		if err != nil {
			t.Fatalf("loadConfig: %v", err)
		}
		if cfg.rateAnon != (rate{n: 7, period: time.Minute}) || cfg.rateUser != (rate{}) {
			t.Errorf("rates %+v %+v", cfg.rateAnon, cfg.rateUser)
		}
		if fmt.Sprint(cfg.trustedProxies) != "[10.0.0.0/8 192.0.2.1/32]" {
			t.Errorf("trusted proxies %v", cfg.trustedProxies)
		}
		if fmt.Sprint(cfg.allowedHosts) != "[api.example.com .example.org]" {
			t.Errorf("allowed hosts %v", cfg.allowedHosts)
		}
		if cfg.passwordIterations != 700_000 {
			t.Errorf("iterations %d", cfg.passwordIterations)
		}
	})
}

// TestReadDotenv: KEY=value lines, # comments, quotes removed, export.
func TestReadDotenv(t *testing.T) {
	tests := []struct {
		name    string
		content string
		want    map[string]string
		wantErr string
	}{
		{"plain", "KEY=value\n", map[string]string{"KEY": "value"}, ""},
		{"comments and blank lines", "# a comment\n\n  # indented comment\nA=1\n", map[string]string{"A": "1"}, ""},
		{"double quotes", `NAME="a value # not a comment"` + "\n", map[string]string{"NAME": "a value # not a comment"}, ""},
		{"single quotes", "NAME='single'\n", map[string]string{"NAME": "single"}, ""},
		{"unbalanced quotes stay", "NAME=\"open\nOTHER='mixed\"\n", map[string]string{"NAME": `"open`, "OTHER": `'mixed"`}, ""},
		{"export", "export X=1\n", map[string]string{"X": "1"}, ""},
		{"spaces around", "  SPACED = v  \r\n", map[string]string{"SPACED": "v"}, ""},
		{"empty value", "EMPTY=\nQUOTED_EMPTY=\"\"\n", map[string]string{"EMPTY": "", "QUOTED_EMPTY": ""}, ""},
		{"value with =", "DATABASE_URL=postgres://u:p@h/db?sslmode=disable\n", map[string]string{"DATABASE_URL": "postgres://u:p@h/db?sslmode=disable"}, ""},
		{"last line without newline", "A=1\nB=2", map[string]string{"A": "1", "B": "2"}, ""},
		{"a later line wins", "A=1\nA=2\n", map[string]string{"A": "2"}, ""},
		{"malformed line", "A=1\nnot a setting\n", nil, ".env:2"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), ".env")
			if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := readDotenv(path)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("readDotenv: %v, %v; want an error naming %s", got, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("readDotenv: %v", err)
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Fatalf("readDotenv = %q, want %q", got, tc.want)
			}
		})
	}
	t.Run("missing file", func(t *testing.T) {
		got, err := readDotenv(filepath.Join(t.TempDir(), ".env"))
		if err != nil || len(got) != 0 {
			t.Fatalf("readDotenv = %v, %v; want nothing and no error", got, err)
		}
	})
}

// startWriter collects a server's log and cancels its run once the
// "serving" line shows that it listens.
type startWriter struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	cancel context.CancelFunc
}

func (w *startWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if bytes.Contains(p, []byte("serving")) {
		w.cancel()
	}
	return w.buf.Write(p)
}

func (w *startWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// TestCommands: help prints every command and every variable the server
// reads, with its default; version prints the build's version; anything
// else is refused before any configuration is read.
func TestCommands(t *testing.T) {
	var read []string // every variable loadConfig asks for
	loadConfig(func(k string) string { read = append(read, k); return "" })
	for _, arg := range []string{"help", "-h", "--help"} {
		t.Run(arg, func(t *testing.T) {
			var out bytes.Buffer
			if err := run(t.Context(), []string{arg}, testEnv(nil), &out, io.Discard); err != nil || out.String() != usage {
				t.Fatalf("run %s: %v, printed %q", arg, err, out.String())
			}
			want := append([]string{"serve", "migrate", "unlock <username>", "import-django [--check]", "version",
				"LOGIN_LOCK_ACCOUNT_AFTER (100)", "DJANGO_DATABASE_URL (none; import-django only)", "RATE_LOGIN (10/hour)",
				"ADDR (127.0.0.1:8000)", "DB_NAME (healthcare_db)", "PASSWORD_ITERATIONS (600000)", "GOGC (400)"}, read...)
			for _, w := range want {
				if !strings.Contains(usage, w) {
					t.Errorf("help does not show %q", w)
				}
			}
		})
	}
	var out bytes.Buffer
	if err := run(t.Context(), []string{"version"}, testEnv(nil), &out, io.Discard); err != nil ||
		!regexp.MustCompile(`^healthcare \S+ go1\.\d+\S*\n$`).MatchString(out.String()) {
		t.Fatalf("run version: %v, printed %q", err, out.String())
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"serv"}, `unknown command "serv": healthcare help lists the commands`},
		{[]string{"migrate", "now"}, `unknown command "migrate now": healthcare help lists the commands`},
		{[]string{"serve", "--addr=:80"}, `unknown command "serve --addr=:80": healthcare help lists the commands`},
		{[]string{"unlock"}, `unknown command "unlock": healthcare help lists the commands`},
		{[]string{"unlock", "a", "b"}, `unknown command "unlock a b": healthcare help lists the commands`},
		{[]string{"import-django", "--force"}, `unknown command "import-django --force": healthcare help lists the commands`},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			if err := run(t.Context(), tc.args, testEnv(nil), io.Discard, io.Discard); err == nil || err.Error() != tc.want {
				t.Fatalf("run: %v, want %s", err, tc.want)
			}
		})
	}
}

// TestRun starts the real thing with run: refused configurations stop it
// before it listens; a good one serves and shuts down cleanly when its
// context ends. It changes directory (for .env), so it is not parallel.
func TestRun(t *testing.T) {
	dbVars := func(extra map[string]string) map[string]string {
		vars := map[string]string{"ADDR": "127.0.0.1:0", "DB_NAME": testDBConfig.Database}
		for k, v := range extra {
			vars[k] = v
		}
		return vars
	}
	start := func(t *testing.T, getenv func(string) string) (string, error) {
		t.Helper()
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		out := &startWriter{cancel: cancel}
		done := make(chan error, 1)
		go func() { done <- run(ctx, nil, getenv, out, io.Discard) }()
		select {
		case err := <-done:
			return out.String(), err
		case <-time.After(time.Minute):
			cancel()
			t.Fatalf("run did not return; log:\n%s", out.String())
			return "", nil
		}
	}
	t.Run("short SECRET_KEY stops start-up", func(t *testing.T) {
		t.Chdir(t.TempDir())
		log, err := start(t, testEnv(dbVars(map[string]string{"SECRET_KEY": strings.Repeat("k", 31)})))
		if err == nil || !strings.Contains(err.Error(), "SECRET_KEY") {
			t.Fatalf("run: %v, want an error naming SECRET_KEY", err)
		}
		if strings.Contains(log, "serving") {
			t.Fatalf("run served with a short key; log:\n%s", log)
		}
	})
	t.Run("invalid RATE_ANON stops start-up", func(t *testing.T) {
		t.Chdir(t.TempDir())
		log, err := start(t, testEnv(dbVars(map[string]string{"RATE_ANON": "abc"})))
		if err == nil || !strings.Contains(err.Error(), "RATE_ANON") || strings.Contains(log, "serving") {
			t.Fatalf("run: %v, want an error naming RATE_ANON; log:\n%s", err, log)
		}
	})
	t.Run("a port in use stops start-up naming ADDR", func(t *testing.T) {
		needDB(t)
		t.Chdir(t.TempDir())
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		log, err := start(t, testEnv(dbVars(map[string]string{"ADDR": ln.Addr().String()})))
		want := "ADDR: listen tcp " + ln.Addr().String() + ": bind: address already in use"
		if err == nil || err.Error() != want || strings.Contains(log, "serving") {
			t.Fatalf("run: %v, want %s; log:\n%s", err, want, log)
		}
	})
	t.Run("serves and shuts down gracefully", func(t *testing.T) {
		needDB(t)
		t.Chdir(t.TempDir())
		log, err := start(t, testEnv(dbVars(nil)))
		if err != nil {
			t.Fatalf("run: %v; log:\n%s", err, log)
		}
		if !strings.Contains(log, `"url":"http://127.0.0.1:`) || !strings.Contains(log, "shutting down") {
			t.Fatalf("log does not show serving and shutting down:\n%s", log)
		}
		if strings.Contains(log, testSecret) {
			t.Fatalf("the log shows SECRET_KEY:\n%s", log)
		}
	})
	t.Run("unset SECRET_KEY warns and serves", func(t *testing.T) {
		needDB(t)
		t.Chdir(t.TempDir())
		log, err := start(t, testEnv(dbVars(map[string]string{"SECRET_KEY": ""})))
		if err != nil {
			t.Fatalf("run: %v; log:\n%s", err, log)
		}
		if !strings.Contains(log, `"level":"WARN"`) || !strings.Contains(log, "SECRET_KEY is not set") {
			t.Fatalf("log has no warning about SECRET_KEY:\n%s", log)
		}
	})
	t.Run(".env fills in, the environment wins", func(t *testing.T) {
		needDB(t)
		dir := t.TempDir()
		dotenv := "# local settings\nexport DEBUG=True\nSECRET_KEY='too-short'\nRATE_ANON=\"abc\"\n"
		if err := os.WriteFile(filepath.Join(dir, ".env"), []byte(dotenv), 0o600); err != nil {
			t.Fatal(err)
		}
		t.Chdir(dir)
		// testEnv sets SECRET_KEY and RATE_ANON, which must beat .env's bad
		// values; it leaves DEBUG unset, which .env then turns on (a text log).
		log, err := start(t, testEnv(dbVars(nil)))
		if err != nil {
			t.Fatalf("run: %v; log:\n%s", err, log)
		}
		if !strings.Contains(log, "level=INFO msg=serving") {
			t.Fatalf("DEBUG=True from .env did not make a text log:\n%s", log)
		}
	})
	t.Run(".env is read when the environment is silent", func(t *testing.T) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, ".env"), []byte("SECRET_KEY=\"too-short\"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		t.Chdir(dir)
		log, err := start(t, testEnv(dbVars(map[string]string{"SECRET_KEY": ""})))
		if err == nil || !strings.Contains(err.Error(), "SECRET_KEY") || strings.Contains(log, "serving") {
			t.Fatalf("run: %v, want .env's short SECRET_KEY refused; log:\n%s", err, log)
		}
	})
	t.Run("malformed .env stops start-up", func(t *testing.T) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, ".env"), []byte("DEBUG=True\noops\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		t.Chdir(dir)
		log, err := start(t, testEnv(dbVars(nil)))
		if err == nil || !strings.Contains(err.Error(), ".env:2") || strings.Contains(log, "serving") {
			t.Fatalf("run: %v, want an error naming .env:2; log:\n%s", err, log)
		}
	})
	t.Run("address in use", func(t *testing.T) {
		needDB(t)
		t.Chdir(t.TempDir())
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		log, err := start(t, testEnv(dbVars(map[string]string{"ADDR": ln.Addr().String()})))
		if err == nil || !strings.Contains(err.Error(), "listen") || strings.Contains(log, "serving") {
			t.Fatalf("run: %v, want a listen error; log:\n%s", err, log)
		}
	})
}

// TestDatabaseDown: with PostgreSQL unreachable, what needs it is a 503 with
// Retry-After, /readyz is a 503, and /healthz still a 200.
func TestDatabaseDown(t *testing.T) {
	live := newTestServer(t, nil)
	a := register(t, live)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close() // nothing listens there now: connections are refused
	dbCfg := testDBConfig
	dbCfg.Host = "127.0.0.1"
	dbCfg.Port = uint16(port)
	db, err := connect(dbCfg, 2)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer db.Close()
	var logBuf bytes.Buffer
	s := newTestServerOn(t, db, slog.New(slog.NewJSONHandler(&logBuf, nil)), nil)
	tests := []struct {
		name string
		rq   req
	}{
		{"me", req{method: "GET", path: "/api/auth/me/", token: a.access}},
		{"list patients", req{method: "GET", path: "/api/patients/", token: a.access}},
		{"create doctor", req{method: "POST", path: "/api/doctors/", token: a.access, body: map[string]string{"first_name": "Gregory", "email": "house@example.com", "specialization": "Diagnostics"}}},
		{"login", req{method: "POST", path: "/api/auth/login/", body: map[string]string{"username": a.username, "password": a.password}}},
		{"refresh", req{method: "POST", path: "/api/auth/token/refresh/", body: map[string]string{"refresh": a.refresh}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := do(t, s, tc.rq)
			wantUnavailable(t, res)
			wantSecurityHeaders(t, res)
		})
	}
	t.Run("readyz", func(t *testing.T) {
		res := do(t, s, req{method: "GET", path: "/readyz"})
		if res.status != http.StatusServiceUnavailable {
			t.Fatalf("status %d, want 503; body %s", res.status, res.body)
		}
		wantJSON(t, res, http.StatusServiceUnavailable, `{"status": "unavailable"}`)
	})
	t.Run("healthz", func(t *testing.T) {
		wantJSON(t, do(t, s, req{method: "GET", path: "/healthz"}), http.StatusOK, `{"status": "ok"}`)
	})
	t.Run("checks before the database still answer", func(t *testing.T) {
		wantJSON(t, do(t, s, req{method: "GET", path: "/api/patients/"}), http.StatusUnauthorized, bodyUnauthenticated)
		wantJSON(t, do(t, s, req{method: "GET", path: "/api/patients/", token: "a.b.c"}), http.StatusUnauthorized, invalidAccessBody)
	})
	t.Run("the cause goes to the log only", func(t *testing.T) {
		if !strings.Contains(logBuf.String(), "database unavailable") {
			t.Fatalf("log does not record the outage:\n%s", logBuf.String())
		}
	})
}

// TestPanicRecovery: a panicking handler becomes a JSON 500 without the
// panic's text, and the panic is logged.
func TestPanicRecovery(t *testing.T) {
	// Neither route it calls touches the database: without PostgreSQL it
	// runs on a nil testDB, and passes.
	var logBuf bytes.Buffer
	s := newTestServerOn(t, testDB, slog.New(slog.NewJSONHandler(&logBuf, nil)), nil)
	addBoomRoute(s)
	res := do(t, s, req{method: "GET", path: "/api/boom/", header: map[string]string{"Origin": "http://localhost:3000"}})
	wantJSON(t, res, http.StatusInternalServerError, bodyServerFailed)
	for _, leak := range []string{"boom", "secret", "goroutine", ".go:"} {
		if bytes.Contains(res.body, []byte(leak)) {
			t.Fatalf("body %s shows %q", res.body, leak)
		}
	}
	wantSecurityHeaders(t, res)
	wantHeader(t, res, "Access-Control-Allow-Origin", "http://localhost:3000")
	log := logBuf.String()
	if !strings.Contains(log, `"msg":"panic"`) || !strings.Contains(log, "boom") || !strings.Contains(log, `"status":500`) {
		t.Fatalf("log does not record the panic and its 500:\n%s", log)
	}
	// The server goes on serving.
	wantJSON(t, do(t, s, req{method: "GET", path: "/healthz"}), http.StatusOK, `{"status": "ok"}`)
}

// logLines decodes a JSON log, one object a line.
func logLines(t testing.TB, log string) []map[string]any {
	t.Helper()
	var lines []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(log), "\n") {
		if line == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("log line is not JSON (%v): %s", err, line)
		}
		lines = append(lines, m)
	}
	return lines
}

// TestAccessLog: one structured line per request with what an operator
// needs, and never a token, a password or a query string.
func TestAccessLog(t *testing.T) {
	needDB(t)
	var logBuf bytes.Buffer
	s := newTestServerOn(t, testDB, slog.New(slog.NewJSONHandler(&logBuf, nil)), nil)
	a := register(t, s)

	t.Run("an authenticated list", func(t *testing.T) {
		logBuf.Reset()
		res := do(t, s, req{method: "GET", path: "/api/patients/?search=secret", token: a.access})
		wantJSON(t, res, http.StatusOK, emptyPage)
		log := logBuf.String()
		lines := logLines(t, log)
		if len(lines) != 1 || lines[0]["msg"] != "request" {
			t.Fatalf("want exactly one request line, got:\n%s", log)
		}
		l := lines[0]
		want := map[string]any{
			"method":     "GET",
			"route":      "GET /api/patients/{$}",
			"status":     float64(200),
			"bytes":      float64(len(res.body)),
			"user_id":    float64(a.id),
			"login_id":   float64(claimInt(t, tokenClaims(t, a.access), "sid")),
			"client_ip":  "192.0.2.1", // as the limiter keys it (do's RemoteAddr)
			"request_id": res.header.Get("X-Request-Id"),
		}
		for k, v := range want {
			if l[k] != v {
				t.Errorf("%s = %v (%T), want %v", k, l[k], l[k], v)
			}
		}
		if d, ok := l["duration_ms"].(float64); !ok || d < 0 {
			t.Errorf("duration_ms = %v, want a number", l["duration_ms"])
		}
		if l["request_id"] == "" {
			t.Errorf("empty request_id")
		}
		for _, leak := range []string{a.access, strings.Split(a.access, ".")[2], "Bearer", "search", "secret", "?"} {
			if strings.Contains(log, leak) {
				t.Errorf("log shows %q:\n%s", leak, log)
			}
		}
	})
	t.Run("logins", func(t *testing.T) {
		logBuf.Reset()
		res := do(t, s, req{method: "POST", path: "/api/auth/login/", body: map[string]string{"username": a.username, "password": a.password}})
		if res.status != http.StatusOK {
			t.Fatalf("login: %d %s", res.status, res.body)
		}
		var pair tokenPair
		json.Unmarshal(res.body, &pair)
		wrong := "Wrong-Horse-Battery-Staple-77"
		wantJSON(t, do(t, s, req{method: "POST", path: "/api/auth/login/", body: map[string]string{"username": a.username, "password": wrong}}),
			http.StatusUnauthorized, badCredentialsBody)
		wantJSON(t, do(t, s, req{method: "GET", path: "/api/auth/me/", token: "eyJhbGciOiJIUzI1NiJ9.eyJzZWNyZXQiOjF9.forged-signature"}),
			http.StatusUnauthorized, invalidAccessBody)
		log := logBuf.String()
		lines := logLines(t, log)
		if len(lines) != 3 {
			t.Fatalf("want three lines, got:\n%s", log)
		}
		for i, wantStatus := range []float64{200, 401, 401} {
			if lines[i]["msg"] != "request" || lines[i]["status"] != wantStatus {
				t.Errorf("line %d: %v, want a request line with status %v", i, lines[i], wantStatus)
			}
		}
		if lines[0]["route"] != "POST /api/auth/login/{$}" || lines[2]["user_id"] != float64(0) {
			t.Errorf("lines %v", lines)
		}
		for _, leak := range []string{a.password, wrong, pair.Access, pair.Refresh, "forged-signature", "eyJ"} {
			if strings.Contains(log, leak) {
				t.Errorf("log shows %q:\n%s", leak, log)
			}
		}
	})
	t.Run("unrouted requests are logged too", func(t *testing.T) {
		logBuf.Reset()
		wantJSON(t, do(t, s, req{method: "GET", path: "/api/nurses/?token=abc"}), http.StatusNotFound, bodyNotFound)
		log := logBuf.String()
		lines := logLines(t, log)
		if len(lines) != 1 || lines[0]["msg"] != "request" || lines[0]["status"] != float64(404) || strings.Contains(log, "token=abc") {
			t.Fatalf("want one request line with status 404 and no query, got:\n%s", log)
		}
	})
}

// TestStripTags attacks the tag stripper with tags that assemble new tags
// when one is removed, tags split or left open, and text that merely
// contains '<'. Removal must repeat until nothing changes (contract).
func TestStripTags(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"<b>Doe</b>", "Doe"},
		{"Tom <3 Jerry", "Tom <3 Jerry"},
		{"a < b > c", "a < b > c"},
		{"<<b>img src=x onerror=alert(1)>", ""},
		{"<<<b>b>img src=x onerror=alert(1)>", ""},
		{"<img src=x onerror=alert(1)//", ""},
		{"Bob<script", "Bob"},
		{"Bob<", "Bob<"},
		{"<scr<b>ipt>alert(1)</scr</b>ipt>", "ipt>alert(1)ipt>"}, // "<scr<b>" is one tag
		{"x<<!-- c -->/b>y", "xy"},
		{"<é>Zoë</é>", "Zoë"},
		{"2 <3 and 4 >1", "2 <3 and 4 >1"},
	} {
		if got := stripTags(tc.in); got != tc.want {
			t.Errorf("stripTags(%q) = %q, want %q", tc.in, got, tc.want)
		}
		// Nothing the stripper returns holds a tag it would strip again.
		if got := stripTags(tc.in); stripTags(got) != got {
			t.Errorf("stripTags(%q) = %q still holds a tag", tc.in, got)
		}
	}
	long := strings.Repeat("<", 20_000) + strings.Repeat("b>", 20_000) // one pass, not 20,000
	if got := stripTags(long); got != "" {
		t.Errorf("nested 20,000 deep: %q, want empty", got[:min(len(got), 40)])
	}
}

// TestPublishedKeysRefused: every SECRET_KEY value shown in README or
// .env.example stops start-up, so that copying one cannot let anyone sign
// tokens.
//
// It reads every file of the repository, code, scripts and tests included,
// for a value given to anything named like a secret (SECRET_KEY=…,
// "SECRET_KEY": "…", SECRET=…, testSecret = "…"): each must be refused, so
// a key newly shown anywhere fails here until publishedKeys lists it.
func TestPublishedKeysRefused(t *testing.T) {
	keyRE := regexp.MustCompile(`(?i)\w*secret\w*["']?[ \t]*[:=][ \t]*["'` + "`" + `]?([^\s"'` + "`" + `$(){},;]+)`)
	var shown []string
	err := filepath.WalkDir(".", func(path string, d os.DirEntry, err error) error {
		switch {
		case err != nil:
			return err
		case d.IsDir() && d.Name() == ".git":
			return filepath.SkipDir
		case d.IsDir() || strings.HasSuffix(path, ".gz"):
			return nil
		}
		data, err := os.ReadFile(path)
		for _, m := range keyRE.FindAllStringSubmatch(string(data), -1) {
			shown = append(shown, m[1])
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(shown, publishedKeys[0]) { // TestLoadConfigErrors shows it
		t.Errorf("the scan did not find %q", publishedKeys[0])
	}
	for _, line := range []string{"SECRET_KEY=k1", `export SECRET_KEY="k1"`, `SECRET=k1 # x`, `"SECRET_KEY": "k1",`,
		"const testSecret = `k1`", `secret_key: 'k1'`, `JWT_SECRET = "k1"`} {
		if m := keyRE.FindStringSubmatch(line); m == nil || m[1] != "k1" {
			t.Errorf("the scan reads %q as %q, want k1", line, m)
		}
	}
	for _, key := range append(shown, publishedKeys...) {
		if _, _, err := loadConfig(testEnv(map[string]string{"SECRET_KEY": key})); err == nil || !strings.Contains(err.Error(), "SECRET_KEY") {
			t.Errorf("SECRET_KEY=%q: %v, want refused", key, err)
		}
	}
	if data, _ := os.ReadFile(".env.example"); !regexp.MustCompile(`(?m)^SECRET_KEY=$`).Match(data) {
		t.Error(".env.example must leave SECRET_KEY= empty")
	}
}

// TestDatabaseTLS: PostgreSQL over the network is encrypted and verified by
// default; only a loopback host or a Unix socket goes without TLS.
func TestDatabaseTLS(t *testing.T) {
	for _, tc := range []struct {
		name string
		vars map[string]string
		want string
	}{
		{"remote host", map[string]string{"DB_HOST": "db.example.com"}, "verify-full"},
		{"remote address", map[string]string{"DB_HOST": "10.1.2.3"}, "verify-full"},
		{"localhost", map[string]string{"DB_HOST": "localhost"}, "disable"},
		{"loopback address", map[string]string{"DB_HOST": "127.0.0.2"}, "disable"},
		{"IPv6 loopback", map[string]string{"DB_HOST": "::1"}, "disable"},
		{"Unix socket", map[string]string{"DB_HOST": "/var/run/postgresql"}, "disable"},
		{"DB_SSLMODE chosen", map[string]string{"DB_HOST": "db.example.com", "DB_SSLMODE": "require"}, "require"},
		{"DATABASE_URL to a remote host", map[string]string{"DATABASE_URL": "postgres://u@db.example.com/x"}, "verify-full"},
		{"sslmode in the password is no sslmode", map[string]string{"DATABASE_URL": "postgres://u:sslmode@db.example.com/x"}, "verify-full"},
		{"sslmode in the database name is no sslmode", map[string]string{"DATABASE_URL": "postgres://u@db.example.com/sslmode_db"}, "verify-full"},
		{"DATABASE_URL's sslmode wins", map[string]string{"DATABASE_URL": "postgres://u@db.example.com/x?sslmode=require", "DB_SSLMODE": "verify-full"}, "require"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, _, err := loadConfig(testEnv(tc.vars))
			if err != nil || string(cfg.db.SSLMode) != tc.want {
				t.Fatalf("sslmode %q (err %v), want %q", cfg.db.SSLMode, err, tc.want)
			}
		})
	}
	// A malformed DATABASE_URL is refused without its password in the error.
	for _, url := range []string{"postgres://admin:s3cr3t-pw@db.example.com:notaport/x", "postgres://admin:s3cr3t-pw@db.example.com/x?sslmode=bogus", "host=x password=s3cr3t-pw sslmode"} {
		_, _, err := loadConfig(testEnv(map[string]string{"DATABASE_URL": url}))
		if err == nil || !strings.Contains(err.Error(), "DATABASE_URL") || strings.Contains(err.Error(), "s3cr3t") {
			t.Errorf("DATABASE_URL %q: error %v, want DATABASE_URL named and the password absent", url, err)
		}
	}
}

// TestEndedLoginCountsAgainstItsUser: a valid token whose login has ended
// is its user's until a statement refuses it (contract v4): its requests
// count against the user limit, as DRF counts a token it accepts, and once
// over the limit they are throttled without running any statement; here
// the pool is closed, so a statement would answer 503.
func TestEndedLoginCountsAgainstItsUser(t *testing.T) {
	needDB(t)
	db, err := openDB(t.Context(), testDBConfig, 2, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	s := newTestServerOn(t, db, slog.New(slog.NewTextHandler(io.Discard, nil)), map[string]string{"RATE_USER": "3/hour"})
	freezeLimiters(s, tenPast)
	a := register(t, s)
	wantNoContent(t, logout(t, s, a.refresh)) // the user's too (contract v6)
	for range 2 {
		wantUnauthorized(t, me(t, s, a.access), invalidAccessBody)
	}
	db.Close()
	wantThrottled(t, me(t, s, a.access), tenPastWait)
	wantThrottled(t, do(t, s, req{method: "GET", path: "/api/patients/1/", token: a.access}), tenPastWait)
}

// limiterLen reports how many keys l holds (0 for a limit that is off).
func limiterLen(l *limiter) int {
	if l == nil {
		return 0
	}
	return len(l.young) + len(l.old)
}
