-- TOTP second factor (RFC 6238): the shared secret, sealed like signing keys; and the
-- last time step used, so that a code works once.
ALTER TABLE users ADD COLUMN totp_secret BLOB;
ALTER TABLE users ADD COLUMN totp_last_step BIGINT;
