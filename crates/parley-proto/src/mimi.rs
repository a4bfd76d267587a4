//! MIMI provider-to-provider bodies (draft-ietf-mimi-protocol-06) in the TLS presentation
//! language, via `tls_codec`. No I/O and no MLS parsing: MLS objects (messages, KeyPackages,
//! Welcomes) travel as `opaque<V>` so a provider can frame a body without parsing MLS; their bytes
//! are the MLS wire encoding. Every deviation from the draft is listed in
//! `docs/mimi-conformance.md`.

use tls_codec::{TlsDeserialize, TlsSerialize, TlsSize, VLBytes};

/// `opaque<V>`.
pub type VlBytes = VLBytes;

/// Largest body a provider accepts on the federation listener (also checked by the listener).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("malformed MIMI body: {0}")]
    Malformed(String),
    #[error("MIMI body has {0} unexpected trailing bytes")]
    Trailing(usize),
    #[error("unsupported protocol {0} (only MLS 1.0)")]
    Protocol(u8),
}

/// Encoding and strict decoding (the whole input, nothing left over) of a MIMI body.
pub trait Body: Sized {
    fn encode(&self) -> Vec<u8>;
    fn decode(bytes: &[u8]) -> Result<Self, WireError>;
}

impl<T: tls_codec::Serialize + tls_codec::Deserialize> Body for T {
    fn encode(&self) -> Vec<u8> {
        // Serializing into a Vec only fails for lengths beyond 2^62, which no body reaches.
        self.tls_serialize_detached().unwrap_or_default()
    }

    fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut rest = bytes;
        let value =
            T::tls_deserialize(&mut rest).map_err(|e| WireError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(WireError::Trailing(rest.len()));
        }
        Ok(value)
    }
}

/// The `expires_at` of a body that carries no expiry hint.
pub const NO_EXPIRY: u64 = 0;

fn expiry_of(expires_at: u64) -> Option<u64> {
    (expires_at != NO_EXPIRY).then_some(expires_at)
}

/// `Protocol`: only `mls10(1)` is defined.
pub const MLS10: u8 = 1;

fn check_protocol(p: u8) -> Result<(), WireError> {
    if p == MLS10 {
        Ok(())
    } else {
        Err(WireError::Protocol(p))
    }
}

/// `IdentifierUri`: `opaque uri<V>`, a UTF-8 MIMI URI.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct IdentifierUri {
    uri: VLBytes,
}

impl IdentifierUri {
    pub fn new(uri: &str) -> Self {
        Self {
            uri: uri.as_bytes().to_vec().into(),
        }
    }

    /// The URI as text; invalid UTF-8 is an error the caller reports as a bad request.
    pub fn as_str(&self) -> Result<&str, WireError> {
        std::str::from_utf8(self.uri.as_slice())
            .map_err(|_| WireError::Malformed("identifier is not UTF-8".into()))
    }
}

fn bytes(v: Vec<u8>) -> VLBytes {
    v.into()
}

// --- keyMaterial ---------------------------------------------------------------------------

/// `KeyMaterialRequest` (mls10). Deviations: `requiredCapabilities` and the requester's
/// credential are opaque; the signature may be empty (the requester is authenticated by the
/// mutual-TLS identity of its provider or of the room's hub).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct KeyMaterialRequest {
    pub protocol: u8,
    pub requesting_user: IdentifierUri,
    pub target_user: IdentifierUri,
    pub room_id: IdentifierUri,
    pub acceptable_ciphersuites: Vec<u16>,
    pub required_capabilities: VLBytes,
    pub requester_signature_key: VLBytes,
    pub requester_credential: VLBytes,
    pub signature: VLBytes,
}

impl KeyMaterialRequest {
    pub fn new(requesting_user: &str, target_user: &str, room_uri: &str, suite: u16) -> Self {
        Self {
            protocol: MLS10,
            requesting_user: IdentifierUri::new(requesting_user),
            target_user: IdentifierUri::new(target_user),
            room_id: IdentifierUri::new(room_uri),
            acceptable_ciphersuites: vec![suite],
            required_capabilities: bytes(Vec::new()),
            requester_signature_key: bytes(Vec::new()),
            requester_credential: bytes(Vec::new()),
            signature: bytes(Vec::new()),
        }
    }

    pub fn check(&self) -> Result<(), WireError> {
        check_protocol(self.protocol)
    }
}

/// `KeyMaterialUserCode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserCode {
    Success = 0,
    PartialSuccess = 1,
    IncompatibleProtocol = 2,
    NoCompatibleMaterial = 3,
    UserUnknown = 4,
    NoConsent = 5,
    NoConsentForThisRoom = 6,
    UserDeleted = 7,
}

impl UserCode {
    pub fn from_u8(v: u8) -> Option<Self> {
        use UserCode::*;
        [
            Success,
            PartialSuccess,
            IncompatibleProtocol,
            NoCompatibleMaterial,
            UserUnknown,
            NoConsent,
            NoConsentForThisRoom,
            UserDeleted,
        ]
        .into_iter()
        .find(|c| *c as u8 == v)
    }
}

/// `ClientKeyMaterial`, with the select on `clientStatus` as a tagged enum.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum ClientMaterial {
    #[tls_codec(discriminant = 0)]
    Success {
        client_uri: IdentifierUri,
        key_package: VLBytes,
    },
    #[tls_codec(discriminant = 1)]
    KeyMaterialExhausted { client_uri: IdentifierUri },
    #[tls_codec(discriminant = 2)]
    NothingCompatible { client_uri: IdentifierUri },
}

/// `KeyMaterialResponse`. `user_status` is a [`UserCode`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct KeyMaterialResponse {
    pub protocol: u8,
    pub user_status: u8,
    pub user_uri: IdentifierUri,
    pub clients: Vec<ClientMaterial>,
}

impl KeyMaterialResponse {
    pub fn refused(code: UserCode, user_uri: &str) -> Self {
        Self {
            protocol: MLS10,
            user_status: code as u8,
            user_uri: IdentifierUri::new(user_uri),
            clients: Vec::new(),
        }
    }

    pub fn code(&self) -> Option<UserCode> {
        UserCode::from_u8(self.user_status)
    }
}

// --- update --------------------------------------------------------------------------------

/// `GroupInfoOption` / `RatchetTreeOption`: Parley clients put the ratchet tree in the
/// GroupInfo extension, so these are carried opaque (empty when absent).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum HandshakeBundle {
    /// A commit (PublicMessage), the Welcome for added clients, GroupInfo and tree options.
    #[tls_codec(discriminant = 1)]
    Commit {
        commit: VLBytes,
        welcome: Option<VLBytes>,
        group_info_option: VLBytes,
        ratchet_tree_option: VLBytes,
    },
    /// A proposal (PublicMessage) and more proposals.
    #[tls_codec(discriminant = 2)]
    Proposal {
        proposal: VLBytes,
        more_proposals: Vec<VLBytes>,
    },
}

/// `UpdateRequest` (mls10): a handshake bundle. Deviation: the bundle's select is an explicit
/// tag (1 commit, 2 proposal) because the MLS message is carried opaque.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct UpdateRequest {
    pub protocol: u8,
    pub bundle: HandshakeBundle,
}

impl UpdateRequest {
    pub fn commit(commit: Vec<u8>, welcome: Option<Vec<u8>>) -> Self {
        Self {
            protocol: MLS10,
            bundle: HandshakeBundle::Commit {
                commit: commit.into(),
                welcome: welcome.map(Into::into),
                group_info_option: bytes(Vec::new()),
                ratchet_tree_option: bytes(Vec::new()),
            },
        }
    }

    pub fn proposal(proposal: Vec<u8>) -> Self {
        Self {
            protocol: MLS10,
            bundle: HandshakeBundle::Proposal {
                proposal: proposal.into(),
                more_proposals: Vec::new(),
            },
        }
    }

    pub fn check(&self) -> Result<(), WireError> {
        check_protocol(self.protocol)
    }
}

/// `UpdateRoomResponse`: `responseCode`, `errorDescription`, and the code's select.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum UpdateResponse {
    #[tls_codec(discriminant = 0)]
    Success {
        error_description: VLBytes,
        accepted_timestamp: u64,
    },
    #[tls_codec(discriminant = 1)]
    WrongEpoch {
        error_description: VLBytes,
        current_epoch: u64,
    },
    #[tls_codec(discriminant = 2)]
    NotAllowed { error_description: VLBytes },
    #[tls_codec(discriminant = 3)]
    InvalidProposal {
        error_description: VLBytes,
        invalid_proposals: Vec<VLBytes>,
    },
}

// --- submitMessage -------------------------------------------------------------------------

/// `SubmitMessageRequest` (mls10). `sending_uri` is the sending client's URI (a valid URI of
/// the sender, which the hub checks against the room's members and the peer's domain).
/// Deviation: a trailing `expires_at`, the sender's expiry hint (milliseconds since the Unix
/// epoch, 0 = none), so the hub can drop the queue entries of an expiring message it cannot
/// read (the `expires` of the MIMI content is encrypted).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct SubmitMessageRequest {
    pub protocol: u8,
    pub app_message: VLBytes,
    pub sending_uri: IdentifierUri,
    pub expires_at: u64,
}

impl SubmitMessageRequest {
    pub fn new(app_message: Vec<u8>, sending_uri: &str) -> Self {
        Self {
            protocol: MLS10,
            app_message: app_message.into(),
            sending_uri: IdentifierUri::new(sending_uri),
            expires_at: NO_EXPIRY,
        }
    }

    /// The same request with the sender's expiry hint.
    pub fn expiring_at(mut self, expires_at: Option<u64>) -> Self {
        self.expires_at = expires_at.unwrap_or(NO_EXPIRY);
        self
    }

    /// The expiry hint, if the sender gave one.
    pub fn expiry(&self) -> Option<u64> {
        expiry_of(self.expires_at)
    }

    pub fn check(&self) -> Result<(), WireError> {
        check_protocol(self.protocol)
    }
}

/// `SubmitMessageResponse` (mls10, no franking yet).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum SubmitResponse {
    #[tls_codec(discriminant = 0)]
    Accepted {
        accepted_timestamp: u64,
        frank: Option<VLBytes>,
    },
    #[tls_codec(discriminant = 1)]
    NotAllowed,
    #[tls_codec(discriminant = 2)]
    EpochTooOld { current_epoch: u64 },
}

// --- notify --------------------------------------------------------------------------------

/// What a fanned-out MLS message is (the draft selects on the MLS wire format).
#[derive(Debug, Clone, Copy, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum FanoutKind {
    Application = 1,
    Welcome = 2,
    Proposal = 3,
    Commit = 4,
}

/// `FanoutMessage`: the hub's acceptance time and the MLS message. The per-kind extras of the
/// draft (frank, ratchet tree option, more/external proposals) are carried as opaque lists,
/// empty in Parley (the ratchet tree travels in the Welcome's GroupInfo).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct FanoutMessage {
    pub timestamp: u64,
    pub kind: FanoutKind,
    pub message: VLBytes,
    pub extras: Vec<VLBytes>,
}

/// The room as the hub sees it, sent with welcomes and commits so followers can answer their
/// clients' room listings. Deviation: the draft keeps this in MLS GroupContext components.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct RoomSnapshot {
    /// 0 = group, 1 = direct.
    pub kind: u8,
    pub name: Option<VLBytes>,
    pub creator: IdentifierUri,
    pub epoch: u64,
    /// Every member user.
    pub users: Vec<IdentifierUri>,
    /// The member clients at the receiving provider's domains.
    pub local_clients: Vec<IdentifierUri>,
    /// The admin users (room policy).
    pub admins: Vec<IdentifierUri>,
}

/// Parley extension `x-parley-promote/{roomId}`: a follower relays its admin user's promotion
/// of another member to the hub (until roles travel as AppSync proposals in the GroupContext).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct PromoteRequest {
    pub requester: IdentifierUri,
    pub target: IdentifierUri,
}

/// Parley extension `x-parley-ephemeral/{roomId}`: an ephemeral MLS application message (a
/// typing indicator) for the room's clients connected right now; nobody stores it. A follower
/// relays its client's message to the hub (`recipients` empty: the hub knows the members); the
/// hub hands it to each other provider with members (`recipients`: that provider's clients).
/// Best effort both ways: no outbox, no retries.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct EphemeralMessage {
    /// The sending client's URI.
    pub sender: IdentifierUri,
    pub recipients: Vec<IdentifierUri>,
    pub message: VLBytes,
}

/// One notify entry. Deviations from a bare `FanoutMessage`: a per-room `sequence` the hub
/// assigns (increasing; followers drop entries at or below the last one seen, which makes
/// `notify` idempotent and keeps room order, as the draft's note on transaction ids suggests);
/// the `sender` user the hub authenticated (so a follower can honour its users' blocks); the
/// `recipients`, the follower's clients to deliver to (the hub knows the membership, the
/// follower cannot read it from ciphertext); an optional room snapshot; and `expires_at`, the
/// sender's expiry hint for an expiring message (milliseconds since the Unix epoch, 0 = none),
/// by which the follower drops the queue entries it makes.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct NotifyEntry {
    pub sequence: u64,
    /// The hub's event number in the room (the same for every provider's devices).
    pub event: u64,
    pub sender: IdentifierUri,
    pub recipients: Vec<IdentifierUri>,
    pub room: Option<RoomSnapshot>,
    pub fanout: FanoutMessage,
    pub expires_at: u64,
}

impl NotifyEntry {
    /// The expiry hint, if the sender gave one.
    pub fn expiry(&self) -> Option<u64> {
        expiry_of(self.expires_at)
    }
}

/// `notify/{roomId}` body: one or more entries of the same room, in order.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct NotifyRequest {
    pub entries: Vec<NotifyEntry>,
}

// --- consent -------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentOperation {
    Cancel = 0,
    Request = 1,
    Grant = 2,
    Revoke = 3,
}

impl ConsentOperation {
    pub fn from_u8(v: u8) -> Option<Self> {
        use ConsentOperation::*;
        [Cancel, Request, Grant, Revoke]
            .into_iter()
            .find(|c| *c as u8 == v)
    }
}

/// `ConsentEntry`. `consent_operation` is a [`ConsentOperation`]; `client_key_packages` is
/// sent (possibly empty) with `grant` only; `consent_extensions` is an empty dictionary.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct ConsentEntry {
    pub consent_operation: u8,
    pub requester_uri: IdentifierUri,
    pub target_uri: IdentifierUri,
    pub room_id: Option<IdentifierUri>,
    pub client_key_packages: Vec<VLBytes>,
    pub consent_extensions: VLBytes,
}

impl ConsentEntry {
    pub fn new(op: ConsentOperation, requester: &str, target: &str) -> Self {
        Self {
            consent_operation: op as u8,
            requester_uri: IdentifierUri::new(requester),
            target_uri: IdentifierUri::new(target),
            room_id: None,
            client_key_packages: Vec::new(),
            consent_extensions: bytes(Vec::new()),
        }
    }

    pub fn operation(&self) -> Option<ConsentOperation> {
        ConsentOperation::from_u8(self.consent_operation)
    }
}

// --- identifierQuery -----------------------------------------------------------------------

/// `SearchIdentifierType::handle`.
pub const SEARCH_HANDLE: u8 = 1;

/// `QueryElement` (the select for OIDC claims / vCard fields is not supported: only plain
/// search types, answered `unsupportedField` unless `handle`).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct QueryElement {
    pub search_type: u8,
    pub search_value: VLBytes,
}

#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct IdentifierRequest {
    pub query_elements: Vec<QueryElement>,
    pub id_request_extensions: VLBytes,
}

impl IdentifierRequest {
    pub fn handle(handle_uri: &str) -> Self {
        Self {
            query_elements: vec![QueryElement {
                search_type: SEARCH_HANDLE,
                search_value: bytes(handle_uri.as_bytes().to_vec()),
            }],
            id_request_extensions: bytes(Vec::new()),
        }
    }
}

/// `IdentifierQueryCode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryCode {
    Success = 0,
    NotFound = 1,
    Ambiguous = 2,
    Forbidden = 3,
    UnsupportedField = 4,
}

/// `IdentifierResponse` (profiles are not shared: `found_profiles` stays empty).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct IdentifierResponse {
    pub response_code: u8,
    pub uri: Vec<IdentifierUri>,
    pub found_profiles: Vec<VLBytes>,
    pub id_response_extensions: VLBytes,
}

impl IdentifierResponse {
    pub fn new(code: QueryCode, uris: Vec<IdentifierUri>) -> Self {
        Self {
            response_code: code as u8,
            uri: uris,
            found_profiles: Vec::new(),
            id_response_extensions: bytes(Vec::new()),
        }
    }
}

// --- reportAbuse ---------------------------------------------------------------------------

/// `AbusiveMessage` (franks are opaque; Parley does not frank yet).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct AbusiveMessage {
    pub message_content: VLBytes,
    pub frank: VLBytes,
    pub accepted_timestamp: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct AbuseReport {
    pub reporting_user: IdentifierUri,
    pub alleged_abuser_uri: IdentifierUri,
    pub reason_code: u8,
    pub note: VLBytes,
    pub messages: Vec<AbusiveMessage>,
    pub abuse_extensions: VLBytes,
}

/// Reads an `opaque<V>` as a byte slice.
pub fn opaque(v: &VLBytes) -> &[u8] {
    v.as_slice()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_notify() -> NotifyRequest {
        NotifyRequest {
            entries: vec![NotifyEntry {
                sequence: 7,
                event: 3,
                sender: IdentifierUri::new("mimi://chirp.test/u/alice"),
                recipients: vec![IdentifierUri::new(
                    "mimi://wave.test/d/bob/0011223344556677",
                )],
                room: Some(RoomSnapshot {
                    kind: 0,
                    name: Some(bytes(b"team".to_vec())),
                    creator: IdentifierUri::new("mimi://chirp.test/u/alice"),
                    epoch: 3,
                    users: vec![IdentifierUri::new("mimi://wave.test/u/bob")],
                    local_clients: vec![],
                    admins: vec![IdentifierUri::new("mimi://chirp.test/u/alice")],
                }),
                fanout: FanoutMessage {
                    timestamp: 1_700_000_000_000,
                    kind: FanoutKind::Commit,
                    message: bytes(vec![0, 1, 0, 1, 9]),
                    extras: vec![],
                },
                expires_at: NO_EXPIRY,
            }],
        }
    }

    #[test]
    fn expiry_hints_travel_and_zero_means_none() {
        let plain = SubmitMessageRequest::new(vec![1], "mimi://a.test/d/x/0011223344556677");
        assert_eq!(plain.expiry(), None);
        let hinted = plain.clone().expiring_at(Some(1_700_000_000_000));
        let back = SubmitMessageRequest::decode(&hinted.encode()).unwrap();
        assert_eq!(back.expiry(), Some(1_700_000_000_000));
        // The hint is one trailing uint64 after the draft's fields.
        assert_eq!(hinted.encode().len(), plain.encode().len());
        assert_eq!(
            &hinted.encode()[plain.encode().len() - 8..],
            &1_700_000_000_000u64.to_be_bytes()
        );
        let mut n = sample_notify();
        assert_eq!(n.entries[0].expiry(), None);
        n.entries[0].expires_at = 42;
        let back = NotifyRequest::decode(&n.encode()).unwrap();
        assert_eq!(back.entries[0].expiry(), Some(42));
    }

    #[test]
    fn bodies_round_trip_and_reject_trailing_bytes() {
        let n = sample_notify();
        let wire = n.encode();
        assert_eq!(NotifyRequest::decode(&wire), Ok(n));
        let mut longer = wire.clone();
        longer.push(0);
        assert_eq!(NotifyRequest::decode(&longer), Err(WireError::Trailing(1)));
        assert!(NotifyRequest::decode(&wire[..wire.len() - 1]).is_err());

        let u = UpdateRequest::commit(vec![1, 2, 3], Some(vec![4]));
        assert_eq!(UpdateRequest::decode(&u.encode()), Ok(u));
        let r = UpdateResponse::WrongEpoch {
            error_description: bytes(b"stale".to_vec()),
            current_epoch: 9,
        };
        assert_eq!(UpdateResponse::decode(&r.encode()), Ok(r));
        let k = KeyMaterialRequest::new(
            "mimi://a.test/u/x",
            "mimi://b.test/u/y",
            "mimi://a.test/r/00",
            1,
        );
        assert_eq!(KeyMaterialRequest::decode(&k.encode()), Ok(k));
        let c = ConsentEntry::new(
            ConsentOperation::Grant,
            "mimi://a.test/u/x",
            "mimi://b.test/u/y",
        );
        assert_eq!(ConsentEntry::decode(&c.encode()), Ok(c));
    }

    #[test]
    fn unknown_tags_and_protocols_are_errors() {
        // HandshakeBundle tag 9 does not exist.
        let mut wire = UpdateRequest::proposal(vec![1]).encode();
        wire[1] = 9;
        assert!(UpdateRequest::decode(&wire).is_err());
        let mut k = KeyMaterialRequest::new("a", "b", "c", 1);
        k.protocol = 2;
        assert_eq!(k.check(), Err(WireError::Protocol(2)));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = NotifyRequest::decode(&data);
            let _ = UpdateRequest::decode(&data);
            let _ = UpdateResponse::decode(&data);
            let _ = SubmitMessageRequest::decode(&data);
            let _ = SubmitResponse::decode(&data);
            let _ = KeyMaterialRequest::decode(&data);
            let _ = KeyMaterialResponse::decode(&data);
            let _ = ConsentEntry::decode(&data);
            let _ = IdentifierRequest::decode(&data);
            let _ = AbuseReport::decode(&data);
        }

        #[test]
        fn mutated_notify_never_panics(pos in 0usize..200, byte in any::<u8>()) {
            let mut wire = sample_notify().encode();
            let i = pos % wire.len();
            wire[i] = byte;
            let _ = NotifyRequest::decode(&wire);
        }
    }
}
