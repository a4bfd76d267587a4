//! Ephemeral messages (typing indicators): end-to-end encrypted MLS application messages that
//! reach only the member devices connected right now. Nothing here touches the database, the
//! queues or the outbox: a device that is offline, or connects later, never sees them, and no
//! provider keeps a trace. A Parley extension; MIMI leaves ephemeral messages open.
//!
//! The path mirrors a message's, minus durability: the sender's provider checks the sender is
//! a member, then either is the room's hub, or relays to the hub (`x-parley-ephemeral`, best
//! effort). The hub hands it to its connected member devices and to each other provider with
//! members (`x-parley-ephemeral` again, best effort, fire and forget), which hands it to its
//! connected member devices. Push subscribers opt in (`GET /v1/ws?ephemeral=true`).

use crate::accounts::AuthDevice;
use crate::config::ServerConfig;
use crate::consent::Consent;
use crate::error::{ServiceError, ServiceResult};
use crate::follower::Follower;
use crate::hub::{EphemeralRecipients, Hub};
use crate::limits::RateLimiter;
use crate::mls::application_header;
use crate::peers::PeerClient;
use parley_proto::ids::DeviceUri;
use parley_proto::mimi::{Body, EphemeralMessage, IdentifierUri, MlsMessage};
use parley_proto::{Domain, RoomId};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// The federation endpoint (and its directory name).
pub const EPHEMERAL: &str = "x-parley-ephemeral";
/// Largest ephemeral message: a typing indicator is a few hundred bytes.
pub const MAX_EPHEMERAL_BYTES: usize = 8 * 1024;
/// Frames buffered per connection; when full, new ones are dropped (never the connection).
const SUBSCRIBER_BUFFER: usize = 32;
/// A best-effort request to another provider gives up after this.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// One ephemeral message on its way to a connected device.
#[derive(Debug)]
pub struct EphemeralFrame {
    pub room: String,
    pub data: Vec<u8>,
}

/// Push connections that asked for ephemeral messages, per device.
#[derive(Default)]
pub struct Subscribers {
    by_device: Mutex<HashMap<String, Vec<mpsc::Sender<Arc<EphemeralFrame>>>>>,
}

impl Subscribers {
    pub fn subscribe(&self, device: &str) -> mpsc::Receiver<Arc<EphemeralFrame>> {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        if let Ok(mut subs) = self.by_device.lock() {
            subs.entry(device.to_owned()).or_default().push(tx);
        }
        rx
    }

    /// Drops a device's closed subscriptions (called when a connection ends).
    pub fn prune(&self, device: &str) {
        if let Ok(mut subs) = self.by_device.lock() {
            if let Some(list) = subs.get_mut(device) {
                list.retain(|tx| !tx.is_closed());
                if list.is_empty() {
                    subs.remove(device);
                }
            }
        }
    }

    /// Hands `frame` to every connection of `devices` without waiting; returns how many took
    /// it. A connection that is behind misses it, which is all an ephemeral message asks.
    fn deliver<'a>(
        &self,
        devices: impl IntoIterator<Item = &'a str>,
        frame: &Arc<EphemeralFrame>,
    ) -> usize {
        let Ok(subs) = self.by_device.lock() else {
            return 0;
        };
        devices
            .into_iter()
            .filter_map(|d| subs.get(d))
            .flatten()
            .filter(|tx| tx.try_send(frame.clone()).is_ok())
            .count()
    }
}

pub struct Ephemeral {
    pub subscribers: Subscribers,
    config: Arc<ServerConfig>,
    hub: Arc<Hub>,
    follower: Arc<Follower>,
    consent: Arc<Consent>,
    peers: Option<Arc<PeerClient>>,
    rate: RateLimiter,
}

fn unknown_room(room: &RoomId) -> ServiceError {
    ServiceError::not_found(
        "unknown_room",
        format!("no room {room} that you are a member of"),
    )
}

impl Ephemeral {
    pub fn new(
        config: Arc<ServerConfig>,
        hub: Arc<Hub>,
        follower: Arc<Follower>,
        consent: Arc<Consent>,
        peers: Option<Arc<PeerClient>>,
    ) -> Self {
        let rate = RateLimiter::new(
            config.limits.ephemeral_per_second,
            config.limits.ephemeral_burst,
        );
        Self {
            subscribers: Subscribers::default(),
            config,
            hub,
            follower,
            consent,
            peers,
            rate,
        }
    }

    /// `POST /v1/rooms/{id}/ephemeral`: from a local client. Accepted once the sender is known
    /// to be a member; delivery is best effort and not waited for.
    pub async fn send(
        &self,
        caller: &AuthDevice,
        room: &RoomId,
        message: Vec<u8>,
    ) -> ServiceResult<()> {
        let sender = caller.uri();
        let group_id = check_message(&message)?;
        if !self.rate.allow(&sender.to_string()) {
            return Err(ServiceError::RateLimited(
                "this device sends ephemeral messages too fast".into(),
            ));
        }
        if let Some(targets) = self
            .hub
            .ephemeral_recipients(&sender, room, &group_id)
            .await?
        {
            self.fan_out(&sender, room, targets, message);
            return Ok(());
        }
        let hub = self
            .follower
            .hub_of(room)
            .ok_or_else(|| unknown_room(room))?;
        self.follower.room_info(caller, room).await?; // members only
        let body = EphemeralMessage {
            sender: IdentifierUri::new(&sender.to_string()),
            recipients: Vec::new(),
            message: mls_message(message)?,
        };
        self.post_later(caller.user.domain().clone(), hub, room, body);
        Ok(())
    }

    /// `POST /v1/x-parley-ephemeral/{roomId}` from `peer`: a follower relaying its client's
    /// message to us as the hub, or the hub handing one to us as a follower.
    pub async fn receive(&self, peer: &Domain, room: &RoomId, body: &[u8]) -> ServiceResult<()> {
        let request = EphemeralMessage::decode(body)
            .map_err(|e| ServiceError::bad("invalid_body", e.to_string()))?;
        let group_id = check_message(request.message.bytes())?;
        let sender = client_uri(&request.sender)?;
        // To a room hubbed here a peer speaks only for its own clients; checked before any
        // membership, so its answers reveal nothing about other providers' members.
        if sender.user.domain() == peer {
            if let Some(targets) = self
                .hub
                .ephemeral_recipients(&sender, room, &group_id)
                .await?
            {
                self.fan_out(&sender, room, targets, request.message.into_bytes());
                return Ok(());
            }
        }
        match self.follower.hub_of(room) {
            Some(hub) if hub == *peer => self.deliver_here(&sender, room, &request).await,
            Some(_) => Err(ServiceError::forbidden(
                "not_hub",
                format!("{peer} is not the hub of room {room}"),
            )),
            None => Err(unknown_room(room)),
        }
    }

    /// As a follower: hands the hub's message to the listed local clients that are members
    /// of the room here and have not blocked the sender.
    async fn deliver_here(
        &self,
        sender: &DeviceUri,
        room: &RoomId,
        request: &EphemeralMessage,
    ) -> ServiceResult<()> {
        let members: BTreeSet<String> = self
            .follower
            .local_devices(room)
            .await?
            .into_iter()
            .collect();
        let mut devices = Vec::new();
        for recipient in &request.recipients {
            let client = client_uri(recipient)?;
            let local = self.config.hosts(client.user.domain().as_str());
            let member = members.contains(client.device.as_str());
            if local && member && !self.consent.blocked(&sender.user, &client.user) {
                devices.push(client.device.as_str().to_owned());
            }
        }
        let frame = Arc::new(EphemeralFrame {
            room: room.to_string(),
            data: request.message.bytes().to_vec(),
        });
        let delivered = self
            .subscribers
            .deliver(devices.iter().map(String::as_str), &frame);
        tracing::debug!(%room, delivered, "ephemeral message from the hub");
        Ok(())
    }

    /// As the hub: to the connected local member devices now, and to each other provider
    /// with members in the background.
    fn fan_out(
        &self,
        sender: &DeviceUri,
        room: &RoomId,
        targets: EphemeralRecipients,
        message: Vec<u8>,
    ) {
        let EphemeralRecipients {
            hub_domain,
            local,
            remote,
        } = targets;
        let frame = Arc::new(EphemeralFrame {
            room: room.to_string(),
            data: message,
        });
        let delivered = self
            .subscribers
            .deliver(local.iter().map(String::as_str), &frame);
        tracing::debug!(%room, delivered, peers = remote.len(), "ephemeral message");
        let Ok(hub_domain) = Domain::parse(&hub_domain) else {
            return;
        };
        for (domain, clients) in remote {
            let Ok(peer) = Domain::parse(&domain) else {
                continue;
            };
            let Ok(message) = mls_message(frame.data.clone()) else {
                return;
            };
            let body = EphemeralMessage {
                sender: IdentifierUri::new(&sender.to_string()),
                recipients: clients.iter().map(|c| IdentifierUri::new(c)).collect(),
                message,
            };
            self.post_later(hub_domain.clone(), peer, room, body);
        }
    }

    /// Sends `body` to `peer` in the background, once, and forgets about it.
    fn post_later(&self, as_domain: Domain, peer: Domain, room: &RoomId, body: EphemeralMessage) {
        let Some(peers) = self.peers.clone() else {
            return;
        };
        let room = room.path_form().to_owned();
        tokio::spawn(async move {
            let post = peers.post(&as_domain, &peer, EPHEMERAL, &room, body.encode());
            match tokio::time::timeout(PEER_TIMEOUT, post).await {
                Ok(Ok((status, _))) if status.is_success() => {}
                Ok(Ok((status, _))) => {
                    tracing::debug!(%peer, %room, %status, "ephemeral message refused")
                }
                Ok(Err(e)) => tracing::debug!(%peer, %room, "ephemeral message lost: {e}"),
                Err(_) => tracing::debug!(%peer, %room, "ephemeral message timed out"),
            }
        });
    }
}

/// The message's MLS group id, once it is small enough and an MLS application message (the hub
/// checks the group is the room's).
fn check_message(message: &[u8]) -> ServiceResult<Vec<u8>> {
    if message.len() > MAX_EPHEMERAL_BYTES {
        return Err(ServiceError::too_large(
            "message_too_large",
            format!("ephemeral messages are limited to {MAX_EPHEMERAL_BYTES} bytes"),
        ));
    }
    let header = application_header(message)
        .map_err(|e| ServiceError::bad("invalid_message", e.to_string()))?;
    Ok(header.group_id)
}

fn mls_message(bytes: Vec<u8>) -> ServiceResult<MlsMessage> {
    MlsMessage::from_bytes(bytes).map_err(|e| ServiceError::bad("invalid_message", e.to_string()))
}

fn client_uri(uri: &IdentifierUri) -> ServiceResult<DeviceUri> {
    uri.as_str()
        .ok()
        .and_then(|s| DeviceUri::parse(s).ok())
        .ok_or_else(|| ServiceError::bad("invalid_body", "not a client URI"))
}
