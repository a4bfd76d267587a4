//! [`IndieProvider`]: start/stop and the test API (users, consent, rooms as hub, sending,
//! committing and leaving as follower, and hooks for replay and impersonation tests). The
//! hub's acceptance logic and the outbound flows live in `inner`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openmls::prelude::{Extension, Extensions};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::components::{
    BaseRoomPolicy, Opaque, ParticipantListData, RoomMetaData, RoomState, ROLE_ADMIN,
    ROLE_PARTICIPANT,
};
use crate::content::{self, ContentError, MessageId};
use crate::hub::Refusal;
use crate::ids::{IdError, RoomUri, UserUri};
use crate::inner::{with_room_state, Inner};
use crate::mls::{mls, required_capabilities, MlsClient, MlsError};
use crate::peer::{PeerError, Peers};
use crate::state::{ConsentEvent, LocalUser, ReceivedMessage, State};
use crate::tls::{client_config, server_config, DomainCerts, TlsSetupError};
use crate::wire::{
    decode, encode, AppDataDictionary, ConsentEntry, ConsentOperation, GroupInfoOption,
    HandshakeBundle, HandshakeExtra, IdentifierUri, Protocol, RatchetTreeOption,
    SubmitMessageRequest, SubmitMessageResponse, SubmitStatus, UpdateOutcome, UpdateRoomResponse,
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
