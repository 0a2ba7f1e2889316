-- Saga instances of an orchestrating service: where each is, what it carries, and when the
-- command it waits for is overdue.
CREATE TABLE keel_sagas (
    id TEXT PRIMARY KEY,
    saga TEXT NOT NULL,
    status TEXT NOT NULL,
    step BIGINT NOT NULL,
    data TEXT NOT NULL,
    results TEXT NOT NULL,
    error TEXT,
    sends BIGINT NOT NULL,
    deadline_at BIGINT,
    version BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX keel_sagas_deadline ON keel_sagas (saga, deadline_at);
CREATE INDEX keel_sagas_status ON keel_sagas (saga, status, created_at);

-- Each saga's history: every command sent and every answer (or timeout).
CREATE TABLE keel_saga_steps (
    saga_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    step TEXT NOT NULL,
    phase TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT,
    at BIGINT NOT NULL,
    PRIMARY KEY (saga_id, seq)
);
