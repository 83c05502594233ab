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
CREATE INDEX IF NOT EXISTS patients_owner_id ON patients (owner_id, id);

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
    patient_id bigint      NOT NULL REFERENCES patients (id) ON DELETE CASCADE,
    -- RESTRICT: deleting an assigned doctor must fail, not silently remove
    -- other users' assignments.
    doctor_id  bigint      NOT NULL REFERENCES doctors (id) ON DELETE RESTRICT,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT mappings_patient_doctor UNIQUE (patient_id, doctor_id)
);
CREATE INDEX IF NOT EXISTS mappings_doctor_id ON mappings (doctor_id);

