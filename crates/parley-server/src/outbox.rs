//! Store and forward between providers: a durable outbound queue per peer. Owns `peer_outbox`.
//!
//! Rows are written inside the same transaction as the event that causes them (a hub's accepted
//! message, a consent answer), so nothing acknowledged to a client is lost if the process dies
//! before delivery. One worker per peer delivers rows in id order: `notify` rows of one room
//! travel together in one request (per-room order), different rooms concurrently. A row is
//! deleted once the peer accepted it (2xx) or refused it for good (4xx other than 408/429);
//! otherwise the worker retries with exponential backoff and jitter, capped (default 60 s), so a
//! returning peer is served within a minute. A `notify` request is the room's rows' encoded
//! `FanoutMessage`s concatenated (draft §5.5); followers drop messages they already applied, so
//! a retry after a lost answer delivers exactly once. A row of an expiring message is dropped
//! undelivered once it expired.

use crate::clock::now_ms;
use crate::peers::{PeerClient, PeerError};
use crate::store::{Store, StoreError};
use parley_proto::Domain;
use rand::Rng;
use rusqlite::{params, Connection};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// Rows read per round.
const ROUND_ROWS: usize = 512;
/// Most notify entries (and bytes) per request.
const MAX_NOTIFY_ENTRIES: usize = 256;
const MAX_NOTIFY_BYTES: usize = 1 << 20;
/// First retry delay; doubles per failed round up to the configured cap.
const FIRST_RETRY: Duration = Duration::from_millis(250);

pub const NOTIFY: &str = "notify";
pub const REQUEST_CONSENT: &str = "requestConsent";
pub const UPDATE_CONSENT: &str = "updateConsent";

/// One message to deliver to a peer.
#[derive(Debug, Clone)]
pub struct OutboxItem {
    pub peer: String,
    pub as_domain: String,
    pub endpoint: &'static str,
    /// The endpoint's path parameter (the room URI without `mimi://` for notify, a domain for
    /// consent).
    pub param: String,
    pub body: Vec<u8>,
    /// An expiring message's notification is dropped undelivered after this (ms).
    pub expires_at: Option<u64>,
}

/// Appends items to the outbox (inside the caller's transaction).
pub fn insert(c: &Connection, items: &[OutboxItem]) -> Result<(), StoreError> {
    let mut st = c.prepare_cached(
        "INSERT INTO peer_outbox (peer, as_domain, endpoint, param, body, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    let now = now_ms() as i64;
    for it in items {
        st.execute(params![
            it.peer,
            it.as_domain,
            it.endpoint,
            it.param,
            it.body,
            now,
            it.expires_at.map(|e| e as i64),
        ])?;
    }
    Ok(())
}

struct Row {
    id: i64,
    as_domain: String,
    endpoint: String,
    param: String,
    body: Vec<u8>,
    expires_at: Option<i64>,
}

/// Delivery counters of one peer, for `/metrics`.
#[derive(Default)]
struct PeerStats {
    delivered: AtomicU64,
    rejected: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// How one request went.
enum Outcome {
    Delivered,
    /// The peer refused it for good; retrying cannot help.
    Rejected(String),
    /// Try again later.
    Failed(String),
}

pub struct Outbox {
    store: Store,
    peers: Option<Arc<PeerClient>>,
    retry_cap: Duration,
    runtime: tokio::runtime::Handle,
    shutdown: watch::Receiver<bool>,
    workers: Mutex<HashMap<String, Arc<Notify>>>,
    stats: Mutex<BTreeMap<String, Arc<PeerStats>>>,
}

impl Outbox {
    pub fn new(
        store: Store,
        peers: Option<Arc<PeerClient>>,
        retry_cap: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            peers,
            retry_cap,
            runtime: tokio::runtime::Handle::current(),
            shutdown,
            workers: Mutex::new(HashMap::new()),
            stats: Mutex::new(BTreeMap::new()),
        })
    }

    /// Starts workers for peers with rows left from before a restart.
    pub async fn resume(self: &Arc<Self>) -> Result<(), StoreError> {
        let peers: Vec<String> = self
            .store
            .read(|c| {
                let mut st = c.prepare("SELECT DISTINCT peer FROM peer_outbox")?;
                let rows = st.query_map([], |r| r.get(0))?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await?;
        for peer in peers {
            self.wake(&peer);
        }
        Ok(())
    }

    /// Tells the peer's worker that rows are waiting, starting it on first use. Cheap; called
    /// right after the transaction that inserted them committed.
    pub fn wake(self: &Arc<Self>, peer: &str) {
        let Ok(mut workers) = self.workers.lock() else {
            return;
        };
        if let Some(signal) = workers.get(peer) {
            signal.notify_one();
            return;
        }
        let signal = Arc::new(Notify::new());
        workers.insert(peer.to_owned(), signal.clone());
        let this = self.clone();
        let peer = peer.to_owned();
        self.runtime
            .spawn(async move { this.run(peer, signal).await });
    }

    fn stats(&self, peer: &str) -> Arc<PeerStats> {
        self.stats
            .lock()
            .map(|mut m| m.entry(peer.to_owned()).or_default().clone())
            .unwrap_or_default()
    }

    async fn run(self: Arc<Self>, peer: String, signal: Arc<Notify>) {
        let stats = self.stats(&peer);
        let mut shutdown = self.shutdown.clone();
        let mut failed_rounds = 0u32;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let rows = match self.pending(&peer).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot read the peer outbox");
                    Vec::new()
                }
            };
            if rows.is_empty() {
                failed_rounds = 0;
                tokio::select! {
                    _ = signal.notified() => continue,
                    _ = shutdown.changed() => return,
                }
            }
            let failed = self.deliver_round(&peer, rows, &stats).await;
            if failed {
                failed_rounds = failed_rounds.saturating_add(1);
                let delay = self.backoff(failed_rounds);
                tracing::debug!(%peer, ?delay, "peer delivery failed; retrying later");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => return,
                }
            } else {
                failed_rounds = 0;
            }
        }
    }

    /// Exponential backoff with jitter: uniformly in [d/2, d], d = 250 ms · 2^(n-1), capped.
    fn backoff(&self, failed_rounds: u32) -> Duration {
        let exp = FIRST_RETRY.saturating_mul(1u32 << failed_rounds.saturating_sub(1).min(20));
        let capped = exp.min(self.retry_cap);
        let half = capped / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }

    async fn pending(&self, peer: &str) -> Result<Vec<Row>, StoreError> {
        let peer = peer.to_owned();
        self.store
            .read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT id, as_domain, endpoint, param, body, expires_at FROM peer_outbox
                     WHERE peer = ?1 ORDER BY id LIMIT ?2",
                )?;
                let rows = st.query_map(params![peer, ROUND_ROWS as i64], |r| {
                    Ok(Row {
                        id: r.get(0)?,
                        as_domain: r.get(1)?,
                        endpoint: r.get(2)?,
                        param: r.get(3)?,
                        body: r.get(4)?,
                        expires_at: r.get(5)?,
                    })
                })?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await
    }

    /// Sends one round (rooms concurrently, each room's rows in order) and deletes what the
    /// peer took. Returns whether anything must be retried.
    async fn deliver_round(&self, peer: &str, rows: Vec<Row>, stats: &PeerStats) -> bool {
        let Ok(peer_domain) = Domain::parse(peer) else {
            tracing::warn!(%peer, "dropping outbox rows for an invalid peer domain");
            let ids = rows.iter().map(|r| r.id).collect();
            let _ = self.delete(ids).await;
            return false;
        };
        let now = now_ms() as i64;
        let (expired, rows): (Vec<Row>, Vec<Row>) = rows
            .into_iter()
            .partition(|r| r.expires_at.is_some_and(|at| at <= now));
        if !expired.is_empty() {
            tracing::debug!(%peer, rows = expired.len(), "dropped expired notifications");
            let _ = self.delete(expired.iter().map(|r| r.id).collect()).await;
        }
        let mut tasks = tokio::task::JoinSet::new();
        for batch in batches(rows) {
            let peers = self.peers.clone();
            let peer_domain = peer_domain.clone();
            tasks.spawn(async move {
                let outcome = send_batch(peers.as_deref(), &peer_domain, &batch).await;
                (batch.iter().map(|r| r.id).collect::<Vec<_>>(), outcome)
            });
        }
        let mut done = Vec::new();
        let mut failed = false;
        while let Some(joined) = tasks.join_next().await {
            let Ok((ids, outcome)) = joined else {
                failed = true;
                continue;
            };
            match outcome {
                Outcome::Delivered => {
                    stats
                        .delivered
                        .fetch_add(ids.len() as u64, Ordering::Relaxed);
                    done.extend(ids);
                }
                Outcome::Rejected(why) => {
                    tracing::warn!(%peer, rows = ids.len(), %why, "peer refused delivery; dropped");
                    stats
                        .rejected
                        .fetch_add(ids.len() as u64, Ordering::Relaxed);
                    remember_error(stats, &why);
                    done.extend(ids);
                }
                Outcome::Failed(why) => {
                    tracing::debug!(%peer, %why, "peer delivery failed");
                    stats.failures.fetch_add(1, Ordering::Relaxed);
                    remember_error(stats, &why);
                    failed = true;
                }
            }
        }
        if let Err(e) = self.delete(done).await {
            tracing::warn!(%peer, error = %e, "cannot delete delivered outbox rows");
            return true;
        }
        failed
    }

    async fn delete(&self, ids: Vec<i64>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.store
            .write(move |c| {
                let mut st = c.prepare_cached("DELETE FROM peer_outbox WHERE id = ?1")?;
                for id in ids {
                    st.execute(params![id])?;
                }
                Ok(())
            })
            .await
    }

    /// Prometheus lines: queue depth, delivered, refused and failed attempts per peer.
    pub async fn metrics(&self) -> String {
        let depths: Vec<(String, i64)> = self
            .store
            .read(|c| {
                let mut st = c.prepare("SELECT peer, COUNT(*) FROM peer_outbox GROUP BY peer")?;
                let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await
            .unwrap_or_default();
        let mut out = String::new();
        let mut peers: BTreeMap<String, (i64, Option<Arc<PeerStats>>)> =
            depths.into_iter().map(|(p, d)| (p, (d, None))).collect();
        if let Ok(stats) = self.stats.lock() {
            for (p, s) in stats.iter() {
                peers.entry(p.clone()).or_insert((0, None)).1 = Some(s.clone());
            }
        }
        for (peer, (depth, stats)) in peers {
            let _ = writeln!(out, "parley_peer_queue_depth{{peer=\"{peer}\"}} {depth}");
            if let Some(s) = stats {
                let _ = writeln!(
                    out,
                    "parley_peer_delivered_total{{peer=\"{peer}\"}} {}\nparley_peer_rejected_total{{peer=\"{peer}\"}} {}\nparley_peer_delivery_failures_total{{peer=\"{peer}\"}} {}",
                    s.delivered.load(Ordering::Relaxed),
                    s.rejected.load(Ordering::Relaxed),
                    s.failures.load(Ordering::Relaxed),
                );
            }
        }
        out
    }

    /// The last delivery error per peer (for logs and tests).
    pub fn last_errors(&self) -> Vec<(String, String)> {
        let Ok(stats) = self.stats.lock() else {
            return Vec::new();
        };
        stats
            .iter()
            .filter_map(|(p, s)| {
                let e = s.last_error.lock().ok()?.clone()?;
                Some((p.clone(), e))
            })
            .collect()
    }
}

fn remember_error(stats: &PeerStats, why: &str) {
    if let Ok(mut e) = stats.last_error.lock() {
        *e = Some(why.to_owned());
    }
}

/// Groups a round's rows into requests: consecutive notify rows of one room (kept in order,
/// bounded in count and size) become one request; every other row is its own request. A room's
/// rows stay in one batch sequence, so per-room order holds even though rooms go concurrently.
fn batches(rows: Vec<Row>) -> Vec<Vec<Row>> {
    let mut by_room: BTreeMap<(String, String), Vec<Vec<Row>>> = BTreeMap::new();
    let mut singles = Vec::new();
    for row in rows {
        if row.endpoint != NOTIFY {
            singles.push(vec![row]);
            continue;
        }
        let key = (row.as_domain.clone(), row.param.clone());
        let list = by_room.entry(key).or_default();
        let start_new = list.last().is_none_or(|b| {
            b.len() >= MAX_NOTIFY_ENTRIES
                || b.iter().map(|r| r.body.len()).sum::<usize>() + row.body.len() > MAX_NOTIFY_BYTES
        });
        if start_new {
            list.push(Vec::new());
        }
        if let Some(b) = list.last_mut() {
            b.push(row);
        }
    }
    // Later batches of one room must wait for the earlier ones: send only each room's first
    // batch this round (the rest is read again next round).
    let mut out: Vec<Vec<Row>> = by_room
        .into_values()
        .filter_map(|mut l| (!l.is_empty()).then(|| l.swap_remove(0)))
        .collect();
    // Consent messages are independent of each other and of rooms.
    out.extend(singles);
    out
}

async fn send_batch(peers: Option<&PeerClient>, peer: &Domain, batch: &[Row]) -> Outcome {
    let Some(peers) = peers else {
        return Outcome::Failed("federation is not configured".into());
    };
    let Some(first) = batch.first() else {
        return Outcome::Delivered;
    };
    let Ok(as_domain) = Domain::parse(&first.as_domain) else {
        return Outcome::Rejected(format!("invalid local domain {}", first.as_domain));
    };
    let body = if first.endpoint == NOTIFY {
        notify_body(batch)
    } else {
        first.body.clone()
    };
    match peers
        .post(&as_domain, peer, &first.endpoint, &first.param, body)
        .await
    {
        Ok((status, _)) if status.is_success() => Outcome::Delivered,
        Ok((status, answer)) => {
            let why = format!("{status}: {}", String::from_utf8_lossy(&answer));
            let retry = status.is_server_error()
                || status == reqwest::StatusCode::REQUEST_TIMEOUT
                || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
            if retry {
                Outcome::Failed(why)
            } else {
                Outcome::Rejected(why)
            }
        }
        Err(e @ PeerError::NoIdentity(_)) | Err(e @ PeerError::Credentials(_)) => {
            Outcome::Failed(e.to_string())
        }
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// The `notify` body for a batch: the rows' `FanoutMessage`s, concatenated in order.
fn notify_body(batch: &[Row]) -> Vec<u8> {
    batch.iter().flat_map(|r| r.body.iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, endpoint: &str, param: &str) -> Row {
        Row {
            id,
            as_domain: "chirp.test".into(),
            endpoint: endpoint.into(),
            param: param.into(),
            body: vec![0; 10],
            expires_at: None,
        }
    }

    #[test]
    fn batches_keep_room_order_and_send_one_batch_per_room() {
        let rows = vec![
            row(1, NOTIFY, "a"),
            row(2, NOTIFY, "b"),
            row(3, UPDATE_CONSENT, "wave.test"),
            row(4, NOTIFY, "a"),
        ];
        let out = batches(rows);
        let ids: Vec<Vec<i64>> = out
            .iter()
            .map(|b| b.iter().map(|r| r.id).collect())
            .collect();
        assert_eq!(ids, vec![vec![1, 4], vec![2], vec![3]]);
    }

    #[test]
    fn oversized_rooms_wait_for_the_next_round() {
        let rows: Vec<Row> = (1..=(MAX_NOTIFY_ENTRIES as i64 + 5))
            .map(|i| row(i, NOTIFY, "a"))
            .collect();
        let out = batches(rows);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), MAX_NOTIFY_ENTRIES);
        assert_eq!(out[0][0].id, 1);
    }
}
