//! The device's durable profile: one SQLite database (`profile.db`, WAL mode) in a directory,
//! holding openmls's state next to Parley's own tables (account, the rooms and their MLS
//! groups, queue position, seen message ids, history).
//!
//! Both share one connection so an MLS step and its bookkeeping commit in one transaction.

use std::path::{Path, PathBuf};
use std::time::Duration;

use parley_proto::{DeviceId, MessageId, RoomId, UserId};
use rusqlite::{params, Connection, OptionalExtension as _};
use serde::Serialize;

use crate::error::{ClientError, Result};
use crate::mls;

/// The database file inside a profile directory.
pub const DB_FILE: &str = "profile.db";
/// How long to wait for another process holding the database lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Lock file held while a profile's schema is brought up to date.
const MIGRATION_LOCK: &str = "profile.lock";
/// Where refinery records which of `migrations/` a profile has applied.
const MIGRATION_TABLE: &str = "parley_profile_migrations";
/// Profiles made before refinery counted their schema version (1 to 5) in `PRAGMA user_version`.
const LAST_LEGACY_VERSION: i64 = 5;
/// The profile folder received files are saved into.
pub const DOWNLOADS_DIR: &str = "downloads";

mod embedded {
    refinery::embed_migrations!("migrations");
}

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

/// A commit posted to the hub whose answer never came (a crash, a lost connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCommit {
    pub room: RoomId,
    /// The epoch the commit was built in.
    pub epoch: u64,
    /// The request as posted (JSON), to post again when the hub's epoch is not known here.
    pub request: Option<String>,
}

/// One message in the local history, as it stands after edits, deletes and reactions.
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
    /// The latest text (empty once deleted).
    pub text: String,
    /// Hub timestamp, milliseconds since the Unix epoch.
    pub ts: u64,
    /// The message this one replies to.
    #[serde(
        serialize_with = "crate::display_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub reply_to: Option<MessageId>,
    /// When the message stops being shown (milliseconds since the Unix epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Its author replaced the text.
    pub edited: bool,
    /// Its author retracted it.
    pub deleted: bool,
    /// Reactions to it, oldest first. Read from their own table: ignored by
    /// [`Profile::add_history`].
    pub reactions: Vec<Reaction>,
}

impl HistoryEntry {
    /// A new, unedited message without reactions.
    pub fn new(
        room: RoomId,
        event: u64,
        sender: UserId,
        id: MessageId,
        text: String,
        ts: u64,
    ) -> Self {
        Self {
            room,
            event,
            sender,
            id,
            text,
            ts,
            reply_to: None,
            expires_at: None,
            edited: false,
            deleted: false,
            reactions: Vec::new(),
        }
    }
}

/// A reaction as history shows it under its message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reaction {
    #[serde(serialize_with = "crate::display")]
    pub sender: UserId,
    pub emoji: String,
}

/// A reaction as stored: its own id, the message it reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReactionRecord {
    pub room: RoomId,
    pub id: MessageId,
    pub target: MessageId,
    pub sender: UserId,
    pub emoji: String,
    pub ts: u64,
}

/// A received message with a file still to download: where and when it arrived, and its MIMI
/// content (encoded) with the file's URL, key and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDownload {
    pub room: RoomId,
    pub id: MessageId,
    pub event: u64,
    pub sender: UserId,
    pub ts: u64,
    /// When the message stops being shown, as computed on arrival.
    pub expires_at: Option<u64>,
    pub content: Vec<u8>,
    /// Failed attempts to fetch it so far (ignored by [`Profile::add_download`]).
    pub attempts: u32,
}

/// What a MessageId names in a room's local history, and who wrote it: the facts that decide
/// whether an edit or delete is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authored {
    Message { sender: UserId, deleted: bool },
    Reaction { sender: UserId },
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
        // Switching to WAL and migrating both need the database to themselves.
        let only_us = lock_for_migration(dir)?;
        let mut conn = Connection::open(&path)
            .map_err(|e| ClientError::Storage(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // WAL lets a `sync` in one process and a `send` in another proceed without blocking
        // readers; FULL sync because losing MLS state after a crash would desynchronise groups.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        mls::init_storage(&mut conn)?;
        migrate(&mut conn)?;
        drop(only_us);
        Ok(Self {
            conn,
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The folder received files are saved into (`downloads/` in the profile).
    pub fn downloads_dir(&self) -> PathBuf {
        self.dir.join(DOWNLOADS_DIR)
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

    /// Runs `f`, then undoes every change it made to the profile, whatever its outcome (a
    /// savepoint, so it also works inside a transaction). For reading an ephemeral message
    /// without advancing the stored MLS state: the messages queued before it must still
    /// decrypt, whatever order they arrive in.
    pub fn without_saving<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.conn.execute_batch("SAVEPOINT parley_scratch")?;
        let outcome = f();
        self.conn
            .execute_batch("ROLLBACK TO parley_scratch; RELEASE parley_scratch")?;
        outcome
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
        from_sql_int(self.state_value("processed_seq")?.unwrap_or(0))
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

    // --- this user's devices ----------------------------------------------------------------------

    /// Whether this user's devices may differ from those in our rooms, so the next sync must
    /// compare them. True until first checked, so a profile from before multi-device checks once.
    pub fn devices_stale(&self) -> Result<bool> {
        Ok(self.state_value("devices_in_step")? != Some(1))
    }

    /// A value of `parley_state`, if set.
    fn state_value(&self, key: &str) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT value FROM parley_state WHERE key = ?1",
                params![key],
                |row| row.get(0),
            )
            .optional()?)
    }

    pub fn set_devices_stale(&self, stale: bool) -> Result<()> {
        self.conn.execute(
            "INSERT INTO parley_state (key, value) VALUES ('devices_in_step', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![i64::from(!stale)],
        )?;
        Ok(())
    }

    // --- rooms ----------------------------------------------------------------------------------

    /// Whether this device has been in the room (it may have left or been removed since).
    pub fn knows_room(&self, room: &RoomId) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM parley_rooms WHERE room_id = ?1",
                params![room.as_str()],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    // --- rooms left, to tell the provider -------------------------------------------------------

    /// Notes that this device left `room` (or was removed), for [`Self::left_unreported`].
    pub fn add_left_unreported(&self, room: &RoomId) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO parley_left_unreported (room_id) VALUES (?1)",
            params![room.as_str()],
        )?;
        Ok(())
    }

    /// The provider was told, or the device is back in the room (a Welcome): nothing to report.
    pub fn remove_left_unreported(&self, room: &RoomId) -> Result<()> {
        self.conn.execute(
            "DELETE FROM parley_left_unreported WHERE room_id = ?1",
            params![room.as_str()],
        )?;
        Ok(())
    }

    /// Rooms this device left whose provider has not been told yet.
    pub fn left_unreported(&self) -> Result<Vec<RoomId>> {
        self.room_list("SELECT room_id FROM parley_left_unreported ORDER BY room_id")
    }

    fn room_list(&self, query: &str) -> Result<Vec<RoomId>> {
        room_list(&self.conn, query)
    }

    // --- commits awaiting the hub's answer --------------------------------------------------------

    /// Notes that a commit from `epoch` was posted (`request`, as JSON); if we crash before
    /// knowing the outcome, the next sync settles it (see [`PendingCommit`]).
    pub fn set_pending_commit(&self, room: &RoomId, epoch: u64, request: &str) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO parley_pending_commits (room_id, epoch, request)
             VALUES (?1, ?2, ?3)",
            params![room.as_str(), to_sql_int(epoch)?, request],
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

    /// Rooms with a posted commit of unknown fate.
    pub fn pending_commits(&self) -> Result<Vec<PendingCommit>> {
        let mut stmt = self.conn.prepare(
            "SELECT room_id, epoch, request FROM parley_pending_commits ORDER BY room_id",
        )?;
        let raws = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, Option<String>>(2)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raws.into_iter()
            .map(|(room, epoch, request)| {
                Ok(PendingCommit {
                    room: parse_stored(&room, RoomId::parse)?,
                    epoch: from_sql_int(epoch)?,
                    request,
                })
            })
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
        self.room_list("SELECT room_id FROM parley_proposal_rooms ORDER BY room_id")
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

    /// Files a message in history (its reactions live in their own table).
    pub fn add_history(&self, entry: &HistoryEntry) -> Result<()> {
        self.conn.execute(
            "INSERT INTO parley_history
                 (room_id, event, sender, message_id, text, ts, reply_to, expires_at, edited, deleted)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                entry.room.as_str(),
                to_sql_int(entry.event)?,
                entry.sender.to_string(),
                entry.id.to_hex(),
                entry.text,
                to_sql_int(entry.ts)?,
                entry.reply_to.map(|id| id.to_hex()),
                entry.expires_at.map(to_sql_int).transpose()?,
                entry.edited,
                entry.deleted,
            ],
        )?;
        Ok(())
    }

    /// Remembers where the attachment of message `id` is stored, so that its author deleting
    /// the message can delete the upload too.
    pub fn set_asset_url(&self, room: &RoomId, id: &MessageId, url: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE parley_history SET asset_url = ?3 WHERE room_id = ?1 AND message_id = ?2",
            params![room.as_str(), id.to_hex(), url],
        )?;
        Ok(())
    }

    /// Where the attachment of message `id` is stored, if it has one.
    pub fn asset_url(&self, room: &RoomId, id: &MessageId) -> Result<Option<String>> {
        self.history_field(room, id, "asset_url")
    }

    /// One nullable column of message `id`'s history row (`None` also when there is no row).
    fn history_field<T: rusqlite::types::FromSql>(
        &self,
        room: &RoomId,
        id: &MessageId,
        column: &'static str,
    ) -> Result<Option<T>> {
        let value: Option<Option<T>> = self
            .conn
            .query_row(
                &format!(
                    "SELECT {column} FROM parley_history WHERE room_id = ?1 AND message_id = ?2"
                ),
                params![room.as_str(), id.to_hex()],
                |row| row.get(0),
            )
            .optional()?;
        Ok(value.flatten())
    }

    pub fn add_reaction(&self, reaction: &ReactionRecord) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO parley_reactions (message_id, room_id, target, sender, emoji, ts)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                reaction.id.to_hex(),
                reaction.room.as_str(),
                reaction.target.to_hex(),
                reaction.sender.to_string(),
                reaction.emoji,
                to_sql_int(reaction.ts)?,
            ],
        )?;
        Ok(())
    }

    /// What `id` is in `room`'s history (a message or a reaction) and who wrote it. A message
    /// that expired by `now_ms` is no longer anything: edits, deletes and reactions to it are
    /// ignored even before the next purge removes it.
    pub fn authored(&self, room: &RoomId, id: &MessageId, now_ms: u64) -> Result<Option<Authored>> {
        let message: Option<(String, bool)> = self
            .conn
            .query_row(
                "SELECT sender, deleted FROM parley_history
                 WHERE room_id = ?1 AND message_id = ?2 AND (expires_at IS NULL OR expires_at > ?3)",
                params![room.as_str(), id.to_hex(), to_sql_int(now_ms)?],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        if let Some((sender, deleted)) = message {
            let sender = parse_stored(&sender, UserId::parse)?;
            return Ok(Some(Authored::Message { sender, deleted }));
        }
        let reactor: Option<String> = self
            .conn
            .query_row(
                "SELECT sender FROM parley_reactions WHERE room_id = ?1 AND message_id = ?2",
                params![room.as_str(), id.to_hex()],
                |row| row.get(0),
            )
            .optional()?;
        reactor
            .map(|s| {
                Ok(Authored::Reaction {
                    sender: parse_stored(&s, UserId::parse)?,
                })
            })
            .transpose()
    }

    /// When message `id` of `room` expires (milliseconds since the Unix epoch), if it does.
    pub fn message_expiry(&self, room: &RoomId, id: &MessageId) -> Result<Option<u64>> {
        let expires: Option<i64> = self.history_field(room, id, "expires_at")?;
        Ok(expires.map(|ms| ms.max(0) as u64))
    }

    /// Whether `id` is a message of `room` this device has: in history and not expired by
    /// `now_ms`, or a file still waiting to be downloaded.
    pub fn knows_message(&self, room: &RoomId, id: &MessageId, now_ms: u64) -> Result<bool> {
        let known: Option<i64> = self
            .conn
            .query_row(
                "SELECT 1 FROM parley_history
                 WHERE room_id = ?1 AND message_id = ?2 AND (expires_at IS NULL OR expires_at > ?3)
                 UNION ALL
                 SELECT 1 FROM parley_downloads WHERE room_id = ?1 AND message_id = ?2
                 LIMIT 1",
                params![room.as_str(), id.to_hex(), to_sql_int(now_ms)?],
                |row| row.get(0),
            )
            .optional()?;
        Ok(known.is_some())
    }

    /// The ids in `room`'s history (messages and reactions) that start with `prefix` (hex).
    pub fn ids_starting_with(&self, room: &RoomId, prefix: &str) -> Result<Vec<MessageId>> {
        let pattern = format!("{}%", prefix.to_ascii_lowercase());
        let mut stmt = self.conn.prepare(
            "SELECT message_id FROM parley_history WHERE room_id = ?1 AND message_id LIKE ?2
             UNION SELECT message_id FROM parley_reactions WHERE room_id = ?1 AND message_id LIKE ?2",
        )?;
        let ids = stmt
            .query_map(params![room.as_str(), pattern], |row| {
                row.get::<_, String>(0)
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        ids.iter()
            .map(|id| MessageId::from_hex(id).ok_or_else(|| corrupt(&format!("message id {id:?}"))))
            .collect()
    }

    /// Replaces a message's text and marks it edited.
    pub fn edit_message(&self, room: &RoomId, id: &MessageId, text: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE parley_history SET text = ?3, edited = 1 WHERE room_id = ?1 AND message_id = ?2",
            params![room.as_str(), id.to_hex(), text],
        )?;
        Ok(())
    }

    /// Marks a message deleted, forgets its text (the point of deleting it) and its reactions,
    /// and deletes its received file from `downloads/`.
    pub fn delete_message(&self, room: &RoomId, id: &MessageId) -> Result<()> {
        self.remove_saved_files(
            "room_id = ?1 AND message_id = ?2",
            params![room.as_str(), id.to_hex()],
        )?;
        self.conn.execute(
            "UPDATE parley_history SET text = '', deleted = 1 WHERE room_id = ?1 AND message_id = ?2",
            params![room.as_str(), id.to_hex()],
        )?;
        self.conn.execute(
            "DELETE FROM parley_reactions WHERE room_id = ?1 AND target = ?2",
            params![room.as_str(), id.to_hex()],
        )?;
        self.conn.execute(
            "DELETE FROM parley_receipts WHERE room_id = ?1 AND message_id = ?2",
            params![room.as_str(), id.to_hex()],
        )?;
        Ok(())
    }

    /// Removes a reaction (an "unlike").
    pub fn delete_reaction(&self, room: &RoomId, id: &MessageId) -> Result<()> {
        self.conn.execute(
            "DELETE FROM parley_reactions WHERE room_id = ?1 AND message_id = ?2",
            params![room.as_str(), id.to_hex()],
        )?;
        Ok(())
    }

    /// Deletes the messages whose expiry is at or before `now_ms` (and their reactions, their
    /// received files, and files still waiting to be downloaded for them): an expiring message
    /// is gone from the device, not merely hidden. Returns how many messages of history.
    pub fn purge_expired(&self, now_ms: u64) -> Result<usize> {
        let now = to_sql_int(now_ms)?;
        self.transaction(|| {
            self.purge_expired_files(now)?;
            self.conn.execute(
                "DELETE FROM parley_reactions WHERE EXISTS (
                     SELECT 1 FROM parley_history h WHERE h.room_id = parley_reactions.room_id
                       AND h.message_id = parley_reactions.target
                       AND h.expires_at IS NOT NULL AND h.expires_at <= ?1)",
                params![now],
            )?;
            self.conn.execute(
                "DELETE FROM parley_receipts WHERE EXISTS (
                     SELECT 1 FROM parley_history h WHERE h.room_id = parley_receipts.room_id
                       AND h.message_id = parley_receipts.message_id
                       AND h.expires_at IS NOT NULL AND h.expires_at <= ?1)",
                params![now],
            )?;
            Ok(self.conn.execute(
                "DELETE FROM parley_history WHERE expires_at IS NOT NULL AND expires_at <= ?1",
                params![now],
            )?)
        })
    }

    /// The last `limit` messages of a room that have not expired by `now_ms`, oldest first: by
    /// the hub's acceptance time, which every provider and device sees alike (a message relayed
    /// through a follower is answered with that time but no hub event number).
    pub fn history(&self, room: &RoomId, limit: usize, now_ms: u64) -> Result<Vec<HistoryEntry>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare(
            "SELECT room_id, event, sender, message_id, text, ts, reply_to, expires_at, edited, deleted
             FROM parley_history
             WHERE room_id = ?1 AND (expires_at IS NULL OR expires_at > ?3)
             ORDER BY ts DESC, event DESC, id DESC LIMIT ?2",
        )?;
        let raws = stmt
            .query_map(
                params![room.as_str(), limit, to_sql_int(now_ms)?],
                raw_history,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut entries = raws
            .into_iter()
            .map(|raw| self.history_from_raw(raw))
            .collect::<Result<Vec<_>>>()?;
        entries.reverse();
        Ok(entries)
    }

    fn history_from_raw(&self, raw: RawHistory) -> Result<HistoryEntry> {
        let parse_id = |id: &str| {
            MessageId::from_hex(id).ok_or_else(|| corrupt(&format!("message id {id:?}")))
        };
        let room = parse_stored(&raw.room, RoomId::parse)?;
        let id = parse_id(&raw.id)?;
        let reactions = self.reactions(&room, &id)?;
        Ok(HistoryEntry {
            event: from_sql_int(raw.event)?,
            sender: parse_stored(&raw.sender, UserId::parse)?,
            text: raw.text,
            ts: from_sql_int(raw.ts)?,
            reply_to: raw.reply_to.as_deref().map(parse_id).transpose()?,
            expires_at: raw.expires_at.map(from_sql_int).transpose()?,
            edited: raw.edited,
            deleted: raw.deleted,
            reactions,
            room,
            id,
        })
    }

    /// The reactions to one message, oldest first.
    fn reactions(&self, room: &RoomId, target: &MessageId) -> Result<Vec<Reaction>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT sender, emoji FROM parley_reactions WHERE room_id = ?1 AND target = ?2
             ORDER BY ts, rowid",
        )?;
        let raws = stmt
            .query_map(params![room.as_str(), target.to_hex()], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raws.into_iter()
            .map(|(sender, emoji)| {
                Ok(Reaction {
                    sender: parse_stored(&sender, UserId::parse)?,
                    emoji,
                })
            })
            .collect()
    }

    // --- received files ------------------------------------------------------------------------

    /// Records that message `id`'s file was saved as `name` in `downloads/`. A name that was
    /// free to create names no other message's file any more (that one was removed from disk),
    /// so older records of it are dropped: deleting their message must not take this file.
    pub fn set_saved_file(&self, room: &RoomId, id: &MessageId, name: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE parley_history SET saved_file = NULL WHERE saved_file = ?1",
            params![name],
        )?;
        self.conn.execute(
            "UPDATE parley_history SET saved_file = ?3 WHERE room_id = ?1 AND message_id = ?2",
            params![room.as_str(), id.to_hex(), name],
        )?;
        Ok(())
    }

    /// Deletes the received files of expired messages from disk and the files still waiting to
    /// be downloaded for them.
    fn purge_expired_files(&self, now: i64) -> Result<()> {
        self.remove_saved_files("expires_at IS NOT NULL AND expires_at <= ?1", params![now])?;
        self.conn.execute(
            "DELETE FROM parley_downloads WHERE expires_at IS NOT NULL AND expires_at <= ?1",
            params![now],
        )?;
        Ok(())
    }

    /// Deletes from disk the received files of the history rows `filter` selects, and forgets
    /// them. Files first: a crash in between leaves a record of a missing file, never a file
    /// nothing refers to.
    fn remove_saved_files(&self, filter: &str, args: impl rusqlite::Params + Copy) -> Result<()> {
        let names = {
            let mut stmt = self.conn.prepare(&format!(
                "SELECT saved_file FROM parley_history WHERE saved_file IS NOT NULL AND {filter}"
            ))?;
            let names = stmt
                .query_map(args, |row| row.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            names
        };
        if names.is_empty() {
            return Ok(());
        }
        for name in &names {
            self.remove_saved_file(name);
        }
        self.conn.execute(
            &format!("UPDATE parley_history SET saved_file = NULL WHERE {filter}"),
            args,
        )?;
        Ok(())
    }

    /// Deletes `name` from `downloads/`, if it is a plain file name there: a stored name that
    /// would reach outside the folder is never acted on. Best effort: a file the user already
    /// moved or deleted is fine, and a failure is logged, not fatal to syncing.
    fn remove_saved_file(&self, name: &str) {
        let mut parts = Path::new(name).components();
        let plain = matches!(
            (parts.next(), parts.next()),
            (Some(std::path::Component::Normal(_)), None)
        );
        if !plain {
            tracing::warn!(name, "not removing a stored file name outside downloads/");
            return;
        }
        match std::fs::remove_file(self.downloads_dir().join(name)) {
            Ok(()) => tracing::debug!(name, "received file removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(name, "cannot remove a received file: {e}"),
        }
    }

    // --- files to download -------------------------------------------------------------------

    pub fn add_download(&self, d: &PendingDownload) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO parley_downloads
                 (message_id, room_id, event, sender, ts, expires_at, content)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                d.id.to_hex(),
                d.room.as_str(),
                to_sql_int(d.event)?,
                d.sender.to_string(),
                to_sql_int(d.ts)?,
                d.expires_at.map(to_sql_int).transpose()?,
                d.content,
            ],
        )?;
        Ok(())
    }

    /// The files to download now (not waiting to be retried after `now_ms`): those tried least
    /// often first, then in the order their messages arrived (so a file that keeps failing
    /// does not hold up newer ones).
    pub fn pending_downloads(&self, now_ms: u64) -> Result<Vec<PendingDownload>> {
        let mut stmt = self.conn.prepare(
            "SELECT message_id, room_id, event, sender, ts, expires_at, content, attempts
             FROM parley_downloads WHERE retry_at <= ?1 ORDER BY attempts, rowid",
        )?;
        let raws = stmt
            .query_map(params![to_sql_int(now_ms)?], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, i64>(4)?,
                    row.get::<_, Option<i64>>(5)?,
                    row.get::<_, Vec<u8>>(6)?,
                    row.get::<_, u32>(7)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        raws.into_iter()
            .map(
                |(id, room, event, sender, ts, expires_at, content, attempts)| {
                    Ok(PendingDownload {
                        id: MessageId::from_hex(&id)
                            .ok_or_else(|| corrupt(&format!("message id {id:?}")))?,
                        room: parse_stored(&room, RoomId::parse)?,
                        event: from_sql_int(event)?,
                        sender: parse_stored(&sender, UserId::parse)?,
                        ts: from_sql_int(ts)?,
                        expires_at: expires_at.map(from_sql_int).transpose()?,
                        content,
                        attempts,
                    })
                },
            )
            .collect()
    }

    pub fn remove_download(&self, id: &MessageId) -> Result<()> {
        self.conn.execute(
            "DELETE FROM parley_downloads WHERE message_id = ?1",
            params![id.to_hex()],
        )?;
        Ok(())
    }

    /// Records how many attempts to fetch file `id` have failed, and when to try again.
    pub fn set_download_attempts(
        &self,
        id: &MessageId,
        attempts: u32,
        retry_at: u64,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE parley_downloads SET attempts = ?2, retry_at = ?3 WHERE message_id = ?1",
            params![id.to_hex(), attempts, to_sql_int(retry_at)?],
        )?;
        Ok(())
    }

    /// Who sent the file message `id` of `room` that still waits to be downloaded, if one does.
    pub fn pending_download_sender(&self, room: &RoomId, id: &MessageId) -> Result<Option<UserId>> {
        let sender: Option<String> = self
            .conn
            .query_row(
                "SELECT sender FROM parley_downloads WHERE room_id = ?1 AND message_id = ?2",
                params![room.as_str(), id.to_hex()],
                |row| row.get(0),
            )
            .optional()?;
        sender.map(|s| parse_stored(&s, UserId::parse)).transpose()
    }

    /// Its author deleted file message `id` before it was downloaded: it goes into history as
    /// a deleted message, as if it had been fetched first, and is not fetched any more.
    pub fn retract_download(&self, room: &RoomId, id: &MessageId) -> Result<()> {
        let id = id.to_hex();
        let args = params![room.as_str(), id];
        self.conn.execute(
            "INSERT INTO parley_history
                 (room_id, event, sender, message_id, text, ts, expires_at, deleted)
             SELECT room_id, event, sender, message_id, '', ts, expires_at, 1
             FROM parley_downloads WHERE room_id = ?1 AND message_id = ?2",
            args,
        )?;
        self.conn.execute(
            "DELETE FROM parley_downloads WHERE room_id = ?1 AND message_id = ?2",
            args,
        )?;
        Ok(())
    }

    // --- receipts ------------------------------------------------------------------------------

    /// Notes that a received message is still to be reported delivered.
    pub fn add_receipt_due(&self, room: &RoomId, id: &MessageId) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO parley_receipts_due (room_id, message_id) VALUES (?1, ?2)",
            params![room.as_str(), id.to_hex()],
        )?;
        Ok(())
    }

    /// The messages still to be reported delivered, by room, oldest first.
    pub fn receipts_due(&self) -> Result<Vec<(RoomId, Vec<MessageId>)>> {
        let mut stmt = self.conn.prepare(
            "SELECT room_id, message_id FROM parley_receipts_due ORDER BY room_id, rowid",
        )?;
        let rows = stmt
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut due: Vec<(RoomId, Vec<MessageId>)> = Vec::new();
        for (room, id) in rows {
            let room = parse_stored(&room, RoomId::parse)?;
            let id =
                MessageId::from_hex(&id).ok_or_else(|| corrupt(&format!("message id {id:?}")))?;
            match due.last_mut() {
                Some((last, ids)) if *last == room => ids.push(id),
                _ => due.push((room, vec![id])),
            }
        }
        Ok(due)
    }

    pub fn clear_receipts_due(&self, room: &RoomId, ids: &[MessageId]) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(
            "DELETE FROM parley_receipts_due WHERE room_id = ?1 AND message_id = ?2",
        )?;
        for id in ids {
            stmt.execute(params![room.as_str(), id.to_hex()])?;
        }
        Ok(())
    }

    /// Records that `user` reported `status` (its draft code) for `target`; `false` if they
    /// had already reported it (from another of their devices, say).
    pub fn record_receipt(
        &self,
        room: &RoomId,
        target: &MessageId,
        user: &UserId,
        status: u8,
    ) -> Result<bool> {
        let inserted = self.conn.execute(
            "INSERT OR IGNORE INTO parley_receipts (room_id, message_id, user, status)
             VALUES (?1, ?2, ?3, ?4)",
            params![room.as_str(), target.to_hex(), user.to_string(), status],
        )?;
        Ok(inserted == 1)
    }

    /// The messages of `room` in history, by others than `me`, that `me` has not reported read.
    pub fn unread(&self, room: &RoomId, me: &UserId) -> Result<Vec<MessageId>> {
        let mut stmt = self.conn.prepare(
            "SELECT message_id FROM parley_history
             WHERE room_id = ?1 AND sender != ?2 AND read = 0 AND deleted = 0
             ORDER BY ts, event, id",
        )?;
        let ids = stmt
            .query_map(params![room.as_str(), me.to_string()], |row| {
                row.get::<_, String>(0)
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        ids.iter()
            .map(|id| MessageId::from_hex(id).ok_or_else(|| corrupt(&format!("message id {id:?}"))))
            .collect()
    }

    /// Marks messages of `room` as reported read (by this device or another of this user's).
    pub fn mark_read(&self, room: &RoomId, ids: &[MessageId]) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(
            "UPDATE parley_history SET read = 1 WHERE room_id = ?1 AND message_id = ?2",
        )?;
        for id in ids {
            stmt.execute(params![room.as_str(), id.to_hex()])?;
        }
        Ok(())
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

/// Which MLS group this device holds for which room (`parley_rooms.group_id`). For
/// [`crate::mls`], which works on the bare connection it shares with openmls's storage.
///
/// A room created here has its Parley group id; one joined from a Welcome may have any, so the
/// group is never derived from the room nor the room from the group.
pub(crate) mod groups {
    use super::{parse_stored, Result};
    use parley_proto::RoomId;
    use rusqlite::{params, Connection, OptionalExtension as _};

    /// The group id of the room's group, if this device holds one.
    pub fn group_of(conn: &Connection, room: &RoomId) -> Result<Option<Vec<u8>>> {
        let id: Option<Option<Vec<u8>>> = conn
            .prepare_cached("SELECT group_id FROM parley_rooms WHERE room_id = ?1")?
            .query_row(params![room.as_str()], |row| row.get(0))
            .optional()?;
        Ok(id.flatten())
    }

    /// The room whose group has this id, if any.
    pub fn room_of(conn: &Connection, group_id: &[u8]) -> Result<Option<RoomId>> {
        let room: Option<String> = conn
            .prepare_cached("SELECT room_id FROM parley_rooms WHERE group_id = ?1")?
            .query_row(params![group_id], |row| row.get(0))
            .optional()?;
        room.map(|r| parse_stored(&r, RoomId::parse)).transpose()
    }

    /// Records that the room's group (just created or joined) has `group_id`.
    pub fn map(conn: &Connection, room: &RoomId, group_id: &[u8]) -> Result<()> {
        conn.prepare_cached(
            "INSERT INTO parley_rooms (room_id, group_id) VALUES (?1, ?2)
             ON CONFLICT (room_id) DO UPDATE SET group_id = excluded.group_id",
        )?
        .execute(params![room.as_str(), group_id])?;
        Ok(())
    }

    /// The room's group is gone (left, removed, or never accepted); the room stays known.
    pub fn unmap(conn: &Connection, room: &RoomId) -> Result<()> {
        conn.prepare_cached("UPDATE parley_rooms SET group_id = NULL WHERE room_id = ?1")?
            .execute(params![room.as_str()])?;
        Ok(())
    }

    /// Every room this device holds a group for, sorted.
    pub fn mapped(conn: &Connection) -> Result<Vec<RoomId>> {
        super::room_list(
            conn,
            "SELECT room_id FROM parley_rooms WHERE group_id IS NOT NULL ORDER BY room_id",
        )
    }
}

/// The rooms a one-column query of stored room URIs lists.
fn room_list(conn: &Connection, query: &str) -> Result<Vec<RoomId>> {
    let mut stmt = conn.prepare_cached(query)?;
    let raws = stmt
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    raws.iter()
        .map(|room| parse_stored(room, RoomId::parse))
        .collect()
}

/// Takes the profile's migration lock (released when the file is dropped). Two processes
/// opening a profile at once, say `parley chat` and `parley sync` after an upgrade, would
/// otherwise both switch it to WAL and run the same schema steps, and one would fail.
fn lock_for_migration(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join(MIGRATION_LOCK);
    let fail =
        |e: std::io::Error| ClientError::Storage(format!("cannot lock {}: {e}", path.display()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(fail)?;
    file.lock().map_err(fail)?;
    Ok(file)
}

/// Brings Parley's tables up to date with `migrations/`, all pending steps in one transaction
/// (under [`lock_for_migration`]).
fn migrate(conn: &mut Connection) -> Result<()> {
    adopt_legacy_version(conn)?;
    embedded::migrations::runner()
        .set_grouped(true)
        .set_migration_table_name(MIGRATION_TABLE)
        .run(conn)
        .map_err(|e| ClientError::Storage(format!("cannot upgrade the profile: {e}")))?;
    Ok(())
}

/// A profile from before refinery has its version in `PRAGMA user_version`: record those
/// steps as applied (without running them again) so refinery carries on from there.
fn adopt_legacy_version(conn: &mut Connection) -> Result<()> {
    let legacy: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if legacy == 0 {
        return Ok(());
    }
    if !(1..=LAST_LEGACY_VERSION).contains(&legacy) {
        return Err(ClientError::Storage(format!(
            "profile schema version {legacy} is not one this program knows"
        )));
    }
    let version = i32::try_from(legacy).expect("checked range");
    embedded::migrations::runner()
        .set_target(refinery::Target::FakeVersion(version))
        .set_migration_table_name(MIGRATION_TABLE)
        .run(conn)
        .map_err(|e| ClientError::Storage(format!("cannot adopt the profile's schema: {e}")))?;
    conn.pragma_update(None, "user_version", 0)?;
    Ok(())
}

/// Creates the profile directory readable by its owner only: it holds private keys and a token.
fn create_private_dir(dir: &Path) -> Result<()> {
    crate::media::create_private_dir(dir).map_err(|e| {
        ClientError::Storage(format!(
            "cannot create profile directory {}: {e}",
            dir.display()
        ))
    })
}

/// A `parley_history` row as stored.
struct RawHistory {
    room: String,
    event: i64,
    sender: String,
    id: String,
    text: String,
    ts: i64,
    reply_to: Option<String>,
    expires_at: Option<i64>,
    edited: bool,
    deleted: bool,
}

fn raw_history(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawHistory> {
    Ok(RawHistory {
        room: row.get(0)?,
        event: row.get(1)?,
        sender: row.get(2)?,
        id: row.get(3)?,
        text: row.get(4)?,
        ts: row.get(5)?,
        reply_to: row.get(6)?,
        expires_at: row.get(7)?,
        edited: row.get(8)?,
        deleted: row.get(9)?,
    })
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

    fn room_of(salt: u8) -> RoomId {
        RoomId::from_random(
            &parley_proto::Domain::parse("chirp.test").unwrap(),
            [salt; 16],
        )
    }

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
        HistoryEntry::new(
            room.clone(),
            event,
            UserId::parse("bob@wave.test").unwrap(),
            MessageId([salt; 32]),
            format!("message {event}"),
            1_700_000_000_000 + event,
        )
    }

    const NOW: u64 = 1_800_000_000_000;

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
    fn rooms_map_to_their_groups_and_stay_known_after() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        let conn = profile.conn();
        let (a, b) = (room_of(3), room_of(4));
        assert!(!profile.knows_room(&a).unwrap());
        groups::map(conn, &a, b"group a").unwrap();
        groups::map(conn, &b, b"any id at all").unwrap();
        assert_eq!(
            groups::group_of(conn, &a).unwrap().as_deref(),
            Some(&b"group a"[..])
        );
        assert_eq!(
            groups::room_of(conn, b"any id at all").unwrap(),
            Some(b.clone())
        );
        assert_eq!(groups::mapped(conn).unwrap(), vec![a.clone(), b.clone()]);
        // One group, one room.
        assert!(groups::map(conn, &b, b"group a").is_err());
        groups::unmap(conn, &a).unwrap();
        assert_eq!(groups::group_of(conn, &a).unwrap(), None);
        assert_eq!(groups::room_of(conn, b"group a").unwrap(), None);
        assert!(profile.knows_room(&a).unwrap(), "a room left stays known");
        assert_eq!(groups::mapped(conn).unwrap(), vec![b.clone()]);
        // Rejoining may bring another group id.
        groups::map(conn, &a, b"group a, again").unwrap();
        assert_eq!(groups::room_of(conn, b"group a, again").unwrap(), Some(a));
    }

    #[test]
    fn rooms_left_wait_to_be_reported() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        let (a, b) = (room_of(3), room_of(4));
        profile.add_left_unreported(&b).unwrap();
        profile.add_left_unreported(&a).unwrap();
        profile.add_left_unreported(&a).unwrap();
        assert_eq!(
            profile.left_unreported().unwrap(),
            vec![a.clone(), b.clone()]
        );
        profile.remove_left_unreported(&a).unwrap();
        assert_eq!(profile.left_unreported().unwrap(), vec![b]);
    }

    #[test]
    fn history_is_deduplicated_and_limited() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        let room = room_of(4);
        for event in 1..=5u8 {
            let e = entry(&room, event.into(), event);
            assert!(profile.mark_seen(&e.id).unwrap());
            profile.add_history(&e).unwrap();
        }
        assert!(!profile.mark_seen(&MessageId([2; 32])).unwrap());
        let last_two = profile.history(&room, 2, NOW).unwrap();
        assert_eq!(last_two, vec![entry(&room, 4, 4), entry(&room, 5, 5)]);
        let other = room_of(5);
        assert!(profile.history(&other, 10, NOW).unwrap().is_empty());
    }

    #[test]
    fn edits_deletes_and_reactions_change_history() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        let room = room_of(4);
        let bob = UserId::parse("bob@wave.test").unwrap();
        let alice = UserId::parse("alice@chirp.test").unwrap();
        let mut reply = entry(&room, 2, 2);
        reply.reply_to = Some(MessageId([1; 32]));
        for e in [entry(&room, 1, 1), reply.clone()] {
            profile.add_history(&e).unwrap();
        }
        let like = ReactionRecord {
            room: room.clone(),
            id: MessageId([9; 32]),
            target: MessageId([1; 32]),
            sender: alice.clone(),
            emoji: "+1".into(),
            ts: 5,
        };
        profile.add_reaction(&like).unwrap();
        assert_eq!(
            profile.authored(&room, &MessageId([1; 32]), NOW).unwrap(),
            Some(Authored::Message {
                sender: bob.clone(),
                deleted: false
            })
        );
        assert_eq!(
            profile.authored(&room, &like.id, NOW).unwrap(),
            Some(Authored::Reaction {
                sender: alice.clone()
            })
        );
        let elsewhere = room_of(5);
        assert_eq!(profile.authored(&elsewhere, &like.id, NOW).unwrap(), None);

        profile
            .edit_message(&room, &MessageId([2; 32]), "better")
            .unwrap();
        let history = profile.history(&room, 10, NOW).unwrap();
        assert_eq!(
            history[0].reactions,
            vec![Reaction {
                sender: alice,
                emoji: "+1".into()
            }]
        );
        assert_eq!(
            (
                history[1].text.as_str(),
                history[1].edited,
                history[1].reply_to
            ),
            ("better", true, Some(MessageId([1; 32])))
        );

        profile.delete_reaction(&room, &like.id).unwrap();
        assert!(profile.history(&room, 10, NOW).unwrap()[0]
            .reactions
            .is_empty());
        profile.add_reaction(&like).unwrap();
        profile.delete_message(&room, &MessageId([1; 32])).unwrap();
        let first = profile.history(&room, 10, NOW).unwrap().remove(0);
        assert!(first.deleted && first.text.is_empty() && first.reactions.is_empty());
        assert_eq!(profile.authored(&room, &like.id, NOW).unwrap(), None);
    }

    #[test]
    fn expired_messages_are_hidden_then_purged() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        let room = room_of(4);
        let mut brief = entry(&room, 1, 1);
        brief.expires_at = Some(NOW + 1000);
        profile.add_history(&brief).unwrap();
        profile.add_history(&entry(&room, 2, 2)).unwrap();
        assert_eq!(profile.history(&room, 10, NOW).unwrap().len(), 2);
        assert_eq!(profile.history(&room, 10, NOW + 1000).unwrap().len(), 1);
        assert_eq!(profile.purge_expired(NOW + 999).unwrap(), 0);
        assert_eq!(profile.purge_expired(NOW + 1000).unwrap(), 1);
        assert_eq!(profile.authored(&room, &brief.id, NOW).unwrap(), None);
        assert_eq!(profile.history(&room, 10, NOW).unwrap().len(), 1);
    }

    #[test]
    fn ids_are_found_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        let room = room_of(4);
        let mut a = entry(&room, 1, 0xab);
        a.id.0[1] = 0x01;
        profile.add_history(&a).unwrap();
        profile.add_history(&entry(&room, 2, 0xab)).unwrap();
        assert_eq!(profile.ids_starting_with(&room, "AB").unwrap().len(), 2);
        assert_eq!(
            profile.ids_starting_with(&room, "ab01").unwrap(),
            vec![a.id]
        );
        assert!(profile.ids_starting_with(&room, "cd").unwrap().is_empty());
    }

    #[test]
    fn scratch_changes_are_never_kept() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        profile.set_processed_seq(2).unwrap();
        let seen = profile
            .without_saving(|| {
                profile.set_processed_seq(9)?;
                profile.processed_seq()
            })
            .unwrap();
        assert_eq!((seen, profile.processed_seq().unwrap()), (9, 2));
        // Inside a transaction too, which itself goes on and commits.
        profile
            .transaction(|| {
                profile.set_processed_seq(3)?;
                let _ = profile.without_saving(|| -> Result<()> {
                    profile.set_processed_seq(10)?;
                    Err(ClientError::Protocol("boom".into()))
                });
                Ok(())
            })
            .unwrap();
        assert_eq!(profile.processed_seq().unwrap(), 3);
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
    fn devices_are_stale_until_checked() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        assert!(profile.devices_stale().unwrap(), "never checked");
        profile.set_devices_stale(false).unwrap();
        assert!(!profile.devices_stale().unwrap());
        profile.set_devices_stale(true).unwrap();
        assert!(profile.devices_stale().unwrap());
    }

    #[test]
    fn proposal_rooms_are_tracked() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        let room = room_of(8);
        profile.add_proposal_room(&room).unwrap();
        profile.add_proposal_room(&room).unwrap();
        assert_eq!(profile.proposal_rooms().unwrap(), vec![room.clone()]);
        profile.remove_proposal_room(&room).unwrap();
        assert!(profile.proposal_rooms().unwrap().is_empty());
    }

    /// The first two schema steps, as profiles from before refinery were built.
    const V1_SQL: &str = include_str!("../migrations/V1__profile.sql");
    const V2_SQL: &str = include_str!("../migrations/V2__proposal_rooms.sql");

    fn newest_migration() -> i64 {
        embedded::migrations::runner()
            .get_migrations()
            .iter()
            .map(|m| i64::from(m.version()))
            .max()
            .unwrap()
    }

    #[test]
    fn version_1_profiles_are_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(&format!("{V1_SQL} PRAGMA user_version = 1;"))
                .unwrap();
            conn.execute(
                "INSERT INTO parley_state (key, value) VALUES ('processed_seq', 5)",
                [],
            )
            .unwrap();
        }
        let profile = Profile::open_existing(dir.path()).unwrap();
        assert_eq!(profile.processed_seq().unwrap(), 5);
        let room = room_of(9);
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
        assert_eq!(version, 0, "the legacy counter is retired");
        let applied: i64 = profile
            .conn()
            .query_row(
                &format!("SELECT max(version) FROM {MIGRATION_TABLE}"),
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(applied, newest_migration());
    }

    #[test]
    fn processes_opening_a_new_profile_at_once_all_succeed() {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let opened: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|_| s.spawn(|| Profile::create_or_open(dir.path()).map(drop)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for result in opened {
                result.unwrap();
            }
            let profile = Profile::open_existing(dir.path()).unwrap();
            let applied: i64 = profile
                .conn()
                .query_row(
                    &format!("SELECT count(*) FROM {MIGRATION_TABLE}"),
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(applied, newest_migration(), "each step recorded once");
        }
    }

    #[test]
    fn version_2_history_is_kept_through_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let room = room_of(9);
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(&format!("{V1_SQL} {V2_SQL} PRAGMA user_version = 2;"))
                .unwrap();
            conn.execute(
                "INSERT INTO parley_history (room_id, event, sender, message_id, text, ts)
                 VALUES (?1, 1, 'bob@wave.test', ?2, 'old', 7)",
                params![room.as_str(), MessageId([3; 32]).to_hex()],
            )
            .unwrap();
        }
        let profile = Profile::open_existing(dir.path()).unwrap();
        let history = profile.history(&room, 10, NOW).unwrap();
        assert_eq!(history.len(), 1);
        assert_eq!(
            (
                history[0].text.as_str(),
                history[0].edited,
                history[0].expires_at
            ),
            ("old", false, None)
        );
    }

    #[test]
    fn pending_downloads_wait_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        let d = PendingDownload {
            room: room_of(6),
            id: MessageId([7; 32]),
            event: 3,
            sender: UserId::parse("bob@wave.test").unwrap(),
            ts: 9,
            expires_at: Some(99),
            content: vec![1, 2, 3],
            attempts: 0,
        };
        profile.add_download(&d).unwrap();
        profile.add_download(&d).unwrap();
        assert_eq!(profile.pending_downloads(NOW).unwrap(), vec![d.clone()]);
        profile.remove_download(&d.id).unwrap();
        assert!(profile.pending_downloads(NOW).unwrap().is_empty());
    }

    #[test]
    fn received_files_go_with_their_message_and_nothing_outside_downloads_does() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        let room = room_of(6);
        let bob = UserId::parse("bob@wave.test").unwrap();
        let downloads = profile.downloads_dir();
        std::fs::create_dir_all(&downloads).unwrap();
        let outside = dir.path().join("precious.txt");
        for (n, name) in [
            (1, "a.txt"),
            (2, "b.txt"),
            (3, "../precious.txt"),
            (4, "c.txt"),
        ] {
            let id = MessageId([n; 32]);
            let mut entry = HistoryEntry::new(room.clone(), 1, bob.clone(), id, "f".into(), 1);
            entry.expires_at = (n == 2).then_some(NOW);
            profile.add_history(&entry).unwrap();
            std::fs::write(downloads.join(name), b"x").unwrap();
            profile.set_saved_file(&room, &id, name).unwrap();
        }
        assert!(outside.is_file());
        // c.txt was removed by hand and the name reused: the newer message owns it now.
        profile
            .set_saved_file(&room, &MessageId([5; 32]), "c.txt")
            .unwrap();
        profile.delete_message(&room, &MessageId([1; 32])).unwrap();
        profile.purge_expired(NOW).unwrap();
        profile.delete_message(&room, &MessageId([3; 32])).unwrap();
        profile.delete_message(&room, &MessageId([4; 32])).unwrap();
        assert!(!downloads.join("a.txt").exists(), "deleted message");
        assert!(!downloads.join("b.txt").exists(), "expired message");
        assert!(outside.is_file(), "never outside downloads/");
        assert!(downloads.join("c.txt").is_file(), "another message's file");
    }

    #[test]
    fn receipts_are_due_once_recorded_once_and_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        let (a, b) = (room_of(1), room_of(2));
        for (room, id) in [(&a, 1), (&b, 2), (&a, 3), (&a, 1)] {
            profile.add_receipt_due(room, &MessageId([id; 32])).unwrap();
        }
        let due = profile.receipts_due().unwrap();
        assert_eq!(
            due,
            vec![
                (a.clone(), vec![MessageId([1; 32]), MessageId([3; 32])]),
                (b.clone(), vec![MessageId([2; 32])])
            ]
        );
        profile.clear_receipts_due(&a, &due[0].1).unwrap();
        assert_eq!(profile.receipts_due().unwrap().len(), 1);

        let alice = UserId::parse("alice@chirp.test").unwrap();
        assert!(profile
            .record_receipt(&a, &MessageId([1; 32]), &alice, 1)
            .unwrap());
        assert!(!profile
            .record_receipt(&a, &MessageId([1; 32]), &alice, 1)
            .unwrap());
        assert!(profile
            .record_receipt(&a, &MessageId([1; 32]), &alice, 2)
            .unwrap());

        // bob's messages (from `entry`) are unread for alice until marked; her own never are.
        for e in [entry(&a, 1, 1), entry(&a, 2, 2)] {
            profile.add_history(&e).unwrap();
        }
        let mut own = entry(&a, 3, 3);
        own.sender = alice.clone();
        profile.add_history(&own).unwrap();
        let unread = profile.unread(&a, &alice).unwrap();
        assert_eq!(unread, vec![MessageId([1; 32]), MessageId([2; 32])]);
        profile.mark_read(&a, &unread[..1]).unwrap();
        assert_eq!(
            profile.unread(&a, &alice).unwrap(),
            vec![MessageId([2; 32])]
        );
    }

    #[test]
    fn pending_commits_are_tracked() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::create_or_open(dir.path()).unwrap();
        let room = room_of(6);
        profile.set_pending_commit(&room, 3, "{}").unwrap();
        assert_eq!(
            profile.pending_commits().unwrap(),
            vec![PendingCommit {
                room: room.clone(),
                epoch: 3,
                request: Some("{}".into())
            }]
        );
        profile.clear_pending_commit(&room).unwrap();
        assert!(profile.pending_commits().unwrap().is_empty());
    }

    #[test]
    fn rooms_of_the_old_protocol_are_dropped_and_their_history_kept() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = "00112233445566778899aabbccddeeff";
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(&format!("{V1_SQL} {V2_SQL} PRAGMA user_version = 2;"))
                .unwrap();
            conn.execute_batch(&format!(
                "INSERT INTO parley_rooms (room_id, room_uri, kind, members)
                     VALUES ('{legacy}', 'mimi://chirp.test/r/{legacy}', 'group', '[]');
                 INSERT INTO parley_pending_commits (room_id, epoch) VALUES ('{legacy}', 1);
                 INSERT INTO parley_proposal_rooms (room_id) VALUES ('{legacy}');
                 INSERT INTO parley_history (room_id, event, sender, message_id, text, ts)
                     VALUES ('{legacy}', 1, 'bob@wave.test', '{}', 'old', 7);",
                MessageId([3; 32]).to_hex()
            ))
            .unwrap();
        }
        let profile = Profile::open_existing(dir.path()).unwrap();
        assert!(profile.pending_commits().unwrap().is_empty());
        assert!(profile.proposal_rooms().unwrap().is_empty());
        assert!(groups::mapped(profile.conn()).unwrap().is_empty());
        let kept: i64 = profile
            .conn()
            .query_row("SELECT count(*) FROM parley_history", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kept, 1);
    }
}
