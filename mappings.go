package main

import (
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"

	"github.com/lib/pq/pqerror"
)

// mapping assigns a doctor to a patient. It belongs to the patient's owner
// (its owner_id, which a foreign key holds equal): every query names the
// owner.
type mapping struct {
	ID            int64   `json:"id"`
	Patient       int64   `json:"patient"`
	Doctor        int64   `json:"doctor"`
	PatientDetail patient `json:"patient_detail"`
	DoctorDetail  doctor  `json:"doctor_detail"`
	CreatedAt     string  `json:"created_at"`
}

// mappingColumns reads a mapping (m) with its patient (p) and doctor (d).
var mappingColumns = "m.id, " + stampSQL("m.created_at") + ", " + patientColumnsOf("p.") + ", " + doctorColumnsOf("d.")

const mappingJoins = `mappings m JOIN patients p ON p.id = m.patient_id JOIN doctors d ON d.id = m.doctor_id`

func scanMapping(row rowScanner) (mapping, error) {
	var m mapping
	dest := append(make([]any, 0, 17), &m.ID, &m.CreatedAt)
	dest = append(append(dest, m.PatientDetail.targets()...), m.DoctorDetail.targets()...)
	err := row.Scan(dest...)
	m.Patient, m.Doctor = m.PatientDetail.ID, m.DoctorDetail.ID
	return m, err
}

var mappingOrdering = map[string]string{"id": "m.id", "created_at": "m.created_at"}

func (s *server) handleListMappings(w http.ResponseWriter, r *http.Request) {
	p, err := parseList(r.URL.Query(), mappingOrdering, false)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	pg, err := listPage(r, s.db, p, mappingColumns, mappingJoins+" WHERE m.owner_id = $1",
		"SELECT count(*) FROM mappings WHERE owner_id = $1", []any{infoFrom(r).userID}, scanMapping)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, pg)
}

// pk reads a primary key given as a JSON integer or a string of digits.
// ok is false when it is unusable; text is the value as the client wrote it,
// for the "does not exist" message.
func (f fields) pk(key string, errs fieldErrors) (id int64, text string, ok bool) {
	raw, present := f[key]
	if !present {
		errs.add(key, "This field is required.")
		return 0, "", false
	}
	var v any
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	dec.UseNumber()
	if err := dec.Decode(&v); err != nil {
		errs.add(key, "Incorrect type. Expected pk value, received str.")
		return 0, "", false
	}
	var got string
	switch v := v.(type) {
	case nil:
		errs.add(key, "This field may not be null.")
		return 0, "", false
	case json.Number:
		text, got = v.String(), "float"
	case string:
		text, got = v, "str"
	case bool:
		got = "bool"
	case []any:
		got = "list"
	default:
		got = "dict"
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

func invalidPK(text string) string {
	return fmt.Sprintf("Invalid pk %q - object does not exist.", text)
}

// handleCreateMapping assigns a doctor to one of the caller's patients. The
// INSERT selects the patient together with its owner, so another user's
// patient inserts nothing; the foreign key checks the doctor; the unique key
// decides a race between two identical requests.
func (s *server) handleCreateMapping(w http.ResponseWriter, r *http.Request) {
	f, err := decodeBody(r)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	errs := fieldErrors{}
	patientID, patientText, okP := f.pk("patient", errs)
	doctorID, doctorText, okD := f.pk("doctor", errs)
	if !okP || !okD {
		s.fail(w, r, errs)
		return
	}
	ctx, owner, sid := r.Context(), infoFrom(r).userID, infoFrom(r).sessionID
	q := `
		WITH m AS (
			INSERT INTO mappings (owner_id, patient_id, doctor_id)
			SELECT owner_id, id, $2 FROM patients WHERE id = $1 AND owner_id = $3 AND ` + liveSQL(4, 3) + `
			RETURNING id, patient_id, doctor_id, created_at)
		SELECT ` + mappingColumns + ` FROM m JOIN patients p ON p.id = m.patient_id JOIN doctors d ON d.id = m.doctor_id`
	m, err := scanMapping(s.db.QueryRowContext(ctx, q, patientID, doctorID, owner, sid))
	if c, dup := violation(err, pqerror.UniqueViolation); dup && c == "mappings_patient_doctor" {
		s.fail(w, r, fieldErrors{"non_field_errors": {"The fields patient, doctor must make a unique set."}})
		return
	}
	if _, fk := violation(err, pqerror.ForeignKeyViolation); fk || errors.Is(err, sql.ErrNoRows) {
		// Say which reference is bad: one text for "not yours" and "missing".
		const check = `SELECT EXISTS (SELECT 1 FROM patients WHERE id = $1 AND owner_id = $3),
		                      EXISTS (SELECT 1 FROM doctors WHERE id = $2)`
		var patientOK, doctorOK bool
		if err := s.db.QueryRowContext(ctx, check, patientID, doctorID, owner).Scan(&patientOK, &doctorOK); err != nil {
			s.fail(w, r, fmt.Errorf("check mapping references: %w", err))
			return
		}
		if !patientOK {
			errs.add("patient", invalidPK(patientText))
		}
		if !doctorOK {
			errs.add("doctor", invalidPK(doctorText))
		}
		if len(errs) == 0 { // both appeared after the failed insert: let the client retry
			errs.add("non_field_errors", "The patient or doctor changed during the request; try again.")
		}
		s.fail(w, r, errs)
		return
	}
	if err != nil {
		s.fail(w, r, fmt.Errorf("insert mapping: %w", err))
		return
	}
	writeJSON(w, http.StatusCreated, m)
}

// handlePatientMappings lists one of the caller's patients' mappings, oldest
// first, as a plain array.
func (s *server) handlePatientMappings(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(r)
	if !ok {
		s.fail(w, r, errNotFound)
		return
	}
	ctx, owner, sid := r.Context(), infoFrom(r).userID, infoFrom(r).sessionID
	q := `SELECT ` + mappingColumns + ` FROM ` + mappingJoins + `
		WHERE m.patient_id = $1 AND m.owner_id = $2 AND ` + liveSQL(3, 2) + ` ORDER BY m.created_at, m.id`
	rows, err := s.db.QueryContext(ctx, q, id, owner, sid)
	if err != nil {
		s.fail(w, r, fmt.Errorf("list patient mappings: %w", err))
		return
	}
	defer rows.Close()
	out := []mapping{}
	for rows.Next() {
		m, err := scanMapping(rows)
		if err != nil {
			s.fail(w, r, fmt.Errorf("scan mapping: %w", err))
			return
		}
		out = append(out, m)
	}
	if err := rows.Err(); err != nil {
		s.fail(w, r, fmt.Errorf("list patient mappings: %w", err))
		return
	}
	if len(out) == 0 {
		// No mappings: an empty list for the caller's patient, 404 otherwise.
		var one int
		q := `SELECT 1 FROM patients WHERE id = $1 AND owner_id = $2 AND ` + liveSQL(3, 2)
		err := s.db.QueryRowContext(ctx, q, id, owner, sid).Scan(&one)
		if err != nil {
			s.fail(w, r, notFoundIfNoRows(err))
			return
		}
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *server) handleDeleteMapping(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(r)
	if !ok {
		s.fail(w, r, errNotFound)
		return
	}
	q := `DELETE FROM mappings WHERE id = $1 AND owner_id = $2 AND ` + liveSQL(3, 2)
	res, err := s.db.ExecContext(r.Context(), q, id, infoFrom(r).userID, infoFrom(r).sessionID)
	if err != nil {
		s.fail(w, r, fmt.Errorf("delete mapping: %w", err))
		return
	}
	if n, _ := res.RowsAffected(); n == 0 {
		s.fail(w, r, errNotFound)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
