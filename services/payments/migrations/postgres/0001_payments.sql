CREATE TABLE payments (
    id TEXT PRIMARY KEY,
    -- 'pending' only inside the transaction that asks the provider: never committed.
    status TEXT NOT NULL CHECK (status IN ('pending', 'authorized', 'captured', 'voided', 'refunded', 'declined')),
    -- None for a tombstone (voided before it was authorized).
    amount_minor BIGINT CHECK (amount_minor >= 0),
    currency TEXT,
    method TEXT,
    decline_reason TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
