package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/lib/pq/pqerror"
)

// TestSchemaStepsNumbered: upgrades.sql's steps are numbered 1, 2, … in
// order, so the splitter's count is the step a server needs; schema.sql
// holds no step and no history (no ALTER … ADD, DROP, DO or redefinition).
func TestSchemaStepsNumbered(t *testing.T) {
	if m := regexp.MustCompile(`(?im)^-- step|\b(ALTER\b.*\bADD|DROP|DO \$|OR REPLACE)\b.*|\bIF (NOT )?EXISTS \w.*`).FindAllString(schemaSQL, -1); len(m) != 1 || m[0] != "IF NOT EXISTS pg_trgm;" {
		t.Errorf("schema.sql: %q, want only the extension's IF NOT EXISTS", m)
	}
	var got []string
	for _, m := range regexp.MustCompile(`(?m)^-- step (\d+)`).FindAllStringSubmatch(upgradesSQL, -1) {
		got = append(got, m[1])
	}
	if want := stepList(len(schemaSteps)); strings.Join(got, ",") != want || len(got) == 0 {
		t.Fatalf("steps %v, want %s", got, want)
	}
}

// appRole creates a fresh LOGIN NOSUPERUSER role for the test and drops it
// after; call it before scratchDB, so that the database (and the grants in
// it) goes first.
func appRole(t testing.TB) string {
	t.Helper()
	needDB(t)
	role := uniqueName("hc_app_")
	if _, err := testDB.ExecContext(t.Context(), `CREATE ROLE `+pq.QuoteIdentifier(role)+` LOGIN NOSUPERUSER`); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := testDB.ExecContext(context.Background(), `DROP ROLE `+pq.QuoteIdentifier(role)); err != nil {
			t.Errorf("drop role %s: %v", role, err)
		}
	})
	return role
}

// connectAs opens db's database as role.
func connectAs(t testing.TB, db *sql.DB, role string) *sql.DB {
	t.Helper()
	cfg := testDBConfig
	if err := db.QueryRowContext(t.Context(), `SELECT current_database()`).Scan(&cfg.Database); err != nil {
		t.Fatal(err)
	}
	cfg.User = role
	app, err := openDB(t.Context(), cfg, 4, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { app.Close() })
	return app
}

// TestLeastPrivilege grants a fresh role with migrate's DB_APP_ROLE, serves
// the whole API as that role, then attacks the audit trail and the schema
// as it: every attempt must fail with permission denied or must-be-owner.
func TestLeastPrivilege(t *testing.T) {
	ctx := t.Context()
	role := appRole(t)
	owner := scratchDB(t, "_leastpriv", -1)
	// What an extension locks away, a function PUBLIC may run by default,
	// and a right given by hand before: the grant must take the last two and
	// not give the first.
	for _, q := range []string{
		`CREATE FUNCTION locked_away() RETURNS int LANGUAGE sql AS 'SELECT 1'`,
		`REVOKE EXECUTE ON FUNCTION locked_away() FROM PUBLIC`,
		`CREATE FUNCTION needless() RETURNS int LANGUAGE sql AS 'SELECT 1'`,
		`GRANT CREATE ON SCHEMA public TO ` + pq.QuoteIdentifier(role),
		`GRANT CREATE ON DATABASE ` + pq.QuoteIdentifier(testDBConfig.Database+"_leastpriv") + ` TO ` + pq.QuoteIdentifier(role),
	} {
		if _, err := owner.ExecContext(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	var out bytes.Buffer
	if err := runMigrate(ctx, owner, role, &out); err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("granted role %q what serving needs\nschema at step %d\n", role, len(schemaSteps)); out.String() != want {
		t.Fatalf("migrate printed %q, want %q", out.String(), want)
	}
	db := connectAs(t, owner, role)
	if _, err := ensureSchema(ctx, db); err != nil {
		t.Fatalf("ensureSchema as %s: %v", role, err)
	}
	s := newTestServerOn(t, db, slog.New(slog.NewTextHandler(io.Discard, nil)), nil)

	t.Run("the whole API", func(t *testing.T) {
		a := register(t, s)
		pid, _ := mustCreate(t, s, a.access, patientsPath, adaBody(uniqueName("p")+"@example.com"))
		did, _ := mustCreate(t, s, a.access, doctorsPath, doctorBody(uniqueName("d")+"@example.com", "House", "Nephrology"))
		// Each answer is checked by the members that show the work was done.
		members := func(status int, want map[string]any) func(*testing.T, response) {
			return func(t *testing.T, res response) {
				t.Helper()
				got := wantObject(t, res, status)
				for k, v := range want {
					if !jsonEqual(got[k], v) {
						t.Fatalf("%s: %v, want %v; body %s", k, got[k], v, res.body)
					}
				}
			}
		}
		steps := []struct {
			method, path string
			body         any
			check        func(*testing.T, response)
		}{
			{"GET", "/api/auth/me/", nil, members(200, map[string]any{"id": float64(a.id), "username": a.username})},
			{"GET", patientPath(pid), nil, members(200, map[string]any{"id": float64(pid), "first_name": "Ada"})},
			{"PATCH", patientPath(pid), map[string]any{"phone": "+1 555 010 0199"}, members(200, map[string]any{"phone": "+1 555 010 0199"})},
			{"GET", patientsPath + "?search=ada", nil, members(200, map[string]any{"count": float64(1)})},
			{"PUT", doctorPath(did), doctorBody(uniqueName("d")+"@example.com", "Wilson", "Oncology"), members(200, map[string]any{"last_name": "Wilson"})},
			{"POST", mappingsPath, map[string]any{"patient": pid, "doctor": did}, members(201, map[string]any{"patient": float64(pid), "doctor": float64(did)})},
			{"GET", mappingsPath, nil, members(200, map[string]any{"count": float64(1)})},
			{"GET", mappingsPath + strconv.FormatInt(pid, 10) + "/", nil, func(t *testing.T, res response) {
				if list, ok := res.json(t).([]any); res.status != 200 || !ok || len(list) != 1 {
					t.Fatalf("status %d, body %s; want an array of one mapping", res.status, res.body)
				}
			}},
			// patient.create, .read, .update, .list; doctor.create, .update; mapping.create, two mapping.list
			{"GET", "/api/audit/", nil, func(t *testing.T, res response) {
				if n := len(wantObject(t, res, 200)["results"].([]any)); n != 10 {
					t.Fatalf("%d events, want 10: %s", n, res.body)
				}
			}},
			{"DELETE", patientPath(pid), nil, func(t *testing.T, res response) { wantNoContent(t, res) }},
			{"DELETE", doctorPath(did), nil, func(t *testing.T, res response) { wantNoContent(t, res) }},
			{"POST", "/api/auth/login/", map[string]any{"username": a.username, "password": "wrong-password-1"},
				func(t *testing.T, res response) { wantJSON(t, res, 401, badCredentialsBody) }},
			{"POST", "/api/auth/token/refresh/", map[string]any{"refresh": a.refresh}, func(t *testing.T, res response) { pairOf(t, res) }},
			{"POST", "/api/auth/logout/", map[string]any{"refresh": a.refresh}, func(t *testing.T, res response) { wantNoContent(t, res) }},
		}
		for _, st := range steps {
			t.Logf("%s %s as %s", st.method, st.path, role)
			st.check(t, do(t, s, req{method: st.method, path: st.path, token: a.access, body: st.body}))
		}
		b := register(t, s)
		changed := pairOf(t, do(t, s, req{method: "POST", path: "/api/auth/password/", token: b.access, body: map[string]any{
			"old_password": b.password, "new_password": "Quiet-Harbor-Meadow-42"}}))
		wantJSON(t, do(t, s, req{method: "POST", path: "/api/auth/logout/all/", token: b.access}), 401, invalidAccessBody)
		wantNoContent(t, do(t, s, req{method: "POST", path: "/api/auth/logout/all/", token: changed.Access}))
		if err := pruneLogins(ctx, db, 30); err != nil {
			t.Fatalf("prune as %s: %v", role, err)
		}
		var left int
		if err := owner.QueryRowContext(ctx, `SELECT count(*) FROM logins WHERE ended_at IS NOT NULL`).Scan(&left); err != nil || left != 0 {
			t.Fatalf("ended logins after prune: %d, %v", left, err)
		}
	})

	t.Run("attacks refused", func(t *testing.T) {
		attacks := []string{
			`UPDATE audit_events SET ip = '203.0.113.9'`,
			`DELETE FROM audit_events`,
			`TRUNCATE audit_events`,
			`ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only`,
			`ALTER TABLE audit_events DISABLE TRIGGER ALL`,
			`DROP TRIGGER audit_events_append_only ON audit_events`,
			`CREATE OR REPLACE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$`,
			`DROP FUNCTION login_live(bigint, bigint)`,
			`DELETE FROM schema_migrations`,
			`CREATE TABLE evil (id int)`,
			`CREATE FUNCTION public.lower(varchar) RETURNS text LANGUAGE sql AS $$SELECT 'x'$$`,
			`CREATE SCHEMA evil`,
			`SELECT locked_away()`,
			`SELECT needless()`,
			// A temporary table comes first in the search path: one named
			// audit_events would take the session's events.
			`CREATE TEMP TABLE audit_events (LIKE public.audit_events)`,
			`CREATE FUNCTION pg_temp.swallow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$`,
			// An event's id and time are the database's: none planted past
			// every page, none back-dated.
			`INSERT INTO audit_events (id, user_id, action, ip, request_id) VALUES (9223372036854775807, 1, 'login', '', 'planted')`,
			`INSERT INTO audit_events (at, user_id, action, ip, request_id) VALUES ('2000-01-01', 1, 'login', '', 'planted')`,
			`SET session_replication_role = replica`,
		}
		for _, table := range []string{"users", "login_names", "logins", "refresh_tokens", "patients", "doctors", "mappings", "audit_events", "schema_migrations"} {
			attacks = append(attacks, `ALTER TABLE `+table+` ADD COLUMN evil int`, `DROP TABLE `+table+` CASCADE`, `TRUNCATE `+table+` CASCADE`)
		}
		for _, q := range attacks {
			_, err := db.ExecContext(ctx, q)
			if pq.As(err, pqerror.InsufficientPrivilege) == nil {
				t.Errorf("%s as %s: %v, want permission denied or must be owner", q, role, err)
			}
		}
		var events int
		if err := owner.QueryRowContext(ctx, `SELECT count(*) FROM audit_events`).Scan(&events); err != nil || events < 10 {
			t.Fatalf("audit events after the attacks: %d, %v", events, err)
		}
	})

	t.Run("a schema behind stops start-up", func(t *testing.T) {
		if _, err := owner.ExecContext(ctx, `UPDATE schema_migrations SET step = step - 1 WHERE step = $1`, len(schemaSteps)); err != nil {
			t.Fatal(err)
		}
		_, err := ensureSchema(ctx, db)
		want := fmt.Sprintf(`database schema is at step %d, this server needs step %d: run "healthcare migrate" as the schema owner`, len(schemaSteps)-1, len(schemaSteps))
		if err == nil || err.Error() != want {
			t.Fatalf("ensureSchema as %s: %v, want %q", role, err, want)
		}
	})
}

// TestGrantRefusesPowerfulRoles: migrate refuses a role that could take
// back what the grant withholds, by itself or through any role it belongs
// to, naming why; each case is refused by its own rule.
func TestGrantRefusesPowerfulRoles(t *testing.T) {
	ctx := t.Context()
	cases := []struct{ name, setup, why string }{
		{"superuser", `ALTER ROLE {role} SUPERUSER`, "is a superuser"},
		{"createrole", `ALTER ROLE {role} CREATEROLE`, "can create roles"},
		{"replication", `ALTER ROLE {role} REPLICATION`, "can replicate the cluster"},
		{"createdb", `ALTER ROLE {role} CREATEDB`, "can create databases"},
		{"member of postgres", `GRANT postgres TO {role}`, "is a member of role postgres"},
		{"member of a group", `GRANT {group} TO {role}`, "is a member of role {group}"},
		{"server programs", `GRANT pg_execute_server_program TO {role}`, "is a member of role pg_execute_server_program"},
		{"database owner", `ALTER DATABASE {database} OWNER TO {role}`, "owns database {database}"},
		{"table owner", `ALTER TABLE login_names OWNER TO {role}`, "owns table login_names"},
	}
	roles := make([]string, len(cases))
	for i := range cases {
		roles[i] = appRole(t)
	}
	// A group that may do what the grant withholds: UPDATE the audit events.
	group := appRole(t)
	db := scratchDB(t, "_refuse", -1)
	database := testDBConfig.Database + "_refuse"
	if _, err := db.ExecContext(ctx, `GRANT UPDATE, DELETE, TRUNCATE ON audit_events TO `+group); err != nil {
		t.Fatal(err)
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			names := strings.NewReplacer("{role}", pq.QuoteIdentifier(roles[i]), "{group}", group, "{database}", database)
			setup := names.Replace(c.setup)
			if _, err := db.ExecContext(ctx, setup); err != nil {
				t.Fatalf("%s: %v", setup, err)
			}
			err := runMigrate(ctx, db, roles[i], io.Discard)
			want := fmt.Sprintf(`migrate: role %q %s, so no grant could limit it: serve as a role that owns nothing and belongs to no other (README, "Two roles")`,
				roles[i], names.Replace(c.why))
			if err == nil || err.Error() != want {
				t.Fatalf("migrate for %s:\n%v\nwant\n%s", roles[i], err, want)
			}
		})
	}
}

// TestGrantRefusesRightsBeyondServing: rights that reach the role by a path
// the grant does not take back (PUBLIC, a column, another schema, a
// parameter, another grantor) are found by PostgreSQL's own privilege
// checks after granting, and refused, naming the first, who granted it and
// the command that takes it back; the refusal grants nothing and takes
// nothing from PUBLIC.
func TestGrantRefusesRightsBeyondServing(t *testing.T) {
	ctx := t.Context()
	role, grantor := appRole(t), appRole(t)
	db := scratchDB(t, "_beyond", -1)
	r, g := pq.QuoteIdentifier(role), pq.QuoteIdentifier(grantor)
	owner := testDBConfig.User
	byPublic := func(right string) string {
		return fmt.Sprintf(`holds %s beyond what serving needs, granted to PUBLIC by role %q: run "REVOKE %s FROM PUBLIC" as role %q`, right, owner, right, owner)
	}
	for _, c := range []struct{ setup, undo, why string }{
		{`GRANT UPDATE (ip) ON audit_events TO PUBLIC`, `REVOKE UPDATE (ip) ON audit_events FROM PUBLIC`, byPublic("UPDATE (ip) ON TABLE audit_events")},
		{`GRANT INSERT (id) ON audit_events TO PUBLIC`, `REVOKE INSERT (id) ON audit_events FROM PUBLIC`, byPublic("INSERT (id) ON TABLE audit_events")},
		{`GRANT TRIGGER, REFERENCES ON audit_events TO PUBLIC`, `REVOKE ALL ON audit_events FROM PUBLIC`, byPublic("REFERENCES ON TABLE audit_events")},
		{`GRANT INSERT ON schema_migrations TO PUBLIC`, `REVOKE ALL ON schema_migrations FROM PUBLIC`, byPublic("INSERT ON TABLE schema_migrations")},
		{`GRANT TRUNCATE ON patients TO PUBLIC`, `REVOKE ALL ON patients FROM PUBLIC`, byPublic("TRUNCATE ON TABLE patients")},
		{`GRANT UPDATE ON SEQUENCE users_id_seq TO PUBLIC`, `REVOKE ALL ON SEQUENCE users_id_seq FROM PUBLIC`, byPublic("UPDATE ON SEQUENCE users_id_seq")},
		{`CREATE SCHEMA extra; GRANT CREATE ON SCHEMA extra TO ` + r, `DROP SCHEMA extra`,
			fmt.Sprintf(`holds CREATE ON SCHEMA extra beyond what serving needs, granted to it by role %q: run "REVOKE CREATE ON SCHEMA extra FROM %s" as role %q`, owner, role, owner)},
		// Another schema: a function anyone may run, as its owner.
		{`CREATE SCHEMA extra; GRANT USAGE ON SCHEMA extra TO PUBLIC;
			CREATE FUNCTION extra.erase() RETURNS void LANGUAGE sql SECURITY DEFINER AS 'DELETE FROM public.mappings'`, `DROP SCHEMA extra CASCADE`,
			byPublic("EXECUTE ON FUNCTION extra.erase()")},
		// A parameter: with session_replication_role, no trigger fires.
		{`GRANT SET ON PARAMETER session_replication_role TO ` + r, `REVOKE SET ON PARAMETER session_replication_role FROM ` + r,
			fmt.Sprintf(`holds SET ON PARAMETER session_replication_role beyond what serving needs, granted to it by role %q: run "REVOKE SET ON PARAMETER session_replication_role FROM %s" as role %q`, owner, role, owner)},
		// Another grantor, holding GRANT OPTION: the owner's REVOKE leaves its grant.
		{`GRANT UPDATE, DELETE ON audit_events TO ` + g + ` WITH GRANT OPTION; SET ROLE ` + g + `; GRANT DELETE ON audit_events TO ` + r + `; RESET ROLE`,
			`REVOKE ALL ON audit_events FROM ` + g + ` CASCADE`,
			fmt.Sprintf(`holds DELETE ON TABLE audit_events beyond what serving needs, granted to it by role %q: run "REVOKE DELETE ON TABLE audit_events FROM %s" as role %q`, grantor, role, grantor)},
	} {
		t.Run(c.why, func(t *testing.T) {
			if _, err := db.ExecContext(ctx, c.setup); err != nil {
				t.Fatalf("%s: %v", c.setup, err)
			}
			defer func() {
				if _, err := db.ExecContext(ctx, c.undo); err != nil {
					t.Fatalf("%s: %v", c.undo, err)
				}
			}()
			err := runMigrate(ctx, db, role, io.Discard)
			if want := fmt.Sprintf(`migrate: role %q %s`, role, c.why); err == nil || err.Error() != want {
				t.Fatalf("migrate:\n%v\nwant\n%s", err, want)
			}
			var granted, publicTemp bool
			if err := db.QueryRowContext(ctx, `SELECT has_table_privilege($1, 'users', 'SELECT'), has_database_privilege('public', current_database(), 'TEMPORARY')`, role).Scan(&granted, &publicTemp); err != nil || granted || !publicTemp {
				t.Fatalf("after the refusal: the role may read users %v, PUBLIC may make temporary tables %v (%v); want false, true", granted, publicTemp, err)
			}
		})
	}
	if err := runMigrate(ctx, db, role, io.Discard); err != nil {
		t.Fatalf("migrate once the extra rights are gone: %v", err)
	}
}

// TestMigrateCommand runs "healthcare migrate" through run: it creates the
// missing database, prints the step reached, and the second run does
// nothing; a role that does not exist is refused with a message.
func TestMigrateCommand(t *testing.T) {
	needDB(t)
	name := testDBConfig.Database + "_cmd"
	t.Cleanup(func() {
		testDB.ExecContext(context.Background(), `DROP DATABASE IF EXISTS `+pq.QuoteIdentifier(name)+` WITH (FORCE)`)
	})
	env := testEnv(map[string]string{"DB_NAME": name})
	var applied []string
	for i := range 2 {
		var out bytes.Buffer
		if err := run(t.Context(), []string{"migrate"}, env, &out, io.Discard); err != nil {
			t.Fatalf("run %d: %v", i+1, err)
		}
		want := fmt.Sprintf("schema at step %d\n", len(schemaSteps))
		if i == 0 { // the database was missing: run made it, and said so
			want = fmt.Sprintf(`"msg":"created database","database":%q,"host":%q}`+"\n", name, testDBConfig.Host) + want
		}
		if got := regexp.MustCompile(`^\{"time":"[^"]+","level":"INFO",`).ReplaceAllString(out.String(), ""); got != want {
			t.Fatalf("run %d printed %q, want %q", i+1, out.String(), want)
		}
		cfg := testDBConfig
		cfg.Database = name
		db, err := openDB(t.Context(), cfg, 1, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		var stamps string
		err = db.QueryRowContext(t.Context(), `SELECT string_agg(step || '@' || applied_at, ' ' ORDER BY step) FROM schema_migrations`).Scan(&stamps)
		db.Close()
		if err != nil {
			t.Fatal(err)
		}
		applied = append(applied, stamps)
	}
	if applied[0] != applied[1] {
		t.Fatalf("the second migrate changed schema_migrations:\n%s\n%s", applied[0], applied[1])
	}
	err := run(t.Context(), []string{"migrate"}, testEnv(map[string]string{"DB_NAME": name, "DB_APP_ROLE": "no_such_role_x"}), io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), `DB_APP_ROLE: role "no_such_role_x" does not exist`) {
		t.Fatalf("migrate with a missing role: %v", err)
	}
	if err := run(t.Context(), []string{"migrate", "now"}, env, io.Discard, io.Discard); err == nil ||
		err.Error() != `unknown command "migrate now": healthcare help lists the commands` {
		t.Fatalf("run with two arguments: %v, want an unknown command", err)
	}
	// Several at once on a database that does not exist yet: all succeed.
	racing := testDBConfig.Database + "_cmd_race"
	t.Cleanup(func() {
		testDB.ExecContext(context.Background(), `DROP DATABASE IF EXISTS `+pq.QuoteIdentifier(racing)+` WITH (FORCE)`)
	})
	errs := make(chan error, 4)
	for range cap(errs) {
		go func() {
			errs <- run(t.Context(), []string{"migrate"}, testEnv(map[string]string{"DB_NAME": racing}), io.Discard, io.Discard)
		}()
	}
	for range cap(errs) {
		if err := <-errs; err != nil {
			t.Errorf("racing migrate of a missing database: %v", err)
		}
	}
}

// TestMigrateRaceAndFailure: two migrations of an empty database at once
// both succeed and the schema is applied once, recorded at the last step; a
// failing step leaves the database at the last whole step.
func TestMigrateRaceAndFailure(t *testing.T) {
	ctx := t.Context()
	db := scratchDB(t, "_race", 0)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var s schemaState
			if s, errs[i] = migrate(ctx, db, schemaSQL, schemaSteps); errs[i] == nil && s.at != len(schemaSteps) {
				errs[i] = fmt.Errorf("reached step %d", s.at)
			}
		}()
	}
	wg.Wait()
	if errs[0] != nil || errs[1] != nil {
		t.Fatalf("racing migrations: %v, %v", errs[0], errs[1])
	}
	var steps string
	if err := db.QueryRowContext(ctx, `SELECT string_agg(step::text, ',' ORDER BY step) FROM schema_migrations`).Scan(&steps); err != nil || steps != strconv.Itoa(len(schemaSteps)) {
		t.Fatalf("steps recorded: %q, %v", steps, err)
	}
	bad := append(schemaSteps[:len(schemaSteps):len(schemaSteps)], `CREATE TABLE half_done (id int); SELECT 1/0;`)
	s, err := migrate(ctx, db, schemaSQL, bad)
	if err == nil || s.at != len(schemaSteps) || !strings.Contains(err.Error(), fmt.Sprintf("step %d: ", len(bad))) {
		t.Fatalf("failing step: step %d, %v", s.at, err)
	}
	var half bool
	if err := db.QueryRowContext(ctx, `SELECT to_regclass('half_done') IS NOT NULL`).Scan(&half); err != nil || half {
		t.Fatalf("a failed step left its table: %v, %v", half, err)
	}
}

// TestMigrateGivesWayToLongTransaction: a step that must wait for a table
// lock behind a long transaction gives up after lock_timeout (5 s) instead
// of queueing every request behind itself, and the database stays at its
// last whole step.
func TestMigrateGivesWayToLongTransaction(t *testing.T) {
	ctx := t.Context()
	db := scratchDB(t, "_waits", 1)
	reader, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Rollback()
	if _, err := reader.ExecContext(ctx, `LOCK TABLE audit_events IN ACCESS SHARE MODE`); err != nil {
		t.Fatal(err)
	}
	s, err := migrate(ctx, db, schemaSQL, schemaSteps)
	if s.at != 1 || pq.As(err, pqerror.LockNotAvailable) == nil {
		t.Fatalf("migrate beside a reader: step %d, %v; want step 1 and a lock timeout", s.at, err)
	}
	if _, err := reader.ExecContext(ctx, `SELECT count(*) FROM audit_events`); err != nil {
		t.Fatalf("the reader after the migration gave up: %v", err)
	}
}

// TestStartBesideLongTransaction holds ACCESS SHARE on every table, as a
// backup or a report does, while a second instance starts through run: it
// must start and answer, and the instance already serving must keep
// answering 2xx meanwhile. A start that took any table lock would queue
// behind the reader, and every request of the first instance behind it.
func TestStartBesideLongTransaction(t *testing.T) {
	ctx := t.Context()
	a := newTestServer(t, nil)
	acct := register(t, a)
	reader, err := testDB.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Rollback()
	if _, err := reader.ExecContext(ctx, `LOCK TABLE users, login_names, logins, refresh_tokens, patients, doctors,
		mappings, audit_events, schema_migrations IN ACCESS SHARE MODE`); err != nil {
		t.Fatal(err)
	}

	runCtx, stop := context.WithTimeout(ctx, 30*time.Second)
	defer stop()
	log := &urlWriter{url: make(chan string, 1)}
	env := testEnv(map[string]string{"ADDR": "127.0.0.1:0", "DB_NAME": testDBConfig.Database})
	done := make(chan error, 1)
	go func() { done <- run(runCtx, nil, env, log, io.Discard) }()

	var during []response
	var url string
	for url == "" {
		during = append(during, do(t, a, req{method: "GET", path: "/api/auth/me/", token: acct.access}))
		select {
		case url = <-log.url:
		case err := <-done:
			t.Fatalf("second instance stopped: %v", err)
		case <-runCtx.Done():
			t.Fatal("second instance did not start beside the reader")
		default:
		}
	}
	for i, res := range during {
		if body, ok := res.json(t).(map[string]any); res.status != http.StatusOK || !ok || body["id"] != float64(acct.id) {
			t.Fatalf("first instance, request %d while the second started: status %d: %s", i+1, res.status, res.body)
		}
	}
	res, err := http.Get(url + "readyz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	wantJSON(t, response{status: res.StatusCode, body: body}, 200, `{"status": "ok"}`)
	stop()
	if err := <-done; err != nil {
		t.Fatalf("second instance: %v", err)
	}
}

// urlWriter passes on the URL of run's "serving" log line.
type urlWriter struct{ url chan string }

func (w *urlWriter) Write(p []byte) (int, error) {
	if m := regexp.MustCompile(`"url":"([^"]+)"`).FindSubmatch(p); m != nil && bytes.Contains(p, []byte(`"serving"`)) {
		w.url <- string(m[1])
	}
	return len(p), nil
}

// TestMigrateRefusesCLocale: a database whose lower() folds only ASCII (here
// LC_CTYPE C) would let "Ädmin" and "ädmin" both register: migrate and start
// refuse it, saying how to make a UTF-8 one, and apply no step.
func TestMigrateRefusesCLocale(t *testing.T) {
	needDB(t)
	ctx := t.Context()
	name := testDBConfig.Database + "_c_locale"
	if _, err := testDB.ExecContext(ctx, `CREATE DATABASE `+pq.QuoteIdentifier(name)+` ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0`); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		testDB.ExecContext(context.Background(), `DROP DATABASE IF EXISTS `+pq.QuoteIdentifier(name)+` WITH (FORCE)`)
	})
	want := fmt.Sprintf(`database %q folds only ASCII letters in lower() (its LC_CTYPE is C, say), so names that differ in case alone would both register: as a superuser, CREATE DATABASE <name> ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8' TEMPLATE template0, and point DB_NAME at it`, name)
	err := run(ctx, []string{"migrate"}, testEnv(map[string]string{"DB_NAME": name}), io.Discard, io.Discard)
	if err == nil || err.Error() != "migrate: "+want {
		t.Fatalf("migrate:\n%v\nwant\nmigrate: %s", err, want)
	}
	// Were start to accept it, it would serve until the deadline.
	runCtx, stop := context.WithTimeout(ctx, 20*time.Second)
	defer stop()
	err = run(runCtx, nil, testEnv(map[string]string{"DB_NAME": name, "ADDR": "127.0.0.1:0"}), io.Discard, io.Discard)
	if err == nil || err.Error() != want {
		t.Fatalf("start:\n%v\nwant\n%s", err, want)
	}
	cfg := testDBConfig
	cfg.Database = name
	db, err := openDB(ctx, cfg, 1, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var tables int
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace`).Scan(&tables); err != nil || tables != 0 {
		t.Fatalf("relations made in the refused database: %d, %v", tables, err)
	}
}

// TestSchemaMessagesLeadToTheFix: a role that may not read the schema is
// told to have migrate grant it, never that the schema is at step 0; the
// migrate of a role that does not own the schema (README's "Run it"
// database, owned by postgres, then "Two roles") names the owner and the
// command that works.
func TestSchemaMessagesLeadToTheFix(t *testing.T) {
	ctx := t.Context()
	app, owner := appRole(t), appRole(t)
	db := scratchDB(t, "_msgs", -1)
	database, superuser := testDBConfig.Database+"_msgs", testDBConfig.User
	// README's step 1, on a database that exists already.
	if _, err := db.ExecContext(ctx, `ALTER SCHEMA public OWNER TO `+pq.QuoteIdentifier(owner)); err != nil {
		t.Fatal(err)
	}
	notOwner := func(role string) string {
		return fmt.Sprintf(`migrate: the schema of database %q belongs to role %q, not %q: run "DB_USER=%s healthcare migrate", or start from a database that %q owns (README, "Two roles")`,
			database, superuser, role, superuser, role)
	}
	asApp, asOwner := connectAs(t, db, app), connectAs(t, db, owner)
	for _, c := range []struct {
		name string
		err  func() error
		want string
	}{
		{"the app role starts", func() error { _, err := ensureSchema(ctx, asApp); return err },
			fmt.Sprintf(`role %q may not read this database's schema: run "DB_APP_ROLE=%s healthcare migrate" as the schema owner`, app, app)},
		{"the app role migrates", func() error { return runMigrate(ctx, asApp, "", io.Discard) }, notOwner(app)},
		{"the owner migrates", func() error { return runMigrate(ctx, asOwner, app, io.Discard) }, notOwner(owner)},
	} {
		if err := c.err(); err == nil || err.Error() != c.want {
			t.Errorf("%s:\n%v\nwant\n%s", c.name, err, c.want)
		}
	}
	// Before any table, the database's owner is the schema's.
	empty := scratchDB(t, "_msgs_empty", 0)
	if err := runMigrate(ctx, connectAs(t, empty, owner), "", io.Discard); err == nil ||
		err.Error() != strings.ReplaceAll(notOwner(owner), "_msgs", "_msgs_empty") {
		t.Errorf("the owner migrates an empty database of another:\n%v", err)
	}
	want := fmt.Sprintf(`database schema is at step 0, this server needs step %d: run "healthcare migrate" as the schema owner`, len(schemaSteps))
	if _, err := ensureSchema(ctx, connectAs(t, empty, app)); err == nil || err.Error() != want {
		t.Errorf("the app role starts on an empty database:\n%v\nwant\n%s", err, want)
	}
}

// TestStartLogsSchema: the first line a server logs names the database, the
// role, the step found and what start did, before any warning (here: no
// SECRET_KEY).
func TestStartLogsSchema(t *testing.T) {
	needDB(t)
	name := testDBConfig.Database + "_startlog"
	t.Cleanup(func() {
		testDB.ExecContext(context.Background(), `DROP DATABASE IF EXISTS `+pq.QuoteIdentifier(name)+` WITH (FORCE)`)
	})
	for i, want := range []struct {
		found   int
		applied []any // JSON numbers
	}{{0, []any{float64(len(schemaSteps))}}, {len(schemaSteps), []any{}}} {
		ctx, stop := context.WithTimeout(t.Context(), 30*time.Second)
		log := lineWriter{make(chan string, 100)}
		done := make(chan error, 1)
		go func() {
			done <- run(ctx, nil, testEnv(map[string]string{"DB_NAME": name, "ADDR": "127.0.0.1:0", "SECRET_KEY": ""}), log, io.Discard)
		}()
		var lines []string
		for len(lines) == 0 || !strings.Contains(lines[len(lines)-1], `"msg":"serving"`) {
			select {
			case line := <-log.lines:
				lines = append(lines, line)
			case err := <-done:
				t.Fatalf("start %d stopped: %v; logged %q", i+1, err, lines)
			}
		}
		stop()
		if err := <-done; err != nil {
			t.Fatalf("start %d: %v", i+1, err)
		}
		if created := fmt.Sprintf(`"msg":"created database","database":%q`, name); i == 0 && !strings.Contains(lines[0], created) {
			t.Fatalf("start 1, first line %s, want %s", lines[0], created)
		} else if i == 0 {
			lines = lines[1:] // then what start found and did
		}
		var first map[string]any
		if err := json.Unmarshal([]byte(lines[0]), &first); err != nil {
			t.Fatalf("start %d, first line %q: %v", i+1, lines[0], err)
		}
		delete(first, "time")
		if expect := map[string]any{"level": "INFO", "msg": "schema", "database": name, "role": testDBConfig.User,
			"found_step": float64(want.found), "applied": want.applied}; !jsonEqual(first, expect) {
			t.Fatalf("start %d, first line %s, want %v", i+1, lines[0], expect)
		}
	}
}

// lineWriter passes on each record run logs (slog writes one per call).
type lineWriter struct{ lines chan string }

func (w lineWriter) Write(p []byte) (int, error) {
	w.lines <- string(p)
	return len(p), nil
}

// TestTwoRolesAsReadmeSays follows README's "Two roles" with an owner that
// is no superuser and has installed pg_trgm (whose functions belong to the
// bootstrap superuser, so the owner cannot take them from PUBLIC): migrate
// grants, the app role starts, cannot make a temporary table, and a search
// through the trigram index still works.
func TestTwoRolesAsReadmeSays(t *testing.T) {
	ctx := t.Context()
	owner, app := appRole(t), appRole(t)
	name := testDBConfig.Database + "_tworoles"
	// README's step 1, as a superuser.
	if _, err := testDB.ExecContext(ctx, `CREATE DATABASE `+pq.QuoteIdentifier(name)+` OWNER `+pq.QuoteIdentifier(owner)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		testDB.ExecContext(context.Background(), `DROP DATABASE IF EXISTS `+pq.QuoteIdentifier(name)+` WITH (FORCE)`)
	})
	cfg := testDBConfig
	cfg.Database, cfg.User = name, owner
	asOwner, err := openDB(ctx, cfg, 2, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer asOwner.Close()
	if _, err := asOwner.ExecContext(ctx, `CREATE EXTENSION IF NOT EXISTS pg_trgm`); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := runMigrate(ctx, asOwner, app, &out); err != nil {
		t.Fatalf("migrate as the owner: %v", err)
	}
	if want := fmt.Sprintf("granted role %q what serving needs\nschema at step %d\n", app, len(schemaSteps)); out.String() != want {
		t.Fatalf("migrate printed %q, want %q", out.String(), want)
	}
	for _, q := range []string{
		`CREATE INDEX patients_trgm ON patients USING gin (first_name gin_trgm_ops)`,
		`INSERT INTO users (id, username, email, name, password) VALUES (1, 'a', 'a@example.com', 'A', '!')`,
		`INSERT INTO patients (owner_id, first_name, email) VALUES (1, 'Abcde', 'p@example.com')`,
	} {
		if _, err := asOwner.ExecContext(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	asApp := connectAs(t, asOwner, app)
	if s, err := ensureSchema(ctx, asApp); err != nil || s.found != len(schemaSteps) || s.role != app {
		t.Fatalf("start as the app role: %+v, %v", s, err)
	}
	if _, err := asApp.ExecContext(ctx, `CREATE TEMP TABLE audit_events (id int)`); pq.As(err, pqerror.InsufficientPrivilege) == nil {
		t.Fatalf("a temporary table as the app role: %v, want permission denied", err)
	}
	conn, err := asApp.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var plan, found string
	// A table this small is read whole unless the planner must use the index.
	const search = `SELECT first_name FROM patients WHERE first_name ILIKE '%bcd%'`
	if _, err := conn.ExecContext(ctx, `SET enable_seqscan = off`); err != nil {
		t.Fatal(err)
	}
	rows, err := conn.QueryContext(ctx, `EXPLAIN `+search)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var line string
		rows.Scan(&line)
		plan += line + "\n"
	}
	if rows.Close(); !strings.Contains(plan, "Index Scan on patients_trgm") {
		t.Fatalf("search plan as the app role:\n%s", plan)
	}
	if err := conn.QueryRowContext(ctx, search).Scan(&found); err != nil || found != "Abcde" {
		t.Fatalf("search as the app role: %q, %v", found, err)
	}
}

// startChange is a change to the database after migrate, and what the
// start refuses after it (after `role "<role>" `), then undone.
type startChange struct{ name, change, want, undo string }

// startRefuses migrates, starts as role, makes each change and starts
// again: the start must refuse it, as c.want says.
func startRefuses(t *testing.T, owner *sql.DB, role string, changes []startChange) {
	ctx := t.Context()
	app := connectAs(t, owner, role)
	r := pq.QuoteIdentifier(role)
	for _, c := range changes {
		t.Run(c.name, func(t *testing.T) {
			if err := runMigrate(ctx, owner, role, io.Discard); err != nil {
				t.Fatal(err)
			}
			if _, err := ensureSchema(ctx, app); err != nil {
				t.Fatalf("start after the grant: %v", err)
			}
			if _, err := owner.ExecContext(ctx, c.change); err != nil {
				t.Fatal(err)
			}
			_, err := ensureSchema(ctx, app)
			// Undone (migrate alone cannot take back a membership, a parameter's right, a setting, an ownership).
			owner.ExecContext(ctx, `REVOKE pg_write_all_data FROM `+r+`; REVOKE SET ON PARAMETER session_replication_role FROM `+r)
			if c.undo != "" {
				if _, err := owner.ExecContext(ctx, c.undo); err != nil {
					t.Fatalf("%s: %v", c.undo, err)
				}
			}
			if err == nil || err.Error() != fmt.Sprintf("role %q %s", role, c.want) {
				t.Fatalf("start:\n%v\nwant\nrole %q %s", err, role, c.want)
			}
		})
	}
}

// beyond is checkServing's message for a right beyond serving's, granted by
// the test's superuser to PUBLIC or to role.
func beyond(right, role string) string {
	to, from := "it", role
	if role == "PUBLIC" {
		to = "PUBLIC"
	}
	return fmt.Sprintf(`holds %s beyond what serving needs, granted to %s by role %q: run "REVOKE %s FROM %s" as role %q`, right, to, testDBConfig.User, right, from, testDBConfig.User)
}

// powerful ends checkServing's message for a role no grant could limit.
const powerful = `, so no grant could limit it: serve as a role that owns nothing and belongs to no other (README, "Two roles")`

// TestStartChecksRights: every start as a role that does not own the
// schema runs migrate's check. A right granted since migrate (a membership,
// a table's, a parameter's) or one taken since (a table's, EXECUTE on a
// function the statements call, as when a step was migrated without
// DB_APP_ROLE) refuses the start, naming the right and the command.
func TestStartChecksRights(t *testing.T) {
	role := appRole(t)
	owner := scratchDB(t, "_grants", -1)
	r := pq.QuoteIdentifier(role)
	migrateHint := fmt.Sprintf(`which serving needs: run "DB_APP_ROLE=%s healthcare migrate" as the schema owner`, role)
	startRefuses(t, owner, role, []startChange{
		{"pg_write_all_data", `GRANT pg_write_all_data TO ` + r, `is a member of role pg_write_all_data` + powerful, ""},
		{"UPDATE on the events", `GRANT UPDATE ON audit_events TO ` + r, beyond("UPDATE ON TABLE audit_events", role), ""},
		{"a grant option", `GRANT SELECT ON users TO ` + r + ` WITH GRANT OPTION`, beyond("GRANT OPTION FOR SELECT ON TABLE users", role),
			`REVOKE GRANT OPTION FOR SELECT ON TABLE users FROM ` + r},
		// Parameters are the cluster's: granted to this role alone, so that no other test sees it.
		{"a parameter", `GRANT SET ON PARAMETER session_replication_role TO ` + r, beyond("SET ON PARAMETER session_replication_role", role), ""},
		{"login_live", `REVOKE EXECUTE ON FUNCTION login_live(bigint, bigint) FROM ` + r, "lacks EXECUTE ON FUNCTION login_live(bigint,bigint), " + migrateHint, ""},
		{"a table", `REVOKE ALL ON login_attempts FROM ` + r, "lacks DELETE ON TABLE login_attempts, " + migrateHint, ""},
		{"a column", `REVOKE INSERT (request_id) ON audit_events FROM ` + r, "lacks INSERT (request_id) ON TABLE audit_events, " + migrateHint, ""},
	})
}

// TestStartChecksEveryRole: only a role that owns every table of the schema
// starts unchecked; a member of the owner, a superuser and a partial owner
// are refused. A setting the role's sessions start with (its own, or the
// database's session_replication_role, with which no trigger fires) is
// refused, naming the command that resets it (the undo: that command).
func TestStartChecksEveryRole(t *testing.T) {
	role := appRole(t)
	owner := scratchDB(t, "_everyrole", -1)
	r, by, database := pq.QuoteIdentifier(role), pq.QuoteIdentifier(testDBConfig.User), testDBConfig.Database+"_everyrole"
	d := pq.QuoteIdentifier(database)
	startRefuses(t, owner, role, []startChange{
		{"member of the owner", `GRANT ` + by + ` TO ` + r, "is a member of role " + testDBConfig.User + powerful, `REVOKE ` + by + ` FROM ` + r},
		{"superuser", `ALTER ROLE ` + r + ` SUPERUSER`, "is a superuser" + powerful, `ALTER ROLE ` + r + ` NOSUPERUSER`},
		{"owner of schema_migrations", `ALTER TABLE schema_migrations OWNER TO ` + r, "owns table schema_migrations" + powerful,
			`ALTER TABLE schema_migrations OWNER TO ` + by},
		{"the role's setting", `ALTER ROLE ` + r + ` SET session_replication_role = replica`,
			fmt.Sprintf(`starts its sessions with session_replication_role=replica (ALTER ROLE %s SET): run "ALTER ROLE %[1]s RESET session_replication_role"`, role),
			`ALTER ROLE ` + r + ` RESET session_replication_role`},
		{"the role's setting here", `ALTER ROLE ` + r + ` IN DATABASE ` + d + ` SET search_path = pg_temp`,
			fmt.Sprintf(`starts its sessions with search_path=pg_temp (ALTER ROLE %s IN DATABASE %s SET): run "ALTER ROLE %[1]s IN DATABASE %[2]s RESET search_path"`, role, database),
			`ALTER ROLE ` + r + ` IN DATABASE ` + d + ` RESET search_path`},
		{"the database's setting", `ALTER DATABASE ` + d + ` SET session_replication_role = replica`,
			fmt.Sprintf(`starts its sessions with session_replication_role=replica (ALTER ROLE ALL IN DATABASE %s SET): run "ALTER ROLE ALL IN DATABASE %[1]s RESET session_replication_role"`, database),
			`ALTER ROLE ALL IN DATABASE ` + d + ` RESET session_replication_role`},
	})
}

// TestStartChecksCatalogsAndExtensions: pg_catalog is checked as any other
// schema for what was made there since initdb, and for grants since on what
// initdb made, to the role or to PUBLIC. An extension's function passes
// with PUBLIC's right as the extension left it, and not with a grant to the
// role, a grant to PUBLIC since, or SECURITY DEFINER.
func TestStartChecksCatalogsAndExtensions(t *testing.T) {
	role := appRole(t)
	owner := scratchDB(t, "_catalogs", -1)
	r := pq.QuoteIdentifier(role)
	startRefuses(t, owner, role, []startChange{
		{"a function in pg_catalog", `CREATE FUNCTION pg_catalog.zz_wipe() RETURNS void LANGUAGE sql SECURITY DEFINER
			SET session_replication_role = replica AS $$DELETE FROM public.audit_events$$`,
			beyond("EXECUTE ON FUNCTION zz_wipe()", "PUBLIC"), `DROP FUNCTION pg_catalog.zz_wipe()`},
		{"pg_read_binary_file", `GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) TO ` + r,
			beyond("EXECUTE ON FUNCTION pg_read_binary_file(text)", role), `REVOKE EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) FROM ` + r},
		{"pg_sleep", `GRANT EXECUTE ON FUNCTION pg_catalog.pg_sleep(float8) TO ` + r,
			beyond("EXECUTE ON FUNCTION pg_sleep(double precision)", role), `REVOKE EXECUTE ON FUNCTION pg_catalog.pg_sleep(float8) FROM ` + r},
		{"pg_read_binary_file to PUBLIC", `GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) TO PUBLIC`,
			beyond("EXECUTE ON FUNCTION pg_read_binary_file(text)", "PUBLIC"), `REVOKE EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) FROM PUBLIC`},
		{"dblink_connect_u", `CREATE EXTENSION dblink; GRANT EXECUTE ON FUNCTION dblink_connect_u(text, text) TO ` + r,
			beyond("EXECUTE ON FUNCTION dblink_connect_u(text,text)", role), `DROP EXTENSION dblink`},
		{"dblink", `CREATE EXTENSION dblink; GRANT EXECUTE ON FUNCTION dblink_connect(text) TO ` + r,
			beyond("EXECUTE ON FUNCTION dblink_connect(text)", role), `DROP EXTENSION dblink`},
		{"adminpack to PUBLIC", `CREATE EXTENSION adminpack; GRANT EXECUTE ON FUNCTION pg_file_write(text, text, boolean) TO PUBLIC`,
			beyond("EXECUTE ON FUNCTION pg_file_write(text,text,boolean)", "PUBLIC"), `DROP EXTENSION adminpack`},
		{"a SECURITY DEFINER function added to pg_trgm", `CREATE FUNCTION public.evil() RETURNS void LANGUAGE sql SECURITY DEFINER
			AS 'DELETE FROM public.mappings'; ALTER EXTENSION pg_trgm ADD FUNCTION public.evil()`,
			beyond("EXECUTE ON FUNCTION evil()", "PUBLIC"), `ALTER EXTENSION pg_trgm DROP FUNCTION public.evil(); DROP FUNCTION public.evil()`},
	})
}

// TestGenericPlansUseIndexes: the statements the server sends for the audit
// trail's filters and for doctors by last name, planned as every connection
// plans them (generic plans, on tables of some size), each read through its
// own index. (A search is planned with its terms: TestSearchPlannedWithTerms.)
func TestGenericPlansUseIndexes(t *testing.T) {
	ctx := t.Context()
	db := scratchDB(t, "_indexplans", -1)
	s := newTestServerOn(t, db, slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	a := register(t, s)
	for _, q := range []string{
		`INSERT INTO doctors (first_name, last_name, email, specialization) SELECT 'D', 'L' || g % 997, 'd' || g || '@example.com', 'Oncology'
			FROM generate_series(1, 20000) g`,
		`INSERT INTO audit_events (user_id, login_id, action, patient_id, doctor_id, ip, request_id)
			SELECT $1, g % 500, CASE WHEN g % 100 = 0 THEN 'login' ELSE 'patient.read' END, g % 20000, nullif(g % 50, 0), 'ip', 'r'
			FROM generate_series(1, 50000) g`,
		`ANALYZE`,
	} {
		args := []any{a.id}
		if !strings.Contains(q, "$1") {
			args = nil
		}
		if _, err := db.ExecContext(ctx, q, args...); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	want := map[string]string{ // request → the index its plan must read
		"/api/audit/": "audit_events_user_id", "/api/audit/?patient=7": "audit_events_patient",
		"/api/audit/?doctor=7": "audit_events_doctor", "/api/audit/?login=7": "audit_events_login",
		"/api/audit/?action=login": "audit_events_action", "/api/audit/?cursor=PjU": "audit_events_user_id",
		"/api/doctors/?ordering=last_name": "doctors_last_name",
	}
	conn, err := db.Conn(ctx) // plan_cache_mode=force_generic_plan, as every connection (connect)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for path, index := range want {
		s.db.stmts.Clear()
		wantObject(t, do(t, s, req{method: "GET", path: path, token: a.access}), 200)
		var plans []string
		s.db.stmts.Range(func(k, _ any) bool {
			if q := k.(string); strings.Contains(q, "FROM audit_events\n") || strings.Contains(q, "last_name,") {
				conn.ExecContext(ctx, `DEALLOCATE ALL`)
				if _, err := conn.ExecContext(ctx, "PREPARE q AS "+q); err != nil {
					t.Fatalf("%s: %v", q, err)
				}
				var n int // every value '1': a generic plan is the same for any
				conn.QueryRowContext(ctx, `SELECT cardinality(parameter_types) FROM pg_prepared_statements WHERE name = 'q'`).Scan(&n)
				plans = append(plans, explain(t, conn, "EXPLAIN EXECUTE q("+strings.TrimSuffix(strings.Repeat("'1',", n), ",")+")"))
			}
			return true
		})
		if len(plans) != 1 || !strings.Contains(plans[0], " "+index+" ") {
			t.Errorf("%s: %d plans, want one reading %s:\n%s", path, len(plans), index, strings.Join(plans, "\n"))
		}
	}
}

// explain returns the lines of an EXPLAIN.
func explain(t *testing.T, conn *sql.Conn, q string) string {
	t.Helper()
	rows, err := conn.QueryContext(t.Context(), q)
	if err != nil {
		t.Fatalf("%s: %v", q, err)
	}
	lines, err := scanAll(rows, func(r rowScanner) (string, error) {
		var line string
		return line, r.Scan(&line)
	})
	if err != nil {
		t.Fatal(err)
	}
	return strings.Join(lines, "\n")
}

// TestSearchPlannedWithTerms: a search's statement, as the server sends it
// and in the transaction listPage runs it in (customPlan), reads the trigram
// index for a rare term, with the table's column statistics missing or
// fresh, the match the newest row (a walk in id order reads every row).
func TestSearchPlannedWithTerms(t *testing.T) {
	ctx := t.Context()
	db := scratchDB(t, "_searchplans", -1)
	s := newTestServerOn(t, db, slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	a := register(t, s)
	for _, q := range []string{
		`INSERT INTO doctors (first_name, last_name, email, specialization) SELECT 'Christopher', 'Okafor', 'christopher.okafor' || g || '@example.com', 'Oncology'
			FROM generate_series(1, 30000) g`,
		`INSERT INTO patients (owner_id, first_name, last_name, email) SELECT $1, 'Alexandra', 'Vandermeer', 'alexandra.vandermeer' || g || '@example.com'
			FROM generate_series(1, 30000) g`,
	} {
		args := []any{a.id}
		if !strings.Contains(q, "$1") {
			args = nil
		}
		if _, err := db.ExecContext(ctx, q, args...); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	cfg := testDBConfig
	cfg.Database += "_searchplans"
	cfg.Runtime = map[string]string{"plan_cache_mode": "force_generic_plan"} // as every connection (connect)
	connector, err := pq.NewConnectorConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	log := &stmtLog{}
	logged := sql.OpenDB(logConnector{connector, log})
	defer logged.Close()
	s.db = &database{DB: logged}
	want := map[string]string{ // request → the index its plan must read
		"/api/doctors/?search=okafor30000": "doctors_search", "/api/doctors/?search=christopher,okafor30000&ordering=last_name": "doctors_search",
		"/api/patients/?search=vandermeer30000": "patients_search", "/api/patients/?search=alexandra+vandermeer30000&ordering=-created_at": "patients_search",
	}
	for _, stats := range []string{"VACUUM", "ANALYZE"} { // sizes but no column statistics; then both
		if _, err := db.ExecContext(ctx, stats); err != nil {
			t.Fatal(err)
		}
		for path, index := range want {
			log.take()
			if got := wantObject(t, do(t, s, req{method: "GET", path: path, token: a.access}), 200); got["count"] != 1.0 {
				t.Errorf("%s: count %v, want 1", path, got["count"])
			}
			var q string
			sent := log.take()
			for i, line := range sent {
				if strings.Contains(line, "ILIKE") {
					q = line
					if i < 2 || sent[i-2] != "BEGIN" || sent[i-1] != customPlan {
						t.Errorf("%s: the search was not sent in a transaction planned with its terms: %q", path, sent[:i])
					}
				}
			}
			if q == "" {
				t.Fatalf("%s: no statement with ILIKE was sent", path)
			}
			var args []any
			for _, v := range log.args[q] {
				args = append(args, v.Value)
			}
			// EXPLAIN the very statement and arguments sent, as listPage runs it.
			tx, err := logged.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := tx.ExecContext(ctx, customPlan); err != nil {
				t.Fatal(err)
			}
			rows, err := tx.QueryContext(ctx, "EXPLAIN "+q, args...)
			if err != nil {
				t.Fatalf("%s: EXPLAIN: %v", path, err)
			}
			lines, _ := scanAll(rows, func(r rowScanner) (string, error) {
				var line string
				return line, r.Scan(&line)
			})
			tx.Rollback()
			plan := strings.Join(lines, "\n")
			if !strings.Contains(plan, "Bitmap Index Scan on "+index+" ") || regexp.MustCompile(`Seq Scan|Index Scan using|Index Only Scan`).MatchString(plan) {
				t.Errorf("after %s, %s: a walk, or no read of %s:\n%s", stats, path, index, plan)
			}
		}
	}
}
