//! MIMI provider-to-provider bodies exactly as draft-ietf-mimi-protocol-06 defines them, in the TLS
//! presentation language (`tls_codec`), with MLS objects inline in their RFC 9420 encoding.
//! Choices where the draft is open are docs/mimi-profile.md's ("Reading" there).
//!
//! MLS objects are held as [`Mls<T>`]: the exact bytes received, checked to parse as `T` by
//! openmls while decoding, so a body is framed by the MLS structures themselves and forwarded
//! byte for byte. No I/O and no cryptography here: signing and encryption take the byte strings
//! [`signing`] builds.

mod abuse;
mod consent;
mod directory;
mod fanout;
mod group_info;
mod key_material;
mod mls;
mod query;
pub mod room_state;
pub mod signing;
mod submit;
mod update;

pub use abuse::{AbuseReport, AbusiveMessage};
pub use consent::{ConsentEntry, ConsentOperation};
pub use directory::{https_url_parts, Directory};
pub use fanout::{EphemeralMessage, FanoutExtra, FanoutMessage, NotifyRequest};
pub use group_info::{
    response_sign_content as group_info_response_sign_content, GroupInfoRatchetTreeTbe,
    GroupInfoRequest, GroupInfoRequestTbs, GroupInfoResponse, GroupInfoResult, HpkeCiphertext,
    PendingProposal,
};
pub use key_material::{
    ClientKeyMaterial, KeyMaterialRequest, KeyMaterialRequestTbs, KeyMaterialResponse, UserCode,
    CLIENT_EXHAUSTED, CLIENT_NOTHING_COMPATIBLE, CLIENT_SUCCESS,
};
pub use mls::{
    Capabilities, Credential, ExternalSender, GroupInfo, KeyPackage, Mls, MlsKind, MlsMessage,
    RatchetTree, RequiredCapabilities, Welcome,
};
pub use query::{
    IdentifierRequest, IdentifierResponse, ProfileField, QueryCode, QueryElement, UserProfile,
    SEARCH_HANDLE,
};
pub use submit::{Frank, SubmitMessageRequest, SubmitMessageResponse, SubmitStatus};
pub use update::{
    GroupInfoOption, HandshakeBundle, PartialGroupInfo, RatchetTreeOption, UpdateRequest,
    UpdateRoomResponse,
};

use tls_codec::{TlsDeserialize, TlsSerialize, TlsSize, VLBytes};

/// Largest body a provider accepts on the federation listener (also checked by the listener).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// The media type Parley sends MIMI bodies with (the draft names none; any is accepted).
pub const CONTENT_TYPE: &str = "application/mimi-protocol";

/// `Protocol`: only `mls10(1)` is defined.
pub const MLS10: u8 = 1;

/// MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519.
pub const CIPHERSUITE: u16 = 0x0001;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("malformed MIMI body: {0}")]
    Malformed(String),
    #[error("MIMI body has {0} unexpected trailing bytes")]
    Trailing(usize),
    #[error("unsupported protocol {0} (only mls10 = 1)")]
    Protocol(u8),
    #[error("{0}")]
    Unexpected(String),
}

impl From<tls_codec::Error> for WireError {
    fn from(e: tls_codec::Error) -> Self {
        WireError::Malformed(e.to_string())
    }
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
        let value = T::tls_deserialize(&mut rest)?;
        if !rest.is_empty() {
            return Err(WireError::Trailing(rest.len()));
        }
        Ok(value)
    }
}

pub(crate) fn check_protocol(p: u8) -> Result<(), WireError> {
    if p == MLS10 {
        Ok(())
    } else {
        Err(WireError::Protocol(p))
    }
}

/// `IdentifierUri`: `struct { opaque uri<V>; }`, a UTF-8 MIMI URI.
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

    pub fn as_bytes(&self) -> &[u8] {
        self.uri.as_slice()
    }
}

/// `ComponentData` of an `AppDataDictionary` (draft-ietf-mls-extensions §4.6).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct ComponentData {
    pub component_id: u16,
    pub data: VLBytes,
}

/// `AppDataDictionary`: `ComponentData component_data<V>`, ordered by id. The draft's extension
/// points (consent, identifier query, abuse report) use it; Parley sends it empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct AppDataDictionary {
    pub component_data: Vec<ComponentData>,
}

impl AppDataDictionary {
    /// The data of one component, if present.
    pub fn get(&self, id: u16) -> Option<&[u8]> {
        self.component_data
            .iter()
            .find(|c| c.component_id == id)
            .map(|c| c.data.as_slice())
    }

    /// Sets a component, keeping the entries ordered by id.
    pub fn insert(&mut self, id: u16, data: Vec<u8>) {
        self.component_data.retain(|c| c.component_id != id);
        self.component_data.push(ComponentData {
            component_id: id,
            data: data.into(),
        });
        self.component_data.sort_by_key(|c| c.component_id);
    }

    /// Entries must be strictly increasing by id (no duplicates).
    pub fn check_order(&self) -> Result<(), WireError> {
        if self
            .component_data
            .windows(2)
            .all(|w| w[0].component_id < w[1].component_id)
        {
            Ok(())
        } else {
            Err(WireError::Unexpected(
                "AppDataDictionary entries must be ordered by component id, without repeats".into(),
            ))
        }
    }
}

/// Reads an `opaque<V>` as text (`string` in the draft), lossily.
pub fn text(v: &VLBytes) -> String {
    String::from_utf8_lossy(v.as_slice()).into_owned()
}

/// An `opaque<V>` from text.
pub fn opaque(s: &str) -> VLBytes {
    s.as_bytes().to_vec().into()
}

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
