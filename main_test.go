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
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/lib/pq"
	"github.com/lib/pq/pqerror"
)

// testDB is the throw-away database TestMain creates for this run. Every
// test server shares it; tests keep apart by registering their own users.
var (
	testDB       *sql.DB
	testDBConfig pq.Config
)

// testSecret is the SECRET_KEY of test servers (and of tokens tests forge).
const testSecret = "test-secret-key-0123456789abcdef-0123456789"

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

// runTests creates a database named for this run, runs the tests against
// it and drops it, whatever the outcome.
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
	testDB, err = openDB(ctx, cfg.db, 16)
	if err != nil {
		fmt.Fprintln(os.Stderr, "test database (is PostgreSQL running on localhost:5432?):", err)
		return 1
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
	cfg, _, err := loadConfig(testEnv(vars))
	if err != nil {
		t.Fatalf("loadConfig: %v", err)
	}
	cfg.passwordIterations = testIterations
	for _, e := range edit {
		e(&cfg)
	}
	srv, err := newServer(cfg, testDB, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatalf("newServer: %v", err)
	}
	return srv
}

// response is what a test request got back.
type response struct {
	status int
	header http.Header
	body   []byte
}

// json decodes the body into a generic value, failing the test when it is
// not JSON.
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
	w := httptest.NewRecorder()
	s.ServeHTTP(w, r)
	return response{status: w.Code, header: w.Result().Header, body: w.Body.Bytes()}
}

// wantJSON fails unless got has the status and its body equals the JSON in
// want (compared as decoded values, so key order does not matter).
func wantJSON(t testing.TB, got response, status int, want string) {
	t.Helper()
	if got.status != status {
		t.Fatalf("status %d, want %d; body %s", got.status, status, got.body)
	}
	var w any
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("bad want JSON %q: %v", want, err)
	}
	g := got.json(t)
	if !jsonEqual(g, w) {
		t.Fatalf("body %s\nwant %s", got.body, want)
	}
}

func jsonEqual(a, b any) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return bytes.Equal(x, y)
}

var userSeq atomic.Int64

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
	var suffix [4]byte
	rand.Read(suffix[:])
	n := fmt.Sprintf("%d%x", userSeq.Add(1), suffix)
	// The password shares few characters with the username, or Django's
	// similarity validator would refuse it.
	a := account{username: "user" + n, email: "user" + n + "@example.com", password: "Harbor-Lantern-Quiet-Moss"}
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

// scratchDB is a database of its own for a test that changes the schema or
// the statistics, created with schema.sql and dropped after the test.
func scratchDB(t *testing.T, suffix string) *sql.DB {
	t.Helper()
	cfg := testDBConfig
	cfg.Database += suffix
	db, err := openDB(t.Context(), cfg, 2)
	if err != nil {
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
	db := scratchDB(t, "_plans")
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

// TestSchemaUpgrade applies schema.sql to a database shaped as before
// mappings carried owner_id, while patient counts were kept by a trigger,
// and before logins had an end: the upgrade must fill owner_id in, drop the
// counts, give old logins an end, and change nothing when run again.
func TestSchemaUpgrade(t *testing.T) {
	ctx := t.Context()
	db := scratchDB(t, "_upgrade")
	exec := func(q string) {
		t.Helper()
		if _, err := db.ExecContext(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	exec(`ALTER TABLE mappings DROP COLUMN owner_id;
		ALTER TABLE mappings ADD CONSTRAINT mappings_patient_id_fkey FOREIGN KEY (patient_id) REFERENCES patients (id) ON DELETE CASCADE;
		ALTER TABLE sessions DROP COLUMN expires_at;
		CREATE TABLE patient_counts (owner_id bigint, slot int, n bigint);
		CREATE FUNCTION count_patients() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
		CREATE TRIGGER patients_count AFTER INSERT ON patients FOR EACH ROW EXECUTE FUNCTION count_patients();
		INSERT INTO users (id, username, email, name, password) VALUES (1, 'a', 'a@example.com', 'A', '!'), (2, 'b', 'b@example.com', 'B', '!');
		INSERT INTO sessions (user_id) VALUES (1);
		INSERT INTO patients (id, owner_id, first_name, email) VALUES
			(1, 1, 'P', 'p1@example.com'), (2, 1, 'P', 'p2@example.com'), (3, 1, 'P', 'p3@example.com'),
			(4, 2, 'P', 'p4@example.com'), (5, 2, 'P', 'p5@example.com');
		INSERT INTO doctors (id, first_name, email, specialization) VALUES (1, 'D', 'd@example.com', 'Cardiology');
		INSERT INTO mappings (patient_id, doctor_id) VALUES (2, 1), (4, 1);`)
	check := func() {
		t.Helper()
		var got string
		err := db.QueryRowContext(ctx, `SELECT
			(SELECT string_agg(id || ':' || owner_id, ' ' ORDER BY id) FROM mappings) || ' / ' ||
			(SELECT string_agg(conname, ' ' ORDER BY conname) FROM pg_constraint
			 WHERE conrelid = 'mappings'::regclass AND contype = 'f') || ' / ' ||
			(SELECT count(*) FROM pg_class WHERE relname = 'patient_counts') || ' ' ||
			(SELECT count(*) FROM pg_trigger WHERE tgname = 'patients_count') || ' / ' ||
			(SELECT count(*) FROM sessions WHERE expires_at > now() + interval '29 days')`).Scan(&got)
		if want := "1:1 2:2 / mappings_doctor_id_fkey mappings_patient / 0 0 / 1"; err != nil || got != want {
			t.Fatalf("after upgrade: %q, %v; want %q", got, err, want)
		}
	}
	for range 2 { // the second run must change nothing
		if err := migrate(ctx, db); err != nil {
			t.Fatalf("migrate: %v", err)
		}
		check()
	}
	// The database, not the handler, keeps a mapping's owner its patient's.
	_, err := db.ExecContext(ctx, `INSERT INTO mappings (owner_id, patient_id, doctor_id) VALUES (2, 3, 1)`)
	if _, ok := violation(err, pqerror.ForeignKeyViolation); !ok {
		t.Fatalf("mapping of user 1's patient under owner 2: %v, want a foreign key violation", err)
	}
}
