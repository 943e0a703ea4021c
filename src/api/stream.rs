//! Role bodies written as the client reads them.
//!
//! A role's JSON is serialized from the published snapshot (shared with every other reader, not
//! copied) a chunk at a time: a request pins one chunk of memory, whatever the role's size, and
//! a client that stops reading stops costing CPU.

use std::sync::Arc;

use axum::body::{Body, Bytes};

use super::model::NodeOut;
use crate::registry::{Label, RoleSnapshot, View};

/// Serialized bytes per chunk (a chunk may exceed it by one node).
const CHUNK: usize = 32 * 1024;

/// `{"index":…,"nodes":[…]}` for `role` as of `view`.
pub fn role_body(view: Arc<View>, role: Label, snap: Option<Arc<RoleSnapshot>>) -> Body {
    let index = snap.as_ref().map_or(0, |s| s.index);
    let state = Some((view, role, snap, 0usize));
    let stream = futures_util::stream::unfold(state, move |state| async move {
        let (view, role, snap, mut at) = state?;
        let mut buf = Vec::with_capacity(CHUNK + 1024);
        if at == 0 {
            buf.extend_from_slice(format!("{{\"index\":{index},\"nodes\":[").as_bytes());
        }
        let nodes = snap.as_ref().map_or(&[][..], |s| &s.nodes[..]);
        let now = tokio::time::Instant::now();
        while at < nodes.len() && buf.len() < CHUNK {
            if at > 0 {
                buf.push(b',');
            }
            let out = NodeOut::from(&view.node_info(&role, &nodes[at], now));
            serde_json::to_writer(&mut buf, &out).expect("a NodeOut always serializes");
            at += 1;
        }
        let next = if at >= nodes.len() {
            buf.extend_from_slice(b"]}");
            None
        } else {
            Some((view, role, snap, at))
        };
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(buf)), next))
    });
    Body::from_stream(stream)
}
