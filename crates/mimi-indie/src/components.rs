//! The room state a MIMI room keeps in its GroupContext (profile §4): the `app_data_dictionary`
//! extension (0x0006) with `participant_list` (0x0022, draft §10.1), `room_metadata` (0x0023,
//! §10.2) and `base_room_policy` (0x0027, draft-ietf-mimi-room-policy), and helpers that turn
//! it into and out of openmls [`Extension`]s whatever openmls' `extensions-draft` feature says.

use openmls::prelude::{Extension, ExtensionType, Extensions, GroupContext};
use tls_codec::{
    Deserialize, Error as TlsError, Serialize, TlsDeserialize, TlsSerialize, TlsSize, VLBytes,
};

use crate::wire::{decode, AppDataDictionary, ComponentData};

/// The `app_data_dictionary` MLS extension type.
pub const APP_DATA_DICTIONARY: u16 = 0x0006;
/// `participant_list` component id.
pub const PARTICIPANT_LIST: u16 = 0x0022;
/// `room_metadata` component id.
pub const ROOM_METADATA: u16 = 0x0023;
/// `base_room_policy` component id (room-policy's suggested value).
pub const BASE_ROOM_POLICY: u16 = 0x0027;

/// Role index of an ordinary participant (profile §4).
pub const ROLE_PARTICIPANT: u32 = 2;
/// Role index of an administrator (profile §4).
pub const ROLE_ADMIN: u32 = 3;

/// `struct { opaque user<V>; uint32 role_index; } UserRolePair;`
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct UserRolePair {
    pub user: VLBytes,
    pub role_index: u32,
}

/// `struct { UserRolePair participants<V>; } ParticipantListData;`
#[derive(Debug, Clone, Default, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct ParticipantListData {
    pub participants: Vec<UserRolePair>,
}

impl ParticipantListData {
    /// The role of `user`, if it is a participant.
    pub fn role_of(&self, user: &str) -> Option<u32> {
        self.participants
            .iter()
            .find(|p| p.user.as_slice() == user.as_bytes())
            .map(|p| p.role_index)
    }

    /// Participant user URIs (those that are not UTF-8 are skipped).
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.participants
            .iter()
            .filter_map(|p| std::str::from_utf8(p.user.as_slice()).ok())
    }

    /// Appends `user` with `role_index`.
    pub fn push(&mut self, user: &str, role_index: u32) {
        self.participants.push(UserRolePair {
            user: user.as_bytes().into(),
            role_index,
        });
    }
}

/// `struct { opaque uri<V>; } Uri;` (also `UTF8String`, same encoding).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct Opaque {
    pub value: VLBytes,
}

impl Opaque {
    /// An empty value.
    pub fn empty() -> Self {
        Self::text("")
    }

    /// Wraps text.
    pub fn text(value: &str) -> Self {
        Self {
            value: value.as_bytes().into(),
        }
    }
}

/// `RichDescription` (§10.2).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct RichDescription {
    pub media_type: VLBytes,
    pub language_tag: VLBytes,
    pub description_content: VLBytes,
}

/// `RoomMetaData` (§10.2).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct RoomMetaData {
    pub room_uri: Opaque,
    pub room_name: Opaque,
    pub room_descriptions: Vec<RichDescription>,
    pub room_avatar: Opaque,
    pub room_subject: Opaque,
    pub room_mood: Opaque,
}

/// room-policy's `enum { false(0), true(1) } bool;`
#[derive(Debug, Clone, Copy, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum Bool {
    False = 0,
    True = 1,
}

impl From<bool> for Bool {
    fn from(value: bool) -> Self {
        if value {
            Self::True
        } else {
            Self::False
        }
    }
}

/// `BaseRoomPolicy` (draft-ietf-mimi-room-policy, "Base Room policy component syntax").
/// `parent_room` is written `Uri parent_room<V>` there: read as a vector of `Uri` (empty for
/// a room without parent, which encodes the same as an empty `Uri`).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct BaseRoomPolicy {
    pub fixed_membership: Bool,
    pub parent_dependant: Bool,
    pub parent_room: Vec<Opaque>,
    pub multi_device: Bool,
    pub max_clients: Option<u32>,
    pub max_users: Option<u32>,
    pub pseudonyms_allowed: Bool,
    pub persistent_room: Bool,
    pub discoverable: Bool,
    pub policy_component_ids: Vec<u16>,
}

impl BaseRoomPolicy {
    /// The profile's policy for a group room (or a direct room when `fixed_membership`).
    pub fn profile(fixed_membership: bool, max_clients: u32) -> Self {
        Self {
            fixed_membership: fixed_membership.into(),
            parent_dependant: Bool::False,
            parent_room: Vec::new(),
            multi_device: Bool::True,
            max_clients: Some(max_clients),
            max_users: None,
            pseudonyms_allowed: Bool::False,
            persistent_room: Bool::False,
            discoverable: Bool::False,
            policy_component_ids: vec![PARTICIPANT_LIST, ROOM_METADATA],
        }
    }
}

/// The MIMI room state held in the GroupContext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomState {
    pub participants: ParticipantListData,
    pub metadata: RoomMetaData,
    pub policy: BaseRoomPolicy,
}

impl RoomState {
    /// The `app_data_dictionary` with the three components, ordered by id.
    pub fn to_dictionary(&self) -> Result<AppDataDictionary, TlsError> {
        let entry = |component_id, data: Vec<u8>| ComponentData {
            component_id,
            data: data.into(),
        };
        Ok(AppDataDictionary {
            component_data: vec![
                entry(
                    PARTICIPANT_LIST,
                    self.participants.tls_serialize_detached()?,
                ),
                entry(ROOM_METADATA, self.metadata.tls_serialize_detached()?),
                entry(BASE_ROOM_POLICY, self.policy.tls_serialize_detached()?),
            ],
        })
    }

    /// Reads the three components from a dictionary.
    pub fn from_dictionary(dictionary: &AppDataDictionary) -> Result<Self, TlsError> {
        if !dictionary.is_well_ordered() {
            return Err(TlsError::DecodingError(
                "app_data_dictionary entries out of order".into(),
            ));
        }
        let component = |id: u16| {
            dictionary
                .get(id)
                .ok_or_else(|| TlsError::DecodingError(format!("component {id:#06x} missing")))
        };
        Ok(Self {
            participants: decode(component(PARTICIPANT_LIST)?)?,
            metadata: decode(component(ROOM_METADATA)?)?,
            policy: decode(component(BASE_ROOM_POLICY)?)?,
        })
    }

    /// Reads the room state out of a GroupContext's extensions.
    pub fn from_extensions(extensions: &Extensions<GroupContext>) -> Result<Self, TlsError> {
        let ext = extensions
            .iter()
            .find(|e| u16::from(e.extension_type()) == APP_DATA_DICTIONARY)
            .ok_or_else(|| TlsError::DecodingError("no app_data_dictionary".into()))?;
        Self::from_dictionary(&decode(&extension_data(ext)?)?)
    }

    /// The `app_data_dictionary` as an openmls extension.
    pub fn to_extension(&self) -> Result<Extension, TlsError> {
        app_data_extension(&self.to_dictionary()?)
    }
}

/// `ExtensionType` 0x0006 as this build of openmls names it.
pub fn app_data_extension_type() -> ExtensionType {
    ExtensionType::from(APP_DATA_DICTIONARY)
}

/// Builds the `app_data_dictionary` extension by decoding its wire form, so that it is the
/// variant openmls itself would produce (`Unknown(6)` or `AppDataDictionary`).
pub fn app_data_extension(dictionary: &AppDataDictionary) -> Result<Extension, TlsError> {
    let data = dictionary.tls_serialize_detached()?;
    let mut wire = APP_DATA_DICTIONARY.tls_serialize_detached()?;
    wire.extend(VLBytes::from(data).tls_serialize_detached()?);
    Extension::tls_deserialize(&mut wire.as_slice())
}

/// The `extension_data` bytes of any extension.
fn extension_data(extension: &Extension) -> Result<Vec<u8>, TlsError> {
    let wire = extension.tls_serialize_detached()?;
    let mut rest = wire.get(2..).unwrap_or_default();
    Ok(VLBytes::tls_deserialize(&mut rest)?.as_slice().to_vec())
}
