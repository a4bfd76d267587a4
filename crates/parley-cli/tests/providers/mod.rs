//! In-process servers for the end-to-end tests through the client library: a bare server
//! hosting two domains, held by the test, or [`Providers`] (one server hosting two domains, or
//! independent providers peered over MIMI with mutual TLS from a `parley dev-ca`, which a test
//! may stop and start again, or talk to as a peer of its own); users, devices, consent, rooms,
//! checked syncs, syncing until something arrives, and what a provider queues.
#![allow(dead_code)] // each test binary uses a different subset

use parley_client::{Device, Event};
use parley_proto::{RoomId, UserId};
use parley_server::config::ServerConfig;
use parley_server::Server;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const PASSWORD: &str = "password-123";
/// How long a test waits for something to cross providers.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Providers in this process: their servers, by domain, and where their data lives.
pub struct Providers {
    pub dir: PathBuf,
    /// The running servers (a stopped provider has none until it starts again).
    pub servers: BTreeMap<&'static str, Server>,
    /// Each federated provider's MIMI listener (none for [`Providers::one_server`]).
    pub fed: BTreeMap<&'static str, SocketAddr>,
    /// The config each server started with, its API port the one it bound, to start it again.
    configs: BTreeMap<&'static str, ServerConfig>,
}

impl Providers {
    /// One server hosting `chirp.test` and `wave.test` (no federation): two domains, one
    /// provider. `tweak` adjusts the config (limits) before start.
    pub async fn one_server(dir: &Path, tweak: impl Fn(&mut ServerConfig)) -> Self {
        let mut config = ServerConfig {
            expiry_sweep_ms: 100,
            ..two_domains(dir.join("data-server"))
        };
        tweak(&mut config);
        let mut net = Self::empty(dir, BTreeMap::new());
        net.launch("chirp.test", config).await;
        net
    }

    /// `chirp.test`, `wave.test` and `ping.test`, each its own provider, peered, untweaked.
    pub async fn three(dir: &Path) -> Self {
        Self::federated(dir, &["chirp.test", "wave.test", "ping.test"], |_| {}).await
    }

    /// One provider per domain, each peered with the others over mutual TLS.
    pub async fn federated(
        dir: &Path,
        domains: &[&'static str],
        tweak: impl Fn(&mut ServerConfig),
    ) -> Self {
        let ca = dev_ca(dir, domains);
        let fed: BTreeMap<&str, SocketAddr> = domains.iter().map(|d| (*d, free_addr())).collect();
        let mut net = Self::empty(dir, fed.clone());
        for domain in domains {
            let mut config = ServerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                data: dir.join(format!("data-{domain}")),
                federation_listen: Some(fed[domain]),
                federation_cert: vec![ca.join(format!("{domain}.crt"))],
                federation_key: vec![ca.join(format!("{domain}.key"))],
                peer_ca: Some(ca.join("ca.crt")),
                peers: fed
                    .iter()
                    .filter(|(d, _)| *d != domain)
                    .map(|(d, a)| (d.to_string(), format!("https://{a}")))
                    .collect(),
                peer_retry_cap_secs: 1,
                expiry_sweep_ms: 100,
                ..Default::default()
            };
            config.add_domain(domain);
            tweak(&mut config);
            net.launch(domain, config).await;
        }
        net
    }

    /// No servers yet; `fed`, the federation listeners they are to have.
    fn empty(dir: &Path, fed: BTreeMap<&'static str, SocketAddr>) -> Self {
        Self {
            dir: dir.to_owned(),
            servers: BTreeMap::new(),
            fed,
            configs: BTreeMap::new(),
        }
    }

    /// Starts the server for `domain` with `config`, keeping the config (with the API port it
    /// bound) so that [`Providers::start`] brings it back where its users' devices look for it.
    async fn launch(&mut self, domain: &'static str, mut config: ServerConfig) {
        let server = Server::start(config.clone()).await.unwrap();
        config.listen = server.local_addr();
        self.configs.insert(domain, config);
        self.servers.insert(domain, server);
    }

    /// Shuts the provider hosting `domain` down; its data and ports wait for
    /// [`Providers::start`].
    pub async fn stop(&mut self, domain: &str) {
        let server = self
            .servers
            .remove(domain)
            .unwrap_or_else(|| panic!("no running provider for {domain}"));
        server.shutdown().await;
    }

    /// Starts the provider hosting `domain` again after [`Providers::stop`]: same config, data
    /// and ports.
    pub async fn start(&mut self, domain: &str) {
        let (domain, config) = self
            .configs
            .get_key_value(domain)
            .unwrap_or_else(|| panic!("no provider for {domain}"));
        let (domain, config) = (*domain, config.clone());
        self.launch(domain, config).await;
    }

    /// A certificate from the federated providers' CA for `domain`, which has no provider
    /// here: a peer the test plays itself, through [`Providers::peer_client`].
    pub fn certify(&self, domain: &str) {
        issue(&self.ca(), domain);
    }

    /// An HTTPS client for the federation listeners that presents the certificate of
    /// `as_domain` (a provider's, or one from [`Providers::certify`]) and finds each provider's
    /// listener under its domain name.
    pub fn peer_client(&self, as_domain: &str) -> reqwest::Client {
        let ca = self.ca();
        let mut pem = std::fs::read(ca.join(format!("{as_domain}.crt"))).unwrap();
        pem.extend(std::fs::read(ca.join(format!("{as_domain}.key"))).unwrap());
        let root = std::fs::read(ca.join("ca.crt")).unwrap();
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&root).unwrap())
            .identity(reqwest::Identity::from_pem(&pem).unwrap());
        for (d, a) in &self.fed {
            b = b.resolve(d, *a);
        }
        b.build().unwrap()
    }

    /// Where [`dev_ca`] put the federated providers' CA and certificates.
    fn ca(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// The server hosting `domain` (the only one, for [`Providers::one_server`]).
    pub fn server_of(&self, domain: &str) -> &Server {
        let server = if self.is_one_server() {
            self.servers.values().next()
        } else {
            self.servers.get(domain)
        };
        server.unwrap_or_else(|| panic!("no running provider for {domain}"))
    }

    /// The data directory of the provider hosting `domain`.
    pub fn data_of(&self, domain: &str) -> PathBuf {
        if self.is_one_server() {
            self.dir.join("data-server")
        } else {
            self.dir.join(format!("data-{domain}"))
        }
    }

    /// Whether this is [`Providers::one_server`]: one server hosting every domain, unfederated.
    fn is_one_server(&self) -> bool {
        self.fed.is_empty()
    }

    /// Registers `user` (`handle@domain`) with a profile of its own under the test directory.
    pub async fn register(&self, user: &str) -> Device {
        self.register_as(user, user).await
    }

    /// Registers `user` into the profile directory named `profile`.
    pub async fn register_as(&self, user: &str, profile: &str) -> Device {
        let user = UserId::parse(user).unwrap();
        let url = self.server_of(user.domain().as_str()).url();
        register_at(&self.dir.join(format!("profile-{profile}")), &url, &user).await
    }

    /// Logs a further device of `user` in, into the profile directory named `profile`.
    pub async fn login(&self, user: &UserId, profile: &str) -> Device {
        let url = self.server_of(user.domain().as_str()).url();
        login_at(&self.dir.join(format!("profile-{profile}")), &url, user).await
    }

    pub async fn shutdown(self) {
        for (_, server) in self.servers {
            server.shutdown().await;
        }
    }
}

/// A config listening on an ephemeral loopback port, with its data in `data`, hosting
/// `chirp.test` and `wave.test`.
fn two_domains(data: PathBuf) -> ServerConfig {
    let mut config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data,
        ..Default::default()
    };
    config.add_domain("chirp.test");
    config.add_domain("wave.test");
    config
}

/// A loopback address with a port free right now, for a listener others must know before it
/// starts. It is on a random 127.x.y.z: a port probed free on 127.0.0.1 could be taken, before the
/// listener binds it, by a server of a parallel test binding 127.0.0.1:0.
fn free_addr() -> SocketAddr {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        .to_le_bytes();
    let ip = std::net::Ipv4Addr::new(127, r[0] | 1, r[1], 1 + r[2] % 253);
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `parley dev-ca init` + `issue` for every domain.
fn dev_ca(dir: &Path, domains: &[&str]) -> PathBuf {
    let ca = dir.join("ca");
    parley(&["dev-ca", "init", ca.to_str().unwrap()]);
    for d in domains {
        issue(&ca, d);
    }
    ca
}

/// `parley dev-ca issue`: a certificate for `domain` from the CA in `ca`.
fn issue(ca: &Path, domain: &str) {
    parley(&["dev-ca", "issue", ca.to_str().unwrap(), domain]);
}

/// Runs the `parley` CLI, failing the test if it fails.
fn parley(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "parley {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// --- a bare server: profiles and data in the test directory, held by the test -------------

/// A server on an ephemeral loopback port hosting `chirp.test` and `wave.test`, with its data
/// in `dir/server`.
pub async fn server(dir: &Path) -> Server {
    server_with(dir, |_| {}).await
}

/// [`server`], with `tweak` adjusting the config before start.
pub async fn server_with(dir: &Path, tweak: impl Fn(&mut ServerConfig)) -> Server {
    let mut config = two_domains(dir.join("server"));
    tweak(&mut config);
    Server::start(config).await.unwrap()
}

/// Where [`register`] keeps the profile of `user`: `dir/handle@domain`.
pub fn profile_dir(dir: &Path, user: &UserId) -> PathBuf {
    dir.join(user.to_string())
}

/// Registers `user` (`handle@domain`) at `server`, with its profile in [`profile_dir`].
pub async fn register(dir: &Path, server: &Server, user: &str) -> Device {
    let user = UserId::parse(user).unwrap();
    register_at(&profile_dir(dir, &user), &server.url(), &user).await
}

/// A further device of `user`, in the profile directory `dir/name`.
pub async fn login(dir: &Path, server: &Server, user: &UserId, name: &str) -> Device {
    login_at(&dir.join(name), &server.url(), user).await
}

/// Registers `user` at the server at `url`, with [`PASSWORD`], into the profile directory
/// `profile`.
pub async fn register_at(profile: &Path, url: &str, user: &UserId) -> Device {
    Device::register(profile, url, user, Some(PASSWORD), None, None)
        .await
        .unwrap()
}

/// Logs a further device of `user` in at the server at `url`, into the profile directory
/// `profile`.
pub async fn login_at(profile: &Path, url: &str, user: &UserId) -> Device {
    Device::login(profile, url, user, PASSWORD, None)
        .await
        .unwrap()
}

// --- checked syncs ---------------------------------------------------------------------------

/// What a checked sync does with content that did not decode ([`Event::Undecodable`]); an
/// entry that could not be processed at all ([`Event::Error`]) always fails the test.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Undecodable {
    Fails,
    Passes,
}

/// Everything a sync returns, failing the test on entries that could not be processed and on
/// content that did not decode.
pub async fn sync(device: &mut Device) -> Vec<Event> {
    checked_sync(device, Undecodable::Fails).await
}

/// Everything a sync returns, failing the test on entries that could not be processed; content
/// that did not decode passes.
pub async fn sync_lenient(device: &mut Device) -> Vec<Event> {
    checked_sync(device, Undecodable::Passes).await
}

/// The messages of `room` a [`sync`] returns: (sender, text).
pub async fn read(device: &mut Device, room: &RoomId) -> Vec<(String, String)> {
    messages_in(sync(device).await, room)
}

/// The messages of `room` a [`sync_lenient`] returns: (sender, text); content that did not
/// decode is left out.
pub async fn read_lenient(device: &mut Device, room: &RoomId) -> Vec<(String, String)> {
    messages_in(sync_lenient(device).await, room)
}

async fn checked_sync(device: &mut Device, undecodable: Undecodable) -> Vec<Event> {
    let events = device.sync(None).await.unwrap();
    for e in &events {
        let fails = match e {
            Event::Error { .. } => true,
            Event::Undecodable { .. } => undecodable == Undecodable::Fails,
            _ => false,
        };
        assert!(
            !fails,
            "{} ({}) could not process an entry: {e:?}",
            device.user(),
            device.device_id()
        );
    }
    events
}

/// The messages of `room` among `events`: (sender, text).
pub fn messages_in(events: Vec<Event>, room: &RoomId) -> Vec<(String, String)> {
    events
        .into_iter()
        .filter_map(|e| match e {
            Event::Message {
                room: r,
                sender,
                text,
                ..
            } if &r == room => Some((sender.to_string(), text)),
            _ => None,
        })
        .collect()
}

/// The (sender, text) pairs of messages `texts` from `sender`, as [`read`] returns them.
pub fn from(sender: &str, texts: &[&str]) -> Vec<(String, String)> {
    texts
        .iter()
        .map(|t| (sender.to_owned(), t.to_string()))
        .collect()
}

// --- users, consent, rooms -------------------------------------------------------------------

/// alice@chirp.test, bob@wave.test and carol@ping.test, registered in that order; bob and then
/// carol consent to alice.
pub async fn alice_bob_carol(net: &Providers) -> (Device, Device, Device) {
    let alice = net.register("alice@chirp.test").await;
    let bob = net.register("bob@wave.test").await;
    let carol = net.register("carol@ping.test").await;
    consent(&bob, &alice).await;
    consent(&carol, &alice).await;
    (alice, bob, carol)
}

/// `target` consents to `requester` (who asks first), waiting for the request to arrive.
pub async fn consent(target: &Device, requester: &Device) {
    requester
        .api()
        .contact_request(target.user())
        .await
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    let wanted = requester.user().to_string();
    while Instant::now() < deadline {
        let pending = target.api().contact_requests().await.unwrap();
        if pending.iter().any(|c| c.user == wanted) {
            target.api().contact_accept(requester.user()).await.unwrap();
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{wanted}'s contact request never reached {}", target.user());
}

/// Syncs `device` (waiting for pushes) until an event satisfies `wanted`, and returns every
/// event seen up to and including it. Fails on an error event unless `wanted` accepts it.
pub async fn sync_until(device: &mut Device, mut wanted: impl FnMut(&Event) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        for e in device.sync(Some(Duration::from_millis(300))).await.unwrap() {
            let done = wanted(&e);
            if let (false, Event::Error { detail, .. }) = (done, &e) {
                panic!("{} could not process an entry: {detail}", device.user());
            }
            seen.push(e);
            if done {
                return seen;
            }
        }
    }
    panic!("{} never saw the wanted event; saw {seen:?}", device.user());
}

/// Syncs until `device` joined `room`.
pub async fn join(device: &mut Device, room: &RoomId) {
    sync_until(
        device,
        |e| matches!(e, Event::Joined { room: r, .. } if r == room),
    )
    .await;
}

/// Deterministic pseudo-random bytes (xorshift), so files are incompressible and comparable.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

// --- what a provider holds -------------------------------------------------------------------

/// The `expires_at` of every queue row the server with its data in `data` holds for `device`
/// (straight from its database, in queue order).
pub fn queued_for(data: &Path, device: &Device) -> Vec<u64> {
    let conn = rusqlite::Connection::open(data.join("parley.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut st = conn
        .prepare("SELECT expires_at FROM queue WHERE device_id = ?1 ORDER BY seq")
        .unwrap();
    st.query_map([device.device_id().as_str()], |r| r.get::<_, i64>(0))
        .unwrap()
        .map(|r| r.unwrap() as u64)
        .collect()
}

/// Encrypts `plaintext` as `device` would, through a second connection to its profile (in
/// `profile`), and posts it: content the `Device` API would never build (forged edits,
/// garbage, files at any URL with their own deadlines).
pub async fn send_raw(profile: &Path, device: &Device, room: &RoomId, plaintext: &[u8]) {
    let key = device
        .api()
        .devices()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.device_id == device.device_id().as_str())
        .unwrap()
        .signature_key;
    let conn = rusqlite::Connection::open(profile.join(parley_client::profile::DB_FILE)).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mls =
        parley_client::mls::DeviceMls::load(&conn, device.device_uri().clone(), &key).unwrap();
    let message = mls.encrypt(&conn, room, plaintext, None).unwrap();
    let request = parley_proto::api::SendRequest { message };
    device.api().send_message(room, &request).await.unwrap();
}
