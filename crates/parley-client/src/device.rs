//! [`Device`]: one registered device with its profile, MLS state and server connection; the API
//! the CLI and tests use to register, create rooms, send, and sync.
//!
//! Invariants:
//! - queue entries are processed strictly in `seq` order, each at most once (a high-water mark
//!   in the profile, updated in the same transaction as the entry's effects);
//! - an entry that fails becomes an [`Event::Error`] and is skipped: the queue never wedges;
//! - an own commit is merged only after the hub accepted it;
//! - a member's proposal to leave is committed by the next `sync`/`apply` (or by any commit of
//!   ours, which always includes pending proposals), so the hub's room never stays half-left;
//! - a user's devices share the user's rooms: after the server signals a change of the user's
//!   devices (or this device joined a room), the next `sync`/`apply` adds the user's missing
//!   devices to every room this device is in and removes devices the account no longer has;
//! - rooms are named by their MIMI room URI; what a room is (kind, name, participants, roles)
//!   is read from this device's own MLS group, never from the server.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use parley_proto::api::{
    Accepted, ClaimRequest, CommitRequest, ContactInfo, ContactState, CreateRoomRequest, EntryKind,
    LoginRequest, ProposalRequest, QueueEntry, RegisterRequest, RoomInfo, RoomKind, SendRequest,
    SessionResponse, UploadKeyPackages,
};
use parley_proto::ids::DeviceUri;
use parley_proto::mimi::room_state::RoomState;
use parley_proto::{DeviceId, Expiration, Meaning, MessageId, MimiContent, RoomId, UserId};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::api::{ApiClient, Push, PushConnection};
use crate::error::{ClientError, Result};
use crate::mls::{self, DeviceMls, Incoming, RoomView, ValidatedKeyPackage};
use crate::profile::{Account, Authored, HistoryEntry, PendingCommit, Profile, ReactionRecord};

mod media;
mod own_devices;
mod receipts;
mod typing;

pub use media::{SentFile, DOWNLOADS_DIR};
pub use receipts::ReceiptStatus;
pub use typing::TYPING_SHOWN_FOR;

/// One-time KeyPackages uploaded at a time.
pub const KEY_PACKAGE_BATCH: usize = 20;
/// Below this many one-time KeyPackages on the server, a sync uploads a new batch.
pub const KEY_PACKAGE_LOW_WATER: u64 = 10;
/// Attempts for a commit or message the hub refuses as retryable (`wrong_epoch`, ...).
const MAX_ATTEMPTS: u32 = 5;
/// Queue entries fetched per request.
const QUEUE_PAGE: u32 = 100;
/// The largest queue page, used to look ahead when resolving an unanswered commit.
const QUEUE_PAGE_MAX: u32 = 1000;
/// Poll interval when the push WebSocket is unavailable.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Pause before retrying a retryable refusal other than `wrong_epoch` (e.g. `rate_limited`).
const RETRY_BACKOFF: Duration = Duration::from_millis(250);
/// Reconnection attempts of a [`Live`] session before giving up.
const LIVE_RECONNECTS: u32 = 5;
/// Shown instead of content this client cannot render.
const UNSUPPORTED_CONTENT: &str = "[unsupported content]";
/// The shortest id prefix accepted for a message (hex digits; every id starts with `01`).
pub const MIN_ID_PREFIX: usize = 8;
/// The longest reaction, in bytes: room for any emoji sequence, not for a message.
const MAX_REACTION_BYTES: usize = 64;

/// Milliseconds since the Unix epoch, by this device's clock.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Something that happened while syncing. Serialises as one JSON object tagged by `type`,
/// e.g. `{"type":"message","room":…,"sender":"alice@chirp.test","id":…,"text":…,"ts":…}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Event {
    /// A message from another member (or another device of ours). Its text is Markdown.
    Message {
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        room: RoomId,
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        sender: UserId,
        /// The MIMI MessageId, hex.
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        id: MessageId,
        text: String,
        /// Hub timestamp, milliseconds since the Unix epoch.
        ts: u64,
        /// The message this one replies to; absent when it is no reply.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            serialize_with = "crate::display_opt",
            deserialize_with = "crate::parsed_opt"
        )]
        reply_to: Option<MessageId>,
        /// When the message stops being shown (milliseconds since the Unix epoch); absent when
        /// it does not expire.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
        /// A received file: where it was saved, after its hash was checked and it decrypted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file: Option<String>,
        /// The received file's name as its sender gave it (made safe to save).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// A reaction (typically one emoji) to the message `target`.
    Reaction {
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        room: RoomId,
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        sender: UserId,
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        target: MessageId,
        emoji: String,
    },
    /// The author of the message `target` replaced its text.
    Edit {
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        room: RoomId,
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        sender: UserId,
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        target: MessageId,
        text: String,
    },
    /// The author of `target` retracted it: a message, or their own reaction.
    Delete {
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        room: RoomId,
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        sender: UserId,
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        target: MessageId,
    },
    /// `sender` reports a message of the room `target` as delivered to them or read by them
    /// (draft-mahy-mimi-message-status); shown once per user, status and message.
    Receipt {
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        room: RoomId,
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        sender: UserId,
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        target: MessageId,
        status: ReceiptStatus,
    },
    /// `sender` is typing in the room: ephemeral, from [`Device::open_ephemeral`] only (a live
    /// session); never stored, never in a sync. Show it for [`TYPING_SHOWN_FOR`].
    Typing {
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        room: RoomId,
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        sender: UserId,
    },
    /// A message from `sender` (authenticated by MLS) whose content is not valid MIMI content.
    /// It is shown as such and skipped; the room keeps working.
    Undecodable {
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        room: RoomId,
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        sender: UserId,
        ts: u64,
        detail: String,
    },
    /// This device was added to a room (name and kind from the room's group; `kind` is
    /// always present, optional only for events stored by earlier versions).
    Joined {
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        room: RoomId,
        name: Option<String>,
        kind: Option<RoomKind>,
    },
    /// Users joined or left a room this device is in.
    Members {
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        room: RoomId,
        #[serde(
            serialize_with = "crate::display_seq",
            deserialize_with = "crate::parsed_seq"
        )]
        added: Vec<UserId>,
        #[serde(
            serialize_with = "crate::display_seq",
            deserialize_with = "crate::parsed_seq"
        )]
        removed: Vec<UserId>,
    },
    /// This device was removed from a room.
    Removed {
        #[serde(serialize_with = "crate::display", deserialize_with = "crate::parsed")]
        room: RoomId,
    },
    /// A queue entry could not be processed and was skipped.
    Error {
        #[serde(
            serialize_with = "crate::display_opt",
            deserialize_with = "crate::parsed_opt"
        )]
        room: Option<RoomId>,
        detail: String,
    },
}

impl Event {
    /// The room the event happened in (`None` for an entry naming no valid room).
    pub fn room(&self) -> Option<&RoomId> {
        match self {
            Event::Message { room, .. }
            | Event::Reaction { room, .. }
            | Event::Edit { room, .. }
            | Event::Delete { room, .. }
            | Event::Receipt { room, .. }
            | Event::Typing { room, .. }
            | Event::Undecodable { room, .. }
            | Event::Joined { room, .. }
            | Event::Members { room, .. }
            | Event::Removed { room } => Some(room),
            Event::Error { room, .. } => room.as_ref(),
        }
    }

    /// Whether this is an expiring message whose time has passed by `now_ms`.
    fn has_expired(&self, now_ms: u64) -> bool {
        matches!(self, Event::Message { expires_at: Some(at), .. } if *at <= now_ms)
    }
}

/// How [`Device::send`] sends a text: as a reply, expiring, or both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendOptions {
    /// The message of the room this one replies to.
    pub reply_to: Option<MessageId>,
    /// How long receivers show the message (whole seconds, rounded up); the providers also
    /// drop its queue entries then.
    pub expires_in: Option<Duration>,
}

/// A decrypted (or just sent) message's context: where, by whom, and when.
struct Arrival<'a> {
    room: &'a RoomId,
    author: &'a UserId,
    id: MessageId,
    /// The room's event number and the hub's acceptance time.
    event: u64,
    ts: u64,
    /// This device's clock when the message arrived.
    now: u64,
    /// Sent by this very device (not received): its files need no download.
    sent_here: bool,
}

/// The hub's acceptance of a sent message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SentMessage {
    #[serde(serialize_with = "crate::display")]
    pub id: MessageId,
    pub event: u64,
    pub ts: u64,
}

/// A room this device is in, as its own MLS group shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoomSummary {
    /// The room URI.
    #[serde(serialize_with = "crate::display")]
    pub room: RoomId,
    /// `direct` for a fixed-membership (1:1) room.
    pub kind: RoomKind,
    pub name: Option<String>,
    /// Participants with devices in the group, sorted.
    #[serde(serialize_with = "crate::display_seq")]
    pub members: Vec<UserId>,
    /// Participants with the admin role, sorted (none in a direct room).
    #[serde(serialize_with = "crate::display_seq")]
    pub admins: Vec<UserId>,
    pub epoch: u64,
}

impl RoomSummary {
    fn new(room: RoomId, view: RoomView) -> Self {
        let RoomView {
            state,
            members,
            epoch,
        } = view;
        Self {
            kind: if state.direct {
                RoomKind::Direct
            } else {
                RoomKind::Group
            },
            name: Some(state.name.clone()).filter(|n| !n.is_empty()),
            admins: state.admins().cloned().collect(),
            members,
            epoch,
            room,
        }
    }
}

/// The users this device's user blocked, as last read from the provider: their messages are
/// dropped (a provider following a room hubbed elsewhere cannot see who sent what).
#[derive(Debug, Default)]
struct Blocked {
    users: BTreeSet<UserId>,
    /// Read during the current sync: read at most once per sync.
    fresh: bool,
}

/// What a commit should do; rebuilt from scratch on every attempt. Every commit also includes
/// the proposals pending in the room (members leaving).
enum CommitPlan {
    Add(Vec<ValidatedKeyPackage>),
    Remove(UserId),
    /// Just these devices (of this user), not their users.
    RemoveDevices(Vec<DeviceUri>),
    /// All of this user's devices but this one, whichever are in the room when the commit is
    /// built (a retry may find one more).
    RemoveOtherOwnDevices,
    /// Make this participant an admin.
    Promote(UserId),
    /// Only the pending proposals.
    Proposals,
}

impl CommitPlan {
    /// Whether the caller asked for `user` to be added, so it need not be reported as an event.
    fn adds(&self, user: &UserId) -> bool {
        matches!(self, CommitPlan::Add(kps) if kps.iter().any(|kp| kp.device.user == *user))
    }

    /// Whether the caller asked for `user` to be removed.
    fn removes(&self, user: &UserId) -> bool {
        matches!(self, CommitPlan::Remove(target) if target == user)
    }
}

/// A registered device. Methods that touch state take `&mut self`: one operation at a time. So do
/// all its `async` methods (a `Device` is not `Sync`), so that their futures are `Send` and a
/// `Device` can live in a tokio task.
pub struct Device {
    profile: Profile,
    mls: DeviceMls,
    api: ApiClient,
    account: Account,
    blocked: Blocked,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("account", &self.account)
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

impl Device {
    // --- enrolment ------------------------------------------------------------------------------

    /// Registers `user` with its first device (`POST /v1/accounts`) into a new profile, then
    /// uploads KeyPackages. Should that upload fail, the error is returned but the account is
    /// already stored: [`Device::open`] works and the next `sync` uploads them.
    pub async fn register(
        profile_dir: &Path,
        server_url: &str,
        user: &UserId,
        password: Option<&str>,
        invite: Option<&str>,
        ca_pem: Option<&[u8]>,
    ) -> Result<Device> {
        let (profile, api) = Self::fresh_profile(profile_dir, server_url, ca_pem)?;
        let signature_key = Self::new_signature_key(&profile)?;
        let request = RegisterRequest {
            user: user.to_string(),
            password: password.map(str::to_owned),
            invite: invite.map(str::to_owned),
            device_name: None,
            signature_key: signature_key.clone(),
        };
        let session = api.register(&request).await?;
        Self::enrol(profile, api, session, signature_key).await
    }

    /// Logs a further device of an existing user in (`POST /v1/sessions`) into a new profile.
    pub async fn login(
        profile_dir: &Path,
        server_url: &str,
        user: &UserId,
        password: &str,
        ca_pem: Option<&[u8]>,
    ) -> Result<Device> {
        let (profile, api) = Self::fresh_profile(profile_dir, server_url, ca_pem)?;
        let signature_key = Self::new_signature_key(&profile)?;
        let request = LoginRequest {
            user: user.to_string(),
            password: password.to_owned(),
            device_name: None,
            signature_key: signature_key.clone(),
        };
        let session = api.login(&request).await?;
        Self::enrol(profile, api, session, signature_key).await
    }

    /// Reopens the device stored in `profile_dir`.
    pub fn open(profile_dir: &Path, ca_pem: Option<&[u8]>) -> Result<Device> {
        let profile = Profile::open_existing(profile_dir)?;
        let account = profile.account()?.ok_or(ClientError::NotRegistered)?;
        let api = ApiClient::new(&account.server_url, ca_pem)?.with_token(account.token.clone());
        let me = DeviceUri::new(account.user.clone(), account.device_id.clone());
        let mls = DeviceMls::load(profile.conn(), me, &account.signature_key)?;
        Ok(Device {
            profile,
            mls,
            api,
            account,
            blocked: Blocked::default(),
        })
    }

    fn fresh_profile(
        profile_dir: &Path,
        server_url: &str,
        ca_pem: Option<&[u8]>,
    ) -> Result<(Profile, ApiClient)> {
        let api = ApiClient::new(server_url, ca_pem)?;
        let profile = Profile::create_or_open(profile_dir)?;
        if let Some(existing) = profile.account()? {
            return Err(ClientError::AlreadyRegistered(existing.user.to_string()));
        }
        Ok((profile, api))
    }

    fn new_signature_key(profile: &Profile) -> Result<Vec<u8>> {
        let signer = DeviceMls::generate_signer(profile.conn())?;
        Ok(signer.public().to_vec())
    }

    /// Stores the new account and publishes the device's first KeyPackages.
    async fn enrol(
        profile: Profile,
        api: ApiClient,
        session: SessionResponse,
        signature_key: Vec<u8>,
    ) -> Result<Device> {
        let user = UserId::parse(&session.user)
            .map_err(|e| ClientError::Protocol(format!("server returned a bad user: {e}")))?;
        let device_id = DeviceId::parse(&session.device_id)
            .map_err(|e| ClientError::Protocol(format!("server returned a bad device id: {e}")))?;
        let account = Account {
            server_url: api.base_url().to_owned(),
            user,
            device_id,
            token: session.token,
            signature_key,
        };
        profile.set_account(&account)?;
        let me = DeviceUri::new(account.user.clone(), account.device_id.clone());
        let mls = DeviceMls::load(profile.conn(), me, &account.signature_key)?;
        let api = api.with_token(account.token.clone());
        let mut device = Device {
            profile,
            mls,
            api,
            account,
            blocked: Blocked::default(),
        };
        tracing::info!(user = %device.user(), device = %device.device_id(), "device enrolled");
        device.upload_key_packages(KEY_PACKAGE_BATCH, true).await?;
        Ok(device)
    }

    // --- accessors ------------------------------------------------------------------------------

    pub fn user(&self) -> &UserId {
        &self.account.user
    }

    pub fn device_id(&self) -> &DeviceId {
        &self.account.device_id
    }

    /// `mimi://domain/d/handle/device`, the identity in this device's MLS credential.
    pub fn device_uri(&self) -> &DeviceUri {
        self.mls.device_uri()
    }

    pub fn server_url(&self) -> &str {
        &self.account.server_url
    }

    /// The authenticated API client, for endpoints `Device` does not wrap (e.g. devices).
    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    // --- contacts (consent) ---------------------------------------------------------------------

    /// Asks `user` for consent to contact them: needed before rooms with a user of another
    /// provider (claiming their KeyPackages is [`ClientError::NoConsent`] until they accept).
    /// Idempotent; answers our outgoing relation, `granted` at once for a user of our provider.
    pub async fn contact_request(&mut self, user: &UserId) -> Result<ContactInfo> {
        self.require_other_user(user)?;
        self.api.contact_request(user).await
    }

    /// The contact requests other users sent us that we have not answered yet.
    pub async fn contact_requests(&mut self) -> Result<Vec<ContactInfo>> {
        self.api.contact_requests().await
    }

    /// Consents to `user`'s contact request: they may then add us to rooms and message us.
    pub async fn contact_accept(&mut self, user: &UserId) -> Result<ContactInfo> {
        self.require_other_user(user)?;
        let answer = self.api.contact_accept(user).await?;
        if answer.state == ContactState::Granted {
            self.blocked.users.remove(user);
        }
        Ok(answer)
    }

    /// Refuses `user`'s contact request, or revokes a consent given earlier. From then on this
    /// device drops their messages (the provider cannot, in rooms hubbed elsewhere).
    pub async fn contact_block(&mut self, user: &UserId) -> Result<ContactInfo> {
        self.require_other_user(user)?;
        let answer = self.api.contact_block(user).await?;
        self.blocked.users.insert(user.clone());
        Ok(answer)
    }

    fn require_other_user(&self, user: &UserId) -> Result<()> {
        if user == self.user() {
            return Err(ClientError::InvalidInput(
                "contact requests are between two users; this is yourself".into(),
            ));
        }
        Ok(())
    }

    // --- rooms ----------------------------------------------------------------------------------

    /// Creates a group room with `members` (and this user's other devices) in one commit; this
    /// user is its first admin. [`ClientError::NoConsent`] if a member of another provider has
    /// not accepted our contact request; nothing is created then.
    pub async fn create_room(&mut self, name: Option<&str>, members: &[UserId]) -> Result<RoomId> {
        self.create_room_of_kind(name, None, members).await
    }

    /// The direct room with `peer`: an existing one if there is one, else a new one
    /// ([`ClientError::NoConsent`] if `peer` is on another provider and has not consented).
    pub async fn direct_room(&mut self, peer: &UserId) -> Result<RoomId> {
        if peer == self.user() {
            return Err(ClientError::InvalidInput(
                "a direct room needs another user than yourself".into(),
            ));
        }
        if let Some(room) = self.existing_direct_room(peer).await? {
            return Ok(room);
        }
        let peers = [peer.clone()];
        self.create_room_of_kind(None, Some(peer), &peers).await
    }

    /// The direct room with `peer` that this device is in, if there is one; never creates one.
    /// Looks at this device's rooms, then again after processing what is queued (a Welcome into
    /// one may be waiting there).
    pub async fn existing_direct_room(&mut self, peer: &UserId) -> Result<Option<RoomId>> {
        if let Some(room) = self.local_direct_room(peer)? {
            return Ok(Some(room));
        }
        self.catch_up().await?;
        self.local_direct_room(peer)
    }

    /// The first (by URI, so both sides pick the same should two exist) of this device's
    /// direct rooms whose participants are exactly this user and `peer`.
    fn local_direct_room(&self, peer: &UserId) -> Result<Option<RoomId>> {
        let wanted: BTreeSet<&UserId> = [self.user(), peer].into_iter().collect();
        for (room, view) in self.room_views()? {
            let users: BTreeSet<&UserId> = view.state.participants.keys().collect();
            if view.state.direct && users == wanted {
                return Ok(Some(room));
            }
        }
        Ok(None)
    }

    /// Adds every device of `user` to the room, and `user` to its participants: an admin's
    /// privilege in a group room ([`ClientError::NoConsent`] if `user` is on another provider
    /// and has not consented).
    pub async fn add_member(&mut self, room: &RoomId, user: &UserId) -> Result<()> {
        // The room's roles decide (a promotion may be waiting in the queue).
        self.catch_up().await?;
        self.require_member(room)?;
        if self
            .mls
            .member_users(self.profile.conn(), room)?
            .contains(user)
        {
            return Err(ClientError::InvalidInput(format!(
                "{user} is already a member of room {room}"
            )));
        }
        // Refused before claiming, so no KeyPackage of theirs is spent in vain.
        self.check_may_add_users(room)?;
        let key_packages = self.claim(user, room).await?;
        self.commit(room, &CommitPlan::Add(key_packages)).await?;
        Ok(())
    }

    /// The room's policy on adding users, as the room's state says (the hub checks it too).
    fn check_may_add_users(&self, room: &RoomId) -> Result<()> {
        let state = self.mls.room_view(self.profile.conn(), room)?.state;
        if state.direct {
            Err(ClientError::policy(format!(
                "room {room} is a direct room: its participants never change"
            )))
        } else if !state.is_admin(self.user()) {
            Err(ClientError::not_admin(format!(
                "only an admin may add users to room {room}"
            )))
        } else {
            Ok(())
        }
    }

    /// Makes `user`, a member of the group room, an admin (only admins may add and remove
    /// other users, and promote): a commit changing the room's participant list.
    pub async fn promote(&mut self, room: &RoomId, user: &UserId) -> Result<()> {
        self.catch_up().await?;
        self.require_member(room)?;
        self.commit(room, &CommitPlan::Promote(user.clone()))
            .await?;
        Ok(())
    }

    /// Removes every device of `user` from the room, and `user` from its participants.
    pub async fn remove_member(&mut self, room: &RoomId, user: &UserId) -> Result<()> {
        self.catch_up().await?;
        self.require_member(room)?;
        self.commit(room, &CommitPlan::Remove(user.clone())).await?;
        Ok(())
    }

    /// Leaves a group room with all of this user's devices: commits the removal of the user's
    /// other devices, then proposes this device's removal to the hub, which queues it for the
    /// other members (one of them commits it), and forgets the room's MLS state. Afterwards the
    /// room answers [`ClientError::NotMember`], as after being removed.
    pub async fn leave(&mut self, room: &RoomId) -> Result<()> {
        self.require_member(room)?;
        if self.mls.room_view(self.profile.conn(), room)?.state.direct {
            return Err(ClientError::InvalidInput(format!(
                "room {room} is a direct room, which nobody can leave"
            )));
        }
        // openmls refuses to propose while a commit of ours is pending.
        self.resolve_unanswered_commits().await?;
        self.remove_other_own_devices(room).await?;
        let mut attempt = 1;
        loop {
            let proposal = self
                .profile
                .transaction(|| self.mls.leave_proposal(self.profile.conn(), room))?;
            match self
                .api
                .post_proposal(room, &ProposalRequest { proposal })
                .await
            {
                Ok(accepted) => {
                    self.forget_left_room(room)?;
                    tracing::info!(%room, event = accepted.event, "left room");
                    self.report_left_rooms().await?;
                    return Ok(());
                }
                Err(e @ ClientError::Unreachable(_)) => {
                    // The hub may have taken it: keep the proposal, so the commit removing us
                    // can still be processed; calling `leave` again resends the same proposal.
                    return Err(e);
                }
                Err(e) if e.is_retryable() && attempt < MAX_ATTEMPTS => {
                    tracing::debug!(%room, attempt, "leave refused ({e}); retrying");
                    self.withdraw_leave(room)?;
                    self.recover_from(&e, attempt).await?;
                    if !self.mls.has_group(self.profile.conn(), room)? {
                        // The catch-up merged a commit removing us: we are out all the same.
                        return Ok(());
                    }
                    attempt += 1;
                }
                Err(e) => {
                    self.withdraw_leave(room)?;
                    return Err(e);
                }
            }
        }
    }

    fn withdraw_leave(&self, room: &RoomId) -> Result<()> {
        self.profile.transaction(|| {
            let conn = self.profile.conn();
            if self.mls.has_group(conn, room)? {
                self.mls.withdraw_leave(conn, room)?;
            }
            Ok(())
        })
    }

    /// Deletes the room's MLS state after the hub accepted our leave proposal. The room stays
    /// known, so it then says "not a member" and its remaining entries are skipped; its
    /// provider is to be told (see [`Device::report_left_rooms`]).
    fn forget_left_room(&self, room: &RoomId) -> Result<()> {
        self.profile.transaction(|| {
            self.profile.clear_pending_commit(room)?;
            self.profile.remove_proposal_room(room)?;
            self.profile.add_left_unreported(room)?;
            self.mls.delete_group(self.profile.conn(), room)
        })
    }

    /// Tells the provider about the rooms this device left or was removed from
    /// (`POST /v1/rooms/{room}/left`), so it stops delivering them; what fails is told at the
    /// next sync. Only this device's own removal from its account is an error.
    async fn report_left_rooms(&mut self) -> Result<()> {
        for room in self.profile.left_unreported()? {
            // Back in the room meanwhile (a Welcome): nothing to report.
            if !self.mls.has_group(self.profile.conn(), &room)? {
                match self.api.room_left(&room).await {
                    // The provider no longer knows the room: nothing to stop.
                    Ok(()) | Err(ClientError::Api { status: 404, .. }) => {}
                    Err(e @ (ClientError::DeviceRemoved | ClientError::Storage(_))) => {
                        return Err(e)
                    }
                    Err(e) => {
                        tracing::warn!(%room, "cannot tell the provider we left, yet: {e}");
                        continue;
                    }
                }
            }
            self.profile.remove_left_unreported(&room)?;
        }
        Ok(())
    }

    /// The rooms this device is in, from its own MLS groups. A group whose room state cannot
    /// be read (not a Parley room) is skipped.
    pub fn rooms(&self) -> Result<Vec<RoomSummary>> {
        Ok(self
            .room_views()?
            .into_iter()
            .map(|(room, view)| RoomSummary::new(room, view))
            .collect())
    }

    /// One room this device is in, from its own MLS group.
    pub fn room_info(&self, room: &RoomId) -> Result<RoomSummary> {
        self.require_member(room)?;
        let view = self.mls.room_view(self.profile.conn(), room)?;
        Ok(RoomSummary::new(room.clone(), view))
    }

    fn room_views(&self) -> Result<Vec<(RoomId, RoomView)>> {
        let conn = self.profile.conn();
        let mut views = Vec::new();
        for room in self.mls.rooms(conn)? {
            match self.mls.room_view(conn, &room) {
                Ok(view) => views.push((room, view)),
                Err(e @ ClientError::Storage(_)) => return Err(e),
                Err(e) => tracing::warn!(%room, "skipping a room: {e}"),
            }
        }
        Ok(views)
    }

    /// The last `limit` messages of a room, oldest first, as they stand after edits, deletes
    /// and reactions. Expired messages are deleted from the profile first, never shown.
    pub fn history(&self, room: &RoomId, limit: usize) -> Result<Vec<HistoryEntry>> {
        let now = now_ms();
        self.profile.purge_expired(now)?;
        self.profile.history(room, limit, now)
    }

    /// The message (or reaction) of `room`'s history that `id` names: a whole MessageId (64 hex
    /// digits), or the start of one, at least [`MIN_ID_PREFIX`] digits, that fits only one.
    /// [`ClientError::UnknownMessage`] if this device has no such message (yet: a
    /// [`Device::catch_up`] may bring it).
    pub fn find_message(&self, room: &RoomId, id: &str) -> Result<MessageId> {
        if id.len() < MIN_ID_PREFIX || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ClientError::InvalidInput(format!(
                "{id:?} is no message id: give its 64 hex digits, or at least the first {MIN_ID_PREFIX}"
            )));
        }
        self.profile.purge_expired(now_ms())?;
        match self.profile.ids_starting_with(room, id)?.as_slice() {
            [one] => Ok(*one),
            [] => Err(ClientError::UnknownMessage {
                room: room.clone(),
                id: id.to_owned(),
            }),
            _ => Err(ClientError::AmbiguousMessage {
                room: room.clone(),
                prefix: id.to_owned(),
            }),
        }
    }

    /// Creates a room hubbed by our provider: a direct room with `peer`, or else a group room.
    async fn create_room_of_kind(
        &mut self,
        name: Option<&str>,
        peer: Option<&UserId>,
        members: &[UserId],
    ) -> Result<RoomId> {
        // The id comes first, since claims name the room their KeyPackages are for; then claim
        // before the group exists, so an unknown user or a missing consent fails with nothing to
        // undo. Other users first: they can refuse, and then none of our own devices' one-time
        // KeyPackages is spent.
        let room = RoomId::from_random(self.user().domain(), rand::random());
        let mut key_packages = Vec::new();
        let others: BTreeSet<&UserId> = members.iter().filter(|u| *u != self.user()).collect();
        for user in others {
            key_packages.extend(self.claim(user, &room).await?);
        }
        key_packages.extend(self.own_other_devices_key_packages(&room).await?);
        let hub = self.api.provider().await?;
        let state = match peer {
            Some(peer) => RoomState::direct(room.clone(), self.user(), peer, None),
            None => RoomState::group(room.clone(), name.unwrap_or(""), self.user(), None),
        };
        let group = self.profile.transaction(|| {
            self.mls
                .create_group(self.profile.conn(), &state, &hub.external_sender)
        })?;
        let request = CreateRoomRequest {
            room_id: room.to_string(),
            group_info: group.group_info,
            ratchet_tree: group.ratchet_tree,
        };
        if let Err(e) = self.api.create_room(&request).await {
            self.forget_group(&room);
            return Err(e);
        }
        tracing::info!(%room, direct = state.direct, "room created");
        if !key_packages.is_empty() {
            self.commit(&room, &CommitPlan::Add(key_packages)).await?;
        }
        Ok(room)
    }

    /// The claim of `user`'s KeyPackages for `room` (only `device`'s, if given), with the MIMI
    /// `KeyMaterialRequest` this device signs for it.
    pub fn claim_request(
        &self,
        user: &UserId,
        room: &RoomId,
        device: Option<&DeviceId>,
    ) -> Result<ClaimRequest> {
        Ok(ClaimRequest {
            room: room.to_string(),
            device: device.map(DeviceId::to_string),
            key_material_request: self.mls.key_material_request(user, room)?,
        })
    }

    /// Claims one KeyPackage per device of `user` for `room` and validates them.
    async fn claim(&mut self, user: &UserId, room: &RoomId) -> Result<Vec<ValidatedKeyPackage>> {
        let request = self.claim_request(user, room, None)?;
        let claimed = self.api.claim_key_packages(user, &request).await?;
        let valid = self.validate_claimed(user, &claimed.key_packages);
        if valid.is_empty() {
            return Err(ClientError::Protocol(format!(
                "the server offered no usable KeyPackage for {user}"
            )));
        }
        Ok(valid)
    }

    /// Keeps the claimed packages that validate and match the device the server says they are
    /// for; others are skipped with a warning (that device then stays out of the room).
    fn validate_claimed(
        &self,
        user: &UserId,
        claimed: &[parley_proto::api::ClaimedKeyPackage],
    ) -> Vec<ValidatedKeyPackage> {
        claimed
            .iter()
            .filter_map(|c| {
                let checked = self
                    .mls
                    .validate_key_package(&c.key_package, user)
                    .and_then(|kp| {
                        if kp.device.device.as_str() == c.device_id {
                            Ok(kp)
                        } else {
                            Err(ClientError::Protocol(format!(
                                "KeyPackage of {} offered as device {}",
                                kp.device, c.device_id
                            )))
                        }
                    });
                checked
                    .inspect_err(|e| tracing::warn!(%user, device = %c.device_id, "skipping KeyPackage: {e}"))
                    .ok()
            })
            .collect()
    }

    fn require_member(&self, room: &RoomId) -> Result<()> {
        if self.mls.has_group(self.profile.conn(), room)? {
            return Ok(());
        }
        if self.profile.knows_room(room)? {
            Err(ClientError::NotMember(room.clone()))
        } else {
            Err(ClientError::UnknownRoom(room.clone()))
        }
    }

    /// Best-effort cleanup of a group the hub never accepted.
    fn forget_group(&self, room: &RoomId) {
        if let Err(e) = self
            .profile
            .transaction(|| self.mls.delete_group(self.profile.conn(), room))
        {
            tracing::warn!(%room, "cannot delete abandoned group: {e}");
        }
    }

    // --- commits --------------------------------------------------------------------------------

    /// Builds, posts and merges a commit, rebuilding it after `wrong_epoch` (up to 5 attempts).
    /// `None` when there was nothing to commit.
    async fn commit(&mut self, room: &RoomId, plan: &CommitPlan) -> Result<Option<Accepted>> {
        // openmls refuses to build a commit while an earlier one is pending.
        self.resolve_unanswered_commits().await?;
        let mut attempt = 1;
        loop {
            let Some(request) = self.profile.transaction(|| self.build_commit(room, plan))? else {
                return Ok(None);
            };
            match self.api.post_commit(room, &request).await {
                Ok(accepted) => {
                    self.finish_commit(room, Some(plan))?;
                    tracing::info!(%room, epoch = accepted.epoch, "commit accepted");
                    return Ok(Some(accepted));
                }
                Err(e @ ClientError::Unreachable(_)) => {
                    // The hub may or may not have accepted it: the pending-commit marker
                    // makes the next sync find out before touching the room.
                    return Err(e);
                }
                Err(e) if e.is_retryable() && attempt < MAX_ATTEMPTS => {
                    tracing::debug!(%room, attempt, "commit refused ({e}); retrying");
                    self.discard_commit(room)?;
                    self.recover_from(&e, attempt).await?;
                    attempt += 1;
                }
                Err(e) => {
                    self.discard_commit(room)?;
                    return Err(e);
                }
            }
        }
    }

    /// Stages the commit `plan` asks for and notes it as posted (with its request, see
    /// [`Device::resolve_unanswered_commits`]); `None` when there is nothing to commit.
    fn build_commit(&self, room: &RoomId, plan: &CommitPlan) -> Result<Option<CommitRequest>> {
        let conn = self.profile.conn();
        let epoch = self.mls.epoch(conn, room)?;
        let commit = match plan {
            CommitPlan::Add(key_packages) => self.mls.add_members(conn, room, key_packages)?,
            CommitPlan::Remove(user) => Some(self.mls.remove_user(conn, room, user)?),
            CommitPlan::RemoveDevices(devices) => self.mls.remove_devices(conn, room, devices)?,
            CommitPlan::RemoveOtherOwnDevices => self.mls.remove_other_own_devices(conn, room)?,
            CommitPlan::Promote(user) => Some(self.mls.promote(conn, room, user)?),
            CommitPlan::Proposals => self.mls.commit_pending_proposals(conn, room)?,
        };
        let Some(commit) = commit else {
            return Ok(None);
        };
        let request = CommitRequest {
            commit: commit.commit,
            welcome: commit.welcome,
            group_info: commit.group_info,
            ratchet_tree: commit.ratchet_tree,
        };
        let stored = serde_json::to_string(&request)
            .map_err(|e| ClientError::Storage(format!("cannot store the commit: {e}")))?;
        self.profile.set_pending_commit(room, epoch, &stored)?;
        Ok(Some(request))
    }

    /// Merges our pending commit once the hub accepted it, and reports membership changes the
    /// caller did not ask for (members whose leave proposals it included). With no `plan` (a
    /// commit resolved after a crash), every change is reported.
    fn finish_commit(&self, room: &RoomId, plan: Option<&CommitPlan>) -> Result<()> {
        let conn = self.profile.conn();
        self.profile.transaction(|| {
            self.profile.clear_pending_commit(room)?;
            if !self.mls.has_group(conn, room)? {
                return Ok(());
            }
            let before: BTreeSet<UserId> = self.mls.member_users(conn, room)?.into_iter().collect();
            self.mls.merge_pending_commit(conn, room)?;
            let after: BTreeSet<UserId> = self.mls.member_users(conn, room)?.into_iter().collect();
            let added: Vec<UserId> = after
                .difference(&before)
                .filter(|u| plan.is_none_or(|p| !p.adds(u)))
                .cloned()
                .collect();
            let removed: Vec<UserId> = before
                .difference(&after)
                .filter(|u| plan.is_none_or(|p| !p.removes(u)))
                .cloned()
                .collect();
            if !added.is_empty() || !removed.is_empty() {
                self.profile.push_event(&Event::Members {
                    room: room.clone(),
                    added,
                    removed,
                })?;
            }
            Ok(())
        })
    }

    /// Drops our pending commit after the hub refused it.
    fn discard_commit(&self, room: &RoomId) -> Result<()> {
        let conn = self.profile.conn();
        self.profile.transaction(|| {
            self.profile.clear_pending_commit(room)?;
            if self.mls.has_group(conn, room)? {
                self.mls.clear_pending_commit(conn, room)?;
            }
            Ok(())
        })
    }

    /// Settles commits posted before a crash or a lost answer (see [`commit_taken`]).
    async fn resolve_unanswered_commits(&mut self) -> Result<()> {
        let unanswered = self.profile.pending_commits()?;
        if unanswered.is_empty() {
            return Ok(());
        }
        let queued = self.api.queue(Some(QUEUE_PAGE_MAX)).await?.entries;
        for pending in unanswered {
            let accepted = commit_taken(&self.api, &pending, &queued).await?;
            let room = pending.room;
            tracing::info!(%room, epoch = pending.epoch, accepted, "resolved an unanswered commit");
            if accepted {
                self.finish_commit(&room, None)?;
            } else {
                self.discard_commit(&room)?;
            }
        }
        Ok(())
    }

    /// Prepares a retry after a retryable refusal: catch up on `wrong_epoch` or
    /// `pending_proposals`, else back off.
    async fn recover_from(&mut self, e: &ClientError, attempt: u32) -> Result<()> {
        if e.needs_sync() {
            self.settle_and_drain().await.map(drop)
        } else {
            tokio::time::sleep(RETRY_BACKOFF * attempt).await;
            Ok(())
        }
    }

    /// Commits the proposals (members leaving) that arrived in our rooms. Every member does
    /// this; the hub takes the first commit, and the others' commits are refused, after which
    /// their catch-up merges the winner's commit and nothing is left to commit. Failures are
    /// left for the next sync (network, retries exhausted) or reported as an event.
    async fn commit_pending_proposals(&mut self) -> Result<()> {
        for room in self.profile.proposal_rooms()? {
            let conn = self.profile.conn();
            if !self.mls.has_group(conn, &room)? || !self.mls.has_pending_proposals(conn, &room)? {
                self.profile.remove_proposal_room(&room)?;
                continue;
            }
            match self.commit(&room, &CommitPlan::Proposals).await {
                Ok(_) => {}
                Err(e @ ClientError::Storage(_)) => return Err(e),
                Err(e) if e.is_retryable() || matches!(e, ClientError::Unreachable(_)) => {
                    tracing::warn!(%room, "cannot commit pending proposals yet: {e}");
                    continue;
                }
                // We were removed meanwhile: nothing is ours to commit.
                Err(ClientError::NotMember(_)) => {}
                Err(e) => {
                    tracing::warn!(%room, "cannot commit pending proposals: {e}");
                    self.profile.push_event(&Event::Error {
                        room: Some(room.clone()),
                        detail: format!("cannot commit a member's leaving: {e}"),
                    })?;
                }
            }
            self.profile.remove_proposal_room(&room)?;
        }
        Ok(())
    }

    // --- messages -------------------------------------------------------------------------------

    /// Sends a Markdown text message to a room (MIMI content in an MLS PrivateMessage).
    /// [`ClientError::NoConsent`] in a direct room whose other user blocked us.
    pub async fn send_text(&mut self, room: &RoomId, text: &str) -> Result<SentMessage> {
        self.send(room, text, &SendOptions::default()).await
    }

    /// Sends a Markdown text message as a reply and/or expiring, as `options` say. A reply
    /// must name a message of the room's history ([`ClientError::UnknownMessage`]).
    pub async fn send(
        &mut self,
        room: &RoomId,
        text: &str,
        options: &SendOptions,
    ) -> Result<SentMessage> {
        self.require_member(room)?;
        if let Some(target) = &options.reply_to {
            self.require_message(room, target)?;
        }
        let expires = options
            .expires_in
            .map(|lifetime| expiration_after(now_ms(), lifetime))
            .transpose()?;
        let mut content = self
            .content_for(room, |me, uri| {
                MimiContent::markdown(rand::random(), me, uri, text)
            })
            .await?;
        if let Some(target) = options.reply_to {
            content = content.replying_to(target);
        }
        if let Some(expires) = expires {
            content = content.expiring(expires);
        }
        self.post_content(room, content).await
    }

    /// Replies to the message `to` of the room.
    pub async fn reply(
        &mut self,
        room: &RoomId,
        to: &MessageId,
        text: &str,
    ) -> Result<SentMessage> {
        let options = SendOptions {
            reply_to: Some(*to),
            ..SendOptions::default()
        };
        self.send(room, text, &options).await
    }

    /// Sends a message that receivers stop showing, and providers drop, after `lifetime`.
    pub async fn send_expiring(
        &mut self,
        room: &RoomId,
        text: &str,
        lifetime: Duration,
    ) -> Result<SentMessage> {
        let options = SendOptions {
            expires_in: Some(lifetime),
            ..SendOptions::default()
        };
        self.send(room, text, &options).await
    }

    /// Reacts to the message `target` with `emoji` (one reaction per call; send several to
    /// react with several). The answer's id names the reaction, for [`Device::delete`].
    pub async fn react(
        &mut self,
        room: &RoomId,
        target: &MessageId,
        emoji: &str,
    ) -> Result<SentMessage> {
        check_reaction(emoji)?;
        self.require_member(room)?;
        self.require_message(room, target)?;
        let content = self
            .content_for(room, |me, uri| {
                MimiContent::reaction(rand::random(), me, uri, *target, emoji)
            })
            .await?;
        let content = self.expiring_with(room, target, content)?;
        self.post_content(room, content).await
    }

    /// Replaces the text of our message `target`; only its author may
    /// ([`ClientError::NotAuthor`]).
    pub async fn edit(
        &mut self,
        room: &RoomId,
        target: &MessageId,
        text: &str,
    ) -> Result<SentMessage> {
        self.require_member(room)?;
        match self.own(room, target, "edit")? {
            Authored::Message { .. } => {}
            Authored::Reaction { .. } => {
                return Err(ClientError::InvalidInput(format!(
                    "{target} is a reaction; delete it and react again instead"
                )))
            }
        }
        let content = self
            .content_for(room, |me, uri| {
                MimiContent::edit(rand::random(), me, uri, *target, text)
            })
            .await?;
        let content = self.expiring_with(room, target, content)?;
        self.post_content(room, content).await
    }

    /// `content` about message `target` expires with it: the providers then drop its queue
    /// entries when the message's own go, instead of keeping them for the full retention.
    fn expiring_with(
        &self,
        room: &RoomId,
        target: &MessageId,
        content: MimiContent,
    ) -> Result<MimiContent> {
        Ok(match self.profile.message_expiry(room, target)? {
            Some(deadline_ms) => {
                let secs = u32::try_from(deadline_ms.div_ceil(1000)).unwrap_or(u32::MAX);
                content.expiring(Expiration::at(secs))
            }
            None => content,
        })
    }

    /// Retracts our message `target`, or removes our reaction `target` (an "unlike"). The
    /// attachment of a retracted message is deleted from our provider too, once the retraction
    /// is sent (best effort: otherwise it goes at the provider's expiry).
    pub async fn delete(&mut self, room: &RoomId, target: &MessageId) -> Result<SentMessage> {
        self.require_member(room)?;
        self.own(room, target, "delete")?;
        let attachment = self.profile.asset_url(room, target)?;
        let content = self
            .content_for(room, |me, uri| {
                MimiContent::delete(rand::random(), me, uri, *target)
            })
            .await?;
        let sent = self.post_content(room, content).await?;
        if let Some(url) = attachment {
            self.forget_upload(&url).await;
        }
        Ok(sent)
    }

    /// `target` must be a message (not deleted, not expired) in the room's history.
    fn require_message(&self, room: &RoomId, target: &MessageId) -> Result<()> {
        self.profile.purge_expired(now_ms())?;
        match self.profile.authored(room, target, now_ms())? {
            Some(Authored::Message { deleted: false, .. }) => Ok(()),
            _ => Err(ClientError::UnknownMessage {
                room: room.clone(),
                id: target.to_hex(),
            }),
        }
    }

    /// `target` must be our own message or reaction in the room's history, for `action`.
    fn own(&self, room: &RoomId, target: &MessageId, action: &'static str) -> Result<Authored> {
        self.profile.purge_expired(now_ms())?;
        let unknown = || ClientError::UnknownMessage {
            room: room.clone(),
            id: target.to_hex(),
        };
        let found = self
            .profile
            .authored(room, target, now_ms())?
            .ok_or_else(unknown)?;
        let author = match &found {
            Authored::Message {
                deleted: false,
                sender,
            }
            | Authored::Reaction { sender } => sender,
            Authored::Message { deleted: true, .. } => return Err(unknown()),
        };
        if author != self.user() {
            return Err(ClientError::NotAuthor {
                id: *target,
                author: author.clone(),
                action,
            });
        }
        Ok(found)
    }

    /// Builds content from this device's user for the room, once any commit of unknown fate
    /// is settled (it would make the message's epoch a guess).
    async fn content_for(
        &mut self,
        room: &RoomId,
        build: impl FnOnce(&str, &str) -> MimiContent,
    ) -> Result<MimiContent> {
        self.resolve_unanswered_commits().await?;
        Ok(build(&self.user().to_uri(), room.as_str()))
    }

    /// Encrypts and posts content, retrying what the hub refuses retryably, then files it in
    /// our own history exactly as receivers file it.
    async fn post_content(&mut self, room: &RoomId, content: MimiContent) -> Result<SentMessage> {
        // The id and encoding stay fixed across retries, so receivers can deduplicate.
        let id = content.message_id();
        let plaintext = content.encode();
        // The providers cannot read `expires`, so the message's cleartext AAD tells them when
        // to drop its entries.
        let expires_at = content.expires.map(|e| e.deadline_ms(now_ms()));
        let mut attempt = 1;
        loop {
            let message = self.profile.transaction(|| {
                self.mls
                    .encrypt(self.profile.conn(), room, &plaintext, expires_at)
            })?;
            let request = SendRequest { message };
            match self.api.send_message(room, &request).await {
                Ok(accepted) => return self.record_sent(room, id, &content, &accepted),
                Err(e) if e.is_retryable() && attempt < MAX_ATTEMPTS => {
                    tracing::debug!(%room, attempt, "message refused ({e}); retrying");
                    self.recover_from(&e, attempt).await?;
                    self.require_member(room)?;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Encrypts a text message for the room without sending it, for tools that post it
    /// themselves (load tests).
    pub fn encrypt_text(&mut self, room: &RoomId, text: &str) -> Result<Vec<u8>> {
        let content =
            MimiContent::markdown(rand::random(), &self.user().to_uri(), room.as_str(), text);
        self.encrypt_content(room, &content, None)
    }

    /// `count` distinct text messages for the room, encrypted without sending, in one profile
    /// transaction (load tests pre-encrypt their whole run with it).
    pub fn encrypt_texts(
        &mut self,
        room: &RoomId,
        text: &str,
        count: usize,
    ) -> Result<Vec<Vec<u8>>> {
        self.require_member(room)?;
        let sender = self.user().to_uri();
        self.profile.transaction(|| {
            (0..count)
                .map(|_| {
                    let content =
                        MimiContent::markdown(rand::random(), &sender, room.as_str(), text);
                    self.mls
                        .encrypt(self.profile.conn(), room, &content.encode(), None)
                })
                .collect()
        })
    }

    /// [`Device::encrypt_text`] for a message expiring at `expires_at_ms`, whatever that is
    /// (also a time already past, to see a provider refuse it).
    pub fn encrypt_text_expiring(
        &mut self,
        room: &RoomId,
        text: &str,
        expires_at_ms: u64,
    ) -> Result<Vec<u8>> {
        let secs = u32::try_from(expires_at_ms.div_ceil(1000)).unwrap_or(u32::MAX);
        let content =
            MimiContent::markdown(rand::random(), &self.user().to_uri(), room.as_str(), text)
                .expiring(Expiration::at(secs));
        self.encrypt_content(room, &content, Some(expires_at_ms))
    }

    fn encrypt_content(
        &self,
        room: &RoomId,
        content: &MimiContent,
        expires_at_ms: Option<u64>,
    ) -> Result<Vec<u8>> {
        self.require_member(room)?;
        let plaintext = content.encode();
        self.profile.transaction(|| {
            self.mls
                .encrypt(self.profile.conn(), room, &plaintext, expires_at_ms)
        })
    }

    fn record_sent(
        &self,
        room: &RoomId,
        id: MessageId,
        content: &MimiContent,
        accepted: &Accepted,
    ) -> Result<SentMessage> {
        let arrival = Arrival {
            room,
            author: self.user(),
            id,
            event: accepted.event,
            ts: accepted.ts,
            now: now_ms(),
            sent_here: true,
        };
        self.profile.transaction(|| {
            self.profile.mark_seen(&id)?;
            self.file_content(&arrival, content).map(drop)
        })?;
        Ok(SentMessage {
            id,
            event: accepted.event,
            ts: accepted.ts,
        })
    }

    // --- sync -----------------------------------------------------------------------------------

    /// Processes everything queued for this device and returns what happened. With `wait`, if
    /// nothing was queued, waits up to that long for a push and processes it too. Then commits
    /// what is this device's to commit: members' leaving, and this user's devices joining or
    /// leaving this device's rooms (only after the server signalled a change of the user's
    /// devices, or a join; otherwise that costs nothing).
    pub async fn sync(&mut self, wait: Option<Duration>) -> Result<Vec<Event>> {
        self.blocked.fresh = false;
        let processed = self.settle_and_drain().await?;
        if processed == 0 {
            if let Some(wait) = wait {
                self.wait_for_entries(wait).await?;
            }
        }
        self.fetch_downloads().await?;
        self.send_due_receipts().await?;
        self.commit_pending_proposals().await?;
        self.report_left_rooms().await?;
        self.sync_own_devices_quietly().await?;
        self.top_up_key_packages_quietly().await;
        self.profile.purge_expired(now_ms())?;
        self.take_events()
    }

    /// Processes what is queued without handing out the events: they wait in the profile for
    /// the next `sync` (or [`Device::take_events`]). For commands that need the latest history,
    /// such as reacting to a message that just arrived. Returns the entries processed.
    pub async fn catch_up(&mut self) -> Result<usize> {
        self.blocked.fresh = false;
        self.settle_and_drain().await
    }

    /// Settles commits of unknown fate, then processes what is queued (part of a sync).
    async fn settle_and_drain(&mut self) -> Result<usize> {
        self.resolve_unanswered_commits().await?;
        self.drain_queue().await
    }

    /// Fetches and processes queue pages until the queue is empty; returns entries processed.
    async fn drain_queue(&mut self) -> Result<usize> {
        let mut processed = 0;
        let mut acked: Option<u64> = None;
        loop {
            let entries = self.api.queue(Some(QUEUE_PAGE)).await?.entries;
            let Some(last) = entries.iter().map(|e| e.seq).max() else {
                break;
            };
            if acked.is_some_and(|acked| last <= acked) {
                tracing::warn!(last, "server re-sent acknowledged entries; stopping");
                break;
            }
            processed += self.process_entries(entries).await?;
            self.api.ack(last).await?;
            acked = Some(last);
        }
        Ok(processed)
    }

    /// Waits for pushed entries until `deadline`, over the WebSocket or, failing that, polling.
    async fn wait_for_entries(&mut self, wait: Duration) -> Result<()> {
        let deadline = Instant::now() + wait;
        match self.api.connect_push().await {
            Ok(mut push) => {
                let outcome = self.wait_on_push(&mut push, deadline).await;
                push.close().await;
                match outcome {
                    Ok(_) => return Ok(()),
                    Err(e @ ClientError::Storage(_)) => return Err(e),
                    Err(e) => tracing::debug!("push failed ({e}); polling instead"),
                }
            }
            Err(e) => tracing::debug!("push unavailable ({e}); polling instead"),
        }
        self.poll_until(deadline).await
    }

    /// Processes the first pushed entries we have not seen, then whatever else is queued.
    async fn wait_on_push(&mut self, push: &mut PushConnection, deadline: Instant) -> Result<bool> {
        loop {
            let entries = match tokio::time::timeout_at(deadline, push.next_entries()).await {
                Err(_elapsed) => return Ok(false),
                Ok(entries) => entries?.ok_or_else(|| {
                    ClientError::Unreachable("the server closed the push connection".into())
                })?,
            };
            let Some(last) = entries.iter().map(|e| e.seq).max() else {
                continue;
            };
            if self.process_entries(entries).await? > 0 {
                self.api.ack(last).await?;
                self.drain_queue().await?;
                return Ok(true);
            }
        }
    }

    async fn poll_until(&mut self, deadline: Instant) -> Result<()> {
        while Instant::now() < deadline {
            tokio::time::sleep_until((Instant::now() + POLL_INTERVAL).min(deadline)).await;
            if self.drain_queue().await? > 0 {
                break;
            }
        }
        Ok(())
    }

    /// Processes entries in `seq` order, skipping those already handled; returns how many were
    /// new. Only a failure of the profile or the network aborts (nothing past it is marked done).
    async fn process_entries(&mut self, mut entries: Vec<QueueEntry>) -> Result<usize> {
        entries.sort_by_key(|e| e.seq);
        let done = self.profile.processed_seq()?;
        if entries
            .iter()
            .any(|e| e.kind == EntryKind::Message && e.seq > done)
        {
            self.refresh_blocked().await?;
        }
        let mut fresh = 0;
        for entry in entries {
            if entry.seq <= self.profile.processed_seq()? {
                continue;
            }
            fresh += 1;
            if entry.kind == EntryKind::Devices {
                self.profile.transaction(|| {
                    self.profile.set_devices_stale(true)?;
                    self.profile.set_processed_seq(entry.seq)
                })?;
                continue;
            }
            let room = RoomId::parse(&entry.room_id).ok();
            let outcome = match &room {
                None => Err(ClientError::Protocol(format!(
                    "queue entry {} names a bad room {:?}",
                    entry.seq, entry.room_id
                ))),
                Some(room) => self.process_entry(room, &entry),
            };
            match outcome {
                Ok(()) => {}
                // Not the entry's fault: stop here and retry it on the next sync.
                Err(e @ (ClientError::Storage(_) | ClientError::Unreachable(_))) => return Err(e),
                Err(e) => {
                    tracing::warn!(seq = entry.seq, room = %entry.room_id, "skipping entry: {e}");
                    let event = Event::Error {
                        room,
                        detail: e.to_string(),
                    };
                    self.profile.transaction(|| {
                        self.profile.set_processed_seq(entry.seq)?;
                        self.profile.push_event(&event)
                    })?;
                }
            }
        }
        Ok(fresh)
    }

    /// Reads which users our user blocked, once per sync (see [`Blocked`]). A provider that
    /// cannot say (an error other than the network) leaves the list as it was.
    async fn refresh_blocked(&mut self) -> Result<()> {
        if self.blocked.fresh {
            return Ok(());
        }
        match self.api.blocked_contacts().await {
            Ok(contacts) => {
                self.blocked.users = contacts
                    .iter()
                    .filter_map(|c| UserId::parse(&c.user).ok())
                    .collect();
            }
            Err(e @ (ClientError::Unreachable(_) | ClientError::DeviceRemoved)) => return Err(e),
            Err(e) => tracing::warn!("cannot read the blocked users: {e}"),
        }
        self.blocked.fresh = true;
        Ok(())
    }

    fn process_entry(&self, room: &RoomId, entry: &QueueEntry) -> Result<()> {
        match entry.kind {
            EntryKind::Welcome => self.process_welcome(room, entry),
            EntryKind::Commit | EntryKind::Message | EntryKind::Proposal => self
                .profile
                .transaction(|| self.process_group_message(room, entry)),
            EntryKind::Devices => Ok(()), // handled by `process_entries`: it names no room
        }
    }

    /// Joins from a Welcome and the ratchet tree that came with it, if the group's room state
    /// names the entry's room (else nothing is joined: the entry becomes an error event).
    fn process_welcome(&self, room: &RoomId, entry: &QueueEntry) -> Result<()> {
        let view = self.profile.transaction(|| {
            let conn = self.profile.conn();
            self.mls
                .join(conn, &entry.data, entry.ratchet_tree.as_deref(), room)?;
            let view = self.mls.room_view(conn, room)?;
            let summary = RoomSummary::new(room.clone(), view.clone());
            self.profile.push_event(&Event::Joined {
                room: room.clone(),
                name: summary.name,
                kind: Some(summary.kind),
            })?;
            // Back in a room we had left: the provider is not to stop delivering it.
            self.profile.remove_left_unreported(room)?;
            // Whoever added us may not have known all of our user's devices: check the room.
            self.profile.set_devices_stale(true)?;
            self.profile.set_processed_seq(entry.seq)?;
            Ok(view)
        })?;
        tracing::info!(%room, epoch = view.epoch, "joined room");
        Ok(())
    }

    /// Processes a commit, proposal or application message (runs inside a transaction).
    fn process_group_message(&self, room: &RoomId, entry: &QueueEntry) -> Result<()> {
        let conn = self.profile.conn();
        if !self.mls.has_group(conn, room)? {
            // A room we left, were removed from, or were never in: what the provider still
            // delivers is not for us (it stops once told, see `report_left_rooms`).
            tracing::debug!(%room, seq = entry.seq, "skipped: entry of a room we are not in");
            return self.profile.set_processed_seq(entry.seq);
        }
        let events = match self.mls.process(conn, room, &entry.data)? {
            Incoming::Application { sender, plaintext } => {
                self.accept_message(room, entry, &sender, &plaintext)?
            }
            Incoming::CommitMerged {
                added,
                removed,
                self_removed,
            } => self.apply_membership(room, added, removed, self_removed)?,
            Incoming::ProposalStored { leaver } => {
                tracing::debug!(%room, %leaver, "member asked to leave");
                self.profile.add_proposal_room(room)?;
                Vec::new()
            }
            Incoming::Skipped(why) => {
                tracing::debug!(%room, seq = entry.seq, "skipped: {why}");
                Vec::new()
            }
        };
        for event in &events {
            self.profile.push_event(event)?;
        }
        self.profile.set_processed_seq(entry.seq)
    }

    /// Checks a decrypted message's MIMI content, deduplicates it, and files it in history.
    /// Content that does not decode is reported as [`Event::Undecodable`], not as a failure:
    /// the sender is known (MLS authenticated it) and the room is fine.
    fn accept_message(
        &self,
        room: &RoomId,
        entry: &QueueEntry,
        sender: &DeviceUri,
        plaintext: &[u8],
    ) -> Result<Vec<Event>> {
        let content = match MimiContent::decode(plaintext) {
            Ok(content) => content,
            Err(e) => {
                tracing::warn!(%room, %sender, "undecodable message content: {e}");
                return Ok(vec![Event::Undecodable {
                    room: room.clone(),
                    sender: sender.user.clone(),
                    ts: entry.ts,
                    detail: e.to_string(),
                }]);
            }
        };
        let author = content_author(&content, sender)?;
        if let Some(claimed) = &content.room_uri {
            if claimed != room.as_str() {
                return Err(ClientError::Protocol(format!(
                    "message for {claimed} delivered in {room}"
                )));
            }
        }
        if self.blocked.users.contains(&author) {
            tracing::debug!(%room, %author, "message of a blocked user dropped");
            return Ok(Vec::new());
        }
        let id = content.message_id();
        if !self.profile.mark_seen(&id)? {
            tracing::debug!(%room, %id, "duplicate message dropped");
            return Ok(Vec::new());
        }
        let arrival = Arrival {
            room,
            author: &author,
            id,
            event: entry.event,
            ts: entry.ts,
            now: now_ms(),
            sent_here: false,
        };
        if let Meaning::Status { report } = content.meaning() {
            return self.file_status(&arrival, report);
        }
        self.note_delivery(&arrival, &content)?;
        Ok(self.file_content(&arrival, &content)?.into_iter().collect())
    }

    /// Applies content to history, for a message received or sent by us, and says what
    /// happened (nothing for an edit or delete that is not allowed, or an expired message).
    fn file_content(&self, at: &Arrival<'_>, content: &MimiContent) -> Result<Option<Event>> {
        match content.meaning() {
            Meaning::Text { text, reply_to } => self.file_message(at, text, reply_to, content),
            Meaning::Unsupported { reply_to } => {
                self.file_message(at, UNSUPPORTED_CONTENT, reply_to, content)
            }
            Meaning::Reaction { target, emoji } => self.file_reaction(at, target, emoji),
            Meaning::Edit { target, text } => self.file_edit(at, target, text),
            Meaning::Delete { target } => self.file_delete(at, target),
            Meaning::File { file, reply_to } => self.file_attachment(at, file, reply_to, content),
            // Our own status reports: nothing to file (received ones go to `file_status`).
            Meaning::Status { .. } => Ok(None),
            // Typing indicators travel as ephemeral messages only; one in the queue is ignored.
            Meaning::Typing => Ok(None),
        }
    }

    fn file_message(
        &self,
        at: &Arrival<'_>,
        text: &str,
        reply_to: Option<MessageId>,
        content: &MimiContent,
    ) -> Result<Option<Event>> {
        let expires_at = content.expires.map(|e| e.deadline_ms(at.now));
        if expires_at.is_some_and(|deadline| deadline <= at.now) {
            tracing::debug!(room = %at.room, id = %at.id, "message arrived after it expired");
            return Ok(None);
        }
        let mut entry = HistoryEntry::new(
            at.room.clone(),
            at.event,
            at.author.clone(),
            at.id,
            text.to_owned(),
            at.ts,
        );
        entry.reply_to = reply_to;
        entry.expires_at = expires_at;
        self.profile.add_history(&entry)?;
        Ok(Some(Event::Message {
            room: at.room.clone(),
            sender: at.author.clone(),
            id: at.id,
            text: entry.text,
            ts: at.ts,
            reply_to,
            expires_at,
            file: None,
            name: None,
        }))
    }

    /// Anyone may react to anything, also to a message this device never saw (sent before it
    /// joined, say), so a reaction is always filed.
    fn file_reaction(
        &self,
        at: &Arrival<'_>,
        target: MessageId,
        emoji: &str,
    ) -> Result<Option<Event>> {
        // The sender's client enforces the same rules; a peer's may not.
        if check_reaction(emoji).is_err()
            || !self.profile.knows_message(at.room, &target, at.now)?
        {
            tracing::debug!(room = %at.room, %target, by = %at.author, "reaction ignored: oversized, or no message of this room");
            return Ok(None);
        }
        self.profile.add_reaction(&ReactionRecord {
            room: at.room.clone(),
            id: at.id,
            target,
            sender: at.author.clone(),
            emoji: emoji.to_owned(),
            ts: at.ts,
        })?;
        Ok(Some(Event::Reaction {
            room: at.room.clone(),
            sender: at.author.clone(),
            target,
            emoji: emoji.to_owned(),
        }))
    }

    /// Only a message's author may edit it (draft-ietf-mimi-content: receivers must not let
    /// anyone else); anything else, including an unknown target, is ignored.
    fn file_edit(&self, at: &Arrival<'_>, target: MessageId, text: &str) -> Result<Option<Event>> {
        match self.profile.authored(at.room, &target, at.now)? {
            Some(Authored::Message {
                sender,
                deleted: false,
            }) if sender == *at.author => {
                self.profile.edit_message(at.room, &target, text)?;
                Ok(Some(Event::Edit {
                    room: at.room.clone(),
                    sender: at.author.clone(),
                    target,
                    text: text.to_owned(),
                }))
            }
            found => {
                tracing::debug!(room = %at.room, %target, by = %at.author, ?found, "edit ignored: not a message of its author here");
                Ok(None)
            }
        }
    }

    /// Only the author of a message (or reaction) may delete it; anything else is ignored. A
    /// deleted message's received file is deleted from `downloads/` too.
    fn file_delete(&self, at: &Arrival<'_>, target: MessageId) -> Result<Option<Event>> {
        match self.profile.authored(at.room, &target, at.now)? {
            Some(Authored::Message {
                sender,
                deleted: false,
            }) if sender == *at.author => self.profile.delete_message(at.room, &target)?,
            Some(Authored::Reaction { sender }) if sender == *at.author => {
                self.profile.delete_reaction(at.room, &target)?;
            }
            // A file not fetched yet: it never will be (its upload went with it).
            None if self
                .profile
                .pending_download_sender(at.room, &target)?
                .as_ref()
                == Some(at.author) =>
            {
                self.profile.retract_download(at.room, &target)?;
            }
            found => {
                tracing::debug!(room = %at.room, %target, by = %at.author, ?found, "delete ignored: not a message of its author here");
                return Ok(None);
            }
        }
        Ok(Some(Event::Delete {
            room: at.room.clone(),
            sender: at.author.clone(),
            target,
        }))
    }

    /// Updates the members cache after a merged commit and reports the change.
    fn apply_membership(
        &self,
        room: &RoomId,
        added: Vec<UserId>,
        removed: Vec<UserId>,
        self_removed: bool,
    ) -> Result<Vec<Event>> {
        // A foreign commit supersedes any commit of ours from the same epoch.
        self.profile.clear_pending_commit(room)?;
        if self_removed {
            // The room stays known, so later use of it says "not a member", not "unknown".
            self.profile.remove_proposal_room(room)?;
            self.profile.add_left_unreported(room)?;
            return Ok(vec![Event::Removed { room: room.clone() }]);
        }
        if added.is_empty() && removed.is_empty() {
            return Ok(Vec::new());
        }
        Ok(vec![Event::Members {
            room: room.clone(),
            added,
            removed,
        }])
    }

    // --- KeyPackages ----------------------------------------------------------------------------

    /// Uploads `count` one-time KeyPackages and, if asked, a fresh last-resort one.
    async fn upload_key_packages(&mut self, count: usize, last_resort: bool) -> Result<()> {
        let (key_packages, last_resort) = self.profile.transaction(|| {
            let conn = self.profile.conn();
            let batch = self.mls.key_packages(conn, count)?;
            let last = last_resort
                .then(|| self.mls.last_resort_key_package(conn))
                .transpose()?;
            Ok((batch, last))
        })?;
        let upload = UploadKeyPackages {
            key_packages,
            last_resort,
        };
        let count = self.api.upload_key_packages(&upload).await?;
        tracing::debug!(remaining = count.remaining, "KeyPackages uploaded");
        Ok(())
    }

    /// Refills the server's KeyPackages when they run low; failures only delay the refill.
    async fn top_up_key_packages_quietly(&mut self) {
        if let Err(e) = self.top_up_key_packages().await {
            tracing::warn!("cannot top up KeyPackages: {e}");
        }
    }

    async fn top_up_key_packages(&mut self) -> Result<()> {
        let count = self.api.key_package_count().await?;
        let batch = if count.remaining < KEY_PACKAGE_LOW_WATER {
            KEY_PACKAGE_BATCH
        } else {
            0
        };
        if batch > 0 || !count.has_last_resort {
            self.upload_key_packages(batch, !count.has_last_resort)
                .await?;
        }
        Ok(())
    }

    // --- live push --------------------------------------------------------------------------------

    /// Starts a live session for interactive use: catches up, then opens the push WebSocket.
    /// The catch-up's events come out of [`Device::take_events`] or the first [`Device::apply`]
    /// (an empty batch will do).
    ///
    /// ```text
    /// let mut live = device.live().await?;
    /// device.take_events()?.into_iter().for_each(show);
    /// loop {
    ///     tokio::select! {
    ///         batch = live.recv() => device.apply(&mut live, batch?).await?.into_iter().for_each(show),
    ///         line = input.next_line() => {
    ///             device.send_text(&room, &line?).await?;
    ///             device.take_events()?.into_iter().for_each(show); // from a retry's catch-up
    ///         }
    ///     }
    /// }
    /// ```
    pub async fn live(&mut self) -> Result<Live> {
        self.catch_up().await?;
        let push = self.api.connect_push_with(true).await?;
        Ok(Live {
            api: self.api.clone(),
            push: Some(push),
        })
    }

    /// Events not yet handed out: those of catch-ups inside other calls (a retried commit or
    /// message, `direct_room`, `live`), also from earlier processes on this profile. `sync` and
    /// `apply` return these too; each event is returned exactly once.
    pub fn take_events(&mut self) -> Result<Vec<Event>> {
        // An expiring message that waited here past its time is not handed out any more.
        let now = now_ms();
        let events: Vec<Event> = self.profile.take_events()?;
        Ok(events.into_iter().filter(|e| !e.has_expired(now)).collect())
    }

    /// Processes a batch received by [`Live::recv`], acknowledges it, and returns the events
    /// (including any left over from earlier internal syncs).
    pub async fn apply(&mut self, live: &mut Live, entries: Vec<QueueEntry>) -> Result<Vec<Event>> {
        // Each batch counts as a sync (the blocked users are read again if it holds messages).
        self.blocked.fresh = false;
        let last = entries.iter().map(|e| e.seq).max();
        let joined_any = entries.iter().any(|e| e.kind == EntryKind::Welcome);
        self.process_entries(entries).await?;
        if let Some(last) = last {
            live.ack(last).await;
        }
        self.fetch_downloads().await?;
        self.send_due_receipts().await?;
        self.commit_pending_proposals().await?;
        self.report_left_rooms().await?;
        self.sync_own_devices_quietly().await?;
        if joined_any {
            self.top_up_key_packages_quietly().await;
        }
        self.take_events()
    }
}

/// A push session from [`Device::live`]; reconnects by itself when the server drops it.
pub struct Live {
    api: ApiClient,
    push: Option<PushConnection>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("connected", &self.push.is_some())
            .finish()
    }
}

impl Live {
    /// Waits for the next batch of pushed entries; hand it to [`Device::apply`]. Ephemeral
    /// messages are skipped (see [`Live::next`]). Cancellation-safe, so it can be one branch
    /// of a `tokio::select!`.
    pub async fn recv(&mut self) -> Result<Vec<QueueEntry>> {
        loop {
            if let Push::Entries(entries) = self.next().await? {
                return Ok(entries);
            }
        }
    }

    /// Waits for the next batch of pushed entries (for [`Device::apply`]) or ephemeral message
    /// (for [`Device::open_ephemeral`]). Cancellation-safe.
    pub async fn next(&mut self) -> Result<Push> {
        let mut failures = 0;
        loop {
            if self.push.is_none() {
                self.push = Some(self.reconnect(&mut failures).await?);
            }
            let Some(push) = self.push.as_mut() else {
                continue;
            };
            match push.next_push().await {
                Ok(Some(Push::Entries(entries))) if !entries.is_empty() => {
                    return Ok(Push::Entries(entries))
                }
                Ok(Some(Push::Entries(_))) => {}
                Ok(Some(ephemeral @ Push::Ephemeral { .. })) => return Ok(ephemeral),
                // This connection sends no messages, so it gets no answers to any.
                Ok(Some(Push::Sent { .. } | Push::Refused { .. })) => {}
                Ok(None) => {
                    tracing::debug!("push connection closed; reconnecting");
                    self.push = None;
                }
                Err(e) => {
                    tracing::debug!("push connection failed ({e}); reconnecting");
                    self.push = None;
                }
            }
        }
    }

    async fn reconnect(&self, failures: &mut u32) -> Result<PushConnection> {
        loop {
            match self.api.connect_push_with(true).await {
                Ok(push) => return Ok(push),
                // No point in retrying: the account dropped this device.
                Err(e @ ClientError::DeviceRemoved) => return Err(e),
                Err(e) if *failures + 1 >= LIVE_RECONNECTS => return Err(e),
                Err(e) => {
                    *failures += 1;
                    tracing::debug!(failures = *failures, "reconnect failed: {e}");
                    tokio::time::sleep(POLL_INTERVAL * 2u32.pow(*failures)).await;
                }
            }
        }
    }

    /// Acknowledges over the WebSocket, falling back to HTTP; an unacknowledged entry is only
    /// re-delivered (and then skipped), so failure here is harmless.
    async fn ack(&mut self, up_to: u64) {
        if let Some(push) = &mut self.push {
            if push.ack(up_to).await.is_ok() {
                return;
            }
        }
        if let Err(e) = self.api.ack(up_to).await {
            tracing::debug!("ack failed: {e}");
        }
    }

    /// Closes the push connection.
    pub async fn close(mut self) {
        if let Some(push) = self.push.take() {
            push.close().await;
        }
    }
}

/// The absolute expiration `lifetime` after `now_ms`, in whole seconds rounded up (the draft's
/// unit), so the message never expires early.
fn expiration_after(now_ms: u64, lifetime: Duration) -> Result<Expiration> {
    if lifetime.is_zero() {
        return Err(ClientError::InvalidInput(
            "an expiring message must live for some time".into(),
        ));
    }
    let lifetime_ms = u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX);
    let deadline_secs = now_ms.saturating_add(lifetime_ms).div_ceil(1000);
    let secs = u32::try_from(deadline_secs).map_err(|_| {
        ClientError::InvalidInput("that expiry lies beyond what MIMI content can express".into())
    })?;
    Ok(Expiration::at(secs))
}

/// A reaction is one short piece of text, such as an emoji.
fn check_reaction(emoji: &str) -> Result<()> {
    if emoji.trim().is_empty()
        || emoji.len() > MAX_REACTION_BYTES
        || emoji.chars().any(char::is_control)
    {
        return Err(ClientError::InvalidInput(format!(
            "a reaction is one emoji or a short text of at most {MAX_REACTION_BYTES} bytes"
        )));
    }
    Ok(())
}

/// The user who wrote a message: `senderUri` must name the user whose device sent it.
fn content_author(content: &MimiContent, sender: &DeviceUri) -> Result<UserId> {
    let claimed = content
        .sender_uri
        .as_deref()
        .ok_or_else(|| ClientError::Protocol("message content has no senderUri".into()))?;
    let claimed = UserId::parse(claimed)
        .map_err(|e| ClientError::Protocol(format!("message content senderUri: {e}")))?;
    if claimed != sender.user {
        return Err(ClientError::Protocol(format!(
            "message claims to be from {claimed} but was sent by a device of {}",
            sender.user
        )));
    }
    Ok(claimed)
}

/// Whether the hub took our unanswered commit. It moved past the commit's epoch either by
/// accepting it or by accepting someone else's, which then sits in our queue: a foreign commit
/// from that epoch means ours lost. Otherwise the hub's epoch tells, where our provider knows
/// it (it is the room's hub); for a room hubbed elsewhere, posting the very same commit again
/// does: accepted now, or refused as `wrong_epoch` because the hub is past it.
async fn commit_taken(
    api: &ApiClient,
    pending: &PendingCommit,
    queued: &[QueueEntry],
) -> Result<bool> {
    let (room, epoch) = (&pending.room, pending.epoch);
    if has_commit_from(queued, room, epoch) {
        return Ok(false);
    }
    match api.room(room).await {
        Ok(RoomInfo {
            epoch: Some(now), ..
        }) => return Ok(now > epoch),
        Ok(_) => {}
        Err(e) if e.code() == Some("unknown_room") => return Ok(false),
        Err(e) => return Err(e),
    }
    let Some(request) = &pending.request else {
        return Ok(false);
    };
    let request: CommitRequest = serde_json::from_str(request)
        .map_err(|e| ClientError::Storage(format!("corrupt profile: a pending commit: {e}")))?;
    match api.post_commit(room, &request).await {
        Ok(_) => Ok(true),
        Err(e) if e.is_wrong_epoch() => Ok(true),
        Err(e @ (ClientError::Unreachable(_) | ClientError::DeviceRemoved)) => Err(e),
        Err(e) => {
            tracing::debug!(%room, "an unanswered commit posted again was refused: {e}");
            Ok(false)
        }
    }
}

/// Whether `entries` hold a commit of `room` made in `epoch`.
fn has_commit_from(entries: &[QueueEntry], room: &RoomId, epoch: u64) -> bool {
    entries.iter().any(|e| {
        e.kind == EntryKind::Commit
            && e.room_id == room.as_str()
            && mls::message_epoch(&e.data) == Some(epoch)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_proto::content::{NestedPart, PartBody};

    fn alice_device() -> DeviceUri {
        DeviceUri::parse("mimi://chirp.test/d/alice/0102030405060708").unwrap()
    }

    const ROOM_URI: &str = "mimi://chirp.test/r/00112233445566778899aabbccddeeff";

    #[test]
    fn events_serialise_as_documented() {
        let room = RoomId::parse(ROOM_URI).unwrap();
        let event = Event::Message {
            room: room.clone(),
            sender: UserId::parse("alice@chirp.test").unwrap(),
            id: MessageId([0xab; 32]),
            text: "hi".into(),
            ts: 5,
            reply_to: None,
            expires_at: None,
            file: None,
            name: None,
        };
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"type":"message","room":"{room}","sender":"alice@chirp.test","id":"{}","text":"hi","ts":5}}"#,
                "ab".repeat(32)
            )
        );
        let joined = Event::Joined {
            room: room.clone(),
            name: Some("team".into()),
            kind: Some(RoomKind::Group),
        };
        assert_eq!(
            serde_json::to_string(&joined).unwrap(),
            format!(r#"{{"type":"joined","room":"{room}","name":"team","kind":"group"}}"#)
        );
        let members = Event::Members {
            room: room.clone(),
            added: vec![UserId::parse("bob@wave.test").unwrap()],
            removed: vec![],
        };
        assert_eq!(
            serde_json::to_string(&members).unwrap(),
            format!(
                r#"{{"type":"members","room":"{room}","added":["bob@wave.test"],"removed":[]}}"#
            )
        );
        let error = Event::Error {
            room: None,
            detail: "x".into(),
        };
        assert_eq!(
            serde_json::to_string(&error).unwrap(),
            r#"{"type":"error","room":null,"detail":"x"}"#
        );
        assert_eq!(
            serde_json::to_string(&Event::Removed { room: room.clone() }).unwrap(),
            format!(r#"{{"type":"removed","room":"{room}"}}"#)
        );
        let (ab, cd) = ("ab".repeat(32), "cd".repeat(32));
        let alice = UserId::parse("alice@chirp.test").unwrap();
        let reply = Event::Message {
            room: room.clone(),
            sender: alice.clone(),
            id: MessageId([0xab; 32]),
            text: "sure".into(),
            ts: 5,
            reply_to: Some(MessageId([0xcd; 32])),
            expires_at: Some(9),
            file: None,
            name: None,
        };
        assert_eq!(
            serde_json::to_string(&reply).unwrap(),
            format!(
                r#"{{"type":"message","room":"{room}","sender":"alice@chirp.test","id":"{ab}","text":"sure","ts":5,"reply_to":"{cd}","expires_at":9}}"#
            )
        );
        let file = Event::Message {
            room: room.clone(),
            sender: alice.clone(),
            id: MessageId([0xab; 32]),
            text: "[file a.png]".into(),
            ts: 5,
            reply_to: None,
            expires_at: None,
            file: Some("/p/downloads/a.png".into()),
            name: Some("a.png".into()),
        };
        assert_eq!(
            serde_json::to_string(&file).unwrap(),
            format!(
                r#"{{"type":"message","room":"{room}","sender":"alice@chirp.test","id":"{ab}","text":"[file a.png]","ts":5,"file":"/p/downloads/a.png","name":"a.png"}}"#
            )
        );
        let reaction = Event::Reaction {
            room: room.clone(),
            sender: alice.clone(),
            target: MessageId([0xcd; 32]),
            emoji: "\u{1f44d}".into(),
        };
        assert_eq!(
            serde_json::to_string(&reaction).unwrap(),
            format!(
                r#"{{"type":"reaction","room":"{room}","sender":"alice@chirp.test","target":"{cd}","emoji":"👍"}}"#
            )
        );
        let edit = Event::Edit {
            room: room.clone(),
            sender: alice.clone(),
            target: MessageId([0xcd; 32]),
            text: "fixed".into(),
        };
        assert_eq!(
            serde_json::to_string(&edit).unwrap(),
            format!(
                r#"{{"type":"edit","room":"{room}","sender":"alice@chirp.test","target":"{cd}","text":"fixed"}}"#
            )
        );
        let delete = Event::Delete {
            room: room.clone(),
            sender: alice.clone(),
            target: MessageId([0xcd; 32]),
        };
        assert_eq!(
            serde_json::to_string(&delete).unwrap(),
            format!(
                r#"{{"type":"delete","room":"{room}","sender":"alice@chirp.test","target":"{cd}"}}"#
            )
        );
        let receipt = Event::Receipt {
            room: room.clone(),
            sender: alice.clone(),
            target: MessageId([0xcd; 32]),
            status: ReceiptStatus::Read,
        };
        assert_eq!(
            serde_json::to_string(&receipt).unwrap(),
            format!(
                r#"{{"type":"receipt","room":"{room}","sender":"alice@chirp.test","target":"{cd}","status":"read"}}"#
            )
        );
        let undecodable = Event::Undecodable {
            room: room.clone(),
            sender: alice,
            ts: 5,
            detail: "bad".into(),
        };
        assert_eq!(
            serde_json::to_string(&undecodable).unwrap(),
            format!(
                r#"{{"type":"undecodable","room":"{room}","sender":"alice@chirp.test","ts":5,"detail":"bad"}}"#
            )
        );
        // Events are stored as JSON until handed out, so they must parse back.
        let all = [
            event,
            joined,
            members,
            error,
            Event::Removed { room },
            reply,
            file,
            reaction,
            edit,
            delete,
            receipt,
            undecodable,
        ];
        for e in all {
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), e);
        }
        assert!(serde_json::from_str::<Event>(r#"{"type":"removed","room":"nope"}"#).is_err());
    }

    #[test]
    fn content_must_name_the_sending_user() {
        let ok = MimiContent::text([1; 16], "mimi://chirp.test/u/alice", ROOM_URI, "hi");
        assert_eq!(
            content_author(&ok, &alice_device()).unwrap(),
            UserId::parse("alice@chirp.test").unwrap()
        );
        let forged = MimiContent::text([1; 16], "mimi://chirp.test/u/mallory", ROOM_URI, "hi");
        assert!(content_author(&forged, &alice_device()).is_err());
        let mut anonymous = ok.clone();
        anonymous.sender_uri = None;
        assert!(content_author(&anonymous, &alice_device()).is_err());
        let mut non_text = ok;
        non_text.part = NestedPart {
            body: PartBody::Null,
            ..non_text.part
        };
        assert_eq!(non_text.text_body(), None);
    }

    #[test]
    fn expiring_messages_round_up_to_whole_seconds() {
        let at = |now, lifetime| expiration_after(now, lifetime).map(|e| e.time);
        assert_eq!(at(1_000, Duration::from_secs(2)).unwrap(), 3);
        assert_eq!(at(1_001, Duration::from_secs(2)).unwrap(), 4, "never early");
        assert_eq!(at(1_000, Duration::from_millis(1)).unwrap(), 2);
        assert!(at(1_000, Duration::ZERO).is_err());
        assert!(at(1_000, Duration::from_secs(u64::from(u32::MAX) + 1)).is_err());
        let e = expiration_after(1_700_000_000_000, Duration::from_secs(60)).unwrap();
        assert!(!e.relative);
        assert_eq!(e.deadline_ms(0), 1_700_000_060_000);
    }

    #[test]
    fn reactions_are_short_text() {
        assert!(check_reaction("\u{1f44d}").is_ok());
        assert!(check_reaction("+1").is_ok());
        // A skin-toned, gendered profession emoji is five code points: still one reaction.
        assert!(check_reaction("\u{1F469}\u{1F3FD}\u{200D}\u{2695}\u{FE0F}").is_ok());
        for bad in ["", "  ", "a\nb", &"x".repeat(MAX_REACTION_BYTES + 1)] {
            assert!(check_reaction(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn expired_message_events_are_not_handed_out() {
        let room = RoomId::parse(ROOM_URI).unwrap();
        let message = |expires_at| Event::Message {
            room: room.clone(),
            sender: UserId::parse("alice@chirp.test").unwrap(),
            id: MessageId([1; 32]),
            text: "x".into(),
            ts: 1,
            reply_to: None,
            expires_at,
            file: None,
            name: None,
        };
        assert!(message(Some(10)).has_expired(10));
        assert!(!message(Some(11)).has_expired(10));
        assert!(!message(None).has_expired(u64::MAX));
        assert!(!Event::Removed { room }.has_expired(u64::MAX));
    }

    /// `Device` must be usable from spawned tokio tasks.
    #[allow(dead_code)]
    fn device_futures_are_send(device: &mut Device, live: &mut Live, room: &RoomId, user: &UserId) {
        fn send<T: Send>(_: T) {}
        send(device.sync(None));
        send(device.send_text(room, "x"));
        let id = MessageId([1; 32]);
        send(device.send(room, "x", &SendOptions::default()));
        send(device.reply(room, &id, "x"));
        send(device.send_expiring(room, "x", Duration::from_secs(1)));
        send(device.react(room, &id, "x"));
        send(device.edit(room, &id, "x"));
        send(device.delete(room, &id));
        send(device.send_file(room, Path::new("x")));
        send(device.mark_read(room));
        send(device.send_typing(room));
        send(live.next());
        send(device.existing_direct_room(user));
        send(device.create_room(None, &[]));
        send(device.direct_room(user));
        send(device.add_member(room, user));
        send(device.remove_member(room, user));
        send(device.promote(room, user));
        send(device.contact_request(user));
        send(device.contact_requests());
        send(device.contact_accept(user));
        send(device.contact_block(user));
        send(device.leave(room));
        send(device.remove_device(&DeviceId::from_random([1; 8])));
        send(device.devices());
        send(device.live());
        send(live.recv());
        send(device.apply(live, Vec::new()));
        send(Device::register(Path::new("."), "", user, None, None, None));
        send(Device::login(Path::new("."), "", user, "", None));
    }
}
