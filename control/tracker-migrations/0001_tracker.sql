-- Tracker storage. Portable SQL: the same file runs on SQLite and PostgreSQL.

-- The last signed announcement of each node.
CREATE TABLE tracker_peers (
    node_id TEXT NOT NULL PRIMARY KEY,
    address TEXT NOT NULL,
    api_port BIGINT NOT NULL,
    role TEXT NOT NULL,
    layers TEXT NOT NULL,
    announced_ms BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL
);
CREATE INDEX tracker_peers_last_seen ON tracker_peers (last_seen_ms);
