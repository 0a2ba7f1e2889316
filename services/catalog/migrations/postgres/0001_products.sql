CREATE TABLE products (
    sku TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    price_minor BIGINT NOT NULL CHECK (price_minor >= 0),
    currency TEXT NOT NULL,
    -- 1 for sale, 0 not (an integer: SQLite has no boolean the Any driver reads).
    active BIGINT NOT NULL CHECK (active IN (0, 1)),
    updated_at BIGINT NOT NULL
);
