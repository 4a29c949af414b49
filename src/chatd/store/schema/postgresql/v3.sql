-- chatd schema version 3 (PostgreSQL), for a new database.
CREATE TABLE schema_version (
    version INTEGER NOT NULL
);
INSERT INTO schema_version (version) VALUES (3);

CREATE TABLE rooms (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    last_seq BIGINT NOT NULL DEFAULT 0,
    created_ms BIGINT NOT NULL,
    first_seq BIGINT NOT NULL DEFAULT 1
);

CREATE TABLE messages (
    room_id BIGINT NOT NULL REFERENCES rooms (id),
    seq BIGINT NOT NULL,
    nick TEXT NOT NULL,
    body TEXT NOT NULL,
    ts_ms BIGINT NOT NULL,
    client_id TEXT,
    PRIMARY KEY (room_id, seq)
);

CREATE UNIQUE INDEX messages_client_id ON messages (room_id, client_id)
    WHERE client_id IS NOT NULL;

-- Who is connected where: each node's client count per room, refreshed
-- while the node lives (a lease), summed by every node for the room list.
CREATE TABLE presence (
    node TEXT NOT NULL,
    room TEXT NOT NULL,
    clients INTEGER NOT NULL,
    expires_ms BIGINT NOT NULL,
    PRIMARY KEY (node, room)
);

-- This deployment's name among all that may share a message bus (a Redis
-- server, say): random, made once with the schema.
CREATE TABLE deployment (
    id TEXT NOT NULL
);
INSERT INTO deployment (id) VALUES (gen_random_uuid()::text);
