-- Control-plane schema on PostgreSQL: the same tables, columns and indexes as the
-- SQLite schema in ../migrations, with BIGINT where SQLite has INTEGER (SQLite's
-- integers are 64-bit; PostgreSQL's INTEGER is not). Timestamps stay RFC 3339 TEXT
-- (UTC, fixed width) and JSON stays TEXT, so both stores run the same statements.

CREATE TABLE policies (
    id          TEXT    NOT NULL PRIMARY KEY,
    version     BIGINT  NOT NULL,
    enabled     BIGINT  NOT NULL,
    mode        TEXT    NOT NULL,
    spec        TEXT    NOT NULL,
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL
);

CREATE TABLE policy_versions (
    policy_id   TEXT    NOT NULL,
    version     BIGINT  NOT NULL,
    change      TEXT    NOT NULL,
    spec        TEXT    NOT NULL,
    changed_by  TEXT    NOT NULL,
    created_at  TEXT    NOT NULL,
    PRIMARY KEY (policy_id, version)
);

CREATE TABLE lists (
    name        TEXT    NOT NULL PRIMARY KEY,
    kind        TEXT    NOT NULL,
    items       TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL
);

CREATE TABLE counters (
    name        TEXT    NOT NULL PRIMARY KEY,
    value       BIGINT  NOT NULL
);

INSERT INTO counters (name, value) VALUES ('revision', 0);

CREATE TABLE decisions (
    id          TEXT    NOT NULL PRIMARY KEY,
    entity      TEXT    NOT NULL,
    policy_id   TEXT,
    mode        TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    origin      TEXT    NOT NULL,
    decided_by  TEXT    NOT NULL,
    decided_at  TEXT    NOT NULL,
    expires_at  TEXT    NOT NULL,
    body        TEXT    NOT NULL,
    recorded_at TEXT    NOT NULL,
    revoked_at  TEXT,
    revoked_by  TEXT
);

CREATE INDEX decisions_by_time ON decisions (decided_at);
CREATE INDEX decisions_by_entity ON decisions (entity, decided_at);
CREATE INDEX decisions_by_policy ON decisions (policy_id, decided_at);

CREATE TABLE tokens (
    name        TEXT    NOT NULL PRIMARY KEY,
    hash        TEXT    NOT NULL UNIQUE,
    created_at  TEXT    NOT NULL
);
