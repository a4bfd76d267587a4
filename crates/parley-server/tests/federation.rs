//! The federation (MIMI) listener: mutual TLS against the peer CA, and `From: mimi@<domain>`
//! accepted only when the peer's certificate proves that domain.

use parley_server::config::ServerConfig;
use parley_server::Server;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use reqwest::StatusCode;
use serde_json::Value;
use std::path::Path;

/// A throwaway CA; `leaf` writes a certificate and key naming `domains`, returns the PEM bundle.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    fn leaf(
        &self,
        dir: &Path,
        domains: &[&str],
    ) -> (std::path::PathBuf, std::path::PathBuf, String) {
        let mut params =
            CertificateParams::new(domains.iter().map(|d| d.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{}.crt", domains[0])),
            dir.join(format!("{}.key", domains[0])),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k, format!("{}{}", cert.pem(), key.serialize_pem()))
    }
}

#[tokio::test]
async fn peers_are_authenticated_by_certificate_and_from_header() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("federation test CA");
    let (cert, key, _) = ca.leaf(dir.path(), &["chirp.test"]);
    let (_, _, wave) = ca.leaf(dir.path(), &["wave.test"]);
    let (_, _, evil) = ca.leaf(dir.path(), &["evil.test"]);
    let ca_path = dir.path().join("ca.crt");
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let mut config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: dir.path().join("data"),
        federation_listen: Some("127.0.0.1:0".parse().unwrap()),
        federation_cert: vec![cert],
        federation_key: vec![key],
        peer_ca: Some(ca_path),
        ..Default::default()
    };
    config.add_domain("chirp.test");
    let server = Server::start(config).await.unwrap();
    let port = server.federation_addr().unwrap().port();
    // The peer dials the hub's domain name (SNI), resolved to loopback.
    let url = format!("https://chirp.test:{port}/.well-known/mimi-protocol-directory");
    let addr = server.federation_addr().unwrap();
    let get = |client: reqwest::Client, from: Option<&'static str>| {
        let url = url.clone();
        async move {
            let mut req = client.get(&url);
            if let Some(f) = from {
                req = req.header("From", f);
            }
            req.send().await
        }
    };
    let with_resolve = |identity: Option<&str>, ca: &TestCa| {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .resolve("chirp.test", addr)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap());
        if let Some(pem) = identity {
            b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
        }
        b.build().unwrap()
    };

    // A peer whose certificate proves wave.test, speaking as wave.test: the directory.
    let resp = get(with_resolve(Some(&wave), &ca), Some("mimi@wave.test"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let dirjson: Value = resp.json().await.unwrap();
    assert_eq!(
        dirjson["keyMaterial"],
        format!("https://chirp.test:{port}/v1/keyMaterial/{{targetUser}}")
    );
    // The draft's ten, and Parley's extension x-parley-ephemeral.
    assert_eq!(dirjson.as_object().unwrap().len(), 11);
    assert_eq!(
        dirjson["notify"],
        format!("https://chirp.test:{port}/v1/notify/{{roomId}}")
    );
    // A request whose Host is not a domain hosted here is misdirected.
    let resp = with_resolve(Some(&wave), &ca)
        .get(&url)
        .header("From", "mimi@wave.test")
        .header("Host", "elsewhere.test")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "misdirected_request"
    );

    // A valid certificate for evil.test claiming to be wave.test: refused.
    let resp = get(with_resolve(Some(&evil), &ca), Some("mimi@wave.test"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "peer_domain_mismatch"
    );
    // No From header, or a malformed one.
    let resp = get(with_resolve(Some(&wave), &ca), None).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = get(with_resolve(Some(&wave), &ca), Some("wave.test"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // Without a client certificate, or with one from another CA, there is no connection at all.
    assert!(get(with_resolve(None, &ca), Some("mimi@wave.test"))
        .await
        .is_err());
    let other = TestCa::new("someone else's CA");
    let (_, _, foreign) = other.leaf(dir.path(), &["wave.test"]);
    assert!(
        get(with_resolve(Some(&foreign), &ca), Some("mimi@wave.test"))
            .await
            .is_err()
    );
    // The client API is unaffected.
    let health = reqwest::get(format!("{}/health", server.url()))
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    server.shutdown().await;
}

#[test]
fn federation_settings_must_be_complete() {
    let mut config = ServerConfig {
        federation_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    };
    assert!(config
        .validate()
        .unwrap_err()
        .to_string()
        .contains("--federation-cert"));
    config.federation_cert = vec!["a.crt".into()];
    config.federation_key = vec!["a.key".into()];
    assert!(config
        .validate()
        .unwrap_err()
        .to_string()
        .contains("--peer-ca"));
    config.peer_ca = Some("ca.crt".into());
    config.validate().unwrap();
    config
        .peers
        .insert("wave.test".into(), "http://127.0.0.1:1".into());
    assert!(config
        .validate()
        .unwrap_err()
        .to_string()
        .contains("https://"));
}

/// A provider finds a peer's endpoints through its directory, over mutual TLS, and checks the
/// peer's certificate against the peer's domain even when the configured URL is an address.
#[tokio::test]
async fn peers_are_discovered_through_the_directory() {
    use parley_proto::Domain;
    use parley_server::peers::PeerClient;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("federation test CA");
    let ca_path = dir.path().join("ca.crt");
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let start = |domain: &'static str| {
        let (cert, key, _) = ca.leaf(dir.path(), &[domain]);
        let mut config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data: dir.path().join(domain),
            federation_listen: Some("127.0.0.1:0".parse().unwrap()),
            federation_cert: vec![cert],
            federation_key: vec![key],
            peer_ca: Some(ca_path.clone()),
            ..Default::default()
        };
        config.add_domain(domain);
        config
    };
    let wave = Server::start(start("wave.test")).await.unwrap();
    let evil = Server::start(start("evil.test")).await.unwrap();
    let mut chirp_config = start("chirp.test");
    let at = |s: &Server| format!("https://{}", s.federation_addr().unwrap());
    chirp_config.peers.insert("wave.test".into(), at(&wave));
    // A URL that leads to a provider whose certificate does not name the peer's domain.
    chirp_config.peers.insert("impostor.test".into(), at(&evil));
    chirp_config.validate().unwrap();
    let peers = PeerClient::new(&chirp_config)
        .unwrap()
        .expect("federation is configured");
    let chirp = Domain::parse("chirp.test").unwrap();

    let directory = peers
        .directory(&chirp, &Domain::parse("wave.test").unwrap())
        .await
        .unwrap();
    let port = wave.federation_addr().unwrap().port();
    assert_eq!(
        directory.fill("keyMaterial", "wave.test/u/bob").as_deref(),
        Some(format!("https://wave.test:{port}/v1/keyMaterial/wave.test/u/bob").as_str())
    );
    let err = peers
        .directory(&chirp, &Domain::parse("impostor.test").unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("cannot reach peer impostor.test"),
        "{err}"
    );
    // This provider cannot speak for a domain it holds no certificate for.
    let fresh = PeerClient::new(&chirp_config).unwrap().unwrap();
    let err = fresh
        .directory(
            &Domain::parse("other.test").unwrap(),
            &Domain::parse("wave.test").unwrap(),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("no federation certificate for other.test"),
        "{err}"
    );
    wave.shutdown().await;
    evil.shutdown().await;
}
