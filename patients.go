package main

import (
	_ "embed"
	"net/http"
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
	etag        string  // its entity tag, sent as the ETag header
}

func (p patient) entityTag() string { return p.etag }

// patientColumns select a patient in scanPatient's order.
const patientColumns = `id, first_name, last_name, email, to_char(date_of_birth, 'YYYY-MM-DD') AS date_of_birth, phone,
	api_time(created_at) AS created_at, api_time(updated_at) AS updated_at, etag(id, version) AS etag`

func scanPatient(row rowScanner) (patient, error) {
	var p patient
	err := row.Scan(&p.ID, &p.FirstName, &p.LastName, &p.Email, &p.DateOfBirth, &p.Phone, &p.CreatedAt, &p.UpdatedAt, &p.etag)
	return p, err
}

// person is a patient's or a doctor's body, each field nil when not given;
// a null date_of_birth is "".
type person struct {
	firstName, lastName, email *string
	dateOfBirth, phone         *string // patients
	specialization             *string // doctors
}

// readPerson validates a patient's or (doctor) a doctor's body. Only PATCH
// may leave out the required fields.
func readPerson(r *http.Request, doctor bool) (person, error) {
	f, err := decodeBody(r)
	if err != nil {
		return person{}, err
	}
	required, errs := r.Method != http.MethodPatch, fieldErrors{}
	p := person{
		firstName: f.text("first_name", required, 1, 100, errs),
		lastName:  f.text("last_name", false, 0, 100, errs),
		email:     f.email("email", required, errs),
	}
	if doctor {
		p.specialization = f.text("specialization", required, 3, 120, errs)
	} else {
		p.dateOfBirth, p.phone = f.date("date_of_birth", errs), f.phone("phone", errs)
	}
	if len(errs) > 0 {
		return p, errs
	}
	if badID(r) { // after the body's checks, before any statement
		return p, errNotFound
	}
	return p, nil
}

// patientOrdering qualifies created_at: the bare name would sort the
// select list's text of the same name (patientColumns), not the time.
var patientOrdering = map[string]string{
	"id": "id", "first_name": "first_name", "last_name": "last_name", "created_at": "patients.created_at",
}

// Every patient statement writes its audit events itself, in a
// data-modifying WITH: the events commit with the read or change they
// record, or neither happens. Each statement takes the caller's user id and
// login id as $1 and $2 (login_live($1, $2) refuses an ended login), then
// the client IP and the request id for the events as $3 and $4.

func (s *server) handleListPatients(w http.ResponseWriter, r *http.Request) error {
	p, err := parseList(r.URL.Query(), patientOrdering, true)
	if err != nil {
		return err
	}
	// $1 user, $2 login, $3 IP, $4 request id, $5 limit, $6 offset, $7… search terms.
	// page is in the statement twice (the events, the rows), and so is
	// login_live: each runs once, before any row.
	where := `owner_id = $1` + p.search(7, "first_name", "last_name", "email")
	page := `FROM patients WHERE ` + where + ` AND login_live($1, $2) ORDER BY ` + p.orderBy + ` LIMIT $5 OFFSET $6`
	q := `WITH seen AS (INSERT INTO audit_events (user_id, login_id, action, patient_id, ip, request_id)
			SELECT $1, $2, 'patient.list', id, $3, $4 FROM (SELECT id ` + page + `) shown)
		SELECT ` + p.count("patients", where) + `, ` + patientColumns + ` ` + page
	info := infoFrom(r)
	args := append([]any{info.userID, info.loginID, info.clientIP.String(), info.id, p.size, p.offset()}, p.terms...)
	return listPage(w, r, s.db, p, scanPatient, q, args...)
}

func (s *server) handleCreatePatient(w http.ResponseWriter, r *http.Request) error {
	in, err := readPerson(r, false)
	if err != nil {
		return err
	}
	// $1 user, $2 login, $3 IP, $4 request id, $5 first_name, $6 last_name,
	// $7 email, $8 date_of_birth ("" for null), $9 phone.
	const q = `WITH p AS (
			INSERT INTO patients (owner_id, first_name, last_name, email, date_of_birth, phone)
			SELECT $1, $5, coalesce($6, ''), $7, nullif($8, '')::date, coalesce($9, '') WHERE login_live($1, $2)
			RETURNING ` + patientColumns + `),
		seen AS (INSERT INTO audit_events (user_id, login_id, action, patient_id, ip, request_id)
			SELECT $1, $2, 'patient.create', id, $3, $4 FROM p)
		SELECT * FROM p`
	info := infoFrom(r)
	return writeRow(w, r, s.db, http.StatusCreated, scanPatient, q, info.userID, info.loginID, info.clientIP.String(), info.id,
		in.firstName, in.lastName, in.email, in.dateOfBirth, in.phone)
}

func (s *server) handleGetPatient(w http.ResponseWriter, r *http.Request) error {
	// $1 user, $2 login, $3 IP, $4 request id, $5 patient id.
	const q = `WITH p AS (SELECT ` + patientColumns + ` FROM patients WHERE id = $5 AND owner_id = $1 AND login_live($1, $2)),
		seen AS (INSERT INTO audit_events (user_id, login_id, action, patient_id, ip, request_id)
			SELECT $1, $2, 'patient.read', id, $3, $4 FROM p)
		SELECT * FROM p`
	info := infoFrom(r)
	return writeRow(w, r, s.db, http.StatusOK, scanPatient, q, info.userID, info.loginID, info.clientIP.String(), info.id, pathID(r))
}

// patientExists tells a write's 412 from its 404 (unmatched): $1 patient
// id, $2 user.
const patientExists = `SELECT EXISTS (SELECT 1 FROM patients WHERE id = $1 AND owner_id = $2)`

// handleUpdatePatient serves PUT and PATCH: PATCH may name any subset of
// fields, PUT must name the required ones; a field not named keeps its
// value. The event names the fields whose values changed.
func (s *server) handleUpdatePatient(w http.ResponseWriter, r *http.Request) error {
	in, err := readPerson(r, false)
	if err != nil {
		return err
	}
	// $1 user, $2 login, $3 IP, $4 request id, $5 patient id, $6 first_name,
	// $7 last_name, $8 email, $9 date_of_birth ("" for null), $10 phone,
	// each nil when not given; $11 If-Match's tags, nil for any.
	const fields = `ARRAY[first_name, last_name, email, date_of_birth::text, phone]`
	const q = `WITH before AS (
			SELECT id AS patient, ` + fields + ` AS was FROM patients
			WHERE id = $5 AND owner_id = $1 AND login_live($1, $2) AND ($11::text[] IS NULL OR etag(id, version) = ANY($11))
			FOR UPDATE),
		p AS (
			UPDATE patients SET first_name = coalesce($6, first_name), last_name = coalesce($7, last_name),
				email = coalesce($8, email), date_of_birth = CASE WHEN $9::text IS NULL THEN date_of_birth ELSE nullif($9, '')::date END,
				phone = coalesce($10, phone), updated_at = now()
			FROM before WHERE id = patient
			RETURNING ` + patientColumns + `, was, ` + fields + ` AS now),
		seen AS (INSERT INTO audit_events (user_id, login_id, action, patient_id, fields, ip, request_id)
			SELECT $1, $2, 'patient.update', id, changed_fields('{first_name,last_name,email,date_of_birth,phone}', was, now), $3, $4 FROM p)
		SELECT id, first_name, last_name, email, date_of_birth, phone, created_at, updated_at, etag FROM p`
	info := infoFrom(r)
	err = writeRow(w, r, s.db, http.StatusOK, scanPatient, q, info.userID, info.loginID, info.clientIP.String(), info.id,
		pathID(r), in.firstName, in.lastName, in.email, in.dateOfBirth, in.phone, ifMatch(r))
	return s.unmatched(r, err, patientExists, pathID(r), info.userID)
}

// handleDeletePatient deletes a patient; its mappings go with it (ON DELETE
// CASCADE), each with its mapping.delete event, so that ?doctor= finds them;
// its audit events stay.
func (s *server) handleDeletePatient(w http.ResponseWriter, r *http.Request) error {
	// $1 user, $2 login, $3 IP, $4 request id, $5 patient id, $6 If-Match's tags, nil for any.
	// The mappings read are those before the delete: every part of a
	// statement sees the same snapshot.
	const q = `WITH p AS (
			DELETE FROM patients WHERE id = $5 AND owner_id = $1 AND login_live($1, $2)
				AND ($6::text[] IS NULL OR etag(id, version) = ANY($6))
			RETURNING id),
		seen AS (INSERT INTO audit_events (user_id, login_id, action, patient_id, doctor_id, ip, request_id)
			SELECT $1, $2, 'patient.delete', id, NULL, $3, $4 FROM p
			UNION ALL SELECT $1, $2, 'mapping.delete', patient_id, doctor_id, $3, $4 FROM mappings WHERE patient_id IN (SELECT id FROM p))
		SELECT id FROM p`
	info := infoFrom(r)
	err := deleteRow(w, r, s.db, q, info.userID, info.loginID, info.clientIP.String(), info.id, pathID(r), ifMatch(r))
	return s.unmatched(r, err, patientExists, pathID(r), info.userID)
}
