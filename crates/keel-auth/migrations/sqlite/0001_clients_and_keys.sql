-- Signing keys: the public half as a JWK, the private half sealed (AES-256-GCM under a key
-- derived from the configured key encryption key, bound to kid and alg). Times are Unix
-- seconds. A key is published from created_at, signs from activates_at until retires_at,
-- and leaves the key set at expires_at (after the last token it signed has expired).
CREATE TABLE signing_keys (
    kid            TEXT PRIMARY KEY,
    alg            TEXT NOT NULL,
    public_jwk     TEXT NOT NULL,
    sealed_private BLOB NOT NULL,
    kek_id         TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    activates_at   BIGINT NOT NULL,
    retires_at     BIGINT,
    expires_at     BIGINT
);

-- OAuth clients. Lists are JSON arrays of strings; scopes are space-separated as on the
-- wire. secret_hash is HMAC-SHA256 under a server key, absent for public clients and
-- private_key_jwt clients.
CREATE TABLE clients (
    client_id         TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    auth_method       TEXT NOT NULL,
    secret_hash       BLOB,
    redirect_uris     TEXT NOT NULL,
    grant_types       TEXT NOT NULL,
    scopes            TEXT NOT NULL,
    audiences         TEXT NOT NULL,
    signing_alg       TEXT,
    access_token_ttl  BIGINT,
    created_at        BIGINT NOT NULL,
    disabled_at       BIGINT
);

-- Security events, as they are also logged.
CREATE TABLE audit_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    outcome    TEXT NOT NULL,
    subject    TEXT,
    client_id  TEXT,
    ip         TEXT,
    detail     TEXT
);
CREATE INDEX audit_events_at ON audit_events (at);
CREATE INDEX audit_events_subject ON audit_events (subject, at);
