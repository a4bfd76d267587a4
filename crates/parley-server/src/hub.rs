//! The hub: owns the rooms this provider created. It orders each room's handshake messages,
//! follows the group's public state, enforces room policy, and fans every message out to the
//! queues of the room's member devices, and nobody else. Owns `rooms` and `room_members`.

use crate::accounts::{Accounts, AuthDevice};
use crate::config::ServerConfig;
use crate::delivery::{enqueue, Delivery, Outgoing, Stored};
use crate::error::{ServiceError, ServiceResult};
use crate::limits::RateLimiter;
use crate::mls::{application_header, check_welcome, message_epoch, LeafDevice, PublicState};
use crate::now_ms;
use crate::store::{Store, StoreError};
use parley_proto::api::{Accepted, CreateRoomRequest, EntryKind, RoomInfo, RoomKind};
use parley_proto::{RoomId, UserId};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::RwLock;

const MAX_ROOM_NAME: usize = 128;
const DAY_MS: u64 = 86_400_000;

/// A member device of a room.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MemberDevice {
    device: String,
    user: UserId,
}

impl From<&LeafDevice> for MemberDevice {
    fn from(leaf: &LeafDevice) -> Self {
        Self {
            device: leaf.device.device.as_str().to_owned(),
            user: leaf.device.user.clone(),
        }
    }
}

/// What the hub keeps in memory about one room (mirrors its `rooms` row).
struct RoomState {
    id: RoomId,
    hub_domain: String,
    kind: RoomKind,
    name: Option<String>,
    creator: UserId,
    direct_peer: Option<UserId>,
    epoch: u64,
    next_event: AtomicU64,
    members: Vec<MemberDevice>,
    public: PublicState,
}

impl RoomState {
    /// Refuses (retryably) an MLS message built for another epoch than the room's.
    fn check_epoch(&self, message_epoch: Option<u64>) -> ServiceResult<()> {
        match message_epoch {
            Some(epoch) if epoch != self.epoch => Err(ServiceError::wrong_epoch(self.epoch, epoch)),
            _ => Ok(()),
        }
    }

    /// `(device, user)` rows for `room_members`.
    fn member_rows(&self) -> Vec<(String, String)> {
        member_rows(&self.members)
    }

    fn require_member(&self, caller: &AuthDevice) -> ServiceResult<()> {
        if self.is_member(caller.device.as_str()) {
            Ok(())
        } else {
            Err(unknown_room(&self.id))
        }
    }

    fn is_member(&self, device: &str) -> bool {
        self.members.iter().any(|m| m.device == device)
    }

    fn info(&self) -> RoomInfo {
        let users: BTreeSet<String> = self.members.iter().map(|m| m.user.to_string()).collect();
        RoomInfo {
            room_id: self.id.to_string(),
            room_uri: self.id.to_uri(
                &parley_proto::Domain::parse(&self.hub_domain)
                    .unwrap_or_else(|_| self.creator.domain().clone()),
            ),
            kind: self.kind,
            name: self.name.clone(),
            epoch: self.epoch,
            members: users.into_iter().collect(),
        }
    }
}

type RoomHandle = Arc<RwLock<RoomState>>;

pub struct Hub {
    store: Store,
    accounts: Arc<Accounts>,
    delivery: Arc<Delivery>,
    config: Arc<ServerConfig>,
    rooms: Mutex<HashMap<RoomId, RoomHandle>>,
    sends: RateLimiter,
    pub counters: HubCounters,
}

/// Totals for `/metrics`.
#[derive(Default)]
pub struct HubCounters {
    pub messages: AtomicU64,
    pub commits: AtomicU64,
    pub queued: AtomicU64,
}

fn parse_room(room: &str) -> ServiceResult<RoomId> {
    RoomId::parse(room).map_err(|e| ServiceError::bad("invalid_room", e.to_string()))
}

fn unknown_room(room: &RoomId) -> ServiceError {
    ServiceError::not_found(
        "unknown_room",
        format!("no room {room} that you are a member of"),
    )
}

impl Hub {
    pub fn new(
        store: Store,
        accounts: Arc<Accounts>,
        delivery: Arc<Delivery>,
        config: Arc<ServerConfig>,
    ) -> Self {
        let limits = &config.limits;
        Self {
            sends: RateLimiter::new(limits.messages_per_second, limits.message_burst),
            store,
            accounts,
            delivery,
            config,
            rooms: Mutex::new(HashMap::new()),
            counters: HubCounters::default(),
        }
    }

    fn expiry_for(&self, user: &UserId, now: u64) -> u64 {
        let days = self
            .config
            .domain(user.domain().as_str())
            .map_or(30, |d| d.retention_days);
        now.saturating_add(days.saturating_mul(DAY_MS))
    }

    fn check_rate(&self, caller: &AuthDevice) -> ServiceResult<()> {
        if self.sends.allow(caller.device.as_str()) {
            Ok(())
        } else {
            Err(ServiceError::RateLimited(
                "this device is sending too fast; slow down and retry".into(),
            ))
        }
    }

    /// Finds a room in memory, loading it from the database on first use.
    async fn room(&self, id: &RoomId) -> ServiceResult<Option<RoomHandle>> {
        if let Some(h) = self.rooms.lock().ok().and_then(|r| r.get(id).cloned()) {
            return Ok(Some(h));
        }
        let key = id.as_str().to_owned();
        let loaded = self.store.read(move |c| load_room(c, &key)).await?;
        let Some(state) = loaded else {
            return Ok(None);
        };
        Ok(Some(self.cache_room(id, state)?))
    }

    /// Puts a room into the in-memory cache (another request's copy wins if it got there first),
    /// first evicting idle rooms when the cache is full. Evicting is safe: every change is in the
    /// database before it is in memory, and a room in use (its handle held elsewhere) is kept.
    fn cache_room(&self, id: &RoomId, state: RoomState) -> ServiceResult<RoomHandle> {
        let mut rooms = self
            .rooms
            .lock()
            .map_err(|_| ServiceError::Internal("room map poisoned".into()))?;
        let limit = self.config.limits.max_cached_rooms.max(1);
        if rooms.len() >= limit && !rooms.contains_key(id) {
            let idle: Vec<RoomId> = rooms
                .iter()
                .filter(|(_, handle)| Arc::strong_count(handle) == 1)
                .map(|(k, _)| k.clone())
                .take(rooms.len() + 1 - limit)
                .collect();
            for k in idle {
                rooms.remove(&k);
            }
        }
        Ok(rooms
            .entry(id.clone())
            .or_insert_with(|| Arc::new(RwLock::new(state)))
            .clone())
    }

    async fn member_room(&self, caller: &AuthDevice, room: &str) -> ServiceResult<RoomHandle> {
        let id = parse_room(room)?;
        let handle = self.room(&id).await?.ok_or_else(|| unknown_room(&id))?;
        if !handle.read().await.is_member(caller.device.as_str()) {
            return Err(unknown_room(&id));
        }
        Ok(handle)
    }

    /// `POST /v1/rooms`.
    pub async fn create_room(
        &self,
        caller: &AuthDevice,
        req: CreateRoomRequest,
    ) -> ServiceResult<RoomInfo> {
        let id = parse_room(&req.room_id)?;
        if let Some(name) = &req.name {
            if name.chars().count() > MAX_ROOM_NAME || name.chars().any(char::is_control) {
                return Err(ServiceError::bad(
                    "invalid_name",
                    format!("room names are at most {MAX_ROOM_NAME} printable characters"),
                ));
            }
        }
        let direct_peer = match (req.kind, &req.peer) {
            (RoomKind::Direct, Some(peer)) => {
                let peer = UserId::parse(peer)
                    .map_err(|e| ServiceError::bad("invalid_user", e.to_string()))?;
                if peer == caller.user {
                    return Err(ServiceError::bad(
                        "invalid_peer",
                        "a direct room needs another user",
                    ));
                }
                self.accounts.devices(&peer).await?; // 404 if unknown
                Some(peer)
            }
            (RoomKind::Direct, None) => {
                return Err(ServiceError::bad(
                    "invalid_peer",
                    "a direct room needs a peer",
                ));
            }
            (RoomKind::Group, _) => None,
        };
        let (public, epoch, members) = PublicState::create(&req.group_info, &req.ratchet_tree)
            .map_err(|e| ServiceError::bad("invalid_group_info", e.to_string()))?;
        if public.group_id_bytes() != id.group_id_bytes() || epoch != 0 {
            return Err(ServiceError::bad(
                "invalid_group_info",
                "the group id must be the room id and the group at epoch 0",
            ));
        }
        let registered = self.accounts.device_key(&caller.uri()).await?;
        let only_caller = members.len() == 1
            && members[0].device == caller.uri()
            && Some(&members[0].signature_key) == registered.as_ref();
        if !only_caller {
            return Err(ServiceError::bad(
                "invalid_group_info",
                "a new room's group must hold exactly the creating device, with its registered key",
            ));
        }
        let state = RoomState {
            id: id.clone(),
            hub_domain: caller.user.domain().to_string(),
            kind: req.kind,
            name: req.name,
            creator: caller.user.clone(),
            direct_peer,
            epoch: 0,
            next_event: AtomicU64::new(1),
            members: members.iter().map(MemberDevice::from).collect(),
            public,
        };
        let row = RoomRow::of(&state)?;
        let created = self.store.write(move |c| insert_room(c, &row)).await?;
        if !created {
            return Err(ServiceError::conflict(
                "room_exists",
                format!("room {id} already exists"),
            ));
        }
        let info = state.info();
        self.cache_room(&id, state)?;
        tracing::info!(room = %info.room_id, kind = info.kind.as_str(), creator = %caller.user, "room created");
        Ok(info)
    }

    /// `GET /v1/rooms`: the rooms the calling device is a member of.
    pub async fn rooms_of(&self, caller: &AuthDevice) -> ServiceResult<Vec<RoomInfo>> {
        let device = caller.device.as_str().to_owned();
        let ids: Vec<String> = self
            .store
            .read(move |c| {
                let mut st = c.prepare(
                    "SELECT room_id FROM room_members WHERE device_id = ?1 ORDER BY room_id",
                )?;
                let rows = st.query_map(params![device], |r| r.get(0))?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Ok(handle) = self.member_room(caller, &id).await {
                out.push(handle.read().await.info());
            }
        }
        Ok(out)
    }

    /// `GET /v1/rooms/{id}`.
    pub async fn room_info(&self, caller: &AuthDevice, room: &str) -> ServiceResult<RoomInfo> {
        Ok(self.member_room(caller, room).await?.read().await.info())
    }

    /// `POST /v1/rooms/{id}/commits`.
    pub async fn commit(
        &self,
        caller: &AuthDevice,
        room: &str,
        commit: Vec<u8>,
        welcome: Option<Vec<u8>>,
    ) -> ServiceResult<Accepted> {
        self.check_rate(caller)?;
        let handle = self.member_room(caller, room).await?;
        let mut state = handle.write().await;
        state.require_member(caller)?;
        state.check_epoch(message_epoch(&commit))?;
        let effect = state
            .public
            .apply_commit(&commit)
            .map_err(|e| ServiceError::bad("invalid_commit", e.to_string()))?;
        if effect.committer != caller.uri() {
            return Err(ServiceError::forbidden(
                "not_committer",
                "the commit must be signed by the device sending it",
            ));
        }
        if effect.misses_pending {
            return Err(ServiceError::Conflict {
                code: "pending_proposals",
                message: "a member asked to leave: sync, then commit again including that proposal"
                    .into(),
                retryable: true,
            });
        }
        if effect.has_other_proposals {
            return Err(ServiceError::forbidden(
                "policy",
                "only add, remove and update proposals are allowed",
            ));
        }
        self.check_added_devices(&effect.added).await?;
        self.check_policy(&state, &effect.members, !effect.removed.is_empty())?;
        match (&welcome, effect.added.is_empty()) {
            (None, false) => {
                return Err(ServiceError::bad(
                    "missing_welcome",
                    "a commit that adds devices needs a Welcome",
                ))
            }
            (Some(w), false) => {
                check_welcome(w).map_err(|e| ServiceError::bad("invalid_welcome", e.to_string()))?
            }
            (Some(_), true) => {
                return Err(ServiceError::bad(
                    "invalid_welcome",
                    "a Welcome without added devices",
                ))
            }
            (None, true) => {}
        }

        let ts = now_ms();
        let event = state.next_event.fetch_add(1, Ordering::SeqCst);
        let mut outgoing = self.fan_out(
            &state,
            caller,
            EntryKind::Commit,
            event,
            ts,
            Arc::new(commit),
        );
        if let Some(welcome) = welcome {
            let welcome = Arc::new(welcome);
            outgoing.extend(effect.added.iter().map(|leaf| Outgoing {
                device: leaf.device.device.as_str().to_owned(),
                room_id: state.id.to_string(),
                kind: EntryKind::Welcome,
                event,
                ts,
                data: welcome.clone(),
                expires_at: self.expiry_for(&leaf.device.user, ts),
            }));
        }
        let members: Vec<MemberDevice> = effect.members.iter().map(MemberDevice::from).collect();
        let update = RoomUpdate {
            room_id: state.id.to_string(),
            epoch: effect.epoch,
            next_event: event + 1,
            public_state: effect
                .next
                .encode()
                .map_err(|e| ServiceError::Internal(e.to_string()))?,
            members: member_rows(&members),
        };
        self.persist(RoomWrite::State(update), outgoing).await?;
        state.epoch = effect.epoch;
        state.members = members;
        state.public = effect.next;
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        tracing::info!(room = %state.id, epoch = state.epoch, added = effect.added.len(), removed = effect.removed.len(), "commit accepted");
        Ok(Accepted {
            event,
            ts,
            epoch: state.epoch,
        })
    }

    /// `POST /v1/rooms/{id}/proposals`: a member leaves. The hub verifies the self-removal,
    /// keeps it in the room's public state (the next commit must include it) and queues it for
    /// the other members, whose clients then commit it.
    pub async fn leave(
        &self,
        caller: &AuthDevice,
        room: &str,
        proposal: Vec<u8>,
    ) -> ServiceResult<Accepted> {
        self.check_rate(caller)?;
        let handle = self.member_room(caller, room).await?;
        let state = handle.write().await;
        state.require_member(caller)?;
        if state.kind == RoomKind::Direct {
            return Err(ServiceError::forbidden(
                "policy",
                "a direct room has fixed membership",
            ));
        }
        state.check_epoch(message_epoch(&proposal))?;
        let effect = state
            .public
            .apply_leave(&proposal)
            .map_err(|e| ServiceError::forbidden("policy", e.to_string()))?;
        if effect.leaver != caller.uri() {
            return Err(ServiceError::forbidden(
                "not_proposer",
                "the proposal must be signed by the device sending it",
            ));
        }
        if effect.remaining == 0 {
            return Err(ServiceError::forbidden(
                "policy",
                "the last member cannot leave: nobody would remain to commit it",
            ));
        }
        let ts = now_ms();
        if effect.repeated {
            // A resend after a lost answer: already queued for everyone, nothing to do.
            return Ok(Accepted {
                event: state.next_event.load(Ordering::SeqCst).saturating_sub(1),
                ts,
                epoch: state.epoch,
            });
        }
        let event = state.next_event.fetch_add(1, Ordering::SeqCst);
        let outgoing = self.fan_out(
            &state,
            caller,
            EntryKind::Proposal,
            event,
            ts,
            Arc::new(proposal),
        );
        let update = RoomUpdate {
            room_id: state.id.to_string(),
            epoch: state.epoch,
            next_event: event + 1,
            public_state: effect
                .next
                .encode()
                .map_err(|e| ServiceError::Internal(e.to_string()))?,
            members: state.member_rows(),
        };
        self.persist(RoomWrite::State(update), outgoing).await?;
        let mut state = state;
        state.public = effect.next;
        tracing::info!(room = %state.id, leaver = %caller.uri(), "leave proposed");
        Ok(Accepted {
            event,
            ts,
            epoch: state.epoch,
        })
    }

    /// Durably records a room change with its queue entries, then pushes them (in commit order).
    async fn persist(&self, write: RoomWrite, outgoing: Vec<Outgoing>) -> ServiceResult<()> {
        let push = self.delivery.push.clone();
        let stored = self
            .store
            .write_then(
                move |c| {
                    write.apply(c)?;
                    enqueue(c, &outgoing)
                },
                move |stored: &Vec<Stored>| push.push(stored),
            )
            .await?;
        self.counters
            .queued
            .fetch_add(stored.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// One queue entry per member device except the sender's.
    fn fan_out(
        &self,
        state: &RoomState,
        sender: &AuthDevice,
        kind: EntryKind,
        event: u64,
        ts: u64,
        data: Arc<Vec<u8>>,
    ) -> Vec<Outgoing> {
        state
            .members
            .iter()
            .filter(|m| m.device != sender.device.as_str())
            .map(|m| Outgoing {
                device: m.device.clone(),
                room_id: state.id.to_string(),
                kind,
                event,
                ts,
                data: data.clone(),
                expires_at: self.expiry_for(&m.user, ts),
            })
            .collect()
    }

    /// Every added KeyPackage must belong to a registered device with the key it registered.
    async fn check_added_devices(&self, added: &[LeafDevice]) -> ServiceResult<()> {
        for leaf in added {
            let key = self.accounts.device_key(&leaf.device).await?;
            if key.as_deref() != Some(leaf.signature_key.as_slice()) {
                return Err(ServiceError::forbidden(
                    "unknown_device",
                    format!("{} is not a registered device with that key", leaf.device),
                ));
            }
        }
        Ok(())
    }

    fn check_policy(
        &self,
        state: &RoomState,
        members: &[LeafDevice],
        removes: bool,
    ) -> ServiceResult<()> {
        let max = self
            .config
            .domain(&state.hub_domain)
            .map_or(1000, |d| d.max_room_devices);
        if members.len() > max {
            return Err(ServiceError::forbidden(
                "room_full",
                format!("this room may hold at most {max} devices"),
            ));
        }
        if state.kind == RoomKind::Direct {
            if removes {
                return Err(ServiceError::forbidden(
                    "policy",
                    "a direct room has fixed membership",
                ));
            }
            let allowed = |u: &UserId| *u == state.creator || Some(u) == state.direct_peer.as_ref();
            if let Some(intruder) = members.iter().find(|m| !allowed(&m.device.user)) {
                return Err(ServiceError::forbidden(
                    "policy",
                    format!(
                        "a direct room holds only its two users, not {}",
                        intruder.device.user
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `POST /v1/rooms/{id}/messages`.
    pub async fn send(
        &self,
        caller: &AuthDevice,
        room: &str,
        message: Vec<u8>,
    ) -> ServiceResult<Accepted> {
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
        self.check_rate(caller)?;
        let header = application_header(&message)
            .map_err(|e| ServiceError::bad("invalid_message", e.to_string()))?;
        if header.room.as_str() != room {
            return Err(ServiceError::bad(
                "invalid_message",
                "the message is for another room",
            ));
        }
        let handle = self.member_room(caller, room).await?;
        // Read lock: messages of one room proceed concurrently, but never across a commit.
        let state = handle.read().await;
        state.require_member(caller)?; // again under the lock: a commit may have removed it
        state.check_epoch(Some(header.epoch))?;
        let ts = now_ms();
        let event = state.next_event.fetch_add(1, Ordering::SeqCst);
        let outgoing = self.fan_out(
            &state,
            caller,
            EntryKind::Message,
            event,
            ts,
            Arc::new(message),
        );
        let write = RoomWrite::Event {
            room_id: room.to_owned(),
            next_event: event + 1,
        };
        self.persist(write, outgoing).await?;
        self.counters.messages.fetch_add(1, Ordering::Relaxed);
        Ok(Accepted {
            event,
            ts,
            epoch: state.epoch,
        })
    }
}

/// A room's database row, as written at creation.
struct RoomRow {
    room_id: String,
    hub_domain: String,
    kind: &'static str,
    name: Option<String>,
    creator: String,
    direct_peer: Option<String>,
    public_state: Vec<u8>,
    members: Vec<(String, String)>,
}

impl RoomRow {
    fn of(s: &RoomState) -> ServiceResult<Self> {
        Ok(Self {
            room_id: s.id.to_string(),
            hub_domain: s.hub_domain.clone(),
            kind: s.kind.as_str(),
            name: s.name.clone(),
            creator: s.creator.to_string(),
            direct_peer: s.direct_peer.as_ref().map(ToString::to_string),
            public_state: s
                .public
                .encode()
                .map_err(|e| ServiceError::Internal(e.to_string()))?,
            members: s.member_rows(),
        })
    }
}

fn insert_room(c: &Connection, r: &RoomRow) -> Result<bool, StoreError> {
    let inserted = c.execute(
        "INSERT OR IGNORE INTO rooms (room_id, hub_domain, kind, name, creator, direct_peer, epoch, next_event, public_state, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, 1, ?7, ?8)",
        params![r.room_id, r.hub_domain, r.kind, r.name, r.creator, r.direct_peer, r.public_state, now_ms() as i64],
    )?;
    if inserted == 0 {
        return Ok(false);
    }
    replace_members(c, &r.room_id, &r.members)?;
    Ok(true)
}

fn replace_members(
    c: &Connection,
    room: &str,
    members: &[(String, String)],
) -> Result<(), StoreError> {
    c.execute("DELETE FROM room_members WHERE room_id = ?1", params![room])?;
    let mut st = c.prepare_cached(
        "INSERT INTO room_members (room_id, device_id, user_id) VALUES (?1, ?2, ?3)",
    )?;
    for (device, user) in members {
        st.execute(params![room, device, user])?;
    }
    Ok(())
}

/// What an accepted event changes in the `rooms` table besides queue entries.
enum RoomWrite {
    /// A commit or a leave: new public state (and for a commit, epoch and members).
    State(RoomUpdate),
    /// An application message: only the room's event counter moves.
    Event { room_id: String, next_event: u64 },
}

impl RoomWrite {
    fn apply(&self, c: &Connection) -> Result<(), StoreError> {
        match self {
            RoomWrite::State(update) => update.apply(c),
            RoomWrite::Event {
                room_id,
                next_event,
            } => {
                c.prepare_cached(
                    "UPDATE rooms SET next_event = MAX(next_event, ?2) WHERE room_id = ?1",
                )?
                .execute(params![room_id, *next_event as i64])?;
                Ok(())
            }
        }
    }
}

fn member_rows(members: &[MemberDevice]) -> Vec<(String, String)> {
    members
        .iter()
        .map(|m| (m.device.clone(), m.user.to_string()))
        .collect()
}

/// The durable effect of an accepted commit.
struct RoomUpdate {
    room_id: String,
    epoch: u64,
    next_event: u64,
    public_state: Vec<u8>,
    members: Vec<(String, String)>,
}

impl RoomUpdate {
    fn apply(&self, c: &Connection) -> Result<(), StoreError> {
        c.execute(
            "UPDATE rooms SET epoch = ?2, next_event = MAX(next_event, ?3), public_state = ?4 WHERE room_id = ?1",
            params![self.room_id, self.epoch as i64, self.next_event as i64, self.public_state],
        )?;
        replace_members(c, &self.room_id, &self.members)
    }
}

fn load_room(c: &Connection, room: &str) -> Result<Option<RoomState>, StoreError> {
    type Row = (
        String,
        String,
        Option<String>,
        String,
        Option<String>,
        i64,
        i64,
        Vec<u8>,
    );
    let row: Option<Row> = c
        .query_row(
            "SELECT hub_domain, kind, name, creator, direct_peer, epoch, next_event, public_state
             FROM rooms WHERE room_id = ?1",
            params![room],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            },
        )
        .optional()?;
    let Some((hub_domain, kind, name, creator, peer, epoch, next_event, public)) = row else {
        return Ok(None);
    };
    let corrupt = |what: &str| StoreError::Task(format!("room {room}: stored {what} is corrupt"));
    let mut st = c.prepare("SELECT device_id, user_id FROM room_members WHERE room_id = ?1")?;
    let members = st
        .query_map(params![room], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|(device, user)| UserId::parse(&user).map(|user| MemberDevice { device, user }))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| corrupt("member"))?;
    Ok(Some(RoomState {
        id: RoomId::parse(room).map_err(|_| corrupt("id"))?,
        hub_domain,
        kind: RoomKind::parse(&kind).ok_or_else(|| corrupt("kind"))?,
        name,
        creator: UserId::parse(&creator).map_err(|_| corrupt("creator"))?,
        direct_peer: peer
            .map(|p| UserId::parse(&p))
            .transpose()
            .map_err(|_| corrupt("peer"))?,
        epoch: epoch as u64,
        next_event: AtomicU64::new(next_event as u64),
        members,
        public: PublicState::decode(&public).map_err(|_| corrupt("group state"))?,
    }))
}
