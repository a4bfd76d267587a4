//! What a kit run needs to know: the peer, how to reach it, who the kit speaks as, its TLS
//! material, where it listens for the peer's calls, the peer's cooperating test user.

use parley_proto::{Domain, UserId};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Longest any single request to the peer may take (also bounded by [`KitConfig::timeout`]).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct KitConfig {
    /// The provider under test.
    pub peer: Domain,
    /// `https://HOST[:PORT][/PATH]` where the peer's federation listener is. `HOST` may be an
    /// address; the peer's certificate is checked against `peer` whatever it names (like
    /// parley-server's `[peers]`).
    pub peer_url: String,
    /// The provider domain the kit speaks as; its certificate must name it.
    pub as_domain: Domain,
    /// PEM certificate chain naming `as_domain` (server and client auth).
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA certificate(s) the peer's certificate must chain to (and the kit's peer trusts).
    pub ca: PathBuf,
    /// Where the kit's own federation listener accepts the peer's calls (notify,
    /// updateConsent, ...). The peer must be configured to reach `as_domain` here.
    pub listen: SocketAddr,
    /// A test user at the peer whose operator follows the printed `WAIT` steps; without it the
    /// cooperative flow is skipped.
    pub peer_user: Option<UserId>,
    /// How long to wait for each step the peer (or its operator) must take, and at most how long
    /// one request may take.
    pub timeout: Duration,
}

impl KitConfig {
    /// The per-request timeout.
    pub fn request_timeout(&self) -> Duration {
        self.timeout.min(REQUEST_TIMEOUT)
    }
}
