package main

import (
	"database/sql"
	"errors"
	"fmt"
	"net/http"

	"github.com/lib/pq"
	"github.com/lib/pq/pqerror"
)

// doctor is an entry of the shared directory: everyone reads it, only its
// creator changes or deletes it.
type doctor struct {
	ID             int64  `json:"id"`
	FirstName      string `json:"first_name"`
	LastName       string `json:"last_name"`
	Email          string `json:"email"`
	Specialization string `json:"specialization"`
	CreatedAt      string `json:"created_at"`
	UpdatedAt      string `json:"updated_at"`
	etag           string // its entity tag, sent as the ETag header
}

func (d doctor) entityTag() string { return d.etag }

// doctorColumns select a doctor, as the API names its fields, in dest's order.
const doctorColumns = `id, first_name, last_name, email, specialization,
	api_time(created_at) AS created_at, api_time(updated_at) AS updated_at, etag(id, version) AS etag`

// dest is where a row of doctorColumns is scanned to.
func (d *doctor) dest() []any {
	return []any{&d.ID, &d.FirstName, &d.LastName, &d.Email, &d.Specialization, &d.CreatedAt, &d.UpdatedAt, &d.etag}
}

func scanDoctor(row rowScanner) (d doctor, err error) {
	err = row.Scan(d.dest()...)
	return d, err
}

// doctorOrdering qualifies created_at, as patientOrdering does.
var doctorOrdering = map[string]string{
	"id": "id", "first_name": "first_name", "last_name": "last_name",
	"created_at": "doctors.created_at", "specialization": "specialization",
}

func (s *server) handleListDoctors(w http.ResponseWriter, r *http.Request) error {
	list, err := parseList(r.URL.Query(), doctorOrdering, true)
	if err != nil {
		return err
	}
	where := `true` + list.search("first_name", "last_name", "email", "specialization")
	return listPage(w, r, s.db, list, scanDoctor, statement{
		steps: `done AS (SELECT (SELECT count(*) FROM doctors WHERE ` + where + `), ` + doctorColumns + ` FROM doctors
			WHERE ` + where + ` ORDER BY ` + list.orderBy + ` LIMIT @limit OFFSET @offset)`,
		args: list.args,
	})
}

func (s *server) handleCreateDoctor(w http.ResponseWriter, r *http.Request) error {
	in, err := readPerson(r, true)
	if err != nil {
		return err
	}
	return writeRow(w, r, s.db, http.StatusCreated, scanDoctor, statement{
		steps: `done AS (INSERT INTO doctors (created_by, first_name, last_name, email, specialization)
			VALUES (@user, @first_name, coalesce(@last_name, ''), @email, @specialization) RETURNING ` + doctorColumns + `)`,
		args:   in,
		events: []audit{{action: "doctor.create", doctor: "id"}},
	})
}

func (s *server) handleGetDoctor(w http.ResponseWriter, r *http.Request) error {
	return writeRow(w, r, s.db, http.StatusOK, scanDoctor, statement{steps: `done AS (SELECT ` + doctorColumns + ` FROM doctors WHERE id = @id)`})
}

// doctorFound finds the doctor the path names, with its creator: for
// mayChangeDoctor, and for unmatched to tell a write's 412 from its 404.
var doctorFound = statement{steps: `done AS (SELECT created_by FROM doctors WHERE id = @id)`}

// mayChangeDoctor answers 404 for a malformed id or a missing doctor, and
// 403 for one the user did not create. The order of checks puts it before
// the body's 415 and 400.
func (s *server) mayChangeDoctor(r *http.Request) error {
	if pathID(r) == 0 { // no statement for an id no row has
		return errNotFound
	}
	var creator sql.NullInt64
	switch err := s.db.queryRow(r, doctorFound).Scan(&creator); {
	case errors.Is(err, sql.ErrNoRows):
		return errNotFound
	case err != nil:
		return fmt.Errorf("find doctor: %w", err)
	case creator.Int64 != infoFrom(r).userID:
		return errForbidden
	}
	return nil
}

// handleUpdateDoctor serves PUT and PATCH for the doctor's creator, whom the
// UPDATE checks again; a doctor deleted in between is a 404.
func (s *server) handleUpdateDoctor(w http.ResponseWriter, r *http.Request) error {
	in, bodyErr := readPerson(r, true) // its errors wait: 403 comes first
	if err := s.mayChangeDoctor(r); err != nil {
		return err
	}
	if bodyErr != nil {
		return bodyErr
	}
	err := writeRow(w, r, s.db, http.StatusOK, scanDoctor, statement{
		steps: `before AS (SELECT ` + doctorColumns + ` FROM doctors WHERE id = @id AND created_by = @user AND ` + ifMatches + ` FOR UPDATE),
		done AS (UPDATE doctors SET first_name = coalesce(@first_name, first_name), last_name = coalesce(@last_name, last_name),
				email = coalesce(@email, email), specialization = coalesce(@specialization, specialization), updated_at = now()
			WHERE id = (SELECT id FROM before) RETURNING ` + doctorColumns + `)`,
		args:   in,
		events: []audit{{action: "doctor.update", doctor: "done.id", fields: changedFields, from: "done, before"}},
	})
	if pq.As(err, "HC409") != nil { // doctors_email_frozen (schema.sql)
		return errDoctorEmailFrozen
	}
	return unmatched(r, s.db, err, doctorFound)
}

var (
	errDoctorAssigned    = &apiError{status: http.StatusConflict, body: detail("This doctor is assigned to patients and cannot be deleted.")}
	errDoctorEmailFrozen = &apiError{status: http.StatusConflict,
		body: detail("Other users' patients are assigned to this doctor; its email can no longer change.")}
)

// handleDeleteDoctor removes a doctor no patient is assigned to. The
// foreign key (ON DELETE RESTRICT) refuses the delete otherwise, so a
// mapping created at the same moment cannot be lost.
func (s *server) handleDeleteDoctor(w http.ResponseWriter, r *http.Request) error {
	if err := s.mayChangeDoctor(r); err != nil {
		return err
	}
	err := deleteRow(w, r, s.db, statement{
		steps:  `done AS (DELETE FROM doctors WHERE id = @id AND created_by = @user AND ` + ifMatches + ` RETURNING id)`,
		events: []audit{{action: "doctor.delete", doctor: "id"}},
	})
	if pq.As(err, pqerror.ForeignKeyViolation) != nil { // still assigned
		return errDoctorAssigned
	}
	return unmatched(r, s.db, err, doctorFound)
}
