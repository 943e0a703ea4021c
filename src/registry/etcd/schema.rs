//! What a node is in etcd: its key under the prefix and its value. The registry's own
//! schema (the etcd module below it knows bytes, revisions and leases only).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::etcd::EtcdConfig;
use crate::registry::{Label, NodeKey, NodeSpec};

/// `<prefix>/v1/nodes/<role>/<node>`.
pub fn node_key(cfg: &EtcdConfig, key: &NodeKey) -> Vec<u8> {
    format!("{}/v1/nodes/{}/{}", cfg.prefix, key.role, key.node).into_bytes()
}

/// The node a key names, if it is a well-formed node key under our prefix, in the one form
/// rollcall writes (lower case): `App/UP` is not `app/up` (two keys would be one node).
pub fn parse_key(cfg: &EtcdConfig, key: &[u8]) -> Option<NodeKey> {
    let rest = key.strip_prefix(cfg.nodes_prefix().as_slice())?;
    let rest = std::str::from_utf8(rest).ok()?;
    let (role, node) = rest.split_once('/')?;
    let canonical = |s: &str| Label::parse(s).ok().filter(|l| l.as_str() == s);
    Some(NodeKey {
        role: canonical(role)?,
        node: canonical(node)?,
    })
}

/// The largest value a registration through the API can make (its body limit, and room for
/// the fields the server adds).
pub const VALUE_MAX: usize = crate::registry::BODY_MAX + 1024;

/// A node as stored in etcd.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NodeValue {
    pub addr: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub service: String,
    pub ttl: u32,
    pub weight: u16,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
    pub registered_unix_ms: u64,
    /// Informational: `put` or `session`.
    #[serde(default)]
    pub holder: String,
}

impl NodeValue {
    pub fn new(spec: &NodeSpec, registered_unix_ms: u64, holder: &str) -> NodeValue {
        NodeValue {
            addr: spec.addr,
            port: spec.port,
            service: spec.service.to_string(),
            ttl: spec.ttl,
            weight: spec.weight,
            meta: spec.meta.clone(),
            registered_unix_ms,
            holder: holder.to_owned(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a node value always serializes")
    }

    /// The spec, the registration time and whether a session holds the node. Only the form
    /// rollcall writes is read (the API's rules are checked by the owner on top).
    pub fn decode(bytes: &[u8]) -> Result<(NodeSpec, u64, bool), String> {
        if bytes.len() > VALUE_MAX {
            return Err(format!(
                "{} bytes: larger than any registration the API takes",
                bytes.len()
            ));
        }
        let v: NodeValue = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let service = crate::registry::parse_service(&v.service)
            .ok()
            .filter(|l| l.as_str() == v.service)
            .ok_or_else(|| format!("service {:?} is not a lower-case service name", v.service))?;
        Ok((
            NodeSpec {
                addr: v.addr,
                port: v.port,
                service,
                ttl: v.ttl,
                weight: v.weight,
                meta: v.meta,
            },
            v.registered_unix_ms,
            v.holder == "session",
        ))
    }
}
