//! `keyMaterial` (draft §5.2): claiming one KeyPackage per client of a user, for one room.

use super::mls::{Capabilities, Credential, KeyPackage, RequiredCapabilities};
use super::{check_protocol, signing, IdentifierUri, WireError, MLS10};
use tls_codec::{Serialize as _, TlsDeserialize, TlsSerialize, TlsSize, VLBytes};

/// `KeyMaterialRequestTBS`: what the requesting client signs.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct KeyMaterialRequestTbs {
    pub protocol: u8,
    pub requesting_user: IdentifierUri,
    pub target_user: IdentifierUri,
    pub room_id: IdentifierUri,
    pub acceptable_ciphersuites: Vec<u16>,
    pub required_capabilities: RequiredCapabilities,
    pub requester_signature_key: VLBytes,
    pub requester_credential: Credential,
}

/// `KeyMaterialRequest` (mls10): the TBS and `key_material_request_signature` =
/// SignWithLabel(requesterSignatureKey, "KeyMaterialRequestTBS", KeyMaterialRequestTBS).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct KeyMaterialRequest {
    pub protocol: u8,
    pub requesting_user: IdentifierUri,
    pub target_user: IdentifierUri,
    pub room_id: IdentifierUri,
    pub acceptable_ciphersuites: Vec<u16>,
    pub required_capabilities: RequiredCapabilities,
    pub requester_signature_key: VLBytes,
    pub requester_credential: Credential,
    pub signature: VLBytes,
}

impl KeyMaterialRequestTbs {
    /// The bytes to sign: `SignContent` for the label "KeyMaterialRequestTBS" (RFC 9420 §5.1.2).
    pub fn sign_content(&self) -> Result<Vec<u8>, WireError> {
        Ok(signing::sign_content(
            signing::KEY_MATERIAL_REQUEST_TBS,
            &self.tls_serialize_detached()?,
        ))
    }

    /// The request, with the signature made over [`Self::sign_content`].
    pub fn signed(self, signature: Vec<u8>) -> KeyMaterialRequest {
        KeyMaterialRequest {
            protocol: self.protocol,
            requesting_user: self.requesting_user,
            target_user: self.target_user,
            room_id: self.room_id,
            acceptable_ciphersuites: self.acceptable_ciphersuites,
            required_capabilities: self.required_capabilities,
            requester_signature_key: self.requester_signature_key,
            requester_credential: self.requester_credential,
            signature: signature.into(),
        }
    }
}

impl KeyMaterialRequest {
    pub fn check(&self) -> Result<(), WireError> {
        check_protocol(self.protocol)
    }

    /// The signed part.
    pub fn tbs(&self) -> KeyMaterialRequestTbs {
        KeyMaterialRequestTbs {
            protocol: self.protocol,
            requesting_user: self.requesting_user.clone(),
            target_user: self.target_user.clone(),
            room_id: self.room_id.clone(),
            acceptable_ciphersuites: self.acceptable_ciphersuites.clone(),
            required_capabilities: self.required_capabilities.clone(),
            requester_signature_key: self.requester_signature_key.clone(),
            requester_credential: self.requester_credential.clone(),
        }
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

/// `KeyMaterialClientCode` values.
pub const CLIENT_SUCCESS: u8 = 0;
pub const CLIENT_EXHAUSTED: u8 = 1;
pub const CLIENT_NOTHING_COMPATIBLE: u8 = 2;

/// `ClientKeyMaterial` (mls10), the select on `clientStatus` as the enum's tag.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum ClientKeyMaterial {
    #[tls_codec(discriminant = 0)]
    Success {
        client_uri: IdentifierUri,
        key_package: KeyPackage,
    },
    #[tls_codec(discriminant = 1)]
    KeyMaterialExhausted { client_uri: IdentifierUri },
    #[tls_codec(discriminant = 2)]
    NothingCompatible {
        client_uri: IdentifierUri,
        client_capabilities: Option<Capabilities>,
    },
}

/// `KeyMaterialResponse`. `user_status` is a [`UserCode`].
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct KeyMaterialResponse {
    pub protocol: u8,
    pub user_status: u8,
    pub user_uri: IdentifierUri,
    pub clients: Vec<ClientKeyMaterial>,
}

impl KeyMaterialResponse {
    /// A refusal: any code but success/partialSuccess, with no clients (§5.2).
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
