//! The device's durable profile: one SQLite database (`profile.db`, WAL mode) in a directory,
//! holding openmls's state next to Parley's own tables (account, rooms, queue position,
//! seen message ids, history).
//!
//! Both share one connection so an MLS step and its bookkeeping commit in one transaction.

use std::path::{Path, PathBuf};
use std::time::Duration;

use parley_proto::api::RoomKind;
use parley_proto::{DeviceId, MessageId, RoomId, UserId};
use rusqlite::{params, Connection, OptionalExtension as _};
use serde::Serialize;

use crate::error::{ClientError, Result};
use crate::mls;

/// The database file inside a profile directory.
pub const DB_FILE: &str = "profile.db";
/// Version of Parley's own tables (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 2;
/// How long to wait for another process holding the database lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const SCHEMA: &str = "
CREATE TABLE parley_account (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    server_url TEXT NOT NULL,
    user TEXT NOT NULL,
    device_id TEXT NOT NULL,
    token TEXT NOT NULL,
    signature_key BLOB NOT NULL
);
CREATE TABLE parley_state (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE parley_rooms (
    room_id TEXT PRIMARY KEY,
    room_uri TEXT,
    kind TEXT,
    name TEXT,
    members TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE parley_pending_commits (
    room_id TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL
);
CREATE TABLE parley_seen (
    message_id TEXT PRIMARY KEY
);
CREATE TABLE parley_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    room_id TEXT NOT NULL,
    event INTEGER NOT NULL,
    sender TEXT NOT NULL,
    message_id TEXT NOT NULL,
    text TEXT NOT NULL,
    ts INTEGER NOT NULL
);
CREATE INDEX parley_history_by_room ON parley_history (room_id, event);
CREATE TABLE parley_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event TEXT NOT NULL
);
";

/// Version 2: rooms where proposals from other members (leaving) may await our commit.
const SCHEMA_V2: &str = "
CREATE TABLE parley_proposal_rooms (
    room_id TEXT PRIMARY KEY
);
";

/// The server account this profile's device belongs to.
#[derive(Clone, PartialEq, Eq)]
pub struct Account {
    pub server_url: String,
    pub user: UserId,
    pub device_id: DeviceId,
    /// Bearer token; a credential, so `Debug` hides it.
    pub token: String,
    /// The device's Ed25519 public key (its private half lives in openmls storage).
    pub signature_key: Vec<u8>,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("server_url", &self.server_url)
            .field("user", &self.user)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

/// What the device knows about one room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRecord {
    pub id: RoomId,
    /// `mimi://hub/r/id`; unknown until the hub has told us.
    pub uri: Option<String>,
    pub kind: Option<RoomKind>,
    pub name: Option<String>,
    /// Member users as last seen (sorted).
    pub members: Vec<UserId>,
}

/// One message in the local history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    #[serde(serialize_with = "crate::display")]
    pub room: RoomId,
    /// The room's event number (hub order).
    pub event: u64,
    #[serde(serialize_with = "crate::display")]
    pub sender: UserId,
    #[serde(serialize_with = "crate::display")]
    pub id: MessageId,
    pub text: String,
    /// Hub timestamp, milliseconds since the Unix epoch.
    pub ts: u64,
}

/// An open profile.
pub struct Profile {
    conn: Connection,
    dir: PathBuf,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile").field("dir", &self.dir).finish()
    }
}

impl Profile {
    /// Opens the profile in `dir`, creating the directory and database if needed.
    pub fn create_or_open(dir: &Path) -> Result<Self> {
        create_private_dir(dir)?;
        Self::open_file(dir)
    }

    /// Opens an existing profile; `NotRegistered` if `dir` holds none.
    pub fn open_existing(dir: &Path) -> Result<Self> {
        if !dir.join(DB_FILE).is_file() {
            return Err(ClientError::NotRegistered);
        }
        Self::open_file(dir)
    }

    fn open_file(dir: &Path) -> Result<Self> {
        let path = dir.join(DB_FILE);
        let mut conn = Connection::open(&path)
            .map_err(|e| ClientError::Storage(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // WAL lets a `sync` in one process and a `send` in another proceed without blocking
        // readers; FULL sync because losing MLS state after a crash would desynchronise groups.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        mls::init_storage(&mut conn)?;
        migrate(&conn)?;
        Ok(Self {
            conn,
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The connection, shared with openmls's storage.
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Runs `f` in one write transaction: everything or nothing reaches the disk. Inside an
    /// enclosing transaction, `f` simply joins it.
    pub fn transaction<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if !self.conn.is_autocommit() {
            return f();
        }
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match f() {
            Ok(value) => {
                self.conn.execute_batch("COMMIT")?;
                Ok(value)
            }
            Err(e) => {
                if let Err(rollback) = self.conn.execute_batch("ROLLBACK") {
                    tracing::error!(%rollback, "rollback failed");
                }
                Err(e)
            }
        }
    }

    // --- account --------------------------------------------------------------------------------

    pub fn account(&self) -> Result<Option<Account>> {
        self.conn
            .query_row(
                "SELECT server_url, user, device_id, token, signature_key FROM parley_account",
                [],
                |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, Vec<u8>>(4)?,
                    ))
                },
            )
            .optional()?
            .map(|(server_url, user, device, token, signature_key)| {
                Ok(Account {
                    server_url,
                    user: parse_stored(&user, UserId::parse)?,
                    device_id: parse_stored(&device, DeviceId::parse)?,
                    token,
                    signature_key,
                })
            })
            .transpose()
    }

    /// Stores the account; a profile holds exactly one.
    pub fn set_account(&self, account: &Account) -> Result<()> {
        if let Some(existing) = self.account()? {
            return Err(ClientError::AlreadyRegistered(existing.user.to_string()));
        }
        self.conn.execute(
            "INSERT INTO parley_account (id, server_url, user, device_id, token, signature_key)
             VALUES (1, ?1, ?2, ?3, ?4, ?5)",
            params![
                account.server_url,
                account.user.to_string(),
                account.device_id.as_str(),
                account.token,
                account.signature_key,
            ],
        )?;
        Ok(())
    }

    // --- queue position -------------------------------------------------------------------------

    /// The highest queue `seq` already processed (0 if none).
    pub fn processed_seq(&self) -> Result<u64> {
        let value: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM parley_state WHERE key = 'processed_seq'",
                [],
                |row| row.get(0),
            )
            .optional()?;
        from_sql_int(value.unwrap_or(0))
    }

    /// Raises the processed mark to `seq` (never lowers it).
    pub fn set_processed_seq(&self, seq: u64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO parley_state (key, value) VALUES ('processed_seq', ?1)
             ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
            params![to_sql_int(seq)?],
        )?;
        Ok(())
    }

    // --- rooms ----------------------------------------------------------------------------------

    pub fn room(&self, room: &RoomId) -> Result<Option<RoomRecord>> {
        self.conn
            .query_row(
                "SELECT room_id, room_uri, kind, name, members FROM parley_rooms WHERE room_id = ?1",
                params![room.as_str()],
                raw_room,
            )
            .optional()?
            .map(room_from_raw)
            .transpose()
    }

    pub fn rooms(&self) -> Result<Vec<RoomRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT room_id, room_uri, kind, name, members FROM parley_rooms ORDER BY room_id",
        )?;
        let raws = stmt
            .query_map([], raw_room)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raws.into_iter().map(room_from_raw).collect()
    }

    /// Inserts or replaces a room record.
    pub fn upsert_room(&self, room: &RoomRecord) -> Result<()> {
        self.conn.execute(
            "INSERT INTO parley_rooms (room_id, room_uri, kind, name, members)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (room_id) DO UPDATE SET room_uri = excluded.room_uri,
                 kind = excluded.kind, name = excluded.name, members = excluded.members",
            params![
                room.id.as_str(),
                room.uri,
                room.kind.map(RoomKind::as_str),
                room.name,
                members_json(&room.members)?,
            ],
        )?;
        Ok(())
    }

    /// Updates the members cache of a room, creating a bare record if the room is new.
    pub fn set_room_members(&self, room: &RoomId, members: &[UserId]) -> Result<()> {
        self.conn.execute(
            "INSERT INTO parley_rooms (room_id, members) VALUES (?1, ?2)
             ON CONFLICT (room_id) DO UPDATE SET members = excluded.members",
            params![room.as_str(), members_json(members)?],
        )?;
        Ok(())
    }

    /// Forgets a room (after this device was removed); its history stays.
    pub fn delete_room(&self, room: &RoomId) -> Result<()> {
        self.conn.execute(
            "DELETE FROM parley_rooms WHERE room_id = ?1",
            params![room.as_str()],
        )?;
        Ok(())
    }

    // --- commits awaiting the hub's answer --------------------------------------------------------

    /// Notes that a commit from `epoch` was posted; if we crash before knowing the outcome,
    /// the next sync compares epochs with the hub to merge or drop it.
    pub fn set_pending_commit(&self, room: &RoomId, epoch: u64) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO parley_pending_commits (room_id, epoch) VALUES (?1, ?2)",
            params![room.as_str(), to_sql_int(epoch)?],
        )?;
        Ok(())
    }

    pub fn clear_pending_commit(&self, room: &RoomId) -> Result<()> {
        self.conn.execute(
            "DELETE FROM parley_pending_commits WHERE room_id = ?1",
            params![room.as_str()],
        )?;
        Ok(())
    }

    /// Rooms with a posted commit of unknown fate, with the epoch it was built in.
    pub fn pending_commits(&self) -> Result<Vec<(RoomId, u64)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT room_id, epoch FROM parley_pending_commits ORDER BY room_id")?;
        let raws = stmt
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raws.into_iter()
            .map(|(room, epoch)| Ok((parse_stored(&room, RoomId::parse)?, from_sql_int(epoch)?)))
            .collect()
    }

    // --- rooms with proposals to commit -----------------------------------------------------------

    /// Notes that a member's proposal (leaving) arrived in `room` and awaits a commit.
    pub fn add_proposal_room(&self, room: &RoomId) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO parley_proposal_rooms (room_id) VALUES (?1)",
            params![room.as_str()],
        )?;
        Ok(())
    }

    pub fn remove_proposal_room(&self, room: &RoomId) -> Result<()> {
        self.conn.execute(
            "DELETE FROM parley_proposal_rooms WHERE room_id = ?1",
            params![room.as_str()],
        )?;
        Ok(())
    }

    /// Rooms where proposals may await our commit (their MLS state has the final word).
    pub fn proposal_rooms(&self) -> Result<Vec<RoomId>> {
        let mut stmt = self
            .conn
            .prepare("SELECT room_id FROM parley_proposal_rooms ORDER BY room_id")?;
        let raws = stmt
            .query_map([], |row| row.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raws.iter()
            .map(|room| parse_stored(room, RoomId::parse))
            .collect()
    }

    // --- messages -------------------------------------------------------------------------------

    /// Records a MessageId; `false` if it was seen before (a duplicate).
    pub fn mark_seen(&self, id: &MessageId) -> Result<bool> {
        let inserted = self.conn.execute(
            "INSERT OR IGNORE INTO parley_seen (message_id) VALUES (?1)",
            params![id.to_hex()],
        )?;
        Ok(inserted == 1)
    }

    pub fn add_history(&self, entry: &HistoryEntry) -> Result<()> {
        self.conn.execute(
            "INSERT INTO parley_history (room_id, event, sender, message_id, text, ts)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                entry.room.as_str(),
                to_sql_int(entry.event)?,
                entry.sender.to_string(),
                entry.id.to_hex(),
                entry.text,
                to_sql_int(entry.ts)?,
            ],
        )?;
        Ok(())
    }

    /// The last `limit` messages of a room, oldest first: by the hub's acceptance time, which
    /// every provider and device sees alike (a message relayed through a follower is answered
    /// with that time but no hub event number).
    pub fn history(&self, room: &RoomId, limit: usize) -> Result<Vec<HistoryEntry>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare(
            "SELECT room_id, event, sender, message_id, text, ts FROM parley_history
             WHERE room_id = ?1 ORDER BY ts DESC, event DESC, id DESC LIMIT ?2",
        )?;
        let raws = stmt
            .query_map(params![room.as_str(), limit], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, String>(4)?,
                    row.get::<_, i64>(5)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut entries = raws
            .into_iter()
            .map(|(room, event, sender, id, text, ts)| {
                Ok(HistoryEntry {
                    room: parse_stored(&room, RoomId::parse)?,
                    event: from_sql_int(event)?,
                    sender: parse_stored(&sender, UserId::parse)?,
                    id: MessageId::from_hex(&id)
                        .ok_or_else(|| corrupt(&format!("message id {id:?}")))?,
                    text,
                    ts: from_sql_int(ts)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        entries.reverse();
        Ok(entries)
    }

    // --- events not yet handed out ------------------------------------------------------------

    /// Queues an event for the next caller of [`Profile::take_events`]; written in the same
    /// transaction as the change it reports, so a crash can neither lose nor repeat it.
    pub fn push_event<T: Serialize>(&self, event: &T) -> Result<()> {
        let json = serde_json::to_string(event)
            .map_err(|e| ClientError::Storage(format!("cannot encode event: {e}")))?;
        self.conn.execute(
            "INSERT INTO parley_events (event) VALUES (?1)",
            params![json],
        )?;
        Ok(())
    }

    /// Removes and returns all queued events, oldest first. Undecodable ones are dropped.
    pub fn take_events<T: serde::de::DeserializeOwned>(&self) -> Result<Vec<T>> {
        let rows = self.transaction(|| {
            let mut stmt = self
                .conn
                .prepare("SELECT event FROM parley_events ORDER BY id")?;
            let rows = stmt
                .query_map([], |row| row.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            self.conn.execute("DELETE FROM parley_events", [])?;
            Ok(rows)
        })?;
        Ok(rows
            .iter()
            .filter_map(|json| {
                serde_json::from_str(json)
                    .inspect_err(|e| tracing::warn!("dropping undecodable stored event: {e}"))
                    .ok()
            })
            .collect())
    }
}

fn migrate(conn: &Connection) -> Result<()> {
    let version =
        || -> Result<i64> { Ok(conn.pragma_query_value(None, "user_version", |row| row.get(0))?) };
    match version()? {
        SCHEMA_VERSION => return Ok(()),
        v if v > SCHEMA_VERSION => {
            return Err(ClientError::Storage(format!(
                "profile schema version {v} is newer than this program understands"
            )))
        }
        _ => {}
    }
    // IMMEDIATE, and the version read again inside: another process may be migrating too.
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let upgrade = || -> Result<()> {
        let from = version()?;
        if from < 1 {
            conn.execute_batch(SCHEMA)?;
        }
        if from < 2 {
            conn.execute_batch(SCHEMA_V2)?;
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(())
    };
    match upgrade() {
        Ok(()) => {
            conn.execute_batch("COMMIT")?;
            Ok(())
        }
        Err(e) => {
            if let Err(rollback) = conn.execute_batch("ROLLBACK") {
                tracing::error!(%rollback, "rollback failed");
            }
            Err(e)
        }
    }
}

/// Creates the profile directory readable by its owner only: it holds private keys and a token.
fn create_private_dir(dir: &Path) -> Result<()> {
    let fail = |e: std::io::Error| {
        ClientError::Storage(format!(
            "cannot create profile directory {}: {e}",
            dir.display()
        ))
    };
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(fail)
}

type RawRoom = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
);

fn raw_room(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawRoom> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    ))
}

fn room_from_raw((id, uri, kind, name, members): RawRoom) -> Result<RoomRecord> {
    let kind = kind
        .map(|k| RoomKind::parse(&k).ok_or_else(|| corrupt(&format!("room kind {k:?}"))))
        .transpose()?;
    let members: Vec<String> =
        serde_json::from_str(&members).map_err(|_| corrupt("room members"))?;
    Ok(RoomRecord {
        id: parse_stored(&id, RoomId::parse)?,
        uri,
        kind,
        name,
        members: members
            .iter()
            .map(|m| parse_stored(m, UserId::parse))
            .collect::<Result<_>>()?,
    })
}

fn members_json(members: &[UserId]) -> Result<String> {
    let names: Vec<String> = members.iter().map(UserId::to_string).collect();
    serde_json::to_string(&names).map_err(|e| ClientError::Storage(e.to_string()))
}

fn parse_stored<T, E>(s: &str, parse: impl FnOnce(&str) -> Result<T, E>) -> Result<T> {
    parse(s).map_err(|_| corrupt(&format!("value {s:?}")))
}

fn corrupt(what: &str) -> ClientError {
    ClientError::Storage(format!("corrupt profile: bad {what}"))
}

fn to_sql_int(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| ClientError::Storage(format!("{v} is too large to store")))
}

fn from_sql_int(v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| corrupt(&format!("number {v}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account() -> Account {
        Account {
            server_url: "https://chirp.test/".into(),
            user: UserId::parse("alice@chirp.test").unwrap(),
            device_id: DeviceId::from_random([1; 8]),
            token: "secret-token".into(),
            signature_key: vec![1, 2, 3],
        }
    }

    fn entry(room: &RoomId, event: u64, salt: u8) -> HistoryEntry {
        HistoryEntry {
            room: room.clone(),
            event,
            sender: UserId::parse("bob@wave.test").unwrap(),
            id: MessageId([salt; 32]),
            text: format!("message {event}"),
            ts: 1_700_000_000_000 + event,
        }
    }

    #[test]
    fn opening_a_missing_profile_is_not_registered() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(
            Profile::open_existing(&missing),
            Err(ClientError::NotRegistered)
        ));
        assert!(!missing.exists(), "open_existing must not create anything");
    }

    #[test]
    fn account_is_stored_once_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice");
        let profile = Profile::create_or_open(&path).unwrap();
        assert!(profile.account().unwrap().is_none());
        profile.set_account(&account()).unwrap();
        assert!(matches!(
            profile.set_account(&account()),
            Err(ClientError::AlreadyRegistered(_))
        ));
        drop(profile);
        let profile = Profile::open_existing(&path).unwrap();
        assert_eq!(profile.account().unwrap(), Some(account()));
        assert!(!format!("{:?}", account()).contains("secret-token"));
        let mode: String = profile
            .conn()
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn processed_seq_only_moves_forward() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        assert_eq!(profile.processed_seq().unwrap(), 0);
        profile.set_processed_seq(7).unwrap();
        profile.set_processed_seq(3).unwrap();
        assert_eq!(profile.processed_seq().unwrap(), 7);
    }

    #[test]
    fn rooms_round_trip_and_members_update() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        let id = RoomId::from_random([3; 16]);
        let alice = UserId::parse("alice@chirp.test").unwrap();
        let bob = UserId::parse("bob@wave.test").unwrap();
        profile
            .set_room_members(&id, std::slice::from_ref(&alice))
            .unwrap();
        let bare = profile.room(&id).unwrap().unwrap();
        assert_eq!((bare.kind, bare.uri), (None, None));
        let record = RoomRecord {
            id: id.clone(),
            uri: Some(id.to_uri(alice.domain())),
            kind: Some(RoomKind::Group),
            name: Some("team".into()),
            members: vec![alice.clone(), bob.clone()],
        };
        profile.upsert_room(&record).unwrap();
        assert_eq!(profile.room(&id).unwrap(), Some(record.clone()));
        profile.set_room_members(&id, &[alice]).unwrap();
        let updated = profile.room(&id).unwrap().unwrap();
        assert_eq!(updated.name.as_deref(), Some("team"));
        assert_eq!(updated.members.len(), 1);
        assert_eq!(profile.rooms().unwrap().len(), 1);
        profile.delete_room(&id).unwrap();
        assert!(profile.room(&id).unwrap().is_none());
    }

    #[test]
    fn history_is_deduplicated_and_limited() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        let room = RoomId::from_random([4; 16]);
        for event in 1..=5u8 {
            let e = entry(&room, event.into(), event);
            assert!(profile.mark_seen(&e.id).unwrap());
            profile.add_history(&e).unwrap();
        }
        assert!(!profile.mark_seen(&MessageId([2; 32])).unwrap());
        let last_two = profile.history(&room, 2).unwrap();
        assert_eq!(last_two, vec![entry(&room, 4, 4), entry(&room, 5, 5)]);
        let other = RoomId::from_random([5; 16]);
        assert!(profile.history(&other, 10).unwrap().is_empty());
    }

    #[test]
    fn failed_transactions_leave_no_trace() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        let result: Result<()> = profile.transaction(|| {
            profile.set_processed_seq(9)?;
            Err(ClientError::Protocol("boom".into()))
        });
        assert!(result.is_err());
        assert_eq!(profile.processed_seq().unwrap(), 0);
        profile
            .transaction(|| profile.set_processed_seq(4))
            .unwrap();
        assert_eq!(profile.processed_seq().unwrap(), 4);
    }

    #[test]
    fn events_are_taken_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        profile.push_event(&"first").unwrap();
        profile.push_event(&"second").unwrap();
        let rolled_back: Result<()> = profile.transaction(|| {
            profile.push_event(&"lost")?;
            Err(ClientError::Protocol("boom".into()))
        });
        assert!(rolled_back.is_err());
        let taken: Vec<String> = profile.take_events().unwrap();
        assert_eq!(taken, ["first", "second"]);
        assert!(profile.take_events::<String>().unwrap().is_empty());
    }

    #[test]
    fn proposal_rooms_are_tracked() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        let room = RoomId::from_random([8; 16]);
        profile.add_proposal_room(&room).unwrap();
        profile.add_proposal_room(&room).unwrap();
        assert_eq!(profile.proposal_rooms().unwrap(), vec![room.clone()]);
        profile.remove_proposal_room(&room).unwrap();
        assert!(profile.proposal_rooms().unwrap().is_empty());
    }

    #[test]
    fn version_1_profiles_are_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(&format!("{SCHEMA} PRAGMA user_version = 1;"))
                .unwrap();
            conn.execute(
                "INSERT INTO parley_state (key, value) VALUES ('processed_seq', 5)",
                [],
            )
            .unwrap();
        }
        let profile = Profile::open_existing(dir.path()).unwrap();
        assert_eq!(profile.processed_seq().unwrap(), 5);
        let room = RoomId::from_random([9; 16]);
        profile.add_proposal_room(&room).unwrap();
        assert_eq!(profile.proposal_rooms().unwrap(), vec![room]);
        drop(profile);
        // Reopening an up-to-date profile changes nothing.
        let profile = Profile::open_existing(dir.path()).unwrap();
        assert_eq!(profile.proposal_rooms().unwrap().len(), 1);
        let version: i64 = profile
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn pending_commits_are_tracked() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        let room = RoomId::from_random([6; 16]);
        profile.set_pending_commit(&room, 3).unwrap();
        assert_eq!(profile.pending_commits().unwrap(), vec![(room.clone(), 3)]);
        profile.clear_pending_commit(&room).unwrap();
        assert!(profile.pending_commits().unwrap().is_empty());
    }
}
