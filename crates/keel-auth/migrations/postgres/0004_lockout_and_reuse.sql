-- Failed sign-ins in a row, and until when the account is locked after too many.
ALTER TABLE users ADD COLUMN failed_logins BIGINT NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN locked_until BIGINT;

-- A used refresh token may be exchanged once more within the grace window (a client's
-- concurrent refreshes); this marks that second exchange.
ALTER TABLE refresh_tokens ADD COLUMN reused_at BIGINT;

CREATE INDEX login_sessions_user ON login_sessions (user_id);
