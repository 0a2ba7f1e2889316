-- Where RP-initiated logout may return a client's browser (OpenID Connect RP-Initiated
-- Logout 1.0 §3.1: registered as post_logout_redirect_uris), a JSON list. NULL or empty:
-- the client's redirect URIs serve, as they did before this column.
ALTER TABLE clients ADD COLUMN post_logout_redirect_uris TEXT;
