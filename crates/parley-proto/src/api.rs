//! The client ⇄ own-provider API's JSON bodies (documented in `docs/client-api.md`).
//!
//! Binary fields (MLS messages, KeyPackages, keys) travel as standard base64 strings.
//! These DTOs belong to the wire; the server and client map them onto their own types.

use serde::{Deserialize, Serialize};

/// Serde helpers for byte fields: base64 strings in JSON, plain byte strings in binary formats
/// (the CBOR push frames of `GET /v1/ws?binary=true`). Decoding takes either form.
pub mod b64 {
    use base64::{engine::general_purpose::STANDARD, Engine as _};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&STANDARD.encode(bytes))
        } else {
            s.serialize_bytes(bytes)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(Bytes::deserialize(d)?.0)
    }

    /// Bytes from a base64 string or a byte string, whichever the format carries: serde's
    /// buffering of internally tagged enums hides whether the format is human-readable.
    struct Bytes(Vec<u8>);

    impl<'de> Deserialize<'de> for Bytes {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(BytesVisitor)
        }
    }

    struct BytesVisitor;

    impl serde::de::Visitor<'_> for BytesVisitor {
        type Value = Bytes;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("base64 text or a byte string")
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Bytes, E> {
            STANDARD.decode(v.as_bytes()).map(Bytes).map_err(E::custom)
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
            Ok(Bytes(v.to_vec()))
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
            Ok(Bytes(v))
        }
    }

    /// The same for `Option<Vec<u8>>`.
    pub mod opt {
        use super::*;

        pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
            match bytes {
                Some(b) => super::serialize(b, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
            Ok(<Option<Bytes>>::deserialize(d)?.map(|b| b.0))
        }
    }

    /// The same for `Vec<Vec<u8>>`.
    pub mod vec {
        use super::*;
        use serde::ser::SerializeSeq;

        pub fn serialize<S: Serializer>(items: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(items.len()))?;
            for b in items {
                seq.serialize_element(&STANDARD.encode(b))?;
            }
            seq.end()
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
            let items = <Vec<String>>::deserialize(d)?;
            items
                .iter()
                .map(|s| {
                    STANDARD
                        .decode(s.as_bytes())
                        .map_err(serde::de::Error::custom)
                })
                .collect()
        }
    }
}

/// Every error answer: `{"error": "<code>", "message": "...", "retryable": bool}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
    #[serde(default)]
    pub retryable: bool,
}

/// `POST /v1/accounts`: register a user together with its first device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub user: String,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub invite: Option<String>,
    #[serde(default)]
    pub device_name: Option<String>,
    /// The device's Ed25519 MLS signature public key.
    #[serde(with = "b64")]
    pub signature_key: Vec<u8>,
}

/// `POST /v1/sessions`: log in a further device of an existing user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginRequest {
    pub user: String,
    pub password: String,
    #[serde(default)]
    pub device_name: Option<String>,
    #[serde(with = "b64")]
    pub signature_key: Vec<u8>,
}

/// Answer to register and login: the new device and its bearer token (shown once).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionResponse {
    pub user: String,
    pub device_id: String,
    pub token: String,
}

/// One device in `GET /v1/devices` or `GET /v1/users/{user}/devices`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device_id: String,
    pub name: String,
    #[serde(with = "b64")]
    pub signature_key: Vec<u8>,
    pub created_at: u64,
}

/// `POST /v1/key-packages`: upload a batch of KeyPackages (TLS-encoded MlsMessage or KeyPackage).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadKeyPackages {
    #[serde(with = "b64::vec")]
    pub key_packages: Vec<Vec<u8>>,
    /// Replaces the device's last-resort KeyPackage, handed out when the batch runs dry.
    #[serde(default, with = "b64::opt", skip_serializing_if = "Option::is_none")]
    pub last_resort: Option<Vec<u8>>,
}

/// Answer to an upload and to `GET /v1/key-packages`: how many one-time packages remain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyPackageCount {
    pub remaining: u64,
    pub has_last_resort: bool,
}

/// One claimed KeyPackage, for one device of the target user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimedKeyPackage {
    pub device_id: String,
    #[serde(with = "b64")]
    pub key_package: Vec<u8>,
}

/// Answer to `POST /v1/users/{user}/key-packages/claim`: one package per device of the user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimResponse {
    pub user: String,
    pub key_packages: Vec<ClaimedKeyPackage>,
}

/// Room kinds: a 1:1 room has fixed membership of exactly two users.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RoomKind {
    Direct,
    Group,
}

impl RoomKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RoomKind::Direct => "direct",
            RoomKind::Group => "group",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "direct" => Some(Self::Direct),
            "group" => Some(Self::Group),
            _ => None,
        }
    }
}

/// `POST /v1/rooms`: register a freshly created MLS group (epoch 0, creator only) with its hub.
/// Kind, name and participants are read from the group's GroupContext components
/// (docs/mimi-profile.md §4); the group id must be the room's Parley group id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateRoomRequest {
    /// The room URI, `mimi://<caller's domain>/r/<name>`.
    pub room_id: String,
    /// TLS-encoded MlsMessage carrying the group's GroupInfo.
    #[serde(with = "b64")]
    pub group_info: Vec<u8>,
    /// TLS-encoded ratchet tree of the group.
    #[serde(with = "b64")]
    pub ratchet_tree: Vec<u8>,
}

/// A room as `GET /v1/rooms` and `GET /v1/rooms/{id}` show it. The hub of a room reads kind,
/// name, epoch, members and admins from the group's public state; a provider following a room
/// hubbed elsewhere keeps no group state and knows only `room_id` and `hub` (clients read the
/// rest from their own MLS group).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoomInfo {
    /// The room URI.
    pub room_id: String,
    /// The hub's domain.
    pub hub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<RoomKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Member users (`user@domain`), sorted (empty where unknown).
    #[serde(default)]
    pub members: Vec<String>,
    /// Admin users, sorted. Direct rooms have none.
    #[serde(default)]
    pub admins: Vec<String>,
}

/// `GET /v1/provider`: what a client needs to create rooms here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProviderInfo {
    /// The caller's domain, the hub of the rooms it creates.
    pub domain: String,
    /// The TLS-encoded MLS `ExternalSender` (signature key and credential `mimi://DOMAIN`) of
    /// the hub, which every room's `external_senders` extension must hold.
    #[serde(with = "b64")]
    pub external_sender: Vec<u8>,
}

/// `POST /v1/users/{user}/key-packages/claim`: one KeyPackage per device of `user`, for `room`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimRequest {
    /// The room URI the packages are for.
    pub room: String,
    /// Only this device's package (multi-device: adding the user's new device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The TLS-encoded MIMI `KeyMaterialRequest` for (caller's user, `user`, `room`), signed by
    /// the calling device (docs/mimi-profile.md §5); forwarded unchanged to other providers.
    #[serde(with = "b64")]
    pub key_material_request: Vec<u8>,
}

/// `POST /v1/rooms/{id}/commits`: a Commit (as a PublicMessage), the Welcome for added devices,
/// and the committer's GroupInfo and ratchet tree of the new epoch (what MIMI `update` carries).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitRequest {
    #[serde(with = "b64")]
    pub commit: Vec<u8>,
    /// An MlsMessage (Welcome), without ratchet tree.
    #[serde(default, with = "b64::opt", skip_serializing_if = "Option::is_none")]
    pub welcome: Option<Vec<u8>>,
    /// An MlsMessage (GroupInfo of the new epoch, signed by the committer, without tree).
    #[serde(with = "b64")]
    pub group_info: Vec<u8>,
    /// The new epoch's ratchet tree (`optional<Node> ratchet_tree<V>`).
    #[serde(with = "b64")]
    pub ratchet_tree: Vec<u8>,
}

/// `POST /v1/rooms/{id}/proposals`: a member's self-removal (leaving), as a PublicMessage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProposalRequest {
    #[serde(with = "b64")]
    pub proposal: Vec<u8>,
}

/// `POST /v1/rooms/{id}/messages`: an MLS PrivateMessage carrying MIMI content. An expiring
/// message carries its expiry in its cleartext authenticated data (Safe AAD
/// `parley_expires_at`, docs/mimi-profile.md §4), where every provider reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendRequest {
    #[serde(with = "b64")]
    pub message: Vec<u8>,
}

/// `POST /v1/rooms/{id}/ephemeral`: an MLS PrivateMessage (a typing indicator) for the room's
/// member devices connected right now. Never stored or queued: offline devices never see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EphemeralRequest {
    #[serde(with = "b64")]
    pub message: Vec<u8>,
}

/// The hub's acceptance of a commit or message: its place in the room's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The room's event number for this message or commit (increasing per room).
    pub event: u64,
    /// The hub's accepted timestamp (milliseconds since the Unix epoch).
    pub ts: u64,
    /// The room's epoch after the event.
    pub epoch: u64,
}

/// What a queue entry carries.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// An MLS Welcome: the device was added to the room.
    Welcome,
    /// An MLS Commit (PublicMessage) that moves the room to the next epoch.
    Commit,
    /// An MLS PrivateMessage with MIMI content.
    Message,
    /// An MLS proposal (PublicMessage) the next commit must include, e.g. a member leaving.
    Proposal,
    /// Not about a room: the device's user gained or lost a device (`room_id` and `data` are
    /// empty). The device then compares `GET /v1/devices` with its rooms' members, adding the
    /// user's new devices and removing deleted ones.
    Devices,
}

/// One entry of a device's delivery queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueEntry {
    /// Increasing per device; ack up to it.
    pub seq: u64,
    pub room_id: String,
    pub kind: EntryKind,
    /// The room's event number (see [`Accepted::event`]).
    pub event: u64,
    pub ts: u64,
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    /// For a Welcome: the group's ratchet tree (`optional<Node> ratchet_tree<V>`), which the
    /// Welcome does not carry.
    #[serde(default, with = "b64::opt", skip_serializing_if = "Option::is_none")]
    pub ratchet_tree: Option<Vec<u8>>,
}

/// Answer to `GET /v1/queue`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueuePage {
    pub entries: Vec<QueueEntry>,
}

/// `POST /v1/queue/ack`: delete every entry with `seq <= up_to`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AckRequest {
    pub up_to: u64,
}

/// Frames on `GET /v1/ws`, both directions: JSON text, or with `?binary=true` the same frames
/// as CBOR in binary WebSocket messages (byte fields as byte strings, no base64).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum WsFrame {
    /// Server → client: new queue entries, in order.
    Entries { entries: Vec<QueueEntry> },
    /// Client → server: acknowledge entries up to and including `up_to`.
    Ack { up_to: u64 },
    /// Server → client, only on `GET /v1/ws?ephemeral=true`: an ephemeral message of a room
    /// (see [`EphemeralRequest`]); not a queue entry, nothing to acknowledge.
    Ephemeral {
        room: String,
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// Client → server: the same as `POST /v1/rooms/{room}/messages`, without an HTTP request
    /// per message. `id` is the client's, to match the answer; answers may come out of order.
    Send {
        id: u64,
        room: String,
        #[serde(with = "b64")]
        message: Vec<u8>,
    },
    /// Server → client: the message of `Send` `id` is durable and will be delivered.
    Sent {
        id: u64,
        event: u64,
        ts: u64,
        epoch: u64,
    },
    /// Server → client: the message of `Send` `id` was refused, with the HTTP status and error
    /// body the same request over HTTP would have had; nothing was stored.
    Refused {
        id: u64,
        status: u16,
        error: ErrorBody,
    },
}

impl WsFrame {
    /// The frame as CBOR, for a binary WebSocket message.
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        ciborium::into_writer(self, &mut out).expect("CBOR into a Vec does not fail");
        out
    }

    /// A frame from a binary WebSocket message.
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, String> {
        ciborium::from_reader(bytes).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_travel_as_base64() {
        let e = QueueEntry {
            seq: 3,
            room_id: "r".into(),
            kind: EntryKind::Message,
            event: 9,
            ts: 1,
            data: vec![0, 1, 2, 250],
            ratchet_tree: None,
        };
        let json = serde_json::to_string(&WsFrame::Entries {
            entries: vec![e.clone()],
        })
        .unwrap();
        assert!(json.contains("\"data\":\"AAEC+g==\""), "{json}");
        assert!(json.contains("\"type\":\"entries\""), "{json}");
        let WsFrame::Entries { entries } = serde_json::from_str(&json).unwrap() else {
            panic!("wrong frame")
        };
        assert_eq!(entries, vec![e]);
    }

    #[test]
    fn binary_frames_carry_bytes_unencoded_and_decode_like_json_ones() {
        let entry = QueueEntry {
            seq: 3,
            room_id: "r".into(),
            kind: EntryKind::Welcome,
            event: 9,
            ts: 1,
            data: vec![0xAB; 40],
            ratchet_tree: Some(vec![7, 8]),
        };
        let frame = WsFrame::Entries {
            entries: vec![entry.clone()],
        };
        let cbor = frame.to_cbor();
        // A CBOR byte string of 40 bytes: major type 2, length 40 (0x58 0x28), then the bytes.
        let raw = [&[0x58, 40][..], &[0xAB; 40][..]].concat();
        assert!(cbor.windows(raw.len()).any(|w| w == raw), "{cbor:02x?}");
        let WsFrame::Entries { entries } = WsFrame::from_cbor(&cbor).unwrap() else {
            panic!("wrong frame")
        };
        assert_eq!(entries, vec![entry]);
        let send = WsFrame::Send {
            id: 5,
            room: "r".into(),
            message: vec![1, 2, 3],
        };
        let json = serde_json::to_string(&send).unwrap();
        assert_eq!(
            json,
            r#"{"type":"send","id":5,"room":"r","message":"AQID"}"#
        );
        for decoded in [
            WsFrame::from_cbor(&send.to_cbor()).unwrap(),
            serde_json::from_str(&json).unwrap(),
        ] {
            assert!(
                matches!(decoded, WsFrame::Send { id: 5, message, .. } if message == [1, 2, 3])
            );
        }
        assert!(WsFrame::from_cbor(&[0xff, 0x00]).is_err());
    }

    #[test]
    fn ephemeral_frames_carry_a_room_and_base64() {
        let frame = WsFrame::Ephemeral {
            room: "r".into(),
            data: vec![1, 2],
        };
        let json = serde_json::to_string(&frame).unwrap();
        assert_eq!(json, r#"{"type":"ephemeral","room":"r","data":"AQI="}"#);
        assert!(matches!(
            serde_json::from_str(&json).unwrap(),
            WsFrame::Ephemeral { data, .. } if data == [1, 2]
        ));
    }

    #[test]
    fn welcome_entries_carry_the_ratchet_tree_others_omit_it() {
        let mut e = QueueEntry {
            seq: 1,
            room_id: "mimi://chirp.test/r/x".into(),
            kind: EntryKind::Welcome,
            event: 2,
            ts: 3,
            data: vec![1],
            ratchet_tree: Some(vec![2]),
        };
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains(r#""ratchet_tree":"Ag==""#), "{json}");
        e.ratchet_tree = None;
        assert!(!serde_json::to_string(&e).unwrap().contains("ratchet_tree"));
        let back: QueueEntry = serde_json::from_str(
            r#"{"seq":1,"room_id":"r","kind":"message","event":2,"ts":3,"data":"AQ=="}"#,
        )
        .unwrap();
        assert_eq!(back.ratchet_tree, None);
    }

    #[test]
    fn bad_base64_is_a_decode_error() {
        assert!(serde_json::from_str::<SendRequest>(r#"{"message":"%%%"}"#).is_err());
    }
}

/// Where a contact (consent) relation stands, seen by the calling user.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ContactState {
    /// Asked, not answered yet.
    Pending,
    /// Consent given: key material may be fetched, rooms and messages flow.
    Granted,
    /// Refused or revoked: nothing flows.
    Blocked,
}

/// Which way a contact relation points, from the calling user.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ContactDirection {
    /// The other user asked the caller (the caller's answer decides).
    Incoming,
    /// The caller asked the other user (their answer decides).
    Outgoing,
}

/// Answer of `POST /v1/contacts/{user}/request|accept|block`, and one item of
/// `GET /v1/contacts/requests`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContactInfo {
    pub user: String,
    pub direction: ContactDirection,
    pub state: ContactState,
}

/// Answer to `POST /v1/assets` (`201`): where the uploaded attachment lives and what was stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UploadedAsset {
    /// `https://DOMAIN/v1/assets/ID`: the URL to put into the message's external part.
    pub url: String,
    /// Bytes stored (the encrypted file).
    pub size: u64,
    /// SHA-256 of the stored bytes, hex.
    pub sha256: String,
    /// When the provider deletes it (milliseconds since the Unix epoch).
    pub expires_at: u64,
}
