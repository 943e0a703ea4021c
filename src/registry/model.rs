//! The registry's own types: what a node is, how it is named, what can go wrong.
//!
//! These types carry no serde: the HTTP API has its own wire types (`api::model`) and the store its
//! own record format (`store`), both converted by hand at the boundary.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Smallest and largest lease a node may ask for, in seconds.
pub const MIN_TTL: u32 = 1;
pub const MAX_TTL: u32 = 86_400;
pub const DEFAULT_TTL: u32 = 5;

/// A DNS label used as a role or node name: 1..=63 of `a-z 0-9 -`, not starting or ending
/// with `-`, always lower case.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label(Arc<str>);

impl Label {
    /// Validates and lower-cases `s`. The error says what is wrong, in words.
    pub fn parse(s: &str) -> Result<Label, String> {
        if s.is_empty() {
            return Err("is empty: use 1 to 63 characters of a-z, 0-9 and '-'".into());
        }
        if s.len() > 63 {
            return Err(format!("is {} characters long: the limit is 63", s.len()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!("contains {c:?}: only a-z, 0-9 and '-' are allowed"));
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err("starts or ends with '-'".into());
        }
        Ok(Label(Arc::from(s.to_ascii_lowercase())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether both are the same allocation (equal labels need not be; interned ones are).
    pub fn same(&self, other: &Label) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// A service name for SRV (`_http._tcp`): 1..=15 of `a-z 0-9 -` (RFC 6335), lower case.
pub fn parse_service(s: &str) -> Result<Label, String> {
    if s.len() > 15 {
        return Err(format!(
            "is {} characters long: service names are at most 15",
            s.len()
        ));
    }
    Label::parse(s)
}

/// Identifies one registration.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct NodeKey {
    pub role: Label,
    pub node: Label,
}

/// What a node registers: everything that shows in DNS or in the API.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct NodeSpec {
    pub addr: IpAddr,
    /// `None`: the node has no port, so it gets A/AAAA records but no SRV.
    pub port: Option<u16>,
    pub service: Label,
    /// Lease length in seconds; renewals extend the lease by this much from now.
    pub ttl: u32,
    pub weight: u16,
    pub meta: BTreeMap<String, String>,
}

impl NodeSpec {
    /// True when `other` differs in anything DNS or the API shows (everything but the lease).
    pub fn visible_eq(&self, other: &NodeSpec) -> bool {
        self == other
    }
}

/// A registered node as readers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub key: NodeKey,
    pub spec: NodeSpec,
    /// Time left on the lease.
    pub expires_in: Duration,
    /// How long the node has been registered (since its first registration in this lease chain).
    pub age: Duration,
    /// True while a live session (WebSocket) holds the lease.
    pub session: bool,
}

/// A role's nodes at a given index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleInfo {
    /// Index of the last change to this role's visible set (0: never seen).
    pub index: u64,
    pub nodes: Vec<NodeInfo>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("the registry is full: {0}")]
    Full(String),
    #[error("the registry is shutting down")]
    Closed,
    #[error("storage failed: {0}")]
    Storage(String),
    /// etcd mode: etcd is unreachable or has no quorum; nothing was changed.
    #[error("{0}")]
    Unavailable(String),
}
