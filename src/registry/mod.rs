//! The registry: registrations, their leases, and what readers see of them.
//!
//! Three parts, in the order data flows:
//!
//! - [`Registry`] is the handle the API and the session endpoint hold. Writes go as `Command`s
//!   over a channel to the registry's **owner**; reads never do: they load the published
//!   [`View`], an immutable snapshot the owner swaps in after every visible change (as DNS
//!   reads its snapshot), so a reader never copies a role inside the owner and never waits
//!   for it.
//! - The owner, one of two behind the same commands: the embedded `writer` (leases on the
//!   monotonic clock, expiry, sessions, and the [`journal`](crate::journal) in the data dir),
//!   or `etcd` (`--etcd`: etcd holds the truth, this server mirrors it). Both feed the same
//!   table.
//! - `table::Table`: roles → nodes, per-role index, the dirty set and publication (to the
//!   DNS builder through [`Publish`], and to readers as a new [`View`]). No clock, no IO.
//!
//! Apart from the etcd owner's calls (through [`crate::etcd`]), the registry does no network
//! IO, and it knows nothing of DNS wire formats or JSON.

mod etcd;
pub mod model;
mod nodelist;
mod table;
mod writer;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use model::*;

/// The largest registration body (JSON) the API takes; the etcd schema sizes values by it.
pub const BODY_MAX: usize = 64 * 1024;
pub use nodelist::NodeList;

use crate::journal::{Journal, Loaded};
use crate::metrics::RegistryCounters;

/// Receives the roles whose visible set changed in a batch, before anyone is told of the change.
pub trait Publish: Send + 'static {
    /// `changed` lists each changed role with the nodes that changed in it (a role whose
    /// `len` is 0 is gone). `index` is the registry's new generation index.
    fn publish(&mut self, index: u64, changed: &[RoleView<'_>]);

    /// From now on the zone's SOA serial is `base + index` (wrapping), the same on every
    /// server that shares the index (etcd mode). Default: ignored.
    fn set_serial_base(&mut self, _base: u32) {}
}

/// What changed in one role, borrowed from the table for the duration of a publish.
pub struct RoleView<'a> {
    pub role: &'a Label,
    /// How many nodes the role holds now.
    pub len: usize,
    /// The nodes whose visible state changed, sorted by name: the spec now, or `None` for a
    /// node that left. A publisher applies these to what it was given before.
    pub changed: Vec<(&'a Label, Option<&'a NodeSpec>)>,
}

/// The check a registration read from etcd must pass to be served (the API's, for a `PUT`):
/// `Err` says why not.
pub type Validate = Arc<dyn Fn(&NodeKey, &NodeSpec) -> Result<(), String> + Send + Sync>;

/// Limits the owner enforces.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_nodes: usize,
    pub max_nodes_per_role: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_nodes: 200_000,
            max_nodes_per_role: 20_000,
        }
    }
}

/// Why a node left the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// `DELETE` (or the agent shutting down cleanly).
    Deregistered,
    /// Its lease ran out.
    Expired,
    /// The WebSocket session holding it closed.
    SessionClosed,
}

impl Removal {
    pub fn as_str(self) -> &'static str {
        match self {
            Removal::Deregistered => "deregistered",
            Removal::Expired => "expired",
            Removal::SessionClosed => "session closed",
        }
    }
}

/// Requests to the owner.
enum Command {
    Put {
        key: NodeKey,
        spec: NodeSpec,
        reply: oneshot::Sender<Result<NodeInfo, RegistryError>>,
    },
    Delete {
        key: NodeKey,
        reply: oneshot::Sender<Result<bool, RegistryError>>,
    },
    /// Extends the lease of an existing node by its ttl (session heartbeat).
    Renew {
        key: NodeKey,
        reply: oneshot::Sender<Result<bool, RegistryError>>,
    },
    /// Attaches a session to a node.
    SessionOpen {
        key: NodeKey,
        reply: oneshot::Sender<Result<Option<SessionGrant>, RegistryError>>,
    },
    /// The session's connection closed: remove the node if that session still holds it.
    SessionClose { key: NodeKey, id: u64 },
    /// Answered once every command sent before it is applied and published: orders a read
    /// after fire-and-forget commands. Costs the owner nothing.
    Barrier {
        reply: oneshot::Sender<Result<(), RegistryError>>,
    },
    /// How many roles the owner's table holds (tests: refused requests leave nothing behind).
    #[cfg(test)]
    TableRoles {
        reply: oneshot::Sender<Result<usize, RegistryError>>,
    },
}

/// A session attached to a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionGrant {
    pub id: u64,
    /// The node's lease, in seconds: the session must be heard from within it.
    pub ttl: u32,
}

/// A lease's moving parts, written by the owner and read by anyone: renewals and sessions
/// change them without a new [`View`].
#[derive(Debug, Default)]
pub struct LeaseCell {
    /// Nanoseconds from the registry's epoch to the lease's end.
    deadline: AtomicU64,
    session: AtomicBool,
}

impl LeaseCell {
    fn set_deadline(&self, epoch: Instant, deadline: Instant) {
        let ns = deadline.saturating_duration_since(epoch).as_nanos() as u64;
        self.deadline.store(ns, Ordering::Relaxed);
    }
    fn set_session(&self, on: bool) {
        self.session.store(on, Ordering::Relaxed);
    }
}

/// A node as published to readers.
#[derive(Debug, Clone)]
pub struct PublishedNode {
    pub node: Label,
    pub spec: Arc<NodeSpec>,
    /// Readers' cache of this registration's unchanging part, encoded their way (the API keeps
    /// its JSON here, so that a thousand readers of a role encode each node once). Lives as long
    /// as the spec; the registry never reads it.
    pub encoded: Arc<std::sync::OnceLock<Box<[u8]>>>,
    registered: Instant,
    lease: Arc<LeaseCell>,
}

/// A role as published: immutable but for its leases' cells. Superseded (its token fires)
/// when the role's visible set changes.
#[derive(Debug)]
pub struct RoleSnapshot {
    pub role: Label,
    /// Index of the role's last visible change (kept after the role empties).
    pub index: u64,
    /// Sorted by node name.
    pub nodes: NodeList,
    superseded: CancellationToken,
}

/// What readers see: every role that ever had nodes, at one generation index.
#[derive(Debug)]
pub struct View {
    pub index: u64,
    pub roles: BTreeMap<Label, Arc<RoleSnapshot>>,
    pub total: usize,
    epoch: Instant,
}

impl View {
    /// Lease left, age and session of a node now.
    pub fn lease_now(&self, n: &PublishedNode, now: Instant) -> (Duration, Duration, bool) {
        let deadline = self.epoch + Duration::from_nanos(n.lease.deadline.load(Ordering::Relaxed));
        (
            deadline.saturating_duration_since(now),
            now.saturating_duration_since(n.registered),
            n.lease.session.load(Ordering::Relaxed),
        )
    }

    /// The node's state now: lease left, age, session.
    pub fn node_info(&self, role: &Label, n: &PublishedNode, now: Instant) -> NodeInfo {
        let (expires_in, age, session) = self.lease_now(n, now);
        NodeInfo {
            key: NodeKey {
                role: role.clone(),
                node: n.node.clone(),
            },
            spec: (*n.spec).clone(),
            expires_in,
            age,
            session,
        }
    }

    /// The role's nodes as [`NodeInfo`]s (an unknown role: index 0, no nodes).
    pub fn role_info(&self, role: &Label) -> RoleInfo {
        let now = Instant::now();
        match self.roles.get(role) {
            Some(r) => RoleInfo {
                index: r.index,
                nodes: r
                    .nodes
                    .iter()
                    .map(|n| self.node_info(role, n, now))
                    .collect(),
            },
            None => RoleInfo {
                index: 0,
                nodes: Vec::new(),
            },
        }
    }

    /// One node, found without copying its role.
    pub fn node(&self, key: &NodeKey) -> Option<NodeInfo> {
        let r = self.roles.get(&key.role)?;
        let n = r.nodes.get(&key.node)?;
        Some(self.node_info(&key.role, n, Instant::now()))
    }

    /// The generation index and the node count of every non-empty role.
    pub fn role_counts(&self) -> Vec<(Label, usize)> {
        self.roles
            .iter()
            .filter(|(_, r)| !r.nodes.is_empty())
            .map(|(name, r)| (name.clone(), r.nodes.len()))
            .collect()
    }
}

/// A cheap, cloneable handle to the registry.
#[derive(Clone)]
pub struct Registry {
    tx: mpsc::Sender<Command>,
    view: Arc<ArcSwap<View>>,
    index: watch::Receiver<u64>,
    counters: Arc<RegistryCounters>,
    /// etcd mode: the link to etcd.
    link: Option<Arc<crate::etcd::Link>>,
}

impl Registry {
    /// Starts the embedded owner on the current runtime with the nodes `loaded` from its
    /// journal. The returned join handle finishes after `shutdown` fires and the journal is
    /// synced.
    pub fn start(
        journal: Box<dyn Journal>,
        loaded: Loaded,
        publisher: Box<dyn Publish>,
        limits: Limits,
        shutdown: CancellationToken,
    ) -> (Registry, tokio::task::JoinHandle<()>) {
        Self::start_at(journal, loaded, publisher, limits, shutdown, 0)
    }

    /// Like [`Registry::start`], with the generation index starting at `initial_index`. The
    /// server starts it at the current time in milliseconds, so that the index keeps growing
    /// across restarts and a blocking query holding an index from before a restart is not
    /// left waiting for a number the new process has not reached yet.
    pub fn start_at(
        journal: Box<dyn Journal>,
        loaded: Loaded,
        publisher: Box<dyn Publish>,
        limits: Limits,
        shutdown: CancellationToken,
        initial_index: u64,
    ) -> (Registry, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(4096);
        let counters = Arc::new(RegistryCounters::default());
        let (table, view, index) = table::Table::new(publisher, initial_index);
        let handle = writer::spawn(
            table,
            journal,
            loaded,
            limits,
            counters.clone(),
            rx,
            shutdown,
        );
        (
            Registry {
                tx,
                view,
                index,
                counters,
                link: None,
            },
            handle,
        )
    }

    /// Starts the etcd owner and its mirror: etcd is the truth, `loaded` (the data dir's last
    /// copy) is served until the first list from etcd replaces it.
    // `access` stays apart from `cfg` (EtcdConfig is built field by field in tests).
    #[allow(clippy::too_many_arguments)]
    pub fn start_etcd(
        cfg: crate::etcd::EtcdConfig,
        access: crate::etcd::client::Access,
        validate: Validate,
        journal: Box<dyn Journal>,
        loaded: Loaded,
        publisher: Box<dyn Publish>,
        limits: Limits,
        shutdown: CancellationToken,
    ) -> (Registry, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(4096);
        let counters = Arc::new(RegistryCounters::default());
        let (table, view, index) = table::Table::new(publisher, 0);
        let mut client = crate::etcd::client::Client::with_access(
            cfg.endpoints.clone(),
            cfg.timeout,
            cfg.dial_timeout,
            access,
        );
        client.watch_line_max = cfg.watch_line_max;
        let client = Arc::new(client);
        let link = Arc::new(crate::etcd::Link::default());
        let _ = link.client.set(client.clone());
        let (mirror_tx, mirror_rx) = mpsc::channel(1024);
        let mirror = crate::etcd::mirror::Mirror {
            client: client.clone(),
            cfg: cfg.clone(),
            link: link.clone(),
            tx: mirror_tx,
            shutdown: shutdown.clone(),
        }
        .spawn();
        let parts = etcd::Parts {
            client,
            cfg,
            validate,
            link: link.clone(),
            mirror: mirror_rx,
            journal,
            loaded,
        };
        let owner = etcd::spawn(table, parts, limits, counters.clone(), rx, shutdown);
        let handle = tokio::spawn(async move {
            let _ = owner.await;
            let _ = mirror.await;
        });
        (
            Registry {
                tx,
                view,
                index,
                counters,
                link: Some(link),
            },
            handle,
        )
    }

    /// The link to etcd, in etcd mode.
    pub fn etcd_link(&self) -> Option<&Arc<crate::etcd::Link>> {
        self.link.as_ref()
    }

    /// Whether this server can take writes and has a full copy (`/readyz`).
    pub fn ready(&self) -> Result<(), String> {
        self.open()
            .map_err(|_| "not ready: shutting down".to_owned())?;
        match &self.link {
            Some(link) => link.ready(),
            None => Ok(()),
        }
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, RegistryError>>) -> Command,
    ) -> Result<T, RegistryError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| RegistryError::Closed)?;
        rx.await.map_err(|_| RegistryError::Closed)?
    }

    fn open(&self) -> Result<(), RegistryError> {
        if self.tx.is_closed() {
            return Err(RegistryError::Closed);
        }
        Ok(())
    }

    /// Registers or renews a node. On return the change is durable and visible in DNS.
    pub async fn put(&self, key: NodeKey, spec: NodeSpec) -> Result<NodeInfo, RegistryError> {
        self.call(|reply| Command::Put { key, spec, reply }).await
    }

    /// Deregisters a node; false if it was not registered.
    pub async fn delete(&self, key: NodeKey) -> Result<bool, RegistryError> {
        self.call(|reply| Command::Delete { key, reply }).await
    }

    /// Extends a node's lease by its ttl; false if it is not registered.
    pub async fn renew(&self, key: NodeKey) -> Result<bool, RegistryError> {
        self.call(|reply| Command::Renew { key, reply }).await
    }

    /// Attaches a session to a registered node: returns the session id and the node's lease
    /// (ttl, seconds), or None when the node is not registered.
    pub async fn session_open(&self, key: NodeKey) -> Result<Option<(u64, u32)>, RegistryError> {
        let grant = self
            .call(|reply| Command::SessionOpen { key, reply })
            .await?;
        Ok(grant.map(|g| (g.id, g.ttl)))
    }

    /// Fire-and-forget: after shutdown there is nobody to tell, and that is right (a server
    /// stopping must not deregister the nodes whose sessions it drops).
    pub fn session_close(&self, key: NodeKey, id: u64) {
        let _ = self.tx.try_send(Command::SessionClose { key, id });
    }

    #[cfg(test)]
    async fn table_roles(&self) -> usize {
        self.call(|reply| Command::TableRoles { reply })
            .await
            .unwrap()
    }

    /// The published view: what every read is answered from.
    pub fn view(&self) -> Result<Arc<View>, RegistryError> {
        self.open()?;
        Ok(self.view.load_full())
    }

    /// The generation index and the node count of every non-empty role, from the published
    /// view: never waits for the owner (a write is published before it is answered, so a
    /// client sees its own acknowledged writes here).
    pub fn roles(&self) -> Result<(u64, Vec<(Label, usize)>), RegistryError> {
        let view = self.view()?;
        Ok((view.index, view.role_counts()))
    }

    /// A role's nodes, copied out of the view after every command sent before (the API
    /// streams the snapshot instead).
    pub async fn role(&self, role: Label) -> Result<RoleInfo, RegistryError> {
        self.call(|reply| Command::Barrier { reply }).await?;
        Ok(self.view()?.role_info(&role))
    }

    /// One node, or None.
    pub fn node(&self, key: &NodeKey) -> Result<Option<NodeInfo>, RegistryError> {
        Ok(self.view()?.node(key))
    }

    /// Consul-style blocking query on one role: returns the role's snapshot as soon as its
    /// index exceeds `index`, or when `wait` has passed (unchanged). Wakes only when this role
    /// changes (or, for a role never seen, when a role appears); holds no copy of it meanwhile.
    pub async fn role_snapshot_after(
        &self,
        role: &Label,
        index: u64,
        wait: Duration,
    ) -> Result<(Arc<View>, Option<Arc<RoleSnapshot>>), RegistryError> {
        let deadline = Instant::now() + wait;
        let mut changes = self.index.clone();
        loop {
            changes.mark_unchanged();
            let view = self.view()?;
            let snap = view.roles.get(role).cloned();
            let role_index = snap.as_ref().map_or(0, |s| s.index);
            // An index from the future means the server restarted since the client read it
            // (Consul's rule): answer at once so the client starts over from the new index.
            if role_index > index || index > view.index || Instant::now() >= deadline {
                return Ok((view, snap));
            }
            let woke = match &snap {
                Some(s) => {
                    let token = s.superseded.clone();
                    drop((view, snap));
                    tokio::time::timeout_at(deadline, token.cancelled())
                        .await
                        .is_ok()
                }
                None => {
                    drop((view, snap));
                    match tokio::time::timeout_at(deadline, changes.changed()).await {
                        Ok(Ok(())) => true,
                        Ok(Err(_)) => return Err(RegistryError::Closed),
                        Err(_) => false,
                    }
                }
            };
            if !woke {
                let view = self.view()?;
                let snap = view.roles.get(role).cloned();
                return Ok((view, snap));
            }
        }
    }

    /// [`Registry::role_snapshot_after`], copied out as a [`RoleInfo`].
    pub async fn role_after(
        &self,
        role: Label,
        index: u64,
        wait: Duration,
    ) -> Result<RoleInfo, RegistryError> {
        let (view, _) = self.role_snapshot_after(&role, index, wait).await?;
        Ok(view.role_info(&role))
    }

    /// Event counters for `/metrics`.
    pub fn counters(&self) -> &RegistryCounters {
        &self.counters
    }

    /// Blocking form of [`Registry::roles`]: returns once the generation index exceeds
    /// `index`, or after `wait`.
    pub async fn roles_after(
        &self,
        index: u64,
        wait: Duration,
    ) -> Result<(u64, Vec<(Label, usize)>), RegistryError> {
        let mut changes = self.index.clone();
        let deadline = Instant::now() + wait;
        // As in `role_after`, an index ahead of ours means a restart: answer at once.
        while *changes.borrow_and_update() == index {
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(RegistryError::Closed),
                Err(_) => break,
            }
        }
        self.roles()
    }

    /// Returns once the owner has handled every command this handle's clones sent before.
    pub async fn barrier(&self) -> Result<(), RegistryError> {
        self.call(|reply| Command::Barrier { reply }).await
    }

    /// The current generation index, without asking the owner.
    pub fn index(&self) -> u64 {
        *self.index.borrow()
    }

    /// A receiver that reports every change of the generation index from now on.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        let mut rx = self.index.clone();
        rx.mark_unchanged();
        rx
    }
}

#[cfg(test)]
mod tests;
