-- Ledger storage. Portable SQL: the same file runs on SQLite and PostgreSQL.
-- Amounts never appear as columns: they live inside the signed message bodies (integer units).

-- Every block this node holds, valid or void, in arrival order (seq feeds gossip sync).
CREATE TABLE ledger_messages (
    seq BIGINT NOT NULL PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    account TEXT NOT NULL,
    height BIGINT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE INDEX ledger_messages_account ON ledger_messages (account, height);

-- Proofs this node refused before they reached the ledger (too old, replayed, implausible...).
CREATE TABLE proof_rejections (
    id BIGINT NOT NULL PRIMARY KEY,
    proof_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    proof_type TEXT NOT NULL,
    reason_code TEXT NOT NULL,
    reason TEXT NOT NULL,
    proof_timestamp BIGINT NOT NULL,
    recorded_at BIGINT NOT NULL
);
CREATE INDEX proof_rejections_node ON proof_rejections (node_id, id);
