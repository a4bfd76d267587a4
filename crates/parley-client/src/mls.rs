//! The device's MLS state machine over openmls: identity, KeyPackages, groups, commits and
//! messages. No network I/O; all state lives in the profile's SQLite database.
//!
//! Every function takes the SQLite connection explicitly, so the caller can wrap an MLS step and
//! its bookkeeping (queue position, history) in one transaction.
//!
//! A room's group is found through the profile's room ↔ group table ([`crate::profile`]): a
//! room joined from a Welcome may have any group id. The room's state (participants, roles,
//! name, kind) lives in the group's GroupContext ([`state`]); every commit of ours that changes
//! the participants or roles carries a GroupContextExtensions proposal with the new state.

use std::collections::{BTreeSet, HashSet};

use openmls::ciphersuite::hash_ref::ProposalRef;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    BasicCredential, Ciphersuite, ContentType, Credential, CredentialWithKey, ExternalSender,
    GroupId, KeyPackage, KeyPackageIn, LeafNodeIndex, MlsGroup, MlsGroupCreateConfig,
    MlsGroupJoinConfig, MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, OpenMlsProvider,
    ProcessedMessageContent, Proposal, ProtocolMessage, ProtocolVersion, QueuedProposal,
    RatchetTreeIn, Sender, SignatureScheme, StagedCommit, StagedWelcome,
    MIXED_PLAINTEXT_WIRE_FORMAT_POLICY,
};
use openmls::treesync::RatchetTree;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, SqliteStorageProvider};
use openmls_traits::signatures::Signer as _;
use parley_proto::ids::DeviceUri;
use parley_proto::mimi::room_state::{expiry_aad, RoomState};
use parley_proto::mimi::{self, Body as _, IdentifierUri, KeyMaterialRequestTbs};
use parley_proto::{RoomId, UserId};
use rusqlite::Connection;

use crate::error::{ClientError, Result};
use crate::profile::groups;

mod state;

/// The only ciphersuite Parley speaks.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
/// Epochs whose message keys a group keeps after moving on. The hub orders every message
/// before the commit that ends its epoch, so other members always read it in time; but a
/// member that commits merges its own commit as soon as the hub accepts it, while messages of
/// the old epoch (a receipt sent just before) may still wait in its queue. Those must decrypt.
const PAST_EPOCHS: usize = 3;

/// Serialises openmls's stored values as JSON.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    type Error = serde_json::Error;

    fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
        serde_json::to_vec(value)
    }

    fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
        serde_json::from_slice(slice)
    }
}

/// openmls storage over a borrowed connection, so callers keep the connection for transactions.
pub type MlsStorage<'a> = SqliteStorageProvider<JsonCodec, &'a Connection>;

/// The openmls provider: RustCrypto for crypto and randomness, SQLite for state.
pub struct MlsProvider<'a> {
    crypto: &'a RustCrypto,
    storage: MlsStorage<'a>,
    /// The same database, for the room ↔ group table.
    conn: &'a Connection,
}

impl<'a> MlsProvider<'a> {
    pub fn new(crypto: &'a RustCrypto, conn: &'a Connection) -> Self {
        Self {
            crypto,
            storage: SqliteStorageProvider::new(conn),
            conn,
        }
    }
}

impl<'a> OpenMlsProvider for MlsProvider<'a> {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = MlsStorage<'a>;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        self.crypto
    }
}

/// Creates or upgrades openmls's tables in the profile database.
pub fn init_storage(conn: &mut Connection) -> Result<()> {
    SqliteStorageProvider::<JsonCodec, &mut Connection>::new(conn)
        .run_migrations()
        .map_err(|e| ClientError::Storage(format!("cannot migrate MLS storage: {e}")))
}

/// A freshly created group, as its hub needs it.
#[derive(Debug, Clone)]
pub struct NewGroup {
    /// TLS-encoded MlsMessage carrying the signed GroupInfo (without the ratchet tree).
    pub group_info: Vec<u8>,
    /// TLS-encoded ratchet tree.
    pub ratchet_tree: Vec<u8>,
}

/// A commit staged as the group's pending commit, to be posted to the hub.
#[derive(Debug, Clone)]
pub struct OutgoingCommit {
    /// TLS-encoded MlsMessage (a PublicMessage).
    pub commit: Vec<u8>,
    /// TLS-encoded Welcome for added devices (without the ratchet tree), if the commit adds any.
    pub welcome: Option<Vec<u8>>,
    /// TLS-encoded MlsMessage carrying the new epoch's GroupInfo, signed by us, without tree.
    pub group_info: Vec<u8>,
    /// The new epoch's ratchet tree (`optional<Node> ratchet_tree<V>`).
    pub ratchet_tree: Vec<u8>,
}

/// A claimed KeyPackage that passed validation, with the device it belongs to.
#[derive(Debug, Clone)]
pub struct ValidatedKeyPackage {
    pub device: DeviceUri,
    key_package: KeyPackage,
}

/// A room as this device's group shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomView {
    /// Participants, roles, name and kind, from the GroupContext.
    pub state: RoomState,
    /// The participants with devices in the group, sorted.
    pub members: Vec<UserId>,
    pub epoch: u64,
}

/// What processing one handshake or application message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A decrypted application message from another device.
    Application {
        sender: DeviceUri,
        plaintext: Vec<u8>,
    },
    /// A commit was merged; users whose first device joined or whose last device left.
    CommitMerged {
        added: Vec<UserId>,
        removed: Vec<UserId>,
        /// This device was removed: the group's state has been deleted.
        self_removed: bool,
    },
    /// A member's proposal to remove itself (leaving) was stored; the next commit of any member
    /// must include it.
    ProposalStored { leaver: DeviceUri },
    /// Nothing to act on (a repeated proposal, or an echo of our own message).
    Skipped(&'static str),
}

/// What a commit of ours changes, besides the pending proposals (members leaving) that every
/// commit includes.
#[derive(Debug, Default)]
struct Change {
    add: Vec<ValidatedKeyPackage>,
    remove: Vec<LeafNodeIndex>,
    promote: Option<UserId>,
}

/// One device's MLS identity: its signature key and credential.
pub struct DeviceMls {
    crypto: RustCrypto,
    signer: SignatureKeyPair,
    me: DeviceUri,
}

impl std::fmt::Debug for DeviceMls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMls")
            .field("me", &self.me.to_string())
            .finish_non_exhaustive()
    }
}

impl DeviceMls {
    /// Makes a fresh Ed25519 signature key for a device and stores it.
    pub fn generate_signer(conn: &Connection) -> Result<SignatureKeyPair> {
        let signer = SignatureKeyPair::new(SignatureScheme::ED25519)
            .map_err(|e| ClientError::mls("cannot generate a signature key", format!("{e:?}")))?;
        signer
            .store(&MlsStorage::new(conn))
            .map_err(|e| ClientError::Storage(format!("cannot store the signature key: {e}")))?;
        Ok(signer)
    }

    /// The identity of device `me`, whose signature key was stored by [`Self::generate_signer`].
    pub fn load(conn: &Connection, me: DeviceUri, signature_public_key: &[u8]) -> Result<Self> {
        let signer = SignatureKeyPair::read(
            &MlsStorage::new(conn),
            signature_public_key,
            SignatureScheme::ED25519,
        )
        .ok_or_else(|| ClientError::Storage("the device's signature key is missing".into()))?;
        Ok(Self {
            crypto: RustCrypto::default(),
            signer,
            me,
        })
    }

    pub fn device_uri(&self) -> &DeviceUri {
        &self.me
    }

    pub fn signature_public_key(&self) -> &[u8] {
        self.signer.public()
    }

    fn provider<'a>(&'a self, conn: &'a Connection) -> MlsProvider<'a> {
        MlsProvider::new(&self.crypto, conn)
    }

    fn credential(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.me.to_string().into_bytes()).into(),
            signature_key: self.signer.public().into(),
        }
    }

    // --- KeyPackages ----------------------------------------------------------------------------

    /// `count` one-time KeyPackages, each a TLS-encoded MlsMessage; private parts stay stored.
    pub fn key_packages(&self, conn: &Connection, count: usize) -> Result<Vec<Vec<u8>>> {
        (0..count).map(|_| self.key_package(conn, false)).collect()
    }

    /// A last-resort KeyPackage (reusable, handed out when the one-time ones run out).
    pub fn last_resort_key_package(&self, conn: &Connection) -> Result<Vec<u8>> {
        self.key_package(conn, true)
    }

    fn key_package(&self, conn: &Connection, last_resort: bool) -> Result<Vec<u8>> {
        let mut builder =
            KeyPackage::builder().leaf_node_capabilities(state::leaf_capabilities(last_resort));
        if last_resort {
            builder = builder.mark_as_last_resort();
        }
        let bundle = builder
            .build(
                CIPHERSUITE,
                &self.provider(conn),
                &self.signer,
                self.credential(),
            )
            .map_err(|e| ClientError::mls("cannot create a KeyPackage", e))?;
        serialize(MlsMessageOut::from(bundle.key_package().clone()))
    }

    /// Checks a claimed KeyPackage: well-formed, validly signed, our ciphersuite, the room state
    /// extension among its capabilities, and its credential naming a device of `expected` user.
    pub fn validate_key_package(
        &self,
        bytes: &[u8],
        expected: &UserId,
    ) -> Result<ValidatedKeyPackage> {
        let key_package = decode_key_package(bytes)?
            .validate(&self.crypto, ProtocolVersion::Mls10)
            .map_err(|e| ClientError::mls("invalid KeyPackage", e))?;
        if key_package.ciphersuite() != CIPHERSUITE {
            return Err(ClientError::Protocol(format!(
                "KeyPackage uses ciphersuite {:?}",
                key_package.ciphersuite()
            )));
        }
        let device = device_uri_of(key_package.leaf_node().credential())?;
        // Every room requires it: openmls would refuse the whole commit adding this package.
        if !key_package
            .leaf_node()
            .capabilities()
            .extensions()
            .contains(&state::ROOM_STATE)
        {
            return Err(ClientError::Protocol(format!(
                "KeyPackage of {device} does not support the room state extension (0x0006)"
            )));
        }
        if device.user != *expected {
            return Err(ClientError::Protocol(format!(
                "KeyPackage of {} was offered for {expected}",
                device.user
            )));
        }
        Ok(ValidatedKeyPackage {
            device,
            key_package,
        })
    }

    /// The MIMI `KeyMaterialRequest` (TLS-encoded) asking for `target`'s KeyPackages for `room`,
    /// signed by this device (docs/mimi-profile.md §5): the providers on the way check it, and
    /// the hub forwards it unchanged.
    pub fn key_material_request(&self, target: &UserId, room: &RoomId) -> Result<Vec<u8>> {
        let encoding = |e| ClientError::mls("cannot encode the KeyMaterialRequest", e);
        let tbs = KeyMaterialRequestTbs {
            protocol: mimi::MLS10,
            requesting_user: IdentifierUri::new(&self.me.user.to_uri()),
            target_user: IdentifierUri::new(&target.to_uri()),
            room_id: IdentifierUri::new(room.as_str()),
            acceptable_ciphersuites: vec![mimi::CIPHERSUITE],
            required_capabilities: mimi::RequiredCapabilities::encode(&state::claim_requirements())
                .map_err(encoding)?,
            requester_signature_key: self.signer.public().to_vec().into(),
            requester_credential: mimi::Credential::encode(&self.credential().credential)
                .map_err(encoding)?,
        };
        let signature = self
            .signer
            .sign(&tbs.sign_content().map_err(encoding)?)
            .map_err(|e| {
                ClientError::mls("cannot sign the KeyMaterialRequest", format!("{e:?}"))
            })?;
        Ok(tbs.signed(signature).encode())
    }

    // --- groups ---------------------------------------------------------------------------------

    /// Creates the room's group with only this device in it (epoch 0): group id the room's
    /// Parley group id, GroupContext with the hub (`external_sender`, the TLS-encoded
    /// `ExternalSender` its provider announced), the requirements and `room`'s state.
    pub fn create_group(
        &self,
        conn: &Connection,
        room: &RoomState,
        external_sender: &[u8],
    ) -> Result<NewGroup> {
        let hub = ExternalSender::tls_deserialize_exact(external_sender).map_err(|e| {
            ClientError::Protocol(format!("the provider's external sender is malformed: {e}"))
        })?;
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(false)
            .max_past_epochs(PAST_EPOCHS)
            .capabilities(state::leaf_capabilities(false))
            .with_group_context_extensions(state::initial_extensions(hub, room)?)
            .build();
        let provider = self.provider(conn);
        let group_id = room.room.parley_group_id();
        let group = MlsGroup::new_with_group_id(
            &provider,
            &self.signer,
            &config,
            GroupId::from_slice(&group_id),
            self.credential(),
        )
        .map_err(|e| ClientError::mls("cannot create the group", e))?;
        groups::map(conn, &room.room, &group_id)?;
        let group_info = group
            .export_group_info(provider.crypto(), &self.signer, false)
            .map_err(|e| ClientError::mls("cannot export the GroupInfo", e))?;
        Ok(NewGroup {
            group_info: serialize(group_info)?,
            ratchet_tree: serialize(group.export_ratchet_tree())?,
        })
    }

    /// Whether this device holds state for the room's group.
    pub fn has_group(&self, conn: &Connection, room: &RoomId) -> Result<bool> {
        Ok(load_group(&self.provider(conn), room)?.is_some())
    }

    /// The rooms this device holds a group for, sorted.
    pub fn rooms(&self, conn: &Connection) -> Result<Vec<RoomId>> {
        let mut rooms = Vec::new();
        for room in groups::mapped(conn)? {
            if self.has_group(conn, &room)? {
                rooms.push(room);
            }
        }
        Ok(rooms)
    }

    /// Forgets the room's group (after creating it failed at the hub, or after removal).
    pub fn delete_group(&self, conn: &Connection, room: &RoomId) -> Result<()> {
        let provider = self.provider(conn);
        if let Some(mut group) = load_group(&provider, room)? {
            delete(&provider, &mut group)?;
        }
        groups::unmap(conn, room)
    }

    /// The room's current MLS epoch as this device sees it.
    pub fn epoch(&self, conn: &Connection, room: &RoomId) -> Result<u64> {
        Ok(self
            .active_group(&self.provider(conn), room)?
            .epoch()
            .as_u64())
    }

    /// The room's state, members and epoch, as this device's group has them.
    pub fn room_view(&self, conn: &Connection, room: &RoomId) -> Result<RoomView> {
        let group = self.active_group(&self.provider(conn), room)?;
        let state = state::read(group.extensions())?;
        let with_devices = users_of(&group);
        Ok(RoomView {
            members: state
                .participants
                .keys()
                .filter(|u| with_devices.contains(u))
                .cloned()
                .collect(),
            epoch: group.epoch().as_u64(),
            state,
        })
    }

    /// Whether a commit built by this device awaits the hub's verdict.
    pub fn has_pending_commit(&self, conn: &Connection, room: &RoomId) -> Result<bool> {
        Ok(self
            .active_group(&self.provider(conn), room)?
            .pending_commit()
            .is_some())
    }

    /// The devices in the room's group.
    pub fn members(&self, conn: &Connection, room: &RoomId) -> Result<Vec<DeviceUri>> {
        let group = self.active_group(&self.provider(conn), room)?;
        Ok(group
            .members()
            .filter_map(|m| device_uri_of(&m.credential).ok())
            .collect())
    }

    /// The users with at least one device in the room's group, sorted.
    pub fn member_users(&self, conn: &Connection, room: &RoomId) -> Result<Vec<UserId>> {
        let group = self.active_group(&self.provider(conn), room)?;
        Ok(users_of(&group).into_iter().collect())
    }

    /// Stages a commit adding the given devices; devices already in the group are skipped
    /// (`None` when nothing is left to add). Users new to the room join its participant list.
    pub fn add_members(
        &self,
        conn: &Connection,
        room: &RoomId,
        key_packages: &[ValidatedKeyPackage],
    ) -> Result<Option<OutgoingCommit>> {
        let provider = self.provider(conn);
        let mut group = self.active_group(&provider, room)?;
        drop_own_removal(&provider, &mut group)?;
        let mut present: HashSet<DeviceUri> = group
            .members()
            .filter_map(|m| device_uri_of(&m.credential).ok())
            .collect();
        let fresh: Vec<ValidatedKeyPackage> = key_packages
            .iter()
            .filter(|kp| present.insert(kp.device.clone()))
            .cloned()
            .collect();
        if fresh.is_empty() {
            return Ok(None);
        }
        let change = Change {
            add: fresh,
            ..Change::default()
        };
        self.stage(&provider, &mut group, change).map(Some)
    }

    /// Stages a commit removing every device of `user` (and the user from the participants).
    /// Devices that already asked to leave are removed through their pending proposals (every
    /// commit includes those), not a second time.
    pub fn remove_user(
        &self,
        conn: &Connection,
        room: &RoomId,
        user: &UserId,
    ) -> Result<OutgoingCommit> {
        if *user == self.me.user {
            return Err(ClientError::InvalidInput(
                "you cannot remove your own user from a room".into(),
            ));
        }
        self.remove_leaves(conn, room, |d| d.user == *user)?
            .ok_or_else(|| {
                ClientError::InvalidInput(format!("{user} is not a member of room {room}"))
            })
    }

    /// Stages a commit removing just these devices, whatever their users' other devices do (a
    /// device removed from its account leaves every room, its user stays); `None` if none of
    /// them is in the group. Never this device: MLS lets a member only propose its own removal.
    pub fn remove_devices(
        &self,
        conn: &Connection,
        room: &RoomId,
        devices: &[DeviceUri],
    ) -> Result<Option<OutgoingCommit>> {
        if devices.contains(&self.me) {
            return Err(ClientError::InvalidInput(
                "a device cannot remove itself from a room; it can only leave".into(),
            ));
        }
        self.remove_leaves(conn, room, |d| devices.contains(d))
    }

    /// Stages a commit removing all of this user's other devices (before this one leaves);
    /// `None` if there are none.
    pub fn remove_other_own_devices(
        &self,
        conn: &Connection,
        room: &RoomId,
    ) -> Result<Option<OutgoingCommit>> {
        self.remove_leaves(conn, room, |d| d.user == self.me.user && *d != self.me)
    }

    /// Stages a commit removing the leaves of the devices `doomed` picks; `None` if there are
    /// none. Leaves whose removal is already proposed (leaving) go through that proposal.
    fn remove_leaves(
        &self,
        conn: &Connection,
        room: &RoomId,
        doomed: impl Fn(&DeviceUri) -> bool,
    ) -> Result<Option<OutgoingCommit>> {
        let provider = self.provider(conn);
        let mut group = self.active_group(&provider, room)?;
        let leaves: Vec<LeafNodeIndex> = group
            .members()
            .filter(|m| device_uri_of(&m.credential).is_ok_and(|d| doomed(&d)))
            .map(|m| m.index)
            .collect();
        if leaves.is_empty() {
            return Ok(None);
        }
        drop_own_removal(&provider, &mut group)?;
        let leaving = pending_removals(&group);
        let change = Change {
            remove: leaves
                .into_iter()
                .filter(|leaf| !leaving.contains(leaf))
                .collect(),
            ..Change::default()
        };
        self.stage(&provider, &mut group, change).map(Some)
    }

    /// Stages a commit making `user`, a participant of the group room, an admin: a
    /// GroupContextExtensions proposal only (and the pending proposals, as every commit).
    pub fn promote(
        &self,
        conn: &Connection,
        room: &RoomId,
        user: &UserId,
    ) -> Result<OutgoingCommit> {
        let provider = self.provider(conn);
        let mut group = self.active_group(&provider, room)?;
        drop_own_removal(&provider, &mut group)?;
        let change = Change {
            promote: Some(user.clone()),
            ..Change::default()
        };
        self.stage(&provider, &mut group, change)
    }

    /// Whether proposals received from other members wait to be committed in the room.
    pub fn has_pending_proposals(&self, conn: &Connection, room: &RoomId) -> Result<bool> {
        let group = self.active_group(&self.provider(conn), room)?;
        let own = group.own_leaf_index();
        let pending = group
            .pending_proposals()
            .any(|p| self_removal(p) != Some(own));
        Ok(pending)
    }

    /// Stages a commit of the room's pending proposals (members leaving); `None` if there are
    /// none, e.g. because another member's commit already covered them. Users whose last device
    /// leaves are dropped from the participants (and, should no admin remain in a group room,
    /// every remaining user is promoted).
    pub fn commit_pending_proposals(
        &self,
        conn: &Connection,
        room: &RoomId,
    ) -> Result<Option<OutgoingCommit>> {
        let provider = self.provider(conn);
        let mut group = self.active_group(&provider, room)?;
        drop_own_removal(&provider, &mut group)?;
        if !group.has_pending_proposals() {
            return Ok(None);
        }
        self.stage(&provider, &mut group, Change::default())
            .map(Some)
    }

    /// A proposal to remove this device from the room (leaving), as a PublicMessage for the
    /// group's current epoch; another member must commit it.
    ///
    /// The proposal stays in our own proposal store until the epoch ends, so that, should we
    /// keep the group (the hub's answer was lost), we can still process the commit removing us.
    /// Our own commits never include it (a member cannot commit its own removal); after the
    /// hub refused it, [`Self::withdraw_leave`] drops it.
    pub fn leave_proposal(&self, conn: &Connection, room: &RoomId) -> Result<Vec<u8>> {
        let provider = self.provider(conn);
        let mut group = self.active_group(&provider, room)?;
        drop_own_removal(&provider, &mut group)?;
        let message = group
            .leave_group(&provider, &self.signer)
            .map_err(|e| ClientError::mls("cannot build the leave proposal", e))?;
        serialize(message)
    }

    /// Forgets our own leave proposal after the hub refused it.
    pub fn withdraw_leave(&self, conn: &Connection, room: &RoomId) -> Result<()> {
        let provider = self.provider(conn);
        let mut group = self.active_group(&provider, room)?;
        drop_own_removal(&provider, &mut group)
    }

    /// Applies our pending commit once the hub accepted it.
    pub fn merge_pending_commit(&self, conn: &Connection, room: &RoomId) -> Result<()> {
        let provider = self.provider(conn);
        self.active_group(&provider, room)?
            .merge_pending_commit(&provider)
            .map_err(|e| ClientError::mls("cannot merge our commit", e))
    }

    /// Drops our pending commit after the hub refused it.
    pub fn clear_pending_commit(&self, conn: &Connection, room: &RoomId) -> Result<()> {
        let provider = self.provider(conn);
        self.active_group(&provider, room)?
            .clear_pending_commit(provider.storage())
            .map_err(|e| ClientError::Storage(format!("cannot clear the pending commit: {e}")))
    }

    /// Stages one commit of `change` and the pending proposals, with a GroupContextExtensions
    /// proposal when the room's participants or roles change, and the new epoch's GroupInfo
    /// and ratchet tree for the hub. Refuses what the room's policy does not allow.
    fn stage(
        &self,
        provider: &MlsProvider<'_>,
        group: &mut MlsGroup,
        change: Change,
    ) -> Result<OutgoingCommit> {
        let old = state::read(group.extensions())?;
        let extensions = state::next(&old, &self.outcome(group, &change))?
            .map(|new| state::with_state(group.extensions(), &new))
            .transpose()?;
        let mut builder = group
            .commit_builder()
            .propose_adds(change.add.into_iter().map(|kp| kp.key_package))
            .propose_removals(change.remove);
        if let Some(extensions) = extensions {
            builder = builder
                .propose_group_context_extensions(extensions)
                .map_err(|e| ClientError::mls("cannot propose the new room state", e))?;
        }
        let bundle = builder
            .load_psks(provider.storage())
            .map_err(|e| ClientError::mls("cannot build the commit", e))?
            .create_group_info(true)
            .use_ratchet_tree_extension(false)
            .build(provider.rand(), provider.crypto(), &self.signer, |_| true)
            .map_err(|e| ClientError::mls("cannot build the commit", e))?
            .stage_commit(provider)
            .map_err(|e| ClientError::mls("cannot stage the commit", e))?;
        let (commit, welcome, group_info) = bundle.into_messages();
        let group_info = group_info
            .ok_or_else(|| ClientError::mls("cannot build the commit", "no GroupInfo"))?;
        Ok(OutgoingCommit {
            commit: serialize(commit)?,
            welcome: welcome.map(serialize).transpose()?,
            group_info: serialize(group_info)?,
            ratchet_tree: serialize(pending_tree(provider, group)?)?,
        })
    }

    /// The users a commit of `change` (with the pending proposals) leaves in the group, and
    /// whose devices we remove.
    fn outcome<'a>(&'a self, group: &MlsGroup, change: &'a Change) -> state::Outcome<'a> {
        let leaving = pending_removals(group);
        let mut after = BTreeSet::new();
        let mut removed = BTreeSet::new();
        for member in group.members() {
            let Ok(device) = device_uri_of(&member.credential) else {
                continue;
            };
            if change.remove.contains(&member.index) {
                removed.insert(device.user);
            } else if !leaving.contains(&member.index) {
                after.insert(device.user);
            }
        }
        after.extend(change.add.iter().map(|kp| kp.device.user.clone()));
        state::Outcome {
            committer: &self.me.user,
            after,
            removed,
            promote: change.promote.as_ref(),
        }
    }

    // --- messages -------------------------------------------------------------------------------

    /// Encrypts an application message as a PrivateMessage. An expiring message carries its
    /// expiry (ms) in the authenticated data, as Safe AAD, where the providers read it.
    pub fn encrypt(
        &self,
        conn: &Connection,
        room: &RoomId,
        plaintext: &[u8],
        expires_at_ms: Option<u64>,
    ) -> Result<Vec<u8>> {
        let provider = self.provider(conn);
        let mut group = self.active_group(&provider, room)?;
        if let Some(at) = expires_at_ms {
            // Applies to the next message only: openmls resets it once the message is made.
            group.set_aad(expiry_aad(at));
        }
        let message = group
            .create_message(&provider, &self.signer, plaintext)
            .map_err(|e| ClientError::mls("cannot encrypt", e))?;
        serialize(message)
    }

    /// Joins `room`'s group from a Welcome and the group's ratchet tree (which the Welcome does
    /// not carry; without it, only a Welcome with a `ratchet_tree` extension works). The group
    /// may have any id; its room state must name `room`, or nothing is joined.
    pub fn join(
        &self,
        conn: &Connection,
        welcome: &[u8],
        ratchet_tree: Option<&[u8]>,
        room: &RoomId,
    ) -> Result<()> {
        let provider = self.provider(conn);
        let MlsMessageBodyIn::Welcome(welcome) = decode_message(welcome)?.extract() else {
            return Err(ClientError::Protocol("expected an MLS Welcome".into()));
        };
        let mut builder = StagedWelcome::build_from_welcome(&provider, &join_config(), welcome)
            .map_err(|e| ClientError::mls("cannot open the Welcome", e))?;
        if let Some(tree) = ratchet_tree {
            let tree = RatchetTreeIn::tls_deserialize_exact(tree)
                .map_err(|e| ClientError::Protocol(format!("malformed ratchet tree: {e}")))?;
            builder = builder.with_ratchet_tree(tree);
        }
        let group_id = builder
            .processed_welcome()
            .unverified_group_info()
            .group_id()
            .clone();
        self.replace_stale_group(&provider, room, &group_id)?;
        let staged = builder
            .build()
            .map_err(|e| ClientError::mls("invalid Welcome", e))?;
        for member in staged.members() {
            device_uri_of(&member.credential)?;
        }
        let named = state::read(staged.group_context().extensions())?.room;
        if named != *room {
            return Err(ClientError::Protocol(format!(
                "Welcome into room {named} delivered for room {room}"
            )));
        }
        staged
            .into_group(&provider)
            .map_err(|e| ClientError::mls("cannot join the group", e))?;
        groups::map(conn, room, group_id.as_slice())
    }

    /// A Welcome into a room (or group) we still hold state for is fine only if we had been
    /// removed; a group id already used by another room is refused.
    fn replace_stale_group(
        &self,
        provider: &MlsProvider<'_>,
        room: &RoomId,
        group_id: &GroupId,
    ) -> Result<()> {
        if let Some(other) = groups::room_of(provider.conn, group_id.as_slice())? {
            if other != *room {
                return Err(ClientError::Protocol(format!(
                    "Welcome for room {room} into the group of room {other}"
                )));
            }
        }
        let stale = match load_group(provider, room)? {
            Some(group) => Some(group),
            None => MlsGroup::load(provider.storage(), group_id)
                .map_err(|e| ClientError::Storage(format!("cannot load a group: {e}")))?,
        };
        match stale {
            None => Ok(()),
            Some(group) if group.is_active() => Err(ClientError::Protocol(format!(
                "Welcome into room {room}, which this device is already in"
            ))),
            Some(mut group) => delete(provider, &mut group),
        }
    }

    /// Processes a commit, proposal or application message of the room. Commits are merged
    /// right away: the hub only delivers commits it accepted, in the room's order. A proposal
    /// (a member leaving) is checked and stored; the next commit of any member includes it.
    pub fn process(&self, conn: &Connection, room: &RoomId, bytes: &[u8]) -> Result<Incoming> {
        let provider = self.provider(conn);
        let message = decode_message(bytes)?
            .try_into_protocol_message()
            .map_err(|e| ClientError::Protocol(format!("not a group message: {e}")))?;
        let mut group = self.active_group(&provider, room)?;
        if message.group_id() != group.group_id() {
            return Err(ClientError::Protocol(format!(
                "message for another group delivered in room {room}"
            )));
        }
        let processed = group
            .process_message(&provider, message)
            .map_err(|e| ClientError::mls("cannot process message", e))?;
        let sender = processed.credential().clone();
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => Ok(Incoming::Application {
                sender: device_uri_of(&sender)?,
                plaintext: app.into_bytes(),
            }),
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                check_commit(&group, &staged, &sender, room)?;
                merge_commit(&provider, room, &mut group, |g, p| {
                    g.merge_staged_commit(p, *staged)
                })
            }
            ProcessedMessageContent::OwnPendingCommit => {
                merge_commit(&provider, room, &mut group, |g, p| {
                    g.merge_pending_commit(p)
                })
            }
            ProcessedMessageContent::ProposalMessage(proposal) => {
                store_leave_proposal(&provider, &mut group, *proposal)
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(_) => Err(ClientError::Protocol(
                "external join proposals are not used in Parley".into(),
            )),
            ProcessedMessageContent::OwnPrivateMessage => Ok(Incoming::Skipped("own message")),
            // Variants behind openmls draft features that Parley does not use.
            #[allow(unreachable_patterns)]
            _ => Ok(Incoming::Skipped("unsupported message content")),
        }
    }

    fn active_group(&self, provider: &MlsProvider<'_>, room: &RoomId) -> Result<MlsGroup> {
        match load_group(provider, room)? {
            None => Err(ClientError::NotMember(room.clone())),
            Some(group) if !group.is_active() => Err(ClientError::NotMember(room.clone())),
            Some(group) => Ok(group),
        }
    }
}

/// The ratchet tree of the epoch our pending commit starts.
fn pending_tree(provider: &MlsProvider<'_>, group: &MlsGroup) -> Result<RatchetTree> {
    let staged = group
        .pending_commit()
        .ok_or_else(|| ClientError::mls("cannot build the commit", "nothing staged"))?;
    let tree = staged
        .export_ratchet_tree(provider.crypto(), group.export_ratchet_tree())
        .map_err(|e| ClientError::mls("cannot export the new ratchet tree", e))?
        .ok_or_else(|| ClientError::mls("cannot export the new ratchet tree", "none staged"))?;
    Ok(tree)
}

/// What another member's commit may do beyond what openmls checks: every leaf it brings in is
/// a device, the committer's new leaf (its UpdatePath) names the client it named before, and a
/// new GroupContext keeps the room and its hub (the external sender that lets the hub propose).
/// How the participants and roles may change is the hub's to enforce.
fn check_commit(
    group: &MlsGroup,
    staged: &StagedCommit,
    committer: &Credential,
    room: &RoomId,
) -> Result<()> {
    if let Some(leaf) = staged.update_path_leaf_node() {
        // openmls lets an UpdatePath carry any credential (RFC 9420 leaves it to the
        // application): a member could otherwise become a client of another user, and its
        // messages pass as that user's.
        let (was, is) = (device_uri_of(committer)?, device_uri_of(leaf.credential())?);
        if was != is {
            return Err(ClientError::Protocol(format!(
                "a commit in room {room} renames its committer {was} to {is}"
            )));
        }
    }
    for add in staged.add_proposals() {
        device_uri_of(add.add_proposal().key_package().leaf_node().credential())?;
    }
    if staged.self_removed() {
        return Ok(());
    }
    let extensions = staged.group_context().extensions();
    if extensions.external_senders() != group.extensions().external_senders() {
        return Err(ClientError::Protocol(format!(
            "a commit in room {room} replaces its hub's external sender"
        )));
    }
    let named = state::read(extensions)?.room;
    if named != *room {
        return Err(ClientError::Protocol(format!(
            "a commit in room {room} renames it {named}"
        )));
    }
    Ok(())
}

/// Stores a member's proposal to remove itself, the only kind of proposal Parley rooms use.
fn store_leave_proposal(
    provider: &MlsProvider<'_>,
    group: &mut MlsGroup,
    proposal: QueuedProposal,
) -> Result<Incoming> {
    let Some(leaf) = self_removal(&proposal) else {
        return Err(ClientError::Protocol(
            "only a member's proposal to remove itself is accepted".into(),
        ));
    };
    let leaver = group
        .member(leaf)
        .ok_or_else(|| ClientError::Protocol("proposal from an empty leaf".into()))
        .and_then(device_uri_of)?;
    let reference = proposal.proposal_reference_ref();
    if group
        .pending_proposals()
        .any(|p| p.proposal_reference_ref() == reference)
    {
        return Ok(Incoming::Skipped("repeated proposal"));
    }
    group
        .store_pending_proposal(provider.storage(), proposal)
        .map_err(|e| ClientError::Storage(format!("cannot store a proposal: {e}")))?;
    Ok(Incoming::ProposalStored { leaver })
}

/// Drops our own leave proposal from the group's proposal store, before building a commit.
fn drop_own_removal(provider: &MlsProvider<'_>, group: &mut MlsGroup) -> Result<()> {
    let own = group.own_leaf_index();
    let ours: Vec<ProposalRef> = group
        .pending_proposals()
        .filter(|p| self_removal(p) == Some(own))
        .map(|p| p.proposal_reference_ref().clone())
        .collect();
    for reference in &ours {
        group
            .remove_pending_proposal(provider.storage(), reference)
            .map_err(|e| ClientError::Storage(format!("cannot drop our leave proposal: {e}")))?;
    }
    Ok(())
}

/// The leaf a proposal removes, if it is a member's Remove proposal for its own leaf.
fn self_removal(proposal: &QueuedProposal) -> Option<LeafNodeIndex> {
    match (proposal.proposal(), proposal.sender()) {
        (Proposal::Remove(remove), Sender::Member(sender)) if remove.removed() == *sender => {
            Some(*sender)
        }
        _ => None,
    }
}

/// Leaves that pending Remove proposals will take out of the group.
fn pending_removals(group: &MlsGroup) -> Vec<LeafNodeIndex> {
    group
        .pending_proposals()
        .filter_map(|p| match p.proposal() {
            Proposal::Remove(remove) => Some(remove.removed()),
            _ => None,
        })
        .collect()
}

/// Merges a commit and reports the membership change in users.
fn merge_commit<E: std::fmt::Display>(
    provider: &MlsProvider<'_>,
    room: &RoomId,
    group: &mut MlsGroup,
    merge: impl FnOnce(&mut MlsGroup, &MlsProvider<'_>) -> std::result::Result<(), E>,
) -> Result<Incoming> {
    let before = users_of(group);
    merge(group, provider).map_err(|e| ClientError::mls("cannot merge commit", e))?;
    let self_removed = !group.is_active();
    let after = users_of(group);
    if self_removed {
        delete(provider, group)?;
        groups::unmap(provider.conn, room)?;
    }
    Ok(Incoming::CommitMerged {
        added: after.difference(&before).cloned().collect(),
        removed: before.difference(&after).cloned().collect(),
        self_removed,
    })
}

fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(false)
        .max_past_epochs(PAST_EPOCHS)
        .build()
}

/// The room's group, found through the room ↔ group table.
fn load_group(provider: &MlsProvider<'_>, room: &RoomId) -> Result<Option<MlsGroup>> {
    let Some(group_id) = groups::group_of(provider.conn, room)? else {
        return Ok(None);
    };
    MlsGroup::load(provider.storage(), &GroupId::from_slice(&group_id))
        .map_err(|e| ClientError::Storage(format!("cannot load group {room}: {e}")))
}

/// Deletes a group's state (the caller unmaps its room).
fn delete(provider: &MlsProvider<'_>, group: &mut MlsGroup) -> Result<()> {
    group
        .delete(provider.storage())
        .map_err(|e| ClientError::Storage(format!("cannot delete group state: {e}")))
}

fn users_of(group: &MlsGroup) -> BTreeSet<UserId> {
    group
        .members()
        .filter_map(|m| device_uri_of(&m.credential).ok())
        .map(|d| d.user)
        .collect()
}

/// The device a credential names: a BasicCredential whose identity is a device URI.
pub fn device_uri_of(credential: &Credential) -> Result<DeviceUri> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|e| ClientError::Protocol(format!("unsupported credential: {e}")))?;
    let identity = std::str::from_utf8(basic.identity())
        .map_err(|_| ClientError::Protocol("credential identity is not UTF-8".into()))?;
    DeviceUri::parse(identity)
        .map_err(|e| ClientError::Protocol(format!("credential identity: {e}")))
}

/// Whether `bytes` is a PrivateMessage carrying application data (MLS sends the content type
/// in the clear): what an ephemeral message must be, so that processing it cannot touch the
/// group's membership or epoch.
pub fn is_application_message(bytes: &[u8]) -> bool {
    let Ok(message) = decode_message(bytes) else {
        return false;
    };
    match message.try_into_protocol_message() {
        Ok(message @ ProtocolMessage::PrivateMessage(_)) => {
            message.content_type() == ContentType::Application
        }
        _ => false,
    }
}

/// The epoch a commit or application message was made in, if `bytes` is one.
pub fn message_epoch(bytes: &[u8]) -> Option<u64> {
    let message = decode_message(bytes)
        .ok()?
        .try_into_protocol_message()
        .ok()?;
    Some(message.epoch().as_u64())
}

fn decode_message(bytes: &[u8]) -> Result<MlsMessageIn> {
    MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| ClientError::Protocol(format!("malformed MLS message: {e}")))
}

/// Accepts a KeyPackage wrapped in an MlsMessage (what Parley uploads) or bare.
fn decode_key_package(bytes: &[u8]) -> Result<KeyPackageIn> {
    if let Ok(message) = MlsMessageIn::tls_deserialize_exact(bytes) {
        return match message.extract() {
            MlsMessageBodyIn::KeyPackage(kp) => Ok(kp),
            _ => Err(ClientError::Protocol(
                "expected a KeyPackage, got another MLS message".into(),
            )),
        };
    }
    KeyPackageIn::tls_deserialize_exact(bytes)
        .map_err(|e| ClientError::Protocol(format!("malformed KeyPackage: {e}")))
}

fn serialize(value: impl openmls::prelude::tls_codec::Serialize) -> Result<Vec<u8>> {
    value
        .tls_serialize_detached()
        .map_err(|e| ClientError::mls("cannot encode", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_proto::mimi::room_state::{expiry_from_aad, ROLE_ADMIN, ROLE_MEMBER};
    use parley_proto::{DeviceId, Domain};
    use std::path::Path;

    /// A device with its profile database in a temporary directory.
    struct TestDevice {
        dir: tempfile::TempDir,
        conn: Connection,
        mls: DeviceMls,
    }

    /// The profile database (openmls's tables and Parley's, such as the room ↔ group table).
    fn open_db(dir: &Path) -> Connection {
        drop(crate::profile::Profile::create_or_open(dir).unwrap());
        Connection::open(dir.join(crate::profile::DB_FILE)).unwrap()
    }

    impl TestDevice {
        fn new(user: &str, device: u8) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let conn = open_db(dir.path());
            let signer = DeviceMls::generate_signer(&conn).unwrap();
            let me = DeviceUri::new(
                UserId::parse(user).unwrap(),
                DeviceId::from_random([device; 8]),
            );
            let mls = DeviceMls::load(&conn, me, signer.public()).unwrap();
            Self { dir, conn, mls }
        }

        /// Drops every in-memory handle and reopens the profile from disk.
        fn reopen(self) -> Self {
            let Self { dir, conn, mls } = self;
            let (me, public) = (
                mls.device_uri().clone(),
                mls.signature_public_key().to_vec(),
            );
            drop((conn, mls));
            let conn = open_db(dir.path());
            let mls = DeviceMls::load(&conn, me, &public).unwrap();
            Self { dir, conn, mls }
        }

        fn user(&self) -> UserId {
            self.mls.device_uri().user.clone()
        }

        /// Creates the group room `room` (named "team") with this device as its only member.
        fn create(&self, room: &RoomId) -> NewGroup {
            let state = RoomState::group(room.clone(), "team", &self.user(), None);
            self.mls
                .create_group(&self.conn, &state, &hub_external_sender())
                .unwrap()
        }

        /// Creates the direct room `room` of this user and `peer`.
        fn create_direct(&self, room: &RoomId, peer: &TestDevice) {
            let state = RoomState::direct(room.clone(), &self.user(), &peer.user(), None);
            self.mls
                .create_group(&self.conn, &state, &hub_external_sender())
                .unwrap();
        }

        fn state(&self, room: &RoomId) -> RoomState {
            self.mls.room_view(&self.conn, room).unwrap().state
        }

        fn key_package_for(&self, other: &TestDevice) -> ValidatedKeyPackage {
            let kp = other.mls.key_packages(&other.conn, 1).unwrap().remove(0);
            self.mls.validate_key_package(&kp, &other.user()).unwrap()
        }

        /// Adds `others` in one commit, merges it, and lets them join from the Welcome.
        fn add(&self, room: &RoomId, others: &[&TestDevice]) -> Vec<u8> {
            let kps: Vec<_> = others.iter().map(|o| self.key_package_for(o)).collect();
            let out = self
                .mls
                .add_members(&self.conn, room, &kps)
                .unwrap()
                .unwrap();
            self.mls.merge_pending_commit(&self.conn, room).unwrap();
            for other in others {
                let welcome = out.welcome.as_ref().unwrap();
                other
                    .mls
                    .join(&other.conn, welcome, Some(&out.ratchet_tree), room)
                    .unwrap();
            }
            out.commit
        }

        fn send(&self, room: &RoomId, text: &str) -> Vec<u8> {
            self.mls
                .encrypt(&self.conn, room, text.as_bytes(), None)
                .unwrap()
        }

        fn receive(&self, room: &RoomId, from: &TestDevice, ciphertext: &[u8]) -> String {
            match self.mls.process(&self.conn, room, ciphertext).unwrap() {
                Incoming::Application { sender, plaintext } => {
                    assert_eq!(&sender, from.mls.device_uri());
                    String::from_utf8(plaintext).unwrap()
                }
                other => panic!("expected an application message, got {other:?}"),
            }
        }
    }

    fn room() -> RoomId {
        RoomId::from_random(&Domain::parse("chirp.test").unwrap(), [0x42; 16])
    }

    /// The `ExternalSender` a hub at chirp.test announces.
    fn hub_external_sender() -> Vec<u8> {
        let key = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
        let sender = ExternalSender::new(
            key.public().into(),
            BasicCredential::new(b"mimi://chirp.test".to_vec()).into(),
        );
        serialize(sender).unwrap()
    }

    #[test]
    fn two_devices_exchange_messages_both_ways() {
        let alice = TestDevice::new("alice@chirp.test", 1);
        let bob = TestDevice::new("bob@wave.test", 2);
        let room = room();
        let created = alice.create(&room);
        assert!(!created.group_info.is_empty() && !created.ratchet_tree.is_empty());
        alice.add(&room, &[&bob]);
        assert_eq!(
            alice.mls.member_users(&alice.conn, &room).unwrap(),
            vec![alice.user(), bob.user()]
        );
        assert_eq!(bob.mls.epoch(&bob.conn, &room).unwrap(), 1);

        let hello = alice.send(&room, "hello bob");
        assert_eq!(bob.receive(&room, &alice, &hello), "hello bob");
        let reply = bob.send(&room, "hi alice");
        assert_eq!(alice.receive(&room, &bob, &reply), "hi alice");
    }

    #[test]
    fn removed_member_cannot_read_later_messages() {
        let alice = TestDevice::new("alice@chirp.test", 1);
        let bob = TestDevice::new("bob@wave.test", 2);
        let carol = TestDevice::new("carol@chirp.test", 3);
        let room = room();
        alice.create(&room);
        alice.add(&room, &[&bob, &carol]);

        let out = alice
            .mls
            .remove_user(&alice.conn, &room, &bob.user())
            .unwrap();
        assert!(out.welcome.is_none());
        alice.mls.merge_pending_commit(&alice.conn, &room).unwrap();
        assert_eq!(
            carol.mls.process(&carol.conn, &room, &out.commit).unwrap(),
            Incoming::CommitMerged {
                added: vec![],
                removed: vec![bob.user()],
                self_removed: false
            }
        );
        assert!(matches!(
            bob.mls.process(&bob.conn, &room, &out.commit).unwrap(),
            Incoming::CommitMerged {
                self_removed: true,
                ..
            }
        ));

        let secret = alice.send(&room, "bob is gone");
        assert_eq!(carol.receive(&room, &alice, &secret), "bob is gone");
        assert!(bob.mls.process(&bob.conn, &room, &secret).is_err());
        assert!(bob
            .mls
            .encrypt(&bob.conn, &room, b"still here?", None)
            .is_err());
    }

    #[test]
    fn one_device_of_a_user_can_be_removed_and_the_user_stays() {
        let alice = TestDevice::new("alice@chirp.test", 1);
        let alice_phone = TestDevice::new("alice@chirp.test", 2);
        let bob = TestDevice::new("bob@wave.test", 3);
        let room = room();
        alice.create(&room);
        alice.add(&room, &[&bob]);
        // A further device of a member user: no user joins.
        let commit = alice.add(&room, &[&alice_phone]);
        assert_eq!(
            bob.mls.process(&bob.conn, &room, &commit).unwrap(),
            Incoming::CommitMerged {
                added: vec![],
                removed: vec![],
                self_removed: false
            }
        );
        let phone = alice_phone.mls.device_uri().clone();
        assert!(alice
            .mls
            .members(&alice.conn, &room)
            .unwrap()
            .contains(&phone));

        // A device cannot remove itself (it can only leave); absent devices are nothing to do.
        assert!(alice
            .mls
            .remove_devices(
                &alice.conn,
                &room,
                std::slice::from_ref(alice.mls.device_uri())
            )
            .is_err());
        let stranger = DeviceUri::new(alice.user(), DeviceId::from_random([9; 8]));
        assert!(alice
            .mls
            .remove_devices(&alice.conn, &room, &[stranger])
            .unwrap()
            .is_none());

        let out = alice
            .mls
            .remove_devices(&alice.conn, &room, std::slice::from_ref(&phone))
            .unwrap()
            .unwrap();
        alice.mls.merge_pending_commit(&alice.conn, &room).unwrap();
        assert_eq!(
            bob.mls.process(&bob.conn, &room, &out.commit).unwrap(),
            Incoming::CommitMerged {
                added: vec![],
                removed: vec![],
                self_removed: false
            },
            "alice is still a member"
        );
        assert!(matches!(
            alice_phone
                .mls
                .process(&alice_phone.conn, &room, &out.commit)
                .unwrap(),
            Incoming::CommitMerged {
                self_removed: true,
                ..
            }
        ));
        let secret = bob.send(&room, "only alice's laptop reads this");
        assert_eq!(
            alice.receive(&room, &bob, &secret),
            "only alice's laptop reads this"
        );
        assert!(alice_phone
            .mls
            .process(&alice_phone.conn, &room, &secret)
            .is_err());
    }

    #[test]
    fn members_learn_about_added_users_from_commits() {
        let alice = TestDevice::new("alice@chirp.test", 1);
        let bob = TestDevice::new("bob@wave.test", 2);
        let carol = TestDevice::new("carol@chirp.test", 3);
        let room = room();
        alice.create(&room);
        alice.add(&room, &[&bob]);
        let commit = alice.add(&room, &[&carol]);
        assert_eq!(
            bob.mls.process(&bob.conn, &room, &commit).unwrap(),
            Incoming::CommitMerged {
                added: vec![carol.user()],
                removed: vec![],
                self_removed: false
            }
        );
        let msg = carol.send(&room, "hi all");
        assert_eq!(bob.receive(&room, &carol, &msg), "hi all");
        assert_eq!(alice.receive(&room, &carol, &msg), "hi all");
    }

    #[test]
    fn state_survives_reopening_from_disk() {
        let alice = TestDevice::new("alice@chirp.test", 1);
        let bob = TestDevice::new("bob@wave.test", 2);
        let room = room();
        alice.create(&room);
        alice.add(&room, &[&bob]);
        let first = alice.send(&room, "one");
        assert_eq!(bob.receive(&room, &alice, &first), "one");

        let (alice, bob) = (alice.reopen(), bob.reopen());
        let second = alice.send(&room, "two");
        assert_eq!(bob.receive(&room, &alice, &second), "two");
        let third = bob.send(&room, "three");
        assert_eq!(alice.receive(&room, &bob, &third), "three");
    }

    #[test]
    fn pending_commits_can_be_cleared_and_rebuilt() {
        let alice = TestDevice::new("alice@chirp.test", 1);
        let bob = TestDevice::new("bob@wave.test", 2);
        let room = room();
        alice.create(&room);
        let kp = alice.key_package_for(&bob);
        alice
            .mls
            .add_members(&alice.conn, &room, std::slice::from_ref(&kp))
            .unwrap()
            .unwrap();
        assert!(alice.mls.has_pending_commit(&alice.conn, &room).unwrap());
        alice.mls.clear_pending_commit(&alice.conn, &room).unwrap();
        assert_eq!(alice.mls.epoch(&alice.conn, &room).unwrap(), 0);
        // The same validated KeyPackage is reused for the rebuilt commit.
        let out = alice
            .mls
            .add_members(&alice.conn, &room, std::slice::from_ref(&kp))
            .unwrap()
            .unwrap();
        alice.mls.merge_pending_commit(&alice.conn, &room).unwrap();
        bob.mls
            .join(
                &bob.conn,
                &out.welcome.unwrap(),
                Some(&out.ratchet_tree),
                &room,
            )
            .unwrap();
        // Adding a device that is already in the group is a no-op.
        assert!(alice
            .mls
            .add_members(&alice.conn, &room, &[kp])
            .unwrap()
            .is_none());
    }

    /// alice, bob and carol in one room (epoch 1).
    fn room_of_three() -> (RoomId, TestDevice, TestDevice, TestDevice) {
        let alice = TestDevice::new("alice@chirp.test", 1);
        let bob = TestDevice::new("bob@wave.test", 2);
        let carol = TestDevice::new("carol@chirp.test", 3);
        let room = room();
        alice.create(&room);
        alice.add(&room, &[&bob, &carol]);
        (room, alice, bob, carol)
    }

    fn stored(device: &TestDevice, room: &RoomId, proposal: &[u8], leaver: &TestDevice) {
        assert_eq!(
            device.mls.process(&device.conn, room, proposal).unwrap(),
            Incoming::ProposalStored {
                leaver: leaver.mls.device_uri().clone()
            }
        );
        assert!(device
            .mls
            .has_pending_proposals(&device.conn, room)
            .unwrap());
    }

    #[test]
    fn a_leave_proposal_is_committed_by_another_member() {
        let (room, alice, bob, carol) = room_of_three();
        let proposal = carol.mls.leave_proposal(&carol.conn, &room).unwrap();
        // Our own proposal is not one for us to commit.
        assert!(!carol.mls.has_pending_proposals(&carol.conn, &room).unwrap());
        assert!(carol
            .mls
            .commit_pending_proposals(&carol.conn, &room)
            .unwrap()
            .is_none());
        assert_eq!(message_epoch(&proposal), Some(1));
        carol.mls.delete_group(&carol.conn, &room).unwrap();
        assert!(matches!(
            carol.mls.epoch(&carol.conn, &room),
            Err(ClientError::NotMember(_))
        ));

        stored(&bob, &room, &proposal, &carol);
        stored(&alice, &room, &proposal, &carol);
        // The hub may deliver an entry twice.
        assert_eq!(
            alice.mls.process(&alice.conn, &room, &proposal).unwrap(),
            Incoming::Skipped("repeated proposal")
        );

        let out = bob
            .mls
            .commit_pending_proposals(&bob.conn, &room)
            .unwrap()
            .unwrap();
        assert!(out.welcome.is_none());
        assert_eq!(message_epoch(&out.commit), Some(1));
        bob.mls.merge_pending_commit(&bob.conn, &room).unwrap();
        assert!(!bob.mls.has_pending_proposals(&bob.conn, &room).unwrap());
        assert_eq!(
            bob.mls.member_users(&bob.conn, &room).unwrap(),
            vec![alice.user(), bob.user()]
        );
        assert_eq!(
            alice.mls.process(&alice.conn, &room, &out.commit).unwrap(),
            Incoming::CommitMerged {
                added: vec![],
                removed: vec![carol.user()],
                self_removed: false
            }
        );
        // Merging someone else's commit empties the proposal store: nothing left to commit.
        assert!(!alice.mls.has_pending_proposals(&alice.conn, &room).unwrap());
        assert!(alice
            .mls
            .commit_pending_proposals(&alice.conn, &room)
            .unwrap()
            .is_none());

        let secret = alice.send(&room, "carol has left");
        assert_eq!(bob.receive(&room, &alice, &secret), "carol has left");
        assert!(carol.mls.process(&carol.conn, &room, &secret).is_err());
    }

    #[test]
    fn the_leaver_cannot_read_after_the_commit_even_with_its_state() {
        let (room, alice, bob, carol) = room_of_three();
        let proposal = carol.mls.leave_proposal(&carol.conn, &room).unwrap();
        stored(&alice, &room, &proposal, &carol);
        stored(&bob, &room, &proposal, &carol);
        let out = alice
            .mls
            .commit_pending_proposals(&alice.conn, &room)
            .unwrap()
            .unwrap();
        alice.mls.merge_pending_commit(&alice.conn, &room).unwrap();
        bob.mls.process(&bob.conn, &room, &out.commit).unwrap();
        // Had carol kept her state, the commit removes her all the same.
        assert!(matches!(
            carol.mls.process(&carol.conn, &room, &out.commit).unwrap(),
            Incoming::CommitMerged {
                self_removed: true,
                ..
            }
        ));
        let secret = bob.send(&room, "just us");
        assert_eq!(alice.receive(&room, &bob, &secret), "just us");
        assert!(carol.mls.process(&carol.conn, &room, &secret).is_err());
    }

    #[test]
    fn a_refused_leave_can_be_withdrawn_or_rebuilt() {
        let (room, alice, bob, carol) = room_of_three();
        let first = carol.mls.leave_proposal(&carol.conn, &room).unwrap();
        // Rebuilding (a retry after a lost answer) yields the very same proposal.
        let again = carol.mls.leave_proposal(&carol.conn, &room).unwrap();
        assert_eq!(first, again);
        carol.mls.withdraw_leave(&carol.conn, &room).unwrap();
        // Still a full member: carol can commit (adding her phone needs no admin), and her
        // commit does not remove herself.
        let carol_phone = TestDevice::new("carol@chirp.test", 4);
        let commit = carol.add(&room, &[&carol_phone]);
        assert_eq!(
            alice.mls.process(&alice.conn, &room, &commit).unwrap(),
            Incoming::CommitMerged {
                added: vec![],
                removed: vec![],
                self_removed: false
            }
        );
        bob.mls.process(&bob.conn, &room, &commit).unwrap();
        let hello = carol.send(&room, "still here");
        assert_eq!(carol_phone.receive(&room, &carol, &hello), "still here");
    }

    #[test]
    fn other_commits_include_pending_leave_proposals() {
        let (room, alice, bob, carol) = room_of_three();
        let dave = TestDevice::new("dave@wave.test", 4);
        let proposal = carol.mls.leave_proposal(&carol.conn, &room).unwrap();
        stored(&alice, &room, &proposal, &carol);
        stored(&bob, &room, &proposal, &carol);
        // alice adds dave: the same commit takes carol out.
        let commit = alice.add(&room, &[&dave]);
        assert_eq!(
            bob.mls.process(&bob.conn, &room, &commit).unwrap(),
            Incoming::CommitMerged {
                added: vec![dave.user()],
                removed: vec![carol.user()],
                self_removed: false
            }
        );
        assert!(matches!(
            carol.mls.process(&carol.conn, &room, &commit).unwrap(),
            Incoming::CommitMerged {
                self_removed: true,
                ..
            }
        ));
        let hello = dave.send(&room, "hi");
        assert_eq!(bob.receive(&room, &dave, &hello), "hi");
        assert_eq!(alice.receive(&room, &dave, &hello), "hi");
    }

    #[test]
    fn removing_a_leaving_user_commits_the_proposal_instead_of_a_second_removal() {
        let (room, alice, bob, carol) = room_of_three();
        let proposal = carol.mls.leave_proposal(&carol.conn, &room).unwrap();
        stored(&alice, &room, &proposal, &carol);
        stored(&bob, &room, &proposal, &carol);
        let out = alice
            .mls
            .remove_user(&alice.conn, &room, &carol.user())
            .unwrap();
        alice.mls.merge_pending_commit(&alice.conn, &room).unwrap();
        // bob can only process it if it refers to the proposal he holds.
        assert_eq!(
            bob.mls.process(&bob.conn, &room, &out.commit).unwrap(),
            Incoming::CommitMerged {
                added: vec![],
                removed: vec![carol.user()],
                self_removed: false
            }
        );
    }

    #[test]
    fn removing_someone_else_includes_a_pending_leave() {
        let (room, alice, bob, carol) = room_of_three();
        let proposal = carol.mls.leave_proposal(&carol.conn, &room).unwrap();
        stored(&alice, &room, &proposal, &carol);
        stored(&bob, &room, &proposal, &carol);
        let out = alice
            .mls
            .remove_user(&alice.conn, &room, &bob.user())
            .unwrap();
        alice.mls.merge_pending_commit(&alice.conn, &room).unwrap();
        assert_eq!(
            alice.mls.member_users(&alice.conn, &room).unwrap(),
            vec![alice.user()]
        );
        assert!(matches!(
            bob.mls.process(&bob.conn, &room, &out.commit).unwrap(),
            Incoming::CommitMerged {
                self_removed: true,
                ..
            }
        ));
    }

    #[test]
    fn only_self_removal_proposals_are_accepted() {
        let (room, alice, bob, carol) = room_of_three();
        // bob proposes removing carol: members must not store (or ever commit) that.
        let provider = bob.mls.provider(&bob.conn);
        let mut group = bob.mls.active_group(&provider, &room).unwrap();
        let carol_leaf = group
            .members()
            .find(|m| device_uri_of(&m.credential).unwrap() == *carol.mls.device_uri())
            .unwrap()
            .index;
        let (message, _) = group
            .propose_remove_member(&provider, &bob.mls.signer, carol_leaf)
            .unwrap();
        let proposal = serialize(message).unwrap();
        assert!(alice.mls.process(&alice.conn, &room, &proposal).is_err());
        assert!(!alice.mls.has_pending_proposals(&alice.conn, &room).unwrap());
    }

    /// The committing member of a commit with a new leaf for itself in its UpdatePath (here a
    /// new signature key and a credential naming a client of another user).
    fn commit_renaming_own_leaf(member: &TestDevice, room: &RoomId, new_identity: &str) -> Vec<u8> {
        let provider = member.mls.provider(&member.conn);
        let mut group = member.mls.active_group(&provider, room).unwrap();
        let new_signer = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
        let credential_with_key = CredentialWithKey {
            credential: BasicCredential::new(new_identity.as_bytes().to_vec()).into(),
            signature_key: new_signer.public().into(),
        };
        let bundle = group
            .self_update_with_new_signer(
                &provider,
                &member.mls.signer,
                openmls::prelude::NewSignerBundle {
                    signer: &new_signer,
                    credential_with_key: credential_with_key.clone(),
                },
                openmls::prelude::LeafNodeParameters::builder()
                    .with_credential_with_key(credential_with_key)
                    .with_capabilities(state::leaf_capabilities(false))
                    .build(),
            )
            .unwrap();
        serialize(bundle.into_messages().0).unwrap()
    }

    #[test]
    fn a_member_cannot_take_another_clients_identity_in_its_update_path() {
        let (room, alice, bob, carol) = room_of_three();
        // carol's commit renames her leaf to a client of alice's: bob must not let carol's
        // messages pass as alice's from then on.
        let alice_other = format!("mimi://chirp.test/d/alice/{}", "00000000000000ee");
        let commit = commit_renaming_own_leaf(&carol, &room, &alice_other);
        assert!(
            bob.mls.process(&bob.conn, &room, &commit).is_err(),
            "a commit changing its committer's identity was merged"
        );
        assert!(bob
            .mls
            .members(&bob.conn, &room)
            .unwrap()
            .iter()
            .all(|d| d.to_string() != alice_other));
        // A new key under the same identity is an ordinary update.
        carol.mls.clear_pending_commit(&carol.conn, &room).unwrap();
        let carol_uri = carol.mls.device_uri().to_string();
        let commit = commit_renaming_own_leaf(&carol, &room, &carol_uri);
        assert!(matches!(
            alice.mls.process(&alice.conn, &room, &commit).unwrap(),
            Incoming::CommitMerged { .. }
        ));
    }

    #[test]
    fn pending_proposals_survive_reopening() {
        let (room, alice, bob, carol) = room_of_three();
        let proposal = carol.mls.leave_proposal(&carol.conn, &room).unwrap();
        stored(&alice, &room, &proposal, &carol);
        stored(&bob, &room, &proposal, &carol);
        let alice = alice.reopen();
        assert!(alice.mls.has_pending_proposals(&alice.conn, &room).unwrap());
        let out = alice
            .mls
            .commit_pending_proposals(&alice.conn, &room)
            .unwrap()
            .unwrap();
        alice.mls.merge_pending_commit(&alice.conn, &room).unwrap();
        assert!(matches!(
            bob.mls.process(&bob.conn, &room, &out.commit).unwrap(),
            Incoming::CommitMerged { ref removed, .. } if *removed == vec![carol.user()]
        ));
    }

    #[test]
    fn key_packages_are_checked_against_the_expected_user() {
        let alice = TestDevice::new("alice@chirp.test", 1);
        let bob = TestDevice::new("bob@wave.test", 2);
        let kp = bob.mls.last_resort_key_package(&bob.conn).unwrap();
        alice.mls.validate_key_package(&kp, &bob.user()).unwrap();
        assert!(alice.mls.validate_key_package(&kp, &alice.user()).is_err());
        let mut tampered = kp.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(alice
            .mls
            .validate_key_package(&tampered, &bob.user())
            .is_err());
        // A client that does not support the room state extension cannot join any room.
        let plain = KeyPackage::builder()
            .build(
                CIPHERSUITE,
                &bob.mls.provider(&bob.conn),
                &bob.mls.signer,
                bob.mls.credential(),
            )
            .unwrap();
        let plain = serialize(MlsMessageOut::from(plain.key_package().clone())).unwrap();
        let refused = alice
            .mls
            .validate_key_package(&plain, &bob.user())
            .unwrap_err();
        assert!(refused.to_string().contains("0x0006"), "{refused}");
    }

    #[test]
    fn garbage_input_is_an_error_not_a_panic() {
        let alice = TestDevice::new("alice@chirp.test", 1);
        let bob = TestDevice::new("bob@wave.test", 2);
        let room = room();
        alice.create(&room);
        alice.add(&room, &[&bob]);
        let good = alice.send(&room, "fine");
        let garbage: Vec<Vec<u8>> = vec![
            vec![],
            vec![0; 3],
            vec![0xff; 64],
            good[..good.len() / 2].to_vec(),
            [good.as_slice(), &[0]].concat(),
        ];
        for bytes in &garbage {
            assert!(bob.mls.process(&bob.conn, &room, bytes).is_err());
            assert!(bob.mls.join(&bob.conn, bytes, None, &room).is_err());
            assert!(bob.mls.validate_key_package(bytes, &alice.user()).is_err());
        }
        // A message of this room presented as another room's.
        let other = RoomId::from_random(&Domain::parse("chirp.test").unwrap(), [7; 16]);
        assert!(bob.mls.process(&bob.conn, &other, &good).is_err());
        // A KeyPackage is not a Welcome, and an application message is not a KeyPackage.
        let kp = alice.mls.key_packages(&alice.conn, 1).unwrap().remove(0);
        assert!(bob.mls.join(&bob.conn, &kp, None, &room).is_err());
        assert!(bob.mls.validate_key_package(&good, &alice.user()).is_err());
        // The intact message still decrypts after all that.
        assert_eq!(bob.receive(&room, &alice, &good), "fine");
    }

    /// The participants and roles of a room (user, role), from a device's group.
    fn roles(device: &TestDevice, room: &RoomId) -> Vec<(String, u32)> {
        device
            .state(room)
            .participants
            .iter()
            .map(|(u, r)| (u.to_string(), *r))
            .collect()
    }

    fn roles_of(list: &[(&str, u32)]) -> Vec<(String, u32)> {
        list.iter().map(|(u, r)| (u.to_string(), *r)).collect()
    }

    fn policy_code(e: ClientError) -> &'static str {
        match e {
            ClientError::Policy { code, .. } => code,
            other => panic!("expected a policy refusal, got {other:?}"),
        }
    }

    fn group_info_of(message: &[u8]) -> openmls::messages::group_info::VerifiableGroupInfo {
        match decode_message(message).unwrap().extract() {
            MlsMessageBodyIn::GroupInfo(info) => info,
            _ => panic!("not a GroupInfo"),
        }
    }

    fn exported_tree(device: &TestDevice, room: &RoomId) -> Vec<u8> {
        let provider = device.mls.provider(&device.conn);
        let group = device.mls.active_group(&provider, room).unwrap();
        serialize(group.export_ratchet_tree()).unwrap()
    }

    #[test]
    fn a_new_room_carries_its_hub_requirements_and_state() {
        let alice = TestDevice::new("alice@chirp.test", 1);
        let room = room();
        let created = alice.create(&room);
        {
            let provider = alice.mls.provider(&alice.conn);
            let group = alice.mls.active_group(&provider, &room).unwrap();
            assert_eq!(group.group_id().as_slice(), room.parley_group_id());
            let extensions = group.extensions();
            assert_eq!(extensions.external_senders().map(Vec::len), Some(1));
            assert_eq!(
                extensions
                    .required_capabilities()
                    .unwrap()
                    .extension_types(),
                &[state::ROOM_STATE]
            );
        }
        let view = alice.mls.room_view(&alice.conn, &room).unwrap();
        assert_eq!(
            (view.state.name.as_str(), view.state.direct),
            ("team", false)
        );
        assert_eq!((view.members, view.epoch), (vec![alice.user()], 0));
        assert_eq!(
            roles(&alice, &room),
            roles_of(&[("alice@chirp.test", ROLE_ADMIN)])
        );
        // The GroupInfo for the hub leaves the tree out: it travels beside it.
        assert!(group_info_of(&created.group_info)
            .extensions()
            .ratchet_tree()
            .is_none());
        assert_eq!(created.ratchet_tree, exported_tree(&alice, &room));
        assert_eq!(alice.mls.rooms(&alice.conn).unwrap(), vec![room]);
    }

    #[test]
    fn commits_carry_the_new_epochs_group_info_and_tree() {
        let alice = TestDevice::new("alice@chirp.test", 1);
        let bob = TestDevice::new("bob@wave.test", 2);
        let room = room();
        alice.create(&room);
        let kp = alice.key_package_for(&bob);
        let out = alice
            .mls
            .add_members(&alice.conn, &room, &[kp])
            .unwrap()
            .unwrap();
        let info = group_info_of(&out.group_info);
        assert_eq!(info.epoch().as_u64(), 1, "the epoch the commit starts");
        assert!(info.extensions().ratchet_tree().is_none());
        let mut expected = alice.state(&room);
        expected.participants.insert(bob.user(), ROLE_MEMBER);
        assert_eq!(
            state::read(info.group_context().extensions()).unwrap(),
            expected
        );
        alice.mls.merge_pending_commit(&alice.conn, &room).unwrap();
        assert_eq!(out.ratchet_tree, exported_tree(&alice, &room));
        assert_eq!(alice.state(&room), expected);
    }

    #[test]
    fn a_welcome_joins_with_the_tree_beside_it_and_only_into_its_room() {
        let alice = TestDevice::new("alice@chirp.test", 1);
        let bob = TestDevice::new("bob@wave.test", 2);
        let room = room();
        alice.create(&room);
        let kp = alice.key_package_for(&bob);
        let out = alice
            .mls
            .add_members(&alice.conn, &room, &[kp])
            .unwrap()
            .unwrap();
        alice.mls.merge_pending_commit(&alice.conn, &room).unwrap();
        let welcome = out.welcome.unwrap();
        // A failed join is rolled back, as the device does (its transaction), so the KeyPackage
        // it used is still there for the next attempt.
        let attempt = |tree: Option<&[u8]>, room: &RoomId| {
            bob.conn.execute_batch("SAVEPOINT joining").unwrap();
            let outcome = bob.mls.join(&bob.conn, &welcome, tree, room);
            if outcome.is_err() {
                bob.conn.execute_batch("ROLLBACK TO joining").unwrap();
            }
            bob.conn.execute_batch("RELEASE joining").unwrap();
            outcome
        };
        // The Welcome has no ratchet_tree extension: without the tree there is no joining.
        assert!(attempt(None, &room).is_err());
        assert!(attempt(Some(&[0xff, 0xff]), &room).is_err());
        // Delivered for another room than its room state names: refused, nothing joined.
        let other = RoomId::from_random(&Domain::parse("wave.test").unwrap(), [9; 16]);
        let refused = attempt(Some(&out.ratchet_tree), &other).unwrap_err();
        assert!(
            refused.to_string().contains("delivered for room"),
            "{refused}"
        );
        assert!(!bob.mls.has_group(&bob.conn, &other).unwrap());
        assert!(!bob.mls.has_group(&bob.conn, &room).unwrap());
        attempt(Some(&out.ratchet_tree), &room).unwrap();
        assert_eq!(
            groups::group_of(&bob.conn, &room).unwrap(),
            Some(room.parley_group_id())
        );
        let view = bob.mls.room_view(&bob.conn, &room).unwrap();
        assert_eq!(
            (view.members, view.epoch),
            (vec![alice.user(), bob.user()], 1)
        );
        assert_eq!(
            roles(&bob, &room),
            roles_of(&[
                ("alice@chirp.test", ROLE_ADMIN),
                ("bob@wave.test", ROLE_MEMBER)
            ])
        );
        // A second Welcome into a room we are in is refused.
        assert!(attempt(Some(&out.ratchet_tree), &room).is_err());
        let hello = alice.send(&room, "hello");
        assert_eq!(bob.receive(&room, &alice, &hello), "hello");
    }

    #[test]
    fn participants_and_roles_change_by_group_context_extensions() {
        let alice = TestDevice::new("alice@chirp.test", 1);
        let bob = TestDevice::new("bob@wave.test", 2);
        let carol = TestDevice::new("carol@chirp.test", 3);
        let room = room();
        alice.create(&room);
        alice.add(&room, &[&bob]);
        // bob is no admin: he cannot add carol, and nothing is staged.
        let kp = bob.key_package_for(&carol);
        let refused = bob
            .mls
            .add_members(&bob.conn, &room, std::slice::from_ref(&kp))
            .unwrap_err();
        assert_eq!(policy_code(refused), "not_admin");
        assert!(!bob.mls.has_pending_commit(&bob.conn, &room).unwrap());
        let refused = bob.mls.promote(&bob.conn, &room, &bob.user()).unwrap_err();
        assert_eq!(policy_code(refused), "not_admin");
        let refused = bob
            .mls
            .remove_user(&bob.conn, &room, &alice.user())
            .unwrap_err();
        assert_eq!(policy_code(refused), "not_admin");

        // alice promotes bob: a commit with only the new room state.
        assert!(matches!(
            alice.mls.promote(&alice.conn, &room, &carol.user()),
            Err(ClientError::InvalidInput(_))
        ));
        let promotion = alice.mls.promote(&alice.conn, &room, &bob.user()).unwrap();
        assert!(promotion.welcome.is_none());
        alice.mls.merge_pending_commit(&alice.conn, &room).unwrap();
        assert_eq!(
            bob.mls
                .process(&bob.conn, &room, &promotion.commit)
                .unwrap(),
            Incoming::CommitMerged {
                added: vec![],
                removed: vec![],
                self_removed: false
            }
        );
        let both_admins = roles_of(&[
            ("alice@chirp.test", ROLE_ADMIN),
            ("bob@wave.test", ROLE_ADMIN),
        ]);
        assert_eq!(roles(&bob, &room), both_admins);
        assert_eq!(roles(&alice, &room), both_admins);
        assert!(matches!(
            alice.mls.promote(&alice.conn, &room, &bob.user()),
            Err(ClientError::InvalidInput(_))
        ));

        // Now bob adds carol, who joins the participants as a member.
        let commit = bob.add(&room, &[&carol]);
        alice.mls.process(&alice.conn, &room, &commit).unwrap();
        let three = roles_of(&[
            ("alice@chirp.test", ROLE_ADMIN),
            ("bob@wave.test", ROLE_ADMIN),
            ("carol@chirp.test", ROLE_MEMBER),
        ]);
        for device in [&alice, &bob, &carol] {
            assert_eq!(roles(device, &room), three);
        }
        // Adding a further device of a participant leaves the participants as they are.
        let carol_phone = TestDevice::new("carol@chirp.test", 4);
        let commit = carol.add(&room, &[&carol_phone]);
        for device in [&alice, &bob] {
            device.mls.process(&device.conn, &room, &commit).unwrap();
        }
        assert_eq!(roles(&alice, &room), three);

        // Removing a user takes all their devices and drops them from the participants.
        let out = alice
            .mls
            .remove_user(&alice.conn, &room, &carol.user())
            .unwrap();
        alice.mls.merge_pending_commit(&alice.conn, &room).unwrap();
        bob.mls.process(&bob.conn, &room, &out.commit).unwrap();
        assert_eq!(roles(&bob, &room), both_admins);
        assert_eq!(
            bob.mls.room_view(&bob.conn, &room).unwrap().members,
            vec![alice.user(), bob.user()]
        );
        for device in [&carol, &carol_phone] {
            assert!(matches!(
                device
                    .mls
                    .process(&device.conn, &room, &out.commit)
                    .unwrap(),
                Incoming::CommitMerged {
                    self_removed: true,
                    ..
                }
            ));
            assert!(device.mls.rooms(&device.conn).unwrap().is_empty());
        }
    }

    #[test]
    fn committing_leaves_drops_the_leavers_and_keeps_an_admin() {
        let (room, alice, bob, carol) = room_of_three();
        let dave = TestDevice::new("dave@wave.test", 4);
        let commit = alice.add(&room, &[&dave]);
        for device in [&bob, &carol] {
            device.mls.process(&device.conn, &room, &commit).unwrap();
        }
        // carol (a member) leaves; bob (a member) commits it: carol is no participant then.
        let proposal = carol.mls.leave_proposal(&carol.conn, &room).unwrap();
        for device in [&alice, &bob, &dave] {
            stored(device, &room, &proposal, &carol);
        }
        let out = bob
            .mls
            .commit_pending_proposals(&bob.conn, &room)
            .unwrap()
            .unwrap();
        bob.mls.merge_pending_commit(&bob.conn, &room).unwrap();
        for device in [&alice, &dave] {
            device
                .mls
                .process(&device.conn, &room, &out.commit)
                .unwrap();
        }
        let expected = roles_of(&[
            ("alice@chirp.test", ROLE_ADMIN),
            ("bob@wave.test", ROLE_MEMBER),
            ("dave@wave.test", ROLE_MEMBER),
        ]);
        for device in [&alice, &bob, &dave] {
            assert_eq!(roles(device, &room), expected);
        }
        // alice, the only admin, leaves: whoever commits it promotes everyone remaining.
        let proposal = alice.mls.leave_proposal(&alice.conn, &room).unwrap();
        for device in [&bob, &dave] {
            stored(device, &room, &proposal, &alice);
        }
        let out = dave
            .mls
            .commit_pending_proposals(&dave.conn, &room)
            .unwrap()
            .unwrap();
        dave.mls.merge_pending_commit(&dave.conn, &room).unwrap();
        bob.mls.process(&bob.conn, &room, &out.commit).unwrap();
        let expected = roles_of(&[
            ("bob@wave.test", ROLE_ADMIN),
            ("dave@wave.test", ROLE_ADMIN),
        ]);
        assert_eq!(roles(&bob, &room), expected);
        assert_eq!(roles(&dave, &room), expected);
    }

    #[test]
    fn direct_rooms_keep_their_two_participants() {
        let alice = TestDevice::new("alice@chirp.test", 1);
        let bob = TestDevice::new("bob@wave.test", 2);
        let carol = TestDevice::new("carol@chirp.test", 3);
        let room = room();
        alice.create_direct(&room, &bob);
        let both = roles_of(&[
            ("alice@chirp.test", ROLE_MEMBER),
            ("bob@wave.test", ROLE_MEMBER),
        ]);
        assert_eq!(roles(&alice, &room), both);
        // Adding bob's device changes nothing in the participant list (it names him already).
        alice.add(&room, &[&bob]);
        assert!(bob.state(&room).direct);
        assert_eq!(roles(&bob, &room), both);
        let kp = alice.key_package_for(&carol);
        let refused = alice
            .mls
            .add_members(&alice.conn, &room, &[kp])
            .unwrap_err();
        assert_eq!(policy_code(refused), "policy");
        let refused = alice
            .mls
            .remove_user(&alice.conn, &room, &bob.user())
            .unwrap_err();
        assert_eq!(policy_code(refused), "policy");
        let refused = alice
            .mls
            .promote(&alice.conn, &room, &bob.user())
            .unwrap_err();
        assert_eq!(policy_code(refused), "policy");
        // A user's own devices come and go.
        let phone = TestDevice::new("alice@chirp.test", 4);
        let commit = alice.add(&room, &[&phone]);
        bob.mls.process(&bob.conn, &room, &commit).unwrap();
        let out = alice
            .mls
            .remove_devices(
                &alice.conn,
                &room,
                std::slice::from_ref(phone.mls.device_uri()),
            )
            .unwrap()
            .unwrap();
        alice.mls.merge_pending_commit(&alice.conn, &room).unwrap();
        bob.mls.process(&bob.conn, &room, &out.commit).unwrap();
        assert_eq!(roles(&bob, &room), both);
    }

    #[test]
    fn expiring_messages_carry_their_expiry_in_the_authenticated_data() {
        let alice = TestDevice::new("alice@chirp.test", 1);
        let bob = TestDevice::new("bob@wave.test", 2);
        let room = room();
        alice.create(&room);
        alice.add(&room, &[&bob]);
        let aad = |message: &[u8]| match decode_message(message).unwrap().extract() {
            MlsMessageBodyIn::PrivateMessage(m) => m.aad().to_vec(),
            _ => panic!("not a PrivateMessage"),
        };
        let expiring = alice
            .mls
            .encrypt(&alice.conn, &room, b"soon gone", Some(1_800_000_000_123))
            .unwrap();
        assert_eq!(expiry_from_aad(&aad(&expiring)), Some(1_800_000_000_123));
        // Only that message: the next one has no expiry.
        let plain = alice.send(&room, "stays");
        assert_eq!(aad(&plain), Vec::<u8>::new());
        assert_eq!(bob.receive(&room, &alice, &expiring), "soon gone");
        assert_eq!(bob.receive(&room, &alice, &plain), "stays");
    }

    #[test]
    fn claims_are_signed_key_material_requests() {
        let alice = TestDevice::new("alice@chirp.test", 1);
        let bob = UserId::parse("bob@wave.test").unwrap();
        let room = room();
        let bytes = alice.mls.key_material_request(&bob, &room).unwrap();
        let request = mimi::KeyMaterialRequest::decode(&bytes).unwrap();
        request.check().unwrap();
        assert_eq!(
            request.requesting_user.as_str().unwrap(),
            "mimi://chirp.test/u/alice"
        );
        assert_eq!(
            request.target_user.as_str().unwrap(),
            "mimi://wave.test/u/bob"
        );
        assert_eq!(request.room_id.as_str().unwrap(), room.as_str());
        assert_eq!(request.acceptable_ciphersuites, vec![mimi::CIPHERSUITE]);
        let required = request.required_capabilities.parse().unwrap();
        assert_eq!(required.extension_types(), &[state::ROOM_STATE]);
        assert_eq!(
            required.credential_types(),
            &[openmls::prelude::CredentialType::Basic]
        );
        let credential = request.requester_credential.parse().unwrap();
        assert_eq!(&device_uri_of(&credential).unwrap(), alice.mls.device_uri());
        // SignWithLabel over the TBS, verifiable with the requester's key.
        let key = request.requester_signature_key.as_slice();
        assert_eq!(key, alice.mls.signature_public_key());
        let content = request.tbs().sign_content().unwrap();
        openmls_traits::crypto::OpenMlsCrypto::verify_signature(
            &RustCrypto::default(),
            SignatureScheme::ED25519,
            &content,
            key,
            request.signature.as_slice(),
        )
        .unwrap();
    }
}
