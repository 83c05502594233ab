-- The schema is applied at every start, under an advisory lock, so every
-- statement here must be idempotent. Constraints live here, not in Go, so the
-- data stays consistent even when two requests race.

CREATE TABLE IF NOT EXISTS users (
    id         bigserial PRIMARY KEY,
    username   varchar(150) NOT NULL CHECK (username <> ''),
    email      varchar(254) NOT NULL CHECK (email <> '' AND email = lower(email)),
    name       varchar(150) NOT NULL CHECK (name <> ''),
    password   varchar(256) NOT NULL,
    created_at timestamptz  NOT NULL DEFAULT now()
);

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
    ended_at   timestamptz
);
CREATE INDEX IF NOT EXISTS sessions_user_id ON sessions (user_id);

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

-- How many patients each owner has, kept by the trigger below, so that a
-- list's count is a lookup rather than a pass over all of the owner's rows
-- (4 ms for 100,000). An owner's count is the sum of its slots. Each
-- database connection writes its own slot (pg_backend_pid() % 16): with one
-- row per owner, one owner's concurrent inserts would queue on its lock.
CREATE TABLE IF NOT EXISTS patient_counts (
    owner_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    slot     int    NOT NULL,
    n        bigint NOT NULL,
    PRIMARY KEY (owner_id, slot)
);

CREATE OR REPLACE FUNCTION count_patients() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'DELETE' THEN -- an INSERT, or an UPDATE of owner_id
        INSERT INTO patient_counts AS c (owner_id, slot, n) VALUES (NEW.owner_id, pg_backend_pid() % 16, 1)
        ON CONFLICT (owner_id, slot) DO UPDATE SET n = c.n + 1;
    END IF;
    -- When the owner itself is being deleted, its counts go with it
    -- (CASCADE), and a new slot row would name a user that is gone.
    IF TG_OP <> 'INSERT' AND EXISTS (SELECT 1 FROM users WHERE id = OLD.owner_id) THEN
        INSERT INTO patient_counts AS c (owner_id, slot, n) VALUES (OLD.owner_id, pg_backend_pid() % 16, -1)
        ON CONFLICT (owner_id, slot) DO UPDATE SET n = c.n - 1;
    END IF;
    RETURN NULL;
END $$;

DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'patients_count' AND tgrelid = 'patients'::regclass) THEN
        CREATE TRIGGER patients_count AFTER INSERT OR DELETE OR UPDATE OF owner_id ON patients
            FOR EACH ROW EXECUTE FUNCTION count_patients();
        -- Count the rows from before the trigger. Creating it locked out
        -- writers until the schema commits, so no row is counted twice.
        DELETE FROM patient_counts;
        INSERT INTO patient_counts (owner_id, slot, n)
        SELECT owner_id, 0, count(*) FROM patients GROUP BY owner_id;
    END IF;
END $$;

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

-- Lists are prepared statements run with generic plans (see db.go), made
-- without knowing which owner will ask. The planner would then assume
-- every owner holds rows/n_distinct rows; in a young database with two
-- users that is half the table, and the plan a sequential scan, for every
-- owner. A list is one owner's by design, so say owners are many.
ALTER TABLE patients ALTER COLUMN owner_id SET (n_distinct = -0.01);
ALTER TABLE mappings ALTER COLUMN owner_id SET (n_distinct = -0.01);

