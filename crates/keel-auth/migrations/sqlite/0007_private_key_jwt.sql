-- private_key_jwt clients (RFC 7523): their public keys, as a JWK Set document.
ALTER TABLE clients ADD COLUMN jwks TEXT;

-- Client assertions seen, by jti, until they expire: each is accepted once.
CREATE TABLE assertion_jtis (
    client_id   TEXT NOT NULL,
    jti         TEXT NOT NULL,
    expires_at  BIGINT NOT NULL,
    PRIMARY KEY (client_id, jti)
);
