//! Receipts as a user drives them: `parley sync` reports delivered by itself, `parley read`
//! reports read, and the sender's `sync --json` shows each as one documented line.

use std::path::Path;

mod common;
use common::*;

/// The `sync --json` lines of type `receipt`, exactly as printed.
fn receipt_lines(profile: &Path) -> Vec<String> {
    ok(profile, &["sync", "--json"])
        .lines()
        .filter(|l| l.starts_with(r#"{"type":"receipt""#))
        .map(str::to_owned)
        .collect()
}

#[test]
fn delivered_and_read_receipts_from_the_cli() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path(), "127.0.0.1:0");
    let AliceAndBob {
        dir: _users,
        alice,
        bob,
    } = alice_and_bob(&server);

    let out = ok(&alice, &["send", "bob@wave.test", "did you get this?"]);
    let mut words = out.split_whitespace().skip(1);
    let (id, room) = (words.next().unwrap(), words.nth(1).unwrap());
    assert_eq!(messages(&sync_json(&bob)).len(), 1);
    assert_eq!(
        receipt_lines(&alice),
        [format!(
            r#"{{"type":"receipt","room":"{room}","sender":"bob@wave.test","target":"{id}","status":"delivered"}}"#
        )]
    );

    // `parley read` by user address; a second run has nothing left to do.
    assert_eq!(
        ok(&bob, &["read", "alice@chirp.test"]).trim(),
        format!("marked 1 message read in {room}")
    );
    assert_eq!(
        ok(&bob, &["read", room]).trim(),
        format!("nothing new to mark read in {room}")
    );
    assert_eq!(
        receipt_lines(&alice),
        [format!(
            r#"{{"type":"receipt","room":"{room}","sender":"bob@wave.test","target":"{id}","status":"read"}}"#
        )]
    );
    // The readable form, and nothing ever comes back for a receipt.
    ok(&alice, &["send", room, "and this?"]);
    ok(&bob, &["sync"]);
    ok(&bob, &["read", room]);
    let text = ok(&alice, &["sync"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].contains("bob@wave.test received #"), "{text}");
    assert!(lines[1].contains("bob@wave.test read #"), "{text}");
    assert!(receipt_lines(&bob).is_empty());
    let line = fails(&bob, &["read", "nobody@chirp.test"]);
    assert!(line.contains("no 1:1 room"), "{line}");
}

/// A `parley chat` child with piped stdin, and its stdout lines on a channel.
struct Chat {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Chat {
    fn start(profile: &Path, room: &str) -> Self {
        use std::io::BufRead as _;
        use std::process::{Command, Stdio};
        let mut child = Command::new(BIN)
            .env("PARLEY_PROFILE", profile)
            .env("RUST_LOG", "warn")
            .args(["chat", room])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take().unwrap();
        let chat = Self {
            child,
            stdin,
            lines,
        };
        chat.wait_for("chatting in");
        chat
    }

    /// The first line containing `needle` within 20 s.
    fn wait_for(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if let Ok(line) = self
                .lines
                .recv_timeout(std::time::Duration::from_millis(100))
            {
                if line.contains(needle) {
                    return line;
                }
            }
        }
        panic!("chat never printed {needle:?}");
    }

    fn type_bytes(&mut self, bytes: &str) {
        use std::io::Write as _;
        self.stdin.write_all(bytes.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
    }

    fn quit(mut self) {
        self.type_bytes("/quit\n");
        assert!(self.child.wait().unwrap().success());
    }
}

#[test]
fn chat_shows_who_is_typing() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path(), "127.0.0.1:0");
    let AliceAndBob {
        dir: _users,
        alice,
        bob,
    } = alice_and_bob(&server);
    let out = ok(&alice, &["send", "bob@wave.test", "chat with me"]);
    let room = out.split_whitespace().nth(3).unwrap().to_owned();
    ok(&bob, &["sync"]);

    let mut alice_chat = Chat::start(&alice, &room);
    let bob_chat = Chat::start(&bob, &room);
    // The first key of a line goes out as a typing indicator, before the line is done.
    alice_chat.type_bytes("hel");
    assert_eq!(
        bob_chat.wait_for("is typing"),
        "alice@chirp.test is typing\u{2026}"
    );
    alice_chat.type_bytes("lo bob\n");
    assert!(bob_chat
        .wait_for("hello bob")
        .starts_with("alice@chirp.test: hello bob"));
    // Bob's chat showed it, so it is read.
    alice_chat.wait_for("bob@wave.test read #");
    alice_chat.quit();
    bob_chat.quit();
    // Nothing of the typing is left for a sync: only the message and receipts.
    let events = sync_json(&bob);
    assert!(events.iter().all(|e| e["type"] != "typing"), "{events:?}");
}
