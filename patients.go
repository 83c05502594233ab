package main

import (
	"net/http"

	"github.com/lib/pq/pqerror"
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
const patientColumns = `id, first_name, last_name, email, to_char(date_of_birth, 'YYYY-MM-DD'), phone, api_time(created_at), api_time(updated_at)`

func scanPatient(row rowScanner) (patient, error) {
	var p patient
	err := row.Scan(&p.ID, &p.FirstName, &p.LastName, &p.Email, &p.DateOfBirth, &p.Phone, &p.CreatedAt, &p.UpdatedAt)
	return p, err
}

// patientInput is a validated patient body; nil means "not given".
type patientInput struct {
	firstName, lastName, email, dateOfBirth, phone *string
	dateGiven                                      bool // date_of_birth was given, maybe as null
}

// readPatient validates a patient body. A create or PUT (partial false)
// must name the required fields.
func readPatient(r *http.Request, partial bool) (patientInput, error) {
	f, err := decodeBody(r)
	if err != nil {
		return patientInput{}, err
	}
	errs := fieldErrors{}
	var in patientInput
	in.firstName = f.text("first_name", !partial, 1, 100, errs)
	in.lastName = f.text("last_name", false, 0, 100, errs)
	in.email = f.email("email", !partial, errs)
	in.dateOfBirth, in.dateGiven = f.date("date_of_birth", errs)
	in.phone = f.phone("phone", errs)
	return in, errs.orNil()
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

func (s *server) handleListPatients(w http.ResponseWriter, r *http.Request) error {
	p, err := parseList(r.URL.Query(), patientOrdering, true)
	if err != nil {
		return err
	}
	where := `owner_id = $1` + p.search("first_name", "last_name", "email")
	q := `SELECT (SELECT count(*) FROM patients WHERE ` + where + `), ` + patientColumns + `
		FROM patients WHERE ` + where + ` AND login_live($1, $2) ORDER BY ` + p.orderBy + ` LIMIT $3 OFFSET $4`
	return listPage(w, r, s.db, p, q, scanPatient)
}

func (s *server) handleCreatePatient(w http.ResponseWriter, r *http.Request) error {
	in, err := readPatient(r, false)
	if err != nil {
		return err
	}
	info := infoFrom(r)
	const q = `INSERT INTO patients (owner_id, first_name, last_name, email, date_of_birth, phone)
		SELECT $1, $3, coalesce($4, ''), $5, $6, coalesce($7, '') WHERE login_live($1, $2)
		RETURNING ` + patientColumns
	return patientConflict(writeRow(w, r, s.db, http.StatusCreated, scanPatient, q,
		info.userID, info.sessionID, in.firstName, in.lastName, in.email, in.dateOfBirth, in.phone))
}

func (s *server) handleGetPatient(w http.ResponseWriter, r *http.Request) error {
	id, err := pathID(r)
	if err != nil {
		return err
	}
	info := infoFrom(r)
	const q = `SELECT ` + patientColumns + ` FROM patients WHERE id = $3 AND owner_id = $1 AND login_live($1, $2)`
	return writeRow(w, r, s.db, http.StatusOK, scanPatient, q, info.userID, info.sessionID, id)
}

// handleUpdatePatient serves PUT and PATCH: PATCH may name any subset of
// fields, PUT must name the required ones; a field not named keeps its value.
func (s *server) handleUpdatePatient(w http.ResponseWriter, r *http.Request) error {
	in, err := readPatient(r, r.Method == http.MethodPatch)
	if err != nil {
		return err
	}
	id, err := pathID(r)
	if err != nil {
		return err
	}
	info := infoFrom(r)
	const q = `UPDATE patients SET first_name = coalesce($4, first_name), last_name = coalesce($5, last_name),
			email = coalesce($6, email), date_of_birth = CASE WHEN $9 THEN $7::date ELSE date_of_birth END,
			phone = coalesce($8, phone), updated_at = now()
		WHERE id = $3 AND owner_id = $1 AND login_live($1, $2)
		RETURNING ` + patientColumns
	return patientConflict(writeRow(w, r, s.db, http.StatusOK, scanPatient, q, info.userID, info.sessionID,
		id, in.firstName, in.lastName, in.email, in.dateOfBirth, in.phone, in.dateGiven))
}

// handleDeletePatient deletes a patient; its mappings go with it (ON DELETE
// CASCADE).
func (s *server) handleDeletePatient(w http.ResponseWriter, r *http.Request) error {
	id, err := pathID(r)
	if err != nil {
		return err
	}
	info := infoFrom(r)
	const q = `DELETE FROM patients WHERE id = $3 AND owner_id = $1 AND login_live($1, $2)`
	return deleteRow(w, r, s.db, q, info.userID, info.sessionID, id)
}
