-- Room roles (draft-ietf-mimi-room-policy, reduced to admin/member): the admin users of each
-- room, as a JSON array of user ids; for rooms hubbed here and, as last told, for followed rooms.
ALTER TABLE rooms ADD COLUMN admins TEXT NOT NULL DEFAULT '[]';
ALTER TABLE remote_rooms ADD COLUMN admins TEXT NOT NULL DEFAULT '[]';
