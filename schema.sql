-- The schema as numbered steps. Each "-- step N" line starts step N, which
-- runs once, in its own transaction, and is then recorded in
-- schema_migrations; a database that is at the last step is not touched.
-- Add a step to change the schema; never edit one that has shipped.
-- Constraints live here, not in Go, so the data stays consistent even when
-- two requests race.

-- step 1: the schema as it stood before steps. Every statement is
-- idempotent, so it also upgrades a database made by an earlier server.
CREATE TABLE IF NOT EXISTS schema_migrations (
    step       integer     PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS users (
    id         bigserial PRIMARY KEY,
    username   varchar(150) NOT NULL CHECK (username <> ''),
    email      varchar(254) NOT NULL CHECK (email <> '' AND email = lower(email)),
    name       varchar(150) NOT NULL CHECK (name <> ''),
    password   varchar(256) NOT NULL,
    created_at timestamptz  NOT NULL DEFAULT now()
);
-- password_version counts password changes, whoever makes them (this
-- server, an older one, an operator's UPDATE): a login or a change goes on
-- only if the password it verified is still in force by this number. A
-- login sets last_login (as Django does), and a hash it upgrades to more
-- iterations in that same write is no change: logins racing an upgrade do
-- not refuse each other. (Checked before altering: ALTER TABLE locks the
-- table even when the column exists.)
DO $$ BEGIN
    IF (SELECT count(*) FROM information_schema.columns
        WHERE table_name = 'users' AND column_name IN ('password_version', 'last_login')) < 2 THEN
        ALTER TABLE users ADD COLUMN IF NOT EXISTS password_version integer NOT NULL DEFAULT 0,
            ADD COLUMN IF NOT EXISTS last_login timestamptz;
    END IF;
END $$;
CREATE OR REPLACE FUNCTION users_password_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.password IS DISTINCT FROM OLD.password AND NEW.last_login IS NOT DISTINCT FROM OLD.last_login THEN
        NEW.password_version := OLD.password_version + 1;
    END IF;
    RETURN NEW;
END $$;
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'users_password_version') THEN
        CREATE TRIGGER users_password_version BEFORE UPDATE OF password ON users
            FOR EACH ROW EXECUTE FUNCTION users_password_version();
    END IF;
END $$;

-- Every lower-cased username and email of every account, in one unique key:
-- a login name (username or email) can then only ever mean one account, and
-- the database, not a check in Go, decides who wins a registration race.
CREATE TABLE IF NOT EXISTS login_names (
    name    varchar(254) PRIMARY KEY CHECK (name = lower(name)),
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS login_names_user_id ON login_names (user_id);

-- A session is one login. Every token carries its id (the "sid" claim);
-- ending it ends every access and refresh token descended from that login.
CREATE TABLE IF NOT EXISTS sessions (
    id         bigserial PRIMARY KEY,
    user_id    bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL, -- LOGIN_MAX_AGE_DAYS after created_at
    ended_at   timestamptz
);
CREATE INDEX IF NOT EXISTS sessions_user_id ON sessions (user_id);
-- Logins made before logins had an end get the default age from now on.
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS expires_at timestamptz NOT NULL DEFAULT now() + interval '30 days';
ALTER TABLE sessions ALTER COLUMN expires_at DROP DEFAULT;

-- login_live is the one "login is live" rule: every statement that serves
-- an authenticated request calls it with the caller's user id and login id
-- ($1, $2), so an ended login fails the statement itself with HC401, which
-- the server answers 401. PostgreSQL runs it once per statement (a
-- one-time filter), before any row is read or written.
CREATE OR REPLACE FUNCTION login_live(uid bigint, sid bigint) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM sessions WHERE id = sid AND user_id = uid AND ended_at IS NULL AND expires_at > now()) THEN
        RAISE EXCEPTION 'login % has ended', sid USING ERRCODE = 'HC401';
    END IF;
    RETURN true;
END $$;

-- api_time writes a time as DRF does: RFC 3339 in UTC, microseconds, "Z".
-- A one-line SQL function, so PostgreSQL inlines it.
CREATE OR REPLACE FUNCTION api_time(t timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$ SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') $$;

-- Every refresh token issued, so that each can be used once.
CREATE TABLE IF NOT EXISTS refresh_tokens (
    jti        char(32)    PRIMARY KEY,
    session_id bigint      NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    expires_at timestamptz NOT NULL,
    rotated_at timestamptz
);
CREATE INDEX IF NOT EXISTS refresh_tokens_session_id ON refresh_tokens (session_id);

CREATE TABLE IF NOT EXISTS patients (
    id            bigserial PRIMARY KEY,
    owner_id      bigint       NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    first_name    varchar(100) NOT NULL CHECK (btrim(first_name) <> ''),
    last_name     varchar(100) NOT NULL DEFAULT '',
    email         varchar(254) NOT NULL CHECK (email <> '' AND email = lower(email)),
    date_of_birth date CHECK (date_of_birth >= DATE '1900-01-01'),
    phone         varchar(32)  NOT NULL DEFAULT '',
    created_at    timestamptz  NOT NULL DEFAULT now(),
    updated_at    timestamptz  NOT NULL DEFAULT now()
);
-- Unique per owner, not globally: a global key would tell one user that
-- another user has a patient with that email.
CREATE UNIQUE INDEX IF NOT EXISTS patients_owner_email ON patients (owner_id, email);
-- An owner's list is one range of this index. It is unique so that mappings
-- can name (owner, patient) in one foreign key.
CREATE UNIQUE INDEX IF NOT EXISTS patients_owner_id_key ON patients (owner_id, id);
DROP INDEX IF EXISTS patients_owner_id; -- its non-unique predecessor

-- Patient counts were once kept by a trigger; lists count as DRF does now.
DROP TRIGGER IF EXISTS patients_count ON patients;
DROP FUNCTION IF EXISTS count_patients();
DROP TABLE IF EXISTS patient_counts;

CREATE TABLE IF NOT EXISTS doctors (
    id             bigserial PRIMARY KEY,
    created_by     bigint       REFERENCES users (id) ON DELETE SET NULL,
    first_name     varchar(100) NOT NULL CHECK (btrim(first_name) <> ''),
    last_name      varchar(100) NOT NULL DEFAULT '',
    email          varchar(254) NOT NULL CHECK (email <> '' AND email = lower(email)),
    specialization varchar(120) NOT NULL CHECK (char_length(btrim(specialization)) >= 3),
    created_at     timestamptz  NOT NULL DEFAULT now(),
    updated_at     timestamptz  NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS doctors_email ON doctors (email);

CREATE TABLE IF NOT EXISTS mappings (
    id         bigserial PRIMARY KEY,
    -- The patient's owner, kept here so that an owner's list is one range of
    -- an index; the foreign key mappings_patient holds it equal to the
    -- patient's owner.
    owner_id   bigint      NOT NULL,
    patient_id bigint      NOT NULL,
    -- RESTRICT: deleting an assigned doctor must fail, not silently remove
    -- other users' assignments.
    doctor_id  bigint      NOT NULL REFERENCES doctors (id) ON DELETE RESTRICT,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT mappings_patient_doctor UNIQUE (patient_id, doctor_id),
    CONSTRAINT mappings_patient FOREIGN KEY (owner_id, patient_id)
        REFERENCES patients (owner_id, id) ON DELETE CASCADE
);
-- A database made before mappings had owner_id gains it here, once.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = current_schema() AND table_name = 'mappings' AND column_name = 'owner_id') THEN
        ALTER TABLE mappings ADD COLUMN owner_id bigint;
        UPDATE mappings m SET owner_id = p.owner_id FROM patients p WHERE p.id = m.patient_id;
        ALTER TABLE mappings ALTER COLUMN owner_id SET NOT NULL,
            DROP CONSTRAINT mappings_patient_id_fkey,
            ADD CONSTRAINT mappings_patient FOREIGN KEY (owner_id, patient_id)
                REFERENCES patients (owner_id, id) ON DELETE CASCADE;
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS mappings_doctor_id ON mappings (doctor_id);
CREATE INDEX IF NOT EXISTS mappings_owner_id ON mappings (owner_id, id);

-- Statements run with generic plans (README, Performance), made without
-- knowing which owner asks; say owners are many, so that the plan is the
-- owner index even while two users hold every row.
ALTER TABLE patients ALTER COLUMN owner_id SET (n_distinct = -0.01);
ALTER TABLE mappings ALTER COLUMN owner_id SET (n_distinct = -0.01);


-- The audit trail: who touched which patient record, when, from where.
-- Events name users, logins, patients and doctors by id without foreign
-- keys, so they outlive all of them.
CREATE TABLE IF NOT EXISTS audit_events (
    id         bigserial   PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    user_id    bigint      NOT NULL, -- the account that acted
    login_id   bigint,               -- its login (sid); null for login.failed
    action     text        NOT NULL CHECK (action IN ('patient.create', 'patient.read', 'patient.update',
        'patient.delete', 'patient.list', 'mapping.create', 'mapping.delete', 'mapping.list', 'login',
        'login.failed', 'refresh.reused', 'logout', 'logout.all', 'password.change')),
    patient_id bigint,
    doctor_id  bigint,
    fields     text[]      NOT NULL DEFAULT '{}', -- names only, never values
    ip         text        NOT NULL,
    request_id text        NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_events_user_id ON audit_events (user_id, id);
ALTER TABLE audit_events ALTER COLUMN user_id SET (n_distinct = -0.01);

-- Append-only, whoever asks: the table's owner and this server included.
CREATE OR REPLACE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit events are append-only' USING ERRCODE = 'HC403';
END $$;
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'audit_events_append_only') THEN
        CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_events
            FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
    END IF;
END $$;

-- step 2: failed logins per account, counted from the audit trail; failed
-- logins for names that belong to no account; changes to the doctor
-- directory; usernames in Unicode NFKC, as Django stores them.
-- The new check holds for every new event; the old one held for every
-- event there is, so there is nothing to scan (NOT VALID).
ALTER TABLE audit_events ALTER COLUMN user_id DROP NOT NULL, -- null: login.failed for a name of no account
    DROP CONSTRAINT audit_events_action_check,
    ADD CONSTRAINT audit_events_action_check CHECK (action IN ('patient.create', 'patient.read', 'patient.update',
        'patient.delete', 'patient.list', 'mapping.create', 'mapping.delete', 'mapping.list', 'doctor.create',
        'doctor.update', 'doctor.delete', 'login', 'login.failed', 'refresh.reused', 'logout', 'logout.all',
        'password.change')) NOT VALID;
-- An account's run of failed logins is read from its latest events of these
-- kinds, however many other events it has.
CREATE INDEX audit_events_logins ON audit_events (user_id, id) WHERE action IN ('login', 'login.failed', 'password.change');

-- Existing usernames are normalized; two that would become one stop this
-- step (nothing changes) with a message naming both.
DO $$
DECLARE clash text;
BEGIN
    SELECT string_agg(names, '; ') INTO clash FROM (
        SELECT string_agg(quote_literal(username), ' and ' ORDER BY id) AS names FROM users
        GROUP BY lower(normalize(username, NFKC)) HAVING count(*) > 1
        UNION ALL
        SELECT quote_literal(u.username) || ' and ' || quote_literal(n.name) FROM users u
        JOIN login_names n ON n.name = lower(normalize(u.username, NFKC)) AND n.user_id <> u.id
            AND u.username <> normalize(u.username, NFKC)) c;
    IF clash IS NOT NULL THEN
        RAISE EXCEPTION 'usernames that are one name in Unicode NFKC: %; rename one of each, then migrate again', clash;
    END IF;
    UPDATE login_names n SET name = lower(normalize(u.username, NFKC)) FROM users u
    WHERE n.user_id = u.id AND n.name = lower(u.username) AND u.username <> normalize(u.username, NFKC);
    UPDATE users SET username = normalize(username, NFKC) WHERE username <> normalize(username, NFKC);
END $$;
-- From now on the database refuses any other form, from an older server
-- still running during an upgrade too.
ALTER TABLE users ADD CONSTRAINT users_username_nfkc CHECK (username = normalize(username, NFKC));

-- login_wait is the per-account lock: how many seconds the account's next
-- login must still wait (0 or less: none). After `after` failed logins in a
-- row (since its last login or password change), from any client on any
-- instance, it waits `secs` after the last failure, doubled for every
-- further failure, up to 16 times.
CREATE FUNCTION login_wait(uid bigint, after int, secs int) RETURNS int LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN count(*) < after THEN 0 ELSE
        ceil(extract(epoch FROM max(at) + make_interval(secs => secs * 2 ^ least(count(*) - after, 4)) - now()))::int END
    FROM audit_events WHERE user_id = uid AND action = 'login.failed'
        AND id > coalesce((SELECT max(id) FROM audit_events WHERE user_id = uid AND action IN ('login', 'password.change')), 0)
$$;

-- changed_fields names the fields whose values differ between was and now
-- (an update's event lists names, never values).
CREATE FUNCTION changed_fields(names text[], was text[], now text[]) RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY(SELECT n FROM unnest(names, was, now) AS f(n, a, b) WHERE a IS DISTINCT FROM b)
$$;

-- step 3: record versions, for ETag and If-Match. Every change of a patient
-- or a doctor, whoever writes it, counts its version up; etag() is the one
-- place that spells a record's entity tag.
ALTER TABLE patients ADD COLUMN version integer NOT NULL DEFAULT 1;
ALTER TABLE doctors ADD COLUMN version integer NOT NULL DEFAULT 1;
CREATE FUNCTION count_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    RETURN NEW;
END $$;
CREATE TRIGGER patients_version BEFORE UPDATE ON patients FOR EACH ROW EXECUTE FUNCTION count_version();
CREATE TRIGGER doctors_version BEFORE UPDATE ON doctors FOR EACH ROW EXECUTE FUNCTION count_version();
-- STABLE, as the text casts inside it are: PostgreSQL then inlines it.
CREATE FUNCTION etag(id bigint, version integer) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT '"' || id || '-' || version || '"'
$$;

-- step 4: failed logins per account and source. A row counts one name's
-- failed logins in a row from one source (the client IP as the rate limiter
-- keys it), or from every source together (source ''). The name is
-- '#' || the account's id, whichever of its names was sent, or '?' || the
-- normalized, lower-cased name of no account: two spaces that never meet,
-- and a name of no account locks exactly as an account does.
CREATE TABLE login_attempts (
    name         text        NOT NULL,
    source       text        NOT NULL,
    failures     integer     NOT NULL DEFAULT 0,
    last_failure timestamptz,
    last_login   timestamptz, -- the source's last successful login
    PRIMARY KEY (name, source)
);
-- The hourly prune finds rows nobody has touched for LOGIN_MAX_AGE_DAYS.
CREATE INDEX login_attempts_seen ON login_attempts (greatest(last_failure, last_login));
ALTER TABLE audit_events DROP CONSTRAINT audit_events_action_check,
    ADD CONSTRAINT audit_events_action_check CHECK (action IN ('patient.create', 'patient.read', 'patient.update',
        'patient.delete', 'patient.list', 'mapping.create', 'mapping.delete', 'mapping.list', 'doctor.create',
        'doctor.update', 'doctor.delete', 'login', 'login.failed', 'refresh.reused', 'logout', 'logout.all',
        'password.change', 'login.unlock')) NOT VALID;

-- lock_wait is the seconds left of the wait after n failures in a row, the
-- last at last: none below `after`, then `secs`, doubled for every further
-- failure, up to 16 times (0 or less: none).
CREATE FUNCTION lock_wait(n int, last timestamptz, after int, secs int) RETURNS int LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN n >= after THEN ceil(extract(epoch FROM last + make_interval(secs => secs * 2 ^ least(n - after, 4)) - now()))::int ELSE 0 END
$$;

-- login_attempt counts a login attempt as failed before its password is
-- checked (a success takes it back), unless the name must wait: then it
-- returns the seconds left and counts nothing. Attempts for one name take
-- turns (an advisory lock), so of any number at once no more than the
-- limit are let through. The account-wide ceiling (account_after, NULL to
-- count this source alone) spares sources that logged in within max_age days.
CREATE FUNCTION login_attempt(who text, src text, after int, secs int, account_after int, max_age int) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    here login_attempts;
    everywhere login_attempts;
    wait int;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext(who));
    SELECT * INTO here FROM login_attempts WHERE name = who AND source = src;
    SELECT * INTO everywhere FROM login_attempts WHERE name = who AND source = '';
    wait := lock_wait(here.failures, here.last_failure, after, secs);
    IF account_after IS NOT NULL AND NOT coalesce(here.last_login > now() - make_interval(days => max_age), false) THEN
        wait := greatest(wait, lock_wait(everywhere.failures, everywhere.last_failure, account_after, secs));
    END IF;
    IF wait > 0 THEN
        RETURN wait;
    END IF;
    INSERT INTO login_attempts AS a (name, source, failures, last_failure)
    SELECT who, s, 1, now() FROM unnest(ARRAY[src, CASE WHEN account_after IS NOT NULL THEN '' END]) s WHERE s IS NOT NULL
    ON CONFLICT (name, source) DO UPDATE SET failures = a.failures + 1, last_failure = now();
    RETURN 0;
END $$;

-- login_succeeded ends who's runs from src and from every source, and marks
-- src as a source it logs in from. It takes login_attempt's lock first, so
-- the two never wait for each other's rows in opposite orders.
CREATE FUNCTION login_succeeded(who text, src text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext(who));
    INSERT INTO login_attempts AS a (name, source, last_login) VALUES (who, src, now())
    ON CONFLICT (name, source) DO UPDATE SET failures = 0, last_login = now();
    UPDATE login_attempts SET failures = 0 WHERE name = who AND source = '';
END $$;

-- Once another user's patient is assigned to a doctor, its email (the
-- contact those users rely on) no longer changes, whoever writes. A new
-- mapping holds its doctor FOR SHARE, so the two cannot race past this.
CREATE FUNCTION doctors_email_frozen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.email <> OLD.email AND EXISTS (SELECT 1 FROM mappings WHERE doctor_id = OLD.id AND owner_id IS DISTINCT FROM OLD.created_by) THEN
        RAISE EXCEPTION 'other users rely on the email of doctor %', OLD.id USING ERRCODE = 'HC409';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER doctors_email_frozen BEFORE UPDATE OF email ON doctors FOR EACH ROW EXECUTE FUNCTION doctors_email_frozen();

-- step 5: pages that cost the same at any size. The audit trail pages by
-- id; a filter reads one range of its own index (each is paid for on every
-- event written), which leads with user_id, so that a generic plan (blind
-- to which user asks) prefers it to user_id's own. Search runs on trigram
-- indexes of the searched fields joined by ' ': a term never holds a space,
-- so a term found in the joined text is found in one field. pg_trgm is a
-- trusted extension: the schema's owner creates it.
CREATE INDEX audit_events_patient ON audit_events (user_id, patient_id, id) WHERE patient_id IS NOT NULL;
CREATE INDEX audit_events_doctor ON audit_events (user_id, doctor_id, id) WHERE doctor_id IS NOT NULL;
CREATE INDEX audit_events_login ON audit_events (user_id, login_id, id);
CREATE INDEX audit_events_action ON audit_events (user_id, action, id);
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE INDEX patients_search ON patients USING gin ((first_name || ' ' || last_name || ' ' || email) gin_trgm_ops);
CREATE INDEX doctors_search ON doctors USING gin
    ((first_name || ' ' || last_name || ' ' || email || ' ' || specialization) gin_trgm_ops);
CREATE INDEX doctors_last_name ON doctors (last_name, id);
-- TEMP (cutover branch only, for its tests; the lead takes the schema
-- helper's api_time instead): times in the connection's TimeZone, "Z" for UTC.
CREATE OR REPLACE FUNCTION api_time(t timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$ SELECT replace(to_char(t, 'YYYY-MM-DD"T"HH24:MI:SS.USTZH:TZM'), '+00:00', 'Z') $$;
