//! Serving the router over TCP with the limits a public-facing API needs: a timeout for
//! reading request headers that also closes connections that never send a byte and idle
//! keep-alive connections (slowloris), a cap on open connections, WebSocket upgrades, an
//! accept loop that backs off when descriptors run out, and a graceful shutdown that gives
//! in-flight requests a few seconds.
//!
//! HTTP/1.1 only: no client of the API needs HTTP/2, and its streams would multiply what one
//! connection can hold (the red team held 1 GB of blocking queries over two connections).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1::Builder;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Open HTTP connections at most; more are closed at once.
pub const MAX_CONNECTIONS: usize = 8192;

pub async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true);
    let mut backoff = crate::net::AcceptBackoff::new("http");
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            },
        };
        backoff.ok();
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = MAX_CONNECTIONS, "too many http connections, closing a new one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = app
            .clone()
            .map_request(move |req: hyper::Request<Incoming>| {
                let mut req = req.map(Body::new);
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                req
            });
        let conn = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
            .with_upgrades();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.cancelled() => {
                    // Finish the requests in flight, then close.
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(Duration::from_secs(3), conn).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "http connection ended with an error");
            }
            drop(permit);
        });
    }
    let all = u32::try_from(MAX_CONNECTIONS).unwrap_or(u32::MAX);
    if tokio::time::timeout(Duration::from_secs(4), permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::debug!("some http connections were still open after 4 s");
    }
}
