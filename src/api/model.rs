//! Wire types of the HTTP API, converted by hand from and to the registry's own types.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::registry::NodeInfo;

/// Body of `PUT /v1/roles/{role}/nodes/{node}`. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    pub addr: Option<String>,
    pub port: Option<u32>,
    pub service: Option<String>,
    pub ttl: Option<u64>,
    pub weight: Option<u32>,
    pub meta: Option<BTreeMap<String, serde_json::Value>>,
}

/// A node as the API shows it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct NodeOut {
    pub role: String,
    pub node: String,
    pub addr: String,
    pub port: Option<u16>,
    pub service: String,
    pub ttl: u32,
    pub weight: u16,
    pub meta: BTreeMap<String, String>,
    /// Seconds left on the lease.
    pub expires_in: f64,
    /// Seconds since the node registered.
    pub age: f64,
    /// True while the node's agent holds a session.
    pub session: bool,
}

impl From<&NodeInfo> for NodeOut {
    fn from(n: &NodeInfo) -> NodeOut {
        NodeOut {
            role: n.key.role.to_string(),
            node: n.key.node.to_string(),
            addr: n.spec.addr.to_string(),
            port: n.spec.port,
            service: n.spec.service.to_string(),
            ttl: n.spec.ttl,
            weight: n.spec.weight,
            meta: n.spec.meta.clone(),
            expires_in: (n.expires_in.as_millis() as f64) / 1000.0,
            age: (n.age.as_millis() as f64) / 1000.0,
            session: n.session,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RolesOut {
    pub index: u64,
    pub roles: BTreeMap<String, usize>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RoleOut {
    pub index: u64,
    pub nodes: Vec<NodeOut>,
}
