//! What the provider does beyond its own state: the hub's acceptance of commits, proposals and
//! messages with their fan-out plan ([`Inner::hub_commit`], [`Inner::hub_proposal`],
//! [`Inner::hub_message`], shared by local callers and the `update`/`submitMessage` handlers),
//! sending the planned `notify`s, and claiming KeyPackages with signed `keyMaterial` requests.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use openmls::prelude::{
    Extension, Extensions, GroupContext, KeyPackage, MlsMessageIn, MlsMessageOut, ProtocolVersion,
    Welcome,
};
use openmls_rust_crypto::RustCrypto;
use tracing::warn;

use crate::components::{app_data_extension_type, RoomState, ROLE_ADMIN};
use crate::hub::Refusal;
use crate::ids::{path_form, ClientUri, RoomUri, UserUri};
use crate::mls::{basic_identity, mls, required_capabilities, CIPHERSUITE};
use crate::peer::Peers;
use crate::provider::{IndieError, SentNotify};
use crate::state::State;
use crate::wire::{
    decode, encode, ClientKeyMaterial, FanoutExtra, FanoutMessage, IdentifierUri,
    KeyMaterialRequest, KeyMaterialRequestTbs, KeyMaterialResponse, KeyMaterialUserCode, Protocol,
    RatchetTreeOption,
};

/// Fan-out to one other provider: FanoutMessages of one room, in order.
pub(crate) struct Outbound {
    domain: String,
    room: RoomUri,
    messages: Vec<FanoutMessage>,
}

/// Shared by the handle and the request handlers.
pub(crate) struct Inner {
    pub domain: String,
    pub(crate) state: Mutex<State>,
    pub peers: Peers,
    /// Serialises hub events with their fan-out, so each room's order holds.
    pub hub_lock: tokio::sync::Mutex<()>,
    pub(crate) sent: Mutex<Vec<SentNotify>>,
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Adds one FanoutMessage to the plan for `domain`.
fn plan(outbound: &mut Vec<Outbound>, domain: &str, room: &RoomUri, message: FanoutMessage) {
    match outbound.iter_mut().find(|o| o.domain == domain) {
        Some(o) => o.messages.push(message),
        None => outbound.push(Outbound {
            domain: domain.to_owned(),
            room: room.clone(),
            messages: vec![message],
        }),
    }
}

impl Inner {
    pub(crate) fn state(&self) -> Result<MutexGuard<'_, State>, IndieError> {
        self.state.lock().map_err(|_| IndieError::Poisoned)
    }

    /// Verifies and applies a commit as hub, delivers it locally and plans its fan-out: the
    /// commit to every provider with a member other than the committer, the Welcome (with the
    /// hub's `full` ratchet tree) to the providers of the added clients.
    pub(crate) fn hub_commit(
        &self,
        st: &mut State,
        room: &RoomUri,
        commit: MlsMessageIn,
        welcome: Option<Welcome>,
        peer: &str,
        local_committer: Option<&str>,
    ) -> Result<(u64, Vec<Outbound>), Refusal> {
        let members_before = st.hub.members(room);
        let verified = st.hub.verify_commit(room, commit.clone(), peer)?;
        if !verified.added.is_empty() && welcome.is_none() {
            return Err(Refusal::NotAllowed {
                code: "missing_welcome",
                message: "a commit adding clients needs its Welcome".into(),
            });
        }
        let committer = verified.committer.clone();
        let added_domains: BTreeSet<String> = verified
            .added
            .iter()
            .map(|(c, _)| c.user().domain().to_owned())
            .collect();
        st.hub.apply(room, verified)?;
        let timestamp = now_ms();
        if let Some(handle) = local_committer {
            let merged = st.users.get_mut(handle).and_then(|u| {
                let group_id = u.rooms.get(room)?.clone();
                Some(u.client.merge_pending(&group_id))
            });
            if let Some(Err(e)) = merged {
                warn!(%room, error = %e, "committer could not merge its accepted commit");
            }
        }
        let mut outbound = Vec::new();
        let commit_fanout = FanoutMessage {
            timestamp,
            message: commit,
            extra: FanoutExtra::Commit {
                external_proposals: Vec::new(),
            },
        };
        let commit_domains: BTreeSet<String> = members_before
            .iter()
            .filter(|c| **c != committer)
            .map(|c| c.user().domain().to_owned())
            .collect();
        for domain in &commit_domains {
            if *domain == self.domain {
                st.deliver(room, commit_fanout.clone(), local_committer);
            } else {
                plan(&mut outbound, domain, room, commit_fanout.clone());
            }
        }
        if let (Some(welcome), Some(tree)) = (welcome, st.hub.ratchet_tree(room)) {
            let welcome_fanout = FanoutMessage {
                timestamp,
                message: MlsMessageOut::from_welcome(welcome, ProtocolVersion::Mls10).into(),
                extra: FanoutExtra::Welcome {
                    ratchet_tree: RatchetTreeOption::Full(tree),
                },
            };
            for domain in &added_domains {
                if *domain == self.domain {
                    st.deliver(room, welcome_fanout.clone(), None);
                } else {
                    plan(&mut outbound, domain, room, welcome_fanout.clone());
                }
            }
        }
        Ok((timestamp, outbound))
    }

    /// Accepts an application message as hub (§5.4), delivers it locally and plans its
    /// fan-out to every provider with a member client that may not be the sender's.
    pub(crate) fn hub_message(
        &self,
        st: &mut State,
        room: &RoomUri,
        message: MlsMessageIn,
        sender: &UserUri,
        peer: &str,
        local_sender: Option<&str>,
    ) -> Result<(u64, Vec<Outbound>), Refusal> {
        st.hub.check_application(room, &message, sender, peer)?;
        let timestamp = now_ms();
        let fanout = FanoutMessage {
            timestamp,
            message,
            extra: FanoutExtra::Application { frank: None },
        };
        let members = st.hub.members(room);
        let sender_clients = members.iter().filter(|c| c.user() == sender).count();
        let domains: BTreeSet<String> = members
            .iter()
            .filter(|c| c.user() != sender || sender_clients > 1)
            .map(|c| c.user().domain().to_owned())
            .collect();
        let mut outbound = Vec::new();
        for domain in &domains {
            if *domain == self.domain {
                st.deliver(room, fanout.clone(), local_sender);
            } else {
                plan(&mut outbound, domain, room, fanout.clone());
            }
        }
        Ok((timestamp, outbound))
    }

    /// Accepts a member's leave proposal as hub, delivers it locally and plans its fan-out to
    /// every provider with another member; then a local member commits it (if there is one).
    pub(crate) fn hub_proposal(
        &self,
        st: &mut State,
        room: &RoomUri,
        proposal: MlsMessageIn,
        peer: &str,
    ) -> Result<(u64, Vec<Outbound>), Refusal> {
        let proposer = st.hub.accept_proposal(room, proposal.clone(), peer)?;
        let timestamp = now_ms();
        let fanout = FanoutMessage {
            timestamp,
            message: proposal,
            extra: FanoutExtra::Proposal {
                more_proposals: Vec::new(),
            },
        };
        let domains: BTreeSet<String> = st
            .hub
            .members(room)
            .iter()
            .filter(|c| **c != proposer)
            .map(|c| c.user().domain().to_owned())
            .collect();
        let mut outbound = Vec::new();
        for domain in &domains {
            if *domain == self.domain {
                st.deliver(room, fanout.clone(), None);
            } else {
                plan(&mut outbound, domain, room, fanout.clone());
            }
        }
        outbound.extend(self.commit_pending_locally(st, room));
        Ok((timestamp, outbound))
    }

    /// A local member commits the room's pending proposals, dropping users who leave with all
    /// their clients from the participant list (and making everyone else an administrator if
    /// the last one leaves). Returns the commit's fan-out; failures are logged.
    fn commit_pending_locally(&self, st: &mut State, room: &RoomUri) -> Vec<Outbound> {
        let leaving = st.hub.pending_removals(room);
        let members = st.hub.members(room);
        let committer = members
            .iter()
            .filter(|c| c.user().domain() == self.domain && !leaving.contains(c))
            .find_map(|c| {
                st.users
                    .contains_key(c.user().handle())
                    .then(|| c.user().handle().to_owned())
            });
        let Some(handle) = committer else {
            return Vec::new();
        };
        let result = (|| -> Result<Vec<Outbound>, IndieError> {
            let mut room_state = st.hub.room_state(room)?;
            let gone: BTreeSet<String> = leaving
                .iter()
                .map(|c| c.user().to_string())
                .filter(|u| {
                    !members
                        .iter()
                        .any(|m| m.user().to_string() == *u && !leaving.contains(m))
                })
                .collect();
            let list = &mut room_state.participants.participants;
            list.retain(|p| !gone.contains(String::from_utf8_lossy(p.user.as_slice()).as_ref()));
            if !list.iter().any(|p| p.role_index == ROLE_ADMIN) {
                list.iter_mut().for_each(|p| p.role_index = ROLE_ADMIN);
            }
            let user = st
                .users
                .get_mut(&handle)
                .ok_or_else(|| IndieError::UnknownUser(handle.clone()))?;
            let group_id = user
                .rooms
                .get(room)
                .cloned()
                .ok_or_else(|| IndieError::UnknownRoom(room.to_string()))?;
            let extensions =
                with_room_state(user.client.group_extensions(&group_id)?, &room_state)?;
            let out = user.client.commit_pending(&group_id, extensions)?;
            let domain = self.domain.clone();
            match self.hub_commit(st, room, out.commit, out.welcome, &domain, Some(&handle)) {
                Ok((_, outbound)) => Ok(outbound),
                Err(refusal) => {
                    if let Some(user) = st.users.get_mut(&handle) {
                        user.client.clear_pending(&group_id)?;
                    }
                    Err(refusal.into())
                }
            }
        })();
        result.unwrap_or_else(|e| {
            warn!(%room, error = %e, "could not commit the pending proposals");
            Vec::new()
        })
    }

    /// Sends planned notifies (each retried by [`Peers::post`]); failures are logged.
    pub(crate) async fn send_notifies(&self, outbound: Vec<Outbound>) {
        for o in outbound {
            let mut body = Vec::new();
            for message in &o.messages {
                match encode(message) {
                    Ok(bytes) => body.extend(bytes),
                    Err(e) => warn!(error = %e, "could not encode a FanoutMessage"),
                }
            }
            if let Ok(mut sent) = self.sent.lock() {
                sent.push(SentNotify {
                    domain: o.domain.clone(),
                    room: o.room.to_string(),
                    body: body.clone(),
                });
            }
            match self
                .peers
                .post(&o.domain, "notify", &o.room.path_form(), body)
                .await
            {
                Ok(answer) if answer.status == 201 => {}
                Ok(answer) => warn!(domain = %o.domain, status = answer.status, "notify refused"),
                Err(e) => warn!(domain = %o.domain, error = %e, "notify failed"),
            }
        }
    }

    /// POSTs a body to a peer's endpoint and expects `expected`.
    pub(crate) async fn post_expect(
        &self,
        domain: &str,
        endpoint: &'static str,
        param: &str,
        body: Vec<u8>,
        expected: u16,
    ) -> Result<Vec<u8>, IndieError> {
        let answer = self.peers.post(domain, endpoint, param, body).await?;
        if answer.status != expected {
            return Err(IndieError::PeerStatus {
                domain: domain.to_owned(),
                status: answer.status,
                body: String::from_utf8_lossy(&answer.body).into_owned(),
            });
        }
        Ok(answer.body)
    }

    /// A signed `KeyMaterialRequest` from `handle`'s client (profile §5.2).
    fn key_material_request(
        &self,
        handle: &str,
        target: &UserUri,
        room: &RoomUri,
    ) -> Result<KeyMaterialRequest, IndieError> {
        let st = self.state()?;
        let user = st
            .users
            .get(handle)
            .ok_or_else(|| IndieError::UnknownUser(handle.to_owned()))?;
        let credential = user.client.credential();
        let tbs = KeyMaterialRequestTbs {
            protocol: Protocol::Mls10,
            requesting_user: IdentifierUri::new(&user.uri.to_string()),
            target_user: IdentifierUri::new(&target.to_string()),
            room_id: IdentifierUri::new(&room.to_string()),
            acceptable_ciphersuites: vec![u16::from(CIPHERSUITE)],
            required_capabilities: required_capabilities(),
            requester_signature_key: credential.signature_key.clone(),
            requester_credential: credential.credential.clone(),
        };
        let signature = user
            .client
            .sign_with_label("KeyMaterialRequestTBS", &encode(&tbs)?)?;
        Ok(KeyMaterialRequest {
            tbs,
            signature: signature.into(),
        })
    }

    /// Claims one KeyPackage per client of a remote `target` for `room` via `keyMaterial`.
    pub(crate) async fn fetch_key_packages(
        &self,
        handle: &str,
        target: &UserUri,
        room: &RoomUri,
    ) -> Result<Vec<KeyPackage>, IndieError> {
        let request = self.key_material_request(handle, target, room)?;
        let domain = target.domain();
        // KeyPackages for a room hubbed elsewhere are claimed through its hub (§5.2).
        let via = if room.hub() == self.domain {
            domain
        } else {
            room.hub()
        };
        let body = self
            .post_expect(
                via,
                "keyMaterial",
                path_form(&target.to_string()),
                encode(&request)?,
                200,
            )
            .await?;
        let response: KeyMaterialResponse = decode(&body)?;
        if !matches!(
            response.user_status,
            KeyMaterialUserCode::Success | KeyMaterialUserCode::PartialSuccess
        ) {
            return Err(IndieError::Refused {
                domain: domain.to_owned(),
                what: format!("keyMaterial for {target}: {:?}", response.user_status),
            });
        }
        let crypto = RustCrypto::default();
        let mut key_packages = Vec::new();
        for client in response.clients {
            let ClientKeyMaterial::Success { key_package, .. } = client else {
                continue;
            };
            let key_package = key_package
                .validate(&crypto, ProtocolVersion::Mls10)
                .map_err(mls("KeyPackage from keyMaterial"))?;
            let owner = basic_identity(key_package.leaf_node().credential())
                .and_then(|uri| ClientUri::parse(&uri).ok());
            match owner {
                Some(client) if client.user() == target => key_packages.push(key_package),
                _ => warn!(%target, "dropped a KeyPackage that is not a client of the target"),
            }
        }
        if key_packages.is_empty() {
            return Err(IndieError::Refused {
                domain: domain.to_owned(),
                what: format!("no usable KeyPackage for {target}"),
            });
        }
        Ok(key_packages)
    }
}

/// The GroupContext extensions with `app_data_dictionary` replaced by `room_state`.
pub(crate) fn with_room_state(
    current: Extensions<GroupContext>,
    room_state: &RoomState,
) -> Result<Extensions<GroupContext>, IndieError> {
    let mut extensions: Vec<Extension> = current
        .iter()
        .filter(|e| e.extension_type() != app_data_extension_type())
        .cloned()
        .collect();
    extensions.push(room_state.to_extension()?);
    Ok(Extensions::from_vec(extensions).map_err(mls("GroupContext extensions"))?)
}
