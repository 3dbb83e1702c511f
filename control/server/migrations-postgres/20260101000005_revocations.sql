-- Workers follow the policy decisions revoked while in force, to re-arm those policies
-- for those entities. Revocations are numbered by a counter that writers take in turn,
-- so the numbers grow in the order the writes commit and a reader paging by them
-- misses none, even a revocation a broker delivers late with an earlier time.

ALTER TABLE decisions ADD COLUMN revoked_seq BIGINT;
CREATE INDEX decisions_by_revocation ON decisions (revoked_seq, id) WHERE revoked_seq IS NOT NULL;
INSERT INTO counters (name, value) VALUES ('revocations', 0);
