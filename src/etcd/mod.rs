//! etcd mode: several symmetric rollcall servers sharing one etcd cluster.
//!
//! - [`client`]: a small etcd v3 client over the JSON gateway, with member failover;
//! - [`mirror`]: list at one revision, then watch from the next, re-list on compaction, verify
//!   periodically; feeds the etcd owner (`registry::etcd`) in revision order;
//! - this module: settings, the key and value layout in etcd, and the link's state as
//!   `/readyz` and `/metrics` show it.
//!
//! Layout in etcd (prefix `--etcd-prefix`, default `/rollcall`):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `<prefix>/v1/nodes/<role>/<node>` | [`NodeValue`] JSON | the node's current lease |
//! | `<prefix>/v1/meta/serial-base` | unix seconds of the cluster's first use | none |

pub mod client;
pub mod mirror;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::registry::{Label, NodeKey, NodeSpec};

/// `rollcall serve --etcd …` settings.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// Client URLs of the members (`http://10.0.0.1:2379`).
    pub endpoints: Vec<String>,
    /// Key prefix (no trailing slash).
    pub prefix: String,
    /// Budget of one etcd call, failover included; then 503.
    pub timeout: Duration,
    /// TCP connect timeout per member.
    pub dial_timeout: Duration,
    /// How often the mirror is compared with a full list.
    pub resync: Duration,
}

impl EtcdConfig {
    pub fn nodes_prefix(&self) -> Vec<u8> {
        format!("{}/v1/nodes/", self.prefix).into_bytes()
    }

    pub fn node_key(&self, key: &NodeKey) -> Vec<u8> {
        format!("{}/v1/nodes/{}/{}", self.prefix, key.role, key.node).into_bytes()
    }

    pub fn serial_base_key(&self) -> Vec<u8> {
        format!("{}/v1/meta/serial-base", self.prefix).into_bytes()
    }

    /// The node a key names, if it is a well-formed node key under our prefix.
    pub fn parse_key(&self, key: &[u8]) -> Option<NodeKey> {
        let rest = key.strip_prefix(self.nodes_prefix().as_slice())?;
        let rest = std::str::from_utf8(rest).ok()?;
        let (role, node) = rest.split_once('/')?;
        Some(NodeKey {
            role: Label::parse(role).ok()?,
            node: Label::parse(node).ok()?,
        })
    }
}

/// The end of the key range that holds every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

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

    /// The spec, the registration time and whether a session holds the node.
    pub fn decode(bytes: &[u8]) -> Result<(NodeSpec, u64, bool), String> {
        let v: NodeValue = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let service = Label::parse(&v.service).map_err(|e| format!("service {e}"))?;
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

/// Why the mirror listed everything again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relist {
    Start,
    Compacted,
    Canceled,
    Resync,
}

impl Relist {
    pub const ALL: [Relist; 4] = [
        Relist::Start,
        Relist::Compacted,
        Relist::Canceled,
        Relist::Resync,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Relist::Start => "start",
            Relist::Compacted => "compacted",
            Relist::Canceled => "canceled",
            Relist::Resync => "resync",
        }
    }
}

/// The state of this server's link to etcd, for `/readyz`, `/metrics` and the logs.
#[derive(Default)]
pub struct Link {
    up: AtomicBool,
    /// The mirror has listed at least once since start.
    listed: AtomicBool,
    /// Last revision the mirror applied.
    pub applied: AtomicI64,
    /// Last revision etcd reported (probe).
    pub seen: AtomicI64,
    /// Unix ms of the last successful contact.
    pub last_contact_ms: AtomicU64,
    pub relists: [AtomicU64; 4],
    pub repairs: AtomicU64,
    pub dropped_events: AtomicU64,
    pub client: std::sync::OnceLock<Arc<client::Client>>,
}

impl Link {
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Records a contact outcome; logs a line only when the state changes.
    pub fn set_up(&self, up: bool, why: &str) {
        if up {
            self.last_contact_ms.store(crate::clock::unix_ms(), Relaxed);
        }
        if self.up.swap(up, Relaxed) != up {
            if up {
                tracing::info!("etcd link up: writes accepted again");
            } else {
                tracing::warn!(reason = %why, "etcd link down: DNS keeps answering the last known set; writes answer 503 until etcd is back");
            }
        }
    }

    pub fn set_listed(&self) {
        self.listed.store(true, Relaxed);
    }

    pub fn count_relist(&self, why: Relist) {
        let i = Relist::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.relists[i].fetch_add(1, Relaxed);
    }

    /// Ready: etcd answers and the mirror has a full copy.
    pub fn ready(&self) -> Result<(), String> {
        if !self.listed.load(Relaxed) {
            return Err(
                "not ready: the first list of the registrations in etcd has not completed".into(),
            );
        }
        if !self.is_up() {
            return Err(
                "not ready: etcd is unreachable or has no leader; DNS answers the last known set"
                    .into(),
            );
        }
        Ok(())
    }

    /// Prometheus text for the link.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# HELP rollcall_etcd_up 1 while etcd answers this server."
        );
        let _ = writeln!(out, "# TYPE rollcall_etcd_up gauge");
        let _ = writeln!(out, "rollcall_etcd_up {}", u8::from(self.is_up()));
        let _ = writeln!(
            out,
            "# HELP rollcall_etcd_revision Last etcd revision applied to this server's copy."
        );
        let _ = writeln!(out, "# TYPE rollcall_etcd_revision gauge");
        let applied = self.applied.load(Relaxed);
        let _ = writeln!(out, "rollcall_etcd_revision {applied}");
        let _ = writeln!(out, "# HELP rollcall_etcd_mirror_lag_revisions Revisions etcd is ahead of this server's copy (last probe).");
        let _ = writeln!(out, "# TYPE rollcall_etcd_mirror_lag_revisions gauge");
        let lag = (self.seen.load(Relaxed) - applied).max(0);
        let _ = writeln!(out, "rollcall_etcd_mirror_lag_revisions {lag}");
        let _ = writeln!(
            out,
            "# HELP rollcall_etcd_last_contact_seconds Seconds since etcd last answered."
        );
        let _ = writeln!(out, "# TYPE rollcall_etcd_last_contact_seconds gauge");
        let last = self.last_contact_ms.load(Relaxed);
        let since = if last == 0 {
            -1.0
        } else {
            crate::clock::unix_ms().saturating_sub(last) as f64 / 1000.0
        };
        let _ = writeln!(out, "rollcall_etcd_last_contact_seconds {since}");
        let _ = writeln!(
            out,
            "# HELP rollcall_etcd_relists_total Full lists of the registrations, by reason."
        );
        let _ = writeln!(out, "# TYPE rollcall_etcd_relists_total counter");
        for (i, r) in Relist::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "rollcall_etcd_relists_total{{reason=\"{}\"}} {}",
                r.as_str(),
                self.relists[i].load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP rollcall_etcd_resync_repairs_total Differences a verification list found and repaired.");
        let _ = writeln!(out, "# TYPE rollcall_etcd_resync_repairs_total counter");
        let _ = writeln!(
            out,
            "rollcall_etcd_resync_repairs_total {}",
            self.repairs.load(Relaxed)
        );
        let _ = writeln!(out, "# HELP rollcall_etcd_dropped_events_total Watch events ignored (duplicates, old revisions, foreign keys).");
        let _ = writeln!(out, "# TYPE rollcall_etcd_dropped_events_total counter");
        let _ = writeln!(
            out,
            "rollcall_etcd_dropped_events_total {}",
            self.dropped_events.load(Relaxed)
        );
        if let Some(c) = self.client.get() {
            let _ = writeln!(out, "# HELP rollcall_etcd_request_seconds etcd calls by operation (sum and count; errors separately).");
            let _ = writeln!(out, "# TYPE rollcall_etcd_request_seconds summary");
            for (i, op) in client::OPS.iter().enumerate() {
                let s = &c.stats[i];
                let _ = writeln!(
                    out,
                    "rollcall_etcd_request_seconds_sum{{op=\"{op}\"}} {}",
                    s.micros.load(Relaxed) as f64 / 1e6
                );
                let _ = writeln!(
                    out,
                    "rollcall_etcd_request_seconds_count{{op=\"{op}\"}} {}",
                    s.count.load(Relaxed)
                );
            }
            let _ = writeln!(out, "# TYPE rollcall_etcd_request_errors_total counter");
            for (i, op) in client::OPS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "rollcall_etcd_request_errors_total{{op=\"{op}\"}} {}",
                    c.stats[i].errors.load(Relaxed)
                );
            }
        }
    }
}

pub use crate::client::chain;
