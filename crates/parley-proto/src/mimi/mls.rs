//! MLS objects inside MIMI bodies: the exact bytes, framed and checked by openmls's decoders.

use openmls::messages::group_info::VerifiableGroupInfo;
use openmls::prelude::{
    ContentType, MlsMessageBodyIn, MlsMessageIn, ProtocolMessage, RatchetTreeIn,
    RequiredCapabilitiesExtension,
};
use std::io::{Read, Write};
use std::marker::PhantomData;
use tls_codec::{TlsDeserialize, TlsSerialize, TlsSize, VLBytes};

use super::WireError;

/// An MLS structure `T` as it travels: its RFC 9420 bytes, which decoded as `T` when they were
/// received (or were encoded from a `T`). Encoding writes the bytes unchanged.
pub struct Mls<T> {
    bytes: Vec<u8>,
    kind: PhantomData<fn() -> T>,
}

impl<T> Clone for Mls<T> {
    fn clone(&self) -> Self {
        Self {
            bytes: self.bytes.clone(),
            kind: PhantomData,
        }
    }
}

impl<T> PartialEq for Mls<T> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl<T> Eq for Mls<T> {}

impl<T> std::fmt::Debug for Mls<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Mls<{}>({} bytes)",
            std::any::type_name::<T>(),
            self.bytes.len()
        )
    }
}

impl<T> Mls<T> {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

impl<T: tls_codec::Deserialize> Mls<T> {
    /// Checks that `bytes` are exactly one `T`.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, WireError> {
        let mut rest = bytes.as_slice();
        T::tls_deserialize(&mut rest)?;
        if !rest.is_empty() {
            return Err(WireError::Trailing(rest.len()));
        }
        Ok(Self {
            bytes,
            kind: PhantomData,
        })
    }

    /// Decodes the bytes again as `T` (they decoded before, so this only fails on a bug).
    pub fn parse(&self) -> Result<T, WireError> {
        Ok(T::tls_deserialize(&mut self.bytes.as_slice())?)
    }
}

impl<T: tls_codec::Serialize> Mls<T> {
    /// Encodes a value.
    pub fn encode(value: &T) -> Result<Self, WireError> {
        Ok(Self {
            bytes: value.tls_serialize_detached()?,
            kind: PhantomData,
        })
    }
}

impl<T> tls_codec::Size for Mls<T> {
    fn tls_serialized_len(&self) -> usize {
        self.bytes.len()
    }
}

impl<T> tls_codec::Serialize for Mls<T> {
    fn tls_serialize<W: Write>(&self, writer: &mut W) -> Result<usize, tls_codec::Error> {
        writer.write_all(&self.bytes)?;
        Ok(self.bytes.len())
    }
}

/// A reader that keeps a copy of everything read through it.
struct Tee<'a, R> {
    inner: &'a mut R,
    seen: Vec<u8>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl<T: tls_codec::Deserialize> tls_codec::Deserialize for Mls<T> {
    fn tls_deserialize<R: Read>(bytes: &mut R) -> Result<Self, tls_codec::Error> {
        let mut tee = Tee {
            inner: bytes,
            seen: Vec::new(),
        };
        T::tls_deserialize(&mut tee)?;
        Ok(Self {
            bytes: tee.seen,
            kind: PhantomData,
        })
    }
}

/// `MLSMessage` (RFC 9420 §6).
pub type MlsMessage = Mls<MlsMessageIn>;
/// A bare `KeyPackage` (not wrapped in an MLSMessage).
pub type KeyPackage = Mls<openmls::prelude::KeyPackageIn>;
/// A bare `Welcome`.
pub type Welcome = Mls<openmls::prelude::Welcome>;
/// A bare `GroupInfo`.
pub type GroupInfo = Mls<VerifiableGroupInfo>;
/// The `ratchet_tree` extension's data, `optional<Node> ratchet_tree<V>`.
pub type RatchetTree = Mls<RatchetTreeIn>;
/// `Credential` (RFC 9420 §5.3).
pub type Credential = Mls<openmls::prelude::Credential>;
/// `Capabilities` of a leaf node.
pub type Capabilities = Mls<openmls::prelude::Capabilities>;
/// `RequiredCapabilities` (the extension's content).
pub type RequiredCapabilities = Mls<RequiredCapabilitiesExtension>;

/// What an MLSMessage carries, as far as MIMI's `select`s care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlsKind {
    /// A PrivateMessage with application content.
    Application,
    /// A PublicMessage carrying a proposal.
    Proposal,
    /// A PublicMessage carrying a commit.
    Commit,
    Welcome,
    GroupInfo,
    KeyPackage,
    /// Anything else (a PrivateMessage handshake, a PublicMessage application message).
    Other,
}

impl MlsMessage {
    /// Classifies the message by wire format and, for framed messages, content type.
    pub fn kind(&self) -> MlsKind {
        let Ok(msg) = self.parse() else {
            return MlsKind::Other;
        };
        match msg.extract() {
            MlsMessageBodyIn::PublicMessage(pm) => match ProtocolMessage::from(pm).content_type() {
                ContentType::Proposal => MlsKind::Proposal,
                ContentType::Commit => MlsKind::Commit,
                ContentType::Application => MlsKind::Other,
            },
            MlsMessageBodyIn::PrivateMessage(pm) => match pm.content_type() {
                ContentType::Application => MlsKind::Application,
                _ => MlsKind::Other,
            },
            MlsMessageBodyIn::Welcome(_) => MlsKind::Welcome,
            MlsMessageBodyIn::GroupInfo(_) => MlsKind::GroupInfo,
            MlsMessageBodyIn::KeyPackage(_) => MlsKind::KeyPackage,
        }
    }

    /// The MLSMessage that wraps a bare Welcome (`version = mls10`, `wire_format = mls_welcome`).
    pub fn from_welcome(welcome: &Welcome) -> Result<Self, WireError> {
        let mut bytes = vec![0, 1, 0, 3];
        bytes.extend_from_slice(welcome.bytes());
        Self::from_bytes(bytes)
    }

    /// The bare Welcome inside an MLSMessage, if it is one.
    pub fn to_welcome(&self) -> Option<Welcome> {
        if self.kind() != MlsKind::Welcome {
            return None;
        }
        Welcome::from_bytes(self.bytes.get(4..)?.to_vec()).ok()
    }
}

/// `ExternalSender` (RFC 9420 §12.1.8.1): a signature key and credential allowed to send
/// proposals to a group from outside; a MIMI hub's is in every room's `external_senders`.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct ExternalSender {
    pub signature_key: VLBytes,
    pub credential: Credential,
}
