//! The Parley provider server: accounts and devices, KeyPackages, the hub of each room it
//! created, and durable per-device delivery queues, behind an HTTP + WebSocket client API.
//!
//! Layout: imports point one way only, down this list (ARCHITECTURE.md lists every module's).
//! - Edges, which never import each other: `http` (the client API) and `federation` (the MIMI
//!   listener for peers), both reaching the services through `app::App`.
//! - Services, each owning its tables; each imports only services after it here: `key_material`,
//!   `ephemeral`, `follower` (rooms hubbed elsewhere), `hub`, `consent`, `assets`, `outbox`,
//!   `accounts`.
//! - Infrastructure, likewise: `peers` (the outbound MIMI client), `delivery` (queues and push),
//!   `error` (`ServiceError`, and `ApiError` for both edges), `store` (SQLite with group commit),
//!   `tls`, `config`, `limits`, `mls` (the hub's window on MLS public state), `clock`.
//!
//! This root builds it all (`Server::start`) and hands the routers to `net`.
//!
//! **Architecture invariant:** the server never sees plaintext or MLS secrets; it stores and
//! forwards ciphertext and public group state only.

pub mod accounts;
pub mod app;
pub mod assets;
pub mod clock;
pub mod config;
pub mod consent;
pub mod crypto;
pub mod delivery;
pub mod ephemeral;
pub mod error;
pub mod federation;
pub mod follower;
pub mod http;
pub mod hub;
pub mod key_material;
pub mod limits;
pub mod mls;
pub mod net;
pub mod outbox;
pub mod peers;
pub mod store;
pub mod tls;

use accounts::Accounts;
use app::App;
use assets::Assets;
use config::{ConfigError, ServerConfig};
use consent::Consent;
use crypto::{CryptoError, HubKeys};
use delivery::Delivery;
use follower::Follower;
use hub::Hub;
use key_material::KeyMaterial;
use limits::RateLimiter;
use outbox::Outbox;
use peers::{PeerClient, PeerError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use store::{Store, StoreError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use clock::now_ms;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Peers(#[from] PeerError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// A running server. Tests bind port 0 and read [`Server::local_addr`].
pub struct Server {
    addr: SocketAddr,
    federation_addr: Option<SocketAddr>,
    tls: bool,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Validates the config, opens storage, binds, and starts serving in the background.
    pub async fn start(mut config: ServerConfig) -> Result<Self, ServerError> {
        config.validate()?;
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(tls::tls_acceptor(cert, key)?),
            _ => None,
        };
        let store = Store::open(&config.data)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| ServerError::Bind(config.listen, e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| ServerError::Bind(config.listen, e))?;
        let config = Arc::new(config);
        let (stop, shutdown) = watch::channel(false);
        let accounts = Arc::new(Accounts::new(store.clone(), config.clone()));
        let delivery = Arc::new(Delivery::new(store.clone()));
        let peers = PeerClient::new(&config)?.map(Arc::new);
        let outbox = Outbox::new(
            store.clone(),
            peers.clone(),
            Duration::from_secs(config.peer_retry_cap_secs),
            shutdown.clone(),
        );
        let consent = Arc::new(Consent::new(store.clone(), config.clone(), outbox.clone()).await?);
        let keys = Arc::new(
            HubKeys::load(
                &store,
                config.domains.iter().map(|d| d.name.clone()).collect(),
            )
            .await?,
        );
        let store_for_assets = store.clone();
        let hub = Arc::new(Hub::new(
            store.clone(),
            accounts.clone(),
            delivery.clone(),
            config.clone(),
            outbox.clone(),
            consent.clone(),
            keys.clone(),
        ));
        let follower = Arc::new(Follower::new(
            store,
            config.clone(),
            delivery.clone(),
            peers.clone(),
        ));
        let stale = follower
            .clear_relays()
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?;
        if stale > 0 {
            tracing::info!(stale, "cleared relays left by an earlier run");
        }
        let key_material = Arc::new(KeyMaterial::new(
            config.clone(),
            accounts.clone(),
            hub.clone(),
            follower.clone(),
            consent.clone(),
            peers.clone(),
        ));
        let assets = Arc::new(Assets::new(store_for_assets, config.clone())?);
        let ephemeral = Arc::new(ephemeral::Ephemeral::new(
            config.clone(),
            hub.clone(),
            follower.clone(),
            consent.clone(),
            peers.clone(),
        ));
        outbox.resume().await?;
        let app = Arc::new(App {
            config: config.clone(),
            accounts,
            hub,
            delivery: delivery.clone(),
            consent,
            follower,
            key_material,
            outbox,
            assets: assets.clone(),
            ephemeral,
            keys,
            peers,
            peer_requests: RateLimiter::new(
                config.limits.peer_requests_per_second,
                config.limits.peer_request_burst,
            ),
            shutdown: shutdown.clone(),
        });
        tokio::spawn(expiry_loop(
            delivery,
            assets,
            app.follower.clone(),
            Duration::from_millis(config.expiry_sweep_ms),
            shutdown.clone(),
        ));
        let mut tasks = Vec::new();
        let federation_addr = match config.federation_listen {
            Some(fed) => {
                let acceptor = tls::federation_acceptor(&config)?;
                let listener = TcpListener::bind(fed)
                    .await
                    .map_err(|e| ServerError::Bind(fed, e))?;
                let bound = listener
                    .local_addr()
                    .map_err(|e| ServerError::Bind(fed, e))?;
                tracing::info!(addr = %bound, "MIMI federation listener (mutual TLS)");
                tasks.push(tokio::spawn(net::serve(
                    listener,
                    federation::router(app.clone()),
                    Some(acceptor),
                    config.limits.max_connections,
                    shutdown.clone(),
                )));
                Some(bound)
            }
            None => None,
        };
        let router = http::router(app);
        let domains: Vec<&str> = config.domains.iter().map(|d| d.name.as_str()).collect();
        tracing::info!(%addr, tls = tls.is_some(), domains = ?domains, data = %config.data.display(), "parley server listening");
        let tls_on = tls.is_some();
        tasks.push(tokio::spawn(net::serve(
            listener,
            router,
            tls,
            config.limits.max_connections,
            shutdown,
        )));
        Ok(Self {
            addr,
            federation_addr,
            tls: tls_on,
            stop,
            tasks,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound address of the federation (MIMI, mutual TLS) listener, if configured.
    pub fn federation_addr(&self) -> Option<SocketAddr> {
        self.federation_addr
    }

    /// The base URL clients use, e.g. `http://127.0.0.1:8420`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Stops accepting, closes push connections, drains requests and returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        tracing::info!("parley server stopped");
    }
}

/// Deletes expired queue entries, assets and old notify digests every `every` until shutdown.
async fn expiry_loop(
    delivery: Arc<Delivery>,
    assets: Arc<Assets>,
    follower: Arc<Follower>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        match delivery.expire(now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, "dropped expired queue entries"),
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
        }
        match assets.expire(now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, "deleted expired assets"),
            Err(e) => tracing::warn!(error = %e, "asset expiry sweep failed"),
        }
        if let Err(e) = follower.prune(now_ms()).await {
            tracing::warn!(error = %e, "notify digest sweep failed");
        }
    }
}
