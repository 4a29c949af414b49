-- Version 3: presence leases, so that nodes sharing a database count
-- each other's clients, and the deployment's name for a shared bus.
CREATE TABLE presence (
    node TEXT NOT NULL,
    room TEXT NOT NULL,
    clients INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (node, room)
) WITHOUT ROWID;
-- This deployment's name among all that may share a message bus (a Redis
-- server, say): random, made once with the schema.
CREATE TABLE deployment (
    id TEXT NOT NULL
);
INSERT INTO deployment (id) VALUES (lower(hex(randomblob(16))));
UPDATE schema_version SET version = 3;
