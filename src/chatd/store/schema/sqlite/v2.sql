-- chatd schema version 2 (SQLite), for a new database.
CREATE TABLE schema_version (
    version INTEGER NOT NULL
);
INSERT INTO schema_version (version) VALUES (2);

CREATE TABLE rooms (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    last_seq INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    first_seq INTEGER NOT NULL DEFAULT 1
);

CREATE TABLE messages (
    room_id INTEGER NOT NULL REFERENCES rooms (id),
    seq INTEGER NOT NULL,
    nick TEXT NOT NULL,
    body TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    client_id TEXT,
    PRIMARY KEY (room_id, seq)
) WITHOUT ROWID;

CREATE UNIQUE INDEX messages_client_id ON messages (room_id, client_id)
    WHERE client_id IS NOT NULL;
