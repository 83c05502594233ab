// This file is "healthcare import-django", run once at cutover: it copies a
// Django service of the original shape into an empty database of this
// server. A reader of the server can skip it: no request reaches it.

package main

import (
	"cmp"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/lib/pq"
)

// copies are this server's tables in the order they are filled: the
// columns copied and the statement that reads the original's rows under
// those names (any other column is for the checks only; a doctor's
// created_by is set by the check).
var copies = [4]struct{ table, columns, read string }{
	{"users", "id, username, email, name, password, created_at, last_login", `SELECT id, normalize(username, NFKC) AS username, email,
		coalesce(nullif(btrim(first_name || ' ' || last_name), ''), normalize(username, NFKC)) AS name, date_joined AS created_at, last_login,
		password, is_superuser OR is_staff AS admin, CASE WHEN NOT is_active THEN 'inactive' WHEN password NOT LIKE 'pbkdf2\_sha256$%' THEN 'another hasher, or unusable in Django'
			WHEN password !~ '` + verifiable + `' THEN 'a malformed or unverifiable hash' END AS unusable FROM auth_user`},
	{"patients", "id, owner_id, first_name, last_name, email, date_of_birth, phone, created_at, updated_at", `SELECT id, created_by_id AS owner_id, first_name, last_name, email, date_of_birth, phone, created_at, updated_at FROM api_patient`},
	{"doctors", "id, first_name, last_name, email, specialization, created_at, updated_at, created_by", `SELECT id, first_name, last_name, email, specialization, created_at, updated_at FROM api_doctor`},
	{"mappings", "id, owner_id, patient_id, doctor_id, created_at", `SELECT m.id, p.created_by_id AS owner_id, m.patient_id,
		m.doctor_id, m.created_at FROM api_patientdoctormap m LEFT JOIN api_patient p ON p.id = m.patient_id`}, // its patient's owner
}

// importDjango is "healthcare import-django [--check] [--doctor-creator
// <username>]" (README, Moving from the Django service): it reads the
// original in one snapshot, checks every row, and copies them all in one
// transaction. --check stops before writing.
func importDjango(ctx context.Context, db *sql.DB, cfg config, args importArgs, logger *slog.Logger, stdout io.Writer) error {
	rows, breaks, err := readDjango(ctx, cfg.djangoURL)
	if err != nil {
		return err
	}
	r := &report{breaks: breaks}
	r.check(rows, args.creator)
	fmt.Fprint(stdout, strings.Join(append(r.breaks, r.notes...), "\n")+"\n")
	if !args.check {
		if _, err := ensureSchema(ctx, db); err != nil {
			return err
		}
	}
	err = withTx(ctx, db, func(tx *sql.Tx) error {
		if err := targetReady(ctx, tx); err != nil {
			return err
		}
		switch {
		case len(r.breaks) > 0:
			return fmt.Errorf("%d problems (listed above) in rows this server would refuse: correct them in the original and run again; nothing was written", len(r.breaks))
		case args.check:
			fmt.Fprintf(stdout, "every row passes: import-django would copy %d users, %d patients, %d doctors, %d mappings\n", len(rows[0]), len(rows[1]), len(rows[2]), len(rows[3]))
			return nil
		}
		return copyAll(ctx, tx, rows)
	})
	if err == nil && !args.check {
		logger.Info("import", "users", len(rows[0]), "patients", len(rows[1]), "doctors", len(rows[2]), "mappings", len(rows[3]), "unusable_passwords", r.unusable)
	}
	return err
}

// targetReady refuses a target the import could not fill: behind the
// server's step, a role that may not write it, or rows already there.
func targetReady(ctx context.Context, tx *sql.Tx) error {
	// The rights the copy uses: INSERT, and setval on the sequences.
	const q = `SELECT current_user, (SELECT coalesce(max(step), 0) FROM schema_migrations), coalesce((SELECT string_agg(p, ', ') FROM
		(SELECT 'INSERT on ' || t FROM unnest('{users,login_names,patients,doctors,mappings}'::text[]) t WHERE NOT has_table_privilege(t, 'INSERT')
		UNION ALL SELECT 'UPDATE on ' || s FROM unnest('{users,patients,doctors,mappings}'::text[]) t, pg_get_serial_sequence(t, 'id') s
		WHERE NOT has_sequence_privilege(s, 'UPDATE')) m(p)), '')`
	var role, missing string
	var step int
	switch err := tx.QueryRowContext(ctx, q).Scan(&role, &step, &missing); {
	case err != nil:
		return fmt.Errorf(`this server's database (run "healthcare migrate" as the schema owner first): %w`, err)
	case step != len(schemaSteps):
		return fmt.Errorf(`database schema is at step %d, import-django needs step %d: run "healthcare migrate" as the schema owner`, step, len(schemaSteps))
	case missing != "":
		return fmt.Errorf(`role %q may not write this server's tables (%s): the schema owner runs import-django, as it runs migrate`, role, missing)
	}
	// A second import waits at the lock for the first, then finds its rows.
	const used = `LOCK TABLE users, login_names, patients, doctors, mappings IN EXCLUSIVE MODE;
		SELECT EXISTS (SELECT FROM users) OR EXISTS (SELECT FROM patients) OR EXISTS (SELECT FROM doctors) OR EXISTS (SELECT FROM mappings)`
	var full bool
	if err := tx.QueryRowContext(ctx, used).Scan(&full); err != nil || full {
		return cmp.Or(err, errors.New(`this server's database already holds users, patients, doctors or mappings (an earlier import?): `+
			`import-django copies into an empty database only; to start over, point DB_NAME at a new empty database and run it again`))
	}
	return nil
}

// problems are what would break the service after cutover, one line per
// row and rule: an id outside 1 … 2^53 − 1 (what every JSON client reads
// exactly, with room left in the sequences), a time outside the years
// 1–9999 in any zone (offsets reach 14 hours), a reference to no row.
const problems = `WITH times (t, id, key, at) AS (
		SELECT 'auth_user', id, k, v FROM auth_user, LATERAL (VALUES ('created_at', date_joined), ('last_login', last_login)) x (k, v)
		UNION ALL SELECT 'api_patient', id, k, v FROM api_patient, LATERAL (VALUES ('created_at', created_at), ('updated_at', updated_at)) x (k, v)
		UNION ALL SELECT 'api_doctor', id, k, v FROM api_doctor, LATERAL (VALUES ('created_at', created_at), ('updated_at', updated_at)) x (k, v)
		UNION ALL SELECT 'api_patientdoctormap', id, 'created_at', created_at FROM api_patientdoctormap)
	SELECT concat(t, ' ', id, ': id: not from 1 to 2^53 − 1') FROM times WHERE key = 'created_at' AND id NOT BETWEEN 1 AND 9007199254740991
	UNION ALL SELECT concat(t, ' ', id, ': ', key, ': ', to_json(at), ' is not a time in the years 1–9999') FROM times
		WHERE NOT (at >= '0001-01-01 14:00Z' AND at < '9999-12-31 10:00Z') -- a null last_login passes
	UNION ALL SELECT concat('api_patient ', id, ': created_by_id: auth_user ', created_by_id, ' does not exist') FROM api_patient p
		WHERE NOT EXISTS (SELECT FROM auth_user u WHERE u.id = p.created_by_id)
	UNION ALL SELECT concat('api_patientdoctormap ', id, ': patient_id: api_patient ', patient_id, ' does not exist') FROM api_patientdoctormap m
		WHERE NOT EXISTS (SELECT FROM api_patient p WHERE p.id = m.patient_id)
	UNION ALL SELECT concat('api_patientdoctormap ', id, ': doctor_id: api_doctor ', doctor_id, ' does not exist') FROM api_patientdoctormap m
		WHERE NOT EXISTS (SELECT FROM api_doctor d WHERE d.id = m.doctor_id)`

// readDjango reads the original's tables (copies) in one snapshot, each as
// rows of JSON members, and the problems in them.
func readDjango(ctx context.Context, url string) (rows [4][]members, breaks []string, err error) {
	if url == "" {
		return rows, nil, fmt.Errorf(`DJANGO_DATABASE_URL is not set: give the original service's database as postgres://user:password@host/name or host=… user=… password='…' dbname=…`)
	}
	// The rules of DATABASE_URL, and times read in UTC.
	cfg, err := dbConfig(func(key, def string) string { return cmp.Or(map[string]string{"DJANGO_DATABASE_URL": url}[key], def) }, "DJANGO_DATABASE_URL")
	if err != nil {
		return rows, nil, err
	}
	src, err := connect(cfg, 1)
	if err != nil {
		return rows, nil, err
	}
	defer src.Close()
	// One snapshot, however long the reading takes; and never a write.
	tx, err := src.BeginTx(ctx, &sql.TxOptions{Isolation: sql.LevelRepeatableRead, ReadOnly: true})
	if err != nil {
		return rows, nil, fmt.Errorf("read the database of DJANGO_DATABASE_URL: %w", err)
	}
	defer tx.Rollback()
	for i, c := range copies {
		var text []byte
		err := tx.QueryRowContext(ctx, `SELECT coalesce(json_agg(t ORDER BY id), '[]') FROM (`+c.read+`) t`).Scan(&text)
		if err == nil {
			err = json.Unmarshal(text, &rows[i])
		}
		if err != nil {
			return rows, nil, fmt.Errorf("read %s from the database of DJANGO_DATABASE_URL: %w", c.table, err)
		}
	}
	if err := tx.QueryRowContext(ctx, `SELECT array(`+problems+`)`).Scan(pq.Array(&breaks)); err != nil {
		return rows, nil, fmt.Errorf("check the database of DJANGO_DATABASE_URL: %w", err)
	}
	return rows, breaks, nil
}

// copyAll inserts each table's rows in one statement, moves its sequence
// past the largest id copied, and gives every user its login names as
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
type report struct {
	breaks, notes []string
	unusable      int // users copied without a usable password
}

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
// scope) another row already has; one user's username may be its email.
func (r *report) unique(seen map[string]json.RawMessage, key, table string, row members, what string) {
	if other, ok := seen[key]; ok && string(other) != string(row["id"]) {
		r.breakf(table, row, "%s (%s %s has it)", what, table, other)
	}
	seen[key] = row["id"]
}

// check checks every row with the API's readers (middleware.go), in place:
// what each row becomes is what the API would store. A user's names are
// checked as register would; one without a usable password is listed and
// gets Django's unusable form, and the Django rights that do not carry over
// are listed. Every doctor gets the user named creator (if any) as its
// creator.
func (r *report) check(rows [4][]members, creator string) {
	// Login names; emails: a patient's key starts with its owner, a doctor's with '"'.
	names, emails := map[string]json.RawMessage{}, map[string]json.RawMessage{}
	createdBy := json.RawMessage("null")
	for _, u := range rows[0] {
		errs := fieldErrors{}
		username, email := u.username("username", errs), u.email("email", true, errs)
		r.stored("auth_user", u, errs, map[string]*string{"username": &username, "email": email, "name": u.text("name", true, 1, 150, errs)})
		r.unique(names, strings.ToLower(username), "auth_user", u, fmt.Sprintf("username %q is another user's login name, after NFKC and lower-casing", username))
		r.unique(names, deref(email), "auth_user", u, fmt.Sprintf("email %q is another user's login name (username or email)", deref(email)))
		if why := ""; json.Unmarshal(u["unusable"], &why) == nil && why != "" {
			r.notes = append(r.notes, fmt.Sprintf("auth_user %s: copied with no usable password (%s)", u["id"], why))
			u["password"], _ = json.Marshal("!" + rand.Text()) // Django's unusable form
			r.unusable++
		}
		if string(u["admin"]) == "true" {
			r.notes = append(r.notes, fmt.Sprintf("auth_user %s: a Django superuser or staff account, copied as an ordinary user (this server has no admin)", u["id"]))
		}
		if creator != "" && strings.EqualFold(username, creator) {
			createdBy = u["id"]
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
		d["created_by"] = createdBy
	}
	switch {
	case creator != "" && string(createdBy) == "null":
		r.breaks = append(r.breaks, fmt.Sprintf("--doctor-creator: no user in auth_user has the username %q", creator))
	case creator == "" && len(rows[2]) > 0:
		r.notes = append(r.notes, fmt.Sprintf("api_doctor: the %d doctors are copied with no creator, so nobody can change or delete them: "+
			"--doctor-creator <username> makes that user their creator", len(rows[2])))
	}
}
