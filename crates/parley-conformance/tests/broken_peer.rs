//! The kit can fail: a "provider" that answers `200` with an empty body to everything fails
//! nearly every check, and the summary counts the failures.

mod common;

use common::{free_addr, kit_config, TestCa};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use parley_conformance::Verdict;
use std::sync::Arc;

/// Serves `200 OK` (empty) to every request over TLS with a certificate for `domain`.
async fn yes_man(ca: &TestCa, dir: &std::path::Path, domain: &str) -> std::net::SocketAddr {
    let (cert, key) = ca.leaf(dir, domain);
    let certs = rustls_pemfile::certs(&mut std::fs::read(cert).unwrap().as_slice())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut std::fs::read(key).unwrap().as_slice())
        .unwrap()
        .unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new().fallback(|| async { axum::http::StatusCode::OK });
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, router) = (acceptor.clone(), router.clone());
            tokio::spawn(async move {
                if let Ok(stream) = acceptor.accept(tcp).await {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router))
                        .await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_says_yes_to_everything_fails() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let peer = yes_man(&ca, dir.path(), "broken.test").await;
    let kit = kit_config(dir.path(), &ca, "broken.test", peer, free_addr());
    let mut out = Vec::new();
    let summary = parley_conformance::run(kit, &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    println!("{text}");
    assert!(summary.failed > 30, "{text}");
    assert_eq!(summary.passed, 0, "{text}");
    for name in [
        "directory",
        "keyMaterial.unknown-user",
        "notify.room-hubbed-by-peer",
        "forge.from-not-certificate",
        "forge.wrong-host",
        "forge.keyMaterial-bad-signature",
        "forge.random-bytes.notify",
    ] {
        let line = summary.line(name).unwrap();
        assert_eq!(line.verdict, Verdict::Fail, "{name}: {}", line.detail);
    }
    assert!(text.contains("\nFAIL directory: "), "{text}");
    assert!(text.trim_end().ends_with(&summary.totals()));
}

/// A peer user who never does anything: every awaited step ends in a `FAIL` line after the
/// timeout (or `SKIP`s after it), and the run ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_silent_peer_ends_in_fail_lines() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let peer = yes_man(&ca, dir.path(), "broken.test").await;
    let mut kit = kit_config(dir.path(), &ca, "broken.test", peer, free_addr());
    kit.peer_user = Some(parley_proto::UserId::parse("silent@broken.test").unwrap());
    kit.timeout = std::time::Duration::from_secs(1);
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    let summary = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        parley_conformance::run(kit, &mut out),
    )
    .await
    .expect("the kit never hangs")
    .unwrap();
    let text = String::from_utf8(out).unwrap();
    println!("{text}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    for step in parley_conformance::checks::flow::steps() {
        let line = summary.line(step).unwrap();
        assert_ne!(line.verdict, Verdict::Pass, "{step}: {}", line.detail);
    }
    let consent = summary.line("flow.reverse-consent").unwrap();
    assert_eq!(consent.verdict, Verdict::Fail);
    assert!(consent.detail.contains("within"), "{}", consent.detail);
    assert!(text.contains("\nWAIT as silent@broken.test"));
}
