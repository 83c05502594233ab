package main

import (
	"cmp"
	"context"
	"database/sql"
	"database/sql/driver"
	_ "embed"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/lib/pq"
	"github.com/lib/pq/pqerror"
)

// The pool: opening it, its statement cache, transactions, and errors that
// mean the database is unavailable.

// openDB connects to the database cfg names, creating it (and saying so)
// when it is missing and the role may; for a role that may not, it is
// missing, not a permission error.
func openDB(ctx context.Context, cfg pq.Config, maxConns int, logger *slog.Logger) (*sql.DB, error) {
	db, err := connect(cfg, maxConns)
	if err != nil {
		return nil, err
	}
	err = db.PingContext(ctx)
	if missing := pq.As(err, pqerror.InvalidCatalogName); missing != nil {
		if err = createDatabase(ctx, cfg); pq.As(err, pqerror.InsufficientPrivilege) != nil {
			err = missing
		} else if err == nil {
			logger.Info("created database", "database", cfg.Database, "host", cfg.Host)
			err = db.PingContext(ctx)
		}
	}
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("database %q on %s: %w", cfg.Database, cfg.Host, err)
	}
	return db, nil
}

// connect opens a pool without touching the network.
func connect(cfg pq.Config, maxConns int) (*sql.DB, error) {
	// Prepared statements keep one generic plan per connection rather than
	// planning every call (README, Performance). TimeZone is dbConfig's.
	runtime := map[string]string{"plan_cache_mode": "force_generic_plan"}
	maps.Copy(runtime, cfg.Runtime) // a setting in DATABASE_URL wins
	cfg.Runtime = runtime
	connector, err := pq.NewConnectorConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("database config: %w", err)
	}
	db := sql.OpenDB(connector)
	db.SetMaxOpenConns(maxConns)
	db.SetMaxIdleConns(maxConns)
	db.SetConnMaxIdleTime(5 * time.Minute)
	db.SetConnMaxLifetime(time.Hour)
	return db, nil
}

// createDatabase creates cfg.Database through the maintenance database.
func createDatabase(ctx context.Context, cfg pq.Config) error {
	name := cfg.Database
	cfg.Database = "postgres"
	admin, err := connect(cfg, 1)
	if err != nil {
		return err
	}
	defer admin.Close()
	// Identifiers cannot be placeholders; QuoteIdentifier makes the name inert.
	_, err = admin.ExecContext(ctx, "CREATE DATABASE "+pq.QuoteIdentifier(name))
	// A duplicate database is no error: another instance created it first
	// (a race PostgreSQL may report either way).
	if err != nil && pq.As(err, pqerror.DuplicateDatabase, pqerror.UniqueViolation) == nil {
		return fmt.Errorf("create database: %w", err)
	}
	return nil
}

// database is the pool, running each query that returns rows as a prepared
// statement, planned once per connection, not at every call (README,
// Performance). Query texts come from constants, whitelisted orderings and
// a bounded number of search terms; the cache stops at maxStatements.
type database struct {
	*sql.DB
	stmts sync.Map // query text → *sql.Stmt
	n     atomic.Int32
}

const maxStatements = 500

// stmt returns query's prepared statement, or nil to run it unprepared (a
// full cache, or a failed prepare, whose error the query itself will meet).
func (d *database) stmt(ctx context.Context, query string) *sql.Stmt {
	if st, ok := d.stmts.Load(query); ok {
		return st.(*sql.Stmt)
	}
	if d.n.Load() >= maxStatements {
		return nil
	}
	st, err := d.DB.PrepareContext(ctx, query)
	if err != nil {
		return nil
	}
	if prev, loaded := d.stmts.LoadOrStore(query, st); loaded {
		st.Close() // another request prepared it first
		return prev.(*sql.Stmt)
	}
	d.n.Add(1)
	return st
}

func (d *database) QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row {
	if st := d.stmt(ctx, query); st != nil {
		return st.QueryRowContext(ctx, args...)
	}
	return d.DB.QueryRowContext(ctx, query, args...)
}

func (d *database) QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	if st := d.stmt(ctx, query); st != nil {
		return st.QueryContext(ctx, args...)
	}
	return d.DB.QueryContext(ctx, query, args...)
}

// withTx runs fn in a transaction, committing only when fn succeeds.
func withTx(ctx context.Context, db *sql.DB, fn func(*sql.Tx) error) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback()
	if err = fn(tx); err == nil {
		err = tx.Commit()
	}
	// Past the request's deadline database/sql rolls the transaction back,
	// and the next statement or the commit says only ErrTxDone: nothing was
	// written, so the deadline is the cause (503, try again), not a bug.
	if errors.Is(err, sql.ErrTxDone) && ctx.Err() != nil {
		return fmt.Errorf("%w (%w)", err, ctx.Err())
	}
	return err
}

// isUnavailable reports whether err means the database cannot be reached
// (down, restarting, out of connections, or too slow) or cannot take the
// audit events a request must leave: a 503 the client may retry, not a 500.
func isUnavailable(err error) bool {
	if pqErr := pq.As(err); pqErr != nil {
		switch pqErr.Code.Class() {
		case "08", "53", "57", "58": // connection, resources, operator intervention, system
			return true
		}
		return pqErr.Table == "audit_events" // an event that cannot be written: the request shows nothing
	}
	var netErr net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, driver.ErrBadConn) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.As(err, &netErr)
}

// pruneLogins deletes ended and expired logins, with their refresh tokens,
// and runs untouched for maxAgeDays, in batches that hold no lock for long.
// A live login keeps all its refresh tokens, expired ones included: reuse
// detection reads them, and they go with the login when it ends.
func pruneLogins(ctx context.Context, db *sql.DB, maxAgeDays int) error {
	inBatches := func(q string, args ...any) error {
		for {
			res, err := db.ExecContext(ctx, q, args...)
			if err != nil {
				return fmt.Errorf("prune logins: %w", err)
			}
			if n, _ := res.RowsAffected(); n < 1000 {
				return nil
			}
		}
	}
	err := inBatches(`DELETE FROM logins WHERE id IN (
		SELECT id FROM logins WHERE ended_at IS NOT NULL OR expires_at <= now() LIMIT 1000)`)
	if err != nil {
		return err
	}
	// $1 LOGIN_MAX_AGE_DAYS: older failures and logins mark nothing any more.
	return inBatches(`DELETE FROM login_attempts WHERE (name, source) IN (SELECT name, source FROM login_attempts
		WHERE greatest(last_failure, last_login) < now() - make_interval(days => $1) LIMIT 1000 FOR UPDATE SKIP LOCKED)`, maxAgeDays)
}

// The schema: schema.sql for a new database, upgrades.sql's steps for an
// older one, and the rights of the role that serves it.

// schemaSQL is the schema as it is now, which a new database gets whole.
//
//go:embed schema.sql
var schemaSQL string

//go:embed upgrades.sql
var upgradesSQL string

// schemaSteps are upgrades.sql's steps, split at its "-- step N" lines:
// schemaSteps[0] is step 1.
var schemaSteps = regexp.MustCompile(`(?m)^-- step \d+.*$`).Split(upgradesSQL, -1)[1:]

// schemaLockID names the advisory lock held while steps are applied, so
// that several instances or migrations starting at once take turns.
const schemaLockID = 7_201_418_305

// schemaState is what migrate found and did: start-up logs it, and a
// failed "healthcare migrate" names the owner.
type schemaState struct {
	database, role, owner string // owner: the schema's, when the role is not it (nor a member), so may not migrate
	ownsAll               bool   // the role owns every table of the schema: start checks no rights
	found, at             int    // the step found and the step reached; 0 is an empty database, or one made before steps
	applied               []int  // the steps applied, in order
}

// migrate applies the steps the database lacks; an empty database gets
// schema instead (when it is not ""), recorded at the last step. Under the
// advisory lock, several migrations at once take turns.
func migrate(ctx context.Context, db *sql.DB, schema string, steps []string) (s schemaState, err error) {
	conn, err := db.Conn(ctx)
	if err != nil {
		return s, err
	}
	defer conn.Close()
	// Names are unique by lower(): a database whose lower() folds only ASCII
	// would let "Ädmin" and "ädmin" both register. The schema's owner is
	// schema_migrations', or the database's until that exists. Without
	// users, the database is empty (or made before steps).
	var folds, empty bool
	const q = `SELECT current_database(), current_user, lower('Ä') = 'ä', to_regclass('users') IS NULL, CASE WHEN NOT pg_has_role(o, 'USAGE') THEN pg_get_userbyid(o) ELSE '' END,
			NOT EXISTS (SELECT FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p', 'v', 'm', 'S') AND relowner <> current_user::regrole)
		FROM coalesce((SELECT relowner FROM pg_class WHERE relname = 'schema_migrations' AND relnamespace = 'public'::regnamespace), (SELECT datdba FROM pg_database WHERE datname = current_database())) o`
	if err := conn.QueryRowContext(ctx, q).Scan(&s.database, &s.role, &folds, &empty, &s.owner, &s.ownsAll); err != nil {
		return s, fmt.Errorf("read the database: %w", err)
	}
	if !folds {
		return s, fmt.Errorf(`database %q folds only ASCII letters in lower() (its LC_CTYPE is C, say), so names that differ in case alone would both register: as a superuser, CREATE DATABASE <name> ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8' TEMPLATE template0, and point DB_NAME at it`, s.database)
	}
	if _, err := conn.ExecContext(ctx, `SELECT pg_advisory_lock($1)`, schemaLockID); err != nil {
		return s, fmt.Errorf("lock schema: %w", err)
	}
	defer conn.ExecContext(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock($1)`, schemaLockID)
	err = conn.QueryRowContext(ctx, `SELECT coalesce(max(step), 0) FROM schema_migrations`).Scan(&s.found)
	switch {
	case pq.As(err, pqerror.InsufficientPrivilege) != nil:
		return s, fmt.Errorf(`role %q may not read this database's schema: run "DB_APP_ROLE=%s healthcare migrate" as the schema owner`, s.role, s.role)
	case err != nil && pq.As(err, pqerror.UndefinedTable) == nil: // no table yet: step 0
		return s, fmt.Errorf("read schema step: %w", err)
	}
	s.applied = []int{} // none is "applied: []" in the log, not null
	for s.at = s.found; s.at < len(steps); {
		step, next := steps[s.at], s.at+1
		if s.at == 0 && empty && schema != "" { // a new database gets the schema as it is now, as the last step
			step, next = schema, len(steps)
		}
		// Sent as one query, a step and its record commit together or not
		// at all: the database is always at a whole step. A step queued
		// behind a long transaction would queue every request behind
		// itself: after lock_timeout it gives up, to be run again.
		q := fmt.Sprintf("SET LOCAL lock_timeout = '5s';\n%s;\nINSERT INTO schema_migrations (step) VALUES (%d)", step, next)
		if _, err = conn.ExecContext(ctx, q); err != nil {
			return s, fmt.Errorf("step %d: %w (the schema stays at step %d)", next, err, s.at)
		}
		s.at, s.applied = next, append(s.applied, next)
	}
	return s, nil
}

// ensureSchema brings the schema to the server's step as the role connected
// may (the schema's owner); a database already there gets no statement that
// takes a table lock. Any other role that finds the schema behind, or may
// not read it, stops, naming the command that fixes it.
func ensureSchema(ctx context.Context, db *sql.DB) (schemaState, error) {
	s, err := migrate(ctx, db, schemaSQL, schemaSteps)
	if pq.As(err, pqerror.InsufficientPrivilege) != nil {
		return s, fmt.Errorf(`database schema is at step %d, this server needs step %d: run "healthcare migrate" as the schema owner`, s.at, len(schemaSteps))
	}
	// A role that does not own every table serves with what migrate granted
	// it (DB_APP_ROLE): granted since, or taken since, a right stops the start,
	// a member of the owner, a superuser or a partial owner's too.
	if err == nil && !s.ownsAll {
		err = withTx(ctx, db, func(tx *sql.Tx) error { return checkServing(ctx, tx, s.role) })
	}
	return s, err
}

// servingRights are every right the serving role needs and all it may
// hold, each "privileges ON objects" (a function's types without spaces):
// migrate grants them, with USAGE on the sequences, and every start checks
// them. INSERT on the audit events is by column, never id or at: an
// event's id and time are the database's.
var servingRights = []string{
	"SELECT, INSERT, UPDATE, DELETE ON TABLE users, login_names, logins, refresh_tokens, patients, doctors, mappings, login_attempts",
	"SELECT ON TABLE audit_events, schema_migrations",
	"INSERT (user_id), INSERT (login_id), INSERT (action), INSERT (patient_id), INSERT (doctor_id), INSERT (fields), INSERT (ip), INSERT (request_id) ON TABLE audit_events",
	"USAGE ON SCHEMA public",
	"EXECUTE ON FUNCTION login_live(bigint,bigint), login_attempt(text,text,integer,integer,integer,integer), run_wait(integer,timestamp with time zone,integer,integer)",
	"EXECUTE ON FUNCTION login_succeeded(text,text), api_time(timestamp with time zone), etag(bigint,integer)",
}

// compatRights are the serving rights on what upgrades.sql's step 6 keeps
// for the previous version's instances during a rolling upgrade, while it
// is there: they are part of the serving set until a later step drops it.
var compatRights = []string{"SELECT, INSERT, UPDATE, DELETE ON TABLE sessions", "EXECUTE ON FUNCTION changed_fields(text[],text[],text[])"}

// servingRightsIn returns servingRights, and compatRights while they apply.
func servingRightsIn(ctx context.Context, tx *sql.Tx) ([]string, error) {
	var compat bool
	if err := tx.QueryRowContext(ctx, `SELECT to_regclass('sessions') IS NOT NULL`).Scan(&compat); err != nil {
		return nil, fmt.Errorf("read the schema: %w", err)
	}
	if compat {
		return append(slices.Clone(servingRights), compatRights...), nil
	}
	return servingRights, nil
}

// grantServing gives role exactly servingRights, and takes back what the
// schema's owner gave beyond them; PUBLIC loses TEMPORARY (a temporary
// table named audit_events would take the role's events) and EXECUTE. It
// refuses a role that still holds more, or less, after the grant, by any
// path and whoever granted it (checkServing): nothing is granted then.
func grantServing(ctx context.Context, db *sql.DB, role string) error {
	var database string
	if err := db.QueryRowContext(ctx, `SELECT current_database()`).Scan(&database); err != nil {
		return fmt.Errorf("DB_APP_ROLE: %w", err)
	}
	r := pq.QuoteIdentifier(role) // identifiers cannot be placeholders
	// No CREATE anywhere: nothing the role makes can stand in for a table or
	// a function that another role's statements name.
	grants := `REVOKE ALL ON ALL TABLES IN SCHEMA public FROM ` + r + `;
		REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM ` + r + `;
		REVOKE ALL ON ALL ROUTINES IN SCHEMA public FROM PUBLIC, ` + r + `;
		REVOKE CREATE ON SCHEMA public FROM PUBLIC, ` + r + `;
		REVOKE CREATE, TEMPORARY ON DATABASE ` + pq.QuoteIdentifier(database) + ` FROM PUBLIC, ` + r + `;
		GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO ` + r
	return withTx(ctx, db, func(tx *sql.Tx) error {
		rights, err := servingRightsIn(ctx, tx)
		if err != nil {
			return err
		}
		for _, g := range rights {
			grants += ";\nGRANT " + g + " TO " + r
		}
		_, err = tx.ExecContext(ctx, grants)
		switch {
		case pq.As(err, pqerror.UndefinedObject) != nil: // 42704: the role
			return fmt.Errorf("DB_APP_ROLE: role %q does not exist; create it first (README)", role)
		case err != nil:
			return fmt.Errorf("DB_APP_ROLE: %w", err)
		}
		return checkServing(ctx, tx, role)
	})
}

// checkServing refuses role for a power no grant could limit, then for a
// setting its sessions start with (its own, or the database's
// session_replication_role, which turns triggers off), then for the first
// right it holds beyond servingRights, then for the first it lacks.
// Without those powers (a superuser, a member of another role, an owner),
// what a role holds by effect is what the ACLs give it or PUBLIC, whoever
// granted it, on anything it can reach: a column, a parameter, any schema it
// may use, pg_catalog included. PUBLIC's rights on what initdb made (oid <
// 16384), and on an extension's function that is not SECURITY DEFINER, pass
// while initdb or the extension gave them (pg_init_privs, or no entry there).
func checkServing(ctx context.Context, tx *sql.Tx, role string) error {
	// $1 the role, $2 servingRights. A right is spelled as GRANT spells it:
	// a privilege, then what, an object's ACL, says it is on. held drops an
	// ACL as initdb or its extension left it before aclexplode (OFFSET 0), and
	// names only what is held: a start stays cheap.
	const check = `WITH u AS (SELECT *, (SELECT oid FROM pg_database WHERE datname = current_database()) AS db FROM pg_roles WHERE rolname = $1),
		want AS (SELECT p || ' ON ' || m[2] || ' ' || o AS item FROM unnest($2::text[]) g, regexp_match(g, '^(.*?) ON (\S+) (.*)$') m, unnest(string_to_array(m[1], ', ')) p,
			unnest(string_to_array(m[3], ', ')) o UNION ALL SELECT 'USAGE ON SEQUENCE ' || oid::regclass FROM pg_class WHERE relkind = 'S' AND relnamespace = 'public'::regnamespace),
		ns AS (SELECT s.oid FROM pg_namespace s, u WHERE has_schema_privilege(u.oid, s.oid, 'USAGE')),
		acls (what, acl, cls, obj, sub, kept) AS (SELECT CASE relkind WHEN 'S' THEN ' ON SEQUENCE ' ELSE ' ON TABLE ' END, coalesce(relacl, acldefault(CASE relkind WHEN 'S' THEN 's'::"char" ELSE 'r' END, relowner)),
				'pg_class'::regclass, oid, 0, oid < 16384 FROM pg_class WHERE relnamespace IN (SELECT oid FROM ns) AND relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
			UNION ALL SELECT ' (' || quote_ident(a.attname) || ') ON TABLE ', a.attacl, 'pg_class'::regclass, c.oid, a.attnum, c.oid < 16384
				FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attacl IS NOT NULL WHERE c.relnamespace IN (SELECT oid FROM ns)
			UNION ALL SELECT ' ON FUNCTION ', coalesce(f.proacl, acldefault('f', f.proowner)), 'pg_proc'::regclass, f.oid, 0, f.oid < 16384 OR NOT f.prosecdef
				AND EXISTS (SELECT FROM pg_depend e WHERE e.classid = 'pg_proc'::regclass AND e.objid = f.oid AND e.deptype = 'e') FROM pg_proc f WHERE f.pronamespace IN (SELECT oid FROM ns) AND (f.oid >= 16384 OR f.proacl IS NOT NULL)
			UNION ALL SELECT ' ON SCHEMA ' || quote_ident(nspname), coalesce(nspacl, acldefault('n', nspowner)), 'pg_namespace'::regclass, oid, 0, oid < 16384 AND nspname <> 'public' FROM pg_namespace
			UNION ALL SELECT ' ON DATABASE ' || quote_ident(datname), coalesce(datacl, acldefault('d', datdba)), NULL, NULL, NULL, false FROM pg_database WHERE datname = current_database()
			UNION ALL SELECT ' ON PARAMETER ' || parname, paracl, NULL, NULL, NULL, false FROM pg_parameter_acl),
		held AS (SELECT CASE WHEN a.is_grantable THEN 'GRANT OPTION FOR ' ELSE '' END || a.privilege_type || what || CASE cls WHEN 'pg_class'::regclass THEN obj::regclass::text WHEN 'pg_proc'::regclass THEN obj::regprocedure::text ELSE '' END AS item, a.grantee, a.grantor
			FROM (SELECT * FROM acls LEFT JOIN pg_init_privs ON (objoid, classoid, objsubid) = (obj, cls, sub) WHERE NOT (kept AND acl IS NOT DISTINCT FROM initprivs) OFFSET 0) x, aclexplode(acl) a, u
			WHERE a.privilege_type <> 'CONNECT' AND (a.grantee = u.oid OR a.grantee = 0 AND NOT (kept AND coalesce(aclcontains(initprivs, makeaclitem(0, a.grantor, a.privilege_type, false)), true))))
		SELECT 'role "' || $1 || '" ' || coalesce(coalesce((SELECT CASE WHEN rolsuper THEN 'is a superuser' WHEN rolcreaterole THEN 'can create roles' WHEN rolreplication THEN 'can replicate the cluster' WHEN rolcreatedb THEN 'can create databases' END FROM u),
				(SELECT 'is a member of role ' || min(m.roleid::regrole::text) FROM pg_auth_members m, u WHERE m.member = u.oid),
				(SELECT 'owns ' || min(pg_describe_object(o.classid, o.objid, 0)) FROM pg_shdepend o, u
					WHERE o.refobjid = u.oid AND o.deptype = 'o' AND (o.dbid = u.db OR o.classid = 'pg_database'::regclass AND o.objid = u.db))
			) || ', so no grant could limit it: serve as a role that owns nothing and belongs to no other (README, "Two roles")',
			(SELECT format('starts its sessions with %s (ALTER %s SET): run "ALTER %2$s RESET %s"', c, concat_ws(' IN DATABASE ', CASE setrole WHEN 0 THEN 'ROLE ALL' ELSE 'ROLE ' || quote_ident($1) END,
				CASE setdatabase WHEN 0 THEN NULL ELSE quote_ident(current_database()) END), split_part(c, '=', 1)) FROM pg_db_role_setting, unnest(setconfig) c, u
				WHERE setdatabase IN (0, u.db) AND (setrole = u.oid OR setrole = 0 AND c LIKE 'session\_replication\_role=%') ORDER BY 1 LIMIT 1),
			(SELECT format('holds %s beyond what serving needs, granted to %s by role "%s": run "REVOKE %s FROM %s" as role "%3$s"', item, CASE grantee WHEN 0 THEN 'PUBLIC' ELSE 'it' END,
				pg_get_userbyid(grantor), item, CASE grantee WHEN 0 THEN 'PUBLIC' ELSE quote_ident($1) END) FROM held WHERE item NOT IN (SELECT item FROM want) ORDER BY item LIMIT 1),
			(SELECT format('lacks %s, which serving needs: run "DB_APP_ROLE=%s healthcare migrate" as the schema owner', item, $1) FROM want WHERE item NOT IN (SELECT item FROM held) ORDER BY item LIMIT 1))`
	rights, err := servingRightsIn(ctx, tx)
	if err != nil {
		return err
	}
	var problem sql.NullString
	if err := tx.QueryRowContext(ctx, check, role, pq.StringArray(rights)).Scan(&problem); err != nil {
		return fmt.Errorf("read the rights of role %q: %w", role, err)
	}
	if problem.Valid {
		return errors.New(problem.String)
	}
	return nil
}

// The rules every statement of a logged-in request obeys are written here,
// once. Its handler states it as a statement: its own SQL, as named steps (a
// WITH query's), the last named done, whose rows are the answer; its values
// by name (@id); and the audit events it leaves. sent adds the rest.

// args are a statement's values by name: args{"id": 7} is @id.
type args map[string]any

// statement is one statement of a logged-in request, as its handler states it.
type statement struct {
	steps  string  // "done AS (…)", after any step it reads
	args   args    // the values of the steps' @names beside the request's (sent)
	events []audit // the audit events it writes
}

// audit is an event that a statement writes for each row of from, itself:
// it commits with the read or change it records, or neither does,
// and a statement that shows or changes nothing writes none.
type audit struct {
	action                  string
	patient, doctor, fields string // SQL over a row of from; "" is none
	from                    string // SQL: the rows; "" is done
}

// ifMatches is the If-Match check of a write's steps: the row's tag (etag,
// schema.sql) is one the header lists (ifMatch), or it names any version.
const ifMatches = `(@if_match::text[] IS NULL OR etag(id, version) = ANY(@if_match))`

// changedFields are an update's event's fields: the names of the columns
// whose values differ between the steps before and done, in their order
// (never the values); updated_at and etag change with every update.
const changedFields = `ARRAY(SELECT new.key FROM json_each_text(row_to_json(done)) WITH ORDINALITY new(key, value, n)
	JOIN json_each_text(row_to_json(before)) old USING (key)
	WHERE new.value IS DISTINCT FROM old.value AND key NOT IN ('updated_at', 'etag') ORDER BY n)`

// atName is an @name in a statement.
var atName = regexp.MustCompile(`@[a-z_0-9]+`)

// sent returns q as the database gets it: its steps; one INSERT of its
// events, with the user, the login, the client IP and the request id; and
// done's rows, selected only once login_live says the login is live (it
// fails the statement with HC401 otherwise, which fail answers 401), which
// PostgreSQL checks once, before any row (a one-time filter). Each @name
// becomes $n, $1 the user and $2 the login; @id is the path's {id}
// (pathID) and @if_match the If-Match header's tags (ifMatch).
func (q statement) sent(r *http.Request) (string, []any) {
	text := "WITH " + q.steps
	if len(q.events) > 0 {
		var each []string
		for _, e := range q.events {
			each = append(each, fmt.Sprintf("SELECT %s, %s, %s, %s FROM %s", pq.QuoteLiteral(e.action),
				cmp.Or(e.patient, "NULL::bigint"), cmp.Or(e.doctor, "NULL::bigint"), cmp.Or(e.fields, "'{}'::text[]"), cmp.Or(e.from, "done")))
		}
		text += `,
		events AS (INSERT INTO audit_events (user_id, login_id, ip, request_id, action, patient_id, doctor_id, fields)
			SELECT @user, @login, @ip, @request_id, e.* FROM (` + strings.Join(each, " UNION ALL ") + `) e)`
	}
	text += `
		SELECT * FROM done WHERE login_live(@user, @login)`
	info, named := infoFrom(r), args{}
	maps.Copy(named, q.args)
	maps.Copy(named, args{"user": info.userID, "login": info.loginID, "ip": info.clientIP.String(), "request_id": info.id,
		"id": pathID(r), "if_match": ifMatch(r)}) // the request's own values win
	numbers, values := map[string]string{"@user": "$1", "@login": "$2"}, []any{info.userID, info.loginID}
	text = atName.ReplaceAllStringFunc(text, func(n string) string {
		v, ok := named[n[1:]]
		switch {
		case !ok: // a handler's mistake, which no request can cause
			panic("a statement names " + n + ", which has no value")
		case numbers[n] == "": // its first use
			values = append(values, v)
			numbers[n] = "$" + strconv.Itoa(len(values))
		}
		return numbers[n]
	})
	return text, values
}

// queryAll runs q (sent) and reads each of its rows with scan.
func queryAll[T any](r *http.Request, db *database, q statement, scan func(rowScanner) (T, error)) ([]T, error) {
	text, values := q.sent(r)
	rows, err := db.QueryContext(r.Context(), text, values...)
	if err != nil {
		return nil, err
	}
	return scanAll(rows, scan)
}

// queryRow runs q (sent) for its one row.
func (d *database) queryRow(r *http.Request, q statement) *sql.Row {
	text, values := q.sent(r)
	return d.QueryRowContext(r.Context(), text, values...)
}

// find runs q (sent): errNotFound when it returns no row.
func (d *database) find(r *http.Request, q statement) error {
	found, err := queryAll(r, d, q, func(rowScanner) (bool, error) { return true, nil })
	if err == nil && len(found) == 0 {
		return errNotFound
	}
	return err
}

// The audit trail as GET /api/audit/ lists it: a user's own events.
// Statements write their events themselves (sent; auth.go's for logins).

// event is one audit event as GET /api/audit/ shows it.
type event struct {
	ID        int64          `json:"id"`
	At        string         `json:"at"`
	Action    string         `json:"action"`
	Patient   *int64         `json:"patient"`
	Doctor    *int64         `json:"doctor"`
	Fields    pq.StringArray `json:"fields"`
	Login     *int64         `json:"login"`
	IP        string         `json:"ip"`
	RequestID string         `json:"request_id"`
}

func scanEvent(row rowScanner) (e event, err error) {
	err = row.Scan(&e.ID, &e.At, &e.Action, &e.Patient, &e.Doctor, &e.Fields, &e.Login, &e.IP, &e.RequestID)
	return e, err
}

// auditActions are every action an event may have, in one list: schema.sql's
// check, the action filter and openapi.json's enums are tested against it.
var auditActions = []string{"patient.create", "patient.read", "patient.update", "patient.delete", "patient.list",
	"mapping.create", "mapping.delete", "mapping.list", "doctor.create", "doctor.update", "doctor.delete", "login", "login.failed", "refresh.reused", "logout",
	"logout.all", "password.change", "login.unlock"}

// auditFilters returns the WHERE of the audit filters q gives, each value
// in a as its column's @name: only those, so that each set of filters is its own
// statement, with a plan that reads its own index.
func auditFilters(q url.Values, a args) (string, error) {
	where, errs := "user_id = @user", fieldErrors{}
	for _, fc := range [][2]string{{"patient", "patient_id"}, {"doctor", "doctor_id"}, {"login", "login_id"}, {"action", "action"}} {
		f, col, v := fc[0], fc[1], q.Get(fc[0])
		n, err := strconv.ParseInt(v, 10, 64)
		switch {
		case v == "":
			continue
		case f == "action" && !slices.Contains(auditActions, v):
			errs.add(f, fmt.Sprintf("Select a valid choice. %s is not one of the available choices.", v))
		case f == "action":
			a[col] = v
		case err != nil:
			errs.add(f, "A valid integer is required.")
		case n < 1:
			errs.add(f, "Ensure this value is greater than or equal to 1.")
		default:
			a[col] = n
		}
		where += " AND " + col + " = @" + col
	}
	if len(errs) > 0 {
		return "", errs
	}
	return where, nil
}

// A cursor is an opaque position in the trail: base64 of "<" and an event
// id (the events before it: a next page) or of ">" and one (after it: a
// previous page).
func cursorAt(dir byte, id int64) string {
	return base64.RawURLEncoding.EncodeToString(strconv.AppendInt([]byte{dir}, id, 10))
}

// handleListAudit lists the user's own events, newest first, a page at a
// time by cursor (DRF's CursorPagination): a page reads about its own rows
// through one index, however long the trail. user_id = @user holds for
// every filter: no filter reaches another user's events.
func (s *server) handleListAudit(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	p, _ := parseList(url.Values{"page_size": q["page_size"]}, nil, false) // page_size alone never fails
	// @limit: the page's size and one, to tell whether there is more.
	a := args{"limit": p.size + 1, "cursor": int64(math.MaxInt64)}
	where, err := auditFilters(q, a)
	if err != nil {
		return err
	}
	// Only a cursor in the very form this server writes is read: decoded,
	// it must encode to the same text. One that is not URL encoding at all
	// (dropped by Query) is no cursor of ours either.
	dir := byte('<')
	if c := q.Get("cursor"); q.Has("cursor") || strings.Contains("&"+r.URL.RawQuery, "&cursor=") {
		b, _ := base64.RawURLEncoding.DecodeString(c)
		id, err := strconv.ParseInt(string(b[min(1, len(b)):]), 10, 64)
		if err != nil || id < 1 || b[0] != '<' && b[0] != '>' || cursorAt(b[0], id) != c {
			return &apiError{status: http.StatusNotFound, body: detail("Invalid cursor")}
		}
		dir, a["cursor"] = b[0], id
	}
	// dir is '<' or '>', checked above: the comparison, and its order.
	order := map[byte]string{'<': "DESC", '>': "ASC"}[dir]
	events, err := queryAll(r, s.db, statement{args: a, steps: `done AS (SELECT id, api_time(at), action, patient_id, doctor_id, fields, login_id, ip, request_id FROM audit_events
		WHERE ` + where + ` AND id ` + string(dir) + ` @cursor ORDER BY id ` + order + ` LIMIT @limit)`}, scanEvent)
	if err != nil {
		return fmt.Errorf("list audit: %w", err)
	}
	more := len(events) > p.size // beyond this page, in the direction read
	events = events[:min(len(events), p.size)]
	if dir == '>' {
		slices.Reverse(events)
	}
	pg := page[event]{Results: events}
	if len(events) > 0 {
		if more || dir == '>' {
			pg.Next = pageLink(r, "cursor", cursorAt('<', events[len(events)-1].ID))
		}
		if more && dir == '>' || dir == '<' && q.Has("cursor") {
			pg.Previous = pageLink(r, "cursor", cursorAt('>', events[0].ID))
		}
	}
	return writeJSON(w, http.StatusOK, pg)
}

// Rows and lists: one record written with its entity tag, a write's 404
// and 412, and a page of a collection.

// rowScanner is what *sql.Row and *sql.Rows share.
type rowScanner interface{ Scan(dest ...any) error }

// conflicts are the unique keys a client can run into, with the field error
// each answers (fail turns the violation into it).
var conflicts = map[string]fieldErrors{
	"patients_owner_email":    {"email": {"A patient with this email already exists."}},
	"doctors_email":           {"email": {"A doctor with this email already exists."}},
	"mappings_patient_doctor": {"non_field_errors": {"The fields patient, doctor must make a unique set."}},
}

// writeRow runs q, which returns one row, and writes that row with status;
// no row is a 404. A record with an entity tag (a patient, a doctor) is sent
// with its ETag, and a GET whose If-None-Match names that tag is answered
// 304 without a body.
func writeRow[T any](w http.ResponseWriter, r *http.Request, db *database, status int, scan func(rowScanner) (T, error), q statement) error {
	v, err := scan(db.queryRow(r, q))
	if errors.Is(err, sql.ErrNoRows) {
		return errNotFound
	}
	if err != nil {
		return fmt.Errorf("query row: %w", err)
	}
	if t, ok := any(v).(interface{ entityTag() string }); ok {
		w.Header().Set("ETag", t.entityTag())
		if (r.Method == http.MethodGet || r.Method == http.MethodHead) && noneMatch(r.Header.Values("If-None-Match"), t.entityTag()) {
			w.WriteHeader(http.StatusNotModified)
			return nil
		}
	}
	return writeJSON(w, status, v)
}

// deleteRow runs q, a DELETE that returns what it deleted, and answers 204,
// or 404 when nothing was deleted.
func deleteRow(w http.ResponseWriter, r *http.Request, db *database, q statement) error {
	if err := db.find(r, q); err != nil {
		return err
	}
	return noContent(w)
}

// noneMatch reports whether an If-None-Match header names tag, or is "*".
// The comparison is weak (RFC 9110 §13.1.2): W/"7-3" names "7-3".
func noneMatch(header []string, tag string) bool {
	return slices.ContainsFunc(strings.Split(strings.Join(header, ","), ","), func(t string) bool {
		t = strings.TrimPrefix(strings.TrimSpace(t), "W/")
		return t == "*" || t == tag
	})
}

// ifMatch returns the strong tags an If-Match header lists, for ifMatches
// to compare with the record's own: nil, any version, without the header or
// with "*". A weak tag never matches, so a header of weak tags alone
// matches nothing.
func ifMatch(r *http.Request) pq.StringArray {
	header := r.Header.Values("If-Match")
	if len(header) == 0 {
		return nil
	}
	tags := pq.StringArray{}
	for _, t := range strings.Split(strings.Join(header, ","), ",") {
		switch t = strings.TrimSpace(t); {
		case t == "*":
			return nil
		case t != "" && !strings.HasPrefix(t, "W/") && utf8.ValidString(t): // PostgreSQL text is UTF-8
			tags = append(tags, t)
		}
	}
	return tags
}

// unmatched turns the 404 of a write that found no row into 412 when the
// request had If-Match and the record exists (found returns it): the row
// was there, but in no version the client listed.
func unmatched(r *http.Request, db *database, err error, found statement) error {
	if err != errNotFound || ifMatch(r) == nil {
		return err
	}
	if err = db.find(r, found); err == nil {
		return &apiError{status: http.StatusPreconditionFailed, body: detail("The record has changed since you read it.")}
	}
	return err
}

// scanAll reads every row of rows with scan.
func scanAll[T any](rows *sql.Rows, scan func(rowScanner) (T, error)) ([]T, error) {
	defer rows.Close()
	out := []T{}
	for rows.Next() {
		v, err := scan(rows)
		if err != nil {
			return nil, fmt.Errorf("scan: %w", err)
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// listParams are a collection GET's validated query parameters.
type listParams struct {
	page    int // from 1
	size    int
	orderBy string // SQL from a fixed whitelist, never from input
	terms   int    // how many search terms args holds, @term0 on
	args    args   // @limit, @offset (the rows before the page), and each term's ILIKE pattern, %, _ and \ escaped
}

// maxSearchTerms bounds the work one search can ask of the database.
const maxSearchTerms = 20

// parseList reads page, page_size, ordering and (when searchable) search.
// orderable maps each public field name to its SQL column.
func parseList(q url.Values, orderable map[string]string, searchable bool) (listParams, error) {
	p := listParams{size: 10}
	var err error
	if p.page, err = strconv.Atoi(cmp.Or(q.Get("page"), "1")); err != nil || p.page < 1 || p.page > math.MaxInt32 {
		return p, errInvalidPage // no list has that many pages
	}
	// A size too large for an int is still "larger": capped, not the default.
	if n, err := strconv.Atoi(q.Get("page_size")); (err == nil || errors.Is(err, strconv.ErrRange)) && n > 0 {
		p.size = min(n, 100)
	}
	var order []string
	seen := map[string]bool{}
	for _, f := range strings.Split(q.Get("ordering"), ",") {
		f = strings.TrimSpace(f)
		name, desc := strings.CutPrefix(f, "-")
		col, ok := orderable[name]
		switch {
		case f == "" || seen[name]: // a repeated field changes nothing
			continue
		case !ok:
			return p, fieldErrors{"ordering": {fmt.Sprintf("Invalid ordering field %q.", f)}}
		case desc:
			col += " DESC"
		}
		order = append(order, col)
		seen[name] = true
	}
	// The id tie-breaker keeps pages stable when the ordered values repeat.
	if !seen["id"] {
		order = append(order, orderable["id"])
	}
	p.orderBy = strings.Join(order, ", ")
	p.args = args{"limit": p.size, "offset": (p.page - 1) * p.size}
	if searchable {
		// PostgreSQL text holds neither NUL nor invalid UTF-8: NULs are
		// dropped, as DRF does, and invalid bytes become U+FFFD.
		search := strings.ToValidUTF8(strings.ReplaceAll(q.Get("search"), "\x00", ""), "\uFFFD")
		terms := strings.FieldsFunc(search, func(r rune) bool { return r == ' ' || r == ',' })
		if len(terms) > maxSearchTerms {
			return p, fieldErrors{"search": {fmt.Sprintf("Ensure there are no more than %d search terms.", maxSearchTerms)}}
		}
		escape := strings.NewReplacer(`\`, `\\`, `%`, `\%`, `_`, `\_`)
		for i, t := range terms {
			p.args[fmt.Sprint("term", i)] = "%" + escape.Replace(t) + "%"
		}
		p.terms = len(terms)
	}
	return p, nil
}

// search returns " AND (c1 || ' ' || c2) ILIKE @term0 AND (…) ILIKE @term1":
// every term must occur in the columns joined by ' ', the expression a
// trigram index holds (schema.sql). A term holds no space, so it occurs in
// the joined text only within one column. args holds the terms' values.
func (p listParams) search(columns ...string) (sql string) {
	for i := range p.terms {
		sql += fmt.Sprintf(" AND (%s) ILIKE @term%d", strings.Join(columns, " || ' ' || "), i)
	}
	return sql
}

// page is a page of a collection: the count of the whole list (DRF's
// PageNumberPagination), links to the pages either side, and its rows. The
// audit trail's pages have no count (DRF's CursorPagination).
type page[T any] struct {
	Count    *int    `json:"count,omitempty"`
	Next     *string `json:"next"`
	Previous *string `json:"previous"`
	Results  []T     `json:"results"`
}

// customPlan makes a transaction's statements planned with their arguments.
const customPlan = `SET LOCAL plan_cache_mode = force_custom_plan`

// listPage answers a collection GET with the page list asks for: q's rows
// are the page's, each with the total count in front (a scan of its own, so
// that the page's LIMIT stops after its rows). A search runs in a
// transaction planned with its terms (README, Performance): a generic plan,
// blind to them, may read a whole table for one match.
func listPage[T any](w http.ResponseWriter, r *http.Request, db *database, list listParams, scan func(rowScanner) (T, error), q statement) error {
	ctx, count := r.Context(), 0
	var results []T
	read := func(rows *sql.Rows, err error) error {
		if err == nil {
			results, err = scanAll(rows, func(row rowScanner) (T, error) {
				return scan(scanFunc(func(dest ...any) error { return row.Scan(append([]any{&count}, dest...)...) }))
			})
		}
		return err
	}
	text, values := q.sent(r)
	var err error
	if list.terms == 0 {
		err = read(db.QueryContext(ctx, text, values...))
	} else {
		err = withTx(ctx, db.DB, func(tx *sql.Tx) error {
			if _, err := tx.ExecContext(ctx, customPlan); err != nil {
				return err
			}
			return read(tx.QueryContext(ctx, text, values...))
		})
	}
	if err != nil {
		return fmt.Errorf("list: %w", err)
	}
	if len(results) == 0 && list.page > 1 {
		return errInvalidPage
	}
	body := page[T]{Count: &count, Results: results}
	if list.page*list.size < count {
		body.Next = pageLink(r, "page", strconv.Itoa(list.page+1))
	}
	if list.page > 1 {
		body.Previous = pageLink(r, "page", strconv.Itoa(list.page-1))
	}
	return writeJSON(w, http.StatusOK, body)
}

// pageLink is r's own URL, absolute, with key set to value in its query.
// The link to page 1 carries no page parameter, as DRF's.
func pageLink(r *http.Request, key, value string) *string {
	q := r.URL.Query()
	q.Set(key, value)
	if key == "page" && value == "1" {
		q.Del(key)
	}
	u := url.URL{Scheme: "http", Host: r.Host, Path: r.URL.Path, RawQuery: q.Encode()}
	if infoFrom(r).https {
		u.Scheme = "https"
	}
	link := u.String()
	return &link
}

// scanFunc makes a function a rowScanner: listPage's scans the count column
// in front of a row's own columns.
type scanFunc func(dest ...any) error

func (f scanFunc) Scan(dest ...any) error { return f(dest...) }
