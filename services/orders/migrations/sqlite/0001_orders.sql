CREATE TABLE orders (
    id TEXT PRIMARY KEY,
    customer TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'confirmed', 'rejected')),
    reason TEXT,
    -- The priced lines, as JSON: read and written whole, never queried inside.
    lines TEXT NOT NULL,
    total_minor INTEGER NOT NULL CHECK (total_minor >= 0),
    currency TEXT NOT NULL,
    payment_method TEXT NOT NULL,
    saga_id TEXT,
    -- The customer's Idempotency-Key and a digest of what it was sent with.
    idempotency_key TEXT,
    request_digest TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (customer, idempotency_key)
);
CREATE INDEX orders_by_customer ON orders (customer, created_at);
