//! The `parley` binary as a user drives it: a real `parley serve` process on loopback, client
//! commands exactly as documented, restarts and kill -9, and what lands on disk.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

struct Users {
    _dir: tempfile::TempDir,
    alice: PathBuf,
    bob: PathBuf,
    carol: PathBuf,
}

fn register_users(server: &ServerProcess) -> Users {
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob, carol) = (
        dir.path().join("alice"),
        dir.path().join("bob"),
        dir.path().join("carol"),
    );
    register(&alice, &server.url, "alice@chirp.test", "alice-secret");
    register(&bob, &server.url, "bob@wave.test", "bob-secret");
    register(&carol, &server.url, "carol@chirp.test", "carol-secret");
    Users {
        _dir: dir,
        alice,
        bob,
        carol,
    }
}

#[test]
fn documented_cli_scenario_across_two_domains() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path(), "127.0.0.1:0");
    let u = register_users(&server);

    // 1:1 across domains, by user address.
    ok(&u.alice, &["send", "bob@wave.test", "hello bob"]);
    let events = sync_json(&u.bob);
    assert_eq!(
        messages(&events),
        vec![("alice@chirp.test".into(), "hello bob".into())]
    );
    let m = events.iter().find(|e| e["type"] == "message").unwrap();
    assert_eq!(
        m["id"].as_str().unwrap().len(),
        64,
        "MessageId is 32 bytes hex"
    );
    assert!(m["ts"].as_u64().unwrap() > 0 && is_new_room(m["room"].as_str().unwrap()));
    ok(&u.bob, &["send", "alice@chirp.test", "hi alice"]);
    assert_eq!(
        messages(&sync_json(&u.alice)),
        vec![("bob@wave.test".into(), "hi alice".into())]
    );
    // Nothing twice.
    assert!(messages(&sync_json(&u.bob)).is_empty());

    // A group: create prints the room URI last; add, send, remove.
    let created = ok(
        &u.alice,
        &["room", "create", "--name", "team", "bob@wave.test"],
    );
    let room = created.lines().last().unwrap().trim().to_owned();
    assert!(is_new_room(&room), "{created}");
    ok(&u.alice, &["room", "add", &room, "carol@chirp.test"]);
    ok(&u.alice, &["send", &room, "hello team"]);
    for p in [&u.bob, &u.carol] {
        assert_eq!(
            messages(&sync_json(p)),
            vec![("alice@chirp.test".into(), "hello team".into())]
        );
    }
    let list = ok(&u.carol, &["room", "list"]);
    assert!(
        list.contains(&room) && list.contains("team") && list.contains("bob@wave.test"),
        "{list}"
    );
    // Room policy: only admins remove others; the creator is the first admin and promotes.
    let refused = fails(&u.carol, &["room", "remove", &room, "bob@wave.test"]);
    assert!(refused.contains("only an admin may remove"), "{refused}");
    let promoted = ok(&u.alice, &["room", "promote", &room, "carol@chirp.test"]);
    assert!(
        promoted.contains("carol@chirp.test is now an admin"),
        "{promoted}"
    );
    ok(&u.carol, &["room", "remove", &room, "bob@wave.test"]);
    ok(&u.carol, &["send", "team", "bob is gone"]); // a room by name
    assert_eq!(
        messages(&sync_json(&u.alice)),
        vec![("carol@chirp.test".into(), "bob is gone".into())]
    );
    assert!(
        messages(&sync_json(&u.bob)).is_empty(),
        "a removed member reads nothing new"
    );

    // sync --wait waits for something to arrive.
    let bob = u.bob.clone();
    let waiter = std::thread::spawn(move || ok(&bob, &["sync", "--wait", "20", "--json"]));
    std::thread::sleep(Duration::from_millis(700));
    ok(&u.alice, &["send", "bob@wave.test", "are you there?"]);
    let waited: Vec<Value> = waiter
        .join()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        messages(&waited),
        vec![("alice@chirp.test".into(), "are you there?".into())]
    );

    // Errors: one clear line, non-zero exit.
    let line = fails(&u.alice, &["send", "nobody@chirp.test", "hi"]);
    assert!(line.contains("nobody@chirp.test"), "{line}");
    let dir = tempfile::tempdir().unwrap();
    let line = fails(
        &dir.path().join("x"),
        &[
            "account",
            "login",
            "alice@chirp.test",
            "--server",
            &server.url,
            "--password",
            "wrong-password",
        ],
    );
    assert!(line.to_lowercase().contains("password"), "{line}");
    let line = fails(
        &dir.path().join("y"),
        &[
            "account",
            "register",
            "zed@chirp.test",
            "--server",
            "http://127.0.0.1:9",
            "--password",
            "zed-secret",
        ],
    );
    assert!(line.contains("cannot reach"), "{line}");
    let line = fails(&u.bob, &["send", &room, "let me back in"]);
    assert!(line.contains("member") || line.contains("room"), "{line}");
    let line = fails(&dir.path().join("nobody"), &["sync"]);
    assert!(
        line.contains("profile") || line.contains("register"),
        "{line}"
    );
    server.terminate();
}

/// `parley send` prints `sent ID to ROOM`: the id and the room.
fn sent(out: &str) -> (String, String) {
    let line = out.lines().last().unwrap_or_default();
    let mut words = line.split_whitespace();
    assert_eq!(words.next(), Some("sent"), "{out}");
    let id = words.next().unwrap().to_owned();
    assert_eq!(words.next(), Some("to"), "{out}");
    let room = words.next().unwrap().to_owned();
    assert!(id.len() == 64 && is_new_room(&room), "{out}");
    (id, room)
}

/// A room URI as Parley creates them: `mimi://DOMAIN/r/` and 32 hex digits.
fn is_new_room(room: &str) -> bool {
    parley_proto::RoomId::parse(room).is_ok_and(|r| {
        r.as_str().starts_with("mimi://")
            && r.name().len() == 32
            && r.name().bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// The lines of `parley sync --json`, exactly as printed, but for the delivered receipts
/// every sync sends by itself (tested in cli_receipts.rs).
fn sync_lines(profile: &Path) -> Vec<String> {
    ok(profile, &["sync", "--json"])
        .lines()
        .filter(|l| !l.starts_with(r#"{"type":"receipt""#))
        .map(str::to_owned)
        .collect()
}

/// The four rich-content commands exactly as documented, each seen by the other side as one
/// `sync --json` line of exactly the documented shape.
#[test]
fn replies_reactions_edits_deletes_and_expiry_from_the_cli() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path(), "127.0.0.1:0");
    let u = register_users(&server);
    let (alice, bob) = (&u.alice, &u.bob);

    let (hello, room) = sent(&ok(alice, &["send", "bob@wave.test", "hello **bob**"]));
    let line = sync_lines(bob).pop().unwrap();
    let ts = serde_json::from_str::<Value>(&line).unwrap()["ts"]
        .as_u64()
        .unwrap();
    assert_eq!(
        line,
        format!(
            r#"{{"type":"message","room":"{room}","sender":"alice@chirp.test","id":"{hello}","text":"hello **bob**","ts":{ts}}}"#
        )
    );

    // A reply, addressed by user: a message event with reply_to.
    let (reply, _) = sent(&ok(
        bob,
        &["send", "alice@chirp.test", "hi _alice_", "--reply", &hello],
    ));
    let lines = sync_lines(alice);
    let ts = serde_json::from_str::<Value>(&lines[0]).unwrap()["ts"]
        .as_u64()
        .unwrap();
    assert_eq!(
        lines,
        [format!(
            r#"{{"type":"message","room":"{room}","sender":"bob@wave.test","id":"{reply}","text":"hi _alice_","ts":{ts},"reply_to":"{hello}"}}"#
        )]
    );

    // A reaction, by room id.
    let (like, _) = sent(&ok(bob, &["react", &room, &hello, "\u{1f44d}"]));
    assert_eq!(
        sync_lines(alice),
        [format!(
            r#"{{"type":"reaction","room":"{room}","sender":"bob@wave.test","target":"{hello}","emoji":"👍"}}"#
        )]
    );

    // An edit, by user, with the id's first hex digits.
    ok(
        alice,
        &[
            "edit",
            "bob@wave.test",
            &hello[..12],
            "hello **bob**, edited",
        ],
    );
    assert_eq!(
        sync_lines(bob),
        [format!(
            r#"{{"type":"edit","room":"{room}","sender":"alice@chirp.test","target":"{hello}","text":"hello **bob**, edited"}}"#
        )]
    );

    // Deletes: bob takes his reaction back, alice deletes her message.
    ok(bob, &["delete", &room, &like]);
    assert_eq!(
        sync_lines(alice),
        [format!(
            r#"{{"type":"delete","room":"{room}","sender":"bob@wave.test","target":"{like}"}}"#
        )]
    );
    ok(alice, &["delete", &room, &hello]);
    assert_eq!(
        sync_lines(bob),
        [format!(
            r#"{{"type":"delete","room":"{room}","sender":"alice@chirp.test","target":"{hello}"}}"#
        )]
    );

    // Only the author may edit or delete; unknown ids and bad input are one clear line.
    let line = fails(alice, &["edit", &room, &reply, "not mine"]);
    assert!(line.contains("only its author may edit"), "{line}");
    let line = fails(alice, &["delete", &room, &reply]);
    assert!(line.contains("only its author may delete"), "{line}");
    let line = fails(bob, &["react", &room, &hello, "\u{1f44d}"]);
    assert!(line.contains("no message"), "{line}");
    let line = fails(bob, &["react", &room, "xyz", "\u{1f44d}"]);
    assert!(line.contains("no message id"), "{line}");
    let line = fails(bob, &["react", "carol@chirp.test", &reply, "\u{1f44d}"]);
    assert!(line.contains("no 1:1 room with carol@chirp.test"), "{line}");
    assert_eq!(
        parley(alice, &["send", &room, "x", "--expires", "0"])
            .status
            .code(),
        Some(2),
        "clap refuses a zero lifetime"
    );

    // Reacting to a message not synced yet: the command catches up first, and the message still
    // comes out of the next sync.
    let (fresh, _) = sent(&ok(alice, &["send", &room, "fresh"]));
    ok(bob, &["react", &room, &fresh, "\u{1f389}"]);
    let events: Vec<Value> = sync_lines(bob)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        messages(&events),
        vec![("alice@chirp.test".into(), "fresh".into())]
    );
    assert_eq!(
        sync_lines(alice),
        [format!(
            r#"{{"type":"reaction","room":"{room}","sender":"bob@wave.test","target":"{fresh}","emoji":"🎉"}}"#
        )]
    );

    // An expiring message carries its expiry; readable sync describes reactions.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    ok(alice, &["send", &room, "brief", "--expires", "30"]);
    let event: Value = serde_json::from_str(&sync_lines(bob).pop().unwrap()).unwrap();
    let expires_at = event["expires_at"].as_u64().unwrap();
    assert!(
        expires_at >= before + 30_000 && expires_at <= before + 32_000,
        "{event}"
    );
    ok(bob, &["react", &room, &reply, "\u{2764}"]);
    let text = ok(alice, &["sync"]);
    let text: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains(" received #"))
        .collect();
    assert_eq!(
        text.join("\n"),
        format!(
            "[{}] bob@wave.test reacted \u{2764} to #{}",
            &parley_proto::RoomId::parse(&room).unwrap().name()[..8],
            &reply[..12]
        )
    );
    server.terminate();
}

/// Everything the server acknowledged survives a kill -9 and a graceful restart, and the data
/// directory never holds a message's plaintext.
#[test]
fn a_second_device_from_the_cli() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path(), "127.0.0.1:0");
    let u = register_users(&server);
    ok(&u.alice, &["send", "bob@wave.test", "before the phone"]);
    let created = ok(
        &u.alice,
        &["room", "create", "--name", "team", "bob@wave.test"],
    );
    let team = created.lines().last().unwrap().trim().to_owned();
    sync_json(&u.bob);

    // Log in a second device of alice into its own profile.
    let phone = u.alice.with_file_name("alice-phone");
    let out = ok(
        &phone,
        &[
            "account",
            "login",
            "alice@chirp.test",
            "--server",
            &server.url,
            "--password",
            "alice-secret",
        ],
    );
    let phone_id = out
        .trim()
        .strip_prefix("logged in alice@chirp.test (new device ")
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{out}"))
        .to_owned();
    let devices = ok(&u.alice, &["account", "devices"]);
    assert_eq!(devices.lines().count(), 2, "{devices}");
    assert!(devices.contains(&phone_id), "{devices}");
    assert_eq!(devices.matches("(this device)").count(), 1, "{devices}");

    // The laptop's sync adds the phone to both of alice's rooms.
    sync_json(&u.alice);
    let joined = sync_json(&phone)
        .iter()
        .filter(|e| e["type"] == "joined")
        .count();
    assert_eq!(joined, 2);
    ok(&u.bob, &["send", "team", "to both of alice's"]);
    for p in [&u.alice, &phone] {
        assert_eq!(
            messages(&sync_json(p)),
            vec![("bob@wave.test".into(), "to both of alice's".into())]
        );
    }
    ok(&phone, &["send", "bob@wave.test", "from the phone"]);
    for p in [&u.bob, &u.alice] {
        assert_eq!(
            messages(&sync_json(p)),
            vec![("alice@chirp.test".into(), "from the phone".into())]
        );
    }

    // Remove the phone: from every room, then from the account.
    let line = fails(&phone, &["account", "remove-device", &phone_id]);
    assert!(line.contains("the device you are using"), "{line}");
    let out = ok(&u.alice, &["account", "remove-device", &phone_id]);
    assert!(out.contains(&phone_id), "{out}");
    assert_eq!(ok(&u.alice, &["account", "devices"]).lines().count(), 1);
    let line = fails(&phone, &["sync"]);
    assert!(line.contains("removed"), "{line}");
    ok(&u.bob, &["send", &team, "phone is gone"]);
    assert_eq!(
        messages(&sync_json(&u.alice)),
        vec![("bob@wave.test".into(), "phone is gone".into())]
    );
    let line = fails(&u.alice, &["account", "remove-device", "nonsense!"]);
    assert!(line.contains("device id"), "{line}");
}

#[test]
fn kill_9_and_restart_lose_nothing_acknowledged() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path(), "127.0.0.1:0");
    let port = server.port().to_owned();
    let listen = format!("127.0.0.1:{port}");
    let u = register_users(&server);
    let secret = |i: usize| format!("plaintext-canary-{i:03}-zebra");
    for i in 0..10 {
        ok(&u.alice, &["send", "bob@wave.test", &secret(i)]);
    }
    server.kill_9();
    let server = ServerProcess::start(data.path(), &listen);
    for i in 10..20 {
        ok(&u.alice, &["send", "bob@wave.test", &secret(i)]);
    }
    server.terminate();

    // No plaintext anywhere in the data directory (database, WAL, anything).
    for entry in walk(data.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        for needle in ["plaintext-canary", "zebra"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{} contains plaintext {needle:?}",
                entry.display()
            );
        }
    }

    let server = ServerProcess::start(data.path(), &listen);
    let got: Vec<String> = messages(&sync_json(&u.bob))
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    let want: Vec<String> = (0..20).map(secret).collect();
    assert_eq!(got, want, "all 20 acknowledged messages, once, in order");
    drop(server);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// `parley chat` is live both ways: lines typed are sent, pushed messages are printed.
#[test]
fn interactive_chat_sends_and_receives_live() {
    use std::io::Write as _;
    use std::sync::mpsc;
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path(), "127.0.0.1:0");
    let u = register_users(&server);
    let room = ok(
        &u.alice,
        &["room", "create", "--name", "chatroom", "bob@wave.test"],
    )
    .lines()
    .last()
    .unwrap()
    .to_owned();
    ok(&u.bob, &["sync"]); // join via the Welcome
    let mut chat = Command::new(BIN)
        .env("PARLEY_PROFILE", &u.bob)
        .env("RUST_LOG", "warn")
        .args(["chat", &room])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = chat.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
                if line.contains(needle) {
                    return line;
                }
            }
        }
        panic!("chat never printed {needle:?}");
    };
    wait_for("chatting in");
    let (id, _) = sent(&ok(&u.alice, &["send", &room, "live from alice"]));
    assert_eq!(
        wait_for("live from alice"),
        format!("alice@chirp.test: live from alice  #{}", &id[..12])
    );
    let mut stdin = chat.stdin.take().unwrap();
    writeln!(stdin, "typed by bob").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.is_empty() && Instant::now() < deadline {
        got = messages(&sync_json(&u.alice));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(got, vec![("bob@wave.test".into(), "typed by bob".into())]);
    // A reaction typed with the #id the chat showed.
    writeln!(stdin, "/react #{} \u{1f44d}", &id[..12]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut reactions = Vec::new();
    while reactions.is_empty() && Instant::now() < deadline {
        reactions = sync_json(&u.alice)
            .into_iter()
            .filter(|e| e["type"] == "reaction")
            .collect();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(reactions.len(), 1, "{reactions:?}");
    assert_eq!(
        (
            reactions[0]["target"].as_str(),
            reactions[0]["emoji"].as_str()
        ),
        (Some(id.as_str()), Some("\u{1f44d}"))
    );
    writeln!(stdin, "/quit").unwrap();
    let status = chat.wait().unwrap();
    assert!(status.success());
    drop(server);
}

/// TLS on the client API with certificates from `parley dev-ca`, clients trusting the CA.
#[test]
fn cli_over_tls_with_a_dev_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let ca_str = ca.to_str().unwrap();
    ok(dir.path(), &["dev-ca", "init", ca_str]);
    fails(dir.path(), &["dev-ca", "init", ca_str]); // never overwrites a CA
    ok(dir.path(), &["dev-ca", "issue", ca_str, "localhost"]);
    let (cert, key) = (ca.join("localhost.crt"), ca.join("localhost.key"));
    let server = ServerProcess::start_with(
        &dir.path().join("data"),
        "127.0.0.1:0",
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let url = format!("https://localhost:{}", server.port());
    let ca_cert = ca.join("ca.crt");
    let ca_arg = ca_cert.to_str().unwrap();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    // Without trusting the CA the client refuses the server's certificate.
    let line = fails(
        &alice,
        &[
            "account",
            "register",
            "alice@chirp.test",
            "--server",
            &url,
            "--password",
            "alice-secret",
        ],
    );
    assert!(
        line.contains("cannot reach") || line.contains("certificate"),
        "{line}"
    );
    for (profile, user) in [(&alice, "alice@chirp.test"), (&bob, "bob@wave.test")] {
        ok(
            profile,
            &[
                "--ca-cert",
                ca_arg,
                "account",
                "register",
                user,
                "--server",
                &url,
                "--password",
                "secret-123",
            ],
        );
    }
    ok(
        &alice,
        &["--ca-cert", ca_arg, "send", "bob@wave.test", "over TLS"],
    );
    let out = ok(&bob, &["--ca-cert", ca_arg, "sync", "--json"]);
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        messages(&events),
        vec![("alice@chirp.test".into(), "over TLS".into())]
    );
    drop(server);
}

#[test]
fn demo_shows_three_providers_and_checks_itself() {
    let mut cmd = Command::new(BIN);
    cmd.arg("demo");
    let stdout = succeeds(cmd);
    for line in [
        "refused by wave.test: bob has not consented (MIMI noConsent)",
        "carol  sees  nothing: she is no longer in the group",
        "dave   sees  alice@chirp.test: Carol has left; she cannot read this.",
        "Delivery summary",
        "demo finished in",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}

/// `parley bench` (the load tool behind BENCHMARKS.md) on one provider and across two: every
/// message sent must be delivered and reported, whatever the figures.
#[test]
fn bench_delivers_every_message_on_one_provider_and_across_two() {
    for federated in [false, true] {
        let mut args = vec!["--pairs", "3", "--messages", "60", "--concurrency", "4"];
        if federated {
            args.push("--federated");
        }
        let stdout = bench(&args);
        assert!(
            stdout.contains("messages deliv.  60\n"),
            "federated: {federated}:\n{stdout}"
        );
    }
}

/// Runs `parley bench ARGS`, which must succeed; its standard output.
fn bench(args: &[&str]) -> String {
    let mut cmd = Command::new(BIN);
    cmd.arg("bench").args(args);
    succeeds(cmd)
}

/// Runs `cmd` (quiet logs, no input), which must succeed; its standard output.
fn succeeds(mut cmd: Command) -> String {
    let out = cmd
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `bench/ejabberd-vs-parley.sh`: one open-loop generator drives a `parley serve` child process
/// and a private ejabberd with the same pairs and steps, and prints one table. Every message of
/// every step must arrive at both servers (whatever the latencies; no timing is asserted).
/// Needs Debian's ejabberd package, which `.ci/run` installs.
#[test]
fn ramp_drives_parley_and_ejabberd_side_by_side() {
    let installed = Command::new("sh")
        .args(["-c", "command -v ejabberdctl"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        eprintln!("SKIPPED: ejabberd is not installed (apt-get install ejabberd; .ci/run does)");
        return;
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../bench/ejabberd-vs-parley.sh"
    );
    // A port of its own: parallel tests must not meet a stray ejabberd.
    let port = 20000 + std::process::id() % 20000;
    let mut cmd = Command::new("bash");
    cmd.args([script, "100,200", "1", "2"])
        .env("PARLEY", BIN)
        .env("EJABBERD_PORT", port.to_string());
    let stdout = succeeds(cmd);
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| matches!(f.first(), Some(&"parley" | &"xmpp")) && f.len() > 4)
        .collect();
    for target in ["parley", "xmpp"] {
        let steps: Vec<_> = rows.iter().filter(|r| r[0] == target).collect();
        assert!(!steps.is_empty(), "no {target} step in:\n{stdout}");
        for r in steps {
            // target, offered/s, sent, delivered, failed, ...
            assert_eq!(r[2], r[3], "{target}: sent != delivered in:\n{stdout}");
            assert_eq!(r[4], "0", "{target}: failed sends in:\n{stdout}");
            assert_ne!(r[2], "0", "{target}: nothing sent in:\n{stdout}");
        }
    }
    assert!(stdout.contains("max sustained    xmpp"), "{stdout}");
}

/// `parley bench --idle-connections N`: the connections it opens (from loopback addresses of
/// its own) are real, authenticated push connections the server holds; it reports the memory.
#[test]
fn idle_connection_bench_opens_and_reports_every_connection() {
    let stdout = bench(&["--idle-connections", "300"]);
    assert!(
        stdout.contains("idle push connections  300 (from 1 loopback source addresses)"),
        "{stdout}"
    );
    assert!(stdout.contains("per idle connection"), "{stdout}");
}

/// `parley bench --room-members`: rooms of each size are made and every timed step (add, join,
/// fan-out, removal) completes, with the hub's own share read from its metrics.
#[test]
fn big_room_bench_times_every_step_at_every_size() {
    let stdout = bench(&["--room-members", "3,6"]);
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("room members"))
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    for (row, size) in rows.iter().zip(["3", "6"]) {
        assert_eq!(row.len(), 9, "{stdout}");
        assert_eq!(row[0], size, "{stdout}");
        for cell in &row[1..] {
            let ms: f64 = cell.parse().unwrap_or(-1.0);
            assert!(
                ms > 0.0,
                "a step that took no time is a step not taken: {stdout}"
            );
        }
    }
}
