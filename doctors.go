package main

import (
	"database/sql"
	"fmt"
	"net/http"

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
}

// doctorColumnsOf selects a doctor's fields, as the API writes them and in
// scanDoctor's order, from the table alias t ("d." or "").
func doctorColumnsOf(t string) string {
	return t + "id, " + t + "first_name, " + t + "last_name, " + t + "email, " + t + "specialization, " +
		stampSQL(t+"created_at") + ", " + stampSQL(t+"updated_at")
}

var doctorColumns = doctorColumnsOf("")

func scanDoctor(row rowScanner) (doctor, error) {
	var d doctor
	err := row.Scan(d.targets()...)
	return d, err
}

func (d *doctor) targets() []any {
	return []any{&d.ID, &d.FirstName, &d.LastName, &d.Email, &d.Specialization, &d.CreatedAt, &d.UpdatedAt}
}

// readDoctor validates a doctor body; see readPatient for partial.
func readDoctor(f fields, partial bool) (assignments, error) {
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
	if v, ok := f.text("specialization", !partial, 3, 120, errs); ok {
		a.set("specialization", v)
	}
	if len(errs) > 0 {
		return a, errs
	}
	return a, nil
}

// doctorConflict maps the directory-wide unique email to its field error.
func doctorConflict(err error) error {
	if c, ok := violation(err, pqerror.UniqueViolation); ok && c == "doctors_email" {
		return fieldErrors{"email": {"A doctor with this email already exists."}}
	}
	return err
}

var doctorOrdering = map[string]string{
	"id": "id", "first_name": "first_name", "last_name": "last_name",
	"created_at": "created_at", "specialization": "specialization",
}

func (s *server) handleListDoctors(w http.ResponseWriter, r *http.Request) {
	p, err := parseList(r.URL.Query(), doctorOrdering, true)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	var args []any
	from := "doctors WHERE true" + p.searchSQL([]string{"first_name", "last_name", "email", "specialization"}, &args)
	pg, err := listPage(r, s.db, p, doctorColumns, from, "SELECT count(*) FROM "+from, args, scanDoctor)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, pg)
}

func (s *server) handleCreateDoctor(w http.ResponseWriter, r *http.Request) {
	f, err := decodeBody(r)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	a, err := readDoctor(f, false)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	info := infoFrom(r)
	a.set("created_by", info.userID)
	q, args := a.insert(info, "doctors", doctorColumns)
	d, err := scanDoctor(s.db.QueryRowContext(r.Context(), q, args...))
	if err != nil {
		s.fail(w, r, doctorConflict(notFoundIfNoRows(fmt.Errorf("insert doctor: %w", err))))
		return
	}
	writeJSON(w, http.StatusCreated, d)
}

func (s *server) handleGetDoctor(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(r)
	if !ok {
		s.fail(w, r, errNotFound)
		return
	}
	info := infoFrom(r)
	q := `SELECT ` + doctorColumns + ` FROM doctors WHERE id = $1 AND ` + liveSQL(2, 3)
	d, err := scanDoctor(s.db.QueryRowContext(r.Context(), q, id, info.sessionID, info.userID))
	if err != nil {
		s.fail(w, r, notFoundIfNoRows(err))
		return
	}
	writeJSON(w, http.StatusOK, d)
}

// mayChangeDoctor answers 404 for a missing doctor and 403 for one the
// caller did not create. The permission comes before the body is read, as
// the contract's order of checks puts 403 before 415 and 400.
func (s *server) mayChangeDoctor(r *http.Request, id int64) error {
	info := infoFrom(r)
	var creator sql.NullInt64
	q := `SELECT created_by FROM doctors WHERE id = $1 AND ` + liveSQL(2, 3)
	err := s.db.QueryRowContext(r.Context(), q, id, info.sessionID, info.userID).Scan(&creator)
	if err != nil {
		return notFoundIfNoRows(err)
	}
	if !creator.Valid || creator.Int64 != info.userID {
		return errForbidden
	}
	return nil
}

// handleUpdateDoctor serves PUT and PATCH for the doctor's creator.
func (s *server) handleUpdateDoctor(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(r)
	if !ok {
		s.fail(w, r, errNotFound)
		return
	}
	if err := s.mayChangeDoctor(r, id); err != nil {
		s.fail(w, r, err)
		return
	}
	f, err := decodeBody(r)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	a, err := readDoctor(f, r.Method == http.MethodPatch)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	// The creator is checked again in the UPDATE itself; a doctor deleted in
	// between is a 404.
	q, args := a.update(infoFrom(r), id, "doctors", "id = $1 AND created_by = $2 AND "+liveSQL(3, 2), doctorColumns)
	d, err := scanDoctor(s.db.QueryRowContext(r.Context(), q, args...))
	if err != nil {
		s.fail(w, r, doctorConflict(notFoundIfNoRows(err)))
		return
	}
	writeJSON(w, http.StatusOK, d)
}

// handleDeleteDoctor removes a doctor no patient is assigned to. The
// foreign key (ON DELETE RESTRICT) refuses the delete otherwise, so a
// mapping created at the same moment cannot be lost.
func (s *server) handleDeleteDoctor(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(r)
	if !ok {
		s.fail(w, r, errNotFound)
		return
	}
	if err := s.mayChangeDoctor(r, id); err != nil {
		s.fail(w, r, err)
		return
	}
	ctx := r.Context()
	info := infoFrom(r)
	q := `DELETE FROM doctors WHERE id = $1 AND created_by = $2 AND ` + liveSQL(3, 2)
	res, err := s.db.ExecContext(ctx, q, id, info.userID, info.sessionID)
	if _, assigned := violation(err, pqerror.ForeignKeyViolation); assigned {
		var n int
		if err := s.db.QueryRowContext(ctx, `SELECT count(*) FROM mappings WHERE doctor_id = $1`, id).Scan(&n); err != nil {
			s.fail(w, r, fmt.Errorf("count assignments: %w", err))
			return
		}
		msg := fmt.Sprintf("Cannot delete this doctor: %d patient assignment(s) still refer to it. Remove them first.", n)
		s.fail(w, r, &apiError{status: http.StatusConflict, body: detail(msg)})
		return
	}
	if err != nil {
		s.fail(w, r, fmt.Errorf("delete doctor: %w", err))
		return
	}
	if n, _ := res.RowsAffected(); n == 0 {
		s.fail(w, r, errNotFound)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
