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

// doctorColumns select a doctor in scanDoctor's order.
const doctorColumns = `id, first_name, last_name, email, specialization,
	api_time(created_at) AS created_at, api_time(updated_at) AS updated_at, etag(id, version) AS etag`

func scanDoctor(row rowScanner) (doctor, error) {
	var d doctor
	err := row.Scan(&d.ID, &d.FirstName, &d.LastName, &d.Email, &d.Specialization, &d.CreatedAt, &d.UpdatedAt, &d.etag)
	return d, err
}

// doctorOrdering qualifies created_at, as patientOrdering does.
var doctorOrdering = map[string]string{
	"id": "id", "first_name": "first_name", "last_name": "last_name",
	"created_at": "doctors.created_at", "specialization": "specialization",
}

func (s *server) handleListDoctors(w http.ResponseWriter, r *http.Request) error {
	p, err := parseList(r.URL.Query(), doctorOrdering, true)
	if err != nil {
		return err
	}
	// $1 user, $2 login, $3 limit, $4 offset, $5… search terms.
	where := `true` + p.search(5, "first_name", "last_name", "email", "specialization")
	q := `SELECT ` + p.count("doctors", where) + `, ` + doctorColumns + `
		FROM doctors WHERE ` + where + ` AND login_live($1, $2) ORDER BY ` + p.orderBy + ` LIMIT $3 OFFSET $4`
	info := infoFrom(r)
	return listPage(w, r, s.db, p, scanDoctor, q, append([]any{info.userID, info.loginID, p.size, p.offset()}, p.terms...)...)
}

func (s *server) handleCreateDoctor(w http.ResponseWriter, r *http.Request) error {
	in, err := readPerson(r, true)
	if err != nil {
		return err
	}
	// $1 user, $2 login, $3 IP, $4 request id, $5 first_name, $6 last_name,
	// $7 email, $8 specialization.
	const q = `WITH d AS (
			INSERT INTO doctors (created_by, first_name, last_name, email, specialization)
			SELECT $1, $5, coalesce($6, ''), $7, $8 WHERE login_live($1, $2)
			RETURNING ` + doctorColumns + `),
		seen AS (INSERT INTO audit_events (user_id, login_id, action, doctor_id, ip, request_id)
			SELECT $1, $2, 'doctor.create', id, $3, $4 FROM d)
		SELECT * FROM d`
	info := infoFrom(r)
	return writeRow(w, r, s.db, http.StatusCreated, scanDoctor, q, info.userID, info.loginID, info.clientIP.String(), info.id,
		in.firstName, in.lastName, in.email, in.specialization)
}

func (s *server) handleGetDoctor(w http.ResponseWriter, r *http.Request) error {
	// $1 user, $2 login, $3 doctor id.
	const q = `SELECT ` + doctorColumns + ` FROM doctors WHERE id = $3 AND login_live($1, $2)`
	info := infoFrom(r)
	return writeRow(w, r, s.db, http.StatusOK, scanDoctor, q, info.userID, info.loginID, pathID(r))
}

// mayChangeDoctor answers 404 for a missing doctor and 403 for one the
// caller did not create. It runs before the body is read: the order of
// checks puts 403 before 415 and 400.
func (s *server) mayChangeDoctor(r *http.Request) error {
	if badID(r) { // no statement for an id no row has
		return errNotFound
	}
	info := infoFrom(r)
	var creator sql.NullInt64
	// $1 user, $2 login, $3 doctor id.
	const q = `SELECT created_by FROM doctors WHERE id = $3 AND login_live($1, $2)`
	err := s.db.QueryRowContext(r.Context(), q, info.userID, info.loginID, pathID(r)).Scan(&creator)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("find doctor: %w", err)
	}
	if err != nil {
		return errNotFound
	}
	if creator.Int64 != info.userID {
		return errForbidden
	}
	return nil
}

// doctorExists tells a write's 412 from its 404 (unmatched): $1 doctor id.
const doctorExists = `SELECT EXISTS (SELECT 1 FROM doctors WHERE id = $1)`

// handleUpdateDoctor serves PUT and PATCH for the doctor's creator, whom the
// UPDATE checks again; a doctor deleted in between is a 404.
func (s *server) handleUpdateDoctor(w http.ResponseWriter, r *http.Request) error {
	if err := s.mayChangeDoctor(r); err != nil {
		return err
	}
	in, err := readPerson(r, true)
	if err != nil {
		return err
	}
	// $1 user, $2 login, $3 IP, $4 request id, $5 doctor id, $6 first_name,
	// $7 last_name, $8 email, $9 specialization, each nil when not given;
	// $10 If-Match's tags, nil for any.
	const fields = `ARRAY[first_name, last_name, email, specialization]`
	const q = `WITH before AS (
			SELECT id AS doctor, ` + fields + ` AS was FROM doctors
			WHERE id = $5 AND created_by = $1 AND login_live($1, $2) AND ($10::text[] IS NULL OR etag(id, version) = ANY($10))
			FOR UPDATE),
		d AS (
			UPDATE doctors SET first_name = coalesce($6, first_name), last_name = coalesce($7, last_name),
				email = coalesce($8, email), specialization = coalesce($9, specialization), updated_at = now()
			FROM before WHERE id = doctor
			RETURNING ` + doctorColumns + `, was, ` + fields + ` AS now),
		seen AS (INSERT INTO audit_events (user_id, login_id, action, doctor_id, fields, ip, request_id)
			SELECT $1, $2, 'doctor.update', id, changed_fields('{first_name,last_name,email,specialization}', was, now), $3, $4 FROM d)
		SELECT id, first_name, last_name, email, specialization, created_at, updated_at, etag FROM d`
	info := infoFrom(r)
	err = writeRow(w, r, s.db, http.StatusOK, scanDoctor, q, info.userID, info.loginID, info.clientIP.String(), info.id,
		pathID(r), in.firstName, in.lastName, in.email, in.specialization, ifMatch(r))
	if pq.As(err, "HC409") != nil { // doctors_email_frozen (schema.sql)
		return errDoctorEmailFrozen
	}
	return s.unmatched(r, err, doctorExists, pathID(r))
}

var (
	errDoctorAssigned = &apiError{status: http.StatusConflict,
		body: detail("This doctor is assigned to patients and cannot be deleted.")}
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
	// $1 user, $2 login, $3 IP, $4 request id, $5 doctor id, $6 If-Match's tags, nil for any.
	const q = `WITH d AS (
			DELETE FROM doctors WHERE id = $5 AND created_by = $1 AND login_live($1, $2)
				AND ($6::text[] IS NULL OR etag(id, version) = ANY($6))
			RETURNING id),
		seen AS (INSERT INTO audit_events (user_id, login_id, action, doctor_id, ip, request_id)
			SELECT $1, $2, 'doctor.delete', id, $3, $4 FROM d)
		SELECT id FROM d`
	info := infoFrom(r)
	err := deleteRow(w, r, s.db, q, info.userID, info.loginID, info.clientIP.String(), info.id, pathID(r), ifMatch(r))
	if pq.As(err, pqerror.ForeignKeyViolation) != nil { // still assigned
		return errDoctorAssigned
	}
	return s.unmatched(r, err, doctorExists, pathID(r))
}
