package main

import (
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Benchmarks: go test -run '^$' -bench . -benchmem
// The handler benchmarks go through the whole stack (headers, routing,
// limiter, token check in PostgreSQL, the query, JSON) on the test database.

func BenchmarkJWTSign(b *testing.B) {
	s := &signer{key: []byte(testSecret), accessTTL: 15 * time.Minute, refreshTTL: 24 * time.Hour}
	c := s.newClaims("access", 42, 7, time.Now())
	b.ReportAllocs()
	for b.Loop() {
		s.sign(c)
	}
}

func BenchmarkJWTVerify(b *testing.B) {
	s := &signer{key: []byte(testSecret), accessTTL: 15 * time.Minute, refreshTTL: 24 * time.Hour}
	now := time.Now()
	tok := s.sign(s.newClaims("access", 42, 7, now))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.verify(tok, "access", now); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLimiter is one decision per op from many goroutines over 1,000
// clients: the steady state of a busy server.
func BenchmarkLimiter(b *testing.B) {
	l := newLimiter(rate{n: 1 << 30, period: time.Hour}, 100_000)
	keys := make([]rateKey, 1000)
	for i := range keys {
		keys[i] = bySource(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}))
		l.allow(keys[i])
	}
	var seq atomic.Uint32
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := int(seq.Add(1)) * 7919
		for pb.Next() {
			i++
			if _, ok := l.allow(keys[i%len(keys)]); !ok {
				b.Fatal("limited")
			}
		}
	})
}

// BenchmarkPasswordHash is one PBKDF2 at the production work factor.
func BenchmarkPasswordHash(b *testing.B) {
	p := newPasswords(minIterations, 1)
	for b.Loop() {
		p.encode("correct-horse-battery", "abcdefghijklmnopqrstuv")
	}
}

// benchServer is a server with the limits on but too high to trigger, so
// the limiter's cost is measured, and a user with 50 patients.
func benchServer(b *testing.B) (*server, account, []int64) {
	s := newTestServer(b, map[string]string{"RATE_USER": "100000000/hour", "RATE_ANON": "100000000/hour"})
	a := register(b, s)
	var ids []int64
	for i := range 50 {
		res := do(b, s, req{method: "POST", path: "/api/patients/", token: a.access, body: map[string]string{
			"first_name": fmt.Sprintf("Bench%d", i), "last_name": "Patient", "email": fmt.Sprintf("p%d@example.com", i),
		}})
		if res.status != http.StatusCreated {
			b.Fatalf("seed: %d %s", res.status, res.body)
		}
		id, _ := res.object(b)["id"].(float64)
		ids = append(ids, int64(id))
	}
	return s, a, ids
}

// serveParallel runs one request per op from GOMAXPROCS goroutines and
// fails on any status but want.
func serveParallel(b *testing.B, s *server, want int, newReq func(i int) *http.Request) {
	var seq atomic.Int64
	b.SetParallelism(8) // 16 requests in flight on 2 cores, as under load
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			w := httptest.NewRecorder()
			s.ServeHTTP(w, newReq(int(seq.Add(1))))
			if w.Code != want {
				b.Fatalf("status %d: %s", w.Code, w.Body)
			}
		}
	})
}

func BenchmarkPatientGet(b *testing.B) {
	s, a, ids := benchServer(b)
	serveParallel(b, s, http.StatusOK, func(i int) *http.Request {
		r := httptest.NewRequest("GET", "http://localhost/api/patients/"+strconv.FormatInt(ids[i%len(ids)], 10)+"/", nil)
		r.Header.Set("Authorization", "Bearer "+a.access)
		return r
	})
}

func BenchmarkPatientList(b *testing.B) {
	s, a, _ := benchServer(b)
	serveParallel(b, s, http.StatusOK, func(i int) *http.Request {
		r := httptest.NewRequest("GET", "http://localhost/api/patients/?page="+strconv.Itoa(i%5+1), nil)
		r.Header.Set("Authorization", "Bearer "+a.access)
		return r
	})
}

func BenchmarkPatientCreate(b *testing.B) {
	s, a, _ := benchServer(b)
	run := time.Now().UnixNano()
	serveParallel(b, s, http.StatusCreated, func(i int) *http.Request {
		body := fmt.Sprintf(`{"first_name": "New", "email": "n%d-%d@example.com"}`, run, i)
		r := httptest.NewRequest("POST", "http://localhost/api/patients/", strings.NewReader(body))
		r.Header.Set("Authorization", "Bearer "+a.access)
		r.Header.Set("Content-Type", "application/json")
		return r
	})
}

// BenchmarkPatientPatch changes one field of one of 50 patients per op.
func BenchmarkPatientPatch(b *testing.B) {
	s, a, ids := benchServer(b)
	serveParallel(b, s, http.StatusOK, func(i int) *http.Request {
		body := fmt.Sprintf(`{"phone": "+1 555 010 %04d"}`, i%10000)
		r := httptest.NewRequest("PATCH", "http://localhost/api/patients/"+strconv.FormatInt(ids[i%len(ids)], 10)+"/", strings.NewReader(body))
		r.Header.Set("Authorization", "Bearer "+a.access)
		r.Header.Set("Content-Type", "application/json")
		return r
	})
}

// BenchmarkMappingList reads a page of 10 of 20 mappings: three tables
// joined and the widest JSON the API writes.
func BenchmarkMappingList(b *testing.B) {
	s, a, ids := benchServer(b)
	for i := range 20 {
		res := do(b, s, req{method: "POST", path: "/api/doctors/", token: a.access, body: map[string]string{
			"first_name": fmt.Sprintf("Doc%d", i), "email": fmt.Sprintf("d%d-%s@example.com", i, a.username), "specialization": "Cardiology",
		}})
		doctor, _ := res.object(b)["id"].(float64)
		if res = do(b, s, req{method: "POST", path: "/api/mappings/", token: a.access, body: map[string]any{
			"patient": ids[0], "doctor": int64(doctor),
		}}); res.status != http.StatusCreated {
			b.Fatalf("seed: %d %s", res.status, res.body)
		}
	}
	serveParallel(b, s, http.StatusOK, func(i int) *http.Request {
		r := httptest.NewRequest("GET", "http://localhost/api/mappings/", nil)
		r.Header.Set("Authorization", "Bearer "+a.access)
		return r
	})
}

// BenchmarkFailedLogin is one failed login per op at the default 600,000
// iterations: for a name of no account, and for accounts whose migrated
// hashes have 260,000 and 1,000,000 iterations. Every failed check is
// padded to the costliest stored hash and writes one event, so the three
// should cost the same: compare them within one run
// (go test -run '^$' -bench FailedLogin -count 5).
func BenchmarkFailedLogin(b *testing.B) {
	names := map[string]string{"unknown": uniqueName("nobody")}
	for _, iter := range []int{260_000, 1_000_000} {
		name := uniqueName("timing")
		insertUser(b, name, name+"@example.com", djangoHash(b, "the right password", "TimingSaltTimingSalt00", iter))
		names[strconv.Itoa(iter)] = name
	}
	s := newTestServer(b, nil, func(c *config) {
		c.passwordIterations = minIterations
		c.lockAfter = 100
		c.lockAccountAfter = 100_000
		slowHashes(c)
	})
	if err := s.passwords.raiseFailCost(b.Context(), testDB); err != nil {
		b.Fatal(err)
	}
	for _, kind := range []string{"unknown", "260000", "1000000"} {
		b.Run(kind, func(b *testing.B) {
			for b.Loop() {
				if res := login(b, s, names[kind], "a wrong password"); res.status != http.StatusUnauthorized {
					b.Fatalf("status %d: %s", res.status, res.body)
				}
			}
		})
	}
}

// BenchmarkStartAsServingRole is what a start as the serving role asks of
// the database: a new pool, ensureSchema (the step, and the rights check of
// checkServing), closed again (go test -run '^$' -bench StartAsServingRole).
func BenchmarkStartAsServingRole(b *testing.B) {
	role := appRole(b)
	owner := scratchDB(b, "_startbench", -1)
	if err := runMigrate(b.Context(), owner, role, io.Discard); err != nil {
		b.Fatal(err)
	}
	cfg := testDBConfig
	cfg.Database, cfg.User = testDBConfig.Database+"_startbench", role
	for b.Loop() {
		db, err := openDB(b.Context(), cfg, 1, slog.New(slog.DiscardHandler))
		if err != nil {
			b.Fatal(err)
		}
		if _, err := ensureSchema(b.Context(), db); err != nil {
			b.Fatal(err)
		}
		db.Close()
	}
}
