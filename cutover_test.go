package main

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"io"
	"log/slog"
	neturl "net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/lib/pq"
)

// djangoTables are the original service's tables as API.md lists them
// (Django 3.2 on PostgreSQL).
const djangoTables = `
CREATE TABLE auth_user (id serial PRIMARY KEY, password varchar(128) NOT NULL, last_login timestamptz,
	is_superuser boolean NOT NULL, username varchar(150) NOT NULL UNIQUE, first_name varchar(150) NOT NULL,
	last_name varchar(150) NOT NULL, email varchar(254) NOT NULL, is_staff boolean NOT NULL,
	is_active boolean NOT NULL, date_joined timestamptz NOT NULL);
CREATE TABLE api_patient (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
	created_by_id integer NOT NULL REFERENCES auth_user (id), first_name varchar(100) NOT NULL,
	last_name varchar(100) NOT NULL, email varchar(254) NOT NULL, date_of_birth date, phone varchar(20) NOT NULL);
CREATE TABLE api_doctor (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
	first_name varchar(100) NOT NULL, last_name varchar(100) NOT NULL, email varchar(254) NOT NULL UNIQUE,
	specialization varchar(100) NOT NULL);
CREATE TABLE api_patientdoctormap (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
	patient_id bigint NOT NULL REFERENCES api_patient (id), doctor_id bigint NOT NULL REFERENCES api_doctor (id),
	UNIQUE (patient_id, doctor_id));`

// djangoSource makes a throw-away database of the original's shape (dropped
// after the test), runs rows in it, and returns its URL.
func djangoSource(t testing.TB, suffix, rows string) string {
	t.Helper()
	db := scratchDB(t, suffix, 0)
	if _, err := db.ExecContext(t.Context(), djangoTables+rows); err != nil {
		t.Fatalf("source: %v", err)
	}
	c := testDBConfig
	return fmt.Sprintf("postgres://%s@%s:%d/%s?sslmode=disable", c.User, c.Host, c.Port, c.Database+suffix)
}

// importInto runs "healthcare import-django" (with args) from source into
// the database target, as the binary would, and returns what it printed.
func importInto(t testing.TB, target, source string, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	env := testEnv(map[string]string{"DB_NAME": target, "DJANGO_DATABASE_URL": source})
	err := run(t.Context(), append([]string{"import-django"}, args...), env, &out, io.Discard)
	return out.String(), err
}

// rowCounts is "users patients doctors mappings login_names audit_events" of db.
func rowCounts(t testing.TB, db *sql.DB) string {
	t.Helper()
	var got string
	err := db.QueryRowContext(t.Context(), `SELECT concat_ws(' ', (SELECT count(*) FROM users), (SELECT count(*) FROM patients),
		(SELECT count(*) FROM doctors), (SELECT count(*) FROM mappings), (SELECT count(*) FROM login_names), (SELECT count(*) FROM audit_events))`).Scan(&got)
	if err != nil {
		t.Fatal(err)
	}
	return got
}

const oldPassword = "Old-Django-Password-7"

// TestImportDjango moves a small Django service: ids with holes, a
// 260,000-iteration hash that logs in and is upgraded, an inactive account
// and an unusable password that cannot log in, a null date of birth; the
// old ids are served, the sequences continue, --check writes nothing and a
// second import is refused.
func TestImportDjango(t *testing.T) {
	hash := djangoHash(t, oldPassword, "DjangoSalt0123456789ab", 260_000)
	source := djangoSource(t, "_django", `
		INSERT INTO auth_user VALUES
			(3, '`+hash+`', '2024-05-01 10:00:00.123456+00', false, 'alice', 'Alice', 'Liddell', 'Alice@Example.COM', false, true, '2021-01-02 03:04:05.654321+00'),
			(7, '`+hash+`', NULL, false, 'bob', 'Bob', '', 'bob@example.com', false, false, '2021-02-01 00:00:00+00'),
			(10, '!Gh5tQ', NULL, true, 'ｃａｒｏｌ', '', '', 'carol@example.com', true, true, '2021-03-01 00:00:00+00');
		INSERT INTO api_patient VALUES
			(5, '2022-01-01 00:00:00+00', '2022-06-01 12:00:00.5+00', 3, 'Pat', 'One', 'Pat.One@Example.com', '1980-02-29', '+1 (555) 010-2000'),
			(9, '2022-01-02 00:00:00+00', '2022-01-02 00:00:00+00', 3, 'Pat', 'Two', 'pat2@example.com', NULL, ''),
			(40, '2022-01-03 00:00:00+00', '2022-01-03 00:00:00+00', 10, 'Pat', 'Three', 'pat.one@example.com', NULL, '');
		INSERT INTO api_doctor VALUES
			(2, '2020-01-01 00:00:00+00', '2020-01-01 00:00:00+00', 'Greg', 'House', 'House@Example.com', 'Diagnostics'),
			(8, '2020-01-01 00:00:00+00', '2020-01-01 00:00:00+00', 'Lisa', 'Cuddy', 'cuddy@example.com', 'Endocrinology');
		INSERT INTO api_patientdoctormap VALUES (4, '2023-01-01 00:00:00+00', '2023-01-01 00:00:00+00', 5, 2),
			(11, '2023-01-02 00:00:00+00', '2023-01-02 00:00:00+00', 40, 8);`)
	target := scratchDB(t, "_cutover", -1)
	name := testDBConfig.Database + "_cutover"

	out, err := importInto(t, name, source, "--check")
	if err != nil || !strings.Contains(out, "every row passes: import-django would copy 3 users, 3 patients, 2 doctors, 2 mappings") {
		t.Fatalf("--check: %v\n%s", err, out)
	}
	if got := rowCounts(t, target); got != "0 0 0 0 0 0" {
		t.Fatalf("--check wrote rows: %s", got)
	}
	out, err = importInto(t, name, source)
	if err != nil {
		t.Fatalf("import: %v\n%s", err, out)
	}
	for _, want := range []string{
		"auth_user 7: copied with no usable password (inactive)\n", "auth_user 10: copied with no usable password (another hasher, or unusable in Django)\n",
		"auth_user 10: a Django superuser or staff account, copied as an ordinary user (this server has no admin)\n",
		"api_doctor: the 2 doctors are copied with no creator, so nobody can change or delete them: --doctor-creator <username> makes that user their creator\n",
		`"msg":"import","users":3,"patients":3,"doctors":2,"mappings":2,"unusable_passwords":2`,
	} {
		if !strings.Contains(out, want) {
			t.Fatalf("import output lacks %q:\n%s", want, out)
		}
	}
	// Two login names per account; no audit events.
	if got := rowCounts(t, target); got != "3 3 2 2 6 0" {
		t.Fatalf("after import: %s", got)
	}
	// Accounts as Django kept them, in this server's form; doctors without a
	// creator; each mapping owned by its patient's owner.
	var got string
	err = target.QueryRowContext(t.Context(), `SELECT
		(SELECT string_agg(concat_ws(':', id, username, name, email, api_time(created_at), api_time(last_login)), ' ' ORDER BY id) FROM users) || ' / ' ||
		(SELECT string_agg(concat_ws(':', id, email, coalesce(created_by::text, '-')), ' ' ORDER BY id) FROM doctors) || ' / ' ||
		(SELECT string_agg(concat_ws(':', id, owner_id, patient_id, doctor_id, api_time(created_at)), ' ' ORDER BY id) FROM mappings)`).Scan(&got)
	want := "3:alice:Alice Liddell:alice@example.com:2021-01-02T03:04:05.654321Z:2024-05-01T10:00:00.123456Z " +
		"7:bob:Bob:bob@example.com:2021-02-01T00:00:00.000000Z 10:carol:carol:carol@example.com:2021-03-01T00:00:00.000000Z / " +
		"2:house@example.com:- 8:cuddy@example.com:- / 4:3:5:2:2023-01-01T00:00:00.000000Z 11:10:40:8:2023-01-02T00:00:00.000000Z"
	if err != nil || got != want {
		t.Fatalf("imported rows:\n%s, %v\nwant\n%s", got, err, want)
	}
	out, err = importInto(t, name, source)
	if err == nil || !strings.Contains(err.Error(), "already holds users, patients, doctors or mappings (an earlier import?): "+
		"import-django copies into an empty database only; to start over, point DB_NAME at a new empty database and run it again") {
		t.Fatalf("second import: %v\n%s", err, out)
	}
	if got := rowCounts(t, target); got != "3 3 2 2 6 0" {
		t.Fatalf("after a second import: %s", got)
	}

	s := newTestServerOn(t, target, slog.New(slog.NewTextHandler(io.Discard, nil)), nil, func(c *config) { c.passwordIterations = 300_000 })
	pair := loginPair(t, s, "alice@example.com", oldPassword)
	var stored string
	if err := target.QueryRowContext(t.Context(), `SELECT password FROM users WHERE id = 3`).Scan(&stored); err != nil || !strings.HasPrefix(stored, "pbkdf2_sha256$300000$") {
		t.Fatalf("alice's hash after login: %q, %v; want it upgraded to 300,000 iterations", stored, err)
	}
	wantJSON(t, do(t, s, req{method: "GET", path: "/api/auth/me/", token: pair.Access}), 200,
		`{"id": 3, "username": "alice", "email": "alice@example.com", "name": "Alice Liddell"}`)
	wantJSON(t, do(t, s, req{method: "GET", path: "/api/patients/5/", token: pair.Access}), 200, `{"id": 5, "first_name": "Pat",
		"last_name": "One", "email": "pat.one@example.com", "date_of_birth": "1980-02-29", "phone": "+1 (555) 010-2000",
		"created_at": "2022-01-01T00:00:00.000000Z", "updated_at": "2022-06-01T12:00:00.500000Z"}`)
	wantJSON(t, do(t, s, req{method: "GET", path: "/api/patients/9/", token: pair.Access}), 200, `{"id": 9, "first_name": "Pat",
		"last_name": "Two", "email": "pat2@example.com", "date_of_birth": null, "phone": "",
		"created_at": "2022-01-02T00:00:00.000000Z", "updated_at": "2022-01-02T00:00:00.000000Z"}`)
	wantJSON(t, do(t, s, req{method: "GET", path: "/api/patients/40/", token: pair.Access}), 404, `{"detail": "Not found."}`)
	res := do(t, s, req{method: "GET", path: "/api/mappings/5/", token: pair.Access})
	if res.status != 200 || !strings.Contains(string(res.body), `"id":4,"patient":5,"doctor":2`) {
		t.Fatalf("alice's mappings of patient 5: %d %s", res.status, res.body)
	}
	// Doctors have no creator: nobody may change them.
	wantJSON(t, do(t, s, req{method: "PATCH", path: "/api/doctors/2/", token: pair.Access, body: map[string]any{"specialization": "Oncology"}}),
		403, `{"detail": "You do not have permission to perform this action."}`)
	// The sequences continue after the largest id copied.
	res = do(t, s, req{method: "POST", path: "/api/patients/", token: pair.Access, body: map[string]any{"first_name": "New", "email": "new@example.com"}})
	if got := wantObject(t, res, 201)["id"]; got != float64(41) {
		t.Fatalf("new patient id %v, want 41", got)
	}
	// bob is inactive, carol's password was unusable in Django: neither logs in.
	for _, name := range []string{"bob", "carol", "ｃａｒｏｌ"} {
		for _, password := range []string{oldPassword, "!Gh5tQ", "Gh5tQ"} {
			wantUnauthorized(t, login(t, s, name, password), `{"detail": "No active account found with the given credentials"}`)
		}
	}
}

// TestImportDjangoRefuses: each row this server's contract refuses stops
// the import with a report naming the row and the rule, and nothing is
// written; --check reports the same and fails too.
func TestImportDjangoRefuses(t *testing.T) {
	const user = `INSERT INTO auth_user VALUES (1, '!', NULL, false, 'ada', '', '', 'ada@example.com', false, true, now())`
	patient := func(id int, email, dob, phone string) string {
		return fmt.Sprintf(`INSERT INTO api_patient VALUES (%d, now(), now(), 1, 'P', '', '%s', %s, '%s');`, id, email, dob, phone)
	}
	target := scratchDB(t, "_refused", -1)
	name := testDBConfig.Database + "_refused"
	for i, c := range []struct{ name, rows, want string }{
		{"same name after NFKC and lower-casing", `INSERT INTO auth_user VALUES (2, '!', NULL, false, 'Ａｄａ', '', '', 'x@example.com', false, true, now());`,
			`auth_user 2: username "Ada" is another user's login name, after NFKC and lower-casing (auth_user 1 has it)`},
		{"email that is another account's username", `INSERT INTO auth_user VALUES (2, '!', NULL, false, 'ada@example.org', '', '', 'x@example.com', false, true, now()),
			(3, '!', NULL, false, 'cy', '', '', 'ADA@example.org', false, true, now());`,
			`auth_user 3: email "ada@example.org" is another user's login name (username or email) (auth_user 2 has it)`},
		{"username Django's rule refuses", `INSERT INTO auth_user VALUES (2, '!', NULL, false, 'bad name', '', '', 'x@example.com', false, true, now());`,
			`auth_user 2: username: Enter a valid username. This value may contain only letters, numbers, and @/./+/-/_ characters.`},
		{"blank email", `INSERT INTO auth_user VALUES (2, '!', NULL, false, 'bo', '', '', '', false, true, now());`,
			`auth_user 2: email: This field may not be blank.`},
		{"bad phone", patient(6, "p@example.com", "NULL", "12345"),
			`api_patient 6: phone: Enter a valid phone number: 10 to 15 digits, optionally a leading + and spaces, dashes, dots or parentheses.`},
		{"date before 1900", patient(6, "p@example.com", "'1899-12-31'", ""), `api_patient 6: date_of_birth: Date of birth cannot be before 1900-01-01.`},
		{"date in the future", patient(6, "p@example.com", "now() + interval '2 days'", ""), `api_patient 6: date_of_birth: Date of birth cannot be in the future.`},
		{"tags in a name", `INSERT INTO api_patient VALUES (6, now(), now(), 1, '<b>Ann</b>', '', 'a@example.com', NULL, '');`,
			`api_patient 6: first_name: "<b>Ann</b>" would be stored as "Ann"`},
		{"same patient email twice, one owner", patient(6, "p@example.com", "NULL", "") + patient(8, "P@example.com", "NULL", ""),
			`api_patient 8: email: A patient with this email already exists (the same owner's) (api_patient 6 has it)`},
		{"two doctors' emails that differ only in case", `INSERT INTO api_doctor VALUES (1, now(), now(), 'Al', '', 'Doc@Example.com', 'Cardiology'),
			(2, now(), now(), 'Bo', '', 'doc@example.com', 'Cardiology');`, `api_doctor 2: email: A doctor with this email already exists (api_doctor 1 has it)`},
		{"an id past 2^53 - 1", patient(9007199254740992, "p@example.com", "NULL", ""), `api_patient 9007199254740992: id: not from 1 to 2^53 − 1`},
		{"an id of 2^63 - 1", patient(9223372036854775807, "p@example.com", "NULL", ""), `api_patient 9223372036854775807: id: not from 1 to 2^53 − 1`},
		{"a user id of 0", `INSERT INTO auth_user VALUES (0, '!', NULL, false, 'bo', '', '', 'bo@example.com', false, true, now());`, `auth_user 0: id: not from 1 to 2^53 − 1`},
		{"a negative user id", `INSERT INTO auth_user VALUES (-7, '!', NULL, false, 'bo', '', '', 'bo@example.com', false, true, now());`, `auth_user -7: id: not from 1 to 2^53 − 1`},
		{"a doctor created at infinity", `INSERT INTO api_doctor VALUES (3, 'infinity', now(), 'Al', '', 'al@example.com', 'Cardiology');`,
			`api_doctor 3: created_at: "infinity" is not a time in the years 1–9999`},
		{"a last login at -infinity", `INSERT INTO auth_user VALUES (2, '!', '-infinity', false, 'bo', '', '', 'bo@example.com', false, true, now());`,
			`auth_user 2: last_login: "-infinity" is not a time in the years 1–9999`},
		{"a time before Christ", `INSERT INTO api_patient VALUES (6, '0044-03-15 BC', now(), 1, 'P', '', 'p@example.com', NULL, '');`,
			`api_patient 6: created_at: "0044-03-15T00:00:00+00:00 BC" is not a time in the years 1–9999`},
		{"a time past 9999", `INSERT INTO api_patient VALUES (6, now(), '12345-01-01', 1, 'P', '', 'p@example.com', NULL, '');`,
			`api_patient 6: updated_at: "12345-01-01T00:00:00+00:00" is not a time in the years 1–9999`},
		{"a patient whose owner is missing", `ALTER TABLE api_patient DROP CONSTRAINT api_patient_created_by_id_fkey;` + patient(6, "p@example.com", "NULL", "") +
			`UPDATE api_patient SET created_by_id = 99;`, `api_patient 6: created_by_id: auth_user 99 does not exist`},
		{"a mapping whose patient is missing", `ALTER TABLE api_patientdoctormap DROP CONSTRAINT api_patientdoctormap_patient_id_fkey;
			INSERT INTO api_doctor VALUES (1, now(), now(), 'Al', '', 'al@example.com', 'Cardiology');
			INSERT INTO api_patientdoctormap VALUES (4, now(), now(), 77, 1);`, `api_patientdoctormap 4: patient_id: api_patient 77 does not exist`},
		{"a mapping whose doctor is missing", `ALTER TABLE api_patientdoctormap DROP CONSTRAINT api_patientdoctormap_doctor_id_fkey;` + patient(6, "p@example.com", "NULL", "") +
			`INSERT INTO api_patientdoctormap VALUES (4, now(), now(), 6, 78);`, `api_patientdoctormap 4: doctor_id: api_doctor 78 does not exist`},
	} {
		t.Run(c.name, func(t *testing.T) {
			source := djangoSource(t, fmt.Sprintf("_refused%d", i), user+";"+c.rows)
			for _, args := range [][]string{{"--check"}, nil} {
				out, err := importInto(t, name, source, args...)
				if err == nil || !strings.Contains(err.Error(), "nothing was written") || !strings.Contains(out, c.want+"\n") {
					t.Fatalf("import-django %v: %v\n%s\nwant the line %q", args, err, out, c.want)
				}
				if got := rowCounts(t, target); got != "0 0 0 0 0 0" {
					t.Fatalf("a refused import wrote rows: %s", got)
				}
			}
		})
	}
}

// TestImportDjangoDoctorCreator: --doctor-creator makes an imported account
// (its username in any case) the creator of every imported doctor, who may
// then correct them; a name no imported account has is refused.
func TestImportDjangoDoctorCreator(t *testing.T) {
	hash := djangoHash(t, oldPassword, "DjangoSalt0123456789ab", 1_000)
	source := djangoSource(t, "_creator", `INSERT INTO auth_user VALUES (1, '`+hash+`', NULL, false, 'ada', '', '', 'ada@example.com', false, true, now()),
			(2, '`+hash+`', NULL, false, 'bo', '', '', 'bo@example.com', false, true, now());
		INSERT INTO api_doctor VALUES (4, now(), now(), 'Greg', 'House', 'house@example.com', 'Diagnostics'),
			(5, now(), now(), 'Lisa', 'Cuddy', 'cuddy@example.com', 'Endocrinology');`)
	target := scratchDB(t, "_creator_target", -1)
	name := testDBConfig.Database + "_creator_target"
	for _, args := range [][]string{{"--check", "--doctor-creator", "nobody"}, {"--doctor-creator=nobody"}} {
		out, err := importInto(t, name, source, args...)
		if err == nil || !strings.Contains(out, "--doctor-creator: no user in auth_user has the username \"nobody\"\n") ||
			!strings.Contains(err.Error(), "1 problems (listed above)") {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	if out, err := importInto(t, name, source, "--doctor-creator", "BO"); err != nil || strings.Contains(out, "no creator") {
		t.Fatalf("import: %v\n%s", err, out)
	}
	var creators string
	if err := target.QueryRowContext(t.Context(), `SELECT string_agg(concat(id, ':', created_by), ' ' ORDER BY id) FROM doctors`).Scan(&creators); err != nil || creators != "4:2 5:2" {
		t.Fatalf("creators %q, %v", creators, err)
	}
	s := newTestServerOn(t, target, slog.New(slog.DiscardHandler), nil)
	bo, ada := loginPair(t, s, "bo", oldPassword), loginPair(t, s, "ada", oldPassword)
	wantJSON(t, do(t, s, req{method: "PATCH", path: "/api/doctors/5/", token: ada.Access, body: map[string]any{"specialization": "Oncology"}}),
		403, `{"detail": "You do not have permission to perform this action."}`)
	res := do(t, s, req{method: "PATCH", path: "/api/doctors/5/", token: bo.Access, body: map[string]any{"specialization": "Oncology"}})
	if got := wantObject(t, res, 200); got["specialization"] != "Oncology" {
		t.Fatalf("bo's correction: %s", res.body)
	}
}

// TestImportDjangoListsAccounts: every account copied without a usable
// password is listed with its reason, and every superuser or staff
// account; none of them stops the import.
func TestImportDjangoListsAccounts(t *testing.T) {
	good := djangoHash(t, oldPassword, "DjangoSalt0123456789ab", 1_000)
	dk := good[strings.LastIndex(good, "$")+1:]
	source := djangoSource(t, "_lists", `INSERT INTO auth_user VALUES
		(1, '`+good+`', NULL, true, 'root', '', '', 'root@example.com', true, true, now()),
		(2, '`+good+`', NULL, false, 'clerk', '', '', 'clerk@example.com', true, true, now()),
		(3, 'argon2$argon2id$v=19$m=102400,t=2,p=8$c2FsdA$aGFzaA', NULL, false, 'ar', '', '', 'ar@example.com', false, true, now()),
		(4, 'pbkdf2_sha256$0$salt$`+dk+`', NULL, false, 'zero', '', '', 'zero@example.com', false, true, now()),
		(5, 'pbkdf2_sha256$1000000000$salt$`+dk+`', NULL, false, 'huge', '', '', 'huge@example.com', false, true, now()),
		(6, 'pbkdf2_sha256$1000$salt$not*base64', NULL, false, 'b64', '', '', 'b64@example.com', false, true, now()),
		(7, 'pbkdf2_sha256$1000$salt', NULL, false, 'short', '', '', 'short@example.com', false, true, now()),
		(8, '`+good+`', NULL, false, 'gone', '', '', 'gone@example.com', false, false, now()),
		(9, '`+good+`', NULL, false, 'fine', '', '', 'fine@example.com', false, true, now());`)
	target := scratchDB(t, "_lists_target", -1)
	out, err := importInto(t, testDBConfig.Database+"_lists_target", source)
	want := []string{
		"auth_user 1: a Django superuser or staff account, copied as an ordinary user (this server has no admin)",
		"auth_user 2: a Django superuser or staff account, copied as an ordinary user (this server has no admin)",
		"auth_user 3: copied with no usable password (another hasher, or unusable in Django)",
		"auth_user 4: copied with no usable password (a malformed or unverifiable hash)",
		"auth_user 5: copied with no usable password (a malformed or unverifiable hash)",
		"auth_user 6: copied with no usable password (a malformed or unverifiable hash)",
		"auth_user 7: copied with no usable password (a malformed or unverifiable hash)",
		"auth_user 8: copied with no usable password (inactive)",
		`"unusable_passwords":6`,
	}
	for _, w := range want {
		if err != nil || !strings.Contains(out, w) || strings.Contains(out, "auth_user 9") {
			t.Fatalf("import: %v\n%s\nwant %q", err, out, w)
		}
	}
	var unusable string
	err = target.QueryRowContext(t.Context(), `SELECT string_agg(id::text, ' ' ORDER BY id) FROM users WHERE password LIKE '!%'`).Scan(&unusable)
	if err != nil || unusable != "3 4 5 6 7 8" {
		t.Fatalf("accounts stored unusable: %q, %v", unusable, err)
	}
}

// TestImportDjangoTarget: --check fails wherever the import would: a target
// behind the server's step, and a role that may not write it (the serving
// role: it may not move a sequence), each named with its fix.
func TestImportDjangoTarget(t *testing.T) {
	source := djangoSource(t, "_target", `INSERT INTO auth_user VALUES (1, '!', NULL, false, 'ada', '', '', 'ada@example.com', false, true, now());`)
	scratchDB(t, "_behind", 2)
	for _, args := range [][]string{{"--check"}, nil} {
		out, err := importInto(t, testDBConfig.Database+"_behind", source, args...)
		want := fmt.Sprintf(`database schema is at step 2, import-django needs step %d: run "healthcare migrate" as the schema owner`, len(schemaSteps))
		if args == nil {
			want = "" // the owner's import brings the schema up to date first
		}
		if want != "" && (err == nil || err.Error() != want) || want == "" && err != nil {
			t.Fatalf("%v: %v\n%s\nwant %q", args, err, out, want)
		}
	}
	role := appRole(t) // dropped after the database that grants it rights
	db := scratchDB(t, "_as_app", -1)
	if err := grantServing(t.Context(), db, role); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"--check"}, nil} {
		var out bytes.Buffer
		env := testEnv(map[string]string{"DB_NAME": testDBConfig.Database + "_as_app", "DB_USER": role, "DJANGO_DATABASE_URL": source})
		err := run(t.Context(), append([]string{"import-django"}, args...), env, &out, io.Discard)
		want := fmt.Sprintf(`role %q may not write this server's tables (UPDATE on public.users_id_seq, UPDATE on public.patients_id_seq, `+
			`UPDATE on public.doctors_id_seq, UPDATE on public.mappings_id_seq): the schema owner runs import-django, as it runs migrate`, role)
		if err == nil || err.Error() != want {
			t.Fatalf("%v as the serving role: %v\n%s\nwant %s", args, err, out.String(), want)
		}
	}
	if got := rowCounts(t, db); got != "0 0 0 0 0 0" {
		t.Fatalf("wrote %s", got)
	}
}

// TestImportDjangoTwoAtOnce: of two imports started together into one
// empty database, exactly one copies; the other finds its rows.
func TestImportDjangoTwoAtOnce(t *testing.T) {
	source := djangoSource(t, "_twice", `INSERT INTO auth_user VALUES (1, '!', NULL, false, 'ada', '', '', 'ada@example.com', false, true, now());
		INSERT INTO api_patient VALUES (1, now(), now(), 1, 'P', '', 'p@example.com', NULL, '');`)
	target := scratchDB(t, "_twice_target", -1)
	errs := make(chan error, 2)
	for range 2 {
		go func() {
			_, err := importInto(t, testDBConfig.Database+"_twice_target", source)
			errs <- err
		}()
	}
	first, second := <-errs, <-errs
	if (first == nil) == (second == nil) || !strings.Contains(fmt.Sprint(first, second), "already holds users, patients, doctors or mappings") {
		t.Fatalf("two imports at once: %v; %v", first, second)
	}
	if got := rowCounts(t, target); got != "1 1 0 0 2 0" {
		t.Fatalf("after two imports: %s", got)
	}
}

// TestImportDjangoSettings: without DJANGO_DATABASE_URL the message names
// it; a URL's password is never printed.
func TestImportDjangoSettings(t *testing.T) {
	needDB(t)
	name := testDBConfig.Database // the import stops before it touches the target
	if _, err := importInto(t, name, ""); err == nil || !strings.Contains(err.Error(), "DJANGO_DATABASE_URL is not set") {
		t.Fatalf("no URL: %v", err)
	}
	for _, url := range []string{"postgres://u:Sekrit-pw@127.0.0.1:1/x?sslmode=disable", "postgres://u:Sekrit-pw@[::1"} {
		out, err := importInto(t, name, url)
		if err == nil || strings.Contains(err.Error()+out, "Sekrit-pw") || !strings.Contains(err.Error(), "DJANGO_DATABASE_URL") {
			t.Fatalf("%s: %v\n%s", url, err, out)
		}
	}
}

// BenchmarkImportDjango imports 100,000 patients, each with a mapping, of
// 1,000 accounts, into a fresh database (README, Moving from the Django
// service): go test -run '^$' -bench ImportDjango -benchtime 1x .
func BenchmarkImportDjango(b *testing.B) {
	source := djangoSource(b, "_bench", `
		INSERT INTO auth_user SELECT g, '!', NULL, false, 'user' || g, 'First', 'Last', 'user' || g || '@example.com', false, true, now()
			FROM generate_series(1, 1000) g;
		INSERT INTO api_patient SELECT g, now(), now(), 1 + g % 1000, 'Pat', 'Ient', 'p' || g || '@example.com',
			DATE '1950-01-01' + g % 20000, '+1 555 010 ' || lpad((g % 10000)::text, 4, '0') FROM generate_series(1, 100000) g;
		INSERT INTO api_doctor SELECT g, now(), now(), 'Doc', 'Tor', 'd' || g || '@example.com', 'Cardiology' FROM generate_series(1, 100) g;
		INSERT INTO api_patientdoctormap SELECT g, now(), now(), g, 1 + g % 100 FROM generate_series(1, 100000) g;`)
	for i := range b.N {
		b.StopTimer()
		target := fmt.Sprintf("_bench%d", i)
		db := scratchDB(b, target, -1)
		b.StartTimer()
		if out, err := importInto(b, testDBConfig.Database+target, source); err != nil {
			b.Fatalf("import: %v\n%s", err, out)
		}
		b.StopTimer()
		if got := rowCounts(b, db); got != "1000 100000 100 100000 2000 0" {
			b.Fatalf("imported %s", got)
		}
	}
}

// TestTimeZone: with TIME_ZONE=Asia/Kolkata every time is written with
// +05:30, the instant the UTC default writes with Z; an unknown zone stops
// start-up naming TIME_ZONE.
func TestTimeZone(t *testing.T) {
	needDB(t)
	for _, tz := range []string{"Mars/Olympus", "Local", "+05:30"} {
		err := run(t.Context(), nil, testEnv(map[string]string{"TIME_ZONE": tz}), io.Discard, io.Discard)
		if want := fmt.Sprintf("TIME_ZONE: want an IANA time zone name such as UTC or Asia/Kolkata, got %q", tz); err == nil || err.Error() != want {
			t.Fatalf("TIME_ZONE=%s: %v", tz, err)
		}
	}
	cfg, _, err := loadConfig(testEnv(map[string]string{"TIME_ZONE": "Asia/Kolkata", "DB_NAME": testDBConfig.Database}))
	if err != nil {
		t.Fatal(err)
	}
	db, err := openDB(t.Context(), cfg.db, 2, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	kolkata, utc := newTestServerOn(t, db, slog.New(slog.DiscardHandler), nil), newTestServer(t, nil)
	a := register(t, kolkata)
	id, _ := mustCreate(t, kolkata, a.access, "/api/patients/", map[string]any{"first_name": "Tz", "email": "tz@example.com"})
	path := fmt.Sprintf("/api/patients/%d/", id)
	local, zulu := wantObject(t, do(t, kolkata, req{method: "GET", path: path, token: a.access}), 200),
		wantObject(t, do(t, utc, req{method: "GET", path: path, token: a.access}), 200)
	for _, key := range []string{"created_at", "updated_at"} {
		l, _ := local[key].(string)
		z, _ := zulu[key].(string)
		lt, lerr := time.Parse(time.RFC3339Nano, l)
		zt, zerr := time.Parse(time.RFC3339Nano, z)
		if !regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+05:30$`).MatchString(l) || !strings.HasSuffix(z, "Z") ||
			lerr != nil || zerr != nil || !lt.Equal(zt) || len(z) != len("2026-12-07T02:22:49.931696Z") {
			t.Fatalf("%s: %q in Asia/Kolkata, %q in UTC: want the same instant, +05:30 and Z", key, l, z)
		}
	}
	res := do(t, kolkata, req{method: "GET", path: "/api/audit/", token: a.access})
	if page := wantObject(t, res, 200); !strings.HasSuffix(fmt.Sprint(page["results"].([]any)[0].(map[string]any)["at"]), "+05:30") {
		t.Fatalf("audit event time: %s", res.body)
	}
}

// TestRefreshCountedPerUser: refresh and logout with a validly signed
// refresh token count against its user's limit, so that a clinic behind one
// address is not throttled by the anonymous limit; a forged token is
// anonymous as before.
func TestRefreshCountedPerUser(t *testing.T) {
	a := register(t, newTestServer(t, nil))
	s := newTestServer(t, map[string]string{"RATE_ANON": "2/hour", "RATE_USER": "100/hour"})
	token := a.refresh
	for i := range 5 {
		token = pairOf(t, refresh(t, s, token)).Refresh
		if i == 2 {
			wantNoContent(t, logout(t, s, pairOf(t, login(t, newTestServer(t, nil), a.username, a.password)).Refresh))
		}
	}
	forged := forge(`{"alg":"HS256","typ":"JWT"}`, fmt.Sprintf(`{"token_type":"refresh","exp":%d,"iat":1,"jti":"%032d","user_id":%d,"sid":1}`,
		time.Now().Add(time.Hour).Unix(), 0, a.id), "not-the-key-0123456789abcdef-0123456789")
	invalid := `{"detail": "Token is invalid or expired", "code": "token_not_valid"}`
	wantUnauthorized(t, refresh(t, s, forged), invalid)
	wantUnauthorized(t, logout(t, s, forged), invalid)
	wantThrottled(t, refresh(t, s, forged), anyWait)
	wantThrottled(t, logout(t, s, forged), anyWait)
	// The user's own budget is untouched by the strangers' and still serves.
	pairOf(t, refresh(t, s, token))
}

// TestConnectionStrings: DATABASE_URL and DJANGO_DATABASE_URL in both of
// libpq's forms; a password holding @ / # : ? connects when written as the
// form wants it, and no error (parse, DNS, refusal) prints any of it.
func TestConnectionStrings(t *testing.T) {
	needDB(t)
	const password = "Qx7@Vb8/Kp3#Lm4:Rt5?Zw6"
	c := testDBConfig
	encoded := (&neturl.URL{Scheme: "postgres", User: neturl.UserPassword(c.User, password), Host: fmt.Sprintf("%s:%d", c.Host, c.Port), Path: c.Database}).String()
	keyValue := fmt.Sprintf("host=%s port=%d user=%s password='%s' dbname=%s", c.Host, c.Port, c.User, password, c.Database)
	raw := fmt.Sprintf("postgres://%s:%s@%s:%d/%s", c.User, password, c.Host, c.Port, c.Database)
	for _, tc := range []struct{ name, value, want string }{
		{"URL, encoded", encoded + "?sslmode=disable", ""},
		{"key/value", keyValue, ""},
		{"URL, not encoded", raw, "%s: cannot be read; want a URL, postgres://user:password@host:port/name with reserved characters percent-encoded, or key=value pairs, host=… user=… password='…' dbname=…"},
		{"URL, only a #", fmt.Sprintf("postgres://%s:a#b@%s/%s", c.User, c.Host, c.Database), "%s: cannot be read; want a URL"},
		{"key/value, unquoted space", "host=127.0.0.1 password=Qx7 Vb8 dbname=x", "%s: cannot be read"},
		{"URL, a host that does not resolve", strings.Replace(encoded, c.Host, "nonexistent.invalid", 1), "nonexistent.invalid"},
		{"key/value, a host that does not resolve", strings.Replace(keyValue, "host="+c.Host, "host=nonexistent.invalid", 1), "nonexistent.invalid"},
		{"URL, a closed port", strings.Replace(encoded, fmt.Sprint(c.Port), "1", 1) + "?sslmode=disable", "127.0.0.1"},
		{"key/value, a closed port", strings.Replace(keyValue, fmt.Sprint("port=", c.Port), "port=1", 1), "127.0.0.1"},
	} {
		for _, variable := range []string{"DATABASE_URL", "DJANGO_DATABASE_URL"} {
			t.Run(tc.name+" in "+variable, func(t *testing.T) {
				var stdout, stderr bytes.Buffer
				args, env := []string{"migrate"}, map[string]string{variable: tc.value}
				if variable == "DJANGO_DATABASE_URL" {
					args, env["DB_NAME"] = []string{"import-django", "--check"}, c.Database
				}
				err := run(t.Context(), args, testEnv(env), &stdout, &stderr)
				printed := fmt.Sprint(err) + stdout.String() + stderr.String()
				for _, part := range strings.FieldsFunc(password, func(r rune) bool { return strings.ContainsRune("@/#:?", r) }) {
					if strings.Contains(printed, part) {
						t.Fatalf("printed a part of the password (%s): %s", part, printed)
					}
				}
				switch want := strings.ReplaceAll(tc.want, "%s", variable); {
				case want == "" && variable == "DATABASE_URL" && err != nil:
					t.Fatalf("migrate: %v", err)
				case want == "" && variable == "DJANGO_DATABASE_URL" && (err == nil || !strings.Contains(err.Error(), `"auth_user" does not exist`)):
					t.Fatalf("import-django connected? %v", err) // the test database has no auth_user
				case want != "" && (err == nil || !strings.Contains(err.Error(), want)):
					t.Fatalf("%v\nwant %q", err, want)
				}
			})
		}
	}
}

// TestMissingDatabase: a database that does not exist, for a role that may
// not create it, is reported as missing; one the server creates is logged.
func TestMissingDatabase(t *testing.T) {
	role := appRole(t)
	name := testDBConfig.Database + "_missing"
	var out bytes.Buffer
	err := run(t.Context(), []string{"migrate"}, testEnv(map[string]string{"DB_NAME": name, "DB_USER": role}), &out, io.Discard)
	if want := fmt.Sprintf(`database %q on %s: pq: database %q does not exist (3D000)`, name, testDBConfig.Host, name); err == nil || err.Error() != want {
		t.Fatalf("as %s: %v\n%s\nwant %s", role, err, out.String(), want)
	}
	t.Cleanup(func() {
		testDB.ExecContext(context.Background(), "DROP DATABASE IF EXISTS "+pq.QuoteIdentifier(testDBConfig.Database+"_created")+" WITH (FORCE)")
	})
	out.Reset()
	err = run(t.Context(), []string{"migrate"}, testEnv(map[string]string{"DB_NAME": testDBConfig.Database + "_created"}), &out, io.Discard)
	if want := fmt.Sprintf(`"msg":"created database","database":%q,"host":%q}`, testDBConfig.Database+"_created", testDBConfig.Host); err != nil || !strings.Contains(out.String(), want) {
		t.Fatalf("as the superuser: %v\n%s\nwant %s", err, out.String(), want)
	}
}

// TestVersionNamesCommit builds the binary as README says, in a git clone
// of this tree (Go stamps no commit in a "git worktree"), and asks it which
// build it is: clean, then with a change.
func TestVersionNamesCommit(t *testing.T) {
	dir := t.TempDir()
	files, err := exec.Command("git", "ls-files").Output()
	if err != nil {
		t.Fatalf("git ls-files (the test needs git): %v", err)
	}
	for _, f := range strings.Fields(string(files)) {
		data, err := os.ReadFile(f)
		if err == nil {
			err = os.MkdirAll(filepath.Dir(filepath.Join(dir, f)), 0o755)
		}
		if err == nil {
			err = os.WriteFile(filepath.Join(dir, f), data, 0o644)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	inDir := func(name string, args ...string) string {
		cmd := exec.Command(name, args...)
		cmd.Dir, cmd.Env = dir, append(os.Environ(), "GOFLAGS=-buildvcs=true") // as where GOFLAGS is unset
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	inDir("git", "init", "-q")
	inDir("git", "add", ".")
	inDir("git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "test")
	head := inDir("git", "rev-parse", "HEAD")
	for _, modified := range []string{"", " (modified)"} {
		if modified != "" {
			os.WriteFile(filepath.Join(dir, "README.md"), []byte("changed"), 0o644)
		}
		inDir("go", "build", "-o", "healthcare", ".")
		if got := inDir("./healthcare", "version"); !strings.Contains(got, " commit "+head+modified+" go1.") {
			t.Fatalf("healthcare version: %q; want the commit %s%s", got, head, modified)
		}
	}
}
