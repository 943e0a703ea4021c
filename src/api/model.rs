//! Wire types of the HTTP API, converted by hand from and to the registry's own types.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::registry::NodeInfo;

/// Body of `PUT /v1/roles/{role}/nodes/{node}`. Every field is optional; unknown fields are
/// an error.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    /// IPv4 or IPv6 address to serve. Default: the address the request comes from.
    #[schema(example = "10.0.0.7")]
    pub addr: Option<String>,
    /// Port for SRV records (1-65535). Without it the node gets A/AAAA records only.
    #[schema(example = 8080, minimum = 1, maximum = 65535)]
    pub port: Option<u32>,
    /// Service name for `_<service>._tcp.<role>.<zone>` SRV (a DNS label, at most 15). Default `http`.
    #[schema(
        example = "http",
        pattern = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,13}[A-Za-z0-9])?$"
    )]
    pub service: Option<String>,
    /// Lease in seconds, 1 to 86400. Default 5.
    #[schema(example = 10, minimum = 1, maximum = 86400)]
    pub ttl: Option<u64>,
    /// SRV weight, 0 to 65535. Default 1.
    #[schema(minimum = 0, maximum = 65535)]
    pub weight: Option<u32>,
    /// Free-form string values shown by the API.
    #[schema(value_type = Option<BTreeMap<String, String>>)]
    pub meta: Option<BTreeMap<String, serde_json::Value>>,
}

/// Every error: what is wrong, in words.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /healthz`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub index: u64,
    pub roles: usize,
}

/// A node as the API shows it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, ToSchema)]
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

/// `GET /v1/roles`: the generation index and the node count of every non-empty role.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RolesOut {
    pub index: u64,
    pub roles: BTreeMap<String, usize>,
}

/// `GET /v1/roles/{role}`: the role's index and its live nodes.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RoleOut {
    pub index: u64,
    pub nodes: Vec<NodeOut>,
}

/// One target group of `GET /v1/sd/prometheus` (Prometheus's `http_sd_config` format): one
/// node, as `host:port` (just the host when the node has no port), with its labels.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SdTargetGroup {
    #[schema(example = json!(["10.0.0.7:8080"]))]
    pub targets: Vec<String>,
    /// `__meta_rollcall_role`, `__meta_rollcall_node`, `__meta_rollcall_service`,
    /// `__meta_rollcall_weight`, `__meta_rollcall_session`, and `__meta_rollcall_meta_<key>`
    /// for each meta key (characters outside `[A-Za-z0-9_]` become `_`).
    #[schema(value_type = BTreeMap<String, String>)]
    pub labels: BTreeMap<String, String>,
}

impl SdTargetGroup {
    pub fn from_node(n: &NodeInfo) -> SdTargetGroup {
        let host = match n.spec.addr {
            std::net::IpAddr::V6(a) => format!("[{a}]"),
            a => a.to_string(),
        };
        let target = match n.spec.port {
            Some(p) => format!("{host}:{p}"),
            None => host,
        };
        let mut labels = BTreeMap::new();
        labels.insert("__meta_rollcall_role".into(), n.key.role.to_string());
        labels.insert("__meta_rollcall_node".into(), n.key.node.to_string());
        labels.insert("__meta_rollcall_service".into(), n.spec.service.to_string());
        labels.insert("__meta_rollcall_weight".into(), n.spec.weight.to_string());
        labels.insert("__meta_rollcall_session".into(), n.session.to_string());
        for (k, v) in &n.spec.meta {
            let key: String = k
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            labels.insert(format!("__meta_rollcall_meta_{key}"), v.clone());
        }
        SdTargetGroup {
            targets: vec![target],
            labels,
        }
    }
}
