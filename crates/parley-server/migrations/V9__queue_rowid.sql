-- The queue becomes a rowid table with a unique index by (device_id, seq), instead of a
-- WITHOUT ROWID table keyed by it. A Welcome entry carries the group's whole ratchet tree
-- (hundreds of KB in a big room); stored inside the clustered B-tree, such rows made every later
-- insert next to them slow (1,000 queue rows: 12 ms on empty queues, 200 ms once each queue held a
-- 250 KB Welcome). In a rowid table the big rows stay out of the index's way (7 ms either way).
-- Same columns, same queries (BENCHMARKS.md, "Big rooms").
CREATE TABLE queue_by_rowid (
    device_id    TEXT    NOT NULL,
    seq          INTEGER NOT NULL,
    room_id      TEXT    NOT NULL,
    kind         INTEGER NOT NULL,
    event        INTEGER NOT NULL,
    ts           INTEGER NOT NULL,
    data         BLOB    NOT NULL,
    expires_at   INTEGER NOT NULL,
    ratchet_tree BLOB
);
INSERT INTO queue_by_rowid (device_id, seq, room_id, kind, event, ts, data, expires_at, ratchet_tree)
    SELECT device_id, seq, room_id, kind, event, ts, data, expires_at, ratchet_tree
    FROM queue ORDER BY device_id, seq;
DROP TABLE queue;
ALTER TABLE queue_by_rowid RENAME TO queue;
CREATE UNIQUE INDEX queue_by_device ON queue (device_id, seq);
CREATE INDEX queue_by_expiry ON queue (expires_at);
