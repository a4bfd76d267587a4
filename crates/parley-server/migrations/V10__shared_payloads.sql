-- Data that several queue entries share is stored once. In a room of N devices one commit was
-- stored N times (in a tree with blank parent nodes a commit's UpdatePath holds a ciphertext per
-- member, ~112 KB at 1,000 members, so ~112 MB per commit), and every Welcome entry carried the
-- whole ratchet tree. Now such an entry points at one `payloads` row for its data (`payload_id`,
-- `data` left empty) and at one for its tree (`tree_id`). Small 1:1 entries keep their data
-- inline. A payload is deleted with its last entry (on ack) or by the expiry sweep.
CREATE TABLE payloads (
    payload_id INTEGER PRIMARY KEY,
    data       BLOB NOT NULL
);
ALTER TABLE queue ADD COLUMN payload_id INTEGER;
ALTER TABLE queue ADD COLUMN tree_id INTEGER;
CREATE INDEX queue_by_payload ON queue (payload_id) WHERE payload_id IS NOT NULL;
CREATE INDEX queue_by_tree ON queue (tree_id) WHERE tree_id IS NOT NULL;

-- Queue sequence numbers come from one counter, reserved a block per fan-out, instead of a
-- `devices.next_seq` per device: a message to a room of 1,000 devices rewrote 1,000 device rows
-- (half the cost of its fan-out). A device still sees increasing numbers, now with gaps; the
-- counter starts past every number already handed out, so nothing new sorts before an old entry.
-- `devices.next_seq` is no longer used.
CREATE TABLE queue_counter (
    only     INTEGER PRIMARY KEY CHECK (only = 0),
    next_seq INTEGER NOT NULL
);
INSERT INTO queue_counter (only, next_seq) VALUES (0, max(
    (SELECT coalesce(max(next_seq), 1) FROM devices),
    (SELECT coalesce(max(seq), 0) + 1 FROM queue)
));
