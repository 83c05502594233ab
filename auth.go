package main

import (
	"cmp"
	"compress/gzip"
	"context"
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"database/sql"
	_ "embed"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/lib/pq"
	"github.com/lib/pq/pqerror"
)

// minIterations is Django 4.2's default PBKDF2 work factor; PASSWORD_ITERATIONS may
// only raise it.
const minIterations = 600_000

// maxIterations bounds the work a stored hash can ask for.
const maxIterations = 10_000_000

// passwords hashes and verifies passwords in Django's pbkdf2_sha256 format.
// At most cap(slots) hashes run at once: a login flood waits, then is shed
// with 503, instead of taking every core from requests that need no hash.
type passwords struct {
	iterations int
	slots      chan struct{}
	maxWait    time.Duration
	dummy      string       // verified for unknown users, so they cost what known ones do
	failCost   atomic.Int64 // iterations every failed check costs: the most any stored hash asks for
	runs       atomic.Int64 // hashes computed, for tests
}

func newPasswords(iterations, concurrency int) *passwords {
	p := &passwords{iterations: iterations, slots: make(chan struct{}, concurrency), maxWait: 2 * time.Second}
	p.failCost.Store(int64(iterations))
	p.dummy = p.encode("dummy password", rand.Text())
	return p
}

// acquire takes a hashing slot, waiting at most maxWait.
func (p *passwords) acquire(ctx context.Context) error {
	select {
	case p.slots <- struct{}{}:
		return nil
	case <-time.After(p.maxWait):
	case <-ctx.Done():
	}
	return errUnavailable
}

// hash returns a Django-format hash of password with a fresh salt:
// rand.Text, 130 bits (NIST SP 800-132 asks 128) in Django's salt alphabet.
func (p *passwords) hash(ctx context.Context, password string) (string, error) {
	if err := p.acquire(ctx); err != nil {
		return "", err
	}
	defer func() { <-p.slots }()
	return p.encode(password, rand.Text()), nil
}

// encode hashes password with salt at our iteration count. With SHA-256 and
// a 32-byte key pbkdf2.Key cannot fail; a nil key would verify nothing.
func (p *passwords) encode(password, salt string) string {
	p.runs.Add(1)
	dk, _ := pbkdf2.Key(sha256.New, password, []byte(salt), p.iterations, sha256.Size)
	return fmt.Sprintf("pbkdf2_sha256$%d$%s$%s", p.iterations, salt, base64.StdEncoding.EncodeToString(dk))
}

// check takes a hashing slot, then has count count the attempt and return
// the stored hash and the wait the attempt's runs impose (then no password
// is checked), and verifies password against the hash. The slot comes
// first: an attempt shed for want of one (503) was never counted, so a
// flood that saturates hashing slows a user, never locks one out. A match
// is hashed again in the same slot, as next (a new password) or, when its
// hash is stale, as itself: a right password is never shed after its check.
func (p *passwords) check(ctx context.Context, password, next string, count func() (string, int, error)) (ok bool, hashed string, err error) {
	if err := p.acquire(ctx); err != nil {
		return false, "", err
	}
	defer func() { <-p.slots }()
	encoded, wait, err := count()
	switch {
	case err != nil:
		return false, "", fmt.Errorf("count the attempt: %w", err)
	case wait > 0:
		return false, "", throttled(time.Duration(wait) * time.Second)
	}
	ok, stale := p.verify(password, encoded)
	if ok && (stale || next != "") {
		hashed = p.encode(cmp.Or(next, password), rand.Text())
	}
	return ok, hashed, nil
}

// verifiable is the one rule of which stored hashes verify checks, shared
// with SQL (raiseFailCost, import-django): pbkdf2_sha256, an iteration count
// from 1 to maxIterations, a salt, a 32-byte key in standard base64.
const verifiable = `^pbkdf2_sha256\$([1-9][0-9]{0,6}|10000000)\$([^$]+)\$([A-Za-z0-9+/]{43}=)$`

var verifiableRE = regexp.MustCompile(verifiable)

// verify checks password against a stored Django hash, at the hash's own
// iteration count, and reports whether it should be re-hashed at ours. A
// failed check is padded to failCost iterations, so that neither an unknown
// name nor a migrated hash's count shows in the time a refusal takes.
func (p *passwords) verify(password, encoded string) (ok, stale bool) {
	m := verifiableRE.FindStringSubmatch(encoded)
	if m == nil {
		// An unusable hash (Django's "!…", another hasher, a damaged row, a
		// count past maxIterations) matches no password, at the cost of a
		// wrong one, and raises no one's failCost.
		p.verify(password, p.dummy)
		return false, false
	}
	iter, _ := strconv.Atoi(m[1])
	salt, want := []byte(m[2]), make([]byte, sha256.Size)
	base64.StdEncoding.Decode(want, []byte(m[3])) // the pattern's 44 characters are 32 bytes
	p.runs.Add(1)
	for cost := p.failCost.Load(); int64(iter) > cost && !p.failCost.CompareAndSwap(cost, int64(iter)); {
		cost = p.failCost.Load()
	}
	got, _ := pbkdf2.Key(sha256.New, password, salt, iter, sha256.Size) // cannot fail (encode)
	// Constant time, so the comparison leaks nothing about how close a guess was.
	if hmac.Equal(got, want) && encoded != p.dummy {
		return true, iter < p.iterations
	}
	if pad := int(p.failCost.Load()) - iter; pad > 0 {
		pbkdf2.Key(sha256.New, password, salt, pad, sha256.Size)
	}
	return false, false
}

// raiseFailCost sets failCost to the largest iteration count stored in db,
// so that the first failed login on a migrated user is padded too.
func (p *passwords) raiseFailCost(ctx context.Context, db *sql.DB) error {
	var most sql.NullInt64
	const q = `SELECT max(split_part(password, '$', 2)::int) FROM users WHERE password ~ '` + verifiable + `'`
	if err := db.QueryRowContext(ctx, q).Scan(&most); err != nil {
		return fmt.Errorf("stored password costs: %w", err)
	}
	p.failCost.Store(max(most.Int64, p.failCost.Load()))
	return nil
}

// claims are the payload of a token: SimpleJWT's claims, in its order, plus
// sid, the login the token descends from. A claim of the wrong JSON type
// fails decoding, so the token is invalid rather than read as a zero value.
type claims struct {
	TokenType string `json:"token_type"`
	Exp       int64  `json:"exp"`
	Iat       int64  `json:"iat"`
	JTI       string `json:"jti"`
	UserID    int64  `json:"user_id"`
	SID       int64  `json:"sid"`
}

// jwtHeader is the only header accepted: the token never chooses the
// algorithm, so "none" and key-confusion attacks have nothing to select.
const jwtHeader = `{"alg":"HS256","typ":"JWT"}`

var (
	b64            = base64.RawURLEncoding.Strict()
	jwtHeaderB64   = b64.EncodeToString([]byte(jwtHeader))
	errTokenFormat = errors.New("malformed token")
	errExpired     = errors.New("token expired")
)

// maxTokenLen caps a token before any work is done on it.
const maxTokenLen = 4096

// signer makes and checks HS256 tokens with one key.
type signer struct {
	key        secret
	accessTTL  time.Duration
	refreshTTL time.Duration
}

// newClaims fills the claims of a new token with a random jti.
func (s *signer) newClaims(tokenType string, userID, sid int64, now time.Time) claims {
	ttl := map[string]time.Duration{"access": s.accessTTL, "refresh": s.refreshTTL}[tokenType]
	var id [16]byte
	rand.Read(id[:])
	return claims{TokenType: tokenType, Exp: now.Add(ttl).Unix(), Iat: now.Unix(),
		JTI: fmt.Sprintf("%x", id), UserID: userID, SID: sid}
}

// sign encodes c as a token.
func (s *signer) sign(c claims) string {
	payload, _ := json.Marshal(c) // a struct of strings and integers cannot fail
	signed := jwtHeaderB64 + "." + b64.EncodeToString(payload)
	return signed + "." + b64.EncodeToString(s.mac(signed))
}

// pair signs refresh with an access token of the same login and time.
func (s *signer) pair(refresh claims) tokenPair {
	access := s.newClaims("access", refresh.UserID, refresh.SID, time.Unix(refresh.Iat, 0))
	return tokenPair{Refresh: s.sign(refresh), Access: s.sign(access)}
}

func (s *signer) mac(msg string) []byte {
	m := hmac.New(sha256.New, s.key)
	m.Write([]byte(msg))
	return m.Sum(nil)
}

// verify checks a token's signature, then its header, then its claims, and
// stops at the first failure: no byte is decoded before the HMAC has been
// verified. An expired token that passes every other check returns its
// claims with errExpired, for logout and reuse detection.
func (s *signer) verify(token, tokenType string, now time.Time) (claims, error) {
	var c claims
	if len(token) > maxTokenLen {
		return c, errTokenFormat
	}
	head, rest, ok1 := strings.Cut(token, ".")
	body, sig, ok2 := strings.Cut(rest, ".")
	got, err := b64.DecodeString(sig)
	if !ok1 || !ok2 || err != nil {
		return c, errTokenFormat
	}
	if !hmac.Equal(got, s.mac(token[:len(head)+1+len(body)])) {
		return c, errors.New("bad signature")
	}
	if head != jwtHeaderB64 {
		// Same JSON, other bytes (key order, spaces): still exactly these two fields.
		var h map[string]any
		raw, err := b64.DecodeString(head)
		if err != nil || json.Unmarshal(raw, &h) != nil || len(h) != 2 || h["alg"] != "HS256" || h["typ"] != "JWT" {
			return c, errors.New("bad header")
		}
	}
	payload, err := b64.DecodeString(body)
	if err != nil || json.Unmarshal(payload, &c) != nil {
		return claims{}, errTokenFormat
	}
	switch {
	case c.TokenType != tokenType || c.UserID <= 0 || c.SID <= 0 || len(c.JTI) != 32 || strings.Trim(c.JTI, "0123456789abcdef") != "":
		return claims{}, errors.New("wrong token type or missing claims")
	case c.Exp <= now.Unix():
		return c, errExpired
	}
	return c, nil
}

var (
	errNoCredentials = &apiError{status: http.StatusUnauthorized, body: detail("Authentication credentials were not provided.")}
	errBadAuthHeader = &apiError{status: http.StatusUnauthorized,
		body: map[string]string{"detail": "Authorization header must contain two space-delimited values", "code": "bad_authorization_header"}}
	errAccessInvalid = &apiError{status: http.StatusUnauthorized, body: map[string]any{
		"detail": "Given token not valid for any token type", "code": "token_not_valid",
		"messages": []map[string]string{{"token_class": "AccessToken", "token_type": "access", "message": "Token is invalid or expired"}}}}
	errRefreshInvalid = &apiError{status: http.StatusUnauthorized,
		body: map[string]string{"detail": "Token is invalid or expired", "code": "token_not_valid"}}
	// A rotated refresh token, or one of an ended login: SimpleJWT's words.
	errRefreshRefused = &apiError{status: http.StatusUnauthorized,
		body: map[string]string{"detail": "Token is blacklisted", "code": "token_not_valid"}}
	errBadCredentials = &apiError{status: http.StatusUnauthorized, body: detail("No active account found with the given credentials")}
)

// authenticate finds who is asking from the access token. Whether its login
// is still live is for the request's statement to say (login_live).
func (s *server) authenticate(r *http.Request, info *requestInfo) error {
	parts := strings.Fields(r.Header.Get("Authorization"))
	if len(parts) == 0 || parts[0] != "Bearer" {
		return errNoCredentials
	}
	if len(parts) != 2 {
		return errBadAuthHeader
	}
	c, err := s.signer.verify(parts[1], "access", time.Now())
	if err != nil {
		return errAccessInvalid
	}
	info.userID, info.loginID = c.UserID, c.SID
	return nil
}

// user is a registered user as the API shows it.
type user struct {
	ID       int64  `json:"id"`
	Username string `json:"username"`
	Email    string `json:"email"`
	Name     string `json:"name"`
}

// tokenPair is the body of login and refresh.
type tokenPair struct {
	Refresh string `json:"refresh"`
	Access  string `json:"access"`
}

// startLogin runs first, a statement whose one row is the id of the user
// who logs in (no row: the answer is none), then, in the same transaction,
// opens a login for that user, records its first refresh token and issues
// its first pair, in one statement that writes the login event. A password
// change (changed) ends every other login of the user instead: its
// password.change is the event. It ends the runs of both the user's login
// names, from the request's source and from every source, and marks the
// source as one the user logs in from (in the order of the names, so that
// two logins take their locks alike).
func (s *server) startLogin(r *http.Request, changed bool, none error, first string, values ...any) (userID int64, pair tokenPair, err error) {
	// Past the request's deadline too: a right password checked late in a
	// flood must still end its runs, or the flood would lock its user out.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), s.cfg.requestTimeout)
	defer cancel()
	info := infoFrom(r)
	err = withTx(ctx, s.db.DB, func(tx *sql.Tx) error {
		err := tx.QueryRowContext(ctx, first, values...).Scan(&userID)
		if errors.Is(err, sql.ErrNoRows) {
			return none
		}
		if err != nil {
			return fmt.Errorf("find who logs in: %w", err)
		}
		// $1 user, $2 LOGIN_MAX_AGE_DAYS, $3 source, $4 jti, $5 its expiry,
		// $6 changed, $7 client IP, $8 request id. A statement after first,
		// so that its snapshot holds every login committed before first's
		// row lock was taken.
		const q = `WITH others AS (UPDATE logins SET ended_at = now() WHERE user_id = $1 AND ended_at IS NULL AND $6),
			l AS (INSERT INTO logins (user_id, expires_at)
				SELECT $1, now() + make_interval(days => $2)
				FROM (SELECT count(login_succeeded(name, $3)) FROM (SELECT name FROM login_names WHERE user_id = $1 ORDER BY name) n) ended RETURNING id),
			token AS (INSERT INTO refresh_tokens (jti, login_id, expires_at) SELECT $4, id, $5 FROM l),
			seen AS (INSERT INTO audit_events (user_id, login_id, action, ip, request_id) SELECT $1, id, 'login', $7, $8 FROM l WHERE NOT $6)
			SELECT id FROM l`
		refresh := s.signer.newClaims("refresh", userID, 0, time.Now())
		err = tx.QueryRowContext(ctx, q, userID, s.cfg.loginMaxAgeDays, sourceOf(info.clientIP).String(), refresh.JTI,
			time.Unix(refresh.Exp, 0), changed, info.clientIP.String(), info.id).Scan(&refresh.SID)
		if err != nil {
			return fmt.Errorf("start login: %w", err)
		}
		pair = s.signer.pair(refresh)
		return nil
	})
	return userID, pair, err
}

// handleRegister creates a user and its first login.
func (s *server) handleRegister(w http.ResponseWriter, r *http.Request) error {
	if wait, ok := s.registerLimit.allow(bySource(infoFrom(r).clientIP)); !ok {
		return throttled(wait)
	}
	f, err := decodeBody(r)
	if err != nil {
		return err
	}
	ctx, errs := r.Context(), fieldErrors{}
	u := user{Username: f.username("username", errs), Name: deref(f.text("name", true, 1, 150, errs))}
	u.Email = deref(f.email("email", true, errs))
	if err := s.takenNames(ctx, &u, errs); err != nil {
		return err
	}
	password := s.newPassword(f, "password", u, errs)
	if len(errs) > 0 {
		return errs
	}
	hashed, err := s.passwords.hash(ctx, password)
	if err != nil {
		return err
	}
	// The primary key of login_names decides a race between two registrations.
	const q = `WITH u AS (INSERT INTO users (username, email, name, password) VALUES ($1, $2, $3, $4) RETURNING id),
		names AS (INSERT INTO login_names (name, user_id) SELECT DISTINCT n, (SELECT id FROM u) FROM unnest(ARRAY[lower($1), $2]) n)
		SELECT id FROM u`
	var pair tokenPair
	u.ID, pair, err = s.startLogin(r, false, nil, q, u.Username, u.Email, u.Name, hashed)
	if pq.As(err, pqerror.UniqueViolation) != nil { // lost a race for a name
		if err := s.takenNames(ctx, &u, errs); err != nil || len(errs) == 0 {
			return cmp.Or(err, error(errUnavailable)) // the winner rolled back: try again
		}
		return errs
	}
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusCreated, struct {
		User   user      `json:"user"`
		Tokens tokenPair `json:"tokens"`
	}{u, pair})
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// takenNames puts the username in Unicode NFKC, as Django stores it, and
// adds an error for the username and the email if either already names a
// user: login_names holds every user's names, normalized and lower-cased,
// so that a login name always means one user.
func (s *server) takenNames(ctx context.Context, u *user, errs fieldErrors) error {
	// $1 username, $2 email.
	const q = `SELECT normalize($1, NFKC), EXISTS (SELECT 1 FROM login_names WHERE name = lower(normalize($1, NFKC))),
		EXISTS (SELECT 1 FROM login_names WHERE name = $2)`
	var username, email bool
	if err := s.db.QueryRowContext(ctx, q, u.Username, u.Email).Scan(&u.Username, &username, &email); err != nil {
		return fmt.Errorf("check login names: %w", err)
	}
	// A compatibility character may stand for several, or for a symbol.
	if u.Username != "" && (utf8.RuneCountInString(u.Username) > 150 || !usernameRE.MatchString(u.Username)) {
		errs.add("username", invalidUsername)
	}
	if username {
		errs.add("username", "A user with that username already exists.")
	}
	if email {
		errs.add("email", "A user with that email already exists.")
	}
	return nil
}

// handleLogin exchanges a username or email and a password for a new login.
func (s *server) handleLogin(w http.ResponseWriter, r *http.Request) error {
	f, err := decodeBody(r)
	if err != nil {
		return err
	}
	errs := fieldErrors{}
	name, password := f.required("username", errs), f.required("password", errs)
	if len(errs) > 0 {
		return errs
	}
	ctx, info := r.Context(), infoFrom(r)
	var id, version int64
	// PostgreSQL normalizes (NFKC) and lower-cases, as it did for
	// login_names at registration; the run is the name's, whoever it names.
	// $1 login name, $2 source, $3 LOGIN_LOCK_AFTER, $4 LOGIN_LOCK_S,
	// $5 LOGIN_LOCK_ACCOUNT_AFTER, $6 LOGIN_MAX_AGE_DAYS.
	const q = `SELECT coalesce(u.id, 0), coalesce(u.password, ''), coalesce(u.password_version, 0),
			login_attempt(left(k.name, 254), $2, $3, $4, $5, $6)
		FROM (SELECT lower(normalize($1, NFKC)) AS name) k
		LEFT JOIN login_names n ON n.name = k.name LEFT JOIN users u ON u.id = n.user_id`
	// Unknown users are checked against the dummy hash ("" verifies as it
	// does) and leave an event with no user: the same work and the same
	// answer, so neither timing nor a commit's flush reveals which exist.
	match, upgraded, err := s.passwords.check(ctx, password, "", func() (stored string, wait int, err error) {
		err = s.db.QueryRowContext(ctx, q, strings.TrimSpace(name), sourceOf(info.clientIP).String(), s.cfg.lockAfter, s.cfg.lockSeconds,
			s.cfg.lockAccountAfter, s.cfg.loginMaxAgeDays).Scan(&id, &stored, &version, &wait)
		return stored, wait, err
	})
	if err != nil {
		return err
	}
	if !match {
		// $1 user (0: none, written as null), $2 client IP, $3 request id.
		const failed = `INSERT INTO audit_events (user_id, action, ip, request_id) VALUES (nullif($1, 0), 'login.failed', $2, $3)`
		if _, err := s.db.ExecContext(ctx, failed, id, info.clientIP.String(), info.id); err != nil {
			return fmt.Errorf("record login.failed: %w", err)
		}
		return errBadCredentials
	}
	// The password checked must still be the user's, locked until commit: a
	// password change cannot slip in between and miss this login. Setting
	// last_login marks an upgraded hash as no change (schema.sql's trigger).
	// $1 user, $2 the version checked, $3 an upgraded hash or "".
	const still = `UPDATE users SET password = coalesce(nullif($3, ''), password), last_login = now()
		WHERE id = $1 AND password_version = $2 RETURNING id`
	_, pair, err := s.startLogin(r, false, errBadCredentials, still, id, version, upgraded)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, pair)
}

// unlock is "healthcare unlock <name>": it ends every wait of both names of
// the user the name (username or email, in any form) belongs to, and writes
// login.unlock in its trail, with no IP and a fresh request id.
func unlock(ctx context.Context, db *sql.DB, name string, stdout io.Writer) error {
	// $1 login name, $2 request id.
	const q = `WITH u AS (SELECT user_id AS id FROM login_names WHERE name = lower(normalize($1, NFKC))),
		ended AS (UPDATE login_attempts SET failures = 0 WHERE name IN (SELECT name FROM login_names WHERE user_id = (SELECT id FROM u))),
		seen AS (INSERT INTO audit_events (user_id, action, ip, request_id) SELECT id, 'login.unlock', '', $2 FROM u)
		SELECT id FROM u`
	requestID := rand.Text()
	var id int64
	err := db.QueryRowContext(ctx, q, strings.TrimSpace(name), requestID).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("unlock: no user has the name %q", name)
	}
	if err != nil {
		return fmt.Errorf("unlock: %w", err)
	}
	fmt.Fprintf(stdout, "user %d (%q) unlocked: login.unlock written, request id %s\n", id, name, requestID)
	return nil
}

// refreshClaims reads and verifies the body's refresh token. An expired
// token comes back with its claims and errExpired.
func (s *server) refreshClaims(r *http.Request) (claims, error) {
	f, err := decodeBody(r)
	if err != nil {
		return claims{}, err
	}
	errs := fieldErrors{}
	token := f.required("refresh", errs)
	if len(errs) > 0 {
		return claims{}, errs
	}
	c, err := s.signer.verify(token, "refresh", time.Now())
	if err != nil && err != errExpired {
		return claims{}, errRefreshInvalid
	}
	return c, err
}

// handleRefresh rotates the presented refresh token and records the new
// pair's in one statement: the conditional UPDATE is the lock, so of two
// refreshes with one token, one rotates it and the other is refused.
func (s *server) handleRefresh(w http.ResponseWriter, r *http.Request) error {
	c, err := s.refreshClaims(r)
	if err == errExpired {
		return s.refusedRefresh(r, c)
	}
	if err != nil {
		return err
	}
	next := s.signer.newClaims("refresh", c.UserID, c.SID, time.Now())
	// $1 jti, $2 login, $3 user, $4 the new jti, $5 its expiry.
	const q = `WITH rotated AS (UPDATE refresh_tokens t SET rotated_at = now()
			FROM logins l
			WHERE t.jti = $1 AND t.login_id = $2 AND t.rotated_at IS NULL AND t.expires_at > now()
			  AND l.id = t.login_id AND l.user_id = $3 AND l.ended_at IS NULL AND l.expires_at > now() RETURNING t.login_id)
		INSERT INTO refresh_tokens (jti, login_id, expires_at) SELECT $4, login_id, $5 FROM rotated`
	res, err := s.db.ExecContext(r.Context(), q, c.JTI, c.SID, c.UserID, next.JTI, time.Unix(next.Exp, 0))
	if err != nil {
		return fmt.Errorf("rotate refresh token: %w", err)
	}
	if n, _ := res.RowsAffected(); n != 1 {
		return s.refusedRefresh(r, c)
	}
	return writeJSON(w, http.StatusOK, s.signer.pair(next))
}

// refusedRefresh explains why a signed refresh token (expired or not) could
// not be rotated. A rotated one reused past the grace window was probably
// stolen, and the login ends (RFC 9700 §4.14.2); inside it, two tabs raced.
func (s *server) refusedRefresh(r *http.Request, c claims) error {
	// Reuse ends the login in the same statement that detects it. $1 jti,
	// $2 login, $3 grace in seconds, $4 user, $5 IP, $6 request id.
	const q = `WITH t AS (
			SELECT t.rotated_at IS NOT NULL OR l.ended_at IS NOT NULL AS refused,
			       l.ended_at IS NULL AND t.rotated_at < now() - make_interval(secs => $3) AS reused
			FROM refresh_tokens t JOIN logins l ON l.id = t.login_id
			WHERE t.jti = $1 AND t.login_id = $2 AND l.user_id = $4),
		ended AS (UPDATE logins SET ended_at = now() WHERE id = $2 AND ended_at IS NULL AND (SELECT reused FROM t) RETURNING id),
		seen AS (INSERT INTO audit_events (user_id, login_id, action, ip, request_id)
			SELECT $4, id, 'refresh.reused', $5, $6 FROM ended)
		SELECT refused, EXISTS (SELECT 1 FROM ended) FROM t`
	var refused, reused bool
	info := infoFrom(r)
	err := s.db.QueryRowContext(r.Context(), q, c.JTI, c.SID, s.cfg.reuseGrace.Seconds(), c.UserID,
		info.clientIP.String(), info.id).Scan(&refused, &reused)
	if errors.Is(err, sql.ErrNoRows) || err == nil && !refused {
		return errRefreshInvalid
	}
	if err != nil {
		return fmt.Errorf("look up refresh token: %w", err)
	}
	if reused {
		s.log.Warn("refresh token reused; login ended", "user_id", c.UserID, "login_id", c.SID)
	}
	return errRefreshRefused
}

// handleLogout ends the login a refresh token (current, rotated or expired)
// belongs to: its refresh tokens can no longer be rotated and login_live
// refuses its access tokens from now on.
func (s *server) handleLogout(w http.ResponseWriter, r *http.Request) error {
	c, err := s.refreshClaims(r)
	if err != nil && err != errExpired {
		return err
	}
	// Only a login that was live ends, and only then is an event written.
	// $1 login, $2 user, $3 jti, $4 IP, $5 request id.
	const q = `WITH login AS (
			SELECT id, ended_at IS NULL AS live FROM logins
			WHERE id = $1 AND user_id = $2 AND EXISTS (SELECT 1 FROM refresh_tokens WHERE jti = $3 AND login_id = $1)
			FOR UPDATE),
		ended AS (UPDATE logins SET ended_at = now() WHERE id = (SELECT id FROM login WHERE live) RETURNING id),
		seen AS (INSERT INTO audit_events (user_id, login_id, action, ip, request_id)
			SELECT $2, id, 'logout', $4, $5 FROM ended)
		SELECT EXISTS (SELECT 1 FROM login) OR NOT EXISTS (SELECT 1 FROM logins WHERE id = $1)`
	// A login pruned away (its token is ours, its row gone) had ended: 204 again.
	var ok bool
	info := infoFrom(r)
	err = s.db.QueryRowContext(r.Context(), q, c.SID, c.UserID, c.JTI, info.clientIP.String(), info.id).Scan(&ok)
	if err != nil {
		return fmt.Errorf("end login: %w", err)
	}
	if !ok {
		return errRefreshInvalid
	}
	return noContent(w)
}

// handleLogoutAll ends every login of the user, the asking one included.
func (s *server) handleLogoutAll(w http.ResponseWriter, r *http.Request) error {
	// done is one row, also for the loser of a race, who finds every login
	// ended already: 204 all the same.
	err := s.db.find(r, statement{
		steps: `ended AS (UPDATE logins SET ended_at = now() WHERE user_id = @user AND ended_at IS NULL RETURNING user_id),
			done AS (SELECT count(*) FROM ended)`,
		events: []audit{{action: "logout.all", from: "(SELECT DISTINCT user_id FROM ended) e"}},
	})
	if err != nil {
		return fmt.Errorf("end logins: %w", err)
	}
	return noContent(w)
}

// handleMe returns the asking user.
func (s *server) handleMe(w http.ResponseWriter, r *http.Request) error {
	return writeRow(w, r, s.db, http.StatusOK, func(row rowScanner) (u user, err error) {
		err = row.Scan(&u.ID, &u.Username, &u.Email, &u.Name)
		return
	}, statement{steps: `done AS (SELECT id, username, email, name FROM users WHERE id = @user)`})
}

var errWrongOldPassword = &apiError{status: http.StatusBadRequest,
	body: fieldErrors{"old_password": {"Your old password was entered incorrectly. Please enter it again."}}}

// handleChangePassword sets a new password and ends every login of the
// user, the asking one included; the answer is the pair of a new login.
// Each statement checks the login (statement.sent), a wrong old password's
// event included.
func (s *server) handleChangePassword(w http.ResponseWriter, r *http.Request) error {
	f, err := decodeBody(r)
	if err != nil {
		return err
	}
	errs := fieldErrors{}
	old := f.required("old_password", errs)
	var u user
	err = s.db.queryRow(r, statement{steps: `done AS (SELECT username, email, name FROM users WHERE id = @user)`}).Scan(&u.Username, &u.Email, &u.Name)
	if err != nil {
		return fmt.Errorf("find user: %w", err)
	}
	password := s.newPassword(f, "new_password", u, errs)
	if len(errs) > 0 {
		return errs
	}
	// A wrong old password is a failed login of the username from the
	// request's source, and only this source's run can make the change wait:
	// a live login is not locked out by strangers. The hash is read, as
	// login reads it, once a hashing slot is taken.
	var version int64
	match, hashed, err := s.passwords.check(r.Context(), old, password, func() (stored string, wait int, err error) {
		err = s.db.queryRow(r, statement{
			steps: `done AS (SELECT password, password_version, login_attempt(lower(username), @source, @lock_after, @lock_s, NULL, 0)
				FROM users WHERE id = @user)`,
			args: args{"source": sourceOf(infoFrom(r).clientIP).String(), "lock_after": s.cfg.lockAfter, "lock_s": s.cfg.lockSeconds},
		}).Scan(&stored, &version, &wait)
		return stored, wait, err
	})
	if err != nil {
		return err
	}
	if !match {
		// A login.failed event has no login, whichever path writes it.
		const failed = `done AS (INSERT INTO audit_events (user_id, action, ip, request_id) VALUES (@user, 'login.failed', @ip, @request_id) RETURNING id)`
		if err := s.db.find(r, statement{steps: failed}); err != nil {
			return fmt.Errorf("record login.failed: %w", err)
		}
		return errWrongOldPassword
	}
	// Only the password the old one was checked against (at version) is
	// replaced: of two changes at once, the second finds it gone.
	// (schema.sql's trigger counts the change in password_version.)
	text, values := statement{
		steps:  `done AS (UPDATE users SET password = @hash WHERE id = @user AND password_version = @version RETURNING id)`,
		args:   args{"hash": hashed, "version": version},
		events: []audit{{action: "password.change"}},
	}.sent(r)
	_, pair, err := s.startLogin(r, true, errWrongOldPassword, text, values...)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, pair)
}

// Django's list of 19,726 common passwords (django/contrib/auth, BSD-3-Clause).
//
//go:embed common-passwords.txt.gz
var commonPasswordsGz string

// loadCommonPasswords unpacks the embedded list. It is part of the binary:
// a damaged one is a broken build, which panics at start (a nil reader
// included) rather than serve with a weaker check.
func loadCommonPasswords() map[string]struct{} {
	zr, _ := gzip.NewReader(strings.NewReader(commonPasswordsGz))
	list, err := io.ReadAll(zr)
	if err != nil {
		panic("common-passwords.txt.gz: " + err.Error())
	}
	set := make(map[string]struct{}, 20_000)
	for _, p := range strings.Split(string(list), "\n") {
		set[strings.TrimSpace(p)] = struct{}{}
	}
	return set
}

// tooSimilar is Django's UserAttributeSimilarityValidator for one attribute:
// the whole value and its parts split on non-word characters, each compared
// with difflib's quick_ratio against 0.7, skipping parts too short to matter.
func tooSimilar(password, value string) bool {
	pw := []rune(password)
	for _, part := range append(strings.FieldsFunc(value, func(r rune) bool {
		return !(unicode.IsLetter(r) || unicode.IsDigit(r) || r == '_')
	}), value) {
		pr := []rune(part)
		if len(pw) >= 10*len(pr) && float64(len(pr)) < 0.35*float64(len(pw)) {
			continue
		}
		common, avail := 0, map[rune]int{}
		for _, r := range pr {
			avail[r]++
		}
		for _, r := range pw {
			if avail[r] > 0 {
				avail[r]--
				common++
			}
		}
		if 2*float64(common)/float64(len(pw)+len(pr)) >= 0.7 {
			return true
		}
	}
	return false
}

// newPassword reads the new password key and its optional confirmation,
// key_confirm, and checks the password with Django's four default
// validators, in Django's order, against the user's names.
func (s *server) newPassword(f members, key string, u user, errs fieldErrors) string {
	password, ok := f.str(key, true, errs)
	lower := strings.ToLower(password)
	switch {
	case !ok:
	case strings.TrimSpace(password) == "":
		// Blank as login judges it (DRF's), or the user could never log in.
		errs.add(key, "This field may not be blank.")
	case utf8.RuneCountInString(password) > 1024:
		errs.add(key, "Ensure this field has no more than 1024 characters.")
	default:
		for _, name := range [][2]string{{"username", u.Username}, {"email address", u.Email}, {"name", u.Name}} {
			if tooSimilar(lower, strings.ToLower(name[1])) {
				errs.add(key, "The password is too similar to the "+name[0]+".")
				break
			}
		}
		if utf8.RuneCountInString(password) < 8 {
			errs.add(key, "This password is too short. It must contain at least 8 characters.")
		}
		if _, ok := s.commonPasswords[strings.TrimSpace(lower)]; ok {
			errs.add(key, "This password is too common.")
		}
		if strings.IndexFunc(password, func(r rune) bool { return r < '0' || r > '9' }) < 0 {
			errs.add(key, "This password is entirely numeric.")
		}
	}
	// The confirmation is compared once the body has no other problem.
	if confirm, given := f.str(key+"_confirm", false, errs); given && len(errs) == 0 && confirm != password {
		errs.add(key+"_confirm", "Passwords don't match.")
	}
	return password
}
