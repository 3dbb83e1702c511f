-- What a stored token may call (`admin`, `read` or `service`), and who created it.
-- Tokens stored before roles existed could call everything, and keep doing so.
ALTER TABLE tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE tokens ADD COLUMN created_by TEXT NOT NULL DEFAULT '';
