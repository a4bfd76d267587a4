//! The MIMI protocol bodies of draft-ietf-mimi-protocol-06 §5 in the TLS presentation language,
//! read as `docs/mimi-profile.md` §3 fixes them: MLS objects travel inline in their RFC 9420
//! encoding, `<V>` is the MLS variable-length vector, `optional<T>` a presence byte, and the
//! protocol of `UpdateRequest`/`FanoutMessage` is not on the wire.
//!
//! Everything is derived with `tls_codec` except the structs whose `select` reads a field that
//! is not the one just before it (an MLS message's wire format or content type, or a status
//! code with a URI in between); those have small hand-written codecs below.

use openmls::messages::group_info::VerifiableGroupInfo;
use openmls::prelude::{
    Capabilities, ContentType, Credential, Extension, KeyPackageIn, MlsMessageBodyIn, MlsMessageIn,
    RatchetTreeIn, RequiredCapabilitiesExtension, SignaturePublicKey, Welcome,
};
use tls_codec::{
    Deserialize, Error as TlsError, Serialize, Size, TlsDeserialize, TlsSerialize, TlsSize, VLBytes,
};

/// `enum { reserved(0), mls10(1), (255) } Protocol;` — only `mls10` decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum Protocol {
    /// MLS 1.0 (RFC 9420).
    Mls10 = 1,
}

/// `struct { opaque uri<V>; } IdentifierUri;` (UTF-8, checked by [`IdentifierUri::as_str`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct IdentifierUri {
    uri: VLBytes,
}

impl IdentifierUri {
    /// Wraps a URI string.
    pub fn new(uri: &str) -> Self {
        Self {
            uri: uri.as_bytes().into(),
        }
    }

    /// The URI as text, or an error if the peer sent bytes that are not UTF-8.
    pub fn as_str(&self) -> Result<&str, TlsError> {
        std::str::from_utf8(self.uri.as_slice())
            .map_err(|_| TlsError::DecodingError("IdentifierUri is not UTF-8".into()))
    }
}

/// The signed part of a `KeyMaterialRequest` (`KeyMaterialRequestTBS`, §5.2).
#[derive(Debug, Clone, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct KeyMaterialRequestTbs {
    pub protocol: Protocol,
    pub requesting_user: IdentifierUri,
    pub target_user: IdentifierUri,
    pub room_id: IdentifierUri,
    /// `CipherSuite acceptableCiphersuites<V>` as raw code points.
    pub acceptable_ciphersuites: Vec<u16>,
    pub required_capabilities: RequiredCapabilitiesExtension,
    pub requester_signature_key: SignaturePublicKey,
    pub requester_credential: Credential,
}

/// `KeyMaterialRequest` (§5.2): the TBS followed by `opaque key_material_request_signature<V>`.
#[derive(Debug, Clone, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct KeyMaterialRequest {
    pub tbs: KeyMaterialRequestTbs,
    pub signature: VLBytes,
}

/// `KeyMaterialUserCode` (§5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum KeyMaterialUserCode {
    Success = 0,
    PartialSuccess = 1,
    IncompatibleProtocol = 2,
    NoCompatibleMaterial = 3,
    UserUnknown = 4,
    NoConsent = 5,
    NoConsentForThisRoom = 6,
    UserDeleted = 7,
}

/// `ClientKeyMaterial` (§5.2): the client status selects what follows the client URI.
#[allow(clippy::large_enum_variant)] // decoded once per request; a Box would buy nothing
#[derive(Debug, Clone, PartialEq)]
pub enum ClientKeyMaterial {
    /// `success(0)`: a KeyPackage.
    Success {
        client_uri: IdentifierUri,
        key_package: KeyPackageIn,
    },
    /// `keyMaterialExhausted(1)`: nothing follows.
    KeyMaterialExhausted { client_uri: IdentifierUri },
    /// `nothingCompatible(2)`: `optional<Capabilities>`.
    NothingCompatible {
        client_uri: IdentifierUri,
        capabilities: Option<Capabilities>,
    },
}

impl ClientKeyMaterial {
    fn code(&self) -> u8 {
        match self {
            Self::Success { .. } => 0,
            Self::KeyMaterialExhausted { .. } => 1,
            Self::NothingCompatible { .. } => 2,
        }
    }

    /// The client this entry is about.
    pub fn client_uri(&self) -> &IdentifierUri {
        match self {
            Self::Success { client_uri, .. }
            | Self::KeyMaterialExhausted { client_uri }
            | Self::NothingCompatible { client_uri, .. } => client_uri,
        }
    }
}

impl Size for ClientKeyMaterial {
    fn tls_serialized_len(&self) -> usize {
        1 + self.client_uri().tls_serialized_len()
            + match self {
                Self::Success { key_package, .. } => key_package.tls_serialized_len(),
                Self::KeyMaterialExhausted { .. } => 0,
                Self::NothingCompatible { capabilities, .. } => capabilities.tls_serialized_len(),
            }
    }
}

impl Serialize for ClientKeyMaterial {
    fn tls_serialize<W: std::io::Write>(&self, writer: &mut W) -> Result<usize, TlsError> {
        let mut written = self.code().tls_serialize(writer)?;
        written += self.client_uri().tls_serialize(writer)?;
        written += match self {
            Self::Success { key_package, .. } => key_package.tls_serialize(writer)?,
            Self::KeyMaterialExhausted { .. } => 0,
            Self::NothingCompatible { capabilities, .. } => capabilities.tls_serialize(writer)?,
        };
        Ok(written)
    }
}

impl Deserialize for ClientKeyMaterial {
    fn tls_deserialize<R: std::io::Read>(bytes: &mut R) -> Result<Self, TlsError> {
        let code = u8::tls_deserialize(bytes)?;
        let client_uri = IdentifierUri::tls_deserialize(bytes)?;
        Ok(match code {
            0 => Self::Success {
                client_uri,
                key_package: KeyPackageIn::tls_deserialize(bytes)?,
            },
            1 => Self::KeyMaterialExhausted { client_uri },
            2 => Self::NothingCompatible {
                client_uri,
                capabilities: Option::<Capabilities>::tls_deserialize(bytes)?,
            },
            other => return Err(unknown("KeyMaterialClientCode", other)),
        })
    }
}

/// `KeyMaterialResponse` (§5.2).
#[derive(Debug, Clone, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct KeyMaterialResponse {
    pub protocol: Protocol,
    pub user_status: KeyMaterialUserCode,
    pub user_uri: IdentifierUri,
    pub clients: Vec<ClientKeyMaterial>,
}

/// What an inline `MLSMessage` is, as far as the draft's `select`s care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlsKind {
    /// A PublicMessage and its content type.
    Public(ContentType),
    /// A PrivateMessage and its (cleartext) content type.
    Private(ContentType),
    Welcome,
    GroupInfo,
    KeyPackage,
}

/// Classifies an MLS message for the draft's `select (message.wire_format)` and
/// `select (proposalOrCommit.content.content_type)`.
pub fn mls_kind(message: &MlsMessageIn) -> MlsKind {
    match message.clone().extract() {
        MlsMessageBodyIn::PublicMessage(m) => MlsKind::Public(m.content_type()),
        MlsMessageBodyIn::PrivateMessage(m) => MlsKind::Private(m.content_type()),
        MlsMessageBodyIn::Welcome(_) => MlsKind::Welcome,
        MlsMessageBodyIn::GroupInfo(_) => MlsKind::GroupInfo,
        MlsMessageBodyIn::KeyPackage(_) => MlsKind::KeyPackage,
    }
}

/// `PartialGroupInfo` (draft-mahy-mls-ratchet-tree-options §4).
#[derive(Debug, Clone, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct PartialGroupInfo {
    pub ratchet_tree_presence: u8,
    pub group_info_extensions: Vec<Extension>,
    pub signature: VLBytes,
}

/// `GroupInfoOption` (§5.3).
#[derive(Debug, Clone, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum GroupInfoOption {
    #[tls_codec(discriminant = 1)]
    Full(VerifiableGroupInfo),
    #[tls_codec(discriminant = 2)]
    Partial(PartialGroupInfo),
}

/// `httpsUri(2)` of a [`RatchetTreeOption`].
#[derive(Debug, Clone, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct TreeUrl {
    pub url: VLBytes,
    pub tree_signature: VLBytes,
}

/// `RatchetTreeOption` (draft-mahy-mls-ratchet-tree-options §3).
#[derive(Debug, Clone, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum RatchetTreeOption {
    /// The RFC 9420 `ratchet_tree` extension data (`optional<Node> ratchet_tree<V>`).
    #[tls_codec(discriminant = 1)]
    Full(RatchetTreeIn),
    #[tls_codec(discriminant = 2)]
    HttpsUri(TreeUrl),
    /// `opaque tree_signature<V>`.
    #[tls_codec(discriminant = 3)]
    OutOfBand(VLBytes),
    #[tls_codec(discriminant = 4)]
    DistributionService,
}

/// What follows the MLS message in a [`HandshakeBundle`].
#[allow(clippy::large_enum_variant)] // one per request
#[derive(Debug, Clone, PartialEq)]
pub enum HandshakeExtra {
    Commit {
        welcome: Option<Welcome>,
        group_info: GroupInfoOption,
        ratchet_tree: RatchetTreeOption,
    },
    Proposal {
        more_proposals: Vec<MlsMessageIn>,
    },
}

/// `HandshakeBundle` (§5.3), which is the whole `update` body (profile §3: no protocol byte).
#[derive(Debug, Clone, PartialEq)]
pub struct HandshakeBundle {
    pub proposal_or_commit: MlsMessageIn,
    pub extra: HandshakeExtra,
}

impl Size for HandshakeBundle {
    fn tls_serialized_len(&self) -> usize {
        self.proposal_or_commit.tls_serialized_len()
            + match &self.extra {
                HandshakeExtra::Commit {
                    welcome,
                    group_info,
                    ratchet_tree,
                } => {
                    welcome.tls_serialized_len()
                        + group_info.tls_serialized_len()
                        + ratchet_tree.tls_serialized_len()
                }
                HandshakeExtra::Proposal { more_proposals } => more_proposals.tls_serialized_len(),
            }
    }
}

impl Serialize for HandshakeBundle {
    fn tls_serialize<W: std::io::Write>(&self, writer: &mut W) -> Result<usize, TlsError> {
        let kind = mls_kind(&self.proposal_or_commit);
        let mut written = self.proposal_or_commit.tls_serialize(writer)?;
        written += match (&self.extra, kind) {
            (
                HandshakeExtra::Commit {
                    welcome,
                    group_info,
                    ratchet_tree,
                },
                MlsKind::Public(ContentType::Commit),
            ) => {
                welcome.tls_serialize(writer)?
                    + group_info.tls_serialize(writer)?
                    + ratchet_tree.tls_serialize(writer)?
            }
            (
                HandshakeExtra::Proposal { more_proposals },
                MlsKind::Public(ContentType::Proposal),
            ) => more_proposals.tls_serialize(writer)?,
            _ => {
                return Err(TlsError::EncodingError(
                    "HandshakeBundle extra does not match its message".into(),
                ))
            }
        };
        Ok(written)
    }
}

impl Deserialize for HandshakeBundle {
    fn tls_deserialize<R: std::io::Read>(bytes: &mut R) -> Result<Self, TlsError> {
        let proposal_or_commit = MlsMessageIn::tls_deserialize(bytes)?;
        let extra = match mls_kind(&proposal_or_commit) {
            MlsKind::Public(ContentType::Commit) => HandshakeExtra::Commit {
                welcome: Option::<Welcome>::tls_deserialize(bytes)?,
                group_info: GroupInfoOption::tls_deserialize(bytes)?,
                ratchet_tree: RatchetTreeOption::tls_deserialize(bytes)?,
            },
            MlsKind::Public(ContentType::Proposal) => HandshakeExtra::Proposal {
                more_proposals: Vec::<MlsMessageIn>::tls_deserialize(bytes)?,
            },
            other => {
                return Err(TlsError::DecodingError(format!(
                    "HandshakeBundle carries {other:?}, not a PublicMessage commit or proposal"
                )))
            }
        };
        Ok(Self {
            proposal_or_commit,
            extra,
        })
    }
}

/// `UpdateResponseCode` and its `select` (§5.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateOutcome {
    Success {
        accepted_timestamp: u64,
    },
    WrongEpoch {
        current_epoch: u64,
    },
    NotAllowed,
    /// `ProposalRef invalidProposals<V>` (each an `opaque<V>` hash reference).
    InvalidProposal {
        invalid_proposals: Vec<VLBytes>,
    },
}

/// `UpdateRoomResponse` (§5.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateRoomResponse {
    pub outcome: UpdateOutcome,
    /// `string errorDescription` (UTF-8 in `opaque<V>`, profile §3).
    pub error_description: String,
}

impl UpdateRoomResponse {
    fn code(&self) -> u8 {
        match self.outcome {
            UpdateOutcome::Success { .. } => 0,
            UpdateOutcome::WrongEpoch { .. } => 1,
            UpdateOutcome::NotAllowed => 2,
            UpdateOutcome::InvalidProposal { .. } => 3,
        }
    }

    fn description(&self) -> VLBytes {
        self.error_description.as_bytes().into()
    }
}

impl Size for UpdateRoomResponse {
    fn tls_serialized_len(&self) -> usize {
        1 + self.description().tls_serialized_len()
            + match &self.outcome {
                UpdateOutcome::Success { .. } | UpdateOutcome::WrongEpoch { .. } => 8,
                UpdateOutcome::NotAllowed => 0,
                UpdateOutcome::InvalidProposal { invalid_proposals } => {
                    invalid_proposals.tls_serialized_len()
                }
            }
    }
}

impl Serialize for UpdateRoomResponse {
    fn tls_serialize<W: std::io::Write>(&self, writer: &mut W) -> Result<usize, TlsError> {
        let mut written = self.code().tls_serialize(writer)?;
        written += self.description().tls_serialize(writer)?;
        written += match &self.outcome {
            UpdateOutcome::Success {
                accepted_timestamp: value,
            }
            | UpdateOutcome::WrongEpoch {
                current_epoch: value,
            } => value.tls_serialize(writer)?,
            UpdateOutcome::NotAllowed => 0,
            UpdateOutcome::InvalidProposal { invalid_proposals } => {
                invalid_proposals.tls_serialize(writer)?
            }
        };
        Ok(written)
    }
}

impl Deserialize for UpdateRoomResponse {
    fn tls_deserialize<R: std::io::Read>(bytes: &mut R) -> Result<Self, TlsError> {
        let code = u8::tls_deserialize(bytes)?;
        let description = VLBytes::tls_deserialize(bytes)?;
        let error_description = String::from_utf8(description.as_slice().to_vec())
            .map_err(|_| TlsError::DecodingError("errorDescription is not UTF-8".into()))?;
        let outcome = match code {
            0 => UpdateOutcome::Success {
                accepted_timestamp: u64::tls_deserialize(bytes)?,
            },
            1 => UpdateOutcome::WrongEpoch {
                current_epoch: u64::tls_deserialize(bytes)?,
            },
            2 => UpdateOutcome::NotAllowed,
            3 => UpdateOutcome::InvalidProposal {
                invalid_proposals: Vec::<VLBytes>::tls_deserialize(bytes)?,
            },
            other => return Err(unknown("UpdateResponseCode", other)),
        };
        Ok(Self {
            outcome,
            error_description,
        })
    }
}

/// `SubmitMessageRequest` (§5.4).
#[derive(Debug, Clone, PartialEq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct SubmitMessageRequest {
    pub protocol: Protocol,
    pub app_message: MlsMessageIn,
    pub sending_uri: IdentifierUri,
}

/// `Frank` (§5.4.1).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct Frank {
    pub server_frank: [u8; 32],
    pub franking_signature_ciphersuite: u16,
    pub franking_integrity_signature: VLBytes,
}

/// The `accepted(0)` arm of a [`SubmitStatus`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct SubmitAccepted {
    pub accepted_timestamp: u64,
    pub frank: Option<Frank>,
}

/// `SubmitResponseCode` and its `select` (§5.4).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum SubmitStatus {
    #[tls_codec(discriminant = 0)]
    Accepted(SubmitAccepted),
    #[tls_codec(discriminant = 1)]
    NotAllowed,
    /// The hub's current epoch.
    #[tls_codec(discriminant = 2)]
    EpochTooOld(u64),
}

/// `SubmitMessageResponse` (§5.4).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct SubmitMessageResponse {
    pub protocol: Protocol,
    pub status: SubmitStatus,
}

/// What follows the MLS message in a [`FanoutMessage`] (profile §3's reading of the `select`).
#[derive(Debug, Clone, PartialEq)]
pub enum FanoutExtra {
    /// After an application PrivateMessage.
    Application { frank: Option<Frank> },
    /// After a Welcome.
    Welcome { ratchet_tree: RatchetTreeOption },
    /// After a PublicMessage proposal.
    Proposal { more_proposals: Vec<MlsMessageIn> },
    /// After a PublicMessage commit.
    Commit {
        external_proposals: Vec<MlsMessageIn>,
    },
}

/// `FanoutMessage` (§5.5). A `notify` body is one or more of these concatenated.
#[derive(Debug, Clone, PartialEq)]
pub struct FanoutMessage {
    pub timestamp: u64,
    pub message: MlsMessageIn,
    pub extra: FanoutExtra,
}

impl Size for FanoutMessage {
    fn tls_serialized_len(&self) -> usize {
        8 + self.message.tls_serialized_len()
            + match &self.extra {
                FanoutExtra::Application { frank } => frank.tls_serialized_len(),
                FanoutExtra::Welcome { ratchet_tree } => ratchet_tree.tls_serialized_len(),
                FanoutExtra::Proposal {
                    more_proposals: list,
                }
                | FanoutExtra::Commit {
                    external_proposals: list,
                } => list.tls_serialized_len(),
            }
    }
}

impl Serialize for FanoutMessage {
    fn tls_serialize<W: std::io::Write>(&self, writer: &mut W) -> Result<usize, TlsError> {
        let kind = mls_kind(&self.message);
        let mut written = self.timestamp.tls_serialize(writer)?;
        written += self.message.tls_serialize(writer)?;
        written += match (&self.extra, kind) {
            (FanoutExtra::Application { frank }, MlsKind::Private(ContentType::Application)) => {
                frank.tls_serialize(writer)?
            }
            (FanoutExtra::Welcome { ratchet_tree }, MlsKind::Welcome) => {
                ratchet_tree.tls_serialize(writer)?
            }
            (FanoutExtra::Proposal { more_proposals }, MlsKind::Public(ContentType::Proposal)) => {
                more_proposals.tls_serialize(writer)?
            }
            (FanoutExtra::Commit { external_proposals }, MlsKind::Public(ContentType::Commit)) => {
                external_proposals.tls_serialize(writer)?
            }
            _ => {
                return Err(TlsError::EncodingError(
                    "FanoutMessage extra does not match its message".into(),
                ))
            }
        };
        Ok(written)
    }
}

impl Deserialize for FanoutMessage {
    fn tls_deserialize<R: std::io::Read>(bytes: &mut R) -> Result<Self, TlsError> {
        let timestamp = u64::tls_deserialize(bytes)?;
        let message = MlsMessageIn::tls_deserialize(bytes)?;
        let extra = match mls_kind(&message) {
            MlsKind::Private(ContentType::Application) => FanoutExtra::Application {
                frank: Option::<Frank>::tls_deserialize(bytes)?,
            },
            MlsKind::Welcome => FanoutExtra::Welcome {
                ratchet_tree: RatchetTreeOption::tls_deserialize(bytes)?,
            },
            MlsKind::Public(ContentType::Proposal) => FanoutExtra::Proposal {
                more_proposals: Vec::<MlsMessageIn>::tls_deserialize(bytes)?,
            },
            MlsKind::Public(ContentType::Commit) => FanoutExtra::Commit {
                external_proposals: Vec::<MlsMessageIn>::tls_deserialize(bytes)?,
            },
            other => {
                return Err(TlsError::DecodingError(format!(
                    "a FanoutMessage cannot carry {other:?}"
                )))
            }
        };
        Ok(Self {
            timestamp,
            message,
            extra,
        })
    }
}

/// Splits a `notify` body into its FanoutMessages, each with its exact encoding (for the
/// follower's SHA-256 dedup). An empty body or trailing garbage is an error.
pub fn decode_notify_body(body: &[u8]) -> Result<Vec<(FanoutMessage, &[u8])>, TlsError> {
    let mut rest = body;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let before = rest;
        let message = FanoutMessage::tls_deserialize(&mut rest)?;
        let used = before.len() - rest.len();
        out.push((message, &before[..used]));
    }
    if out.is_empty() {
        return Err(TlsError::DecodingError("empty notify body".into()));
    }
    Ok(out)
}

/// `struct { uint16 component_id; opaque data<V>; } ComponentData` (draft-ietf-mls-extensions §4.6).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct ComponentData {
    pub component_id: u16,
    pub data: VLBytes,
}

/// `AppDataDictionary`: `ComponentData component_data<V>`, entries ordered by id.
#[derive(Debug, Clone, Default, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct AppDataDictionary {
    pub component_data: Vec<ComponentData>,
}

impl AppDataDictionary {
    /// The data of one component, if present.
    pub fn get(&self, component_id: u16) -> Option<&[u8]> {
        self.component_data
            .iter()
            .find(|c| c.component_id == component_id)
            .map(|c| c.data.as_slice())
    }

    /// Whether the entries are strictly ordered by id (which also means no duplicates).
    pub fn is_well_ordered(&self) -> bool {
        self.component_data
            .windows(2)
            .all(|w| w[0].component_id < w[1].component_id)
    }
}

/// `ConsentOperation` (§5.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum ConsentOperation {
    Cancel = 0,
    Request = 1,
    Grant = 2,
    Revoke = 3,
}

/// `ConsentEntry` (§5.7); `client_key_packages` is on the wire only for `grant`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsentEntry {
    pub operation: ConsentOperation,
    pub requester_uri: IdentifierUri,
    pub target_uri: IdentifierUri,
    pub room_id: Option<IdentifierUri>,
    pub client_key_packages: Vec<KeyPackageIn>,
    pub consent_extensions: AppDataDictionary,
}

impl Size for ConsentEntry {
    fn tls_serialized_len(&self) -> usize {
        1 + self.requester_uri.tls_serialized_len()
            + self.target_uri.tls_serialized_len()
            + self.room_id.tls_serialized_len()
            + if self.operation == ConsentOperation::Grant {
                self.client_key_packages.tls_serialized_len()
            } else {
                0
            }
            + self.consent_extensions.tls_serialized_len()
    }
}

impl Serialize for ConsentEntry {
    fn tls_serialize<W: std::io::Write>(&self, writer: &mut W) -> Result<usize, TlsError> {
        let mut written = self.operation.tls_serialize(writer)?;
        written += self.requester_uri.tls_serialize(writer)?;
        written += self.target_uri.tls_serialize(writer)?;
        written += self.room_id.tls_serialize(writer)?;
        if self.operation == ConsentOperation::Grant {
            written += self.client_key_packages.tls_serialize(writer)?;
        } else if !self.client_key_packages.is_empty() {
            return Err(TlsError::EncodingError(
                "only a grant carries KeyPackages".into(),
            ));
        }
        written += self.consent_extensions.tls_serialize(writer)?;
        Ok(written)
    }
}

impl Deserialize for ConsentEntry {
    fn tls_deserialize<R: std::io::Read>(bytes: &mut R) -> Result<Self, TlsError> {
        let operation = ConsentOperation::tls_deserialize(bytes)?;
        let requester_uri = IdentifierUri::tls_deserialize(bytes)?;
        let target_uri = IdentifierUri::tls_deserialize(bytes)?;
        let room_id = Option::<IdentifierUri>::tls_deserialize(bytes)?;
        let client_key_packages = if operation == ConsentOperation::Grant {
            Vec::<KeyPackageIn>::tls_deserialize(bytes)?
        } else {
            Vec::new()
        };
        let consent_extensions = AppDataDictionary::tls_deserialize(bytes)?;
        Ok(Self {
            operation,
            requester_uri,
            target_uri,
            room_id,
            client_key_packages,
            consent_extensions,
        })
    }
}

fn unknown(what: &str, value: u8) -> TlsError {
    TlsError::DecodingError(format!("unknown {what} {value}"))
}

/// Encodes any body.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, TlsError> {
    value.tls_serialize_detached()
}

/// Decodes a whole body: trailing bytes are an error.
pub fn decode<T: Deserialize>(mut bytes: &[u8]) -> Result<T, TlsError> {
    let value = T::tls_deserialize(&mut bytes)?;
    if !bytes.is_empty() {
        return Err(TlsError::TrailingData);
    }
    Ok(value)
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
