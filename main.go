// Command healthcare serves the Healthcare API: users with JWT logins,
// private patients, a shared doctor directory and patient–doctor mappings,
// on PostgreSQL. README and openapi.json describe its API.
package main

import (
	"cmp"
	"context"
	"crypto/rand"
	"database/sql"
	_ "embed"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode"

	"github.com/lib/pq"
)

func main() {
	if err := run(context.Background(), os.Args[1:], os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

// usage is "healthcare help": the commands, and every variable with its
// default (README lists the bounds).
const usage = `Usage: healthcare [command]
  serve                    serve the API (the default)
  migrate                  bring the schema up to date; with DB_APP_ROLE, grant that role what serving needs
  unlock <username>        end the waits of a user's login names
  import-django [--check] [--doctor-creator <username>]  copy a Django service's database (DJANGO_DATABASE_URL) into an empty one
  version, help (-h, --help)
Environment variables (default), also read from ./.env:
  SECRET_KEY (random per run)  ADDR (127.0.0.1:8000)  DEBUG (False)  ALLOWED_HOSTS (localhost,127.0.0.1,[::1])
  TIME_ZONE (UTC)  DATABASE_URL (none; a URL or key=value pairs; overrides DB_*)  DB_NAME (healthcare_db)  DB_USER (postgres)  DB_PASSWORD (none)
  DB_HOST (localhost)  DB_PORT (5432)  DB_SSLMODE (disable for loopback or a socket, else verify-full)  DB_APP_ROLE (none)
  ACCESS_TOKEN_LIFETIME_MIN (15)  REFRESH_TOKEN_LIFETIME_DAYS (1)  LOGIN_MAX_AGE_DAYS (30)  REFRESH_REUSE_GRACE_S (10)
  LOGIN_LOCK_AFTER (10)  LOGIN_LOCK_S (60)  LOGIN_LOCK_ACCOUNT_AFTER (100)  PASSWORD_ITERATIONS (600000)
  CORS_ALLOWED_ORIGINS (http://localhost:3000,http://127.0.0.1:3000,http://localhost:8080,http://127.0.0.1:8080)
  TRUSTED_PROXIES (none)  RATE_MAX_KEYS (100000)  RATE_REGISTER (5/hour)  RATE_LOGIN (10/hour)  RATE_ANON (100/hour)
  RATE_USER (1000/hour)  TLS_CERT_FILE, TLS_KEY_FILE (none)  DJANGO_DATABASE_URL (none; import-django only)
  GOGC (400)  GOMEMLIMIT (64MiB)
`

// run carries out the command in args (serve by default) and, serving,
// blocks until ctx ends or a signal arrives, then shuts down gracefully.
// Tests call it with their own environment.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	command := "serve"
	if len(args) > 0 {
		command = args[0]
	}
	imp, impErr := parseImportArgs(args[min(1, len(args)):])
	valid := map[string]bool{"serve": len(args) <= 1, "migrate": len(args) == 1, "unlock": len(args) == 2, "import-django": impErr == nil}
	switch {
	case command == "help" || command == "-h" || command == "--help":
		_, err := io.WriteString(stdout, usage)
		return err
	case command == "version":
		return printVersion(stdout)
	case !valid[command]:
		return fmt.Errorf("unknown command %q: healthcare help lists the commands", strings.Join(args, " "))
	}
	dotenv, err := readDotenv(".env")
	if err != nil {
		return err
	}
	// Real environment variables win over .env.
	cfg, warnings, err := loadConfig(func(k string) string { return cmp.Or(getenv(k), dotenv[k]) })
	if err != nil {
		return err
	}
	logger := slog.New(slog.NewJSONHandler(stdout, nil))
	if cfg.debug {
		logger = slog.New(slog.NewTextHandler(stdout, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	// Garbage may grow to four times the live heap, within a soft 64 MiB
	// while serving (README, Performance), unless GOGC or GOMEMLIMIT say
	// otherwise; import-django holds the whole original in memory.
	if getenv("GOGC") == "" {
		debug.SetGCPercent(400)
	}
	if getenv("GOMEMLIMIT") == "" && command == "serve" {
		debug.SetMemoryLimit(64 << 20)
	}
	db, err := openDB(ctx, cfg.db, 4*runtime.NumCPU(), logger)
	if err != nil {
		return err
	}
	defer db.Close()
	switch command {
	case "migrate":
		return runMigrate(ctx, db, cfg.appRole, stdout)
	case "import-django":
		return importDjango(ctx, db, cfg, imp, logger, stdout)
	}
	schema, err := ensureSchema(ctx, db)
	if err != nil {
		return err
	}
	if command == "unlock" {
		return unlock(ctx, db, args[1], stdout)
	}
	return serve(ctx, cfg, db, logger, schema, warnings)
}

// printVersion is "healthcare version": the module's version and commit as
// go build stamps them from git ("(modified)": the tree had changes), and Go's.
func printVersion(stdout io.Writer) error {
	version := "(unknown)" // a binary built without module support has no build information
	if info, ok := debug.ReadBuildInfo(); ok {
		version = info.Main.Version
		for _, s := range info.Settings {
			switch {
			case s.Key == "vcs.revision":
				version += " commit " + s.Value
			case s.Key == "vcs.modified" && s.Value == "true":
				version += " (modified)"
			}
		}
	}
	_, err := fmt.Fprintln(stdout, "healthcare", version, runtime.Version())
	return err
}

// runMigrate is "healthcare migrate": it applies the missing schema steps,
// grants DB_APP_ROLE what serving needs, and prints the step reached.
func runMigrate(ctx context.Context, db *sql.DB, appRole string, stdout io.Writer) error {
	s, err := migrate(ctx, db, schemaSQL, schemaSteps)
	if err == nil && appRole != "" {
		if err = grantServing(ctx, db, appRole); err == nil {
			fmt.Fprintf(stdout, "granted role %q what serving needs\n", appRole)
		}
	}
	switch {
	case err == nil:
		fmt.Fprintf(stdout, "schema at step %d\n", s.at)
		return nil
	case s.owner != "": // whatever failed, only the owner can migrate
		return fmt.Errorf(`migrate: the schema of database %q belongs to role %q, not %q: run "DB_USER=%s healthcare migrate", or start from a database that %q owns (README, "Two roles")`,
			s.database, s.owner, s.role, s.owner, s.role)
	}
	return fmt.Errorf("migrate: %w", err)
}

// importArgs are import-django's flags: [--check] [--doctor-creator <username>].
type importArgs struct {
	check   bool   // check every row, write nothing
	creator string // the imported user who becomes every imported doctor's creator
}

func parseImportArgs(args []string) (a importArgs, err error) {
	flags := flag.NewFlagSet("import-django", flag.ContinueOnError)
	flags.SetOutput(io.Discard)
	flags.BoolVar(&a.check, "check", false, "")
	flags.StringVar(&a.creator, "doctor-creator", "", "")
	if err = flags.Parse(args); err == nil && flags.NArg() > 0 {
		err = errors.New("unexpected argument")
	}
	return a, err
}

// serve is "healthcare serve": it logs what start found, prunes ended
// logins hourly, and answers HTTP on cfg.addr until ctx ends, then lets
// in-flight requests finish.
func serve(ctx context.Context, cfg config, db *sql.DB, logger *slog.Logger, schema schemaState, warnings []string) error {
	logger.Info("schema", "database", schema.database, "role", schema.role, "found_step", schema.found, "applied", schema.applied)
	for _, w := range warnings { // about serving: the key, for one
		logger.Warn(w)
	}
	srv := newServer(cfg, db, logger)
	go func() {
		for ctx.Err() == nil {
			if err := pruneLogins(ctx, db, cfg.loginMaxAgeDays); err != nil {
				logger.Warn("prune", "err", err)
			}
			select {
			case <-ctx.Done():
			case <-time.After(time.Hour):
			}
		}
	}()
	httpServer := &http.Server{
		Handler: srv,
		// Slow clients are cut off: a trickled header or body cannot hold a
		// connection (and its goroutine) open for long.
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       15 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return fmt.Errorf("ADDR: %w", err)
	}
	// When ctx ends, shut down; if Serve fails first, the deferred stop
	// cancels that, and there is no shutdown to wait for.
	stopped := make(chan error, 1)
	defer context.AfterFunc(ctx, func() {
		logger.Info("shutting down")
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		stopped <- httpServer.Shutdown(shutdownCtx)
	})()
	if cfg.tlsCert != "" {
		logger.Info("serving", "url", "https://"+ln.Addr().String()+"/")
		err = httpServer.ServeTLS(ln, cfg.tlsCert, cfg.tlsKey)
	} else {
		logger.Info("serving", "url", "http://"+ln.Addr().String()+"/")
		err = httpServer.Serve(ln)
	}
	if !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve: %w", err)
	}
	if err := <-stopped; err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	return nil
}

// secret keeps a key out of the log even if it is logged by mistake.
type secret []byte

func (secret) LogValue() slog.Value { return slog.StringValue("[redacted]") }

// server holds what the handlers share. There is no package-level state:
// tests build as many independent servers as they like.
type server struct {
	cfg       config
	db        *database
	log       *slog.Logger
	mux       *http.ServeMux
	signer    *signer
	passwords *passwords
	// PostgreSQL's last answer to /readyz, kept for a second so that no
	// rate of probes becomes a rate of queries.
	ready struct {
		sync.Mutex
		at  time.Time
		err error
	}
	hopWarned atomic.Int64 // when clientIP last logged a hop that is no address, in Unix seconds

	commonPasswords map[string]struct{}
	// The rate limits of API.md, each keyed by source or by user.
	registerLimit, loginLimit, anonLimit, userLimit *limiter
}

// newServer builds the handler for cfg on db.
func newServer(cfg config, db *sql.DB, logger *slog.Logger) *server {
	// Half the cores at most hash passwords: a login flood then leaves the
	// other half to every request that needs no hash.
	pw := newPasswords(cfg.passwordIterations, max(1, runtime.NumCPU()/2))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := pw.raiseFailCost(ctx, db); err != nil {
		logger.Warn("failed logins are padded from the first one that meets a costlier hash", "err", err)
	}
	s := &server{
		cfg:             cfg,
		db:              &database{DB: db},
		log:             logger,
		mux:             http.NewServeMux(),
		signer:          &signer{key: cfg.secretKey, accessTTL: cfg.accessTTL, refreshTTL: cfg.refreshTTL},
		passwords:       pw,
		commonPasswords: loadCommonPasswords(),
		registerLimit:   newLimiter(cfg.rateRegister, cfg.rateMaxKeys),
		loginLimit:      newLimiter(cfg.rateLogin, cfg.rateMaxKeys),
		anonLimit:       newLimiter(cfg.rateAnon, cfg.rateMaxKeys),
		userLimit:       newLimiter(cfg.rateUser, cfg.rateMaxKeys),
	}
	s.addRoutes()
	return s
}

// addRoutes lists the whole API. Each pattern ends in {$} so that it
// matches its path exactly, not the subtree below it.
func (s *server) addRoutes() {
	handle := func(pattern string, a access, h handler) {
		s.mux.Handle(pattern, route{s: s, access: a, h: h})
	}
	handle("GET /healthz", probe, s.handleHealthz)
	handle("GET /readyz", probe, s.handleReadyz)
	handle("GET /api/schema/{$}", public, handleSchema)

	handle("POST /api/auth/register/{$}", public, s.handleRegister)
	handle("POST /api/auth/login/{$}", public, s.countFailures(errBadCredentials, s.handleLogin))
	handle("POST /api/auth/token/refresh/{$}", refreshing, s.handleRefresh)
	handle("POST /api/auth/logout/{$}", refreshing, s.handleLogout)
	handle("POST /api/auth/logout/all/{$}", private, s.handleLogoutAll)
	handle("POST /api/auth/password/{$}", private, s.countFailures(errWrongOldPassword, s.handleChangePassword))
	handle("GET /api/auth/me/{$}", private, s.handleMe)

	handle("GET /api/patients/{$}", private, s.handleListPatients)
	handle("POST /api/patients/{$}", private, s.handleCreatePatient)
	handle("GET /api/patients/{id}/{$}", private, s.handleGetPatient)
	handle("PUT /api/patients/{id}/{$}", private, s.handleUpdatePatient)
	handle("PATCH /api/patients/{id}/{$}", private, s.handleUpdatePatient)
	handle("DELETE /api/patients/{id}/{$}", private, s.handleDeletePatient)

	handle("GET /api/doctors/{$}", private, s.handleListDoctors)
	handle("POST /api/doctors/{$}", private, s.handleCreateDoctor)
	handle("GET /api/doctors/{id}/{$}", private, s.handleGetDoctor)
	handle("PUT /api/doctors/{id}/{$}", private, s.handleUpdateDoctor)
	handle("PATCH /api/doctors/{id}/{$}", private, s.handleUpdateDoctor)
	handle("DELETE /api/doctors/{id}/{$}", private, s.handleDeleteDoctor)

	handle("GET /api/mappings/{$}", private, s.handleListMappings)
	handle("POST /api/mappings/{$}", private, s.handleCreateMapping)
	handle("GET /api/mappings/{id}/{$}", private, s.handlePatientMappings)
	handle("DELETE /api/mappings/{id}/{$}", private, s.handleDeleteMapping)

	handle("GET /api/audit/{$}", private, s.handleListAudit)
}

// handleHealthz answers while the process serves; it asks PostgreSQL nothing.
func (s *server) handleHealthz(w http.ResponseWriter, r *http.Request) error {
	return writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

func (s *server) handleReadyz(w http.ResponseWriter, r *http.Request) error {
	s.ready.Lock()
	if time.Since(s.ready.at) >= time.Second {
		// Not the prober's context: one that hangs up must not leave its
		// cancellation as everyone's answer for a second.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), 2*time.Second)
		s.ready.err, s.ready.at = s.db.PingContext(ctx), time.Now()
		cancel()
	}
	err := s.ready.err
	s.ready.Unlock()
	if err != nil {
		s.log.Warn("not ready", "err", err)
		return &apiError{status: http.StatusServiceUnavailable, body: map[string]string{"status": "unavailable"}, retryAfter: 5}
	}
	return writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

// openapiJSON describes the API (OpenAPI 3.1); tests hold it to addRoutes.
//
//go:embed openapi.json
var openapiJSON []byte

func handleSchema(w http.ResponseWriter, r *http.Request) error {
	w.Header().Set("Content-Type", "application/vnd.oai.openapi+json")
	w.Write(openapiJSON)
	return nil
}

// config is the server's configuration, read from the environment
// (README lists each variable with its default and bounds).
type config struct {
	addr               string
	secretKey          secret
	debug              bool
	allowedHosts       []string
	corsOrigins        []string
	trustedProxies     []netip.Prefix
	db                 pq.Config
	appRole            string // DB_APP_ROLE: the role migrate grants serving to
	djangoURL          string // DJANGO_DATABASE_URL: import-django's source; it holds a password
	tlsCert, tlsKey    string
	passwordIterations int
	requestTimeout     time.Duration

	// Token lifetimes, and how late a rotated refresh token may be reused
	// before that ends its login (REFRESH_REUSE_GRACE_S).
	accessTTL, refreshTTL, reuseGrace time.Duration
	loginMaxAgeDays                   int

	// The rate limits, and how many sources or users each keeps.
	rateRegister, rateLogin, rateAnon, rateUser rate
	rateMaxKeys                                 int

	// The login lock: LOGIN_LOCK_AFTER, failed logins in a row for a login
	// name from one source before it waits there; LOGIN_LOCK_S, the first
	// wait; LOGIN_LOCK_ACCOUNT_AFTER, failed logins in a row for a login name
	// from all sources before unknown sources wait.
	lockAfter, lockSeconds, lockAccountAfter int
}

// publishedKeys are every SECRET_KEY value this repository has shown:
// anyone could sign tokens with them. TestPublishedKeysRefused finds new ones.
var publishedKeys = []string{"change-me-to-a-long-random-string-of-48-bytes", "test-secret-key-0123456789abcdef-0123456789",
	"bench-secret-key-0123456789abcdef-0123456789", "ab-secret-key-0123456789abcdef-0123456789", "chaos-secret-key-0123456789abcdef-0123456789",
	"scale-secret-key-0123456789abcdef-0123456789"}

// loadConfig reads the configuration README lists, with its defaults and
// bounds (README lists them). It refuses invalid values, naming the
// variable, and returns warnings to log.
func loadConfig(getenv func(string) string) (cfg config, warnings []string, err error) {
	var errs []error
	get := func(key, def string) string { return cmp.Or(strings.TrimSpace(getenv(key)), def) }
	num := func(key string, def, lo, hi int) int {
		v := get(key, strconv.Itoa(def))
		n, err := strconv.Atoi(v)
		if err != nil || n < lo || n > hi {
			errs = append(errs, fmt.Errorf("%s: want an integer from %d to %d, got %q", key, lo, hi, v))
		}
		return n
	}
	rateOf := func(key, def string) rate {
		r, err := parseRate(key, get(key, def))
		errs = append(errs, err) // errors.Join drops a nil
		return r
	}
	cfg = config{
		addr:               get("ADDR", "127.0.0.1:8000"),
		accessTTL:          time.Duration(num("ACCESS_TOKEN_LIFETIME_MIN", 15, 1, 24*60)) * time.Minute,
		refreshTTL:         time.Duration(num("REFRESH_TOKEN_LIFETIME_DAYS", 1, 1, 365)) * 24 * time.Hour,
		loginMaxAgeDays:    num("LOGIN_MAX_AGE_DAYS", 30, 1, 3650),
		allowedHosts:       list(strings.ToLower(get("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]"))),
		corsOrigins:        list(get("CORS_ALLOWED_ORIGINS", "http://localhost:3000,http://127.0.0.1:3000,http://localhost:8080,http://127.0.0.1:8080")),
		rateRegister:       rateOf("RATE_REGISTER", "5/hour"),
		rateLogin:          rateOf("RATE_LOGIN", "10/hour"),
		rateAnon:           rateOf("RATE_ANON", "100/hour"),
		rateUser:           rateOf("RATE_USER", "1000/hour"),
		rateMaxKeys:        num("RATE_MAX_KEYS", 100_000, 100, 10_000_000),
		passwordIterations: num("PASSWORD_ITERATIONS", minIterations, minIterations, maxIterations),
		reuseGrace:         time.Duration(num("REFRESH_REUSE_GRACE_S", 10, 0, 300)) * time.Second,
		requestTimeout:     4 * time.Second,
		tlsCert:            get("TLS_CERT_FILE", ""),
		tlsKey:             get("TLS_KEY_FILE", ""),
		appRole:            get("DB_APP_ROLE", ""),
		lockAfter:          num("LOGIN_LOCK_AFTER", 10, 3, 100),
		lockSeconds:        num("LOGIN_LOCK_S", 60, 1, 3600),
		lockAccountAfter:   num("LOGIN_LOCK_ACCOUNT_AFTER", 100, 10, 100_000),
		djangoURL:          get("DJANGO_DATABASE_URL", ""),
	}
	if _, err := net.ResolveTCPAddr("tcp", cfg.addr); err != nil {
		errs = append(errs, fmt.Errorf("ADDR: want host:port, got %q (%w)", cfg.addr, err))
	}
	cfg.trustedProxies, errs = parseProxies(list(get("TRUSTED_PROXIES", "")), errs)
	if cfg.debug, err = strconv.ParseBool(get("DEBUG", "False")); err != nil {
		errs = append(errs, fmt.Errorf("DEBUG: want True or False, got %q", get("DEBUG", "")))
	}
	cfg.secretKey, warnings, err = secretKey(getenv("SECRET_KEY"))
	errs = append(errs, err)
	if (cfg.tlsCert == "") != (cfg.tlsKey == "") {
		errs = append(errs, errors.New("TLS_CERT_FILE and TLS_KEY_FILE: set both or neither"))
	}
	cfg.db, err = dbConfig(get, "DATABASE_URL")
	return cfg, warnings, errors.Join(append(errs, err)...)
}

// list splits a comma- or space-separated setting.
func list(v string) []string {
	return strings.FieldsFunc(v, func(r rune) bool { return r == ',' || unicode.IsSpace(r) })
}

// parseProxies reads TRUSTED_PROXIES: CIDRs, or addresses that stand for
// themselves.
func parseProxies(items []string, errs []error) ([]netip.Prefix, []error) {
	var out []netip.Prefix
	for _, p := range items {
		prefix, err := netip.ParsePrefix(p)
		if addr, addrErr := netip.ParseAddr(p); err != nil && addrErr == nil {
			prefix, err = addr.Prefix(addr.BitLen())
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("TRUSTED_PROXIES: %q is not a CIDR or an address", p))
		}
		out = append(out, prefix.Masked())
	}
	return out, errs
}

// secretKey checks SECRET_KEY. Without one it makes a random key and warns
// so; a short, repetitive or published key is refused.
func secretKey(key string) (secret, []string, error) {
	switch {
	case key == "":
		random := make(secret, 64)
		rand.Read(random)
		return random, []string{"SECRET_KEY is not set: using a random key, so tokens will not survive a restart"}, nil
	case len(key) < 32:
		return nil, nil, fmt.Errorf("SECRET_KEY: must be at least 32 bytes, got %d", len(key))
	case len(slices.Compact(slices.Sorted(slices.Values([]rune(key))))) < 10:
		return nil, nil, errors.New("SECRET_KEY: must have at least 10 distinct characters")
	case slices.Contains(publishedKeys, key):
		return nil, nil, errors.New("SECRET_KEY: this key is published in the repository; make your own (README)")
	}
	return secret(key), nil, nil
}

// dbConfig builds the connection settings from the variable key (a URL or
// key=value pairs, as libpq reads them), or else DB_*, in TIME_ZONE. TLS is
// off by default only for a loopback host or a Unix socket, and verified
// everywhere else; an sslmode in the value wins.
func dbConfig(get func(key, def string) string, key string) (pq.Config, error) {
	url := get(key, "")
	cfg, err := pq.NewConfig(url)
	// An unencoded /, ? or # in a URL's password starts its path, query or
	// fragment: a part of the password would be read as the host or the
	// database, and printed. No message quotes the value: it holds a password.
	_, rest, isURL := strings.Cut(url, "://")
	i := strings.IndexAny(rest, "/?#")
	if err != nil || strings.HasPrefix(url, "postgres") && isURL && i >= 0 && strings.ContainsAny(rest[i:], "@#") {
		return cfg, fmt.Errorf(`%s: cannot be read; want a URL, postgres://user:password@host:port/name with reserved characters percent-encoded, or key=value pairs, host=… user=… password='…' dbname=…`, key)
	}
	tz := get("TIME_ZONE", "UTC")
	if _, err := time.LoadLocation(tz); err != nil || tz == "Local" {
		return cfg, fmt.Errorf("TIME_ZONE: want an IANA time zone name such as UTC or Asia/Kolkata, got %q", tz)
	}
	cfg.Runtime["TimeZone"] = tz // api_time writes times with this zone's offset
	if url == "" {
		port, err := strconv.ParseUint(get("DB_PORT", "5432"), 10, 16)
		if err != nil || port == 0 {
			return cfg, fmt.Errorf("DB_PORT: want a port number, got %q", get("DB_PORT", ""))
		}
		cfg.Host, cfg.Port = get("DB_HOST", "localhost"), uint16(port)
		cfg.Database, cfg.User = get("DB_NAME", "healthcare_db"), get("DB_USER", "postgres")
		cfg.Password = get("DB_PASSWORD", "")
	}
	if url == "" || cfg.SSLMode == "" { // DATABASE_URL's own sslmode wins
		mode := "verify-full"
		if ip, err := netip.ParseAddr(cfg.Host); cfg.Host == "localhost" || strings.HasPrefix(cfg.Host, "/") || err == nil && ip.IsLoopback() {
			mode = "disable"
		}
		cfg.SSLMode = pq.SSLMode(get("DB_SSLMODE", mode))
		if !slices.Contains([]string{"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}, string(cfg.SSLMode)) {
			return cfg, fmt.Errorf("DB_SSLMODE: want disable, allow, prefer, require, verify-ca or verify-full, got %q", cfg.SSLMode)
		}
	}
	// A query run unprepared (in a transaction, or past the statement
	// cache) takes one round trip instead of two; database.stmt prepares
	// the others once per connection.
	cfg.BinaryParameters = true
	cfg.ConnectTimeout = 3 * time.Second
	return cfg, nil
}

// parseRate reads the setting key, "5/hour", "100/minute", "10/second",
// "2/day" or "off", exactly: a misspelt period must not pass for another one.
func parseRate(key, s string) (rate, error) {
	if s == "off" {
		return rate{}, nil
	}
	count, period, _ := strings.Cut(s, "/")
	n, err := strconv.ParseUint(count, 10, 32) // digits only: no sign
	units := map[string]time.Duration{"second": time.Second, "minute": time.Minute, "hour": time.Hour, "day": 24 * time.Hour}
	if unit, ok := units[period]; ok && err == nil && n >= 1 && n <= 1_000_000_000 {
		return rate{n: int(n), period: unit}, nil
	}
	return rate{}, fmt.Errorf("%s: want N/second, N/minute, N/hour or N/day (N from 1 to 1,000,000,000) or off, got %q", key, s)
}

// readDotenv reads KEY=value lines from path, if it exists: # comments,
// blank lines and an optional "export " are skipped, and a value in single
// or double quotes loses them.
func readDotenv(path string) (map[string]string, error) {
	data, err := os.ReadFile(path) // its error names path
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	vars := map[string]string{}
	for i, line := range strings.Split(string(data), "\n") {
		text := strings.TrimSpace(line)
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		key, value, ok := strings.Cut(strings.TrimPrefix(text, "export "), "=")
		if !ok {
			return nil, fmt.Errorf("%s:%d: want KEY=value", path, i+1)
		}
		value = strings.TrimSpace(value)
		if len(value) >= 2 && (value[0] == '"' || value[0] == '\'') && value[len(value)-1] == value[0] {
			value = value[1 : len(value)-1]
		}
		vars[strings.TrimSpace(key)] = value
	}
	return vars, nil
}
