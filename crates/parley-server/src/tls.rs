//! TLS material and setup shared by the listeners and the outbound MIMI client: PEM certificate
//! chains and keys, the rustls server configurations (the client API's, optional; the federation
//! listener's, always mutual against the peer CA), and which domains a certificate names.

use crate::config::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("no certificate in {0}")]
    NoCert(String),
    #[error("no private key in {0}")]
    NoKey(String),
    #[error("bad TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("bad peer CA: {0}")]
    Verifier(String),
}

/// The TLS client certificate of the connection a request came on (set by `net`).
#[derive(Clone, Default)]
pub struct PeerCertificate(pub Option<Arc<CertificateDer<'static>>>);

/// Builds a TLS acceptor from PEM files (certificate chain, private key).
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| TlsError::Read(p.display().to_string(), e));
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read(cert.display().to_string(), e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(cert.display().to_string()));
    }
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| TlsError::Read(key.display().to_string(), e))?
        .ok_or_else(|| TlsError::NoKey(key.display().to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key_der)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read(path.display().to_string(), e))
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read(path.display().to_string(), e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(path.display().to_string()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_pem(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| TlsError::Read(path.display().to_string(), e))?
        .ok_or_else(|| TlsError::NoKey(path.display().to_string()))
}

/// Whether a certificate is valid for `domain` (its SAN names it).
pub fn certificate_names(cert: &CertificateDer<'_>, domain: &str) -> bool {
    let Ok(name) = ServerName::try_from(domain) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .map(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
        .unwrap_or(false)
}

/// Picks this provider's certificate by SNI; without SNI (a peer dialling an IP), the first one.
#[derive(Debug)]
struct DomainCertificates {
    by_domain: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for DomainCertificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello.server_name().and_then(|sni| self.by_domain.get(sni));
        Some(chosen.unwrap_or(&self.default).clone())
    }
}

/// Mutual TLS for the federation listener: our certificates for our domains, peers verified
/// against the peer CA (a peer without a valid client certificate cannot even connect).
pub fn federation_acceptor(config: &ServerConfig) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut keys = Vec::new();
    for (cert, key) in config.federation_cert.iter().zip(&config.federation_key) {
        let chain = load_chain(cert)?;
        let signing = provider
            .key_provider
            .load_private_key(load_key(key)?)
            .map_err(TlsError::Rustls)?;
        keys.push(Arc::new(CertifiedKey::new(chain, signing)));
    }
    let default = keys
        .first()
        .cloned()
        .ok_or_else(|| TlsError::NoCert("--federation-cert".into()))?;
    let by_domain = config
        .domains
        .iter()
        .filter_map(|d| {
            keys.iter()
                .find(|k| {
                    k.cert
                        .first()
                        .is_some_and(|c| certificate_names(c, &d.name))
                })
                .map(|k| (d.name.clone(), k.clone()))
        })
        .collect();
    let mut roots = rustls::RootCertStore::empty();
    let ca_path = config
        .peer_ca
        .as_deref()
        .ok_or_else(|| TlsError::NoCert("--peer-ca".into()))?;
    for ca in load_chain(ca_path)? {
        roots.add(ca).map_err(TlsError::Rustls)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(DomainCertificates { by_domain, default }));
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(tls)))
}
