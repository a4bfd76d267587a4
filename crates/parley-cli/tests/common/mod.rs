//! Helpers shared by the process-level CLI tests: `parley serve` children, CLI runs, JSON sync.
#![allow(dead_code)] // each test binary uses a different subset

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_parley");

/// A `parley serve` child process, killed on drop.
pub struct ServerProcess {
    pub child: Child,
    pub url: String,
}

impl ServerProcess {
    pub fn start(data: &Path, listen: &str) -> Self {
        Self::start_with(data, listen, &[])
    }

    pub fn start_with(data: &Path, listen: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "--domain",
            "chirp.test",
            "--domain",
            "wave.test",
            "--listen",
            listen,
        ];
        args.extend_from_slice(extra);
        Self::spawn(data, &args)
    }

    /// `parley serve --data DATA ARGS…`; waits for its first line (the URL it serves on).
    pub fn spawn(data: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--data")
            .arg(data)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn parley serve");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("parley serving on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Self { child, url }
    }

    pub fn port(&self) -> &str {
        self.url.rsplit(':').next().unwrap()
    }

    pub fn kill_9(mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    pub fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "graceful shutdown exits 0, got {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server did not stop on SIGTERM");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn parley(profile: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .env("PARLEY_PROFILE", profile)
        .env("RUST_LOG", "warn")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run parley")
}

/// Runs a command that must succeed; returns stdout.
pub fn ok(profile: &Path, args: &[&str]) -> String {
    let out = parley(profile, args);
    assert!(
        out.status.success(),
        "parley {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `parley account register USER --server URL --password PASSWORD` with `profile`.
pub fn register(profile: &Path, server_url: &str, user: &str, password: &str) {
    ok(
        profile,
        &[
            "account",
            "register",
            user,
            "--server",
            server_url,
            "--password",
            password,
        ],
    );
}

/// Profiles of alice@chirp.test and bob@wave.test, registered at one server, in a temporary
/// folder (removed on drop).
pub struct AliceAndBob {
    pub dir: tempfile::TempDir,
    pub alice: std::path::PathBuf,
    pub bob: std::path::PathBuf,
}

pub fn alice_and_bob(server: &ServerProcess) -> AliceAndBob {
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    register(&alice, &server.url, "alice@chirp.test", "secret-password");
    register(&bob, &server.url, "bob@wave.test", "secret-password");
    AliceAndBob { dir, alice, bob }
}

/// Runs a command that must fail with one clear line on stderr; returns that line.
pub fn fails(profile: &Path, args: &[&str]) -> String {
    let out = parley(profile, args);
    assert!(!out.status.success(), "parley {args:?} should have failed");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got {stderr:?}");
    assert!(lines[0].starts_with("error: "), "{stderr:?}");
    lines[0].to_owned()
}

pub fn sync_json(profile: &Path) -> Vec<Value> {
    ok(profile, &["sync", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

pub fn messages(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| {
            (
                e["sender"].as_str().unwrap().to_owned(),
                e["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A loopback address with a port free right now, for a listener others must know before it
/// starts. It is on a random 127.x.y.z: a port probed free on 127.0.0.1 could be taken, before the
/// listener binds it, by a server of a parallel test binding 127.0.0.1:0.
pub fn free_addr() -> std::net::SocketAddr {
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
