-- Who made an administrative change through the admin API: the subject of the token it
-- came with and the client that token was issued to (`user <id> via client <id>`, or
-- `client <id>` for a client's own token). NULL for changes made locally (the CLI, the
-- library) and for events that are not administrative.
ALTER TABLE audit_events ADD COLUMN actor TEXT;
