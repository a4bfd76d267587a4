//! `groupInfo` (draft §5.6): a room's GroupInfo and tree, for a client joining by external commit.

use super::mls::{Credential, ExternalSender, GroupInfo, MlsMessage};
use super::update::RatchetTreeOption;
use super::{check_protocol, signing, WireError, MLS10};
use tls_codec::{Serialize as _, TlsDeserialize, TlsSerialize, TlsSize, VLBytes};

/// `GroupInfoRequestTBS`: the request without its signature (`joiningCode` empty when none;
/// docs/mimi-profile.md §3).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct GroupInfoRequestTbs {
    pub protocol: u8,
    pub cipher_suite: u16,
    pub requesting_signature_key: VLBytes,
    pub requesting_credential: Credential,
    pub group_info_public_key: VLBytes,
    pub joining_code: VLBytes,
}

/// `GroupInfoRequest` (mls10), signed with SignWithLabel(requestingSignatureKey,
/// "GroupInfoRequestTBS", GroupInfoRequestTBS).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct GroupInfoRequest {
    pub protocol: u8,
    pub cipher_suite: u16,
    pub requesting_signature_key: VLBytes,
    pub requesting_credential: Credential,
    pub group_info_public_key: VLBytes,
    pub joining_code: VLBytes,
    pub signature: VLBytes,
}

impl GroupInfoRequestTbs {
    pub fn sign_content(&self) -> Result<Vec<u8>, WireError> {
        Ok(signing::sign_content(
            signing::GROUP_INFO_REQUEST_TBS,
            &self.tls_serialize_detached()?,
        ))
    }

    pub fn signed(self, signature: Vec<u8>) -> GroupInfoRequest {
        GroupInfoRequest {
            protocol: self.protocol,
            cipher_suite: self.cipher_suite,
            requesting_signature_key: self.requesting_signature_key,
            requesting_credential: self.requesting_credential,
            group_info_public_key: self.group_info_public_key,
            joining_code: self.joining_code,
            signature: signature.into(),
        }
    }
}

impl GroupInfoRequest {
    pub fn check(&self) -> Result<(), WireError> {
        check_protocol(self.protocol)
    }

    pub fn tbs(&self) -> GroupInfoRequestTbs {
        GroupInfoRequestTbs {
            protocol: self.protocol,
            cipher_suite: self.cipher_suite,
            requesting_signature_key: self.requesting_signature_key.clone(),
            requesting_credential: self.requesting_credential.clone(),
            group_info_public_key: self.group_info_public_key.clone(),
            joining_code: self.joining_code.clone(),
        }
    }
}

/// `HPKECiphertext` (RFC 9420 §5.1.3).
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct HpkeCiphertext {
    pub kem_output: VLBytes,
    pub ciphertext: VLBytes,
}

/// `PendingProposal`: a proposal the hub accepted in the current epoch.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct PendingProposal {
    pub proposal: MlsMessage,
    pub hub_accepted_time: u64,
}

/// `GroupInfoRatchetTreeTBE`: what the hub encrypts to the requester.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct GroupInfoRatchetTreeTbe {
    pub group_info: GroupInfo,
    pub ratchet_tree: RatchetTreeOption,
    pub pending_proposals: Vec<PendingProposal>,
}

/// `GroupInfoCode` with the response's select on it.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
#[repr(u8)]
pub enum GroupInfoResult {
    #[tls_codec(discriminant = 1)]
    Success {
        cipher_suite: u16,
        hub_sender: ExternalSender,
        encrypted_groupinfo_and_tree: HpkeCiphertext,
        signature: VLBytes,
    },
    #[tls_codec(discriminant = 2)]
    NotAuthorized,
    #[tls_codec(discriminant = 3)]
    NoSuchRoom,
}

/// `GroupInfoResponse`.
#[derive(Debug, Clone, PartialEq, Eq, TlsSerialize, TlsDeserialize, TlsSize)]
pub struct GroupInfoResponse {
    pub version: u8,
    pub room_id: VLBytes,
    pub result: GroupInfoResult,
}

#[derive(TlsSerialize, TlsSize)]
struct GroupInfoResponseTbs<'a> {
    version: u8,
    room_id: &'a VLBytes,
    status: u8,
    cipher_suite: u16,
    hub_sender: &'a ExternalSender,
    encrypted_groupinfo_and_tree: &'a HpkeCiphertext,
}

/// The bytes the hub signs for a successful answer: `SignContent` of `GroupInfoResponseTBS`.
pub fn response_sign_content(
    room_id: &[u8],
    cipher_suite: u16,
    hub_sender: &ExternalSender,
    encrypted: &HpkeCiphertext,
) -> Result<Vec<u8>, WireError> {
    let room_id: VLBytes = room_id.to_vec().into();
    let tbs = GroupInfoResponseTbs {
        version: MLS10,
        room_id: &room_id,
        status: 1,
        cipher_suite,
        hub_sender,
        encrypted_groupinfo_and_tree: encrypted,
    };
    Ok(signing::sign_content(
        signing::GROUP_INFO_RESPONSE_TBS,
        &tbs.tls_serialize_detached()?,
    ))
}

impl GroupInfoResponse {
    pub fn refused(room_id: &[u8], result: GroupInfoResult) -> Self {
        Self {
            version: MLS10,
            room_id: room_id.to_vec().into(),
            result,
        }
    }

    /// The bytes the signature of a successful answer covers.
    pub fn sign_content(&self) -> Result<Option<Vec<u8>>, WireError> {
        match &self.result {
            GroupInfoResult::Success {
                cipher_suite,
                hub_sender,
                encrypted_groupinfo_and_tree,
                ..
            } => response_sign_content(
                self.room_id.as_slice(),
                *cipher_suite,
                hub_sender,
                encrypted_groupinfo_and_tree,
            )
            .map(Some),
            _ => Ok(None),
        }
    }
}
