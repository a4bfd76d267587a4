//! `submitMessage` (draft §5.4): an application message to the room's hub.

use super::mls::MlsMessage;
use super::{check_protocol, IdentifierUri, WireError, MLS10};
use tls_codec::{TlsDeserialize, TlsSerialize, TlsSize, VLBytes};

/// `SubmitMessageRequest` (mls10). `sending_uri`: the sender's user URI (Parley sends it) or one
/// of its client URIs.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct SubmitMessageRequest {
    pub protocol: u8,
    pub app_message: MlsMessage,
    pub sending_uri: IdentifierUri,
}

impl SubmitMessageRequest {
    pub fn new(app_message: MlsMessage, sending_uri: &str) -> Self {
        Self {
            protocol: MLS10,
            app_message,
            sending_uri: IdentifierUri::new(sending_uri),
        }
    }

    pub fn check(&self) -> Result<(), WireError> {
        check_protocol(self.protocol)
    }
}

/// `Frank` (§5.4.1). Parley does not frank (yet): it never sends one and ignores one received.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct Frank {
    pub server_frank: [u8; 32],
    pub franking_signature_ciphersuite: u16,
    pub franking_integrity_signature: VLBytes,
}

/// `SubmitResponseCode` with its select.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum SubmitStatus {
    #[tls_codec(discriminant = 0)]
    Accepted {
        accepted_timestamp: u64,
        frank: Option<Frank>,
    },
    #[tls_codec(discriminant = 1)]
    NotAllowed,
    #[tls_codec(discriminant = 2)]
    EpochTooOld { current_epoch: u64 },
}

/// `SubmitMessageResponse` (mls10).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct SubmitMessageResponse {
    pub protocol: u8,
    pub status: SubmitStatus,
}

impl SubmitMessageResponse {
    pub fn new(status: SubmitStatus) -> Self {
        Self {
            protocol: MLS10,
            status,
        }
    }
}
