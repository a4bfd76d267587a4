-- Version 2: rooms where proposals from other members (leaving) may await our commit.
CREATE TABLE parley_proposal_rooms (
    room_id TEXT PRIMARY KEY
);
