//! Role bodies written as the client reads them.
//!
//! A role's JSON is serialized from the published snapshot (shared with every other reader, not
//! copied) a chunk at a time: a request pins one chunk of memory, whatever the role's size, and
//! a client that stops reading stops costing CPU.

use std::sync::Arc;

use axum::body::{Body, Bytes};

use super::model::NodeOut;
use crate::registry::{Label, PublishedNode, RoleSnapshot, View};

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
        let len = snap.as_ref().map_or(0, |s| s.nodes.len());
        let now = tokio::time::Instant::now();
        if let Some(s) = &snap {
            for n in s.nodes.iter_from(at) {
                if buf.len() >= CHUNK {
                    break;
                }
                if at > 0 {
                    buf.push(b',');
                }
                write_node(&mut buf, &view, &role, n, now);
                at += 1;
            }
        }
        let next = if at >= len {
            buf.extend_from_slice(b"]}");
            None
        } else {
            Some((view, role, snap, at))
        };
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(buf)), next))
    });
    Body::from_stream(stream)
}

/// One node's JSON, exactly as `NodeOut` serializes: the unchanging fields come from the
/// node's cache (encoded once, by the first reader), the lease fields are written now.
fn write_node(
    buf: &mut Vec<u8>,
    view: &View,
    role: &Label,
    n: &PublishedNode,
    now: tokio::time::Instant,
) {
    let head = n.encoded.get_or_init(|| {
        let mut out = NodeOut::from(&view.node_info(role, n, now));
        out.expires_in = 0.0;
        out.age = 0.0;
        let json = serde_json::to_vec(&out).expect("a NodeOut always serializes");
        // Everything up to the lease fields, which NodeOut puts last.
        let cut = find(&json, b",\"expires_in\":").expect("NodeOut ends with the lease fields");
        json[..cut].into()
    });
    let (expires_in, age, session) = view.lease_now(n, now);
    buf.extend_from_slice(head);
    buf.extend_from_slice(b",\"expires_in\":");
    let secs = |d: std::time::Duration| (d.as_millis() as f64) / 1000.0;
    serde_json::to_writer(&mut *buf, &secs(expires_in)).expect("a number serializes");
    buf.extend_from_slice(b",\"age\":");
    serde_json::to_writer(&mut *buf, &secs(age)).expect("a number serializes");
    buf.extend_from_slice(if session {
        b",\"session\":true}"
    } else {
        b",\"session\":false}"
    });
}

/// The last place `needle` starts in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Loaded, MemoryJournal};
    use crate::registry::{Limits, NodeKey, NodeSpec, Publish, Registry, RoleView};
    use http_body_util::BodyExt;

    struct NoDns;
    impl Publish for NoDns {
        fn publish(&mut self, _: u64, _: &[RoleView<'_>]) {}
    }

    #[tokio::test(start_paused = true)]
    async fn streamed_body_equals_the_serialized_role() {
        let (reg, _) = Registry::start(
            Box::new(MemoryJournal),
            Loaded::default(),
            Box::new(NoDns),
            Limits::default(),
            tokio_util::sync::CancellationToken::new(),
        );
        let role = Label::parse("app").unwrap();
        for i in 0..2000 {
            let mut meta = std::collections::BTreeMap::new();
            meta.insert("v".to_string(), format!("\"quoted\" \u{e9} {i}"));
            let spec = NodeSpec {
                addr: format!("10.0.{}.{}", i / 250, i % 250 + 1).parse().unwrap(),
                port: (i % 3 != 0).then_some(8000 + i as u16),
                service: Label::parse("http").unwrap(),
                ttl: 30 + i,
                weight: 1,
                meta,
            };
            let key = NodeKey {
                role: role.clone(),
                node: Label::parse(&format!("n{i}")).unwrap(),
            };
            reg.put(key, spec).await.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let view = reg.view().unwrap();
        let snap = view.roles.get(&role).cloned();
        for _ in 0..2 {
            // Twice: the second time from the nodes' caches.
            let body = role_body(view.clone(), role.clone(), snap.clone());
            let bytes = body.collect().await.unwrap().to_bytes();
            let streamed: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            let info = view.role_info(&role);
            let whole = serde_json::json!({
                "index": info.index,
                "nodes": info.nodes.iter().map(NodeOut::from).collect::<Vec<_>>(),
            });
            assert_eq!(streamed, whole);
        }
    }
}
