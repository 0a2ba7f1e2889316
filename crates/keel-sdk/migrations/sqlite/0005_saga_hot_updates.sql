-- As on PostgreSQL (where this lets a step's write skip the indexes): overdue sagas are found
-- through an index of the unfinished ones instead of one on the deadline.
DROP INDEX keel_sagas_deadline;
CREATE INDEX keel_sagas_unfinished ON keel_sagas (saga)
    WHERE status NOT IN ('completed', 'compensated', 'failed');
