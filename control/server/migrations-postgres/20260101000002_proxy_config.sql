-- The proxy configuration the control plane hands to proxies: one TOML document per
-- name ('default' today), with a revision proxies long-poll on.

CREATE TABLE proxy_configs (
    name        TEXT    NOT NULL PRIMARY KEY,
    revision    BIGINT  NOT NULL,
    config      TEXT    NOT NULL,
    updated_by  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL
);
