//! The etcd owner: the same [`Command`]s as the embedded writer, with etcd as the only truth.
//!
//! One task owns the [`Table`] and applies the mirror's messages to it in revision order (the
//! table's index is the etcd revision, the same on every server). Commands are turned into
//! etcd calls on tasks of their own, from what the table holds when they arrive; a write's
//! reply waits until the mirror has applied the write's revision (read-your-writes on the
//! server that answered, at most [`VISIBLE_WAIT`]).
//!
//! | command | etcd | raft writes |
//! |---|---|---|
//! | PUT, new node | grant L; txn(create = 0 ? put k lease L) | 2 |
//! | PUT, unchanged (renewal) | keepalive(L) | 0 |
//! | PUT, changed, same ttl | txn(mod = m ? put k lease L) | 1 |
//! | PUT, ttl changed | grant L′; txn(mod = m ? put k lease L′); revoke L | 2 + 1 |
//! | DELETE | txn(delete k); revoke L | 1 + 1 |
//! | session open | grant Ls; txn(mod = m ? put k lease Ls); revoke L | 2 + 1 |
//! | session frame | keepalive(lease of k) | 0 |
//! | session close | revoke Ls: deletes k only while k is still on Ls | 1 |
//!
//! A session's lease is its ownership token: a late close from a server that lost the session
//! revokes a lease the node no longer uses, and removes nothing. Every txn compares a revision,
//! so a lost race is re-read and tried again, never overwritten.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::table::{Entry, Table};
use super::{Command, LeaseCell, Limits, NodeInfo, NodeKey, NodeSpec, RegistryError, SessionGrant};
use crate::etcd::client::{b64, Client, EtcdError, Kv};
use crate::etcd::mirror::MirrorMsg;
use crate::etcd::{EtcdConfig, Link, NodeValue};
use crate::journal::{Journal, Loaded, StoredNode};
use crate::metrics::RegistryCounters;

/// Longest a write's reply waits for this server's copy to show it.
const VISIBLE_WAIT: Duration = Duration::from_secs(1);
/// How often the local copy is saved to the data dir when it changed (for a start while etcd
/// is away).
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// What the table holds about a node's place in etcd.
#[derive(Clone, Copy, Debug, Default)]
struct Held {
    lease: i64,
    mod_rev: i64,
    registered_unix_ms: u64,
}

/// A node as a command's task sees it when it starts.
#[derive(Clone)]
struct Cur {
    spec: NodeSpec,
    held: Held,
    cell: Option<Arc<LeaseCell>>,
}

/// Shared by the command tasks.
struct Ctx {
    client: Arc<Client>,
    cfg: EtcdConfig,
    counters: Arc<RegistryCounters>,
    applied: watch::Receiver<i64>,
    epoch: Instant,
    /// The smallest TTL etcd grants (learnt from the first raised grant).
    min_ttl: AtomicU32,
}

fn unavailable(e: EtcdError) -> RegistryError {
    RegistryError::Unavailable(format!(
        "{e}: the request is not acknowledged (repeating it is safe); DNS keeps answering the \
         last known set; retry shortly"
    ))
}

impl Ctx {
    async fn visible(&self, revision: i64) {
        let mut rx = self.applied.clone();
        let _ = tokio::time::timeout(VISIBLE_WAIT, rx.wait_for(|a| *a >= revision)).await;
    }

    fn raise_ttl(&self, ttl: u32) -> u32 {
        ttl.max(self.min_ttl.load(Relaxed))
    }

    fn learn_ttl(&self, asked: u32, granted: i64) {
        if granted > i64::from(asked) {
            let g = granted as u32;
            if self.min_ttl.fetch_max(g, Relaxed) < g {
                tracing::info!(asked, granted, "etcd raises leases below its minimum TTL; lease TTLs below it are reported as granted");
            }
        }
    }

    fn revoke_later(self: &Arc<Self>, lease: i64) {
        if lease == 0 {
            return;
        }
        let ctx = self.clone();
        tokio::spawn(async move {
            if let Err(e) = ctx.client.revoke(lease).await {
                tracing::debug!(lease, error = %e, "could not revoke a replaced lease (it runs out by itself)");
            }
        });
    }

    /// The node as etcd has it now (after a lost compare).
    async fn reread(&self, key: &NodeKey) -> Result<Option<Cur>, RegistryError> {
        let k = self.cfg.node_key(key);
        let r = self
            .client
            .range(&k, &[], 0, 1)
            .await
            .map_err(unavailable)?;
        Ok(r.kvs.first().and_then(cur_of))
    }

    async fn put(
        self: Arc<Self>,
        key: NodeKey,
        mut spec: NodeSpec,
        mut cur: Option<Cur>,
    ) -> Result<NodeInfo, RegistryError> {
        spec.ttl = self.raise_ttl(spec.ttl);
        let k = b64(&self.cfg.node_key(&key));
        let cell = cur.as_ref().and_then(|c| c.cell.clone());
        for _ in 0..5 {
            // The common case: an unchanged PUT is a renewal, a keepalive of the node's lease.
            if let Some(c) = cur.as_ref().filter(|c| c.spec == spec && c.held.lease != 0) {
                let left = self
                    .client
                    .keepalive(c.held.lease)
                    .await
                    .map_err(unavailable)?;
                if left > 0 {
                    RegistryCounters::inc(&self.counters.renewals);
                    if let Some(cell) = &cell {
                        cell.set_deadline(
                            self.epoch,
                            Instant::now() + Duration::from_secs(left as u64),
                        );
                    }
                    return Ok(info(key, spec, left, c.held.registered_unix_ms, false));
                }
                // The lease is gone (expired between two renewals): register again.
            }
            let same_ttl_lease = cur
                .as_ref()
                .filter(|c| c.spec.ttl == spec.ttl && c.held.lease != 0)
                .map(|c| c.held.lease);
            let (lease, granted, fresh) = match same_ttl_lease {
                Some(l) => (l, i64::from(spec.ttl), false),
                None => {
                    let (id, granted) = self.client.grant(spec.ttl).await.map_err(unavailable)?;
                    self.learn_ttl(spec.ttl, granted);
                    if granted > i64::from(spec.ttl) {
                        spec.ttl = granted as u32;
                    }
                    (id, granted, true)
                }
            };
            let registered = cur
                .as_ref()
                .map_or_else(crate::clock::unix_ms, |c| c.held.registered_unix_ms);
            let value = NodeValue::new(&spec, registered, "put").encode();
            let compare = match &cur {
                Some(c) => {
                    json!({"target": "MOD", "key": k, "mod_revision": c.held.mod_rev.to_string()})
                }
                None => json!({"target": "CREATE", "key": k, "create_revision": "0"}),
            };
            let txn = self.client.txn(&put_txn(&k, compare, &value, lease)).await;
            match txn {
                Ok(r) if r.succeeded => {
                    let old = cur.as_ref().map_or(0, |c| c.held.lease);
                    if fresh && old != lease {
                        self.revoke_later(old);
                    }
                    self.visible(r.header.revision).await;
                    return Ok(info(key, spec, granted, registered, false));
                }
                Ok(r) => {
                    if fresh {
                        self.revoke_later(lease);
                    }
                    cur = read_back(&r);
                }
                Err(EtcdError::LeaseNotFound) => {
                    // The lease ran out while we were using it: a fresh one next time.
                    cur = self.reread(&key).await?;
                    if let Some(c) = cur.as_mut() {
                        if c.held.lease == lease {
                            c.held.lease = 0;
                        }
                    }
                }
                Err(e) => {
                    if fresh {
                        self.revoke_later(lease);
                    }
                    return Err(unavailable(e));
                }
            }
        }
        Err(RegistryError::Unavailable(
            "this node is being changed through other servers at the same time; retry".into(),
        ))
    }

    async fn delete(self: Arc<Self>, key: NodeKey) -> Result<bool, RegistryError> {
        let k = b64(&self.cfg.node_key(&key));
        let r = self
            .client
            .txn(&json!({
                "success": [{"request_delete_range": {"key": k, "prev_kv": true}}],
            }))
            .await
            .map_err(unavailable)?;
        let del = r
            .responses
            .first()
            .and_then(|o| o.response_delete_range.as_ref());
        let Some(del) = del.filter(|d| d.deleted > 0) else {
            return Ok(false);
        };
        for kv in &del.prev_kvs {
            self.revoke_later(kv.lease);
        }
        self.visible(r.header.revision).await;
        Ok(true)
    }

    async fn renew(self: Arc<Self>, cur: Option<Cur>) -> Result<bool, RegistryError> {
        let Some(c) = cur.filter(|c| c.held.lease != 0) else {
            return Ok(false);
        };
        let left = self
            .client
            .keepalive(c.held.lease)
            .await
            .map_err(unavailable)?;
        if left <= 0 {
            return Ok(false);
        }
        RegistryCounters::inc(&self.counters.renewals);
        if let Some(cell) = &c.cell {
            cell.set_deadline(
                self.epoch,
                Instant::now() + Duration::from_secs(left as u64),
            );
        }
        Ok(true)
    }

    async fn session_open(
        self: Arc<Self>,
        key: NodeKey,
        mut cur: Option<Cur>,
    ) -> Result<Option<SessionGrant>, RegistryError> {
        RegistryCounters::inc(&self.counters.session_opens);
        let k = b64(&self.cfg.node_key(&key));
        for _ in 0..5 {
            let Some(c) = cur.clone() else {
                return Ok(None);
            };
            let (lease, granted) = self.client.grant(c.spec.ttl).await.map_err(unavailable)?;
            self.learn_ttl(c.spec.ttl, granted);
            let value = NodeValue::new(&c.spec, c.held.registered_unix_ms, "session").encode();
            let compare =
                json!({"target": "MOD", "key": k, "mod_revision": c.held.mod_rev.to_string()});
            let txn = self.client.txn(&put_txn(&k, compare, &value, lease)).await;
            match txn {
                Ok(r) if r.succeeded => {
                    self.revoke_later(c.held.lease);
                    self.visible(r.header.revision).await;
                    return Ok(Some(SessionGrant {
                        id: lease as u64,
                        ttl: granted.max(1) as u32,
                    }));
                }
                Ok(r) => {
                    self.revoke_later(lease);
                    cur = read_back(&r);
                }
                Err(e) => {
                    self.revoke_later(lease);
                    return Err(unavailable(e));
                }
            }
        }
        Err(RegistryError::Unavailable(
            "this node is being changed through other servers at the same time; retry".into(),
        ))
    }
}

/// The node as a txn that lost its compare read it (its failure branch is a range of the key).
fn read_back(r: &crate::etcd::client::TxnResponse) -> Option<Cur> {
    r.responses
        .first()
        .and_then(|o| o.response_range.as_ref())
        .and_then(|rr| rr.kvs.first())
        .and_then(cur_of)
}

/// `if compare then put(k, value, lease) else range(k)`.
fn put_txn(k: &str, compare: serde_json::Value, value: &[u8], lease: i64) -> serde_json::Value {
    json!({
        "compare": [compare],
        "success": [{"request_put": {"key": k, "value": b64(value), "lease": lease.to_string()}}],
        "failure": [{"request_range": {"key": k}}],
    })
}

fn cur_of(kv: &Kv) -> Option<Cur> {
    let (spec, registered_unix_ms, _) = NodeValue::decode(&kv.value).ok()?;
    Some(Cur {
        spec,
        held: Held {
            lease: kv.lease,
            mod_rev: kv.mod_revision,
            registered_unix_ms,
        },
        cell: None,
    })
}

fn info(
    key: NodeKey,
    spec: NodeSpec,
    left: i64,
    registered_unix_ms: u64,
    session: bool,
) -> NodeInfo {
    NodeInfo {
        key,
        spec,
        expires_in: Duration::from_secs(left.max(0) as u64),
        age: Duration::from_millis(crate::clock::unix_ms().saturating_sub(registered_unix_ms)),
        session,
    }
}

struct Owner {
    table: Table,
    held: HashMap<NodeKey, Held>,
    ctx: Arc<Ctx>,
    applied_tx: watch::Sender<i64>,
    link: Arc<Link>,
    limits: Limits,
    counters: Arc<RegistryCounters>,
    journal: Box<dyn Journal>,
    unsaved: bool,
}

pub(super) struct Parts {
    pub client: Arc<Client>,
    pub cfg: EtcdConfig,
    pub link: Arc<Link>,
    pub mirror: mpsc::Receiver<MirrorMsg>,
    /// The data dir's local copy, and what it held at start.
    pub journal: Box<dyn Journal>,
    pub loaded: Loaded,
}

pub(super) fn spawn(
    table: Table,
    parts: Parts,
    limits: Limits,
    counters: Arc<RegistryCounters>,
    rx: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let (applied_tx, applied_rx) = watch::channel(0i64);
    let ctx = Arc::new(Ctx {
        client: parts.client,
        cfg: parts.cfg,
        counters: counters.clone(),
        applied: applied_rx,
        epoch: table.epoch,
        min_ttl: AtomicU32::new(1),
    });
    let mut owner = Owner {
        table,
        held: HashMap::new(),
        ctx,
        applied_tx,
        link: parts.link,
        limits,
        counters,
        journal: parts.journal,
        unsaved: false,
    };
    owner.restore(parts.loaded.nodes);
    tokio::spawn(owner.run(rx, parts.mirror, shutdown))
}

impl Owner {
    /// The last local copy, served until the first list from etcd replaces it.
    fn restore(&mut self, nodes: Vec<StoredNode>) {
        let now = Instant::now();
        let mut n = 0;
        for s in nodes {
            let registered_unix_ms = s.registered_unix_ms;
            let Some((key, spec)) = super::writer::parse_stored(s) else {
                continue;
            };
            self.upsert(
                &key,
                spec,
                Held {
                    registered_unix_ms,
                    ..Held::default()
                },
                false,
                now,
            );
            n += 1;
        }
        if n > 0 {
            tracing::info!(
                nodes = n,
                "serving the last local copy of the registrations until etcd answers"
            );
            self.table.flush_at(0);
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut mirror: mpsc::Receiver<MirrorMsg>,
        shutdown: CancellationToken,
    ) {
        let mut cmds = Vec::with_capacity(256);
        let mut msgs = Vec::with_capacity(64);
        let mut save = tokio::time::interval(SAVE_EVERY);
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                n = mirror.recv_many(&mut msgs, 64) => {
                    if n == 0 { break }
                    let now = Instant::now();
                    let mut revision = None;
                    for m in msgs.drain(..) {
                        if let Some(r) = self.apply(m, now) {
                            revision = Some(r);
                        }
                    }
                    if let Some(r) = revision {
                        if self.table.flush_at(r as u64) {
                            RegistryCounters::inc(&self.counters.publishes);
                        }
                        self.link.applied.store(r, Relaxed);
                        self.applied_tx.send_replace(r);
                    }
                }
                n = rx.recv_many(&mut cmds, 1024) => {
                    if n == 0 { break }
                    for c in cmds.drain(..) {
                        self.command(c);
                    }
                }
                _ = save.tick() => self.save(),
            }
        }
        self.save();
        self.table.close();
    }

    /// Saves the copy to the data dir when it changed (a cache: etcd is the truth).
    fn save(&mut self) {
        if !self.unsaved {
            return;
        }
        let (now, unix_now) = (Instant::now(), crate::clock::unix_ms());
        // The lease is etcd's: the copy never expires by itself (a day is "never" here).
        let kept = now + Duration::from_secs(86_400);
        let mut live = self.table.iter().map(|(role, node, e)| {
            super::writer::stored_node(role, node, &e.spec, kept, e.registered, now, unix_now)
        });
        match self.journal.compact(&mut live) {
            Ok(()) => self.unsaved = false,
            Err(e) => {
                tracing::warn!(error = %e, "could not save the local copy of the registrations (only used to start while etcd is away)")
            }
        }
    }

    #[cfg(test)]
    fn table_index(&self) -> u64 {
        self.table.index()
    }

    fn cur(&self, key: &NodeKey) -> Option<Cur> {
        let e = self.table.get(key)?;
        Some(Cur {
            spec: (*e.spec).clone(),
            held: self.held.get(key).copied().unwrap_or_default(),
            cell: Some(e.cell.clone()),
        })
    }

    fn command(&mut self, cmd: Command) {
        let ctx = self.ctx.clone();
        match cmd {
            Command::Put { key, spec, reply } => {
                let cur = self.cur(&key);
                if cur.is_none() {
                    if let Err(e) = self.table.admit(&key, &self.limits) {
                        let _ = reply.send(Err(e));
                        return;
                    }
                }
                tokio::spawn(async move {
                    let _ = reply.send(ctx.put(key, spec, cur).await);
                });
            }
            Command::Delete { key, reply } => {
                tokio::spawn(async move {
                    let _ = reply.send(ctx.delete(key).await);
                });
            }
            Command::Renew { key, reply } => {
                let cur = self.cur(&key);
                tokio::spawn(async move {
                    let _ = reply.send(ctx.renew(cur).await);
                });
            }
            Command::SessionOpen { key, reply } => {
                let cur = self.cur(&key);
                tokio::spawn(async move {
                    let _ = reply.send(ctx.session_open(key, cur).await);
                });
            }
            Command::SessionClose { key, id } => {
                // Revoking the session's lease removes the node only if it still holds it.
                let holds = self.held.get(&key).is_some_and(|h| h.lease as u64 == id);
                if holds {
                    RegistryCounters::inc(&self.counters.session_closes);
                }
                tokio::spawn(async move {
                    if let Err(e) = ctx.client.revoke(id as i64).await {
                        tracing::warn!(role = %key.role, node = %key.node, error = %e, "could not revoke a closed session's lease: the node leaves when its lease runs out");
                    }
                });
            }
            Command::Barrier { reply } => {
                let _ = reply.send(Ok(()));
            }
            #[cfg(test)]
            Command::TableRoles { reply } => {
                let _ = reply.send(Ok(self.table.role_entries()));
            }
        }
    }

    /// Applies one mirror message; returns the revision the table is now at.
    fn apply(&mut self, m: MirrorMsg, now: Instant) -> Option<i64> {
        match m {
            MirrorMsg::SerialBase(base) => {
                self.table.set_serial_base(base);
                None
            }
            MirrorMsg::Events(events) => {
                let mut last = None;
                for ev in events {
                    let Some(key) = self.ctx.cfg.parse_key(&ev.kv.key) else {
                        self.link.dropped_events.fetch_add(1, Relaxed);
                        continue;
                    };
                    last = Some(ev.kv.mod_revision);
                    if ev.is_delete() {
                        self.remove(&key, true);
                    } else {
                        self.put_kv(&key, &ev.kv, now, true);
                    }
                }
                last
            }
            MirrorMsg::Listed { revision, kvs, .. } => {
                self.replace(revision, kvs, now, false);
                self.link.set_listed();
                Some(revision)
            }
            MirrorMsg::Verify { revision, kvs } => {
                let repairs = self.replace(revision, kvs, now, true);
                if repairs > 0 {
                    self.link.repairs.fetch_add(repairs, Relaxed);
                    tracing::error!(repairs, revision, "this server's copy differed from etcd (lost or duplicated watch events): repaired");
                    Some(revision)
                } else {
                    None
                }
            }
        }
    }

    /// Makes the table equal to `kvs`; returns how many nodes differed.
    fn replace(&mut self, _revision: i64, kvs: Vec<Kv>, now: Instant, verify: bool) -> u64 {
        let mut seen = std::collections::HashSet::with_capacity(kvs.len());
        let mut differ = 0;
        for kv in &kvs {
            let Some(key) = self.ctx.cfg.parse_key(&kv.key) else {
                continue;
            };
            let same = self
                .held
                .get(&key)
                .is_some_and(|h| h.mod_rev == kv.mod_revision && h.lease == kv.lease)
                && self.table.get(&key).is_some();
            if !same {
                differ += 1;
                if verify {
                    tracing::warn!(role = %key.role, node = %key.node, "repair: etcd has this node (changed), this server's copy did not");
                }
                self.put_kv(&key, kv, now, !verify);
            }
            seen.insert(key);
        }
        let gone: Vec<NodeKey> = self
            .table
            .iter()
            .map(|(role, node, _)| NodeKey {
                role: role.clone(),
                node: node.clone(),
            })
            .filter(|k| !seen.contains(k))
            .collect();
        for key in gone {
            differ += 1;
            if verify {
                tracing::warn!(role = %key.role, node = %key.node, "repair: etcd no longer has this node, this server's copy did");
            }
            self.remove(&key, !verify);
        }
        differ
    }

    fn put_kv(&mut self, key: &NodeKey, kv: &Kv, now: Instant, log: bool) {
        let (spec, registered_unix_ms, session) = match NodeValue::decode(&kv.value) {
            Ok(v) => v,
            Err(e) => {
                self.link.dropped_events.fetch_add(1, Relaxed);
                tracing::warn!(role = %key.role, node = %key.node, error = %e, "a node in etcd has a value this server cannot read: ignored");
                return;
            }
        };
        let held = Held {
            lease: kv.lease,
            mod_rev: kv.mod_revision,
            registered_unix_ms,
        };
        if log {
            match self.table.get(key) {
                None => {
                    RegistryCounters::inc(&self.counters.registrations);
                    tracing::info!(role = %key.role, node = %key.node, addr = %spec.addr, port = ?spec.port, ttl = spec.ttl, "registered");
                }
                Some(e) if !e.spec.visible_eq(&spec) => {
                    RegistryCounters::inc(&self.counters.changes);
                    tracing::info!(role = %key.role, node = %key.node, addr = %spec.addr, port = ?spec.port, ttl = spec.ttl, "changed");
                }
                Some(_) => {}
            }
        }
        self.upsert(key, spec, held, session, now);
    }

    fn upsert(&mut self, key: &NodeKey, spec: NodeSpec, held: Held, session: bool, now: Instant) {
        let deadline = now + Duration::from_secs(spec.ttl.into());
        let unix_now = crate::clock::unix_ms();
        let entry = match self.table.get(key) {
            Some(e) if *e.spec == spec => Entry {
                spec: e.spec.clone(),
                encoded: e.encoded.clone(),
                registered: e.registered,
                deadline,
                session: None,
                cell: e.cell.clone(),
            },
            other => Entry {
                spec: Arc::new(spec),
                encoded: Arc::default(),
                registered: other.map_or_else(
                    || {
                        let age =
                            Duration::from_millis(unix_now.saturating_sub(held.registered_unix_ms));
                        now.checked_sub(age).unwrap_or(now)
                    },
                    |e| e.registered,
                ),
                deadline,
                session: None,
                cell: other.map_or_else(|| Arc::new(LeaseCell::default()), |e| e.cell.clone()),
            },
        };
        let visible = self.table.get(key).is_none_or(|e| *e.spec != *entry.spec);
        entry.cell.set_deadline(self.table.epoch, deadline);
        entry.cell.set_session(session);
        self.table.insert(key, entry, visible);
        self.held.insert(key.clone(), held);
        self.unsaved |= visible;
    }

    fn remove(&mut self, key: &NodeKey, log: bool) {
        self.held.remove(key);
        if let Some(e) = self.table.remove(key) {
            self.unsaved = true;
            if log {
                RegistryCounters::inc(&self.counters.deregistrations);
                tracing::info!(role = %key.role, node = %key.node, addr = %e.spec.addr, "removed (deregistered, expired or session closed)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The owner's side of the mirror, fed synthetic messages: what etcd would send, in
    //! order, with re-lists and verifications in between (the real mirror and etcd are
    //! covered by tests/etcd.rs).
    use super::*;
    use crate::journal::MemoryJournal;
    use crate::registry::Label;
    use std::collections::BTreeMap;

    struct NoDns;
    impl crate::registry::Publish for NoDns {
        fn publish(&mut self, _: u64, _: &[crate::registry::RoleView<'_>]) {}
    }

    fn cfg() -> EtcdConfig {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:9".into()],
            prefix: "/rollcall".into(),
            timeout: Duration::from_secs(1),
            dial_timeout: Duration::from_secs(1),
            resync: Duration::from_secs(300),
        }
    }

    fn owner() -> Owner {
        let (table, _, _) = Table::new(Box::new(NoDns), 0);
        let (applied_tx, applied_rx) = watch::channel(0);
        let cfg = cfg();
        let client = Arc::new(Client::new(
            cfg.endpoints.clone(),
            cfg.timeout,
            cfg.dial_timeout,
        ));
        let counters = Arc::new(RegistryCounters::default());
        Owner {
            ctx: Arc::new(Ctx {
                client,
                cfg,
                counters: counters.clone(),
                applied: applied_rx,
                epoch: table.epoch,
                min_ttl: AtomicU32::new(1),
            }),
            table,
            held: HashMap::new(),
            applied_tx,
            link: Arc::new(Link::default()),
            limits: Limits::default(),
            counters,
            journal: Box::new(MemoryJournal),
            unsaved: false,
        }
    }

    fn kv(node: &str, last_octet: u8, rev: i64, lease: i64) -> Kv {
        let spec = NodeSpec {
            addr: std::net::Ipv4Addr::new(10, 0, 0, last_octet).into(),
            port: None,
            service: Label::parse("http").unwrap(),
            ttl: 30,
            weight: 1,
            meta: Default::default(),
        };
        Kv {
            key: format!("/rollcall/v1/nodes/app/{node}").into_bytes(),
            create_revision: rev,
            mod_revision: rev,
            value: NodeValue::new(&spec, 0, "put").encode(),
            lease,
        }
    }

    fn put_ev(node: &str, last_octet: u8, rev: i64) -> crate::etcd::client::Event {
        crate::etcd::client::Event {
            kind: String::new(),
            kv: kv(node, last_octet, rev, 7),
        }
    }

    fn del_ev(node: &str, rev: i64) -> crate::etcd::client::Event {
        crate::etcd::client::Event {
            kind: "DELETE".into(),
            kv: Kv {
                key: format!("/rollcall/v1/nodes/app/{node}").into_bytes(),
                mod_revision: rev,
                ..Kv::default()
            },
        }
    }

    /// The table's nodes: name -> last address octet.
    fn nodes(o: &Owner) -> BTreeMap<String, u8> {
        o.table
            .iter()
            .map(|(_, n, e)| {
                let std::net::IpAddr::V4(a) = e.spec.addr else {
                    panic!()
                };
                (n.to_string(), a.octets()[3])
            })
            .collect()
    }

    fn feed(o: &mut Owner, m: MirrorMsg) {
        let now = Instant::now();
        if let Some(r) = o.apply(m, now) {
            o.table.flush_at(r as u64);
        }
    }

    #[test]
    fn list_events_and_verification_repair_what_a_lost_event_left() {
        let mut o = owner();
        feed(
            &mut o,
            MirrorMsg::Listed {
                revision: 10,
                kvs: vec![kv("a", 1, 5, 7), kv("b", 2, 6, 7)],
                why: crate::etcd::Relist::Start,
            },
        );
        assert_eq!(
            nodes(&o),
            BTreeMap::from([("a".into(), 1), ("b".into(), 2)])
        );
        feed(
            &mut o,
            MirrorMsg::Events(vec![
                put_ev("c", 3, 11),
                del_ev("a", 12),
                put_ev("b", 22, 13),
            ]),
        );
        assert_eq!(
            nodes(&o),
            BTreeMap::from([("b".into(), 22), ("c".into(), 3)])
        );
        assert_eq!(o.table_index(), 13);
        // A lost DELETE of c and a lost PUT of d: the verification list at 13 repairs both.
        feed(
            &mut o,
            MirrorMsg::Verify {
                revision: 13,
                kvs: vec![kv("b", 22, 13, 7), kv("d", 4, 9, 7)],
            },
        );
        assert_eq!(
            nodes(&o),
            BTreeMap::from([("b".into(), 22), ("d".into(), 4)])
        );
        assert_eq!(o.link.repairs.load(Relaxed), 2);
        assert!(
            o.table_index() > 13,
            "a repair is a visible change: the index moves on"
        );
        // Nothing differs: nothing counted, nothing published.
        let before = o.table_index();
        feed(
            &mut o,
            MirrorMsg::Verify {
                revision: 13,
                kvs: vec![kv("b", 22, 13, 7), kv("d", 4, 9, 7)],
            },
        );
        assert_eq!(o.link.repairs.load(Relaxed), 2);
        assert_eq!(o.table_index(), before);
        // Keys outside our layout are ignored, never a panic.
        let mut junk = put_ev("x", 9, 20);
        junk.kv.key = b"/rollcall/v1/nodes/bad key/x".to_vec();
        let mut bad_value = put_ev("y", 9, 21);
        bad_value.kv.value = b"not json".to_vec();
        feed(&mut o, MirrorMsg::Events(vec![junk, bad_value]));
        assert_eq!(nodes(&o).len(), 2);
        assert_eq!(o.link.dropped_events.load(Relaxed), 2);
    }

    proptest::proptest! {
        /// Whatever mix of changes, re-lists and verifications arrives (in revision order, as
        /// the mirror sends them), the table ends equal to etcd's state and its index at the
        /// last revision.
        #[test]
        fn the_table_follows_etcd(ops in proptest::collection::vec((0u8..6, 0u8..8, 1u8..250), 1..120)) {
            let mut o = owner();
            let mut model: BTreeMap<String, (u8, i64)> = BTreeMap::new();
            let mut rev = 1i64;
            let mut pending = Vec::new();
            feed(&mut o, MirrorMsg::Listed { revision: 1, kvs: vec![], why: crate::etcd::Relist::Start });
            for (op, node, octet) in ops {
                let name = format!("n{node}");
                match op {
                    0..=2 => {
                        rev += 1;
                        model.insert(name.clone(), (octet, rev));
                        pending.push(put_ev(&name, octet, rev));
                    }
                    3 => {
                        if model.remove(&name).is_some() {
                            rev += 1;
                            pending.push(del_ev(&name, rev));
                        }
                    }
                    4 => {
                        // a watch response: the events so far, in one batch
                        feed(&mut o, MirrorMsg::Events(std::mem::take(&mut pending)));
                    }
                    _ => {
                        // the watch broke and compaction forced a re-list: the pending events
                        // are never delivered, the list replaces them
                        pending.clear();
                        let kvs = model.iter().map(|(n, (oc, r))| kv(n, *oc, *r, 7)).collect();
                        feed(&mut o, MirrorMsg::Listed { revision: rev, kvs, why: crate::etcd::Relist::Compacted });
                    }
                }
            }
            feed(&mut o, MirrorMsg::Events(std::mem::take(&mut pending)));
            let want: BTreeMap<String, u8> = model.iter().map(|(n, (oc, _))| (n.clone(), *oc)).collect();
            proptest::prop_assert_eq!(nodes(&o), want);
            // A verification at the end finds nothing to repair.
            let kvs = model.iter().map(|(n, (oc, r))| kv(n, *oc, *r, 7)).collect();
            feed(&mut o, MirrorMsg::Verify { revision: rev, kvs });
            proptest::prop_assert_eq!(o.link.repairs.load(Relaxed), 0);
        }
    }
}
