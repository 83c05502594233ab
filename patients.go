package main

import (
	"database/sql"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"time"

	"github.com/lib/pq/pqerror"
)

// patient is a patient record as the API shows it. Patients are private:
// every query names the owner, so another user's patient is never found.
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

// patientColumnsOf selects a patient's fields, as the API writes them and
// in scanPatient's order, from the table alias t ("p." or "").
func patientColumnsOf(t string) string {
	return t + "id, " + t + "first_name, " + t + "last_name, " + t + "email, to_char(" + t + "date_of_birth, 'YYYY-MM-DD'), " +
		t + "phone, " + stampSQL(t+"created_at") + ", " + stampSQL(t+"updated_at")
}

var patientColumns = patientColumnsOf("")

func scanPatient(row rowScanner) (patient, error) {
	var p patient
	err := row.Scan(p.targets()...)
	return p, err
}

func (p *patient) targets() []any {
	return []any{&p.ID, &p.FirstName, &p.LastName, &p.Email, &p.DateOfBirth, &p.Phone, &p.CreatedAt, &p.UpdatedAt}
}

var phoneRE = regexp.MustCompile(`^\+?[0-9 ().\-]+$`)

// readPatient validates a patient body. For a create or PUT (partial false)
// the required fields must be there; absent optional fields keep their
// value (or the column default).
func readPatient(f fields, partial bool) (assignments, error) {
	var a assignments
	errs := fieldErrors{}
	if v, ok := f.text("first_name", !partial, 1, 100, errs); ok {
		a.set("first_name", v)
	}
	if v, ok := f.text("last_name", false, 0, 100, errs); ok {
		a.set("last_name", v)
	}
	if v, ok := f.email("email", !partial, errs); ok {
		a.set("email", v)
	}
	if raw, present := f["date_of_birth"]; present && string(raw) == "null" {
		a.set("date_of_birth", nil)
	} else if v, ok := f.str("date_of_birth", errs); ok {
		if dob, ok := checkBirthDate(v, errs); ok {
			a.set("date_of_birth", dob)
		}
	}
	if v, ok := f.str("phone", errs); ok {
		v = strings.TrimSpace(v)
		digits := countDigits(v)
		if v != "" && (!phoneRE.MatchString(v) || digits < 10 || digits > 15 || len(v) > 32) {
			errs.add("phone", "Enter a valid phone number: 10 to 15 digits, optionally a leading + and spaces, dashes, dots or parentheses.")
		} else {
			a.set("phone", v)
		}
	}
	if len(errs) > 0 {
		return a, errs
	}
	return a, nil
}

func countDigits(s string) int {
	n := 0
	for i := 0; i < len(s); i++ {
		if s[i] >= '0' && s[i] <= '9' {
			n++
		}
	}
	return n
}

// checkBirthDate parses YYYY-MM-DD, not in the future and not before 1900.
func checkBirthDate(v string, errs fieldErrors) (string, bool) {
	d, err := time.Parse(time.DateOnly, strings.TrimSpace(v))
	switch {
	case err != nil:
		errs.add("date_of_birth", "Date has wrong format. Use one of these formats instead: YYYY-MM-DD.")
	case d.After(time.Now().UTC()):
		errs.add("date_of_birth", "Date of birth cannot be in the future.")
	case d.Year() < 1900:
		errs.add("date_of_birth", "Date of birth cannot be before 1900-01-01.")
	default:
		return d.Format(time.DateOnly), true
	}
	return "", false
}

// patientConflict maps the per-owner unique email to its field error.
func patientConflict(err error) error {
	if c, ok := violation(err, pqerror.UniqueViolation); ok && c == "patients_owner_email" {
		return fieldErrors{"email": {"A patient with this email already exists."}}
	}
	return err
}

var patientOrdering = map[string]string{
	"id": "id", "first_name": "first_name", "last_name": "last_name", "created_at": "created_at",
}

func (s *server) handleListPatients(w http.ResponseWriter, r *http.Request) {
	p, err := parseList(r.URL.Query(), patientOrdering, true)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	args := []any{infoFrom(r).userID}
	from := "patients WHERE owner_id = $1" + p.searchSQL([]string{"first_name", "last_name", "email"}, &args)
	count := "SELECT count(*) FROM " + from
	if len(p.terms) == 0 {
		count = "SELECT coalesce(sum(n), 0) FROM patient_counts WHERE owner_id = $1" // see schema.sql
	}
	pg, err := listPage(r, s.db, p, patientColumns, from, count, args, scanPatient)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, pg)
}

func (s *server) handleCreatePatient(w http.ResponseWriter, r *http.Request) {
	f, err := decodeBody(r)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	a, err := readPatient(f, false)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	info := infoFrom(r)
	a.set("owner_id", info.userID)
	q, args := a.insert(info, "patients", patientColumns)
	p, err := scanPatient(s.db.QueryRowContext(r.Context(), q, args...))
	if err != nil {
		s.fail(w, r, patientConflict(notFoundIfNoRows(fmt.Errorf("insert patient: %w", err))))
		return
	}
	writeJSON(w, http.StatusCreated, p)
}

func (s *server) handleGetPatient(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(r)
	if !ok {
		s.fail(w, r, errNotFound)
		return
	}
	info := infoFrom(r)
	q := `SELECT ` + patientColumns + ` FROM patients WHERE id = $1 AND owner_id = $2 AND ` + liveSQL(3, 2)
	p, err := scanPatient(s.db.QueryRowContext(r.Context(), q, id, info.userID, info.sessionID))
	if err != nil {
		s.fail(w, r, notFoundIfNoRows(err))
		return
	}
	writeJSON(w, http.StatusOK, p)
}

// handleUpdatePatient serves PUT and PATCH: PATCH may name any subset of
// fields, PUT must name the required ones.
func (s *server) handleUpdatePatient(w http.ResponseWriter, r *http.Request) {
	f, err := decodeBody(r)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	a, err := readPatient(f, r.Method == http.MethodPatch)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	id, ok := pathID(r)
	if !ok {
		s.fail(w, r, errNotFound)
		return
	}
	q, args := a.update(infoFrom(r), id, "patients", "id = $1 AND owner_id = $2 AND "+liveSQL(3, 2), patientColumns)
	p, err := scanPatient(s.db.QueryRowContext(r.Context(), q, args...))
	if err != nil {
		s.fail(w, r, patientConflict(notFoundIfNoRows(err)))
		return
	}
	writeJSON(w, http.StatusOK, p)
}

func (s *server) handleDeletePatient(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(r)
	if !ok {
		s.fail(w, r, errNotFound)
		return
	}
	// The mappings go with the patient (ON DELETE CASCADE).
	info := infoFrom(r)
	q := `DELETE FROM patients WHERE id = $1 AND owner_id = $2 AND ` + liveSQL(3, 2)
	res, err := s.db.ExecContext(r.Context(), q, id, info.userID, info.sessionID)
	if err != nil {
		s.fail(w, r, fmt.Errorf("delete patient: %w", err))
		return
	}
	if n, _ := res.RowsAffected(); n == 0 {
		s.fail(w, r, errNotFound)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// notFoundIfNoRows turns "no row" into the contract's 404.
func notFoundIfNoRows(err error) error {
	if errors.Is(err, sql.ErrNoRows) {
		return errNotFound
	}
	return err
}
