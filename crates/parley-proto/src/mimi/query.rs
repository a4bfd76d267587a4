//! `identifierQuery` (draft §5.8): finding a user's URI by handle (or other fields).

use super::{AppDataDictionary, IdentifierUri};
use std::io::{Read, Write};
use tls_codec::{TlsDeserialize, TlsSerialize, TlsSize, VLBytes};

/// `SearchIdentifierType::handle`.
pub const SEARCH_HANDLE: u8 = 1;
const SEARCH_OIDC_CLAIM: u8 = 7;
const SEARCH_VCARD_FIELD: u8 = 8;

/// `QueryElement`. `field_name` (`claimName` / `propertyName`) is on the wire only for the
/// `oidcStdClaim` and `vcardField` search types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryElement {
    pub search_type: u8,
    pub field_name: VLBytes,
    pub search_value: VLBytes,
}

fn has_field_name(search_type: u8) -> bool {
    matches!(search_type, SEARCH_OIDC_CLAIM | SEARCH_VCARD_FIELD)
}

impl tls_codec::Size for QueryElement {
    fn tls_serialized_len(&self) -> usize {
        1 + if has_field_name(self.search_type) {
            self.field_name.tls_serialized_len()
        } else {
            0
        } + self.search_value.tls_serialized_len()
    }
}

impl tls_codec::Serialize for QueryElement {
    fn tls_serialize<W: Write>(&self, writer: &mut W) -> Result<usize, tls_codec::Error> {
        let mut n = self.search_type.tls_serialize(writer)?;
        if has_field_name(self.search_type) {
            n += self.field_name.tls_serialize(writer)?;
        }
        n += self.search_value.tls_serialize(writer)?;
        Ok(n)
    }
}

impl tls_codec::Deserialize for QueryElement {
    fn tls_deserialize<R: Read>(bytes: &mut R) -> Result<Self, tls_codec::Error> {
        let search_type = u8::tls_deserialize(bytes)?;
        let field_name = if has_field_name(search_type) {
            VLBytes::tls_deserialize(bytes)?
        } else {
            Vec::new().into()
        };
        Ok(Self {
            search_type,
            field_name,
            search_value: VLBytes::tls_deserialize(bytes)?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct IdentifierRequest {
    pub query_elements: Vec<QueryElement>,
    pub id_request_extensions: AppDataDictionary,
}

impl IdentifierRequest {
    pub fn handle(handle: &str) -> Self {
        Self {
            query_elements: vec![QueryElement {
                search_type: SEARCH_HANDLE,
                field_name: Vec::new().into(),
                search_value: handle.as_bytes().to_vec().into(),
            }],
            id_request_extensions: AppDataDictionary::default(),
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

/// `ProfileField`.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct ProfileField {
    pub field_source: u8,
    pub field_name: VLBytes,
    pub field_value: VLBytes,
}

/// `UserProfile`.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct UserProfile {
    pub stable_uri: IdentifierUri,
    pub fields: Vec<ProfileField>,
}

/// `IdentifierResponse` (Parley shares no profiles: `found_profiles` stays empty).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct IdentifierResponse {
    pub response_code: u8,
    pub uri: Vec<IdentifierUri>,
    pub found_profiles: Vec<UserProfile>,
    pub id_response_extensions: AppDataDictionary,
}

impl IdentifierResponse {
    pub fn new(code: QueryCode, uris: Vec<IdentifierUri>) -> Self {
        Self {
            response_code: code as u8,
            uri: uris,
            found_profiles: Vec::new(),
            id_response_extensions: AppDataDictionary::default(),
        }
    }
}
