//! Per-device durable queues and live push. Owns the `queue` table.
//!
//! Entries get a per-device increasing `seq` inside the same transaction that stores them; they
//! are pushed to connected devices from the storage writer right after that transaction commits,
//! so a device sees entries in exactly the order they became durable.

use crate::clock::now_ms;
use crate::store::{Store, StoreError};
use parley_proto::api::{EntryKind, QueueEntry};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Entries buffered per live connection before it is dropped as too slow (it then reconnects
/// and fetches the backlog from the database).
const PUSH_BUFFER: usize = 4096;

fn kind_code(kind: EntryKind) -> i64 {
    match kind {
        EntryKind::Welcome => 1,
        EntryKind::Commit => 2,
        EntryKind::Message => 3,
        EntryKind::Proposal => 4,
        EntryKind::Devices => 5,
    }
}

fn kind_from_code(code: i64) -> EntryKind {
    match code {
        1 => EntryKind::Welcome,
        2 => EntryKind::Commit,
        4 => EntryKind::Proposal,
        5 => EntryKind::Devices,
        _ => EntryKind::Message,
    }
}

/// One entry to queue for one device.
pub struct Outgoing {
    pub device: String,
    pub room_id: String,
    pub kind: EntryKind,
    pub event: u64,
    pub ts: u64,
    pub data: Arc<Vec<u8>>,
    /// For a Welcome: the group's ratchet tree.
    pub ratchet_tree: Option<Arc<Vec<u8>>>,
    pub expires_at: u64,
}

/// An entry stored for a device, ready to push.
pub type Stored = (String, Arc<QueueEntry>);

/// Appends entries to their devices' queues (inside the caller's transaction).
/// Devices that no longer exist are skipped.
pub fn enqueue(c: &Connection, items: &[Outgoing]) -> Result<Vec<Stored>, StoreError> {
    let mut bump = c.prepare_cached(
        "UPDATE devices SET next_seq = next_seq + 1 WHERE device_id = ?1 RETURNING next_seq - 1",
    )?;
    let mut insert = c.prepare_cached(
        "INSERT INTO queue (device_id, seq, room_id, kind, event, ts, data, expires_at, ratchet_tree)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    let mut stored = Vec::with_capacity(items.len());
    for it in items {
        let Some(seq) = bump
            .query_row(params![it.device], |r| r.get::<_, i64>(0))
            .optional()?
        else {
            continue;
        };
        insert.execute(params![
            it.device,
            seq,
            it.room_id,
            kind_code(it.kind),
            it.event as i64,
            it.ts as i64,
            it.data.as_slice(),
            it.expires_at as i64,
            it.ratchet_tree.as_deref().map(Vec::as_slice),
        ])?;
        stored.push((
            it.device.clone(),
            Arc::new(QueueEntry {
                seq: seq as u64,
                room_id: it.room_id.clone(),
                kind: it.kind,
                event: it.event,
                ts: it.ts,
                data: it.data.to_vec(),
                ratchet_tree: it.ratchet_tree.as_deref().cloned(),
            }),
        ));
    }
    Ok(stored)
}

/// Live WebSocket subscribers per device.
#[derive(Default)]
pub struct PushRegistry {
    subscribers: Mutex<HashMap<String, Vec<mpsc::Sender<Arc<QueueEntry>>>>>,
}

impl PushRegistry {
    pub fn subscribe(&self, device: &str) -> mpsc::Receiver<Arc<QueueEntry>> {
        let (tx, rx) = mpsc::channel(PUSH_BUFFER);
        if let Ok(mut subs) = self.subscribers.lock() {
            subs.entry(device.to_owned()).or_default().push(tx);
        }
        rx
    }

    /// Hands entries to live subscribers without blocking; a full or closed subscriber is dropped.
    pub fn push(&self, stored: &[Stored]) {
        let Ok(mut subs) = self.subscribers.lock() else {
            return;
        };
        for (device, entry) in stored {
            if let Some(list) = subs.get_mut(device) {
                list.retain(|tx| tx.try_send(entry.clone()).is_ok());
                if list.is_empty() {
                    subs.remove(device);
                }
            }
        }
    }

    /// Drops closed subscriptions of a device (called when a connection ends).
    /// Ends the live connections of a device that was deleted: their sessions see the
    /// subscription close and hang up.
    pub fn disconnect(&self, device: &str) {
        if let Ok(mut subs) = self.subscribers.lock() {
            subs.remove(device);
        }
    }

    pub fn prune(&self, device: &str) {
        if let Ok(mut subs) = self.subscribers.lock() {
            if let Some(list) = subs.get_mut(device) {
                list.retain(|tx| !tx.is_closed());
                if list.is_empty() {
                    subs.remove(device);
                }
            }
        }
    }

    pub fn connected(&self) -> usize {
        self.subscribers
            .lock()
            .map(|s| s.values().map(Vec::len).sum())
            .unwrap_or(0)
    }
}

/// Queue reads, acks and expiry.
pub struct Delivery {
    store: Store,
    pub push: Arc<PushRegistry>,
}

impl Delivery {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            push: Arc::new(PushRegistry::default()),
        }
    }

    /// The oldest `limit` entries of a device's queue with `seq > after`, leaving out expired
    /// ones: an expiring message is never delivered after its time, sweep or not.
    pub async fn page(
        &self,
        device: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<QueueEntry>, StoreError> {
        self.page_at(device, after, limit, now_ms()).await
    }

    async fn page_at(
        &self,
        device: &str,
        after: u64,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<QueueEntry>, StoreError> {
        let device = device.to_owned();
        self.store
            .read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT seq, room_id, kind, event, ts, data, ratchet_tree FROM queue
                     WHERE device_id = ?1 AND seq > ?2 AND expires_at > ?4 ORDER BY seq LIMIT ?3",
                )?;
                let rows = st.query_map(
                    params![device, after as i64, limit as i64, now_ms as i64],
                    |r| {
                        Ok(QueueEntry {
                            seq: r.get::<_, i64>(0)? as u64,
                            room_id: r.get(1)?,
                            kind: kind_from_code(r.get(2)?),
                            event: r.get::<_, i64>(3)? as u64,
                            ts: r.get::<_, i64>(4)? as u64,
                            data: r.get(5)?,
                            ratchet_tree: r.get(6)?,
                        })
                    },
                )?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    /// Deletes a device's entries up to and including `up_to`.
    pub async fn ack(&self, device: &str, up_to: u64) -> Result<usize, StoreError> {
        let device = device.to_owned();
        self.store
            .write(move |c| {
                // Cached: acks come about once per delivered entry.
                Ok(
                    c.prepare_cached("DELETE FROM queue WHERE device_id = ?1 AND seq <= ?2")?
                        .execute(params![device, up_to as i64])?,
                )
            })
            .await
    }

    /// Deletes entries whose retention has passed.
    pub async fn expire(&self, now_ms: u64) -> Result<usize, StoreError> {
        self.store
            .write(move |c| {
                Ok(c.execute(
                    "DELETE FROM queue WHERE expires_at <= ?1",
                    params![now_ms as i64],
                )?)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queues_order_ack_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .write(|c| {
                c.execute("INSERT INTO users VALUES ('a.test', 'al', 'h', 0)", [])?;
                c.execute(
                    "INSERT INTO devices (device_id, domain, handle, name, signature_key, token_hash, created_at)
                     VALUES ('d1', 'a.test', 'al', 'n', x'00', x'01', 0)",
                    [],
                )?;
                Ok(())
            })
            .await
            .unwrap();
        let item = |event: u64, expires_at: u64| Outgoing {
            device: "d1".into(),
            room_id: "r".into(),
            kind: EntryKind::Message,
            event,
            ts: 1,
            data: Arc::new(vec![event as u8]),
            ratchet_tree: None,
            expires_at,
        };
        let mut gone = item(9, 1);
        gone.device = "no-such-device".into();
        let items = vec![item(1, 100), item(2, 300), gone, item(3, 100)];
        let stored = store.write(move |c| enqueue(c, &items)).await.unwrap();
        let seqs: Vec<u64> = stored.iter().map(|(_, e)| e.seq).collect();
        assert_eq!(
            seqs,
            vec![1, 2, 3],
            "per-device seq, unknown devices skipped"
        );

        let delivery = Delivery::new(store.clone());
        let page = delivery.page_at("d1", 0, 10, 50).await.unwrap();
        assert_eq!(
            page.iter().map(|e| e.event).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(
            delivery.page_at("d1", 1, 10, 50).await.unwrap().len(),
            2,
            "after= skips"
        );
        // Past an entry's expiry it is no longer handed out, even before a sweep deletes it.
        let later = delivery.page_at("d1", 0, 10, 150).await.unwrap();
        assert_eq!(later.iter().map(|e| e.event).collect::<Vec<_>>(), vec![2]);
        assert_eq!(delivery.ack("d1", 1).await.unwrap(), 1);
        assert_eq!(
            delivery.expire(200).await.unwrap(),
            1,
            "entry 3 expired, entry 2 not yet"
        );
        let left = delivery.page_at("d1", 0, 10, 50).await.unwrap();
        assert_eq!(left.iter().map(|e| e.event).collect::<Vec<_>>(), vec![2]);
        // Sequence numbers keep growing after deletes.
        let stored = store
            .write(move |c| enqueue(c, &[item(4, 999)]))
            .await
            .unwrap();
        assert_eq!(stored[0].1.seq, 4);
    }
}
