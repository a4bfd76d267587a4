//! A room's state as MLS GroupContext components (draft §7.5-7.6, draft-ietf-mimi-room-policy), in the
//! `app_data_dictionary` extension, and Parley's Safe AAD expiry hint. Every member agrees on
//! these cryptographically; a hub reads them from the group's public state.

use super::{AppDataDictionary, WireError};
use crate::ids::{RoomId, UserId};
use std::collections::BTreeMap;
use tls_codec::{Deserialize as _, Serialize as _, TlsDeserialize, TlsSerialize, TlsSize, VLBytes};

/// MLS extension type of `app_data_dictionary` (draft-ietf-mls-extensions).
pub const APP_DATA_DICTIONARY: u16 = 0x0006;
/// Component ids (draft §10 IANA, draft-ietf-mimi-room-policy's suggested values).
pub const PARTICIPANT_LIST: u16 = 0x0022;
pub const ROOM_METADATA: u16 = 0x0023;
pub const BASE_ROOM_POLICY: u16 = 0x0027;
/// Parley's private Safe AAD component: `uint64` expiry of an application message (ms).
pub const PARLEY_EXPIRES_AT: u16 = 0xF0A1;

/// Role indices (room policy's "strictly administered" example): participant and administrator.
pub const ROLE_MEMBER: u32 = 2;
pub const ROLE_ADMIN: u32 = 3;

/// `UserRolePair`.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct UserRolePair {
    pub user: VLBytes,
    pub role_index: u32,
}

/// `ParticipantListData`.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct ParticipantListData {
    pub participants: Vec<UserRolePair>,
}

/// `Uri`: `struct { opaque uri<V>; }`.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct Uri {
    pub uri: VLBytes,
}

impl Uri {
    pub fn empty() -> Self {
        Self {
            uri: Vec::new().into(),
        }
    }
}

/// `UTF8String`.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct Utf8String {
    pub string: VLBytes,
}

impl Utf8String {
    pub fn empty() -> Self {
        Self {
            string: Vec::new().into(),
        }
    }
}

/// `RichDescription`.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct RichDescription {
    pub media_type: VLBytes,
    pub language_tag: VLBytes,
    pub description_content: VLBytes,
}

/// `RoomMetaData`.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct RoomMetaData {
    pub room_uri: Uri,
    pub room_name: Utf8String,
    pub room_descriptions: Vec<RichDescription>,
    pub room_avatar: Uri,
    pub room_subject: Utf8String,
    pub room_mood: Utf8String,
}

/// `BaseRoomPolicy` (draft-ietf-mimi-room-policy). `bool`s are 0/1; `parent_room` is a vector of
/// `Uri` (empty unless parent-dependent); `policy_component_ids` are component ids.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct BaseRoomPolicy {
    pub fixed_membership: u8,
    pub parent_dependant: u8,
    pub parent_room: Vec<Uri>,
    pub multi_device: u8,
    pub max_clients: Option<u32>,
    pub max_users: Option<u32>,
    pub pseudonyms_allowed: u8,
    pub persistent_room: u8,
    pub discoverable: u8,
    pub policy_component_ids: Vec<u16>,
}

/// A room's state as Parley uses it, read from or written to the GroupContext components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomState {
    pub room: RoomId,
    /// Empty for none.
    pub name: String,
    /// A fixed-membership (1:1) room.
    pub direct: bool,
    /// Every participant user and its role index.
    pub participants: BTreeMap<UserId, u32>,
    pub max_clients: Option<u32>,
}

fn bad(msg: impl Into<String>) -> WireError {
    WireError::Unexpected(msg.into())
}

fn utf8(v: &VLBytes, what: &str) -> Result<String, WireError> {
    String::from_utf8(v.as_slice().to_vec()).map_err(|_| bad(format!("{what} is not UTF-8")))
}

fn boolean(v: u8, what: &str) -> Result<bool, WireError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(bad(format!("{what} is not a bool"))),
    }
}

impl RoomState {
    /// A new group room: its creator is the only participant, an administrator.
    pub fn group(room: RoomId, name: &str, creator: &UserId, max_clients: Option<u32>) -> Self {
        Self {
            room,
            name: name.to_owned(),
            direct: false,
            participants: BTreeMap::from([(creator.clone(), ROLE_ADMIN)]),
            max_clients,
        }
    }

    /// A new direct room: fixed membership, both users listed from the start.
    pub fn direct(room: RoomId, a: &UserId, b: &UserId, max_clients: Option<u32>) -> Self {
        Self {
            room,
            name: String::new(),
            direct: true,
            participants: BTreeMap::from([(a.clone(), ROLE_MEMBER), (b.clone(), ROLE_MEMBER)]),
            max_clients,
        }
    }

    pub fn admins(&self) -> impl Iterator<Item = &UserId> {
        self.participants
            .iter()
            .filter(|(_, r)| **r == ROLE_ADMIN)
            .map(|(u, _)| u)
    }

    pub fn is_admin(&self, user: &UserId) -> bool {
        self.participants.get(user) == Some(&ROLE_ADMIN)
    }

    pub fn is_participant(&self, user: &UserId) -> bool {
        self.participants.contains_key(user)
    }

    /// The three components in an `app_data_dictionary`.
    pub fn to_dictionary(&self) -> Result<AppDataDictionary, WireError> {
        let mut dict = AppDataDictionary::default();
        let participants = ParticipantListData {
            participants: self
                .participants
                .iter()
                .map(|(u, r)| UserRolePair {
                    user: u.to_uri().into_bytes().into(),
                    role_index: *r,
                })
                .collect(),
        };
        dict.insert(PARTICIPANT_LIST, participants.tls_serialize_detached()?);
        let metadata = RoomMetaData {
            room_uri: Uri {
                uri: self.room.as_str().as_bytes().to_vec().into(),
            },
            room_name: Utf8String {
                string: self.name.as_bytes().to_vec().into(),
            },
            room_descriptions: Vec::new(),
            room_avatar: Uri::empty(),
            room_subject: Utf8String::empty(),
            room_mood: Utf8String::empty(),
        };
        dict.insert(ROOM_METADATA, metadata.tls_serialize_detached()?);
        let policy = BaseRoomPolicy {
            fixed_membership: u8::from(self.direct),
            parent_dependant: 0,
            parent_room: Vec::new(),
            multi_device: 1,
            max_clients: self.max_clients,
            max_users: None,
            pseudonyms_allowed: 0,
            persistent_room: 0,
            discoverable: 0,
            // Only policy components (roles_list, preauth_list) belong here; Parley uses none.
            policy_component_ids: Vec::new(),
        };
        dict.insert(BASE_ROOM_POLICY, policy.tls_serialize_detached()?);
        Ok(dict)
    }

    /// The `app_data_dictionary` extension's data.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        Ok(self.to_dictionary()?.tls_serialize_detached()?)
    }

    /// Reads the state from an `app_data_dictionary` extension's data. The participant list
    /// and metadata are required; without a base policy the room is a group room.
    pub fn decode(extension_data: &[u8]) -> Result<Self, WireError> {
        let dict = AppDataDictionary::tls_deserialize_exact(extension_data)?;
        dict.check_order()?;
        let list = dict
            .get(PARTICIPANT_LIST)
            .ok_or_else(|| bad("the room has no participant_list component"))?;
        let list = ParticipantListData::tls_deserialize_exact(list)?;
        let mut participants = BTreeMap::new();
        for p in list.participants {
            let uri = utf8(&p.user, "a participant")?;
            let user = UserId::parse(&uri).map_err(|e| bad(e.to_string()))?;
            if participants.insert(user, p.role_index).is_some() {
                return Err(bad(format!("{uri} is listed twice")));
            }
        }
        let meta = dict
            .get(ROOM_METADATA)
            .ok_or_else(|| bad("the room has no room_metadata component"))?;
        let meta = RoomMetaData::tls_deserialize_exact(meta)?;
        let room = RoomId::parse(&utf8(&meta.room_uri.uri, "room_uri")?)
            .map_err(|e| bad(e.to_string()))?;
        let name = utf8(&meta.room_name.string, "room_name")?;
        let (direct, max_clients) = match dict.get(BASE_ROOM_POLICY) {
            Some(policy) => {
                let policy = BaseRoomPolicy::tls_deserialize_exact(policy)?;
                (
                    boolean(policy.fixed_membership, "fixed_membership")?,
                    policy.max_clients,
                )
            }
            None => (false, None),
        };
        Ok(Self {
            room,
            name,
            direct,
            participants,
            max_clients,
        })
    }
}

/// `SafeAADItem` (draft-ietf-mls-extensions §4.9).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
struct SafeAadItem {
    component_id: u16,
    aad_item_data: VLBytes,
}

/// `SafeAAD`.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
struct SafeAad {
    aad_items: Vec<SafeAadItem>,
}

/// The `authenticated_data` of an expiring application message: a SafeAAD with
/// `parley_expires_at` (milliseconds since the Unix epoch).
pub fn expiry_aad(expires_at_ms: u64) -> Vec<u8> {
    SafeAad {
        aad_items: vec![SafeAadItem {
            component_id: PARLEY_EXPIRES_AT,
            aad_item_data: expires_at_ms.to_be_bytes().to_vec().into(),
        }],
    }
    .tls_serialize_detached()
    .unwrap_or_default()
}

/// The expiry hint in an application message's `authenticated_data`, if it holds a SafeAAD with
/// `parley_expires_at`; any other AAD (or none) means no hint.
pub fn expiry_from_aad(aad: &[u8]) -> Option<u64> {
    let safe = SafeAad::tls_deserialize_exact(aad).ok()?;
    let item = safe
        .aad_items
        .iter()
        .find(|i| i.component_id == PARLEY_EXPIRES_AT)?;
    let bytes: [u8; 8] = item.aad_item_data.as_slice().try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Domain;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn room_state_round_trips_through_components() {
        let hub = Domain::parse("chirp.test").unwrap();
        let room = RoomId::from_random(&hub, [3; 16]);
        let mut s = RoomState::group(room.clone(), "team", &user("alice@chirp.test"), Some(100));
        s.participants.insert(user("bob@wave.test"), ROLE_MEMBER);
        let back = RoomState::decode(&s.encode().unwrap()).unwrap();
        assert_eq!(back, s);
        assert!(back.is_admin(&user("alice@chirp.test")));
        assert!(!back.is_admin(&user("bob@wave.test")));
        let d = RoomState::direct(room, &user("a@chirp.test"), &user("b@wave.test"), None);
        let back = RoomState::decode(&d.encode().unwrap()).unwrap();
        assert!(back.direct);
        assert_eq!(back.admins().count(), 0);
    }

    #[test]
    fn components_are_ordered_and_typed_as_the_drafts_say() {
        let hub = Domain::parse("chirp.test").unwrap();
        let s = RoomState::group(
            RoomId::from_random(&hub, [1; 16]),
            "",
            &user("alice@chirp.test"),
            None,
        );
        let dict = s.to_dictionary().unwrap();
        let ids: Vec<u16> = dict.component_data.iter().map(|c| c.component_id).collect();
        assert_eq!(ids, vec![0x0022, 0x0023, 0x0027]);
        // participant_list: one entry, role 3 (admin) after the user URI.
        let list = dict.get(PARTICIPANT_LIST).unwrap();
        assert_eq!(&list[list.len() - 4..], &3u32.to_be_bytes());
    }

    #[test]
    fn a_room_state_missing_pieces_is_refused() {
        let mut dict = AppDataDictionary::default();
        dict.insert(ROOM_METADATA, vec![0]);
        assert!(RoomState::decode(&dict.tls_serialize_detached().unwrap()).is_err());
        assert!(RoomState::decode(&[0xff]).is_err());
    }

    #[test]
    fn expiry_hints_travel_in_safe_aad() {
        let aad = expiry_aad(1_700_000_000_123);
        assert_eq!(expiry_from_aad(&aad), Some(1_700_000_000_123));
        assert_eq!(expiry_from_aad(&[]), None);
        assert_eq!(expiry_from_aad(b"other"), None);
    }
}
