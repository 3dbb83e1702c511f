-- Secrets the control plane generates once for the whole deployment and hands to the
-- parts that must agree on them (the proxies' challenge signing key).

CREATE TABLE secrets (
    name        TEXT    NOT NULL PRIMARY KEY,
    value       TEXT    NOT NULL,
    created_at  TEXT    NOT NULL
);
