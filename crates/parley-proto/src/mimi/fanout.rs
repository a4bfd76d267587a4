//! `notify` (draft §5.5): the hub's fan-out of accepted messages to follower providers.

use super::mls::{MlsKind, MlsMessage};
use super::submit::Frank;
use super::update::RatchetTreeOption;
use super::IdentifierUri;
use std::io::{Read, Write};
use tls_codec::{TlsDeserialize, TlsSerialize, TlsSize};

/// What follows the MLS message in a `FanoutMessage`, by what the message is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FanoutExtra {
    /// A PrivateMessage (application): `optional<Frank> frank`.
    Application { frank: Option<Frank> },
    /// A Welcome: `RatchetTreeOption`.
    Welcome { ratchet_tree: RatchetTreeOption },
    /// A proposal: `MLSMessage moreProposals<V>` (as in the `update` that brought it).
    Proposal { more_proposals: Vec<MlsMessage> },
    /// A commit: `MLSMessage externalProposals<V>` (the hub's proposals stapled to it).
    Commit { external_proposals: Vec<MlsMessage> },
}

/// `FanoutMessage`: the hub's acceptance time, the MLS message, and the select on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FanoutMessage {
    pub timestamp: u64,
    pub message: MlsMessage,
    pub extra: FanoutExtra,
}

impl FanoutMessage {
    pub fn kind(&self) -> MlsKind {
        match self.extra {
            FanoutExtra::Application { .. } => MlsKind::Application,
            FanoutExtra::Welcome { .. } => MlsKind::Welcome,
            FanoutExtra::Proposal { .. } => MlsKind::Proposal,
            FanoutExtra::Commit { .. } => MlsKind::Commit,
        }
    }

    /// A fan-out of `message` with no extras (an application message without frank, a proposal
    /// alone, a commit without stapled proposals). `None` for a Welcome (it needs a tree) or
    /// anything that cannot be fanned out.
    pub fn plain(timestamp: u64, message: MlsMessage) -> Option<Self> {
        let extra = match message.kind() {
            MlsKind::Application => FanoutExtra::Application { frank: None },
            MlsKind::Proposal => FanoutExtra::Proposal {
                more_proposals: Vec::new(),
            },
            MlsKind::Commit => FanoutExtra::Commit {
                external_proposals: Vec::new(),
            },
            _ => return None,
        };
        Some(Self {
            timestamp,
            message,
            extra,
        })
    }
}

impl tls_codec::Size for FanoutMessage {
    fn tls_serialized_len(&self) -> usize {
        8 + self.message.tls_serialized_len()
            + match &self.extra {
                FanoutExtra::Application { frank } => frank.tls_serialized_len(),
                FanoutExtra::Welcome { ratchet_tree } => ratchet_tree.tls_serialized_len(),
                FanoutExtra::Proposal { more_proposals } => more_proposals.tls_serialized_len(),
                FanoutExtra::Commit { external_proposals } => {
                    external_proposals.tls_serialized_len()
                }
            }
    }
}

impl tls_codec::Serialize for FanoutMessage {
    fn tls_serialize<W: Write>(&self, writer: &mut W) -> Result<usize, tls_codec::Error> {
        let mut n = self.timestamp.tls_serialize(writer)?;
        n += self.message.tls_serialize(writer)?;
        n += match &self.extra {
            FanoutExtra::Application { frank } => frank.tls_serialize(writer)?,
            FanoutExtra::Welcome { ratchet_tree } => ratchet_tree.tls_serialize(writer)?,
            FanoutExtra::Proposal { more_proposals } => more_proposals.tls_serialize(writer)?,
            FanoutExtra::Commit { external_proposals } => {
                external_proposals.tls_serialize(writer)?
            }
        };
        Ok(n)
    }
}

impl tls_codec::Deserialize for FanoutMessage {
    fn tls_deserialize<R: Read>(bytes: &mut R) -> Result<Self, tls_codec::Error> {
        let timestamp = u64::tls_deserialize(bytes)?;
        let message = MlsMessage::tls_deserialize(bytes)?;
        let extra = match message.kind() {
            MlsKind::Application => FanoutExtra::Application {
                frank: Option::<Frank>::tls_deserialize(bytes)?,
            },
            MlsKind::Welcome => FanoutExtra::Welcome {
                ratchet_tree: RatchetTreeOption::tls_deserialize(bytes)?,
            },
            MlsKind::Proposal => FanoutExtra::Proposal {
                more_proposals: Vec::<MlsMessage>::tls_deserialize(bytes)?,
            },
            MlsKind::Commit => FanoutExtra::Commit {
                external_proposals: Vec::<MlsMessage>::tls_deserialize(bytes)?,
            },
            other => {
                return Err(tls_codec::Error::DecodingError(format!(
                    "a FanoutMessage carries an application PrivateMessage, a Welcome or a \
                     proposal or commit PublicMessage, not {other:?}"
                )))
            }
        };
        Ok(Self {
            timestamp,
            message,
            extra,
        })
    }
}

/// A `notify/{roomId}` body: one or more `FanoutMessage`s of the room, concatenated, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyRequest {
    pub messages: Vec<FanoutMessage>,
}

impl tls_codec::Size for NotifyRequest {
    fn tls_serialized_len(&self) -> usize {
        self.messages.iter().map(|m| m.tls_serialized_len()).sum()
    }
}

impl tls_codec::Serialize for NotifyRequest {
    fn tls_serialize<W: Write>(&self, writer: &mut W) -> Result<usize, tls_codec::Error> {
        let mut n = 0;
        for m in &self.messages {
            n += m.tls_serialize(writer)?;
        }
        Ok(n)
    }
}

impl tls_codec::Deserialize for NotifyRequest {
    /// Reads to the end of the body: a notify body is a whole HTTP request body.
    fn tls_deserialize<R: Read>(bytes: &mut R) -> Result<Self, tls_codec::Error> {
        let mut all = Vec::new();
        bytes.read_to_end(&mut all)?;
        let mut rest = all.as_slice();
        let mut messages = Vec::new();
        while !rest.is_empty() {
            messages.push(FanoutMessage::tls_deserialize(&mut rest)?);
        }
        if messages.is_empty() {
            return Err(tls_codec::Error::DecodingError(
                "a notify body holds at least one FanoutMessage".into(),
            ));
        }
        Ok(Self { messages })
    }
}

/// Parley extension `x-parley-ephemeral/{roomId}`: an ephemeral MLS application message (a
/// typing indicator) for the room's clients connected right now; nobody stores it. A follower
/// relays its client's message to the hub (`recipients` empty: the hub knows the members); the
/// hub hands it to each other provider with members (`recipients`: that provider's clients).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct EphemeralMessage {
    /// The sending client's URI.
    pub sender: IdentifierUri,
    pub recipients: Vec<IdentifierUri>,
    pub message: MlsMessage,
}
