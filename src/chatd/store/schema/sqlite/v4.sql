-- chatd schema version 4 (SQLite), for a new database.
CREATE TABLE schema_version (
    version INTEGER NOT NULL
);
INSERT INTO schema_version (version) VALUES (4);

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

-- Who is connected where: each node's client count per room, refreshed
-- while the node lives (a lease), summed by every node for the room list.
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

-- Version 4: who is speaking.  Rooms may be private (members only) and
-- may refuse guests; a room's events may be membership changes; users,
-- their sessions, invitations and API keys.
ALTER TABLE rooms ADD COLUMN private INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rooms ADD COLUMN guests INTEGER NOT NULL DEFAULT 1;
ALTER TABLE messages ADD COLUMN user_id TEXT;
ALTER TABLE messages ADD COLUMN kind TEXT NOT NULL DEFAULT 'message';
ALTER TABLE deployment ADD COLUMN secret TEXT;

-- Each room's members, with their role; a membership change is also an
-- event of the room (kind 'member'), committed with it.
CREATE TABLE members (
    room_id INTEGER NOT NULL REFERENCES rooms (id),
    user_id TEXT NOT NULL,
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
) WITHOUT ROWID;
CREATE INDEX members_user ON members (user_id);

-- Accounts (--auth accounts), and users disabled by an administrator.
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    password TEXT,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;

-- Signed-in browsers: the SHA-256 of each session's secret, never the
-- secret itself.
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id),
    csrf TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX sessions_user ON sessions (user_id);

-- Invitation links for a server whose sign-up is closed (hashed).
CREATE TABLE invites (
    id TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    used_by TEXT
) WITHOUT ROWID;

-- Applications' keys for the server API (the secret part hashed).
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    name TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
) WITHOUT ROWID;
