-- When a token was last accepted, to the minute (NULL: not since this was kept).
ALTER TABLE tokens ADD COLUMN last_used_at TEXT;
