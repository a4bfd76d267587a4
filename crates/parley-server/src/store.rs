//! Durable storage: one SQLite database in WAL mode.
//!
//! All writes go through a single writer thread that groups concurrent requests into one
//! transaction (group commit): a write is acknowledged only after its transaction is committed
//! with `synchronous=FULL`, so an acked write survives kill -9 and power loss, while many
//! concurrent sends share one fsync. Reads use a small pool of read-only connections.

use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Most jobs folded into one transaction.
const MAX_BATCH: usize = 1024;
/// Read connections kept open for reuse.
const READ_POOL: usize = 8;
/// How often the checkpointer copies the WAL into the database. Checkpoints run on their own
/// connection and thread, so the writer's group commits never wait for one.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// WAL pages past which the writer checkpoints by itself after all (the checkpointer is
/// behind): bounds the WAL file at about 64 MiB.
const WRITER_CHECKPOINT_PAGES: u32 = 16_384;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database migration failed: {0}")]
    Migration(String),
    #[error("cannot create data directory {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error("the storage writer has stopped")]
    WriterGone,
    #[error("a storage task failed: {0}")]
    Task(String),
    /// A write job found its input not allowed and wrote nothing (rolled back alone).
    #[error("{0}")]
    Refused(String),
}

type Finisher = Box<dyn FnOnce(Result<(), String>) + Send>;
/// A write job: given the open transaction (or why none could be opened), it runs its
/// statements and returns what to do once the outcome of the commit is known.
type Job = Box<dyn FnOnce(Result<&Connection, String>) -> Finisher + Send>;

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::Sender<Job>,
    readers: Arc<Mutex<Vec<Connection>>>,
    path: Arc<PathBuf>,
}

impl Store {
    /// Opens (creating if needed) `dir/parley.db`, runs migrations and starts the writer.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::DataDir(dir.to_owned(), e))?;
        let path = dir.join("parley.db");
        let mut conn = Connection::open(&path)?;
        conn.execute_batch(
            // temp_store: each job runs in a savepoint, whose journal of changed pages would
            // otherwise be a file written for every page a job touches (a third of the writer's
            // time when a commit bumps 1,000 devices' sequence numbers). cache_size: a 64 MiB page
            // cache for the writer (SQLite's default is 2 MiB), filled only as used; one message
            // fanned out to 5,000 devices took 39 ms in the hub with the default, 27 ms with it.
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;
             PRAGMA temp_store=MEMORY; PRAGMA cache_size=-65536;",
        )?;
        embedded::migrations::runner()
            .set_migration_table_name("parley_migrations")
            .run(&mut conn)
            .map_err(|e| StoreError::Migration(e.to_string()))?;
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)?;
        let checkpoints = Connection::open(&path)?;
        checkpoints.execute_batch("PRAGMA busy_timeout=5000;")?;
        let (jobs, rx) = mpsc::channel::<Job>(8192);
        let (writer_alive, writer_gone) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("parley-store-writer".into())
            .spawn(move || {
                writer_loop(conn, rx);
                drop(writer_alive);
            })
            .map_err(|e| StoreError::Task(e.to_string()))?;
        std::thread::Builder::new()
            .name("parley-store-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpoints, writer_gone))
            .map_err(|e| StoreError::Task(e.to_string()))?;
        Ok(Self {
            jobs,
            readers: Arc::new(Mutex::new(Vec::new())),
            path: Arc::new(path),
        })
    }

    /// Runs `f` inside the next group-commit transaction and returns its result once committed.
    /// `after_commit` runs on the writer thread right after the commit, in commit order (used to
    /// push queue entries to connected devices in exactly the order they became durable).
    pub async fn write_then<T, F, H>(&self, f: F, after_commit: H) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        H: FnOnce(&T) + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = match conn {
                Ok(conn) => in_savepoint(conn, f),
                Err(e) => Err(StoreError::Task(format!("no write transaction: {e}"))),
            };
            Box::new(move |committed| {
                let outcome = match (committed, result) {
                    (Ok(()), Ok(value)) => {
                        after_commit(&value);
                        Ok(value)
                    }
                    (Err(e), _) => Err(StoreError::Task(format!("commit failed: {e}"))),
                    (Ok(()), Err(e)) => Err(e),
                };
                let _ = tx.send(outcome);
            })
        });
        self.jobs
            .send(job)
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    pub async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.write_then(f, |_| {}).await
    }

    /// Runs a read on a pooled connection off the async runtime.
    pub async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = store.checkout()?;
            let result = f(&conn);
            store.checkin(conn);
            result
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    fn checkout(&self) -> Result<Connection, StoreError> {
        let pooled = self
            .readers
            .lock()
            .map_err(|_| StoreError::WriterGone)?
            .pop();
        match pooled {
            Some(c) => Ok(c),
            None => {
                let c = Connection::open_with_flags(
                    &*self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                c.execute_batch("PRAGMA busy_timeout=5000;")?;
                Ok(c)
            }
        }
    }

    fn checkin(&self, conn: Connection) {
        if let Ok(mut pool) = self.readers.lock() {
            if pool.len() < READ_POOL {
                pool.push(conn);
            }
        }
    }
}

/// Runs one job in a savepoint so a failing job rolls back alone, not the whole batch.
fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    // Cached statements: these run once per job, so parsing them each time would show.
    conn.prepare_cached("SAVEPOINT job")?.execute([])?;
    let result = f(conn);
    if result.is_err() {
        conn.prepare_cached("ROLLBACK TO job")?.execute([])?;
    }
    conn.prepare_cached("RELEASE job")?.execute([])?;
    result
}

/// Copies committed WAL frames into the database every [`CHECKPOINT_EVERY`] until the writer
/// stops. PASSIVE never blocks the writer; what it cannot copy yet waits for the next round.
fn checkpoint_loop(conn: Connection, writer_gone: std::sync::mpsc::Receiver<()>) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        let last = !matches!(
            writer_gone.recv_timeout(CHECKPOINT_EVERY),
            Err(RecvTimeoutError::Timeout)
        );
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
        if last {
            return;
        }
    }
}

fn writer_loop(conn: Connection, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            tracing::error!(error = %e, "cannot begin a write transaction");
            // Fail every job without running any of its statements.
            let msg = e.to_string();
            for job in batch {
                job(Err(msg.clone()))(Err(msg.clone()));
            }
            continue;
        }
        let finishers: Vec<Finisher> = batch.into_iter().map(|job| job(Ok(&conn))).collect();
        let committed = conn.execute_batch("COMMIT").map_err(|e| {
            tracing::error!(error = %e, "group commit failed");
            let _ = conn.execute_batch("ROLLBACK");
            e.to_string()
        });
        for finish in finishers {
            finish(committed.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_are_durable_and_failures_roll_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ok = store.write(|c| {
            c.execute("INSERT INTO users VALUES ('a.test', 'alice', 'h', 1)", [])?;
            Ok(())
        });
        let failing = store.write(|c| {
            c.execute("INSERT INTO users VALUES ('a.test', 'bob', 'h', 1)", [])?;
            c.execute("INSERT INTO users VALUES ('a.test', 'bob', 'h', 1)", [])?; // duplicate key
            Ok(())
        });
        let (ok, failing) = tokio::join!(ok, failing);
        ok.unwrap();
        assert!(failing.is_err());
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let names: Vec<String> = store
            .read(|c| {
                let mut st = c.prepare("SELECT handle FROM users ORDER BY handle")?;
                let rows = st.query_map([], |r| r.get(0))?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await
            .unwrap();
        assert_eq!(names, vec!["alice".to_string()]);
    }

    /// A database in `dir` with the migrations up to `version` applied, to fill as an older
    /// provider left it before `Store::open` runs the rest.
    fn migrated_to(dir: &Path, version: i32) -> Connection {
        let mut conn = Connection::open(dir.join("parley.db")).unwrap();
        let mut runner =
            embedded::migrations::runner().set_target(refinery::Target::Version(version));
        runner.set_migration_table_name("parley_migrations");
        runner.run(&mut conn).unwrap();
        conn
    }

    /// Migration V9 (the queue as a rowid table) keeps what was queued, and (device, seq) stays
    /// unique.
    #[tokio::test]
    async fn the_rowid_queue_migration_keeps_queued_entries() {
        let dir = tempfile::tempdir().unwrap();
        let conn = migrated_to(dir.path(), 8);
        conn.execute_batch(
            "INSERT INTO users VALUES ('a.test', 'al', 'h', 0);
             INSERT INTO devices (device_id, domain, handle, name, signature_key, token_hash, created_at, next_seq)
                 VALUES ('d1', 'a.test', 'al', 'n', x'00', x'01', 0, 3);
             INSERT INTO queue (device_id, seq, room_id, kind, event, ts, data, expires_at, ratchet_tree)
                 VALUES ('d1', 1, 'r', 1, 7, 1, x'0102', 9999999999999, x'0304'),
                        ('d1', 2, 'r', 3, 8, 1, x'05', 9999999999999, NULL);",
        )
        .unwrap();
        drop(conn);
        let store = Store::open(dir.path()).unwrap();
        let delivery = crate::delivery::Delivery::new(store.clone());
        let page = delivery.page("d1", 0, 10).await.unwrap();
        assert_eq!(page.len(), 2);
        assert_eq!((page[0].event, page[0].data.clone()), (7, vec![1, 2]));
        assert_eq!(page[0].ratchet_tree, Some(vec![3, 4]));
        assert_eq!((page[1].seq, page[1].data.clone()), (2, vec![5]));
        let duplicate = store
            .write(|c| {
                c.execute(
                    "INSERT INTO queue (device_id, seq, room_id, kind, event, ts, data, expires_at)
                     VALUES ('d1', 2, 'r', 3, 9, 1, x'06', 1)",
                    [],
                )?;
                Ok(())
            })
            .await;
        assert!(duplicate.is_err(), "(device_id, seq) is still unique");
    }

    /// Migration V10 (one queue counter, shared payloads): entries queued before it stay
    /// readable, and every new entry sorts after each device's old ones, which a client may
    /// have processed without acking yet.
    #[tokio::test]
    async fn the_queue_counter_starts_past_every_old_sequence_number() {
        let dir = tempfile::tempdir().unwrap();
        let conn = migrated_to(dir.path(), 9);
        conn.execute_batch(
            "INSERT INTO users VALUES ('a.test', 'al', 'h', 0);
             INSERT INTO devices (device_id, domain, handle, name, signature_key, token_hash, created_at, next_seq)
                 VALUES ('d1', 'a.test', 'al', 'n', x'00', x'01', 0, 41),
                        ('d2', 'a.test', 'al', 'm', x'00', x'02', 0, 3);
             INSERT INTO queue (device_id, seq, room_id, kind, event, ts, data, expires_at, ratchet_tree)
                 VALUES ('d2', 2, 'r', 1, 7, 1, x'0102', 9999999999999, x'0304');",
        )
        .unwrap();
        drop(conn);
        let store = Store::open(dir.path()).unwrap();
        let outgoing = |device: &str| crate::delivery::Outgoing {
            device: device.into(),
            room_id: "r".into(),
            kind: parley_proto::api::EntryKind::Message,
            event: 8,
            ts: 1,
            data: std::sync::Arc::new(vec![5]),
            ratchet_tree: None,
            expires_at: 9999999999999,
        };
        let items = vec![outgoing("d2"), outgoing("d1")];
        store
            .write(move |c| crate::delivery::enqueue(c, &items))
            .await
            .unwrap();
        let delivery = crate::delivery::Delivery::new(store.clone());
        let d2 = delivery.page("d2", 0, 10).await.unwrap();
        assert_eq!(d2.len(), 2);
        assert_eq!((d2[0].seq, d2[0].data.clone()), (2, vec![1, 2]));
        assert_eq!(d2[0].ratchet_tree, Some(vec![3, 4]));
        assert_eq!(d2[1].data, vec![5]);
        let d1 = delivery.page("d1", 0, 10).await.unwrap();
        assert!(
            d2[1].seq >= 41 && d1[0].seq >= 41,
            "new entries are numbered past d1's old next_seq (41): {} {}",
            d2[1].seq,
            d1[0].seq
        );
    }
}
