-- Device authorization (RFC 8628). The device code is stored as SHA-256; the user code is
-- what a person types, short and unique while pending. status: pending, approved, denied,
-- used.
CREATE TABLE device_codes (
    device_code_hash  BYTEA PRIMARY KEY,
    user_code         TEXT NOT NULL UNIQUE,
    client_id         TEXT NOT NULL,
    scopes            TEXT NOT NULL,
    expires_at        BIGINT NOT NULL,
    poll_interval     BIGINT NOT NULL,
    last_polled_at    BIGINT,
    status            TEXT NOT NULL,
    user_id           TEXT,
    auth_time         BIGINT,
    family_id         TEXT NOT NULL
);
