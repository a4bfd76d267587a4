//! `parley conformance` as an operator runs it: against a `parley serve` process (a provider
//! configured to reach the kit's domain at the kit's listener), every check passes and the
//! command exits 0; against something that is not a MIMI provider it reports failures and exits
//! non-zero. (The cooperative full flow is tested in crates/parley-conformance/tests.)

mod common;
use common::*;

use std::process::Command;

#[test]
fn conformance_passes_against_parley_and_fails_against_a_non_provider() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let ca_s = ca.to_str().unwrap();
    for args in [
        vec!["dev-ca", "init", ca_s],
        vec!["dev-ca", "issue", ca_s, "chirp.test"],
        vec!["dev-ca", "issue", ca_s, "kit.test"],
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
    }
    let file = |f: &str| ca.join(f).to_str().unwrap().to_owned();
    let (api, fed, kit) = (free_addr(), free_addr(), free_addr());
    let kit_peer = format!("kit.test=https://{kit}");
    let _server = ServerProcess::spawn(
        &dir.path().join("data-chirp"),
        &[
            "--domain",
            "chirp.test",
            "--listen",
            &api.to_string(),
            "--federation-listen",
            &fed.to_string(),
            "--federation-cert",
            &file("chirp.test.crt"),
            "--federation-key",
            &file("chirp.test.key"),
            "--peer-ca",
            &file("ca.crt"),
            "--peer",
            &kit_peer,
        ],
    );
    let conformance = |url: &str| {
        Command::new(BIN)
            .args([
                "conformance",
                url,
                "--peer",
                "chirp.test",
                "--as",
                "kit.test",
                "--cert",
                &file("kit.test.crt"),
                "--key",
                &file("kit.test.key"),
                "--ca",
                &file("ca.crt"),
                "--listen",
                &kit.to_string(),
                "--timeout",
                "10",
            ])
            .output()
            .unwrap()
    };

    let out = conformance(&format!("https://{fed}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "conformance failed against Parley:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    for check in [
        "PASS directory",
        "PASS keyMaterial.unknown-user",
        "PASS notify.room-hubbed-by-peer",
        "PASS forge.from-not-certificate",
        "PASS forge.wrong-host",
        "PASS forge.keyMaterial-bad-signature",
        "PASS forge.keyMaterial-path-vs-body",
        "PASS forge.submitMessage-sender-domain",
        "PASS forge.oversized.notify",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(check)),
            "no `{check}` line:\n{stdout}"
        );
    }
    assert!(!lines.iter().any(|l| l.starts_with("FAIL")), "{stdout}");
    let summary = lines.last().unwrap();
    assert!(summary.contains(" 0 failed"), "{summary}");
    // Without --peer-user the cooperative flow is skipped, and says so.
    assert!(
        lines.iter().any(|l| l.starts_with("SKIP flow.")),
        "{stdout}"
    );

    // The client API port is no MIMI provider (plain HTTP, no directory): failures, exit 1.
    let out = conformance(&format!("https://{api}"));
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
