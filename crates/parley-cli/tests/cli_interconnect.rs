//! The interconnect as an operator and users drive it: three `parley serve` processes (one per
//! provider, each with its own database and a `parley dev-ca` certificate), the CLI exactly as
//! documented — consent, a 1:1 and a group across providers — and kill -9 of a room's hub in the
//! middle of traffic.

mod common;
use common::*;

use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const DOMAINS: [&str; 3] = ["chirp.test", "wave.test", "ping.test"];

struct Providers {
    dir: PathBuf,
    api: Vec<SocketAddr>,
    fed: Vec<SocketAddr>,
}

impl Providers {
    fn new(dir: &Path) -> Self {
        let ca = dir.join("ca");
        let run = |args: &[&str]| {
            let out = Command::new(BIN).args(args).output().unwrap();
            assert!(out.status.success(), "{args:?}");
        };
        run(&["dev-ca", "init", ca.to_str().unwrap()]);
        for d in DOMAINS {
            run(&["dev-ca", "issue", ca.to_str().unwrap(), d]);
        }
        Self {
            dir: dir.to_owned(),
            api: DOMAINS.iter().map(|_| free_addr()).collect(),
            fed: DOMAINS.iter().map(|_| free_addr()).collect(),
        }
    }

    /// `parley serve` for provider `i`, exactly as an operator would start it.
    fn start(&self, i: usize) -> ServerProcess {
        let ca = self.dir.join("ca");
        let path = |f: String| ca.join(f).to_str().unwrap().to_owned();
        let listen = self.api[i].to_string();
        let fed = self.fed[i].to_string();
        let (cert, key, ca_cert) = (
            path(format!("{}.crt", DOMAINS[i])),
            path(format!("{}.key", DOMAINS[i])),
            path("ca.crt".into()),
        );
        let peers: Vec<String> = (0..3)
            .filter(|j| *j != i)
            .map(|j| format!("{}=https://{}", DOMAINS[j], self.fed[j]))
            .collect();
        let mut args = vec![
            "--domain",
            DOMAINS[i],
            "--listen",
            &listen,
            "--federation-listen",
            &fed,
            "--federation-cert",
            &cert,
            "--federation-key",
            &key,
            "--peer-ca",
            &ca_cert,
            "--peer-retry-cap",
            "1",
        ];
        for p in &peers {
            args.extend(["--peer", p]);
        }
        ServerProcess::spawn(&self.dir.join(format!("data-{}", DOMAINS[i])), &args)
    }

    fn register(&self, user: &str, i: usize) -> PathBuf {
        let profile = self.dir.join(user);
        let url = format!("http://{}", self.api[i]);
        register(&profile, &url, user, "secret-password");
        profile
    }
}

/// Syncs with `--wait` until `want` messages arrived (or 30 s), returning them in order.
fn messages_until(profile: &Path, want: usize) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        let lines = ok(profile, &["sync", "--json", "--wait", "2"]);
        for l in lines.lines() {
            let e: Value = serde_json::from_str(l).unwrap();
            if e["type"] == "message" {
                got.push((
                    e["sender"].as_str().unwrap().to_owned(),
                    e["text"].as_str().unwrap().to_owned(),
                ));
            }
        }
    }
    got
}

/// Syncs with `--wait` until the profile has joined `room` (its Welcome crossed providers).
fn wait_joined(profile: &Path, room: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines = ok(profile, &["sync", "--json", "--wait", "2"]);
        if lines.lines().any(|l| {
            let e: Value = serde_json::from_str(l).unwrap();
            e["type"] == "joined" && e["room"] == room
        }) {
            return;
        }
        assert!(Instant::now() < deadline, "never joined {room}");
    }
}

fn pairs(sender: &str, texts: &[&str]) -> Vec<(String, String)> {
    texts
        .iter()
        .map(|t| (sender.to_owned(), (*t).to_owned()))
        .collect()
}

/// Waits until `profile`'s pending requests list `from`, then accepts.
fn accept_when_asked(profile: &Path, from: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok(profile, &["contact", "requests"]).contains(from) {
        assert!(Instant::now() < deadline, "no request from {from} arrived");
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(profile, &["contact", "accept", from]);
}

#[test]
fn three_provider_processes_consent_chat_and_hub_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::new(dir.path());
    let mut chirp = net.start(0);
    let _wave = net.start(1);
    let _ping = net.start(2);
    let alice = net.register("alice@chirp.test", 0);
    let bob = net.register("bob@wave.test", 1);
    let carol = net.register("carol@ping.test", 2);

    // Before consent: the send asks for it, says so, and exits 3.
    let out = parley(&alice, &["send", "bob@wave.test", "hello?"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("waiting for bob@wave.test"), "{stderr}");
    accept_when_asked(&bob, "alice@chirp.test");

    // 1:1 across providers, both ways.
    ok(&alice, &["send", "bob@wave.test", "hello bob"]);
    assert_eq!(
        messages_until(&bob, 1),
        pairs("alice@chirp.test", &["hello bob"])
    );
    ok(&bob, &["send", "alice@chirp.test", "hi alice"]);
    assert_eq!(
        messages_until(&alice, 1),
        pairs("bob@wave.test", &["hi alice"])
    );

    // A group spanning the three providers, hubbed at chirp.
    ok(&alice, &["contact", "request", "carol@ping.test"]);
    accept_when_asked(&carol, "alice@chirp.test");
    let created = ok(
        &alice,
        &[
            "room",
            "create",
            "--name",
            "trio",
            "bob@wave.test",
            "carol@ping.test",
        ],
    );
    let room = created.lines().last().unwrap().trim().to_owned();
    wait_joined(&carol, &room);
    wait_joined(&bob, &room);
    ok(&carol, &["send", &room, "carol joined"]);
    for p in [&alice, &bob] {
        assert_eq!(
            messages_until(p, 1),
            pairs("carol@ping.test", &["carol joined"])
        );
    }

    // kill -9 the hub in the middle of traffic; every acknowledged message survives.
    let mut acked = Vec::new();
    for i in 0..20 {
        if i == 10 {
            chirp.kill_9();
            chirp = net.start(0);
        }
        let text = format!("burst {i:02}");
        if parley(&alice, &["send", &room, &text]).status.success() {
            acked.push(text);
        }
    }
    assert!(
        acked.len() >= 18,
        "sends after the restart are acked: {acked:?}"
    );
    let want: Vec<&str> = acked.iter().map(String::as_str).collect();
    for p in [&bob, &carol] {
        assert_eq!(
            messages_until(p, want.len()),
            pairs("alice@chirp.test", &want)
        );
    }

    // Remove carol from the room; she no longer reads it.
    ok(&alice, &["room", "remove", &room, "carol@ping.test"]);
    ok(&alice, &["send", &room, "just us"]);
    assert_eq!(
        messages_until(&bob, 1),
        pairs("alice@chirp.test", &["just us"])
    );
    std::thread::sleep(Duration::from_millis(500));
    let late: Vec<_> = messages_until(&carol, 0);
    assert!(late.is_empty(), "{late:?}");
    let events = ok(&carol, &["sync", "--json"]);
    assert!(!events.contains("just us"));
}
