-- Which provider may start notifying this provider about a room: the hub named in a keyMaterial
-- request this provider answered for that room (a room is followed only after one of our users'
-- KeyPackages was handed out for it), so nobody else can claim a room id first.
CREATE TABLE room_hub_claims (
    room_id    TEXT    NOT NULL,
    hub_domain TEXT    NOT NULL,
    claimed_at INTEGER NOT NULL,
    PRIMARY KEY (room_id, hub_domain)
);
