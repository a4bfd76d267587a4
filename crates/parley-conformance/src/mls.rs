//! The kit's own MLS clients and hub key, all on openmls with in-memory state: KeyPackages,
//! signed MIMI requests, rooms the kit hubs (GroupContext per docs/mimi-profile.md §4), commits
//! with their Welcome, GroupInfo and ratchet tree, messages, joins by Welcome and by external
//! commit, and leaving. Nothing here does I/O.

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    BasicCredential, Capabilities, Ciphersuite, Credential, CredentialType, CredentialWithKey,
    Extension, ExtensionType, Extensions, ExternalSender, GroupContext, GroupId, KeyPackage,
    KeyPackageIn, LeafNodeIndex, LeafNodeParameters, MlsGroup, MlsGroupCreateConfig,
    MlsGroupJoinConfig, MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, OpenMlsProvider,
    ProcessedMessageContent, ProtocolVersion, RatchetTreeIn, RequiredCapabilitiesExtension,
    SignatureScheme, StagedWelcome, UnknownExtension, MIXED_PLAINTEXT_WIRE_FORMAT_POLICY,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::random::OpenMlsRand;
use openmls_traits::signatures::Signer;
use parley_proto::ids::DeviceUri;
use parley_proto::mimi::room_state::{RoomState, APP_DATA_DICTIONARY};
use parley_proto::mimi::{
    self, GroupInfoRequest, GroupInfoRequestTbs, IdentifierUri, KeyMaterialRequest,
    KeyMaterialRequestTbs,
};
use parley_proto::{Domain, RoomId, UserId};
use std::collections::HashMap;

/// The only ciphersuite MIMI (and Parley) speaks here.
pub const SUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// `app_data_dictionary`, which openmls 0.9 carries as an unknown extension.
pub const ROOM_STATE: ExtensionType = ExtensionType::Unknown(APP_DATA_DICTIONARY);

#[derive(Debug, thiserror::Error)]
#[error("MLS: {0}")]
pub struct MlsError(pub String);

fn err(what: &str, e: impl std::fmt::Debug) -> MlsError {
    MlsError(format!("{what}: {e:?}"))
}

type Result<T> = std::result::Result<T, MlsError>;

/// What a kit leaf supports: the room state extension (a GroupContext extension must be listed).
pub fn leaf_capabilities() -> Capabilities {
    Capabilities::builder().extensions(vec![ROOM_STATE]).build()
}

/// `requiredCapabilities` of a keyMaterial request (docs/mimi-profile.md §5).
fn claim_requirements() -> RequiredCapabilitiesExtension {
    RequiredCapabilitiesExtension::new(&[ROOM_STATE], &[], &[CredentialType::Basic])
}

/// Random bytes from the crypto provider.
pub fn random<const N: usize>() -> [u8; N] {
    OpenMlsRustCrypto::default()
        .rand()
        .random_array()
        .unwrap_or([7; N])
}

/// Lowercase hex of random bytes, for names the peer has never seen.
pub fn random_hex<const N: usize>() -> String {
    random::<N>().iter().map(|b| format!("{b:02x}")).collect()
}

fn encode(value: &impl openmls::prelude::tls_codec::Serialize) -> Result<Vec<u8>> {
    value
        .tls_serialize_detached()
        .map_err(|e| err("encoding", e))
}

/// An MlsMessageOut as a MIMI `MLSMessage`.
fn message_of(out: &MlsMessageOut) -> Result<mimi::MlsMessage> {
    mimi::MlsMessage::from_bytes(encode(out)?).map_err(|e| err("MLSMessage", e))
}

/// The bare structure inside an MLSMessage (without version and wire format).
fn bare<T: tls_codec::Deserialize>(out: &MlsMessageOut) -> Result<mimi::Mls<T>> {
    let bytes = encode(out)?;
    let inner = bytes
        .get(4..)
        .ok_or_else(|| MlsError("short MLSMessage".into()))?;
    mimi::Mls::from_bytes(inner.to_vec()).map_err(|e| err("bare MLS structure", e))
}

/// The hub's signing key and `ExternalSender` (credential `mimi://DOMAIN`), listed in every room
/// the kit hubs.
pub struct HubKey {
    signer: SignatureKeyPair,
    domain: Domain,
}

impl HubKey {
    pub fn new(domain: &Domain) -> Result<Self> {
        Ok(Self {
            signer: SignatureKeyPair::new(SignatureScheme::ED25519)
                .map_err(|e| err("hub key", e))?,
            domain: domain.clone(),
        })
    }

    pub fn external_sender(&self) -> ExternalSender {
        let credential: Credential =
            BasicCredential::new(format!("mimi://{}", self.domain).into_bytes()).into();
        ExternalSender::new(self.signer.public().to_vec().into(), credential)
    }
}

/// What a commit hands the hub and the followers.
pub struct CommitOut {
    pub commit: mimi::MlsMessage,
    pub welcome: Option<mimi::Welcome>,
    pub group_info: mimi::GroupInfo,
    pub ratchet_tree: mimi::RatchetTree,
}

/// What processing one incoming message did.
#[derive(Debug)]
pub enum Processed {
    Application(Vec<u8>),
    Proposal,
    Commit,
}

/// One MLS client (a device) of a kit user, with its groups by room.
pub struct KitClient {
    pub device: DeviceUri,
    provider: OpenMlsRustCrypto,
    signer: SignatureKeyPair,
    groups: HashMap<RoomId, MlsGroup>,
}

fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(false)
        .max_past_epochs(3)
        .build()
}

impl KitClient {
    pub fn new(device: DeviceUri) -> Result<Self> {
        let signer =
            SignatureKeyPair::new(SignatureScheme::ED25519).map_err(|e| err("signature key", e))?;
        Ok(Self::with_signer(device, signer))
    }

    /// A client whose signature key was made before its device id was known (a provider that
    /// assigns device ids at registration).
    pub fn with_signer(device: DeviceUri, signer: SignatureKeyPair) -> Self {
        Self {
            device,
            provider: OpenMlsRustCrypto::default(),
            signer,
            groups: HashMap::new(),
        }
    }

    pub fn user(&self) -> &UserId {
        &self.device.user
    }

    pub fn credential(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.device.to_string().into_bytes()).into(),
            signature_key: self.signer.public().to_vec().into(),
        }
    }

    pub fn public_key(&self) -> Vec<u8> {
        self.signer.public().to_vec()
    }

    fn wire_credential(&self) -> Result<mimi::Credential> {
        mimi::Credential::encode(&self.credential().credential).map_err(|e| err("credential", e))
    }

    /// Signs `SignContent` bytes (from `parley_proto::mimi::signing`).
    pub fn sign(&self, sign_content: &[u8]) -> Result<Vec<u8>> {
        self.signer
            .sign(sign_content)
            .map_err(|e| err("signing", e))
    }

    /// A fresh bare KeyPackage of this client and its KeyPackageRef.
    pub fn key_package(&self) -> Result<(mimi::KeyPackage, Vec<u8>)> {
        let bundle = KeyPackage::builder()
            .leaf_node_capabilities(leaf_capabilities())
            .build(SUITE, &self.provider, &self.signer, self.credential())
            .map_err(|e| err("KeyPackage", e))?;
        let reference = bundle
            .key_package()
            .hash_ref(self.provider.crypto())
            .map_err(|e| err("KeyPackageRef", e))?;
        let bytes = encode(bundle.key_package())?;
        Ok((
            mimi::KeyPackage::from_bytes(bytes).map_err(|e| err("KeyPackage", e))?,
            reference.as_slice().to_vec(),
        ))
    }

    /// The unsigned part of a keyMaterial request for `target` in `room`.
    pub fn key_material_tbs(&self, target: &str, room: &RoomId) -> Result<KeyMaterialRequestTbs> {
        Ok(KeyMaterialRequestTbs {
            protocol: mimi::MLS10,
            requesting_user: IdentifierUri::new(&self.user().to_uri()),
            target_user: IdentifierUri::new(target),
            room_id: IdentifierUri::new(room.as_str()),
            acceptable_ciphersuites: vec![mimi::CIPHERSUITE],
            required_capabilities: mimi::RequiredCapabilities::encode(&claim_requirements())
                .map_err(|e| err("required capabilities", e))?,
            requester_signature_key: self.public_key().into(),
            requester_credential: self.wire_credential()?,
        })
    }

    /// A keyMaterial TBS signed by this client.
    pub fn sign_key_material(&self, tbs: KeyMaterialRequestTbs) -> Result<KeyMaterialRequest> {
        let content = tbs.sign_content().map_err(|e| err("TBS", e))?;
        Ok(tbs.signed(self.sign(&content)?))
    }

    /// A signed `KeyMaterialRequest` for `target` (a user URI) in `room`.
    pub fn key_material_request(&self, target: &str, room: &RoomId) -> Result<KeyMaterialRequest> {
        self.sign_key_material(self.key_material_tbs(target, room)?)
    }

    /// A signed `GroupInfoRequest` asking for the answer to be encrypted to `hpke_public`.
    pub fn group_info_request(&self, hpke_public: &[u8]) -> Result<GroupInfoRequest> {
        let tbs = GroupInfoRequestTbs {
            protocol: mimi::MLS10,
            cipher_suite: mimi::CIPHERSUITE,
            requesting_signature_key: self.public_key().into(),
            requesting_credential: self.wire_credential()?,
            group_info_public_key: hpke_public.to_vec().into(),
            joining_code: Vec::new().into(),
        };
        let content = tbs.sign_content().map_err(|e| err("TBS", e))?;
        Ok(tbs.signed(self.sign(&content)?))
    }

    /// A KeyPackage offered for `expected`'s client: valid, of the ciphersuite, naming a client
    /// of that user.
    pub fn validate_key_package(
        &self,
        bytes: &[u8],
        expected: &UserId,
    ) -> Result<(DeviceUri, KeyPackage)> {
        let kp = KeyPackageIn::tls_deserialize_exact(bytes)
            .map_err(|e| err("KeyPackage", e))?
            .validate(self.provider.crypto(), ProtocolVersion::Mls10)
            .map_err(|e| err("invalid KeyPackage", e))?;
        if kp.ciphersuite() != SUITE {
            return Err(MlsError("KeyPackage of another ciphersuite".into()));
        }
        let device = device_of(kp.leaf_node().credential())?;
        if device.user != *expected {
            return Err(MlsError(format!(
                "KeyPackage names {device}, not a client of {expected}"
            )));
        }
        Ok((device, kp))
    }

    /// Creates the group of a room the kit hubs: group id `mimi://HUB/g/NAME`, GroupContext with
    /// the hub as external sender, the requirements and the room state.
    pub fn create_room(&mut self, state: &RoomState, hub: ExternalSender) -> Result<()> {
        let extensions = Extensions::from_vec(vec![
            Extension::ExternalSenders(vec![hub]),
            Extension::RequiredCapabilities(RequiredCapabilitiesExtension::new(
                &[ROOM_STATE],
                &[],
                &[],
            )),
            state_extension(state)?,
        ])
        .map_err(|e| err("GroupContext extensions", e))?;
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(SUITE)
            .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(false)
            .capabilities(leaf_capabilities())
            .with_group_context_extensions(extensions)
            .build();
        let group = MlsGroup::new_with_group_id(
            &self.provider,
            &self.signer,
            &config,
            GroupId::from_slice(&state.room.parley_group_id()),
            self.credential(),
        )
        .map_err(|e| err("creating the group", e))?;
        self.groups.insert(state.room.clone(), group);
        Ok(())
    }

    /// A scratch group (no room state) whose messages no peer knows: material for checks.
    pub fn create_scratch(&mut self, room: &RoomId, hub: &HubKey) -> Result<()> {
        let state = RoomState::group(room.clone(), "", self.user(), None);
        self.create_room(&state, hub.external_sender())
    }

    fn group(&mut self, room: &RoomId) -> Result<&mut MlsGroup> {
        self.groups
            .get_mut(room)
            .ok_or_else(|| MlsError(format!("no group for {room}")))
    }

    pub fn has_group(&self, room: &RoomId) -> bool {
        self.groups.contains_key(room)
    }

    /// Whether this client is still a member of the room's group (not removed).
    pub fn is_active(&self, room: &RoomId) -> bool {
        self.groups.get(room).is_some_and(MlsGroup::is_active)
    }

    /// The group's GroupInfo (without the tree) as an MLSMessage, and its ratchet tree.
    pub fn group_info_and_tree(&mut self, room: &RoomId) -> Result<(Vec<u8>, Vec<u8>)> {
        let crypto = self.provider.crypto();
        let group = self
            .groups
            .get(room)
            .ok_or_else(|| MlsError(format!("no group for {room}")))?;
        let info = group
            .export_group_info(crypto, &self.signer, false)
            .map_err(|e| err("GroupInfo", e))?;
        Ok((encode(&info)?, encode(&group.export_ratchet_tree())?))
    }

    /// The room state in the group's GroupContext.
    pub fn room_state(&mut self, room: &RoomId) -> Result<RoomState> {
        read_state(self.group(room)?.extensions())
    }

    /// The group's members: leaf index and client URI.
    pub fn members(&mut self, room: &RoomId) -> Result<Vec<(LeafNodeIndex, DeviceUri)>> {
        Ok(self
            .group(room)?
            .members()
            .filter_map(|m| device_of(&m.credential).ok().map(|d| (m.index, d)))
            .collect())
    }

    /// The group's `external_senders`, in MIMI's wire form.
    pub fn external_senders(&mut self, room: &RoomId) -> Result<Vec<mimi::ExternalSender>> {
        let group = self.group(room)?;
        let mut out = Vec::new();
        for sender in group.extensions().external_senders().into_iter().flatten() {
            let bytes = encode(sender)?;
            out.push(
                mimi::ExternalSender::tls_deserialize_exact(&bytes)
                    .map_err(|e| err("external sender", e))?,
            );
        }
        Ok(out)
    }

    pub fn epoch(&mut self, room: &RoomId) -> Result<u64> {
        Ok(self.group(room)?.epoch().as_u64())
    }

    /// Commits adds and removes (with a GroupContextExtensions proposal carrying `new_state`
    /// when given), merges it at once (the kit is the hub, or the commit is only material), and
    /// returns the commit, the Welcome, the new GroupInfo and the new tree.
    pub fn commit(
        &mut self,
        room: &RoomId,
        adds: Vec<KeyPackage>,
        removes: Vec<LeafNodeIndex>,
        new_state: Option<&RoomState>,
    ) -> Result<CommitOut> {
        let extensions = match new_state {
            Some(state) => {
                let mut ext = self.group(room)?.extensions().clone();
                ext.add_or_replace(state_extension(state)?)
                    .map_err(|e| err("GroupContext extensions", e))?;
                Some(ext)
            }
            None => None,
        };
        let (provider, signer) = (&self.provider, &self.signer);
        let group = self
            .groups
            .get_mut(room)
            .ok_or_else(|| MlsError(format!("no group for {room}")))?;
        let mut builder = group
            .commit_builder()
            .propose_adds(adds)
            .propose_removals(removes);
        if let Some(ext) = extensions {
            builder = builder
                .propose_group_context_extensions(ext)
                .map_err(|e| err("GroupContextExtensions proposal", e))?;
        }
        let bundle = builder
            .load_psks(provider.storage())
            .map_err(|e| err("commit", e))?
            .create_group_info(true)
            .use_ratchet_tree_extension(false)
            .build(provider.rand(), provider.crypto(), signer, |_| true)
            .map_err(|e| err("commit", e))?
            .stage_commit(provider)
            .map_err(|e| err("staging the commit", e))?;
        let (commit, welcome, group_info) = bundle.into_messages();
        group
            .merge_pending_commit(provider)
            .map_err(|e| err("merging the commit", e))?;
        let group_info = group_info.ok_or_else(|| MlsError("no GroupInfo".into()))?;
        Ok(CommitOut {
            commit: message_of(&commit)?,
            welcome: welcome.as_ref().map(bare).transpose()?,
            group_info: bare(&group_info)?,
            ratchet_tree: tree_of(group)?,
        })
    }

    /// An application message (PrivateMessage) in `room`.
    pub fn message(&mut self, room: &RoomId, plaintext: &[u8]) -> Result<mimi::MlsMessage> {
        let (provider, signer) = (&self.provider, &self.signer);
        let group = self
            .groups
            .get_mut(room)
            .ok_or_else(|| MlsError(format!("no group for {room}")))?;
        let out = group
            .create_message(provider, signer, plaintext)
            .map_err(|e| err("encrypting", e))?;
        message_of(&out)
    }

    /// Processes a message of `room`: decrypts application messages, merges commits, keeps
    /// proposals for the next commit.
    pub fn process(&mut self, room: &RoomId, message: &mimi::MlsMessage) -> Result<Processed> {
        let msg = MlsMessageIn::tls_deserialize_exact(message.bytes())
            .map_err(|e| err("MLSMessage", e))?;
        let protocol = msg
            .try_into_protocol_message()
            .map_err(|e| err("not a framed message", e))?;
        let provider = &self.provider;
        let group = self
            .groups
            .get_mut(room)
            .ok_or_else(|| MlsError(format!("no group for {room}")))?;
        let processed = group
            .process_message(provider, protocol)
            .map_err(|e| err("processing", e))?;
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(m) => {
                Ok(Processed::Application(m.into_bytes()))
            }
            ProcessedMessageContent::ProposalMessage(p) => {
                group
                    .store_pending_proposal(provider.storage(), *p)
                    .map_err(|e| err("storing the proposal", e))?;
                Ok(Processed::Proposal)
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(_) => Ok(Processed::Proposal),
            ProcessedMessageContent::OwnPendingCommit
            | ProcessedMessageContent::OwnPrivateMessage => {
                Err(MlsError("a message of this client itself".into()))
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                group
                    .merge_staged_commit(provider, *staged)
                    .map_err(|e| err("merging", e))?;
                Ok(Processed::Commit)
            }
        }
    }

    /// Joins a group from its Welcome and ratchet tree; the room is the one its state names.
    pub fn join(
        &mut self,
        welcome: &mimi::Welcome,
        tree: &mimi::RatchetTree,
    ) -> Result<(RoomId, RoomState)> {
        let welcome = welcome.parse().map_err(|e| err("Welcome", e))?;
        let tree: RatchetTreeIn = tree.parse().map_err(|e| err("ratchet tree", e))?;
        let group =
            StagedWelcome::new_from_welcome(&self.provider, &join_config(), welcome, Some(tree))
                .map_err(|e| err("Welcome", e))?
                .into_group(&self.provider)
                .map_err(|e| err("joining", e))?;
        let state = read_state(group.extensions())?;
        self.groups.insert(state.room.clone(), group);
        Ok((state.room.clone(), state))
    }

    /// Joins `room` by external commit from its GroupInfo and tree (from `groupInfo`).
    pub fn external_join(
        &mut self,
        room: &RoomId,
        group_info: &mimi::GroupInfo,
        tree: &mimi::RatchetTree,
    ) -> Result<CommitOut> {
        let group_info = group_info.parse().map_err(|e| err("GroupInfo", e))?;
        let tree: RatchetTreeIn = tree.parse().map_err(|e| err("ratchet tree", e))?;
        let (group, bundle) = MlsGroup::external_commit_builder()
            .with_ratchet_tree(tree)
            .with_config(join_config())
            .build_group(&self.provider, group_info, self.credential())
            .map_err(|e| err("external commit", e))?
            .leaf_node_parameters(
                LeafNodeParameters::builder()
                    .with_capabilities(leaf_capabilities())
                    .build(),
            )
            .load_psks(self.provider.storage())
            .map_err(|e| err("external commit", e))?
            .create_group_info(true)
            .use_ratchet_tree_extension(false)
            .build(
                self.provider.rand(),
                self.provider.crypto(),
                &self.signer,
                |_| true,
            )
            .map_err(|e| err("external commit", e))?
            .finalize(&self.provider)
            .map_err(|e| err("external commit", e))?;
        let (commit, _, group_info) = bundle.into_messages();
        let group_info = group_info.ok_or_else(|| MlsError("no GroupInfo".into()))?;
        let out = CommitOut {
            commit: message_of(&commit)?,
            welcome: None,
            group_info: bare(&group_info)?,
            ratchet_tree: tree_of(&group)?,
        };
        self.groups.insert(room.clone(), group);
        Ok(out)
    }

    /// A proposal to remove this client's own leaf (leaving).
    pub fn leave(&mut self, room: &RoomId) -> Result<mimi::MlsMessage> {
        let (provider, signer) = (&self.provider, &self.signer);
        let group = self
            .groups
            .get_mut(room)
            .ok_or_else(|| MlsError(format!("no group for {room}")))?;
        let out = group
            .leave_group(provider, signer)
            .map_err(|e| err("leave proposal", e))?;
        message_of(&out)
    }
}

fn tree_of(group: &MlsGroup) -> Result<mimi::RatchetTree> {
    mimi::RatchetTree::from_bytes(encode(&group.export_ratchet_tree())?)
        .map_err(|e| err("ratchet tree", e))
}

fn state_extension(state: &RoomState) -> Result<Extension> {
    let data = state.encode().map_err(|e| err("room state", e))?;
    Ok(Extension::Unknown(
        APP_DATA_DICTIONARY,
        UnknownExtension(data),
    ))
}

fn read_state(extensions: &Extensions<GroupContext>) -> Result<RoomState> {
    let data = extensions
        .unknown(APP_DATA_DICTIONARY)
        .ok_or_else(|| MlsError("the group holds no room state".into()))?;
    RoomState::decode(&data.0).map_err(|e| err("room state", e))
}

/// The client URI in a BasicCredential.
pub fn device_of(credential: &Credential) -> Result<DeviceUri> {
    let basic = BasicCredential::try_from(credential.clone()).map_err(|e| err("credential", e))?;
    let identity = std::str::from_utf8(basic.identity())
        .map_err(|_| MlsError("credential identity is not UTF-8".into()))?;
    DeviceUri::parse(identity).map_err(|e| err("credential identity", e))
}

/// The identity of a BasicCredential, as text.
pub fn credential_identity(credential: &Credential) -> Option<String> {
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    String::from_utf8(basic.identity().to_vec()).ok()
}

/// The group id of an MLSMessage's framed content, if it has one.
pub fn group_id_of(message: &mimi::MlsMessage) -> Option<Vec<u8>> {
    let msg = MlsMessageIn::tls_deserialize_exact(message.bytes()).ok()?;
    match msg.extract() {
        MlsMessageBodyIn::PublicMessage(m) => Some(
            openmls::prelude::ProtocolMessage::from(m)
                .group_id()
                .as_slice()
                .to_vec(),
        ),
        MlsMessageBodyIn::PrivateMessage(m) => Some(
            openmls::prelude::ProtocolMessage::from(m)
                .group_id()
                .as_slice()
                .to_vec(),
        ),
        _ => None,
    }
}

/// An HPKE key pair for the ciphersuite (for a groupInfo answer).
pub struct HpkeKey {
    pub public: Vec<u8>,
    private: openmls_traits::types::HpkePrivateKey,
}

impl HpkeKey {
    pub fn new() -> Result<Self> {
        let crypto = openmls_rust_crypto::RustCrypto::default();
        let pair = crypto
            .derive_hpke_keypair(SUITE.hpke_config(), &random::<32>())
            .map_err(|e| err("HPKE key", e))?;
        Ok(Self {
            public: pair.public,
            private: pair.private,
        })
    }

    /// DecryptWithLabel(private, label, context, ciphertext) (RFC 9420 §5.1.3).
    pub fn open(&self, label: &str, context: &[u8], ct: &mimi::HpkeCiphertext) -> Result<Vec<u8>> {
        let info = mimi::signing::encrypt_context(label, context);
        openmls_rust_crypto::RustCrypto::default()
            .hpke_open(
                SUITE.hpke_config(),
                &openmls_traits::types::HpkeCiphertext {
                    kem_output: ct.kem_output.as_slice().to_vec().into(),
                    ciphertext: ct.ciphertext.as_slice().to_vec().into(),
                },
                &self.private,
                &info,
                &[],
            )
            .map_err(|e| err("HPKE open", e))
    }
}

/// Verifies an Ed25519 SignWithLabel signature over `sign_content`.
pub fn verify(public_key: &[u8], sign_content: &[u8], signature: &[u8]) -> bool {
    openmls_rust_crypto::RustCrypto::default()
        .verify_signature(
            SignatureScheme::ED25519,
            sign_content,
            public_key,
            signature,
        )
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(s: &str) -> KitClient {
        KitClient::new(DeviceUri::parse(s).unwrap()).unwrap()
    }

    #[test]
    fn a_room_is_created_joined_and_talked_in() {
        let hub = HubKey::new(&Domain::parse("kit.test").unwrap()).unwrap();
        let mut alice = client("mimi://kit.test/d/kit-alice/a1");
        let mut bob = client("mimi://wave.test/d/bob/b1");
        let room = RoomId::parse("mimi://kit.test/r/room1").unwrap();
        let mut state = RoomState::group(room.clone(), "", alice.user(), None);
        alice.create_room(&state, hub.external_sender()).unwrap();
        let (kp, _) = bob.key_package().unwrap();
        let (device, kp) = alice.validate_key_package(kp.bytes(), bob.user()).unwrap();
        assert_eq!(device, bob.device);
        state
            .participants
            .insert(bob.user().clone(), mimi::room_state::ROLE_MEMBER);
        let out = alice.commit(&room, vec![kp], vec![], Some(&state)).unwrap();
        let (joined, seen) = bob
            .join(out.welcome.as_ref().unwrap(), &out.ratchet_tree)
            .unwrap();
        assert_eq!(joined, room);
        assert!(seen.is_participant(bob.user()));
        let m = alice.message(&room, b"hi").unwrap();
        assert!(matches!(bob.process(&room, &m).unwrap(), Processed::Application(b) if b == b"hi"));
        assert_eq!(group_id_of(&m).unwrap(), room.parley_group_id());
        // A second client of bob joins by external commit.
        let mut bob2 = client("mimi://wave.test/d/bob/b2");
        let ext = bob2
            .external_join(&room, &out.group_info, &out.ratchet_tree)
            .unwrap();
        assert!(matches!(
            alice.process(&room, &ext.commit).unwrap(),
            Processed::Commit
        ));
        assert_eq!(alice.members(&room).unwrap().len(), 3);
        let leave = bob2.leave(&room).unwrap();
        assert!(matches!(
            alice.process(&room, &leave).unwrap(),
            Processed::Proposal
        ));
    }

    #[test]
    fn hpke_round_trip() {
        let key = HpkeKey::new().unwrap();
        let info = mimi::signing::encrypt_context("L", b"ctx");
        let sealed = openmls_rust_crypto::RustCrypto::default()
            .hpke_seal(SUITE.hpke_config(), &key.public, &info, &[], b"secret")
            .unwrap();
        let ct = mimi::HpkeCiphertext {
            kem_output: sealed.kem_output.as_slice().to_vec().into(),
            ciphertext: sealed.ciphertext.as_slice().to_vec().into(),
        };
        assert_eq!(key.open("L", b"ctx", &ct).unwrap(), b"secret");
    }
}
