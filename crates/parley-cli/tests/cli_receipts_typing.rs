//! Receipts as a user drives them: `parley sync` reports delivered by itself, `parley read`
//! reports read, and the sender's `sync --json` shows each as one documented line.

use std::path::Path;

mod common;
use common::*;

fn register(profile: &Path, server: &ServerProcess, user: &str) {
    ok(
        profile,
        &[
            "account",
            "register",
            user,
            "--server",
            &server.url,
            "--password",
            "secret-password",
        ],
    );
}

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
    let users = tempfile::tempdir().unwrap();
    let (alice, bob) = (users.path().join("alice"), users.path().join("bob"));
    register(&alice, &server, "alice@chirp.test");
    register(&bob, &server, "bob@wave.test");

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
