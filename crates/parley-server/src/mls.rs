//! What the hub knows of MLS: validating KeyPackages, and following each room's *public* group
//! state (openmls `PublicGroup`) from the commits it orders.
//!
//! **Architecture invariant:** the server holds no MLS secrets. It sees GroupInfo, ratchet trees,
//! KeyPackages and commits (PublicMessages), and application messages only as ciphertext, of which
//! it reads the cleartext header (group id, epoch, content type).

use openmls::group::GroupId;
use openmls::messages::group_info::VerifiableGroupInfo;
use openmls::prelude::{
    BasicCredential, Ciphersuite, ContentType, Credential, KeyPackageIn, LeafNodeIndex,
    MlsMessageBodyIn, MlsMessageIn, OpenMlsSignaturePublicKey, ProcessedMessageContent, Proposal,
    ProposalStore, ProtocolMessage, ProtocolVersion, PublicGroup, RatchetTreeIn, Sender,
    Verifiable as _,
};
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;
use parley_proto::ids::DeviceUri;
use parley_proto::mimi::room_state::{expiry_from_aad, RoomState, APP_DATA_DICTIONARY};
use std::collections::HashMap;
use std::sync::RwLock;
use tls_codec::{Deserialize as _, Serialize as _, TlsDeserialize, TlsSerialize, TlsSize, VLBytes};

/// The ciphersuite every Parley group and KeyPackage must use.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// Why MLS input was refused; the message is safe to show the client.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MlsInputError(pub String);

fn bad(msg: impl Into<String>) -> MlsInputError {
    MlsInputError(msg.into())
}

/// Parses a device URI out of a BasicCredential.
pub fn credential_device(credential: &Credential) -> Option<DeviceUri> {
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    let identity = std::str::from_utf8(basic.identity()).ok()?;
    DeviceUri::parse(identity).ok()
}

/// A device as it appears in a group or KeyPackage: its identity and signature key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafDevice {
    pub device: DeviceUri,
    pub signature_key: Vec<u8>,
}

/// A KeyPackage that validated: whose it is, its KeyPackageRef, and its bare encoding.
#[derive(Debug, Clone)]
pub struct CheckedKeyPackage {
    pub leaf: LeafDevice,
    pub reference: Vec<u8>,
    pub bare: Vec<u8>,
}

/// Checks an uploaded KeyPackage (an MlsMessage or a bare KeyPackage): signature, ciphersuite,
/// lifetime, and that its credential names a device. Returns that device.
pub fn validate_key_package(bytes: &[u8]) -> Result<LeafDevice, MlsInputError> {
    Ok(check_key_package(bytes)?.leaf)
}

/// [`validate_key_package`], also returning the package's KeyPackageRef and bare bytes (what
/// MIMI `keyMaterial` carries, and what a Welcome names its new members by).
pub fn check_key_package(bytes: &[u8]) -> Result<CheckedKeyPackage, MlsInputError> {
    let kp_in = match MlsMessageIn::tls_deserialize_exact(bytes) {
        Ok(msg) => match msg.extract() {
            MlsMessageBodyIn::KeyPackage(kp) => kp,
            _ => return Err(bad("the MLS message is not a KeyPackage")),
        },
        Err(_) => KeyPackageIn::tls_deserialize_exact(bytes)
            .map_err(|e| bad(format!("not a KeyPackage: {e}")))?,
    };
    let kp = kp_in
        .validate(&RustCrypto::default(), ProtocolVersion::Mls10)
        .map_err(|e| bad(format!("invalid KeyPackage: {e}")))?;
    if kp.ciphersuite() != CIPHERSUITE {
        return Err(bad(format!(
            "KeyPackage ciphersuite must be {}",
            parley_proto::CIPHERSUITE_NAME
        )));
    }
    let leaf = kp.leaf_node();
    let device = credential_device(leaf.credential())
        .ok_or_else(|| bad("KeyPackage credential is not a client URI"))?;
    let reference = kp
        .hash_ref(&RustCrypto::default())
        .map_err(|e| bad(format!("cannot hash the KeyPackage: {e}")))?
        .as_slice()
        .to_vec();
    let bare = kp
        .tls_serialize_detached()
        .map_err(|e| bad(format!("cannot encode the KeyPackage: {e}")))?;
    Ok(CheckedKeyPackage {
        leaf: LeafDevice {
            device,
            signature_key: leaf.signature_key().as_slice().to_vec(),
        },
        reference,
        bare,
    })
}

/// The header of an application message, read without decrypting.
pub struct AppMessageHeader {
    pub group_id: Vec<u8>,
    pub epoch: u64,
    /// The sender's expiry hint (Safe AAD `parley_expires_at`), if any.
    pub expires_at: Option<u64>,
}

/// Parses an MlsMessage that must be a PrivateMessage with application content.
pub fn application_header(bytes: &[u8]) -> Result<AppMessageHeader, MlsInputError> {
    let msg = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| bad(format!("not an MLS message: {e}")))?;
    let MlsMessageBodyIn::PrivateMessage(pm) = msg.extract() else {
        return Err(bad("a message must be an MLS PrivateMessage"));
    };
    let expires_at = expiry_from_aad(pm.aad());
    let pm = ProtocolMessage::from(pm);
    if pm.content_type() != ContentType::Application {
        return Err(bad("handshake messages go to /commits as PublicMessages"));
    }
    Ok(AppMessageHeader {
        group_id: pm.group_id().as_slice().to_vec(),
        epoch: pm.epoch().as_u64(),
        expires_at,
    })
}

/// Checks that bytes are an MLS Welcome.
pub fn check_welcome(bytes: &[u8]) -> Result<(), MlsInputError> {
    let msg = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| bad(format!("welcome is not an MLS message: {e}")))?;
    match msg.extract() {
        MlsMessageBodyIn::Welcome(_) => Ok(()),
        _ => Err(bad("welcome is not an MLS Welcome")),
    }
}

#[derive(Debug, TlsSerialize, TlsDeserialize, TlsSize)]
struct StoredEntry {
    key: VLBytes,
    value: VLBytes,
}

/// The database form of [`PublicState`].
#[derive(Debug, TlsSerialize, TlsDeserialize, TlsSize)]
struct StoredState {
    group_id: VLBytes,
    entries: Vec<StoredEntry>,
}

/// One room's public group state, as openmls stores it, serializable for our database, with
/// the group loaded from it. Loading parses the whole ratchet tree (JSON, about 1 MB at 1,000
/// members), so it happens once per state, not once per question asked of it.
pub struct PublicState {
    storage: MemoryStorage,
    group: PublicGroup,
}

/// The effect of a verified commit.
pub struct CommitEffect {
    pub next: PublicState,
    pub epoch: u64,
    pub committer: DeviceUri,
    /// The committer joined with this commit (an external commit).
    pub external: bool,
    /// The room's state (GroupContext components) before and after.
    pub state_before: RoomState,
    pub state_after: RoomState,
    /// The `external_senders` (TLS-encoded `ExternalSender`s) after the commit.
    pub external_senders: Vec<Vec<u8>>,
    pub added: Vec<LeafDevice>,
    pub removed: Vec<DeviceUri>,
    /// The removed devices that had asked to leave (their pending self-removals).
    pub left: Vec<DeviceUri>,
    pub members: Vec<LeafDevice>,
    pub has_other_proposals: bool,
    /// The commit leaves out a proposal the hub holds (a member's leave): refuse it, the
    /// committer must sync and include it.
    pub misses_pending: bool,
}

/// The effect of a verified self-removal proposal.
pub struct LeaveEffect {
    pub next: PublicState,
    pub leaver: DeviceUri,
    /// The leaver had already asked (a resend after a lost answer): nothing new to queue.
    pub repeated: bool,
    /// Members that would remain to commit the leave (not leaving themselves).
    pub remaining: usize,
}

impl PublicState {
    /// Starts following a new group from its GroupInfo (an MlsMessage or bare) and ratchet tree
    /// (verifies both).
    pub fn create(
        group_info: &[u8],
        ratchet_tree: &[u8],
    ) -> Result<(Self, u64, Vec<LeafDevice>), MlsInputError> {
        let vgi = decode_group_info(group_info)?;
        if vgi.ciphersuite() != CIPHERSUITE {
            return Err(bad(format!(
                "the group must use {}",
                parley_proto::CIPHERSUITE_NAME
            )));
        }
        let tree = RatchetTreeIn::tls_deserialize_exact(ratchet_tree)
            .map_err(|e| bad(format!("ratchet_tree is not a ratchet tree: {e}")))?;
        let storage = MemoryStorage::default();
        let (group, _info) = PublicGroup::from_external(
            &RustCrypto::default(),
            &storage,
            tree,
            vgi,
            ProposalStore::new(),
        )
        .map_err(|e| bad(format!("invalid group: {e}")))?;
        let epoch = group.group_context().epoch().as_u64();
        let members = members_of(&group)?;
        Ok((Self { storage, group }, epoch, members))
    }

    pub fn group_id_bytes(&self) -> &[u8] {
        self.group.group_id().as_slice()
    }

    /// The room's state from the GroupContext's `app_data_dictionary`.
    pub fn room_state(&self) -> Result<RoomState, MlsInputError> {
        room_state_of(&self.group)
    }

    /// The `external_senders` of the GroupContext, each TLS-encoded.
    pub fn external_senders(&self) -> Result<Vec<Vec<u8>>, MlsInputError> {
        external_senders_of(&self.group)
    }

    /// The group's ratchet tree (`optional<Node> ratchet_tree<V>`).
    pub fn ratchet_tree(&self) -> Result<Vec<u8>, MlsInputError> {
        self.group
            .export_ratchet_tree()
            .tls_serialize_detached()
            .map_err(|e| bad(format!("cannot encode the ratchet tree: {e}")))
    }

    /// The member devices with their signature keys.
    pub fn members(&self) -> Result<Vec<LeafDevice>, MlsInputError> {
        members_of(&self.group)
    }

    /// Checks the GroupInfo a committer hands in with its commit, against this (the new) state:
    /// it must carry exactly this GroupContext and be signed by `committer`, so the hub never
    /// serves joiners a GroupInfo of a forked epoch or one that fails verification. Returns it
    /// bare, without a ratchet tree, as MIMI `groupInfo` serves it.
    pub fn check_group_info(
        &self,
        bytes: &[u8],
        committer: &DeviceUri,
    ) -> Result<Vec<u8>, MlsInputError> {
        let group = &self.group;
        let encoded = check_group_info(
            bytes,
            self.group_id_bytes(),
            group.group_context().epoch().as_u64(),
        )?;
        let vgi = VerifiableGroupInfo::tls_deserialize_exact(&encoded)
            .map_err(|e| bad(format!("group_info is not a GroupInfo: {e}")))?;
        if vgi.group_context() != group.group_context() {
            return Err(bad(
                "the GroupInfo does not carry the group's state after the commit",
            ));
        }
        let key = members_of(group)?
            .into_iter()
            .find(|m| &m.device == committer)
            .map(|m| m.signature_key)
            .ok_or_else(|| bad("the committer is not a member after its commit"))?;
        let key = OpenMlsSignaturePublicKey::new(key.into(), CIPHERSUITE.signature_algorithm())
            .map_err(|e| bad(format!("the committer's signature key is unusable: {e}")))?;
        vgi.verify(&RustCrypto::default(), &key)
            .map_err(|_| bad("the GroupInfo's signature is not the committer's"))?;
        Ok(encoded)
    }

    /// Verifies a commit (a PublicMessage) against the current state and computes the next state,
    /// leaving `self` untouched so nothing changes unless the result is stored.
    pub fn apply_commit(&self, commit: &[u8]) -> Result<CommitEffect, MlsInputError> {
        let pm = handshake_message(commit, ContentType::Commit, "commit")?;
        let group = &self.group;
        let before = group.members().count();
        let pending = self.pending_removals()?;
        let state_before = room_state_of(group)?;
        let processed = group
            .process_message(&RustCrypto::default(), pm)
            .map_err(|e| bad(format!("commit refused: {e}")))?;
        let sender = processed.sender().clone();
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            return Err(bad("the PublicMessage is not a commit"));
        };
        let (committer, external) = match sender {
            Sender::Member(leaf) => (
                group
                    .leaf(leaf)
                    .and_then(|leaf| credential_device(leaf.credential()))
                    .ok_or_else(|| bad("committer leaf is not a client URI"))?,
                false,
            ),
            Sender::NewMemberCommit => (
                staged
                    .update_path_leaf_node()
                    .and_then(|leaf| credential_device(leaf.credential()))
                    .ok_or_else(|| bad("the external committer's leaf is not a client URI"))?,
                true,
            ),
            _ => return Err(bad("only members and joining clients may commit")),
        };
        if let Some(leaf) = staged.update_path_leaf_node() {
            // openmls accepts any credential in an UpdatePath (RFC 9420 leaves it to the
            // application): the committer would become another user's client, which nobody
            // vouched for, and its messages would pass as that user's.
            if credential_device(leaf.credential()).as_ref() != Some(&committer) {
                return Err(bad(format!(
                    "a commit may not change its committer's identity ({committer})"
                )));
            }
        }
        let mut added = Vec::new();
        for add in staged.add_proposals() {
            let leaf = add.add_proposal().key_package().leaf_node();
            let device = credential_device(leaf.credential())
                .ok_or_else(|| bad("an added KeyPackage is not a Parley device"))?;
            added.push(LeafDevice {
                device,
                signature_key: leaf.signature_key().as_slice().to_vec(),
            });
        }
        let mut removed = Vec::new();
        for rm in staged.remove_proposals() {
            let index = rm.remove_proposal().removed();
            let leaf = group
                .leaf(index)
                .ok_or_else(|| bad("a removal names an empty leaf"))?;
            removed.push(
                credential_device(leaf.credential())
                    .ok_or_else(|| bad("a removed leaf is not a Parley device"))?,
            );
        }
        let has_other_proposals = staged.queued_proposals().any(|q| {
            !matches!(
                q.proposal(),
                Proposal::Add(_)
                    | Proposal::Remove(_)
                    | Proposal::Update(_)
                    | Proposal::GroupContextExtensions(_)
                    | Proposal::ExternalInit(_)
            )
        });
        let covered: Vec<LeafNodeIndex> = staged
            .remove_proposals()
            .map(|rm| rm.remove_proposal().removed())
            .collect();
        let misses_pending = pending.iter().any(|leaf| !covered.contains(leaf));
        let left = pending
            .iter()
            .filter(|leaf| covered.contains(leaf))
            .filter_map(|leaf| {
                group
                    .leaf(*leaf)
                    .and_then(|l| credential_device(l.credential()))
            })
            .collect();
        let mut next = self.fork()?;
        next.group
            .merge_commit(&next.storage, *staged)
            .map_err(|e| bad(format!("cannot apply commit: {e}")))?;
        let group = &next.group;
        let members = members_of(group)?;
        debug_assert!(before + added.len() + 1 >= members.len());
        Ok(CommitEffect {
            epoch: group.group_context().epoch().as_u64(),
            state_after: room_state_of(group)?,
            external_senders: external_senders_of(group)?,
            state_before,
            external,
            next,
            committer,
            added,
            removed,
            left,
            members,
            has_other_proposals,
            misses_pending,
        })
    }

    /// Leaves whose owners asked to leave and are not yet removed by a commit.
    fn pending_removals(&self) -> Result<Vec<LeafNodeIndex>, MlsInputError> {
        let queued = self
            .group
            .queued_proposals(&self.storage)
            .map_err(|e| bad(format!("stored proposals unreadable: {e}")))?;
        Ok(queued
            .iter()
            .filter_map(|(_, q)| match q.proposal() {
                Proposal::Remove(rm) => Some(rm.removed()),
                _ => None,
            })
            .collect())
    }

    /// Verifies a member's proposal to remove itself (leaving) and queues it in the next state.
    pub fn apply_leave(&self, proposal: &[u8]) -> Result<LeaveEffect, MlsInputError> {
        let pm = handshake_message(proposal, ContentType::Proposal, "proposal")?;
        let group = &self.group;
        let processed = group
            .process_message(&RustCrypto::default(), pm)
            .map_err(|e| bad(format!("proposal refused: {e}")))?;
        let Sender::Member(sender_leaf) = *processed.sender() else {
            return Err(bad("only members may propose"));
        };
        let ProcessedMessageContent::ProposalMessage(queued) = processed.into_content() else {
            return Err(bad("the PublicMessage is not a proposal"));
        };
        let Proposal::Remove(rm) = queued.proposal() else {
            return Err(bad(
                "only a member's removal of itself (leaving) may be proposed",
            ));
        };
        if rm.removed() != sender_leaf {
            return Err(bad(
                "a member may only propose its own removal; others are removed by commit",
            ));
        }
        let leaver = group
            .leaf(sender_leaf)
            .and_then(|leaf| credential_device(leaf.credential()))
            .ok_or_else(|| bad("the proposer is not a Parley device"))?;
        let mut leaving = self.pending_removals()?;
        let repeated = leaving.contains(&sender_leaf);
        let mut next = self.fork()?;
        if !repeated {
            leaving.push(sender_leaf);
            next.group
                .add_proposal(&next.storage, *queued)
                .map_err(|e| bad(format!("cannot queue proposal: {e}")))?;
        }
        let remaining = group
            .members()
            .filter(|m| !leaving.contains(&m.index))
            .count();
        Ok(LeaveEffect {
            next,
            leaver,
            repeated,
            remaining,
        })
    }

    fn load(storage: MemoryStorage, group_id: &GroupId) -> Result<Self, MlsInputError> {
        let group = PublicGroup::load(&storage, group_id)
            .map_err(|e| bad(format!("stored group state unreadable: {e}")))?
            .ok_or_else(|| bad("stored group state missing"))?;
        Ok(Self { storage, group })
    }

    /// A copy to compute the next state in, leaving this one as it is (openmls's PublicGroup
    /// cannot be cloned, so the copy is loaded from a copy of the storage).
    fn fork(&self) -> Result<Self, MlsInputError> {
        let values = self
            .storage
            .values
            .read()
            .map_err(|_| bad("group state lock poisoned"))?
            .clone();
        let storage = MemoryStorage {
            values: RwLock::new(values),
        };
        Self::load(storage, self.group.group_id())
    }

    /// Serializes the state for the database.
    pub fn encode(&self) -> Result<Vec<u8>, MlsInputError> {
        let values = self
            .storage
            .values
            .read()
            .map_err(|_| bad("group state lock poisoned"))?;
        let mut entries: Vec<StoredEntry> = values
            .iter()
            .map(|(k, v)| StoredEntry {
                key: k.clone().into(),
                value: v.clone().into(),
            })
            .collect();
        entries.sort_by(|a, b| a.key.as_slice().cmp(b.key.as_slice()));
        let mut out = Vec::new();
        StoredState {
            group_id: self.group_id_bytes().to_vec().into(),
            entries,
        }
        .tls_serialize(&mut out)
        .map_err(|e| bad(format!("cannot encode group state: {e}")))?;
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, MlsInputError> {
        let StoredState { group_id, entries } = StoredState::tls_deserialize_exact(bytes)
            .map_err(|e| bad(format!("stored group state corrupt: {e}")))?;
        let values: HashMap<Vec<u8>, Vec<u8>> = entries
            .into_iter()
            .map(|e| (e.key.into(), e.value.into()))
            .collect();
        let storage = MemoryStorage {
            values: RwLock::new(values),
        };
        Self::load(storage, &GroupId::from_slice(group_id.as_slice()))
    }
}

/// Parses a handshake message the hub must be able to read: a PublicMessage of `expected` type.
fn handshake_message(
    bytes: &[u8],
    expected: ContentType,
    what: &str,
) -> Result<ProtocolMessage, MlsInputError> {
    let msg = MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(|e| bad(format!("{what} is not an MLS message: {e}")))?;
    let MlsMessageBodyIn::PublicMessage(pm) = msg.extract() else {
        return Err(bad(format!("a {what} must be an MLS PublicMessage")));
    };
    let pm = ProtocolMessage::from(pm);
    if pm.content_type() != expected {
        return Err(bad(format!("the PublicMessage is not a {what}")));
    }
    Ok(pm)
}

/// A GroupInfo, as an MlsMessage or bare.
fn decode_group_info(bytes: &[u8]) -> Result<VerifiableGroupInfo, MlsInputError> {
    if let Ok(msg) = MlsMessageIn::tls_deserialize_exact(bytes) {
        return match msg.extract() {
            MlsMessageBodyIn::GroupInfo(vgi) => Ok(vgi),
            _ => Err(bad("group_info is not an MLS GroupInfo")),
        };
    }
    VerifiableGroupInfo::tls_deserialize_exact(bytes)
        .map_err(|e| bad(format!("group_info is not a GroupInfo: {e}")))
}

/// Checks a committer's GroupInfo for the group's new epoch (bare or as an MlsMessage) and
/// returns it bare, to serve MIMI `groupInfo` with. Its signature is the committer's, which
/// a joining client verifies against the tree.
pub fn check_group_info(
    bytes: &[u8],
    group_id: &[u8],
    epoch: u64,
) -> Result<Vec<u8>, MlsInputError> {
    let vgi = decode_group_info(bytes)?;
    if vgi.group_id().as_slice() != group_id || vgi.epoch().as_u64() != epoch {
        return Err(bad(format!(
            "the GroupInfo must be the group's, for epoch {epoch}"
        )));
    }
    if vgi
        .extensions()
        .iter()
        .any(|e| e.extension_type() == openmls::prelude::ExtensionType::RatchetTree)
    {
        return Err(bad("the GroupInfo must not carry the ratchet tree"));
    }
    vgi.tls_serialize_detached()
        .map_err(|e| bad(format!("cannot encode the GroupInfo: {e}")))
}

fn room_state_of(group: &PublicGroup) -> Result<RoomState, MlsInputError> {
    let ext = group
        .group_context()
        .extensions()
        .unknown(APP_DATA_DICTIONARY)
        .ok_or_else(|| bad("the group has no app_data_dictionary (room state) extension"))?;
    RoomState::decode(&ext.0).map_err(|e| bad(format!("invalid room state: {e}")))
}

fn external_senders_of(group: &PublicGroup) -> Result<Vec<Vec<u8>>, MlsInputError> {
    let Some(senders) = group.group_context().extensions().external_senders() else {
        return Ok(Vec::new());
    };
    senders
        .iter()
        .map(|s| {
            s.tls_serialize_detached()
                .map_err(|e| bad(format!("cannot encode an external sender: {e}")))
        })
        .collect()
}

fn members_of(group: &PublicGroup) -> Result<Vec<LeafDevice>, MlsInputError> {
    group
        .members()
        .map(|m| {
            credential_device(&m.credential)
                .map(|device| LeafDevice {
                    device,
                    signature_key: m.signature_key.clone(),
                })
                .ok_or_else(|| bad("a group member is not a client URI"))
        })
        .collect()
}

/// The epoch a Public- or PrivateMessage was built for, read from its cleartext header.
pub fn message_epoch(bytes: &[u8]) -> Option<u64> {
    let msg = MlsMessageIn::tls_deserialize_exact(bytes).ok()?;
    let pm = msg.try_into_protocol_message().ok()?;
    Some(pm.epoch().as_u64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use openmls::prelude::{
        Capabilities, CredentialWithKey, Extension, ExtensionType, Extensions, KeyPackage,
        LeafNodeParameters, MlsGroup, MlsGroupCreateConfig, NewSignerBundle,
        RequiredCapabilitiesExtension, UnknownExtension, MIXED_PLAINTEXT_WIRE_FORMAT_POLICY,
    };
    use openmls_basic_credential::SignatureKeyPair;
    use openmls_rust_crypto::OpenMlsRustCrypto;
    use parley_proto::{Domain, RoomId, UserId};
    use proptest::prelude::*;

    const ALICE: &str = "mimi://chirp.test/d/alice/0000000000000001";

    /// An openmls client with a Parley-style credential, its own storage and signer.
    struct Client {
        provider: OpenMlsRustCrypto,
        signer: SignatureKeyPair,
        credential: CredentialWithKey,
    }

    fn capabilities() -> Capabilities {
        Capabilities::builder()
            .extensions(vec![ExtensionType::Unknown(APP_DATA_DICTIONARY)])
            .build()
    }

    impl Client {
        fn new(uri: &str) -> Self {
            let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).unwrap();
            let credential = CredentialWithKey {
                credential: BasicCredential::new(uri.as_bytes().to_vec()).into(),
                signature_key: signer.public().into(),
            };
            Self {
                provider: OpenMlsRustCrypto::default(),
                signer,
                credential,
            }
        }

        fn key_package(&self) -> KeyPackage {
            KeyPackage::builder()
                .leaf_node_capabilities(capabilities())
                .build(
                    CIPHERSUITE,
                    &self.provider,
                    &self.signer,
                    self.credential.clone(),
                )
                .unwrap()
                .key_package()
                .clone()
        }
    }

    /// A group room of alice (admin) and `other` (member) hubbed at chirp.test: alice's and
    /// the other's groups, and the hub's public state of it.
    fn room_with(
        alice: &Client,
        other: &Client,
        other_user: &str,
    ) -> (MlsGroup, MlsGroup, PublicState) {
        let room = RoomId::from_random(&Domain::parse("chirp.test").unwrap(), [1; 16]);
        let mut state = RoomState::group(
            room.clone(),
            "team",
            &UserId::parse("alice@chirp.test").unwrap(),
            None,
        );
        state.participants.insert(
            UserId::parse(other_user).unwrap(),
            parley_proto::mimi::room_state::ROLE_MEMBER,
        );
        let extensions = Extensions::from_vec(vec![
            Extension::RequiredCapabilities(RequiredCapabilitiesExtension::new(
                &[ExtensionType::Unknown(APP_DATA_DICTIONARY)],
                &[],
                &[],
            )),
            Extension::Unknown(
                APP_DATA_DICTIONARY,
                UnknownExtension(state.encode().unwrap()),
            ),
        ])
        .unwrap();
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(false)
            .capabilities(capabilities())
            .with_group_context_extensions(extensions)
            .build();
        let mut group = MlsGroup::new_with_group_id(
            &alice.provider,
            &alice.signer,
            &config,
            GroupId::from_slice(&room.parley_group_id()),
            alice.credential.clone(),
        )
        .unwrap();
        let (_, welcome, _) = group
            .add_members(&alice.provider, &alice.signer, &[other.key_package()])
            .unwrap();
        group.merge_pending_commit(&alice.provider).unwrap();
        let welcome = match MlsMessageIn::from(welcome).extract() {
            MlsMessageBodyIn::Welcome(w) => w,
            _ => unreachable!("add_members makes a Welcome"),
        };
        let tree = group.export_ratchet_tree();
        let joined = openmls::prelude::StagedWelcome::new_from_welcome(
            &other.provider,
            &openmls::prelude::MlsGroupJoinConfig::builder()
                .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
                .build(),
            welcome,
            Some(tree.clone().into()),
        )
        .unwrap()
        .into_group(&other.provider)
        .unwrap();
        let group_info = group
            .export_group_info(
                openmls_traits::OpenMlsProvider::crypto(&alice.provider),
                &alice.signer,
                false,
            )
            .unwrap()
            .tls_serialize_detached()
            .unwrap();
        let (public, epoch, _) =
            PublicState::create(&group_info, &tree.tls_serialize_detached().unwrap()).unwrap();
        assert_eq!(epoch, 1);
        (group, joined, public)
    }

    #[test]
    fn a_committer_cannot_rename_its_leaf_to_another_client() {
        let alice = Client::new(ALICE);
        let eve = Client::new("mimi://evil.test/d/eve/0000000000000001");
        let (_alice, mut eves_group, public) = room_with(&alice, &eve, "eve@evil.test");
        // eve's UpdatePath brings a leaf with a new key and a credential naming a client of
        // alice's (a participant): the hub must not take that leaf for alice's.
        let new_signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).unwrap();
        let impostor = CredentialWithKey {
            credential: BasicCredential::new(
                b"mimi://chirp.test/d/alice/00000000000000ee".to_vec(),
            )
            .into(),
            signature_key: new_signer.public().into(),
        };
        let bundle = eves_group
            .self_update_with_new_signer(
                &eve.provider,
                &eve.signer,
                NewSignerBundle {
                    signer: &new_signer,
                    credential_with_key: impostor.clone(),
                },
                LeafNodeParameters::builder()
                    .with_credential_with_key(impostor)
                    .with_capabilities(capabilities())
                    .build(),
            )
            .unwrap();
        let commit = bundle.into_messages().0.tls_serialize_detached().unwrap();
        match public.apply_commit(&commit) {
            Err(e) => assert!(e.0.contains("identity"), "{e}"),
            Ok(effect) => panic!(
                "accepted; members now {:?}",
                effect
                    .members
                    .iter()
                    .map(|m| m.device.to_string())
                    .collect::<Vec<_>>()
            ),
        }
    }

    /// The GroupInfo served to joiners must be the one of the state the hub just took, signed by
    /// the committer: else a member could hand out a GroupInfo of a forked epoch or with a broken
    /// signature, and every external join would fail.
    #[test]
    fn a_commits_group_info_must_match_the_new_state_and_its_committer() {
        let alice = Client::new(ALICE);
        let eve = Client::new("mimi://evil.test/d/eve/0000000000000001");
        let (mut alices_group, mut eves_group, public) = room_with(&alice, &eve, "eve@evil.test");
        let group_info_of = |group: &mut MlsGroup, client: &Client| {
            group.merge_pending_commit(&client.provider).unwrap();
            group
                .export_group_info(
                    openmls_traits::OpenMlsProvider::crypto(&client.provider),
                    &client.signer,
                    false,
                )
                .unwrap()
                .tls_serialize_detached()
                .unwrap()
        };
        let (commit, _, _) = eves_group
            .self_update(&eve.provider, &eve.signer, LeafNodeParameters::default())
            .unwrap()
            .into_contents();
        let commit = commit.tls_serialize_detached().unwrap();
        let group_info = group_info_of(&mut eves_group, &eve);
        let effect = public.apply_commit(&commit).unwrap();
        let eve_uri = effect.committer.clone();
        effect.next.check_group_info(&group_info, &eve_uri).unwrap();

        let mut broken = group_info.clone();
        *broken.last_mut().unwrap() ^= 1;
        let refused = effect.next.check_group_info(&broken, &eve_uri).unwrap_err();
        assert!(refused.0.contains("signature"), "{refused}");

        // A fork: alice commits to the same epoch number without eve's commit, and eve passes
        // alice's GroupInfo off with her own commit.
        alices_group
            .self_update(
                &alice.provider,
                &alice.signer,
                LeafNodeParameters::default(),
            )
            .unwrap();
        let forked = group_info_of(&mut alices_group, &alice);
        let refused = effect.next.check_group_info(&forked, &eve_uri).unwrap_err();
        assert!(refused.0.contains("state"), "{refused}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Every decoder the hub runs on client bytes returns an error, never panics.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = validate_key_package(&bytes);
            let _ = application_header(&bytes);
            let _ = check_welcome(&bytes);
            let _ = message_epoch(&bytes);
            let _ = PublicState::create(&bytes, &bytes);
            let _ = PublicState::decode(&bytes);
        }

        /// Bytes that start like an MLS message (version 1, each wire format) reach deeper parsers.
        #[test]
        fn mls_shaped_input_never_panics(wire in 1u8..6, rest in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut bytes = vec![0, 1, 0, wire];
            bytes.extend(rest);
            let _ = validate_key_package(&bytes);
            let _ = application_header(&bytes);
            let _ = message_epoch(&bytes);
            let _ = PublicState::create(&bytes, &bytes[2..]);
        }
    }
}
