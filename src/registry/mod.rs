//! The registry: the single owner of registrations.
//!
//! One writer task ([`Writer`]) owns every lease. The HTTP API and the session endpoint talk to it
//! through a [`Registry`] handle (an mpsc channel of [`Command`]s with oneshot replies). Each
//! loop iteration takes a batch of commands, applies them (appending each change to the
//! [`Store`]), expires due leases, hands the roles whose visible set changed to the
//! [`Publish`]er (the DNS snapshot builder), makes the batch durable (fsync) and only then
//! replies: a `PUT` that got its 200 is on disk and already in DNS.
//!
//! The registry does no network IO and knows nothing of DNS wire formats or JSON.

pub mod model;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

pub use model::*;

use std::sync::Arc;

use crate::metrics::RegistryCounters;
use crate::store::{unix_ms, Loaded, Store, StoredNode, StoredRecord};

/// Receives the roles whose visible set changed in a batch, before anyone is told of the change.
pub trait Publish: Send + 'static {
    /// `changed` lists each changed role with its full, current node set (empty: role gone).
    /// `index` is the registry's new generation index.
    fn publish(&mut self, index: u64, changed: &[RoleView<'_>]);
}

/// A role's current nodes, borrowed from the writer's state for the duration of a publish.
pub struct RoleView<'a> {
    pub role: &'a Label,
    pub nodes: Vec<(&'a Label, &'a NodeSpec)>,
}

/// Limits the writer enforces.
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

/// Requests to the writer.
enum Command {
    Put {
        key: NodeKey,
        spec: NodeSpec,
        reply: oneshot::Sender<Result<NodeInfo, RegistryError>>,
    },
    Delete {
        key: NodeKey,
        reply: oneshot::Sender<bool>,
    },
    /// Extends the lease of an existing node by its ttl (session heartbeat).
    Renew {
        key: NodeKey,
        reply: oneshot::Sender<bool>,
    },
    /// Attaches a session to a node; the reply is the session id and the node's lease in
    /// seconds (None: no such node).
    SessionOpen {
        key: NodeKey,
        reply: oneshot::Sender<Option<(u64, u32)>>,
    },
    /// The session's connection closed: remove the node if that session still holds it.
    SessionClose { key: NodeKey, id: u64 },
    Roles {
        reply: oneshot::Sender<(u64, Vec<(Label, usize)>)>,
    },
    Role {
        role: Label,
        reply: oneshot::Sender<RoleInfo>,
    },
}

/// A cheap, cloneable handle to the registry's writer.
#[derive(Clone)]
pub struct Registry {
    tx: mpsc::Sender<Command>,
    index: watch::Receiver<u64>,
    counters: Arc<RegistryCounters>,
}

impl Registry {
    /// Starts the writer on the current runtime with the nodes `loaded` from the store.
    /// The returned join handle finishes after `shutdown` fires and the store is synced.
    pub fn start(
        store: Box<dyn Store>,
        loaded: Loaded,
        publisher: Box<dyn Publish>,
        limits: Limits,
        shutdown: CancellationToken,
    ) -> (Registry, tokio::task::JoinHandle<()>) {
        Self::start_at(store, loaded, publisher, limits, shutdown, 0)
    }

    /// Like [`Registry::start`], with the generation index starting at `initial_index`. The
    /// server starts it at the current time in milliseconds, so that the index keeps growing
    /// across restarts and a blocking query holding an index from before a restart is not
    /// left waiting for a number the new process has not reached yet.
    pub fn start_at(
        store: Box<dyn Store>,
        loaded: Loaded,
        publisher: Box<dyn Publish>,
        limits: Limits,
        shutdown: CancellationToken,
        initial_index: u64,
    ) -> (Registry, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(4096);
        let (index_tx, index) = watch::channel(initial_index);
        let counters = Arc::new(RegistryCounters::default());
        let mut writer = Writer {
            counters: counters.clone(),
            roles: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            index: initial_index,
            total: 0,
            next_session: 1,
            store,
            publisher,
            limits,
            index_tx,
            dirty: BTreeSet::new(),
            durable: false,
        };
        writer.restore(loaded.nodes);
        let handle = tokio::spawn(writer.run(rx, shutdown));
        (
            Registry {
                tx,
                index,
                counters,
            },
            handle,
        )
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, RegistryError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| RegistryError::Closed)?;
        rx.await.map_err(|_| RegistryError::Closed)
    }

    /// Registers or renews a node. On return the change is durable and visible in DNS.
    pub async fn put(&self, key: NodeKey, spec: NodeSpec) -> Result<NodeInfo, RegistryError> {
        self.call(|reply| Command::Put { key, spec, reply }).await?
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
        self.call(|reply| Command::SessionOpen { key, reply }).await
    }

    /// Fire-and-forget: after shutdown there is nobody to tell, and that is right (a server
    /// stopping must not deregister the nodes whose sessions it drops).
    pub fn session_close(&self, key: NodeKey, id: u64) {
        let _ = self.tx.try_send(Command::SessionClose { key, id });
    }

    /// The generation index and the node count of every non-empty role.
    pub async fn roles(&self) -> Result<(u64, Vec<(Label, usize)>), RegistryError> {
        self.call(|reply| Command::Roles { reply }).await
    }

    pub async fn role(&self, role: Label) -> Result<RoleInfo, RegistryError> {
        self.call(|reply| Command::Role { role, reply }).await
    }

    /// Consul-style blocking query: returns as soon as the role's index exceeds `index`, or
    /// when `wait` has passed (with the unchanged content).
    pub async fn role_after(
        &self,
        role: Label,
        index: u64,
        wait: Duration,
    ) -> Result<RoleInfo, RegistryError> {
        let deadline = Instant::now() + wait;
        let mut changes = self.index.clone();
        loop {
            changes.mark_unchanged();
            let info = self.role(role.clone()).await?;
            // An index from the future means the server restarted since the client read it
            // (Consul's rule): answer at once so the client starts over from the new index.
            if info.index > index || index > *changes.borrow() || Instant::now() >= deadline {
                return Ok(info);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(RegistryError::Closed),
                Err(_) => return self.role(role).await,
            }
        }
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
        self.roles().await
    }

    /// The current generation index, without asking the writer.
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

struct Lease {
    spec: NodeSpec,
    deadline: Instant,
    registered: Instant,
    session: Option<u64>,
}

#[derive(Default)]
struct RoleState {
    /// Index of the last visible change (kept after the role empties, for blocking queries).
    index: u64,
    nodes: BTreeMap<Label, Lease>,
}

struct Writer {
    counters: Arc<RegistryCounters>,
    roles: BTreeMap<Label, RoleState>,
    deadlines: BTreeSet<(Instant, NodeKey)>,
    index: u64,
    total: usize,
    next_session: u64,
    store: Box<dyn Store>,
    publisher: Box<dyn Publish>,
    limits: Limits,
    index_tx: watch::Sender<u64>,
    /// Roles whose visible set changed in the current batch.
    dirty: BTreeSet<Label>,
    /// The current batch wrote a registration or deregistration: fsync before replying.
    durable: bool,
}

type Reply = Box<dyn FnOnce() + Send>;

impl Writer {
    fn restore(&mut self, nodes: Vec<StoredNode>) {
        let now = Instant::now();
        let unix_now = unix_ms();
        for n in nodes {
            let (Ok(role), Ok(node), Ok(addr), Ok(service)) = (
                Label::parse(&n.role),
                Label::parse(&n.node),
                n.addr.parse::<IpAddr>(),
                Label::parse(&n.service),
            ) else {
                tracing::warn!(role = %n.role, node = %n.node, "stored registration is invalid, dropped");
                continue;
            };
            let left = Duration::from_millis(n.expires_unix_ms.saturating_sub(unix_now));
            let age = Duration::from_millis(unix_now.saturating_sub(n.registered_unix_ms));
            let spec = NodeSpec {
                addr,
                port: n.port,
                service,
                ttl: n.ttl,
                weight: n.weight,
                meta: n.meta,
            };
            let key = NodeKey { role, node };
            let deadline = now + left;
            self.deadlines.insert((deadline, key.clone()));
            let registered = now.checked_sub(age).unwrap_or(now);
            self.roles
                .entry(key.role.clone())
                .or_default()
                .nodes
                .insert(
                    key.node.clone(),
                    Lease {
                        spec,
                        deadline,
                        registered,
                        session: None,
                    },
                );
            self.total += 1;
            self.dirty.insert(key.role);
        }
        if !self.dirty.is_empty() {
            tracing::info!(
                nodes = self.total,
                roles = self.dirty.len(),
                "restored registrations from the data dir"
            );
        }
        self.publish();
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        let mut batch = Vec::with_capacity(256);
        let mut replies: Vec<Reply> = Vec::with_capacity(256);
        let mut sync_tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let next_deadline = self.deadlines.first().map(|(d, _)| *d);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                n = rx.recv_many(&mut batch, 1024) => if n == 0 { break },
                _ = sleep_until(next_deadline.unwrap_or_else(Instant::now)), if next_deadline.is_some() => {}
                _ = sync_tick.tick() => {}
            }
            let now = Instant::now();
            for cmd in batch.drain(..) {
                if let Some(reply) = self.apply(cmd, now) {
                    replies.push(reply);
                }
            }
            self.expire(now);
            // Written ahead (appended) already; publish, then make durable, then acknowledge:
            // DNS sees a change as early as possible, a client only once it is on disk.
            self.publish();
            if let Err(e) = self.store.commit(std::mem::take(&mut self.durable)) {
                tracing::error!(error = %e, "could not sync the data dir; registrations may not survive a crash");
            }
            for reply in replies.drain(..) {
                reply();
            }
        }
        if let Err(e) = self.store.commit(true) {
            tracing::error!(error = %e, "could not sync the data dir at shutdown");
        }
    }

    fn apply(&mut self, cmd: Command, now: Instant) -> Option<Reply> {
        match cmd {
            Command::Put { key, spec, reply } => {
                let result = self.put(key, spec, now);
                Some(Box::new(move || {
                    let _ = reply.send(result);
                }))
            }
            Command::Delete { key, reply } => {
                let found = self.remove(&key, "deregistered");
                Some(Box::new(move || {
                    let _ = reply.send(found);
                }))
            }
            Command::Renew { key, reply } => {
                let found = self.renew(&key, now);
                Some(Box::new(move || {
                    let _ = reply.send(found);
                }))
            }
            Command::SessionOpen { key, reply } => {
                RegistryCounters::inc(&self.counters.session_opens);
                let id = self.next_session;
                let lease = self
                    .roles
                    .get_mut(&key.role)
                    .and_then(|r| r.nodes.get_mut(&key.node));
                let result = lease.map(|l| {
                    l.session = Some(id);
                    (id, l.spec.ttl)
                });
                self.next_session += 1;
                if result.is_some() {
                    self.renew(&key, now);
                }
                Some(Box::new(move || {
                    let _ = reply.send(result);
                }))
            }
            Command::SessionClose { key, id } => {
                let holds = self
                    .roles
                    .get(&key.role)
                    .and_then(|r| r.nodes.get(&key.node))
                    .is_some_and(|l| l.session == Some(id));
                if holds {
                    RegistryCounters::inc(&self.counters.session_closes);
                    self.remove(&key, "session closed");
                }
                None
            }
            Command::Roles { reply } => {
                let roles = self
                    .roles
                    .iter()
                    .filter(|(_, r)| !r.nodes.is_empty())
                    .map(|(name, r)| (name.clone(), r.nodes.len()))
                    .collect();
                let index = self.index;
                Some(Box::new(move || drop(reply.send((index, roles)))))
            }
            Command::Role { role, reply } => {
                let info = self.role_info(&role, now);
                Some(Box::new(move || {
                    let _ = reply.send(info);
                }))
            }
        }
    }

    fn put(
        &mut self,
        key: NodeKey,
        spec: NodeSpec,
        now: Instant,
    ) -> Result<NodeInfo, RegistryError> {
        let deadline = now + Duration::from_secs(spec.ttl.into());
        let role = self.roles.entry(key.role.clone()).or_default();
        let existing = role.nodes.get(&key.node);
        if existing.is_none() {
            if self.total >= self.limits.max_nodes {
                return Err(RegistryError::Full(format!(
                    "{} nodes are registered, the limit (--max-nodes) is {}",
                    self.total, self.limits.max_nodes
                )));
            }
            if role.nodes.len() >= self.limits.max_nodes_per_role {
                return Err(RegistryError::Full(format!(
                    "role {} has {} nodes, the limit (--max-nodes-per-role) is {}",
                    key.role,
                    role.nodes.len(),
                    self.limits.max_nodes_per_role
                )));
            }
        }
        let changed = existing.is_none_or(|l| !l.spec.visible_eq(&spec));
        let unix_now = unix_ms();
        let record = if changed {
            let registered = existing.map_or(now, |l| l.registered);
            StoredRecord::Put(stored_node(
                &key.role, &key.node, &spec, deadline, registered, now, unix_now,
            ))
        } else {
            StoredRecord::Renew {
                role: key.role.to_string(),
                node: key.node.to_string(),
                expires_unix_ms: unix_now + u64::from(spec.ttl) * 1000,
            }
        };
        self.store
            .append(&record)
            .map_err(|e| RegistryError::Storage(e.to_string()))?;
        self.durable |= changed;

        let role = self.roles.get_mut(&key.role).expect("entry made above");
        let (registered, session) = match role.nodes.get(&key.node) {
            Some(old) => {
                RegistryCounters::inc(&self.counters.renewals);
                self.deadlines.remove(&(old.deadline, key.clone()));
                (old.registered, old.session)
            }
            None => {
                RegistryCounters::inc(&self.counters.registrations);
                self.total += 1;
                tracing::info!(role = %key.role, node = %key.node, addr = %spec.addr, port = ?spec.port, ttl = spec.ttl, "registered");
                (now, None)
            }
        };
        if changed {
            self.dirty.insert(key.role.clone());
        }
        self.deadlines.insert((deadline, key.clone()));
        let info = NodeInfo {
            key: key.clone(),
            spec: spec.clone(),
            expires_in: deadline - now,
            age: now - registered,
            session: session.is_some(),
        };
        role.nodes.insert(
            key.node,
            Lease {
                spec,
                deadline,
                registered,
                session,
            },
        );
        Ok(info)
    }

    fn renew(&mut self, key: &NodeKey, now: Instant) -> bool {
        let Some(lease) = self
            .roles
            .get_mut(&key.role)
            .and_then(|r| r.nodes.get_mut(&key.node))
        else {
            return false;
        };
        RegistryCounters::inc(&self.counters.renewals);
        let deadline = now + Duration::from_secs(lease.spec.ttl.into());
        self.deadlines.remove(&(lease.deadline, key.clone()));
        self.deadlines.insert((deadline, key.clone()));
        lease.deadline = deadline;
        let expires_unix_ms = unix_ms() + u64::from(lease.spec.ttl) * 1000;
        let rec = StoredRecord::Renew {
            role: key.role.to_string(),
            node: key.node.to_string(),
            expires_unix_ms,
        };
        if let Err(e) = self.store.append(&rec) {
            tracing::warn!(error = %e, "could not store a renewal");
        }
        true
    }

    fn remove(&mut self, key: &NodeKey, why: &'static str) -> bool {
        let Some(role) = self.roles.get_mut(&key.role) else {
            return false;
        };
        let Some(lease) = role.nodes.remove(&key.node) else {
            return false;
        };
        self.deadlines.remove(&(lease.deadline, key.clone()));
        self.total -= 1;
        self.dirty.insert(key.role.clone());
        let rec = StoredRecord::Del {
            role: key.role.to_string(),
            node: key.node.to_string(),
        };
        if let Err(e) = self.store.append(&rec) {
            tracing::error!(error = %e, "could not store a deregistration; the node may come back after a restart");
        }
        self.durable = true;
        let counter = if why == "expired" {
            &self.counters.expiries
        } else {
            &self.counters.deregistrations
        };
        RegistryCounters::inc(counter);
        tracing::info!(role = %key.role, node = %key.node, addr = %lease.spec.addr, "{why}");
        true
    }

    fn expire(&mut self, now: Instant) {
        while let Some((deadline, _)) = self.deadlines.first() {
            if *deadline > now {
                break;
            }
            let (_, key) = self.deadlines.pop_first().expect("first exists");
            // `remove` looks the deadline up again; it is gone already, which is fine.
            self.remove(&key, "expired");
        }
    }

    fn publish(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        self.index += 1;
        RegistryCounters::inc(&self.counters.publishes);
        let dirty = std::mem::take(&mut self.dirty);
        for role in &dirty {
            if let Some(r) = self.roles.get_mut(role) {
                r.index = self.index;
            }
        }
        let views: Vec<RoleView<'_>> = dirty
            .iter()
            .map(|role| RoleView {
                role,
                nodes: self
                    .roles
                    .get(role)
                    .map(|r| r.nodes.iter().map(|(n, l)| (n, &l.spec)).collect())
                    .unwrap_or_default(),
            })
            .collect();
        self.publisher.publish(self.index, &views);
        drop(views);
        self.index_tx.send_replace(self.index);
        if self.store.wants_compaction() {
            let live: Vec<StoredNode> = self.stored_nodes().collect();
            if let Err(e) = self.store.compact(live) {
                tracing::error!(error = %e, "could not compact the data dir");
            }
        }
    }

    fn stored_nodes(&self) -> impl Iterator<Item = StoredNode> + '_ {
        let now = Instant::now();
        let unix_now = unix_ms();
        self.roles.iter().flat_map(move |(role, r)| {
            r.nodes.iter().map(move |(node, l)| {
                stored_node(role, node, &l.spec, l.deadline, l.registered, now, unix_now)
            })
        })
    }

    fn role_info(&self, role: &Label, now: Instant) -> RoleInfo {
        let Some(r) = self.roles.get(role) else {
            return RoleInfo {
                index: 0,
                nodes: Vec::new(),
            };
        };
        RoleInfo {
            index: r.index,
            nodes: r
                .nodes
                .iter()
                .map(|(node, l)| NodeInfo {
                    key: NodeKey {
                        role: role.clone(),
                        node: node.clone(),
                    },
                    spec: l.spec.clone(),
                    expires_in: l.deadline.saturating_duration_since(now),
                    age: now.duration_since(l.registered),
                    session: l.session.is_some(),
                })
                .collect(),
        }
    }
}

/// A lease as the store keeps it: instants turned into unix milliseconds.
fn stored_node(
    role: &Label,
    node: &Label,
    spec: &NodeSpec,
    deadline: Instant,
    registered: Instant,
    now: Instant,
    unix_now: u64,
) -> StoredNode {
    StoredNode {
        role: role.to_string(),
        node: node.to_string(),
        addr: spec.addr.to_string(),
        port: spec.port,
        service: spec.service.to_string(),
        ttl: spec.ttl,
        weight: spec.weight,
        meta: spec.meta.clone(),
        expires_unix_ms: unix_now + deadline.saturating_duration_since(now).as_millis() as u64,
        registered_unix_ms: unix_now
            .saturating_sub(now.saturating_duration_since(registered).as_millis() as u64),
    }
}

#[cfg(test)]
mod tests;
