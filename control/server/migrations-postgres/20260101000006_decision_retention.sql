-- Decisions expired longer ago than the retention are pruned by this index.
CREATE INDEX decisions_by_expiry ON decisions (expires_at);
