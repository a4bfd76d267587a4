//! `reportAbuse` (draft §5.9).

use super::submit::Frank;
use super::{AppDataDictionary, IdentifierUri};
use tls_codec::{TlsDeserialize, TlsSerialize, TlsSize, VLBytes};

/// `AbusiveMessage`.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct AbusiveMessage {
    pub message_content: VLBytes,
    pub frank: Frank,
    pub accepted_timestamp: u64,
}

/// `AbuseReport`.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct AbuseReport {
    pub reporting_user: IdentifierUri,
    pub alleged_abuser_uri: IdentifierUri,
    pub reason_code: u8,
    pub note: VLBytes,
    pub messages: Vec<AbusiveMessage>,
    pub abuse_extensions: AppDataDictionary,
}
