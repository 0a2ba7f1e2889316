-- Orders can be cancelled once confirmed: cancelling while refunded and restocked.
-- SQLite cannot change a CHECK constraint: the table is rebuilt.
CREATE TABLE orders_new (
    id TEXT PRIMARY KEY,
    customer TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'confirmed', 'rejected', 'cancelling', 'cancelled')),
    reason TEXT,
    lines TEXT NOT NULL,
    total_minor INTEGER NOT NULL CHECK (total_minor >= 0),
    currency TEXT NOT NULL,
    payment_method TEXT NOT NULL,
    saga_id TEXT,
    idempotency_key TEXT,
    request_digest TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (customer, idempotency_key)
);
INSERT INTO orders_new SELECT id, customer, status, reason, lines, total_minor, currency,
    payment_method, saga_id, idempotency_key, request_digest, created_at, updated_at FROM orders;
DROP TABLE orders;
ALTER TABLE orders_new RENAME TO orders;
CREATE INDEX orders_by_customer ON orders (customer, created_at);
