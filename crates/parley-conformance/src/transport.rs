//! Calls to the peer: mutual TLS with the kit's certificate, the peer's certificate checked
//! against the peer's *domain* whatever host or address the URL names (reqwest `.resolve`, as
//! parley-server's `peers`), `From: mimi@<kit domain>`, and the peer's endpoint directory.
//! Every call is bounded in time and in the size of the answer read; a failure to get an answer
//! is an `Err` with the transport's reason, never a panic or a hang.

use crate::config::KitConfig;
use crate::error::KitError;
use parley_proto::mimi::{https_url_parts, Directory};
use parley_proto::Domain;
use std::net::SocketAddr;

/// Most of an answer the kit reads (a bit over the protocol's largest body).
const MAX_ANSWER: usize = parley_proto::mimi::MAX_BODY + 64 * 1024;

/// The draft's ten directory keys (§5.1).
pub const ENDPOINTS: [&str; 10] = [
    "keyMaterial",
    "update",
    "notify",
    "submitMessage",
    "groupInfo",
    "requestConsent",
    "updateConsent",
    "identifierQuery",
    "reportAbuse",
    "proxyDownload",
];

/// A peer's HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn is_client_error(&self) -> bool {
        (400..500).contains(&self.status)
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// `HTTP 403 not_hub` (the JSON `error` code when there is one) for report details.
    pub fn describe(&self) -> String {
        let code = serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned));
        match code {
            Some(code) => format!("HTTP {} {code}", self.status),
            None if self.body.is_empty() => format!("HTTP {}", self.status),
            None => format!("HTTP {} ({} bytes)", self.status, self.body.len()),
        }
    }
}

/// Headers a forged request sets instead of the honest ones.
#[derive(Debug, Clone, Default)]
pub struct Forge {
    pub from: Option<String>,
    pub host: Option<String>,
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, KitError> {
    std::fs::read(path).map_err(|e| KitError::Read(path.display().to_string(), e))
}

/// The kit's client towards the peer.
pub struct PeerClient {
    client: reqwest::Client,
    /// `https://PEER:PORT/PATH`: the URL naming the peer's domain.
    base: String,
    as_domain: Domain,
    directory: Option<Directory>,
}

impl PeerClient {
    pub async fn new(config: &KitConfig) -> Result<Self, KitError> {
        let (host, port, path) = https_url_parts(&config.peer_url)
            .ok_or_else(|| KitError::PeerUrl(config.peer_url.clone()))?;
        let addr: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| KitError::Resolve(host.clone(), e.to_string()))?
            .next()
            .ok_or_else(|| KitError::Resolve(host.clone(), "no address".into()))?;
        let mut identity = read(&config.cert)?;
        identity.push(b'\n');
        identity.extend(read(&config.key)?);
        let tls = |e: reqwest::Error| KitError::Tls(e.to_string());
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&read(&config.ca)?).map_err(tls)?)
            .identity(reqwest::Identity::from_pem(&identity).map_err(tls)?)
            .resolve(config.peer.as_str(), addr)
            .timeout(config.request_timeout())
            .connect_timeout(config.request_timeout())
            .pool_max_idle_per_host(4)
            .build()
            .map_err(tls)?;
        Ok(Self {
            client,
            base: format!("https://{}:{port}{path}", config.peer),
            as_domain: config.as_domain.clone(),
            directory: None,
        })
    }

    /// `GET /.well-known/mimi-protocol-directory`.
    pub async fn fetch_directory(&self) -> Result<Answer, String> {
        let url = format!("{}/.well-known/mimi-protocol-directory", self.base);
        self.send(self.client.get(url), &Forge::default()).await
    }

    /// Keeps the directory the peer served for the endpoint URLs of later calls.
    pub fn set_directory(&mut self, directory: Directory) {
        self.directory = Some(directory);
    }

    /// The URL of `endpoint` for `param`: from the peer's directory, else the profile's
    /// `/v1/<endpoint>/<param>`.
    pub fn url(&self, endpoint: &str, param: &str) -> String {
        self.directory
            .as_ref()
            .and_then(|d| d.fill(endpoint, param))
            .unwrap_or_else(|| format!("{}/v1/{endpoint}/{param}", self.base))
    }

    /// POSTs a MIMI body to `endpoint`/`param`.
    pub async fn post(&self, endpoint: &str, param: &str, body: Vec<u8>) -> Result<Answer, String> {
        self.post_forged(endpoint, param, body, &Forge::default())
            .await
    }

    /// POSTs with forged headers.
    pub async fn post_forged(
        &self,
        endpoint: &str,
        param: &str,
        body: Vec<u8>,
        forge: &Forge,
    ) -> Result<Answer, String> {
        let request = self
            .client
            .post(self.url(endpoint, param))
            .header(
                reqwest::header::CONTENT_TYPE,
                parley_proto::mimi::CONTENT_TYPE,
            )
            .body(body);
        self.send(request, forge).await
    }

    /// A GET of `endpoint`/`param` (proxyDownload).
    pub async fn get(&self, endpoint: &str, param: &str) -> Result<Answer, String> {
        let request = self.client.get(self.url(endpoint, param));
        self.send(request, &Forge::default()).await
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        forge: &Forge,
    ) -> Result<Answer, String> {
        let from = forge
            .from
            .clone()
            .unwrap_or_else(|| format!("mimi@{}", self.as_domain));
        let mut request = request.header(reqwest::header::FROM, from);
        if let Some(host) = &forge.host {
            request = request.header(reqwest::header::HOST, host);
        }
        let mut response = request.send().await.map_err(|e| error_chain(&e))?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| error_chain(&e))? {
            if body.len() + chunk.len() > MAX_ANSWER {
                return Err(format!(
                    "HTTP {status} with an answer over {MAX_ANSWER} bytes"
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { status, body })
    }
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
