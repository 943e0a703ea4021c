//! The registry's state as a plain table: roles → nodes, each role's index, the dirty set, and
//! publication. No clock and no IO: the owner decides what changes and when; the table keeps
//! the books and publishes (to the DNS builder, then to readers as a new [`View`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    Label, LeaseCell, NodeKey, NodeSpec, Publish, PublishedNode, RoleSnapshot, RoleView, View,
};

/// One registration in the table. The owner's own bookkeeping (deadline, session) lives here
/// too, as plain data.
pub(super) struct Entry {
    pub spec: Arc<NodeSpec>,
    /// Readers' encoding cache, kept while the spec is.
    pub encoded: Arc<std::sync::OnceLock<Box<[u8]>>>,
    pub registered: Instant,
    pub deadline: Instant,
    pub session: Option<u64>,
    /// Shared with readers: the deadline and session flag as they move.
    pub cell: Arc<LeaseCell>,
}

#[derive(Default)]
struct RoleEntry {
    nodes: BTreeMap<Label, Entry>,
}

pub(super) struct Table {
    roles: BTreeMap<Label, RoleEntry>,
    total: usize,
    index: u64,
    /// Nodes whose visible state changed since the last flush, by role.
    dirty: BTreeMap<Label, BTreeSet<Label>>,
    /// The last published snapshot of every role ever seen (emptied roles keep their index).
    published: BTreeMap<Label, Arc<RoleSnapshot>>,
    publisher: Box<dyn Publish>,
    view: Arc<ArcSwap<View>>,
    index_tx: watch::Sender<u64>,
    /// The instant lease cells count from.
    pub epoch: Instant,
}

impl Table {
    pub fn new(
        publisher: Box<dyn Publish>,
        initial_index: u64,
    ) -> (Table, Arc<ArcSwap<View>>, watch::Receiver<u64>) {
        let epoch = Instant::now();
        let view = Arc::new(ArcSwap::from_pointee(View {
            index: initial_index,
            roles: BTreeMap::new(),
            total: 0,
            epoch,
        }));
        let (index_tx, index_rx) = watch::channel(initial_index);
        let table = Table {
            roles: BTreeMap::new(),
            total: 0,
            index: initial_index,
            dirty: BTreeMap::new(),
            published: BTreeMap::new(),
            publisher,
            view: view.clone(),
            index_tx,
            epoch,
        };
        (table, view, index_rx)
    }

    #[cfg(test)]
    pub fn index(&self) -> u64 {
        self.index
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn role_len(&self, role: &Label) -> usize {
        self.roles.get(role).map_or(0, |r| r.nodes.len())
    }

    /// Whether a new node under `key.role` fits the limits (a refused PUT leaves no trace).
    pub fn admit(&self, key: &NodeKey, limits: &super::Limits) -> Result<(), super::RegistryError> {
        if self.total >= limits.max_nodes {
            return Err(super::RegistryError::Full(format!(
                "{} nodes are registered, the limit (--max-nodes) is {}",
                self.total, limits.max_nodes
            )));
        }
        let in_role = self.role_len(&key.role);
        if in_role >= limits.max_nodes_per_role {
            return Err(super::RegistryError::Full(format!(
                "role {} has {} nodes, the limit (--max-nodes-per-role) is {}",
                key.role, in_role, limits.max_nodes_per_role
            )));
        }
        Ok(())
    }

    pub fn get(&self, key: &NodeKey) -> Option<&Entry> {
        self.roles.get(&key.role)?.nodes.get(&key.node)
    }

    pub fn get_mut(&mut self, key: &NodeKey) -> Option<&mut Entry> {
        self.roles.get_mut(&key.role)?.nodes.get_mut(&key.node)
    }

    /// Inserts or replaces a node; `visible` (or a new node) marks the node for the next flush.
    pub fn insert(&mut self, key: &NodeKey, entry: Entry, visible: bool) -> Option<Entry> {
        let old = self
            .roles
            .entry(key.role.clone())
            .or_default()
            .nodes
            .insert(key.node.clone(), entry);
        if old.is_none() {
            self.total += 1;
        }
        if visible || old.is_none() {
            self.mark(key);
        }
        old
    }

    pub fn remove(&mut self, key: &NodeKey) -> Option<Entry> {
        let role = self.roles.get_mut(&key.role)?;
        let old = role.nodes.remove(&key.node)?;
        if role.nodes.is_empty() {
            self.roles.remove(&key.role);
        }
        self.total -= 1;
        self.mark(key);
        Some(old)
    }

    fn mark(&mut self, key: &NodeKey) {
        self.dirty
            .entry(key.role.clone())
            .or_default()
            .insert(key.node.clone());
    }

    /// Every registration, for a journal rewrite.
    pub fn iter(&self) -> impl Iterator<Item = (&Label, &Label, &Entry)> + '_ {
        self.roles
            .iter()
            .flat_map(|(role, r)| r.nodes.iter().map(move |(node, e)| (role, node, e)))
    }

    /// Roles in the table (each holds at least one node).
    #[cfg(test)]
    pub fn role_entries(&self) -> usize {
        self.roles.len()
    }

    /// Publishes the roles that changed since the last flush: a new index, the DNS builder,
    /// then a new view for readers, then the index watch. Returns whether anything changed.
    pub fn flush(&mut self) -> bool {
        let next = self.index + 1;
        self.flush_at(next)
    }

    /// [`Table::flush`] at a given index (the etcd owner's: the revision of the change). The
    /// index never goes backwards: one at or below the current one publishes at current + 1.
    pub fn flush_at(&mut self, index: u64) -> bool {
        if self.dirty.is_empty() {
            return false;
        }
        self.index = if index > self.index {
            index
        } else {
            self.index + 1
        };
        let dirty = std::mem::take(&mut self.dirty);
        let views: Vec<RoleView<'_>> = dirty
            .iter()
            .map(|(role, nodes)| {
                let r = self.roles.get(role);
                RoleView {
                    role,
                    len: r.map_or(0, |r| r.nodes.len()),
                    changed: nodes
                        .iter()
                        .map(|n| (n, r.and_then(|r| r.nodes.get(n)).map(|e| &*e.spec)))
                        .collect(),
                }
            })
            .collect();
        self.publisher.publish(self.index, &views);
        drop(views);

        // Each role's new node list shares every chunk the change did not touch.
        let mut superseded = Vec::with_capacity(dirty.len());
        for (role, changed) in dirty {
            let mut nodes = self
                .published
                .get(&role)
                .map(|s| s.nodes.clone())
                .unwrap_or_default();
            let current = self.roles.get(&role);
            for node in changed {
                match current.and_then(|r| r.nodes.get(&node)) {
                    Some(e) => nodes.upsert(PublishedNode {
                        node,
                        spec: e.spec.clone(),
                        encoded: e.encoded.clone(),
                        registered: e.registered,
                        lease: e.cell.clone(),
                    }),
                    None => {
                        nodes.remove(&node);
                    }
                }
            }
            let snap = Arc::new(RoleSnapshot {
                role: role.clone(),
                index: self.index,
                nodes,
                superseded: CancellationToken::new(),
            });
            if let Some(old) = self.published.insert(role, snap) {
                superseded.push(old);
            }
        }
        self.view.store(Arc::new(View {
            index: self.index,
            roles: self.published.clone(),
            total: self.total,
            epoch: self.epoch,
        }));
        // Waiters are woken only once the new view is in place.
        for old in superseded {
            old.superseded.cancel();
        }
        self.index_tx.send_replace(self.index);
        true
    }

    /// The SOA serial becomes `base + index` (etcd mode: the same on every server).
    pub fn set_serial_base(&mut self, base: u32) {
        self.publisher.set_serial_base(base);
    }

    /// Wakes every blocking query (the owner is gone: they answer 503).
    pub fn close(&self) {
        for snap in self.published.values() {
            snap.superseded.cancel();
        }
    }
}
