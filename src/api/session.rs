//! `GET /v1/roles/{role}/nodes/{node}/session`: a WebSocket that holds a node's lease.
//!
//! Every frame the agent sends (it pings every ttl/3) renews the lease. When the connection
//! closes — the agent exited or was killed and the kernel closed its socket — the node is
//! removed at once. When it goes silent, the lease simply runs out. When the *server* stops,
//! the session ends without removing anyone: the registration survives in the data dir.

use std::net::SocketAddr;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, State};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{parse_key, AppState};
use crate::registry::NodeKey;

pub async fn session(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((role, node)): Path<(String, String)>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let key = parse_key(&role, &node)?;
    let permit = super::permit(&state.sessions, "sessions", super::MAX_SESSIONS)?;
    let Some((id, ttl)) = state.registry.session_open(key.clone()).await? else {
        return Err(ApiError::not_found(format!(
            "node {node} is not registered under role {role}: PUT it first, then open its session"
        )));
    };
    tracing::debug!(%role, %node, %peer, "session opened");
    Ok(ws
        .on_upgrade(move |socket| async move {
            hold(socket, state, key, id, ttl).await;
            drop(permit);
        })
        .into_response())
}

async fn hold(mut socket: WebSocket, state: AppState, key: NodeKey, id: u64, ttl: u32) {
    // A session silent for longer than the lease is dead (host or network gone): the lease
    // runs out on its own; end the session too, so it does not hold a connection and a
    // session slot forever.
    let silence =
        std::time::Duration::from_secs(u64::from(ttl)) + std::time::Duration::from_secs(1);
    loop {
        let msg = tokio::select! {
            _ = state.shutdown.cancelled() => return,
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
