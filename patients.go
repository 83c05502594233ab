package main

import "net/http"

// patient is a patient record as the API shows it. Patients are private:
// every statement names the owner (owner_id = @user), so another user's
// patient is never found.
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

// patientColumns select a patient, as the API names its fields, in dest's order.
const patientColumns = `id, first_name, last_name, email, to_char(date_of_birth, 'YYYY-MM-DD') AS date_of_birth, phone,
	api_time(created_at) AS created_at, api_time(updated_at) AS updated_at, etag(id, version) AS etag`

// dest is where a row of patientColumns is scanned to.
func (p *patient) dest() []any {
	return []any{&p.ID, &p.FirstName, &p.LastName, &p.Email, &p.DateOfBirth, &p.Phone, &p.CreatedAt, &p.UpdatedAt, &p.etag}
}

func scanPatient(row rowScanner) (p patient, err error) {
	err = row.Scan(p.dest()...)
	return p, err
}

// patientOrdering qualifies created_at: the bare name would sort the
// select list's text of the same name (patientColumns), not the time.
var patientOrdering = map[string]string{
	"id": "id", "first_name": "first_name", "last_name": "last_name", "created_at": "patients.created_at",
}

func (s *server) handleListPatients(w http.ResponseWriter, r *http.Request) error {
	list, err := parseList(r.URL.Query(), patientOrdering, true)
	if err != nil {
		return err
	}
	where := `owner_id = @user` + list.search("first_name", "last_name", "email")
	return listPage(w, r, s.db, list, scanPatient, statement{
		steps: `done AS (SELECT (SELECT count(*) FROM patients WHERE ` + where + `), ` + patientColumns + ` FROM patients
			WHERE ` + where + ` ORDER BY ` + list.orderBy + ` LIMIT @limit OFFSET @offset)`,
		args:   list.args,
		events: []audit{{action: "patient.list", patient: "id"}},
	})
}

// handleCreatePatient stores a patient; a field left out is empty (a
// date_of_birth of "" is null).
func (s *server) handleCreatePatient(w http.ResponseWriter, r *http.Request) error {
	in, err := readPerson(r, false)
	if err != nil {
		return err
	}
	return writeRow(w, r, s.db, http.StatusCreated, scanPatient, statement{
		steps: `done AS (INSERT INTO patients (owner_id, first_name, last_name, email, date_of_birth, phone)
			VALUES (@user, @first_name, coalesce(@last_name, ''), @email, nullif(@date_of_birth, '')::date, coalesce(@phone, ''))
			RETURNING ` + patientColumns + `)`,
		args:   in,
		events: []audit{{action: "patient.create", patient: "id"}},
	})
}

func (s *server) handleGetPatient(w http.ResponseWriter, r *http.Request) error {
	return writeRow(w, r, s.db, http.StatusOK, scanPatient, statement{
		steps:  `done AS (SELECT ` + patientColumns + ` FROM patients WHERE id = @id AND owner_id = @user)`,
		events: []audit{{action: "patient.read", patient: "id"}},
	})
}

// patientFound finds the user's patient the path names: unmatched tells a
// write's 412 from its 404 by it.
var patientFound = statement{steps: `done AS (SELECT 1 FROM patients WHERE id = @id AND owner_id = @user)`}

// handleUpdatePatient serves PUT and PATCH: PATCH may name any subset of
// fields, PUT must name the required ones; a field not named keeps its
// value. The event names the fields whose values changed.
func (s *server) handleUpdatePatient(w http.ResponseWriter, r *http.Request) error {
	in, err := readPerson(r, false)
	if err != nil {
		return err
	}
	if pathID(r) == 0 { // after the body's checks, before any statement
		return errNotFound
	}
	err = writeRow(w, r, s.db, http.StatusOK, scanPatient, statement{
		steps: `before AS (SELECT ` + patientColumns + ` FROM patients WHERE id = @id AND owner_id = @user AND ` + ifMatches + ` FOR UPDATE),
		done AS (UPDATE patients SET first_name = coalesce(@first_name, first_name), last_name = coalesce(@last_name, last_name),
				email = coalesce(@email, email), phone = coalesce(@phone, phone), updated_at = now(),
				date_of_birth = CASE WHEN @date_of_birth::text IS NULL THEN date_of_birth ELSE nullif(@date_of_birth, '')::date END
			WHERE id = (SELECT id FROM before) RETURNING ` + patientColumns + `)`,
		args:   in,
		events: []audit{{action: "patient.update", patient: "done.id", fields: changedFields, from: "done, before"}},
	})
	return unmatched(r, s.db, err, patientFound)
}

// handleDeletePatient deletes a patient; its mappings go with it (ON DELETE
// CASCADE), each with its mapping.delete event, so that ?doctor= finds them;
// its audit events stay. The mappings read are those before the delete:
// every part of a statement sees the same snapshot.
func (s *server) handleDeletePatient(w http.ResponseWriter, r *http.Request) error {
	err := deleteRow(w, r, s.db, statement{
		steps: `done AS (DELETE FROM patients WHERE id = @id AND owner_id = @user AND ` + ifMatches + ` RETURNING id)`,
		events: []audit{{action: "patient.delete", patient: "id"},
			{action: "mapping.delete", patient: "patient_id", doctor: "doctor_id", from: "mappings WHERE patient_id IN (SELECT id FROM done)"}},
	})
	return unmatched(r, s.db, err, patientFound)
}
