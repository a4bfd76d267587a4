//! The client ⇄ own-provider API's JSON bodies (documented in `docs/client-api.md`).
//!
//! Binary fields (MLS messages, KeyPackages, keys) travel as standard base64 strings.
//! These DTOs belong to the wire; the server and client map them onto their own types.

use serde::{Deserialize, Serialize};

/// Serde helpers for base64-encoded byte fields.
pub mod b64 {
    use base64::{engine::general_purpose::STANDARD, Engine as _};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
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
            let s = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
            s.map(|s| {
                STANDARD
                    .decode(s.as_bytes())
                    .map_err(serde::de::Error::custom)
            })
            .transpose()
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateRoomRequest {
    pub room_id: String,
    pub kind: RoomKind,
    #[serde(default)]
    pub name: Option<String>,
    /// For a direct room, the other participant (membership is fixed to the two).
    #[serde(default)]
    pub peer: Option<String>,
    /// TLS-encoded MlsMessage carrying the group's GroupInfo.
    #[serde(with = "b64")]
    pub group_info: Vec<u8>,
    /// TLS-encoded ratchet tree of the group.
    #[serde(with = "b64")]
    pub ratchet_tree: Vec<u8>,
}

/// A room as `GET /v1/rooms` and `GET /v1/rooms/{id}` show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoomInfo {
    pub room_id: String,
    pub room_uri: String,
    pub kind: RoomKind,
    pub name: Option<String>,
    pub epoch: u64,
    /// Member users (`user@domain`), sorted.
    pub members: Vec<String>,
    /// Admin users (may add, remove and promote), sorted. Direct rooms have none.
    #[serde(default)]
    pub admins: Vec<String>,
}

/// `POST /v1/rooms/{id}/admins`: make a member user an admin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromoteRequest {
    pub user: String,
}

/// `POST /v1/rooms/{id}/commits`: a Commit (as a PublicMessage) plus the Welcome for added devices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitRequest {
    #[serde(with = "b64")]
    pub commit: Vec<u8>,
    #[serde(default, with = "b64::opt", skip_serializing_if = "Option::is_none")]
    pub welcome: Option<Vec<u8>>,
}

/// `POST /v1/rooms/{id}/proposals`: a member's self-removal (leaving), as a PublicMessage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProposalRequest {
    #[serde(with = "b64")]
    pub proposal: Vec<u8>,
}

/// `POST /v1/rooms/{id}/messages`: an MLS PrivateMessage carrying MIMI content.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendRequest {
    #[serde(with = "b64")]
    pub message: Vec<u8>,
    /// When the message expires (milliseconds since the Unix epoch), as the `expires` inside
    /// the encrypted content says. The providers cannot read that, so the client repeats it
    /// here and they drop the message's queue entries by then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// `POST /v1/rooms/{id}/ephemeral`: an MLS PrivateMessage (a typing indicator) for the room's
/// member devices connected right now. Never stored or queued: offline devices never see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EphemeralRequest {
    #[serde(with = "b64")]
    pub message: Vec<u8>,
}

/// The hub's acceptance of a commit or message: its place in the room's order.
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// Frames on `GET /v1/ws`, both directions, as JSON text.
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
    fn the_expiry_hint_is_optional() {
        let plain: SendRequest = serde_json::from_str(r#"{"message":"AAE="}"#).unwrap();
        assert_eq!((plain.message, plain.expires_at), (vec![0, 1], None));
        let hinted = SendRequest {
            message: vec![0],
            expires_at: Some(1_764_201_818_437),
        };
        assert_eq!(
            serde_json::to_string(&hinted).unwrap(),
            r#"{"message":"AA==","expires_at":1764201818437}"#
        );
        let without = SendRequest {
            expires_at: None,
            ..hinted
        };
        assert_eq!(
            serde_json::to_string(&without).unwrap(),
            r#"{"message":"AA=="}"#
        );
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
