-- Parley's own tables of a device profile (openmls keeps its own, beside them).
CREATE TABLE parley_account (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    server_url TEXT NOT NULL,
    user TEXT NOT NULL,
    device_id TEXT NOT NULL,
    token TEXT NOT NULL,
    signature_key BLOB NOT NULL
);
CREATE TABLE parley_state (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE parley_rooms (
    room_id TEXT PRIMARY KEY,
    room_uri TEXT,
    kind TEXT,
    name TEXT,
    members TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE parley_pending_commits (
    room_id TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL
);
CREATE TABLE parley_seen (
    message_id TEXT PRIMARY KEY
);
CREATE TABLE parley_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    room_id TEXT NOT NULL,
    event INTEGER NOT NULL,
    sender TEXT NOT NULL,
    message_id TEXT NOT NULL,
    text TEXT NOT NULL,
    ts INTEGER NOT NULL
);
CREATE INDEX parley_history_by_room ON parley_history (room_id, event);
CREATE TABLE parley_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event TEXT NOT NULL
);
