package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// The login lock: failed logins per account (or name of no account) and
// source, with an account-wide ceiling, kept in PostgreSQL.

// lockServer locks a source after 3 failures for 1 s, and an account after
// 10 failures from all sources; it believes X-Forwarded-For from 10/8, so
// that a test can pick each attempt's source.
func lockServer(t *testing.T) *server {
	return newTestServer(t, map[string]string{"LOGIN_LOCK_AFTER": "3", "LOGIN_LOCK_S": "1",
		"LOGIN_LOCK_ACCOUNT_AFTER": "10", "TRUSTED_PROXIES": "10.0.0.0/8", "RATE_LOGIN": "1000/hour"})
}

// fromIP is a request from the client ip, through a trusted proxy.
func fromIP(ip string, rq req) req {
	rq.remoteAddr, rq.header = "10.0.0.1:1234", map[string]string{"X-Forwarded-For": ip}
	return rq
}

func loginReq(name, password string) req {
	return req{method: "POST", path: "/api/auth/login/", body: jsonText(map[string]string{"username": name, "password": password})}
}

// hashes counts the password hashes of servers.
func hashes(servers ...*server) (n int64) {
	for _, s := range servers {
		n += s.passwords.runs.Load()
	}
	return n
}

// failedEvents counts login.failed events of account id.
func failedEvents(t *testing.T, id int64) (n int) {
	t.Helper()
	if err := testDB.QueryRowContext(t.Context(), `SELECT count(*) FROM audit_events WHERE user_id = $1 AND action = 'login.failed'`, id).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestLoginLockPerSource: two instances, one database. A stranger's three
// failures make the stranger's source wait (an IPv6 client by its /64),
// right password or not, with no hash and no event, and each later failure
// doubles the wait; the owner's source and a new one are not affected, and
// the owner's success does not end the stranger's run.
func TestLoginLockPerSource(t *testing.T) {
	servers := []*server{lockServer(t), lockServer(t)}
	a := register(t, servers[0])
	n := 0
	try := func(ip, password string) response {
		t.Helper()
		n++
		return do(t, servers[n%2], fromIP(ip, loginReq(a.username, password)))
	}
	const stranger = "198.51.100.7"
	for range 3 {
		wantUnauthorized(t, try(stranger, "a wrong password"), badCredentialsBody)
	}
	before := hashes(servers...)
	wantThrottled(t, try(stranger, a.password), 1) // the right password waits too
	wantThrottled(t, try(stranger, "a wrong password"), 1)
	if got := hashes(servers...) - before; got != 0 || failedEvents(t, a.id) != 3 {
		t.Fatalf("during the wait: %d hashes and %d events, want 0 and 3", got, failedEvents(t, a.id))
	}
	pairOf(t, try("203.0.113.5", a.password))     // the owner's source
	pairOf(t, try("2001:db8:1:2::7", a.password)) // a new source
	wantThrottled(t, try(stranger, a.password), 1)
	for _, ip := range []string{"2001:db8:9:9::1", "2001:db8:9:9::2", "2001:db8:9:9::3"} {
		wantUnauthorized(t, try(ip, "a wrong password"), badCredentialsBody)
	}
	wantThrottled(t, try("2001:db8:9:9:ffff::4", a.password), 1) // the same /64
	time.Sleep(1100 * time.Millisecond)
	wantUnauthorized(t, try(stranger, "a wrong password"), badCredentialsBody) // the fourth: the wait doubles
	wantThrottled(t, try(stranger, a.password), 2)
	time.Sleep(2100 * time.Millisecond)
	pairOf(t, try(stranger, a.password)) // a success ends the run
	wantUnauthorized(t, try(stranger, "a wrong password"), badCredentialsBody)
	pairOf(t, try(stranger, a.password))
}

// TestLoginLockAccountWide: ten failures on a name from ten sources make
// every source wait but those the owner logged in from (by either name), and
// the password change of a live login; the owner's success ends the run.
func TestLoginLockAccountWide(t *testing.T) {
	s := lockServer(t)
	a := register(t, s)
	const owner, newcomer = "203.0.113.5", "203.0.113.99"
	pair := pairOf(t, do(t, s, fromIP(owner, loginReq(a.username, a.password))))
	spread := func(round int) {
		t.Helper()
		for i := range 10 {
			wantUnauthorized(t, do(t, s, fromIP(fmt.Sprintf("198.51.%d.%d", round, i), loginReq(a.email, "a wrong password"))), badCredentialsBody)
		}
	}
	spread(100)
	wantThrottled(t, do(t, s, fromIP(newcomer, loginReq(a.email, a.password))), 1)
	// Known by the username's login, for the email too: open, and it ends the run.
	pairOf(t, do(t, s, fromIP(owner, loginReq(a.email, a.password))))
	pairOf(t, do(t, s, fromIP(newcomer, loginReq(a.email, a.password))))

	spread(101)
	wantThrottled(t, do(t, s, fromIP("203.0.113.100", loginReq(a.email, a.password))), 1)
	change := req{method: "POST", path: "/api/auth/password/", token: pair.Access,
		body: jsonText(map[string]string{"old_password": a.password, "new_password": "Quiet-Harbor-Meadow-42"})}
	wantMe(t, s, pairOf(t, do(t, s, fromIP("203.0.113.100", change))).Access, a) // never refused for others' failures
}

// TestPasswordChangeCountsAsFailedLogin: a wrong old password is a failed
// login from the caller's source only: that source's logins and changes
// wait, other sources and the account-wide count are untouched.
func TestPasswordChangeCountsAsFailedLogin(t *testing.T) {
	s := lockServer(t)
	a := register(t, s)
	const here = "198.51.100.20"
	change := func(old string) response {
		return do(t, s, fromIP(here, req{method: "POST", path: "/api/auth/password/", token: a.access,
			body: jsonText(map[string]string{"old_password": old, "new_password": "Quiet-Harbor-Meadow-42"})}))
	}
	wrongOld := `{"old_password": ["Your old password was entered incorrectly. Please enter it again."]}`
	for range 3 {
		wantJSON(t, change("a wrong password"), 400, wrongOld)
	}
	wantThrottled(t, change(a.password), 1)
	wantThrottled(t, do(t, s, fromIP(here, loginReq(a.username, a.password))), 1)
	var everywhere int
	if err := testDB.QueryRowContext(t.Context(), `SELECT coalesce(sum(failures), 0) FROM login_attempts WHERE name IN (SELECT name FROM login_names WHERE user_id = $1) AND source = ''`, a.id).Scan(&everywhere); err != nil || everywhere != 0 {
		t.Fatalf("account-wide failures: %d, %v; want 0", everywhere, err)
	}
	if got := failedEvents(t, a.id); got != 3 {
		t.Fatalf("%d login.failed events, want 3", got)
	}
	time.Sleep(1100 * time.Millisecond)
	pair := pairOf(t, change(a.password))
	wantUnauthorized(t, do(t, s, fromIP(here, loginReq(a.username, a.password))), badCredentialsBody) // the old password is gone
	wantMe(t, s, pair.Access, a)
}

// TestLoginLockUnknownName: a name of no account locks exactly as an
// account does, by its normalized, lower-cased form: the answers cannot
// tell which names exist. Such a name never counts against an account.
func TestLoginLockUnknownName(t *testing.T) {
	s := lockServer(t)
	a := register(t, s)
	nobody := uniqueName("nobody")
	wide := strings.Map(func(r rune) rune { return r + 0xFEE0 }, strings.ToUpper(nobody[:3])) + nobody[3:]
	for _, tc := range []struct{ ip, name, also string }{
		{"198.51.100.30", a.username, strings.ToUpper(a.username)},
		{"198.51.100.31", nobody, wide},
	} {
		var got []string
		for _, name := range []string{tc.name, tc.also, tc.name, tc.also} {
			res := do(t, s, fromIP(tc.ip, loginReq(name, "a wrong password")))
			var body bytes.Buffer
			json.Compact(&body, res.body)
			got = append(got, fmt.Sprintf("%d %s %s", res.status, res.header.Get("Retry-After"), &body))
		}
		wrong := `401  {"detail":"No active account found with the given credentials"}`
		want := []string{wrong, wrong, wrong, `429 1 {"detail":"Request was throttled. Expected available in 1 second."}`}
		if strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Fatalf("attempts on %q from %s:\n%s\nwant\n%s", tc.name, tc.ip, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	} // "#<id>" is no account's name: its failures are its own, not account id's.
	for range 3 {
		wantUnauthorized(t, do(t, s, fromIP("198.51.100.32", loginReq(fmt.Sprintf("#%d", a.id), "a wrong password"))), badCredentialsBody)
	}
	pairOf(t, do(t, s, fromIP("198.51.100.32", loginReq(a.username, a.password))))
}

// TestLoginLockBurst: of twenty simultaneous wrong attempts from one source
// through two instances, exactly the limit's three are checked; the rest
// wait, with no hash and no event.
func TestLoginLockBurst(t *testing.T) {
	servers := []*server{lockServer(t), lockServer(t)}
	a := register(t, servers[0])
	var n atomic.Int32
	both := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { servers[n.Add(1)%2].ServeHTTP(w, r) })
	var rqs []req
	for range 20 {
		rqs = append(rqs, fromIP("198.51.100.40", loginReq(a.username, "a wrong password")))
	}
	checked, before := 0, hashes(servers...)
	for _, res := range concurrently(t, both, rqs) {
		if res.status == http.StatusUnauthorized {
			checked++
			wantUnauthorized(t, res, badCredentialsBody)
		} else {
			wantThrottled(t, res, anyWait)
		}
	}
	if h := hashes(servers...) - before; checked != 3 || h != 3 || failedEvents(t, a.id) != 3 {
		t.Fatalf("%d checked, %d hashes, %d events; want 3 of each", checked, h, failedEvents(t, a.id))
	}
}

// TestUnlock: "healthcare unlock" ends every wait of an account, by any of
// its names, and writes login.unlock in its trail; a name of no account is
// an error.
func TestUnlock(t *testing.T) {
	s := lockServer(t)
	a := register(t, s)
	const ip, newcomer = "198.51.100.50", "198.51.100.51"
	for range 3 {
		wantUnauthorized(t, do(t, s, fromIP(ip, loginReq(a.username, "a wrong password"))), badCredentialsBody)
	}
	for i := range 10 { // past the account-wide ceiling
		do(t, s, fromIP(fmt.Sprintf("198.51.101.%d", i), loginReq(a.username, "a wrong password")))
	}
	wantThrottled(t, do(t, s, fromIP(ip, loginReq(a.username, a.password))), anyWait)
	wantThrottled(t, do(t, s, fromIP(newcomer, loginReq(a.username, a.password))), anyWait)
	env := testEnv(map[string]string{"DB_NAME": testDBConfig.Database})
	var out bytes.Buffer
	if err := run(t.Context(), []string{"unlock", strings.ToUpper(a.email)}, env, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	var requestID string
	if err := testDB.QueryRowContext(t.Context(), `SELECT request_id FROM audit_events WHERE user_id = $1 AND action = 'login.unlock' AND ip = '' AND login_id IS NULL`, a.id).Scan(&requestID); err != nil {
		t.Fatalf("the login.unlock event: %v", err)
	}
	if want := fmt.Sprintf("account %d (%q) unlocked: login.unlock written, request id %s\n", a.id, strings.ToUpper(a.email), requestID); out.String() != want {
		t.Fatalf("unlock printed %q, want %q", out.String(), want)
	}
	pairOf(t, do(t, s, fromIP(newcomer, loginReq(a.username, a.password))))
	pairOf(t, do(t, s, fromIP(ip, loginReq(a.username, a.password))))
	res := do(t, s, req{method: "GET", path: "/api/audit/?action=login.unlock", token: a.access})
	if results := wantObject(t, res, http.StatusOK)["results"].([]any); len(results) != 1 || results[0].(map[string]any)["request_id"] != requestID {
		t.Fatalf("the trail's login.unlock events: %s", res.body)
	}
	err := run(t.Context(), []string{"unlock", "no-such-name-x"}, env, io.Discard, io.Discard)
	if err == nil || err.Error() != `unlock: no account has the name "no-such-name-x"` {
		t.Fatalf("unlock of no account: %v", err)
	}
}

// TestLockWait: the wait after n failures in a row doubles with every
// failure past the limit, up to 16 times, and counts from the last one.
func TestLockWait(t *testing.T) {
	needDB(t)
	for _, tc := range []struct{ n, ago, want int }{
		{2, 0, 0}, {3, 0, 60}, {4, 0, 120}, {5, 0, 240}, {6, 0, 480}, {7, 0, 960}, {8, 0, 960}, {40, 0, 960},
		{3, 100, 0}, {4, 100, 20},
	} {
		var got int
		err := testDB.QueryRowContext(t.Context(), `SELECT greatest(lock_wait($1, now() - make_interval(secs => $2), 3, 60), 0)`, tc.n, tc.ago).Scan(&got)
		if err != nil || got != tc.want {
			t.Errorf("%d failures, the last %d s ago: wait %d (%v), want %d", tc.n, tc.ago, got, err, tc.want)
		}
	}
}
