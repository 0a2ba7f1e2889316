-- What the test handlers do: one row per handled event, with no unique key, so that only
-- the inbox stands between a redelivery and a second row.
CREATE TABLE effects (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    account TEXT NOT NULL,
    seq INTEGER NOT NULL
);
CREATE TABLE accounts (
    account TEXT PRIMARY KEY,
    balance INTEGER NOT NULL
);
