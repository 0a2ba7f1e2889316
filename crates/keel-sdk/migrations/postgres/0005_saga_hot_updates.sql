-- A saga's row is rewritten at every step (its step, results, sends and deadline), and an
-- index on the deadline made each of those writes a new row version with an entry in every
-- index. The sweep now finds overdue sagas through an index of the unfinished ones, whose
-- predicate (the status) stays the same from step to step: a step's write then changes no
-- indexed column and can stay on the row's page (a heap-only tuple), with no index entries,
-- when the page has room, which the fill factor keeps for the few writes of a saga in flight.
DROP INDEX keel_sagas_deadline;
CREATE INDEX keel_sagas_unfinished ON keel_sagas (saga)
    WHERE status NOT IN ('completed', 'compensated', 'failed');
ALTER TABLE keel_sagas SET (fillfactor = 70);
