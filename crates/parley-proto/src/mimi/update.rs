//! `update` (draft §5.3): commits and proposals to a room's hub.

use super::mls::{GroupInfo, MlsKind, MlsMessage, RatchetTree, Welcome};
use std::io::{Read, Write};
use tls_codec::{TlsDeserialize, TlsSerialize, TlsSize, VLBytes};

/// `RatchetTreeOption` (draft-mahy-mls-ratchet-tree-options §3).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum RatchetTreeOption {
    #[tls_codec(discriminant = 1)]
    Full { ratchet_tree: RatchetTree },
    #[tls_codec(discriminant = 2)]
    HttpsUri {
        ratchet_tree_url: VLBytes,
        tree_signature: VLBytes,
    },
    #[tls_codec(discriminant = 3)]
    OutOfBand { tree_signature: VLBytes },
    #[tls_codec(discriminant = 4)]
    DistributionService,
}

/// `PartialGroupInfo` (draft-mahy-mls-ratchet-tree-options §4). Parley decodes it and refuses it.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct PartialGroupInfo {
    pub ratchet_tree_presence: u8,
    pub group_info_extensions: Vec<super::mls::Mls<openmls::prelude::Extension>>,
    pub signature: VLBytes,
}

/// `GroupInfoOption`.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum GroupInfoOption {
    #[tls_codec(discriminant = 1)]
    Full { group_info: GroupInfo },
    #[tls_codec(discriminant = 2)]
    Partial {
        partial_group_info: PartialGroupInfo,
    },
}

/// `HandshakeBundle`: the draft selects on the MLS message's content type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeBundle {
    /// A commit (PublicMessage), the Welcome for added clients, the new GroupInfo and tree.
    Commit {
        commit: MlsMessage,
        welcome: Option<Welcome>,
        group_info: GroupInfoOption,
        ratchet_tree: RatchetTreeOption,
    },
    /// A proposal (PublicMessage) and more proposals.
    Proposal {
        proposal: MlsMessage,
        more_proposals: Vec<MlsMessage>,
    },
}

/// `UpdateRequest`: `select (room.protocol) { case mls10: HandshakeBundle bundle; }` — the
/// protocol is the room's and not on the wire, so the body is the bundle.
pub type UpdateRequest = HandshakeBundle;

impl HandshakeBundle {
    fn message(&self) -> &MlsMessage {
        match self {
            HandshakeBundle::Commit { commit, .. } => commit,
            HandshakeBundle::Proposal { proposal, .. } => proposal,
        }
    }
}

impl tls_codec::Size for HandshakeBundle {
    fn tls_serialized_len(&self) -> usize {
        self.message().tls_serialized_len()
            + match self {
                HandshakeBundle::Commit {
                    welcome,
                    group_info,
                    ratchet_tree,
                    ..
                } => {
                    welcome.tls_serialized_len()
                        + group_info.tls_serialized_len()
                        + ratchet_tree.tls_serialized_len()
                }
                HandshakeBundle::Proposal { more_proposals, .. } => {
                    more_proposals.tls_serialized_len()
                }
            }
    }
}

impl tls_codec::Serialize for HandshakeBundle {
    fn tls_serialize<W: Write>(&self, writer: &mut W) -> Result<usize, tls_codec::Error> {
        let mut n = self.message().tls_serialize(writer)?;
        n += match self {
            HandshakeBundle::Commit {
                welcome,
                group_info,
                ratchet_tree,
                ..
            } => {
                welcome.tls_serialize(writer)?
                    + group_info.tls_serialize(writer)?
                    + ratchet_tree.tls_serialize(writer)?
            }
            HandshakeBundle::Proposal { more_proposals, .. } => {
                more_proposals.tls_serialize(writer)?
            }
        };
        Ok(n)
    }
}

impl tls_codec::Deserialize for HandshakeBundle {
    fn tls_deserialize<R: Read>(bytes: &mut R) -> Result<Self, tls_codec::Error> {
        let message = MlsMessage::tls_deserialize(bytes)?;
        match message.kind() {
            MlsKind::Commit => Ok(HandshakeBundle::Commit {
                commit: message,
                welcome: Option::<Welcome>::tls_deserialize(bytes)?,
                group_info: GroupInfoOption::tls_deserialize(bytes)?,
                ratchet_tree: RatchetTreeOption::tls_deserialize(bytes)?,
            }),
            MlsKind::Proposal => Ok(HandshakeBundle::Proposal {
                proposal: message,
                more_proposals: Vec::<MlsMessage>::tls_deserialize(bytes)?,
            }),
            other => Err(tls_codec::Error::DecodingError(format!(
                "a handshake bundle starts with a commit or proposal PublicMessage, not {other:?}"
            ))),
        }
    }
}

/// `UpdateRoomResponse`: `responseCode`, `errorDescription` (UTF-8), and the code's select.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum UpdateRoomResponse {
    #[tls_codec(discriminant = 0)]
    Success {
        error_description: VLBytes,
        accepted_timestamp: u64,
    },
    #[tls_codec(discriminant = 1)]
    WrongEpoch {
        error_description: VLBytes,
        current_epoch: u64,
    },
    #[tls_codec(discriminant = 2)]
    NotAllowed { error_description: VLBytes },
    #[tls_codec(discriminant = 3)]
    InvalidProposal {
        error_description: VLBytes,
        invalid_proposals: Vec<VLBytes>,
    },
}

impl UpdateRoomResponse {
    pub fn description(&self) -> String {
        let d = match self {
            UpdateRoomResponse::Success {
                error_description, ..
            }
            | UpdateRoomResponse::WrongEpoch {
                error_description, ..
            }
            | UpdateRoomResponse::NotAllowed { error_description }
            | UpdateRoomResponse::InvalidProposal {
                error_description, ..
            } => error_description,
        };
        super::text(d)
    }
}
