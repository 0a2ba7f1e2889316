-- The refresh token a used one was exchanged for, its hash and its text sealed with the key
-- encryption key: a repeat within the grace window (a client's concurrent refreshes) is
-- given that same token while it is unused, so that a grant never forks into two live
-- chains. (reused_at, of the rule before, is no longer read.)
ALTER TABLE refresh_tokens ADD COLUMN successor_hash BYTEA;
ALTER TABLE refresh_tokens ADD COLUMN successor_sealed BYTEA;
