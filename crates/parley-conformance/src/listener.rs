//! The kit's own federation listener, so the peer can call it: mutual TLS (the peer's client
//! certificate must chain to the CA and name the peer's domain, and `From` must be
//! `mimi@<peer>`), a directory, and the MIMI endpoints a small provider answers: `notify` and
//! the consent endpoints are accepted (`201`) and recorded, `keyMaterial` hands out the kit's
//! offered KeyPackages, `submitMessage` accepts messages for rooms the kit hubs. Everything the
//! peer sends is queued as an [`Inbound`] for the checks to wait on, with a deadline.

use crate::config::KitConfig;
use crate::error::KitError;
use axum::body::Bytes;
use axum::extract::{Path as Param, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use parley_proto::mimi::{
    self, Body, ClientKeyMaterial, ConsentEntry, GroupInfoResponse, GroupInfoResult,
    HandshakeBundle, IdentifierRequest, IdentifierResponse, IdentifierUri, KeyMaterialRequest,
    KeyMaterialResponse, NotifyRequest, QueryCode, SubmitMessageRequest, SubmitMessageResponse,
    SubmitStatus, UpdateRoomResponse, UserCode,
};
use parley_proto::{Domain, RoomId};
use rustls::pki_types::{CertificateDer, ServerName};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A call the peer made to the kit.
#[derive(Debug, Clone)]
pub enum Inbound {
    Notify {
        room: String,
        request: NotifyRequest,
    },
    RequestConsent(ConsentEntry),
    UpdateConsent(ConsentEntry),
    SubmitMessage {
        room: String,
        request: SubmitMessageRequest,
    },
    Update {
        room: String,
        bundle: HandshakeBundle,
    },
    KeyMaterial {
        target: String,
        request: KeyMaterialRequest,
        /// How many KeyPackages the kit handed out.
        handed: usize,
    },
    GroupInfo {
        room: String,
    },
    Other {
        path: String,
    },
}

/// What the kit hosts, for answering the peer.
#[derive(Default)]
pub struct Hosted {
    /// KeyPackages to hand out by user URI: per client URI, a stack of bare KeyPackages.
    pub offers: HashMap<String, Vec<(String, mimi::KeyPackage)>>,
    /// Room URIs the kit hubs (submitMessage is accepted there).
    pub rooms: HashSet<String>,
    /// User URIs the kit hosts.
    pub users: HashSet<String>,
}

#[derive(Clone)]
struct Shared {
    peer: Domain,
    events: mpsc::UnboundedSender<Inbound>,
    hosted: Arc<Mutex<Hosted>>,
}

/// The TLS client certificate of a connection.
#[derive(Clone)]
struct PeerCert(Option<Arc<CertificateDer<'static>>>);

/// The running listener.
pub struct Listener {
    pub addr: SocketAddr,
    pub hosted: Arc<Mutex<Hosted>>,
    events: mpsc::UnboundedReceiver<Inbound>,
    buffered: VecDeque<Inbound>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

fn tls_error(e: impl std::fmt::Display) -> KitError {
    KitError::Tls(e.to_string())
}

fn load_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, KitError> {
    let pem = std::fs::read(path).map_err(|e| KitError::Read(path.display().to_string(), e))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| KitError::Read(path.display().to_string(), e))?;
    if certs.is_empty() {
        return Err(KitError::Tls(format!(
            "no certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

fn acceptor(config: &KitConfig) -> Result<TlsAcceptor, KitError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key_pem = std::fs::read(&config.key)
        .map_err(|e| KitError::Read(config.key.display().to_string(), e))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| KitError::Read(config.key.display().to_string(), e))?
        .ok_or_else(|| KitError::Tls(format!("no private key in {}", config.key.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in load_certs(&config.ca)? {
        roots.add(ca).map_err(tls_error)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(tls_error)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&config.cert)?, key)
        .map_err(tls_error)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(tls)))
}

impl Listener {
    pub async fn start(config: &KitConfig) -> Result<Self, KitError> {
        let tls = acceptor(config)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| KitError::Listen(config.listen, e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| KitError::Listen(config.listen, e))?;
        let (tx, events) = mpsc::unbounded_channel();
        let hosted = Arc::new(Mutex::new(Hosted::default()));
        let shared = Shared {
            peer: config.peer.clone(),
            events: tx,
            hosted: hosted.clone(),
        };
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(listener, tls, router(shared), stopped));
        tracing::info!(%addr, "kit federation listener up");
        Ok(Self {
            addr,
            hosted,
            events,
            buffered: VecDeque::new(),
            stop,
            task,
        })
    }

    /// Waits up to `timeout` for a call `pick` accepts (calls received before are looked at
    /// first); the calls it passes over stay queued.
    pub async fn wait_for<T>(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(&Inbound) -> Option<T>,
    ) -> Option<T> {
        if let Some(i) = self.buffered.iter().position(|e| pick(e).is_some()) {
            return self.buffered.remove(i).and_then(|e| pick(&e));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.events.recv()).await {
                Ok(Some(event)) => match pick(&event) {
                    Some(found) => return Some(found),
                    None => self.buffered.push_back(event),
                },
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Every call received so far and not yet picked.
    pub fn drain(&mut self) -> Vec<Inbound> {
        while let Ok(event) = self.events.try_recv() {
            self.buffered.push_back(event);
        }
        self.buffered.drain(..).collect()
    }

    /// Lets `hosted` be changed.
    pub fn hosted(&self) -> std::sync::MutexGuard<'_, Hosted> {
        self.hosted.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    router: Router,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let tcp = tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let (tls, router, mut stop) = (tls.clone(), router.clone(), stopped.clone());
        tokio::spawn(async move {
            let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await
            else {
                tracing::debug!("TLS handshake with the kit failed or timed out");
                return;
            };
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Arc::new(c.clone().into_owned()));
            let service = TowerToHyperService::new(router.layer(Extension(PeerCert(cert))));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    tracing::debug!(error = %e, "kit connection ended with an error");
                },
                _ = stop.changed() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}

fn router(shared: Shared) -> Router {
    Router::new()
        .route("/.well-known/mimi-protocol-directory", get(directory))
        .route("/v1/{endpoint}/{*param}", post(endpoint))
        .fallback(|| async { refuse(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            authenticate,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(mimi::MAX_BODY))
        .with_state(shared)
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({"error": code, "message": message, "retryable": false})),
    )
        .into_response()
}

/// Whether a certificate is valid for `domain`.
fn names(cert: &CertificateDer<'_>, domain: &str) -> bool {
    let Ok(name) = ServerName::try_from(domain) else {
        return false;
    };
    rustls::server::ParsedCertificate::try_from(cert)
        .and_then(|parsed| rustls::client::verify_server_name(&parsed, &name))
        .is_ok()
}

/// Only the peer under test may call: its certificate names it and `From` says it.
async fn authenticate(
    State(shared): State<Shared>,
    Extension(PeerCert(cert)): Extension<PeerCert>,
    request: Request,
    next: Next,
) -> Response {
    let from_ok = request
        .headers()
        .get(header::FROM)
        .and_then(|v| v.to_str().ok())
        .and_then(|f| f.strip_prefix("mimi@"))
        == Some(shared.peer.as_str());
    let cert_ok = cert
        .as_deref()
        .is_some_and(|c| names(c, shared.peer.as_str()));
    if from_ok && cert_ok {
        next.run(request).await
    } else {
        refuse(
            StatusCode::FORBIDDEN,
            "peer_domain_mismatch",
            "only the provider under test, with a certificate for its domain, may call the kit",
        )
    }
}

async fn directory(headers: HeaderMap) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let map: serde_json::Map<String, serde_json::Value> = crate::transport::ENDPOINTS
        .iter()
        .map(|name| {
            let param = match *name {
                "keyMaterial" => "targetUser",
                "requestConsent" => "targetDomain",
                "updateConsent" => "requesterDomain",
                "identifierQuery" => "domain",
                "proxyDownload" => "downloadUrl",
                _ => "roomId",
            };
            (
                (*name).to_owned(),
                format!("https://{host}/v1/{name}/{{{param}}}").into(),
            )
        })
        .collect();
    Json(serde_json::Value::Object(map)).into_response()
}

fn mimi_body(body: impl Body) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, mimi::CONTENT_TYPE)],
        body.encode(),
    )
        .into_response()
}

fn bad_body(e: impl std::fmt::Display) -> Response {
    refuse(StatusCode::BAD_REQUEST, "invalid_body", &e.to_string())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn full_uri(param: &str) -> String {
    if param.starts_with("mimi://") {
        param.to_owned()
    } else {
        format!("mimi://{param}")
    }
}

async fn endpoint(
    State(shared): State<Shared>,
    Param((endpoint, param)): Param<(String, String)>,
    body: Bytes,
) -> Response {
    let (response, event) = answer(&shared, &endpoint, &param, &body);
    if let Some(event) = event {
        tracing::debug!(?event, "peer called the kit");
        let _ = shared.events.send(event);
    }
    response
}

/// The answer to one call and what it tells the checks.
fn answer(
    shared: &Shared,
    endpoint: &str,
    param: &str,
    body: &[u8],
) -> (Response, Option<Inbound>) {
    let room = full_uri(param);
    match endpoint {
        "notify" => match NotifyRequest::decode(body) {
            Ok(request) => {
                let hub_ok = RoomId::parse(&room).is_ok_and(|r| r.hub() == &shared.peer);
                if !hub_ok {
                    return (
                        refuse(
                            StatusCode::FORBIDDEN,
                            "not_hub",
                            "you are not this room's hub",
                        ),
                        None,
                    );
                }
                (
                    StatusCode::CREATED.into_response(),
                    Some(Inbound::Notify { room, request }),
                )
            }
            Err(e) => (bad_body(e), None),
        },
        "requestConsent" | "updateConsent" => match ConsentEntry::decode(body) {
            Ok(entry) => {
                let event = if endpoint == "requestConsent" {
                    Inbound::RequestConsent(entry)
                } else {
                    Inbound::UpdateConsent(entry)
                };
                (StatusCode::CREATED.into_response(), Some(event))
            }
            Err(e) => (bad_body(e), None),
        },
        "keyMaterial" => match KeyMaterialRequest::decode(body) {
            Ok(request) => {
                let (response, handed) = key_material(shared, &full_uri(param), &request);
                (
                    mimi_body(response),
                    Some(Inbound::KeyMaterial {
                        target: full_uri(param),
                        request,
                        handed,
                    }),
                )
            }
            Err(e) => (bad_body(e), None),
        },
        "submitMessage" => match SubmitMessageRequest::decode(body) {
            Ok(request) => {
                let hosted = shared.hosted.lock().map(|h| h.rooms.contains(&room));
                if !hosted.unwrap_or(false) {
                    return (
                        refuse(StatusCode::NOT_FOUND, "unknown_room", "no such room here"),
                        None,
                    );
                }
                let status = SubmitStatus::Accepted {
                    accepted_timestamp: now_ms(),
                    frank: None,
                };
                (
                    mimi_body(SubmitMessageResponse::new(status)),
                    Some(Inbound::SubmitMessage { room, request }),
                )
            }
            Err(e) => (bad_body(e), None),
        },
        "update" => match HandshakeBundle::decode(body) {
            Ok(bundle) => (
                mimi_body(UpdateRoomResponse::NotAllowed {
                    error_description: mimi::opaque(
                        "policy: the conformance kit's rooms take no commits from peers",
                    ),
                }),
                Some(Inbound::Update { room, bundle }),
            ),
            Err(e) => (bad_body(e), None),
        },
        "groupInfo" => (
            mimi_body(GroupInfoResponse::refused(
                room.as_bytes(),
                GroupInfoResult::NoSuchRoom,
            )),
            Some(Inbound::GroupInfo { room }),
        ),
        "identifierQuery" => match IdentifierRequest::decode(body) {
            Ok(request) => (mimi_body(identify(shared, &request)), None),
            Err(e) => (bad_body(e), None),
        },
        "reportAbuse" => (StatusCode::CREATED.into_response(), None),
        other => (
            refuse(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
            Some(Inbound::Other {
                path: format!("{other}/{param}"),
            }),
        ),
    }
}

/// One offered KeyPackage per client of `target`, for a requester of the peer's domain.
fn key_material(
    shared: &Shared,
    target: &str,
    request: &KeyMaterialRequest,
) -> (KeyMaterialResponse, usize) {
    let signed_ok = request.tbs().sign_content().is_ok_and(|c| {
        crate::mls::verify(
            request.requester_signature_key.as_slice(),
            &c,
            request.signature.as_slice(),
        )
    });
    let requester_ok = request
        .requesting_user
        .as_str()
        .ok()
        .and_then(|u| parley_proto::UserId::parse(u).ok())
        .is_some_and(|u| u.domain() == &shared.peer);
    let body_target = request.target_user.as_str().unwrap_or_default();
    if !signed_ok || !requester_ok || body_target != target {
        return (KeyMaterialResponse::refused(UserCode::NoConsent, target), 0);
    }
    let Ok(mut hosted) = shared.hosted.lock() else {
        return (
            KeyMaterialResponse::refused(UserCode::UserUnknown, target),
            0,
        );
    };
    if !hosted.users.contains(target) {
        return (
            KeyMaterialResponse::refused(UserCode::UserUnknown, target),
            0,
        );
    }
    let offers = hosted.offers.entry(target.to_owned()).or_default();
    let mut seen = HashSet::new();
    let mut clients = Vec::new();
    let mut rest = Vec::new();
    for (client, kp) in offers.drain(..) {
        if seen.insert(client.clone()) {
            clients.push(ClientKeyMaterial::Success {
                client_uri: IdentifierUri::new(&client),
                key_package: kp,
            });
        } else {
            rest.push((client, kp));
        }
    }
    *offers = rest;
    if clients.is_empty() {
        return (
            KeyMaterialResponse::refused(UserCode::NoCompatibleMaterial, target),
            0,
        );
    }
    let handed = clients.len();
    (
        KeyMaterialResponse {
            protocol: mimi::MLS10,
            user_status: UserCode::Success as u8,
            user_uri: IdentifierUri::new(target),
            clients,
        },
        handed,
    )
}

fn identify(shared: &Shared, request: &IdentifierRequest) -> IdentifierResponse {
    let [element] = request.query_elements.as_slice() else {
        return IdentifierResponse::new(QueryCode::UnsupportedField, Vec::new());
    };
    if element.search_type != mimi::SEARCH_HANDLE {
        return IdentifierResponse::new(QueryCode::UnsupportedField, Vec::new());
    }
    let value = mimi::text(&element.search_value);
    let handle = value.strip_prefix("im:").unwrap_or(&value);
    let found = parley_proto::UserId::parse(handle)
        .ok()
        .map(|u| u.to_uri())
        .filter(|u| shared.hosted.lock().is_ok_and(|h| h.users.contains(u)));
    match found {
        Some(uri) => IdentifierResponse::new(QueryCode::Success, vec![IdentifierUri::new(&uri)]),
        None => IdentifierResponse::new(QueryCode::NotFound, Vec::new()),
    }
}
