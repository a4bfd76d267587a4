//! The provider-to-provider (MIMI) listener: always mutual TLS. A peer's certificate must chain to
//! the configured peer CA, and every request names its source provider in `From: mimi@<domain>`,
//! which the certificate must prove; a request may only speak for what that domain may.
//!
//! This is the first step of the interconnect: transport, peer authentication and the endpoint
//! directory. The MIMI endpoints themselves (keyMaterial, update, notify, …) come next.

use crate::config::ServerConfig;
use crate::http::ApiError;
use crate::net::TlsError;
use crate::App;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use parley_proto::Domain;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

/// The MIMI endpoints, as named in the directory (draft-ietf-mimi-protocol §5.1).
const ENDPOINTS: [(&str, &str); 10] = [
    ("keyMaterial", "keyMaterial/{targetUser}"),
    ("update", "update/{roomId}"),
    ("notify", "notify/{roomId}"),
    ("submitMessage", "submitMessage/{roomId}"),
    ("groupInfo", "groupInfo/{roomId}"),
    ("requestConsent", "requestConsent/{targetUser}"),
    ("updateConsent", "updateConsent/{requesterUser}"),
    ("identifierQuery", "identifierQuery/{domain}"),
    ("reportAbuse", "reportAbuse/{roomId}"),
    ("proxyDownload", "proxyDownload/{downloadUrl}"),
];

/// The TLS client certificate of the connection a request came on (set by `net`).
#[derive(Clone, Default)]
pub struct PeerCertificate(pub Option<Arc<CertificateDer<'static>>>);

/// The peer provider a request was authenticated as.
#[derive(Clone, Debug)]
pub struct PeerDomain(pub Domain);

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
pub fn tls_acceptor(config: &ServerConfig) -> Result<TlsAcceptor, TlsError> {
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

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/.well-known/mimi-protocol-directory", get(directory))
        .fallback(|| async {
            ApiError(crate::error::ServiceError::not_found(
                "not_found",
                "no such MIMI endpoint",
            ))
        })
        .layer(axum::middleware::from_fn(authenticate_peer))
        .layer(axum::extract::DefaultBodyLimit::max(
            app.config.limits.max_body_bytes,
        ))
        .with_state(app)
}

/// Every federation request: `From: mimi@<domain>` must be proven by the TLS client certificate.
async fn authenticate_peer(
    Extension(peer): Extension<PeerCertificate>,
    mut request: Request,
    next: Next,
) -> Response {
    match peer_domain(request.headers(), &peer) {
        Ok(domain) => {
            request.extensions_mut().insert(PeerDomain(domain));
            next.run(request).await
        }
        Err(e) => e.into_response(),
    }
}

fn peer_domain(headers: &HeaderMap, peer: &PeerCertificate) -> Result<Domain, ApiError> {
    use crate::error::ServiceError;
    let from = headers
        .get(header::FROM)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ServiceError::bad(
                "missing_from",
                "MIMI requests carry `From: mimi@<your domain>`",
            )
        })?;
    let domain = from
        .strip_prefix("mimi@")
        .and_then(|d| Domain::parse(d).ok())
        .ok_or_else(|| {
            ServiceError::bad("invalid_from", "the From header must be mimi@<domain>")
        })?;
    let cert = peer
        .0
        .as_ref()
        .ok_or_else(|| ServiceError::Unauthorized("no client certificate".into()))?;
    if !certificate_names(cert, domain.as_str()) {
        return Err(ServiceError::forbidden(
            "peer_domain_mismatch",
            format!("your certificate does not prove the domain {domain}"),
        )
        .into());
    }
    Ok(domain)
}

/// `GET /.well-known/mimi-protocol-directory`: where each MIMI endpoint is.
async fn directory(State(_app): State<Arc<App>>, headers: HeaderMap) -> impl IntoResponse {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let map: serde_json::Map<String, serde_json::Value> = ENDPOINTS
        .iter()
        .map(|(name, path)| {
            (
                (*name).to_owned(),
                format!("https://{host}/v1/{path}").into(),
            )
        })
        .collect();
    Json(serde_json::Value::Object(map))
}
