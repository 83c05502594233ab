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

// mappingColumns select a mapping m with its patient p and doctor d, joined
// by withDetails, in scanMapping's order.
const mappingColumns = `m.id, api_time(m.created_at), m.patient_id, m.doctor_id, p.*, d.*`

// withDetails joins each mapping m to its patient p and its doctor d, as
// the patients' and the doctors' own statements select them.
const withDetails = ` JOIN (SELECT ` + patientColumns + ` FROM patients) p ON p.id = m.patient_id
	JOIN (SELECT ` + doctorColumns + ` FROM doctors) d ON d.id = m.doctor_id`

func scanMapping(row rowScanner) (m mapping, err error) {
	dest := append([]any{&m.ID, &m.CreatedAt, &m.Patient, &m.Doctor}, m.PatientDetail.dest()...)
	err = row.Scan(append(dest, m.DoctorDetail.dest()...)...)
	return m, err
}

var mappingOrdering = map[string]string{"id": "m.id", "created_at": "m.created_at"}

// mappingsShown are a list of mappings' events: a mapping.list for each patient shown.
var mappingsShown = []audit{{action: "mapping.list", patient: "patient_id", from: "(SELECT DISTINCT patient_id FROM done) shown"}}

func (s *server) handleListMappings(w http.ResponseWriter, r *http.Request) error {
	list, err := parseList(r.URL.Query(), mappingOrdering, false)
	if err != nil {
		return err
	}
	return listPage(w, r, s.db, list, scanMapping, statement{
		steps: `done AS (SELECT (SELECT count(*) FROM mappings WHERE owner_id = @user), ` + mappingColumns + `
			FROM mappings m` + withDetails + ` WHERE m.owner_id = @user ORDER BY ` + list.orderBy + ` LIMIT @limit OFFSET @offset)`,
		args:   list.args,
		events: mappingsShown,
	})
}

// handleCreateMapping assigns a doctor to one of the user's patients. The
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
	in := args{"patient": patientID, "doctor": doctorID}
	err = writeRow(w, r, s.db, http.StatusCreated, scanMapping, statement{
		steps: `m AS (INSERT INTO mappings (owner_id, patient_id, doctor_id)
			SELECT owner_id, id, @doctor FROM patients WHERE id = @patient AND owner_id = @user
				AND EXISTS (SELECT 1 FROM doctors WHERE id = @doctor FOR SHARE) -- no email change meanwhile (schema.sql)
			RETURNING id, patient_id, doctor_id, created_at),
		done AS (SELECT ` + mappingColumns + ` FROM m` + withDetails + `)`,
		args:   in,
		events: []audit{{action: "mapping.create", patient: "patient_id", doctor: "doctor_id"}},
	})
	if err != errNotFound {
		return err
	}
	// Say which reference is bad: one text for "not yours" and "missing".
	var patientOK, doctorOK bool
	err = s.db.queryRow(r, statement{
		steps: `done AS (SELECT EXISTS (SELECT 1 FROM patients WHERE id = @patient AND owner_id = @user),
			EXISTS (SELECT 1 FROM doctors WHERE id = @doctor))`,
		args: in,
	}).Scan(&patientOK, &doctorOK)
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

// handlePatientMappings lists one of the user's patients' mappings, oldest
// first, as a plain array; another user's patient is a 404.
func (s *server) handlePatientMappings(w http.ResponseWriter, r *http.Request) error {
	out, err := queryAll(r, s.db, statement{
		steps: `done AS (SELECT ` + mappingColumns + ` FROM mappings m` + withDetails + `
			WHERE m.patient_id = @id AND m.owner_id = @user ORDER BY m.created_at, m.id)`,
		events: mappingsShown,
	}, scanMapping)
	if err != nil {
		return fmt.Errorf("list patient mappings: %w", err)
	}
	if len(out) == 0 { // an empty array for the user's patient, else 404
		if err := s.db.find(r, patientFound); err != nil {
			return err
		}
	}
	return writeJSON(w, http.StatusOK, out)
}

func (s *server) handleDeleteMapping(w http.ResponseWriter, r *http.Request) error {
	return deleteRow(w, r, s.db, statement{
		steps:  `done AS (DELETE FROM mappings WHERE id = @id AND owner_id = @user RETURNING patient_id, doctor_id)`,
		events: []audit{{action: "mapping.delete", patient: "patient_id", doctor: "doctor_id"}},
	})
}
