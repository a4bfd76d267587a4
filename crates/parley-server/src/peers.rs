//! Outbound calls to peer providers: mutual TLS with this provider's certificate for the domain it
//! speaks as, `From: mimi@<domain>`, and peer discovery through the MIMI endpoint directory.
//!
//! A peer is reached at its `[peers]` URL, else `https://DOMAIN`. Its certificate is always checked
//! against the peer's *domain*, whatever host or address the URL names, so `--peer
//! wave.test=https://127.0.0.1:8421` still requires a certificate for `wave.test`.
//!
//! What a failed or refused call means for a local client (a `ServiceError`, retryable when the
//! peer is out of reach) is decided here too, once for every service that calls peers.

use crate::config::ServerConfig;
use crate::error::{ServiceError, ServiceResult};
use crate::tls::certificate_names;
use parley_proto::mimi::{https_url_parts, Directory};
use parley_proto::Domain;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PEER_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest directory document accepted from a peer.
const MAX_DIRECTORY_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("this provider has no federation certificate for {0}")]
    NoIdentity(Domain),
    #[error("bad peer URL for {0}: {1}")]
    BadUrl(Domain, String),
    #[error("cannot reach peer {0}: {1}")]
    Unreachable(Domain, String),
    #[error("peer {0} answered {1}")]
    Refused(Domain, String),
    #[error("peer {0} sent an invalid directory: {1}")]
    BadDirectory(Domain, String),
    #[error("cannot read federation credentials: {0}")]
    Credentials(String),
}

impl From<PeerError> for ServiceError {
    /// What a client is told: which provider failed, retryably. The transport's details (DNS,
    /// TLS, addresses) go to the log only.
    fn from(e: PeerError) -> Self {
        tracing::warn!(error = %e, "peer request failed");
        let message = match &e {
            PeerError::NoIdentity(_) | PeerError::Credentials(_) => {
                "this provider cannot talk to other providers now; try again later".to_owned()
            }
            PeerError::BadUrl(peer, _)
            | PeerError::Unreachable(peer, _)
            | PeerError::Refused(peer, _)
            | PeerError::BadDirectory(peer, _) => {
                format!("the provider {peer} cannot be reached now; try again later")
            }
        };
        Self::unavailable("peer_unreachable", message)
    }
}

/// The URL of `endpoint` in a peer's directory with its one `{…}` parameter filled in as given:
/// a room or user URI without `mimi://` (`chirp.test/r/NAME`, as the draft's examples write
/// them) or a domain. Those hold only unreserved characters and `/`, so nothing needs encoding;
/// anything else is refused.
fn path_url(directory: &Directory, endpoint: &str, param: &str) -> Option<String> {
    let path_safe = !param.is_empty()
        && param
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-' | b'/'));
    path_safe.then(|| directory.fill(endpoint, param))?
}

/// The URL of `endpoint` with its parameter percent-encoded as one path segment (a URL for
/// `proxyDownload`).
fn segment_url(directory: &Directory, endpoint: &str, param: &str) -> Option<String> {
    let (head, tail) = directory.template(endpoint)?;
    let mut url = reqwest::Url::parse(head).ok()?;
    url.path_segments_mut().ok()?.pop_if_empty().push(param);
    Some(format!("{url}{tail}"))
}

/// Where and how to reach one peer: a URL naming the peer's domain, and the address to dial.
struct Route {
    base: String,
    addr: Option<SocketAddr>,
}

pub struct PeerClient {
    /// PEM identity (certificate + key) per local domain.
    identities: HashMap<String, Vec<u8>>,
    peer_ca: Vec<u8>,
    peers: BTreeMap<String, String>,
    clients: Mutex<HashMap<(String, String), reqwest::Client>>,
    directories: Mutex<HashMap<String, Arc<Directory>>>,
}

impl PeerClient {
    /// Builds the client from the federation settings; `None` when federation is not configured.
    pub fn new(config: &ServerConfig) -> Result<Option<Self>, PeerError> {
        let Some(ca_path) = &config.peer_ca else {
            return Ok(None);
        };
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| PeerError::Credentials(format!("{}: {e}", p.display())))
        };
        let mut identities = HashMap::new();
        for (cert, key) in config.federation_cert.iter().zip(&config.federation_key) {
            let cert_pem = read(cert)?;
            let first = rustls_pemfile::certs(&mut cert_pem.as_slice())
                .next()
                .and_then(Result::ok)
                .ok_or_else(|| {
                    PeerError::Credentials(format!("no certificate in {}", cert.display()))
                })?;
            let mut pem = cert_pem.clone();
            pem.extend(read(key)?);
            for d in &config.domains {
                if certificate_names(&first, &d.name) {
                    identities
                        .entry(d.name.clone())
                        .or_insert_with(|| pem.clone());
                }
            }
        }
        Ok(Some(Self {
            identities,
            peer_ca: read(ca_path)?,
            peers: config.peers.clone(),
            clients: Mutex::new(HashMap::new()),
            directories: Mutex::new(HashMap::new()),
        }))
    }

    async fn route(&self, peer: &Domain) -> Result<Route, PeerError> {
        let Some(configured) = self.peers.get(peer.as_str()) else {
            return Ok(Route {
                base: format!("https://{peer}"),
                addr: None,
            });
        };
        let url = https_url_parts(configured)
            .ok_or_else(|| PeerError::BadUrl(peer.clone(), configured.clone()))?;
        let addr = tokio::net::lookup_host((url.0.as_str(), url.1))
            .await
            .map_err(|e| PeerError::Unreachable(peer.clone(), e.to_string()))?
            .next()
            .ok_or_else(|| {
                PeerError::Unreachable(peer.clone(), format!("{} has no address", url.0))
            })?;
        Ok(Route {
            base: format!("https://{peer}:{}{}", url.1, url.2),
            addr: Some(addr),
        })
    }

    fn client(
        &self,
        as_domain: &Domain,
        peer: &Domain,
        route: &Route,
    ) -> Result<reqwest::Client, PeerError> {
        let key = (as_domain.to_string(), peer.to_string());
        if let Some(c) = self.clients.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(c);
        }
        let identity = self
            .identities
            .get(as_domain.as_str())
            .ok_or_else(|| PeerError::NoIdentity(as_domain.clone()))?;
        let bad = |e: reqwest::Error| PeerError::Credentials(e.to_string());
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&self.peer_ca).map_err(bad)?)
            .identity(reqwest::Identity::from_pem(identity).map_err(bad)?)
            .timeout(PEER_TIMEOUT);
        if let Some(addr) = route.addr {
            builder = builder.resolve(peer.as_str(), addr);
        }
        let client = builder.build().map_err(bad)?;
        if let Ok(mut m) = self.clients.lock() {
            m.insert(key, client.clone());
        }
        Ok(client)
    }

    /// The peer's endpoint directory (`GET /.well-known/mimi-protocol-directory`), cached.
    pub async fn directory(
        &self,
        as_domain: &Domain,
        peer: &Domain,
    ) -> Result<Arc<Directory>, PeerError> {
        if let Some(d) = self
            .directories
            .lock()
            .ok()
            .and_then(|m| m.get(peer.as_str()).cloned())
        {
            return Ok(d);
        }
        let route = self.route(peer).await?;
        let client = self.client(as_domain, peer, &route)?;
        let resp = client
            .get(format!(
                "{}/.well-known/mimi-protocol-directory",
                route.base
            ))
            .header(reqwest::header::FROM, format!("mimi@{as_domain}"))
            .send()
            .await
            .map_err(|e| PeerError::Unreachable(peer.clone(), error_chain(&e)))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = read_at_most(resp, MAX_DIRECTORY_BYTES, peer)
                .await
                .unwrap_or_default();
            return Err(PeerError::Refused(
                peer.clone(),
                format!("{status}: {}", truncate(&String::from_utf8_lossy(&body))),
            ));
        }
        let bytes = read_at_most(resp, MAX_DIRECTORY_BYTES, peer)
            .await
            .map_err(|e| match e {
                PeerError::Refused(peer, _) => PeerError::BadDirectory(peer, "too large".into()),
                e => e,
            })?;
        let endpoints: HashMap<String, String> = serde_json::from_slice(&bytes)
            .map_err(|e| PeerError::BadDirectory(peer.clone(), e.to_string()))?;
        let directory = Arc::new(Directory { endpoints });
        if let Ok(mut m) = self.directories.lock() {
            m.insert(peer.to_string(), directory.clone());
        }
        Ok(directory)
    }
}

impl PeerClient {
    /// POSTs a MIMI body to the peer's `endpoint` (from its directory) with `param` filled in.
    /// Returns the peer's HTTP status and body (at most `MAX_ANSWER_BYTES`); network and TLS
    /// failures are `Unreachable`.
    pub async fn post(
        &self,
        as_domain: &Domain,
        peer: &Domain,
        endpoint: &str,
        param: &str,
        body: Vec<u8>,
    ) -> Result<(reqwest::StatusCode, Vec<u8>), PeerError> {
        let directory = self.directory(as_domain, peer).await?;
        let url = path_url(&directory, endpoint, param).ok_or_else(|| {
            PeerError::BadDirectory(peer.clone(), format!("no {endpoint} endpoint"))
        })?;
        let route = self.route(peer).await?;
        let client = self.client(as_domain, peer, &route)?;
        let resp = client
            .post(url)
            .header(reqwest::header::FROM, format!("mimi@{as_domain}"))
            .header(
                reqwest::header::CONTENT_TYPE,
                parley_proto::mimi::CONTENT_TYPE,
            )
            .body(body)
            .send()
            .await
            .map_err(|e| PeerError::Unreachable(peer.clone(), error_chain(&e)))?;
        let status = resp.status();
        Ok((status, read_at_most(resp, MAX_ANSWER_BYTES, peer).await?))
    }

    /// POSTs a MIMI body to a peer and returns the answer when it is a success; a refusal
    /// becomes the error a local client is told.
    pub async fn call(
        &self,
        as_domain: &Domain,
        peer: &Domain,
        endpoint: &str,
        param: &str,
        body: Vec<u8>,
    ) -> ServiceResult<Vec<u8>> {
        let (status, answer) = self
            .post(as_domain, peer, endpoint, param, body)
            .await
            .map_err(ServiceError::from)?;
        if status.is_success() {
            return Ok(answer);
        }
        Err(relayed_error(status.as_u16(), &answer, peer))
    }
}

impl PeerClient {
    /// Any local domain this provider can authenticate as (for requests that speak for no user).
    pub fn any_identity(&self) -> Option<Domain> {
        let mut domains: Vec<&String> = self.identities.keys().collect();
        domains.sort();
        domains.first().and_then(|d| Domain::parse(d).ok())
    }

    /// `GET https://HOST/v1/assets/ID` on the hosting provider's federation listener: the
    /// answer, to be streamed on.
    pub async fn get_asset(
        &self,
        as_domain: &Domain,
        host: &Domain,
        id: &str,
    ) -> Result<reqwest::Response, PeerError> {
        let route = self.route(host).await?;
        let url = format!("{}/v1/assets/{id}", route.base);
        self.get(as_domain, host, &route, url).await
    }

    /// MIMI `proxyDownload/{downloadUrl}` at a room's hub.
    pub async fn proxy_download(
        &self,
        as_domain: &Domain,
        hub: &Domain,
        download_url: &str,
    ) -> Result<reqwest::Response, PeerError> {
        let directory = self.directory(as_domain, hub).await?;
        let url = segment_url(&directory, "proxyDownload", download_url).ok_or_else(|| {
            PeerError::BadDirectory(hub.clone(), "no proxyDownload endpoint".into())
        })?;
        let route = self.route(hub).await?;
        self.get(as_domain, hub, &route, url).await
    }

    async fn get(
        &self,
        as_domain: &Domain,
        peer: &Domain,
        route: &Route,
        url: String,
    ) -> Result<reqwest::Response, PeerError> {
        let client = self.client(as_domain, peer, route)?;
        // Long downloads: the whole-request timeout would cut large files short.
        client
            .get(url)
            .header(reqwest::header::FROM, format!("mimi@{as_domain}"))
            .timeout(ASSET_TIMEOUT)
            .send()
            .await
            .map_err(|e| PeerError::Unreachable(peer.clone(), error_chain(&e)))
    }
}

/// Longest a proxied asset download may take.
const ASSET_TIMEOUT: Duration = Duration::from_secs(3600);

/// Largest answer read from a peer.
const MAX_ANSWER_BYTES: usize = parley_proto::mimi::MAX_BODY;

/// The outbound client, or the refusal a local client gets when this provider does not talk to
/// other providers.
pub fn required(peers: Option<&PeerClient>) -> ServiceResult<&PeerClient> {
    peers.ok_or_else(|| {
        ServiceError::forbidden(
            "federation_disabled",
            "this provider is not configured to talk to other providers",
        )
    })
}

/// A peer answer that is not the MIMI body it should be.
pub fn hub_garbled(peer: &Domain, e: impl std::fmt::Display) -> ServiceError {
    ServiceError::unavailable(
        "peer_protocol_error",
        format!("{peer} answered with an invalid body: {e}"),
    )
}

/// A peer's HTTP error (JSON `{error, message}` from a Parley peer) for our client.
fn relayed_error(status: u16, body: &[u8], peer: &Domain) -> ServiceError {
    let parsed: Option<parley_proto::api::ErrorBody> = serde_json::from_slice(body).ok();
    let message = parsed
        .as_ref()
        .map(|b| format!("{peer}: {}", b.message))
        .unwrap_or_else(|| format!("{peer} answered HTTP {status}"));
    match status {
        404 => ServiceError::not_found("unknown_room", message),
        403 => ServiceError::forbidden("not_allowed", message),
        409 => ServiceError::Conflict {
            code: "conflict",
            message,
            retryable: parsed.is_some_and(|b| b.retryable),
        },
        413 => ServiceError::too_large("too_large", message),
        429 => ServiceError::RateLimited(message),
        400..=499 => ServiceError::bad("peer_refused", message),
        _ => ServiceError::unavailable("peer_unavailable", message),
    }
}

/// A peer's answer body, read chunk by chunk and refused (`Refused`, "answer too large") as
/// soon as it passes `max` bytes, whatever its Content-Length says or leaves out.
async fn read_at_most(
    mut resp: reqwest::Response,
    max: usize,
    peer: &Domain,
) -> Result<Vec<u8>, PeerError> {
    let too_large = || PeerError::Refused(peer.clone(), "answer too large".into());
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| PeerError::Unreachable(peer.clone(), e.to_string()))?
    {
        if body.len() + chunk.len() > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer streaming an endless answer without Content-Length is cut off at the limit.
    #[tokio::test]
    async fn answers_are_read_up_to_their_limit() {
        let peer = Domain::parse("wave.test").unwrap();
        fn streamed(
            chunks: impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Send + Sync + 'static,
        ) -> reqwest::Response {
            axum::http::Response::new(reqwest::Body::wrap_stream(chunks)).into()
        }
        let chunk = || Ok::<_, std::io::Error>(vec![b'x'; 1000]);
        let endless = futures_util::stream::repeat_with(chunk);
        assert!(matches!(
            read_at_most(streamed(endless), 4999, &peer).await,
            Err(PeerError::Refused(_, _))
        ));
        let five = futures_util::stream::iter((0..5).map(move |_| chunk()));
        assert_eq!(
            read_at_most(streamed(five), 5000, &peer)
                .await
                .unwrap()
                .len(),
            5000
        );
    }

    #[test]
    fn directory_urls_take_path_safe_params_or_one_encoded_segment() {
        let d = Directory {
            endpoints: [(
                "keyMaterial".to_string(),
                "https://w.test/v1/keyMaterial/{targetUser}".to_string(),
            )]
            .into(),
        };
        let url = |endpoint, param| path_url(&d, endpoint, param);
        assert_eq!(
            url("keyMaterial", "bob").as_deref(),
            Some("https://w.test/v1/keyMaterial/bob")
        );
        assert_eq!(url("notify", "r"), None);
        assert_eq!(
            url("keyMaterial", "b.test/u/bob").as_deref(),
            Some("https://w.test/v1/keyMaterial/b.test/u/bob")
        );
        assert_eq!(url("keyMaterial", "b.test/u/bob?x"), None);
        assert_eq!(url("keyMaterial", ""), None);
        assert_eq!(
            segment_url(&d, "keyMaterial", "https://b.test/v1/assets/1").as_deref(),
            Some("https://w.test/v1/keyMaterial/https:%2F%2Fb.test%2Fv1%2Fassets%2F1")
        );
    }
}
