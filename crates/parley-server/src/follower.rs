//! This provider's side of rooms hubbed elsewhere (MIMI's follower role). Owns `remote_rooms`,
//! `remote_room_devices`, `handed_out_key_packages`, `notify_seen` and `relays`.
//!
//! A follower keeps no MLS state (docs/mimi-profile.md §5): it delivers a room's Welcome to the
//! local clients whose KeyPackageRefs the Welcome names (KeyPackages this provider handed out
//! for that room), and every other message of the room to the local clients it welcomed, until
//! a client reports that it left. Each `notify` message is applied once: its digest is kept,
//! and a message seen before is accepted and ignored. Local clients' messages, commits and
//! proposals go to the hub (`submitMessage`, `update`) and are acknowledged only when the hub
//! accepted them; the follower then delivers them to its other member clients itself, and
//! recognises the hub's echo (if the hub sends one) by the digest it recorded before relaying.

use crate::accounts::AuthDevice;
use crate::clock::now_ms;
use crate::config::ServerConfig;
use crate::delivery::{enqueue, Delivery, Outgoing, Stored};
use crate::error::{ServiceError, ServiceResult};
use crate::hub::check_application_message;
use crate::mls::application_header;
use crate::peers::{hub_garbled, required, PeerClient};
use crate::store::{Store, StoreError};
use parley_proto::api::{Accepted, CommitRequest, EntryKind, RoomInfo};
use parley_proto::mimi::{
    self, Body, FanoutExtra, FanoutMessage, GroupInfoOption, HandshakeBundle, MlsKind, MlsMessage,
    NotifyRequest, RatchetTreeOption, SubmitMessageRequest, SubmitMessageResponse, SubmitStatus,
    UpdateRoomResponse, Welcome,
};
use parley_proto::{Domain, RoomId};
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// How long a notify digest is remembered (a hub retries within this).
const SEEN_FOR_MS: u64 = 30 * 24 * 3600 * 1000;

pub struct Follower {
    store: Store,
    config: Arc<ServerConfig>,
    delivery: Arc<Delivery>,
    peers: Option<Arc<PeerClient>>,
}

fn bad_body(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::bad("invalid_body", e.to_string())
}

fn digest(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

fn unknown_room(room: &RoomId) -> ServiceError {
    ServiceError::not_found(
        "unknown_room",
        format!("no room {room} that you are a member of"),
    )
}

/// A relayed handshake or message, as the follower delivers it locally once the hub took it.
struct Relayed {
    kind: EntryKind,
    data: Vec<u8>,
    expires_at: Option<u64>,
    /// Local devices the relayed commit adds: they join at the epoch after it, by the Welcome,
    /// so they must not get the commit itself (their Welcome may be routed before it settles).
    joining: Vec<String>,
}

impl Follower {
    pub fn new(
        store: Store,
        config: Arc<ServerConfig>,
        delivery: Arc<Delivery>,
        peers: Option<Arc<PeerClient>>,
    ) -> Self {
        Self {
            store,
            config,
            delivery,
            peers,
        }
    }

    /// The hub of a room hubbed elsewhere (a room URI names its hub); `None` for rooms of the
    /// domains hosted here.
    pub fn hub_of(&self, room: &RoomId) -> Option<Domain> {
        (!self.config.hosts(room.hub().as_str())).then(|| room.hub().clone())
    }

    async fn is_member(&self, caller: &AuthDevice, room: &RoomId) -> ServiceResult<bool> {
        let (key, device) = (room.to_string(), caller.device.as_str().to_owned());
        Ok(self
            .store
            .read(move |c| {
                Ok(c.query_row(
                    "SELECT 1 FROM remote_room_devices WHERE room_id = ?1 AND device_id = ?2",
                    params![key, device],
                    |_| Ok(()),
                )
                .optional()?
                .is_some())
            })
            .await?)
    }

    async fn require_member(&self, caller: &AuthDevice, room: &RoomId) -> ServiceResult<()> {
        if self.is_member(caller, room).await? {
            Ok(())
        } else {
            Err(unknown_room(room))
        }
    }

    /// Rooms hubbed elsewhere that the calling device is in (what a follower knows: URI, hub).
    pub async fn rooms_of(&self, caller: &AuthDevice) -> ServiceResult<Vec<RoomInfo>> {
        let device = caller.device.as_str().to_owned();
        let rooms: Vec<String> = self
            .store
            .read(move |c| {
                let mut st = c.prepare(
                    "SELECT room_id FROM remote_room_devices WHERE device_id = ?1 ORDER BY room_id",
                )?;
                let rows = st.query_map(params![device], |r| r.get(0))?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await?;
        Ok(rooms
            .iter()
            .filter_map(|r| RoomId::parse(r).ok())
            .map(|r| bare_info(&r))
            .collect())
    }

    pub async fn room_info(&self, caller: &AuthDevice, room: &RoomId) -> ServiceResult<RoomInfo> {
        self.require_member(caller, room).await?;
        Ok(bare_info(room))
    }

    /// `POST /v1/rooms/{id}/left`: the device left the room or was removed by a commit; its
    /// provider stops delivering the room to it.
    pub async fn left(&self, caller: &AuthDevice, room: &RoomId) -> ServiceResult<()> {
        let (key, device) = (room.to_string(), caller.device.as_str().to_owned());
        let removed = self
            .store
            .write(move |c| {
                Ok(c.execute(
                    "DELETE FROM remote_room_devices WHERE room_id = ?1 AND device_id = ?2",
                    params![key, device],
                )?)
            })
            .await?;
        if removed == 0 {
            return Err(unknown_room(room));
        }
        tracing::info!(%room, device = %caller.device, "device left a followed room");
        Ok(())
    }

    /// Remembers KeyPackages this provider handed out for `room` (MIMI `keyMaterial`): the room's
    /// Welcome is routed to these devices by KeyPackageRef, and only then does the room's hub
    /// become able to notify us about it.
    pub async fn record_handed_out(
        &self,
        room: &RoomId,
        handed: Vec<(Vec<u8>, String)>,
    ) -> ServiceResult<()> {
        if handed.is_empty() || self.hub_of(room).is_none() {
            return Ok(());
        }
        let room = room.to_string();
        self.store
            .write(move |c| {
                let mut st = c.prepare_cached(
                    "INSERT OR REPLACE INTO handed_out_key_packages (key_package_ref, room_id, device_id, handed_out_at)
                     VALUES (?1, ?2, ?3, ?4)",
                )?;
                for (reference, device) in handed {
                    st.execute(params![reference, room, device, now_ms() as i64])?;
                }
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// The local member devices of a room hubbed elsewhere (for ephemeral messages, which
    /// bypass the queues and so this module's notify path).
    pub async fn local_devices(&self, room: &RoomId) -> ServiceResult<Vec<String>> {
        let key = room.to_string();
        Ok(self.store.read(move |c| member_devices(c, &key)).await?)
    }

    // --- relaying a local client's traffic to the hub --------------------------------------------

    /// `POST /v1/rooms/{id}/messages` for a room hubbed elsewhere: MIMI `submitMessage`, named by
    /// the sender's user URI. The expiry hint (Safe AAD) is checked here too, so a bad one never
    /// leaves the provider. Runs to its end even if the client hangs up (see [`detached`]).
    pub async fn relay_send(
        self: &Arc<Self>,
        caller: &AuthDevice,
        room: &RoomId,
        message: Vec<u8>,
    ) -> ServiceResult<Accepted> {
        let (this, caller, room) = (self.clone(), caller.clone(), room.clone());
        detached(async move { this.relay_send_now(&caller, &room, message).await }).await
    }

    async fn relay_send_now(
        &self,
        caller: &AuthDevice,
        room: &RoomId,
        message: Vec<u8>,
    ) -> ServiceResult<Accepted> {
        let hub = self.hub_of(room).ok_or_else(|| unknown_room(room))?;
        let (header, expires_at) = check_application_message(&self.config, &caller.user, &message)?;
        self.require_member(caller, room).await?;
        let mls = MlsMessage::from_bytes(message.clone())
            .map_err(|e| ServiceError::bad("invalid_message", e.to_string()))?;
        let body = SubmitMessageRequest::new(mls, &caller.user.to_uri()).encode();
        let relayed = Relayed {
            kind: EntryKind::Message,
            data: message,
            expires_at,
            joining: Vec::new(),
        };
        let answer = self
            .relay(caller, room, &hub, "submitMessage", body, &relayed)
            .await?;
        let response = SubmitMessageResponse::decode(&answer).map_err(|e| hub_garbled(&hub, e));
        let outcome = match response.map(|r| r.status) {
            Ok(SubmitStatus::Accepted {
                accepted_timestamp, ..
            }) => Ok(Accepted {
                event: 0,
                ts: accepted_timestamp,
                epoch: header.epoch,
            }),
            Ok(SubmitStatus::NotAllowed) => Err(ServiceError::forbidden(
                "not_allowed",
                format!("the room's hub {hub} refused the message"),
            )),
            Ok(SubmitStatus::EpochTooOld { current_epoch }) => {
                Err(ServiceError::wrong_epoch(current_epoch, header.epoch))
            }
            Err(e) => Err(e),
        };
        self.settle_relay(caller, room, &relayed, outcome.as_ref().ok())
            .await?;
        outcome
    }

    /// Commits for a room hubbed elsewhere: MIMI `update` with the commit, the Welcome (bare),
    /// the committer's GroupInfo and the ratchet tree.
    pub async fn relay_commit(
        self: &Arc<Self>,
        caller: &AuthDevice,
        room: &RoomId,
        req: CommitRequest,
    ) -> ServiceResult<Accepted> {
        let (this, caller, room) = (self.clone(), caller.clone(), room.clone());
        detached(async move { this.relay_commit_now(&caller, &room, req).await }).await
    }

    async fn relay_commit_now(
        &self,
        caller: &AuthDevice,
        room: &RoomId,
        req: CommitRequest,
    ) -> ServiceResult<Accepted> {
        let invalid =
            |what: &'static str| move |e: mimi::WireError| ServiceError::bad(what, e.to_string());
        let commit =
            MlsMessage::from_bytes(req.commit.clone()).map_err(invalid("invalid_commit"))?;
        let welcome = match req.welcome {
            Some(w) => Some(
                MlsMessage::from_bytes(w)
                    .ok()
                    .and_then(|m| m.to_welcome())
                    .ok_or_else(|| {
                        ServiceError::bad("invalid_welcome", "welcome is not an MLS Welcome")
                    })?,
            ),
            None => None,
        };
        let joining = match &welcome {
            Some(w) => self.joining_devices(room, w).await?,
            None => Vec::new(),
        };
        let group_info = bare_group_info(req.group_info)?;
        let bundle = HandshakeBundle::Commit {
            commit,
            welcome,
            group_info: GroupInfoOption::Full { group_info },
            ratchet_tree: RatchetTreeOption::Full {
                ratchet_tree: mimi::RatchetTree::from_bytes(req.ratchet_tree)
                    .map_err(invalid("invalid_ratchet_tree"))?,
            },
        };
        let epoch = crate::mls::message_epoch(&req.commit).unwrap_or(0);
        let relayed = Relayed {
            kind: EntryKind::Commit,
            data: req.commit,
            expires_at: None,
            joining,
        };
        self.relay_update(caller, room, bundle, relayed, epoch + 1)
            .await
    }

    /// The local devices a Welcome is for: those its KeyPackageRefs name among the KeyPackages
    /// this provider handed out for the room.
    async fn joining_devices(
        &self,
        room: &RoomId,
        welcome: &Welcome,
    ) -> ServiceResult<Vec<String>> {
        let refs: Vec<Vec<u8>> = welcome
            .parse()
            .map(|w| {
                w.secrets()
                    .iter()
                    .map(|s| s.new_member().as_slice().to_vec())
                    .collect()
            })
            .map_err(|_| ServiceError::bad("invalid_welcome", "welcome is not an MLS Welcome"))?;
        let key = room.to_string();
        Ok(self
            .store
            .read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT device_id FROM handed_out_key_packages WHERE room_id = ?1 AND key_package_ref = ?2",
                )?;
                let mut devices = Vec::new();
                for r in &refs {
                    if let Some(d) = st.query_row(params![key, r], |row| row.get(0)).optional()? {
                        devices.push(d);
                    }
                }
                Ok(devices)
            })
            .await?)
    }

    /// A member's self-removal (leaving) for a room hubbed elsewhere: MIMI `update`.
    pub async fn relay_proposal(
        self: &Arc<Self>,
        caller: &AuthDevice,
        room: &RoomId,
        proposal: Vec<u8>,
    ) -> ServiceResult<Accepted> {
        let (this, caller, room) = (self.clone(), caller.clone(), room.clone());
        detached(async move { this.relay_proposal_now(&caller, &room, proposal).await }).await
    }

    async fn relay_proposal_now(
        &self,
        caller: &AuthDevice,
        room: &RoomId,
        proposal: Vec<u8>,
    ) -> ServiceResult<Accepted> {
        let message = MlsMessage::from_bytes(proposal.clone())
            .map_err(|e| ServiceError::bad("invalid_proposal", e.to_string()))?;
        let epoch = crate::mls::message_epoch(&proposal).unwrap_or(0);
        let bundle = HandshakeBundle::Proposal {
            proposal: message,
            more_proposals: Vec::new(),
        };
        let relayed = Relayed {
            kind: EntryKind::Proposal,
            data: proposal,
            expires_at: None,
            joining: Vec::new(),
        };
        self.relay_update(caller, room, bundle, relayed, epoch)
            .await
    }

    async fn relay_update(
        &self,
        caller: &AuthDevice,
        room: &RoomId,
        bundle: HandshakeBundle,
        relayed: Relayed,
        epoch_after: u64,
    ) -> ServiceResult<Accepted> {
        let hub = self.hub_of(room).ok_or_else(|| unknown_room(room))?;
        self.require_member(caller, room).await?;
        let answer = self
            .relay(caller, room, &hub, "update", bundle.encode(), &relayed)
            .await?;
        let outcome = match UpdateRoomResponse::decode(&answer).map_err(|e| hub_garbled(&hub, e)) {
            Ok(UpdateRoomResponse::Success {
                accepted_timestamp, ..
            }) => Ok(Accepted {
                event: 0,
                ts: accepted_timestamp,
                epoch: epoch_after,
            }),
            Ok(UpdateRoomResponse::WrongEpoch { current_epoch, .. }) => Err(
                ServiceError::wrong_epoch(current_epoch, epoch_after.saturating_sub(1)),
            ),
            Ok(UpdateRoomResponse::NotAllowed { error_description }) => {
                let (code, message) = split_description(error_description.as_slice());
                Err(ServiceError::forbidden(code, message))
            }
            Ok(UpdateRoomResponse::InvalidProposal {
                error_description, ..
            }) => {
                let (code, message) = split_description(error_description.as_slice());
                Err(ServiceError::Conflict {
                    code,
                    message,
                    retryable: code == "pending_proposals",
                })
            }
            Err(e) => Err(e),
        };
        self.settle_relay(caller, room, &relayed, outcome.as_ref().ok())
            .await?;
        outcome
    }

    /// Posts a relayed body to the hub, having recorded (room, digest, sending device) so that
    /// the hub's echo of it skips the sender.
    async fn relay(
        &self,
        caller: &AuthDevice,
        room: &RoomId,
        hub: &Domain,
        endpoint: &str,
        body: Vec<u8>,
        relayed: &Relayed,
    ) -> ServiceResult<Vec<u8>> {
        let peers = required(self.peers.as_deref())?;
        let (key, hash, device) = (
            room.to_string(),
            digest(&relayed.data),
            caller.device.as_str().to_owned(),
        );
        self.store
            .write(move |c| {
                c.execute(
                    "INSERT OR REPLACE INTO relays (room_id, digest, device_id) VALUES (?1, ?2, ?3)",
                    params![key, hash, device],
                )?;
                Ok(())
            })
            .await?;
        let answer = peers
            .call(caller.user.domain(), hub, endpoint, room.path_form(), body)
            .await;
        if answer.is_err() {
            self.settle_relay(caller, room, relayed, None).await?;
        }
        answer
    }

    /// After the hub answered: if it accepted, delivers what was relayed to the room's other
    /// local member devices (unless the hub's echo already did), in one transaction with the
    /// digest; always forgets the pending relay.
    async fn settle_relay(
        &self,
        caller: &AuthDevice,
        room: &RoomId,
        relayed: &Relayed,
        accepted: Option<&Accepted>,
    ) -> ServiceResult<()> {
        let key = room.to_string();
        let hash = digest(&relayed.data);
        let sender = caller.device.as_str().to_owned();
        let deliver = accepted.map(|a| {
            let retained =
                a.ts.max(now_ms())
                    .saturating_add(self.config.retention_ms(caller.user.domain().as_str()));
            (
                a.ts,
                relayed.expires_at.map_or(retained, |at| at.min(retained)),
                relayed.kind,
                Arc::new(relayed.data.clone()),
            )
        });
        let joining = relayed.joining.clone();
        let push = self.delivery.push.clone();
        self.store
            .write_then(
                move |c| {
                    c.execute(
                        "DELETE FROM relays WHERE room_id = ?1 AND digest = ?2 AND device_id = ?3",
                        params![key, hash, sender],
                    )?;
                    let Some((ts, expires_at, kind, data)) = deliver else {
                        return Ok(Vec::new());
                    };
                    if seen(c, &key, &hash)? {
                        return Ok(Vec::new()); // the hub's echo came first and was delivered
                    }
                    mark_seen(c, &key, &hash)?;
                    let entries: Vec<Outgoing> = member_devices(c, &key)?
                        .into_iter()
                        .filter(|d| *d != sender && !joining.contains(d))
                        .map(|device| Outgoing {
                            device,
                            room_id: key.clone(),
                            kind,
                            event: 0,
                            ts,
                            data: data.clone(),
                            ratchet_tree: None,
                            expires_at,
                        })
                        .collect();
                    enqueue(c, &entries)
                },
                move |stored: &Vec<Stored>| push.push(stored),
            )
            .await?;
        Ok(())
    }

    // --- notify ----------------------------------------------------------------------------------

    /// MIMI `notify/{roomId}` from `peer`, which must be the room's hub (the room URI names it).
    /// Everything in the request is stored in one transaction before the `201`.
    pub async fn notify(&self, peer: &Domain, room: &RoomId, body: &[u8]) -> ServiceResult<()> {
        let request = NotifyRequest::decode(body).map_err(bad_body)?;
        if self.config.hosts(room.hub().as_str()) || room.hub() != peer {
            return Err(ServiceError::forbidden(
                "not_hub",
                format!("room {room} is hubbed by {}, not {peer}", room.hub()),
            ));
        }
        let now = now_ms();
        let plan = self.plan_notify(room, request, now)?;
        let (key, hub) = (room.to_string(), peer.to_string());
        let push = self.delivery.push.clone();
        let config = self.config.clone();
        let stored = self
            .store
            .write_then(
                move |c| apply_notify(c, &config, &key, &hub, plan, now),
                move |stored: &Vec<Stored>| push.push(stored),
            )
            .await
            .map_err(|e| match e {
                StoreError::Refused(message) => ServiceError::forbidden("not_hub", message),
                e => e.into(),
            })?;
        tracing::debug!(%room, hub = %peer, delivered = stored.len(), "notify accepted");
        Ok(())
    }

    /// Checks a notify request's messages and works out what each is, without storage.
    fn plan_notify(
        &self,
        room: &RoomId,
        request: NotifyRequest,
        now: u64,
    ) -> ServiceResult<Vec<Planned>> {
        let mut out = Vec::with_capacity(request.messages.len());
        for FanoutMessage {
            timestamp,
            message,
            extra,
        } in request.messages
        {
            let hash = digest(message.bytes());
            let planned = match (message.kind(), extra) {
                (MlsKind::Welcome, FanoutExtra::Welcome { ratchet_tree }) => {
                    let welcome = message
                        .to_welcome()
                        .and_then(|w| w.parse().ok())
                        .ok_or_else(|| bad_body("an undecodable Welcome"))?;
                    let refs = welcome
                        .secrets()
                        .iter()
                        .map(|s| s.new_member().as_slice().to_vec())
                        .collect();
                    let tree = match ratchet_tree {
                        RatchetTreeOption::Full { ratchet_tree } => Some(ratchet_tree.into_bytes()),
                        _ => None,
                    };
                    Planned::Welcome {
                        timestamp,
                        hash,
                        data: message.into_bytes(),
                        refs,
                        tree,
                    }
                }
                (kind, _) => {
                    let entry_kind = match kind {
                        MlsKind::Application => EntryKind::Message,
                        MlsKind::Proposal => EntryKind::Proposal,
                        MlsKind::Commit => EntryKind::Commit,
                        _ => return Err(bad_body("not a message a hub fans out")),
                    };
                    let expires_at = (entry_kind == EntryKind::Message)
                        .then(|| application_header(message.bytes()).ok())
                        .flatten()
                        .and_then(|h| h.expires_at);
                    if expires_at.is_some_and(|at| at <= now) {
                        // An expiring message that spent its life in the hub's outbox: nobody
                        // may read it any more, so it is not queued.
                        tracing::debug!(%room, "dropped an expired notification");
                    }
                    Planned::Message {
                        timestamp,
                        hash,
                        kind: entry_kind,
                        data: message.into_bytes(),
                        expires_at,
                    }
                }
            };
            out.push(planned);
        }
        Ok(out)
    }

    /// Forgets notify digests and handed-out KeyPackages older than they can matter, and the
    /// followed-room memberships of devices that no longer exist.
    pub async fn prune(&self, now: u64) -> ServiceResult<usize> {
        let before = now.saturating_sub(SEEN_FOR_MS) as i64;
        Ok(self
            .store
            .write(move |c| {
                let seen = c.execute(
                    "DELETE FROM notify_seen WHERE seen_at < ?1",
                    params![before],
                )?;
                let handed = c.execute(
                    "DELETE FROM handed_out_key_packages WHERE handed_out_at < ?1",
                    params![before],
                )?;
                let gone = c.execute(
                    "DELETE FROM remote_room_devices
                     WHERE device_id NOT IN (SELECT device_id FROM devices)",
                    [],
                )?;
                Ok(seen + handed + gone)
            })
            .await?)
    }

    /// At start-up no relay is in flight: forgets any a crash left behind.
    pub async fn clear_relays(&self) -> ServiceResult<usize> {
        Ok(self
            .store
            .write(|c| Ok(c.execute("DELETE FROM relays", [])?))
            .await?)
    }
}

/// Runs a relay as its own task and waits for it: a client hanging up drops only the wait, so
/// the hub's answer is always settled (the local members get what the hub took, and the pending
/// relay record is cleared).
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = ServiceResult<T>> + Send + 'static,
) -> ServiceResult<T> {
    tokio::spawn(work)
        .await
        .map_err(|e| ServiceError::Internal(format!("relay task failed: {e}")))?
}

/// One checked message of a notify request.
enum Planned {
    Welcome {
        timestamp: u64,
        hash: Vec<u8>,
        data: Vec<u8>,
        refs: Vec<Vec<u8>>,
        tree: Option<Vec<u8>>,
    },
    Message {
        timestamp: u64,
        hash: Vec<u8>,
        kind: EntryKind,
        data: Vec<u8>,
        expires_at: Option<u64>,
    },
}

/// Stores one notify request (inside the writer's transaction): new messages only, Welcomes to
/// the devices their refs name, the rest to the room's local members (minus a device that relayed
/// the message itself). A room is followed only from a Welcome for our devices.
fn apply_notify(
    c: &Connection,
    config: &ServerConfig,
    room: &str,
    hub: &str,
    plan: Vec<Planned>,
    now: u64,
) -> Result<Vec<Stored>, StoreError> {
    let mut entries = Vec::new();
    let mut followed = c
        .query_row(
            "SELECT 1 FROM remote_rooms WHERE room_id = ?1",
            params![room],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    let retained =
        |user_domain: &str, ts: u64| ts.max(now).saturating_add(config.retention_ms(user_domain));
    let domain_of = |device: &str| -> Result<String, StoreError> {
        Ok(c.query_row(
            "SELECT domain FROM devices WHERE device_id = ?1",
            params![device],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or_default())
    };
    for item in plan {
        match item {
            Planned::Welcome {
                timestamp,
                hash,
                data,
                refs,
                tree,
            } => {
                if seen(c, room, &hash)? {
                    continue;
                }
                let mut devices = Vec::new();
                let mut st = c.prepare_cached(
                    "SELECT device_id FROM handed_out_key_packages WHERE room_id = ?1 AND key_package_ref = ?2",
                )?;
                // A KeyPackage serves one Welcome (draft §5.2): its ref is spent by routing, so
                // the hub cannot bring the device back with it (after it left, say).
                let mut spend = c.prepare_cached(
                    "DELETE FROM handed_out_key_packages WHERE room_id = ?1 AND key_package_ref = ?2",
                )?;
                for r in &refs {
                    if let Some(d) = st
                        .query_row(params![room, r], |row| row.get::<_, String>(0))
                        .optional()?
                    {
                        spend.execute(params![room, r])?;
                        devices.push(d);
                    }
                }
                if devices.is_empty() {
                    if !followed {
                        return Err(StoreError::Refused(format!(
                            "no KeyPackages of this provider were handed out for room {room}"
                        )));
                    }
                    tracing::warn!(%room, "a Welcome for none of our devices; ignored");
                    mark_seen(c, room, &hash)?;
                    continue;
                }
                if !followed {
                    c.execute(
                        "INSERT OR IGNORE INTO remote_rooms (room_id, hub_domain, joined_at) VALUES (?1, ?2, ?3)",
                        params![room, hub, now as i64],
                    )?;
                    followed = true;
                }
                let data = Arc::new(data);
                let tree = tree.map(Arc::new);
                for device in devices {
                    c.execute(
                        "INSERT OR IGNORE INTO remote_room_devices (room_id, device_id) VALUES (?1, ?2)",
                        params![room, device],
                    )?;
                    let expires_at = retained(&domain_of(&device)?, timestamp);
                    entries.push(Outgoing {
                        device,
                        room_id: room.to_owned(),
                        kind: EntryKind::Welcome,
                        event: 0,
                        ts: timestamp,
                        data: data.clone(),
                        ratchet_tree: tree.clone(),
                        expires_at,
                    });
                }
                mark_seen(c, room, &hash)?;
            }
            Planned::Message {
                timestamp,
                hash,
                kind,
                data,
                expires_at,
            } => {
                if !followed {
                    return Err(StoreError::Refused(format!(
                        "room {room} is not followed here: its first notify must be a Welcome for our devices"
                    )));
                }
                if seen(c, room, &hash)? {
                    continue;
                }
                mark_seen(c, room, &hash)?;
                if expires_at.is_some_and(|at| at <= now) {
                    continue;
                }
                let relayed_by: Vec<String> = {
                    let mut st = c.prepare_cached(
                        "SELECT device_id FROM relays WHERE room_id = ?1 AND digest = ?2",
                    )?;
                    let rows = st.query_map(params![room, hash], |r| r.get(0))?;
                    rows.collect::<Result<_, _>>()?
                };
                let data = Arc::new(data);
                for device in member_devices(c, room)? {
                    if relayed_by.contains(&device) {
                        continue;
                    }
                    let kept = retained(&domain_of(&device)?, timestamp);
                    entries.push(Outgoing {
                        device,
                        room_id: room.to_owned(),
                        kind,
                        event: 0,
                        ts: timestamp,
                        data: data.clone(),
                        ratchet_tree: None,
                        expires_at: expires_at.map_or(kept, |at| at.min(kept)),
                    });
                }
            }
        }
    }
    enqueue(c, &entries)
}

fn seen(c: &Connection, room: &str, hash: &[u8]) -> Result<bool, StoreError> {
    Ok(
        c.prepare_cached("SELECT 1 FROM notify_seen WHERE room_id = ?1 AND digest = ?2")?
            .query_row(params![room, hash], |_| Ok(()))
            .optional()?
            .is_some(),
    )
}

fn mark_seen(c: &Connection, room: &str, hash: &[u8]) -> Result<(), StoreError> {
    c.prepare_cached(
        "INSERT OR IGNORE INTO notify_seen (room_id, digest, seen_at) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![room, hash, now_ms() as i64])?;
    Ok(())
}

fn member_devices(c: &Connection, room: &str) -> Result<Vec<String>, StoreError> {
    let mut st =
        c.prepare_cached("SELECT device_id FROM remote_room_devices WHERE room_id = ?1")?;
    let rows = st.query_map(params![room], |r| r.get(0))?;
    Ok(rows.collect::<Result<Vec<String>, _>>()?)
}

/// What a follower can say about a room: its URI and hub.
fn bare_info(room: &RoomId) -> RoomInfo {
    RoomInfo {
        room_id: room.to_string(),
        hub: room.hub().to_string(),
        kind: None,
        name: None,
        epoch: None,
        members: Vec::new(),
        admins: Vec::new(),
    }
}

/// A client's GroupInfo (an MlsMessage) as MIMI carries it (bare).
fn bare_group_info(bytes: Vec<u8>) -> ServiceResult<mimi::GroupInfo> {
    let bad = || ServiceError::bad("invalid_group_info", "group_info is not an MLS GroupInfo");
    let message = MlsMessage::from_bytes(bytes).map_err(|_| bad())?;
    if message.kind() != MlsKind::GroupInfo {
        return Err(bad());
    }
    mimi::GroupInfo::from_bytes(message.bytes()[4..].to_vec()).map_err(|_| bad())
}

/// `"code: message"` (how Parley hubs describe refusals) into its parts.
fn split_description(desc: &[u8]) -> (&'static str, String) {
    let text = String::from_utf8_lossy(desc).into_owned();
    let code = match text.split_once(':').map(|(c, _)| c.trim()) {
        Some("pending_proposals") => "pending_proposals",
        Some("policy") => "policy",
        Some("not_admin") => "not_admin",
        Some("not_committer") => "not_committer",
        Some("not_proposer") => "not_proposer",
        Some("unknown_device") => "unknown_device",
        Some("room_full") => "room_full",
        Some("no_consent") => "no_consent",
        Some("invalid_commit") => "invalid_commit",
        Some("invalid_name") => "invalid_name",
        _ => "not_allowed",
    };
    (code, text)
}
