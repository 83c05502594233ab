package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"database/sql"
	_ "embed"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/lib/pq"
	"github.com/lib/pq/pqerror"
)

// Django's list of 19,726 common passwords (django/contrib/auth, BSD-3-Clause).
//
//go:embed common-passwords.txt.gz
var commonPasswordsGz []byte

// minIterations is Django 5's PBKDF2 work factor; PASSWORD_ITERATIONS may
// only raise it.
const minIterations = 600_000

// maxIterations bounds the work a stored hash can ask for.
const maxIterations = 10_000_000

// passwords hashes and verifies passwords in Django's pbkdf2_sha256 format.
// At most cap(slots) hashes run at once: a login flood then waits for a slot
// (and is shed with 503 after a short wait) instead of taking every core
// from the requests that need no hash.
type passwords struct {
	iterations int
	slots      chan struct{}
	maxWait    time.Duration
	dummy      string // verified for unknown users, so they cost what known ones do
	runs       atomic.Int64
}

func newPasswords(iterations, concurrency int) (*passwords, error) {
	p := &passwords{iterations: iterations, slots: make(chan struct{}, concurrency), maxWait: 2 * time.Second}
	dummy, err := p.encode("dummy password", randomSalt())
	if err != nil {
		return nil, err
	}
	p.dummy = dummy
	return p, nil
}

var errHashBusy = &apiError{status: http.StatusServiceUnavailable, body: detail("Service temporarily unavailable."), retryAfter: 1}

// acquire takes a hashing slot, waiting at most maxWait.
func (p *passwords) acquire(ctx context.Context) error {
	t := time.NewTimer(p.maxWait)
	defer t.Stop()
	select {
	case p.slots <- struct{}{}:
		return nil
	case <-t.C:
		return errHashBusy
	case <-ctx.Done():
		return errHashBusy
	}
}

// hash returns a fresh Django-format hash of password.
func (p *passwords) hash(ctx context.Context, password string) (string, error) {
	if err := p.acquire(ctx); err != nil {
		return "", err
	}
	defer func() { <-p.slots }()
	return p.encode(password, randomSalt())
}

func (p *passwords) encode(password, salt string) (string, error) {
	p.runs.Add(1)
	dk, err := pbkdf2.Key(sha256.New, password, []byte(salt), p.iterations, sha256.Size)
	if err != nil {
		return "", fmt.Errorf("pbkdf2: %w", err)
	}
	return fmt.Sprintf("pbkdf2_sha256$%d$%s$%s", p.iterations, salt, base64.StdEncoding.EncodeToString(dk)), nil
}

// verify checks password against a stored Django hash, at the hash's own
// iteration count, and reports whether it should be re-hashed at ours.
func (p *passwords) verify(ctx context.Context, password, encoded string) (ok, stale bool, err error) {
	algo, rest, _ := strings.Cut(encoded, "$")
	iterText, rest, _ := strings.Cut(rest, "$")
	salt, dkText, _ := strings.Cut(rest, "$")
	iter, iterErr := strconv.Atoi(iterText)
	want, dkErr := base64.StdEncoding.DecodeString(dkText)
	if algo != "pbkdf2_sha256" || iterErr != nil || iter < 1 || iter > maxIterations || dkErr != nil || len(want) != sha256.Size || salt == "" {
		// An unusable hash (Django's "!…" for an account without a password,
		// another hasher, a damaged row) matches no password. It costs the
		// dummy's work, so such an account looks like any wrong password.
		if encoded == p.dummy {
			return false, false, fmt.Errorf("unusable password hash")
		}
		_, _, err := p.verify(ctx, password, p.dummy)
		return false, false, err
	}
	if err := p.acquire(ctx); err != nil {
		return false, false, err
	}
	defer func() { <-p.slots }()
	p.runs.Add(1)
	got, err := pbkdf2.Key(sha256.New, password, []byte(salt), iter, sha256.Size)
	if err != nil {
		return false, false, fmt.Errorf("pbkdf2: %w", err)
	}
	// Constant time, so the comparison leaks nothing about how close a guess was.
	return subtle.ConstantTimeCompare(got, want) == 1, iter < p.iterations, nil
}

// randomSalt makes a 22-character salt from Django's alphabet (~131 bits).
func randomSalt() string {
	const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
	b := make([]byte, 22)
	for i := range b {
		b[i] = alphabet[randIntn(len(alphabet))]
	}
	return string(b)
}

// randIntn is a uniform random int in [0, n) from crypto/rand.
func randIntn(n int) int {
	var b [1]byte
	for {
		rand.Read(b[:])
		if int(b[0]) < 256-256%n { // reject the biased tail
			return int(b[0]) % n
		}
	}
}

// loadCommonPasswords unpacks the embedded list.
func loadCommonPasswords() (map[string]struct{}, error) {
	zr, err := gzip.NewReader(bytes.NewReader(commonPasswordsGz))
	if err != nil {
		return nil, fmt.Errorf("common passwords: %w", err)
	}
	set := make(map[string]struct{}, 20_000)
	sc := bufio.NewScanner(zr)
	for sc.Scan() {
		set[strings.TrimSpace(sc.Text())] = struct{}{}
	}
	return set, sc.Err()
}

// passwordProblems applies Django's four default validators, in Django's
// order, returning one message per failing validator.
func (s *server) passwordProblems(password string, attrs [3]string) []string {
	var msgs []string
	lower := strings.ToLower(password)
	for i, label := range [3]string{"username", "email address", "name"} {
		if tooSimilar(lower, strings.ToLower(attrs[i])) {
			msgs = append(msgs, "The password is too similar to the "+label+".")
			break
		}
	}
	if utf8.RuneCountInString(password) < 8 {
		msgs = append(msgs, "This password is too short. It must contain at least 8 characters.")
	}
	if _, ok := s.commonPasswords[strings.TrimSpace(lower)]; ok {
		msgs = append(msgs, "This password is too common.")
	}
	if strings.IndexFunc(password, func(r rune) bool { return r < '0' || r > '9' }) < 0 {
		msgs = append(msgs, "This password is entirely numeric.")
	}
	return msgs
}

// tooSimilar is Django's UserAttributeSimilarityValidator for one attribute:
// the whole value and its parts split on non-word characters, each compared
// with difflib's quick_ratio against 0.7, skipping parts too short to matter.
func tooSimilar(password, value string) bool {
	if value == "" {
		return false
	}
	parts := append(strings.FieldsFunc(value, func(r rune) bool {
		return !(unicode.IsLetter(r) || unicode.IsDigit(r) || r == '_')
	}), value)
	pw := []rune(password)
	for _, part := range parts {
		pr := []rune(part)
		if len(pw) >= 10*len(pr) && float64(len(pr)) < 0.35*float64(len(pw)) {
			continue
		}
		avail := map[rune]int{}
		for _, r := range pr {
			avail[r]++
		}
		common := 0
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

// claims are the payload of a token, SimpleJWT's claims plus sid, the login
// (session) the token descends from. A claim of the wrong JSON type fails
// decoding, so the token is invalid rather than read as a zero value.
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
)

// maxTokenLen caps a token before any work is done on it.
const maxTokenLen = 4096

// signer makes and checks HS256 tokens with one key.
type signer struct {
	key        secret
	accessTTL  time.Duration
	refreshTTL time.Duration
	macs       sync.Pool // of hash.Hash, keyed HMACs reused across requests
}

func newSigner(key []byte, accessTTL, refreshTTL time.Duration) *signer {
	s := &signer{key: key, accessTTL: accessTTL, refreshTTL: refreshTTL}
	s.macs.New = func() any { return hmac.New(sha256.New, key) }
	return s
}

// newClaims fills the claims of a new token with a random jti.
func (s *signer) newClaims(tokenType string, userID, sid int64, now time.Time) claims {
	ttl := s.accessTTL
	if tokenType == "refresh" {
		ttl = s.refreshTTL
	}
	var id [16]byte
	rand.Read(id[:])
	return claims{TokenType: tokenType, Exp: now.Add(ttl).Unix(), Iat: now.Unix(),
		JTI: hex.EncodeToString(id[:]), UserID: userID, SID: sid}
}

// sign encodes c as a token. The payload is written by hand, in SimpleJWT's
// key order, to keep signing allocation-light.
func (s *signer) sign(c claims) string {
	payload := make([]byte, 0, 160)
	payload = append(payload, `{"token_type":"`...)
	payload = append(payload, c.TokenType...)
	payload = append(payload, `","exp":`...)
	payload = strconv.AppendInt(payload, c.Exp, 10)
	payload = append(payload, `,"iat":`...)
	payload = strconv.AppendInt(payload, c.Iat, 10)
	payload = append(payload, `,"jti":"`...)
	payload = append(payload, c.JTI...)
	payload = append(payload, `","user_id":`...)
	payload = strconv.AppendInt(payload, c.UserID, 10)
	payload = append(payload, `,"sid":`...)
	payload = strconv.AppendInt(payload, c.SID, 10)
	payload = append(payload, '}')

	tok := make([]byte, 0, len(jwtHeaderB64)+1+b64.EncodedLen(len(payload))+1+43)
	tok = append(tok, jwtHeaderB64...)
	tok = append(tok, '.')
	tok = b64.AppendEncode(tok, payload)
	var sum [sha256.Size]byte
	tok = append(tok, '.')
	tok = b64.AppendEncode(tok, s.mac(sum[:0], tok[:len(tok)-1]))
	return string(tok)
}

func (s *signer) mac(dst, msg []byte) []byte {
	m := s.macs.Get().(hash.Hash)
	m.Reset()
	m.Write(msg)
	dst = m.Sum(dst)
	s.macs.Put(m)
	return dst
}

// verify checks a token's signature, then its header, then its claims, and
// stops at the first failure. Nothing is decoded before the HMAC has been
// verified, so an attacker's bytes never reach the JSON decoder.
func (s *signer) verify(token, tokenType string, now time.Time) (claims, error) {
	var c claims
	if len(token) > maxTokenLen {
		return c, errTokenFormat
	}
	head, rest, ok1 := strings.Cut(token, ".")
	body, sig, ok2 := strings.Cut(rest, ".")
	if !ok1 || !ok2 || strings.Contains(sig, ".") || len(sig) != b64.EncodedLen(sha256.Size) {
		return c, errTokenFormat
	}
	var got [sha256.Size]byte
	if _, err := b64.Decode(got[:], []byte(sig)); err != nil {
		return c, errTokenFormat
	}
	var want [sha256.Size]byte
	signed := token[:len(head)+1+len(body)]
	if !hmac.Equal(got[:], s.mac(want[:0], []byte(signed))) {
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
	var buf [maxTokenLen]byte // on the stack: decoding costs no allocation
	n, err := b64.Decode(buf[:], []byte(body))
	if err != nil {
		return c, errTokenFormat
	}
	if !parseOwnClaims(buf[:n], &c) {
		// Not this server's layout (a SimpleJWT service sharing the key, say):
		// decode it strictly. The copy keeps buf from escaping to the heap.
		c = claims{}
		if err := json.Unmarshal(bytes.Clone(buf[:n]), &c); err != nil {
			return c, fmt.Errorf("claims: %w", err)
		}
	}
	switch {
	case c.TokenType != tokenType:
		return c, errors.New("wrong token type")
	case c.Exp <= now.Unix():
		return c, errors.New("expired")
	case c.UserID <= 0 || c.SID <= 0 || !isJTI(c.JTI):
		return c, errors.New("missing claims")
	}
	return c, nil
}

// parseOwnClaims reads a payload in exactly the layout sign writes, without
// reflection, and reports false for anything else (which the caller then
// decodes with encoding/json). Only HMAC-verified bytes reach it.
func parseOwnClaims(p []byte, c *claims) bool {
	fields := [...]struct {
		key string
		str *string
		num *int64
	}{
		{`{"token_type":"`, &c.TokenType, nil}, {`","exp":`, nil, &c.Exp}, {`,"iat":`, nil, &c.Iat},
		{`,"jti":"`, &c.JTI, nil}, {`","user_id":`, nil, &c.UserID}, {`,"sid":`, nil, &c.SID},
	}
	for _, f := range fields {
		rest, ok := bytes.CutPrefix(p, []byte(f.key))
		if !ok {
			return false
		}
		if f.str != nil {
			// Our strings are lower-case letters and hex digits; anything
			// else (escapes, control bytes, other UTF-8) is encoding/json's.
			end := 0
			for end < len(rest) && (rest[end] >= 'a' && rest[end] <= 'z' || rest[end] >= '0' && rest[end] <= '9') {
				end++
			}
			if end == len(rest) || rest[end] != '"' {
				return false
			}
			switch v := rest[:end]; string(v) { // the common values cost no allocation
			case "access":
				*f.str = "access"
			case "refresh":
				*f.str = "refresh"
			default:
				*f.str = string(v)
			}
			p = rest[end:]
			continue
		}
		end := bytes.IndexAny(rest, ",}")
		n, ok := parseDigits(rest[:max(end, 0)])
		if !ok {
			return false
		}
		*f.num = n
		p = rest[end:]
	}
	return string(p) == "}"
}

// parseDigits reads a non-negative JSON integer of at most 18 digits, so
// that it cannot overflow; anything else reports false.
func parseDigits(b []byte) (int64, bool) {
	if len(b) == 0 || len(b) > 18 || b[0] == '0' && len(b) > 1 {
		return 0, false
	}
	var n int64
	for _, d := range b {
		if d < '0' || d > '9' {
			return 0, false
		}
		n = n*10 + int64(d-'0')
	}
	return n, true
}

func isJTI(s string) bool {
	if len(s) != 32 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !(s[i] >= '0' && s[i] <= '9' || s[i] >= 'a' && s[i] <= 'f') {
			return false
		}
	}
	return true
}

var (
	errNoCredentials = &apiError{status: http.StatusUnauthorized,
		body: detail("Authentication credentials were not provided.")}
	errBadAuthHeader = &apiError{status: http.StatusUnauthorized,
		body: detailBody{Detail: "Authorization header must contain two space-delimited values", Code: "bad_authorization_header"}}
	errAccessInvalid = &apiError{status: http.StatusUnauthorized, body: struct {
		Detail   string         `json:"detail"`
		Code     string         `json:"code"`
		Messages []tokenMessage `json:"messages"`
	}{"Given token not valid for any token type", "token_not_valid",
		[]tokenMessage{{"AccessToken", "access", "Token is invalid or expired"}}}}
	errRefreshInvalid = &apiError{status: http.StatusUnauthorized,
		body: detailBody{Detail: "Token is invalid or expired", Code: "token_not_valid"}}
	errBlacklisted = &apiError{status: http.StatusUnauthorized,
		body: detailBody{Detail: "Token is blacklisted", Code: "token_not_valid"}}
	errBadCredentials = &apiError{status: http.StatusUnauthorized,
		body: detail("No active account found with the given credentials")}
)

// tokenMessage is one entry of SimpleJWT's "messages" list.
type tokenMessage struct {
	TokenClass string `json:"token_class"`
	TokenType  string `json:"token_type"`
	Message    string `json:"message"`
}

func isAuthFailure(err error) bool {
	var ae *apiError
	return errors.As(err, &ae) && ae.status == http.StatusUnauthorized
}

// authenticate finds who is asking from the access token. Whether the login
// it descends from is still live is checked in the database by the query
// that serves the request (liveSQL), and by fail for an
// answer that is not a success, so that a logout on any instance ends the
// token at once without a round trip of its own.
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
	info.userID, info.sessionID = c.UserID, c.SID
	return nil
}

// sessionLive reports whether the caller's login is still live.
func (s *server) sessionLive(ctx context.Context, info *requestInfo) (bool, error) {
	var live bool
	err := s.db.QueryRowContext(ctx, "SELECT "+liveSQL(1, 2), info.sessionID, info.userID).Scan(&live)
	if err != nil {
		return false, fmt.Errorf("check session: %w", err)
	}
	return live, nil
}

// user is an account as the API shows it.
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

// startLogin opens a session for userID and issues its first pair.
func (s *server) startLogin(ctx context.Context, tx *sql.Tx, userID int64) (tokenPair, error) {
	var sid int64
	err := tx.QueryRowContext(ctx, `INSERT INTO sessions (user_id) VALUES ($1) RETURNING id`, userID).Scan(&sid)
	if err != nil {
		return tokenPair{}, fmt.Errorf("start session: %w", err)
	}
	return s.issuePair(ctx, tx, userID, sid)
}

// issuePair records a new refresh token of session sid and signs it with a
// new access token.
func (s *server) issuePair(ctx context.Context, tx *sql.Tx, userID, sid int64) (tokenPair, error) {
	now := time.Now()
	refresh := s.signer.newClaims("refresh", userID, sid, now)
	const q = `INSERT INTO refresh_tokens (jti, session_id, expires_at) VALUES ($1, $2, $3)`
	if _, err := tx.ExecContext(ctx, q, refresh.JTI, sid, time.Unix(refresh.Exp, 0)); err != nil {
		return tokenPair{}, fmt.Errorf("record refresh token: %w", err)
	}
	access := s.signer.newClaims("access", userID, sid, now)
	return tokenPair{Refresh: s.signer.sign(refresh), Access: s.signer.sign(access)}, nil
}

var (
	usernameTaken = "A user with that username already exists."
	emailTaken    = "A user with that email already exists."
)

// handleRegister creates an account and its first login.
func (s *server) handleRegister(w http.ResponseWriter, r *http.Request) {
	if wait, ok := s.registerLimit.allow(ipKey(infoFrom(r).clientIP)); !ok {
		s.fail(w, r, throttled(wait))
		return
	}
	f, err := decodeBody(r)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	ctx := r.Context()
	errs := fieldErrors{}
	u := user{}
	u.Username, _ = f.username("username", errs)
	u.Email, _ = f.email("email", true, errs)
	u.Name, _ = f.text("name", true, 1, 150, errs)
	password, havePassword := f.str("password", errs)
	switch {
	case !havePassword && errs["password"] == nil:
		errs.add("password", "This field is required.")
	case havePassword && strings.TrimSpace(password) == "":
		// Blank as login judges it (DRF's), or the account could never log in.
		errs.add("password", "This field may not be blank.")
	case utf8.RuneCountInString(password) > 1024:
		errs.add("password", "Ensure this field has no more than 1024 characters.")
	case havePassword:
		for _, msg := range s.passwordProblems(password, [3]string{u.Username, u.Email, u.Name}) {
			errs.add("password", msg)
		}
	}
	confirm, haveConfirm := f.str("password_confirm", errs)
	names := loginNames(u)
	if err := s.checkNamesFree(ctx, names, errs); err != nil {
		s.fail(w, r, err)
		return
	}
	if len(errs) == 0 && haveConfirm && confirm != password {
		errs.add("password_confirm", "Passwords don't match.")
	}
	if len(errs) > 0 {
		s.fail(w, r, errs)
		return
	}
	hashed, err := s.passwords.hash(ctx, password)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	var out struct {
		User   user      `json:"user"`
		Tokens tokenPair `json:"tokens"`
	}
	err = withTx(ctx, s.db.DB, func(tx *sql.Tx) error {
		const q = `INSERT INTO users (username, email, name, password) VALUES ($1, $2, $3, $4) RETURNING id`
		if err := tx.QueryRowContext(ctx, q, u.Username, u.Email, u.Name, hashed).Scan(&u.ID); err != nil {
			return fmt.Errorf("insert user: %w", err)
		}
		for _, n := range names {
			// The primary key decides a race between two registrations.
			_, err := tx.ExecContext(ctx, `INSERT INTO login_names (name, user_id) VALUES ($1, $2)`, n.name, u.ID)
			if _, taken := violation(err, pqerror.UniqueViolation); taken {
				return n.taken()
			}
			if err != nil {
				return fmt.Errorf("insert login name: %w", err)
			}
		}
		out.User = u
		out.Tokens, err = s.startLogin(ctx, tx, u.ID)
		return err
	})
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, out)
}

// loginName is one lower-cased name an account can log in with, and the
// fields of the registration it came from.
type loginName struct {
	name   string
	fields []string
}

func (n loginName) taken() fieldErrors {
	errs := fieldErrors{}
	for _, f := range n.fields {
		if f == "username" {
			errs.add(f, usernameTaken)
		} else {
			errs.add(f, emailTaken)
		}
	}
	return errs
}

// loginNames lists the valid names of u, once each.
func loginNames(u user) []loginName {
	var names []loginName
	if u.Username != "" {
		names = append(names, loginName{strings.ToLower(u.Username), []string{"username"}})
	}
	if u.Email != "" {
		if len(names) == 1 && names[0].name == u.Email {
			names[0].fields = append(names[0].fields, "email")
		} else {
			names = append(names, loginName{u.Email, []string{"email"}})
		}
	}
	return names
}

// checkNamesFree reports names already in use as field errors, so that a
// registration hears about every problem at once. One statement reads them
// all from one snapshot: a query per name could straddle the commit of a
// racing registration and report only some of its names. It is only a
// courtesy: the unique key still decides when two registrations race.
func (s *server) checkNamesFree(ctx context.Context, names []loginName, errs fieldErrors) error {
	list := make([]string, len(names))
	for i, n := range names {
		list[i] = n.name
	}
	rows, err := s.db.QueryContext(ctx, `SELECT name FROM login_names WHERE name = ANY($1)`, pq.Array(list))
	if err != nil {
		return fmt.Errorf("check login names: %w", err)
	}
	defer rows.Close()
	taken := map[string]bool{}
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			return fmt.Errorf("check login names: %w", err)
		}
		taken[name] = true
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("check login names: %w", err)
	}
	for _, n := range names {
		if taken[n.name] {
			for f, msgs := range n.taken() {
				errs[f] = append(errs[f], msgs...)
			}
		}
	}
	return nil
}

var usernameRE = regexp.MustCompile(`^[\p{L}\p{N}@.+\-_]+$`)

// username reads Django's username: 1–150 letters, digits and @.+-_.
func (f fields) username(key string, errs fieldErrors) (string, bool) {
	v, ok := f.str(key, errs)
	if !ok {
		if _, present := f[key]; !present {
			errs.add(key, "This field is required.")
		}
		return "", false
	}
	v = strings.TrimSpace(v)
	switch {
	case v == "":
		errs.add(key, "This field may not be blank.")
	case utf8.RuneCountInString(v) > 150:
		errs.add(key, "Ensure this field has no more than 150 characters.")
	case !usernameRE.MatchString(v):
		errs.add(key, "Enter a valid username. This value may contain only letters, numbers, and @/./+/-/_ characters.")
	default:
		return v, true
	}
	return "", false
}

// handleLogin exchanges a username or email and a password for a new login.
// The login limit counts the attempt before the password is checked and
// gives it back only on success, so concurrent guesses cannot overshoot it.
func (s *server) handleLogin(w http.ResponseWriter, r *http.Request) {
	key := ipKey(infoFrom(r).clientIP)
	wait, ok := s.loginLimit.allow(key)
	if !ok {
		s.fail(w, r, throttled(wait))
		return
	}
	failed := false
	defer func() {
		if !failed {
			s.loginLimit.undo(key)
		}
	}()
	f, err := decodeBody(r)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	errs := fieldErrors{}
	name, _ := f.required("username", errs)
	password, _ := f.required("password", errs)
	if len(errs) > 0 {
		s.fail(w, r, errs)
		return
	}
	ctx := r.Context()
	var id int64
	stored := s.passwords.dummy
	const q = `SELECT u.id, u.password FROM login_names n JOIN users u ON u.id = n.user_id WHERE n.name = $1`
	err = s.db.QueryRowContext(ctx, q, strings.ToLower(strings.TrimSpace(name))).Scan(&id, &stored)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		s.fail(w, r, fmt.Errorf("find user: %w", err))
		return
	}
	// Unknown users are checked against the dummy hash: the same work and
	// the same answer, so timing does not reveal which accounts exist.
	match, stale, err := s.passwords.verify(ctx, password, stored)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if !match || id == 0 {
		failed = true
		s.fail(w, r, errBadCredentials)
		return
	}
	if stale {
		s.rehash(ctx, id, password, stored)
	}
	var pair tokenPair
	err = withTx(ctx, s.db.DB, func(tx *sql.Tx) (err error) {
		pair, err = s.startLogin(ctx, tx, id)
		return err
	})
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, pair)
}

// rehash upgrades a hash made with fewer iterations than ours. It is best
// effort: the login succeeds either way, and the next one tries again.
func (s *server) rehash(ctx context.Context, id int64, password, old string) {
	hashed, err := s.passwords.hash(ctx, password)
	if err == nil {
		const q = `UPDATE users SET password = $1 WHERE id = $2 AND password = $3`
		_, err = s.db.ExecContext(ctx, q, hashed, id, old)
	}
	if err != nil {
		s.log.Warn("rehash password", "user_id", id, "err", err)
	}
}

// required reads a string that must be present and not blank.
func (f fields) required(key string, errs fieldErrors) (string, bool) {
	v, ok := f.str(key, errs)
	switch {
	case !ok && errs[key] == nil:
		errs.add(key, "This field is required.")
	case ok && strings.TrimSpace(v) == "":
		errs.add(key, "This field may not be blank.")
	default:
		return v, ok
	}
	return "", false
}

// refreshClaims reads and verifies the body's refresh token.
func (s *server) refreshClaims(r *http.Request) (claims, error) {
	f, err := decodeBody(r)
	if err != nil {
		return claims{}, err
	}
	errs := fieldErrors{}
	token, ok := f.required("refresh", errs)
	if !ok {
		return claims{}, errs
	}
	c, err := s.signer.verify(token, "refresh", time.Now())
	if err != nil {
		return claims{}, errRefreshInvalid
	}
	return c, nil
}

// handleRefresh rotates a refresh token: the presented one is spent and a
// new pair of the same login issued, in one transaction. The conditional
// UPDATE is the lock: of concurrent refreshes with one token exactly one
// finds it unspent.
func (s *server) handleRefresh(w http.ResponseWriter, r *http.Request) {
	c, err := s.refreshClaims(r)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	ctx := r.Context()
	var pair tokenPair
	err = withTx(ctx, s.db.DB, func(tx *sql.Tx) error {
		const spend = `
			UPDATE refresh_tokens t SET rotated_at = now()
			FROM sessions s
			WHERE t.jti = $1 AND t.session_id = $2 AND t.rotated_at IS NULL AND t.expires_at > now()
			  AND s.id = t.session_id AND s.user_id = $3 AND s.ended_at IS NULL`
		res, err := tx.ExecContext(ctx, spend, c.JTI, c.SID, c.UserID)
		if err != nil {
			return fmt.Errorf("spend refresh token: %w", err)
		}
		if n, _ := res.RowsAffected(); n != 1 {
			return errSpent
		}
		pair, err = s.issuePair(ctx, tx, c.UserID, c.SID)
		return err
	})
	if errors.Is(err, errSpent) {
		err = s.refusedRefresh(ctx, c)
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, pair)
}

var errSpent = errors.New("refresh token not spendable")

// refusedRefresh explains why a validly signed refresh token could not be
// spent. One already rotated is reuse: past the grace window it means the
// token was probably stolen, so the whole login ends (RFC 9700 §4.14.2);
// inside it, it is more likely two tabs refreshing at once.
func (s *server) refusedRefresh(ctx context.Context, c claims) error {
	// coalesce: an unrotated token (one the database already counts as
	// expired) makes the comparison NULL, which must read as "no reuse".
	const q = `
		SELECT t.rotated_at IS NOT NULL OR s.ended_at IS NOT NULL,
		       coalesce(s.ended_at IS NULL AND t.rotated_at < now() - make_interval(secs => $2), false)
		FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id
		WHERE t.jti = $1 AND t.session_id = $3`
	var spent, reuse bool
	err := s.db.QueryRowContext(ctx, q, c.JTI, s.cfg.reuseGrace.Seconds(), c.SID).Scan(&spent, &reuse)
	if errors.Is(err, sql.ErrNoRows) || err == nil && !spent {
		return errRefreshInvalid
	}
	if err != nil {
		return fmt.Errorf("look up refresh token: %w", err)
	}
	if reuse {
		if _, err := s.db.ExecContext(ctx, `UPDATE sessions SET ended_at = now() WHERE id = $1 AND ended_at IS NULL`, c.SID); err != nil {
			return fmt.Errorf("end reused login: %w", err)
		}
		s.log.Warn("refresh token reused; login ended", "user_id", c.UserID, "session_id", c.SID)
	}
	return errBlacklisted
}

// handleLogout ends the login a refresh token (current or rotated) belongs
// to: its refresh tokens can no longer be spent and authenticate refuses its
// access tokens from now on.
func (s *server) handleLogout(w http.ResponseWriter, r *http.Request) {
	c, err := s.refreshClaims(r)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	const q = `
		UPDATE sessions SET ended_at = coalesce(ended_at, now())
		WHERE id = $1 AND user_id = $2
		  AND EXISTS (SELECT 1 FROM refresh_tokens WHERE jti = $3 AND session_id = $1)`
	res, err := s.db.ExecContext(r.Context(), q, c.SID, c.UserID, c.JTI)
	if err != nil {
		s.fail(w, r, fmt.Errorf("end login: %w", err))
		return
	}
	if n, _ := res.RowsAffected(); n != 1 {
		s.fail(w, r, errRefreshInvalid)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// handleMe returns the caller's account.
func (s *server) handleMe(w http.ResponseWriter, r *http.Request) {
	info := infoFrom(r)
	u := user{ID: info.userID}
	q := `SELECT username, email, name FROM users WHERE id = $1 AND ` + liveSQL(2, 1)
	err := s.db.QueryRowContext(r.Context(), q, u.ID, info.sessionID).Scan(&u.Username, &u.Email, &u.Name)
	if errors.Is(err, sql.ErrNoRows) {
		err = errAccessInvalid
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, u)
}
