-- Version 5: a room that feels alive.  A room's events may be edits and
-- deletions of its messages (target_seq), moderation and settings
-- (meta: JSON of who did it and what); a message keeps its current state
-- (edited_ms, deleted_ms: a deleted one's body is blanked).
ALTER TABLE messages ADD COLUMN target_seq BIGINT;
ALTER TABLE messages ADD COLUMN meta TEXT;
ALTER TABLE messages ADD COLUMN edited_ms BIGINT;
ALTER TABLE messages ADD COLUMN deleted_ms BIGINT;
-- A deletion blanks the edits of its message too: found by this index.
CREATE INDEX messages_target ON messages (room_id, target_seq) WHERE target_seq IS NOT NULL;
ALTER TABLE rooms ADD COLUMN topic TEXT NOT NULL DEFAULT '';
ALTER TABLE rooms ADD COLUMN edits BOOLEAN NOT NULL DEFAULT TRUE;

-- Bans and mutes in force (each also an event of the room); until_ms NULL
-- means until lifted.
CREATE TABLE restrictions (
    room_id BIGINT NOT NULL REFERENCES rooms (id),
    user_id TEXT NOT NULL,
    action TEXT NOT NULL,
    until_ms BIGINT,
    PRIMARY KEY (room_id, user_id, action)
);

-- Each signed-in user's last read seq per room (written debounced).
CREATE TABLE read_markers (
    user_id TEXT NOT NULL,
    room_id BIGINT NOT NULL REFERENCES rooms (id),
    seq BIGINT NOT NULL,
    PRIMARY KEY (user_id, room_id)
);

-- Presence leases name their users: JSON {"users": {id: name}, "guests": n}.
ALTER TABLE presence ADD COLUMN users TEXT NOT NULL DEFAULT '{}';
UPDATE schema_version SET version = 5;
