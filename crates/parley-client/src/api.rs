//! Typed client for Parley's client API (`docs/client-api.md`): one async method per endpoint, plus
//! the `GET /v1/ws` push connection. Users and rooms in a path are one percent-encoded segment
//! each (a room URI's `/` and all).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use parley_proto::api::{
    Accepted, AckRequest, ClaimRequest, ClaimResponse, CommitRequest, ContactInfo,
    CreateRoomRequest, DeviceInfo, EphemeralRequest, ErrorBody, KeyPackageCount, LoginRequest,
    ProposalRequest, ProviderInfo, QueueEntry, QueuePage, RegisterRequest, RoomInfo, SendRequest,
    SessionResponse, UploadKeyPackages, UploadedAsset, WsFrame,
};
use parley_proto::{DeviceId, RoomId, UserId};
use reqwest::{Method, StatusCode};
use rustls::pki_types::CertificateDer;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::header::{HeaderValue, AUTHORIZATION};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use url::Url;

use crate::error::{ClientError, Result};

/// How long to wait for a TCP/TLS connection.
/// Read buffer of the push WebSocket (it grows for larger frames).
const WS_READ_BUFFER: usize = 8 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for any single request, so a dead server cannot hang a command forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for one attachment upload or download: large files on slow links take long,
/// and [`REQUEST_TIMEOUT`] would cut them short.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(3600);
/// Pieces an upload is streamed in (slices of the one buffer, no copies).
const UPLOAD_CHUNK: usize = 64 * 1024;
/// Largest error text we quote from a non-JSON error answer.
const MAX_QUOTED_ERROR: usize = 200;

/// An HTTP client bound to one server and, once logged in, one device's bearer token.
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
    /// TLS settings for the WebSocket, which does not go through reqwest.
    ws_tls: Arc<rustls::ClientConfig>,
    has_extra_ca: bool,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a credential: never print it.
        f.debug_struct("ApiClient")
            .field("base", &self.base.as_str())
            .field("authenticated", &self.token.is_some())
            .finish()
    }
}

impl ApiClient {
    /// A client for the server at `base_url` (`https://host:port` or, on loopback only, `http://`).
    ///
    /// Built-in root certificates are disabled: an `https` server is trusted only through the
    /// optional PEM CA bundle given here.
    pub fn new(base_url: &str, extra_root_ca_pem: Option<&[u8]>) -> Result<Self> {
        let base = parse_base_url(base_url)?;
        let roots = match extra_root_ca_pem {
            Some(pem) => parse_pem_certs(pem)?,
            None => Vec::new(),
        };
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("parley-client/", env!("CARGO_PKG_VERSION")));
        for der in &roots {
            let cert = reqwest::Certificate::from_der(der)
                .map_err(|e| ClientError::InvalidInput(format!("invalid CA certificate: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::InvalidInput(format!("cannot set up HTTP client: {e}")))?;
        Ok(Self {
            http,
            base,
            token: None,
            ws_tls: Arc::new(ws_tls_config(roots)?),
            has_extra_ca: extra_root_ca_pem.is_some(),
        })
    }

    /// The same client, authenticating as the device owning `token`.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The server's base URL, normalised (always ends in `/`).
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// `GET /health`.
    pub async fn health(&self) -> Result<()> {
        self.call::<(), serde_json::Value>(Method::GET, &["health"], None)
            .await
            .map(drop)
    }

    /// `GET /metrics`: the server's counters in Prometheus text format.
    pub async fn metrics(&self) -> Result<String> {
        let url = self.endpoint(&["metrics"])?;
        let resp = self.send::<()>(Method::GET, url, None).await?;
        resp.text()
            .await
            .map_err(|e| ClientError::Protocol(format!("unreadable metrics: {e}")))
    }

    /// `POST /v1/accounts`: register a user and its first device.
    pub async fn register(&self, req: &RegisterRequest) -> Result<SessionResponse> {
        self.call(Method::POST, &["v1", "accounts"], Some(req))
            .await
    }

    /// `POST /v1/sessions`: log in a further device of an existing user.
    pub async fn login(&self, req: &LoginRequest) -> Result<SessionResponse> {
        self.call(Method::POST, &["v1", "sessions"], Some(req))
            .await
    }

    /// `GET /v1/devices`: the caller's user's devices.
    pub async fn devices(&self) -> Result<Vec<DeviceInfo>> {
        self.call::<(), _>(Method::GET, &["v1", "devices"], None)
            .await
    }

    /// `DELETE /v1/devices/{device_id}`.
    pub async fn delete_device(&self, device: &DeviceId) -> Result<()> {
        self.call_no_content::<()>(Method::DELETE, &["v1", "devices", device.as_str()], None)
            .await
    }

    /// `POST /v1/key-packages`: upload one-time KeyPackages and optionally a last-resort one.
    pub async fn upload_key_packages(&self, req: &UploadKeyPackages) -> Result<KeyPackageCount> {
        self.call(Method::POST, &["v1", "key-packages"], Some(req))
            .await
    }

    /// `GET /v1/key-packages`: how many one-time KeyPackages the server still holds for us.
    pub async fn key_package_count(&self) -> Result<KeyPackageCount> {
        self.call::<(), _>(Method::GET, &["v1", "key-packages"], None)
            .await
    }

    /// `GET /v1/users/{user}/devices`.
    pub async fn user_devices(&self, user: &UserId) -> Result<Vec<DeviceInfo>> {
        let user = user.to_string();
        self.call::<(), _>(Method::GET, &["v1", "users", &user, "devices"], None)
            .await
    }

    /// `GET /v1/provider`: this provider's domain and the hub's `ExternalSender`, which every
    /// room created here lists in its `external_senders`.
    pub async fn provider(&self) -> Result<ProviderInfo> {
        self.call::<(), _>(Method::GET, &["v1", "provider"], None)
            .await
    }

    /// `POST /v1/users/{user}/key-packages/claim`: one KeyPackage per device of `user` (or only
    /// `req.device`'s), to add them to `req.room`, with the signed MIMI `KeyMaterialRequest`. A
    /// user of another provider who has not consented (or who blocked us) is
    /// [`ClientError::NoConsent`].
    pub async fn claim_key_packages(
        &self,
        user: &UserId,
        req: &ClaimRequest,
    ) -> Result<ClaimResponse> {
        let user = user.to_string();
        let path = ["v1", "users", &user, "key-packages", "claim"];
        self.call(Method::POST, &path, Some(req)).await
    }

    /// `POST /v1/contacts/{user}/request`: asks `user` for consent to contact them. Idempotent;
    /// answers the outgoing relation (`granted` at once for a user of our own provider).
    pub async fn contact_request(&self, user: &UserId) -> Result<ContactInfo> {
        self.contact_call(user, "request").await
    }

    /// `GET /v1/contacts/requests`: the pending contact requests other users sent us.
    pub async fn contact_requests(&self) -> Result<Vec<ContactInfo>> {
        self.call::<(), _>(Method::GET, &["v1", "contacts", "requests"], None)
            .await
    }

    /// `POST /v1/contacts/{user}/accept`: consents to `user`'s contact request.
    pub async fn contact_accept(&self, user: &UserId) -> Result<ContactInfo> {
        self.contact_call(user, "accept").await
    }

    /// `POST /v1/contacts/{user}/block`: refuses (or revokes) consent for `user`.
    pub async fn contact_block(&self, user: &UserId) -> Result<ContactInfo> {
        self.contact_call(user, "block").await
    }

    /// `GET /v1/contacts/blocked`: the users our user blocked.
    pub async fn blocked_contacts(&self) -> Result<Vec<ContactInfo>> {
        self.call::<(), _>(Method::GET, &["v1", "contacts", "blocked"], None)
            .await
    }

    /// `POST /v1/rooms`: register a freshly created group with its hub.
    pub async fn create_room(&self, req: &CreateRoomRequest) -> Result<RoomInfo> {
        self.call(Method::POST, &["v1", "rooms"], Some(req)).await
    }

    /// `GET /v1/rooms`: the rooms the calling device is in.
    pub async fn rooms(&self) -> Result<Vec<RoomInfo>> {
        self.call::<(), _>(Method::GET, &["v1", "rooms"], None)
            .await
    }

    /// `GET /v1/rooms/{room_id}`.
    pub async fn room(&self, room: &RoomId) -> Result<RoomInfo> {
        self.call::<(), _>(Method::GET, &["v1", "rooms", room.as_str()], None)
            .await
    }

    /// `POST /v1/rooms/{room_id}/commits`.
    pub async fn post_commit(&self, room: &RoomId, req: &CommitRequest) -> Result<Accepted> {
        let path = ["v1", "rooms", room.as_str(), "commits"];
        self.call(Method::POST, &path, Some(req)).await
    }

    /// `POST /v1/rooms/{room_id}/proposals`: a proposal to remove our own leaf (leaving).
    pub async fn post_proposal(&self, room: &RoomId, req: &ProposalRequest) -> Result<Accepted> {
        let path = ["v1", "rooms", room.as_str(), "proposals"];
        self.call(Method::POST, &path, Some(req)).await
    }

    /// `POST /v1/rooms/{room_id}/left`: this device left the room, or processed the commit
    /// removing it; its provider stops delivering the room to it.
    pub async fn room_left(&self, room: &RoomId) -> Result<()> {
        let path = ["v1", "rooms", room.as_str(), "left"];
        self.call_no_content::<()>(Method::POST, &path, None).await
    }

    /// `POST /v1/rooms/{room_id}/messages`.
    pub async fn send_message(&self, room: &RoomId, req: &SendRequest) -> Result<Accepted> {
        let path = ["v1", "rooms", room.as_str(), "messages"];
        self.call(Method::POST, &path, Some(req)).await
    }

    /// `POST /v1/rooms/{room_id}/ephemeral`: a typing indicator for the members connected now.
    pub async fn post_ephemeral(&self, room: &RoomId, req: &EphemeralRequest) -> Result<()> {
        let path = ["v1", "rooms", room.as_str(), "ephemeral"];
        self.call_no_content(Method::POST, &path, Some(req)).await
    }

    /// `GET /v1/queue?limit=N`: the oldest unacknowledged queue entries.
    pub async fn queue(&self, limit: Option<u32>) -> Result<QueuePage> {
        let mut url = self.endpoint(&["v1", "queue"])?;
        if let Some(limit) = limit {
            url.query_pairs_mut()
                .append_pair("limit", &limit.to_string());
        }
        let resp = self.send::<()>(Method::GET, url, None).await?;
        decode_json(resp).await
    }

    /// `POST /v1/queue/ack`: delete queue entries up to and including `up_to`.
    pub async fn ack(&self, up_to: u64) -> Result<()> {
        let req = AckRequest { up_to };
        self.call_no_content(Method::POST, &["v1", "queue", "ack"], Some(&req))
            .await
    }

    /// `POST /v1/assets`: uploads an encrypted attachment, streamed from `data` without copying
    /// it. Sent without a length, so a provider refuses a file over its limit as soon as the
    /// limit is passed ([`ClientError::AttachmentTooLarge`]) rather than after the whole upload.
    pub async fn upload_asset(&self, data: Vec<u8>) -> Result<UploadedAsset> {
        let data = bytes::Bytes::from(data);
        let chunks = (0..data.len())
            .step_by(UPLOAD_CHUNK)
            .map(move |start| {
                let end = (start + UPLOAD_CHUNK).min(data.len());
                Ok(data.slice(start..end))
            })
            .collect::<Vec<_>>();
        self.upload_stream(futures_util::stream::iter(chunks)).await
    }

    /// `POST /v1/assets` with a body produced piece by piece (never whole in memory), as
    /// [`ApiClient::upload_asset`] sends it.
    pub async fn upload_stream<S, B>(&self, chunks: S) -> Result<UploadedAsset>
    where
        S: futures_util::Stream<Item = std::io::Result<B>> + Send + 'static,
        bytes::Bytes: From<B>,
        B: 'static,
    {
        let url = self.endpoint(&["v1", "assets"])?;
        let request = self
            .authed(Method::POST, url)
            .timeout(TRANSFER_TIMEOUT)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(chunks));
        decode_json(self.execute(request).await?).await
    }

    /// `DELETE /v1/assets/{id}` for an asset URL this user uploaded.
    pub async fn delete_asset(&self, asset_url: &str) -> Result<()> {
        let id = asset_url.rsplit('/').next().unwrap_or_default();
        self.call_no_content::<()>(Method::DELETE, &["v1", "assets", id], None)
            .await
    }

    /// `GET /v1/downloads?url=URL&room=ROOM`: an attachment sent in `room`, through this
    /// device's provider (which fetches it from another provider when needed). Refuses to
    /// read more than `max` bytes, the size the sender announced.
    pub async fn download(&self, asset_url: &str, room: &RoomId, max: u64) -> Result<Vec<u8>> {
        let mut data = Vec::new();
        self.download_with(asset_url, room, max, |total, chunk| {
            if data.capacity() == 0 {
                data.reserve_exact(usize::try_from(total).unwrap_or(0));
            }
            data.extend_from_slice(chunk);
        })
        .await?;
        Ok(data)
    }

    /// [`ApiClient::download`], handing each piece to `each` as it arrives (with the expected
    /// total, at most `max`) instead of collecting it.
    pub async fn download_with(
        &self,
        asset_url: &str,
        room: &RoomId,
        max: u64,
        mut each: impl FnMut(u64, &[u8]) + Send,
    ) -> Result<u64> {
        let mut url = self.endpoint(&["v1", "downloads"])?;
        url.query_pairs_mut()
            .append_pair("url", asset_url)
            .append_pair("room", room.as_str());
        let request = self.authed(Method::GET, url).timeout(TRANSFER_TIMEOUT);
        let resp = self.execute(request).await?;
        let too_long = || {
            ClientError::Protocol(format!(
                "the download is longer than the announced {max} bytes"
            ))
        };
        if resp.content_length().is_some_and(|n| n > max) {
            return Err(too_long());
        }
        let total = resp.content_length().unwrap_or(max).min(max);
        let mut received = 0u64;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.http_error(&e))?;
            received += chunk.len() as u64;
            if received > max {
                return Err(too_long());
            }
            each(total, &chunk);
        }
        Ok(received)
    }

    /// Opens the push WebSocket (`GET /v1/ws`).
    pub async fn connect_push(&self) -> Result<PushConnection> {
        self.connect_push_with(false).await
    }

    /// Opens the push WebSocket, with ephemeral messages (typing indicators) if asked:
    /// [`PushConnection::next_push`] yields them.
    pub async fn connect_push_with(&self, ephemeral: bool) -> Result<PushConnection> {
        self.connect_push_opts(PushOptions {
            ephemeral,
            binary: false,
        })
        .await
    }

    /// Opens the push WebSocket with `options`.
    pub async fn connect_push_opts(&self, options: PushOptions) -> Result<PushConnection> {
        self.open_push(options, None).await
    }

    /// Opens the push WebSocket over `tcp`, a connection to the server the caller made itself
    /// (say, from a chosen local address: the load tool spreads 100,000 connections over several
    /// loopback addresses to pass the per-address port limit).
    pub async fn connect_push_over(
        &self,
        tcp: TcpStream,
        options: PushOptions,
    ) -> Result<PushConnection> {
        self.open_push(options, Some(tcp)).await
    }

    async fn open_push(
        &self,
        options: PushOptions,
        tcp: Option<TcpStream>,
    ) -> Result<PushConnection> {
        let token = self.require_token()?;
        let mut url = self.endpoint(&["v1", "ws"])?;
        if options.ephemeral {
            url.query_pairs_mut().append_pair("ephemeral", "true");
        }
        if options.binary {
            url.query_pairs_mut().append_pair("binary", "true");
        }
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        url.set_scheme(scheme).map_err(|()| {
            ClientError::InvalidInput(format!("cannot make a WebSocket URL of {url}"))
        })?;
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| ClientError::InvalidInput(format!("bad WebSocket URL {url}: {e}")))?;
        let auth = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| ClientError::InvalidInput("the access token is not header-safe".into()))?;
        request.headers_mut().insert(AUTHORIZATION, auth);
        let connector = if scheme == "wss" {
            Connector::Rustls(self.ws_tls.clone())
        } else {
            Connector::Plain
        };
        // tungstenite zero-fills its whole read buffer on every read (128 KiB by default);
        // pushes are small, so a small buffer saves that work and memory per connection.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(WS_READ_BUFFER);
        let opened = match tcp {
            None => {
                let connect = tokio_tungstenite::connect_async_tls_with_config(
                    request,
                    Some(config),
                    true,
                    Some(connector),
                );
                tokio::time::timeout(CONNECT_TIMEOUT, connect).await
            }
            Some(tcp) => {
                let connect = tokio_tungstenite::client_async_tls_with_config(
                    request,
                    tcp,
                    Some(config),
                    Some(connector),
                );
                tokio::time::timeout(CONNECT_TIMEOUT, connect).await
            }
        };
        let (ws, _response) = opened
            .map_err(|_| self.unreachable("WebSocket connection timed out"))?
            .map_err(|e| self.ws_error(e))?;
        tracing::debug!(url = %url, "push connection open");
        Ok(PushConnection {
            ws,
            binary: options.binary,
        })
    }

    // --- plumbing -------------------------------------------------------------------------------

    fn endpoint(&self, segments: &[&str]) -> Result<Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| ClientError::InvalidInput(format!("{} cannot be a base URL", self.base)))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    async fn contact_call(&self, user: &UserId, action: &str) -> Result<ContactInfo> {
        let user = user.to_string();
        self.call::<(), _>(Method::POST, &["v1", "contacts", &user, action], None)
            .await
    }

    /// The device's bearer token, once logged in (for a connection this client does not make).
    pub fn access_token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn require_token(&self) -> Result<&str> {
        self.token.as_deref().ok_or(ClientError::NotRegistered)
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &[&str],
        body: Option<&B>,
    ) -> Result<T> {
        let url = self.endpoint(path)?;
        let resp = self.send(method, url, body).await?;
        decode_json(resp).await
    }

    async fn call_no_content<B: Serialize>(
        &self,
        method: Method,
        path: &[&str],
        body: Option<&B>,
    ) -> Result<()> {
        let url = self.endpoint(path)?;
        self.send(method, url, body).await.map(drop)
    }

    /// A request carrying our bearer token, if we have one.
    fn authed(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        tracing::trace!(%method, %url, "request");
        let req = self.http.request(method, url);
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    /// Sends one request; a non-2xx answer becomes [`ClientError::Api`].
    async fn send<B: Serialize>(
        &self,
        method: Method,
        url: Url,
        body: Option<&B>,
    ) -> Result<reqwest::Response> {
        let mut req = self.authed(method, url);
        if let Some(body) = body {
            req = req.json(body);
        }
        self.execute(req).await
    }

    /// Sends a built request; a non-2xx answer becomes [`ClientError::Api`].
    async fn execute(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = req.send().await.map_err(|e| self.http_error(&e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let bytes = resp.bytes().await.map_err(|e| self.http_error(&e))?;
        Err(self.refusal(status, &bytes))
    }

    /// The error for a refused request. A device's token is refused only once the device was
    /// removed from its account (tokens do not expire), which deserves its own clear error.
    fn refusal(&self, status: StatusCode, body: &[u8]) -> ClientError {
        if status == StatusCode::UNAUTHORIZED && self.token.is_some() {
            return ClientError::DeviceRemoved;
        }
        api_error(status, body)
    }

    fn http_error(&self, e: &reqwest::Error) -> ClientError {
        self.unreachable(&error_chain(e))
    }

    fn ws_error(&self, e: tokio_tungstenite::tungstenite::Error) -> ClientError {
        use tokio_tungstenite::tungstenite::Error as WsError;
        match e {
            WsError::Http(resp) => {
                let status = resp.status();
                let body = resp.body().as_deref().unwrap_or_default();
                self.refusal(status, body)
            }
            other => self.unreachable(&error_chain(&other)),
        }
    }

    fn unreachable(&self, detail: &str) -> ClientError {
        let hint = if self.base.scheme() == "https" && !self.has_extra_ca {
            " (no CA certificate was given, and built-in roots are not trusted)"
        } else {
            ""
        };
        ClientError::Unreachable(format!(
            "cannot reach server {}: {detail}{hint}",
            self.base.as_str().trim_end_matches('/')
        ))
    }
}

/// How to open a push connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct PushOptions {
    /// Also receive ephemeral messages (typing indicators).
    pub ephemeral: bool,
    /// Frames as CBOR in binary messages (no JSON, no base64): less work on both ends.
    pub binary: bool,
}

/// One open push WebSocket. Reading is cancellation-safe, so it can sit in a `tokio::select!`.
pub struct PushConnection {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    binary: bool,
}

impl std::fmt::Debug for PushConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushConnection").finish_non_exhaustive()
    }
}

/// What a push connection delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// New queue entries, in order.
    Entries(Vec<QueueEntry>),
    /// An ephemeral message of a room (only on connections that asked for them).
    Ephemeral { room: String, data: Vec<u8> },
    /// The message sent as `id` ([`PushConnection::send_messages`]) is durable.
    Sent { id: u64, accepted: Accepted },
    /// The message sent as `id` was refused with this HTTP status and error; nothing was stored.
    Refused {
        id: u64,
        status: u16,
        error: ErrorBody,
    },
}

impl PushConnection {
    /// Waits for the next `entries` frame, skipping ephemeral messages and answers to sends.
    /// `Ok(None)` means the server closed the connection.
    pub async fn next_entries(&mut self) -> Result<Option<Vec<QueueEntry>>> {
        loop {
            match self.next_push().await? {
                Some(Push::Entries(entries)) => return Ok(Some(entries)),
                Some(Push::Ephemeral { .. } | Push::Sent { .. } | Push::Refused { .. }) => {}
                None => return Ok(None),
            }
        }
    }

    /// Waits for the next entries or ephemeral message. `Ok(None)` means the server closed the
    /// connection.
    pub async fn next_push(&mut self) -> Result<Option<Push>> {
        while let Some(msg) = self.ws.next().await {
            let msg =
                msg.map_err(|e| ClientError::Unreachable(format!("push connection failed: {e}")))?;
            let frame = match msg {
                Message::Text(text) => {
                    serde_json::from_str::<WsFrame>(text.as_str()).map_err(|e| e.to_string())
                }
                Message::Binary(bytes) => WsFrame::from_cbor(&bytes),
                Message::Close(_) => return Ok(None),
                // Pings are answered by tungstenite itself; nothing else is part of the protocol.
                _ => continue,
            };
            match frame {
                Ok(WsFrame::Entries { entries }) => return Ok(Some(Push::Entries(entries))),
                Ok(WsFrame::Ephemeral { room, data }) => {
                    return Ok(Some(Push::Ephemeral { room, data }))
                }
                Ok(WsFrame::Sent {
                    id,
                    event,
                    ts,
                    epoch,
                }) => {
                    let accepted = Accepted { event, ts, epoch };
                    return Ok(Some(Push::Sent { id, accepted }));
                }
                Ok(WsFrame::Refused { id, status, error }) => {
                    return Ok(Some(Push::Refused { id, status, error }))
                }
                Ok(WsFrame::Ack { .. } | WsFrame::Send { .. }) => {
                    tracing::debug!("ignoring a client frame sent by the server");
                }
                Err(e) => {
                    return Err(ClientError::Protocol(format!("bad push frame: {e}")));
                }
            }
        }
        Ok(None)
    }

    fn frame(&self, frame: &WsFrame) -> Result<Message> {
        if self.binary {
            return Ok(Message::binary(frame.to_cbor()));
        }
        let text = serde_json::to_string(frame)
            .map_err(|e| ClientError::Protocol(format!("cannot encode a frame: {e}")))?;
        Ok(Message::text(text))
    }

    /// Acknowledges every entry up to and including `up_to`.
    pub async fn ack(&mut self, up_to: u64) -> Result<()> {
        let frame = self.frame(&WsFrame::Ack { up_to })?;
        self.ws
            .send(frame)
            .await
            .map_err(|e| ClientError::Unreachable(format!("push connection failed: {e}")))
    }

    /// Sends application messages over this connection, each as `(id, room, message)`, in one
    /// flush: the same as `POST /v1/rooms/{room}/messages` each, without an HTTP request each.
    /// Answers come back from [`PushConnection::next_push`] as [`Push::Sent`] or
    /// [`Push::Refused`] with the same `id`, in any order.
    pub async fn send_messages<'a>(
        &mut self,
        messages: impl IntoIterator<Item = (u64, &'a RoomId, &'a [u8])>,
    ) -> Result<()> {
        let failed = |e| ClientError::Unreachable(format!("push connection failed: {e}"));
        for (id, room, message) in messages {
            let frame = self.frame(&WsFrame::Send {
                id,
                room: room.to_string(),
                message: message.to_vec(),
            })?;
            self.ws.feed(frame).await.map_err(failed)?;
        }
        self.ws.flush().await.map_err(failed)
    }

    /// Closes the connection politely; errors are irrelevant at this point.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

fn parse_base_url(base_url: &str) -> Result<Url> {
    let bad =
        |why: &str| ClientError::InvalidInput(format!("invalid server URL {base_url:?}: {why}"));
    let mut url = Url::parse(base_url.trim()).map_err(|e| bad(&e.to_string()))?;
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&url) => {}
        "http" => {
            return Err(bad(
                "plain http is only allowed to a loopback address; use https",
            ))
        }
        _ => return Err(bad("expected http:// or https://")),
    }
    if url.host().is_none() || url.query().is_some() || url.fragment().is_some() {
        return Err(bad("expected scheme://host[:port][/path]"));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost" || d.ends_with(".localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

fn parse_pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| ClientError::InvalidInput(format!("invalid CA certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(ClientError::InvalidInput(
            "the CA certificate file holds no PEM certificate".into(),
        ));
    }
    Ok(certs)
}

fn ws_tls_config(roots: Vec<CertificateDer<'static>>) -> Result<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for cert in roots {
        store
            .add(cert)
            .map_err(|e| ClientError::InvalidInput(format!("invalid CA certificate: {e}")))?;
    }
    // An explicit provider, so nothing depends on a process-wide default being installed.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::InvalidInput(format!("cannot set up TLS: {e}")))?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(config)
}

async fn decode_json<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T> {
    let url = resp.url().clone();
    let bytes = resp.bytes().await.map_err(|e| {
        ClientError::Unreachable(format!(
            "cannot read answer from {url}: {}",
            error_chain(&e)
        ))
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ClientError::Protocol(format!("unexpected answer from {url}: {e}")))
}

/// Turns a non-2xx answer into [`ClientError::Api`], tolerating bodies that are not an ErrorBody.
fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    if let Ok(body) = serde_json::from_slice::<ErrorBody>(body) {
        return ClientError::from_body(status.as_u16(), body);
    }
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .take(MAX_QUOTED_ERROR)
        .collect();
    let text = text.trim();
    ClientError::Api {
        status: status.as_u16(),
        code: format!("http_{}", status.as_u16()),
        message: if text.is_empty() {
            status.canonical_reason().unwrap_or("error").to_owned()
        } else {
            text.to_owned()
        },
        retryable: status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS,
    }
}

/// `e: cause: cause ...`, since reqwest's own message omits the interesting part.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_normalised_and_checked() {
        let url = parse_base_url("http://127.0.0.1:8080").unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:8080/");
        assert!(parse_base_url("https://chirp.test/api").is_ok());
        assert!(parse_base_url("http://localhost:1").is_ok());
        assert!(parse_base_url("http://[::1]:1").is_ok());
        for bad in [
            "http://chirp.test",
            "ftp://x",
            "not a url",
            "https://x/?q=1",
        ] {
            assert!(parse_base_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn endpoints_escape_path_segments() {
        let api = ApiClient::new("https://chirp.test/base", None).unwrap();
        let user = UserId::parse("alice@chirp.test").unwrap().to_string();
        let url = api.endpoint(&["v1", "users", &user, "devices"]).unwrap();
        assert_eq!(
            url.as_str(),
            "https://chirp.test/base/v1/users/alice@chirp.test/devices"
        );
        let weird = api.endpoint(&["v1", "a/b?c"]).unwrap();
        assert_eq!(weird.as_str(), "https://chirp.test/base/v1/a%2Fb%3Fc");
        // A room URI is one segment; the server decodes it back to the URI.
        let room = RoomId::parse("mimi://chirp.test/r/00ff").unwrap();
        let url = api
            .endpoint(&["v1", "rooms", room.as_str(), "commits"])
            .unwrap();
        assert_eq!(
            url.as_str(),
            "https://chirp.test/base/v1/rooms/mimi:%2F%2Fchirp.test%2Fr%2F00ff/commits"
        );
    }

    #[test]
    fn error_bodies_become_api_errors() {
        let body = br#"{"error":"wrong_epoch","message":"stale","retryable":true}"#;
        let e = api_error(StatusCode::CONFLICT, body);
        assert!(e.is_wrong_epoch() && e.is_retryable());
        let e = api_error(StatusCode::BAD_GATEWAY, b"<html>oops</html>");
        assert_eq!(e.code(), Some("http_502"));
        assert!(e.is_retryable());
    }

    #[test]
    fn no_consent_answers_become_typed_errors() {
        let body = br#"{"error":"no_consent","message":"bob@wave.test has not consented","retryable":false}"#;
        let e = api_error(StatusCode::FORBIDDEN, body);
        assert!(
            matches!(&e, ClientError::NoConsent(m) if m == "bob@wave.test has not consented"),
            "{e:?}"
        );
        let e = api_error(StatusCode::FORBIDDEN, b"forbidden");
        assert_eq!(e.code(), Some("http_403"));
    }

    #[test]
    fn bad_ca_files_are_refused() {
        assert!(ApiClient::new("https://x.test", Some(b"not pem")).is_err());
    }

    #[tokio::test]
    async fn unreachable_servers_are_reported_as_such() {
        // Port 9 on loopback: nothing listens there in a test environment.
        let api = ApiClient::new("http://127.0.0.1:9", None).unwrap();
        let err = api.health().await.unwrap_err();
        assert!(matches!(err, ClientError::Unreachable(_)), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("cannot reach server http://127.0.0.1:9: "),
            "{err}"
        );
    }
}
