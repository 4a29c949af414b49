-- chatd schema version 4 (PostgreSQL), for a new database.
CREATE TABLE schema_version (
    version INTEGER NOT NULL
);
INSERT INTO schema_version (version) VALUES (4);

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

-- Version 4: who is speaking.  Rooms may be private (members only) and
-- may refuse guests; a room's events may be membership changes; users,
-- their sessions, invitations and API keys.
ALTER TABLE rooms ADD COLUMN private BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE rooms ADD COLUMN guests BOOLEAN NOT NULL DEFAULT TRUE;
ALTER TABLE messages ADD COLUMN user_id TEXT;
ALTER TABLE messages ADD COLUMN kind TEXT NOT NULL DEFAULT 'message';
ALTER TABLE deployment ADD COLUMN secret TEXT;

-- Each room's members, with their role; a membership change is also an
-- event of the room (kind 'member'), committed with it.
CREATE TABLE members (
    room_id BIGINT NOT NULL REFERENCES rooms (id),
    user_id TEXT NOT NULL,
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX members_user ON members (user_id);

-- Accounts (--auth accounts), and users disabled by an administrator.
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    password TEXT,
    disabled BOOLEAN NOT NULL DEFAULT FALSE,
    created_ms BIGINT NOT NULL
);

-- Signed-in browsers: the SHA-256 of each session's secret, never the
-- secret itself.
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id),
    csrf TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);

-- Invitation links for a server whose sign-up is closed (hashed).
CREATE TABLE invites (
    id TEXT PRIMARY KEY,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    used_by TEXT
);

-- Applications' keys for the server API (the secret part hashed).
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    name TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    revoked_ms BIGINT
);
