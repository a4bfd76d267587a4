-- Version 9: standard MIMI (docs/mimi-profile.md). A room is named by its MIMI room URI, and its
-- MLS group id is no longer derived from it: a room hubbed by another provider may have any group
-- id, learnt from its Welcome. `group_id` maps a room to the group this device holds for it (NULL
-- once the device left or was removed; the row stays, so the room reads "not a member" rather
-- than "unknown"). Kind, name and members are read from the group itself now.
ALTER TABLE parley_rooms ADD COLUMN group_id BLOB;
CREATE UNIQUE INDEX parley_rooms_by_group ON parley_rooms (group_id) WHERE group_id IS NOT NULL;
ALTER TABLE parley_rooms DROP COLUMN room_uri;
ALTER TABLE parley_rooms DROP COLUMN kind;
ALTER TABLE parley_rooms DROP COLUMN name;
ALTER TABLE parley_rooms DROP COLUMN members;
-- A commit posted but not answered keeps its request, so that a room whose hub is another
-- provider (whose epoch this device's provider does not know) can settle it by posting it again.
ALTER TABLE parley_pending_commits ADD COLUMN request TEXT;
-- Rooms this device left (or was removed from) whose provider has not been told yet
-- (`POST /v1/rooms/{room}/left`); told at the next sync.
CREATE TABLE parley_left_unreported (
    room_id TEXT PRIMARY KEY
);
-- Rooms of the pre-MIMI protocol were named by 32 hex digits; no provider serves them any more.
-- What would still act on them goes; their history stays (it is only ever read by room).
DELETE FROM parley_rooms WHERE instr(room_id, '/') = 0;
DELETE FROM parley_pending_commits WHERE instr(room_id, '/') = 0;
DELETE FROM parley_proposal_rooms WHERE instr(room_id, '/') = 0;
DELETE FROM parley_receipts_due WHERE instr(room_id, '/') = 0;
DELETE FROM parley_downloads WHERE instr(room_id, '/') = 0;
