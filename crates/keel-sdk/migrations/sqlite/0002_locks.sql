-- Rows written (SQLite only) to take the database's write lock at the start of a
-- transaction that must not interleave with another; PostgreSQL uses advisory locks.
CREATE TABLE keel_locks (
    id INTEGER PRIMARY KEY
);
