-- A room member is a client: its user and its device name together (mimi://DOMAIN/d/HANDLE/DEVICE).
-- Device names are unique only within a user (another provider may call every user's client
-- the same), so the key must hold both.
CREATE TABLE room_members_by_client (
    room_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id, device_id)
);
INSERT INTO room_members_by_client (room_id, device_id, user_id)
    SELECT room_id, device_id, user_id FROM room_members;
DROP TABLE room_members;
ALTER TABLE room_members_by_client RENAME TO room_members;
CREATE INDEX room_members_by_device ON room_members (device_id);
