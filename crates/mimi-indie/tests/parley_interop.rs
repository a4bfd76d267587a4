//! Parley and an independent MIMI stack in one network: `mimi-indie` (written from the drafts,
//! sharing no protocol code with Parley) is `indie.test`; Parley providers serve `chirp.test` and
//! `wave.test`. Real servers on loopback, mutual TLS from one test CA, real storage, real MLS.
//!
//! - As a **follower**: a Parley user adds carol@indie.test to a group hubbed by chirp.test; carol
//!   joins from the Welcome Parley's hub notified, reads Parley's messages, and writes one that
//!   both Parley users (on two providers) read.
//! - As a **hub**: dave@indie.test creates a room and adds bob@wave.test; bob joins from the
//!   Welcome indie notified, reads dave's message (and the room name from the GroupContext), and
//!   writes one that dave reads (Parley relays it with `submitMessage`).

use mimi_indie::{DomainCerts, IndieProvider, ProviderConfig};
use parley_client::{Device, Event};
use parley_proto::{RoomId, UserId};
use parley_server::config::ServerConfig;
use parley_server::Server;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const PASSWORD: &str = "password-123";
const PATIENCE: Duration = Duration::from_secs(20);
const INDIE: &str = "indie.test";

/// One CA for every provider; each certificate serves both as TLS server and client identity.
struct Ca {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pem: String,
}

impl Ca {
    fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "interop test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Self { params, key, pem }
    }

    /// (certificate PEM, key PEM) for `domain`, for serverAuth and clientAuth.
    fn issue(&self, domain: &str) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec![domain.to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, domain);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
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

struct Network {
    chirp: Server,
    wave: Server,
    indie: IndieProvider,
}

async fn network(dir: &Path) -> Network {
    let ca = Ca::new();
    let ca_path = dir.join("ca.crt");
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let (indie_cert, indie_key) = ca.issue(INDIE);
    let indie = IndieProvider::start(ProviderConfig {
        domain: INDIE.into(),
        certs: DomainCerts {
            server_cert_pem: indie_cert.clone(),
            server_key_pem: indie_key.clone(),
            client_cert_pem: indie_cert,
            client_key_pem: indie_key,
        },
        peer_ca_pem: ca.pem.clone(),
        peers: BTreeMap::new(),
    })
    .await
    .unwrap();
    let fed: BTreeMap<&str, SocketAddr> = [("chirp.test", free_addr()), ("wave.test", free_addr())]
        .into_iter()
        .collect();
    let mut servers = Vec::new();
    for (domain, addr) in &fed {
        let (cert, key) = ca.issue(domain);
        let (cert_path, key_path) = (
            dir.join(format!("{domain}.crt")),
            dir.join(format!("{domain}.key")),
        );
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        let mut peers: BTreeMap<String, String> = fed
            .iter()
            .filter(|(d, _)| *d != domain)
            .map(|(d, a)| (d.to_string(), format!("https://{a}")))
            .collect();
        peers.insert(INDIE.into(), indie.base_url());
        let mut config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data: dir.join(format!("data-{domain}")),
            federation_listen: Some(*addr),
            federation_cert: vec![cert_path],
            federation_key: vec![key_path],
            peer_ca: Some(ca_path.clone()),
            peers,
            peer_retry_cap_secs: 1,
            ..Default::default()
        };
        config.add_domain(domain);
        servers.push(Server::start(config).await.unwrap());
        indie.add_peer(domain, &format!("https://{addr}")).unwrap();
    }
    let wave = servers.pop().unwrap();
    let chirp = servers.pop().unwrap();
    Network { chirp, wave, indie }
}

async fn register(dir: &Path, server: &Server, user: &str) -> Device {
    let user = UserId::parse(user).unwrap();
    Device::register(
        &dir.join(format!("profile-{user}")),
        &server.url(),
        &user,
        Some(PASSWORD),
        None,
        None,
    )
    .await
    .unwrap()
}

/// Syncs until `wanted` holds for an event; fails on entries that could not be processed.
async fn sync_until(device: &mut Device, mut wanted: impl FnMut(&Event) -> bool) -> Vec<Event> {
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

fn is_message(e: &Event, room: &RoomId, from: &str, text: &str) -> bool {
    matches!(e, Event::Message { room: r, sender, text: t, .. }
        if r == room && sender.to_string() == from && t == text)
}

/// The texts `handle` read in `room` from `sender`, waiting until `want` of them arrived. Parley
/// clients also send delivery receipts (MIMI message status), which indie shows as unsupported
/// content; those are left out.
async fn texts_from(
    net: &Network,
    handle: &str,
    room: &str,
    sender: &str,
    want: usize,
) -> Vec<String> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let texts: Vec<String> = net
            .indie
            .inbox(handle, room)
            .into_iter()
            .filter(|m| m.sender == sender && m.text != "[unsupported content]")
            .map(|m| m.text)
            .collect();
        if texts.len() >= want || Instant::now() > deadline {
            return texts;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `requester` (a Parley user) asks `target` (an indie user) for consent; `target` grants it.
async fn indie_consents(net: &Network, target: &str, requester: &Device) {
    let target_uri = format!("mimi://{INDIE}/u/{target}");
    requester
        .api()
        .contact_request(&UserId::parse(&target_uri).unwrap())
        .await
        .unwrap();
    let requester_uri = requester.user().to_uri();
    let deadline = Instant::now() + PATIENCE;
    while !net
        .indie
        .consent_events()
        .iter()
        .any(|e| e.requester == requester_uri && e.target == target_uri)
    {
        assert!(
            Instant::now() < deadline,
            "the contact request never reached indie"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    net.indie
        .grant_consent(target, &requester_uri)
        .await
        .unwrap();
}

/// A Parley user consents to an indie user, waiting for the request to arrive.
async fn parley_consents(target: &Device, requester_uri: &str) {
    let requester = UserId::parse(requester_uri).unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let pending = target.api().contact_requests().await.unwrap();
        if pending.iter().any(|c| c.user == requester.to_string()) {
            target.api().contact_accept(&requester).await.unwrap();
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{requester}'s request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_provider_follows_a_parley_room() {
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path()).await;
    let mut alice = register(dir.path(), &net.chirp, "alice@chirp.test").await;
    let mut bob = register(dir.path(), &net.wave, "bob@wave.test").await;
    let carol = net.indie.add_user("carol").await.unwrap();
    assert_eq!(carol, "mimi://indie.test/u/carol");

    // bob (wave.test) and carol (indie.test) in alice's group, hubbed by chirp.test.
    alice.api().contact_request(bob.user()).await.unwrap();
    parley_consents(&bob, &alice.user().to_uri()).await;
    indie_consents(&net, "carol", &alice).await;
    let room = alice
        .create_room(Some("interop"), &[bob.user().clone()])
        .await
        .unwrap();
    alice
        .add_member(&room, &UserId::parse(&carol).unwrap())
        .await
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while !net.indie.rooms("carol").contains(&room.to_string()) {
        assert!(Instant::now() < deadline, "carol never joined {room}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Parley → indie.
    alice.send_text(&room, "hello carol").await.unwrap();
    assert_eq!(
        texts_from(&net, "carol", room.as_str(), "mimi://chirp.test/u/alice", 1).await,
        vec!["hello carol"]
    );

    // indie → Parley, on both Parley providers (the hub and a follower).
    net.indie
        .send("carol", room.as_str(), "hi from an independent stack")
        .await
        .unwrap();
    for device in [&mut alice, &mut bob] {
        sync_until(device, |e| {
            is_message(e, &room, "carol@indie.test", "hi from an independent stack")
        })
        .await;
    }
    // And the other way round once more, after carol's message moved nothing out of order.
    bob.send_text(&room, "welcome, carol").await.unwrap();
    assert_eq!(
        texts_from(&net, "carol", room.as_str(), "mimi://wave.test/u/bob", 1).await,
        vec!["welcome, carol"]
    );
    net.indie.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parley_user_joins_a_room_hubbed_by_an_independent_provider() {
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path()).await;
    let mut bob = register(dir.path(), &net.wave, "bob@wave.test").await;
    let dave = net.indie.add_user("dave").await.unwrap();

    // dave asks bob for consent (MIMI requestConsent to wave.test); bob accepts (updateConsent).
    net.indie
        .request_consent("dave", &bob.user().to_uri())
        .await
        .unwrap();
    parley_consents(&bob, &dave).await;
    let deadline = Instant::now() + PATIENCE;
    while !net.indie.has_consent_from("dave", &bob.user().to_uri()) {
        assert!(Instant::now() < deadline, "bob's grant never reached indie");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // dave's room, hubbed at indie.test: bob's KeyPackages via keyMaterial, Welcome via notify.
    let room_uri = net.indie.create_room("dave", "clubhouse").await.unwrap();
    let room = RoomId::parse(&room_uri).unwrap();
    net.indie
        .add_to_room(&room_uri, "dave", &bob.user().to_uri())
        .await
        .unwrap();
    sync_until(
        &mut bob,
        |e| matches!(e, Event::Joined { room: r, .. } if *r == room),
    )
    .await;
    let summary = bob
        .rooms()
        .unwrap()
        .into_iter()
        .find(|r| r.room == room)
        .expect("bob lists the room");
    assert_eq!(summary.name.as_deref(), Some("clubhouse"));
    assert!(summary
        .admins
        .iter()
        .any(|a| a.to_string() == "dave@indie.test"));

    // indie → Parley.
    net.indie
        .send("dave", &room_uri, "welcome to my hub, bob")
        .await
        .unwrap();
    sync_until(&mut bob, |e| {
        is_message(e, &room, "dave@indie.test", "welcome to my hub, bob")
    })
    .await;

    // Parley → indie: wave.test relays bob's message to the independent hub (submitMessage).
    bob.send_text(&room, "thanks, dave").await.unwrap();
    assert_eq!(
        texts_from(&net, "dave", &room_uri, "mimi://wave.test/u/bob", 1).await,
        vec!["thanks, dave"]
    );
    net.indie.shutdown().await;
    net.chirp.shutdown().await;
    net.wave.shutdown().await;
}

/// Two users of the independent provider in one Parley room. Its clients are all named
/// `indie0` (a client URI is unique as a whole, `mimi://indie.test/d/HANDLE/indie0`): the hub
/// must tell `carol`'s client from `dave`'s, and both read the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_two_users_may_share_a_device_name() {
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path()).await;
    let mut alice = register(dir.path(), &net.chirp, "alice@chirp.test").await;
    let users = [
        net.indie.add_user("carol").await.unwrap(),
        net.indie.add_user("dave").await.unwrap(),
    ];
    indie_consents(&net, "carol", &alice).await;
    indie_consents(&net, "dave", &alice).await;
    let room = alice.create_room(Some("pair"), &[]).await.unwrap();
    for user in &users {
        alice
            .add_member(&room, &UserId::parse(user).unwrap())
            .await
            .unwrap();
    }
    assert_eq!(alice.room_info(&room).unwrap().members.len(), 3);
    alice.send_text(&room, "hello, both").await.unwrap();
    for handle in ["carol", "dave"] {
        assert_eq!(
            texts_from(&net, handle, room.as_str(), "mimi://chirp.test/u/alice", 1).await,
            vec!["hello, both"],
            "{handle}"
        );
    }
    net.indie.shutdown().await;
    net.chirp.shutdown().await;
    net.wave.shutdown().await;
}
