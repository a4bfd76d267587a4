-- Standard MIMI on the wire (draft-ietf-mimi-protocol-06): rooms are MIMI room URIs, a room's
-- state lives in its MLS GroupContext, followers keep no room snapshot and deduplicate notify by
-- message digest. Data of the pre-standard protocol (32-hex room ids, Parley-specific notify
-- entries) cannot be carried over: these tables start empty.
DROP TABLE room_members;
DROP TABLE rooms;
DROP TABLE remote_room_devices;
DROP TABLE remote_rooms;
DROP TABLE remote_claims;
DROP TABLE room_hub_claims;
DELETE FROM peer_outbox WHERE endpoint = 'notify';
DELETE FROM queue WHERE room_id <> '';

-- Rooms this provider is the hub of. public_state is openmls's public group state (no secrets);
-- kind, name, participants and roles are read from its GroupContext.
CREATE TABLE rooms (
    room_id      TEXT    PRIMARY KEY,   -- mimi://HUB/r/NAME
    group_id     BLOB    NOT NULL UNIQUE,
    epoch        INTEGER NOT NULL,
    next_event   INTEGER NOT NULL,
    public_state BLOB    NOT NULL,
    group_info   BLOB,                  -- the last committer's GroupInfo (bare, no tree)
    pending      BLOB    NOT NULL DEFAULT x'00', -- proposals accepted this epoch (PendingProposal<V>)
    created_at   INTEGER NOT NULL
);

CREATE TABLE room_members (
    room_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    PRIMARY KEY (room_id, device_id)
);
CREATE INDEX room_members_by_device ON room_members (device_id);

-- KeyPackages this hub fetched from other providers for a room: a commit may add a remote
-- device only with a key the device's own provider handed out for that room.
CREATE TABLE remote_claims (
    room_id        TEXT    NOT NULL,
    device_uri     TEXT    NOT NULL,
    signature_key  BLOB    NOT NULL,
    key_package_ref BLOB   NOT NULL,
    claimed_at     INTEGER NOT NULL,
    PRIMARY KEY (room_id, device_uri, signature_key)
);

-- Rooms hubbed by another provider that local devices take part in (this provider follows them).
CREATE TABLE remote_rooms (
    room_id    TEXT    PRIMARY KEY,
    hub_domain TEXT    NOT NULL,
    joined_at  INTEGER NOT NULL
);

-- The local devices a followed room's messages go to: welcomed, until they report leaving.
CREATE TABLE remote_room_devices (
    room_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (room_id, device_id)
);
CREATE INDEX remote_room_devices_by_device ON remote_room_devices (device_id);

-- KeyPackages this provider handed out (MIMI keyMaterial) for a room hubbed elsewhere, by
-- KeyPackageRef: a Welcome is routed to the devices whose refs it names, and only the room's hub
-- may start notifying about a room.
CREATE TABLE handed_out_key_packages (
    key_package_ref BLOB    NOT NULL,
    room_id         TEXT    NOT NULL,
    device_id       TEXT    NOT NULL,
    handed_out_at   INTEGER NOT NULL,
    PRIMARY KEY (room_id, key_package_ref)
);
CREATE INDEX handed_out_by_age ON handed_out_key_packages (handed_out_at);

-- Digests (SHA-256 of the MLS message) of what each followed room's hub notified: a message seen
-- before is accepted and ignored (exactly once, whatever the hub's batching of retries).
CREATE TABLE notify_seen (
    room_id TEXT    NOT NULL,
    digest  BLOB    NOT NULL,
    seen_at INTEGER NOT NULL,
    PRIMARY KEY (room_id, digest)
) WITHOUT ROWID;
CREATE INDEX notify_seen_by_age ON notify_seen (seen_at);

-- Messages a local client is relaying to a room's hub right now: the hub's echo of one skips the
-- device that sent it.
CREATE TABLE relays (
    room_id   TEXT NOT NULL,
    digest    BLOB NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (room_id, digest, device_id)
) WITHOUT ROWID;

-- This provider's hub signing key per hosted domain (MLS external sender; signs groupInfo).
CREATE TABLE hub_keys (
    domain      TEXT PRIMARY KEY,
    private_key BLOB NOT NULL,
    public_key  BLOB NOT NULL
);

-- Notify rows of expiring messages are dropped at their expiry if still undelivered.
ALTER TABLE peer_outbox ADD COLUMN expires_at INTEGER;

-- Welcome queue entries carry the group's ratchet tree (Welcomes omit it).
ALTER TABLE queue ADD COLUMN ratchet_tree BLOB;
