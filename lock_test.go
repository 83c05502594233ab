package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
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
	if want := fmt.Sprintf("user %d (%q) unlocked: login.unlock written, request id %s\n", a.id, strings.ToUpper(a.email), requestID); out.String() != want {
		t.Fatalf("unlock printed %q, want %q", out.String(), want)
	}
	pairOf(t, do(t, s, fromIP(newcomer, loginReq(a.username, a.password))))
	pairOf(t, do(t, s, fromIP(ip, loginReq(a.username, a.password))))
	res := do(t, s, req{method: "GET", path: "/api/audit/?action=login.unlock", token: a.access})
	if results := wantObject(t, res, http.StatusOK)["results"].([]any); len(results) != 1 || results[0].(map[string]any)["request_id"] != requestID {
		t.Fatalf("the trail's login.unlock events: %s", res.body)
	}
	err := run(t.Context(), []string{"unlock", "no-such-name-x"}, env, io.Discard, io.Discard)
	if err == nil || err.Error() != `unlock: no user has the name "no-such-name-x"` {
		t.Fatalf("unlock of no account: %v", err)
	}
}

// TestRunWait: the wait after n failures in a row doubles with every
// failure past the limit, up to 16 times, and counts from the last one.
func TestRunWait(t *testing.T) {
	needDB(t)
	for _, tc := range []struct{ n, ago, want int }{
		{2, 0, 0}, {3, 0, 60}, {4, 0, 120}, {5, 0, 240}, {6, 0, 480}, {7, 0, 960}, {8, 0, 960}, {40, 0, 960},
		{3, 100, 0}, {4, 100, 20},
	} {
		var got int
		err := testDB.QueryRowContext(t.Context(), `SELECT greatest(run_wait($1, now() - make_interval(secs => $2), 3, 60), 0)`, tc.n, tc.ago).Scan(&got)
		if err != nil || got != tc.want {
			t.Errorf("%d failures, the last %d s ago: wait %d (%v), want %d", tc.n, tc.ago, got, err, tc.want)
		}
	}
}

// TestLoginLockFloodSparesOwner: strangers' guesses for names of no
// account, from other sources, keep every hashing slot busy while the
// owner logs in from a known source with the right password. An attempt
// shed with 503 was never checked and counts nothing: the owner may be
// slowed down, and is never locked, during the flood or after it.
func TestLoginLockFloodSparesOwner(t *testing.T) {
	s := newTestServer(t, map[string]string{"LOGIN_LOCK_AFTER": "3", "LOGIN_LOCK_S": "60", "TRUSTED_PROXIES": "10.0.0.0/8", "RATE_LOGIN": "off"},
		func(c *config) { c.passwordIterations = 600_000; slowHashes(c) })
	a := register(t, s)
	const home = "203.0.113.77"
	pairOf(t, do(t, s, fromIP(home, loginReq(a.username, a.password)))) // a known source
	s.passwords.maxWait = 5 * time.Millisecond
	stop := make(chan struct{})
	var flood sync.WaitGroup
	for i := range 3 * cap(s.passwords.slots) {
		flood.Add(1)
		go func() {
			defer flood.Done()
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				do(t, s, fromIP(fmt.Sprintf("198.51.%d.%d", 100+i, n%250), loginReq(uniqueName("stranger"), "a wrong password")))
			}
		}()
	}
	shed := 0
	for try := 0; shed < 4 && try < 200; try++ {
		switch res := do(t, s, fromIP(home, loginReq(a.username, a.password))); res.status {
		case http.StatusServiceUnavailable:
			wantUnavailable(t, res)
			shed++
		case http.StatusOK:
			pairOf(t, res)
		default:
			close(stop)
			t.Fatalf("the owner during the flood, after %d shed: status %d, body %s", shed, res.status, res.body)
		}
	}
	close(stop)
	flood.Wait()
	if shed < 4 {
		t.Fatalf("only %d of the owner's attempts were shed: the flood did not saturate the hashing", shed)
	}
	s.passwords.maxWait = 2 * time.Second
	pairOf(t, do(t, s, fromIP(home, loginReq(a.username, a.password))))
	var failures int
	if err := testDB.QueryRowContext(t.Context(), `SELECT coalesce(sum(failures), 0) FROM login_attempts WHERE name = lower($1)`, a.username).Scan(&failures); err != nil || failures != 0 {
		t.Fatalf("the owner's runs after the flood: %d failures (%v), want 0", failures, err)
	}
}

// TestLoginLockPerName: a run is a login name's, as sent: failures on the
// username do not make the email wait, from that source or from all of
// them, and a pair of names of no account answers exactly as an account's
// pair; a success ends both names' runs.
func TestLoginLockPerName(t *testing.T) {
	s := lockServer(t)
	a := register(t, s)
	nobody := uniqueName("nobody")
	answers := func(ip string, names ...string) string {
		var got []string
		for _, name := range names {
			res := do(t, s, fromIP(ip, loginReq(name, "a wrong password")))
			var body bytes.Buffer
			json.Compact(&body, res.body)
			got = append(got, fmt.Sprintf("%d %s %s", res.status, res.header.Get("Retry-After"), &body))
		}
		return strings.Join(got, "\n")
	}
	known := answers("198.51.100.60", a.username, a.username, a.username, a.email, a.email, a.username)
	unknown := answers("198.51.100.61", nobody, nobody, nobody, nobody+"@example.com", nobody+"@example.com", nobody)
	wrong := `401  {"detail":"No active account found with the given credentials"}`
	throttledBody := `429 1 {"detail":"Request was throttled. Expected available in 1 second."}`
	if want := strings.Join([]string{wrong, wrong, wrong, wrong, wrong, throttledBody}, "\n"); known != want || unknown != want {
		t.Fatalf("a user's names:\n%s\nnames of no account:\n%s\nwant\n%s", known, unknown, want)
	}
	// Ten failures on the username from all sources (the three above and
	// seven more): every new source waits for it, not for the email.
	for i := range 7 {
		wantUnauthorized(t, do(t, s, fromIP(fmt.Sprintf("198.51.102.%d", i), loginReq(a.username, "a wrong password"))), badCredentialsBody)
	}
	wantThrottled(t, do(t, s, fromIP("198.51.102.99", loginReq(a.username, a.password))), anyWait)
	wantUnauthorized(t, do(t, s, fromIP("198.51.102.98", loginReq(a.email, "a wrong password"))), badCredentialsBody)
	// A success by the email ends the username's runs too.
	pairOf(t, do(t, s, fromIP("198.51.100.60", loginReq(a.email, a.password))))
	pairOf(t, do(t, s, fromIP("198.51.100.60", loginReq(a.username, a.password))))
	pairOf(t, do(t, s, fromIP("198.51.102.99", loginReq(a.username, a.password))))
}

// TestLoginLockKnownSourceAges: a source the user logged in from is spared
// the account-wide wait only for LOGIN_MAX_AGE_DAYS after that login.
func TestLoginLockKnownSourceAges(t *testing.T) {
	s := lockServer(t)
	a := register(t, s)
	const known = "203.0.113.88"
	pairOf(t, do(t, s, fromIP(known, loginReq(a.username, a.password))))
	for i := range 10 {
		wantUnauthorized(t, do(t, s, fromIP(fmt.Sprintf("198.51.103.%d", i), loginReq(a.username, "a wrong password"))), badCredentialsBody)
	}
	age := func(days int) {
		t.Helper()
		const q = `UPDATE login_attempts SET last_login = now() - make_interval(days => $2) WHERE name = lower($1) AND source = $3`
		if _, err := testDB.ExecContext(t.Context(), q, a.username, days, known); err != nil {
			t.Fatal(err)
		}
	}
	age(s.cfg.loginMaxAgeDays + 1)
	wantThrottled(t, do(t, s, fromIP(known, loginReq(a.username, a.password))), anyWait)
	age(s.cfg.loginMaxAgeDays - 1)
	pairOf(t, do(t, s, fromIP(known, loginReq(a.username, a.password))))
}

// TestPruneKeepsKnownSources: the prune deletes a run only when both its
// last failure and its last login are older than LOGIN_MAX_AGE_DAYS: a
// source with old failures and a recent login stays known.
func TestPruneKeepsKnownSources(t *testing.T) {
	db := scratchDB(t, "_prune", -1)
	const q = `INSERT INTO login_attempts (name, source, failures, last_failure, last_login) VALUES
		('kept', '192.0.2.1', 2, now() - interval '40 days', now() - interval '1 day'),
		('kept', '192.0.2.2', 2, now() - interval '1 day', now() - interval '40 days'),
		('gone', '192.0.2.3', 2, now() - interval '40 days', now() - interval '31 days'),
		('gone', '192.0.2.4', 0, NULL, now() - interval '31 days')`
	if _, err := db.ExecContext(t.Context(), q); err != nil {
		t.Fatal(err)
	}
	if err := pruneLogins(t.Context(), db, 30); err != nil {
		t.Fatal(err)
	}
	var left string
	if err := db.QueryRowContext(t.Context(), `SELECT string_agg(name || ' ' || source, ', ' ORDER BY source) FROM login_attempts`).Scan(&left); err != nil ||
		left != "kept 192.0.2.1, kept 192.0.2.2" {
		t.Fatalf("after the prune: %q (%v), want the two kept", left, err)
	}
}

// TestRightPasswordPastDeadlineNotCounted: a right password whose check
// ends after the request's deadline (a flood made it wait for its slot, or
// its hash is costly) still logs in and ends its runs; it was never a
// failed attempt, so no number of them locks the user out. A stale hash's
// upgrade and a password change's new hash are made in the same slot.
func TestRightPasswordPastDeadlineNotCounted(t *testing.T) {
	s := newTestServer(t, map[string]string{"LOGIN_LOCK_AFTER": "3", "TRUSTED_PROXIES": "10.0.0.0/8"},
		func(c *config) { c.requestTimeout = 20 * time.Millisecond })
	a := register(t, s)
	slow := djangoHash(t, a.password, "SlowSaltSlowSalt", 400_000) // tens of milliseconds: past the deadline
	if _, err := testDB.ExecContext(t.Context(), `UPDATE users SET password = $2 WHERE id = $1`, a.id, slow); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		res := do(t, s, fromIP("203.0.113.78", loginReq(a.username, a.password)))
		if res.status != http.StatusOK {
			t.Fatalf("login %d with the right password past the deadline: status %d, body %s", i+1, res.status, res.body)
		}
		pairOf(t, res)
	}
	var failures int
	if err := testDB.QueryRowContext(t.Context(), `SELECT coalesce(sum(failures), 0) FROM login_attempts WHERE name = lower($1)`, a.username).Scan(&failures); err != nil || failures != 0 {
		t.Fatalf("runs after five right passwords: %d failures (%v), want 0", failures, err)
	}
}
