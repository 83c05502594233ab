package main

import (
	"database/sql"
	"fmt"
	"io"
	"maps"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lib/pq"
)

// TestUpgradesReachSchema: databases made by the v4 server (steps 1–4), by
// the v5 server (steps 1–5) and by the last server before steps
// (testdata), each with rows in every table, upgraded by this server's
// migrate with DB_APP_ROLE, have exactly the catalog of a new database
// made from schema.sql and granted alike (compatObjects aside), and keep
// every row.
func TestUpgradesReachSchema(t *testing.T) {
	role := appRole(t)
	fresh := scratchDB(t, "_cat_fresh", -1)
	if err := runMigrate(t.Context(), fresh, role, io.Discard); err != nil {
		t.Fatal(err)
	}
	want := catalogOf(t, fresh)
	for _, c := range []struct {
		name string
		step int
	}{{"v4", 4}, {"v5", 5}, {"before steps", 0}} {
		t.Run(c.name, func(t *testing.T) {
			db := scratchDB(t, fmt.Sprintf("_cat_%d", c.step), c.step)
			if c.step == 0 {
				before, err := os.ReadFile("testdata/schema-before-steps.sql")
				if err != nil {
					t.Fatal(err)
				}
				mustExec(t, db, string(before))
			}
			fillEveryTable(t, db, c.step)
			rows := rowsOf(t, db, c.step, false)
			if err := runMigrate(t.Context(), db, role, io.Discard); err != nil {
				t.Fatal(err)
			}
			if after := rowsOf(t, db, c.step, true); after != rows {
				t.Errorf("rows before the upgrade:\n%s\nafter:\n%s", rows, after)
			}
			got := catalogOf(t, db)
			for _, key := range compatObjects(t) {
				if _, ok := got[key]; !ok {
					t.Errorf("compatibility object %q missing", key)
				}
				delete(got, key)
			}
			for _, key := range slices.Sorted(maps.Keys(mergeKeys(got, want))) {
				if got[key] != want[key] {
					t.Errorf("%s:\n upgraded: %s\n new:      %s", key, got[key], want[key])
				}
			}
		})
	}
}

// compatObjects are the catalog keys of the objects the last step keeps
// for the previous version's instances, listed in its "-- compat:" line:
// the one difference allowed between an upgraded database and a new one.
func compatObjects(t *testing.T) []string {
	t.Helper()
	m := regexp.MustCompile(`(?m)^-- compat: (.+)$`).FindStringSubmatch(schemaSteps[len(schemaSteps)-1])
	if m == nil {
		return nil
	}
	return strings.Split(m[1], ", ")
}

// mergeKeys is a map with the keys of both.
func mergeKeys(a, b map[string]string) map[string]string {
	m := maps.Clone(a)
	maps.Copy(m, b)
	return m
}

func mustExec(t *testing.T, db *sql.DB, q string, args ...any) {
	t.Helper()
	if _, err := db.ExecContext(t.Context(), q, args...); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
}

// fillEveryTable writes rows in every table a database at step has.
func fillEveryTable(t *testing.T, db *sql.DB, step int) {
	t.Helper()
	mustExec(t, db, `INSERT INTO users (username, email, name, password) VALUES ('ada', 'ada@example.com', 'Ada', '!'), ('bob', 'bob@example.com', 'Bob', '!');
		UPDATE users SET password = '!!' WHERE id = 2;
		INSERT INTO login_names (name, user_id) VALUES ('ada', 1), ('ada@example.com', 1), ('bob', 2), ('bob@example.com', 2);
		INSERT INTO sessions (user_id, expires_at) VALUES (1, now() + interval '1 day'), (2, now() + interval '2 days');
		UPDATE sessions SET ended_at = now() WHERE id = 2;
		INSERT INTO refresh_tokens (jti, session_id, expires_at) VALUES (repeat('a', 32), 1, now() + interval '1 day'), (repeat('b', 32), 2, now() + interval '2 days');
		INSERT INTO patients (owner_id, first_name, email) VALUES (1, 'Pat', 'pat@example.com'), (2, 'Sam', 'sam@example.com');
		INSERT INTO doctors (created_by, first_name, email, specialization) VALUES (1, 'Dee', 'dee@example.com', 'Cardiology');
		INSERT INTO mappings (owner_id, patient_id, doctor_id) VALUES (1, 1, 1), (2, 2, 1);
		INSERT INTO audit_events (user_id, login_id, action, patient_id, ip, request_id, at)
			VALUES (1, 1, 'patient.create', 1, '192.0.2.1', 'r1', now() - interval '1 hour'), (1, 1, 'login', NULL, '192.0.2.1', 'r2', now())`)
	if step >= 4 {
		mustExec(t, db, `INSERT INTO login_attempts (name, source, failures, last_failure) VALUES ('#1', '192.0.2.0', 2, now()), ('?eve', '', 1, now())`)
	}
}

// rowsOf is every row fillEveryTable wrote, read by the names of the
// step's schema (sessions, session_id) or of this one (after).
func rowsOf(t *testing.T, db *sql.DB, step int, after bool) string {
	t.Helper()
	q := `SELECT concat_ws(E'\n',
		(SELECT string_agg(concat_ws(':', id, username, email, password, password_version), ' ' ORDER BY id) FROM users),
		(SELECT string_agg(concat_ws(':', name, user_id), ' ' ORDER BY name) FROM login_names),
		(SELECT string_agg(concat_ws(':', id, user_id, created_at, expires_at, ended_at), ' ' ORDER BY id) FROM sessions),
		(SELECT string_agg(concat_ws(':', jti, session_id, expires_at, rotated_at), ' ' ORDER BY jti) FROM refresh_tokens),
		(SELECT string_agg(concat_ws(':', id, owner_id, first_name, email, created_at), ' ' ORDER BY id) FROM patients),
		(SELECT string_agg(concat_ws(':', id, created_by, email, specialization), ' ' ORDER BY id) FROM doctors),
		(SELECT string_agg(concat_ws(':', id, owner_id, patient_id, doctor_id), ' ' ORDER BY id) FROM mappings),
		(SELECT string_agg(concat_ws(':', id, at, user_id, login_id, action, patient_id, ip, request_id), ' ' ORDER BY id) FROM audit_events)`
	if step >= 4 {
		q += `, (SELECT string_agg(concat_ws(':', name, source, failures, last_failure), ' ' ORDER BY name) FROM login_attempts)`
	}
	if after {
		q = strings.NewReplacer("sessions", "logins", "session_id", "login_id").Replace(q)
	}
	var rows string
	if err := db.QueryRowContext(t.Context(), q+")").Scan(&rows); err != nil {
		t.Fatal(err)
	}
	return rows
}

// catalogOf describes every object of the public schema, one entry per
// object keyed "kind name": tables and views, columns (position among the
// live ones, type, default, NOT NULL, options such as n_distinct),
// sequences, constraints, indexes, functions, triggers, the extensions,
// each with its grants, and the step reached.
func catalogOf(t *testing.T, db *sql.DB) map[string]string {
	t.Helper()
	acl := func(col string) string {
		return `(SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(` + col + `) x)`
	}
	q := `SELECT CASE c.relkind WHEN 'r' THEN 'table ' WHEN 'v' THEN 'view ' WHEN 'S' THEN 'sequence ' ELSE 'index ' END || c.relname,
			concat_ws(' | ', c.relowner::regrole, c.reloptions, pg_get_viewdef(c.oid), pg_get_indexdef(c.oid), ` + acl("c.relacl") + `,
				(SELECT concat_ws(' ', format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle) FROM pg_sequence s WHERE s.seqrelid = c.oid),
				(SELECT 'owned by ' || d.refobjid::regclass || '.' || d.refobjsubid FROM pg_depend d WHERE c.relkind = 'S' AND d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'a' AND d.refclassid = 'pg_class'::regclass))
		FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'v', 'S', 'i')
		UNION ALL SELECT 'column ' || c.relname || '.' || a.attname, concat_ws(' | ', row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum), format_type(a.atttypid, a.atttypmod),
				a.attnotnull, pg_get_expr(d.adbin, d.adrelid), (SELECT array_agg(o ORDER BY o) FROM unnest(a.attoptions) o WHERE o LIKE 'n\_distinct%'), a.attidentity, a.attgenerated, a.attcollation, ` + acl("a.attacl") + `)
		FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
		WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
		UNION ALL SELECT 'constraint ' || conrelid::regclass || '.' || conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE connamespace = 'public'::regnamespace
		UNION ALL SELECT 'function ' || p.oid::regprocedure, concat_ws(' | ', p.proowner::regrole, pg_get_functiondef(p.oid), ` + acl("p.proacl") + `) FROM pg_proc p
		WHERE p.pronamespace = 'public'::regnamespace AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_proc'::regclass AND e.objid = p.oid AND e.deptype = 'e')
		UNION ALL SELECT 'trigger ' || tgname, pg_get_triggerdef(oid) || ' ' || tgenabled::text FROM pg_trigger WHERE NOT tgisinternal
		UNION ALL SELECT 'extension ' || extname, extversion || ' ' || extnamespace::regnamespace FROM pg_extension
		UNION ALL SELECT 'schema ' || nspname, concat_ws(' | ', nspowner::regrole, ` + acl("nspacl") + `) FROM pg_namespace WHERE nspname = 'public'
		UNION ALL SELECT 'database', ` + acl("datacl") + ` FROM pg_database WHERE datname = current_database()
		UNION ALL SELECT 'step', max(step)::text FROM schema_migrations`
	rows, err := db.QueryContext(t.Context(), q)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	catalog := map[string]string{}
	for rows.Next() {
		var key string
		var def sql.NullString
		if err := rows.Scan(&key, &def); err != nil {
			t.Fatal(err)
		}
		catalog[key] = def.String
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return catalog
}

// v5Statements are the statements of the previous version (v5, step 5)
// that name a login by its old names, as its instances send them: each
// must keep working while they run beside an upgraded database. $n as in
// v5's auth.go and db.go.
var v5Statements = map[string]string{
	"attempt": `SELECT login_attempt('#' || $1::bigint, $2, 3, 60, 10, 30)`,
	"start": `INSERT INTO sessions (user_id, expires_at)
		SELECT $1, now() + make_interval(days => $2) FROM login_succeeded('#' || $1::bigint, $3) RETURNING id`,
	"issue":   `INSERT INTO refresh_tokens (jti, session_id, expires_at) VALUES ($1, $2, $3)`,
	"live":    `SELECT login_live($1, $2)`,
	"changed": `SELECT changed_fields('{first_name,last_name}', $1, $2)`,
	"spend": `UPDATE refresh_tokens t SET rotated_at = now()
		FROM sessions s
		WHERE t.jti = $1 AND t.session_id = $2 AND t.rotated_at IS NULL AND t.expires_at > now()
		  AND s.id = t.session_id AND s.user_id = $3 AND s.ended_at IS NULL AND s.expires_at > now()`,
	"reused": `WITH t AS (
			SELECT t.rotated_at IS NOT NULL OR s.ended_at IS NOT NULL AS spent,
			       s.ended_at IS NULL AND t.rotated_at < now() - make_interval(secs => $3) AS reused
			FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id
			WHERE t.jti = $1 AND t.session_id = $2 AND s.user_id = $4),
		ended AS (UPDATE sessions SET ended_at = now() WHERE id = $2 AND ended_at IS NULL AND (SELECT reused FROM t) RETURNING id),
		seen AS (INSERT INTO audit_events (user_id, login_id, action, ip, request_id)
			SELECT $4, id, 'refresh.reused', $5, $6 FROM ended)
		SELECT spent, EXISTS (SELECT 1 FROM ended) FROM t`,
	"logout": `WITH login AS (
			SELECT id, ended_at IS NULL AS live FROM sessions
			WHERE id = $1 AND user_id = $2 AND EXISTS (SELECT 1 FROM refresh_tokens WHERE jti = $3 AND session_id = $1)
			FOR UPDATE),
		ended AS (UPDATE sessions SET ended_at = now() WHERE id = (SELECT id FROM login WHERE live) RETURNING id),
		seen AS (INSERT INTO audit_events (user_id, login_id, action, ip, request_id)
			SELECT $2, id, 'logout', $4, $5 FROM ended)
		SELECT EXISTS (SELECT 1 FROM login) OR NOT EXISTS (SELECT 1 FROM sessions WHERE id = $1)`,
	"logoutAll": `WITH ended AS (
			UPDATE sessions SET ended_at = now() WHERE user_id = $1 AND ended_at IS NULL AND login_live($1, $2) RETURNING id)
		INSERT INTO audit_events (user_id, login_id, action, ip, request_id)
		SELECT $1, $2, 'logout.all', $3, $4 WHERE EXISTS (SELECT 1 FROM ended)`,
	"endAll": `UPDATE sessions SET ended_at = now() WHERE user_id = $1 AND ended_at IS NULL`,
	"prune": `DELETE FROM sessions WHERE id IN (
		SELECT id FROM sessions WHERE ended_at IS NOT NULL OR expires_at <= now() LIMIT 1000)`,
}

// TestRollingUpgradeFromV5: an instance of v5, serving as a role granted
// as v5's migrate granted it, with its statements prepared (planned before
// step 6), keeps working once this server has applied step 6, before and
// after migrate grants the role anew; a refresh token either version
// issues, the other can spend.
func TestRollingUpgradeFromV5(t *testing.T) {
	ctx := t.Context()
	role := appRole(t)
	owner := scratchDB(t, "_rolling", 5)
	r := pq.QuoteIdentifier(role)
	mustExec(t, owner, `REVOKE ALL ON ALL ROUTINES IN SCHEMA public FROM PUBLIC;
		GRANT USAGE ON SCHEMA public TO `+r+`;
		GRANT SELECT, INSERT, UPDATE, DELETE ON users, login_names, sessions, refresh_tokens, patients, doctors, mappings, login_attempts TO `+r+`;
		GRANT SELECT, INSERT ON audit_events TO `+r+`;
		GRANT SELECT ON schema_migrations TO `+r+`;
		GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO `+r+`;
		GRANT EXECUTE ON FUNCTION login_live(bigint, bigint), login_attempt(text, text, int, int, int, int), lock_wait(int, timestamptz, int, int), login_succeeded(text, text),
			api_time(timestamptz), etag(bigint, integer), changed_fields(text[], text[], text[]), login_wait(bigint, int, int) TO `+r+`;
		INSERT INTO users (username, email, name, password) VALUES ('ada', 'ada@example.com', 'Ada', '!')`)
	conn, err := connectAs(t, owner, role).Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	v5 := map[string]*sql.Stmt{}
	for name, q := range v5Statements {
		if v5[name], err = conn.PrepareContext(ctx, q); err != nil {
			t.Fatalf("prepare %s: %v", name, err)
		}
	}
	spend := func(what, jti string, sid int64) {
		t.Helper()
		if res, err := v5["spend"].ExecContext(ctx, jti, sid, 1); err != nil || rowsAffected(res) != 1 {
			t.Fatalf("v5 spends %s: %v", what, err)
		}
	}
	v5Round(t, v5, 1)
	var sid, loginID int64
	if err := v5["start"].QueryRowContext(ctx, 1, 30, "192.0.2.0").Scan(&sid); err != nil {
		t.Fatal(err)
	}
	if _, err := v5["issue"].ExecContext(ctx, strings.Repeat("4", 32), sid, time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if s, err := migrate(ctx, owner, schemaSQL, schemaSteps); err != nil || !slices.Equal(s.applied, []int{6}) {
		t.Fatalf("migrate: %+v, %v", s, err)
	}
	spend("a token it issued before step 6", strings.Repeat("4", 32), sid)
	v5Round(t, v5, 2)
	if err := owner.QueryRowContext(ctx, `INSERT INTO logins (user_id, expires_at) VALUES (1, now() + interval '1 day') RETURNING id`).Scan(&sid); err != nil {
		t.Fatal(err)
	}
	mustExec(t, owner, `INSERT INTO refresh_tokens (jti, login_id, expires_at) VALUES (repeat('6', 32), $1, now() + interval '1 hour')`, sid)
	spend("a token this version issued", strings.Repeat("6", 32), sid)
	if _, err := v5["issue"].ExecContext(ctx, strings.Repeat("5", 32), sid, time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := owner.QueryRowContext(ctx, `SELECT login_id FROM refresh_tokens WHERE jti = repeat('5', 32)`).Scan(&loginID); err != nil || loginID != sid {
		t.Fatalf("login of the token v5 issued: %d, %v; want %d", loginID, err, sid)
	}
	if err := runMigrate(ctx, owner, role, io.Discard); err != nil {
		t.Fatal(err)
	}
	v5Round(t, v5, 3)
}

// rowsAffected is res's count of rows, or -1.
func rowsAffected(res sql.Result) int64 {
	n, err := res.RowsAffected()
	if err != nil {
		return -1
	}
	return n
}

// v5Round runs v5's statements as one of its instances serves a user: a
// login attempt, a login, a refresh, the reuse of the rotated token (which
// ends the login), a logout, a second login ended by logout-all and a
// password change, then the prune.
func v5Round(t *testing.T, v5 map[string]*sql.Stmt, round int) {
	t.Helper()
	ctx := t.Context()
	check := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("round %d, v5's %s: %v", round, what, err)
		}
	}
	jti := func(n int) string { return fmt.Sprintf("%031d%d", round, n) }
	expires := time.Now().Add(time.Hour)
	var wait, sid int64
	var live, spent, reused, ok bool
	check("attempt", v5["attempt"].QueryRowContext(ctx, 1, "192.0.2.0").Scan(&wait))
	check("start", v5["start"].QueryRowContext(ctx, 1, 30, "192.0.2.0").Scan(&sid))
	_, err := v5["issue"].ExecContext(ctx, jti(1), sid, expires)
	check("issue", err)
	check("live", v5["live"].QueryRowContext(ctx, 1, sid).Scan(&live))
	var changed pq.StringArray
	check("changed", v5["changed"].QueryRowContext(ctx, pq.StringArray{"Ada", "L"}, pq.StringArray{"Ada", "M"}).Scan(&changed))
	res, err := v5["spend"].ExecContext(ctx, jti(1), sid, 1)
	check("spend", err)
	_, err = v5["issue"].ExecContext(ctx, jti(2), sid, expires)
	check("issue", err)
	check("reused", v5["reused"].QueryRowContext(ctx, jti(1), sid, 0.0, 1, "192.0.2.1", "r").Scan(&spent, &reused))
	check("logout", v5["logout"].QueryRowContext(ctx, sid, 1, jti(2), "192.0.2.1", "r").Scan(&ok))
	if wait != 0 || !live || len(changed) != 1 || rowsAffected(res) != 1 || !spent || !reused || !ok {
		t.Fatalf("round %d: wait %d, live %v, changed %v, spent %d, reused %v %v, logout %v", round, wait, live, changed, rowsAffected(res), spent, reused, ok)
	}
	check("start", v5["start"].QueryRowContext(ctx, 1, 30, "192.0.2.0").Scan(&sid))
	_, err = v5["logoutAll"].ExecContext(ctx, 1, sid, "192.0.2.1", "r")
	check("logout all", err)
	_, err = v5["endAll"].ExecContext(ctx, 1)
	check("password change", err)
	_, err = v5["prune"].ExecContext(ctx)
	check("prune", err)
}

// TestAPITimeZone: api_time writes a time in the connection's TimeZone, as
// DRF writes it in TIME_ZONE's: "Z" for a zero offset, else ±hh:mm.
func TestAPITimeZone(t *testing.T) {
	needDB(t)
	for zone, want := range map[string]string{
		"UTC":               "2026-12-07T02:22:49.931696Z",
		"Asia/Kolkata":      "2026-12-07T07:52:49.931696+05:30",
		"America/Sao_Paulo": "2026-12-06T23:22:49.931696-03:00",
		"Europe/London":     "2026-12-07T02:22:49.931696Z",
	} {
		cfg := testDBConfig
		cfg.Runtime = maps.Clone(cfg.Runtime)
		if cfg.Runtime == nil {
			cfg.Runtime = map[string]string{}
		}
		cfg.Runtime["TimeZone"] = zone
		db, err := connect(cfg, 1)
		if err != nil {
			t.Fatal(err)
		}
		var got string
		err = db.QueryRowContext(t.Context(), `SELECT api_time('2026-12-07 02:22:49.931696+00')`).Scan(&got)
		db.Close()
		if err != nil || got != want {
			t.Errorf("TimeZone %s: %q, %v; want %q", zone, got, err, want)
		}
	}
}

// TestAuditEventsStampedByDatabase: an event's time is the transaction's
// and its id the sequence's, whatever the insert says, for the table's
// owner too.
func TestAuditEventsStampedByDatabase(t *testing.T) {
	needDB(t)
	ctx := t.Context()
	conn, err := testDB.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	const insert = `INSERT INTO audit_events (user_id, action, ip, request_id, at) VALUES (NULL, 'login.failed', '192.0.2.1', 'stamp', '2000-01-01')`
	var id int64
	var now bool
	if err := conn.QueryRowContext(ctx, insert+` RETURNING id, at = now()`).Scan(&id, &now); err != nil || !now {
		t.Fatalf("an event with its own at: at is now() %v, %v", now, err)
	}
	forged := strings.Replace(insert, "(user_id,", "(id, user_id,", 1)
	forged = strings.Replace(forged, "(NULL,", fmt.Sprintf("(%d, NULL,", id+1000), 1)
	_, err = conn.ExecContext(ctx, forged)
	if e := pq.As(err, "HC403"); e == nil {
		t.Fatalf("an event with its own id: %v, want HC403", err)
	}
}
