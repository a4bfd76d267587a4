//! `parley send-file` as a user drives it: a real `parley serve` process hosting two domains,
//! the file arriving through `parley sync --json` in the receiver's downloads folder, and a file
//! over the domain's limit refused with one clear error line.

use std::path::Path;

mod common;
use common::*;

const LIMIT: usize = 1024 * 1024;

#[test]
fn send_file_reaches_the_other_domain_and_oversized_files_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("parley.toml");
    std::fs::write(
        &config,
        format!(
            "[[domain]]\nname = \"chirp.test\"\nmax_upload_bytes = {LIMIT}\n\
             [[domain]]\nname = \"wave.test\"\n"
        ),
    )
    .unwrap();
    let server = ServerProcess::start_with(
        &data.path().join("server"),
        "127.0.0.1:0",
        &["--config", config.to_str().unwrap()],
    );
    let AliceAndBob {
        dir: users,
        alice,
        bob,
    } = alice_and_bob(&server);
    ok(&alice, &["send", "bob@wave.test", "a file is coming"]);
    assert_eq!(messages(&sync_json(&bob)).len(), 1);

    // Into the 1:1 room by address; the receiver's sync saves it and says where.
    let report: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let path = users.path().join("report.pdf");
    std::fs::write(&path, &report).unwrap();
    let out = ok(
        &alice,
        &["send-file", "bob@wave.test", path.to_str().unwrap()],
    );
    assert!(
        out.starts_with("sent ") && out.contains("(report.pdf, 300016 bytes encrypted)"),
        "{out}"
    );
    let events = sync_json(&bob);
    let file = events
        .iter()
        .find(|e| e["type"] == "message" && e.get("file").is_some())
        .unwrap_or_else(|| panic!("no file event in {events:?}"));
    assert_eq!(file["name"], "report.pdf");
    assert_eq!(file["sender"], "alice@chirp.test");
    let saved = Path::new(file["file"].as_str().unwrap());
    assert_eq!(saved, bob.join("downloads").join("report.pdf"));
    assert_eq!(std::fs::read(saved).unwrap(), report);
    // The plain `sync` line names the saved file too.
    ok(
        &alice,
        &["send-file", "bob@wave.test", path.to_str().unwrap()],
    );
    let line = ok(&bob, &["sync"]);
    assert!(
        line.contains("alice@chirp.test: [file report.pdf] (saved to ")
            && line.contains("report (1).pdf"),
        "{line}"
    );

    // Over chirp.test's limit: one error line naming the limit, exit code 1, nothing sent.
    let big = users.path().join("big.bin");
    std::fs::write(&big, vec![7u8; LIMIT + 1]).unwrap();
    let out = parley(
        &alice,
        &["send-file", "bob@wave.test", big.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let line = fails(
        &alice,
        &["send-file", "bob@wave.test", big.to_str().unwrap()],
    );
    assert!(
        line.contains("too large") && line.contains(&LIMIT.to_string()),
        "{line}"
    );
    assert!(messages(&sync_json(&bob)).is_empty());
    // A missing file is a clear error too.
    let line = fails(&alice, &["send-file", "bob@wave.test", "/no/such/file"]);
    assert!(line.contains("/no/such/file"), "{line}");
}
