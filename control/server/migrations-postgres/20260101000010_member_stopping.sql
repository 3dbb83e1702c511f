-- Whether the member's last heartbeat said it is stopping: a heartbeat of that run that
-- arrives later (delayed or resent) does not list it as running again.
ALTER TABLE members ADD COLUMN stopping BOOLEAN NOT NULL DEFAULT FALSE;
