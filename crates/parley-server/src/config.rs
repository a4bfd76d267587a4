//! Server settings: defaults, the TOML config file, and per-domain policy.

use parley_proto::Domain;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

/// How new accounts may be created on a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Registration {
    #[default]
    Open,
    InviteOnly,
}

/// One hosted domain and its policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    pub name: String,
    #[serde(default)]
    pub registration: Registration,
    /// Single-use invite codes accepted when registration is invite-only.
    #[serde(default)]
    pub invites: Vec<String>,
    /// Largest MLS application message a device of this domain may send, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Days an unacknowledged queue entry for a device of this domain is kept.
    #[serde(default = "default_retention_days")]
    pub retention_days: u64,
    /// Most devices a room hubbed on this domain may hold.
    #[serde(default = "default_max_room_devices")]
    pub max_room_devices: usize,
    /// Largest attachment (encrypted) a user of this domain may upload, in bytes.
    #[serde(default = "default_max_upload_bytes")]
    pub max_upload_bytes: u64,
    /// Most bytes of attachments a user of this domain may have stored at once (until they
    /// expire or the user deletes them).
    #[serde(default = "default_max_stored_bytes_per_user")]
    pub max_stored_bytes_per_user: u64,
}

impl DomainConfig {
    pub fn with_defaults(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            registration: Registration::Open,
            invites: Vec::new(),
            max_message_bytes: default_max_message_bytes(),
            retention_days: default_retention_days(),
            max_room_devices: default_max_room_devices(),
            max_upload_bytes: default_max_upload_bytes(),
            max_stored_bytes_per_user: default_max_stored_bytes_per_user(),
        }
    }
}

/// Server-wide limits; every size and rate has one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_key_packages_per_upload: usize,
    pub max_stored_key_packages: usize,
    /// Sustained messages + commits per second per device, and the burst allowed above it.
    pub messages_per_second: f64,
    pub message_burst: f64,
    /// Authenticated API requests per second per device (all endpoints), and the burst.
    pub requests_per_second: f64,
    pub request_burst: f64,
    /// Failed logins per user per minute before further attempts are refused.
    pub logins_per_minute: f64,
    /// Accounts per minute, per server (registration is unauthenticated).
    pub registrations_per_minute: f64,
    pub max_connections: usize,
    pub max_queue_page: usize,
    pub max_devices_per_user: usize,
    /// Rooms whose public state is kept in memory; idle ones beyond this are reloaded on use.
    pub max_cached_rooms: usize,
    /// MIMI requests per second each peer provider may make, and the burst above it.
    pub peer_requests_per_second: f64,
    pub peer_request_burst: f64,
    /// Contact (consent) requests a user may send per minute, to any provider.
    pub contact_requests_per_minute: f64,
    /// Ephemeral messages (typing indicators) per second per device, and the burst above it:
    /// typing indicators come one per line typed, a few seconds apart.
    pub ephemeral_per_second: f64,
    pub ephemeral_burst: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_key_packages_per_upload: 100,
            max_stored_key_packages: 500,
            messages_per_second: 50.0,
            message_burst: 200.0,
            requests_per_second: 200.0,
            request_burst: 1000.0,
            logins_per_minute: 10.0,
            registrations_per_minute: 600.0,
            max_connections: 10_000,
            max_queue_page: 1000,
            max_devices_per_user: 16,
            max_cached_rooms: 10_000,
            peer_requests_per_second: 2000.0,
            peer_request_burst: 10_000.0,
            contact_requests_per_minute: 20.0,
            ephemeral_per_second: 2.0,
            ephemeral_burst: 10.0,
        }
    }
}

fn default_max_message_bytes() -> usize {
    64 * 1024
}
fn default_retention_days() -> u64 {
    DEFAULT_RETENTION_DAYS
}
fn default_max_upload_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_max_stored_bytes_per_user() -> u64 {
    4 * 1024 * 1024 * 1024
}
fn default_max_room_devices() -> usize {
    1000
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8420))
}
fn default_data() -> PathBuf {
    PathBuf::from("./parley-data")
}

/// Everything `parley serve` needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_data")]
    pub data: PathBuf,
    #[serde(default, rename = "domain")]
    pub domains: Vec<DomainConfig>,
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Allow plain HTTP on a non-loopback address (testing only).
    #[serde(default)]
    pub insecure_http: bool,
    #[serde(default)]
    pub limits: Limits,
    /// Address of the provider-to-provider (MIMI) listener; always mutual TLS.
    #[serde(default)]
    pub federation_listen: Option<SocketAddr>,
    /// This provider's certificate chains (PEM), one per hosted domain or one naming them all.
    #[serde(default)]
    pub federation_cert: Vec<PathBuf>,
    /// The private keys of `federation_cert`, in the same order.
    #[serde(default)]
    pub federation_key: Vec<PathBuf>,
    /// CA certificate(s) (PEM) that peer providers' certificates must chain to.
    #[serde(default)]
    pub peer_ca: Option<PathBuf>,
    /// Base URLs of peer providers by domain; others are reached at `https://DOMAIN`.
    #[serde(default)]
    pub peers: std::collections::BTreeMap<String, String>,
    /// Longest wait, in seconds, between retries of deliveries to a peer that is down.
    #[serde(default = "default_peer_retry_cap")]
    pub peer_retry_cap_secs: u64,
    /// How often expired queue entries (past their retention, or an expiring message's
    /// `expires_at`) are deleted, in milliseconds. Expired entries are never delivered even
    /// before the sweep; the sweep frees the space.
    #[serde(default = "default_expiry_sweep_ms")]
    pub expiry_sweep_ms: u64,
}

fn default_peer_retry_cap() -> u64 {
    60
}
fn default_expiry_sweep_ms() -> u64 {
    60_000
}

/// Retention for a user of a domain this deployment does not host (or when none is set).
const DEFAULT_RETENTION_DAYS: u64 = 30;
const DAY_MS: u64 = 86_400_000;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            data: default_data(),
            domains: Vec::new(),
            tls_cert: None,
            tls_key: None,
            insecure_http: false,
            limits: Limits::default(),
            federation_listen: None,
            federation_cert: Vec::new(),
            federation_key: Vec::new(),
            peer_ca: None,
            peers: Default::default(),
            peer_retry_cap_secs: default_peer_retry_cap(),
            expiry_sweep_ms: default_expiry_sweep_ms(),
        }
    }
}

impl ServerConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Hosts `name` with default policy unless the config already lists it.
    pub fn add_domain(&mut self, name: &str) {
        if !self.domains.iter().any(|d| d.name == name) {
            self.domains.push(DomainConfig::with_defaults(name));
        }
    }

    /// Checks the settings hang together; fills in the `localhost` domain when none is given.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if self.domains.is_empty() {
            self.add_domain("localhost");
        }
        for d in &self.domains {
            Domain::parse(&d.name).map_err(|e| ConfigError::Invalid(e.to_string()))?;
            if d.max_message_bytes == 0 || d.max_room_devices < 2 {
                return Err(ConfigError::Invalid(format!(
                    "domain {}: max_message_bytes must be > 0 and max_room_devices >= 2",
                    d.name
                )));
            }
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "--tls-cert and --tls-key must be given together".into(),
                ))
            }
            (None, None) if !self.listen.ip().is_loopback() && !self.insecure_http => {
                return Err(ConfigError::Invalid(format!(
                    "refusing plain HTTP on non-loopback address {}: give --tls-cert/--tls-key, or --insecure-http to override",
                    self.listen
                )))
            }
            _ => {}
        }
        self.validate_federation()
    }

    fn validate_federation(&self) -> Result<(), ConfigError> {
        for (domain, url) in &self.peers {
            Domain::parse(domain)
                .map_err(|e| ConfigError::Invalid(format!("peer {domain}: {e}")))?;
            if !url.starts_with("https://") {
                return Err(ConfigError::Invalid(format!(
                    "peer {domain}: {url} must be an https:// URL"
                )));
            }
        }
        if self.peer_retry_cap_secs == 0 {
            return Err(ConfigError::Invalid(
                "peer_retry_cap_secs must be at least 1".into(),
            ));
        }
        if self.expiry_sweep_ms == 0 {
            return Err(ConfigError::Invalid(
                "expiry_sweep_ms must be at least 1".into(),
            ));
        }
        if self.federation_listen.is_none() {
            return Ok(());
        }
        if self.federation_cert.is_empty()
            || self.federation_cert.len() != self.federation_key.len()
        {
            return Err(ConfigError::Invalid(
                "--federation-listen needs --federation-cert and --federation-key, given in pairs"
                    .into(),
            ));
        }
        if self.peer_ca.is_none() {
            return Err(ConfigError::Invalid(
                "--federation-listen needs --peer-ca: peers are always authenticated with mutual TLS".into(),
            ));
        }
        Ok(())
    }

    pub fn domain(&self, name: &str) -> Option<&DomainConfig> {
        self.domains.iter().find(|d| d.name == name)
    }

    /// Whether this deployment hosts `name` (its domains count as one provider).
    pub fn hosts(&self, name: &str) -> bool {
        self.domain(name).is_some()
    }

    /// How long an unacknowledged queue entry for a user of `domain` is kept, in milliseconds.
    pub fn retention_ms(&self, domain: &str) -> u64 {
        self.domain(domain)
            .map_or(DEFAULT_RETENTION_DAYS, |d| d.retention_days)
            .saturating_mul(DAY_MS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_config_with_domain_policy() {
        let mut c: ServerConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:9000"
            data = "/tmp/x"
            [[domain]]
            name = "chirp.test"
            registration = "invite-only"
            invites = ["abc"]
            max_message_bytes = 1000
            [[domain]]
            name = "wave.test"
            [limits]
            messages_per_second = 5.0
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.listen.port(), 9000);
        let chirp = c.domain("chirp.test").unwrap();
        assert_eq!(chirp.registration, Registration::InviteOnly);
        assert_eq!(chirp.max_message_bytes, 1000);
        assert_eq!(c.domain("wave.test").unwrap().retention_days, 30);
        assert_eq!(c.limits.messages_per_second, 5.0);
        assert_eq!(c.limits.max_body_bytes, 1 << 20);
        assert_eq!(c.limits.ephemeral_per_second, 2.0);
        assert_eq!(c.limits.ephemeral_burst, 10.0);
    }

    #[test]
    fn the_ephemeral_rate_is_configurable() {
        let c: ServerConfig = toml::from_str(
            r#"
            [limits]
            ephemeral_per_second = 0.5
            ephemeral_burst = 3.0
            "#,
        )
        .unwrap();
        assert_eq!(c.limits.ephemeral_per_second, 0.5);
        assert_eq!(c.limits.ephemeral_burst, 3.0);
        assert_eq!(c.limits.messages_per_second, 50.0);
    }

    #[test]
    fn defaults_serve_localhost_on_loopback() {
        let mut c = ServerConfig::default();
        c.validate().unwrap();
        assert_eq!(c.domains[0].name, "localhost");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8420");
    }

    #[test]
    fn plain_http_off_loopback_is_refused() {
        let mut c = ServerConfig {
            listen: "0.0.0.0:8420".parse().unwrap(),
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--insecure-http"));
        c.insecure_http = true;
        c.validate().unwrap();
    }

    #[test]
    fn retention_and_the_expiry_sweep_are_configurable() {
        let mut c: ServerConfig = toml::from_str(
            r#"
            expiry_sweep_ms = 250
            [[domain]]
            name = "chirp.test"
            retention_days = 2
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.expiry_sweep_ms, 250);
        assert_eq!(c.retention_ms("chirp.test"), 2 * DAY_MS);
        assert_eq!(c.retention_ms("elsewhere.test"), 30 * DAY_MS);
        assert_eq!(ServerConfig::default().expiry_sweep_ms, 60_000);
        c.expiry_sweep_ms = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn unknown_keys_and_bad_domains_are_errors() {
        assert!(toml::from_str::<ServerConfig>("lisen = \"x\"").is_err());
        let mut c = ServerConfig::default();
        c.add_domain("Bad_Domain");
        assert!(c.validate().is_err());
    }
}
