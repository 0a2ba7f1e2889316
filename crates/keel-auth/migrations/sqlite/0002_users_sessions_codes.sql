-- People who sign in. password_hash is an argon2id PHC string.
CREATE TABLE users (
    user_id        TEXT PRIMARY KEY,
    username       TEXT NOT NULL UNIQUE,
    password_hash  TEXT NOT NULL,
    email          TEXT,
    name           TEXT,
    created_at     BIGINT NOT NULL,
    disabled_at    BIGINT
);

-- Signed-in browsers. The cookie holds a random id; only its SHA-256 is stored.
CREATE TABLE login_sessions (
    id_hash     BLOB PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    auth_time   BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);

-- What a user allowed a client, so consent is asked once per new scope.
CREATE TABLE consents (
    user_id     TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    client_id   TEXT NOT NULL REFERENCES clients (client_id) ON DELETE CASCADE,
    scopes      TEXT NOT NULL,
    granted_at  BIGINT NOT NULL,
    PRIMARY KEY (user_id, client_id)
);

-- Authorization codes, by SHA-256; used_at is set once, by the exchange that wins.
CREATE TABLE authorization_codes (
    code_hash       BLOB PRIMARY KEY,
    client_id       TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    redirect_uri    TEXT NOT NULL,
    scopes          TEXT NOT NULL,
    nonce           TEXT,
    code_challenge  TEXT NOT NULL,
    auth_time       BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    used_at         BIGINT,
    -- The grant this code started: what to revoke when the code is replayed.
    family_id       TEXT NOT NULL
);

-- A grant (one authorization code, or one device authorization) and everything issued
-- from it: refresh tokens rotate within the family, and revoking the family ends them all.
CREATE TABLE token_families (
    family_id       TEXT PRIMARY KEY,
    client_id       TEXT NOT NULL,
    user_id         TEXT,
    scopes          TEXT NOT NULL,
    auth_time       BIGINT,
    created_at      BIGINT NOT NULL,
    revoked_at      BIGINT,
    revoked_reason  TEXT
);

-- Refresh tokens, by SHA-256. used_at is set when one is exchanged for the next.
CREATE TABLE refresh_tokens (
    token_hash  BLOB PRIMARY KEY,
    family_id   TEXT NOT NULL REFERENCES token_families (family_id) ON DELETE CASCADE,
    issued_at   BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);
