-- Accounts: one row per user of a hosted domain.
CREATE TABLE users (
    domain        TEXT    NOT NULL,
    handle        TEXT    NOT NULL,
    password_hash TEXT    NOT NULL,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (domain, handle)
);

-- Devices (MIMI clients). The bearer token is stored only as its SHA-256.
CREATE TABLE devices (
    device_id     TEXT    PRIMARY KEY,
    domain        TEXT    NOT NULL,
    handle        TEXT    NOT NULL,
    name          TEXT    NOT NULL,
    signature_key BLOB    NOT NULL,
    token_hash    BLOB    NOT NULL UNIQUE,
    created_at    INTEGER NOT NULL,
    next_seq      INTEGER NOT NULL DEFAULT 1,
    FOREIGN KEY (domain, handle) REFERENCES users (domain, handle)
);
CREATE INDEX devices_by_user ON devices (domain, handle);

CREATE TABLE invites_used (
    domain  TEXT    NOT NULL,
    code    TEXT    NOT NULL,
    used_at INTEGER NOT NULL,
    PRIMARY KEY (domain, code)
);

-- One-time KeyPackages (last_resort = 0) and at most one last-resort package per device.
CREATE TABLE key_packages (
    id          INTEGER PRIMARY KEY,
    device_id   TEXT    NOT NULL,
    data        BLOB    NOT NULL,
    last_resort INTEGER NOT NULL
);
CREATE INDEX key_packages_by_device ON key_packages (device_id, last_resort);

-- Rooms this provider is the hub of. public_state is openmls's public group state (no secrets).
CREATE TABLE rooms (
    room_id      TEXT    PRIMARY KEY,
    hub_domain   TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    name         TEXT,
    creator      TEXT    NOT NULL,
    direct_peer  TEXT,
    epoch        INTEGER NOT NULL,
    next_event   INTEGER NOT NULL,
    public_state BLOB    NOT NULL,
    created_at   INTEGER NOT NULL
);

CREATE TABLE room_members (
    room_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    PRIMARY KEY (room_id, device_id)
);
CREATE INDEX room_members_by_device ON room_members (device_id);

-- Per-device delivery queues: ciphertext only.
CREATE TABLE queue (
    device_id  TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    room_id    TEXT    NOT NULL,
    kind       INTEGER NOT NULL,
    event      INTEGER NOT NULL,
    ts         INTEGER NOT NULL,
    data       BLOB    NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (device_id, seq)
) WITHOUT ROWID;
CREATE INDEX queue_by_expiry ON queue (expires_at);
