package main

import (
	"bytes"
	"container/list"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"mime"
	"net/http"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"
)

// maxBody caps every request body; larger ones are answered 413.
const maxBody = 64 << 10

// ServeHTTP runs every request through the contract's order of checks, first
// answer wins:
//
//	Host (400) → CORS preflight (204) → routing (404, slash redirect, 405)
//	→ body size (413) → who is asking → rate limit (429) → authentication (401)
//	→ the handler: permission (403), content type (415), parsing (400), work.
//
// Recovery, the access log and the response headers wrap all of it, so that
// every answer, even a panic's, is JSON, logged and hardened. The checks
// before routing need no database; the cheap rejections come first so that
// garbage costs as little as possible.
func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	info := &requestInfo{id: newRequestID()}
	info.clientIP, info.https = s.clientIP(r)
	r = r.WithContext(context.WithValue(r.Context(), infoKey{}, info))
	sw := &statusWriter{ResponseWriter: w}
	defer func() {
		if p := recover(); p != nil {
			if p == http.ErrAbortHandler {
				panic(p)
			}
			s.log.Error("panic", "request_id", info.id, "panic", p)
			if sw.status == 0 {
				writeJSON(sw, http.StatusInternalServerError, detail("A server error occurred."))
			}
		}
		s.log.Info("request", "method", r.Method, "route", info.route, "status", sw.status,
			"bytes", sw.bytes, "duration_ms", float64(time.Since(start).Microseconds())/1000,
			"user_id", info.userID, "request_id", info.id)
	}()
	s.setHeaders(sw, r, info)
	s.dispatch(sw, r)
}

// dispatch applies the checks up to routing and the body cap, then hands the
// request to its route.
func (s *server) dispatch(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/healthz" && r.URL.Path != "/readyz" && !s.hostAllowed(r.Host) {
		writeJSON(w, http.StatusBadRequest, detail("Invalid host header."))
		return
	}
	if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" &&
		s.originAllowed(r.Header.Get("Origin")) {
		h := w.Header()
		h.Set("Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, OPTIONS")
		h.Set("Access-Control-Allow-Headers", "Authorization, Content-Type")
		h.Set("Access-Control-Max-Age", "86400")
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if h, _ := s.mux.Handler(r); !isRoute(h) {
		s.unrouted(w, r, h)
		return
	}
	if r.ContentLength > maxBody {
		writeJSON(w, http.StatusRequestEntityTooLarge, detail("Request body is too large."))
		return
	}
	if r.ContentLength != 0 {
		// Read the body now, within its cap, so that an oversized chunked body
		// is refused here rather than after authentication.
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			writeJSON(w, http.StatusRequestEntityTooLarge, detail("Request body is too large."))
			return
		}
		if err != nil {
			writeJSON(w, http.StatusBadRequest, detail("Could not read the request body."))
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
	}
	ctx, cancel := context.WithTimeout(r.Context(), s.cfg.requestTimeout)
	defer cancel()
	s.mux.ServeHTTP(w, r.WithContext(ctx))
}

// unrouted answers a request the mux has no route for, in JSON rather than
// the mux's plain text: a redirect to the slashed path, 204 for OPTIONS on a
// known path, 405 with Allow, or 404.
func (s *server) unrouted(w http.ResponseWriter, r *http.Request, h http.Handler) {
	if p := r.URL.Path; strings.HasPrefix(p, "/api/") && !strings.HasSuffix(p, "/") {
		slashed := r.Clone(r.Context())
		slashed.URL.Path += "/"
		slashed.URL.RawPath = ""
		if sh, _ := s.mux.Handler(slashed); isRoute(sh) || muxAnswer(sh, slashed).status == http.StatusMethodNotAllowed {
			target := slashed.URL.EscapedPath()
			if r.URL.RawQuery != "" {
				target += "?" + r.URL.RawQuery
			}
			w.Header().Set("Location", target)
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
	case ans.status >= 300 && ans.status < 400: // the mux cleaning a path such as /api//x/
		w.Header().Set("Location", ans.header.Get("Location"))
		writeJSON(w, ans.status, detail("Use the canonical path."))
	default:
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
	if origin := r.Header.Get("Origin"); s.originAllowed(origin) {
		h.Set("Access-Control-Allow-Origin", origin)
	}
}

func (s *server) originAllowed(origin string) bool {
	if origin == "" {
		return false
	}
	for _, o := range s.cfg.corsOrigins {
		if o == origin {
			return true
		}
	}
	return false
}

// hostAllowed checks Host against ALLOWED_HOSTS, as Django does, so that
// links built from Host (pagination) cannot be pointed at another site.
func (s *server) hostAllowed(host string) bool {
	if h, _, err := splitHostPort(host); err == nil {
		host = h
	}
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	for _, a := range s.cfg.allowedHosts {
		switch {
		case a == "*", a == host:
			return true
		case strings.HasPrefix(a, ".") && (host == a[1:] || strings.HasSuffix(host, a)):
			return true
		}
	}
	return false
}

// splitHostPort splits "host:port" and "[v6]:port", keeping the brackets of
// an IPv6 literal so it compares equal to "[::1]" in ALLOWED_HOSTS.
func splitHostPort(hostport string) (host, port string, err error) {
	i := strings.LastIndexByte(hostport, ':')
	if i < 0 || strings.HasSuffix(hostport[:i], ":") || (strings.Contains(hostport, "[") && !strings.HasSuffix(hostport[:i], "]")) {
		return "", "", errors.New("no port")
	}
	return hostport[:i], hostport[i+1:], nil
}

// clientIP returns the address the rate limits key on, and whether the
// request arrived over HTTPS. X-Forwarded-For and X-Forwarded-Proto are only
// read from a trusted proxy, and then the client is the right-most address
// not itself a proxy: the left part of the header is whatever the client
// chose to write.
func (s *server) clientIP(r *http.Request) (netip.Addr, bool) {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}, r.TLS != nil
	}
	ip := ap.Addr().Unmap().WithZone("")
	if !s.trusted(ip) {
		return ip, r.TLS != nil
	}
	https := r.TLS != nil || strings.EqualFold(r.Header.Get("X-Forwarded-Proto"), "https")
	hops := strings.Split(strings.Join(r.Header.Values("X-Forwarded-For"), ","), ",")
	for i := len(hops) - 1; i >= 0; i-- {
		hop, err := netip.ParseAddr(strings.TrimSpace(hops[i]))
		if err != nil {
			break // a malformed hop: stop at the last address we could trust
		}
		ip = hop.Unmap().WithZone("")
		if !s.trusted(ip) {
			break
		}
	}
	return ip, https
}

func (s *server) trusted(ip netip.Addr) bool {
	for _, p := range s.cfg.trustedProxies {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// requestInfo is what the layers learn about a request, shared through its
// context: set up front, completed by authentication, read by the log.
type requestInfo struct {
	id        string
	route     string // the matched pattern, for the log
	clientIP  netip.Addr
	https     bool
	userID    int64
	sessionID int64
}

type infoKey struct{}

func infoFrom(r *http.Request) *requestInfo {
	info, _ := r.Context().Value(infoKey{}).(*requestInfo)
	if info == nil {
		info = &requestInfo{}
	}
	return info
}

// requestScheme is the scheme the client used, for absolute links.
func requestScheme(r *http.Request) string {
	if infoFrom(r).https {
		return "https"
	}
	return "http"
}

// newRequestID is random, not a counter, so that it tells a client nothing
// about how busy the server is.
func newRequestID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

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

// Unwrap lets http.ResponseController reach the connection.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// access says who may call a route and which limits apply.
type access int

const (
	public  access = iota // no token needed; the anonymous limit applies
	private               // a valid access token needed; the user limit applies
	probe                 // health checks: no token, no limit
)

// route is a handler registered in addRoutes, wrapped with the checks that
// follow routing: who is asking, the rate limit, and authentication.
type route struct {
	s      *server
	access access
	h      http.Handler
}

func isRoute(h http.Handler) bool {
	_, ok := h.(route)
	return ok
}

func (rt route) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s, info := rt.s, infoFrom(r)
	info.route = r.Pattern
	if rt.access == probe {
		rt.h.ServeHTTP(w, r)
		return
	}
	var authErr error
	if rt.access == private {
		// Public routes ignore Authorization: an expired token that a client
		// library sends along must not break login.
		authErr = s.authenticate(r, info)
		if authErr != nil && !isAuthFailure(authErr) {
			s.fail(w, r, authErr)
			return
		}
	}
	lim, key := s.anonLimit, ipKey(info.clientIP)
	if info.userID != 0 {
		lim, key = s.userLimit, rateKey{user: info.userID}
	}
	if wait, ok := lim.allow(key); !ok {
		s.fail(w, r, throttled(wait))
		return
	}
	if authErr != nil {
		s.fail(w, r, authErr)
		return
	}
	rt.h.ServeHTTP(w, r)
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

// detailBody is the {"detail": …} shape of every non-field error.
type detailBody struct {
	Detail string `json:"detail"`
	Code   string `json:"code,omitempty"`
}

func detail(msg string) detailBody { return detailBody{Detail: msg} }

var (
	errNotFound     = &apiError{status: http.StatusNotFound, body: detail("Not found.")}
	errInvalidPage  = &apiError{status: http.StatusNotFound, body: detail("Invalid page.")}
	errForbidden    = &apiError{status: http.StatusForbidden, body: detail("You do not have permission to perform this action.")}
	errUnavailable  = &apiError{status: http.StatusServiceUnavailable, body: detail("Service temporarily unavailable."), retryAfter: 5}
	errServerFailed = &apiError{status: http.StatusInternalServerError, body: detail("A server error occurred.")}
)

func throttled(wait time.Duration) *apiError {
	n := max(1, int(math.Ceil(wait.Seconds())))
	unit := "seconds"
	if n == 1 {
		unit = "second"
	}
	msg := fmt.Sprintf("Request was throttled. Expected available in %d %s.", n, unit)
	return &apiError{status: http.StatusTooManyRequests, body: detail(msg), retryAfter: n}
}

// fail writes err as the contract's answer. Causes the client must not see
// (driver text, SQL) go to the log only.
func (s *server) fail(w http.ResponseWriter, r *http.Request, err error) {
	var fe fieldErrors
	var ae *apiError
	if info := infoFrom(r); info.sessionID != 0 && (errors.As(err, &fe) ||
		errors.As(err, &ae) && ae.status >= 400 && ae.status < 500 && ae.status != http.StatusUnauthorized && ae.status != http.StatusTooManyRequests) {
		// A request that did not succeed may not have reached a query that
		// checks the login, and an ended login must hear 401 before any later
		// refusal (403, 404, 400, …), as the order of checks says. A 429 is
		// not re-checked, so that throttled floods cost no query.
		live, liveErr := s.sessionLive(r.Context(), info)
		switch {
		case liveErr != nil:
			err = liveErr
		case !live:
			err = errAccessInvalid
		}
		fe, ae = nil, nil
	}
	switch {
	case errors.As(err, &fe):
		writeJSON(w, http.StatusBadRequest, fe)
		return
	case errors.As(err, &ae):
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
func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		status, body = http.StatusInternalServerError, []byte(`{"detail":"A server error occurred."}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	w.Write(body)
}

// fields are a JSON object body's members, read one by one with their
// types checked (encoding/json into a struct would match keys
// case-insensitively and coerce nothing, but report only the first error).
type fields map[string]json.RawMessage

// decodeBody reads a request body as a JSON object. An empty body is {}.
func decodeBody(r *http.Request) (fields, error) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return nil, fmt.Errorf("read body: %w", err)
	}
	if len(bytes.TrimSpace(body)) == 0 {
		return fields{}, nil
	}
	ct := r.Header.Get("Content-Type")
	if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
		msg := fmt.Sprintf("Unsupported media type %q in request.", ct)
		return nil, &apiError{status: http.StatusUnsupportedMediaType, body: detail(msg)}
	}
	// encoding/json would silently replace invalid UTF-8.
	if !utf8.Valid(body) {
		return nil, parseError("invalid UTF-8")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	var f fields
	if err := dec.Decode(&f); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) {
			return nil, parseError("the body must be a JSON object")
		}
		return nil, parseError(err.Error())
	}
	if f == nil {
		return nil, parseError("the body must be a JSON object")
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, parseError("trailing data after the JSON object")
	}
	return f, nil
}

func parseError(why string) error {
	return &apiError{status: http.StatusBadRequest, body: detail("JSON parse error - " + why)}
}

// str reads a string member. ok is false when the member is absent or
// unusable, in which case any problem is already in errs.
func (f fields) str(key string, errs fieldErrors) (v string, ok bool) {
	raw, present := f[key]
	if !present {
		return "", false
	}
	if string(raw) == "null" {
		errs.add(key, "This field may not be null.")
		return "", false
	}
	if err := json.Unmarshal(raw, &v); err != nil {
		errs.add(key, "Not a valid string.")
		return "", false
	}
	// PostgreSQL cannot store NUL in text; refuse it here as DRF does.
	if strings.ContainsRune(v, 0) {
		errs.add(key, "Null characters are not allowed.")
		return "", false
	}
	return v, true
}

// text reads a free-text member: tags stripped, ends trimmed, then required
// (when asked) and length-checked in characters.
func (f fields) text(key string, required bool, minLen, maxLen int, errs fieldErrors) (string, bool) {
	v, ok := f.str(key, errs)
	if !ok {
		if _, present := f[key]; !present && required {
			errs.add(key, "This field is required.")
		}
		return "", false
	}
	v = strings.TrimSpace(stripTags(v))
	n := utf8.RuneCountInString(v)
	switch {
	case n == 0 && (required || minLen > 0):
		errs.add(key, "This field may not be blank.")
	case n > maxLen:
		errs.add(key, fmt.Sprintf("Ensure this field has no more than %d characters.", maxLen))
	case n < minLen:
		errs.add(key, fmt.Sprintf("Ensure this field has at least %d characters.", minLen))
	default:
		return v, true
	}
	return "", false
}

// stripTags removes every tag: '<' followed by a letter, '/', '!' or '?', up
// to the next '>'. Other '<' stay ("Tom <3 Jerry").
func stripTags(s string) string {
	if !strings.Contains(s, "<") {
		return s
	}
	var b strings.Builder
	for {
		i := strings.IndexByte(s, '<')
		if i < 0 || i+1 >= len(s) {
			b.WriteString(s)
			return b.String()
		}
		c := s[i+1]
		end := strings.IndexByte(s[i+1:], '>')
		if !(c == '/' || c == '!' || c == '?' || isLetterAt(s[i+1:])) || end < 0 {
			b.WriteString(s[:i+1])
			s = s[i+1:]
			continue
		}
		b.WriteString(s[:i])
		s = s[i+1+end+1:]
	}
}

func isLetterAt(s string) bool {
	r, _ := utf8.DecodeRuneInString(s)
	return unicode.IsLetter(r)
}

// rate is a limit of n requests per period; n == 0 switches the limit off.
type rate struct {
	n      int
	period time.Duration
}

// rateKey identifies a client to a limiter: an address or a user.
type rateKey struct {
	ip   netip.Addr
	user int64
}

// ipKey keys IPv6 clients by their /64, which one subscriber usually holds
// whole: keying single addresses would give each of them 2^64 budgets.
func ipKey(ip netip.Addr) rateKey {
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		ip = p.Addr()
	}
	return rateKey{ip: ip}
}

// limiter is a sliding-window rate limiter: the count over the last period
// is estimated from the current fixed window plus the previous one weighted
// by how much of it the period still covers. Each key costs two counters,
// and at most maxKeys are kept, the least recently used going first, so no
// number of clients can grow memory without bound.
type limiter struct {
	rate    rate
	maxKeys int
	now     func() time.Time

	mu   sync.Mutex
	keys map[rateKey]*list.Element
	lru  list.List // of *window, most recently used first
}

type window struct {
	key       rateKey
	index     int64 // which fixed window cur counts
	cur, prev int
}

func newLimiter(r rate, maxKeys int) *limiter {
	if r.n == 0 {
		return nil
	}
	return &limiter{rate: r, maxKeys: maxKeys, now: time.Now, keys: make(map[rateKey]*list.Element)}
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
	period := float64(l.rate.period)
	limit := float64(l.rate.n)
	weight := 1 - float64(elapsed)/period
	if float64(w.prev)*weight+float64(w.cur) < limit {
		w.cur++
		return 0, true
	}
	// How long until the estimate drops below the limit: within this window
	// if the previous one's share can fade enough, else into the next. The
	// float product is rounded up, not truncated: a wait one nanosecond
	// short can make Retry-After a whole second short.
	if w.cur < l.rate.n {
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
}

// window returns key's counters rolled forward to now, and how far into the
// current fixed window now is. The caller holds l.mu.
func (l *limiter) window(key rateKey) (*window, time.Duration) {
	now := l.now().UnixNano()
	index := now / int64(l.rate.period)
	elapsed := time.Duration(now % int64(l.rate.period))
	var w *window
	if e, ok := l.keys[key]; ok {
		l.lru.MoveToFront(e)
		w = e.Value.(*window)
	} else if l.lru.Len() >= l.maxKeys {
		// Full: reuse the least recently used entry for the new key.
		e := l.lru.Back()
		w = e.Value.(*window)
		delete(l.keys, w.key)
		*w = window{key: key, index: index}
		l.keys[key] = e
		l.lru.MoveToFront(e)
	} else {
		w = &window{key: key, index: index}
		l.keys[key] = l.lru.PushFront(w)
	}
	switch {
	case w.index == index:
	case w.index == index-1:
		w.prev, w.cur, w.index = w.cur, 0, index
	default:
		w.prev, w.cur, w.index = 0, 0, index
	}
	return w, elapsed
}

// len reports how many keys the limiter holds.
func (l *limiter) len() int {
	if l == nil {
		return 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.keys)
}

// logValue keeps secrets out of the log even if one is logged by mistake.
type secret []byte

func (secret) LogValue() slog.Value { return slog.StringValue("[redacted]") }

// emailRE is Django's EmailValidator without its IDN and IP-literal cases:
// a dot-atom local part, dot-separated host labels, a TLD of 2–63 characters.
var emailRE = regexp.MustCompile(`^[-!#$%&'*+/=?^_` + "`" + `{}|~0-9a-z]+(\.[-!#$%&'*+/=?^_` + "`" + `{}|~0-9a-z]+)*` +
	`@([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{1,62}[a-z0-9]$`)

// email reads an address, trimmed and lower-cased, at most 254 characters.
func (f fields) email(key string, required bool, errs fieldErrors) (string, bool) {
	v, ok := f.str(key, errs)
	if !ok {
		if _, present := f[key]; !present && required {
			errs.add(key, "This field is required.")
		}
		return "", false
	}
	v = strings.ToLower(strings.TrimSpace(v))
	switch {
	case v == "":
		errs.add(key, "This field may not be blank.")
	case utf8.RuneCountInString(v) > 254:
		errs.add(key, "Ensure this field has no more than 254 characters.")
	case !emailRE.MatchString(v):
		errs.add(key, "Enter a valid email address.")
	default:
		return v, true
	}
	return "", false
}

// pathID reads the {id} path value; anything but a positive integer that
// fits int64 is not an id, so the caller answers 404.
func pathID(r *http.Request) (int64, bool) {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	return id, err == nil && id > 0
}
