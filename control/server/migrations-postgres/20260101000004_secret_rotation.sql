-- A secret can be replaced (the proxies' challenge key, rotated by an operator): the
-- value it replaced stays beside it, so what was signed with it is still honoured, and
-- a revision that grows with each replacement lets the proxies long-poll for the next.

ALTER TABLE secrets ADD COLUMN previous TEXT;
ALTER TABLE secrets ADD COLUMN revision BIGINT NOT NULL DEFAULT 1;
ALTER TABLE secrets ADD COLUMN rotated_at TEXT;
