//! `requestConsent` / `updateConsent` (draft §5.7).

use super::mls::KeyPackage;
use super::{AppDataDictionary, IdentifierUri};
use std::io::{Read, Write};

/// `ConsentOperation`.
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

/// `ConsentEntry`. `client_key_packages` is on the wire only for `grant` (empty otherwise);
/// `room_id` is an `IdentifierUri` (docs/mimi-profile.md §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentEntry {
    pub operation: ConsentOperation,
    pub requester_uri: IdentifierUri,
    pub target_uri: IdentifierUri,
    pub room_id: Option<IdentifierUri>,
    pub client_key_packages: Vec<KeyPackage>,
    pub consent_extensions: AppDataDictionary,
}

impl ConsentEntry {
    pub fn new(operation: ConsentOperation, requester: &str, target: &str) -> Self {
        Self {
            operation,
            requester_uri: IdentifierUri::new(requester),
            target_uri: IdentifierUri::new(target),
            room_id: None,
            client_key_packages: Vec::new(),
            consent_extensions: AppDataDictionary::default(),
        }
    }
}

impl tls_codec::Size for ConsentEntry {
    fn tls_serialized_len(&self) -> usize {
        1 + self.requester_uri.tls_serialized_len()
            + self.target_uri.tls_serialized_len()
            + self.room_id.tls_serialized_len()
            + if self.operation == ConsentOperation::Grant {
                self.client_key_packages.tls_serialized_len()
            } else {
                0
            }
            + self.consent_extensions.tls_serialized_len()
    }
}

impl tls_codec::Serialize for ConsentEntry {
    fn tls_serialize<W: Write>(&self, writer: &mut W) -> Result<usize, tls_codec::Error> {
        let mut n = (self.operation as u8).tls_serialize(writer)?;
        n += self.requester_uri.tls_serialize(writer)?;
        n += self.target_uri.tls_serialize(writer)?;
        n += self.room_id.tls_serialize(writer)?;
        if self.operation == ConsentOperation::Grant {
            n += self.client_key_packages.tls_serialize(writer)?;
        }
        n += self.consent_extensions.tls_serialize(writer)?;
        Ok(n)
    }
}

impl tls_codec::Deserialize for ConsentEntry {
    fn tls_deserialize<R: Read>(bytes: &mut R) -> Result<Self, tls_codec::Error> {
        let op = u8::tls_deserialize(bytes)?;
        let operation = ConsentOperation::from_u8(op).ok_or_else(|| {
            tls_codec::Error::DecodingError(format!("unknown consent operation {op}"))
        })?;
        let requester_uri = IdentifierUri::tls_deserialize(bytes)?;
        let target_uri = IdentifierUri::tls_deserialize(bytes)?;
        let room_id = Option::<IdentifierUri>::tls_deserialize(bytes)?;
        let client_key_packages = if operation == ConsentOperation::Grant {
            Vec::<KeyPackage>::tls_deserialize(bytes)?
        } else {
            Vec::new()
        };
        let consent_extensions = AppDataDictionary::tls_deserialize(bytes)?;
        Ok(Self {
            operation,
            requester_uri,
            target_uri,
            room_id,
            client_key_packages,
            consent_extensions,
        })
    }
}
