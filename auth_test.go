package main

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"database/sql"
	"database/sql/driver"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/lib/pq/pqerror"
)

// The contract's 401 bodies that only this file checks (main_test.go has
// the others).
const (
	badAuthHeaderBody = `{"detail": "Authorization header must contain two space-delimited values", "code": "bad_authorization_header"}`
	blacklistedBody   = `{"detail": "Token is blacklisted", "code": "token_not_valid"}`
)

// hs256Header is the only JWT header the server issues and accepts.
const hs256Header = `{"alg":"HS256","typ":"JWT"}`

// otherKey is a well-formed secret that is not the server's.
const otherKey = "another-secret-key-0123456789abcdef-xyz"

// wantUnauthorized is wantJSON for a 401, which must also carry the
// contract's WWW-Authenticate challenge.
func wantUnauthorized(t testing.TB, res response, body string) {
	t.Helper()
	wantJSON(t, res, http.StatusUnauthorized, body)
	if got := res.header.Get("WWW-Authenticate"); got != `Bearer realm="api"` {
		t.Fatalf("WWW-Authenticate %q, want %q", got, `Bearer realm="api"`)
	}
}

// me asks GET /api/auth/me/ with token (none when empty).
func me(t testing.TB, s http.Handler, token string) response {
	t.Helper()
	return do(t, s, req{method: "GET", path: "/api/auth/me/", token: token})
}

// wantMe fails unless token authenticates as a.
func wantMe(t testing.TB, s http.Handler, token string, a account) {
	t.Helper()
	res := me(t, s, token)
	if res.status != http.StatusOK {
		t.Fatalf("me: status %d, want 200; body %s", res.status, res.body)
	}
	if id, _ := res.object(t)["id"].(float64); int64(id) != a.id {
		t.Fatalf("me: %s, want user %d", res.body, a.id)
	}
}

// login posts credentials to the login endpoint from the default address.
func login(t testing.TB, s http.Handler, name, password string) response {
	t.Helper()
	return do(t, s, req{method: "POST", path: "/api/auth/login/", body: map[string]string{"username": name, "password": password}})
}

// loginPair logs in and returns the new pair, failing unless it is a 200.
func loginPair(t testing.TB, s http.Handler, name, password string) tokenPair {
	t.Helper()
	return pairOf(t, login(t, s, name, password))
}

// refresh posts a refresh token to the refresh endpoint.
func refresh(t testing.TB, s http.Handler, token string) response {
	t.Helper()
	return do(t, s, req{method: "POST", path: "/api/auth/token/refresh/", body: map[string]string{"refresh": token}})
}

// logout posts a refresh token to the logout endpoint.
func logout(t testing.TB, s http.Handler, token string) response {
	t.Helper()
	return do(t, s, req{method: "POST", path: "/api/auth/logout/", body: map[string]string{"refresh": token}})
}

// pairOf reads a 200 {"refresh", "access"} body: exactly those two members,
// both tokens of the right type.
func pairOf(t testing.TB, res response) tokenPair {
	t.Helper()
	if res.status != http.StatusOK {
		t.Fatalf("status %d, want 200; body %s", res.status, res.body)
	}
	m := res.object(t)
	r, _ := m["refresh"].(string)
	a, _ := m["access"].(string)
	if len(m) != 2 || r == "" || a == "" {
		t.Fatalf("body %s, want exactly refresh and access", res.body)
	}
	if tokenClaims(t, r)["token_type"] != "refresh" || tokenClaims(t, a)["token_type"] != "access" {
		t.Fatalf("token types mixed up in %s", res.body)
	}
	return tokenPair{Refresh: r, Access: a}
}

// seg base64url-encodes s without padding, as a JWT segment.
func seg(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }

// forge makes a token of arbitrary header and payload JSON, signed with
// HMAC-SHA256 under key, as an attacker who knew (or guessed) key would.
func forge(header, payload, key string) string {
	return signSegments(sha256.New, seg(header), seg(payload), key)
}

// signSegments signs two already encoded segments with HMAC over h.
func signSegments(h func() hash.Hash, head, body, key string) string {
	m := hmac.New(h, []byte(key))
	m.Write([]byte(head + "." + body))
	return head + "." + body + "." + base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// tokenClaims decodes a token's payload without checking anything; numbers
// stay json.Number so that they marshal back unchanged.
func tokenClaims(t testing.TB, token string) map[string]any {
	t.Helper()
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("token %q has %d segments", token, len(parts))
	}
	raw, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatalf("token payload: %v", err)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var c map[string]any
	if err := dec.Decode(&c); err != nil {
		t.Fatalf("token payload: %v", err)
	}
	return c
}

// absent, as a value in payloadWith's changes, removes the claim.
type absent struct{}

// payloadWith returns base's claims as JSON with changes applied.
func payloadWith(t testing.TB, base, changes map[string]any) string {
	t.Helper()
	c := map[string]any{}
	for k, v := range base {
		c[k] = v
	}
	for k, v := range changes {
		if _, drop := v.(absent); drop {
			delete(c, k)
			continue
		}
		c[k] = v
	}
	data, err := json.Marshal(c)
	if err != nil {
		t.Fatalf("marshal claims: %v", err)
	}
	return string(data)
}

// claimInt reads an integer claim.
func claimInt(t testing.TB, c map[string]any, key string) int64 {
	t.Helper()
	n, ok := c[key].(json.Number)
	if !ok {
		t.Fatalf("claim %s = %#v, want a number", key, c[key])
	}
	v, err := n.Int64()
	if err != nil {
		t.Fatalf("claim %s = %s, want an integer", key, n)
	}
	return v
}

// storedHash reads a user's password column.
func storedHash(t testing.TB, id int64) string {
	t.Helper()
	needDB(t)
	var h string
	if err := testDB.QueryRowContext(t.Context(), `SELECT password FROM users WHERE id = $1`, id).Scan(&h); err != nil {
		t.Fatalf("read password of user %d: %v", id, err)
	}
	return h
}

// insertUser stores an account directly, as a migration from the Django
// database would, with the given password hash and both login names.
func insertUser(t testing.TB, username, email, passwordHash string) int64 {
	t.Helper()
	needDB(t)
	ctx := t.Context()
	var id int64
	err := testDB.QueryRowContext(ctx, `INSERT INTO users (username, email, name, password) VALUES ($1, $2, $3, $4) RETURNING id`,
		username, email, "Migrated User", passwordHash).Scan(&id)
	if err != nil {
		t.Fatalf("insert user: %v", err)
	}
	for _, n := range []string{strings.ToLower(username), email} {
		if _, err := testDB.ExecContext(ctx, `INSERT INTO login_names (name, user_id) VALUES ($1, $2)`, n, id); err != nil {
			t.Fatalf("insert login name: %v", err)
		}
	}
	return id
}

// djangoHash computes a pbkdf2_sha256 hash in the test, not through the
// server's code.
func djangoHash(t testing.TB, password, salt string, iterations int) string {
	t.Helper()
	dk, err := pbkdf2.Key(sha256.New, password, []byte(salt), iterations, 32)
	if err != nil {
		t.Fatalf("pbkdf2: %v", err)
	}
	return fmt.Sprintf("pbkdf2_sha256$%d$%s$%s", iterations, salt, base64.StdEncoding.EncodeToString(dk))
}

// hashIterations reads the iteration count of a stored hash.
func hashIterations(t testing.TB, encoded string) int {
	t.Helper()
	parts := strings.Split(encoded, "$")
	if len(parts) != 4 || parts[0] != "pbkdf2_sha256" {
		t.Fatalf("hash %q is not pbkdf2_sha256$<iterations>$<salt>$<key>", encoded)
	}
	n, err := strconv.Atoi(parts[1])
	if err != nil {
		t.Fatalf("hash %q: iterations: %v", encoded, err)
	}
	return n
}

// slowHashes lets a request run the real 600,000 PBKDF2 rounds: the race
// detector (CI runs -race) makes them take seconds, and the request deadline
// is not what these tests are about.
func slowHashes(c *config) { c.requestTimeout = 2 * time.Minute }

func TestTokenIssuedClaims(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	for _, tc := range []struct {
		name, token, tokenType string
		lifetime               int64
	}{
		{"access", a.access, "access", 15 * 60},
		{"refresh", a.refresh, "refresh", 24 * 60 * 60},
	} {
		t.Run(tc.name, func(t *testing.T) {
			parts := strings.Split(tc.token, ".")
			if len(parts) != 3 {
				t.Fatalf("token %q: want three segments", tc.token)
			}
			head, err := base64.RawURLEncoding.DecodeString(parts[0])
			if err != nil || !jsonEqual(response{body: head}.json(t), response{body: []byte(hs256Header)}.json(t)) {
				t.Fatalf("header %s, want %s", head, hs256Header)
			}
			c := tokenClaims(t, tc.token)
			if len(c) != 6 {
				t.Errorf("claims %v, want exactly token_type, exp, iat, jti, user_id, sid", c)
			}
			if c["token_type"] != tc.tokenType {
				t.Errorf("token_type %v, want %s", c["token_type"], tc.tokenType)
			}
			if exp, iat := claimInt(t, c, "exp"), claimInt(t, c, "iat"); exp-iat != tc.lifetime {
				t.Errorf("exp - iat = %d, want %d", exp-iat, tc.lifetime)
			}
			if now := time.Now().Unix(); claimInt(t, c, "iat") > now || claimInt(t, c, "iat") < now-60 {
				t.Errorf("iat %d is not now (%d)", claimInt(t, c, "iat"), now)
			}
			if jti, _ := c["jti"].(string); len(jti) != 32 || strings.ToLower(jti) != jti || !isHex(jti) {
				t.Errorf("jti %v, want 32 lower-case hex characters", c["jti"])
			}
			if claimInt(t, c, "user_id") != a.id {
				t.Errorf("user_id %v, want %d", c["user_id"], a.id)
			}
			if claimInt(t, c, "sid") <= 0 {
				t.Errorf("sid %v, want a login id", c["sid"])
			}
			// Independently of the server's code: HMAC-SHA256 under SECRET_KEY.
			if again := signSegments(sha256.New, parts[0], parts[1], testSecret); again != tc.token {
				t.Errorf("signature is not HMAC-SHA256 under SECRET_KEY")
			}
		})
	}
	if tokenClaims(t, a.access)["sid"] != tokenClaims(t, a.refresh)["sid"] {
		t.Errorf("access and refresh of one login carry different sids")
	}
	if tokenClaims(t, a.access)["jti"] == tokenClaims(t, a.refresh)["jti"] {
		t.Errorf("access and refresh share a jti")
	}
}

func isHex(s string) bool {
	_, err := hex.DecodeString(s)
	return err == nil
}

func TestTokenForgedAccess(t *testing.T) {
	s := newTestServer(t, nil)
	a, b := register(t, s), register(t, s)
	ac, bc := tokenClaims(t, a.access), tokenClaims(t, b.access)
	now := time.Now().Unix()
	// signed makes a correctly signed token of a's claims with changes.
	signed := func(changes map[string]any) string {
		return forge(hs256Header, payloadWith(t, ac, changes), testSecret)
	}
	parts := strings.Split(a.access, ".")
	head, body, sig := parts[0], parts[1], parts[2]
	bSig := strings.Split(b.access, ".")[2]

	// The forging helper must make tokens the server accepts, or every
	// refusal below would prove nothing.
	t.Run("controls", func(t *testing.T) {
		for name, token := range map[string]string{
			"real token":                a.access,
			"forged with the right key": signed(nil),
			"header keys reordered":     forge(`{"typ":"JWT","alg":"HS256"}`, payloadWith(t, ac, nil), testSecret),
			"header with spaces":        forge(`{ "alg": "HS256", "typ": "JWT" }`, payloadWith(t, ac, nil), testSecret),
			"unknown payload claim":     signed(map[string]any{"scope": "admin"}),
		} {
			t.Run(name, func(t *testing.T) { wantMe(t, s, token, a) })
		}
	})

	// layout writes claims in exactly the byte layout the server signs,
	// which it reads without encoding/json; each argument is raw JSON.
	num := func(key string) string { return ac[key].(json.Number).String() }
	layout := func(tokenType, exp, iat, jti, userID, sid string) string {
		return `{"token_type":` + tokenType + `,"exp":` + exp + `,"iat":` + iat + `,"jti":` + jti + `,"user_id":` + userID + `,"sid":` + sid + `}`
	}
	jti := `"` + ac["jti"].(string) + `"`
	own := func(edit func(tt, exp, iat, jti, uid, sid *string)) string {
		tt, exp, iat, j, uid, sid := `"access"`, num("exp"), num("iat"), jti, num("user_id"), num("sid")
		if edit != nil {
			edit(&tt, &exp, &iat, &j, &uid, &sid)
		}
		return forge(hs256Header, layout(tt, exp, iat, j, uid, sid), testSecret)
	}
	if raw, _ := base64.RawURLEncoding.DecodeString(body); string(raw) != layout(`"access"`, num("exp"), num("iat"), jti, num("user_id"), num("sid")) {
		t.Fatalf("payload %s is not in the layout this test forges", raw)
	}
	t.Run("controls in the server's layout", func(t *testing.T) {
		wantMe(t, s, own(nil), a)
		wantMe(t, s, own(func(tt, _, _, _, _, _ *string) { *tt = `"acc\u0065ss"` }), a)
		wantMe(t, s, own(func(_, _, _, _, _, sid *string) { *sid += `,"scope":"admin"` }), a)
	})
	layoutTests := []struct {
		name, token string
	}{
		{"exp as a string", own(func(_, exp, _, _, _, _ *string) { *exp = `"` + *exp + `"` })},
		{"exp as a float", own(func(_, exp, _, _, _, _ *string) { *exp += ".0" })},
		{"exp with an exponent", own(func(_, exp, _, _, _, _ *string) { *exp = "1.9e9" })},
		{"exp with a leading zero", own(func(_, exp, _, _, _, _ *string) { *exp = "0" + *exp })},
		{"exp of 19 digits", own(func(_, exp, _, _, _, _ *string) { *exp = "9999999999999999999" })},
		{"exp of 25 digits", own(func(_, exp, _, _, _, _ *string) { *exp = "9999999999999999999999999" })},
		{"exp negative", own(func(_, exp, _, _, _, _ *string) { *exp = "-" + *exp })},
		{"exp null", own(func(_, exp, _, _, _, _ *string) { *exp = "null" })},
		{"exp past", own(func(_, exp, _, _, _, _ *string) { *exp = strconv.FormatInt(now-10, 10) })},
		{"user_id as a string", own(func(_, _, _, _, uid, _ *string) { *uid = `"` + *uid + `"` })},
		{"user_id of another user", own(func(_, _, _, _, uid, _ *string) { *uid = strconv.FormatInt(b.id, 10) })},
		{"user_id zero", own(func(_, _, _, _, uid, _ *string) { *uid = "0" })},
		{"user_id true", own(func(_, _, _, _, uid, _ *string) { *uid = "true" })},
		{"sid of another user's login", own(func(_, _, _, _, _, sid *string) { *sid = bc["sid"].(json.Number).String() })},
		{"sid null", own(func(_, _, _, _, _, sid *string) { *sid = "null" })},
		{"sid an object", own(func(_, _, _, _, _, sid *string) { *sid = `{"id":1}` })},
		{"user_id given twice", own(func(_, _, _, _, _, sid *string) { *sid += `,"user_id":` + strconv.FormatInt(b.id, 10) })},
		{"sid given twice", own(func(_, _, _, _, _, sid *string) { *sid += `,"sid":` + bc["sid"].(json.Number).String() })},
		{"token_type given twice", own(func(_, _, _, _, _, sid *string) { *sid += `,"token_type":"refresh"` })},
		{"token_type refresh", own(func(tt, _, _, _, _, _ *string) { *tt = `"refresh"` })},
		{"token_type with a NUL", own(func(tt, _, _, _, _, _ *string) { *tt = `"access\u0000"` })},
		{"token_type accented", own(func(tt, _, _, _, _, _ *string) { *tt = `"accéss"` })},
		{"token_type a number", own(func(tt, _, _, _, _, _ *string) { *tt = `1` })},
		{"jti upper-case", own(func(_, _, _, j, _, _ *string) { *j = strings.ToUpper(*j) })},
		{"jti short", own(func(_, _, _, j, _, _ *string) { *j = `"abc"` })},
		{"jti escaped quote", own(func(_, _, _, j, _, _ *string) { *j = `"` + ac["jti"].(string)[:31] + `\""` })},
		{"trailing data", own(func(_, _, _, _, _, sid *string) { *sid += "}x" })},
		{"no closing brace", forge(hs256Header, strings.TrimSuffix(layout(`"access"`, num("exp"), num("iat"), jti, num("user_id"), num("sid")), "}"), testSecret)},
	}
	for _, tc := range layoutTests {
		t.Run("server's layout, "+tc.name, func(t *testing.T) {
			wantUnauthorized(t, me(t, s, tc.token), invalidAccessBody)
		})
	}

	padded := base64.URLEncoding.EncodeToString([]byte(payloadWith(t, ac, map[string]any{"x": "y"})))
	if !strings.HasSuffix(padded, "=") {
		padded = base64.URLEncoding.EncodeToString([]byte(payloadWith(t, ac, map[string]any{"x": "yz"})))
	}
	rsaPublicKey := "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAu1SU1LfVLPHCozMxH2Mo\n-----END PUBLIC KEY-----\n"
	tests := []struct {
		name, token string
	}{
		{"alg none, empty signature", seg(`{"alg":"none","typ":"JWT"}`) + "." + body + "."},
		{"alg None, empty signature", seg(`{"alg":"None","typ":"JWT"}`) + "." + body + "."},
		{"alg NONE, empty signature", seg(`{"alg":"NONE","typ":"JWT"}`) + "." + body + "."},
		{"alg none, real signature", forge(`{"alg":"none","typ":"JWT"}`, payloadWith(t, ac, nil), testSecret)},
		{"alg None, real signature", forge(`{"alg":"None","typ":"JWT"}`, payloadWith(t, ac, nil), testSecret)},
		{"alg NONE, real signature", forge(`{"alg":"NONE","typ":"JWT"}`, payloadWith(t, ac, nil), testSecret)},
		{"alg none, the original signature", seg(`{"alg":"none","typ":"JWT"}`) + "." + body + "." + sig},
		{"alg none, no signature segment", seg(`{"alg":"none","typ":"JWT"}`) + "." + body},
		{"HS512 header and signature", signSegments(sha512.New, seg(`{"alg":"HS512","typ":"JWT"}`), body, testSecret)},
		{"HS512 header, HS256 signature", forge(`{"alg":"HS512","typ":"JWT"}`, payloadWith(t, ac, nil), testSecret)},
		{"RS256 header, HMAC under the secret", forge(`{"alg":"RS256","typ":"JWT"}`, payloadWith(t, ac, nil), testSecret)},
		{"RS256 header, HMAC under a public key", forge(`{"alg":"RS256","typ":"JWT"}`, payloadWith(t, ac, nil), rsaPublicKey)},
		{"extra header field kid", forge(`{"alg":"HS256","typ":"JWT","kid":"1"}`, payloadWith(t, ac, nil), testSecret)},
		{"extra header field jku", forge(`{"alg":"HS256","typ":"JWT","jku":"https://evil.example/keys"}`, payloadWith(t, ac, nil), testSecret)},
		{"missing typ", forge(`{"alg":"HS256"}`, payloadWith(t, ac, nil), testSecret)},
		{"typ lower case", forge(`{"alg":"HS256","typ":"jwt"}`, payloadWith(t, ac, nil), testSecret)},
		{"alg lower case", forge(`{"alg":"hs256","typ":"JWT"}`, payloadWith(t, ac, nil), testSecret)},
		{"header not JSON", forge(`alg=HS256`, payloadWith(t, ac, nil), testSecret)},
		{"empty header", forge(`{}`, payloadWith(t, ac, nil), testSecret)},
		{"wrong key", forge(hs256Header, payloadWith(t, ac, nil), otherKey)},
		{"empty key", forge(hs256Header, payloadWith(t, ac, nil), "")},
		{"tampered user_id, old signature", head + "." + seg(payloadWith(t, ac, map[string]any{"user_id": b.id})) + "." + sig},
		{"tampered exp, old signature", head + "." + seg(payloadWith(t, ac, map[string]any{"exp": now + 86400*365})) + "." + sig},
		{"another token's signature", head + "." + body + "." + bSig},
		{"signature truncated", head + "." + body + "." + sig[:len(sig)-1]},
		{"signature extended", head + "." + body + "." + sig + "A"},
		{"expired", signed(map[string]any{"exp": now - 1})},
		{"expiring this second", signed(map[string]any{"exp": now})},
		{"refresh token used as access", a.refresh},
		{"token_type refresh, signed", signed(map[string]any{"token_type": "refresh"})},
		{"token_type missing", signed(map[string]any{"token_type": absent{}})},
		{"token_type Access", signed(map[string]any{"token_type": "Access"})},
		{"two segments", head + "." + body},
		{"four segments", a.access + "." + sig},
		{"empty segments", ".."},
		{"one word", "garbage"},
		{"non-base64 character in signature", head + "." + body + ".!" + sig[1:]},
		{"non-base64 character in payload, signed", signSegments(sha256.New, head, "eyJ!"+body[4:], testSecret)},
		{"padded base64 payload, signed", signSegments(sha256.New, head, padded, testSecret)},
		{"payload not JSON, signed", forge(hs256Header, "not json", testSecret)},
		{"payload a JSON array, signed", forge(hs256Header, "[]", testSecret)},
		{"payload with trailing data, signed", forge(hs256Header, payloadWith(t, ac, nil)+"{}", testSecret)},
		{"exp as a string", signed(map[string]any{"exp": strconv.FormatInt(now+600, 10)})},
		{"exp as a float", signed(map[string]any{"exp": float64(now+600) + 0.5})},
		{"exp missing", signed(map[string]any{"exp": absent{}})},
		{"exp null", signed(map[string]any{"exp": nil})},
		{"iat as a string", signed(map[string]any{"iat": strconv.FormatInt(now, 10)})},
		{"user_id as a string", signed(map[string]any{"user_id": strconv.FormatInt(a.id, 10)})},
		{"user_id missing", signed(map[string]any{"user_id": absent{}})},
		{"user_id zero", signed(map[string]any{"user_id": 0})},
		{"user_id negative", signed(map[string]any{"user_id": -a.id})},
		{"user_id of another user", signed(map[string]any{"user_id": b.id})},
		{"jti missing", signed(map[string]any{"jti": absent{}})},
		{"jti upper-case hex", signed(map[string]any{"jti": strings.ToUpper(ac["jti"].(string))})},
		{"jti as a number", signed(map[string]any{"jti": 12345})},
		{"sid missing, as the original service's tokens", signed(map[string]any{"sid": absent{}})},
		{"sid as a string", signed(map[string]any{"sid": fmt.Sprint(ac["sid"])})},
		{"sid of another user's login", signed(map[string]any{"sid": bc["sid"]})},
		{"sid of no login", signed(map[string]any{"sid": int64(1) << 50})},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			wantUnauthorized(t, me(t, s, tc.token), invalidAccessBody)
		})
	}
	// After every attack, both users' real tokens still work.
	wantMe(t, s, a.access, a)
	wantMe(t, s, b.access, b)
}

func TestTokenLengthCap(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	ac := tokenClaims(t, a.access)
	// padTo returns the shortest valid token of at least n bytes.
	padTo := func(n int) string {
		withPad := func(pad int) string {
			return forge(hs256Header, payloadWith(t, ac, map[string]any{"pad": strings.Repeat("x", pad)}), testSecret)
		}
		// Base64 makes 4 bytes of 3: start a little short and step up.
		pad := max(0, (n-len(withPad(0)))*3/4-8)
		for len(withPad(pad)) < n {
			pad++
		}
		return withPad(pad)
	}
	t.Run("4096 bytes", func(t *testing.T) {
		tok := padTo(maxTokenLen)
		if len(tok) != 4096 {
			t.Fatalf("token of %d bytes, want 4096", len(tok))
		}
		wantMe(t, s, tok, a)
	})
	for _, n := range []int{4097, 5000, 60000} {
		t.Run(fmt.Sprintf("%d bytes", n), func(t *testing.T) {
			tok := padTo(n)
			if len(tok) != n {
				t.Fatalf("token of %d bytes, want %d", len(tok), n)
			}
			wantUnauthorized(t, me(t, s, tok), invalidAccessBody)
		})
	}
}

func TestTokenDeletedUser(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	forged := forge(hs256Header, payloadWith(t, tokenClaims(t, a.access), nil), testSecret)
	wantMe(t, s, a.access, a)
	if _, err := testDB.ExecContext(t.Context(), `DELETE FROM users WHERE id = $1`, a.id); err != nil {
		t.Fatalf("delete user: %v", err)
	}
	t.Run("access token", func(t *testing.T) { wantUnauthorized(t, me(t, s, a.access), invalidAccessBody) })
	t.Run("validly signed token", func(t *testing.T) { wantUnauthorized(t, me(t, s, forged), invalidAccessBody) })
	t.Run("refresh", func(t *testing.T) { wantUnauthorized(t, refresh(t, s, a.refresh), refreshInvalidBody) })
	t.Run("login", func(t *testing.T) { wantUnauthorized(t, login(t, s, a.username, a.password), badCredentialsBody) })
}

func TestAuthHeaderVariants(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	tests := []struct {
		name, header string
		wantStatus   int
		wantBody     string
	}{
		{"no header", "", http.StatusUnauthorized, bodyUnauthenticated},
		{"only spaces", "   ", http.StatusUnauthorized, bodyUnauthenticated},
		{"lower-case bearer", "bearer " + a.access, http.StatusUnauthorized, bodyUnauthenticated},
		{"upper-case BEARER", "BEARER " + a.access, http.StatusUnauthorized, bodyUnauthenticated},
		{"Basic x", "Basic x", http.StatusUnauthorized, bodyUnauthenticated},
		{"Basic credentials", "Basic " + base64.StdEncoding.EncodeToString([]byte(a.username+":"+a.password)), http.StatusUnauthorized, bodyUnauthenticated},
		{"JWT scheme", "JWT " + a.access, http.StatusUnauthorized, bodyUnauthenticated},
		{"token without scheme", a.access, http.StatusUnauthorized, bodyUnauthenticated},
		{"Bearer alone", "Bearer", http.StatusUnauthorized, badAuthHeaderBody},
		{"Bearer and a space", "Bearer ", http.StatusUnauthorized, badAuthHeaderBody},
		{"Bearer a b", "Bearer a b", http.StatusUnauthorized, badAuthHeaderBody},
		{"Bearer token and more", "Bearer " + a.access + " " + a.access, http.StatusUnauthorized, badAuthHeaderBody},
		{"Bearer garbage", "Bearer garbage", http.StatusUnauthorized, invalidAccessBody},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := do(t, s, req{method: "GET", path: "/api/auth/me/", header: map[string]string{"Authorization": tc.header}})
			wantUnauthorized(t, res, tc.wantBody)
		})
	}
	t.Run("Bearer and the token", func(t *testing.T) {
		res := do(t, s, req{method: "GET", path: "/api/auth/me/", header: map[string]string{"Authorization": "Bearer " + a.access}})
		wantJSON(t, res, http.StatusOK, jsonText(user{ID: a.id, Username: a.username, Email: a.email, Name: "Test User"}))
	})
}

func TestAuthPublicEndpointsIgnoreAuthorization(t *testing.T) {
	s := newTestServer(t, nil)
	victim := register(t, s)
	expired := forge(hs256Header, payloadWith(t, tokenClaims(t, victim.access), map[string]any{"exp": time.Now().Unix() - 3600}), testSecret)
	for name, header := range map[string]string{
		"garbage token":   "Bearer garbage",
		"expired token":   "Bearer " + expired,
		"three values":    "Bearer a b",
		"Bearer alone":    "Bearer",
		"another scheme":  "Basic x",
		"refresh as auth": "Bearer " + victim.refresh,
	} {
		t.Run(name, func(t *testing.T) {
			h := map[string]string{"Authorization": header}
			username, password := uniqueName("pub"), "Quiet-Harbor-Lantern-9"
			res := do(t, s, req{method: "POST", path: "/api/auth/register/", header: h, body: map[string]string{
				"username": username, "email": username + "@example.com", "name": "Pub User", "password": password,
			}})
			if res.status != http.StatusCreated {
				t.Fatalf("register: status %d; body %s", res.status, res.body)
			}
			res = do(t, s, req{method: "POST", path: "/api/auth/login/", header: h, body: map[string]string{"username": username, "password": password}})
			pair := pairOf(t, res)
			res = do(t, s, req{method: "POST", path: "/api/auth/token/refresh/", header: h, body: map[string]string{"refresh": pair.Refresh}})
			pair = pairOf(t, res)
			res = do(t, s, req{method: "POST", path: "/api/auth/logout/", header: h, body: map[string]string{"refresh": pair.Refresh}})
			wantNoContent(t, res)
		})
	}
}

func TestAuthMe(t *testing.T) {
	s := newTestServer(t, nil)
	username := uniqueName("Me_User.")
	res := do(t, s, req{method: "POST", path: "/api/auth/register/", body: map[string]string{
		"username": username, "email": " " + strings.ToUpper(username) + "@Example.ORG ", "name": "  <em>Ada</em> Lovelace ",
		"password": "Analytical-Engine-1843", "password_confirm": "Analytical-Engine-1843",
	}})
	if res.status != http.StatusCreated {
		t.Fatalf("register: status %d; body %s", res.status, res.body)
	}
	out := res.object(t)
	u, _ := out["user"].(map[string]any)
	id, _ := u["id"].(float64)
	want := user{ID: int64(id), Username: username, Email: strings.ToLower(username) + "@example.org", Name: "Ada Lovelace"}
	if !jsonEqual(u, response{body: []byte(jsonText(want))}.json(t)) || len(out) != 2 {
		t.Fatalf("register body %s, want user %s and tokens", res.body, jsonText(want))
	}
	tokens, _ := out["tokens"].(map[string]any)
	access, _ := tokens["access"].(string)
	if len(tokens) != 2 || access == "" || tokens["refresh"] == "" {
		t.Fatalf("tokens %v, want refresh and access", tokens)
	}
	wantJSON(t, me(t, s, access), http.StatusOK, jsonText(want))

	other := register(t, s)
	wantJSON(t, me(t, s, other.access), http.StatusOK,
		jsonText(user{ID: other.id, Username: other.username, Email: other.email, Name: "Test User"}))
}

// registerBody is a valid registration with unique names, with changes
// applied (an absent{} value removes the field).
func registerBody(changes map[string]any) map[string]any {
	n := uniqueName("reg")
	b := map[string]any{
		"username": n, "email": n + "@example.com", "name": "Reg User",
		"password": "Velvet-Orchard-Compass-31", "password_confirm": "Velvet-Orchard-Compass-31",
	}
	for k, v := range changes {
		if _, drop := v.(absent); drop {
			delete(b, k)
			continue
		}
		b[k] = v
	}
	return b
}

func TestRegisterValidation(t *testing.T) {
	s := newTestServer(t, nil)
	const (
		required      = "This field is required."
		blank         = "This field may not be blank."
		badUsername   = "Enter a valid username. This value may contain only letters, numbers, and @/./+/-/_ characters."
		badEmail      = "Enter a valid email address."
		tooShort      = "This password is too short. It must contain at least 8 characters."
		numeric       = "This password is entirely numeric."
		common        = "This password is too common."
		similarToUser = "The password is too similar to the username."
		similarToMail = "The password is too similar to the email address."
		similarToName = "The password is too similar to the name."
	)
	fe := func(field string, msgs ...string) string {
		return jsonText(map[string][]string{field: msgs})
	}
	// For the password cases: names that no password below resembles.
	pw := func(password, username, email, name string) map[string]any {
		return map[string]any{"username": username, "email": email, "name": name, "password": password, "password_confirm": password}
	}
	long254 := strings.Repeat("a", 64) + "@" + strings.Repeat("b", 60) + "." + strings.Repeat("c", 60) + "." + strings.Repeat("d", 60) + ".com"
	long254 = long254[:len(long254)-4] + strings.Repeat("e", 254-len(long254)) + ".com"
	if len(long254) != 254 {
		t.Fatalf("test email has %d characters", len(long254))
	}
	tests := []struct {
		name     string
		body     any
		wantBody string
	}{
		{"empty body", "", `{"username": ["` + required + `"], "email": ["` + required + `"], "name": ["` + required + `"], "password": ["` + required + `"]}`},
		{"empty object", map[string]any{}, `{"username": ["` + required + `"], "email": ["` + required + `"], "name": ["` + required + `"], "password": ["` + required + `"]}`},
		{"blank fields", map[string]any{"username": "", "email": "", "name": "", "password": "", "password_confirm": ""},
			`{"username": ["` + blank + `"], "email": ["` + blank + `"], "name": ["` + blank + `"], "password": ["` + blank + `"]}`},
		{"whitespace fields", map[string]any{"username": "  ", "email": " ", "name": "\t", "password": "Velvet-Orchard-Compass-31"},
			`{"username": ["` + blank + `"], "email": ["` + blank + `"], "name": ["` + blank + `"]}`},
		{"username missing", registerBody(map[string]any{"username": absent{}}), fe("username", required)},
		{"username null", registerBody(map[string]any{"username": nil}), fe("username", "This field may not be null.")},
		{"username a number", registerBody(map[string]any{"username": 42}), fe("username", "Not a valid string.")},
		{"username 151 characters", registerBody(map[string]any{"username": strings.Repeat("u", 151)}), fe("username", "Ensure this field has no more than 150 characters.")},
		{"username SQL injection", registerBody(map[string]any{"username": "admin'; DROP TABLE auth_user; --"}), fe("username", badUsername)},
		{"username with a space", registerBody(map[string]any{"username": "john smith"}), fe("username", badUsername)},
		{"username with a slash", registerBody(map[string]any{"username": "a/b"}), fe("username", badUsername)},
		{"username with a tag", registerBody(map[string]any{"username": "<b>bob</b>"}), fe("username", badUsername)},
		{"username with an emoji", registerBody(map[string]any{"username": "bob😀"}), fe("username", badUsername)},
		{"username with a newline", registerBody(map[string]any{"username": "bob\nalice"}), fe("username", badUsername)},
		{"username with NUL", registerBody(map[string]any{"username": "bob\x00"}), fe("username", "Null characters are not allowed.")},
		{"email missing", registerBody(map[string]any{"email": absent{}}), fe("email", required)},
		{"email without @", registerBody(map[string]any{"email": "not-an-email"}), fe("email", badEmail)},
		{"email with two @", registerBody(map[string]any{"email": "a@@example.com"}), fe("email", badEmail)},
		{"email without a dot in the domain", registerBody(map[string]any{"email": "a@example"}), fe("email", badEmail)},
		{"email with a space", registerBody(map[string]any{"email": "a b@example.com"}), fe("email", badEmail)},
		{"email with SQL", registerBody(map[string]any{"email": "x'--@example.com' OR 1=1"}), fe("email", badEmail)},
		{"email 255 characters", registerBody(map[string]any{"email": "a" + long254}), fe("email", "Ensure this field has no more than 254 characters.")},
		{"name missing", registerBody(map[string]any{"name": absent{}}), fe("name", required)},
		{"name only tags", registerBody(map[string]any{"name": "<script></script>"}), fe("name", blank)},
		{"name 151 characters", registerBody(map[string]any{"name": strings.Repeat("n", 151)}), fe("name", "Ensure this field has no more than 150 characters.")},
		{"name 151 characters after stripping", registerBody(map[string]any{"name": "<b>" + strings.Repeat("é", 151) + "</b>"}), fe("name", "Ensure this field has no more than 150 characters.")},
		{"password missing", registerBody(map[string]any{"password": absent{}, "password_confirm": absent{}}), fe("password", required)},
		{"password only spaces", registerBody(map[string]any{"password": "          ", "password_confirm": absent{}}), fe("password", blank)},
		{"password a number", registerBody(map[string]any{"password": 12345678, "password_confirm": absent{}}), fe("password", "Not a valid string.")},
		{"password too short", pw("Xq7!kd", "pwcheck_s", "pwcheck@example.org", "Pat Doe"), fe("password", tooShort)},
		{"password 7 characters of 2 bytes", pw("ééééééé", "pwcheck_s", "pwcheck@example.org", "Pat Doe"), fe("password", tooShort)},
		{"password entirely numeric", pw("4081957362", "pwcheck_d", "pwcheck@example.org", "Pat Doe"), fe("password", numeric)},
		{"password too common", pw("password123", "pwcheck_c", "pwcheck@example.org", "Pat Doe"), fe("password", common)},
		{"password too common, other case", pw("PassWord", "pwcheck_c", "pwcheck@example.org", "Pat Doe"), fe("password", common)},
		{"password common and numeric", pw("12345678", "pwcheck_c", "pwcheck@example.org", "Pat Doe"), fe("password", common, numeric)},
		{"password short, common and numeric", pw("1234", "pwcheck_c", "pwcheck@example.org", "Pat Doe"), fe("password", tooShort, common, numeric)},
		{"password too similar to the username", pw("JohnathanSmith7", "JohnathanSmith", "pwcheck@example.org", "Pat Doe"), fe("password", similarToUser)},
		{"password too similar to the username, other case", pw("JOHNATHANSMITH7", "johnathansmith", "pwcheck@example.org", "Pat Doe"), fe("password", similarToUser)},
		{"password too similar to the email address", pw("MargaretWilson!", "pwcheck_e", "margaretwilson@example.org", "Pat Doe"), fe("password", similarToMail)},
		{"password too similar to the whole email address", pw("ExampleOrg", "pwcheck_p", "pwcheck@example.org", "Pat Doe"), fe("password", similarToMail)},
		{"password too similar to the name", pw("Kingsley-Bartholomew", "pwcheck_n", "pwcheck@example.org", "Bartholomew Kingsley"), fe("password", similarToName)},
		{"password 1025 characters", registerBody(map[string]any{"password": strings.Repeat("Zq-", 341) + "Zq", "password_confirm": absent{}}),
			fe("password", "Ensure this field has no more than 1024 characters.")},
		{"password_confirm mismatch", registerBody(map[string]any{"password_confirm": "Velvet-Orchard-Compass-32"}), fe("password_confirm", "Passwords don't match.")},
		{"password_confirm differs in case", registerBody(map[string]any{"password_confirm": "velvet-orchard-compass-31"}), fe("password_confirm", "Passwords don't match.")},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			wantJSON(t, do(t, s, req{method: "POST", path: "/api/auth/register/", body: tc.body}), http.StatusBadRequest, tc.wantBody)
		})
	}
	var n int
	if err := testDB.QueryRowContext(t.Context(), `SELECT count(*) FROM users WHERE username LIKE 'admin%' OR username LIKE 'pwcheck%'`).Scan(&n); err != nil || n != 0 {
		t.Fatalf("refused registrations stored %d users (err %v)", n, err)
	}
}

func TestRegisterAccepts(t *testing.T) {
	s := newTestServer(t, nil)
	long150 := uniqueName("U")
	long150 += strings.Repeat("x", 150-len(long150))
	email254 := uniqueName("m")
	email254 += strings.Repeat("a", 64-len(email254)) + "@" + strings.Repeat("b", 63) + "." + strings.Repeat("c", 63) + "." + strings.Repeat("d", 57) + ".com"
	if len(email254) != 254 {
		t.Fatalf("test email has %d characters", len(email254))
	}
	tests := []struct {
		name              string
		changes           map[string]any
		wantName, wantKey string // wantKey: the field whose stored value is checked
		want              string
	}{
		{name: "username 150 characters", changes: map[string]any{"username": long150}, wantKey: "username", want: long150},
		{name: "unicode username", changes: map[string]any{"username": uniqueName("Zoë_Ärger.名前+x-@")}, wantKey: "username"},
		{name: "username trimmed", changes: map[string]any{"username": " " + uniqueName("trim") + " "}, wantKey: "username"},
		{name: "email 254 characters", changes: map[string]any{"email": email254}, wantKey: "email", want: email254},
		{name: "email lower-cased", changes: map[string]any{"email": "Mixed." + uniqueName("Case") + "@Example.COM"}, wantKey: "email"},
		{name: "name tags stripped", changes: map[string]any{"name": "<b>Doe</b>"}, wantKey: "name", want: "Doe"},
		{name: "name script stripped", changes: map[string]any{"name": `<script>alert(1)</script><img src=x onerror="alert(2)">Ann`}, wantKey: "name", want: "alert(1)Ann"},
		{name: "name not a tag kept", changes: map[string]any{"name": "  Tom <3 Jerry  "}, wantKey: "name", want: "Tom <3 Jerry"},
		{name: "name 150 characters", changes: map[string]any{"name": strings.Repeat("ñ", 150)}, wantKey: "name", want: strings.Repeat("ñ", 150)},
		{name: "password_confirm omitted", changes: map[string]any{"password_confirm": absent{}}},
		{name: "password 8 characters", changes: map[string]any{"password": "Gq8#vLm2", "password_confirm": "Gq8#vLm2"}},
		{name: "password 1024 characters", changes: map[string]any{"password": strings.Repeat("Zq-", 341) + "Z", "password_confirm": absent{}}},
		{name: "password 1024 two-byte characters", changes: map[string]any{"password": strings.Repeat("é", 1024), "password_confirm": absent{}}},
		{name: "password with spaces inside", changes: map[string]any{"password": "lantern in the fog", "password_confirm": "lantern in the fog"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			body := registerBody(tc.changes)
			res := do(t, s, req{method: "POST", path: "/api/auth/register/", body: body})
			if res.status != http.StatusCreated {
				t.Fatalf("status %d, want 201; body %s", res.status, res.body)
			}
			u, _ := res.object(t)["user"].(map[string]any)
			want := map[string]any{
				"username": strings.TrimSpace(body["username"].(string)),
				"email":    strings.ToLower(body["email"].(string)),
				"name":     body["name"],
			}
			if tc.want != "" {
				want[tc.wantKey] = tc.want
			}
			for k, v := range want {
				if u[k] != v {
					t.Errorf("%s = %q, want %q", k, u[k], v)
				}
			}
			if id, _ := u["id"].(float64); id <= 0 || len(u) != 4 {
				t.Errorf("user %v, want id, username, email, name", u)
			}
			loginPair(t, s, want["email"].(string), body["password"].(string))
			loginPair(t, s, want["username"].(string), body["password"].(string))
		})
	}
}

func TestRegisterUniqueness(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	carol := uniqueName("carol.") + "@example.net" // a username that looks like an email
	res := do(t, s, req{method: "POST", path: "/api/auth/register/", body: registerBody(map[string]any{"username": carol})})
	if res.status != http.StatusCreated {
		t.Fatalf("register %s: status %d; body %s", carol, res.status, res.body)
	}
	const (
		userTaken  = `{"username": ["A user with that username already exists."]}`
		emailTaken = `{"email": ["A user with that email already exists."]}`
		bothTaken  = `{"username": ["A user with that username already exists."], "email": ["A user with that email already exists."]}`
	)
	tests := []struct {
		name     string
		changes  map[string]any
		wantBody string
	}{
		{"same username", map[string]any{"username": a.username}, userTaken},
		{"username in upper case", map[string]any{"username": strings.ToUpper(a.username)}, userTaken},
		{"same email", map[string]any{"email": a.email}, emailTaken},
		{"email in upper case", map[string]any{"email": strings.ToUpper(a.email)}, emailTaken},
		{"both", map[string]any{"username": strings.ToUpper(a.username), "email": a.email}, bothTaken},
		{"username equal to another account's email", map[string]any{"username": a.email}, userTaken},
		{"username equal to another account's email, other case", map[string]any{"username": strings.ToUpper(a.email)}, userTaken},
		{"email equal to another account's username", map[string]any{"email": carol}, emailTaken},
		{"email equal to another account's username, other case", map[string]any{"email": strings.ToUpper(carol)}, emailTaken},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := do(t, s, req{method: "POST", path: "/api/auth/register/", body: registerBody(tc.changes)})
			wantJSON(t, res, http.StatusBadRequest, tc.wantBody)
		})
	}
	t.Run("own username as email", func(t *testing.T) {
		n := uniqueName("self") + "@example.com"
		res := do(t, s, req{method: "POST", path: "/api/auth/register/", body: registerBody(map[string]any{"username": n, "email": n})})
		if res.status != http.StatusCreated {
			t.Fatalf("status %d, want 201; body %s", res.status, res.body)
		}
		loginPair(t, s, strings.ToUpper(n), "Velvet-Orchard-Compass-31")
	})
	// Every login name still means the account that first had it.
	wantMe(t, s, loginPair(t, s, strings.ToUpper(a.email), a.password).Access, a)
	wantMe(t, s, loginPair(t, s, strings.ToUpper(a.username), a.password).Access, a)
}

func TestRegisterRace(t *testing.T) {
	s := newTestServer(t, nil)
	for _, n := range []int{2, 8} {
		t.Run(fmt.Sprintf("%d at once", n), func(t *testing.T) {
			rq := req{method: "POST", path: "/api/auth/register/", body: jsonText(registerBody(nil))}
			results := concurrently(t, s, slices.Repeat([]req{rq}, n))
			created := 0
			for _, res := range results {
				if res.status == http.StatusCreated {
					created++
					continue
				}
				// A loser hears about the username, and about the email when
				// it looked after the winner committed; never a 500.
				if res.status != http.StatusBadRequest {
					t.Fatalf("status %d, want 201 or 400; body %s", res.status, res.body)
				}
				got := res.object(t)
				if !jsonEqual(got["username"], []any{"A user with that username already exists."}) {
					t.Fatalf("body %s, want the username taken", res.body)
				}
				for k, v := range got {
					if k != "username" && (k != "email" || !jsonEqual(v, []any{"A user with that email already exists."})) {
						t.Fatalf("body %s: unexpected %s", res.body, k)
					}
				}
			}
			if created != 1 {
				t.Fatalf("%d registrations created, want exactly 1", created)
			}
			var users int
			var b map[string]any
			json.Unmarshal([]byte(rq.body.(string)), &b)
			if err := testDB.QueryRowContext(t.Context(), `SELECT count(*) FROM users WHERE username = $1`, b["username"]).Scan(&users); err != nil || users != 1 {
				t.Fatalf("%d users stored (err %v), want 1", users, err)
			}
		})
	}
}

func TestLogin(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	if res := do(t, s, req{method: "POST", path: "/api/auth/register/", body: registerBody(nil)}); res.status != http.StatusCreated {
		t.Fatalf("register: status %d; body %s", res.status, res.body)
	}
	if a.password == "Velvet-Orchard-Compass-31" {
		t.Fatalf("test accounts share a password")
	}
	registeredSID := tokenClaims(t, a.access)["sid"]
	t.Run("accepted", func(t *testing.T) {
		for _, tc := range []struct{ name, username string }{
			{"username", a.username},
			{"username in upper case", strings.ToUpper(a.username)},
			{"username with surrounding spaces", "  " + a.username + " "},
			{"email", a.email},
			{"email in upper case", strings.ToUpper(a.email)},
		} {
			t.Run(tc.name, func(t *testing.T) {
				runs := s.passwords.runs.Load()
				pair := loginPair(t, s, tc.username, a.password)
				if got := s.passwords.runs.Load() - runs; got != 1 {
					t.Errorf("%d password hashes for a login, want 1", got)
				}
				wantMe(t, s, pair.Access, a)
				if sid := tokenClaims(t, pair.Access)["sid"]; sid == registeredSID || sid != tokenClaims(t, pair.Refresh)["sid"] {
					t.Errorf("sid %v: want a new login shared by the pair", sid)
				}
			})
		}
	})
	t.Run("refused", func(t *testing.T) {
		for _, tc := range []struct{ name, username, password string }{
			{"wrong password", a.username, a.password + "x"},
			{"password in other case", a.username, strings.ToUpper(a.password)},
			{"password prefix", a.username, a.password[:len(a.password)-1]},
			{"password with a trailing space", a.username, a.password + " "},
			{"another user's password", a.username, "Velvet-Orchard-Compass-31"},
			{"unknown user", uniqueName("nobody"), a.password},
			{"unknown email", uniqueName("nobody") + "@example.com", a.password},
			{"SQL injection as username", "' OR '1'='1", "' OR '1'='1"},
			{"dummy hash's password for an unknown user", uniqueName("nobody"), "dummy password"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				runs := s.passwords.runs.Load()
				wantUnauthorized(t, login(t, s, tc.username, tc.password), badCredentialsBody)
				// The same work whether or not the account exists: exactly one
				// full hash, the dummy one for an unknown user.
				if got := s.passwords.runs.Load() - runs; got != 1 {
					t.Fatalf("%d password hashes, want exactly 1", got)
				}
			})
		}
	})
	t.Run("invalid", func(t *testing.T) {
		for _, tc := range []struct {
			name     string
			body     any
			wantBody string
		}{
			{"empty body", nil, `{"username": ["This field is required."], "password": ["This field is required."]}`},
			{"password missing", map[string]any{"username": a.username}, `{"password": ["This field is required."]}`},
			{"blank", map[string]any{"username": "", "password": ""}, `{"username": ["This field may not be blank."], "password": ["This field may not be blank."]}`},
			{"password a number", map[string]any{"username": a.username, "password": 1}, `{"password": ["Not a valid string."]}`},
		} {
			t.Run(tc.name, func(t *testing.T) {
				runs := s.passwords.runs.Load()
				wantJSON(t, do(t, s, req{method: "POST", path: "/api/auth/login/", body: tc.body}), http.StatusBadRequest, tc.wantBody)
				if got := s.passwords.runs.Load() - runs; got != 0 {
					t.Fatalf("%d password hashes for an invalid body, want 0", got)
				}
			})
		}
	})
}

// Django-format hashes computed outside this code base, with Python's
// hashlib, as Django's PBKDF2PasswordHasher does:
//
//	python3 -c "import hashlib,base64; print(base64.b64encode(hashlib.pbkdf2_hmac('sha256', b'correct horse battery staple', b'hV3kQp9ZsL2mWx7RtY4bNc', 600000, 32)).decode())"
//	→ QX1YEO/cXCkesaI8ZLOEjrXpul6CHkkxakzFUJJl020=
//	python3 -c "import hashlib,base64; print(base64.b64encode(hashlib.pbkdf2_hmac('sha256', 'pässwörd-ünïcode-42'.encode(), b'Uc7rTe2WqY9pLo3KjH5gFd', 600000, 32)).decode())"
//	→ qXIj5kPO0Ugfv4u7QzsVazXMsWeQMzhA0hSUgtXPZZQ=
//	python3 -c "import hashlib,base64; print(base64.b64encode(hashlib.pbkdf2_hmac('sha256', b'Tr0ub4dor&3-legacy', b'Lg5tNb8QaZ1xCv6MkP0dRw', 260000, 32)).decode())"
//	→ HjhA7GRVMsfRfWWk00Kp+ZtdzD6akDvOCwBgCV5MrcE=
//
// 600,000 is Django 5's iteration count; 260,000 Django 3.2's.
const (
	djangoPassword    = "correct horse battery staple"
	djangoHash600k    = "pbkdf2_sha256$600000$hV3kQp9ZsL2mWx7RtY4bNc$QX1YEO/cXCkesaI8ZLOEjrXpul6CHkkxakzFUJJl020="
	djangoUnicodePass = "pässwörd-ünïcode-42"
	djangoUnicode600k = "pbkdf2_sha256$600000$Uc7rTe2WqY9pLo3KjH5gFd$qXIj5kPO0Ugfv4u7QzsVazXMsWeQMzhA0hSUgtXPZZQ="
	djangoLegacyPass  = "Tr0ub4dor&3-legacy"
	djangoLegacy260k  = "pbkdf2_sha256$260000$Lg5tNb8QaZ1xCv6MkP0dRw$HjhA7GRVMsfRfWWk00Kp+ZtdzD6akDvOCwBgCV5MrcE="
)

func TestPasswordDjangoHashes(t *testing.T) {
	s := newTestServer(t, nil, slowHashes)
	for _, tc := range []struct {
		name, password, hash, wrong string
	}{
		{"600,000 iterations", djangoPassword, djangoHash600k, "correct horse battery stapl"},
		{"unicode password", djangoUnicodePass, djangoUnicode600k, ""},
		{"260,000 iterations", djangoLegacyPass, djangoLegacy260k, "tr0ub4dor&3-legacy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			name := uniqueName("django")
			id := insertUser(t, name, name+"@example.com", tc.hash)
			a := account{id: id}
			wantMe(t, s, loginPair(t, s, name, tc.password).Access, a)
			// More iterations than the server's own: verified at the hash's
			// count and kept, never re-hashed downwards.
			if got := storedHash(t, id); got != tc.hash {
				t.Fatalf("stored hash changed to %q", got)
			}
			if tc.wrong != "" {
				wantUnauthorized(t, login(t, s, name, tc.wrong), badCredentialsBody)
			}
		})
	}
}

func TestPasswordRealIterations(t *testing.T) {
	s := newTestServer(t, nil, slowHashes, func(c *config) { c.passwordIterations = minIterations })
	a := register(t, s)
	stored := storedHash(t, a.id)
	if n := hashIterations(t, stored); n != 600_000 {
		t.Fatalf("stored hash %q has %d iterations, want 600000", stored, n)
	}
	if salt := strings.Split(stored, "$")[2]; len(salt) < 26 || strings.Trim(salt, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") != "" {
		t.Fatalf("salt %q, want at least 26 characters (128 bits) of Django's alphabet", salt)
	}
	wantMe(t, s, loginPair(t, s, a.username, a.password).Access, a)

	t.Run("Django 3.2 hash upgraded", func(t *testing.T) {
		name := uniqueName("legacy")
		id := insertUser(t, name, name+"@example.com", djangoLegacy260k)
		wantMe(t, s, loginPair(t, s, name, djangoLegacyPass).Access, account{id: id})
		upgraded := storedHash(t, id)
		if n := hashIterations(t, upgraded); n != 600_000 {
			t.Fatalf("stored hash %q has %d iterations after login, want 600000", upgraded, n)
		}
	})
}

func TestPasswordRehash(t *testing.T) {
	s := newTestServer(t, nil)
	const password = "Saffron-Kettle-Drum-88"
	t.Run("fewer iterations upgraded", func(t *testing.T) {
		name := uniqueName("rehash")
		old := djangoHash(t, password, "OldSaltOldSaltOldSalt0", testIterations/2)
		id := insertUser(t, name, name+"@example.com", old)
		wantUnauthorized(t, login(t, s, name, password+"!"), badCredentialsBody)
		if got := storedHash(t, id); got != old {
			t.Fatalf("a failed login changed the hash to %q", got)
		}
		wantMe(t, s, loginPair(t, s, name, password).Access, account{id: id})
		upgraded := storedHash(t, id)
		if n := hashIterations(t, upgraded); n != testIterations {
			t.Fatalf("stored hash %q has %d iterations, want %d", upgraded, n, testIterations)
		}
		salt := strings.Split(upgraded, "$")[2]
		if salt == "OldSaltOldSaltOldSalt0" {
			t.Errorf("re-hash kept the old salt")
		}
		if want := djangoHash(t, password, salt, testIterations); upgraded != want {
			t.Fatalf("upgraded hash %q, want %q", upgraded, want)
		}
		wantMe(t, s, loginPair(t, s, name, password).Access, account{id: id})
		if got := storedHash(t, id); got != upgraded {
			t.Fatalf("second login re-hashed again: %q", got)
		}
	})
	t.Run("more iterations kept", func(t *testing.T) {
		name := uniqueName("rehash")
		stored := djangoHash(t, password, "NewerDjangoSaltAbCdEf1", testIterations*3)
		id := insertUser(t, name, name+"@example.com", stored)
		runs := s.passwords.runs.Load()
		wantMe(t, s, loginPair(t, s, name, password).Access, account{id: id})
		if got := s.passwords.runs.Load() - runs; got != 1 {
			t.Errorf("%d hashes, want 1 (no re-hash)", got)
		}
		if got := storedHash(t, id); got != stored {
			t.Fatalf("stored hash changed to %q", got)
		}
	})
	t.Run("fresh salt per password", func(t *testing.T) {
		a, b := register(t, s), register(t, s)
		ha, hb := storedHash(t, a.id), storedHash(t, b.id)
		if strings.Split(ha, "$")[2] == strings.Split(hb, "$")[2] {
			t.Fatalf("two hashes share a salt: %q, %q", ha, hb)
		}
	})
}

// A stored value that is no usable pbkdf2_sha256 hash (Django's unusable
// "!…" password, another hasher, a damaged row) matches no password; the
// login is refused like any wrong password, not a server error.
func TestPasswordUnusableHash(t *testing.T) {
	s := newTestServer(t, nil)
	for _, tc := range []struct{ name, hash string }{
		{"Django unusable password", "!Tq3yX8vNcR2mWp5LkJ7hGf4dS1aZ0oIuYtReWq9B"},
		{"argon2", "argon2$argon2id$v=19$m=102400,t=2,p=8$c29tZXNhbHQ$aGFzaA"},
		{"short key", "pbkdf2_sha256$1000$salt$" + base64.StdEncoding.EncodeToString([]byte("short"))},
		{"no salt", djangoHash(t, "x", "", 1000)},
		{"empty", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			name := uniqueName("unusable")
			insertUser(t, name, name+"@example.com", tc.hash)
			for _, password := range []string{"dummy password", tc.hash + "!"} {
				runs := s.passwords.runs.Load()
				wantUnauthorized(t, login(t, s, name, password), badCredentialsBody)
				// The dummy hash ran: such an account costs what any does.
				if got := s.passwords.runs.Load() - runs; got != 1 {
					t.Fatalf("%d password hashes, want exactly 1", got)
				}
			}
		})
	}
}

// moveRotation pretends a refresh token was rotated long ago.
func moveRotation(t testing.TB, token string, ago time.Duration) {
	t.Helper()
	needDB(t)
	const q = `UPDATE refresh_tokens SET rotated_at = rotated_at - make_interval(secs => $2) WHERE jti = $1 AND rotated_at IS NOT NULL`
	res, err := testDB.ExecContext(t.Context(), q, tokenClaims(t, token)["jti"], ago.Seconds())
	if err != nil {
		t.Fatalf("move rotation: %v", err)
	}
	if n, _ := res.RowsAffected(); n != 1 {
		t.Fatalf("move rotation: %d rows, want 1 rotated token", n)
	}
}

func TestTokenRefresh(t *testing.T) {
	s := newTestServer(t, nil)
	t.Run("rotation", func(t *testing.T) {
		a := register(t, s)
		pair := pairOf(t, refresh(t, s, a.refresh))
		if pair.Refresh == a.refresh || pair.Access == a.access {
			t.Fatalf("refresh returned the old tokens")
		}
		if tokenClaims(t, pair.Refresh)["sid"] != tokenClaims(t, a.refresh)["sid"] || claimInt(t, tokenClaims(t, pair.Access), "user_id") != a.id {
			t.Fatalf("new pair does not continue the login")
		}
		wantMe(t, s, pair.Access, a)
		wantMe(t, s, a.access, a) // the old access token lives out its 15 minutes
		next := pairOf(t, refresh(t, s, pair.Refresh))
		wantMe(t, s, next.Access, a)
	})
	t.Run("invalid body", func(t *testing.T) {
		for _, tc := range []struct {
			name     string
			body     any
			wantBody string
		}{
			{"no body", nil, `{"refresh": ["This field is required."]}`},
			{"field missing", map[string]any{"access": "x"}, `{"refresh": ["This field is required."]}`},
			{"field in other case", map[string]any{"Refresh": register(t, s).refresh}, `{"refresh": ["This field is required."]}`},
			{"blank", map[string]any{"refresh": ""}, `{"refresh": ["This field may not be blank."]}`},
			{"null", map[string]any{"refresh": nil}, `{"refresh": ["This field may not be null."]}`},
			{"a number", map[string]any{"refresh": 1}, `{"refresh": ["Not a valid string."]}`},
		} {
			t.Run(tc.name, func(t *testing.T) {
				wantJSON(t, do(t, s, req{method: "POST", path: "/api/auth/token/refresh/", body: tc.body}), http.StatusBadRequest, tc.wantBody)
			})
		}
	})
	t.Run("invalid token", func(t *testing.T) {
		a := register(t, s)
		rc := tokenClaims(t, a.refresh)
		var unknownJTI [16]byte
		rand.Read(unknownJTI[:])
		for _, tc := range []struct{ name, token string }{
			{"garbage", "garbage"},
			{"access token", a.access},
			{"wrong key", forge(hs256Header, payloadWith(t, rc, nil), otherKey)},
			{"alg none", seg(`{"alg":"none","typ":"JWT"}`) + "." + strings.Split(a.refresh, ".")[1] + "."},
			{"extra header field", forge(`{"alg":"HS256","typ":"JWT","kid":"x"}`, payloadWith(t, rc, nil), testSecret)},
			{"expired", forge(hs256Header, payloadWith(t, rc, map[string]any{"exp": time.Now().Unix() - 1}), testSecret)},
			{"tampered, old signature", strings.Join([]string{strings.Split(a.refresh, ".")[0],
				seg(payloadWith(t, rc, map[string]any{"exp": time.Now().Unix() + 86400*30})), strings.Split(a.refresh, ".")[2]}, ".")},
			{"validly signed, never issued", forge(hs256Header, payloadWith(t, rc, map[string]any{"jti": hex.EncodeToString(unknownJTI[:])}), testSecret)},
			{"validly signed, other login", forge(hs256Header, payloadWith(t, rc, map[string]any{"sid": tokenClaims(t, register(t, s).refresh)["sid"]}), testSecret)},
			{"missing sid", forge(hs256Header, payloadWith(t, rc, map[string]any{"sid": absent{}}), testSecret)},
			{"over 4096 bytes", forge(hs256Header, payloadWith(t, rc, map[string]any{"pad": strings.Repeat("x", 4096)}), testSecret)},
		} {
			t.Run(tc.name, func(t *testing.T) {
				wantUnauthorized(t, refresh(t, s, tc.token), refreshInvalidBody)
			})
		}
		// None of that spent the real token.
		wantMe(t, s, pairOf(t, refresh(t, s, a.refresh)).Access, a)
	})
	t.Run("reuse inside the grace window", func(t *testing.T) {
		a := register(t, s)
		pair := pairOf(t, refresh(t, s, a.refresh))
		wantUnauthorized(t, refresh(t, s, a.refresh), blacklistedBody)
		wantUnauthorized(t, refresh(t, s, a.refresh), blacklistedBody)
		// Two tabs refreshing at once: the login goes on.
		wantMe(t, s, pair.Access, a)
		next := pairOf(t, refresh(t, s, pair.Refresh))
		wantMe(t, s, next.Access, a)
	})
	t.Run("reuse after the grace window", func(t *testing.T) {
		a := register(t, s)
		other := loginPair(t, s, a.username, a.password)
		pair := pairOf(t, refresh(t, s, a.refresh))
		moveRotation(t, a.refresh, 11*time.Second)
		wantUnauthorized(t, refresh(t, s, a.refresh), blacklistedBody)
		// Reuse detection: the thief's and the owner's tokens of that login
		// are all dead.
		wantUnauthorized(t, me(t, s, pair.Access), invalidAccessBody)
		wantUnauthorized(t, me(t, s, a.access), invalidAccessBody)
		wantUnauthorized(t, refresh(t, s, pair.Refresh), blacklistedBody)
		wantUnauthorized(t, refresh(t, s, a.refresh), blacklistedBody)
		// The user's other login is untouched.
		wantMe(t, s, other.Access, a)
		wantMe(t, s, pairOf(t, refresh(t, s, other.Refresh)).Access, a)
	})
	t.Run("reuse with no grace window", func(t *testing.T) {
		s := newTestServer(t, nil, func(c *config) { c.reuseGrace = 0 })
		a := register(t, s)
		pair := pairOf(t, refresh(t, s, a.refresh))
		wantUnauthorized(t, refresh(t, s, a.refresh), blacklistedBody)
		wantUnauthorized(t, me(t, s, pair.Access), invalidAccessBody)
		wantUnauthorized(t, refresh(t, s, pair.Refresh), blacklistedBody)
	})
	t.Run("an older generation reused", func(t *testing.T) {
		a := register(t, s)
		first := pairOf(t, refresh(t, s, a.refresh))
		second := pairOf(t, refresh(t, s, first.Refresh))
		moveRotation(t, a.refresh, time.Minute)
		wantUnauthorized(t, refresh(t, s, a.refresh), blacklistedBody)
		wantUnauthorized(t, me(t, s, second.Access), invalidAccessBody)
		wantUnauthorized(t, refresh(t, s, second.Refresh), blacklistedBody)
	})
	t.Run("expired in the database", func(t *testing.T) {
		a := register(t, s)
		if _, err := testDB.ExecContext(t.Context(), `UPDATE refresh_tokens SET expires_at = now() - interval '1 second' WHERE jti = $1`,
			tokenClaims(t, a.refresh)["jti"]); err != nil {
			t.Fatalf("expire token: %v", err)
		}
		wantUnauthorized(t, refresh(t, s, a.refresh), refreshInvalidBody)
		wantMe(t, s, a.access, a)
	})
}

func TestTokenRefreshRace(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	const n = 10
	rq := req{method: "POST", path: "/api/auth/token/refresh/", body: jsonText(map[string]string{"refresh": a.refresh})}
	results := concurrently(t, s, slices.Repeat([]req{rq}, n))
	var winner tokenPair
	won := 0
	for _, res := range results {
		if res.status == http.StatusOK {
			won++
			winner = pairOf(t, res)
			continue
		}
		wantUnauthorized(t, res, blacklistedBody)
	}
	if won != 1 {
		t.Fatalf("%d refreshes succeeded, want exactly 1", won)
	}
	// Losers inside the grace window did not end the login.
	wantMe(t, s, winner.Access, a)
	pairOf(t, refresh(t, s, winner.Refresh))
	var issued int
	const q = `SELECT count(*) FROM refresh_tokens WHERE login_id = $1`
	if err := testDB.QueryRowContext(t.Context(), q, tokenClaims(t, a.refresh)["sid"]).Scan(&issued); err != nil || issued != 3 {
		t.Fatalf("%d refresh tokens recorded for the login (err %v), want 3", issued, err)
	}
}

func TestLogout(t *testing.T) {
	s := newTestServer(t, nil)
	t.Run("ends the login", func(t *testing.T) {
		a := register(t, s)
		other := loginPair(t, s, a.username, a.password)
		wantNoContent(t, logout(t, s, a.refresh))
		wantUnauthorized(t, me(t, s, a.access), invalidAccessBody)
		wantUnauthorized(t, refresh(t, s, a.refresh), blacklistedBody)
		// Only that login: another one of the same user goes on.
		wantMe(t, s, other.Access, a)
		wantMe(t, s, pairOf(t, refresh(t, s, other.Refresh)).Access, a)
		// Logging out an ended login is fine.
		wantNoContent(t, logout(t, s, a.refresh))
	})
	t.Run("with a rotated refresh token", func(t *testing.T) {
		a := register(t, s)
		pair := pairOf(t, refresh(t, s, a.refresh))
		wantNoContent(t, logout(t, s, a.refresh))
		wantUnauthorized(t, me(t, s, pair.Access), invalidAccessBody)
		wantUnauthorized(t, refresh(t, s, pair.Refresh), blacklistedBody)
		wantNoContent(t, logout(t, s, pair.Refresh))
	})
	t.Run("refused tokens", func(t *testing.T) {
		a := register(t, s)
		rc := tokenClaims(t, a.refresh)
		var unknownJTI [16]byte
		rand.Read(unknownJTI[:])
		for _, tc := range []struct{ name, token string }{
			{"garbage", "garbage"},
			{"access token", a.access},
			{"wrong key", forge(hs256Header, payloadWith(t, rc, nil), otherKey)},
			{"alg none", forge(`{"alg":"none","typ":"JWT"}`, payloadWith(t, rc, nil), testSecret)},
			{"validly signed, never issued", forge(hs256Header, payloadWith(t, rc, map[string]any{"jti": hex.EncodeToString(unknownJTI[:])}), testSecret)},
			{"validly signed, another user's login", forge(hs256Header, payloadWith(t, rc, map[string]any{"sid": tokenClaims(t, register(t, s).refresh)["sid"]}), testSecret)},
			{"user_id of another user", forge(hs256Header, payloadWith(t, rc, map[string]any{"user_id": register(t, s).id}), testSecret)},
		} {
			t.Run(tc.name, func(t *testing.T) {
				wantUnauthorized(t, logout(t, s, tc.token), refreshInvalidBody)
			})
		}
		wantJSON(t, do(t, s, req{method: "POST", path: "/api/auth/logout/", body: map[string]any{}}), http.StatusBadRequest,
			`{"refresh": ["This field is required."]}`)
		// None of that ended the login.
		wantMe(t, s, a.access, a)
	})
	t.Run("with an expired refresh token", func(t *testing.T) {
		// The victim's own token has expired; it still ends the login a
		// thief keeps alive with a stolen, rotated copy.
		a := register(t, s)
		stolen := pairOf(t, refresh(t, s, a.refresh))
		expired := forge(hs256Header, payloadWith(t, tokenClaims(t, a.refresh), map[string]any{"exp": time.Now().Unix() - 1}), testSecret)
		wantNoContent(t, logout(t, s, expired))
		wantUnauthorized(t, me(t, s, stolen.Access), invalidAccessBody)
		wantUnauthorized(t, refresh(t, s, stolen.Refresh), blacklistedBody)
	})
	t.Run("on another instance", func(t *testing.T) {
		other := newTestServer(t, nil)
		a := register(t, s)
		wantMe(t, other, a.access, a)
		wantNoContent(t, logout(t, other, a.refresh))
		wantUnauthorized(t, me(t, s, a.access), invalidAccessBody)
		wantUnauthorized(t, refresh(t, s, a.refresh), blacklistedBody)
	})
}

func TestAuthLoginRateLimit(t *testing.T) {
	const ip, otherIP = "203.0.113.5:4000", "198.51.100.9:4000"
	loginFrom := func(t *testing.T, s http.Handler, addr, name, password string) response {
		t.Helper()
		return do(t, s, req{method: "POST", path: "/api/auth/login/", remoteAddr: addr,
			body: map[string]string{"username": name, "password": password}})
	}
	t.Run("failures count, successes give theirs back", func(t *testing.T) {
		s := newTestServer(t, map[string]string{"RATE_LOGIN": "3/hour"})
		a := register(t, s)
		wantUnauthorized(t, loginFrom(t, s, ip, a.username, "wrong-1"), badCredentialsBody)
		wantUnauthorized(t, loginFrom(t, s, ip, uniqueName("ghost"), "wrong-2"), badCredentialsBody)
		for range 5 {
			pairOf(t, loginFrom(t, s, ip, a.username, a.password))
		}
		wantUnauthorized(t, loginFrom(t, s, ip, a.username, "wrong-3"), badCredentialsBody)
		// Over the limit: even the right password is refused, without a hash.
		runs := s.passwords.runs.Load()
		wantThrottled(t, loginFrom(t, s, ip, a.username, a.password), anyWait)
		wantThrottled(t, loginFrom(t, s, ip, a.username, "wrong-4"), anyWait)
		if got := s.passwords.runs.Load() - runs; got != 0 {
			t.Errorf("%d hashes for throttled logins, want 0", got)
		}
		// Another address has its own budget.
		pairOf(t, loginFrom(t, s, otherIP, a.username, a.password))
		wantUnauthorized(t, loginFrom(t, s, otherIP, a.username, "wrong"), badCredentialsBody)
	})
	t.Run("concurrent guesses", func(t *testing.T) {
		s := newTestServer(t, map[string]string{"RATE_LOGIN": "3/hour"})
		a := register(t, s)
		const n = 10
		rqs := make([]req, n)
		for i := range rqs {
			rqs[i] = req{method: "POST", path: "/api/auth/login/", remoteAddr: ip,
				body: fmt.Sprintf(`{"username": %q, "password": "guess-%d"}`, a.username, i)}
		}
		results := concurrently(t, s, rqs)
		answered := 0
		for _, res := range results {
			if res.status == http.StatusTooManyRequests {
				wantThrottled(t, res, anyWait)
				continue
			}
			answered++
			wantUnauthorized(t, res, badCredentialsBody)
		}
		if answered > 3 {
			t.Fatalf("%d guesses answered, want at most 3", answered)
		}
		wantThrottled(t, loginFrom(t, s, ip, a.username, a.password), anyWait)
	})
}

func TestAuthRegisterRateLimit(t *testing.T) {
	s := newTestServer(t, map[string]string{"RATE_REGISTER": "2/hour"})
	const ip, otherIP = "203.0.113.6:4000", "[2001:db8:1:2::7]:4000"
	registerFrom := func(addr string, body any) response {
		return do(t, s, req{method: "POST", path: "/api/auth/register/", remoteAddr: addr, body: body})
	}
	if res := registerFrom(ip, registerBody(nil)); res.status != http.StatusCreated {
		t.Fatalf("first registration: status %d; body %s", res.status, res.body)
	}
	wantJSON(t, registerFrom(ip, map[string]any{"username": "x"}), http.StatusBadRequest,
		`{"email": ["This field is required."], "name": ["This field is required."], "password": ["This field is required."]}`)
	// Every POST counts, valid or not.
	wantThrottled(t, registerFrom(ip, "not even JSON"), anyWait)
	wantThrottled(t, registerFrom(ip, registerBody(nil)), anyWait)
	if res := registerFrom(otherIP, registerBody(nil)); res.status != http.StatusCreated {
		t.Fatalf("another address: status %d; body %s", res.status, res.body)
	}
	// Logins are not registrations.
	a := register(t, s)
	pairOf(t, do(t, s, req{method: "POST", path: "/api/auth/login/", remoteAddr: ip,
		body: map[string]string{"username": a.username, "password": a.password}}))
}

// TestUnverifiableHashCostsNothing: a stored value the server cannot verify
// (more than 10,000,000 iterations, another hasher, malformed) never logs in
// and never raises failCost, at start or when a login meets it: no failed
// login is padded beyond PASSWORD_ITERATIONS for its sake. A verifiable
// hash of more iterations does raise it.
func TestUnverifiableHashCostsNothing(t *testing.T) {
	ctx := t.Context()
	db := scratchDB(t, "_unverifiable", -1)
	s := newTestServerOn(t, db, slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	dk := base64.StdEncoding.EncodeToString(make([]byte, 32))
	add := func(name, hash string) {
		t.Helper()
		const q = `WITH u AS (INSERT INTO users (username, email, name, password) VALUES ($1::text, $1::text || '@example.com', 'U', $2) RETURNING id)
			INSERT INTO login_names (name, user_id) SELECT n, id FROM u, unnest(ARRAY[$1::text, $1::text || '@example.com']) n`
		if _, err := db.ExecContext(ctx, q, name, hash); err != nil {
			t.Fatal(err)
		}
	}
	odd := map[string]string{"huge": "pbkdf2_sha256$99999999$SaltSaltSalt$" + dk, "over": "pbkdf2_sha256$10000001$SaltSaltSalt$" + dk,
		"argon": "argon2$argon2id$v=19$m=102400,t=2,p=8$c2FsdA$aGFzaA", "short": "pbkdf2_sha256$700000$SaltSaltSalt$AAAA", "bang": "!unusable"}
	for name, hash := range odd {
		add(name, hash)
	}
	if err := s.passwords.raiseFailCost(ctx, db); err != nil || s.passwords.failCost.Load() != testIterations {
		t.Fatalf("failCost at start %d (%v), want PASSWORD_ITERATIONS %d", s.passwords.failCost.Load(), err, testIterations)
	}
	for name := range odd {
		runs := s.passwords.runs.Load()
		wantUnauthorized(t, login(t, s, name, "any password at all"), badCredentialsBody)
		if got, cost := s.passwords.runs.Load()-runs, s.passwords.failCost.Load(); got != 1 || cost != testIterations {
			t.Fatalf("a login on %q: %d hashes, failCost %d; want 1 and %d", name, got, cost, testIterations)
		}
	}
	add("costlier", djangoHash(t, "the right password", "SaltSaltSaltSaltSalt02", 2*testIterations))
	if err := s.passwords.raiseFailCost(ctx, db); err != nil || s.passwords.failCost.Load() != 2*testIterations {
		t.Fatalf("failCost with a verifiable costlier hash %d (%v), want %d", s.passwords.failCost.Load(), err, 2*testIterations)
	}
}

func TestAuthHashingBound(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	for range cap(s.passwords.slots) {
		s.passwords.slots <- struct{}{}
	}
	s.passwords.maxWait = 10 * time.Millisecond
	t.Run("login", func(t *testing.T) { wantUnavailable(t, login(t, s, a.username, a.password)) })
	t.Run("unknown user", func(t *testing.T) { wantUnavailable(t, login(t, s, uniqueName("ghost"), a.password)) })
	t.Run("register", func(t *testing.T) {
		body := registerBody(nil)
		wantUnavailable(t, do(t, s, req{method: "POST", path: "/api/auth/register/", body: body}))
		// Nothing was stored: the same registration works once a slot is free.
		<-s.passwords.slots
		if res := do(t, s, req{method: "POST", path: "/api/auth/register/", body: body}); res.status != http.StatusCreated {
			t.Fatalf("register after the wait: status %d; body %s", res.status, res.body)
		}
		s.passwords.slots <- struct{}{}
	})
	// Requests that need no hash are not held up.
	wantMe(t, s, a.access, a)
	pairOf(t, refresh(t, s, a.refresh))
	for range cap(s.passwords.slots) {
		<-s.passwords.slots
	}
	pairOf(t, login(t, s, a.username, a.password))
}

// TestEndedLoginRefusedEverywhere logs out and then calls every
// authenticated route with the login's still-unexpired access token, with
// requests that would otherwise succeed and with ones that would otherwise
// be refused later in the order of checks (403, 404, 400, 415, 409): every
// answer must be the 401. The login check rides along in each handler's own
// query, so this pins every handler to making it.
func TestEndedLoginRefusedEverywhere(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	other := register(t, s)
	patient, _ := mustCreate(t, s, a.access, "/api/patients/", map[string]any{"first_name": "Ended", "email": uniqueName("ended") + "@example.com"})
	doctor, _ := mustCreate(t, s, a.access, "/api/doctors/", map[string]any{"first_name": "Ended", "email": uniqueName("ended") + "@example.com", "specialization": "Surgery"})
	othersDoctor, _ := mustCreate(t, s, other.access, "/api/doctors/", map[string]any{"first_name": "Other", "email": uniqueName("other") + "@example.com", "specialization": "Surgery"})
	mapping, _ := mustCreate(t, s, a.access, "/api/mappings/", map[string]any{"patient": patient, "doctor": doctor})
	if res := logout(t, s, a.refresh); res.status != http.StatusNoContent {
		t.Fatalf("logout: %d %s", res.status, res.body)
	}
	p, d, od, m := fmt.Sprint(patient), fmt.Sprint(doctor), fmt.Sprint(othersDoctor), fmt.Sprint(mapping)
	newPatient := map[string]any{"first_name": "New", "email": uniqueName("new") + "@example.com"}
	newDoctor := map[string]any{"first_name": "New", "email": uniqueName("new") + "@example.com", "specialization": "Surgery"}
	cases := []struct {
		name         string
		method, path string
		body         any
		header       map[string]string
	}{
		{"me", "GET", "/api/auth/me/", nil, nil},
		{"list patients", "GET", "/api/patients/", nil, nil},
		{"list patients, page past the end", "GET", "/api/patients/?page=9", nil, nil},
		{"create patient", "POST", "/api/patients/", newPatient, nil},
		{"get patient", "GET", "/api/patients/" + p + "/", nil, nil},
		{"get unknown patient", "GET", "/api/patients/999999999/", nil, nil},
		{"put patient", "PUT", "/api/patients/" + p + "/", map[string]any{"first_name": "X", "email": "x@example.com"}, nil},
		{"patch patient", "PATCH", "/api/patients/" + p + "/", map[string]any{"last_name": "X"}, nil},
		{"delete patient", "DELETE", "/api/patients/" + p + "/", nil, nil},
		{"list doctors", "GET", "/api/doctors/", nil, nil},
		{"create doctor", "POST", "/api/doctors/", newDoctor, nil},
		{"get doctor", "GET", "/api/doctors/" + d + "/", nil, nil},
		{"patch doctor", "PATCH", "/api/doctors/" + d + "/", map[string]any{"last_name": "X"}, nil},
		{"patch another's doctor", "PATCH", "/api/doctors/" + od + "/", map[string]any{"last_name": "X"}, nil},
		{"delete assigned doctor", "DELETE", "/api/doctors/" + d + "/", nil, nil},
		{"list mappings", "GET", "/api/mappings/", nil, nil},
		{"create mapping", "POST", "/api/mappings/", map[string]any{"patient": patient, "doctor": othersDoctor}, nil},
		{"create duplicate mapping", "POST", "/api/mappings/", map[string]any{"patient": patient, "doctor": doctor}, nil},
		{"patient's mappings", "GET", "/api/mappings/" + p + "/", nil, nil},
		{"delete mapping", "DELETE", "/api/mappings/" + m + "/", nil, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res := do(t, s, req{method: tc.method, path: tc.path, token: a.access, body: tc.body, header: tc.header})
			wantUnauthorized(t, res, invalidAccessBody)
		})
	}
	// Refused before any statement runs, a request gets that answer: it
	// shows nothing (contract v4, order of checks).
	before := []struct {
		name, method, path string
		body               any
		header             map[string]string
		status             int
		want               string
	}{
		{"bad ordering", "GET", "/api/patients/?ordering=nope", nil, nil, 400, `{"ordering": ["Invalid ordering field \"nope\"."]}`},
		{"invalid body", "POST", "/api/patients/", map[string]any{"first_name": "", "email": "x@example.com"}, nil, 400, `{"first_name": ["This field may not be blank."]}`},
		{"text/plain", "POST", "/api/patients/", "x", map[string]string{"Content-Type": "text/plain"}, 415, `{"detail": "Unsupported media type \"text/plain\" in request."}`},
		{"malformed patient id", "GET", "/api/patients/abc/", nil, nil, 404, bodyNotFound},
		{"malformed patient id, PATCH", "PATCH", "/api/patients/0/", map[string]any{"last_name": "X"}, nil, 404, bodyNotFound},
		{"malformed doctor id, PUT", "PUT", "/api/doctors/-1/", newDoctor, nil, 404, bodyNotFound},
		{"malformed doctor id, DELETE", "DELETE", "/api/doctors/99999999999999999999/", nil, nil, 404, bodyNotFound},
		{"malformed patient id of mappings", "GET", "/api/mappings/x/", nil, nil, 404, bodyNotFound},
		{"malformed mapping id", "DELETE", "/api/mappings/1.5/", nil, nil, 404, bodyNotFound},
	}
	for _, tc := range before {
		t.Run("refused first: "+tc.name, func(t *testing.T) {
			wantJSON(t, do(t, s, req{method: tc.method, path: tc.path, token: a.access, body: tc.body, header: tc.header}), tc.status, tc.want)
		})
	}
	// Nothing was changed by the refused requests.
	b := loginPair(t, s, a.username, a.password)
	res := do(t, s, req{method: "GET", path: "/api/mappings/" + p + "/", token: b.Access})
	if res.status != http.StatusOK || len(res.json(t).([]any)) != 1 {
		t.Fatalf("after refusals: %d %s", res.status, res.body)
	}
}

// TestLogoutAll: one request ends every login of the caller, the asking one
// included, and no other user's.
func TestLogoutAll(t *testing.T) {
	s := newTestServer(t, nil)
	a, other := register(t, s), register(t, s)
	second := loginPair(t, s, a.username, a.password)
	wantUnauthorized(t, do(t, s, req{method: "POST", path: "/api/auth/logout/all/"}), bodyUnauthenticated)
	wantNoContent(t, do(t, s, req{method: "POST", path: "/api/auth/logout/all/", token: second.Access}))
	for _, token := range []string{a.access, second.Access} {
		wantUnauthorized(t, me(t, s, token), invalidAccessBody)
	}
	for _, token := range []string{a.refresh, second.Refresh} {
		wantUnauthorized(t, refresh(t, s, token), blacklistedBody)
	}
	wantUnauthorized(t, do(t, s, req{method: "POST", path: "/api/auth/logout/all/", token: second.Access}), invalidAccessBody)
	wantMe(t, s, other.access, other)
	wantMe(t, s, loginPair(t, s, a.username, a.password).Access, a)
}

// TestPasswordChange: the new password logs in, the old one does not, every
// earlier login ends, a wrong old password counts against the login limit,
// and the new password meets the register validators.
func TestPasswordChange(t *testing.T) {
	s := newTestServer(t, map[string]string{"RATE_LOGIN": "3/hour"})
	change := func(token string, body any) response {
		return do(t, s, req{method: "POST", path: "/api/auth/password/", token: token, body: body})
	}
	t.Run("changed", func(t *testing.T) {
		a := register(t, s)
		other := loginPair(t, s, a.username, a.password)
		const next = "Quartz-Meadow-Lantern-88"
		res := change(a.access, map[string]any{"old_password": a.password, "new_password": next, "new_password_confirm": next})
		pair := pairOf(t, res)
		wantMe(t, s, pair.Access, a)
		for _, token := range []string{a.access, other.Access} {
			wantUnauthorized(t, me(t, s, token), invalidAccessBody)
		}
		wantUnauthorized(t, refresh(t, s, other.Refresh), blacklistedBody)
		wantUnauthorized(t, login(t, s, a.username, a.password), badCredentialsBody)
		wantMe(t, s, loginPair(t, s, a.username, next).Access, a)
	})
	t.Run("refused", func(t *testing.T) {
		a := register(t, s)
		for _, tc := range []struct {
			name string
			body map[string]any
			want string
		}{
			{"empty", map[string]any{}, `{"old_password": ["This field is required."], "new_password": ["This field is required."]}`},
			{"too similar to the username", map[string]any{"old_password": a.password, "new_password": a.username + "1"},
				`{"new_password": ["The password is too similar to the username."]}`},
			{"common and short", map[string]any{"old_password": a.password, "new_password": "password"},
				`{"new_password": ["This password is too common."]}`},
			{"confirmation differs", map[string]any{"old_password": a.password, "new_password": "Quartz-Meadow-Lantern-88", "new_password_confirm": "other"},
				`{"new_password_confirm": ["Passwords don't match."]}`},
		} {
			t.Run(tc.name, func(t *testing.T) {
				wantJSON(t, change(a.access, tc.body), http.StatusBadRequest, tc.want)
			})
		}
		wantMe(t, s, loginPair(t, s, a.username, a.password).Access, a) // unchanged
	})
	t.Run("wrong old password counts as a failed login", func(t *testing.T) {
		s := newTestServer(t, map[string]string{"RATE_LOGIN": "3/hour"})
		change := func(token string, body any) response {
			return do(t, s, req{method: "POST", path: "/api/auth/password/", token: token, body: body})
		}
		a := register(t, s)
		wrong := map[string]any{"old_password": "Not-The-Password-1", "new_password": "Quartz-Meadow-Lantern-88"}
		for range 3 {
			res := change(a.access, wrong)
			wantJSON(t, res, http.StatusBadRequest, `{"old_password": ["Your old password was entered incorrectly. Please enter it again."]}`)
			wantEvents(t, res, nil, "login.failed") // of no login, as a failed login's
		}
		wantThrottled(t, change(a.access, wrong), anyWait)
		wantThrottled(t, login(t, s, a.username, a.password), anyWait)
	})
	t.Run("ended login", func(t *testing.T) {
		a := register(t, s)
		wantNoContent(t, logout(t, s, a.refresh))
		wantUnauthorized(t, change(a.access, map[string]any{"old_password": a.password, "new_password": "Quartz-Meadow-Lantern-88"}), invalidAccessBody)
	})
}

// TestLoginMaxAge: a login ends LOGIN_MAX_AGE_DAYS after it began, however
// often it was refreshed; a rotated refresh token that has expired still
// triggers reuse detection.
func TestLoginMaxAge(t *testing.T) {
	s := newTestServer(t, nil)
	t.Run("an old login ends", func(t *testing.T) {
		a := register(t, s)
		pair := pairOf(t, refresh(t, s, a.refresh))
		if _, err := testDB.ExecContext(t.Context(), `UPDATE logins SET expires_at = now() - interval '1 second' WHERE id = $1`,
			claimInt(t, tokenClaims(t, pair.Access), "sid")); err != nil {
			t.Fatal(err)
		}
		wantUnauthorized(t, refresh(t, s, pair.Refresh), refreshInvalidBody)
		wantUnauthorized(t, me(t, s, pair.Access), invalidAccessBody)
	})
	t.Run("new logins get the configured age", func(t *testing.T) {
		s := newTestServer(t, map[string]string{"LOGIN_MAX_AGE_DAYS": "2"})
		a := register(t, s)
		var days float64
		err := testDB.QueryRowContext(t.Context(), `SELECT extract(epoch FROM expires_at - created_at) / 86400 FROM logins WHERE id = $1`,
			claimInt(t, tokenClaims(t, a.access), "sid")).Scan(&days)
		if err != nil || days < 1.99 || days > 2.01 {
			t.Fatalf("login lasts %v days (%v), want 2", days, err)
		}
	})
	t.Run("an expired rotated token is still reuse", func(t *testing.T) {
		a := register(t, s)
		stolen := pairOf(t, refresh(t, s, a.refresh))
		moveRotation(t, a.refresh, time.Minute)
		expired := forge(hs256Header, payloadWith(t, tokenClaims(t, a.refresh), map[string]any{"exp": time.Now().Unix() - 1}), testSecret)
		// Its jti is the rotated token's: the server recorded it, so it may sign it again here.
		wantUnauthorized(t, refresh(t, s, expired), blacklistedBody)
		wantUnauthorized(t, me(t, s, stolen.Access), invalidAccessBody)
		wantUnauthorized(t, refresh(t, s, stolen.Refresh), blacklistedBody)
	})
}

// TestPrune: pruning deletes ended and expired logins with their refresh
// tokens, and never a row a live login needs (its rotated and expired
// refresh tokens included: reuse detection reads them).
func TestPrune(t *testing.T) {
	s := newTestServer(t, nil)
	live, ended, old := register(t, s), register(t, s), register(t, s)
	pairOf(t, refresh(t, s, live.refresh)) // live now holds a rotated token
	wantNoContent(t, logout(t, s, ended.refresh))
	sid := func(a account) int64 { return claimInt(t, tokenClaims(t, a.access), "sid") }
	exec := func(q string, args ...any) {
		if _, err := testDB.ExecContext(t.Context(), q, args...); err != nil {
			t.Fatal(err)
		}
	}
	exec(`UPDATE logins SET expires_at = now() - interval '1 second' WHERE id = $1`, sid(old))
	exec(`UPDATE refresh_tokens SET expires_at = now() - interval '1 day' WHERE jti = $1`, tokenClaims(t, live.refresh)["jti"])
	if err := pruneLogins(t.Context(), testDB, 30); err != nil {
		t.Fatal(err)
	}
	count := func(q string, id int64) (n int) {
		if err := testDB.QueryRowContext(t.Context(), q, id).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	for _, tc := range []struct {
		name       string
		a          account
		logins, rt int
	}{{"live", live, 1, 2}, {"ended", ended, 0, 0}, {"expired", old, 0, 0}} {
		if n := count(`SELECT count(*) FROM logins WHERE id = $1`, sid(tc.a)); n != tc.logins {
			t.Errorf("%s login: %d logins rows, want %d", tc.name, n, tc.logins)
		}
		if n := count(`SELECT count(*) FROM refresh_tokens WHERE login_id = $1`, sid(tc.a)); n != tc.rt {
			t.Errorf("%s login: %d refresh tokens, want %d", tc.name, n, tc.rt)
		}
	}
	wantMe(t, s, live.access, live)
	// The pruned login had ended: logging it out again is still 204.
	wantNoContent(t, logout(t, s, ended.refresh))
}

// TestFailedLoginSameWork: a wrong password for an account and any
// password for a name of no account do the same work: one password hash,
// padded to the costliest stored hash, and one committed login.failed
// event (with no account for the unknown name, which no account's
// /api/audit/ lists). BenchmarkFailedLogin measures the time.
func TestFailedLoginSameWork(t *testing.T) {
	s := newTestServer(t, nil)
	a := register(t, s)
	for _, tc := range []struct {
		name, login string
		account     any
	}{
		{"known name", a.username, a.id},
		{"unknown name", uniqueName("nobody"), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			runs := s.passwords.runs.Load()
			res := login(t, s, tc.login, "a wrong password")
			wantUnauthorized(t, res, badCredentialsBody)
			if n := s.passwords.runs.Load() - runs; n != 1 {
				t.Fatalf("%d password hashes, want 1", n)
			}
			var user sql.NullInt64
			var n int
			err := testDB.QueryRowContext(t.Context(), `SELECT count(*), max(user_id) FROM audit_events
				WHERE request_id = $1 AND action = 'login.failed' AND login_id IS NULL`, res.header.Get("X-Request-Id")).Scan(&n, &user)
			var got any
			if user.Valid {
				got = user.Int64
			}
			if err != nil || n != 1 || got != tc.account {
				t.Fatalf("login.failed events: %d for account %v (%v), want 1 for %v", n, got, err, tc.account)
			}
		})
	}
}

// TestPasswordChangeRaces: logins with the old password that race a change
// end with it, and of two changes at once exactly one wins.
func TestPasswordChangeRaces(t *testing.T) {
	s := newTestServer(t, nil, func(c *config) { c.passwordIterations = 100_000; slowHashes(c) })
	s.passwords.slots = make(chan struct{}, 16)
	t.Run("logins during a change", func(t *testing.T) {
		a := register(t, s)
		rqs := []req{{method: "POST", path: "/api/auth/password/", token: a.access,
			body: jsonText(map[string]any{"old_password": a.password, "new_password": "Brand-New-Orbit-Cactus-77"})}}
		for range 8 {
			rqs = append(rqs, req{method: "POST", path: "/api/auth/login/", body: jsonText(map[string]any{"username": a.username, "password": a.password})})
		}
		out := concurrently(t, s, rqs)
		pairOf(t, out[0])
		for _, res := range out[1:] {
			if res.status == http.StatusOK {
				wantUnauthorized(t, me(t, s, pairOf(t, res).Access), invalidAccessBody) // ended with the change
			} else {
				wantUnauthorized(t, res, badCredentialsBody)
			}
		}
		wantUnauthorized(t, login(t, s, a.username, a.password), badCredentialsBody)
	})
	t.Run("two changes at once", func(t *testing.T) {
		for range 3 {
			a := register(t, s)
			b := loginPair(t, s, a.username, a.password)
			out := concurrently(t, s, []req{
				{method: "POST", path: "/api/auth/password/", token: a.access, body: jsonText(map[string]any{"old_password": a.password, "new_password": "Brand-New-Orbit-Cactus-77"})},
				{method: "POST", path: "/api/auth/password/", token: b.Access, body: jsonText(map[string]any{"old_password": a.password, "new_password": "Other-Violet-Canyon-Drum-9"})},
			})
			won := 0
			for _, res := range out {
				switch res.status {
				case http.StatusOK:
					won++
					wantMe(t, s, pairOf(t, res).Access, a)
				case http.StatusUnauthorized: // the winner ended the loser's login first
					wantUnauthorized(t, res, invalidAccessBody)
				default:
					wantJSON(t, res, http.StatusBadRequest, `{"old_password": ["Your old password was entered incorrectly. Please enter it again."]}`)
				}
			}
			if won != 1 {
				t.Fatalf("%d changes won, want exactly 1", won)
			}
		}
	})
}

// TestLoginStaleHashRace: logins racing on an account whose hash is about
// to be upgraded all succeed; the re-hash of one is no password change for
// the others. A change during such logins still ends them.
func TestLoginStaleHashRace(t *testing.T) {
	s := newTestServer(t, nil)
	const password = "Saffron-Kettle-Drum-88"
	name := uniqueName("stale")
	id := insertUser(t, name, name+"@example.com", djangoHash(t, password, "SaltSaltSaltSaltSalt01", testIterations/2))
	var rqs []req
	for range 8 {
		rqs = append(rqs, req{method: "POST", path: "/api/auth/login/", body: jsonText(map[string]any{"username": name, "password": password})})
	}
	for _, res := range concurrently(t, s, rqs) {
		wantMe(t, s, pairOf(t, res).Access, account{id: id})
	}
	if got := hashIterations(t, storedHash(t, id)); got != testIterations {
		t.Fatalf("stored hash at %d iterations, want %d", got, testIterations)
	}
	pairOf(t, login(t, s, name, password))
}

// TestPasswordWrittenElsewhere: a password written by anything but this
// server's change (an older instance during a rolling deploy, an operator's
// UPDATE) still refuses a login that verified the old one, and a stale
// hash's upgrade by that login cannot put the old password back.
func TestPasswordWrittenElsewhere(t *testing.T) {
	const oldPassword, newPassword = "Saffron-Kettle-Drum-88", "Brand-New-Orbit-Cactus-77"
	for name, q := range map[string]string{
		"older server": `UPDATE users SET password = $2 WHERE id = $1 AND password = $3`,
		"operator":     `UPDATE users SET password = $2 WHERE id = $1 AND $3 <> ''`,
	} {
		t.Run(name, func(t *testing.T) {
			s := newTestServer(t, nil, func(c *config) { c.passwordIterations = 3_000_000; slowHashes(c) })
			user := uniqueName("elsewhere")
			// A stale hash slow to verify: the login reads the account and
			// verifies for a while; the password changes meanwhile.
			id := insertUser(t, user, user+"@example.com", djangoHash(t, oldPassword, "SaltSaltSaltSaltSalt01", 2_000_000))
			racing := make(chan response, 1)
			go func() { racing <- login(t, s, user, oldPassword) }()
			time.Sleep(100 * time.Millisecond)
			if _, err := testDB.ExecContext(t.Context(), q, id, djangoHash(t, newPassword, "NewSaltNewSaltNewSalt1", testIterations), storedHash(t, id)); err != nil {
				t.Fatalf("change the password: %v", err)
			}
			wantUnauthorized(t, <-racing, badCredentialsBody)
			wantUnauthorized(t, login(t, s, user, oldPassword), badCredentialsBody)
			pairOf(t, login(t, s, user, newPassword))
		})
	}
}

// TestLoginUnicodeName: PostgreSQL lower-cases a login name both when it is
// registered and when it logs in, so no letter is folded two ways.
func TestLoginUnicodeName(t *testing.T) {
	s := newTestServer(t, nil)
	for _, name := range []string{"\u1C89" + uniqueName("u"), "\uA7CB" + uniqueName("u"), "ÉLODIE" + uniqueName("u")} {
		email := uniqueName("e") + "@example.com"
		res := do(t, s, req{method: "POST", path: "/api/auth/register/", body: registerBody(map[string]any{"username": name, "email": email})})
		wantObject(t, res, http.StatusCreated)
		pairOf(t, login(t, s, name, "Velvet-Orchard-Compass-31"))
	}
}

// TestUsernameNFKC: usernames are stored in Unicode NFKC, as Django stores
// them: a full-width name registers as its ASCII form, collides with it,
// and logs in under either form.
func TestUsernameNFKC(t *testing.T) {
	s := newTestServer(t, nil)
	base := uniqueName("nfkc")
	wide := strings.Map(func(r rune) rune {
		if r >= '!' && r <= '~' {
			return r + 0xFEE0 // the full-width form
		}
		return r
	}, base)
	res := do(t, s, req{method: "POST", path: "/api/auth/register/", body: registerBody(map[string]any{"username": wide, "email": uniqueName("e") + "@example.com"})})
	if got := wantObject(t, res, http.StatusCreated)["user"].(map[string]any)["username"]; got != base {
		t.Fatalf("registered %q as %q, want %q", wide, got, base)
	}
	res = do(t, s, req{method: "POST", path: "/api/auth/register/", body: registerBody(map[string]any{"username": strings.ToUpper(base), "email": uniqueName("e") + "@example.com"})})
	wantJSON(t, res, 400, `{"username": ["A user with that username already exists."]}`)
	for _, name := range []string{base, wide, strings.ToUpper(wide)} {
		pairOf(t, login(t, s, name, "Velvet-Orchard-Compass-31"))
	}
	// ﷺ is one letter whose NFKC form is 18 characters with spaces: valid
	// before normalizing, not after.
	res = do(t, s, req{method: "POST", path: "/api/auth/register/", body: registerBody(map[string]any{"username": "\uFDFA", "email": uniqueName("e") + "@example.com"})})
	wantJSON(t, res, 400, `{"username": ["`+invalidUsername+`"]}`)
}

// TestUsernameStepNormalizes: the schema step renormalizes the names of a
// database made before it; names that would become one stop the step,
// naming them, and the database stays at the step before with every row.
func TestUsernameStepNormalizes(t *testing.T) {
	ctx := t.Context()
	db := scratchDB(t, "_nfkc", 1)
	add := func(id int, username, email string) {
		t.Helper()
		_, err := db.ExecContext(ctx, `INSERT INTO users (id, username, email, name, password) VALUES ($1, $2, $3, 'N', '!')`, id, username, email)
		if err == nil {
			_, err = db.ExecContext(ctx, `INSERT INTO login_names (name, user_id) VALUES (lower($2), $1), ($3, $1)`, id, username, email)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	add(1, "ＡＤＡ", "ada@example.com")
	add(2, "bob", "bob@example.com")
	if s, err := migrate(ctx, db, schemaSQL, schemaSteps); err != nil || s.at != len(schemaSteps) {
		t.Fatalf("migrate: step %d, %v", s.at, err)
	}
	var names string
	if err := db.QueryRowContext(ctx, `SELECT (SELECT string_agg(username, ',' ORDER BY id) FROM users) || ' / ' ||
		(SELECT string_agg(name, ',' ORDER BY name) FROM login_names)`).Scan(&names); err != nil || names != "ADA,bob / ada,ada@example.com,bob,bob@example.com" {
		t.Fatalf("after the step: %q, %v", names, err)
	}
	// From then on the database refuses a name in another form, as an older
	// server still running would write it.
	_, err := db.ExecContext(ctx, `INSERT INTO users (username, email, name, password) VALUES ('ｃａｒｏｌ', 'c@example.com', 'C', '!')`)
	if e := pq.As(err, pqerror.CheckViolation); e == nil || e.Constraint != "users_username_nfkc" {
		t.Fatalf("insert a full-width username: %v, want users_username_nfkc violated", err)
	}

	clash := scratchDB(t, "_nfkc_clash", 1)
	db = clash
	add(1, "ｂｏｂ", "b1@example.com")
	add(2, "bob", "b2@example.com")
	s, err := migrate(ctx, clash, schemaSQL, schemaSteps)
	if err == nil || s.at != 1 || !strings.Contains(err.Error(), "'ｂｏｂ' and 'bob'") {
		t.Fatalf("migrate with a clash: step %d, %v; want step 1 and an error naming both", s.at, err)
	}
	if err := clash.QueryRowContext(ctx, `SELECT string_agg(username, ',' ORDER BY id) FROM users`).Scan(&names); err != nil || names != "ｂｏｂ,bob" {
		t.Fatalf("after the refused step: %q, %v", names, err)
	}
}

// stmtLog is every statement a pool ran, in order, with BEGIN, COMMIT and
// ROLLBACK: what a request asked of PostgreSQL, as the driver saw it.
type stmtLog struct {
	mu    sync.Mutex
	lines []string
	args  map[string][]driver.NamedValue // the last arguments of each query run unprepared
}

func (l *stmtLog) add(q string) { l.mu.Lock(); l.lines = append(l.lines, q); l.mu.Unlock() }

// take returns the statements run since the last take.
func (l *stmtLog) take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := l.lines
	l.lines = nil
	return out
}

// logConnector, logConn, logTx and logStmt pass everything to lib/pq and
// write each statement to log on the way: prepared or not, in a
// transaction or not.
type logConnector struct {
	driver.Connector
	log *stmtLog
}

func (c logConnector) Connect(ctx context.Context) (driver.Conn, error) {
	conn, err := c.Connector.Connect(ctx)
	if err != nil {
		return nil, err
	}
	return &logConn{conn: conn, log: c.log}, nil
}

type logConn struct {
	conn driver.Conn
	log  *stmtLog
}

func (c *logConn) Prepare(q string) (driver.Stmt, error) {
	return c.PrepareContext(context.Background(), q)
}
func (c *logConn) Close() error { return c.conn.Close() }
func (c *logConn) Begin() (driver.Tx, error) {
	return c.BeginTx(context.Background(), driver.TxOptions{})
}

func (c *logConn) PrepareContext(ctx context.Context, q string) (driver.Stmt, error) {
	st, err := c.conn.(driver.ConnPrepareContext).PrepareContext(ctx, q)
	if err != nil {
		return nil, err
	}
	return &logStmt{Stmt: st, q: q, log: c.log}, nil
}

func (c *logConn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	tx, err := c.conn.(driver.ConnBeginTx).BeginTx(ctx, opts)
	if err != nil {
		return nil, err
	}
	c.log.add("BEGIN")
	return logTx{tx, c.log}, nil
}

func (c *logConn) QueryContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Rows, error) {
	c.log.add(q)
	c.log.mu.Lock()
	if c.log.args == nil {
		c.log.args = map[string][]driver.NamedValue{}
	}
	c.log.args[q] = args
	c.log.mu.Unlock()
	return c.conn.(driver.QueryerContext).QueryContext(ctx, q, args)
}

func (c *logConn) ExecContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Result, error) {
	c.log.add(q)
	return c.conn.(driver.ExecerContext).ExecContext(ctx, q, args)
}

func (c *logConn) CheckNamedValue(nv *driver.NamedValue) error {
	if ch, ok := c.conn.(driver.NamedValueChecker); ok {
		return ch.CheckNamedValue(nv)
	}
	return driver.ErrSkip
}

type logTx struct {
	tx  driver.Tx
	log *stmtLog
}

func (t logTx) Commit() error   { t.log.add("COMMIT"); return t.tx.Commit() }
func (t logTx) Rollback() error { t.log.add("ROLLBACK"); return t.tx.Rollback() }

type logStmt struct {
	driver.Stmt
	q   string
	log *stmtLog
}

func (s *logStmt) ExecContext(ctx context.Context, args []driver.NamedValue) (driver.Result, error) {
	s.log.add(s.q)
	return s.Stmt.(driver.StmtExecContext).ExecContext(ctx, args)
}

func (s *logStmt) QueryContext(ctx context.Context, args []driver.NamedValue) (driver.Rows, error) {
	s.log.add(s.q)
	return s.Stmt.(driver.StmtQueryContext).QueryContext(ctx, args)
}

// TestEveryPrivateStatementChecksLogin holds the rule that makes logout
// take effect at once everywhere: on a private route, every statement
// checks the login (login_live), as the driver sees it. It runs every
// private route, on the paths that reach its later statements (412s, bad
// references, an empty list, a wrong old password), against a pool that
// logs each statement, and wants each one to call login_live, the existence
// checks (412 or 404, 403, a bad reference, an empty list) and a wrong old
// password's login.failed event included, except a statement inside a
// transaction whose first statement calls it (the transaction fails as a
// whole).
//
// A private route that no case runs fails the test too, so a new route or
// a new statement cannot slip past.
func TestEveryPrivateStatementChecksLogin(t *testing.T) {
	needDB(t)
	connector, err := pq.NewConnectorConfig(testDBConfig)
	if err != nil {
		t.Fatal(err)
	}
	log := &stmtLog{}
	db := sql.OpenDB(logConnector{connector, log})
	defer db.Close()
	s := newTestServerOn(t, db, slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	a, b := register(t, s), register(t, s)
	p, _ := mustCreate(t, s, a.access, "/api/patients/", map[string]any{"first_name": "Live", "email": uniqueName("live") + "@example.com"})
	lone, _ := mustCreate(t, s, a.access, "/api/patients/", map[string]any{"first_name": "Lone", "email": uniqueName("lone") + "@example.com"})
	d, _ := mustCreate(t, s, a.access, "/api/doctors/", map[string]any{"first_name": "Live", "email": uniqueName("live") + "@example.com", "specialization": "Surgery"})
	free, _ := mustCreate(t, s, a.access, "/api/doctors/", map[string]any{"first_name": "Free", "email": uniqueName("free") + "@example.com", "specialization": "Surgery"})
	theirs, _ := mustCreate(t, s, b.access, "/api/doctors/", map[string]any{"first_name": "Theirs", "email": uniqueName("theirs") + "@example.com", "specialization": "Surgery"})
	m, _ := mustCreate(t, s, a.access, "/api/mappings/", map[string]any{"patient": p, "doctor": d})
	stale := map[string]string{"If-Match": `"1-999"`}
	P := func(f string, id int64) string { return fmt.Sprintf(f, id) }
	cases := []struct {
		method, path string
		body         any
		header       map[string]string
		status       int
	}{
		{"GET", "/api/auth/me/", nil, nil, 200},
		{"GET", "/api/patients/?search=live&ordering=-created_at", nil, nil, 200},
		{"POST", "/api/patients/", map[string]any{"first_name": "New", "email": uniqueName("new") + "@example.com"}, nil, 201},
		{"GET", P("/api/patients/%d/", p), nil, nil, 200},
		{"PUT", P("/api/patients/%d/", p), map[string]any{"first_name": "Live", "email": uniqueName("put") + "@example.com"}, nil, 200},
		{"PATCH", P("/api/patients/%d/", p), map[string]any{"last_name": "Stale"}, stale, 412},
		{"DELETE", P("/api/patients/%d/", lone), nil, stale, 412},
		{"GET", "/api/doctors/?search=live", nil, nil, 200},
		{"POST", "/api/doctors/", map[string]any{"first_name": "New", "email": uniqueName("new") + "@example.com", "specialization": "Surgery"}, nil, 201},
		{"GET", P("/api/doctors/%d/", d), nil, nil, 200},
		{"PUT", P("/api/doctors/%d/", d), map[string]any{"first_name": "Live", "email": uniqueName("put") + "@example.com", "specialization": "Surgery"}, nil, 200},
		{"PATCH", P("/api/doctors/%d/", d), map[string]any{"last_name": "Stale"}, stale, 412},
		{"PATCH", P("/api/doctors/%d/", theirs), map[string]any{"last_name": "X"}, nil, 403},
		{"DELETE", P("/api/doctors/%d/", d), nil, nil, 409},
		{"DELETE", P("/api/doctors/%d/", free), nil, stale, 412},
		{"GET", "/api/mappings/", nil, nil, 200},
		{"POST", "/api/mappings/", map[string]any{"patient": lone, "doctor": 999999999}, nil, 400},
		{"POST", "/api/mappings/", map[string]any{"patient": lone, "doctor": d}, nil, 201},
		{"GET", P("/api/mappings/%d/", p), nil, nil, 200},
		{"GET", P("/api/mappings/%d/", 999999999), nil, nil, 404},
		{"DELETE", P("/api/mappings/%d/", m), nil, nil, 204},
		{"DELETE", P("/api/patients/%d/", p), nil, nil, 204},
		{"GET", "/api/audit/?action=patient.read&patient=1", nil, nil, 200},
		{"POST", "/api/auth/password/", map[string]any{"old_password": "a wrong password", "new_password": "Quartz-Meadow-Lantern-88"}, nil, 400},
		{"POST", "/api/auth/password/", map[string]any{"old_password": a.password, "new_password": "Quartz-Meadow-Lantern-88",
			"new_password_confirm": "Quartz-Meadow-Lantern-88"}, nil, 200},
		{"POST", "/api/auth/logout/all/", nil, nil, 204},
	}
	ran := map[string]bool{}
	token := a.access
	for _, tc := range cases {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			_, pattern := s.mux.Handler(httptest.NewRequest(tc.method, tc.path, nil))
			ran[pattern] = true
			log.take()
			res := do(t, s, req{method: tc.method, path: tc.path, token: token, body: tc.body, header: tc.header})
			if res.status != tc.status {
				t.Fatalf("status %d, want %d: %s", res.status, tc.status, res.body)
			}
			if tc.path == "/api/auth/password/" && tc.status == 200 {
				token = pairOf(t, res).Access
			}
			checked, inTx := false, false
			for _, q := range log.take() {
				switch {
				case q == "BEGIN":
					inTx, checked = true, false
				case q == "COMMIT" || q == "ROLLBACK":
					inTx = false
				case strings.Contains(q, "login_live($1, $2)"):
					checked = true
				case inTx && (checked || q == customPlan):
				default:
					t.Errorf("a statement that does not check the login:\n%s", q)
				}
			}
			if !checked {
				t.Errorf("no statement checked the login")
			}
		})
	}
	for _, pattern := range servedRoutes(s) {
		method, path, _ := strings.Cut(strings.ReplaceAll(strings.TrimSuffix(pattern, "{$}"), "{id}", "1"), " ")
		if h, _ := s.mux.Handler(httptest.NewRequest(method, path, nil)); h.(route).access == private && !ran[pattern] {
			t.Errorf("no case runs the private route %s", pattern)
		}
	}
}
