//! Requests to other providers: reqwest over our mutual-TLS client config, `From: mimi@OURS`,
//! endpoints found through each peer's `/.well-known/mimi-protocol-directory` (only the path of
//! each template is used, joined to the peer's configured base URL), a few retries.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use reqwest::Url;
use thiserror::Error;
use tracing::{debug, warn};

use crate::tls::TlsSetupError;

/// The media type of MIMI bodies (profile §2).
pub const MEDIA_TYPE: &str = "application/mimi-protocol";
const ATTEMPTS: u32 = 4;
const MAX_ANSWER: usize = 4 << 20;

/// A request to a peer that did not get an answer.
#[derive(Debug, Error)]
pub enum PeerError {
    #[error("no base URL configured for peer {0}")]
    UnknownPeer(String),
    #[error("bad base URL for {0}: {1}")]
    BadUrl(String, String),
    #[error("request to {0} failed: {1}")]
    Http(String, reqwest::Error),
    #[error("{0}'s directory has no usable {1} endpoint")]
    Directory(String, &'static str),
    #[error("answer from {0} is over {MAX_ANSWER} bytes")]
    TooLarge(String),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

/// A peer's answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Peer domains whose base URL names an IP address resolve to it (others through the system).
#[derive(Default)]
struct PeerResolver {
    addresses: RwLock<HashMap<String, SocketAddr>>,
}

impl Resolve for PeerResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let known = self
            .addresses
            .read()
            .ok()
            .and_then(|a| a.get(name.as_str()).copied());
        let host = name.as_str().to_owned();
        Box::pin(async move {
            if let Some(addr) = known {
                return Ok(Box::new(std::iter::once(addr)) as Addrs);
            }
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 443))
                .await?
                .collect();
            Ok(Box::new(found.into_iter()) as Addrs)
        })
    }
}

/// Outbound connections to peers.
pub struct Peers {
    own_domain: String,
    http: reqwest::Client,
    resolver: Arc<PeerResolver>,
    bases: RwLock<HashMap<String, Url>>,
    directories: Mutex<HashMap<String, serde_json::Value>>,
}

/// `https://127.0.0.1:PORT` becomes `https://DOMAIN:PORT`, resolved to the IP, so that TLS
/// verifies the peer's certificate against its domain.
fn base_for(domain: &str, configured: &str) -> Result<(Url, Option<SocketAddr>), PeerError> {
    let bad = |e: String| PeerError::BadUrl(domain.to_owned(), e);
    let mut url = Url::parse(configured).map_err(|e| bad(e.to_string()))?;
    let port = url.port_or_known_default().unwrap_or(443);
    let resolve = match url
        .host_str()
        .map(|h| h.trim_matches(['[', ']']).parse::<IpAddr>())
    {
        Some(Ok(ip)) => Some(SocketAddr::new(ip, port)),
        _ => None,
    };
    if resolve.is_some() {
        url.set_host(Some(domain)).map_err(|e| bad(e.to_string()))?;
    }
    Ok((url, resolve))
}

impl Peers {
    /// Outbound connections from `own_domain` with the given client TLS config.
    pub fn new(
        own_domain: &str,
        tls: rustls::ClientConfig,
        peers: &BTreeMap<String, String>,
    ) -> Result<Self, PeerError> {
        let resolver = Arc::new(PeerResolver::default());
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .dns_resolver(resolver.clone())
            .timeout(Duration::from_secs(20))
            .pool_max_idle_per_host(2)
            .build()
            .map_err(|e| PeerError::Http(own_domain.to_owned(), e))?;
        let this = Self {
            own_domain: own_domain.to_owned(),
            http,
            resolver,
            bases: RwLock::new(HashMap::new()),
            directories: Mutex::new(HashMap::new()),
        };
        for (domain, configured) in peers {
            this.add(domain, configured)?;
        }
        Ok(this)
    }

    /// Adds or replaces a peer's base URL (its cached directory is dropped).
    pub fn add(&self, domain: &str, base_url: &str) -> Result<(), PeerError> {
        let (url, resolve) = base_for(domain, base_url)?;
        if let (Some(addr), Ok(mut addresses)) = (resolve, self.resolver.addresses.write()) {
            addresses.insert(domain.to_owned(), addr);
        }
        if let Ok(mut bases) = self.bases.write() {
            bases.insert(domain.to_owned(), url);
        }
        if let Ok(mut directories) = self.directories.lock() {
            directories.remove(domain);
        }
        Ok(())
    }

    fn url(&self, domain: &str, path: &str) -> Result<Url, PeerError> {
        let bases = self
            .bases
            .read()
            .map_err(|_| PeerError::UnknownPeer(domain.to_owned()))?;
        bases
            .get(domain)
            .ok_or_else(|| PeerError::UnknownPeer(domain.to_owned()))?
            .join(path)
            .map_err(|e| PeerError::BadUrl(domain.to_owned(), e.to_string()))
    }

    async fn directory(&self, domain: &str) -> Result<serde_json::Value, PeerError> {
        if let Some(found) = self.cached_directory(domain) {
            return Ok(found);
        }
        let url = self.url(domain, "/.well-known/mimi-protocol-directory")?;
        let answer = self
            .http
            .get(url)
            .header("From", format!("mimi@{}", self.own_domain))
            .send()
            .await
            .map_err(|e| PeerError::Http(domain.to_owned(), e))?;
        let directory: serde_json::Value = answer
            .json()
            .await
            .map_err(|e| PeerError::Http(domain.to_owned(), e))?;
        if let Ok(mut cache) = self.directories.lock() {
            cache.insert(domain.to_owned(), directory.clone());
        }
        Ok(directory)
    }

    fn cached_directory(&self, domain: &str) -> Option<serde_json::Value> {
        self.directories.lock().ok()?.get(domain).cloned()
    }

    /// The path of `endpoint` at `domain`, with its one `{param}` replaced by `param`.
    pub async fn endpoint_path(
        &self,
        domain: &str,
        endpoint: &'static str,
        param: &str,
    ) -> Result<String, PeerError> {
        let directory = self.directory(domain).await?;
        let template = directory
            .get(endpoint)
            .and_then(|t| t.as_str())
            .ok_or(PeerError::Directory(domain.to_owned(), endpoint))?;
        let after_scheme = template.split_once("://").map_or(template, |(_, r)| r);
        let path = after_scheme
            .find('/')
            .map(|i| &after_scheme[i..])
            .ok_or(PeerError::Directory(domain.to_owned(), endpoint))?;
        let (head, rest) = path
            .split_once('{')
            .ok_or(PeerError::Directory(domain.to_owned(), endpoint))?;
        let tail = rest.split_once('}').map_or("", |(_, t)| t);
        Ok(format!("{head}{param}{tail}"))
    }

    /// POSTs a MIMI body to `endpoint/{param}` at `domain`, retrying connection failures and 5xx.
    pub async fn post(
        &self,
        domain: &str,
        endpoint: &'static str,
        param: &str,
        body: Vec<u8>,
    ) -> Result<Answer, PeerError> {
        let path = self.endpoint_path(domain, endpoint, param).await?;
        self.post_path(domain, &path, &self.own_domain, body).await
    }

    /// POSTs to a literal path, with any `From` domain (tests use it to impersonate).
    pub async fn post_path(
        &self,
        domain: &str,
        path: &str,
        from_domain: &str,
        body: Vec<u8>,
    ) -> Result<Answer, PeerError> {
        let url = self.url(domain, path)?;
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            let result = self
                .http
                .post(url.clone())
                .header("From", format!("mimi@{from_domain}"))
                .header("Content-Type", MEDIA_TYPE)
                .body(body.clone())
                .send()
                .await;
            let retry = match result {
                Ok(answer) if !answer.status().is_server_error() || attempt == ATTEMPTS => {
                    return read_answer(domain, answer).await;
                }
                Ok(answer) => format!("status {}", answer.status()),
                Err(e) if attempt == ATTEMPTS => {
                    return Err(PeerError::Http(domain.to_owned(), e));
                }
                Err(e) => e.to_string(),
            };
            warn!(%domain, %path, attempt, %retry, "retrying request to peer");
            tokio::time::sleep(delay).await;
            delay *= 2;
            attempt += 1;
        }
    }
}

async fn read_answer(domain: &str, answer: reqwest::Response) -> Result<Answer, PeerError> {
    let status = answer.status().as_u16();
    let body = answer
        .bytes()
        .await
        .map_err(|e| PeerError::Http(domain.to_owned(), e))?;
    if body.len() > MAX_ANSWER {
        return Err(PeerError::TooLarge(domain.to_owned()));
    }
    debug!(%domain, status, len = body.len(), "peer answered");
    Ok(Answer {
        status,
        body: body.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_base_urls_are_named_by_domain() {
        let (url, resolve) = base_for("wave.test", "https://127.0.0.1:8443").unwrap();
        assert_eq!(url.as_str(), "https://wave.test:8443/");
        assert_eq!(resolve, Some("127.0.0.1:8443".parse().unwrap()));
        let (url, resolve) = base_for("wave.test", "https://mimi.wave.test").unwrap();
        assert_eq!(url.as_str(), "https://mimi.wave.test/");
        assert_eq!(resolve, None);
    }
}
