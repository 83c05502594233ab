package main

import (
	"bytes"
	"compress/gzip"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// patient is a patient record as the API shows it. Patients are private:
// every statement names the owner, so another user's patient is never found.
type patient struct {
	ID          int64   `json:"id"`
	FirstName   string  `json:"first_name"`
	LastName    string  `json:"last_name"`
	Email       string  `json:"email"`
	DateOfBirth *string `json:"date_of_birth"`
	Phone       string  `json:"phone"`
	CreatedAt   string  `json:"created_at"`
	UpdatedAt   string  `json:"updated_at"`
}

// patientColumns select a patient in scanPatient's order.
const patientColumns = `id, first_name, last_name, email, to_char(date_of_birth, 'YYYY-MM-DD') AS date_of_birth, phone,
	api_time(created_at) AS created_at, api_time(updated_at) AS updated_at`

func scanPatient(row rowScanner) (patient, error) {
	var p patient
	err := row.Scan(&p.ID, &p.FirstName, &p.LastName, &p.Email, &p.DateOfBirth, &p.Phone, &p.CreatedAt, &p.UpdatedAt)
	return p, err
}

// readPerson validates a patient's or a doctor's body: first_name,
// last_name and email, then what more reads, each nil when not given. Only
// PATCH may leave out the required fields.
func readPerson(r *http.Request, more func(f fields, required bool, errs fieldErrors) []any) ([]any, error) {
	f, err := decodeBody(r)
	if err != nil {
		return nil, err
	}
	required, errs := r.Method != http.MethodPatch, fieldErrors{}
	values := []any{
		f.text("first_name", required, 1, 100, errs),
		f.text("last_name", false, 0, 100, errs),
		f.email("email", required, errs),
	}
	values = append(values, more(f, required, errs)...)
	return values, errs.orNil()
}

// patientFields reads what a patient adds: date_of_birth ("" for null) and
// phone, both optional.
func patientFields(f fields, _ bool, errs fieldErrors) []any {
	return []any{f.date("date_of_birth", errs), f.phone("phone", errs)}
}

var patientOrdering = map[string]string{
	"id": "id", "first_name": "first_name", "last_name": "last_name", "created_at": "created_at",
}

// Every patient statement writes its audit events itself, in a
// data-modifying WITH: the events commit with the read or change they
// record, or neither happens. $1 to $4 are info.who().

func (s *server) handleListPatients(w http.ResponseWriter, r *http.Request) error {
	p, err := parseList(r.URL.Query(), patientOrdering, true)
	if err != nil {
		return err
	}
	where := `owner_id = $1` + p.search(7, "first_name", "last_name", "email")
	page := `FROM patients WHERE ` + where + ` AND login_live($1, $2) ORDER BY ` + p.orderBy + ` LIMIT $3 OFFSET $4`
	q := `WITH seen AS (INSERT INTO audit_events (user_id, login_id, action, patient_id, ip, request_id)
			SELECT $1, $2, 'patient.list', id, $5, $6 FROM (SELECT id ` + page + `) shown)
		SELECT (SELECT count(*) FROM patients WHERE ` + where + `), ` + patientColumns + ` ` + page
	info := infoFrom(r)
	return listPage(w, r, s.db, p, q, scanPatient, info.clientIP.String(), info.id)
}

func (s *server) handleCreatePatient(w http.ResponseWriter, r *http.Request) error {
	values, err := readPerson(r, patientFields)
	if err != nil {
		return err
	}
	// date_of_birth ($8) is "" for null (patientFields).
	const q = `WITH p AS (
			INSERT INTO patients (owner_id, first_name, last_name, email, date_of_birth, phone)
			SELECT $1, $5, coalesce($6, ''), $7, nullif($8, '')::date, coalesce($9, '') WHERE login_live($1, $2)
			RETURNING ` + patientColumns + `),
		seen AS (INSERT INTO audit_events (user_id, login_id, action, patient_id, ip, request_id)
			SELECT $1, $2, 'patient.create', id, $3, $4 FROM p)
		SELECT * FROM p`
	return writeRow(w, r, s.db, http.StatusCreated, scanPatient, q, infoFrom(r).who(values...)...)
}

func (s *server) handleGetPatient(w http.ResponseWriter, r *http.Request) error {
	const q = `WITH p AS (SELECT ` + patientColumns + ` FROM patients WHERE id = $5 AND owner_id = $1 AND login_live($1, $2)),
		seen AS (INSERT INTO audit_events (user_id, login_id, action, patient_id, ip, request_id)
			SELECT $1, $2, 'patient.read', id, $3, $4 FROM p)
		SELECT * FROM p`
	return writeRow(w, r, s.db, http.StatusOK, scanPatient, q, infoFrom(r).who(pathID(r))...)
}

// handleUpdatePatient serves PUT and PATCH: PATCH may name any subset of
// fields, PUT must name the required ones; a field not named keeps its
// value. The event names the fields whose values changed.
func (s *server) handleUpdatePatient(w http.ResponseWriter, r *http.Request) error {
	values, err := readPerson(r, patientFields)
	if err != nil {
		return err
	}
	// date_of_birth ($9) is nil when not given and "" for null (patientFields).
	const fields = `ARRAY[first_name, last_name, email, date_of_birth::text, phone]`
	const q = `WITH before AS (
			SELECT id AS patient, ` + fields + ` AS was
			FROM patients WHERE id = $5 AND owner_id = $1 AND login_live($1, $2) FOR UPDATE),
		p AS (
			UPDATE patients SET first_name = coalesce($6, first_name), last_name = coalesce($7, last_name),
				email = coalesce($8, email), date_of_birth = CASE WHEN $9::text IS NULL THEN date_of_birth ELSE nullif($9, '')::date END,
				phone = coalesce($10, phone), updated_at = now()
			FROM before WHERE id = patient
			RETURNING ` + patientColumns + `, was, ` + fields + ` AS now),
		seen AS (INSERT INTO audit_events (user_id, login_id, action, patient_id, fields, ip, request_id)
			SELECT $1, $2, 'patient.update', id, ARRAY(
				SELECT name FROM unnest('{first_name,last_name,email,date_of_birth,phone}'::text[], was, now) AS f(name, a, b)
				WHERE a IS DISTINCT FROM b), $3, $4 FROM p)
		SELECT id, first_name, last_name, email, date_of_birth, phone, created_at, updated_at FROM p`
	args := infoFrom(r).who(append([]any{pathID(r)}, values...)...)
	return writeRow(w, r, s.db, http.StatusOK, scanPatient, q, args...)
}

// handleDeletePatient deletes a patient; its mappings go with it (ON DELETE
// CASCADE), its audit events stay.
func (s *server) handleDeletePatient(w http.ResponseWriter, r *http.Request) error {
	const q = `WITH p AS (DELETE FROM patients WHERE id = $5 AND owner_id = $1 AND login_live($1, $2) RETURNING id),
		seen AS (INSERT INTO audit_events (user_id, login_id, action, patient_id, ip, request_id)
			SELECT $1, $2, 'patient.delete', id, $3, $4 FROM p)
		SELECT id FROM p`
	return deleteRow(w, r, s.db, q, infoFrom(r).who(pathID(r))...)
}

// The field readers below serve every resource's body: each reads one
// member, checks it as DRF would, and adds any problem to errs.

// fields are a JSON object body's members, read one by one with their
// types checked (encoding/json into a struct would match keys
// case-insensitively and report only the first error).
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
	err = dec.Decode(&f)
	var typeErr *json.UnmarshalTypeError
	if errors.As(err, &typeErr) || err == nil && f == nil { // another JSON value, or null
		return nil, parseError("the body must be a JSON object")
	}
	if err != nil {
		return nil, parseError(err.Error())
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, parseError("trailing data after the JSON object")
	}
	return f, nil
}

func parseError(why string) error {
	return &apiError{status: http.StatusBadRequest, body: detail("JSON parse error - " + why)}
}

// pathID reads the {id} path value, or 0 when it is not a positive integer
// that fits int64: no row has id 0, so the statement answers 404 in its
// turn, after the body's checks.
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
func (f fields) str(key string, required bool, errs fieldErrors) (v string, ok bool) {
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
func (f fields) required(key string, errs fieldErrors) string {
	v, ok := f.str(key, true, errs)
	if ok && strings.TrimSpace(v) == "" {
		errs.add(key, "This field may not be blank.")
	}
	return v
}

// text reads a free-text member: tags stripped, ends trimmed, then checked
// for length in characters. nil means absent or invalid.
func (f fields) text(key string, required bool, minLen, maxLen int, errs fieldErrors) *string {
	v, ok := f.str(key, required, errs)
	if !ok {
		return nil
	}
	v = strings.TrimSpace(stripTags(v))
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
func (f fields) email(key string, required bool, errs fieldErrors) *string {
	return f.matching(key, required, true, 254, emailRE, "Enter a valid email address.", errs)
}

// username reads Django's username: 1–150 letters, digits and @.+-_.
func (f fields) username(key string, errs fieldErrors) string {
	const invalid = "Enter a valid username. This value may contain only letters, numbers, and @/./+/-/_ characters."
	return deref(f.matching(key, true, false, 150, usernameRE, invalid, errs))
}

// matching reads a trimmed (and, if asked, lower-cased) string of at most
// maxLen characters that re matches; nil means absent or invalid.
func (f fields) matching(key string, required, lower bool, maxLen int, re *regexp.Regexp, invalid string, errs fieldErrors) *string {
	v, ok := f.str(key, required, errs)
	if !ok {
		return nil
	}
	if v = strings.TrimSpace(v); lower {
		v = strings.ToLower(v)
	}
	switch {
	case v == "":
		errs.add(key, "This field may not be blank.")
	case utf8.RuneCountInString(v) > maxLen:
		errs.add(key, fmt.Sprintf("Ensure this field has no more than %d characters.", maxLen))
	case !re.MatchString(v):
		errs.add(key, invalid)
	default:
		return &v
	}
	return nil
}

// pk reads a primary key given as a JSON integer or a string of digits.
// ok is false when it is unusable; text is the value as the client wrote it,
// for the "does not exist" message.
func (f fields) pk(key string, errs fieldErrors) (id int64, text string, ok bool) {
	raw, present := f[key]
	switch {
	case !present:
		errs.add(key, "This field is required.")
		return 0, "", false
	case string(raw) == "null":
		errs.add(key, "This field may not be null.")
		return 0, "", false
	}
	// DRF names the type it received; raw is one valid JSON value (decodeBody
	// checked it), so its first byte tells.
	got := map[byte]string{'"': "str", '[': "list", '{': "dict", 't': "bool", 'f': "bool"}[raw[0]]
	switch got {
	case "":
		got, text = "float", string(raw)
	case "str":
		json.Unmarshal(raw, &text)
	}
	if text == "" || strings.Trim(strings.TrimPrefix(text, "-"), "0123456789") != "" {
		errs.add(key, "Incorrect type. Expected pk value, received "+got+".")
		return 0, "", false
	}
	id, err := strconv.ParseInt(text, 10, 64)
	if err != nil { // beyond int64: a well-formed id no row can have
		id = 0
	}
	return id, text, true
}

// date reads date_of_birth: YYYY-MM-DD, not in the future, not before
// 1900, or null, read as "". nil means absent or invalid.
func (f fields) date(key string, errs fieldErrors) *string {
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
func (f fields) phone(key string, errs fieldErrors) *string {
	v, ok := f.str(key, false, errs)
	if !ok {
		return nil
	}
	if v = strings.TrimSpace(v); v != "" && (len(v) > 32 || !phoneRE.MatchString(v)) {
		errs.add(key, "Enter a valid phone number: 10 to 15 digits, optionally a leading + and spaces, dashes, dots or parentheses.")
		return nil
	}
	return &v
}

// Django's list of 19,726 common passwords (django/contrib/auth, BSD-3-Clause).
//
//go:embed common-passwords.txt.gz
var commonPasswordsGz []byte

// loadCommonPasswords unpacks the embedded list.
func loadCommonPasswords() (map[string]struct{}, error) {
	zr, err := gzip.NewReader(bytes.NewReader(commonPasswordsGz))
	if err != nil {
		return nil, fmt.Errorf("common passwords: %w", err)
	}
	list, err := io.ReadAll(zr)
	set := make(map[string]struct{}, 20_000)
	for _, p := range strings.Split(string(list), "\n") {
		set[strings.TrimSpace(p)] = struct{}{}
	}
	return set, err
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

// newPassword reads a new password and checks it with Django's validators
// against the account's names.
func (s *server) newPassword(f fields, key string, u user, errs fieldErrors) string {
	password, ok := f.str(key, true, errs)
	switch {
	case !ok:
	case strings.TrimSpace(password) == "":
		// Blank as login judges it (DRF's), or the account could never log in.
		errs.add(key, "This field may not be blank.")
	case utf8.RuneCountInString(password) > 1024:
		errs.add(key, "Ensure this field has no more than 1024 characters.")
	default:
		for _, msg := range s.passwordProblems(password, [3]string{u.Username, u.Email, u.Name}) {
			errs.add(key, msg)
		}
	}
	return password
}

// confirmPassword checks the optional confirmation field key against
// password, once the body has no other problem.
func confirmPassword(f fields, key, password string, errs fieldErrors) {
	if confirm, given := f.str(key, false, errs); given && len(errs) == 0 && confirm != password {
		errs.add(key, "Passwords don't match.")
	}
}
