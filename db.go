package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lib/pq"
	"github.com/lib/pq/pqerror"
)

//go:embed schema.sql
var schemaSQL string

// schemaLockID names the advisory lock held while the schema is applied, so
// that several instances starting at once do not run it concurrently.
const schemaLockID = 7_201_418_305

// openDB connects to the database cfg names, creating it when it is missing,
// and applies schema.sql.
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
	if err == nil {
		err = migrate(ctx, db)
	}
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("database %q on %s: %w", cfg.Database, cfg.Host, err)
	}
	return db, nil
}

// connect opens a pool without touching the network.
func connect(cfg pq.Config, maxConns int) (*sql.DB, error) {
	// Every statement gets a generic plan, made once per prepared statement
	// and connection rather than for the values of each call: planning an
	// owner's list costs more than running it, and PostgreSQL's own choice
	// kept planning every call. schema.sql's n_distinct settings make those
	// plans the right ones for owners of 50 rows and of 100,000 alike.
	cfg.Runtime = maps.Clone(cfg.Runtime)
	if cfg.Runtime == nil {
		cfg.Runtime = map[string]string{}
	}
	cfg.Runtime["plan_cache_mode"] = "force_generic_plan"
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
	if pq.As(err, pqerror.DuplicateDatabase) != nil {
		return nil // another instance created it first
	}
	if err != nil {
		return fmt.Errorf("create database: %w", err)
	}
	return nil
}

// migrate applies the embedded schema under an advisory lock.
func migrate(ctx context.Context, db *sql.DB) error {
	conn, err := db.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, `SELECT pg_advisory_lock($1)`, schemaLockID); err != nil {
		return fmt.Errorf("lock schema: %w", err)
	}
	defer conn.ExecContext(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock($1)`, schemaLockID)
	if _, err := conn.ExecContext(ctx, schemaSQL); err != nil {
		return fmt.Errorf("apply schema: %w", err)
	}
	return nil
}

// withTx runs fn in a transaction, committing only when fn succeeds.
func withTx(ctx context.Context, db *sql.DB, fn func(*sql.Tx) error) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback()
	if err := fn(tx); err != nil {
		return txDeadline(ctx, err)
	}
	if err := tx.Commit(); err != nil {
		return txDeadline(ctx, fmt.Errorf("commit: %w", err))
	}
	return nil
}

// txDeadline keeps the cause of an ErrTxDone: when the request's deadline
// passes inside a transaction, database/sql rolls it back and the next
// statement or the commit reports ErrTxDone. Nothing was written; that is
// a 503 (unavailable, try again), not a 500.
func txDeadline(ctx context.Context, err error) error {
	if errors.Is(err, sql.ErrTxDone) && ctx.Err() != nil {
		return fmt.Errorf("%w (%w)", err, ctx.Err())
	}
	return err
}

// violation reports the constraint err violated when it has the given code.
func violation(err error, code pqerror.Code) (constraint string, ok bool) {
	if e := pq.As(err, code); e != nil {
		return e.Constraint, true
	}
	return "", false
}

// isUnavailable reports whether err means the database cannot be reached
// (down, restarting, out of connections, or too slow), which the client sees
// as a 503 it may retry rather than a 500.
func isUnavailable(err error) bool {
	var pqErr *pq.Error
	if errors.As(err, &pqErr) {
		switch pqErr.Code.Class() {
		case "08", "53", "57", "58": // connection, resources, operator intervention, system
			return true
		}
		return false
	}
	var netErr net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, driver.ErrBadConn) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.As(err, &netErr)
}

// listParams are a collection GET's validated query parameters.
type listParams struct {
	page      int // 1-based; 0 means "last"
	size      int
	orderBy   string   // SQL from a fixed whitelist, never from input
	reverseBy string   // orderBy with every direction flipped
	terms     []string // ILIKE patterns with %, _ and \ escaped
}

// maxSearchTerms bounds the work one search can ask of the database.
const maxSearchTerms = 20

// parseList reads page, page_size, ordering and (when searchable) search.
// orderable maps each public field name to its SQL column.
func parseList(q url.Values, orderable map[string]string, searchable bool) (listParams, error) {
	p := listParams{page: 1, size: 10}
	switch v := q.Get("page"); v {
	case "":
	case "last":
		p.page = 0
	default:
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return p, errInvalidPage
		}
		p.page = n
	}
	// A size too large for an int is still "larger", so it is capped too
	// (Atoi then returns the largest int with ErrRange), not the default.
	if n, err := strconv.Atoi(q.Get("page_size")); (err == nil || errors.Is(err, strconv.ErrRange)) && n > 0 {
		p.size = min(n, 100)
	}
	var order, reverse []string
	seen := map[string]bool{}
	for _, f := range strings.Split(q.Get("ordering"), ",") {
		f = strings.TrimSpace(f)
		name := strings.TrimPrefix(f, "-")
		col, ok := orderable[name]
		switch {
		case f == "" || seen[name]: // a repeated field changes nothing
			continue
		case !ok:
			return p, fieldErrors{"ordering": {fmt.Sprintf("Invalid ordering field %q.", f)}}
		case name == f:
			order, reverse = append(order, col), append(reverse, col+" DESC")
		default:
			order, reverse = append(order, col+" DESC"), append(reverse, col)
		}
		seen[name] = true
	}
	// The id tie-breaker keeps pages stable when the ordered values repeat.
	if !seen["id"] {
		order, reverse = append(order, orderable["id"]), append(reverse, orderable["id"]+" DESC")
	}
	p.orderBy, p.reverseBy = strings.Join(order, ", "), strings.Join(reverse, ", ")
	if searchable {
		// PostgreSQL text holds neither NUL nor invalid UTF-8 (a 500 if sent):
		// NULs are dropped, as DRF does, and invalid bytes become U+FFFD, as
		// Django decodes a query string.
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

// searchSQL returns " AND (...)" clauses requiring every term to match at
// least one of columns, with placeholders numbered from after args; args
// gains one value per term.
func (p listParams) searchSQL(columns []string, args *[]any) string {
	var b strings.Builder
	for _, t := range p.terms {
		*args = append(*args, t)
		n := "$" + strconv.Itoa(len(*args))
		b.WriteString(" AND (")
		for i, c := range columns {
			if i > 0 {
				b.WriteString(" OR ")
			}
			b.WriteString(c + " ILIKE " + n)
		}
		b.WriteString(")")
	}
	return b.String()
}

// page is a collection GET's body, as DRF's PageNumberPagination writes it.
type page[T any] struct {
	Count    int     `json:"count"`
	Next     *string `json:"next"`
	Previous *string `json:"previous"`
	Results  []T     `json:"results"`
}

// newPage builds the page with absolute links that keep the request's other
// query parameters; the link to page 1 carries no page parameter, as in DRF.
func newPage[T any](r *http.Request, p listParams, count int, results []T) page[T] {
	if results == nil {
		results = []T{}
	}
	link := func(n int) *string {
		q := r.URL.Query()
		if n == 1 {
			q.Del("page")
		} else {
			q.Set("page", strconv.Itoa(n))
		}
		u := url.URL{Scheme: requestScheme(r), Host: r.Host, Path: r.URL.Path, RawQuery: q.Encode()}
		s := u.String()
		return &s
	}
	pg := page[T]{Count: count, Results: results}
	if p.page*p.size < count {
		pg.Next = link(p.page + 1)
	}
	if p.page > 1 {
		pg.Previous = link(p.page - 1)
	}
	return pg
}

// rowScanner is what *sql.Row and *sql.Rows share.
type rowScanner interface{ Scan(dest ...any) error }

// listPage answers a collection GET: the page of rows from fromWhere
// ordered by p, each read by scan, and their number from countSQL (a
// SELECT of one number). Each row carries the count, taken in the same
// snapshot as the rows, and the query checks the login, so page 1 costs
// one round trip. Other pages ask for the count first, to refuse a page
// past the end and so that a page past the middle can be read from the
// end: OFFSET steps over every row it skips, and the last page of 100,000
// rows would otherwise cost as much as reading them all.
//
// A search is not a prepared statement: its text varies with the number of
// terms, and would fill the statement cache.
func listPage[T any](r *http.Request, db *database, p listParams, columns, fromWhere, countSQL string, args []any, scan func(rowScanner) (T, error)) (page[T], error) {
	ctx, info := r.Context(), infoFrom(r)
	var q querier = db
	if len(p.terms) > 0 {
		q = db.DB
	}
	n := len(args)
	live := liveSQL(n+1, n+2)
	args = append(args, info.sessionID, info.userID)
	countAlone := func() (int, error) {
		var count int
		var ok bool
		err := q.QueryRowContext(ctx, "SELECT ("+countSQL+"), "+live, args...).Scan(&count, &ok)
		if err != nil {
			return 0, fmt.Errorf("count: %w", err)
		}
		if !ok {
			return 0, errAccessInvalid
		}
		return count, nil
	}
	limit, offset, orderBy, reversed := "$%[1]d", "$%[2]d", p.orderBy, false
	if p.page != 1 {
		count, err := countAlone()
		if err != nil {
			return page[T]{}, err
		}
		// Compared before multiplying: a page number near the int limit
		// must be a 404, not an overflowed offset.
		pages := max(1, (count+p.size-1)/p.size)
		if p.page == 0 { // "last"
			p.page = pages
		}
		if p.page > pages {
			return page[T]{}, errInvalidPage
		}
		if o := (p.page - 1) * p.size; o > 0 && count-o-p.size < o {
			// Read from the end. The position comes from the count the
			// query itself sees, so that a row committed since the count
			// above cannot shift the page.
			orderBy, reversed = p.reverseBy, true
			limit, offset = "greatest(least($%[1]d, (SELECT n FROM total) - $%[2]d), 0)", "greatest((SELECT n FROM total) - $%[2]d - $%[1]d, 0)"
		}
	}
	query := fmt.Sprintf("WITH total(n) AS (%s) SELECT (SELECT n FROM total), %s FROM %s AND %s ORDER BY %s LIMIT %s OFFSET %s",
		countSQL, columns, fromWhere, live, orderBy, fmt.Sprintf(limit, n+3, n+4), fmt.Sprintf(offset, n+3, n+4))
	rows, err := q.QueryContext(ctx, query, append(args, p.size, (p.page-1)*p.size)...)
	if err != nil {
		return page[T]{}, fmt.Errorf("list: %w", err)
	}
	defer rows.Close()
	var count int
	results := make([]T, 0, p.size)
	for rows.Next() {
		v, err := scan(withCount{rows, &count})
		if err != nil {
			return page[T]{}, fmt.Errorf("scan: %w", err)
		}
		results = append(results, v)
	}
	if err := rows.Err(); err != nil {
		return page[T]{}, fmt.Errorf("list: %w", err)
	}
	if reversed {
		slices.Reverse(results)
	}
	if len(results) == 0 {
		// No rows: an empty list, a page emptied since the count, or an
		// ended login.
		if _, err := countAlone(); err != nil {
			return page[T]{}, err
		}
		if p.page > 1 {
			return page[T]{}, errInvalidPage
		}
		// Page 1 is never invalid, and shows what its query saw: rows
		// committed since then are in the next request's answer.
		count = 0
	}
	return newPage(r, p, count, results), nil
}

// querier is what listPage needs of *sql.DB and *database.
type querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// withCount scans the count column in front of a row's own columns.
type withCount struct {
	rows  *sql.Rows
	count *int
}

func (w withCount) Scan(dest ...any) error {
	return w.rows.Scan(append([]any{w.count}, dest...)...)
}

// liveSQL is the condition "login $sid of user $uid has not ended". Every
// query that serves an authenticated request carries it, so the check costs
// no round trip of its own, and a logout on any instance sharing the
// database ends the login's access tokens at once. (It is written out, not
// a SQL function, because PostgreSQL would not inline a function with a
// subquery, and calling one costs more than the whole query.)
func liveSQL(sid, uid int) string {
	return fmt.Sprintf("EXISTS (SELECT 1 FROM sessions WHERE id = $%d AND user_id = $%d AND ended_at IS NULL)", sid, uid)
}

// database is the pool, running each query as a prepared statement, so
// that PostgreSQL plans it once per connection rather than at every call:
// that more than doubles what one core serves. Query texts are built from
// constants only, so there are few of them; the cache stops growing at
// maxStatements all the same.
type database struct {
	*sql.DB
	mu    sync.RWMutex
	stmts map[string]*sql.Stmt
}

const maxStatements = 500

// stmt returns query's prepared statement, or nil to run it unprepared (a
// full cache, or a failed prepare, whose error the query itself will meet).
func (d *database) stmt(ctx context.Context, query string) *sql.Stmt {
	d.mu.RLock()
	st, ok := d.stmts[query]
	full := len(d.stmts) >= maxStatements
	d.mu.RUnlock()
	if ok || full {
		return st
	}
	st, err := d.DB.PrepareContext(ctx, query)
	if err != nil {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if prev, ok := d.stmts[query]; ok {
		st.Close() // another request prepared it first
		return prev
	}
	d.stmts[query] = st
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

func (d *database) ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error) {
	if st := d.stmt(ctx, query); st != nil {
		return st.ExecContext(ctx, args...)
	}
	return d.DB.ExecContext(ctx, query, args...)
}

// assignments are validated column values for an INSERT or UPDATE, in the
// order the fields were read. Column names come from Go constants only.
type assignments struct {
	cols []string
	args []any
}

func (a *assignments) set(col string, v any) {
	a.cols = append(a.cols, col)
	a.args = append(a.args, v)
}

// insert returns "INSERT INTO table (cols) SELECT $1, … WHERE <login live>
// RETURNING returning" and its arguments: the row is only written while the
// caller's login is live, and otherwise the query returns no row.
func (a assignments) insert(info *requestInfo, table, returning string) (string, []any) {
	marks := make([]string, len(a.cols))
	for i := range marks {
		marks[i] = "$" + strconv.Itoa(i+1)
	}
	n := len(a.cols)
	q := fmt.Sprintf("INSERT INTO %s (%s) SELECT %s WHERE %s RETURNING %s",
		table, strings.Join(a.cols, ", "), strings.Join(marks, ", "), liveSQL(n+1, n+2), returning)
	return q, append(a.args, info.sessionID, info.userID)
}

// update returns "UPDATE table SET updated_at = now(), col = $4, … WHERE
// where RETURNING returning" and its arguments. where may use $1 (the row's
// id), $2 (the caller's user id) and $3 (the caller's session id).
func (a assignments) update(info *requestInfo, id int64, table, where, returning string) (string, []any) {
	sets := []string{"updated_at = now()"}
	for i, c := range a.cols {
		sets = append(sets, fmt.Sprintf("%s = $%d", c, i+4))
	}
	q := fmt.Sprintf("UPDATE %s SET %s WHERE %s RETURNING %s", table, strings.Join(sets, ", "), where, returning)
	return q, append([]any{id, info.userID, info.sessionID}, a.args...)
}

// stampSQL selects a timestamp column as DRF writes a time: RFC 3339 in UTC
// with microseconds and "Z". PostgreSQL formats it, so it reaches the JSON
// as a string, without being parsed and formatted again in Go.
func stampSQL(column string) string {
	return "to_char(" + column + ` AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')`
}
