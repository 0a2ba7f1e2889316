-- The transactional outbox: events staged in a service's transaction, published by the relay
-- in id order, then deleted.
CREATE TABLE keel_outbox (
    id BIGSERIAL PRIMARY KEY,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    subject TEXT,
    envelope TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- The inbox: which events each consumer group has handled, written in the handler's
-- transaction so that a redelivery changes nothing.
CREATE TABLE keel_inbox (
    consumer_group TEXT NOT NULL,
    event_id TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (consumer_group, event_id)
);
CREATE INDEX keel_inbox_received_at ON keel_inbox (received_at);
