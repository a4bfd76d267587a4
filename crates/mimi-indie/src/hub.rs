//! The hub's view of the rooms it hubs: an openmls [`PublicGroup`] per room (the group's public
//! state, kept apart from any client), its external-sender identity (`mimi://DOMAIN`), and the
//! checks of profile §4 ("Rules a hub enforces on every commit") and §5.4 on what it accepts.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use openmls::messages::group_info::VerifiableGroupInfo;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use thiserror::Error;

use crate::components::{RoomState, ROLE_ADMIN};
use crate::ids::{ClientUri, RoomUri, UserUri};
use crate::mls::{basic_identity, mls, MlsError, CIPHERSUITE};

/// Why the hub refuses a handshake or application message.
#[derive(Debug, Error)]
pub enum Refusal {
    #[error("wrong epoch (the room is at {current})")]
    WrongEpoch { current: u64 },
    #[error("{code}: {message}")]
    NotAllowed { code: &'static str, message: String },
    /// A commit left out pending proposals (their refs).
    #[error("the commit leaves out pending proposals")]
    InvalidProposal { missing: Vec<Vec<u8>> },
    #[error(transparent)]
    Mls(#[from] MlsError),
}

fn not_allowed(code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal::NotAllowed {
        code,
        message: message.into(),
    }
}

/// A commit the hub verified and may now apply.
pub struct VerifiedCommit {
    staged: StagedCommit,
    /// Clients the commit adds, with their KeyPackageRefs.
    pub added: Vec<(ClientUri, Vec<u8>)>,
    /// The committer.
    pub committer: ClientUri,
}

struct Room {
    public: PublicGroup,
}

/// The hub: its external-sender key and the rooms it hubs.
pub struct Hub {
    provider: OpenMlsRustCrypto,
    signer: SignatureKeyPair,
    credential: Credential,
    rooms: HashMap<RoomUri, Room>,
}

/// Member clients of a group, by leaf.
fn member_clients(public: &PublicGroup) -> BTreeMap<u32, ClientUri> {
    public
        .members()
        .filter_map(|m| {
            let uri = basic_identity(&m.credential)?;
            Some((m.index.u32(), ClientUri::parse(&uri).ok()?))
        })
        .collect()
}

impl Hub {
    /// A hub for `domain`, with a fresh Ed25519 external-sender key.
    pub fn new(domain: &str) -> Result<Self, MlsError> {
        let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm())
            .map_err(mls("hub signature key"))?;
        Ok(Self {
            provider: OpenMlsRustCrypto::default(),
            signer,
            credential: BasicCredential::new(format!("mimi://{domain}").into_bytes()).into(),
            rooms: HashMap::new(),
        })
    }

    /// The hub's `ExternalSender` entry (profile §4: its key, BasicCredential `mimi://HUB`).
    pub fn external_sender(&self) -> ExternalSender {
        ExternalSender::new(self.signer.public().into(), self.credential.clone())
    }

    /// Starts following a room created by one of the provider's clients.
    pub fn add_room(
        &mut self,
        room: RoomUri,
        group_info: VerifiableGroupInfo,
        tree: RatchetTreeIn,
    ) -> Result<(), MlsError> {
        let (public, _) = PublicGroup::from_external(
            self.provider.crypto(),
            self.provider.storage(),
            tree,
            group_info,
            ProposalStore::new(),
        )
        .map_err(mls("follow the new group"))?;
        self.rooms.insert(room, Room { public });
        Ok(())
    }

    /// Whether this hub hubs `room`.
    pub fn hubs(&self, room: &RoomUri) -> bool {
        self.rooms.contains_key(room)
    }

    fn room(&self, room: &RoomUri) -> Result<&Room, Refusal> {
        self.rooms
            .get(room)
            .ok_or_else(|| not_allowed("unknown_room", format!("{room} is not hubbed here")))
    }

    /// The room's member clients.
    pub fn members(&self, room: &RoomUri) -> Vec<ClientUri> {
        self.rooms
            .get(room)
            .map(|r| member_clients(&r.public).into_values().collect())
            .unwrap_or_default()
    }

    /// Whether `client` is a member of the room with signature key `key`.
    pub fn is_member_with_key(&self, room: &RoomUri, client: &ClientUri, key: &[u8]) -> bool {
        let Some(entry) = self.rooms.get(room) else {
            return false;
        };
        let client = client.to_string();
        entry.public.members().any(|m| {
            m.signature_key == key && basic_identity(&m.credential).as_deref() == Some(&client)
        })
    }

    /// The room state in the room's GroupContext.
    pub fn room_state(&self, room: &RoomUri) -> Result<RoomState, Refusal> {
        let public = &self.room(room)?.public;
        RoomState::from_extensions(public.group_context().extensions())
            .map_err(|e| not_allowed("invalid_room_state", e.to_string()))
    }

    /// The ratchet tree of the room's current epoch (sent with Welcomes as `full`).
    pub fn ratchet_tree(&self, room: &RoomUri) -> Option<RatchetTreeIn> {
        self.rooms
            .get(room)
            .map(|r| r.public.export_ratchet_tree().into())
    }

    /// Verifies a commit against the room's public state and the profile's room policy.
    /// `peer` is the calling provider's domain (the committer must be one of its clients).
    pub fn verify_commit(
        &self,
        room: &RoomUri,
        message: MlsMessageIn,
        peer: &str,
    ) -> Result<VerifiedCommit, Refusal> {
        let public = &self.room(room)?.public;
        let current = public.group_context().epoch().as_u64();
        let message = message
            .try_into_protocol_message()
            .map_err(|e| not_allowed("invalid_commit", format!("{e:?}")))?;
        if message.group_id().as_slice() != public.group_id().as_slice() {
            return Err(not_allowed("invalid_commit", "commit of another group"));
        }
        if message.epoch().as_u64() != current {
            return Err(Refusal::WrongEpoch { current });
        }
        let processed = public
            .process_message(self.provider.crypto(), message)
            .map_err(|e| not_allowed("invalid_commit", format!("{e:?}")))?;
        if !matches!(processed.sender(), Sender::Member(_)) {
            return Err(not_allowed(
                "external_commit",
                "only members' commits are accepted",
            ));
        }
        let committer = basic_identity(processed.credential())
            .and_then(|uri| ClientUri::parse(&uri).ok())
            .ok_or_else(|| not_allowed("invalid_credential", "committer is not a client URI"))?;
        if committer.user().domain() != peer {
            return Err(not_allowed(
                "not_your_client",
                format!("{committer} is not a client of {peer}"),
            ));
        }
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            return Err(not_allowed("not_a_commit", "expected a commit"));
        };
        let covered: BTreeSet<Vec<u8>> = staged
            .queued_proposals()
            .map(|p| p.proposal_reference_ref().as_slice().to_vec())
            .collect();
        let missing: Vec<Vec<u8>> = self
            .pending(public)?
            .into_iter()
            .map(|(reference, _)| reference)
            .filter(|reference| !covered.contains(reference))
            .collect();
        if !missing.is_empty() {
            return Err(Refusal::InvalidProposal { missing });
        }
        let added = self.check_policy(public, &staged, &committer)?;
        Ok(VerifiedCommit {
            staged: *staged,
            added,
            committer,
        })
    }

    /// Profile §4's rules on the state after a commit.
    fn check_policy(
        &self,
        public: &PublicGroup,
        staged: &StagedCommit,
        committer: &ClientUri,
    ) -> Result<Vec<(ClientUri, Vec<u8>)>, Refusal> {
        let before = RoomState::from_extensions(public.group_context().extensions())
            .map_err(|e| not_allowed("invalid_room_state", e.to_string()))?;
        let after = RoomState::from_extensions(staged.group_context().extensions())
            .map_err(|e| not_allowed("invalid_room_state", e.to_string()))?;
        if !staged
            .group_context()
            .extensions()
            .external_senders()
            .is_some_and(|s| s.contains(&self.external_sender()))
        {
            return Err(not_allowed(
                "external_senders",
                "the hub must stay an external sender",
            ));
        }
        let mut clients = member_clients(public);
        for removed in staged.remove_proposals() {
            clients.remove(&removed.remove_proposal().removed().u32());
        }
        let mut added = Vec::new();
        for add in staged.add_proposals() {
            let key_package = add.add_proposal().key_package();
            let client = basic_identity(key_package.leaf_node().credential())
                .and_then(|uri| ClientUri::parse(&uri).ok())
                .ok_or_else(|| not_allowed("invalid_credential", "added client URI"))?;
            let reference = key_package
                .hash_ref(self.provider.crypto())
                .map_err(mls("KeyPackageRef"))?;
            added.push((client, reference.as_slice().to_vec()));
        }
        let users: BTreeSet<String> = clients
            .values()
            .chain(added.iter().map(|(c, _)| c))
            .map(|c| c.user().to_string())
            .collect();
        let listed: BTreeSet<String> = after.participants.users().map(str::to_owned).collect();
        if users != listed {
            return Err(not_allowed(
                "participant_list",
                "the participants must be exactly the users with clients",
            ));
        }
        if before.participants != after.participants {
            self.check_participant_change(public, staged, committer, &before, &after)?;
        }
        Ok(added)
    }

    /// Profile §4: a direct room's participants never change; adding users, changing roles or
    /// removing other users takes an administrator, except removing users whose clients all
    /// asked to leave; a group room keeps an administrator.
    fn check_participant_change(
        &self,
        public: &PublicGroup,
        staged: &StagedCommit,
        committer: &ClientUri,
        before: &RoomState,
        after: &RoomState,
    ) -> Result<(), Refusal> {
        if after.policy.fixed_membership == crate::components::Bool::True {
            return Err(not_allowed(
                "fixed_membership",
                "a direct room's participants never change",
            ));
        }
        let roles = |state: &RoomState| -> BTreeMap<Vec<u8>, u32> {
            state
                .participants
                .participants
                .iter()
                .map(|p| (p.user.as_slice().to_vec(), p.role_index))
                .collect()
        };
        let (old, new) = (roles(before), roles(after));
        let added_or_changed = new.iter().any(|(user, role)| old.get(user) != Some(role));
        let left: BTreeSet<u32> = staged
            .remove_proposals()
            .filter(|r| {
                matches!(r.sender(), Sender::Member(leaf) if *leaf == r.remove_proposal().removed())
            })
            .map(|r| r.remove_proposal().removed().u32())
            .collect();
        let clients = member_clients(public);
        let committer_user = committer.user().to_string();
        let removes_others = old.keys().filter(|u| !new.contains_key(*u)).any(|user| {
            let all_left = clients
                .iter()
                .filter(|(_, c)| c.user().to_string().as_bytes() == user.as_slice())
                .all(|(leaf, _)| left.contains(leaf));
            user.as_slice() != committer_user.as_bytes() && !all_left
        });
        if (added_or_changed || removes_others)
            && before.participants.role_of(&committer_user) != Some(ROLE_ADMIN)
        {
            return Err(not_allowed(
                "not_admin",
                "adding users, changing roles or removing others takes an administrator",
            ));
        }
        if !new.is_empty() && !new.values().any(|role| *role == ROLE_ADMIN) {
            return Err(not_allowed(
                "last_admin",
                "a group room keeps an administrator",
            ));
        }
        Ok(())
    }

    fn pending(&self, public: &PublicGroup) -> Result<Vec<(Vec<u8>, QueuedProposal)>, Refusal> {
        Ok(public
            .queued_proposals(self.provider.storage())
            .map_err(mls("pending proposals"))?
            .into_iter()
            .map(|(reference, proposal)| (reference.as_slice().to_vec(), proposal))
            .collect())
    }

    /// Clients that pending Remove proposals take out of the room.
    pub fn pending_removals(&self, room: &RoomUri) -> Vec<ClientUri> {
        let Some(entry) = self.rooms.get(room) else {
            return Vec::new();
        };
        let clients = member_clients(&entry.public);
        self.pending(&entry.public)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(_, p)| match p.proposal() {
                Proposal::Remove(remove) => clients.get(&remove.removed().u32()).cloned(),
                _ => None,
            })
            .collect()
    }

    /// Verifies a proposal (profile §5.3: only a member's Remove of its own leaf) and keeps it
    /// in the room's proposal store. Returns the proposer.
    pub fn accept_proposal(
        &mut self,
        room: &RoomUri,
        message: MlsMessageIn,
        peer: &str,
    ) -> Result<ClientUri, Refusal> {
        let storage = self.provider.storage();
        let crypto = self.provider.crypto();
        let entry = self
            .rooms
            .get_mut(room)
            .ok_or_else(|| not_allowed("unknown_room", room.to_string()))?;
        let current = entry.public.group_context().epoch().as_u64();
        let message = message
            .try_into_protocol_message()
            .map_err(|e| not_allowed("invalid_proposal", format!("{e:?}")))?;
        if message.epoch().as_u64() != current {
            return Err(Refusal::WrongEpoch { current });
        }
        let processed = entry
            .public
            .process_message(crypto, message)
            .map_err(|e| not_allowed("invalid_proposal", format!("{e:?}")))?;
        let proposer = basic_identity(processed.credential())
            .and_then(|uri| ClientUri::parse(&uri).ok())
            .ok_or_else(|| not_allowed("invalid_credential", "proposer is not a client URI"))?;
        if proposer.user().domain() != peer {
            return Err(not_allowed("not_your_client", proposer.to_string()));
        }
        let ProcessedMessageContent::ProposalMessage(queued) = processed.into_content() else {
            return Err(not_allowed("not_a_proposal", "expected a proposal"));
        };
        let leaves = match (queued.proposal(), queued.sender()) {
            (Proposal::Remove(remove), Sender::Member(leaf)) => remove.removed() == *leaf,
            _ => false,
        };
        if !leaves {
            return Err(not_allowed(
                "unsupported_proposal",
                "only a member's Remove of its own leaf (leaving) is accepted",
            ));
        }
        entry
            .public
            .add_proposal(storage, *queued)
            .map_err(mls("store proposal"))?;
        Ok(proposer)
    }

    /// Applies a verified commit to the room's public state.
    pub fn apply(&mut self, room: &RoomUri, commit: VerifiedCommit) -> Result<(), Refusal> {
        let storage = self.provider.storage();
        let entry = self
            .rooms
            .get_mut(room)
            .ok_or_else(|| not_allowed("unknown_room", room.to_string()))?;
        entry
            .public
            .merge_commit(storage, commit.staged)
            .map_err(mls("merge commit"))?;
        Ok(())
    }

    /// §5.4's checks of a submitted application message: a PrivateMessage of the room's group at
    /// the current epoch, from a participant user of the calling peer.
    pub fn check_application(
        &self,
        room: &RoomUri,
        message: &MlsMessageIn,
        sender: &UserUri,
        peer: &str,
    ) -> Result<(), Refusal> {
        let public = &self.room(room)?.public;
        if sender.domain() != peer {
            return Err(not_allowed(
                "not_your_user",
                format!("{sender} is not a user of {peer}"),
            ));
        }
        let state = self.room_state(room)?;
        if state.participants.role_of(&sender.to_string()).is_none() {
            return Err(not_allowed("not_participant", sender.to_string()));
        }
        let MlsMessageBodyIn::PrivateMessage(private) = message.clone().extract() else {
            return Err(not_allowed("invalid_message", "not a PrivateMessage"));
        };
        if private.content_type() != ContentType::Application {
            return Err(not_allowed("invalid_message", "not an application message"));
        }
        if private.group_id().as_slice() != public.group_id().as_slice() {
            return Err(not_allowed("invalid_message", "message of another group"));
        }
        // Profile §5.4: `epochTooOld` also for a newer epoch (the draft says `notAllowed`).
        let current = public.group_context().epoch().as_u64();
        if private.epoch().as_u64() != current {
            return Err(Refusal::WrongEpoch { current });
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "hub_tests.rs"]
mod tests;
