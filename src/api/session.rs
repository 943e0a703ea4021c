//! `GET /v1/roles/{role}/nodes/{node}/session`: a WebSocket that holds a node's lease.
//!
//! Every frame the agent sends (it pings every ttl/3) renews the lease. When the connection
//! closes — the agent exited or was killed and the kernel closed its socket — the node is
//! removed at once. When it goes silent, the lease simply runs out. When the *server* stops,
//! the session ends without removing anyone: the registration survives in the data dir.

//!
//! A node has at most one live session: opening a new one ends the old one (its connection is
//! closed without removing the node). Browsers cannot open one from another site: an `Origin`
//! header must name the same host as `Host`. Each session keeps small buffers (agents send
//! empty pings), so the `MAX_SESSIONS` cap bounds their memory.

use std::net::SocketAddr;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::ErrorBody;
use super::{check_peer, parse_key, peer_ip, AppState};
use crate::registry::NodeKey;

/// Largest WebSocket message or frame accepted (agents send empty pings).
const MAX_MESSAGE: usize = 4096;

/// The node's session: a WebSocket whose pings renew the lease; when it closes, the node is
/// deregistered at once (unless another session replaced it).
#[utoipa::path(get, path = "/v1/roles/{role}/nodes/{node}/session", tag = "nodes",
    summary = "Hold a node's lease over a WebSocket",
    security((), ("bearer" = [])),
    params(("role" = String, Path, description = "Role: a DNS label", pattern = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"), ("node" = String, Path, description = "Node: a DNS label (PUT it first)", pattern = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol: ping at least every ttl/3; closing deregisters the node"),
        (status = 400, description = "Bad label, or not a WebSocket upgrade", body = ErrorBody),
        (status = 401, description = "Token required (--token)", body = ErrorBody),
        (status = 403, description = "Outside --allow-register, a browser Origin, a role the token may not write (--token-file), or no client certificate (--tls-client-ca)", body = ErrorBody),
        (status = 404, description = "The node is not registered: PUT it first", body = ErrorBody),
        (status = 405, description = "Not a GET", body = ErrorBody),
        (status = 426, description = "The connection cannot be upgraded", body = ErrorBody),
        (status = 503, description = "Too many sessions, or shutting down", body = ErrorBody),
    ))]
pub async fn session(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    scope: Option<Extension<super::tokens::Scope>>,
    Path((role, node)): Path<(String, String)>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let key = parse_key(&role, &node)?;
    super::check_scope(scope.as_deref(), &key.role)?;
    check_peer(&state.access, peer_ip(peer))?;
    check_origin(&headers)?;
    let ws = ws.map_err(|r| ApiError::new(r.status(), format!("not a WebSocket upgrade: {r}")))?;
    let permit = super::permit(&state.sessions, "sessions", super::MAX_SESSIONS)?;
    let Some((id, ttl)) = state.registry.session_open(key.clone()).await? else {
        return Err(ApiError::not_found(format!(
            "node {node} is not registered under role {role}: PUT it first, then open its session"
        )));
    };
    let ended = CancellationToken::new();
    if let Some((_, old)) = state
        .live_sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key.clone(), (id, ended.clone()))
    {
        old.cancel();
    }
    tracing::debug!(%role, %node, %peer, "session opened");
    Ok(ws
        .read_buffer_size(MAX_MESSAGE)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024)
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            hold(socket, &state, key.clone(), id, ttl, &ended).await;
            let mut live = state
                .live_sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if live.get(&key).is_some_and(|(held, _)| *held == id) {
                live.remove(&key);
            }
            drop(live);
            drop(permit);
        })
        .into_response())
}

/// A browser's cross-site request carries the page's `Origin`: it must name our own host.
fn check_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(axum::http::header::ORIGIN) else {
        return Ok(());
    };
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest.trim_end_matches('/'));
    if origin_host.is_some_and(|o| o.eq_ignore_ascii_case(host)) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "a session cannot be opened from the page at {:?}: its Origin is not this server",
            String::from_utf8_lossy(origin.as_bytes())
        ),
    ))
}

async fn hold(
    mut socket: WebSocket,
    state: &AppState,
    key: NodeKey,
    id: u64,
    ttl: u32,
    ended: &CancellationToken,
) {
    // A session silent for longer than the lease is dead (host or network gone): the lease
    // runs out on its own; end the session too, so it does not hold a connection and a
    // session slot forever.
    let silence =
        std::time::Duration::from_secs(u64::from(ttl)) + std::time::Duration::from_secs(1);
    loop {
        let msg = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = ended.cancelled() => {
                // A newer session holds the node now: close this one, remove nobody.
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
            msg = tokio::time::timeout(silence, socket.recv()) => match msg {
                Ok(msg) => msg,
                Err(_) => {
                    tracing::debug!(role = %key.role, node = %key.node, "session silent for longer than its lease, closing");
                    return;
                }
            },
        };
        match msg {
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => {
                // Any frame (ping, pong, text) is a heartbeat. A node deregistered meanwhile
                // ends the session: the agent re-registers and opens a new one.
                if !matches!(state.registry.renew(key.clone()).await, Ok(true)) {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            }
        }
    }
    if !state.shutdown.is_cancelled() {
        state.registry.session_close(key, id);
    }
}
