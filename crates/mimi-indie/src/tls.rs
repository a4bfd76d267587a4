//! Mutually authenticated TLS (draft §4.1, profile §2) with rustls 0.23 and ring: the server
//! requires a client certificate chaining to the peer CA; the client presents its own and
//! verifies the peer's against the peer's domain. [`proves_domain`] is the check that a
//! verified certificate names the `From` domain. [`TestPki`] makes certificates for tests.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use thiserror::Error;

/// Certificates or keys that cannot be used.
#[derive(Debug, Error)]
pub enum TlsSetupError {
    #[error("bad PEM ({0}): {1}")]
    Pem(&'static str, String),
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("certificate generation: {0}")]
    Generate(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::Pem(what, e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsSetupError::Pem(what, "no certificate".into()));
    }
    Ok(certs)
}

fn key(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| TlsSetupError::Pem(what, e.to_string()))?
        .ok_or_else(|| TlsSetupError::Pem(what, "no private key".into()))
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(ca_pem, "peer CA")? {
        roots
            .add(cert)
            .map_err(|e| TlsSetupError::Pem("peer CA", e.to_string()))?;
    }
    Ok(Arc::new(roots))
}

/// The server side: our certificate, and client certificates required from the peer CA.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<ServerConfig, TlsSetupError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .build()
        .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert_pem, "server cert")?, key(key_pem, "server key")?)
        .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The client side: peers verified against the peer CA, our client certificate presented.
pub fn client_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<ClientConfig, TlsSetupError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Config(e.to_string()))?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(certs(cert_pem, "client cert")?, key(key_pem, "client key")?)
        .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Whether a (chain-verified) peer certificate names `domain` in its subjectAltName.
pub fn proves_domain(cert: &CertificateDer<'_>, domain: &str) -> bool {
    let Ok(name) = ServerName::try_from(domain) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .and_then(|ee| ee.verify_is_valid_for_subject_name(&name))
        .is_ok()
}

/// PEMs for one provider domain, issued by a [`TestPki`].
#[derive(Debug, Clone)]
pub struct DomainCerts {
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

/// A throwaway CA (rcgen) issuing server and client certificates for test domains.
pub struct TestPki {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    ca_pem: String,
}

impl TestPki {
    /// A new CA.
    pub fn new() -> Result<Self, TlsSetupError> {
        let generate = |e: rcgen::Error| TlsSetupError::Generate(e.to_string());
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mimi-indie test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().map_err(generate)?;
        let ca_pem = params.self_signed(&key).map_err(generate)?.pem();
        Ok(Self {
            params,
            key,
            ca_pem,
        })
    }

    /// The CA certificate (every provider's peer CA).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    fn issue(
        &self,
        domain: &str,
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> Result<(String, String), TlsSetupError> {
        let generate = |e: rcgen::Error| TlsSetupError::Generate(e.to_string());
        let mut params =
            rcgen::CertificateParams::new(vec![domain.to_owned()]).map_err(generate)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, domain);
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().map_err(generate)?;
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(generate)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A server certificate and a client certificate for `domain`.
    pub fn domain(&self, domain: &str) -> Result<DomainCerts, TlsSetupError> {
        let (server_cert_pem, server_key_pem) =
            self.issue(domain, rcgen::ExtendedKeyUsagePurpose::ServerAuth)?;
        let (client_cert_pem, client_key_pem) =
            self.issue(domain, rcgen::ExtendedKeyUsagePurpose::ClientAuth)?;
        Ok(DomainCerts {
            server_cert_pem,
            server_key_pem,
            client_cert_pem,
            client_key_pem,
        })
    }
}
