package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"mime"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/lib/pq"
	"github.com/lib/pq/pqerror"
)

// maxBody caps every request body; larger ones are answered 413.
const maxBody = 64 << 10

// ServeHTTP runs every request through the API's order of checks, first
// answer wins:
//
//	Host (400) → CORS preflight (204) → routing (404, slash redirect, 405)
//	→ body size (413) → who is asking → rate limit (429) → authentication (401)
//	→ a malformed {id} of a GET, HEAD or DELETE (404)
//	→ the handler: permission (403), content type (415), parsing (400), work.
//
// A malformed {id} (not a positive int64) is the 404 of a missing row, given
// where that row's 404 comes but before any statement: in route.serve for
// GET, HEAD and DELETE; for a patient's PUT or PATCH after the body's 415 and
// 400; for a doctor's PUT or PATCH before its 403 (mayChangeDoctor).
//
// Recovery, the access log and the response headers wrap all of it, so that
// every answer, even a panic's, is JSON, logged and hardened. The cheap
// rejections come first, so that garbage costs as little as possible.
func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	// A request id is random, not a counter, so that it tells a client
	// nothing about how busy the server is.
	info := &requestInfo{id: rand.Text()}
	info.clientIP, info.https = s.clientIP(r)
	r = r.WithContext(context.WithValue(r.Context(), infoKey{}, info))
	sw := &statusWriter{ResponseWriter: w}
	defer func() {
		if p := recover(); p != nil {
			s.log.Error("panic", "request_id", info.id, "panic", p)
			if sw.status == 0 {
				writeJSON(sw, http.StatusInternalServerError, detail("A server error occurred."))
			}
		}
		s.log.Info("request", "method", r.Method, "route", info.route, "status", sw.status,
			"bytes", sw.bytes, "duration_ms", float64(time.Since(start).Microseconds())/1000,
			"user_id", info.userID, "login_id", info.loginID, "client_ip", info.clientIP.String(),
			"request_id", info.id)
	}()
	s.setHeaders(sw, r, info)
	h, _ := s.mux.Handler(r)
	_, routed := h.(route)
	switch {
	case r.URL.Path != "/healthz" && r.URL.Path != "/readyz" && !s.hostAllowed(r.Host):
		writeJSON(sw, http.StatusBadRequest, detail("Invalid host header."))
	case r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" &&
		sw.Header().Get("Access-Control-Allow-Origin") != "": // a preflight from an origin setHeaders allowed
		sw.Header().Set("Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, OPTIONS")
		sw.Header().Set("Access-Control-Allow-Headers", "Authorization, Content-Type, If-Match, If-None-Match")
		sw.Header().Set("Access-Control-Max-Age", "86400")
		sw.WriteHeader(http.StatusNoContent)
	case !routed:
		s.unrouted(sw, r, h)
	default:
		s.mux.ServeHTTP(sw, r) // to route.ServeHTTP
	}
}

// unrouted answers a request the mux has no route for, in JSON rather than
// the mux's plain text: a redirect to the slashed path, 204 for OPTIONS on a
// known path, 405 with Allow, or 404.
func (s *server) unrouted(w http.ResponseWriter, r *http.Request, h http.Handler) {
	if p := r.URL.Path; strings.HasPrefix(p, "/api/") && !strings.HasSuffix(p, "/") {
		slashed := r.Clone(r.Context())
		slashed.URL = &url.URL{Path: p + "/", RawQuery: r.URL.RawQuery} // "/api/x?" goes to "/api/x/", without the empty query
		sh, _ := s.mux.Handler(slashed)
		if _, routed := sh.(route); routed || muxAnswer(sh, slashed).status == http.StatusMethodNotAllowed {
			w.Header().Set("Location", slashed.URL.RequestURI()) // the path, and "?query" if there is one
			writeJSON(w, http.StatusPermanentRedirect, detail("Use the path that ends in a slash."))
			return
		}
	}
	ans := muxAnswer(h, r)
	switch {
	case ans.status == http.StatusMethodNotAllowed && r.Method == http.MethodOptions:
		w.Header().Set("Allow", ans.header.Get("Allow")+", OPTIONS")
		w.WriteHeader(http.StatusNoContent)
	case ans.status == http.StatusMethodNotAllowed:
		w.Header().Set("Allow", ans.header.Get("Allow")+", OPTIONS")
		writeJSON(w, http.StatusMethodNotAllowed, detail(fmt.Sprintf("Method %q not allowed.", r.Method)))
	default: // the mux's 404, or its redirect to a cleaned path (/api//x/): a path no route has
		writeJSON(w, http.StatusNotFound, detail("Not found."))
	}
}

// muxAnswer runs one of the mux's own handlers (404, 405, redirect) to learn
// its status and headers, discarding its plain-text body.
func muxAnswer(h http.Handler, r *http.Request) *headerRecorder {
	rec := &headerRecorder{header: http.Header{}}
	h.ServeHTTP(rec, r)
	return rec
}

// headerRecorder keeps the status and headers a handler writes.
type headerRecorder struct {
	header http.Header
	status int
}

func (h *headerRecorder) Header() http.Header         { return h.header }
func (h *headerRecorder) Write(b []byte) (int, error) { return len(b), nil }
func (h *headerRecorder) WriteHeader(status int)      { h.status = status }

// setHeaders adds the security and CORS headers every response carries.
func (s *server) setHeaders(w http.ResponseWriter, r *http.Request, info *requestInfo) {
	h := w.Header()
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "same-origin")
	h.Set("Cross-Origin-Opener-Policy", "same-origin")
	h.Set("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Request-Id", info.id)
	if info.https {
		h.Set("Strict-Transport-Security", "max-age=31536000; includeSubDomains; preload")
	}
	h.Add("Vary", "Origin")
	// Only a listed origin is echoed back; reflecting any origin would let
	// every web page read the API's answers.
	if origin := r.Header.Get("Origin"); origin != "" && slices.Contains(s.cfg.corsOrigins, origin) {
		h.Set("Access-Control-Allow-Origin", origin)
		// So that a page can send the tag back in If-Match, wait as long as
		// it is told, and quote the request id.
		h.Set("Access-Control-Expose-Headers", "ETag, Retry-After, X-Request-Id")
	}
}

// hostAllowed checks Host against ALLOWED_HOSTS, as Django does, so that
// links built from Host (pagination) cannot be pointed at another site.
func (s *server) hostAllowed(host string) bool {
	if _, port, err := net.SplitHostPort(host); err == nil {
		host = host[:len(host)-len(port)-1] // an IPv6 literal keeps its brackets, as ALLOWED_HOSTS writes it
	}
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	// "*" allows any host; ".example.com" allows example.com and its subdomains.
	return slices.ContainsFunc(s.cfg.allowedHosts, func(a string) bool {
		return a == "*" || a == host || strings.HasPrefix(a, ".") && (host == a[1:] || strings.HasSuffix(host, a))
	})
}

// clientIP returns the client IP (the limits key on its source) and whether
// the request arrived over HTTPS. X-Forwarded-For and X-Forwarded-Proto are
// only read from a trusted proxy, and then the client IP is the right-most
// address not itself a proxy: the left part of the header is whatever the
// client chose to write.
func (s *server) clientIP(r *http.Request) (netip.Addr, bool) {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	ip := ap.Addr().Unmap().WithZone("")
	if err != nil || !s.trusted(ip) {
		return ip, r.TLS != nil
	}
	https := r.TLS != nil || strings.EqualFold(r.Header.Get("X-Forwarded-Proto"), "https")
	hops := strings.Split(strings.Join(r.Header.Values("X-Forwarded-For"), ","), ",")
	for i := len(hops) - 1; i >= 0 && s.trusted(ip); i-- {
		h := strings.TrimSpace(hops[i])
		hop, err := netip.ParseAddr(strings.Trim(h, `[]"`))  // also "[ipv6]" and a quoted address
		if ap, err2 := netip.ParseAddrPort(h); err2 == nil { // as some proxies write it: ip:port, [ipv6]:port
			hop, err = ap.Addr(), nil
		}
		// A hop that is no address makes every client of that proxy one
		// source: said in the log, at most once a minute.
		if last, now := s.hopWarned.Load(), time.Now().Unix(); err != nil && h != "" && now-last >= 60 && s.hopWarned.CompareAndSwap(last, now) {
			s.log.Warn("X-Forwarded-For hop is no address: the request counts as the proxy's own", "hop", h[:min(len(h), 100)])
		}
		if err != nil {
			break // stop at the last address we could trust
		}
		ip = hop.Unmap().WithZone("")
	}
	return ip, https
}

// trusted reports whether ip is in TRUSTED_PROXIES.
func (s *server) trusted(ip netip.Addr) bool {
	return slices.ContainsFunc(s.cfg.trustedProxies, func(p netip.Prefix) bool { return p.Contains(ip) })
}

// requestInfo is what the layers learn about a request, shared through its
// context: set up front, completed by authentication, read by the log.
type requestInfo struct {
	id       string
	route    string // the matched pattern, for the log
	clientIP netip.Addr
	https    bool
	userID   int64
	loginID  int64  // the login (the tokens' sid)
	body     []byte // the request body, read within its cap by route.serve
}

type infoKey struct{}

func infoFrom(r *http.Request) *requestInfo { return r.Context().Value(infoKey{}).(*requestInfo) }

// statusWriter records the status and size of a response for the log.
type statusWriter struct {
	http.ResponseWriter
	status int
	bytes  int
}

func (w *statusWriter) WriteHeader(status int) {
	if w.status == 0 {
		w.status = status
	}
	w.ResponseWriter.WriteHeader(status)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(b)
	w.bytes += n
	return n, err
}

// access says who may call a route and which limits apply.
type access int

const (
	public     access = iota // no token needed; the anonymous limit applies
	private                  // a valid access token needed; the user limit applies
	probe                    // health checks: no token, no limit
	refreshing               // public, but a refresh token with a valid signature counts against its user's limit
)

// handler is a route's work: it writes only success, and returns any other
// answer as an error for fail to write.
type handler func(w http.ResponseWriter, r *http.Request) error

// route is a handler registered in addRoutes, wrapped with the checks that
// follow routing: who is asking, the rate limit, and authentication.
type route struct {
	s      *server
	access access
	h      handler
}

func (rt route) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	infoFrom(r).route = r.Pattern
	if err := rt.serve(w, r); err != nil {
		rt.s.fail(w, r, err)
	}
}

// serve applies the checks that follow routing, then runs the handler within
// the request timeout.
func (rt route) serve(w http.ResponseWriter, r *http.Request) error {
	info := infoFrom(r)
	if r.ContentLength != 0 {
		// Read the body once, here, within its cap, so that an oversized body
		// is refused before authentication; decodeBody reads it from info.
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
		if errors.As(err, new(*http.MaxBytesError)) {
			return &apiError{status: http.StatusRequestEntityTooLarge, body: detail("Request body is too large.")}
		}
		if err != nil {
			return &apiError{status: http.StatusBadRequest, body: detail("Could not read the request body.")}
		}
		info.body = body
	}
	ctx, cancel := context.WithTimeout(r.Context(), rt.s.cfg.requestTimeout)
	defer cancel()
	r = r.WithContext(ctx)
	var authErr error
	switch rt.access {
	case probe: // no token, no limit
		return rt.h(w, r)
	case private: // public routes ignore Authorization: an expired token sent along must not break login
		authErr = rt.s.authenticate(r, info)
	case refreshing: // a clinic behind one client IP must not share one anonymous budget for its refreshes
		if c, err := rt.s.refreshClaims(r); err == nil || err == errExpired { // signed, so its user's
			info.userID = c.UserID
		}
	}
	lim, key := rt.s.anonLimit, bySource(info.clientIP)
	if info.userID != 0 {
		lim, key = rt.s.userLimit, rateKey{user: info.userID}
	}
	if wait, ok := lim.allow(key); !ok {
		return throttled(wait) // before any statement: an ended login's token is still its user's
	}
	if authErr != nil {
		return authErr
	}
	// A malformed {id} names no row: 404 before any statement. PUT and PATCH
	// say it where the body's checks or a 403 come first (ServeHTTP).
	if m := r.Method; m != http.MethodPut && m != http.MethodPatch && r.PathValue("id") != "" && pathID(r) == 0 {
		return errNotFound
	}
	return rt.h(w, r)
}

// countFailures wraps a handler that checks a password: the attempt counts
// against the login limit before the password is checked, so that
// concurrent guesses cannot overshoot it, and is given back unless the
// answer is wrong, the handler's error for a wrong password.
func (s *server) countFailures(wrong error, h handler) handler {
	return func(w http.ResponseWriter, r *http.Request) error {
		key := bySource(infoFrom(r).clientIP)
		if wait, ok := s.loginLimit.allow(key); !ok {
			return throttled(wait)
		}
		err := h(w, r)
		if err != wrong {
			s.loginLimit.undo(key)
		}
		return err
	}
}

// rate is a limit of n requests per period; n == 0 switches the limit off.
type rate struct {
	n      int
	period time.Duration
}

// rateKey is what a limiter counts by: a source or a user. It holds no
// pointer, so a full limiter gives the garbage collector nothing to scan.
type rateKey struct {
	source [16]byte
	user   int64
}

// sourceOf is the source a client IP counts as, in the rate limits and the
// runs of failed logins: an IPv6 address by its /64, which one subscriber
// usually holds whole (keying single addresses would give each 2^64 budgets).
func sourceOf(ip netip.Addr) netip.Addr {
	p, _ := ip.Prefix(min(ip.BitLen(), 64)) // an IPv4 address whole
	return p.Addr()
}

func bySource(ip netip.Addr) rateKey { return rateKey{source: sourceOf(ip).As16()} }

// limiter is a sliding-window rate limiter: the count over the last period
// is estimated from the current fixed window plus the previous one weighted
// by how much of it the period still covers. Keys live in two generations:
// a key is looked up in both and kept in the young one; when the young one
// holds maxKeys/2 keys, the old generation is dropped whole. So at most
// maxKeys keys are kept, and those untouched longest go first.
type limiter struct {
	rate    rate
	maxKeys int
	now     func() time.Time

	mu         sync.Mutex
	young, old map[rateKey]window
}

// window counts one key's requests in the current and previous fixed windows.
type window struct {
	index     int64 // which fixed window cur counts
	cur, prev int32
}

func newLimiter(r rate, maxKeys int) *limiter {
	if r.n == 0 {
		return nil
	}
	return &limiter{rate: r, maxKeys: maxKeys, now: time.Now, young: map[rateKey]window{}, old: map[rateKey]window{}}
}

// allow counts a request for key when the limit lets it through, and
// otherwise says how long until it would. A nil limiter allows everything.
func (l *limiter) allow(key rateKey) (wait time.Duration, ok bool) {
	if l == nil {
		return 0, true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	w, elapsed := l.window(key)
	period, limit := float64(l.rate.period), float64(l.rate.n)
	weight := 1 - float64(elapsed)/period
	if float64(w.prev)*weight+float64(w.cur) < limit {
		w.cur++
		l.young[key] = w
		return 0, true
	}
	// How long until the estimate drops below the limit: within this window
	// if the previous one's share can fade enough, else into the next. Round
	// up, or Retry-After can come out a whole second short.
	if int(w.cur) < l.rate.n {
		need := 1 - (limit-float64(w.cur))/float64(w.prev)
		return time.Duration(math.Ceil(need*period)) - elapsed + 1, false
	}
	need := 1 - limit/float64(w.cur)
	return l.rate.period - elapsed + time.Duration(math.Ceil(need*period)) + 1, false
}

// undo takes back one counted request, as a successful login does.
func (l *limiter) undo(key rateKey) {
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	w, _ := l.window(key)
	if w.cur > 0 {
		w.cur--
	} else if w.prev > 0 {
		w.prev--
	}
	l.young[key] = w
}

// window returns key's counters rolled forward to now, stored in the young
// generation, and how far into the current fixed window now is. allow and
// undo hold l.mu.
func (l *limiter) window(key rateKey) (window, time.Duration) {
	now := l.now().UnixNano()
	index := now / int64(l.rate.period)
	w, ok := l.young[key]
	if !ok {
		w, ok = l.old[key]
		delete(l.old, key)
		if len(l.young) >= max(1, l.maxKeys/2) {
			l.old, l.young = l.young, make(map[rateKey]window, len(l.young))
		}
	}
	switch {
	case !ok || w.index < index-1:
		w = window{index: index}
	case w.index == index-1:
		w = window{index: index, prev: w.cur}
	}
	l.young[key] = w
	return w, time.Duration(now % int64(l.rate.period))
}

// apiError is an answer other than success: a status and its JSON body.
type apiError struct {
	status     int
	body       any
	retryAfter int // seconds; 0 for none
}

func (e *apiError) Error() string { return fmt.Sprintf("%d %v", e.status, e.body) }

// fieldErrors are DRF's validation errors: field name → messages.
type fieldErrors map[string][]string

func (e fieldErrors) Error() string { return fmt.Sprint(map[string][]string(e)) }

func (e fieldErrors) add(field, msg string) { e[field] = append(e[field], msg) }

// detail is the {"detail": …} shape of every non-field error.
func detail(msg string) map[string]string { return map[string]string{"detail": msg} }

var (
	errNotFound     = &apiError{status: http.StatusNotFound, body: detail("Not found.")}
	errInvalidPage  = &apiError{status: http.StatusNotFound, body: detail("Invalid page.")}
	errForbidden    = &apiError{status: http.StatusForbidden, body: detail("You do not have permission to perform this action.")}
	errUnavailable  = &apiError{status: http.StatusServiceUnavailable, body: detail("Service temporarily unavailable."), retryAfter: 5}
	errServerFailed = &apiError{status: http.StatusInternalServerError, body: detail("A server error occurred.")}
)

func throttled(wait time.Duration) *apiError {
	n := max(1, int(math.Ceil(wait.Seconds())))
	msg := fmt.Sprintf("Request was throttled. Expected available in %d seconds.", n)
	if n == 1 {
		msg = "Request was throttled. Expected available in 1 second."
	}
	return &apiError{status: http.StatusTooManyRequests, body: detail(msg), retryAfter: n}
}

// fail writes err as the API's answer, and runs no statement. Causes
// the client must not see (driver text, SQL) go to the log only.
func (s *server) fail(w http.ResponseWriter, r *http.Request, err error) {
	// A key the statement ran into: the client's conflict.
	if e := pq.As(err, pqerror.UniqueViolation); e != nil && conflicts[e.Constraint] != nil {
		err = conflicts[e.Constraint]
	}
	var fe fieldErrors
	var ae *apiError
	switch {
	case errors.As(err, &fe):
		ae = &apiError{status: http.StatusBadRequest, body: fe}
	case errors.As(err, &ae):
	case pq.As(err, "HC401") != nil: // login_live's refusal (schema.sql): the login has ended
		ae = errAccessInvalid
	case isUnavailable(err):
		s.log.Warn("database unavailable", "request_id", infoFrom(r).id, "err", err)
		ae = errUnavailable
	default:
		s.log.Error("request failed", "request_id", infoFrom(r).id, "err", err)
		ae = errServerFailed
	}
	if ae.retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(ae.retryAfter))
	}
	if ae.status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="api"`)
	}
	writeJSON(w, ae.status, ae.body)
}

// writeJSON marshals v before touching the headers, so an encoding failure
// can still become a clean 500.
func writeJSON(w http.ResponseWriter, status int, v any) error {
	body, err := json.Marshal(v)
	if err != nil {
		status, body = http.StatusInternalServerError, []byte(`{"detail":"A server error occurred."}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	w.Write(body)
	return nil
}

// noContent writes 204.
func noContent(w http.ResponseWriter) error {
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// The field readers below serve every resource's body: each reads one
// member, checks it as DRF would, and adds any problem to errs.

// members are a JSON object body's members, read one by one with their
// types checked (encoding/json into a struct would match keys
// case-insensitively and report only the first error).
type members map[string]json.RawMessage

// decodeBody reads the request body (read by route.serve) as a JSON object. An
// empty body is {}.
func decodeBody(r *http.Request) (members, error) {
	body := infoFrom(r).body
	if len(bytes.TrimSpace(body)) == 0 {
		return members{}, nil
	}
	ct := r.Header.Get("Content-Type")
	if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
		return nil, &apiError{status: http.StatusUnsupportedMediaType, body: detail(fmt.Sprintf("Unsupported media type %q in request.", ct))}
	}
	var f members
	dec := json.NewDecoder(bytes.NewReader(body))
	err := dec.Decode(&f)
	why := ""
	switch {
	case !utf8.Valid(body): // encoding/json would silently replace it
		why = "invalid UTF-8"
	case errors.As(err, new(*json.UnmarshalTypeError)) || err == nil && f == nil: // another JSON value, or null
		why = "the body must be a JSON object"
	case err != nil:
		why = err.Error()
	case dec.InputOffset() < int64(len(bytes.TrimRight(body, " \t\r\n"))): // JSON's whitespace only
		why = "trailing data after the JSON object"
	}
	if why != "" {
		return nil, &apiError{status: http.StatusBadRequest, body: detail("JSON parse error - " + why)}
	}
	return f, nil
}

// pathID reads the {id} path value, or 0 when it is not a positive integer
// that fits int64: an id no row has.
func pathID(r *http.Request) int64 {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil || id < 1 {
		return 0
	}
	return id
}

// str reads a string member; required adds an error when it is absent. ok
// is false when the member is absent or unusable, in which case any
// problem is already in errs.
func (f members) str(key string, required bool, errs fieldErrors) (v string, ok bool) {
	raw, present := f[key]
	switch {
	case !present:
		if required {
			errs.add(key, "This field is required.")
		}
	case string(raw) == "null":
		errs.add(key, "This field may not be null.")
	case json.Unmarshal(raw, &v) != nil:
		errs.add(key, "Not a valid string.")
	case strings.ContainsRune(v, 0): // PostgreSQL cannot store NUL in text; refused as DRF does
		errs.add(key, "Null characters are not allowed.")
	default:
		return v, true
	}
	return "", false
}

// required reads a string that must be present and not blank; it is used
// as sent (passwords and tokens are not trimmed).
func (f members) required(key string, errs fieldErrors) string {
	v, ok := f.str(key, true, errs)
	if ok && strings.TrimSpace(v) == "" {
		errs.add(key, "This field may not be blank.")
	}
	return v
}

// text reads a free-text member: tags stripped, ends trimmed, then checked
// for length in characters. nil means absent or invalid.
func (f members) text(key string, required bool, minLen, maxLen int, errs fieldErrors) *string {
	return f.trimmed(key, required, minLen, maxLen, stripTags, errs)
}

// trimmed reads a string member, changed by clean and its ends trimmed, then
// checks its length in characters: blank only if neither required nor
// minLen forbids it. nil means absent or invalid.
func (f members) trimmed(key string, required bool, minLen, maxLen int, clean func(string) string, errs fieldErrors) *string {
	v, ok := f.str(key, required, errs)
	if !ok {
		return nil
	}
	v = strings.TrimSpace(clean(v))
	switch n := utf8.RuneCountInString(v); {
	case n == 0 && (required || minLen > 0):
		errs.add(key, "This field may not be blank.")
	case n > maxLen:
		errs.add(key, fmt.Sprintf("Ensure this field has no more than %d characters.", maxLen))
	case n < minLen:
		errs.add(key, fmt.Sprintf("Ensure this field has at least %d characters.", minLen))
	default:
		return &v
	}
	return nil
}

// stripTags removes every tag: '<' followed by a letter, '/', '!' or '?', up
// to the next '>'. Other '<' stay ("Tom <3 Jerry"). It works as if removal
// were repeated until nothing changes, in one pass: after a tag goes, a '<'
// before it may start a new one with what follows. A tag left open takes
// the rest of the text with it.
func stripTags(s string) string {
	out := make([]byte, 0, len(s))
	open := -1 // where the tag being read starts in out
	for _, c := range s {
		if c == '>' && open >= 0 {
			out, open = out[:open], -1
			continue
		}
		if open < 0 && len(out) > 0 && out[len(out)-1] == '<' && (unicode.IsLetter(c) || c == '/' || c == '!' || c == '?') {
			open = len(out) - 1
		}
		out = utf8.AppendRune(out, c)
	}
	if open >= 0 {
		out = out[:open]
	}
	return string(out)
}

// emailRE is Django's EmailValidator without its IDN and IP-literal cases:
// a dot-atom local part, dot-separated host labels, a TLD of 2–63 characters.
var emailRE = regexp.MustCompile(`^[-!#$%&'*+/=?^_` + "`" + `{}|~0-9a-z]+(\.[-!#$%&'*+/=?^_` + "`" + `{}|~0-9a-z]+)*` +
	`@([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{1,62}[a-z0-9]$`)

var usernameRE = regexp.MustCompile(`^[\p{L}\p{N}@.+\-_]+$`)

// email reads an address, trimmed and lower-cased, at most 254 characters.
func (f members) email(key string, required bool, errs fieldErrors) *string {
	return f.matching(key, required, strings.ToLower, 1, 254, emailRE, "Enter a valid email address.", errs)
}

const invalidUsername = "Enter a valid username. This value may contain only letters, numbers, and @/./+/-/_ characters."

// username reads Django's username, trimmed only: 1–150 letters, digits
// and @.+-_.
func (f members) username(key string, errs fieldErrors) string {
	return deref(f.matching(key, true, strings.TrimSpace, 1, 150, usernameRE, invalidUsername, errs))
}

// matching reads a string as trimmed does, then checks that re matches it,
// unless it is empty (which minLen 0 allows); nil means absent or invalid.
func (f members) matching(key string, required bool, clean func(string) string, minLen, maxLen int,
	re *regexp.Regexp, invalid string, errs fieldErrors) *string {
	v := f.trimmed(key, required, minLen, maxLen, clean, errs)
	if v != nil && *v != "" && !re.MatchString(*v) {
		errs.add(key, invalid)
		return nil
	}
	return v
}

// pk reads a primary key given as a JSON integer or a string of digits; as
// in DRF, a leading - is read too, and names no row ("Invalid pk").
// ok is false when it is unusable; text is the value as the client wrote it,
// for the "does not exist" message.
func (f members) pk(key string, errs fieldErrors) (id int64, text string, ok bool) {
	raw, present := f[key]
	text = string(raw) // a number as written, or a string's contents
	if present && raw[0] == '"' {
		json.Unmarshal(raw, &text)
	}
	switch {
	case !present:
		errs.add(key, "This field is required.")
	case string(raw) == "null":
		errs.add(key, "This field may not be null.")
	case text == "" || strings.Trim(strings.TrimPrefix(text, "-"), "0123456789") != "":
		// DRF names the type it received; raw is one valid JSON value
		// (decodeBody checked it), so its first byte tells.
		got := cmp.Or(map[byte]string{'"': "str", '[': "list", '{': "dict", 't': "bool", 'f': "bool"}[raw[0]], "float")
		errs.add(key, "Incorrect type. Expected pk value, received "+got+".")
	default:
		id, err := strconv.ParseInt(text, 10, 64)
		if err != nil { // beyond int64: a well-formed id no row can have
			id = 0
		}
		return id, text, true
	}
	return 0, "", false
}

// date reads date_of_birth: YYYY-MM-DD, not in the future, not before
// 1900, or null, read as "". nil means absent or invalid.
func (f members) date(key string, errs fieldErrors) *string {
	if string(f[key]) == "null" {
		return new(string)
	}
	s, ok := f.str(key, false, errs)
	if !ok {
		return nil
	}
	d, err := time.Parse(time.DateOnly, strings.TrimSpace(s))
	switch {
	case err != nil:
		errs.add(key, "Date has wrong format. Use one of these formats instead: YYYY-MM-DD.")
	case d.After(time.Now().UTC()):
		errs.add(key, "Date of birth cannot be in the future.")
	case d.Year() < 1900:
		errs.add(key, "Date of birth cannot be before 1900-01-01.")
	default:
		s = d.Format(time.DateOnly)
		return &s
	}
	return nil
}

// phoneRE: an optional leading +, then 10–15 digits, each perhaps
// followed by spaces, dashes, dots or parentheses.
var phoneRE = regexp.MustCompile(`^\+?[ ().\-]*([0-9][ ().\-]*){10,15}$`)

// phone reads a phone number as sent, trimmed: empty, or phoneRE's shape in
// at most 32 characters.
func (f members) phone(key string, errs fieldErrors) *string {
	return f.matching(key, false, strings.TrimSpace, 0, 32, phoneRE,
		"Enter a valid phone number: 10 to 15 digits, optionally a leading + and spaces, dashes, dots or parentheses.", errs)
}

// readPerson reads the body that patients and doctors share, a person's
// (doctor: a doctor's), as its statement's values by name: nil where a
// field is not given, "" for a null date_of_birth. Only PATCH may leave out
// the required fields.
func readPerson(r *http.Request, doctor bool) (args, error) {
	f, err := decodeBody(r)
	if err != nil {
		return nil, err
	}
	required, errs := r.Method != http.MethodPatch, fieldErrors{}
	in := args{
		"first_name": f.text("first_name", required, 1, 100, errs),
		"last_name":  f.text("last_name", false, 0, 100, errs),
		"email":      f.email("email", required, errs),
	}
	if doctor {
		in["specialization"] = f.text("specialization", required, 3, 120, errs)
	} else {
		in["date_of_birth"], in["phone"] = f.date("date_of_birth", errs), f.phone("phone", errs)
	}
	if len(errs) > 0 {
		return nil, errs
	}
	return in, nil
}
