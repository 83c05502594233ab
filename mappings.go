package main

import (
	"fmt"
	"net/http"
)

// mapping assigns a doctor to a patient. It belongs to the patient's owner
// (its owner_id, which a foreign key holds equal), and every statement names
// the owner.
type mapping struct {
	ID            int64   `json:"id"`
	Patient       int64   `json:"patient"`
	Doctor        int64   `json:"doctor"`
	PatientDetail patient `json:"patient_detail"`
	DoctorDetail  doctor  `json:"doctor_detail"`
	CreatedAt     string  `json:"created_at"`
}

// mappingColumns select a mapping (m) with its patient (p) and doctor (d),
// in scanMapping's order.
const mappingColumns = `m.id, api_time(m.created_at),
	p.id, p.first_name, p.last_name, p.email, to_char(p.date_of_birth, 'YYYY-MM-DD'), p.phone, api_time(p.created_at), api_time(p.updated_at),
	d.id, d.first_name, d.last_name, d.email, d.specialization, api_time(d.created_at), api_time(d.updated_at)`

func scanMapping(row rowScanner) (mapping, error) {
	var m mapping
	p, d := &m.PatientDetail, &m.DoctorDetail
	err := row.Scan(&m.ID, &m.CreatedAt,
		&p.ID, &p.FirstName, &p.LastName, &p.Email, &p.DateOfBirth, &p.Phone, &p.CreatedAt, &p.UpdatedAt,
		&d.ID, &d.FirstName, &d.LastName, &d.Email, &d.Specialization, &d.CreatedAt, &d.UpdatedAt)
	m.Patient, m.Doctor = p.ID, d.ID
	return m, err
}

var mappingOrdering = map[string]string{"id": "m.id", "created_at": "m.created_at"}

func (s *server) handleListMappings(w http.ResponseWriter, r *http.Request) error {
	p, err := parseList(r.URL.Query(), mappingOrdering, false)
	if err != nil {
		return err
	}
	// $1 user, $2 login, $3 IP, $4 request id, $5 limit, $6 offset. As in
	// the patient list, page and its login_live are in the statement twice.
	page := `FROM mappings m JOIN patients p ON p.id = m.patient_id JOIN doctors d ON d.id = m.doctor_id
		WHERE m.owner_id = $1 AND login_live($1, $2) ORDER BY ` + p.orderBy + ` LIMIT $5 OFFSET $6`
	q := `WITH seen AS (INSERT INTO audit_events (user_id, login_id, action, patient_id, ip, request_id)
			SELECT DISTINCT $1::bigint, $2::bigint, 'mapping.list', patient_id, $3, $4 FROM (SELECT m.patient_id ` + page + `) shown)
		SELECT (SELECT count(*) FROM mappings WHERE owner_id = $1), ` + mappingColumns + ` ` + page
	info := infoFrom(r)
	return listPage(w, r, s.db, p, scanMapping, q, info.userID, info.loginID, info.clientIP.String(), info.id, p.size, p.offset())
}

// handleCreateMapping assigns a doctor to one of the caller's patients. The
// INSERT selects the patient together with its owner, so another user's
// patient inserts nothing, and the doctor; the unique key decides a race
// between two identical requests.
func (s *server) handleCreateMapping(w http.ResponseWriter, r *http.Request) error {
	f, err := decodeBody(r)
	if err != nil {
		return err
	}
	errs := fieldErrors{}
	patientID, patientText, okP := f.pk("patient", errs)
	doctorID, doctorText, okD := f.pk("doctor", errs)
	if !okP || !okD {
		return errs
	}
	info := infoFrom(r)
	// $1 user, $2 login, $3 IP, $4 request id, $5 patient id, $6 doctor id.
	const q = `
		WITH m AS (
			INSERT INTO mappings (owner_id, patient_id, doctor_id)
			SELECT owner_id, id, $6 FROM patients WHERE id = $5 AND owner_id = $1 AND login_live($1, $2)
				AND EXISTS (SELECT 1 FROM doctors WHERE id = $6 FOR SHARE) -- no email change meanwhile (schema.sql)
			RETURNING id, patient_id, doctor_id, created_at),
		seen AS (INSERT INTO audit_events (user_id, login_id, action, patient_id, doctor_id, ip, request_id)
			SELECT $1, $2, 'mapping.create', patient_id, doctor_id, $3, $4 FROM m)
		SELECT ` + mappingColumns + ` FROM m JOIN patients p ON p.id = m.patient_id JOIN doctors d ON d.id = m.doctor_id`
	err = writeRow(w, r, s.db, http.StatusCreated, scanMapping, q, info.userID, info.loginID, info.clientIP.String(), info.id, patientID, doctorID)
	if err != errNotFound {
		return err
	}
	// Say which reference is bad: one text for "not yours" and "missing".
	// $1 user, $2 login, $3 patient id, $4 doctor id.
	const check = `SELECT EXISTS (SELECT 1 FROM patients WHERE id = $3 AND owner_id = $1),
		EXISTS (SELECT 1 FROM doctors WHERE id = $4) WHERE login_live($1, $2)`
	var patientOK, doctorOK bool
	err = s.db.QueryRowContext(r.Context(), check, info.userID, info.loginID, patientID, doctorID).Scan(&patientOK, &doctorOK)
	if err != nil {
		return fmt.Errorf("check mapping references: %w", err)
	}
	if !patientOK {
		errs.add("patient", fmt.Sprintf("Invalid pk %q - object does not exist.", patientText))
	}
	if !doctorOK {
		errs.add("doctor", fmt.Sprintf("Invalid pk %q - object does not exist.", doctorText))
	}
	if len(errs) == 0 { // both appeared after the failed insert: let the client retry
		errs.add("non_field_errors", "The patient or doctor changed during the request; try again.")
	}
	return errs
}

// handlePatientMappings lists one of the caller's patients' mappings, oldest
// first, as a plain array; another user's patient is a 404.
func (s *server) handlePatientMappings(w http.ResponseWriter, r *http.Request) error {
	id, info := pathID(r), infoFrom(r)
	// $1 user, $2 login, $3 IP, $4 request id, $5 patient id.
	const q = `WITH seen AS (INSERT INTO audit_events (user_id, login_id, action, patient_id, ip, request_id)
			SELECT $1, $2, 'mapping.list', $5, $3, $4 WHERE EXISTS (SELECT 1 FROM mappings WHERE patient_id = $5 AND owner_id = $1))
		SELECT ` + mappingColumns + `
		FROM mappings m JOIN patients p ON p.id = m.patient_id JOIN doctors d ON d.id = m.doctor_id
		WHERE m.patient_id = $5 AND m.owner_id = $1 AND login_live($1, $2) ORDER BY m.created_at, m.id`
	rows, err := s.db.QueryContext(r.Context(), q, info.userID, info.loginID, info.clientIP.String(), info.id, id)
	if err != nil {
		return fmt.Errorf("list patient mappings: %w", err)
	}
	out, err := scanAll(rows, scanMapping)
	if err != nil {
		return err
	}
	if len(out) > 0 {
		return writeJSON(w, http.StatusOK, out)
	}
	// No mappings: an empty array for the caller's patient, else 404.
	// $1 user, $2 login, $3 patient id.
	const patientQ = `SELECT 1 FROM patients WHERE id = $3 AND owner_id = $1 AND login_live($1, $2)`
	return writeRow(w, r, s.db, http.StatusOK, func(row rowScanner) ([]mapping, error) {
		return out, row.Scan(new(int))
	}, patientQ, info.userID, info.loginID, id)
}

func (s *server) handleDeleteMapping(w http.ResponseWriter, r *http.Request) error {
	// $1 user, $2 login, $3 IP, $4 request id, $5 mapping id.
	const q = `WITH m AS (DELETE FROM mappings WHERE id = $5 AND owner_id = $1 AND login_live($1, $2) RETURNING patient_id, doctor_id),
		seen AS (INSERT INTO audit_events (user_id, login_id, action, patient_id, doctor_id, ip, request_id)
			SELECT $1, $2, 'mapping.delete', patient_id, doctor_id, $3, $4 FROM m)
		SELECT 1 FROM m`
	info := infoFrom(r)
	return deleteRow(w, r, s.db, q, info.userID, info.loginID, info.clientIP.String(), info.id, pathID(r))
}
