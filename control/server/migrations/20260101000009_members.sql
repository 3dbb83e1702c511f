-- Workers and proxies as last heard from, shared by every control plane instance over
-- this store: the fleet view and drain requests hold wherever a member beats to.
CREATE TABLE members (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    -- The last heartbeat, as JSON.
    beat TEXT NOT NULL,
    -- When the member's run started (its heartbeat's started_at).
    run TEXT NOT NULL,
    seen_at TEXT NOT NULL,
    -- The run asked to drain, until a heartbeat of it says it is stopping.
    drain_run TEXT,
    PRIMARY KEY (kind, id)
);
CREATE INDEX members_seen ON members (kind, seen_at);
