// This file is "healthcare import-django", run once at cutover: it copies a
// Django service of the original shape into an empty database of this
// server. A reader of the server can skip it: no request reaches it.

package main

import (
	"cmp"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"strings"
)

// copies are this server's tables in the order they are filled, with the
// columns copied and the statement that reads the original's rows under
// those names (any other column is for the checks only).
var copies = [4]struct{ table, columns, read string }{
	{"users", "id, username, email, name, password, created_at, last_login", `SELECT id, normalize(username, NFKC) AS username, email,
		coalesce(nullif(btrim(first_name || ' ' || last_name), ''), normalize(username, NFKC)) AS name, date_joined AS created_at, last_login,
		CASE WHEN is_active AND password LIKE 'pbkdf2\_sha256$%' THEN password END AS password FROM auth_user`},
	{"patients", "id, owner_id, first_name, last_name, email, date_of_birth, phone, created_at, updated_at", `SELECT id, created_by_id AS owner_id, first_name, last_name, email, date_of_birth, phone, created_at, updated_at FROM api_patient`},
	{"doctors", "id, first_name, last_name, email, specialization, created_at, updated_at", `SELECT id, first_name, last_name, email, specialization, created_at, updated_at FROM api_doctor`},
	{"mappings", "id, owner_id, patient_id, doctor_id, created_at", `SELECT m.id, p.created_by_id AS owner_id, m.patient_id,
		m.doctor_id, m.created_at FROM api_patientdoctormap m JOIN api_patient p ON p.id = m.patient_id`}, // its patient's owner
}

// importDjango is "healthcare import-django [--check]" (README, Moving from
// the Django service): it reads the original in one snapshot, checks every
// row, and copies them all in one transaction. check stops before writing.
func importDjango(ctx context.Context, db *sql.DB, cfg config, check bool, logger *slog.Logger, stdout io.Writer) error {
	rows, err := readDjango(ctx, cfg.djangoURL)
	if err != nil {
		return err
	}
	r := &report{}
	r.check(rows)
	fmt.Fprint(stdout, strings.Join(append(r.breaks, r.notes...), "\n")+"\n")
	if !check {
		if _, err := ensureSchema(ctx, db); err != nil {
			return err
		}
	}
	err = withTx(ctx, db, func(tx *sql.Tx) error {
		// A second import waits at the lock for the first, then finds its rows.
		const q = `LOCK TABLE users, login_names, patients, doctors, mappings IN EXCLUSIVE MODE;
			SELECT EXISTS (SELECT FROM users) OR EXISTS (SELECT FROM patients) OR EXISTS (SELECT FROM doctors) OR EXISTS (SELECT FROM mappings)`
		var used bool
		switch err := tx.QueryRowContext(ctx, q).Scan(&used); {
		case err != nil:
			return fmt.Errorf(`this server's database (run "healthcare migrate" first): %w`, err)
		case used:
			return fmt.Errorf("this server's database already has users, patients, doctors or mappings: import-django copies into an empty one only")
		case len(r.breaks) > 0:
			return fmt.Errorf("%d problems (listed above) in rows this server would refuse: correct them in the original and run again; nothing was written", len(r.breaks))
		case check:
			fmt.Fprintf(stdout, "every row passes: import-django would copy %d users, %d patients, %d doctors, %d mappings\n", len(rows[0]), len(rows[1]), len(rows[2]), len(rows[3]))
			return nil
		}
		return copyAll(ctx, tx, rows)
	})
	if err == nil && !check {
		logger.Info("import", "users", len(rows[0]), "patients", len(rows[1]), "doctors", len(rows[2]), "mappings", len(rows[3]), "unusable_passwords", len(r.notes))
	}
	return err
}

// readDjango reads the original's tables (copies) in one snapshot, each as
// rows of JSON members.
func readDjango(ctx context.Context, url string) (rows [4][]members, err error) {
	if url == "" {
		return rows, fmt.Errorf(`DJANGO_DATABASE_URL is not set: give the original service's database as "postgres://user:password@host/name"`)
	}
	// The TLS rules of DATABASE_URL. The URL holds a password: no error quotes it.
	cfg, err := dbConfig(func(key, def string) string { return cmp.Or(map[string]string{"DATABASE_URL": url}[key], def) })
	if err != nil {
		return rows, fmt.Errorf("DJANGO_DATABASE_URL: not a valid connection URL")
	}
	src, err := connect(cfg, 1)
	if err != nil {
		return rows, err
	}
	defer src.Close()
	// One snapshot, however long the reading takes; and never a write.
	tx, err := src.BeginTx(ctx, &sql.TxOptions{Isolation: sql.LevelRepeatableRead, ReadOnly: true})
	if err != nil {
		return rows, fmt.Errorf("read the database of DJANGO_DATABASE_URL: %w", err)
	}
	defer tx.Rollback()
	for i, c := range copies {
		var text []byte
		err := tx.QueryRowContext(ctx, `SELECT coalesce(json_agg(t ORDER BY id), '[]') FROM (`+c.read+`) t`).Scan(&text)
		if err == nil {
			err = json.Unmarshal(text, &rows[i])
		}
		if err != nil {
			return rows, fmt.Errorf("read %s from the database of DJANGO_DATABASE_URL: %w", c.table, err)
		}
	}
	return rows, nil
}

// copyAll inserts each table's rows in one statement, moves its sequence
// past the largest id copied, and gives every account its login names as
// register does.
func copyAll(ctx context.Context, tx *sql.Tx, rows [4][]members) error {
	for i, c := range copies {
		data, _ := json.Marshal(rows[i]) // valid JSON members in, valid JSON out
		// Table and column names are the constants above. $1 the rows, as a JSON
		// array of objects; $2 the table. No rows: max is null, and setval does nothing.
		q := `WITH copied AS (INSERT INTO ` + c.table + ` (` + c.columns + `) SELECT ` + c.columns +
			` FROM json_populate_recordset(NULL::` + c.table + `, $1) RETURNING id) SELECT setval(pg_get_serial_sequence($2, 'id'), max(id)) FROM copied`
		if _, err := tx.ExecContext(ctx, q, string(data), c.table); err != nil {
			return fmt.Errorf("copy %s: %w", c.table, err)
		}
	}
	const q = `INSERT INTO login_names (name, user_id) SELECT DISTINCT n, id FROM users, unnest(ARRAY[lower(username), email]) n`
	if _, err := tx.ExecContext(ctx, q); err != nil {
		return fmt.Errorf("login names: %w", err)
	}
	return nil
}

// report is what the checks found: a break stops the import; a note is
// said, and the row copied.
type report struct{ breaks, notes []string }

func (r *report) breakf(table string, row members, format string, a ...any) {
	r.breaks = append(r.breaks, fmt.Sprintf("%s %s: ", table, row["id"])+fmt.Sprintf(format, a...))
}

// stored checks row's members as the API read them into read (nil: absent
// or refused) and keeps what the API would store. Besides the API's own
// refusals, a value it would store otherwise than Django did (tags,
// surrounding spaces; an email's case aside) breaks the row.
func (r *report) stored(table string, row members, errs fieldErrors, read map[string]*string) {
	for _, key := range []string{"username", "email", "name", "first_name", "last_name", "date_of_birth", "phone", "specialization"} {
		v, was := read[key], ""
		switch {
		case len(errs[key]) > 0:
			r.breakf(table, row, "%s: %s", key, strings.Join(errs[key], " "))
		case v == nil || string(row[key]) == "null" || json.Unmarshal(row[key], &was) != nil:
			// not read, or a null date of birth, which stays null
		case was != *v && !(key == "email" && strings.ToLower(was) == *v):
			r.breakf(table, row, "%s: %q would be stored as %q", key, was, *v)
		default:
			row[key], _ = json.Marshal(v)
		}
	}
}

// unique breaks a row whose value for key (a login name, an email in its
// scope) another row already has; one account's username may be its email.
func (r *report) unique(seen map[string]json.RawMessage, key, table string, row members, what string) {
	if other, ok := seen[key]; ok && string(other) != string(row["id"]) {
		r.breakf(table, row, "%s (%s %s has it)", what, table, other)
	}
	seen[key] = row["id"]
}

// check checks every row with the API's readers (middleware.go), in place:
// what each row becomes is what the API would store. An account without a
// usable password gets Django's unusable form.
func (r *report) check(rows [4][]members) {
	// Login names; emails: a patient's key starts with its owner, a doctor's with '"'.
	names, emails := map[string]json.RawMessage{}, map[string]json.RawMessage{}
	for _, u := range rows[0] {
		errs := fieldErrors{}
		username, email := u.username("username", errs), u.email("email", true, errs)
		r.stored("auth_user", u, errs, map[string]*string{"username": &username, "email": email, "name": u.text("name", true, 1, 150, errs)})
		r.unique(names, strings.ToLower(username), "auth_user", u, fmt.Sprintf("username %q is another account's login name, after NFKC and lower-casing", username))
		r.unique(names, deref(email), "auth_user", u, fmt.Sprintf("email %q is another account's login name (username or email)", deref(email)))
		if string(u["password"]) == "null" {
			r.notes = append(r.notes, fmt.Sprintf("auth_user %s: copied with no usable password (inactive, or not a pbkdf2_sha256 hash)", u["id"]))
			u["password"], _ = json.Marshal("!" + newSalt()) // Django's unusable form
		}
	}
	for _, p := range rows[1] {
		errs := fieldErrors{}
		r.stored("api_patient", p, errs, map[string]*string{"first_name": p.text("first_name", true, 1, 100, errs),
			"last_name": p.text("last_name", false, 0, 100, errs), "email": p.email("email", true, errs),
			"date_of_birth": p.date("date_of_birth", errs), "phone": p.phone("phone", errs)})
		r.unique(emails, string(p["owner_id"])+string(p["email"]), "api_patient", p, "email: A patient with this email already exists (the same owner's)")
	}
	for _, d := range rows[2] {
		errs := fieldErrors{}
		r.stored("api_doctor", d, errs, map[string]*string{"first_name": d.text("first_name", true, 1, 100, errs),
			"last_name": d.text("last_name", false, 0, 100, errs), "email": d.email("email", true, errs),
			"specialization": d.text("specialization", true, 3, 120, errs)})
		r.unique(emails, string(d["email"]), "api_doctor", d, "email: A doctor with this email already exists")
	}
}
