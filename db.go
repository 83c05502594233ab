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

//go:embed schema.sql
var schemaSQL string

// schemaSteps are schema.sql's steps, split at its "-- step N" lines:
// schemaSteps[0] is step 1.
var schemaSteps = regexp.MustCompile(`(?m)^-- step \d+.*$`).Split(schemaSQL, -1)[1:]

// schemaLockID names the advisory lock held while steps are applied, so
// that several instances or migrations starting at once take turns.
const schemaLockID = 7_201_418_305

// openDB connects to the database cfg names, creating it when it is
// missing and the role may.
func openDB(ctx context.Context, cfg pq.Config, maxConns int) (*sql.DB, error) {
	db, err := connect(cfg, maxConns)
	if err != nil {
		return nil, err
	}
	err = db.PingContext(ctx)
	if pq.As(err, pqerror.InvalidCatalogName) != nil {
		if err = createDatabase(ctx, cfg); err == nil {
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
	// planning every call (README, Performance).
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

// schemaState is what migrate found and did: start-up logs it, and a
// failed "healthcare migrate" names the owner.
type schemaState struct {
	database, role, owner string // owner: the schema's, when the role is not it (nor a member), so may not migrate
	found, at             int    // the step found and the step reached; 0 is an empty database, or one made before steps
	applied               []int  // the steps applied, in order
}

// migrate applies the steps the database lacks. Under the advisory lock,
// several migrations at once take turns.
func migrate(ctx context.Context, db *sql.DB, steps []string) (s schemaState, err error) {
	conn, err := db.Conn(ctx)
	if err != nil {
		return s, err
	}
	defer conn.Close()
	// Names are unique by lower(): a database whose lower() folds only ASCII
	// would let "Ädmin" and "ädmin" both register. The schema's owner is
	// schema_migrations', or the database's until that exists.
	var folds bool
	const q = `SELECT current_database(), current_user, lower('Ä') = 'ä', CASE WHEN NOT pg_has_role(o, 'USAGE') THEN pg_get_userbyid(o) ELSE '' END
		FROM coalesce((SELECT relowner FROM pg_class WHERE relname = 'schema_migrations' AND relnamespace = 'public'::regnamespace), (SELECT datdba FROM pg_database WHERE datname = current_database())) o`
	if err := conn.QueryRowContext(ctx, q).Scan(&s.database, &s.role, &folds, &s.owner); err != nil {
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
	for s.at = s.found; s.at < len(steps); s.at++ {
		// Sent as one query, a step and its record commit together or not
		// at all: the database is always at a whole step. A step queued
		// behind a long transaction would queue every request behind
		// itself: after lock_timeout it gives up, to be run again.
		q := fmt.Sprintf("SET LOCAL lock_timeout = '5s';\n%s;\nINSERT INTO schema_migrations (step) VALUES (%d)", steps[s.at], s.at+1)
		if _, err = conn.ExecContext(ctx, q); err != nil {
			return s, fmt.Errorf("step %d: %w (the schema stays at step %d)", s.at+1, err, s.at)
		}
		s.applied = append(s.applied, s.at+1)
	}
	return s, nil
}

// ensureSchema brings the schema to the server's step as the role connected
// may (the schema's owner); a database already there gets no statement that
// takes a table lock. Any other role that finds the schema behind, or may
// not read it, stops, naming the command that fixes it.
func ensureSchema(ctx context.Context, db *sql.DB) (schemaState, error) {
	s, err := migrate(ctx, db, schemaSteps)
	if pq.As(err, pqerror.InsufficientPrivilege) != nil {
		return s, fmt.Errorf(`database schema is at step %d, this server needs step %d: run "healthcare migrate" as the schema owner`, s.at, len(schemaSteps))
	}
	if err != nil {
		return s, err
	}
	// A step migrated without DB_APP_ROLE leaves the serving role without
	// its new tables: refuse to start, rather than answer 500s.
	const q = `SELECT coalesce(string_agg(relname, ', ' ORDER BY relname), '') FROM pg_class
		WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'S') AND NOT CASE relkind WHEN 'S' THEN has_sequence_privilege(oid, 'USAGE')
			ELSE has_table_privilege(oid, 'SELECT') AND (relname = 'schema_migrations' OR has_table_privilege(oid, 'INSERT')) END`
	var missing string
	if err := db.QueryRowContext(ctx, q).Scan(&missing); err != nil {
		return s, fmt.Errorf("read the role's rights: %w", err)
	}
	if missing != "" {
		return s, fmt.Errorf(`role %q may not use %s: run "DB_APP_ROLE=%s healthcare migrate" as the schema owner`, s.role, missing, s.role)
	}
	return s, nil
}

// grantServing gives role exactly what serving needs, and takes back
// anything more: read and write on the data tables, only SELECT and INSERT
// on the audit events, the sequences, and the functions the statements
// call; PUBLIC loses TEMPORARY (a temporary table named audit_events would
// take the role's events) and EXECUTE. It refuses a role that could take
// more by itself or through another role, and one that still holds more
// after the grant, by any path (checkServing): nothing is granted then.
func grantServing(ctx context.Context, db *sql.DB, role string) error {
	var why, database string
	// $1 the role: why it is unfit, or ''.
	const q = `SELECT coalesce(CASE WHEN r.rolsuper THEN 'is a superuser' WHEN r.rolcreaterole THEN 'can create roles' WHEN r.rolreplication THEN 'can replicate the cluster' END,
			(SELECT 'is a member of role ' || min(m.roleid::regrole::text) FROM pg_auth_members m WHERE m.member = r.oid),
			(SELECT 'owns ' || min(pg_describe_object(o.classid, o.objid, 0)) FROM pg_shdepend o WHERE o.refobjid = r.oid
				AND o.deptype = 'o' AND (o.dbid = d.oid OR o.classid = 'pg_database'::regclass AND o.objid = d.oid)), ''), d.datname
		FROM pg_roles r, pg_database d WHERE r.rolname = $1 AND d.datname = current_database()`
	err := db.QueryRowContext(ctx, q, role).Scan(&why, &database)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return fmt.Errorf("DB_APP_ROLE: role %q does not exist; create it first (README)", role)
	case err != nil:
		return fmt.Errorf("DB_APP_ROLE: %w", err)
	case why != "":
		return fmt.Errorf(`DB_APP_ROLE: role %q %s, so no grant could limit it: serve as a role that owns nothing and belongs to no other (README, "Two roles")`, role, why)
	}
	r := pq.QuoteIdentifier(role) // identifiers cannot be placeholders
	// No CREATE anywhere: nothing the role makes can stand in for a table or
	// a function that another role's statements name. The last line lists
	// every function the statements call, and login_wait, which the previous
	// version's instances call during a rolling upgrade.
	grants := `REVOKE ALL ON ALL TABLES IN SCHEMA public FROM ` + r + `;
		REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM ` + r + `;
		REVOKE ALL ON ALL ROUTINES IN SCHEMA public FROM PUBLIC, ` + r + `;
		REVOKE CREATE ON SCHEMA public FROM PUBLIC, ` + r + `;
		REVOKE CREATE, TEMPORARY ON DATABASE ` + pq.QuoteIdentifier(database) + ` FROM PUBLIC, ` + r + `;
		GRANT USAGE ON SCHEMA public TO ` + r + `;
		GRANT SELECT, INSERT, UPDATE, DELETE ON users, login_names, sessions, refresh_tokens, patients, doctors, mappings, login_attempts TO ` + r + `;
		GRANT SELECT, INSERT ON audit_events TO ` + r + `;
		GRANT SELECT ON schema_migrations TO ` + r + `;
		GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO ` + r + `;
		GRANT EXECUTE ON FUNCTION login_live(bigint, bigint), login_attempt(text, text, int, int, int, int), lock_wait(int, timestamptz, int, int), login_succeeded(text, text),
			api_time(timestamptz), etag(bigint, integer), changed_fields(text[], text[], text[]), login_wait(bigint, int, int) TO ` + r
	return withTx(ctx, db, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, grants); err != nil {
			return fmt.Errorf("DB_APP_ROLE: %w", err)
		}
		return checkServing(ctx, tx, role)
	})
}

// checkServing refuses a role that holds any right in the database beyond
// its own grants (which grantServing has just made exactly serving's), by
// any path: PUBLIC, a column grant, CREATE in another schema. The functions
// of an extension stay as it made them: its owner may keep them public.
func checkServing(ctx context.Context, tx *sql.Tx, role string) error {
	// $1 the role: the first right it holds beyond its own grants, or ''.
	const q = `SELECT coalesce(min(x.privilege || ' on ' || x.object), '') FROM pg_roles u, LATERAL (
			SELECT p, CASE c.relkind WHEN 'S' THEN 'sequence ' ELSE 'table ' END || c.oid::regclass, c.relacl, CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(u.oid, c.oid, p)
				WHEN p IN ('DELETE', 'TRUNCATE', 'TRIGGER') THEN has_table_privilege(u.oid, c.oid, p) ELSE has_any_column_privilege(u.oid, c.oid, p) END
			FROM pg_class c, unnest(CASE c.relkind WHEN 'S' THEN '{USAGE,SELECT,UPDATE}' ELSE '{SELECT,INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER}' END::text[]) p
			WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
			UNION ALL SELECT 'EXECUTE', 'function ' || f.oid::regprocedure, f.proacl, has_function_privilege(u.oid, f.oid, 'EXECUTE') FROM pg_proc f
			WHERE f.pronamespace = 'public'::regnamespace AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_proc'::regclass AND e.objid = f.oid AND e.deptype = 'e')
			UNION ALL SELECT 'CREATE', 'schema ' || n.nspname, NULL, has_schema_privilege(u.oid, n.oid, 'CREATE') FROM pg_namespace n
			UNION ALL SELECT p, 'database ' || current_database(), NULL, has_database_privilege(u.oid, current_database(), p) FROM unnest('{CREATE,TEMPORARY}'::text[]) p
		) x(privilege, object, acl, held)
		WHERE u.rolname = $1 AND x.held AND NOT EXISTS (SELECT 1 FROM aclexplode(x.acl) a WHERE a.grantee = u.oid AND a.privilege_type = x.privilege)`
	var excess string
	err := tx.QueryRowContext(ctx, q, role).Scan(&excess)
	if err == nil && excess != "" {
		err = fmt.Errorf(`DB_APP_ROLE: role %q would still hold %s beyond what serving needs (through PUBLIC, say): revoke it as its owner, then migrate again`, role, excess)
	}
	return err
}

// pruneLogins deletes ended and expired logins, with their refresh tokens,
// and runs of failed logins untouched for maxAgeDays, in batches that hold
// no lock for long. A live login keeps all its refresh tokens, expired ones
// included: reuse detection reads them, and they go with the login when it
// ends.
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
	err := inBatches(`DELETE FROM sessions WHERE id IN (
		SELECT id FROM sessions WHERE ended_at IS NOT NULL OR expires_at <= now() LIMIT 1000)`)
	if err != nil {
		return err
	}
	// $1 LOGIN_MAX_AGE_DAYS: older failures and logins mark nothing any more.
	return inBatches(`DELETE FROM login_attempts WHERE (name, source) IN (SELECT name, source FROM login_attempts
		WHERE greatest(last_failure, last_login) < now() - make_interval(days => $1) LIMIT 1000 FOR UPDATE SKIP LOCKED)`, maxAgeDays)
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

// conflicts are the unique keys a client can run into, with the field error
// each answers (fail turns the violation into it).
var conflicts = map[string]fieldErrors{
	"patients_owner_email":    {"email": {"A patient with this email already exists."}},
	"doctors_email":           {"email": {"A doctor with this email already exists."}},
	"mappings_patient_doctor": {"non_field_errors": {"The fields patient, doctor must make a unique set."}},
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

// database is the pool, running each query that returns rows as a prepared
// statement, so that PostgreSQL plans it once per connection rather than at
// every call (README, Performance). Query texts are built from constants, whitelisted
// orderings and a bounded number of search terms; the cache stops growing
// at maxStatements all the same.
type database struct {
	*sql.DB
	stmts sync.Map // query text → *sql.Stmt
	n     atomic.Int32
}

const maxStatements = 500

// customPlan makes a transaction's statements planned with their arguments.
const customPlan = `SET LOCAL plan_cache_mode = force_custom_plan`

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

// rowScanner is what *sql.Row and *sql.Rows share.
type rowScanner interface{ Scan(dest ...any) error }

// writeRow runs a statement that returns one row and writes that row with
// status; no row is a 404. A record with an entity tag (a patient, a
// doctor) is sent with its ETag, and a GET whose If-None-Match names that
// tag is answered 304 without a body.
func writeRow[T any](w http.ResponseWriter, r *http.Request, db *database, status int, scan func(rowScanner) (T, error), q string, args ...any) error {
	v, err := scan(db.QueryRowContext(r.Context(), q, args...))
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

// noneMatch reports whether an If-None-Match header names tag, or is "*".
// The comparison is weak (RFC 9110 §13.1.2): W/"7-3" names "7-3".
func noneMatch(header []string, tag string) bool {
	return slices.ContainsFunc(strings.Split(strings.Join(header, ","), ","), func(t string) bool {
		t = strings.TrimPrefix(strings.TrimSpace(t), "W/")
		return t == "*" || t == tag
	})
}

// ifMatch returns the strong tags an If-Match header lists, for a statement
// to compare with the record's own (etag() in schema.sql): nil, any version,
// without the header or with "*". A weak tag never matches, so a header of
// weak tags alone matches nothing.
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

var errPreconditionFailed = &apiError{status: http.StatusPreconditionFailed,
	body: detail("The record has changed since you read it.")}

// unmatched turns the 404 of a write that found no row into 412 when the
// request had If-Match and the record exists (exists, with args, says): the
// row was there, but in no version the client listed.
func (s *server) unmatched(r *http.Request, err error, exists string, args ...any) error {
	if err != errNotFound || ifMatch(r) == nil {
		return err
	}
	var found bool
	if err := s.db.QueryRowContext(r.Context(), exists, args...).Scan(&found); err != nil {
		return fmt.Errorf("check the record: %w", err)
	}
	if found {
		return errPreconditionFailed
	}
	return errNotFound
}

// deleteRow runs a DELETE of one row that returns it and answers 204, or
// 404 when nothing was deleted.
func deleteRow(w http.ResponseWriter, r *http.Request, db *database, q string, args ...any) error {
	err := db.QueryRowContext(r.Context(), q, args...).Scan(new(int64))
	if errors.Is(err, sql.ErrNoRows) {
		return errNotFound
	}
	if err != nil {
		return fmt.Errorf("delete: %w", err)
	}
	return noContent(w)
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
	terms   []any  // ILIKE patterns with %, _ and \ escaped; any, as they are query arguments
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
	if searchable {
		// PostgreSQL text holds neither NUL nor invalid UTF-8: NULs are
		// dropped, as DRF does, and invalid bytes become U+FFFD.
		search := strings.ToValidUTF8(strings.ReplaceAll(q.Get("search"), "\x00", ""), "\uFFFD")
		terms := strings.FieldsFunc(search, func(r rune) bool { return r == ' ' || r == ',' })
		if len(terms) > maxSearchTerms {
			return p, fieldErrors{"search": {fmt.Sprintf("Ensure there are no more than %d search terms.", maxSearchTerms)}}
		}
		escape := strings.NewReplacer(`\`, `\\`, `%`, `\%`, `_`, `\_`)
		for _, t := range terms {
			p.terms = append(p.terms, "%"+escape.Replace(t)+"%")
		}
	}
	return p, nil
}

// search returns " AND (c1 || ' ' || c2) ILIKE $7 AND (…) ILIKE $8" for
// first = 7: every term must occur in the columns joined by ' ', the
// expression a trigram index holds (schema.sql). A term holds no space, so
// it occurs in the joined text only within one column. The terms are the
// statement's last arguments, from $first.
func (p listParams) search(first int, columns ...string) (sql string) {
	for i := range p.terms {
		sql += fmt.Sprintf(" AND (%s) ILIKE $%d", strings.Join(columns, " || ' ' || "), first+i)
	}
	return sql
}

// count is a list's count column: its own scan, so that a page with a
// LIMIT stops after its rows, and a count through an index reads no row.
func (p listParams) count(table, where string) string {
	return "(SELECT count(*) FROM " + table + " WHERE " + where + ")"
}

// page is a collection GET's body, as DRF's PageNumberPagination writes it.
type page[T any] struct {
	Count    int     `json:"count"`
	Next     *string `json:"next"`
	Previous *string `json:"previous"`
	Results  []T     `json:"results"`
}

// offset is the number of rows before the page.
func (p listParams) offset() int { return (p.page - 1) * p.size }

// listPage answers a collection GET with the page p asks for: q, run with
// args, selects the page's rows with the total count in front of each. A
// search runs in a transaction planned with its terms (README, Performance):
// a generic plan, blind to them, may read a whole table for one match.
func listPage[T any](w http.ResponseWriter, r *http.Request, db *database, p listParams, scan func(rowScanner) (T, error), q string, args ...any) error {
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
	var err error
	if len(p.terms) == 0 {
		err = read(db.QueryContext(ctx, q, args...))
	} else {
		st := db.stmt(ctx, q) // prepared before the transaction, which holds a connection
		err = withTx(ctx, db.DB, func(tx *sql.Tx) error {
			if _, err := tx.ExecContext(ctx, customPlan); err != nil {
				return err
			}
			if st == nil { // a full cache
				return read(tx.QueryContext(ctx, q, args...))
			}
			return read(tx.StmtContext(ctx, st).QueryContext(ctx, args...))
		})
	}
	if err != nil {
		return fmt.Errorf("list: %w", err)
	}
	if len(results) == 0 && p.page > 1 {
		return errInvalidPage
	}
	pg := page[T]{Count: count, Results: results}
	if p.page*p.size < count {
		pg.Next = pageLink(r, "page", strconv.Itoa(p.page+1))
	}
	if p.page > 1 {
		pg.Previous = pageLink(r, "page", strconv.Itoa(p.page-1))
	}
	return writeJSON(w, http.StatusOK, pg)
}

// pageLink is r's own URL, absolute, with key set to value in its query.
// The link to page 1 carries no page parameter, as DRF's.
func pageLink(r *http.Request, key, value string) *string {
	q := r.URL.Query()
	q.Set(key, value)
	if key == "page" && value == "1" {
		q.Del(key)
	}
	scheme := "http"
	if infoFrom(r).https {
		scheme = "https"
	}
	u := (&url.URL{Scheme: scheme, Host: r.Host, Path: r.URL.Path, RawQuery: q.Encode()}).String()
	return &u
}

// scanFunc makes a function a rowScanner: listPage's scans the count column
// in front of a row's own columns.
type scanFunc func(dest ...any) error

func (f scanFunc) Scan(dest ...any) error { return f(dest...) }

// The audit trail: account events, and the list of a caller's events.
// Patient statements write their own events (patients.go, mappings.go).

// recordAccountEvent writes an account's audit event (no patient), in the
// transaction of the change it records.
func recordAccountEvent(ctx context.Context, tx *sql.Tx, r *http.Request, userID, loginID int64, action string) error {
	info := infoFrom(r)
	const q = `INSERT INTO audit_events (user_id, login_id, action, ip, request_id) VALUES ($1, $2, $3, $4, $5)`
	if _, err := tx.ExecContext(ctx, q, userID, loginID, action, info.clientIP.String(), info.id); err != nil {
		return fmt.Errorf("record %s: %w", action, err)
	}
	return nil
}

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

func scanEvent(row rowScanner) (event, error) {
	var e event
	err := row.Scan(&e.ID, &e.At, &e.Action, &e.Patient, &e.Doctor, &e.Fields, &e.Login, &e.IP, &e.RequestID)
	return e, err
}

// auditActions are every action an event may have, in one list: schema.sql's
// check, the action filter and openapi.json's enums are tested against it.
var auditActions = []string{"patient.create", "patient.read", "patient.update", "patient.delete", "patient.list",
	"mapping.create", "mapping.delete", "mapping.list", "doctor.create", "doctor.update", "doctor.delete", "login", "login.failed", "refresh.reused", "logout",
	"logout.all", "password.change", "login.unlock"}

// auditFilters returns the WHERE of the audit filters q gives: only those,
// so that each set of filters is its own statement, with a plan that reads
// its own index. Each value is appended to args, its placeholder next.
func auditFilters(q url.Values, args []any) (string, []any, error) {
	where, errs := "user_id = $1", fieldErrors{}
	for _, fc := range [][2]string{{"patient", "patient_id"}, {"doctor", "doctor_id"}, {"login", "login_id"}, {"action", "action"}} {
		f, v := fc[0], q.Get(fc[0])
		n, err := strconv.ParseInt(v, 10, 64)
		switch {
		case v == "":
			continue
		case f == "action" && !slices.Contains(auditActions, v):
			errs.add(f, fmt.Sprintf("Select a valid choice. %s is not one of the available choices.", v))
		case f == "action":
			args = append(args, v)
		case err != nil:
			errs.add(f, "A valid integer is required.")
		case n < 1:
			errs.add(f, "Ensure this value is greater than or equal to 1.")
		default:
			args = append(args, n)
		}
		where += fmt.Sprintf(" AND %s = $%d", fc[1], len(args))
	}
	if len(errs) > 0 {
		return "", nil, errs
	}
	return where, args, nil
}

// A cursor is an opaque position in the trail: base64 of "<" and an event
// id (the events before it: a next page) or of ">" and one (after it: a
// previous page).
func cursorAt(dir byte, id int64) string {
	return base64.RawURLEncoding.EncodeToString(strconv.AppendInt([]byte{dir}, id, 10))
}

// handleListAudit lists the caller's own events, newest first, a page at a
// time by cursor (DRF's CursorPagination): a page reads about its own rows
// through one index, however long the trail. user_id = $1 holds for every
// filter: no filter reaches another account's events.
func (s *server) handleListAudit(w http.ResponseWriter, r *http.Request) error {
	q, info := r.URL.Query(), infoFrom(r)
	p, _ := parseList(url.Values{"page_size": q["page_size"]}, nil, false) // page_size alone never fails
	// $1 user, $2 login, $3 the page's size and one, $4 the cursor's id,
	// then each filter given, in this order, from $5.
	where, args, err := auditFilters(q, []any{info.userID, info.sessionID, p.size + 1, int64(math.MaxInt64)})
	if err != nil {
		return err
	}
	// Only a cursor in the very form this server writes is read: decoded,
	// it must encode to the same text.
	dir := byte('<')
	if c := q.Get("cursor"); q.Has("cursor") {
		b, _ := base64.RawURLEncoding.DecodeString(c)
		id, err := strconv.ParseInt(string(b[min(1, len(b)):]), 10, 64)
		if err != nil || id < 1 || b[0] != '<' && b[0] != '>' || cursorAt(b[0], id) != c {
			return &apiError{status: http.StatusNotFound, body: detail("Invalid cursor")}
		}
		dir, args[3] = b[0], id
	}
	// dir is '<' or '>', checked above: the comparison, and its order.
	order := map[byte]string{'<': "DESC", '>': "ASC"}[dir]
	query := `SELECT id, api_time(at), action, patient_id, doctor_id, fields, login_id, ip, request_id FROM audit_events
		WHERE ` + where + ` AND id ` + string(dir) + ` $4 AND login_live($1, $2) ORDER BY id ` + order + ` LIMIT $3`
	rows, err := s.db.QueryContext(r.Context(), query, args...)
	if err != nil {
		return fmt.Errorf("list audit: %w", err)
	}
	events, err := scanAll(rows, scanEvent)
	if err != nil {
		return err
	}
	more := len(events) > p.size // beyond this page, in the direction read
	events = events[:min(len(events), p.size)]
	if dir == '>' {
		slices.Reverse(events)
	}
	var pg struct {
		Next     *string `json:"next"`
		Previous *string `json:"previous"`
		Results  []event `json:"results"`
	}
	if pg.Results = events; len(events) > 0 {
		if more || dir == '>' {
			pg.Next = pageLink(r, "cursor", cursorAt('<', events[len(events)-1].ID))
		}
		if more && dir == '>' || dir == '<' && q.Has("cursor") {
			pg.Previous = pageLink(r, "cursor", cursorAt('>', events[0].ID))
		}
	}
	return writeJSON(w, http.StatusOK, pg)
}
