CREATE TABLE stock (
    sku TEXT PRIMARY KEY,
    on_hand BIGINT NOT NULL,
    reserved BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    -- The domain keeps these; the database refuses a bug that would not.
    CHECK (reserved >= 0 AND reserved <= on_hand)
);

CREATE TABLE reservations (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('held', 'committed', 'released', 'expired', 'refused')),
    -- Unix ms; held reservations past it are expired by the sweep.
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX reservations_held_by_expiry ON reservations (expires_at) WHERE status = 'held';

CREATE TABLE reservation_lines (
    reservation_id TEXT NOT NULL REFERENCES reservations (id),
    sku TEXT NOT NULL,
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (reservation_id, sku)
);
