//! The provider-to-provider (MIMI) listener: always mutual TLS (`tls::federation_acceptor`). A
//! peer's certificate must chain to the configured peer CA, every request names its source
//! provider in `From: mimi@<domain>`, which the certificate must prove, and its `Host` one of the
//! domains hosted here; a request may only speak for what its domain may.
//!
//! Handlers only translate between MIMI bodies (draft-ietf-mimi-protocol-06, TLS presentation
//! language, docs/mimi-profile.md) and the services: `hub` (update, submitMessage, groupInfo,
//! reportAbuse for rooms hubbed here), `follower` (notify for rooms followed here),
//! `key_material` (keyMaterial), `consent` (requestConsent, updateConsent), `accounts`
//! (identifierQuery), `assets` (assets, proxyDownload), `ephemeral` (x-parley-ephemeral). Never
//! the client API (`http`): what both need lives below them. Protocol outcomes are MIMI bodies;
//! malformed or unauthorized requests get an HTTP error status with a JSON error body
//! (`error::ApiError`).

use crate::app::App;
use crate::assets::{asset_response, parse_asset_url, relay_download, AssetId};
use crate::ephemeral::EPHEMERAL;
use crate::error::{ApiError, ServiceError};
use crate::hub::{welcome_message, CommitBundle, MessageSender, Origin};
use crate::tls::{certificate_names, PeerCertificate};
use axum::body::Bytes;
use axum::extract::Path as Param;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use parley_proto::mimi::{
    self, AbuseReport, Body, ConsentEntry, GroupInfoOption, GroupInfoRequest, HandshakeBundle,
    IdentifierRequest, IdentifierResponse, IdentifierUri, KeyMaterialRequest, QueryCode,
    SubmitMessageRequest, SubmitMessageResponse, SubmitStatus, UpdateRequest, UpdateRoomResponse,
    SEARCH_HANDLE,
};
use parley_proto::{Domain, RoomId, UserId};
use std::sync::Arc;

/// The MIMI endpoints, as named in the directory (draft-ietf-mimi-protocol §5.1).
const ENDPOINTS: [(&str, &str); 11] = [
    ("keyMaterial", "keyMaterial/{targetUser}"),
    ("update", "update/{roomId}"),
    ("notify", "notify/{roomId}"),
    ("submitMessage", "submitMessage/{roomId}"),
    ("groupInfo", "groupInfo/{roomId}"),
    ("requestConsent", "requestConsent/{targetDomain}"),
    ("updateConsent", "updateConsent/{requesterDomain}"),
    ("identifierQuery", "identifierQuery/{domain}"),
    ("reportAbuse", "reportAbuse/{roomId}"),
    ("proxyDownload", "proxyDownload/{downloadUrl}"),
    // Parley extension: typing indicators for connected clients, never stored.
    (EPHEMERAL, "x-parley-ephemeral/{roomId}"),
];

/// The peer provider a request was authenticated as.
#[derive(Clone, Debug)]
pub struct PeerDomain(pub Domain);

/// Room and user parameters are URIs without `mimi://` spanning several path segments
/// (`chirp.test/r/NAME`, the draft's examples), or one percent-encoded segment: a wildcard.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/.well-known/mimi-protocol-directory", get(directory))
        .route("/v1/keyMaterial/{*target}", post(key_material))
        .route("/v1/update/{*room}", post(update))
        .route("/v1/submitMessage/{*room}", post(submit_message))
        .route("/v1/notify/{*room}", post(notify))
        .route("/v1/groupInfo/{*room}", post(group_info))
        .route("/v1/requestConsent/{domain}", post(request_consent))
        .route("/v1/updateConsent/{domain}", post(update_consent))
        .route("/v1/identifierQuery/{domain}", post(identifier_query))
        .route("/v1/reportAbuse/{*room}", post(report_abuse))
        .route("/v1/proxyDownload/{url}", get(proxy_download))
        .route("/v1/assets/{id}", get(serve_asset))
        .route("/v1/x-parley-ephemeral/{*room}", post(ephemeral))
        .fallback(|| async {
            ApiError(ServiceError::not_found(
                "not_found",
                "no such MIMI endpoint",
            ))
        })
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            limit_peer,
        ))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            authenticate_peer,
        ))
        // Peers batch notify messages up to 1 MiB and a Welcome for a large group is big: allow
        // the protocol maximum, never less than the client API's limit.
        .layer(axum::extract::DefaultBodyLimit::max(
            app.config
                .limits
                .max_body_bytes
                .max(parley_proto::mimi::MAX_BODY),
        ))
        .with_state(app)
}

/// How much of a refused request's body is read before answering.
const REFUSED_BODY_DRAIN: usize = 1 << 20;

/// Every federation request: `From: mimi@<domain>` must be proven by the TLS client certificate,
/// and `Host` (its port ignored) must be a domain hosted here.
async fn authenticate_peer(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<PeerCertificate>,
    mut request: Request,
    next: Next,
) -> Response {
    if let Err(e) = check_host(&app, request.headers()) {
        return refuse(request, e).await;
    }
    match peer_domain(request.headers(), &peer) {
        Ok(domain) => {
            request.extensions_mut().insert(PeerDomain(domain));
            next.run(request).await
        }
        Err(e) => refuse(request, e).await,
    }
}

/// Answers a request refused before its handler, having read its body (up to a bound) first:
/// answering while the peer is still sending closes the connection under it, and it sees a
/// broken pipe instead of the refusal.
async fn refuse(request: Request, error: ApiError) -> Response {
    let _ = axum::body::to_bytes(request.into_body(), REFUSED_BODY_DRAIN).await;
    error.into_response()
}

/// Per-peer request rate (after authentication, so a peer cannot spend another's budget).
async fn limit_peer(
    State(app): State<Arc<App>>,
    Extension(PeerDomain(peer)): Extension<PeerDomain>,
    request: Request,
    next: Next,
) -> Response {
    if app.peer_requests.allow(peer.as_str()) {
        next.run(request).await
    } else {
        let limited =
            ServiceError::RateLimited(format!("{peer} is over its request rate; slow down"));
        refuse(request, ApiError(limited)).await
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

/// `Host` names the target provider (draft §4.1): one of ours.
fn check_host(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name))
        .unwrap_or_default();
    if app.config.hosts(host) {
        Ok(())
    } else {
        Err(ServiceError::Misdirected(format!(
            "this provider does not host {host:?}; send MIMI requests to the target's provider"
        ))
        .into())
    }
}

/// `GET /.well-known/mimi-protocol-directory`: where each MIMI endpoint is.
async fn directory(headers: HeaderMap) -> impl IntoResponse {
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

type FedResult = Result<Response, ApiError>;

/// A request body within the listener's limit; an oversized or unreadable one is refused with
/// the JSON error body like every other refusal (`413 body_too_large`, `400 invalid_body`).
pub struct MimiBody(pub Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for MimiBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Bytes::from_request(req, state).await {
            Ok(body) => Ok(Self(body)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ServiceError::too_large(
                    "body_too_large",
                    "the body is over this provider's limit for MIMI requests",
                )
                .into())
            }
            Err(rejection) => Err(ServiceError::bad("invalid_body", rejection.body_text()).into()),
        }
    }
}

/// A MIMI body answer.
fn mimi_body(status: StatusCode, body: impl Body) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, mimi::CONTENT_TYPE)],
        body.encode(),
    )
        .into_response()
}

fn decode<T: Body>(bytes: &[u8]) -> Result<T, ApiError> {
    T::decode(bytes).map_err(|e| ServiceError::bad("invalid_body", e.to_string()).into())
}

fn room_param(room: &str) -> Result<RoomId, ApiError> {
    RoomId::parse(room).map_err(|e| ServiceError::bad("invalid_room", e.to_string()).into())
}

/// `POST /v1/keyMaterial/{targetUser}`
async fn key_material(
    State(app): State<Arc<App>>,
    Extension(PeerDomain(peer)): Extension<PeerDomain>,
    Param(target): Param<String>,
    MimiBody(body): MimiBody,
) -> FedResult {
    let request: KeyMaterialRequest = decode(&body)?;
    let target = if target.starts_with("mimi://") {
        target
    } else {
        format!("mimi://{target}")
    };
    let answer = app.key_material.on_request(&peer, &target, request).await?;
    Ok(mimi_body(StatusCode::OK, answer))
}

/// `"code: message"`, how refusals travel in `errorDescription`.
fn describe(code: &str, e: &ServiceError) -> tls_codec::VLBytes {
    format!("{code}: {e}").into_bytes().into()
}

/// `POST /v1/update/{roomId}`: a follower relays a commit (also an external commit) or a
/// proposal to this hub.
async fn update(
    State(app): State<Arc<App>>,
    Extension(PeerDomain(peer)): Extension<PeerDomain>,
    Param(room): Param<String>,
    MimiBody(body): MimiBody,
) -> FedResult {
    let room = room_param(&room)?;
    let request: UpdateRequest = decode(&body)?;
    let origin = Origin::Peer(peer);
    let outcome = match request {
        HandshakeBundle::Commit {
            commit,
            welcome,
            group_info,
            ..
        } => {
            let group_info = match group_info {
                GroupInfoOption::Full { group_info } => group_info.into_bytes(),
                GroupInfoOption::Partial { .. } => {
                    let refusal = ServiceError::forbidden(
                        "policy",
                        "a partial GroupInfo is not supported; send the full GroupInfo",
                    );
                    return Ok(mimi_body(
                        StatusCode::OK,
                        UpdateRoomResponse::NotAllowed {
                            error_description: describe("policy", &refusal),
                        },
                    ));
                }
            };
            let welcome = welcome
                .map(|w| welcome_message(w.into_bytes()))
                .transpose()?;
            let bundle = CommitBundle {
                commit: commit.into_bytes(),
                welcome,
                group_info: Some(group_info),
            };
            app.hub.commit(&origin, &room, bundle).await
        }
        HandshakeBundle::Proposal {
            proposal,
            more_proposals,
        } => {
            if !more_proposals.is_empty() {
                return Err(ServiceError::forbidden(
                    "policy",
                    "only a member's own removal (leaving) may be proposed, alone",
                )
                .into());
            }
            app.hub.leave(&origin, &room, proposal.into_bytes()).await
        }
    };
    let answer = match outcome {
        Ok(accepted) => UpdateRoomResponse::Success {
            error_description: Vec::new().into(),
            accepted_timestamp: accepted.ts,
        },
        Err(ServiceError::Conflict {
            code: "wrong_epoch",
            ..
        }) => UpdateRoomResponse::WrongEpoch {
            error_description: b"wrong_epoch".to_vec().into(),
            current_epoch: app.hub.epoch_of(&room).await?.unwrap_or(0),
        },
        Err(e @ ServiceError::Conflict { code, .. }) => UpdateRoomResponse::InvalidProposal {
            error_description: describe(code, &e),
            invalid_proposals: Vec::new(),
        },
        Err(e @ ServiceError::Forbidden { code, .. }) => UpdateRoomResponse::NotAllowed {
            error_description: describe(code, &e),
        },
        Err(e) => return Err(e.into()),
    };
    Ok(mimi_body(StatusCode::OK, answer))
}

/// `POST /v1/submitMessage/{roomId}`: a follower relays an application message to this hub;
/// `sendingUri` (a user or client URI) must be of the calling peer's domain.
async fn submit_message(
    State(app): State<Arc<App>>,
    Extension(PeerDomain(peer)): Extension<PeerDomain>,
    Param(room): Param<String>,
    MimiBody(body): MimiBody,
) -> FedResult {
    let room = room_param(&room)?;
    let request: SubmitMessageRequest = decode(&body)?;
    request
        .check()
        .map_err(|e| ServiceError::bad("unsupported_protocol", e.to_string()))?;
    let sender = MessageSender::from_uri(
        request
            .sending_uri
            .as_str()
            .map_err(|e| ServiceError::bad("invalid_body", e.to_string()))?,
    )?;
    let domain = match &sender {
        MessageSender::Device(d) => d.user.domain(),
        MessageSender::User(u) => u.domain(),
    };
    if domain != &peer {
        return Err(ServiceError::forbidden(
            "peer_domain_mismatch",
            format!("{peer} may not send for another provider's user"),
        )
        .into());
    }
    let message_epoch = crate::mls::message_epoch(request.app_message.bytes());
    let status = match app
        .hub
        .send(&sender, &room, request.app_message.into_bytes())
        .await
    {
        Ok(accepted) => SubmitStatus::Accepted {
            accepted_timestamp: accepted.ts,
            frank: None,
        },
        Err(ServiceError::Conflict {
            code: "wrong_epoch",
            ..
        }) => {
            let current_epoch = app.hub.epoch_of(&room).await?.unwrap_or(0);
            // The draft: a message from an epoch newer than the hub's is nonsensical input.
            if message_epoch.is_some_and(|e| e > current_epoch) {
                SubmitStatus::NotAllowed
            } else {
                SubmitStatus::EpochTooOld { current_epoch }
            }
        }
        Err(ServiceError::Forbidden { .. }) => SubmitStatus::NotAllowed,
        Err(e) => return Err(e.into()),
    };
    Ok(mimi_body(
        StatusCode::OK,
        SubmitMessageResponse::new(status),
    ))
}

/// `POST /v1/notify/{roomId}`: this provider follows the room; the peer must be its hub.
async fn notify(
    State(app): State<Arc<App>>,
    Extension(PeerDomain(peer)): Extension<PeerDomain>,
    Param(room): Param<String>,
    MimiBody(body): MimiBody,
) -> FedResult {
    let room = room_param(&room)?;
    app.follower.notify(&peer, &room, &body).await?;
    Ok(StatusCode::CREATED.into_response())
}

/// `POST /v1/groupInfo/{roomId}`: the room's GroupInfo for a client joining by external commit.
async fn group_info(
    State(app): State<Arc<App>>,
    Extension(PeerDomain(peer)): Extension<PeerDomain>,
    Param(room): Param<String>,
    MimiBody(body): MimiBody,
) -> FedResult {
    let room = room_param(&room)?;
    let request: GroupInfoRequest = decode(&body)?;
    let answer = app.hub.group_info(Some(&peer), &room, request).await?;
    Ok(mimi_body(StatusCode::OK, answer))
}

fn check_domain_param(app: &App, domain: &str) -> Result<(), ApiError> {
    if app.config.hosts(domain) {
        Ok(())
    } else {
        Err(ServiceError::not_found(
            "unknown_domain",
            format!("this provider does not host {domain}"),
        )
        .into())
    }
}

/// `POST /v1/requestConsent/{targetDomain}`
async fn request_consent(
    State(app): State<Arc<App>>,
    Extension(PeerDomain(peer)): Extension<PeerDomain>,
    Param(domain): Param<String>,
    MimiBody(body): MimiBody,
) -> FedResult {
    consent_message(&app, &peer, &domain, &body, false).await
}

/// `POST /v1/updateConsent/{requesterDomain}`
async fn update_consent(
    State(app): State<Arc<App>>,
    Extension(PeerDomain(peer)): Extension<PeerDomain>,
    Param(domain): Param<String>,
    MimiBody(body): MimiBody,
) -> FedResult {
    consent_message(&app, &peer, &domain, &body, true).await
}

/// A `ConsentEntry` for one of our domains: a request/cancel, or (`answer`) a grant/revoke.
async fn consent_message(
    app: &App,
    peer: &Domain,
    domain: &str,
    body: &[u8],
    answer: bool,
) -> FedResult {
    check_domain_param(app, domain)?;
    let entry: ConsentEntry = decode(body)?;
    if answer {
        app.consent.on_update(peer, entry).await?;
    } else {
        app.consent.on_request(peer, entry).await?;
    }
    Ok(StatusCode::CREATED.into_response())
}

/// `POST /v1/identifierQuery/{domain}`: exact handle lookups only.
async fn identifier_query(
    State(app): State<Arc<App>>,
    Param(domain): Param<String>,
    MimiBody(body): MimiBody,
) -> FedResult {
    check_domain_param(&app, &domain)?;
    let request: IdentifierRequest = decode(&body)?;
    let [element] = request.query_elements.as_slice() else {
        return Ok(mimi_body(
            StatusCode::OK,
            IdentifierResponse::new(QueryCode::UnsupportedField, Vec::new()),
        ));
    };
    if element.search_type != SEARCH_HANDLE {
        return Ok(mimi_body(
            StatusCode::OK,
            IdentifierResponse::new(QueryCode::UnsupportedField, Vec::new()),
        ));
    }
    let value = String::from_utf8_lossy(element.search_value.as_slice()).into_owned();
    let handle = value.strip_prefix("im:").unwrap_or(&value);
    let found = match UserId::parse(handle) {
        Ok(user) if user.domain().as_str() == domain => {
            app.accounts.devices(&user).await.is_ok().then_some(user)
        }
        _ => None,
    };
    let answer = match found {
        Some(user) => {
            IdentifierResponse::new(QueryCode::Success, vec![IdentifierUri::new(&user.to_uri())])
        }
        None => IdentifierResponse::new(QueryCode::NotFound, Vec::new()),
    };
    Ok(mimi_body(StatusCode::OK, answer))
}

/// `POST /v1/reportAbuse/{roomId}`: logged and counted for the operator (no franking yet).
async fn report_abuse(
    State(app): State<Arc<App>>,
    Extension(PeerDomain(peer)): Extension<PeerDomain>,
    Param(room): Param<String>,
    MimiBody(body): MimiBody,
) -> FedResult {
    let report: AbuseReport = decode(&body)?;
    let id = room_param(&room)?;
    if !app.hub.hosts_room(&id).await? {
        return Err(ServiceError::not_found(
            "unknown_room",
            format!("no room {id} is hubbed here"),
        )
        .into());
    }
    let text = |u: &IdentifierUri| u.as_str().unwrap_or("?").to_owned();
    let reporter = text(&report.reporting_user);
    if !reporter.is_empty()
        && UserId::parse(&reporter)
            .map(|u| u.domain() != &peer)
            .unwrap_or(true)
    {
        return Err(ServiceError::forbidden(
            "peer_domain_mismatch",
            format!("{peer} may not report on behalf of {reporter}"),
        )
        .into());
    }
    app.hub
        .counters
        .abuse_reports
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(room = %id, %peer, reporter = %reporter, alleged = %text(&report.alleged_abuser_uri), messages = report.messages.len(), "abuse report");
    Ok(StatusCode::CREATED.into_response())
}

/// `GET /v1/assets/{id}`: an asset hosted here, for a peer (a hub proxying, or a follower whose
/// room is hubbed here). Asset ids are unguessable; only authenticated peers reach this.
async fn serve_asset(State(app): State<Arc<App>>, Param(id): Param<String>) -> FedResult {
    let (body, size) = app.assets.read(&AssetId::parse(&id)?).await?;
    Ok(asset_response(body, Some(size)))
}

/// `GET /v1/proxyDownload/{downloadUrl}`: as a hub, fetch an asset for a follower from the
/// provider hosting it (or from here). Only providers that authenticate with a peer
/// certificate for the URL's domain are ever contacted, so this is no open proxy.
async fn proxy_download(
    State(app): State<Arc<App>>,
    Extension(PeerDomain(peer)): Extension<PeerDomain>,
    Param(url): Param<String>,
) -> FedResult {
    let (host, id) = parse_asset_url(&url)?;
    if app.config.hosts(host.as_str()) {
        let (body, size) = app.assets.read(&id).await?;
        return Ok(asset_response(body, Some(size)));
    }
    if host == peer {
        return Err(ServiceError::bad("own_asset", "fetch your own assets yourself").into());
    }
    let peers = app
        .peers
        .as_deref()
        .ok_or_else(|| ServiceError::Internal("federation without a peer client".into()))?;
    let as_domain = peers
        .any_identity()
        .ok_or_else(|| ServiceError::Internal("no federation identity".into()))?;
    let upstream = peers
        .get_asset(&as_domain, &host, id.as_str())
        .await
        .map_err(ServiceError::from)?;
    Ok(relay_download(upstream)?)
}

/// `POST /v1/x-parley-ephemeral/{roomId}` (Parley extension): a typing indicator, relayed by
/// a follower to the hub or handed by the hub to a follower; never stored (see `ephemeral`).
async fn ephemeral(
    State(app): State<Arc<App>>,
    Extension(PeerDomain(peer)): Extension<PeerDomain>,
    Param(room): Param<String>,
    MimiBody(body): MimiBody,
) -> FedResult {
    let room = room_param(&room)?;
    app.ephemeral.receive(&peer, &room, &body).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}
