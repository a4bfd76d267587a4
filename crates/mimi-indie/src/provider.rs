//! [`IndieProvider`]: start/stop, the test API, and the flows that talk to peers (consent,
//! fetching KeyPackages, creating rooms and adding users as hub, sending as follower). The hub's
//! acceptance of commits and messages ([`Inner::hub_commit`], [`Inner::hub_message`]) is shared
//! by local callers and the `update`/`submitMessage` handlers in `server`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openmls::prelude::{
    Extension, Extensions, KeyPackage, MlsMessageIn, MlsMessageOut, ProtocolVersion, Welcome,
};
use openmls_rust_crypto::RustCrypto;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::components::{
    app_data_extension_type, BaseRoomPolicy, Opaque, ParticipantListData, RoomMetaData, RoomState,
    ROLE_ADMIN, ROLE_PARTICIPANT,
};
use crate::content::{self, ContentError, MessageId};
use crate::hub::Refusal;
use crate::ids::{path_form, IdError, RoomUri, UserUri};
use crate::mls::{basic_identity, mls, required_capabilities, MlsClient, MlsError, CIPHERSUITE};
use crate::peer::{PeerError, Peers};
use crate::state::{ConsentEvent, LocalUser, ReceivedMessage, State};
use crate::tls::{client_config, server_config, DomainCerts, TlsSetupError};
use crate::wire::{
    decode, encode, AppDataDictionary, ClientKeyMaterial, ConsentEntry, ConsentOperation,
    FanoutExtra, FanoutMessage, GroupInfoOption, HandshakeBundle, HandshakeExtra, IdentifierUri,
    KeyMaterialRequest, KeyMaterialRequestTbs, KeyMaterialResponse, KeyMaterialUserCode, Protocol,
    RatchetTreeOption, SubmitMessageRequest, SubmitMessageResponse, SubmitStatus, UpdateOutcome,
    UpdateRoomResponse,
};

/// How many clients the hub allows in a room (`max_clients`).
const MAX_CLIENTS: u32 = 100;

/// What an [`IndieProvider`] needs to start.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// The one domain it serves, e.g. `indie.test`.
    pub domain: String,
    /// Its server and client certificates (PEM).
    pub certs: DomainCerts,
    /// The CA that peers' certificates chain to (PEM).
    pub peer_ca_pem: String,
    /// Peer domain → base URL, e.g. `https://127.0.0.1:8443`.
    pub peers: BTreeMap<String, String>,
}

/// Anything the test API can fail with.
#[derive(Debug, Error)]
pub enum IndieError {
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Id(#[from] IdError),
    #[error(transparent)]
    Mls(#[from] MlsError),
    #[error("encoding: {0}")]
    Codec(#[from] tls_codec::Error),
    #[error(transparent)]
    Content(#[from] ContentError),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("no local user {0}")]
    UnknownUser(String),
    #[error("user {0} exists already")]
    UserExists(String),
    #[error("room {0} is unknown here")]
    UnknownRoom(String),
    #[error("{domain} answered {status}: {body}")]
    PeerStatus {
        domain: String,
        status: u16,
        body: String,
    },
    #[error("{domain} refused: {what}")]
    Refused { domain: String, what: String },
    #[error("hub refused: {0}")]
    Hub(#[from] Refusal),
    #[error("state lock poisoned")]
    Poisoned,
}

/// A hubbed room as the hub sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomView {
    /// Member client URIs.
    pub clients: Vec<String>,
    /// Participant user URIs with their role index.
    pub participants: Vec<(String, u32)>,
}

/// A notify request this provider sent (kept so tests can replay it).
#[derive(Debug, Clone)]
pub struct SentNotify {
    pub domain: String,
    pub room: String,
    pub body: Vec<u8>,
}

/// Fan-out to one other provider: FanoutMessages of one room, in order.
pub(crate) struct Outbound {
    domain: String,
    room: RoomUri,
    messages: Vec<FanoutMessage>,
}

/// Shared by the handle and the request handlers.
pub(crate) struct Inner {
    pub domain: String,
    state: Mutex<State>,
    pub peers: Peers,
    /// Serialises hub events with their fan-out, so each room's order holds.
    pub hub_lock: tokio::sync::Mutex<()>,
    sent: Mutex<Vec<SentNotify>>,
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
    async fn post_expect(
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
    async fn fetch_key_packages(
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
                .and_then(|uri| crate::ids::ClientUri::parse(&uri).ok());
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

/// An in-process MIMI provider for one domain.
pub struct IndieProvider {
    inner: Arc<Inner>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl IndieProvider {
    /// Starts the provider on an ephemeral port of 127.0.0.1.
    pub async fn start(config: ProviderConfig) -> Result<Self, IndieError> {
        let server_tls = server_config(
            &config.certs.server_cert_pem,
            &config.certs.server_key_pem,
            &config.peer_ca_pem,
        )?;
        let client_tls = client_config(
            &config.certs.client_cert_pem,
            &config.certs.client_key_pem,
            &config.peer_ca_pem,
        )?;
        let inner = Arc::new(Inner {
            domain: config.domain.clone(),
            state: Mutex::new(State::new(&config.domain)?),
            peers: Peers::new(&config.domain, client_tls, &config.peers)?,
            hub_lock: tokio::sync::Mutex::new(()),
            sent: Mutex::new(Vec::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (shutdown, watcher) = watch::channel(false);
        let router = crate::server::router(inner.clone());
        let task = tokio::spawn(crate::server::serve(
            listener,
            Arc::new(server_tls),
            router,
            watcher,
        ));
        info!(domain = %config.domain, %addr, "indie provider started");
        Ok(Self {
            inner,
            addr,
            shutdown,
            task,
        })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`, for peers' configuration.
    pub fn base_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Tells the provider where peer `domain` listens (`https://127.0.0.1:PORT`).
    pub fn add_peer(&self, domain: &str, base_url: &str) -> Result<(), IndieError> {
        Ok(self.inner.peers.add(domain, base_url)?)
    }

    /// The provider's domain.
    pub fn domain(&self) -> &str {
        &self.inner.domain
    }

    /// Stops accepting connections and closes open ones.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        if let Err(e) = self.task.await {
            warn!(error = %e, "server task ended badly");
        }
    }

    /// Adds a user with one MLS client; returns its user URI.
    pub async fn add_user(&self, handle: &str) -> Result<String, IndieError> {
        let uri = UserUri::new(&self.inner.domain, handle)?;
        let mut st = self.inner.state()?;
        if st.users.contains_key(handle) {
            return Err(IndieError::UserExists(handle.to_owned()));
        }
        let client = MlsClient::new(&uri, "indie0")?;
        st.users.insert(
            handle.to_owned(),
            LocalUser {
                uri: uri.clone(),
                client,
                rooms: Default::default(),
                inbox: Default::default(),
            },
        );
        Ok(uri.to_string())
    }

    fn user_uri(&self, handle: &str) -> Result<UserUri, IndieError> {
        let st = self.inner.state()?;
        st.users
            .get(handle)
            .map(|u| u.uri.clone())
            .ok_or_else(|| IndieError::UnknownUser(handle.to_owned()))
    }

    /// Asks `to_user_uri` for consent (`requestConsent`), and, as a bilateral connection,
    /// grants them consent to contact `from` (`updateConsent` grant with the roles reversed).
    pub async fn request_consent(&self, from: &str, to_user_uri: &str) -> Result<(), IndieError> {
        let requester = self.user_uri(from)?;
        let target = UserUri::parse(to_user_uri)?;
        self.inner
            .state()?
            .consents
            .insert((requester.to_string(), target.to_string()));
        let request = consent_entry(ConsentOperation::Request, &requester, &target);
        self.inner
            .post_expect(
                target.domain(),
                "requestConsent",
                target.domain(),
                encode(&request)?,
                201,
            )
            .await?;
        let grant = consent_entry(ConsentOperation::Grant, &target, &requester);
        self.inner
            .post_expect(
                target.domain(),
                "updateConsent",
                target.domain(),
                encode(&grant)?,
                201,
            )
            .await?;
        Ok(())
    }

    /// `handle` consents to `requester_uri` fetching its KeyPackages; tells the requester's
    /// provider with `updateConsent` grant.
    pub async fn grant_consent(&self, handle: &str, requester_uri: &str) -> Result<(), IndieError> {
        let target = self.user_uri(handle)?;
        let requester = UserUri::parse(requester_uri)?;
        self.inner
            .state()?
            .consents
            .insert((target.to_string(), requester.to_string()));
        if requester.domain() != self.inner.domain {
            let grant = consent_entry(ConsentOperation::Grant, &requester, &target);
            self.inner
                .post_expect(
                    requester.domain(),
                    "updateConsent",
                    requester.domain(),
                    encode(&grant)?,
                    201,
                )
                .await?;
        }
        Ok(())
    }

    /// The consent messages peers sent us, oldest first.
    pub fn consent_events(&self) -> Vec<ConsentEvent> {
        self.inner
            .state()
            .map(|st| st.consent_events.clone())
            .unwrap_or_default()
    }

    /// Whether `target_uri`'s provider told us that `target_uri` consented to `handle`.
    pub fn has_consent_from(&self, handle: &str, target_uri: &str) -> bool {
        let Ok(user) = self.user_uri(handle) else {
            return false;
        };
        self.inner.state().is_ok_and(|st| {
            st.granted_to_us
                .contains(&(user.to_string(), target_uri.to_owned()))
        })
    }

    /// Creates a group room hubbed here, with `handle` as its administrator.
    pub async fn create_room(&self, handle: &str, name: &str) -> Result<String, IndieError> {
        let room = RoomUri::new(&self.inner.domain, name)?;
        let group_id = room.default_group_id();
        let mut st = self.inner.state()?;
        if st.hub.hubs(&room) {
            return Err(IndieError::Refused {
                domain: self.inner.domain.clone(),
                what: format!("{room} exists"),
            });
        }
        let creator = st
            .users
            .get(handle)
            .ok_or_else(|| IndieError::UnknownUser(handle.to_owned()))?
            .uri
            .to_string();
        let mut participants = ParticipantListData::default();
        participants.push(&creator, ROLE_ADMIN);
        let room_state = RoomState {
            participants,
            metadata: RoomMetaData {
                room_uri: Opaque::text(&room.to_string()),
                room_name: Opaque::text(name),
                room_descriptions: Vec::new(),
                room_avatar: Opaque::empty(),
                room_subject: Opaque::empty(),
                room_mood: Opaque::empty(),
            },
            policy: BaseRoomPolicy::profile(false, MAX_CLIENTS),
        };
        let extensions = Extensions::from_vec(vec![
            Extension::ExternalSenders(vec![st.hub.external_sender()]),
            Extension::RequiredCapabilities(required_capabilities()),
            room_state.to_extension()?,
        ])
        .map_err(mls("GroupContext extensions"))?;
        let st = &mut *st;
        let user = st
            .users
            .get_mut(handle)
            .ok_or_else(|| IndieError::UnknownUser(handle.to_owned()))?;
        user.client.create_group(&group_id, extensions)?;
        let (info, tree) = user.client.group_info_and_tree(&group_id)?;
        user.rooms.insert(room.clone(), group_id);
        st.hub.add_room(room.clone(), info, tree)?;
        info!(%room, "room created");
        Ok(room.to_string())
    }

    /// As hub: `by` adds `target_uri` (KeyPackages fetched via `keyMaterial` for a remote
    /// user), committing Add + GroupContextExtensions (participant list); fans out the commit
    /// and the Welcome.
    pub async fn add_to_room(
        &self,
        room: &str,
        by: &str,
        target_uri: &str,
    ) -> Result<(), IndieError> {
        let room = RoomUri::parse(room)?;
        let target = UserUri::parse(target_uri)?;
        let key_packages = if target.domain() == self.inner.domain {
            let mut st = self.inner.state()?;
            vec![st.hand_out(target.handle(), &room)?]
        } else {
            self.inner.fetch_key_packages(by, &target, &room).await?
        };
        let _hub = self.inner.hub_lock.lock().await;
        let outbound = {
            let mut st = self.inner.state()?;
            let st = &mut *st;
            let mut room_state = st.hub.room_state(&room)?;
            if room_state
                .participants
                .role_of(&target.to_string())
                .is_none()
            {
                room_state
                    .participants
                    .push(&target.to_string(), ROLE_PARTICIPANT);
            }
            let user = st
                .users
                .get_mut(by)
                .ok_or_else(|| IndieError::UnknownUser(by.to_owned()))?;
            let group_id = user
                .rooms
                .get(&room)
                .cloned()
                .ok_or_else(|| IndieError::UnknownRoom(room.to_string()))?;
            let extensions =
                with_room_state(user.client.group_extensions(&group_id)?, &room_state)?;
            let out = user
                .client
                .commit_add(&group_id, key_packages, extensions)?;
            let result = self.inner.hub_commit(
                st,
                &room,
                out.commit,
                out.welcome,
                &self.inner.domain.clone(),
                Some(by),
            );
            match result {
                Ok((_, outbound)) => outbound,
                Err(refusal) => {
                    if let Some(user) = st.users.get_mut(by) {
                        user.client.clear_pending(&group_id)?;
                    }
                    return Err(refusal.into());
                }
            }
        };
        self.inner.send_notifies(outbound).await;
        Ok(())
    }

    /// `handle` claims `target_uri`'s KeyPackages for `room` (through the room's hub when it is
    /// hubbed elsewhere); returns how many valid ones came back. They are not used.
    pub async fn claim_key_packages(
        &self,
        handle: &str,
        target_uri: &str,
        room: &str,
    ) -> Result<usize, IndieError> {
        let room = RoomUri::parse(room)?;
        let target = UserUri::parse(target_uri)?;
        Ok(self
            .inner
            .fetch_key_packages(handle, &target, &room)
            .await?
            .len())
    }

    /// `handle` sends `text` to `room`: MIMI content in a PrivateMessage, accepted by this
    /// provider as hub or submitted to the room's hub (`submitMessage`). Returns the MessageId.
    pub async fn send(
        &self,
        handle: &str,
        room: &str,
        text: &str,
    ) -> Result<MessageId, IndieError> {
        let room = RoomUri::parse(room)?;
        let local_hub = room.hub() == self.inner.domain;
        let _hub = if local_hub {
            Some(self.inner.hub_lock.lock().await)
        } else {
            None
        };
        let (sender, message, id) = {
            let mut st = self.inner.state()?;
            let user = st
                .users
                .get_mut(handle)
                .ok_or_else(|| IndieError::UnknownUser(handle.to_owned()))?;
            let group_id = user
                .rooms
                .get(&room)
                .cloned()
                .ok_or_else(|| IndieError::UnknownRoom(room.to_string()))?;
            let salt = user.client.random::<16>()?;
            let (bytes, id) =
                content::encode_text(salt, &user.uri.to_string(), &room.to_string(), text)?;
            let message = user.client.encrypt(&group_id, &bytes)?;
            (user.uri.clone(), message, id)
        };
        if local_hub {
            let outbound = {
                let mut st = self.inner.state()?;
                let domain = self.inner.domain.clone();
                self.inner
                    .hub_message(&mut st, &room, message, &sender, &domain, Some(handle))?
                    .1
            };
            self.inner.send_notifies(outbound).await;
            return Ok(id);
        }
        let request = SubmitMessageRequest {
            protocol: Protocol::Mls10,
            app_message: message,
            sending_uri: IdentifierUri::new(&sender.to_string()),
        };
        let body = self
            .inner
            .post_expect(
                room.hub(),
                "submitMessage",
                &room.path_form(),
                encode(&request)?,
                200,
            )
            .await?;
        let response: SubmitMessageResponse = decode(&body)?;
        match response.status {
            SubmitStatus::Accepted(_) => Ok(id),
            other => Err(IndieError::Refused {
                domain: room.hub().to_owned(),
                what: format!("submitMessage: {other:?}"),
            }),
        }
    }

    /// As follower: `handle`'s client commits a self-update and sends it to the room's hub with
    /// `update` (HandshakeBundle: no Welcome, GroupInfo `full`, ratchet tree `full`); merges it
    /// once the hub answers `success`.
    pub async fn update_keys(&self, handle: &str, room: &str) -> Result<(), IndieError> {
        let room = RoomUri::parse(room)?;
        let (group_id, bundle) = {
            let mut st = self.inner.state()?;
            let user = st
                .users
                .get_mut(handle)
                .ok_or_else(|| IndieError::UnknownUser(handle.to_owned()))?;
            let group_id = user
                .rooms
                .get(&room)
                .cloned()
                .ok_or_else(|| IndieError::UnknownRoom(room.to_string()))?;
            let (commit, group_info, tree) = user.client.commit_update(&group_id)?;
            let group_info = decode(&encode(&group_info)?)?;
            let bundle = HandshakeBundle {
                proposal_or_commit: commit,
                extra: HandshakeExtra::Commit {
                    welcome: None,
                    group_info: GroupInfoOption::Full(group_info),
                    ratchet_tree: RatchetTreeOption::Full(tree),
                },
            };
            (group_id, bundle)
        };
        let answer = self
            .inner
            .post_expect(
                room.hub(),
                "update",
                &room.path_form(),
                encode(&bundle)?,
                200,
            )
            .await;
        let mut st = self.inner.state()?;
        let client = &mut st
            .users
            .get_mut(handle)
            .ok_or_else(|| IndieError::UnknownUser(handle.to_owned()))?
            .client;
        let response = match answer.and_then(|body| Ok(decode::<UpdateRoomResponse>(&body)?)) {
            Ok(response) => response,
            Err(e) => {
                client.clear_pending(&group_id)?;
                return Err(e);
            }
        };
        match response.outcome {
            UpdateOutcome::Success { .. } => Ok(client.merge_pending(&group_id)?),
            other => {
                client.clear_pending(&group_id)?;
                Err(IndieError::Refused {
                    domain: room.hub().to_owned(),
                    what: format!("update: {other:?} {}", response.error_description),
                })
            }
        }
    }

    /// As follower: `handle`'s client leaves `room` with a Remove proposal for its own leaf
    /// sent through `update`; it is out once a member's commit of that proposal arrives.
    pub async fn leave(&self, handle: &str, room: &str) -> Result<(), IndieError> {
        let room = RoomUri::parse(room)?;
        let bundle = {
            let mut st = self.inner.state()?;
            let user = st
                .users
                .get_mut(handle)
                .ok_or_else(|| IndieError::UnknownUser(handle.to_owned()))?;
            let group_id = user
                .rooms
                .get(&room)
                .cloned()
                .ok_or_else(|| IndieError::UnknownRoom(room.to_string()))?;
            HandshakeBundle {
                proposal_or_commit: user.client.propose_leave(&group_id)?,
                extra: HandshakeExtra::Proposal {
                    more_proposals: Vec::new(),
                },
            }
        };
        let body = self
            .inner
            .post_expect(
                room.hub(),
                "update",
                &room.path_form(),
                encode(&bundle)?,
                200,
            )
            .await?;
        let response: UpdateRoomResponse = decode(&body)?;
        match response.outcome {
            UpdateOutcome::Success { .. } => Ok(()),
            other => Err(IndieError::Refused {
                domain: room.hub().to_owned(),
                what: format!("leave: {other:?} {}", response.error_description),
            }),
        }
    }

    /// What `handle` received in `room`, oldest first.
    pub fn inbox(&self, handle: &str, room: &str) -> Vec<ReceivedMessage> {
        let (Ok(st), Ok(room)) = (self.inner.state(), RoomUri::parse(room)) else {
            return Vec::new();
        };
        st.users
            .get(handle)
            .and_then(|u| u.inbox.get(&room).cloned())
            .unwrap_or_default()
    }

    /// Waits until `handle` has at least `count` messages in `room` (or `timeout` passes).
    pub async fn wait_inbox(
        &self,
        handle: &str,
        room: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<ReceivedMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let inbox = self.inbox(handle, room);
            if inbox.len() >= count || tokio::time::Instant::now() >= deadline {
                return inbox;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The rooms `handle`'s client is in.
    pub fn rooms(&self, handle: &str) -> Vec<String> {
        let Ok(st) = self.inner.state() else {
            return Vec::new();
        };
        let mut rooms: Vec<String> = st
            .users
            .get(handle)
            .map(|u| {
                u.rooms
                    .keys()
                    .filter(|r| u.client.is_member(&u.rooms[*r]))
                    .map(RoomUri::to_string)
                    .collect()
            })
            .unwrap_or_default();
        rooms.sort();
        rooms
    }

    /// As hub: the room's member clients and participant list.
    pub fn room_members(&self, room: &str) -> Result<RoomView, IndieError> {
        let room = RoomUri::parse(room)?;
        let st = self.inner.state()?;
        let state = st.hub.room_state(&room)?;
        let participants = state
            .participants
            .participants
            .iter()
            .map(|p| {
                (
                    String::from_utf8_lossy(p.user.as_slice()).into_owned(),
                    p.role_index,
                )
            })
            .collect();
        let clients = st
            .hub
            .members(&room)
            .iter()
            .map(ToString::to_string)
            .collect();
        Ok(RoomView {
            clients,
            participants,
        })
    }

    /// The notify requests this provider sent, oldest first.
    pub fn sent_notifies(&self) -> Vec<SentNotify> {
        self.inner
            .sent
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// POSTs `body` to `path` at peer `domain` with `From: mimi@{from_domain}` over this
    /// provider's TLS identity; returns (status, body). For replay and impersonation tests.
    pub async fn post_raw(
        &self,
        domain: &str,
        path: &str,
        from_domain: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), IndieError> {
        let answer = self
            .inner
            .peers
            .post_path(domain, path, from_domain, body)
            .await?;
        Ok((answer.status, answer.body))
    }

    /// The path of a peer's endpoint from its directory, e.g. `notify` for a room.
    pub async fn peer_endpoint(
        &self,
        domain: &str,
        endpoint: &'static str,
        param: &str,
    ) -> Result<String, IndieError> {
        Ok(self
            .inner
            .peers
            .endpoint_path(domain, endpoint, param)
            .await?)
    }
}

/// A `ConsentEntry` without room, KeyPackages or extensions.
fn consent_entry(
    operation: ConsentOperation,
    requester: &UserUri,
    target: &UserUri,
) -> ConsentEntry {
    ConsentEntry {
        operation,
        requester_uri: IdentifierUri::new(&requester.to_string()),
        target_uri: IdentifierUri::new(&target.to_string()),
        room_id: None,
        client_key_packages: Vec::new(),
        consent_extensions: AppDataDictionary::default(),
    }
}

/// The GroupContext extensions with `app_data_dictionary` replaced by `room_state`.
fn with_room_state(
    current: Extensions<openmls::prelude::GroupContext>,
    room_state: &RoomState,
) -> Result<Extensions<openmls::prelude::GroupContext>, IndieError> {
    let mut extensions: Vec<Extension> = current
        .iter()
        .filter(|e| e.extension_type() != app_data_extension_type())
        .cloned()
        .collect();
    extensions.push(room_state.to_extension()?);
    Ok(Extensions::from_vec(extensions).map_err(mls("GroupContext extensions"))?)
}
