//! This provider's side of rooms hubbed elsewhere (it *follows* them). Owns `remote_rooms`,
//! `remote_room_devices` and `room_hub_claims`.
//!
//! `notify` from a room's hub lands here: each entry is delivered once (by sequence) to the
//! listed local devices' queues, in the same transaction that records the sequence and the room
//! snapshot. Only a hub that fetched one of our users' KeyPackages for the room (recorded by
//! `key_material` through [`Follower::expect_hub`]) may start notifying us about it. Local
//! clients' messages, commits, proposals and promotions for such rooms are relayed to the hub
//! (`submitMessage`, `update`, `x-parley-promote`) and acknowledged only when the hub accepted
//! them (so they are durable there).

use crate::accounts::AuthDevice;
use crate::clock::now_ms;
use crate::config::ServerConfig;
use crate::consent::Consent;
use crate::delivery::{enqueue, Delivery, Outgoing, Stored};
use crate::error::{ServiceError, ServiceResult};
use crate::hub::{check_expiry_hint, no_consent, Hub};
use crate::peers::{self, hub_garbled, PeerClient};
use crate::store::{Store, StoreError};
use parley_proto::api::{Accepted, EntryKind, RoomInfo, RoomKind};
use parley_proto::ids::DeviceUri;
use parley_proto::mimi::{
    Body, FanoutKind, IdentifierUri, NotifyEntry, NotifyRequest, SubmitMessageRequest,
    SubmitResponse, UpdateRequest, UpdateResponse,
};
use parley_proto::{Domain, RoomId, UserId};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// The Parley extension endpoint a follower uses to relay a promotion to the hub.
pub const PROMOTE: &str = "x-parley-promote";

/// A room hubbed elsewhere, as its hub last described it.
#[derive(Debug, Clone)]
struct RemoteRoom {
    hub: Domain,
    kind: RoomKind,
    name: Option<String>,
    epoch: u64,
    users: Vec<String>,
    admins: Vec<String>,
    last_sequence: u64,
}

impl RemoteRoom {
    fn info(&self, id: &RoomId) -> RoomInfo {
        RoomInfo {
            room_id: id.to_string(),
            room_uri: id.to_uri(&self.hub),
            kind: self.kind,
            name: self.name.clone(),
            epoch: self.epoch,
            members: self.users.clone(),
            admins: self.admins.clone(),
        }
    }
}

pub struct Follower {
    store: Store,
    config: Arc<ServerConfig>,
    delivery: Arc<Delivery>,
    hub: Arc<Hub>,
    consent: Arc<Consent>,
    peers: Option<Arc<PeerClient>>,
    /// Room → hub domain, for rooms this provider follows (filled on first lookup).
    hubs: RwLock<HashMap<RoomId, Domain>>,
}

fn bad_body(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::bad("invalid_body", e.to_string())
}

fn uri_text(u: &IdentifierUri) -> ServiceResult<&str> {
    u.as_str().map_err(bad_body)
}

fn parse_user(s: &str) -> ServiceResult<UserId> {
    UserId::parse(s).map_err(|e| ServiceError::bad("invalid_user", e.to_string()))
}

impl Follower {
    pub fn new(
        store: Store,
        config: Arc<ServerConfig>,
        delivery: Arc<Delivery>,
        hub: Arc<Hub>,
        consent: Arc<Consent>,
        peers: Option<Arc<PeerClient>>,
    ) -> Self {
        Self {
            store,
            config,
            delivery,
            hub,
            consent,
            peers,
            hubs: RwLock::new(HashMap::new()),
        }
    }

    fn peers(&self) -> ServiceResult<&PeerClient> {
        peers::required(self.peers.as_deref())
    }

    /// The hub of a room this provider follows (`None` for rooms hubbed here or unknown).
    pub async fn hub_of(&self, room: &RoomId) -> ServiceResult<Option<Domain>> {
        if let Some(d) = self.hubs.read().ok().and_then(|m| m.get(room).cloned()) {
            return Ok(Some(d));
        }
        let key = room.to_string();
        let hub: Option<String> = self
            .store
            .read(move |c| {
                Ok(c.query_row(
                    "SELECT hub_domain FROM remote_rooms WHERE room_id = ?1",
                    params![key],
                    |r| r.get(0),
                )
                .optional()?)
            })
            .await?;
        let hub = hub.and_then(|h| Domain::parse(&h).ok());
        if let (Some(h), Ok(mut m)) = (&hub, self.hubs.write()) {
            m.insert(room.clone(), h.clone());
        }
        Ok(hub)
    }

    async fn member_room(&self, caller: &AuthDevice, room: &RoomId) -> ServiceResult<RemoteRoom> {
        let (key, device) = (room.to_string(), caller.device.as_str().to_owned());
        let found = self
            .store
            .read(move |c| {
                let member = c
                    .query_row(
                        "SELECT 1 FROM remote_room_devices WHERE room_id = ?1 AND device_id = ?2",
                        params![key, device],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some();
                if !member {
                    return Ok(None);
                }
                load_room(c, &key)
            })
            .await?;
        found.ok_or_else(|| {
            ServiceError::not_found(
                "unknown_room",
                format!("no room {room} that you are a member of"),
            )
        })
    }

    /// Rooms hubbed elsewhere that the calling device is in.
    pub async fn rooms_of(&self, caller: &AuthDevice) -> ServiceResult<Vec<RoomInfo>> {
        let device = caller.device.as_str().to_owned();
        let rooms: Vec<(String, RemoteRoom)> = self
            .store
            .read(move |c| {
                let mut st = c.prepare(
                    "SELECT room_id FROM remote_room_devices WHERE device_id = ?1 ORDER BY room_id",
                )?;
                let ids: Vec<String> = st
                    .query_map(params![device], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                let mut out = Vec::new();
                for id in ids {
                    if let Some(room) = load_room(c, &id)? {
                        out.push((id, room));
                    }
                }
                Ok(out)
            })
            .await?;
        Ok(rooms
            .into_iter()
            .filter_map(|(id, room)| RoomId::parse(&id).ok().map(|id| room.info(&id)))
            .collect())
    }

    pub async fn room_info(&self, caller: &AuthDevice, room: &RoomId) -> ServiceResult<RoomInfo> {
        Ok(self.member_room(caller, room).await?.info(room))
    }

    // --- relaying a local client's traffic to the hub ----------------------------------------

    /// `POST /v1/rooms/{id}/messages` for a room hubbed elsewhere: MIMI `submitMessage`, with
    /// the sender's expiry hint (checked here too, so a bad one never leaves the provider).
    pub async fn relay_send(
        &self,
        caller: &AuthDevice,
        room: &RoomId,
        hub: &Domain,
        message: Vec<u8>,
        expires_at: Option<u64>,
    ) -> ServiceResult<Accepted> {
        let expires_at = check_expiry_hint(&self.config, &caller.user, expires_at, now_ms())?;
        let max = self
            .config
            .domain(caller.user.domain().as_str())
            .map_or(64 * 1024, |d| d.max_message_bytes);
        if message.len() > max {
            return Err(ServiceError::too_large(
                "message_too_large",
                format!("messages are limited to {max} bytes"),
            ));
        }
        let state = self.member_room(caller, room).await?;
        if state.kind == RoomKind::Direct {
            let me = caller.user.to_string();
            for other in state.users.iter().filter(|u| **u != me) {
                if let Ok(other) = UserId::parse(other) {
                    if self.consent.blocked(&caller.user, &other) {
                        return Err(no_consent(&other));
                    }
                }
            }
        }
        let body = SubmitMessageRequest::new(message, &caller.uri().to_string())
            .expiring_at(expires_at)
            .encode();
        let answer = self
            .peers()?
            .call(
                caller.user.domain(),
                hub,
                "submitMessage",
                room.as_str(),
                body,
            )
            .await?;
        match SubmitResponse::decode(&answer).map_err(|e| hub_garbled(hub, e))? {
            SubmitResponse::Accepted {
                accepted_timestamp, ..
            } => Ok(Accepted {
                event: 0,
                ts: accepted_timestamp,
                epoch: state.epoch,
            }),
            SubmitResponse::NotAllowed => Err(ServiceError::forbidden(
                "not_allowed",
                format!("the room's hub {hub} refused the message"),
            )),
            SubmitResponse::EpochTooOld { current_epoch } => Err(ServiceError::wrong_epoch(
                current_epoch,
                current_epoch.saturating_sub(1),
            )),
        }
    }

    /// Commits and proposals for a room hubbed elsewhere: MIMI `update`.
    pub async fn relay_update(
        &self,
        caller: &AuthDevice,
        room: &RoomId,
        hub: &Domain,
        request: UpdateRequest,
    ) -> ServiceResult<Accepted> {
        let state = self.member_room(caller, room).await?;
        let answer = self
            .peers()?
            .call(
                caller.user.domain(),
                hub,
                "update",
                room.as_str(),
                request.encode(),
            )
            .await?;
        match UpdateResponse::decode(&answer).map_err(|e| hub_garbled(hub, e))? {
            UpdateResponse::Success {
                accepted_timestamp, ..
            } => Ok(Accepted {
                event: 0,
                ts: accepted_timestamp,
                epoch: state.epoch,
            }),
            UpdateResponse::WrongEpoch { current_epoch, .. } => Err(ServiceError::wrong_epoch(
                current_epoch,
                state.epoch.min(current_epoch.saturating_sub(1)),
            )),
            UpdateResponse::NotAllowed { error_description } => {
                let (code, message) = split_description(error_description.as_slice());
                Err(ServiceError::forbidden(code, message))
            }
            UpdateResponse::InvalidProposal {
                error_description, ..
            } => {
                let (code, message) = split_description(error_description.as_slice());
                Err(ServiceError::Conflict {
                    code,
                    message,
                    retryable: code == "pending_proposals",
                })
            }
        }
    }

    /// `POST /v1/rooms/{id}/admins` for a room hubbed elsewhere: the Parley extension
    /// `x-parley-promote` to the hub; on success the local snapshot learns the new admin.
    pub async fn relay_promote(
        &self,
        caller: &AuthDevice,
        room: &RoomId,
        hub: &Domain,
        target: &UserId,
    ) -> ServiceResult<RoomInfo> {
        let mut state = self.member_room(caller, room).await?;
        let body = parley_proto::mimi::PromoteRequest {
            requester: IdentifierUri::new(&caller.user.to_uri()),
            target: IdentifierUri::new(&target.to_uri()),
        }
        .encode();
        self.peers()?
            .call(caller.user.domain(), hub, PROMOTE, room.as_str(), body)
            .await?;
        let name = target.to_string();
        if !state.admins.contains(&name) {
            state.admins.push(name);
            state.admins.sort();
            let (key, json) = (
                room.to_string(),
                serde_json::to_string(&state.admins).unwrap_or_else(|_| "[]".into()),
            );
            self.store
                .write(move |c| {
                    c.execute(
                        "UPDATE remote_rooms SET admins = ?2 WHERE room_id = ?1",
                        params![key, json],
                    )?;
                    Ok(())
                })
                .await?;
        }
        Ok(state.info(room))
    }

    // --- notify from the hub ------------------------------------------------------------------

    /// MIMI `notify/{roomId}` from `peer`, the room's hub.
    pub async fn notify(&self, peer: &Domain, room: &str, body: &[u8]) -> ServiceResult<()> {
        let room =
            RoomId::parse(room).map_err(|e| ServiceError::bad("invalid_room", e.to_string()))?;
        let request = NotifyRequest::decode(body).map_err(bad_body)?;
        if self.hub.hosts_room(&room).await? {
            return Err(ServiceError::forbidden(
                "not_hub",
                format!("room {room} is hubbed here, not by {peer}"),
            ));
        }
        let plan = self.plan_notify(peer, &room, request).await?;
        if plan.entries.is_empty() && plan.snapshot.is_none() {
            return Ok(()); // all duplicates
        }
        let push = self.delivery.push.clone();
        let stored = self
            .store
            .write_then(
                move |c| plan.apply(c),
                move |stored: &Vec<Stored>| push.push(stored),
            )
            .await?;
        if let Ok(mut m) = self.hubs.write() {
            m.insert(room.clone(), peer.clone());
        }
        tracing::debug!(%room, hub = %peer, delivered = stored.len(), "notify accepted");
        Ok(())
    }

    /// Remembers that `hub` fetched one of our users' KeyPackages for `room`: it may then start
    /// notifying us about that room (and nobody else may).
    pub async fn expect_hub(&self, room: &RoomId, hub: &Domain) -> ServiceResult<()> {
        if self.config.hosts(hub.as_str()) {
            return Ok(());
        }
        let (room, hub) = (room.to_string(), hub.to_string());
        self.store
            .write(move |c| {
                c.execute(
                    "INSERT OR IGNORE INTO room_hub_claims (room_id, hub_domain, claimed_at) VALUES (?1, ?2, ?3)",
                    params![room, hub, now_ms() as i64],
                )?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    async fn hub_was_expected(&self, room: &RoomId, hub: &Domain) -> ServiceResult<bool> {
        let (room, hub) = (room.to_string(), hub.to_string());
        Ok(self
            .store
            .read(move |c| {
                Ok(c.query_row(
                    "SELECT 1 FROM room_hub_claims WHERE room_id = ?1 AND hub_domain = ?2",
                    params![room, hub],
                    |_| Ok(()),
                )
                .optional()?
                .is_some())
            })
            .await?)
    }

    /// Checks a notify request and works out what to store, without writing anything.
    async fn plan_notify(
        &self,
        peer: &Domain,
        room: &RoomId,
        request: NotifyRequest,
    ) -> ServiceResult<NotifyPlan> {
        let key = room.to_string();
        let existing = self.store.read(move |c| load_room(c, &key)).await?;
        if let Some(existing) = &existing {
            if existing.hub != *peer {
                return Err(ServiceError::forbidden(
                    "not_hub",
                    format!("room {room} is hubbed by {}, not {peer}", existing.hub),
                ));
            }
        }
        if existing.is_none() && !self.hub_was_expected(room, peer).await? {
            return Err(ServiceError::forbidden(
                "not_hub",
                format!("{peer} never claimed key material here for room {room}"),
            ));
        }
        let mut last = existing.as_ref().map_or(0, |r| r.last_sequence);
        let mut known = existing.is_some();
        let mut plan = NotifyPlan {
            room: room.to_string(),
            hub: peer.to_string(),
            entries: Vec::new(),
            snapshot: None,
            last_sequence: last,
            added_devices: Vec::new(),
        };
        for entry in request.entries {
            if entry.sequence <= last {
                continue; // a repeat: accepted and ignored
            }
            let sender = parse_user(uri_text(&entry.sender)?)?;
            if let Some(snapshot) = &entry.room {
                plan.snapshot = Some(self.snapshot_of(snapshot)?);
                known = true;
            }
            if !known {
                return Err(ServiceError::not_found(
                    "unknown_room",
                    format!("no room {room} here; a first notify must carry the room"),
                ));
            }
            let kind = match entry.fanout.kind {
                FanoutKind::Application => EntryKind::Message,
                FanoutKind::Welcome => EntryKind::Welcome,
                FanoutKind::Proposal => EntryKind::Proposal,
                FanoutKind::Commit => EntryKind::Commit,
            };
            let data = Arc::new(entry.fanout.message.as_slice().to_vec());
            let now = now_ms();
            if entry.expiry().is_some_and(|at| at <= now) {
                // An expiring message that spent its life in the hub's outbox: nobody may
                // read it any more, so it is not queued (its sequence still counts).
                tracing::debug!(%room, sequence = entry.sequence, "dropped an expired entry");
                last = entry.sequence;
                plan.last_sequence = last;
                continue;
            }
            for recipient in &entry.recipients {
                let device = DeviceUri::parse(uri_text(recipient)?)
                    .map_err(|e| ServiceError::bad("invalid_uri", e.to_string()))?;
                if !self.config.hosts(device.user.domain().as_str()) {
                    return Err(ServiceError::forbidden(
                        "not_local",
                        format!("{device} is not a client of this provider"),
                    ));
                }
                // Only messages are hidden: handshake messages keep the group state intact.
                if kind == EntryKind::Message && self.consent.blocked(&sender, &device.user) {
                    continue;
                }
                if kind == EntryKind::Welcome {
                    plan.added_devices.push(device.device.as_str().to_owned());
                }
                plan.entries.push(Outgoing {
                    device: device.device.as_str().to_owned(),
                    room_id: room.to_string(),
                    kind,
                    event: entry.event,
                    ts: entry.fanout.timestamp,
                    data: data.clone(),
                    expires_at: self.queue_expiry(&device.user, &entry, now),
                });
            }
            last = entry.sequence;
            plan.last_sequence = last;
        }
        Ok(plan)
    }

    /// When a queue entry made from `entry` for `user` expires: after the retention of the
    /// user's domain, counted from its arrival here, or at the sender's expiry hint if sooner.
    fn queue_expiry(&self, user: &UserId, entry: &NotifyEntry, now: u64) -> u64 {
        let retained = entry
            .fanout
            .timestamp
            .max(now)
            .saturating_add(self.config.retention_ms(user.domain().as_str()));
        entry.expiry().map_or(retained, |hint| hint.min(retained))
    }

    fn snapshot_of(&self, s: &parley_proto::mimi::RoomSnapshot) -> ServiceResult<Snapshot> {
        let users = s
            .users
            .iter()
            .map(|u| uri_text(u).and_then(parse_user).map(|u| u.to_string()))
            .collect::<ServiceResult<Vec<_>>>()?;
        let mut devices = Vec::new();
        for c in &s.local_clients {
            let d = DeviceUri::parse(uri_text(c)?)
                .map_err(|e| ServiceError::bad("invalid_uri", e.to_string()))?;
            if !self.config.hosts(d.user.domain().as_str()) {
                return Err(ServiceError::forbidden(
                    "not_local",
                    format!("{d} is not a client of this provider"),
                ));
            }
            devices.push(d.device.as_str().to_owned());
        }
        let name = match &s.name {
            Some(n) => Some(String::from_utf8(n.as_slice().to_vec()).map_err(bad_body)?),
            None => None,
        };
        Ok(Snapshot {
            kind: if s.kind == 1 { "direct" } else { "group" },
            name,
            creator: parse_user(uri_text(&s.creator)?)?.to_string(),
            epoch: s.epoch,
            users,
            admins: s
                .admins
                .iter()
                .map(|u| uri_text(u).and_then(parse_user).map(|u| u.to_string()))
                .collect::<ServiceResult<Vec<_>>>()?,
            devices,
        })
    }

    /// The local member devices of a room hubbed elsewhere (for ephemeral messages, which
    /// bypass the queues and so this module's notify path).
    pub async fn local_devices(&self, room: &RoomId) -> ServiceResult<Vec<String>> {
        let key = room.to_string();
        Ok(self
            .store
            .read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT device_id FROM remote_room_devices WHERE room_id = ?1",
                )?;
                let rows = st.query_map(params![key], |r| r.get(0))?;
                Ok(rows.collect::<Result<Vec<String>, _>>()?)
            })
            .await?)
    }
}

/// The room state a notify carries, checked.
struct Snapshot {
    kind: &'static str,
    name: Option<String>,
    creator: String,
    epoch: u64,
    users: Vec<String>,
    admins: Vec<String>,
    devices: Vec<String>,
}

/// What one notify request stores, in one transaction.
struct NotifyPlan {
    room: String,
    hub: String,
    entries: Vec<Outgoing>,
    snapshot: Option<Snapshot>,
    last_sequence: u64,
    added_devices: Vec<String>,
}

impl NotifyPlan {
    fn apply(self, c: &Connection) -> Result<Vec<Stored>, StoreError> {
        if let Some(s) = &self.snapshot {
            let users =
                serde_json::to_string(&s.users).map_err(|e| StoreError::Task(e.to_string()))?;
            let admins =
                serde_json::to_string(&s.admins).map_err(|e| StoreError::Task(e.to_string()))?;
            c.execute(
                "INSERT INTO remote_rooms (room_id, hub_domain, kind, name, creator, epoch, users, last_sequence, admins)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8)
                 ON CONFLICT (room_id) DO UPDATE SET kind = excluded.kind, name = excluded.name,
                   creator = excluded.creator, epoch = excluded.epoch, users = excluded.users,
                   admins = excluded.admins",
                params![self.room, self.hub, s.kind, s.name, s.creator, s.epoch as i64, users, admins],
            )?;
            c.execute(
                "DELETE FROM remote_room_devices WHERE room_id = ?1",
                params![self.room],
            )?;
            let mut st = c.prepare_cached(
                "INSERT OR IGNORE INTO remote_room_devices (room_id, device_id) VALUES (?1, ?2)",
            )?;
            for d in &s.devices {
                st.execute(params![self.room, d])?;
            }
        }
        let mut st = c.prepare_cached(
            "INSERT OR IGNORE INTO remote_room_devices (room_id, device_id) VALUES (?1, ?2)",
        )?;
        for d in &self.added_devices {
            st.execute(params![self.room, d])?;
        }
        c.execute(
            "UPDATE remote_rooms SET last_sequence = MAX(last_sequence, ?2) WHERE room_id = ?1",
            params![self.room, self.last_sequence as i64],
        )?;
        enqueue(c, &self.entries)
    }
}

fn load_room(c: &Connection, room: &str) -> Result<Option<RemoteRoom>, StoreError> {
    type Row = (String, String, Option<String>, i64, String, i64, String);
    let row: Option<Row> = c
        .query_row(
            "SELECT hub_domain, kind, name, epoch, users, last_sequence, admins FROM remote_rooms WHERE room_id = ?1",
            params![room],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
        )
        .optional()?;
    let Some((hub, kind, name, epoch, users, last, admins)) = row else {
        return Ok(None);
    };
    let corrupt =
        |what: &str| StoreError::Task(format!("remote room {room}: stored {what} is corrupt"));
    Ok(Some(RemoteRoom {
        hub: Domain::parse(&hub).map_err(|_| corrupt("hub"))?,
        kind: RoomKind::parse(&kind).ok_or_else(|| corrupt("kind"))?,
        name,
        epoch: epoch as u64,
        users: serde_json::from_str(&users).map_err(|_| corrupt("users"))?,
        admins: serde_json::from_str(&admins).map_err(|_| corrupt("admins"))?,
        last_sequence: last as u64,
    }))
}

/// `"code: message"` (how Parley hubs describe refusals) into its parts.
fn split_description(desc: &[u8]) -> (&'static str, String) {
    let text = String::from_utf8_lossy(desc).into_owned();
    let code = match text.split_once(':').map(|(c, _)| c.trim()) {
        Some("pending_proposals") => "pending_proposals",
        Some("policy") => "policy",
        Some("not_committer") => "not_committer",
        Some("not_proposer") => "not_proposer",
        Some("unknown_device") => "unknown_device",
        Some("room_full") => "room_full",
        Some("no_consent") => "no_consent",
        _ => "not_allowed",
    };
    (code, text)
}
