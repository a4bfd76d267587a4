//! The client API's HTTP surface (docs/client-api.md): routing, authentication and JSON bodies;
//! service errors become responses through `error::ApiError`. Handlers only translate; the
//! services do the work. Never the MIMI listener (`federation`): what both need lives below them.

use crate::accounts::AuthDevice;
use crate::app::App;
use crate::assets::{asset_response, parse_asset_url, relay_download, AssetId};
use crate::ephemeral::EphemeralFrame;
use crate::error::{error_response, ApiError, ServiceError};
use crate::hub::{CommitBundle, MessageSender, Origin};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use parley_proto::api::{
    AckRequest, ClaimRequest, CommitRequest, CreateRoomRequest, EphemeralRequest, LoginRequest,
    ProposalRequest, ProviderInfo, QueuePage, RegisterRequest, SendRequest, SessionResponse,
    UploadKeyPackages, WsFrame,
};
use parley_proto::api::{ContactInfo, ContactState};
use parley_proto::{RoomId, UserId};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Sends a push connection may have in flight (its further frames wait unread until one is
/// answered).
const WS_SEND_WINDOW: usize = 256;
/// Read buffer per WebSocket connection.
const WS_READ_BUFFER: usize = 4 * 1024;
/// Entries per backlog frame.
const WS_PAGE: usize = 256;

type AppState = State<Arc<App>>;

type ApiResult<T> = Result<T, ApiError>;

/// A JSON body whose every rejection (syntax, schema, size, content type) is a JSON error.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> Response {
    let status = r.status();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        _ => "invalid_json",
    };
    let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
        StatusCode::BAD_REQUEST
    } else {
        status
    };
    error_response(status, code, r.body_text(), false)
}

/// The authenticated device of a request: `Authorization: Bearer <token>`, or `?access_token=`
/// (for WebSocket clients that cannot set headers).
pub struct Authed(pub AuthDevice);

impl FromRequestParts<Arc<App>> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let from_header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let from_query = || {
            parts.uri.query().and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("access_token="))
                    .map(str::to_owned)
            })
        };
        let token = from_header
            .or_else(from_query)
            .ok_or_else(|| ServiceError::Unauthorized("missing bearer token".into()))?;
        Ok(Self(app.accounts.authenticate(&token).await?))
    }
}

pub fn router(app: Arc<App>) -> Router {
    let body_limit = app.config.limits.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/accounts", post(register))
        .route("/v1/sessions", post(login))
        .route("/v1/devices", get(own_devices))
        .route("/v1/devices/{device}", delete(remove_device))
        .route(
            "/v1/key-packages",
            post(upload_key_packages).get(count_key_packages),
        )
        .route("/v1/users/{user}/devices", get(user_devices))
        .route(
            "/v1/users/{user}/key-packages/claim",
            post(claim_key_packages),
        )
        .route("/v1/provider", get(provider))
        .route("/v1/contacts/requests", get(contact_requests))
        .route("/v1/contacts/blocked", get(contacts_blocked))
        .route("/v1/contacts/{user}/request", post(contact_request))
        .route("/v1/contacts/{user}/accept", post(contact_accept))
        .route("/v1/contacts/{user}/block", post(contact_block))
        .route("/v1/rooms", post(create_room).get(list_rooms))
        .route("/v1/rooms/{room}", get(room_info))
        .route("/v1/rooms/{room}/commits", post(commit))
        .route("/v1/rooms/{room}/messages", post(send))
        .route("/v1/rooms/{room}/proposals", post(propose))
        .route("/v1/rooms/{room}/ephemeral", post(send_ephemeral))
        .route("/v1/rooms/{room}/left", post(left))
        .route("/v1/queue", get(queue))
        .route("/v1/queue/ack", post(ack))
        .route("/v1/ws", get(ws))
        .route(
            "/v1/assets",
            post(upload_asset).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/v1/assets/{id}", get(get_asset).delete(delete_asset))
        .route("/v1/downloads", get(download))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .with_state(app)
}

async fn not_found() -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint".into(),
        false,
    )
}

async fn method_not_allowed() -> Response {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint".into(),
        false,
    )
}

/// `GET /health`
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(app): AppState) -> impl IntoResponse {
    let c = &app.hub.counters;
    let mut body = format!(
        "# TYPE parley_messages_accepted_total counter\nparley_messages_accepted_total {}\n\
         # TYPE parley_commits_accepted_total counter\nparley_commits_accepted_total {}\n\
         # TYPE parley_message_seconds_total counter\nparley_message_seconds_total {}\n\
         # TYPE parley_commit_seconds_total counter\nparley_commit_seconds_total {}\n\
         # TYPE parley_queue_entries_total counter\nparley_queue_entries_total {}\n\
         # TYPE parley_push_connections gauge\nparley_push_connections {}\n",
        c.messages.load(Ordering::Relaxed),
        c.commits.load(Ordering::Relaxed),
        c.message_micros.load(Ordering::Relaxed) as f64 / 1e6,
        c.commit_micros.load(Ordering::Relaxed) as f64 / 1e6,
        c.queued.load(Ordering::Relaxed),
        app.delivery.push.connected(),
    );
    body.push_str(&format!(
        "# TYPE parley_abuse_reports_total counter\nparley_abuse_reports_total {}\n\
         # TYPE parley_peer_queue_depth gauge\n# TYPE parley_peer_delivered_total counter\n\
         # TYPE parley_peer_rejected_total counter\n# TYPE parley_peer_delivery_failures_total counter\n",
        c.abuse_reports.load(Ordering::Relaxed)
    ));
    body.push_str(&app.outbox.metrics().await);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// `POST /v1/accounts`
async fn register(
    State(app): AppState,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> ApiResult<impl IntoResponse> {
    let user = req.user.clone();
    let s = app
        .accounts
        .register(
            &req.user,
            req.password,
            req.invite,
            req.device_name.as_deref(),
            req.signature_key,
        )
        .await?;
    let user = UserId::parse(&user).map(|u| u.to_string()).unwrap_or(user);
    Ok((
        StatusCode::CREATED,
        Json(SessionResponse {
            user,
            device_id: s.device.to_string(),
            token: s.token,
        }),
    ))
}

/// `POST /v1/sessions`
async fn login(
    State(app): AppState,
    ApiJson(req): ApiJson<LoginRequest>,
) -> ApiResult<impl IntoResponse> {
    let s = app
        .accounts
        .login(
            &req.user,
            req.password,
            req.device_name.as_deref(),
            req.signature_key,
            &app.delivery.push,
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(SessionResponse {
            user: req.user,
            device_id: s.device.to_string(),
            token: s.token,
        }),
    ))
}

/// `GET /v1/devices`
async fn own_devices(State(app): AppState, Authed(me): Authed) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.accounts.devices(&me.user).await?))
}

/// `DELETE /v1/devices/{device}`
async fn remove_device(
    State(app): AppState,
    Authed(me): Authed,
    Path(device): Path<String>,
) -> ApiResult<StatusCode> {
    app.accounts
        .remove_device(&me, &device, &app.delivery.push)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/key-packages`
async fn upload_key_packages(
    State(app): AppState,
    Authed(me): Authed,
    ApiJson(req): ApiJson<UploadKeyPackages>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        app.accounts
            .upload_key_packages(&me, req.key_packages, req.last_resort)
            .await?,
    ))
}

/// `GET /v1/key-packages`
async fn count_key_packages(
    State(app): AppState,
    Authed(me): Authed,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.accounts.key_package_count(&me).await?))
}

/// `GET /v1/users/{user}/devices`
async fn user_devices(
    State(app): AppState,
    Authed(_): Authed,
    Path(user): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let user = app.accounts.local_user(&user)?;
    Ok(Json(app.accounts.devices(&user).await?))
}

/// `POST /v1/users/{user}/key-packages/claim`
async fn claim_key_packages(
    State(app): AppState,
    Authed(me): Authed,
    Path(user): Path<String>,
    ApiJson(req): ApiJson<ClaimRequest>,
) -> ApiResult<impl IntoResponse> {
    let user =
        UserId::parse(&user).map_err(|e| ServiceError::bad("invalid_user", e.to_string()))?;
    Ok(Json(app.key_material.claim(&me, &user, req).await?))
}

/// `GET /v1/provider`: the caller's domain and its hub's MLS external sender.
async fn provider(State(app): AppState, Authed(me): Authed) -> ApiResult<impl IntoResponse> {
    let domain = me.user.domain().to_string();
    let external_sender = app
        .keys
        .external_sender(&domain)
        .map_err(|e| ServiceError::Internal(e.to_string()))?
        .to_vec();
    Ok(Json(ProviderInfo {
        domain,
        external_sender,
    }))
}

fn parse_room(room: &str) -> Result<RoomId, ServiceError> {
    RoomId::parse(room).map_err(|e| ServiceError::bad("invalid_room", e.to_string()))
}

/// Where a room's handshake messages and messages go: this provider's hub, or a remote hub.
enum RoomHome {
    Here(RoomId),
    Remote(RoomId),
}

async fn room_home(app: &App, room: &str) -> Result<RoomHome, ApiError> {
    let id = parse_room(room)?;
    Ok(match app.follower.hub_of(&id) {
        Some(_) => RoomHome::Remote(id),
        None => RoomHome::Here(id), // the hub answers unknown_room if it has no such room
    })
}

/// `GET /v1/contacts/blocked`
async fn contacts_blocked(
    State(app): AppState,
    Authed(me): Authed,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.consent.blocked_by(&me).await?))
}

/// `GET /v1/contacts/requests`
async fn contact_requests(
    State(app): AppState,
    Authed(me): Authed,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.consent.pending_for(&me).await?))
}

/// `POST /v1/contacts/{user}/request`
async fn contact_request(
    State(app): AppState,
    Authed(me): Authed,
    Path(user): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.consent.request(&me, &user).await?))
}

/// `POST /v1/contacts/{user}/accept`
async fn contact_accept(
    State(app): AppState,
    Authed(me): Authed,
    Path(user): Path<String>,
) -> ApiResult<impl IntoResponse> {
    contact_answer(&app, &me, &user, ContactState::Granted).await
}

/// `POST /v1/contacts/{user}/block`
async fn contact_block(
    State(app): AppState,
    Authed(me): Authed,
    Path(user): Path<String>,
) -> ApiResult<impl IntoResponse> {
    contact_answer(&app, &me, &user, ContactState::Blocked).await
}

async fn contact_answer(
    app: &App,
    me: &AuthDevice,
    user: &str,
    state: ContactState,
) -> ApiResult<Json<ContactInfo>> {
    Ok(Json(app.consent.answer(me, user, state).await?))
}

/// `POST /v1/rooms`
async fn create_room(
    State(app): AppState,
    Authed(me): Authed,
    ApiJson(req): ApiJson<CreateRoomRequest>,
) -> ApiResult<impl IntoResponse> {
    Ok((
        StatusCode::CREATED,
        Json(app.hub.create_room(&me, req).await?),
    ))
}

/// `GET /v1/rooms`
async fn list_rooms(State(app): AppState, Authed(me): Authed) -> ApiResult<impl IntoResponse> {
    let mut rooms = app.hub.rooms_of(&me).await?;
    rooms.extend(app.follower.rooms_of(&me).await?);
    rooms.sort_by(|a, b| a.room_id.cmp(&b.room_id));
    Ok(Json(rooms))
}

/// `GET /v1/rooms/{room}`
async fn room_info(
    State(app): AppState,
    Authed(me): Authed,
    Path(room): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(match room_home(&app, &room).await? {
        RoomHome::Here(id) => app.hub.room_info(&me, &id).await?,
        RoomHome::Remote(id) => app.follower.room_info(&me, &id).await?,
    }))
}

/// `POST /v1/rooms/{room}/commits`
async fn commit(
    State(app): AppState,
    Authed(me): Authed,
    Path(room): Path<String>,
    ApiJson(req): ApiJson<CommitRequest>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(match room_home(&app, &room).await? {
        RoomHome::Here(id) => {
            let bundle = CommitBundle {
                commit: req.commit,
                welcome: req.welcome,
                group_info: Some(req.group_info),
            };
            app.hub.commit(&Origin::Client(me), &id, bundle).await?
        }
        RoomHome::Remote(id) => app.follower.relay_commit(&me, &id, req).await?,
    }))
}

/// `POST /v1/rooms/{room}/messages`
async fn send(
    State(app): AppState,
    Authed(me): Authed,
    Path(room): Path<String>,
    ApiJson(req): ApiJson<SendRequest>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(send_message(&app, me, &room, req.message).await?))
}

/// A device's application message to a room, hubbed here or elsewhere: over HTTP or the
/// push WebSocket alike.
async fn send_message(
    app: &App,
    me: AuthDevice,
    room: &str,
    message: Vec<u8>,
) -> ApiResult<parley_proto::api::Accepted> {
    Ok(match room_home(app, room).await? {
        RoomHome::Here(id) => {
            app.hub
                .send(&MessageSender::Device(me), &id, message)
                .await?
        }
        RoomHome::Remote(id) => app.follower.relay_send(&me, &id, message).await?,
    })
}

/// `POST /v1/rooms/{room}/proposals`
async fn propose(
    State(app): AppState,
    Authed(me): Authed,
    Path(room): Path<String>,
    ApiJson(req): ApiJson<ProposalRequest>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(match room_home(&app, &room).await? {
        RoomHome::Here(id) => {
            app.hub
                .leave(&Origin::Client(me), &id, req.proposal)
                .await?
        }
        RoomHome::Remote(id) => app.follower.relay_proposal(&me, &id, req.proposal).await?,
    }))
}

/// `POST /v1/rooms/{room}/left`: the device left the room or processed its own removal.
async fn left(
    State(app): AppState,
    Authed(me): Authed,
    Path(room): Path<String>,
) -> ApiResult<StatusCode> {
    match room_home(&app, &room).await? {
        // The hub follows membership from the commits themselves.
        RoomHome::Here(id) => {
            if !app.hub.hosts_room(&id).await? {
                return Err(
                    ServiceError::not_found("unknown_room", format!("no room {id}")).into(),
                );
            }
        }
        RoomHome::Remote(id) => app.follower.left(&me, &id).await?,
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/rooms/{room}/ephemeral`: a typing indicator for the members connected now.
async fn send_ephemeral(
    State(app): AppState,
    Authed(me): Authed,
    Path(room): Path<String>,
    ApiJson(req): ApiJson<EphemeralRequest>,
) -> ApiResult<StatusCode> {
    app.ephemeral
        .send(&me, &parse_room(&room)?, req.message)
        .await?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Deserialize)]
struct QueueQuery {
    limit: Option<usize>,
    after: Option<u64>,
}

/// `GET /v1/queue?limit=N&after=SEQ`
async fn queue(
    State(app): AppState,
    Authed(me): Authed,
    query: Result<Query<QueueQuery>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(q) = query.map_err(|e| ServiceError::bad("invalid_query", e.body_text()))?;
    let limit = q
        .limit
        .unwrap_or(100)
        .clamp(1, app.config.limits.max_queue_page);
    let entries = app
        .delivery
        .page(me.device.as_str(), q.after.unwrap_or(0), limit)
        .await?;
    Ok(Json(QueuePage { entries }))
}

/// `POST /v1/queue/ack`
async fn ack(
    State(app): AppState,
    Authed(me): Authed,
    ApiJson(req): ApiJson<AckRequest>,
) -> ApiResult<StatusCode> {
    app.delivery.ack(me.device.as_str(), req.up_to).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
struct WsQuery {
    /// Also push ephemeral messages (typing indicators) of the device's rooms.
    #[serde(default)]
    ephemeral: bool,
    /// Frames as CBOR in binary messages instead of JSON text.
    #[serde(default)]
    binary: bool,
}

/// `GET /v1/ws[?ephemeral=true]`: push channel. Sends the backlog, then entries as they
/// become durable; with `ephemeral`, also ephemeral messages as they come.
async fn ws(
    State(app): AppState,
    Authed(me): Authed,
    query: Result<Query<WsQuery>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let query = query.map(|Query(q)| q).unwrap_or_default();
    // A `send` frame carries what a POST body would, so it has the same limit.
    let max_frame = app.config.limits.max_body_bytes;
    match upgrade {
        Ok(upgrade) => upgrade
            .max_message_size(max_frame)
            .max_frame_size(max_frame)
            // tungstenite zero-fills its whole read buffer on every read (128 KiB by default);
            // clients only send small acks, so a small buffer saves CPU and memory per connection.
            .read_buffer_size(WS_READ_BUFFER)
            .on_upgrade(move |socket| ws_session(app, me, socket, query)),
        Err(r) => error_response(r.status(), "websocket_required", r.body_text(), false),
    }
}

async fn ws_session(app: Arc<App>, me: AuthDevice, socket: WebSocket, query: WsQuery) {
    let device = me.device.as_str().to_owned();
    let framing = Framing {
        binary: query.binary,
    };
    // Subscribe before reading the backlog so nothing falls between the two.
    let mut live = app.delivery.push.subscribe(&device);
    let mut ephemerals = query
        .ephemeral
        .then(|| app.ephemeral.subscribers.subscribe(&device));
    let (mut sink, mut incoming) = socket.split();
    let mut shutdown = app.shutdown.clone();
    let mut last_sent = 0u64;
    loop {
        let page = match app.delivery.page(&device, last_sent, WS_PAGE).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "backlog read failed");
                return;
            }
        };
        let Some(last) = page.last() else { break };
        last_sent = last.seq;
        if send_entries(&mut sink, framing, page).await.is_err() {
            return;
        }
    }
    // Answers to `send` frames, as each send becomes durable (or is refused). Made on the
    // first send: a channel's first block costs a few KiB, and most connections only listen.
    let mut answers: Option<Answers> = None;
    let mut in_flight = 0usize;
    loop {
        tokio::select! {
            entry = live.recv() => {
                // Dropped as too slow (the client reconnects) or the device was deleted.
                let Some(first) = entry else {
                    let _ = sink.send(Message::Close(None)).await;
                    break;
                };
                let mut batch = vec![first];
                while batch.len() < WS_PAGE {
                    match live.try_recv() {
                        Ok(e) => batch.push(e),
                        Err(_) => break,
                    }
                }
                let fresh: Vec<_> = batch.iter().filter(|e| e.seq > last_sent).map(|e| (**e).clone()).collect();
                if let Some(last) = fresh.last() {
                    last_sent = last.seq;
                    if send_entries(&mut sink, framing, fresh).await.is_err() {
                        break;
                    }
                }
            }
            Some(answer) = next_answer(&mut answers) => {
                // Every answer waiting goes out in one flush.
                let mut batch = vec![answer];
                while let Some(more) = answers.as_mut().and_then(|(_, rx)| rx.try_recv().ok()) {
                    batch.push(more);
                }
                in_flight -= batch.len();
                if feed_all(&mut sink, framing, &batch).await.is_err() {
                    break;
                }
            }
            Some(frame) = next_ephemeral(&mut ephemerals) => {
                if send_ephemeral_frame(&mut sink, framing, &frame).await.is_err() {
                    break;
                }
            }
            frame = incoming.next(), if in_flight < WS_SEND_WINDOW => match framing.read(frame) {
                Incoming::Frame(WsFrame::Ack { up_to }) => {
                    if let Err(e) = app.delivery.ack(&device, up_to).await {
                        tracing::warn!(error = %e, "ack failed");
                    }
                }
                Incoming::Frame(WsFrame::Send { id, room, message }) => {
                    in_flight += 1;
                    let answers = answers
                        .get_or_insert_with(|| tokio::sync::mpsc::channel(WS_SEND_WINDOW))
                        .0
                        .clone();
                    let (app, me) = (app.clone(), me.clone());
                    // Its own task: sends of one connection share group commits, and a client
                    // hanging up cannot cancel a send half way.
                    tokio::spawn(async move {
                        let answer = match send_message(&app, me, &room, message).await {
                            Ok(a) => WsFrame::Sent { id, event: a.event, ts: a.ts, epoch: a.epoch },
                            Err(e) => {
                                let (status, error) = e.status_and_body();
                                WsFrame::Refused { id, status: status.as_u16(), error }
                            }
                        };
                        let _ = answers.send(answer).await;
                    });
                }
                Incoming::Control => {} // pings are answered by the WebSocket layer
                Incoming::Frame(_) | Incoming::Malformed => {
                    // Not a frame a client may send, or not a frame at all.
                    let _ = sink.send(Message::Close(None)).await;
                    break;
                }
                Incoming::Closed => break,
            },
            _ = shutdown.changed() => {
                let _ = sink.send(Message::Close(None)).await;
                break;
            }
        }
    }
    drop(live);
    app.delivery.push.prune(&device);
    if ephemerals.take().is_some() {
        app.ephemeral.subscribers.prune(&device);
    }
}

/// How a push connection's frames are written: JSON text, or CBOR in binary messages.
#[derive(Clone, Copy)]
struct Framing {
    binary: bool,
}

impl Framing {
    fn encode(self, frame: &WsFrame) -> Message {
        if self.binary {
            Message::Binary(frame.to_cbor().into())
        } else {
            Message::Text(serde_json::to_string(frame).unwrap_or_default().into())
        }
    }

    /// What the client sent: a frame in either framing (a client may mix them).
    fn read(self, message: Option<Result<Message, axum::Error>>) -> Incoming {
        match message {
            Some(Ok(Message::Text(text))) => {
                serde_json::from_str(&text).map_or(Incoming::Malformed, Incoming::Frame)
            }
            Some(Ok(Message::Binary(bytes))) => {
                WsFrame::from_cbor(&bytes).map_or(Incoming::Malformed, Incoming::Frame)
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Incoming::Control,
            Some(Ok(Message::Close(_)) | Err(_)) | None => Incoming::Closed,
        }
    }
}

/// A client's WebSocket message, read.
enum Incoming {
    Frame(WsFrame),
    Control,
    Malformed,
    Closed,
}

/// Writes frames and flushes once.
async fn feed_all(
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    framing: Framing,
    frames: &[WsFrame],
) -> Result<(), axum::Error> {
    for frame in frames {
        sink.feed(framing.encode(frame)).await?;
    }
    sink.flush().await
}

/// The sending and receiving ends for answers to a connection's `send` frames.
type Answers = (
    tokio::sync::mpsc::Sender<WsFrame>,
    tokio::sync::mpsc::Receiver<WsFrame>,
);

/// The next answer to a send, or never for a connection that has sent nothing.
async fn next_answer(answers: &mut Option<Answers>) -> Option<WsFrame> {
    match answers {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next ephemeral frame, or never for a connection that did not ask for them.
async fn next_ephemeral(
    subscription: &mut Option<tokio::sync::mpsc::Receiver<Arc<EphemeralFrame>>>,
) -> Option<Arc<EphemeralFrame>> {
    match subscription {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn send_ephemeral_frame(
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    framing: Framing,
    frame: &EphemeralFrame,
) -> Result<(), axum::Error> {
    let frame = WsFrame::Ephemeral {
        room: frame.room.clone(),
        data: frame.data.clone(),
    };
    sink.send(framing.encode(&frame)).await
}

async fn send_entries(
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    framing: Framing,
    entries: Vec<parley_proto::api::QueueEntry>,
) -> Result<(), axum::Error> {
    sink.send(framing.encode(&WsFrame::Entries { entries }))
        .await
}

/// `POST /v1/assets`: the encrypted bytes of an attachment, streamed to disk.
async fn upload_asset(
    State(app): AppState,
    Authed(me): Authed,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> ApiResult<impl IntoResponse> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let uploaded = app.assets.upload(&me, declared, body).await?;
    Ok((StatusCode::CREATED, Json(uploaded)))
}

/// `GET /v1/assets/{id}`: an asset this provider hosts.
async fn get_asset(
    State(app): AppState,
    Authed(_): Authed,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (body, size) = app.assets.read(&AssetId::parse(&id)?).await?;
    Ok(asset_response(body, Some(size)))
}

/// `DELETE /v1/assets/{id}`
async fn delete_asset(
    State(app): AppState,
    Authed(me): Authed,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    app.assets.delete(&me, &AssetId::parse(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct DownloadQuery {
    url: String,
    room: String,
}

/// `GET /v1/downloads?url=URL&room=ROOM`: an attachment sent in a room the caller is in, from
/// here when this provider hosts it, else through the room's hub (MIMI `proxyDownload`) or,
/// when this provider is the hub, straight from the hosting provider.
async fn download(
    State(app): AppState,
    Authed(me): Authed,
    query: Result<Query<DownloadQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = query.map_err(|e| ServiceError::bad("invalid_query", e.body_text()))?;
    let (host, id) = parse_asset_url(&q.url)?;
    if app.config.hosts(host.as_str()) {
        let (body, size) = app.assets.read(&id).await?;
        return Ok(asset_response(body, Some(size)));
    }
    let peers = app.peers.as_deref().ok_or_else(|| {
        ServiceError::not_found(
            "unknown_asset",
            "this provider does not talk to other providers",
        )
    })?;
    let upstream = match room_home(&app, &q.room).await? {
        RoomHome::Here(room) => {
            app.hub.room_info(&me, &room).await?; // members only
            peers.get_asset(me.user.domain(), &host, id.as_str()).await
        }
        RoomHome::Remote(room) => {
            app.follower.room_info(&me, &room).await?; // members only
            let hub = room.hub().clone();
            if hub == host {
                peers.get_asset(me.user.domain(), &host, id.as_str()).await
            } else {
                peers.proxy_download(me.user.domain(), &hub, &q.url).await
            }
        }
    }
    .map_err(ServiceError::from)?;
    Ok(relay_download(upstream)?)
}
