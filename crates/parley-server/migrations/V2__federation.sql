-- Consent (MIMI requestConsent / updateConsent). One row per (requester, target) pair: the
-- target's stance on the requester fetching its key material. Authoritative when the target is
-- local; a mirror of what the target's provider told us when only the requester is local.
CREATE TABLE consent (
    requester  TEXT    NOT NULL,
    target     TEXT    NOT NULL,
    state      TEXT    NOT NULL,  -- pending | granted | blocked
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (requester, target)
);
CREATE INDEX consent_by_target ON consent (target, state);

-- Durable outbound queue per peer provider: notify fan-out and consent messages, delivered in
-- id order (per room for notify) and deleted once the peer accepted them.
CREATE TABLE peer_outbox (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    peer       TEXT    NOT NULL,
    as_domain  TEXT    NOT NULL,
    endpoint   TEXT    NOT NULL,
    param      TEXT    NOT NULL,
    body       BLOB    NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX peer_outbox_by_peer ON peer_outbox (peer, id);

-- Rooms hubbed by another provider that local devices take part in (this provider follows).
CREATE TABLE remote_rooms (
    room_id       TEXT    PRIMARY KEY,
    hub_domain    TEXT    NOT NULL,
    kind          TEXT    NOT NULL,
    name          TEXT,
    creator       TEXT    NOT NULL,
    epoch         INTEGER NOT NULL,
    users         TEXT    NOT NULL,  -- JSON array of member user ids
    last_sequence INTEGER NOT NULL   -- highest notify sequence applied (dedup + order)
);

CREATE TABLE remote_room_devices (
    room_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (room_id, device_id)
);
CREATE INDEX remote_room_devices_by_device ON remote_room_devices (device_id);

-- KeyPackages this hub fetched from other providers for a room: a commit may add a remote
-- device only with a key the device's own provider handed out for that room.
CREATE TABLE remote_claims (
    room_id       TEXT    NOT NULL,
    device_uri    TEXT    NOT NULL,
    signature_key BLOB    NOT NULL,
    claimed_at    INTEGER NOT NULL,
    PRIMARY KEY (room_id, device_uri, signature_key)
);
