//! The kit against a real Parley provider (in-process, federation on loopback): every check
//! that needs no cooperation, and the forge suite, pass.

mod common;

use common::{free_addr, kit_config, TestCa};
use parley_conformance::Verdict;
use parley_server::config::ServerConfig;
use parley_server::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parley_passes_every_non_cooperative_check() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let (cert, key) = ca.leaf(dir.path(), "chirp.test");
    let kit_listen = free_addr();
    let mut config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: dir.path().join("chirp"),
        federation_listen: Some("127.0.0.1:0".parse().unwrap()),
        federation_cert: vec![cert],
        federation_key: vec![key],
        peer_ca: Some(ca.path.clone()),
        ..Default::default()
    };
    config.add_domain("chirp.test");
    config
        .peers
        .insert("kit.test".into(), format!("https://{kit_listen}"));
    let server = Server::start(config).await.unwrap();
    let kit = kit_config(
        dir.path(),
        &ca,
        "chirp.test",
        server.federation_addr().unwrap(),
        kit_listen,
    );

    let mut out = Vec::new();
    let summary = parley_conformance::run(kit, &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    println!("{text}");
    assert_eq!(summary.failed, 0, "failures:\n{text}");
    for line in &summary.lines {
        let expected = if parley_conformance::checks::flow::steps().any(|s| s == line.name) {
            Verdict::Skip
        } else {
            Verdict::Pass
        };
        assert_eq!(line.verdict, expected, "{}: {}", line.name, line.detail);
    }
    for name in [
        "directory",
        "keyMaterial.unknown-user",
        "identifierQuery.unknown-handle",
        "identifierQuery.unsupported-type",
        "requestConsent.unknown-user",
        "submitMessage.unknown-room",
        "update.unknown-room",
        "groupInfo.unknown-room",
        "reportAbuse.unknown-room",
        "notify.room-hubbed-by-peer",
        "notify.unknown-room-message",
        "notify.unknown-room-welcome",
        "forge.from-not-certificate",
        "forge.wrong-host",
        "forge.keyMaterial-bad-signature",
        "forge.oversized.notify",
        "forge.random-bytes.proxyDownload",
    ] {
        assert!(summary.line(name).is_some(), "{name} did not run");
    }
    assert!(text.ends_with(&format!("{}\n", summary.totals())));
    server.shutdown().await;
}
