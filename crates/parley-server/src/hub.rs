//! The hub: owns the rooms this provider created. It orders each room's handshake messages,
//! follows the group's public state, enforces room policy, and fans every message out to the
//! queues of the room's member devices, and nobody else. Owns `rooms` and `room_members`.

use crate::accounts::{Accounts, AuthDevice};
use crate::clock::now_ms;
use crate::config::ServerConfig;
use crate::consent::Consent;
use crate::delivery::{enqueue, Delivery, Outgoing, Stored};
use crate::error::{ServiceError, ServiceResult};
use crate::limits::RateLimiter;
use crate::mls::{
    application_header, check_welcome, message_epoch, CommitEffect, LeafDevice, PublicState,
};
use crate::outbox::{self, Outbox, OutboxItem};
use crate::store::{Store, StoreError};
use parley_proto::api::{Accepted, CreateRoomRequest, EntryKind, RoomInfo, RoomKind};
use parley_proto::ids::DeviceUri;
use parley_proto::mimi::{
    Body, FanoutKind, FanoutMessage, IdentifierUri, NotifyEntry, RoomSnapshot, NO_EXPIRY,
};
use parley_proto::{Domain, RoomId, UserId};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::RwLock;

const MAX_ROOM_NAME: usize = 128;

/// A member device of a room.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MemberDevice {
    device: String,
    user: UserId,
}

impl MemberDevice {
    fn is(&self, device: &DeviceUri) -> bool {
        self.device == device.device.as_str() && self.user == device.user
    }

    fn uri(&self) -> String {
        format!(
            "mimi://{}/d/{}/{}",
            self.user.domain(),
            self.user.handle().as_str(),
            self.device
        )
    }
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
    /// Users who may add, remove and promote (room policy); empty for direct rooms.
    admins: BTreeSet<UserId>,
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
        if self.is_member(&caller.uri()) {
            Ok(())
        } else {
            Err(unknown_room(&self.id))
        }
    }

    fn is_member(&self, device: &DeviceUri) -> bool {
        self.members.iter().any(|m| m.is(device))
    }

    /// The other user of a direct room, seen from `user`.
    fn direct_other(&self, user: &UserId) -> Option<&UserId> {
        if self.kind != RoomKind::Direct {
            return None;
        }
        if *user == self.creator {
            self.direct_peer.as_ref()
        } else {
            Some(&self.creator)
        }
    }

    /// What followers at `domain` are told about the room (with `members` as its devices).
    fn snapshot(&self, members: &[MemberDevice], domain: &str) -> RoomSnapshot {
        let users: BTreeSet<String> = members.iter().map(|m| m.user.to_uri()).collect();
        RoomSnapshot {
            kind: u8::from(self.kind == RoomKind::Direct),
            name: self.name.as_ref().map(|n| n.as_bytes().to_vec().into()),
            creator: IdentifierUri::new(&self.creator.to_uri()),
            epoch: self.epoch,
            users: users.iter().map(|u| IdentifierUri::new(u)).collect(),
            local_clients: members
                .iter()
                .filter(|m| m.user.domain().as_str() == domain)
                .map(|m| IdentifierUri::new(&m.uri()))
                .collect(),
            admins: self
                .admins
                .iter()
                .map(|u| IdentifierUri::new(&u.to_uri()))
                .collect(),
        }
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
            admins: self.admins.iter().map(ToString::to_string).collect(),
        }
    }

    fn admins_json(&self) -> String {
        admins_json(&self.admins)
    }

    /// Room policy for a group room's commit: adding a user who is not in the room yet, or
    /// removing another user's devices (other than ones that asked to leave), takes an admin.
    /// Anyone may add devices of users already in the room (their new devices) and remove their
    /// own devices.
    fn check_roles(&self, effect: &CommitEffect) -> ServiceResult<()> {
        if self.kind != RoomKind::Group || self.admins.contains(&effect.committer.user) {
            return Ok(());
        }
        let present: BTreeSet<&UserId> = self.members.iter().map(|m| &m.user).collect();
        if let Some(newcomer) = effect
            .added
            .iter()
            .find(|l| !present.contains(&l.device.user))
        {
            return Err(not_admin(format!(
                "only an admin may add {} to this room",
                newcomer.device.user
            )));
        }
        let removes_other = effect
            .removed
            .iter()
            .filter(|d| !effect.left.contains(d))
            .find(|d| d.user != effect.committer.user);
        if let Some(other) = removes_other {
            return Err(not_admin(format!(
                "only an admin may remove {} from this room",
                other.user
            )));
        }
        Ok(())
    }

    /// Admins after a commit leaves `members`: departed users lose the role, and a group is never
    /// left without an admin (if the last one left, every remaining user becomes one).
    fn admins_after(&self, members: &[MemberDevice]) -> BTreeSet<UserId> {
        if self.kind != RoomKind::Group {
            return BTreeSet::new();
        }
        let users: BTreeSet<UserId> = members.iter().map(|m| m.user.clone()).collect();
        let kept: BTreeSet<UserId> = self.admins.intersection(&users).cloned().collect();
        if kept.is_empty() {
            users
        } else {
            kept
        }
    }
}

fn admins_json(admins: &BTreeSet<UserId>) -> String {
    let list: Vec<String> = admins.iter().map(ToString::to_string).collect();
    serde_json::to_string(&list).unwrap_or_else(|_| "[]".into())
}

fn not_admin(message: String) -> ServiceError {
    ServiceError::forbidden("not_admin", message)
}

type RoomHandle = Arc<RwLock<RoomState>>;

/// Who hands the hub a handshake message: a local client, or a peer provider relaying one of
/// its users' (the signer must then belong to that peer's domain).
pub enum Origin {
    Client(AuthDevice),
    Peer(Domain),
}

impl Origin {
    /// Whether this origin may submit something signed by `signer`.
    fn may_speak_for(&self, signer: &DeviceUri) -> bool {
        match self {
            Origin::Client(caller) => *signer == caller.uri(),
            Origin::Peer(domain) => signer.user.domain() == domain,
        }
    }
}

/// One accepted event on its way out: what fan-out queues for devices and notifies to peers.
struct EventOut {
    kind: FanoutKind,
    /// The room's event number.
    event: u64,
    /// The hub's acceptance time.
    ts: u64,
    data: Arc<Vec<u8>>,
    /// The sender's expiry hint (an expiring message), already checked.
    expires_at: Option<u64>,
}

/// Everything one accepted event sends: local queue entries and notify rows for peers.
#[derive(Default)]
struct Fanout {
    local: Vec<Outgoing>,
    remote: Vec<OutboxItem>,
}

pub struct Hub {
    store: Store,
    accounts: Arc<Accounts>,
    delivery: Arc<Delivery>,
    config: Arc<ServerConfig>,
    outbox: Arc<Outbox>,
    consent: Arc<Consent>,
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
    pub abuse_reports: AtomicU64,
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
        outbox: Arc<Outbox>,
        consent: Arc<Consent>,
    ) -> Self {
        let limits = &config.limits;
        Self {
            sends: RateLimiter::new(limits.messages_per_second, limits.message_burst),
            store,
            accounts,
            delivery,
            config,
            outbox,
            consent,
            rooms: Mutex::new(HashMap::new()),
            counters: HubCounters::default(),
        }
    }

    fn expiry_for(&self, user: &UserId, now: u64) -> u64 {
        now.saturating_add(self.config.retention_ms(user.domain().as_str()))
    }

    fn check_rate(&self, sender: &DeviceUri) -> ServiceResult<()> {
        if self.sends.allow(&sender.to_string()) {
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
        if !handle.read().await.is_member(&caller.uri()) {
            return Err(unknown_room(&id));
        }
        Ok(handle)
    }

    /// The room as the target of a handshake message from `origin`.
    async fn origin_room(&self, origin: &Origin, room: &str) -> ServiceResult<RoomHandle> {
        match origin {
            Origin::Client(caller) => self.member_room(caller, room).await,
            Origin::Peer(_) => {
                let id = parse_room(room)?;
                self.room(&id).await?.ok_or_else(|| unknown_room(&id))
            }
        }
    }

    /// Whether this provider is the hub of `room`.
    pub async fn hosts_room(&self, room: &RoomId) -> ServiceResult<bool> {
        Ok(self.room(room).await?.is_some())
    }

    /// The hub domain of a room hubbed here, if `room` is one.
    pub async fn hub_domain_of(&self, room: &RoomId) -> ServiceResult<Option<Domain>> {
        let Some(handle) = self.room(room).await? else {
            return Ok(None);
        };
        let domain = handle.read().await.hub_domain.clone();
        Ok(Domain::parse(&domain).ok())
    }

    /// The current epoch of a room hubbed here.
    pub async fn epoch_of(&self, room: &RoomId) -> ServiceResult<Option<u64>> {
        Ok(match self.room(room).await? {
            Some(h) => Some(h.read().await.epoch),
            None => None,
        })
    }

    /// `POST /v1/rooms/{id}/admins`, and the `x-parley-promote` extension from a follower: an
    /// admin of a group room makes another member user an admin. `requester` has been
    /// authenticated by the caller (a local member device, or a peer speaking for its own user).
    pub async fn promote(
        &self,
        requester: &UserId,
        room: &str,
        target: &UserId,
    ) -> ServiceResult<RoomInfo> {
        let id = parse_room(room)?;
        let handle = self.room(&id).await?.ok_or_else(|| unknown_room(&id))?;
        let mut state = handle.write().await;
        let is_member = |u: &UserId| state.members.iter().any(|m| m.user == *u);
        if !is_member(requester) {
            return Err(unknown_room(&id));
        }
        if state.kind == RoomKind::Direct {
            return Err(ServiceError::forbidden(
                "policy",
                "a direct room has fixed membership and no roles",
            ));
        }
        if !state.admins.contains(requester) {
            return Err(not_admin("only an admin may promote members".into()));
        }
        if !is_member(target) {
            return Err(ServiceError::bad(
                "not_member",
                format!("{target} is not a member of room {id}"),
            ));
        }
        let mut admins = state.admins.clone();
        admins.insert(target.clone());
        let (key, json) = (id.to_string(), admins_json(&admins));
        self.store
            .write(move |c| {
                c.execute(
                    "UPDATE rooms SET admins = ?2 WHERE room_id = ?1",
                    params![key, json],
                )?;
                Ok(())
            })
            .await?;
        state.admins = admins;
        tracing::info!(room = %id, admin = %target, by = %requester, "member promoted");
        Ok(state.info())
    }

    /// Whether `user` has a device in a room hubbed here.
    pub async fn has_member_user(&self, room: &RoomId, user: &UserId) -> ServiceResult<bool> {
        let Some(handle) = self.room(room).await? else {
            return Ok(false);
        };
        let state = handle.read().await;
        Ok(state.members.iter().any(|m| m.user == *user))
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
                if self.config.hosts(peer.domain().as_str()) {
                    self.accounts.devices(&peer).await?; // 404 if unknown
                } // A remote peer is checked by its provider when its key material is claimed.
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
            admins: match req.kind {
                RoomKind::Group => BTreeSet::from([caller.user.clone()]),
                RoomKind::Direct => BTreeSet::new(),
            },
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

    /// `POST /v1/rooms/{id}/commits`, and MIMI `update` with a commit from a follower.
    pub async fn commit(
        &self,
        origin: &Origin,
        room: &str,
        commit: Vec<u8>,
        welcome: Option<Vec<u8>>,
    ) -> ServiceResult<Accepted> {
        if let Origin::Client(caller) = origin {
            self.check_rate(&caller.uri())?;
        }
        let handle = self.origin_room(origin, room).await?;
        let mut state = handle.write().await;
        if let Origin::Client(caller) = origin {
            state.require_member(caller)?;
        }
        state.check_epoch(message_epoch(&commit))?;
        let effect = state
            .public
            .apply_commit(&commit)
            .map_err(|e| ServiceError::bad("invalid_commit", e.to_string()))?;
        if !origin.may_speak_for(&effect.committer) {
            return Err(ServiceError::forbidden(
                "not_committer",
                "the commit must be signed by the device sending it",
            ));
        }
        if let Origin::Peer(_) = origin {
            self.check_rate(&effect.committer)?;
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
        state.check_roles(&effect)?;
        self.check_added_devices(&state.id, &effect.added).await?;
        self.check_policy(&state, &effect)?;
        check_welcome_matches(welcome.as_deref(), !effect.added.is_empty())?;

        let ts = now_ms();
        let event = state.next_event.fetch_add(1, Ordering::SeqCst);
        let members: Vec<MemberDevice> = effect.members.iter().map(MemberDevice::from).collect();
        // Snapshots sent with this commit carry the admins as they are after it.
        let next_admins = state.admins_after(&members);
        let previous_admins = std::mem::replace(&mut state.admins, next_admins);
        let next_epoch = effect.epoch;
        let out = EventOut {
            kind: FanoutKind::Commit,
            event,
            ts,
            data: Arc::new(commit),
            expires_at: None,
        };
        let mut fanout = self.fan_out(
            &state,
            &effect.committer,
            &out,
            Some((&members, next_epoch)),
        );
        if let Some(welcome) = welcome {
            let added: Vec<MemberDevice> = effect.added.iter().map(MemberDevice::from).collect();
            let welcome = EventOut {
                kind: FanoutKind::Welcome,
                data: Arc::new(welcome),
                ..out
            };
            self.route_welcome(
                &state,
                &effect.committer,
                &added,
                (&members, next_epoch),
                &welcome,
                &mut fanout,
            );
        }
        let update = RoomUpdate {
            room_id: state.id.to_string(),
            epoch: effect.epoch,
            next_event: event + 1,
            public_state: effect
                .next
                .encode()
                .map_err(|e| ServiceError::Internal(e.to_string()))?,
            members: member_rows(&members),
            admins: state.admins_json(),
        };
        if let Err(e) = self.persist(RoomWrite::State(update), fanout).await {
            state.admins = previous_admins;
            return Err(e);
        }
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

    /// Queues the Welcome for the added devices: local ones directly, remote ones by notify to
    /// their providers (with the room as it is after the commit).
    fn route_welcome(
        &self,
        state: &RoomState,
        committer: &DeviceUri,
        added: &[MemberDevice],
        after: (&[MemberDevice], u64),
        welcome: &EventOut,
        fanout: &mut Fanout,
    ) {
        let mut remote: BTreeMap<String, Vec<&MemberDevice>> = BTreeMap::new();
        for m in added {
            if self.config.hosts(m.user.domain().as_str()) {
                fanout.local.push(self.queue_entry(state, m, welcome));
            } else {
                remote
                    .entry(m.user.domain().to_string())
                    .or_default()
                    .push(m);
            }
        }
        for (domain, devices) in remote {
            let mut snapshot = state.snapshot(after.0, &domain);
            snapshot.epoch = after.1;
            fanout.remote.push(self.notify_item(
                state,
                &domain,
                committer,
                devices.iter().map(|m| m.uri()).collect(),
                Some(snapshot),
                welcome,
            ));
        }
    }

    /// `POST /v1/rooms/{id}/proposals`, and MIMI `update` with a proposal: a member leaves. The
    /// hub verifies the self-removal, keeps it in the room's public state (the next commit must
    /// include it) and queues it for the other members, whose clients then commit it.
    pub async fn leave(
        &self,
        origin: &Origin,
        room: &str,
        proposal: Vec<u8>,
    ) -> ServiceResult<Accepted> {
        if let Origin::Client(caller) = origin {
            self.check_rate(&caller.uri())?;
        }
        let handle = self.origin_room(origin, room).await?;
        let state = handle.write().await;
        if let Origin::Client(caller) = origin {
            state.require_member(caller)?;
        }
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
        if !origin.may_speak_for(&effect.leaver) {
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
        let out = EventOut {
            kind: FanoutKind::Proposal,
            event,
            ts,
            data: Arc::new(proposal),
            expires_at: None,
        };
        let fanout = self.fan_out(&state, &effect.leaver, &out, None);
        let update = RoomUpdate {
            room_id: state.id.to_string(),
            epoch: state.epoch,
            next_event: event + 1,
            public_state: effect
                .next
                .encode()
                .map_err(|e| ServiceError::Internal(e.to_string()))?,
            members: state.member_rows(),
            admins: state.admins_json(),
        };
        self.persist(RoomWrite::State(update), fanout).await?;
        let mut state = state;
        state.public = effect.next;
        tracing::info!(room = %state.id, leaver = %effect.leaver, "leave proposed");
        Ok(Accepted {
            event,
            ts,
            epoch: state.epoch,
        })
    }

    /// Durably records a room change with its queue entries and peer notifications, then
    /// pushes the entries (in commit order) and wakes the peers' delivery workers.
    async fn persist(&self, write: RoomWrite, fanout: Fanout) -> ServiceResult<()> {
        let push = self.delivery.push.clone();
        let outbox = self.outbox.clone();
        let Fanout { local, remote } = fanout;
        let peers: BTreeSet<String> = remote.iter().map(|r| r.peer.clone()).collect();
        let stored = self
            .store
            .write_then(
                move |c| {
                    write.apply(c)?;
                    outbox::insert(c, &remote)?;
                    enqueue(c, &local)
                },
                move |stored: &Vec<Stored>| {
                    push.push(stored);
                    for peer in &peers {
                        outbox.wake(peer);
                    }
                },
            )
            .await?;
        self.counters
            .queued
            .fetch_add(stored.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// One queue entry per local member device except the sender's (and except users who
    /// blocked the sender), and one notify per other provider with members, listing its devices.
    /// `after` (members and epoch after a commit) adds a room snapshot to the notifications.
    fn fan_out(
        &self,
        state: &RoomState,
        sender: &DeviceUri,
        out: &EventOut,
        after: Option<(&Vec<MemberDevice>, u64)>,
    ) -> Fanout {
        let mut fanout = Fanout::default();
        let mut remote: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for m in state.members.iter().filter(|m| !m.is(sender)) {
            if !self.config.hosts(m.user.domain().as_str()) {
                remote
                    .entry(m.user.domain().to_string())
                    .or_default()
                    .push(m.uri());
                continue;
            }
            // A block hides the sender's messages; handshake messages still flow, or the
            // blocker's copy of a shared group would fall behind and break.
            if out.kind == FanoutKind::Application && self.consent.blocked(&sender.user, &m.user) {
                continue;
            }
            fanout.local.push(self.queue_entry(state, m, out));
        }
        for (domain, recipients) in remote {
            let snapshot = after.map(|(members, epoch)| {
                let mut s = state.snapshot(members, &domain);
                s.epoch = epoch;
                s
            });
            fanout
                .remote
                .push(self.notify_item(state, &domain, sender, recipients, snapshot, out));
        }
        fanout
    }

    /// The queue entry of `out` for the local member device `m`: kept for the retention of its
    /// user's domain, or until the sender's expiry hint if that comes first.
    fn queue_entry(&self, state: &RoomState, m: &MemberDevice, out: &EventOut) -> Outgoing {
        let retained = self.expiry_for(&m.user, out.ts);
        Outgoing {
            device: m.device.clone(),
            room_id: state.id.to_string(),
            kind: entry_kind(out.kind),
            event: out.event,
            ts: out.ts,
            data: out.data.clone(),
            expires_at: out.expires_at.map_or(retained, |hint| hint.min(retained)),
        }
    }

    fn notify_item(
        &self,
        state: &RoomState,
        domain: &str,
        sender: &DeviceUri,
        recipients: Vec<String>,
        room: Option<RoomSnapshot>,
        out: &EventOut,
    ) -> OutboxItem {
        let entry = NotifyEntry {
            sequence: 0, // the outbox row id, filled in when sent
            event: out.event,
            sender: IdentifierUri::new(&sender.user.to_uri()),
            recipients: recipients.iter().map(|r| IdentifierUri::new(r)).collect(),
            room,
            fanout: FanoutMessage {
                timestamp: out.ts,
                kind: out.kind,
                message: out.data.to_vec().into(),
                extras: Vec::new(),
            },
            expires_at: out.expires_at.unwrap_or(NO_EXPIRY),
        };
        OutboxItem {
            peer: domain.to_owned(),
            as_domain: state.hub_domain.clone(),
            endpoint: outbox::NOTIFY,
            param: state.id.to_string(),
            body: entry.encode(),
        }
    }

    /// Every added KeyPackage must belong to a device with the key its provider knows: a local
    /// device's registered key, or for a remote device the key its provider handed this hub
    /// for this room (MIMI `keyMaterial`), so nobody can slip in a key for someone else.
    async fn check_added_devices(&self, room: &RoomId, added: &[LeafDevice]) -> ServiceResult<()> {
        for leaf in added {
            let known = if self.config.hosts(leaf.device.user.domain().as_str()) {
                let key = self.accounts.device_key(&leaf.device).await?;
                key.as_deref() == Some(leaf.signature_key.as_slice())
            } else {
                self.remote_claim_exists(room, &leaf.device, &leaf.signature_key)
                    .await?
            };
            if !known {
                return Err(ServiceError::forbidden(
                    "unknown_device",
                    format!(
                        "{} is not a device with that key (KeyPackages of other providers' users must be claimed through this hub)",
                        leaf.device
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn remote_claim_exists(
        &self,
        room: &RoomId,
        device: &DeviceUri,
        key: &[u8],
    ) -> ServiceResult<bool> {
        let (room, device, key) = (room.to_string(), device.to_string(), key.to_vec());
        Ok(self
            .store
            .read(move |c| {
                Ok(c.query_row(
                    "SELECT 1 FROM remote_claims WHERE room_id = ?1 AND device_uri = ?2 AND signature_key = ?3",
                    params![room, device, key],
                    |_| Ok(()),
                )
                .optional()?
                .is_some())
            })
            .await?)
    }

    /// Records KeyPackages fetched from another provider for a room hubbed here.
    pub async fn record_remote_claims(
        &self,
        room: &RoomId,
        claims: Vec<(DeviceUri, Vec<u8>)>,
    ) -> ServiceResult<()> {
        let room = room.to_string();
        self.store
            .write(move |c| {
                let mut st = c.prepare_cached(
                    "INSERT OR IGNORE INTO remote_claims (room_id, device_uri, signature_key, claimed_at)
                     VALUES (?1, ?2, ?3, ?4)",
                )?;
                for (device, key) in claims {
                    st.execute(params![room, device.to_string(), key, now_ms() as i64])?;
                }
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Room size, and a direct room's fixed membership: only its two users, and nobody removed
    /// except a user's own devices by that user (a device removed from the account), so both
    /// users keep their place (the committer's user keeps at least the committer).
    fn check_policy(&self, state: &RoomState, effect: &CommitEffect) -> ServiceResult<()> {
        let members = &effect.members;
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
            if effect
                .removed
                .iter()
                .any(|d| d.user != effect.committer.user)
            {
                return Err(ServiceError::forbidden(
                    "policy",
                    "a direct room has fixed membership: a user may only remove their own devices",
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

    /// `POST /v1/rooms/{id}/messages`, and MIMI `submitMessage` (the peer has checked that the
    /// sender belongs to its domain). `expires_at` is the sender's expiry hint: the message's
    /// queue entries and notifications expire then instead of after the retention.
    pub async fn send(
        &self,
        sender: &AuthDevice,
        room: &str,
        message: Vec<u8>,
        expires_at: Option<u64>,
    ) -> ServiceResult<Accepted> {
        let max = self
            .config
            .domain(sender.user.domain().as_str())
            .map_or(64 * 1024, |d| d.max_message_bytes);
        if message.len() > max {
            return Err(ServiceError::too_large(
                "message_too_large",
                format!("messages are limited to {max} bytes"),
            ));
        }
        let expires_at = check_expiry_hint(&self.config, &sender.user, expires_at, now_ms())?;
        let sender_uri = sender.uri();
        self.check_rate(&sender_uri)?;
        let header = application_header(&message)
            .map_err(|e| ServiceError::bad("invalid_message", e.to_string()))?;
        if header.room.as_str() != room {
            return Err(ServiceError::bad(
                "invalid_message",
                "the message is for another room",
            ));
        }
        let handle = self.member_room(sender, room).await?;
        // Read lock: messages of one room proceed concurrently, but never across a commit.
        let state = handle.read().await;
        state.require_member(sender)?; // again under the lock: a commit may have removed it
        state.check_epoch(Some(header.epoch))?;
        if let Some(other) = state.direct_other(&sender.user) {
            if self.consent.blocked(&sender.user, other) {
                return Err(no_consent(other));
            }
        }
        let ts = now_ms();
        let event = state.next_event.fetch_add(1, Ordering::SeqCst);
        let out = EventOut {
            kind: FanoutKind::Application,
            event,
            ts,
            data: Arc::new(message),
            expires_at,
        };
        let fanout = self.fan_out(&state, &sender_uri, &out, None);
        let write = RoomWrite::Event {
            room_id: room.to_owned(),
            next_event: event + 1,
        };
        self.persist(write, fanout).await?;
        self.counters.messages.fetch_add(1, Ordering::Relaxed);
        Ok(Accepted {
            event,
            ts,
            epoch: state.epoch,
        })
    }

    /// Who an ephemeral message (a typing indicator) from `sender` in a room hubbed here goes
    /// to: the other local member devices whose users have not blocked the sender, and the
    /// other providers' member clients by domain. Nothing is ordered or stored (`ephemeral`).
    /// `None` when the room is not hubbed here; `unknown_room` when the sender is no member.
    pub async fn ephemeral_recipients(
        &self,
        sender: &DeviceUri,
        room: &RoomId,
    ) -> ServiceResult<Option<EphemeralRecipients>> {
        let Some(handle) = self.room(room).await? else {
            return Ok(None);
        };
        let state = handle.read().await;
        if !state.is_member(sender) {
            return Err(unknown_room(room));
        }
        let mut out = EphemeralRecipients {
            hub_domain: state.hub_domain.clone(),
            ..EphemeralRecipients::default()
        };
        for m in state.members.iter().filter(|m| !m.is(sender)) {
            if !self.config.hosts(m.user.domain().as_str()) {
                let domain = m.user.domain().to_string();
                out.remote.entry(domain).or_default().push(m.uri());
            } else if !self.consent.blocked(&sender.user, &m.user) {
                out.local.push(m.device.clone());
            }
        }
        Ok(Some(out))
    }
}

/// Where an ephemeral message goes (see [`Hub::ephemeral_recipients`]).
#[derive(Debug, Default)]
pub struct EphemeralRecipients {
    /// The domain the room is hubbed as (what the hub speaks as to other providers).
    pub hub_domain: String,
    /// Local member devices (device ids).
    pub local: Vec<String>,
    /// Other providers' member clients (client URIs), by domain.
    pub remote: BTreeMap<String, Vec<String>>,
}

/// Checks a sender's expiry hint (milliseconds since the Unix epoch): it must lie after `now`
/// and within the retention of the sender's domain, the longest any of its entries is kept.
/// Both the hub and a follower relaying its user's message check it.
pub fn check_expiry_hint(
    config: &ServerConfig,
    sender: &UserId,
    expires_at: Option<u64>,
    now: u64,
) -> ServiceResult<Option<u64>> {
    let Some(at) = expires_at else {
        return Ok(None);
    };
    let latest = now.saturating_add(config.retention_ms(sender.domain().as_str()));
    if at <= now || at > latest {
        return Err(ServiceError::bad(
            "invalid_expiry",
            format!(
                "expires_at must be after now ({now}) and no later than the retention allows ({latest})"
            ),
        ));
    }
    Ok(Some(at))
}

/// The refusal for a user who has not consented (or blocked the sender).
pub fn no_consent(user: &UserId) -> ServiceError {
    ServiceError::forbidden(
        "no_consent",
        format!("{user} has not accepted contact from you"),
    )
}

fn entry_kind(kind: FanoutKind) -> EntryKind {
    match kind {
        FanoutKind::Application => EntryKind::Message,
        FanoutKind::Welcome => EntryKind::Welcome,
        FanoutKind::Proposal => EntryKind::Proposal,
        FanoutKind::Commit => EntryKind::Commit,
    }
}

/// A commit that adds devices needs a Welcome, and only such a commit may carry one.
fn check_welcome_matches(welcome: Option<&[u8]>, adds: bool) -> ServiceResult<()> {
    match (welcome, adds) {
        (None, true) => Err(ServiceError::bad(
            "missing_welcome",
            "a commit that adds devices needs a Welcome",
        )),
        (Some(w), true) => {
            check_welcome(w).map_err(|e| ServiceError::bad("invalid_welcome", e.to_string()))
        }
        (Some(_), false) => Err(ServiceError::bad(
            "invalid_welcome",
            "a Welcome without added devices",
        )),
        (None, false) => Ok(()),
    }
}

/// Parses a device URI that a peer names, into the sender form the hub uses.
pub fn device_of(uri: &str) -> ServiceResult<AuthDevice> {
    let d = DeviceUri::parse(uri).map_err(|e| ServiceError::bad("invalid_uri", e.to_string()))?;
    Ok(AuthDevice {
        device: d.device,
        user: d.user,
    })
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
    admins: String,
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
            admins: s.admins_json(),
        })
    }
}

fn insert_room(c: &Connection, r: &RoomRow) -> Result<bool, StoreError> {
    let inserted = c.execute(
        "INSERT OR IGNORE INTO rooms (room_id, hub_domain, kind, name, creator, direct_peer, epoch, next_event, public_state, created_at, admins)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, 1, ?7, ?8, ?9)",
        params![r.room_id, r.hub_domain, r.kind, r.name, r.creator, r.direct_peer, r.public_state, now_ms() as i64, r.admins],
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
    admins: String,
}

impl RoomUpdate {
    fn apply(&self, c: &Connection) -> Result<(), StoreError> {
        c.execute(
            "UPDATE rooms SET epoch = ?2, next_event = MAX(next_event, ?3), public_state = ?4, admins = ?5 WHERE room_id = ?1",
            params![self.room_id, self.epoch as i64, self.next_event as i64, self.public_state, self.admins],
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
    let admins: String = c.query_row(
        "SELECT admins FROM rooms WHERE room_id = ?1",
        params![room],
        |r| r.get(0),
    )?;
    let admins = serde_json::from_str::<Vec<String>>(&admins)
        .map_err(|_| corrupt("admins"))?
        .iter()
        .map(|u| UserId::parse(u))
        .collect::<Result<BTreeSet<_>, _>>()
        .map_err(|_| corrupt("admin"))?;
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
        admins,
        public: PublicState::decode(&public).map_err(|_| corrupt("group state"))?,
    }))
}
