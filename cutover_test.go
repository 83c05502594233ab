package main

import (
	"bytes"
	"database/sql"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"testing"
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
		"auth_user 7: copied with no usable password", "auth_user 10: copied with no usable password",
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
	if err == nil || !strings.Contains(err.Error(), "already holds users, patients, doctors or mappings") {
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
			`auth_user 2: username "Ada" is another account's login name, after NFKC and lower-casing (auth_user 1 has it)`},
		{"email that is another account's username", `INSERT INTO auth_user VALUES (2, '!', NULL, false, 'ada@example.org', '', '', 'x@example.com', false, true, now()),
			(3, '!', NULL, false, 'cy', '', '', 'ADA@example.org', false, true, now());`,
			`auth_user 3: email "ada@example.org" is another account's login name (username or email) (auth_user 2 has it)`},
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
