//! The hub: owns the rooms this provider created. It orders each room's handshake messages,
//! follows the group's public state (and with it the room's state in the GroupContext), enforces
//! room policy, and fans every message out to the queues of the room's member devices and, as
//! MIMI `FanoutMessage`s through the durable outbox, to the other providers with members. It
//! answers MIMI `groupInfo` for external joins. Owns `rooms` and `room_members`.

use crate::accounts::{Accounts, AuthDevice};
use crate::clock::now_ms;
use crate::config::ServerConfig;
use crate::consent::Consent;
use crate::crypto::{self, HubKeys};
use crate::delivery::{enqueue, Delivery, Outgoing, Stored};
use crate::error::{ServiceError, ServiceResult};
use crate::limits::RateLimiter;
use crate::mls::{
    application_header, check_group_info, check_welcome, credential_device, message_epoch,
    AppMessageHeader, CommitEffect, LeafDevice, PublicState,
};
use crate::outbox::{self, Outbox, OutboxItem};
use crate::store::{Store, StoreError};
use parley_proto::api::{Accepted, CreateRoomRequest, EntryKind, RoomInfo, RoomKind};
use parley_proto::ids::DeviceUri;
use parley_proto::mimi::room_state::RoomState as RoomFacts;
use parley_proto::mimi::{
    self, signing, Body, FanoutExtra, FanoutMessage, GroupInfoRatchetTreeTbe, GroupInfoRequest,
    GroupInfoResponse, GroupInfoResult, MlsKind, MlsMessage, PendingProposal, RatchetTreeOption,
};
use parley_proto::{Domain, RoomId, UserId};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tls_codec::{Deserialize as _, Serialize as _};
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
struct HubRoom {
    id: RoomId,
    group_id: Vec<u8>,
    /// Kind, name, participants and roles, from the GroupContext.
    facts: RoomFacts,
    epoch: u64,
    next_event: AtomicU64,
    members: Vec<MemberDevice>,
    public: PublicState,
    /// The last committer's GroupInfo (bare, without tree), served by `groupInfo`.
    group_info: Option<Vec<u8>>,
    /// Proposals accepted in the current epoch (members leaving).
    pending: Vec<PendingProposal>,
}

impl HubRoom {
    fn hub_domain(&self) -> &str {
        self.id.hub().as_str()
    }

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

    fn has_member_user(&self, user: &UserId) -> bool {
        self.members.iter().any(|m| m.user == *user)
    }

    fn kind(&self) -> RoomKind {
        if self.facts.direct {
            RoomKind::Direct
        } else {
            RoomKind::Group
        }
    }

    /// The other user of a direct room, seen from `user`.
    fn direct_other(&self, user: &UserId) -> Option<&UserId> {
        if !self.facts.direct {
            return None;
        }
        self.facts.participants.keys().find(|u| *u != user)
    }

    fn info(&self) -> RoomInfo {
        let users: BTreeSet<String> = self.members.iter().map(|m| m.user.to_string()).collect();
        RoomInfo {
            room_id: self.id.to_string(),
            hub: self.hub_domain().to_owned(),
            kind: Some(self.kind()),
            name: (!self.facts.name.is_empty()).then(|| self.facts.name.clone()),
            epoch: Some(self.epoch),
            members: users.into_iter().collect(),
            admins: self.facts.admins().map(ToString::to_string).collect(),
        }
    }

    /// Room policy for a group room's commit: adding a participant, removing another user's
    /// devices (other than ones that asked to leave), removing a participant who did not leave,
    /// and changing a role take an administrator. Anyone may add devices of users already in the
    /// room (their new devices) and remove their own.
    fn check_roles(&self, effect: &CommitEffect) -> ServiceResult<()> {
        let (before, after) = (&effect.state_before, &effect.state_after);
        if before.direct || before.is_admin(&effect.committer.user) {
            return Ok(());
        }
        if let Some(newcomer) = after
            .participants
            .keys()
            .find(|u| !before.is_participant(u))
        {
            return Err(not_admin(format!(
                "only an admin may add {newcomer} to this room"
            )));
        }
        let left_users: BTreeSet<&UserId> = effect.left.iter().map(|d| &d.user).collect();
        // When the last admins leave, whoever commits their leave promotes the others (a group
        // room is never without an admin); otherwise only an admin changes roles.
        let admins_leave = before
            .admins()
            .all(|a| !after.is_participant(a) && left_users.contains(a));
        for (user, role) in &after.participants {
            let promoted = admins_leave && *role == parley_proto::mimi::room_state::ROLE_ADMIN;
            if before.participants.get(user) != Some(role) && !promoted {
                return Err(not_admin(format!(
                    "only an admin may change the role of {user}"
                )));
            }
        }
        if let Some(gone) = before.participants.keys().find(|u| {
            !after.is_participant(u) && **u != effect.committer.user && !left_users.contains(u)
        }) {
            return Err(not_admin(format!(
                "only an admin may remove {gone} from this room"
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
}

/// A room name, as set at creation or by a commit: what every member's client shows. The
/// refusal's message.
fn check_name(name: &str) -> Result<(), String> {
    if name.chars().count() > MAX_ROOM_NAME || name.chars().any(char::is_control) {
        return Err(format!(
            "room names are at most {MAX_ROOM_NAME} printable characters"
        ));
    }
    Ok(())
}

fn not_admin(message: String) -> ServiceError {
    ServiceError::forbidden("not_admin", message)
}

fn policy(message: impl Into<String>) -> ServiceError {
    ServiceError::forbidden("policy", message.into())
}

type RoomHandle = Arc<RwLock<HubRoom>>;

/// Who hands the hub a message: a local client, or a peer provider relaying one of its users'
/// (the signer must then belong to that peer's domain).
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

/// Who sent an application message, as far as the hub can tell: a client, or (MIMI
/// `submitMessage` names a user URI) a participant user of the relaying peer.
pub enum MessageSender {
    Device(AuthDevice),
    User(UserId),
}

impl MessageSender {
    fn user(&self) -> &UserId {
        match self {
            MessageSender::Device(d) => &d.user,
            MessageSender::User(u) => u,
        }
    }

    fn rate_key(&self) -> String {
        match self {
            MessageSender::Device(d) => d.uri().to_string(),
            MessageSender::User(u) => u.to_uri(),
        }
    }

    /// Parses MIMI `sendingUri`: a user URI or a client URI.
    pub fn from_uri(uri: &str) -> ServiceResult<Self> {
        if let Ok(d) = DeviceUri::parse(uri) {
            return Ok(MessageSender::Device(AuthDevice {
                device: d.device,
                user: d.user,
            }));
        }
        UserId::parse(uri)
            .map(MessageSender::User)
            .map_err(|e| ServiceError::bad("invalid_uri", e.to_string()))
    }
}

/// A commit as a client or peer hands it in: the commit, the Welcome (an MlsMessage) for added
/// devices, the committer's GroupInfo of the new epoch. (The tree is the hub's own.)
pub struct CommitBundle {
    pub commit: Vec<u8>,
    pub welcome: Option<Vec<u8>>,
    pub group_info: Option<Vec<u8>>,
}

/// One accepted event on its way out: what fan-out queues for devices and notifies to peers.
struct EventOut {
    kind: EntryKind,
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
    keys: Arc<HubKeys>,
    rooms: Mutex<HashMap<RoomId, RoomHandle>>,
    sends: RateLimiter,
    pub counters: HubCounters,
}

/// Totals for `/metrics`.
#[derive(Default)]
pub struct HubCounters {
    pub messages: AtomicU64,
    pub commits: AtomicU64,
    /// Time the hub spent on accepted messages and commits, from arrival to durable (µs):
    /// checks, MLS verification, policy, and the group commit of every queue entry.
    pub message_micros: AtomicU64,
    pub commit_micros: AtomicU64,
    pub queued: AtomicU64,
    pub abuse_reports: AtomicU64,
}

fn micros_since(started: std::time::Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn unknown_room(room: &RoomId) -> ServiceError {
    ServiceError::not_found(
        "unknown_room",
        format!("no room {room} that you are a member of"),
    )
}

fn invalid_group_info(message: impl Into<String>) -> ServiceError {
    ServiceError::bad("invalid_group_info", message.into())
}

impl Hub {
    pub fn new(
        store: Store,
        accounts: Arc<Accounts>,
        delivery: Arc<Delivery>,
        config: Arc<ServerConfig>,
        outbox: Arc<Outbox>,
        consent: Arc<Consent>,
        keys: Arc<HubKeys>,
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
            keys,
            rooms: Mutex::new(HashMap::new()),
            counters: HubCounters::default(),
        }
    }

    fn expiry_for(&self, user: &UserId, now: u64) -> u64 {
        now.saturating_add(self.config.retention_ms(user.domain().as_str()))
    }

    fn check_rate(&self, key: &str) -> ServiceResult<()> {
        if self.sends.allow(key) {
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
        if !self.config.hosts(id.hub().as_str()) {
            return Ok(None);
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
    fn cache_room(&self, id: &RoomId, state: HubRoom) -> ServiceResult<RoomHandle> {
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

    async fn member_room(&self, caller: &AuthDevice, id: &RoomId) -> ServiceResult<RoomHandle> {
        let handle = self.room(id).await?.ok_or_else(|| unknown_room(id))?;
        if !handle.read().await.is_member(&caller.uri()) {
            return Err(unknown_room(id));
        }
        Ok(handle)
    }

    /// The room as the target of a handshake message from `origin`.
    async fn origin_room(&self, origin: &Origin, id: &RoomId) -> ServiceResult<RoomHandle> {
        match origin {
            Origin::Client(caller) => self.member_room(caller, id).await,
            Origin::Peer(_) => self.room(id).await?.ok_or_else(|| unknown_room(id)),
        }
    }

    /// Whether this provider is the hub of `room`.
    pub async fn hosts_room(&self, room: &RoomId) -> ServiceResult<bool> {
        Ok(self.room(room).await?.is_some())
    }

    /// The current epoch of a room hubbed here.
    pub async fn epoch_of(&self, room: &RoomId) -> ServiceResult<Option<u64>> {
        Ok(match self.room(room).await? {
            Some(h) => Some(h.read().await.epoch),
            None => None,
        })
    }

    /// Whether `user` has a device in a room hubbed here.
    pub async fn has_member_user(&self, room: &RoomId, user: &UserId) -> ServiceResult<bool> {
        let Some(handle) = self.room(room).await? else {
            return Ok(false);
        };
        let state = handle.read().await;
        Ok(state.has_member_user(user))
    }

    /// The signature key of `device` in a room hubbed here, if it is a member.
    pub async fn member_key(
        &self,
        room: &RoomId,
        device: &DeviceUri,
    ) -> ServiceResult<Option<Vec<u8>>> {
        let Some(handle) = self.room(room).await? else {
            return Ok(None);
        };
        let state = handle.read().await;
        if !state.is_member(device) {
            return Ok(None);
        }
        let members = state
            .public
            .members()
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        Ok(members
            .into_iter()
            .find(|m| m.device == *device)
            .map(|m| m.signature_key))
    }

    /// `POST /v1/rooms`: a new room hubbed here, described by its group's GroupContext.
    pub async fn create_room(
        &self,
        caller: &AuthDevice,
        req: CreateRoomRequest,
    ) -> ServiceResult<RoomInfo> {
        let id = RoomId::parse(&req.room_id)
            .map_err(|e| ServiceError::bad("invalid_room", e.to_string()))?;
        if id.hub() != caller.user.domain() {
            return Err(ServiceError::bad(
                "invalid_room",
                format!("rooms you create are hubbed at {}", caller.user.domain()),
            ));
        }
        let (public, epoch, members) = PublicState::create(&req.group_info, &req.ratchet_tree)
            .map_err(|e| invalid_group_info(e.to_string()))?;
        if public.group_id_bytes() != id.parley_group_id() || epoch != 0 {
            return Err(invalid_group_info(
                "the group id must be the room's (mimi://HUB/g/NAME) and the group at epoch 0",
            ));
        }
        let registered = self.accounts.device_key(&caller.uri()).await?;
        let only_caller = members.len() == 1
            && members[0].device == caller.uri()
            && Some(&members[0].signature_key) == registered.as_ref();
        if !only_caller {
            return Err(invalid_group_info(
                "a new room's group must hold exactly the creating device, with its registered key",
            ));
        }
        let facts = public
            .room_state()
            .map_err(|e| invalid_group_info(e.to_string()))?;
        self.check_new_room(caller, &id, &facts, &public).await?;
        let group_info = check_group_info(&req.group_info, public.group_id_bytes(), 0)
            .map_err(|e| invalid_group_info(e.to_string()))?;
        let state = HubRoom {
            id: id.clone(),
            group_id: public.group_id_bytes().to_vec(),
            facts,
            epoch: 0,
            next_event: AtomicU64::new(1),
            members: members.iter().map(MemberDevice::from).collect(),
            public,
            group_info: Some(group_info),
            pending: Vec::new(),
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
        tracing::info!(room = %id, kind = ?info.kind, creator = %caller.user, "room created");
        Ok(info)
    }

    /// A new room's GroupContext: its metadata names this room, it lists the hub as external
    /// sender, a group room has its creator as admin and only participant, a direct room lists
    /// exactly the creator and one other (existing) user.
    async fn check_new_room(
        &self,
        caller: &AuthDevice,
        id: &RoomId,
        facts: &RoomFacts,
        public: &PublicState,
    ) -> ServiceResult<()> {
        if facts.room != *id {
            return Err(invalid_group_info(format!(
                "the room_metadata names {}, not {id}",
                facts.room
            )));
        }
        check_name(&facts.name).map_err(|m| ServiceError::bad("invalid_name", m))?;
        let hub_sender = self
            .keys
            .external_sender(id.hub().as_str())
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let senders = public
            .external_senders()
            .map_err(|e| invalid_group_info(e.to_string()))?;
        if !senders.iter().any(|s| s == hub_sender) {
            return Err(invalid_group_info(
                "the group's external_senders must hold this hub's (GET /v1/provider)",
            ));
        }
        let me = &caller.user;
        if facts.direct {
            let others: Vec<&UserId> = facts.participants.keys().filter(|u| *u != me).collect();
            let [peer] = others.as_slice() else {
                return Err(invalid_group_info(
                    "a direct room lists exactly its creator and one other user",
                ));
            };
            if facts.participants.len() != 2 || facts.admins().next().is_some() {
                return Err(invalid_group_info(
                    "a direct room lists exactly its two users, without admins",
                ));
            }
            if self.config.hosts(peer.domain().as_str()) {
                self.accounts.devices(peer).await?; // 404 if unknown
            } // A remote peer is checked by its provider when its key material is claimed.
        } else if facts.participants.len() != 1 || !facts.is_admin(me) {
            return Err(invalid_group_info(
                "a new group room lists its creator as its only participant, an admin",
            ));
        }
        Ok(())
    }

    /// `GET /v1/rooms`: the rooms the calling device is a member of.
    pub async fn rooms_of(&self, caller: &AuthDevice) -> ServiceResult<Vec<RoomInfo>> {
        let (device, user) = (caller.device.as_str().to_owned(), caller.user.to_string());
        let ids: Vec<String> = self
            .store
            .read(move |c| {
                let mut st = c.prepare(
                    "SELECT room_id FROM room_members WHERE device_id = ?1 AND user_id = ?2
                     ORDER BY room_id",
                )?;
                let rows = st.query_map(params![device, user], |r| r.get(0))?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Ok(id) = RoomId::parse(&id) else { continue };
            if let Ok(handle) = self.member_room(caller, &id).await {
                out.push(handle.read().await.info());
            }
        }
        Ok(out)
    }

    /// `GET /v1/rooms/{id}`.
    pub async fn room_info(&self, caller: &AuthDevice, room: &RoomId) -> ServiceResult<RoomInfo> {
        Ok(self.member_room(caller, room).await?.read().await.info())
    }

    /// `POST /v1/rooms/{id}/commits`, and MIMI `update` with a commit from a follower (also an
    /// external commit of a joining client).
    pub async fn commit(
        &self,
        origin: &Origin,
        room: &RoomId,
        bundle: CommitBundle,
    ) -> ServiceResult<Accepted> {
        let started = std::time::Instant::now();
        if let Origin::Client(caller) = origin {
            self.check_rate(&caller.uri().to_string())?;
        }
        let handle = self.origin_room(origin, room).await?;
        let mut state = handle.write().await;
        let CommitBundle {
            commit,
            welcome,
            group_info,
        } = bundle;
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
        match origin {
            Origin::Client(caller) if !effect.external => state.require_member(caller)?,
            Origin::Peer(_) => self.check_rate(&effect.committer.to_string())?,
            Origin::Client(_) => {}
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
            return Err(policy(
                "only add, remove, update and group-context-extension proposals are allowed",
            ));
        }
        self.check_external_join(&state, &effect).await?;
        state.check_roles(&effect)?;
        self.check_added_devices(&state.id, &effect.added).await?;
        // A block is checked when KeyPackages are claimed, but a member may hold one from
        // before: nobody is added by a committer they blocked, as far as this hub knows.
        if let Some(blocker) = effect
            .added
            .iter()
            .map(|leaf| &leaf.device.user)
            .find(|user| self.consent.blocked(&effect.committer.user, user))
        {
            return Err(no_consent(blocker));
        }
        self.check_policy(&state, &effect)?;
        let welcome = check_welcome_matches(welcome.as_deref(), !effect.added.is_empty())?;
        let group_info = match group_info {
            Some(gi) => Some(
                effect
                    .next
                    .check_group_info(&gi, &effect.committer)
                    .map_err(|e| invalid_group_info(e.to_string()))?,
            ),
            None => None,
        };
        let tree = effect
            .next
            .ratchet_tree()
            .map_err(|e| ServiceError::Internal(e.to_string()))?;

        let ts = now_ms();
        let event = state.next_event.fetch_add(1, Ordering::SeqCst);
        let members: Vec<MemberDevice> = effect.members.iter().map(MemberDevice::from).collect();
        let out = EventOut {
            kind: EntryKind::Commit,
            event,
            ts,
            data: Arc::new(commit),
            expires_at: None,
        };
        let mut fanout = self.fan_out(
            &state,
            (Some(&effect.committer), &effect.committer.user),
            &out,
        );
        if let Some(welcome) = welcome {
            let added: Vec<MemberDevice> = effect.added.iter().map(MemberDevice::from).collect();
            let welcome = EventOut {
                kind: EntryKind::Welcome,
                data: Arc::new(welcome),
                ..out
            };
            self.route_welcome(&state, &added, &welcome, &tree, &mut fanout)?;
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
            group_info: group_info.clone().or_else(|| state.group_info.clone()),
            pending: Vec::new(),
            // A claimed KeyPackage adds its device once: adding it again takes a new claim,
            // and with it the device's provider's consent check.
            spent_claims: effect
                .added
                .iter()
                .filter(|leaf| !self.config.hosts(leaf.device.user.domain().as_str()))
                .map(|leaf| (leaf.device.to_string(), leaf.signature_key.clone()))
                .collect(),
        };
        self.persist(RoomWrite::State(update), fanout).await?;
        state.epoch = effect.epoch;
        state.members = members;
        state.public = effect.next;
        state.facts = effect.state_after;
        state.pending.clear();
        if group_info.is_some() {
            state.group_info = group_info;
        }
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        self.counters
            .commit_micros
            .fetch_add(micros_since(started), Ordering::Relaxed);
        tracing::info!(room = %state.id, epoch = state.epoch, added = effect.added.len(), removed = effect.removed.len(), external = effect.external, "commit accepted");
        Ok(Accepted {
            event,
            ts,
            epoch: state.epoch,
        })
    }

    /// An external commit (a client joining by itself, after `groupInfo`) may only bring in a
    /// client of a participant user, change nothing in the room's state, and remove nobody but
    /// its own user's devices (a resync). A local client must join with its registered key.
    async fn check_external_join(
        &self,
        state: &HubRoom,
        effect: &CommitEffect,
    ) -> ServiceResult<()> {
        if !effect.external {
            return Ok(());
        }
        let joiner = &effect.committer;
        if !state.facts.is_participant(&joiner.user) {
            return Err(policy(format!(
                "{} is not a participant of this room",
                joiner.user
            )));
        }
        if effect.state_after != effect.state_before {
            return Err(policy("an external commit may not change the room's state"));
        }
        if effect.removed.iter().any(|d| d.user != joiner.user) || !effect.added.is_empty() {
            return Err(policy(
                "an external commit may only add the joining client (and remove its own old ones)",
            ));
        }
        if self.config.hosts(joiner.user.domain().as_str()) {
            let registered = self.accounts.device_key(joiner).await?;
            let leaf_key = effect
                .members
                .iter()
                .find(|m| m.device == *joiner)
                .map(|m| m.signature_key.clone());
            if registered.is_none() || registered != leaf_key {
                return Err(ServiceError::forbidden(
                    "unknown_device",
                    format!("{joiner} is not a device with that key"),
                ));
            }
        }
        Ok(())
    }

    /// Queues the Welcome for the added devices: local ones directly, each other provider with
    /// added devices one `FanoutMessage` (the Welcome and the ratchet tree), which that provider
    /// routes by the KeyPackageRefs in it.
    fn route_welcome(
        &self,
        state: &HubRoom,
        added: &[MemberDevice],
        welcome: &EventOut,
        tree: &[u8],
        fanout: &mut Fanout,
    ) -> ServiceResult<()> {
        let tree = Arc::new(tree.to_vec());
        let mut remote: BTreeSet<String> = BTreeSet::new();
        for m in added {
            if self.config.hosts(m.user.domain().as_str()) {
                let mut entry = self.queue_entry(state, m, welcome);
                entry.ratchet_tree = Some(tree.clone());
                fanout.local.push(entry);
            } else {
                remote.insert(m.user.domain().to_string());
            }
        }
        if remote.is_empty() {
            return Ok(());
        }
        let internal = |e: mimi::WireError| ServiceError::Internal(e.to_string());
        let message = FanoutMessage {
            timestamp: welcome.ts,
            message: MlsMessage::from_bytes(welcome.data.to_vec()).map_err(internal)?,
            extra: FanoutExtra::Welcome {
                ratchet_tree: RatchetTreeOption::Full {
                    ratchet_tree: mimi::RatchetTree::from_bytes(tree.to_vec()).map_err(internal)?,
                },
            },
        };
        let body = message.encode();
        for domain in remote {
            fanout
                .remote
                .push(notify_item(state, &domain, body.clone()));
        }
        Ok(())
    }

    /// `POST /v1/rooms/{id}/proposals`, and MIMI `update` with a proposal: a member leaves. The
    /// hub verifies the self-removal, keeps it in the room's public state (the next commit must
    /// include it) and queues it for the other members, whose clients then commit it.
    pub async fn leave(
        &self,
        origin: &Origin,
        room: &RoomId,
        proposal: Vec<u8>,
    ) -> ServiceResult<Accepted> {
        if let Origin::Client(caller) = origin {
            self.check_rate(&caller.uri().to_string())?;
        }
        let handle = self.origin_room(origin, room).await?;
        let mut state = handle.write().await;
        if let Origin::Client(caller) = origin {
            state.require_member(caller)?;
        }
        if state.facts.direct {
            return Err(policy("a direct room has fixed membership"));
        }
        state.check_epoch(message_epoch(&proposal))?;
        let effect = state
            .public
            .apply_leave(&proposal)
            .map_err(|e| policy(e.to_string()))?;
        if !origin.may_speak_for(&effect.leaver) {
            return Err(ServiceError::forbidden(
                "not_proposer",
                "the proposal must be signed by the device sending it",
            ));
        }
        if effect.remaining == 0 {
            return Err(policy(
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
        let mut pending = state.pending.clone();
        pending.push(PendingProposal {
            proposal: MlsMessage::from_bytes(proposal.clone())
                .map_err(|e| ServiceError::bad("invalid_proposal", e.to_string()))?,
            hub_accepted_time: ts,
        });
        let out = EventOut {
            kind: EntryKind::Proposal,
            event,
            ts,
            data: Arc::new(proposal),
            expires_at: None,
        };
        let fanout = self.fan_out(&state, (Some(&effect.leaver), &effect.leaver.user), &out);
        let update = RoomUpdate {
            room_id: state.id.to_string(),
            epoch: state.epoch,
            next_event: event + 1,
            public_state: effect
                .next
                .encode()
                .map_err(|e| ServiceError::Internal(e.to_string()))?,
            members: state.member_rows(),
            group_info: state.group_info.clone(),
            pending: pending.clone(),
            spent_claims: Vec::new(),
        };
        self.persist(RoomWrite::State(update), fanout).await?;
        state.public = effect.next;
        state.pending = pending;
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

    /// One queue entry per local member device except the sending one (and except users who
    /// blocked the sender, for messages), and one `FanoutMessage` per provider with member
    /// devices other than the sending one — the sender's own provider too when it has other
    /// member devices; it recognises the message as relayed by itself (docs/mimi-profile.md §5).
    fn fan_out(
        &self,
        state: &HubRoom,
        sender: (Option<&DeviceUri>, &UserId),
        out: &EventOut,
    ) -> Fanout {
        let mut fanout = Fanout::default();
        let mut remote: BTreeSet<String> = BTreeSet::new();
        let (sending_device, sender_user) = sender;
        for m in state
            .members
            .iter()
            .filter(|m| sending_device.is_none_or(|s| !m.is(s)))
        {
            if !self.config.hosts(m.user.domain().as_str()) {
                remote.insert(m.user.domain().to_string());
                continue;
            }
            // A block hides the sender's messages; handshake messages still flow, or the
            // blocker's copy of a shared group would fall behind and break.
            if out.kind == EntryKind::Message && self.consent.blocked(sender_user, &m.user) {
                continue;
            }
            fanout.local.push(self.queue_entry(state, m, out));
        }
        if remote.is_empty() {
            return fanout;
        }
        let Some(message) = MlsMessage::from_bytes(out.data.to_vec())
            .ok()
            .and_then(|m| FanoutMessage::plain(out.ts, m))
        else {
            tracing::error!(room = %state.id, "an accepted message cannot be fanned out");
            return fanout;
        };
        let body = message.encode();
        for domain in remote {
            fanout
                .remote
                .push(notify_item(state, &domain, body.clone()));
        }
        fanout
    }

    /// The queue entry of `out` for the local member device `m`: kept for the retention of its
    /// user's domain, or until the sender's expiry hint if that comes first.
    fn queue_entry(&self, state: &HubRoom, m: &MemberDevice, out: &EventOut) -> Outgoing {
        let retained = self.expiry_for(&m.user, out.ts);
        Outgoing {
            device: m.device.clone(),
            room_id: state.id.to_string(),
            kind: out.kind,
            event: out.event,
            ts: out.ts,
            data: out.data.clone(),
            ratchet_tree: None,
            expires_at: out.expires_at.map_or(retained, |hint| hint.min(retained)),
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

    /// Records KeyPackages fetched from another provider for a room hubbed here: (client, its
    /// signature key, the KeyPackageRef).
    pub async fn record_remote_claims(
        &self,
        room: &RoomId,
        claims: Vec<(DeviceUri, Vec<u8>, Vec<u8>)>,
    ) -> ServiceResult<()> {
        let room = room.to_string();
        self.store
            .write(move |c| {
                let mut st = c.prepare_cached(
                    "INSERT OR IGNORE INTO remote_claims (room_id, device_uri, signature_key, key_package_ref, claimed_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for (device, key, reference) in claims {
                    st.execute(params![room, device.to_string(), key, reference, now_ms() as i64])?;
                }
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// After a commit: room size; every member's user a participant; a group room's
    /// participants exactly the users with devices and never without an admin; a direct room's
    /// participants unchanged and nobody removed but a user's own devices, by that user; the
    /// room's URI, kind and this hub as external sender kept.
    fn check_policy(&self, state: &HubRoom, effect: &CommitEffect) -> ServiceResult<()> {
        let (before, after) = (&effect.state_before, &effect.state_after);
        let members = &effect.members;
        let max = self
            .config
            .domain(state.hub_domain())
            .map_or(1000, |d| d.max_room_devices);
        if members.len() > max {
            return Err(ServiceError::forbidden(
                "room_full",
                format!("this room may hold at most {max} devices"),
            ));
        }
        if after.room != before.room || after.direct != before.direct {
            return Err(policy("a room's URI and kind never change"));
        }
        if after.name != before.name {
            // A policy refusal for a commit (MIMI notAllowed), as at creation otherwise.
            check_name(&after.name).map_err(|m| ServiceError::forbidden("invalid_name", m))?;
        }
        let hub_sender = self
            .keys
            .external_sender(state.hub_domain())
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        if !effect.external_senders.iter().any(|s| s == hub_sender) {
            return Err(policy("the room must keep this hub as external sender"));
        }
        // Members refuse a commit that changes who may propose from outside the group (a
        // sender added could remove anyone): accepted here, it would leave them behind.
        let senders_before = state
            .public
            .external_senders()
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        if effect.external_senders != senders_before {
            return Err(policy("a room's external senders never change"));
        }
        if let Some(outsider) = members
            .iter()
            .find(|m| !after.is_participant(&m.device.user))
        {
            return Err(policy(format!(
                "{} has a device in the room but is not a participant; add the user to the participant list in the same commit",
                outsider.device.user
            )));
        }
        if before.direct {
            if after.participants != before.participants {
                return Err(policy(
                    "a direct room has fixed membership: its participants never change",
                ));
            }
            if effect
                .removed
                .iter()
                .any(|d| d.user != effect.committer.user)
            {
                return Err(policy(
                    "a direct room has fixed membership: a user may only remove their own devices",
                ));
            }
            return Ok(());
        }
        let with_devices: BTreeSet<&UserId> = members.iter().map(|m| &m.device.user).collect();
        if let Some(idle) = after
            .participants
            .keys()
            .find(|u| !with_devices.contains(u))
        {
            return Err(policy(format!(
                "{idle} has no devices left in the room: drop the user from the participant list in the same commit"
            )));
        }
        if !after.participants.is_empty() && after.admins().next().is_none() {
            return Err(policy("a group room must keep at least one admin"));
        }
        Ok(())
    }

    /// `POST /v1/rooms/{id}/messages`, and MIMI `submitMessage` (the peer has checked that the
    /// sender belongs to its domain). The message's expiry hint (Safe AAD) makes its queue
    /// entries and notifications expire then instead of after the retention.
    pub async fn send(
        &self,
        sender: &MessageSender,
        room: &RoomId,
        message: Vec<u8>,
    ) -> ServiceResult<Accepted> {
        let started = std::time::Instant::now();
        let (header, expires_at) =
            check_application_message(&self.config, sender.user(), &message)?;
        self.check_rate(&sender.rate_key())?;
        let handle = self.room(room).await?.ok_or_else(|| unknown_room(room))?;
        // Read lock: messages of one room proceed concurrently, but never across a commit.
        let state = handle.read().await;
        let sending_device = match sender {
            MessageSender::Device(d) => {
                state.require_member(d)?;
                Some(d.uri())
            }
            MessageSender::User(u) => {
                // Named by its user only: if the user has one device in the room, that one sent
                // it (and its provider need not get it back); else every device gets it and the
                // user's provider leaves out the sending one.
                let mut devices = state.members.iter().filter(|m| m.user == *u);
                match (devices.next(), devices.next()) {
                    (None, _) => return Err(unknown_room(room)),
                    (Some(only), None) => DeviceUri::parse(&only.uri()).ok(),
                    (Some(_), Some(_)) => None,
                }
            }
        };
        if header.group_id != state.group_id {
            return Err(ServiceError::bad(
                "invalid_message",
                "the message is for another room",
            ));
        }
        state.check_epoch(Some(header.epoch))?;
        if let Some(other) = state.direct_other(sender.user()) {
            if self.consent.blocked(sender.user(), other) {
                return Err(no_consent(other));
            }
        }
        let ts = now_ms();
        let event = state.next_event.fetch_add(1, Ordering::SeqCst);
        let out = EventOut {
            kind: EntryKind::Message,
            event,
            ts,
            data: Arc::new(message),
            expires_at,
        };
        let mut fanout = self.fan_out(&state, (sending_device.as_ref(), sender.user()), &out);
        for item in &mut fanout.remote {
            item.expires_at = expires_at;
        }
        let write = RoomWrite::Event {
            room_id: room.to_string(),
            next_event: event + 1,
        };
        self.persist(write, fanout).await?;
        self.counters.messages.fetch_add(1, Ordering::Relaxed);
        self.counters
            .message_micros
            .fetch_add(micros_since(started), Ordering::Relaxed);
        Ok(Accepted {
            event,
            ts,
            epoch: state.epoch,
        })
    }

    /// MIMI `groupInfo/{roomId}`: the room's GroupInfo and tree, encrypted to the requester,
    /// for a client of a participant user of the calling peer's domain (`peer` `None`: a local
    /// caller) that will join by external commit.
    pub async fn group_info(
        &self,
        peer: Option<&Domain>,
        room: &RoomId,
        request: GroupInfoRequest,
    ) -> ServiceResult<GroupInfoResponse> {
        let room_bytes = room.as_str().as_bytes();
        request
            .check()
            .map_err(|e| ServiceError::bad("invalid_body", e.to_string()))?;
        let Some(handle) = self.room(room).await? else {
            return Ok(GroupInfoResponse::refused(
                room_bytes,
                GroupInfoResult::NoSuchRoom,
            ));
        };
        let tbs = request
            .tbs()
            .sign_content()
            .map_err(|e| ServiceError::bad("invalid_body", e.to_string()))?;
        if crypto::verify(
            request.requesting_signature_key.as_slice(),
            &tbs,
            request.signature.as_slice(),
        )
        .is_err()
        {
            return Err(ServiceError::forbidden(
                "bad_signature",
                "the groupInfo request's signature does not verify",
            ));
        }
        let requester = request
            .requesting_credential
            .parse()
            .ok()
            .and_then(|c| credential_device(&c));
        let state = handle.read().await;
        let authorized = requester.as_ref().is_some_and(|d| {
            state.facts.is_participant(&d.user)
                && peer.is_none_or(|p| d.user.domain() == p)
                && request.cipher_suite == mimi::CIPHERSUITE
        });
        let Some(group_info) = state.group_info.clone().filter(|_| authorized) else {
            return Ok(GroupInfoResponse::refused(
                room_bytes,
                GroupInfoResult::NotAuthorized,
            ));
        };
        let internal = |e: &dyn std::fmt::Display| ServiceError::Internal(e.to_string());
        let tree = state.public.ratchet_tree().map_err(|e| internal(&e))?;
        let tbe = GroupInfoRatchetTreeTbe {
            group_info: mimi::GroupInfo::from_bytes(group_info).map_err(|e| internal(&e))?,
            ratchet_tree: RatchetTreeOption::Full {
                ratchet_tree: mimi::RatchetTree::from_bytes(tree).map_err(|e| internal(&e))?,
            },
            pending_proposals: state.pending.clone(),
        };
        let encrypted = crypto::encrypt_with_label(
            request.group_info_public_key.as_slice(),
            signing::GROUP_INFO_ENCRYPTION,
            room_bytes,
            &tbe.encode(),
        )
        .map_err(|e| ServiceError::bad("invalid_body", e.to_string()))?;
        let hub = state.hub_domain().to_owned();
        let hub_sender = mimi::ExternalSender::tls_deserialize(
            &mut self.keys.external_sender(&hub).map_err(|e| internal(&e))?,
        )
        .map_err(|e| internal(&e))?;
        let content = mimi::group_info_response_sign_content(
            room_bytes,
            mimi::CIPHERSUITE,
            &hub_sender,
            &encrypted,
        )
        .map_err(|e| internal(&e))?;
        let signature = self.keys.sign(&hub, &content).map_err(|e| internal(&e))?;
        tracing::info!(%room, requester = ?requester.map(|d| d.to_string()), "groupInfo served");
        Ok(GroupInfoResponse {
            version: mimi::MLS10,
            room_id: room_bytes.to_vec().into(),
            result: GroupInfoResult::Success {
                cipher_suite: mimi::CIPHERSUITE,
                hub_sender,
                encrypted_groupinfo_and_tree: encrypted,
                signature: signature.into(),
            },
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
        group_id: &[u8],
    ) -> ServiceResult<Option<EphemeralRecipients>> {
        let Some(handle) = self.room(room).await? else {
            return Ok(None);
        };
        let state = handle.read().await;
        if !state.is_member(sender) {
            return Err(unknown_room(room));
        }
        if state.group_id != group_id {
            return Err(ServiceError::bad(
                "invalid_message",
                "the message is for another room",
            ));
        }
        let mut out = EphemeralRecipients {
            hub_domain: state.hub_domain().to_owned(),
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

/// A `notify` outbox row for `domain` carrying one encoded `FanoutMessage`.
fn notify_item(state: &HubRoom, domain: &str, body: Vec<u8>) -> OutboxItem {
    OutboxItem {
        peer: domain.to_owned(),
        as_domain: state.hub_domain().to_owned(),
        endpoint: outbox::NOTIFY,
        param: state.id.path_form().to_owned(),
        body,
        expires_at: None,
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

/// Checks an application message as the sender's provider takes it, whether it is the room's
/// hub or relays to one: within its domain's size limit, a readable cleartext header, and an
/// expiry hint [`check_expiry_hint`] accepts. Returns the header and that expiry.
pub fn check_application_message(
    config: &ServerConfig,
    sender: &UserId,
    message: &[u8],
) -> ServiceResult<(AppMessageHeader, Option<u64>)> {
    let max = config
        .domain(sender.domain().as_str())
        .map_or(64 * 1024, |d| d.max_message_bytes);
    if message.len() > max {
        return Err(ServiceError::too_large(
            "message_too_large",
            format!("messages are limited to {max} bytes"),
        ));
    }
    let header = application_header(message)
        .map_err(|e| ServiceError::bad("invalid_message", e.to_string()))?;
    let expires_at = check_expiry_hint(config, sender, header.expires_at, now_ms())?;
    Ok((header, expires_at))
}

/// Checks a sender's expiry hint (milliseconds since the Unix epoch): it must lie after `now`
/// and within the retention of the sender's domain, the longest any of its entries is kept.
fn check_expiry_hint(
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

/// A commit that adds devices needs a Welcome, and only such a commit may carry one. Returns the
/// Welcome as an MlsMessage (MIMI `update` carries it bare).
fn check_welcome_matches(welcome: Option<&[u8]>, adds: bool) -> ServiceResult<Option<Vec<u8>>> {
    match (welcome, adds) {
        (None, true) => Err(ServiceError::bad(
            "missing_welcome",
            "a commit that adds devices needs a Welcome",
        )),
        (Some(w), true) => {
            check_welcome(w).map_err(|e| ServiceError::bad("invalid_welcome", e.to_string()))?;
            Ok(Some(w.to_vec()))
        }
        (Some(_), false) => Err(ServiceError::bad(
            "invalid_welcome",
            "a Welcome without added devices",
        )),
        (None, false) => Ok(None),
    }
}

/// The MlsMessage form of a Welcome given bare (MIMI) or wrapped (client API).
pub fn welcome_message(bytes: Vec<u8>) -> ServiceResult<Vec<u8>> {
    if let Ok(m) = MlsMessage::from_bytes(bytes.clone()) {
        if m.kind() == MlsKind::Welcome {
            return Ok(m.into_bytes());
        }
    }
    let bare = mimi::Welcome::from_bytes(bytes)
        .map_err(|e| ServiceError::bad("invalid_welcome", e.to_string()))?;
    Ok(MlsMessage::from_welcome(&bare)
        .map_err(|e| ServiceError::bad("invalid_welcome", e.to_string()))?
        .into_bytes())
}

/// A room's database row, as written at creation.
struct RoomRow {
    room_id: String,
    group_id: Vec<u8>,
    public_state: Vec<u8>,
    group_info: Option<Vec<u8>>,
    members: Vec<(String, String)>,
}

impl RoomRow {
    fn of(s: &HubRoom) -> ServiceResult<Self> {
        Ok(Self {
            room_id: s.id.to_string(),
            group_id: s.group_id.clone(),
            public_state: s
                .public
                .encode()
                .map_err(|e| ServiceError::Internal(e.to_string()))?,
            group_info: s.group_info.clone(),
            members: s.member_rows(),
        })
    }
}

fn insert_room(c: &Connection, r: &RoomRow) -> Result<bool, StoreError> {
    let inserted = c.execute(
        "INSERT OR IGNORE INTO rooms (room_id, group_id, epoch, next_event, public_state, group_info, created_at)
         VALUES (?1, ?2, 0, 1, ?3, ?4, ?5)",
        params![r.room_id, r.group_id, r.public_state, r.group_info, now_ms() as i64],
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
    // Only the difference is written: a commit adding one device to a room of 1,000 touches
    // one row, not 2,000.
    let stored: HashSet<(String, String)> = {
        let mut st =
            c.prepare_cached("SELECT device_id, user_id FROM room_members WHERE room_id = ?1")?;
        let rows = st.query_map(params![room], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    let wanted: HashSet<&(String, String)> = members.iter().collect();
    let mut delete = c.prepare_cached(
        "DELETE FROM room_members WHERE room_id = ?1 AND device_id = ?2 AND user_id = ?3",
    )?;
    for (device, user) in stored.iter().filter(|row| !wanted.contains(row)) {
        delete.execute(params![room, device, user])?;
    }
    let mut insert = c.prepare_cached(
        "INSERT INTO room_members (room_id, device_id, user_id) VALUES (?1, ?2, ?3)",
    )?;
    for (device, user) in wanted.into_iter().filter(|row| !stored.contains(*row)) {
        insert.execute(params![room, device, user])?;
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

/// The durable effect of an accepted commit or leave.
struct RoomUpdate {
    room_id: String,
    epoch: u64,
    next_event: u64,
    public_state: Vec<u8>,
    members: Vec<(String, String)>,
    group_info: Option<Vec<u8>>,
    pending: Vec<PendingProposal>,
    /// `remote_claims` (client URI, signature key) the commit used up.
    spent_claims: Vec<(String, Vec<u8>)>,
}

impl RoomUpdate {
    fn apply(&self, c: &Connection) -> Result<(), StoreError> {
        let pending = self
            .pending
            .tls_serialize_detached()
            .map_err(|e| StoreError::Task(e.to_string()))?;
        c.execute(
            "UPDATE rooms SET epoch = ?2, next_event = MAX(next_event, ?3), public_state = ?4,
               group_info = ?5, pending = ?6 WHERE room_id = ?1",
            params![
                self.room_id,
                self.epoch as i64,
                self.next_event as i64,
                self.public_state,
                self.group_info,
                pending
            ],
        )?;
        let mut spend = c.prepare_cached(
            "DELETE FROM remote_claims WHERE room_id = ?1 AND device_uri = ?2 AND signature_key = ?3",
        )?;
        for (device, key) in &self.spent_claims {
            spend.execute(params![self.room_id, device, key])?;
        }
        replace_members(c, &self.room_id, &self.members)
    }
}

fn load_room(c: &Connection, room: &str) -> Result<Option<HubRoom>, StoreError> {
    type Row = (Vec<u8>, i64, i64, Vec<u8>, Option<Vec<u8>>, Vec<u8>);
    let row: Option<Row> = c
        .query_row(
            "SELECT group_id, epoch, next_event, public_state, group_info, pending
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
                ))
            },
        )
        .optional()?;
    let Some((group_id, epoch, next_event, public, group_info, pending)) = row else {
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
    let public = PublicState::decode(&public).map_err(|_| corrupt("group state"))?;
    let facts = public.room_state().map_err(|_| corrupt("room state"))?;
    let pending = Vec::<PendingProposal>::tls_deserialize(&mut pending.as_slice())
        .map_err(|_| corrupt("pending proposals"))?;
    Ok(Some(HubRoom {
        id: RoomId::parse(room).map_err(|_| corrupt("id"))?,
        group_id,
        facts,
        epoch: epoch as u64,
        next_event: AtomicU64::new(next_event as u64),
        members,
        public,
        group_info,
        pending,
    }))
}
