-- Version 2: retention. rooms.first_seq is the oldest seq still stored;
-- a cursor older than first_seq - 1 gets an explicit reset.
ALTER TABLE rooms ADD COLUMN first_seq BIGINT NOT NULL DEFAULT 1;
UPDATE schema_version SET version = 2;
