-- Access tokens as issued, so that introspection can say a revoked one is inactive:
-- revoked one by one (revoked_at) or with their grant (family_id).
CREATE TABLE access_tokens (
    jti         TEXT PRIMARY KEY,
    client_id   TEXT NOT NULL,
    subject     TEXT NOT NULL,
    family_id   TEXT,
    expires_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);
CREATE INDEX access_tokens_family ON access_tokens (family_id);
