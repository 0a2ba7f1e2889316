-- Compensations sent without being awaited (those of steps that timed out, while the saga
-- went on undoing the earlier steps): sent again by the sweep until one is answered done.
CREATE TABLE keel_saga_followups (
    saga_id TEXT NOT NULL,
    saga TEXT NOT NULL,
    step BIGINT NOT NULL,
    sends BIGINT NOT NULL,
    deadline_at BIGINT NOT NULL,
    PRIMARY KEY (saga_id, step)
);
CREATE INDEX keel_saga_followups_deadline ON keel_saga_followups (saga, deadline_at);
