//! The provider-to-provider HTTPS server: a mutual-TLS accept loop (hyper over tokio-rustls,
//! the peer's certificate handed to handlers), source authentication (`From: mimi@DOMAIN`
//! proven by the certificate, `Host` ours), the directory, and the endpoint handlers. Protocol
//! outcomes are MIMI bodies; malformed or unauthorised requests get a JSON error (profile §2).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State as AxState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::hub::Refusal;
use crate::ids::{uri_from_path, ClientUri, RoomUri, UserUri};
use crate::inner::{Inner, Outbound};
use crate::mls::{basic_identity, verify_with_label, CIPHERSUITE};
use crate::peer::MEDIA_TYPE;
use crate::provider::IndieError;
use crate::state::ConsentEvent;
use crate::wire::{
    decode, decode_notify_body, encode, ClientKeyMaterial, ConsentEntry, ConsentOperation,
    GroupInfoOption, HandshakeBundle, HandshakeExtra, IdentifierUri, KeyMaterialRequest,
    KeyMaterialResponse, KeyMaterialUserCode, Protocol, SubmitAccepted, SubmitMessageRequest,
    SubmitMessageResponse, SubmitStatus, UpdateOutcome, UpdateRoomResponse,
};

const MAX_BODY: usize = 4 << 20;
const ENDPOINTS: [(&str, &str); 10] = [
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
];

/// The verified certificate of the peer on this connection.
#[derive(Clone)]
pub(crate) struct PeerCert(Arc<CertificateDer<'static>>);

/// A JSON error answer `{"error", "message", "retryable"}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

fn api_error(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        code,
        message: message.into(),
    }
}

fn bad_body(e: impl std::fmt::Display) -> ApiError {
    api_error(StatusCode::BAD_REQUEST, "invalid_body", e.to_string())
}

/// Bodies that open with `Protocol`: anything but `mls10(1)` is `unsupported_protocol`.
fn check_protocol(body: &[u8]) -> Result<(), ApiError> {
    match body.first() {
        Some(1) | None => Ok(()),
        Some(other) => Err(api_error(
            StatusCode::BAD_REQUEST,
            "unsupported_protocol",
            format!("protocol {other} is not mls10(1)"),
        )),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retryable = self.status.is_server_error();
        let body = serde_json::json!({
            "error": self.code,
            "message": self.message,
            "retryable": retryable,
        });
        (self.status, Json(body)).into_response()
    }
}

impl From<IndieError> for ApiError {
    fn from(e: IndieError) -> Self {
        api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

fn mimi_body(bytes: Vec<u8>) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, MEDIA_TYPE)], bytes).into_response()
}

fn encoded<T: tls_codec::Serialize>(value: &T) -> Result<Response, ApiError> {
    Ok(mimi_body(encode(value).map_err(|e| {
        api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    })?))
}

/// Checks `From` against the certificate and `Host` against our domain; returns the peer.
fn authenticate(inner: &Inner, cert: &PeerCert, headers: &HeaderMap) -> Result<String, ApiError> {
    let from = headers
        .get("from")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| api_error(StatusCode::BAD_REQUEST, "missing_from", "no From header"))?;
    let peer = from
        .strip_prefix("mimi@")
        .filter(|d| crate::ids::valid_domain(d))
        .ok_or_else(|| api_error(StatusCode::BAD_REQUEST, "invalid_from", from.to_owned()))?;
    if !crate::tls::proves_domain(&cert.0, peer) {
        return Err(api_error(
            StatusCode::FORBIDDEN,
            "peer_domain_mismatch",
            format!("the client certificate does not prove {peer}"),
        ));
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    if host != inner.domain {
        return Err(api_error(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected_request",
            format!("{host} is not served here"),
        ));
    }
    Ok(peer.to_owned())
}

/// The routes of the provider.
pub(crate) fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/.well-known/mimi-protocol-directory", get(directory))
        .route("/v1/keyMaterial/{*target}", post(key_material))
        .route("/v1/update/{*room}", post(update))
        .route("/v1/notify/{*room}", post(notify))
        .route("/v1/submitMessage/{*room}", post(submit_message))
        .route("/v1/requestConsent/{domain}", post(request_consent))
        .route("/v1/updateConsent/{domain}", post(update_consent))
        .route("/v1/groupInfo/{*room}", post(not_implemented))
        .route("/v1/identifierQuery/{*domain}", post(not_implemented))
        .route("/v1/reportAbuse/{*room}", post(not_implemented))
        .route("/v1/proxyDownload/{*url}", get(not_implemented))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(inner)
}

async fn directory(
    AxState(inner): AxState<Arc<Inner>>,
    Extension(cert): Extension<PeerCert>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authenticate(&inner, &cert, &headers)?;
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(&inner.domain);
    let map: serde_json::Map<String, serde_json::Value> = ENDPOINTS
        .iter()
        .map(|(key, path)| {
            (
                (*key).to_owned(),
                format!("https://{host}/v1/{path}").into(),
            )
        })
        .collect();
    Ok(Json(serde_json::Value::Object(map)).into_response())
}

async fn not_implemented(
    AxState(inner): AxState<Arc<Inner>>,
    Extension(cert): Extension<PeerCert>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authenticate(&inner, &cert, &headers)?;
    Err(api_error(
        StatusCode::NOT_IMPLEMENTED,
        "not_implemented",
        "this provider does not implement this endpoint",
    ))
}

fn key_material_answer(target: &str, status: KeyMaterialUserCode) -> KeyMaterialResponse {
    KeyMaterialResponse {
        protocol: Protocol::Mls10,
        user_status: status,
        user_uri: IdentifierUri::new(target),
        clients: Vec::new(),
    }
}

/// Checks a KeyMaterialRequest's signature and that its credential is a client of the requester.
fn verify_key_material_request(
    request: &KeyMaterialRequest,
    requester: &UserUri,
) -> Result<(), ApiError> {
    let tbs = &request.tbs;
    let client = basic_identity(&tbs.requester_credential)
        .and_then(|uri| ClientUri::parse(&uri).ok())
        .ok_or_else(|| {
            api_error(
                StatusCode::BAD_REQUEST,
                "invalid_credential",
                "requester credential",
            )
        })?;
    if client.user() != requester {
        return Err(api_error(
            StatusCode::FORBIDDEN,
            "invalid_credential",
            format!("{client} is not a client of {requester}"),
        ));
    }
    let content = encode(tbs).map_err(bad_body)?;
    verify_with_label(
        &openmls_rust_crypto::RustCrypto::default(),
        tbs.requester_signature_key.as_slice(),
        "KeyMaterialRequestTBS",
        &content,
        request.signature.as_slice(),
    )
    .map_err(|_| {
        api_error(
            StatusCode::FORBIDDEN,
            "invalid_signature",
            "KeyMaterialRequest signature",
        )
    })
}

async fn key_material(
    AxState(inner): AxState<Arc<Inner>>,
    Extension(cert): Extension<PeerCert>,
    headers: HeaderMap,
    Path(target): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let peer = authenticate(&inner, &cert, &headers)?;
    check_protocol(&body)?;
    let request: KeyMaterialRequest = decode(&body).map_err(bad_body)?;
    let tbs = &request.tbs;
    let target = uri_from_path(&target);
    let field = |uri: &IdentifierUri| uri.as_str().map(str::to_owned).map_err(bad_body);
    if field(&tbs.target_user)? != target {
        return Err(api_error(
            StatusCode::BAD_REQUEST,
            "target_mismatch",
            "path and targetUser differ",
        ));
    }
    let requester = UserUri::parse(&field(&tbs.requesting_user)?).map_err(bad_body)?;
    let room = RoomUri::parse(&field(&tbs.room_id)?).map_err(bad_body)?;
    if peer != requester.domain() && peer != room.hub() {
        return Err(api_error(
            StatusCode::FORBIDDEN,
            "peer_domain_mismatch",
            format!("{peer} neither hosts {requester} nor hubs {room}"),
        ));
    }
    verify_key_material_request(&request, &requester)?;
    let Ok(target_user) = UserUri::parse(&target) else {
        return encoded(&key_material_answer(
            &target,
            KeyMaterialUserCode::UserUnknown,
        ));
    };
    if target_user.domain() != inner.domain {
        return relay_key_material(
            &inner,
            &request,
            &peer,
            &requester,
            &room,
            &target_user,
            body,
        )
        .await;
    }
    let mut st = inner.state()?;
    let consented = requester.domain() == inner.domain
        || st
            .consents
            .contains(&(target_user.to_string(), requester.to_string()));
    if st.user_by_uri(&target_user).is_none() || !consented {
        info!(%target, %requester, "keyMaterial: no consent");
        return encoded(&key_material_answer(
            &target,
            KeyMaterialUserCode::NoConsent,
        ));
    }
    if !tbs
        .acceptable_ciphersuites
        .contains(&u16::from(CIPHERSUITE))
    {
        return encoded(&key_material_answer(
            &target,
            KeyMaterialUserCode::NoCompatibleMaterial,
        ));
    }
    let key_package = st
        .hand_out(target_user.handle(), &room)
        .map_err(IndieError::from)?;
    let client_uri = st
        .user_by_uri(&target_user)
        .map(|u| u.client.uri().to_string())
        .unwrap_or_default();
    info!(%target, %requester, %room, "keyMaterial: handed out a KeyPackage");
    encoded(&KeyMaterialResponse {
        protocol: Protocol::Mls10,
        user_status: KeyMaterialUserCode::Success,
        user_uri: IdentifierUri::new(&target),
        clients: vec![ClientKeyMaterial::Success {
            client_uri: IdentifierUri::new(&client_uri),
            key_package: key_package.into(),
        }],
    })
}

/// As hub, forwards a follower's user's signed request unchanged to the target's provider
/// (profile §5.2), if the requesting client is a member of the room with that key.
async fn relay_key_material(
    inner: &Inner,
    request: &KeyMaterialRequest,
    peer: &str,
    requester: &UserUri,
    room: &RoomUri,
    target: &UserUri,
    body: Bytes,
) -> Result<Response, ApiError> {
    let client = basic_identity(&request.tbs.requester_credential)
        .and_then(|uri| ClientUri::parse(&uri).ok())
        .ok_or_else(|| api_error(StatusCode::BAD_REQUEST, "invalid_credential", "requester"))?;
    let allowed = {
        let st = inner.state()?;
        peer == requester.domain()
            && st.hub.hubs(room)
            && st.hub.is_member_with_key(
                room,
                &client,
                request.tbs.requester_signature_key.as_slice(),
            )
    };
    if !allowed {
        return Err(api_error(
            StatusCode::FORBIDDEN,
            "not_member",
            format!("{client} may not claim KeyPackages for {room} through this hub"),
        ));
    }
    let answer = inner
        .peers
        .post(
            target.domain(),
            "keyMaterial",
            crate::ids::path_form(&target.to_string()),
            body.to_vec(),
        )
        .await
        .map_err(|e| api_error(StatusCode::BAD_GATEWAY, "peer_unreachable", e.to_string()))?;
    if answer.status != 200 {
        return Err(api_error(
            StatusCode::BAD_GATEWAY,
            "peer_refused",
            format!("{} answered {}", target.domain(), answer.status),
        ));
    }
    info!(%room, %requester, %target, "keyMaterial relayed");
    Ok(mimi_body(answer.body))
}

fn room_from_path(param: &str) -> Result<RoomUri, ApiError> {
    RoomUri::parse(&uri_from_path(param))
        .map_err(|e| api_error(StatusCode::NOT_FOUND, "unknown_room", e.to_string()))
}

fn update_answer(outcome: UpdateOutcome, error_description: String) -> Result<Response, ApiError> {
    encoded(&UpdateRoomResponse {
        outcome,
        error_description,
    })
}

fn refusal_to_update(refusal: Refusal) -> Result<Response, ApiError> {
    match refusal {
        Refusal::InvalidProposal { missing } => update_answer(
            UpdateOutcome::InvalidProposal {
                invalid_proposals: missing.into_iter().map(Into::into).collect(),
            },
            "pending_proposals: the commit leaves out pending proposals".into(),
        ),
        Refusal::WrongEpoch { current } => update_answer(
            UpdateOutcome::WrongEpoch {
                current_epoch: current,
            },
            String::new(),
        ),
        other => update_answer(UpdateOutcome::NotAllowed, other.to_string()),
    }
}

async fn update(
    AxState(inner): AxState<Arc<Inner>>,
    Extension(cert): Extension<PeerCert>,
    headers: HeaderMap,
    Path(room): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let peer = authenticate(&inner, &cert, &headers)?;
    let room = room_from_path(&room)?;
    let bundle: HandshakeBundle = decode(&body).map_err(bad_body)?;
    let _hub = inner.hub_lock.lock().await;
    if !inner.state()?.hub.hubs(&room) {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            "unknown_room",
            room.to_string(),
        ));
    }
    let welcome = match bundle.extra {
        HandshakeExtra::Proposal { more_proposals } if !more_proposals.is_empty() => {
            return update_answer(
                UpdateOutcome::NotAllowed,
                "unsupported_proposal: moreProposals must be empty".into(),
            )
        }
        HandshakeExtra::Proposal { .. } => {
            let result = {
                let mut st = inner.state()?;
                inner.hub_proposal(&mut st, &room, bundle.proposal_or_commit, &peer)
            };
            return answer_update(&inner, &room, &peer, result).await;
        }
        HandshakeExtra::Commit {
            group_info: GroupInfoOption::Partial(_),
            ..
        } => {
            return update_answer(
                UpdateOutcome::NotAllowed,
                "unsupported: partial GroupInfo".into(),
            )
        }
        HandshakeExtra::Commit { welcome, .. } => welcome,
    };
    let result = {
        let mut st = inner.state()?;
        inner.hub_commit(
            &mut st,
            &room,
            bundle.proposal_or_commit,
            welcome,
            &peer,
            None,
        )
    };
    answer_update(&inner, &room, &peer, result).await
}

/// Fans out what the hub accepted and answers the `update`.
async fn answer_update(
    inner: &Inner,
    room: &RoomUri,
    peer: &str,
    result: Result<(u64, Vec<Outbound>), Refusal>,
) -> Result<Response, ApiError> {
    match result {
        Ok((timestamp, outbound)) => {
            info!(%room, %peer, "update accepted");
            inner.send_notifies(outbound).await;
            update_answer(
                UpdateOutcome::Success {
                    accepted_timestamp: timestamp,
                },
                String::new(),
            )
        }
        Err(refusal) => {
            info!(%room, %peer, %refusal, "update: refused");
            refusal_to_update(refusal)
        }
    }
}

fn submit_answer(status: SubmitStatus) -> Result<Response, ApiError> {
    encoded(&SubmitMessageResponse {
        protocol: Protocol::Mls10,
        status,
    })
}

async fn submit_message(
    AxState(inner): AxState<Arc<Inner>>,
    Extension(cert): Extension<PeerCert>,
    headers: HeaderMap,
    Path(room): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let peer = authenticate(&inner, &cert, &headers)?;
    let room = room_from_path(&room)?;
    check_protocol(&body)?;
    let request: SubmitMessageRequest = decode(&body).map_err(bad_body)?;
    let sending = request.sending_uri.as_str().map_err(bad_body)?;
    let sender = UserUri::parse(sending)
        .or_else(|_| ClientUri::parse(sending).map(|c| c.user().clone()))
        .map_err(bad_body)?;
    let _hub = inner.hub_lock.lock().await;
    if !inner.state()?.hub.hubs(&room) {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            "unknown_room",
            room.to_string(),
        ));
    }
    let result = {
        let mut st = inner.state()?;
        inner.hub_message(&mut st, &room, request.app_message, &sender, &peer, None)
    };
    match result {
        Ok((timestamp, outbound)) => {
            debug!(%room, %sender, "submitMessage accepted");
            inner.send_notifies(outbound).await;
            submit_answer(SubmitStatus::Accepted(SubmitAccepted {
                accepted_timestamp: timestamp,
                frank: None,
            }))
        }
        Err(Refusal::WrongEpoch { current }) => submit_answer(SubmitStatus::EpochTooOld(current)),
        Err(refusal) => {
            info!(%room, %sender, %refusal, "submitMessage refused");
            submit_answer(SubmitStatus::NotAllowed)
        }
    }
}

async fn notify(
    AxState(inner): AxState<Arc<Inner>>,
    Extension(cert): Extension<PeerCert>,
    headers: HeaderMap,
    Path(room): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let peer = authenticate(&inner, &cert, &headers)?;
    let room = room_from_path(&room)?;
    let mut st = inner.state()?;
    if st.following.get(&room) != Some(&peer) || st.hub.hubs(&room) {
        return Err(api_error(
            StatusCode::FORBIDDEN,
            "not_hub",
            format!("{peer} is not the hub of a room followed here"),
        ));
    }
    let messages = decode_notify_body(&body).map_err(bad_body)?;
    let mut applied = 0;
    for (message, raw) in messages {
        applied += usize::from(st.apply_fanout_once(&room, message, raw));
    }
    debug!(%room, %peer, applied, "notify");
    Ok(StatusCode::CREATED.into_response())
}

/// Decodes a ConsentEntry and checks who may speak for whom.
fn consent_body(
    inner: &Inner,
    body: &[u8],
    peer: &str,
    allowed: [ConsentOperation; 2],
    peer_side_is_requester: bool,
) -> Result<ConsentEvent, ApiError> {
    let entry: ConsentEntry = decode(body).map_err(bad_body)?;
    if !allowed.contains(&entry.operation) {
        return Err(api_error(
            StatusCode::BAD_REQUEST,
            "invalid_operation",
            format!("{:?} does not belong to this endpoint", entry.operation),
        ));
    }
    let requester =
        UserUri::parse(entry.requester_uri.as_str().map_err(bad_body)?).map_err(bad_body)?;
    let target = UserUri::parse(entry.target_uri.as_str().map_err(bad_body)?).map_err(bad_body)?;
    let (remote, local) = if peer_side_is_requester {
        (&requester, &target)
    } else {
        (&target, &requester)
    };
    if remote.domain() != peer {
        return Err(api_error(
            StatusCode::FORBIDDEN,
            "peer_domain_mismatch",
            format!("{peer} does not speak for {remote}"),
        ));
    }
    if local.domain() != inner.domain {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            "unknown_user",
            local.to_string(),
        ));
    }
    let room = entry
        .room_id
        .as_ref()
        .map(|r| r.as_str().map(str::to_owned))
        .transpose()
        .map_err(bad_body)?;
    Ok(ConsentEvent {
        operation: entry.operation,
        requester: requester.to_string(),
        target: target.to_string(),
        room,
    })
}

fn check_path_domain(inner: &Inner, domain: &str) -> Result<(), ApiError> {
    if domain != inner.domain {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            "unknown_domain",
            domain.to_owned(),
        ));
    }
    Ok(())
}

async fn request_consent(
    AxState(inner): AxState<Arc<Inner>>,
    Extension(cert): Extension<PeerCert>,
    headers: HeaderMap,
    Path(domain): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let peer = authenticate(&inner, &cert, &headers)?;
    check_path_domain(&inner, &domain)?;
    let event = consent_body(
        &inner,
        &body,
        &peer,
        [ConsentOperation::Request, ConsentOperation::Cancel],
        true,
    )?;
    info!(requester = %event.requester, target = %event.target, op = ?event.operation, "requestConsent");
    inner.state()?.consent_events.push(event);
    Ok(StatusCode::CREATED.into_response())
}

async fn update_consent(
    AxState(inner): AxState<Arc<Inner>>,
    Extension(cert): Extension<PeerCert>,
    headers: HeaderMap,
    Path(domain): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let peer = authenticate(&inner, &cert, &headers)?;
    check_path_domain(&inner, &domain)?;
    let event = consent_body(
        &inner,
        &body,
        &peer,
        [ConsentOperation::Grant, ConsentOperation::Revoke],
        false,
    )?;
    info!(requester = %event.requester, target = %event.target, op = ?event.operation, "updateConsent");
    let mut st = inner.state()?;
    let key = (event.requester.clone(), event.target.clone());
    if event.operation == ConsentOperation::Grant {
        st.granted_to_us.insert(key);
    } else {
        st.granted_to_us.remove(&key);
    }
    st.consent_events.push(event);
    Ok(StatusCode::CREATED.into_response())
}

/// Accepts TLS connections until `shutdown` turns true; each connection is served by hyper
/// with the peer's certificate attached to every request.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => break,
        };
        let (tcp, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "accept failed");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(stream) => stream,
                Err(e) => {
                    debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let Some(cert) = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned())
            else {
                return;
            };
            let service =
                TowerToHyperService::new(router.layer(Extension(PeerCert(Arc::new(cert)))));
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        debug!(%remote, error = %e, "connection ended with an error");
                    }
                }
                _ = shutdown.changed() => connection.as_mut().graceful_shutdown(),
            }
        });
    }
}
