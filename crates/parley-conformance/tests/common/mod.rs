//! Test certificates (a throwaway CA and leaves naming one domain each) and kit settings.

use parley_conformance::KitConfig;
use parley_proto::Domain;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub path: PathBuf,
}

impl TestCa {
    pub fn new(dir: &Path) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "conformance test CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        let path = dir.join("ca.crt");
        std::fs::write(&path, pem).unwrap();
        Self {
            issuer: Issuer::new(params, key),
            path,
        }
    }

    /// A certificate and key for `domain` (server and client auth): their paths.
    pub fn leaf(&self, dir: &Path, domain: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(vec![domain.to_string()]).unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{domain}.crt")),
            dir.join(format!("{domain}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// A loopback address with a port free right now, for a listener others must know before it
/// starts. It is on a random 127.x.y.z: a port probed free on 127.0.0.1 could be taken, before the
/// listener binds it, by a server of a parallel test binding 127.0.0.1:0.
pub fn free_addr() -> SocketAddr {
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

/// Kit settings for checking `peer` at `peer_addr` as `kit.test`.
pub fn kit_config(
    dir: &Path,
    ca: &TestCa,
    peer: &str,
    peer_addr: SocketAddr,
    listen: SocketAddr,
) -> KitConfig {
    let (cert, key) = ca.leaf(dir, "kit.test");
    KitConfig {
        peer: Domain::parse(peer).unwrap(),
        peer_url: format!("https://{peer_addr}"),
        as_domain: Domain::parse("kit.test").unwrap(),
        cert,
        key,
        ca: ca.path.clone(),
        listen,
        peer_user: None,
        timeout: Duration::from_secs(20),
    }
}
