//! Accepting connections: optional TLS (an acceptor from `tls`), HTTP/1.1 with WebSocket
//! upgrades, a cap on concurrent connections, and graceful shutdown.

use crate::tls::PeerCertificate;
use axum::{Extension, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown` turns true, then drains open requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let (tcp, _peer) = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("connection limit reached; refusing a connection");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let stop = shutdown.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            // Handlers that authenticate peers (federation) read the client certificate.
                            let peer = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first());
                            let peer =
                                PeerCertificate(peer.map(|c| Arc::new(c.clone().into_owned())));
                            let service = TowerToHyperService::new(router.layer(Extension(peer)));
                            serve_connection(TokioIo::new(stream), service, stop).await
                        }
                        _ => tracing::debug!("TLS handshake failed or timed out"),
                    }
                }
                None => {
                    let service = TowerToHyperService::new(
                        router.layer(Extension(PeerCertificate::default())),
                    );
                    serve_connection(TokioIo::new(tcp), service, stop).await
                }
            }
        });
    }
    drop(listener);
    // Every open connection holds a slot: getting them all back means all have finished.
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN_TIMEOUT, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish within the drain timeout");
    }
}

/// Serves one HTTP/1.1 connection (with upgrades); on shutdown, finishes the request in flight.
async fn serve_connection<I>(
    io: I,
    service: TowerToHyperService<Router>,
    mut stop: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
