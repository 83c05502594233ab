package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/lib/pq/pqerror"
)

// This file is the home of the helpers the test files share, one of each; a
// helper that only one file uses lives in that file, and so do a resource's
// own paths, bodies and wantShape patterns (patientPath, doctorBody, …),
// whichever files use them.

// testDB is the throw-away database TestMain creates for this run. Every
// test server shares it; tests keep apart by registering their own users.
// When PostgreSQL cannot be reached, testDB is nil and testDBErr says why:
// the tests that need no database still run, and every test that needs it
// fails through needDB.
var (
	testDB       *sql.DB
	testDBErr    error
	testDBConfig pq.Config
)

// testSecret is the SECRET_KEY of test servers (and of tokens tests forge),
// new for each run: a key written here would be published, and refused.
var testSecret = rand.Text() + rand.Text()

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

// runTests creates a database named for this run, runs the tests against
// it and drops it, whatever the outcome. Without a database it runs the
// tests all the same: those that need one fail.
func runTests(m *testing.M) int {
	var suffix [6]byte
	rand.Read(suffix[:])
	name := "healthcare_test_" + hex.EncodeToString(suffix[:])
	cfg, _, err := loadConfig(testEnv(map[string]string{"DB_NAME": name}))
	if err != nil {
		fmt.Fprintln(os.Stderr, "test config:", err)
		return 1
	}
	ctx := context.Background()
	testDBConfig = cfg.db
	testDB, testDBErr = openDB(ctx, cfg.db, 16, slog.New(slog.DiscardHandler))
	if testDBErr == nil {
		_, testDBErr = ensureSchema(ctx, testDB)
	}
	if testDBErr != nil {
		fmt.Fprintln(os.Stderr, "test database (is PostgreSQL running on localhost:5432?):", testDBErr)
		fmt.Fprintln(os.Stderr, "running the tests without it: every test that needs it fails")
		return m.Run()
	}
	code := m.Run()
	testDB.Close()
	admin := cfg.db
	admin.Database = "postgres"
	if db, err := connect(admin, 1); err == nil {
		if _, err := db.ExecContext(ctx, "DROP DATABASE IF EXISTS "+pq.QuoteIdentifier(name)+" WITH (FORCE)"); err != nil {
			fmt.Fprintln(os.Stderr, "drop test database:", err)
		}
		db.Close()
	}
	return code
}

// needDB fails the test, with the reason TestMain recorded, when there is no
// test database. A test that needs PostgreSQL must fail without it, never
// skip: a skipped test would pass for one that ran.
func needDB(t testing.TB) {
	t.Helper()
	if testDB == nil {
		t.Fatalf("this test needs the test database, which could not be opened: %v", testDBErr)
	}
}

// testEnv is an environment for loadConfig: the test defaults (a fixed
// secret, every rate limit off) overridden by vars. It never reads the real
// environment, except PG* through lib/pq and DB_HOST/DB_PORT so that CI can
// point the tests at another server.
func testEnv(vars map[string]string) func(string) string {
	env := map[string]string{
		"SECRET_KEY":    testSecret,
		"RATE_REGISTER": "off",
		"RATE_LOGIN":    "off",
		"RATE_ANON":     "off",
		"RATE_USER":     "off",
		"DB_HOST":       os.Getenv("DB_HOST"),
		"DB_PORT":       os.Getenv("DB_PORT"),
	}
	for k, v := range vars {
		env[k] = v
	}
	return func(k string) string { return env[k] }
}

// testIterations keeps PBKDF2 cheap in tests. It is set through the config
// struct, never the environment, which refuses anything under 600,000.
const testIterations = 1_000

// newTestServer builds the real handler, as run does, on the test database.
// vars override testEnv's defaults; edit may change the config further.
func newTestServer(t testing.TB, vars map[string]string, edit ...func(*config)) *server {
	t.Helper()
	needDB(t)
	return newTestServerOn(t, testDB, slog.New(slog.NewTextHandler(io.Discard, nil)), vars, edit...)
}

// newTestServerOn is newTestServer on db (which it does not check), logging
// to logger.
func newTestServerOn(t testing.TB, db *sql.DB, logger *slog.Logger, vars map[string]string, edit ...func(*config)) *server {
	t.Helper()
	cfg, _, err := loadConfig(testEnv(vars))
	if err != nil {
		t.Fatalf("loadConfig: %v", err)
	}
	cfg.passwordIterations = testIterations
	for _, e := range edit {
		e(&cfg)
	}
	srv := newServer(cfg, db, logger)
	// newServer pads failed logins to the costliest hash in the database;
	// the shared test database holds other tests' 600,000- and
	// 1,000,000-iteration hashes, which would slow every later test.
	srv.passwords.failCost.Store(int64(cfg.passwordIterations))
	return srv
}

// response is what a test request got back.
type response struct {
	status int
	header http.Header
	body   []byte
}

// json decodes the body into a generic value, failing the test when it is
// not JSON. (For JSON text of one's own: response{body: data}.json(t).)
func (r response) json(t testing.TB) any {
	t.Helper()
	var v any
	if err := json.Unmarshal(r.body, &v); err != nil {
		t.Fatalf("body is not JSON (%v): %q", err, r.body)
	}
	return v
}

// object decodes the body as a JSON object.
func (r response) object(t testing.TB) map[string]any {
	t.Helper()
	m, ok := r.json(t).(map[string]any)
	if !ok {
		t.Fatalf("body is not a JSON object: %q", r.body)
	}
	return m
}

// req describes a test request. body may be a string (sent as is), []byte,
// or any other value (sent as JSON); nil sends no body.
type req struct {
	method, path string
	token        string // access token for Authorization: Bearer
	body         any
	header       map[string]string
	remoteAddr   string // default 192.0.2.1:1234
}

// do serves one request through the whole handler, as a client would see it.
func do(t testing.TB, s http.Handler, rq req) response {
	t.Helper()
	var body io.Reader
	switch b := rq.body.(type) {
	case nil:
	case string:
		body = strings.NewReader(b)
	case []byte:
		body = bytes.NewReader(b)
	default:
		data, err := json.Marshal(b)
		if err != nil {
			t.Fatalf("marshal body: %v", err)
		}
		body = bytes.NewReader(data)
	}
	r := httptest.NewRequest(rq.method, "http://localhost"+rq.path, body)
	if body != nil {
		r.Header.Set("Content-Type", "application/json")
	}
	if rq.token != "" {
		r.Header.Set("Authorization", "Bearer "+rq.token)
	}
	for k, v := range rq.header {
		if k == "Host" {
			r.Host = v
			continue
		}
		if v == "" {
			r.Header.Del(k)
			continue
		}
		r.Header.Set(k, v)
	}
	if rq.remoteAddr != "" {
		r.RemoteAddr = rq.remoteAddr
	}
	return doRequest(t, s, r)
}

// doRequest serves a request the test built itself (TLS, chunked bodies),
// through the whole handler, as do does for the ordinary ones.
func doRequest(t testing.TB, s http.Handler, r *http.Request) response {
	t.Helper()
	w := httptest.NewRecorder()
	s.ServeHTTP(w, r)
	return response{status: w.Code, header: w.Result().Header, body: w.Body.Bytes()}
}

// wantJSON fails unless got has the status and its body equals the JSON in
// want (compared as decoded values, so key order does not matter).
func wantJSON(t testing.TB, got response, status int, want string) {
	t.Helper()
	g, w := decodeBoth(t, got, status, want)
	if !jsonEqual(g, w) {
		t.Fatalf("body %s\nwant %s", got.body, want)
	}
}

// decodeBoth fails unless got has the status, and decodes its body and want.
func decodeBoth(t testing.TB, got response, status int, want string) (g, w any) {
	t.Helper()
	if got.status != status {
		t.Fatalf("status %d, want %d; body %s", got.status, status, got.body)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("bad want JSON %q: %v", want, err)
	}
	return got.json(t), w
}

func jsonEqual(a, b any) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return bytes.Equal(x, y)
}

// jsonText is v as JSON, for building want strings and request bodies.
func jsonText(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return string(b)
}

// wantObject fails unless got has the status and a JSON object body, which
// it returns.
func wantObject(t testing.TB, got response, status int) map[string]any {
	t.Helper()
	if got.status != status {
		t.Fatalf("status %d, want %d; body %s", got.status, status, got.body)
	}
	return got.object(t)
}

// wantNoContent fails unless got is a 204 with an empty body.
func wantNoContent(t testing.TB, got response) {
	t.Helper()
	if got.status != http.StatusNoContent || len(got.body) != 0 {
		t.Fatalf("status %d body %q, want 204 and no body", got.status, got.body)
	}
}

// anyWait, as wantThrottled's n, accepts any whole number of seconds ≥ 1.
const anyWait = 0

// wantThrottled fails unless res is the contract's 429: a Retry-After of N
// whole seconds ≥ 1 and a body naming N. n other than anyWait is the N
// wanted, exactly as Retry-After must spell it.
func wantThrottled(t testing.TB, res response, n int) {
	t.Helper()
	wait := n
	if n == anyWait {
		var err error
		if wait, err = strconv.Atoi(res.header.Get("Retry-After")); err != nil || wait < 1 {
			t.Fatalf("Retry-After %q, want whole seconds ≥ 1; status %d, body %s", res.header.Get("Retry-After"), res.status, res.body)
		}
	}
	unit := "seconds"
	if wait == 1 {
		unit = "second"
	}
	wantJSON(t, res, http.StatusTooManyRequests,
		fmt.Sprintf(`{"detail": "Request was throttled. Expected available in %d %s."}`, wait, unit))
	if got := res.header.Get("Retry-After"); n != anyWait && got != strconv.Itoa(n) {
		t.Fatalf("Retry-After %q, want %d", got, n)
	}
}

// wantUnavailable fails unless res is the contract's 503 with a Retry-After
// of whole seconds ≥ 1.
func wantUnavailable(t testing.TB, res response) {
	t.Helper()
	wantJSON(t, res, http.StatusServiceUnavailable, unavailableBody)
	if n, err := strconv.Atoi(res.header.Get("Retry-After")); err != nil || n < 1 {
		t.Fatalf("Retry-After %q, want whole seconds ≥ 1", res.header.Get("Retry-After"))
	}
}

// wantParseError fails unless res is a 400 whose only member is a detail
// starting "JSON parse error - " and containing want.
func wantParseError(t testing.TB, res response, want string) {
	t.Helper()
	if res.status != http.StatusBadRequest {
		t.Fatalf("status %d, want 400; body %s", res.status, res.body)
	}
	m := res.object(t)
	d, ok := m["detail"].(string)
	if len(m) != 1 || !ok || !strings.HasPrefix(d, "JSON parse error - ") || !strings.Contains(d, want) {
		t.Fatalf("body %s, want {\"detail\": \"JSON parse error - …%s…\"}", res.body, want)
	}
}

var nameSeq atomic.Int64

// uniqueName makes a name no other test uses: prefix, a counter, an x and
// random hex. With a lower-case prefix it is a lower-case token that no
// other such name contains, for emails and for search terms in the shared
// doctor directory.
func uniqueName(prefix string) string {
	var b [3]byte
	rand.Read(b[:])
	return fmt.Sprintf("%s%dx%x", prefix, nameSeq.Add(1), b)
}

// account is a registered test user with its first token pair.
type account struct {
	id       int64
	username string
	email    string
	password string
	access   string
	refresh  string
}

// register creates a fresh user through the API and returns it.
func register(t testing.TB, s http.Handler) account {
	t.Helper()
	n := uniqueName("user")
	// The password shares few characters with the username, or Django's
	// similarity validator would refuse it.
	a := account{username: n, email: n + "@example.com", password: "Harbor-Lantern-Quiet-Moss"}
	res := do(t, s, req{method: "POST", path: "/api/auth/register/", body: map[string]string{
		"username": a.username, "email": a.email, "name": "Test User", "password": a.password, "password_confirm": a.password,
	}})
	if res.status != http.StatusCreated {
		t.Fatalf("register: status %d: %s", res.status, res.body)
	}
	var out struct {
		User   user      `json:"user"`
		Tokens tokenPair `json:"tokens"`
	}
	if err := json.Unmarshal(res.body, &out); err != nil {
		t.Fatalf("register body: %v", err)
	}
	a.id, a.access, a.refresh = out.User.ID, out.Tokens.Access, out.Tokens.Refresh
	return a
}

// concurrently runs n requests at once (released together) and returns the
// answers in order. The requests' bodies must already be strings.
func concurrently(t testing.TB, s http.Handler, rqs []req) []response {
	t.Helper()
	out := make([]response, len(rqs))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, rq := range rqs {
		if _, ok := rq.body.(string); !ok && rq.body != nil {
			t.Fatalf("concurrently: request %d body must be a string", i)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			out[i] = do(t, s, rq)
		}()
	}
	close(start)
	wg.Wait()
	return out
}

// The contract's bodies that more than one file checks.
const (
	bodyUnauthenticated = `{"detail": "Authentication credentials were not provided."}`
	bodyNotFound        = `{"detail": "Not found."}`
	bodyInvalidPage     = `{"detail": "Invalid page."}`
	bodyForbidden       = `{"detail": "You do not have permission to perform this action."}`
	invalidAccessBody   = `{"detail": "Given token not valid for any token type", "code": "token_not_valid",
		"messages": [{"token_class": "AccessToken", "token_type": "access", "message": "Token is invalid or expired"}]}`
	refreshInvalidBody = `{"detail": "Token is invalid or expired", "code": "token_not_valid"}`
	badCredentialsBody = `{"detail": "No active account found with the given credentials"}`
	unavailableBody    = `{"detail": "Service temporarily unavailable."}`
)

// emptyPage is the body of page 1 of an empty list.
const emptyPage = `{"count": 0, "next": null, "previous": null, "results": []}`

// Field errors.
const (
	msgRequired  = "This field is required."
	msgBlank     = "This field may not be blank."
	msgNull      = "This field may not be null."
	msgNotString = "Not a valid string."
	msgNUL       = "Null characters are not allowed."
	msgEmail     = "Enter a valid email address."
	msgMax100    = "Ensure this field has no more than 100 characters."
	msgMax254    = "Ensure this field has no more than 254 characters."
	msgPhone     = "Enter a valid phone number: 10 to 15 digits, optionally a leading + and spaces, dashes, dots or parentheses."
	msgDate      = "Date has wrong format. Use one of these formats instead: YYYY-MM-DD."
	msgFuture    = "Date of birth cannot be in the future."
	msgBefore    = "Date of birth cannot be before 1900-01-01."
)

// errs builds a field-error body: field, message, field, message…
func errs(kv ...string) string {
	m := map[string][]string{}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i]] = append(m[kv[i]], kv[i+1])
	}
	return jsonText(m)
}

// strN repeats s n times.
func strN(s string, n int) string { return strings.Repeat(s, n) }

// thisID stands for the id of the record a table case works on; tests
// replace its digits with the real id.
const thisID = 424242424242

// injections are SQL metacharacter strings every string input must store
// verbatim or refuse, never execute.
var injections = []string{
	`'; DROP TABLE patients; --`,
	`" OR 1=1 --`,
	`\`,
	`%`,
	`_`,
	`$1`,
	`Robert'); DROP TABLE doctors;--`,
	`1' OR '1'='1`,
}

var stampRE = regexp.MustCompile(`^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$`)

// isStamp reports whether s is a time as DRF writes it: RFC 3339 in UTC,
// microseconds, Z.
func isStamp(s string) bool {
	_, err := time.Parse(time.RFC3339Nano, s)
	return err == nil && stampRE.MatchString(s)
}

// wantShape is wantJSON for bodies with generated values: in want, the
// string "<id>" matches any positive integer and "<stamp>" any RFC 3339 UTC
// time ending in Z; everything else must be equal, objects key for key. It
// returns the decoded body.
func wantShape(t testing.TB, got response, status int, want string) any {
	t.Helper()
	g, w := decodeBoth(t, got, status, want)
	if at, ok := shapeMatch(g, w, "body"); !ok {
		t.Fatalf("mismatch at %s\nbody %s\nwant %s", at, got.body, want)
	}
	return g
}

// shapeMatch compares got with want as wantShape describes, returning where
// they first differ.
func shapeMatch(got, want any, at string) (string, bool) {
	switch w := want.(type) {
	case string:
		switch w {
		case "<id>":
			n, ok := got.(float64)
			return at, ok && n >= 1 && n == math.Trunc(n)
		case "<stamp>":
			s, ok := got.(string)
			return at, ok && isStamp(s)
		}
	case map[string]any:
		g, ok := got.(map[string]any)
		if !ok || len(g) != len(w) {
			return at, false
		}
		for k, wv := range w {
			gv, ok := g[k]
			if !ok {
				return at + "." + k, false
			}
			if where, ok := shapeMatch(gv, wv, at+"."+k); !ok {
				return where, false
			}
		}
		return "", true
	case []any:
		g, ok := got.([]any)
		if !ok || len(g) != len(w) {
			return at, false
		}
		for i := range w {
			if where, ok := shapeMatch(g[i], w[i], fmt.Sprintf("%s[%d]", at, i)); !ok {
				return where, false
			}
		}
		return "", true
	}
	return at, jsonEqual(got, want)
}

// mustGet GETs path as token and returns the body of its 200.
func mustGet(t testing.TB, s http.Handler, token, path string) string {
	t.Helper()
	res := do(t, s, req{method: "GET", path: path, token: token})
	if res.status != http.StatusOK {
		t.Fatalf("GET %s: status %d: %s", path, res.status, res.body)
	}
	return string(res.body)
}

// wantSame fails unless GET path as token still answers exactly before.
func wantSame(t testing.TB, s http.Handler, token, path, before string) {
	t.Helper()
	if after := mustGet(t, s, token, path); after != before {
		t.Fatalf("GET %s changed:\nbefore %s\nafter  %s", path, before, after)
	}
}

// mustCreate POSTs body to path as token, requires a 201 and returns the id
// and the body.
func mustCreate(t testing.TB, s http.Handler, token, path string, body any) (int64, string) {
	t.Helper()
	res := do(t, s, req{method: "POST", path: path, token: token, body: body})
	if res.status != http.StatusCreated {
		t.Fatalf("POST %s: status %d: %s", path, res.status, res.body)
	}
	id, ok := res.object(t)["id"].(float64)
	if !ok || id < 1 {
		t.Fatalf("POST %s: no id in %s", path, res.body)
	}
	return int64(id), string(res.body)
}

// withChanges is base with changes applied over it: the key "-" names a
// key to drop, a nil value changes nothing, any other value replaces.
func withChanges(base, changes map[string]any) map[string]any {
	for k, v := range changes {
		if k == "-" {
			delete(base, v.(string))
			continue
		}
		if v != nil {
			base[k] = v
		}
	}
	return base
}

// picker returns pick, which picks ids by index, in the order given.
func picker(ids []int64) func(n ...int) []int64 {
	return func(n ...int) []int64 {
		out := []int64{}
		for _, i := range n {
			out = append(out, ids[i])
		}
		return out
	}
}

// resultIDs reads the ids of a list page's results, in order.
func resultIDs(t testing.TB, page map[string]any) []int64 {
	t.Helper()
	results, ok := page["results"].([]any)
	if !ok {
		t.Fatalf("no results array in %v", page)
	}
	ids := []int64{}
	for _, r := range results {
		ids = append(ids, int64(r.(map[string]any)["id"].(float64)))
	}
	return ids
}

// wantPage checks a whole list page: count, both links ("" for null) and the
// result ids in order.
func wantPage(t testing.TB, res response, count int, next, previous string, ids []int64) {
	t.Helper()
	if res.status != http.StatusOK {
		t.Fatalf("status %d, want 200; body %s", res.status, res.body)
	}
	page := res.object(t)
	if len(page) != 4 {
		t.Fatalf("page has keys other than count, next, previous, results: %s", res.body)
	}
	link := func(s string) any {
		if s == "" {
			return nil
		}
		return s
	}
	if page["count"] != float64(count) || page["next"] != link(next) || page["previous"] != link(previous) {
		t.Fatalf("page %s\nwant count %d, next %q, previous %q", res.body, count, next, previous)
	}
	if got := resultIDs(t, page); fmt.Sprint(got) != fmt.Sprint(ids) {
		t.Fatalf("result ids %v, want %v", got, ids)
	}
}

// wantOrderingRefused checks the 400 for an unknown ordering field f. The
// contract's template is `Invalid ordering field "…".`; the field may be
// quoted Go-style (escaping " and \) or written raw.
func wantOrderingRefused(t testing.TB, res response, f string) {
	t.Helper()
	raw := `Invalid ordering field "` + f + `".`
	quoted := fmt.Sprintf("Invalid ordering field %q.", f)
	body := res.object(t)
	if res.status != 400 || len(body) != 1 || !(jsonEqual(body["ordering"], []any{raw}) || jsonEqual(body["ordering"], []any{quoted})) {
		t.Fatalf("ordering %q: status %d, body %s", f, res.status, res.body)
	}
}

// wantTablesIntact fails unless every table the API uses still exists.
func wantTablesIntact(t testing.TB) {
	t.Helper()
	needDB(t)
	for _, table := range []string{"users", "patients", "doctors", "mappings", "logins", "refresh_tokens"} {
		var exists bool
		if err := testDB.QueryRow(`SELECT to_regclass($1) IS NOT NULL`, "public."+table).Scan(&exists); err != nil || !exists {
			t.Fatalf("table %s: exists %v, err %v", table, exists, err)
		}
	}
}

func TestHealthAndReady(t *testing.T) {
	s := newTestServer(t, nil)
	for _, path := range []string{"/healthz", "/readyz"} {
		t.Run(path, func(t *testing.T) {
			// Load balancers call these by IP: no Host check, no token.
			res := do(t, s, req{method: "GET", path: path, header: map[string]string{"Host": "10.0.0.7"}})
			wantJSON(t, res, http.StatusOK, `{"status": "ok"}`)
		})
	}
}

// TestReadyzAsksOncePerSecond: /readyz asks PostgreSQL at most once a
// second, however often it is called. With the pool closed after the first
// probe, the probes of that second still answer its 200; the next second
// asks again and hears that the database is gone.
func TestReadyzAsksOncePerSecond(t *testing.T) {
	needDB(t)
	db, err := openDB(t.Context(), testDBConfig, 2, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	s := newTestServerOn(t, db, slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	probe := func() response { return do(t, s, req{method: "GET", path: "/readyz"}) }
	// A prober that has hung up leaves no answer behind for the others.
	gone, cancel := context.WithCancel(t.Context())
	cancel()
	doRequest(t, s, httptest.NewRequestWithContext(gone, "GET", "http://localhost/readyz", nil))
	wantJSON(t, probe(), 200, `{"status": "ok"}`)
	db.Close()
	for range 20 {
		wantJSON(t, probe(), 200, `{"status": "ok"}`)
	}
	time.Sleep(1100 * time.Millisecond)
	wantJSON(t, probe(), 503, `{"status": "unavailable"}`)
}

// scratchDB is a database of its own for a test that changes the schema or
// the statistics, dropped after the test: made by this server (schema.sql)
// when step is -1, else by upgrades.sql's steps up to step, as the server
// of that step made a new database.
func scratchDB(t testing.TB, suffix string, step int) *sql.DB {
	t.Helper()
	needDB(t)
	cfg := testDBConfig
	cfg.Database += suffix
	db, err := openDB(t.Context(), cfg, 2, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	schema := ""
	if step < 0 {
		schema, step = schemaSQL, len(schemaSteps)
	}
	if _, err := migrate(t.Context(), db, schema, schemaSteps[:step]); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		db.Close()
		admin := cfg
		admin.Database = "postgres"
		if a, err := connect(admin, 1); err == nil {
			a.ExecContext(context.Background(), "DROP DATABASE IF EXISTS "+pq.QuoteIdentifier(cfg.Database)+" WITH (FORCE)")
			a.Close()
		}
	})
	return db
}

// TestGenericPlanUsesOwnerIndex checks the plan every connection keeps for
// an owner's list (plan_cache_mode=force_generic_plan) when one owner has
// nearly all the rows: without schema.sql's n_distinct, PostgreSQL assumes
// every owner holds half the table and counts an owner's rows with a
// sequential scan of everyone's, whichever owner asks.
func TestGenericPlanUsesOwnerIndex(t *testing.T) {
	ctx := t.Context()
	db := scratchDB(t, "_plans", -1)
	conn, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for _, q := range []string{
		`INSERT INTO users (id, username, email, name, password) VALUES (1, 'a', 'a@example.com', 'A', '!'), (2, 'b', 'b@example.com', 'B', '!')`,
		`INSERT INTO patients (owner_id, first_name, email) SELECT CASE WHEN g <= 50 THEN 1 ELSE 2 END, 'P', 'p' || g || '@example.com' FROM generate_series(1, 20000) g`,
		`ANALYZE patients`,
		// A page as listPage sends it when it must count the rows (a search).
		`PREPARE list(bigint) AS WITH total(n) AS (SELECT count(*) FROM patients WHERE owner_id = $1)
			SELECT (SELECT n FROM total), ` + patientColumns + ` FROM patients WHERE owner_id = $1 ORDER BY id LIMIT 10`,
	} {
		if _, err := conn.ExecContext(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	rows, err := conn.QueryContext(ctx, `EXPLAIN EXECUTE list(1)`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var plan strings.Builder
	for rows.Next() {
		var line string
		if err := rows.Scan(&line); err != nil {
			t.Fatal(err)
		}
		plan.WriteString(line + "\n")
	}
	if strings.Contains(plan.String(), "Seq Scan") || strings.Count(plan.String(), "using patients_owner_id_key") != 2 ||
		!strings.Contains(plan.String(), "$1") {
		t.Fatalf("generic plan for an owner's list:\n%s", plan.String())
	}
}

// TestSchemaUpgrade builds a database with the schema.sql of the last
// server before steps (testdata), shaped further back still: before
// mappings carried owner_id, while patient counts were kept by a trigger,
// and before logins had an end. migrate must bring it to the last step with
// every row kept, and change nothing when run again.
func TestSchemaUpgrade(t *testing.T) {
	ctx := t.Context()
	db := scratchDB(t, "_upgrade", 0)
	exec := func(q string) {
		t.Helper()
		if _, err := db.ExecContext(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	before, err := os.ReadFile("testdata/schema-before-steps.sql")
	if err != nil {
		t.Fatal(err)
	}
	exec(string(before))
	exec(`ALTER TABLE mappings DROP COLUMN owner_id;
		ALTER TABLE mappings ADD CONSTRAINT mappings_patient_id_fkey FOREIGN KEY (patient_id) REFERENCES patients (id) ON DELETE CASCADE;
		ALTER TABLE sessions DROP COLUMN expires_at;
		DROP TRIGGER users_password_version ON users;
		ALTER TABLE users DROP COLUMN password_version, DROP COLUMN last_login;
		CREATE TABLE patient_counts (owner_id bigint, slot int, n bigint);
		CREATE FUNCTION count_patients() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
		CREATE TRIGGER patients_count AFTER INSERT ON patients FOR EACH ROW EXECUTE FUNCTION count_patients();
		INSERT INTO users (id, username, email, name, password) VALUES (1, 'a', 'a@example.com', 'A', '!'), (2, 'b', 'b@example.com', 'B', '!');
		INSERT INTO sessions (user_id) VALUES (1);
		INSERT INTO patients (id, owner_id, first_name, email) VALUES
			(1, 1, 'P', 'p1@example.com'), (2, 1, 'P', 'p2@example.com'), (3, 1, 'P', 'p3@example.com'),
			(4, 2, 'P', 'p4@example.com'), (5, 2, 'P', 'p5@example.com');
		INSERT INTO doctors (id, first_name, email, specialization) VALUES (1, 'D', 'd@example.com', 'Cardiology');
		INSERT INTO mappings (patient_id, doctor_id) VALUES (2, 1), (4, 1);
		INSERT INTO audit_events (user_id, action, ip, request_id) VALUES (1, 'login', '192.0.2.1', 'r1');`)
	check := func() {
		t.Helper()
		var got string
		err := db.QueryRowContext(ctx, `SELECT
			(SELECT string_agg(id || ':' || owner_id, ' ' ORDER BY id) FROM mappings) || ' / ' ||
			(SELECT string_agg(conname, ' ' ORDER BY conname) FROM pg_constraint
			 WHERE conrelid = 'mappings'::regclass AND contype = 'f') || ' / ' ||
			(SELECT count(*) FROM pg_class WHERE relname = 'patient_counts') || ' ' ||
			(SELECT count(*) FROM pg_trigger WHERE tgname = 'patients_count') || ' / ' ||
			(SELECT count(*) FROM logins WHERE expires_at > now() + interval '29 days') || ' / ' ||
			(SELECT string_agg(id || ':' || password_version || ':' || coalesce(last_login::text, '-'), ' ' ORDER BY id) FROM users) || ' ' ||
			(SELECT count(*) FROM pg_trigger WHERE tgname = 'users_password_version') || ' / ' ||
			(SELECT count(*) FROM patients) || ' ' || (SELECT count(*) FROM audit_events) || ' / ' ||
			(SELECT string_agg(step::text, ',' ORDER BY step) FROM schema_migrations)`).Scan(&got)
		want := "1:1 2:2 / mappings_doctor_id_fkey mappings_patient / 0 0 / 1 / 1:0:- 2:0:- 1 / 5 1 / " + stepList(len(schemaSteps))
		if err != nil || got != want {
			t.Fatalf("after upgrade: %q, %v; want %q", got, err, want)
		}
	}
	for range 2 { // the second run must change nothing
		s, err := migrate(ctx, db, schemaSQL, schemaSteps)
		if err != nil || s.at != len(schemaSteps) {
			t.Fatalf("migrate: step %d, %v; want step %d", s.at, err, len(schemaSteps))
		}
		check()
	}
	// The database, not the handler, keeps a mapping's owner its patient's.
	_, err = db.ExecContext(ctx, `INSERT INTO mappings (owner_id, patient_id, doctor_id) VALUES (2, 3, 1)`)
	if pq.As(err, pqerror.ForeignKeyViolation) == nil {
		t.Fatalf("mapping of user 1's patient under owner 2: %v, want a foreign key violation", err)
	}
}

// stepList is "1,2,…,n".
func stepList(n int) string {
	var steps []string
	for i := 1; i <= n; i++ {
		steps = append(steps, strconv.Itoa(i))
	}
	return strings.Join(steps, ",")
}
