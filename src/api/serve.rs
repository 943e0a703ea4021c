//! Serving the router over TCP, or TLS over TCP, with the limits a public-facing API needs: a
//! timeout for reading request headers that also closes connections that never send a byte
//! and idle keep-alive connections (slowloris), a deadline for the TLS handshake, a cap on open
//! connections (counted from accept, handshakes included), WebSocket upgrades, an accept loop
//! that backs off when descriptors run out, and a graceful shutdown that gives in-flight
//! requests a few seconds.
//!
//! With TLS, each new connection takes the server config current at its accept, so a SIGHUP
//! that swaps the certificate changes new handshakes only and drops no connection. A client
//! that speaks plain HTTP to the TLS port (its first byte is a letter, not a TLS record) gets a
//! plain-HTTP 400 that says to use https://, instead of a hang or a reset.
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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::metrics::ApiMetrics;

/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has, from accept, to complete the TLS handshake (its first byte included).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Open HTTP connections at most; more are closed at once.
pub const MAX_CONNECTIONS: usize = 8192;

/// The server's TLS config; SIGHUP stores a new one (`server.rs`).
pub type TlsConfig = Arc<arc_swap::ArcSwap<rustls::ServerConfig>>;

/// How the request's connection came in: inserted into every request's extensions, next to
/// `ConnectInfo`, for the API's checks (`--tls-client-ca` guards writes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transport {
    /// Over TLS.
    pub tls: bool,
    /// The client showed a certificate that the server's client CA verified.
    pub client_cert: bool,
}

pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: CancellationToken,
    tls: Option<TlsConfig>,
    metrics: Arc<ApiMetrics>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true);
    let mut backoff = crate::net::AcceptBackoff::new(if tls.is_some() { "https" } else { "http" });
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
        let (app, builder, shutdown) = (app.clone(), builder.clone(), shutdown.clone());
        // The config current now: a reload later changes the next handshakes, not this one.
        let tls = tls.as_ref().map(|t| t.load_full());
        let metrics = metrics.clone();
        tokio::spawn(async move {
            match tls {
                None => {
                    let transport = Transport::default();
                    connection(stream, peer, transport, app, builder, shutdown).await;
                }
                Some(config) => {
                    let accepted = tokio::select! {
                        _ = shutdown.cancelled() => None,
                        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(stream, peer, config)) => {
                            let outcome = match &r {
                                Ok(Handshake::Done(..)) => "ok",
                                Ok(Handshake::Failed) => "failed",
                                Ok(Handshake::Plaintext) => "plaintext",
                                Ok(Handshake::Closed) => "",
                                Err(_) => "timeout",
                            };
                            metrics.tls_handshake(outcome);
                            match r {
                                Ok(Handshake::Done(s, client_cert)) => Some((s, client_cert)),
                                _ => None,
                            }
                        }
                    };
                    if let Some((stream, client_cert)) = accepted {
                        let transport = Transport {
                            tls: true,
                            client_cert,
                        };
                        connection(stream, peer, transport, app, builder, shutdown).await;
                    }
                }
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

/// Serves one connection's requests until it closes, or until shutdown (then the requests in
/// flight get 3 s).
async fn connection<S>(
    stream: S,
    peer: SocketAddr,
    transport: Transport,
    app: Router,
    builder: Builder,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = app.map_request(move |req: hyper::Request<Incoming>| {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
        req.extensions_mut().insert(transport);
        req
    });
    let conn = builder
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
        .with_upgrades();
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
}

enum Handshake {
    /// The TLS stream, and whether the client showed a verified certificate.
    Done(Box<tokio_rustls::server::TlsStream<TcpStream>>, bool),
    /// Refused by either side (logged at debug).
    Failed,
    /// A plain-HTTP request: answered 400.
    Plaintext,
    /// Closed before its first byte, or not TLS and not HTTP.
    Closed,
}

/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Tells TLS from plain HTTP by the first byte, then completes the TLS handshake.
async fn handshake(
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<rustls::ServerConfig>,
) -> Handshake {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) => {}
        _ => return Handshake::Closed,
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        if first[0].is_ascii_uppercase() {
            refuse_plaintext(stream, peer).await;
            return Handshake::Plaintext;
        }
        return Handshake::Closed;
    }
    match tokio_rustls::TlsAcceptor::from(config).accept(stream).await {
        Ok(s) => {
            let client_cert = s
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty());
            Handshake::Done(Box::new(s), client_cert)
        }
        Err(e) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            Handshake::Failed
        }
    }
}

/// Answers a plain-HTTP request on the TLS port with a 400 that says what to do. The request
/// head is read first (at most 8 KiB, 1 s): closing with unread bytes would send a reset that
/// can destroy the answer before the client reads it.
async fn refuse_plaintext(mut stream: TcpStream, peer: SocketAddr) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let host = String::from_utf8_lossy(&head)
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("host")
                .then(|| value.trim().to_owned())
        })
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
        })
        .unwrap_or_else(|| "HOST:PORT".into());
    tracing::debug!(%peer, "plain HTTP on the TLS port: answered 400");
    let body = serde_json::json!({
        "error": format!(
            "this port speaks HTTPS only (rollcall serve --tls-cert): use https://{host}, \
             and --ca-file with the CA that signed the server's certificate"
        )
    })
    .to_string();
    let resp = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(resp.as_bytes()).await?;
        stream.shutdown().await?;
        // Drain what else the client sends until it closes too.
        while stream.read(&mut buf).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}
