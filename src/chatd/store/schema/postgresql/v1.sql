-- chatd schema version 1 (PostgreSQL): rooms, and messages keyed by a per-room seq.
CREATE TABLE schema_version (
    version INTEGER NOT NULL
);
INSERT INTO schema_version (version) VALUES (1);

CREATE TABLE rooms (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    last_seq BIGINT NOT NULL DEFAULT 0,
    created_ms BIGINT NOT NULL
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
