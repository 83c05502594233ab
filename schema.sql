-- The schema as it is now: a new database gets this file whole, recorded
-- as the last step of upgrades.sql, whose steps bring an older database to
-- exactly this. Change both together (a new step there, its result here):
-- a test compares the catalogs. Constraints live here, not in Go, so the
-- data stays consistent even when two requests race.

-- One row per step applied, committed with it (this file counts as the
-- last step), so that a database is always at a whole step.
CREATE TABLE schema_migrations (
    step       integer     PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- api_time writes a time as DRF does: RFC 3339 in the connection's TimeZone
-- (TIME_ZONE), microseconds, "Z" for a zero offset. A one-line SQL
-- function, so PostgreSQL inlines it.
CREATE FUNCTION api_time(t timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$ SELECT to_char(t, 'YYYY-MM-DD"T"HH24:MI:SS.US') || CASE WHEN extract(timezone FROM t) = 0 THEN 'Z' ELSE to_char(t, 'TZH:TZM') END $$;

-- Usernames are kept in Unicode NFKC, as Django stores them, whoever
-- writes. password_version counts password changes, whoever makes them
-- (this server, an older one, an operator's UPDATE): a login or a change
-- goes on only if the password it verified is still in force by this
-- number. A login sets last_login (as Django does).
CREATE TABLE users (
    id               bigserial PRIMARY KEY,
    username         varchar(150) NOT NULL CHECK (username <> ''),
    email            varchar(254) NOT NULL CHECK (email <> '' AND email = lower(email)),
    name             varchar(150) NOT NULL CHECK (name <> ''),
    password         varchar(256) NOT NULL,
    created_at       timestamptz  NOT NULL DEFAULT now(),
    password_version integer      NOT NULL DEFAULT 0,
    last_login       timestamptz,
    CONSTRAINT users_username_nfkc CHECK (username = normalize(username, NFKC))
);
-- A hash a login upgrades to more iterations, in the write that sets
-- last_login, is no change: logins racing an upgrade do not refuse each
-- other.
CREATE FUNCTION users_password_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.password IS DISTINCT FROM OLD.password AND NEW.last_login IS NOT DISTINCT FROM OLD.last_login THEN
        NEW.password_version := OLD.password_version + 1;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER users_password_version BEFORE UPDATE OF password ON users
    FOR EACH ROW EXECUTE FUNCTION users_password_version();

-- Every lower-cased username and email of every user, in one unique key: a
-- login name (username or email) can then only ever mean one user, and the
-- database, not a check in Go, decides who wins a registration race.
CREATE TABLE login_names (
    name    varchar(254) PRIMARY KEY CHECK (name = lower(name)),
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE
);
CREATE INDEX login_names_user_id ON login_names (user_id);

-- A login: one sign-in. Every token carries its id (the "sid" claim);
-- ending it ends every access and refresh token descended from it.
CREATE TABLE logins (
    id         bigserial PRIMARY KEY,
    user_id    bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL, -- LOGIN_MAX_AGE_DAYS after created_at
    ended_at   timestamptz
);
CREATE INDEX logins_user_id ON logins (user_id);

-- login_live is the one "login is live" rule: every statement that serves
-- an authenticated request calls it with the user id and login id ($1,
-- $2), so an ended login fails the statement itself with HC401, which the
-- server answers 401. PostgreSQL runs it once per statement (a one-time
-- filter), before any row is read or written.
CREATE FUNCTION login_live(uid bigint, sid bigint) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM logins WHERE id = sid AND user_id = uid AND ended_at IS NULL AND expires_at > now()) THEN
        RAISE EXCEPTION 'login % has ended', sid USING ERRCODE = 'HC401';
    END IF;
    RETURN true;
END $$;

-- Every refresh token issued, so that each can be used once (rotated_at).
CREATE TABLE refresh_tokens (
    jti        char(32)    PRIMARY KEY,
    login_id   bigint      NOT NULL REFERENCES logins (id) ON DELETE CASCADE,
    expires_at timestamptz NOT NULL,
    rotated_at timestamptz
);
CREATE INDEX refresh_tokens_login_id ON refresh_tokens (login_id);

-- The login lock. A row is one run: a login name's failed logins in a row
-- from one source, or from every source together (source ''). The name is
-- the login name as sent (NFKC, lower-cased): a user's username and email
-- have runs of their own, and a name of no user waits exactly as a user's
-- does, so a wait tells nothing about which names exist or go together.
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

-- run_wait is the seconds left of the wait after n failures in a row, the
-- last at last: none below `after`, then `secs`, doubled for every further
-- failure, up to 16 times (0 or less: none).
CREATE FUNCTION run_wait(n int, last timestamptz, after int, secs int) RETURNS int LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN n >= after THEN ceil(extract(epoch FROM last + make_interval(secs => secs * 2 ^ least(n - after, 4)) - now()))::int ELSE 0 END
$$;

-- login_attempt counts an attempt as failed just before its password is
-- checked (the server holds a hashing slot by then, so a shed attempt is
-- never counted; a success ends the runs), unless the name must wait: then
-- it returns the seconds left and counts nothing. Attempts for one name
-- take turns (an advisory lock), so of any number at once no more than the
-- limit are checked. The ceiling for all sources (account_after, NULL to
-- count this source alone) spares sources that logged in to the name's user
-- within max_age days.
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
    wait := run_wait(here.failures, here.last_failure, after, secs);
    IF account_after IS NOT NULL AND NOT coalesce(here.last_login > now() - make_interval(days => max_age), false) THEN
        wait := greatest(wait, run_wait(everywhere.failures, everywhere.last_failure, account_after, secs));
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

-- Record versions, for ETag and If-Match: every change of a patient or a
-- doctor, whoever writes it, counts its version up, and etag() is the one
-- place that spells a record's entity tag (STABLE, as the text casts
-- inside it are: PostgreSQL then inlines it).
CREATE FUNCTION count_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    RETURN NEW;
END $$;
CREATE FUNCTION etag(id bigint, version integer) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT '"' || id || '-' || version || '"'
$$;

-- Search runs on trigram indexes of the searched fields joined by ' ': a
-- term never holds a space, so a term found in the joined text is found in
-- one field. pg_trgm is a trusted extension: the schema's owner creates it,
-- unless it is there already.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE patients (
    id            bigserial PRIMARY KEY,
    owner_id      bigint       NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    first_name    varchar(100) NOT NULL CHECK (btrim(first_name) <> ''),
    last_name     varchar(100) NOT NULL DEFAULT '',
    email         varchar(254) NOT NULL CHECK (email <> '' AND email = lower(email)),
    date_of_birth date CHECK (date_of_birth >= DATE '1900-01-01'),
    phone         varchar(32)  NOT NULL DEFAULT '',
    created_at    timestamptz  NOT NULL DEFAULT now(),
    updated_at    timestamptz  NOT NULL DEFAULT now(),
    version       integer      NOT NULL DEFAULT 1
);
-- Unique per owner, not globally: a global key would tell one user that
-- another user has a patient with that email.
CREATE UNIQUE INDEX patients_owner_email ON patients (owner_id, email);
-- An owner's list is one range of this index. It is unique so that mappings
-- can name (owner, patient) in one foreign key.
CREATE UNIQUE INDEX patients_owner_id_key ON patients (owner_id, id);
CREATE INDEX patients_search ON patients USING gin ((first_name || ' ' || last_name || ' ' || email) gin_trgm_ops);
-- Statements run with generic plans (README, Performance), made without
-- knowing which owner asks; say owners are many, so that the plan is the
-- owner index even while two users hold every row.
ALTER TABLE patients ALTER COLUMN owner_id SET (n_distinct = -0.01);
CREATE TRIGGER patients_version BEFORE UPDATE ON patients FOR EACH ROW EXECUTE FUNCTION count_version();

-- The doctor directory, shared by every user; created_by is the creator.
CREATE TABLE doctors (
    id             bigserial PRIMARY KEY,
    created_by     bigint       REFERENCES users (id) ON DELETE SET NULL,
    first_name     varchar(100) NOT NULL CHECK (btrim(first_name) <> ''),
    last_name      varchar(100) NOT NULL DEFAULT '',
    email          varchar(254) NOT NULL CHECK (email <> '' AND email = lower(email)),
    specialization varchar(120) NOT NULL CHECK (char_length(btrim(specialization)) >= 3),
    created_at     timestamptz  NOT NULL DEFAULT now(),
    updated_at     timestamptz  NOT NULL DEFAULT now(),
    version        integer      NOT NULL DEFAULT 1
);
CREATE UNIQUE INDEX doctors_email ON doctors (email);
CREATE INDEX doctors_search ON doctors USING gin
    ((first_name || ' ' || last_name || ' ' || email || ' ' || specialization) gin_trgm_ops);
CREATE INDEX doctors_last_name ON doctors (last_name, id);
CREATE TRIGGER doctors_version BEFORE UPDATE ON doctors FOR EACH ROW EXECUTE FUNCTION count_version();

-- A mapping: a doctor assigned to a patient.
CREATE TABLE mappings (
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
CREATE INDEX mappings_doctor_id ON mappings (doctor_id);
CREATE INDEX mappings_owner_id ON mappings (owner_id, id);
ALTER TABLE mappings ALTER COLUMN owner_id SET (n_distinct = -0.01); -- as patients'

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

-- The audit trail: who touched which patient record, when, from where.
-- Events name users, logins, patients and doctors by id without foreign
-- keys, so they outlive all of them.
CREATE TABLE audit_events (
    id         bigserial   PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    user_id    bigint,      -- the user that acted; null: login.failed for a name of no user
    login_id   bigint,      -- its login (sid); null for login.failed and login.unlock
    action     text        NOT NULL CHECK (action IN ('patient.create', 'patient.read', 'patient.update',
        'patient.delete', 'patient.list', 'mapping.create', 'mapping.delete', 'mapping.list', 'doctor.create',
        'doctor.update', 'doctor.delete', 'login', 'login.failed', 'refresh.reused', 'logout', 'logout.all',
        'password.change', 'login.unlock')),
    patient_id bigint,
    doctor_id  bigint,
    fields     text[]      NOT NULL DEFAULT '{}', -- names only, never values
    ip         text        NOT NULL,
    request_id text        NOT NULL
);
-- The trail pages by id; a filter reads one range of its own index (each
-- is paid for on every event written), which leads with user_id, so that a
-- generic plan (blind to which user asks) prefers it to user_id's own.
CREATE INDEX audit_events_user_id ON audit_events (user_id, id);
CREATE INDEX audit_events_patient ON audit_events (user_id, patient_id, id) WHERE patient_id IS NOT NULL;
CREATE INDEX audit_events_doctor ON audit_events (user_id, doctor_id, id) WHERE doctor_id IS NOT NULL;
CREATE INDEX audit_events_login ON audit_events (user_id, login_id, id);
CREATE INDEX audit_events_action ON audit_events (user_id, action, id);
-- A user's logins and failed logins, however many other events it has.
CREATE INDEX audit_events_logins ON audit_events (user_id, id) WHERE action IN ('login', 'login.failed', 'password.change');
ALTER TABLE audit_events ALTER COLUMN user_id SET (n_distinct = -0.01); -- as patients'

-- Append-only, whoever asks: the table's owner and this server included.
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit events are append-only' USING ERRCODE = 'HC403';
END $$;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

-- An event's id and time are the database's, whoever inserts it: the id
-- is the one its default just took from the sequence, and at is now().
CREATE FUNCTION audit_events_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id IS DISTINCT FROM currval('audit_events_id_seq') THEN
        RAISE EXCEPTION 'an event''s id is the sequence''s' USING ERRCODE = 'HC403';
    END IF;
    NEW.at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER audit_events_stamp BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION audit_events_stamp();
