//! Per-device durable queues and live push. Owns the `queue` table.
//!
//! Entries get a per-device increasing `seq` inside the same transaction that stores them; they
//! are pushed to connected devices from the storage writer right after that transaction commits,
//! so a device sees entries in exactly the order they became durable.

use crate::clock::now_ms;
use crate::store::{Store, StoreError};
use parley_proto::api::{EntryKind, QueueEntry};
use rusqlite::{params, Connection};
use std::collections::{BTreeSet, HashMap};
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

/// Data at least this long that goes to several devices at once is stored once, in
/// `payloads`, and referenced by their queue entries; shorter data is copied into each entry
/// (a separate row would cost more than it saves). Ratchet trees are always stored once.
const SHARED_PAYLOAD_MIN: usize = 1024;

/// One entry to queue for one device.
#[derive(Clone)]
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

/// An entry stored for a device, ready to push. Holds the data shared, not copied: a commit
/// to a room of 1,000 devices is one buffer, copied only for devices that are connected.
pub struct Stored {
    seq: u64,
    item: Outgoing,
}

impl Stored {
    fn entry(&self) -> QueueEntry {
        let it = &self.item;
        QueueEntry {
            seq: self.seq,
            room_id: it.room_id.clone(),
            kind: it.kind,
            event: it.event,
            ts: it.ts,
            data: it.data.to_vec(),
            ratchet_tree: it.ratchet_tree.as_deref().cloned(),
        }
    }
}

/// The `payloads` rows of one `enqueue` call, by the address of the shared buffer.
struct Payloads<'c> {
    insert: rusqlite::CachedStatement<'c>,
    ids: HashMap<*const Vec<u8>, i64>,
}

impl Payloads<'_> {
    fn id_of(&mut self, data: &Arc<Vec<u8>>) -> Result<i64, StoreError> {
        if let Some(id) = self.ids.get(&Arc::as_ptr(data)) {
            return Ok(*id);
        }
        let id = self
            .insert
            .query_row(params![data.as_slice()], |r| r.get(0))?;
        self.ids.insert(Arc::as_ptr(data), id);
        Ok(id)
    }
}

/// Appends entries to their devices' queues (inside the caller's transaction), numbered in
/// order from the queue's one counter. Devices that no longer exist are skipped.
pub fn enqueue(c: &Connection, items: &[Outgoing]) -> Result<Vec<Stored>, StoreError> {
    let mut exists = c.prepare_cached("SELECT 1 FROM devices WHERE device_id = ?1")?;
    let mut live = Vec::with_capacity(items.len());
    for it in items {
        if exists.exists(params![it.device])? {
            live.push(it);
        }
    }
    if live.is_empty() {
        return Ok(Vec::new());
    }
    let first_seq: i64 = c
        .prepare_cached(
            "UPDATE queue_counter SET next_seq = next_seq + ?1 RETURNING next_seq - ?1",
        )?
        .query_row(params![live.len() as i64], |r| r.get(0))?;
    let mut insert = c.prepare_cached(
        "INSERT INTO queue (device_id, seq, room_id, kind, event, ts, data, expires_at, payload_id, tree_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    let mut payloads = Payloads {
        insert: c.prepare_cached("INSERT INTO payloads (data) VALUES (?1) RETURNING payload_id")?,
        ids: HashMap::new(),
    };
    let mut sharing: HashMap<*const Vec<u8>, usize> = HashMap::new();
    for it in items
        .iter()
        .filter(|it| it.data.len() >= SHARED_PAYLOAD_MIN)
    {
        *sharing.entry(Arc::as_ptr(&it.data)).or_default() += 1;
    }
    let mut stored = Vec::with_capacity(live.len());
    for (seq, it) in (first_seq..).zip(live) {
        let shared = sharing.get(&Arc::as_ptr(&it.data)).is_some_and(|n| *n > 1);
        let (data, payload_id): (&[u8], _) = if shared {
            (&[], Some(payloads.id_of(&it.data)?))
        } else {
            (it.data.as_slice(), None)
        };
        let tree_id = match &it.ratchet_tree {
            Some(tree) => Some(payloads.id_of(tree)?),
            None => None,
        };
        insert.execute(params![
            it.device,
            seq,
            it.room_id,
            kind_code(it.kind),
            it.event as i64,
            it.ts as i64,
            data,
            it.expires_at as i64,
            payload_id,
            tree_id,
        ])?;
        stored.push(Stored {
            seq: seq as u64,
            item: it.clone(),
        });
    }
    Ok(stored)
}

/// A `payloads` row no queue entry references any more (both lookups use a partial index).
const UNREFERENCED: &str =
    "NOT EXISTS (SELECT 1 FROM queue WHERE queue.payload_id = payloads.payload_id)
     AND NOT EXISTS (SELECT 1 FROM queue WHERE queue.tree_id = payloads.payload_id)";

/// Deletes the payloads among `ids` that no queue entry references any more.
fn drop_unreferenced(c: &Connection, ids: &BTreeSet<i64>) -> Result<(), StoreError> {
    let mut drop = c.prepare_cached(&format!(
        "DELETE FROM payloads WHERE payload_id = ?1 AND {UNREFERENCED}"
    ))?;
    for id in ids {
        drop.execute(params![id])?;
    }
    Ok(())
}

/// Deletes every payload no queue entry references (after entries went without an ack: a
/// deleted device, expiry).
fn sweep_payloads(c: &Connection) -> Result<usize, StoreError> {
    Ok(c.execute(&format!("DELETE FROM payloads WHERE {UNREFERENCED}"), [])?)
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
        for stored in stored {
            let device = &stored.item.device;
            if let Some(list) = subs.get_mut(device) {
                let entry = Arc::new(stored.entry());
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
                    "SELECT q.seq, q.room_id, q.kind, q.event, q.ts, coalesce(p.data, q.data),
                            coalesce(t.data, q.ratchet_tree)
                     FROM queue q
                     LEFT JOIN payloads p ON p.payload_id = q.payload_id
                     LEFT JOIN payloads t ON t.payload_id = q.tree_id
                     WHERE q.device_id = ?1 AND q.seq > ?2 AND q.expires_at > ?4
                     ORDER BY q.seq LIMIT ?3",
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

    /// Deletes a device's entries up to and including `up_to`, and the shared payloads that
    /// were only theirs.
    pub async fn ack(&self, device: &str, up_to: u64) -> Result<usize, StoreError> {
        let device = device.to_owned();
        self.store
            .write(move |c| {
                // Cached: acks come about once per delivered entry.
                let mut delete = c.prepare_cached(
                    "DELETE FROM queue WHERE device_id = ?1 AND seq <= ?2
                     RETURNING payload_id, tree_id",
                )?;
                let mut deleted = 0;
                let mut payloads = BTreeSet::new();
                let mut rows = delete.query(params![device, up_to as i64])?;
                while let Some(row) = rows.next()? {
                    deleted += 1;
                    payloads.extend(row.get::<_, Option<i64>>(0)?);
                    payloads.extend(row.get::<_, Option<i64>>(1)?);
                }
                drop(rows);
                drop_unreferenced(c, &payloads)?;
                Ok(deleted)
            })
            .await
    }

    /// Deletes entries whose retention has passed, then the payloads nothing references.
    pub async fn expire(&self, now_ms: u64) -> Result<usize, StoreError> {
        self.store
            .write(move |c| {
                let expired = c.execute(
                    "DELETE FROM queue WHERE expires_at <= ?1",
                    params![now_ms as i64],
                )?;
                sweep_payloads(c)?;
                Ok(expired)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store in `dir` with one user owning `devices`.
    async fn store_with_devices(dir: &std::path::Path, devices: &[&str]) -> Store {
        let store = Store::open(dir).unwrap();
        let devices: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
        store
            .write(move |c| {
                c.execute("INSERT INTO users VALUES ('a.test', 'al', 'h', 0)", [])?;
                for d in &devices {
                    c.execute(
                        "INSERT INTO devices (device_id, domain, handle, name, signature_key, token_hash, created_at)
                         VALUES (?1, 'a.test', 'al', 'n', x'00', ?1, 0)",
                        [d],
                    )?;
                }
                Ok(())
            })
            .await
            .unwrap();
        store
    }

    #[tokio::test]
    async fn queues_order_ack_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_devices(dir.path(), &["d1"]).await;
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
        let seqs: Vec<u64> = stored.iter().map(|s| s.seq).collect();
        assert_eq!(
            seqs,
            vec![1, 2, 3],
            "increasing seq, unknown devices skipped"
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
        assert_eq!(stored[0].seq, 4);
    }

    async fn payload_count(store: &Store) -> i64 {
        store
            .read(|c| Ok(c.query_row("SELECT count(*) FROM payloads", [], |r| r.get(0))?))
            .await
            .unwrap()
    }

    /// A commit and a Welcome's tree going to several devices are stored once, served to each
    /// device whole, and deleted with the last entry that references them (ack or expiry).
    #[tokio::test]
    async fn shared_data_is_stored_once_and_dropped_with_its_last_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_devices(dir.path(), &["d1", "d2", "d3"]).await;
        let commit = Arc::new(vec![7u8; 5000]);
        let small = Arc::new(vec![1u8; 10]);
        let tree = Arc::new(vec![9u8; 3000]);
        let entry =
            |device: &str, data: &Arc<Vec<u8>>, tree: Option<&Arc<Vec<u8>>>, expires_at| Outgoing {
                device: device.into(),
                room_id: "r".into(),
                kind: EntryKind::Commit,
                event: 1,
                ts: 1,
                data: data.clone(),
                ratchet_tree: tree.cloned(),
                expires_at,
            };
        let items = vec![
            entry("d1", &commit, None, 100),
            entry("d2", &commit, None, 100),
            entry("d1", &small, None, 100),
            entry("d2", &small, None, 100),
            entry("d3", &small, Some(&tree), 100),
            entry("d3", &commit, None, 10),
        ];
        store.write(move |c| enqueue(c, &items)).await.unwrap();
        assert_eq!(
            payload_count(&store).await,
            2,
            "the commit and the tree once each; small data inline"
        );
        let inline: i64 = store
            .read(|c| {
                Ok(c.query_row(
                    "SELECT count(*) FROM queue WHERE payload_id IS NULL",
                    [],
                    |r| r.get(0),
                )?)
            })
            .await
            .unwrap();
        assert_eq!(inline, 3);

        let delivery = Delivery::new(store.clone());
        let mut pages = Vec::new();
        for device in ["d1", "d2"] {
            let page = delivery.page_at(device, 0, 10, 50).await.unwrap();
            assert_eq!(page.len(), 2);
            assert_eq!(page[0].data, *commit, "{device} gets the whole commit");
            assert_eq!(page[1].data, *small);
            assert_eq!(page[0].ratchet_tree, None);
            pages.push(page);
        }
        let d3 = delivery.page_at("d3", 0, 10, 5).await.unwrap();
        assert_eq!(d3[0].data, *small);
        assert_eq!(d3[0].ratchet_tree.as_deref(), Some(tree.as_slice()));
        assert_eq!(d3[1].data, *commit);

        assert_eq!(delivery.ack("d1", pages[0][1].seq).await.unwrap(), 2);
        assert_eq!(
            payload_count(&store).await,
            2,
            "d2 and d3 still hold the commit"
        );
        assert_eq!(delivery.ack("d3", d3[0].seq).await.unwrap(), 1);
        assert_eq!(
            payload_count(&store).await,
            1,
            "the tree went with d3's Welcome"
        );
        assert_eq!(delivery.ack("d2", pages[1][0].seq).await.unwrap(), 1);
        assert_eq!(
            payload_count(&store).await,
            1,
            "d3's copy of the commit is left"
        );
        assert_eq!(delivery.expire(50).await.unwrap(), 1);
        assert_eq!(
            payload_count(&store).await,
            0,
            "the sweep drops it with its entry"
        );
    }
}
