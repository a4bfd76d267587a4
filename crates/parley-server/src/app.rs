//! The services a request can reach, as both edges (`http`, `federation`) see them; built by
//! `Server::start`.

use crate::accounts::Accounts;
use crate::assets::Assets;
use crate::config::ServerConfig;
use crate::consent::Consent;
use crate::crypto::HubKeys;
use crate::delivery::Delivery;
use crate::ephemeral::Ephemeral;
use crate::follower::Follower;
use crate::hub::Hub;
use crate::key_material::KeyMaterial;
use crate::limits::RateLimiter;
use crate::outbox::Outbox;
use crate::peers::PeerClient;
use std::sync::Arc;
use tokio::sync::watch;

/// The services a request can reach.
pub struct App {
    pub config: Arc<ServerConfig>,
    pub accounts: Arc<Accounts>,
    pub hub: Arc<Hub>,
    pub delivery: Arc<Delivery>,
    pub consent: Arc<Consent>,
    /// Rooms hubbed elsewhere.
    pub follower: Arc<Follower>,
    /// KeyPackage claims across providers and MIMI `keyMaterial`.
    pub key_material: Arc<KeyMaterial>,
    pub outbox: Arc<Outbox>,
    pub assets: Arc<Assets>,
    /// Typing indicators and other messages for connected devices only.
    pub ephemeral: Arc<Ephemeral>,
    /// The hub signing keys (MLS external senders) of the hosted domains.
    pub keys: Arc<HubKeys>,
    /// Outbound MIMI client (`None` without federation settings).
    pub peers: Option<Arc<PeerClient>>,
    /// MIMI requests per peer provider.
    pub peer_requests: RateLimiter,
    pub shutdown: watch::Receiver<bool>,
}
