//! The embedded owner: one task that owns every lease.
//!
//! Each loop iteration takes a batch of commands, applies them to the [`Table`] (queuing one
//! journal record per change), expires due leases, publishes the roles whose visible set
//! changed, commits the journal, and only then replies. A `PUT` that got its 200 is on disk and
//! already in DNS. When the journal fails (a full or failing disk), every request of the batch
//! is answered with a storage error, and nothing is acknowledged again until the whole live set
//! has been rewritten successfully (tried at most once a second).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::table::{Entry, Table};
use super::{
    Command, LeaseCell, Limits, NodeInfo, NodeKey, NodeSpec, RegistryError, Removal, SessionGrant,
};
use crate::journal::{unix_ms, Journal, Loaded, StoredNode, StoredRecord};
use crate::metrics::RegistryCounters;
use crate::registry::Label;

/// How often a broken journal is rewritten while it stays broken.
const REWRITE_EVERY: Duration = Duration::from_secs(1);

struct Writer {
    table: Table,
    /// Lease ends, earliest first.
    deadlines: std::collections::BTreeSet<(Instant, NodeKey)>,
    next_session: u64,
    journal: Box<dyn Journal>,
    limits: Limits,
    counters: Arc<RegistryCounters>,
    /// The current batch changed a registration: fsync before replying.
    durable: bool,
    last_rewrite: Option<Instant>,
    /// What the last failed write or rewrite of the data dir said.
    last_error: String,
}

/// A reply held until the batch is durable.
enum Reply {
    Put(
        oneshot::Sender<Result<NodeInfo, RegistryError>>,
        Result<NodeInfo, RegistryError>,
    ),
    Found(oneshot::Sender<Result<bool, RegistryError>>, bool),
    Session(
        oneshot::Sender<Result<Option<SessionGrant>, RegistryError>>,
        Option<SessionGrant>,
    ),
    /// Stores nothing, so it never fails.
    Barrier(oneshot::Sender<Result<(), RegistryError>>),
}

impl Reply {
    /// Sends the result, or `failed` instead of any success when the batch was not stored.
    fn send(self, failed: Option<&RegistryError>) {
        match (self, failed) {
            (Reply::Barrier(tx), _) => drop(tx.send(Ok(()))),
            (Reply::Put(tx, Err(e)), _) => drop(tx.send(Err(e))),
            (Reply::Put(tx, ok), None) => drop(tx.send(ok)),
            (Reply::Found(tx, found), None) => drop(tx.send(Ok(found))),
            (Reply::Session(tx, grant), None) => drop(tx.send(Ok(grant))),
            (Reply::Put(tx, _), Some(e)) => drop(tx.send(Err(e.clone()))),
            (Reply::Found(tx, _), Some(e)) => drop(tx.send(Err(e.clone()))),
            (Reply::Session(tx, _), Some(e)) => drop(tx.send(Err(e.clone()))),
        }
    }
}

pub(super) fn spawn(
    table: Table,
    journal: Box<dyn Journal>,
    loaded: Loaded,
    limits: Limits,
    counters: Arc<RegistryCounters>,
    rx: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut writer = Writer {
        table,
        deadlines: Default::default(),
        next_session: 1,
        journal,
        limits,
        counters,
        durable: false,
        last_rewrite: None,
        last_error: String::new(),
    };
    writer.restore(loaded.nodes);
    tokio::spawn(writer.run(rx, shutdown))
}

impl Writer {
    fn restore(&mut self, nodes: Vec<StoredNode>) {
        let now = Instant::now();
        let unix_now = unix_ms();
        let mut restored = 0;
        for n in nodes {
            let Some((key, spec)) = parse_stored(n.clone()) else {
                continue;
            };
            // Never more than a ttl away, whatever the wall clock said when it was written.
            let left = Duration::from_millis(n.expires_unix_ms.saturating_sub(unix_now))
                .min(Duration::from_secs(n.ttl.into()));
            let age = Duration::from_millis(unix_now.saturating_sub(n.registered_unix_ms));
            let deadline = now + left;
            let cell = Arc::new(LeaseCell::default());
            cell.set_deadline(self.table.epoch, deadline);
            self.deadlines.insert((deadline, key.clone()));
            let entry = Entry {
                spec: Arc::new(spec),
                encoded: Arc::default(),
                registered: now.checked_sub(age).unwrap_or(now),
                deadline,
                session: None,
                cell,
            };
            self.table.insert(&key, entry, true);
            restored += 1;
        }
        if restored > 0 {
            tracing::info!(nodes = restored, "restored registrations from the data dir");
        }
        if self.table.flush() {
            RegistryCounters::inc(&self.counters.publishes);
        }
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
            // Queued in the journal already; publish, then make durable, then acknowledge:
            // DNS sees a change as early as possible, a client only once it is on disk.
            if self.table.flush() {
                RegistryCounters::inc(&self.counters.publishes);
            }
            let failed = self.commit(now).err();
            for reply in replies.drain(..) {
                reply.send(failed.as_ref());
            }
        }
        drop(rx);
        if self.journal.healthy() {
            if let Err(e) = self.journal.commit(true) {
                tracing::error!(error = %e, "could not sync the data dir at shutdown");
            }
        } else {
            self.rewrite(Instant::now());
        }
        self.table.close();
    }

    /// Makes the batch durable (or at least written, for renewals only), compacting when the
    /// log has outgrown the live set. A broken journal is rewritten whole before anything is
    /// acknowledged again.
    fn commit(&mut self, now: Instant) -> Result<(), RegistryError> {
        let durable = std::mem::take(&mut self.durable);
        if self.journal.healthy() {
            let started = Instant::now();
            let result = self.journal.commit(durable);
            if durable {
                self.counters.commit_durable.observe(started.elapsed());
            } else {
                self.counters.commit_buffered.observe(started.elapsed());
            }
            match result {
                Ok(()) => {
                    if self.journal.wants_compaction(self.table.total()) {
                        // A failed compaction leaves the journal broken; this batch is on
                        // disk already, so it is still acknowledged.
                        self.rewrite(now);
                    }
                    return Ok(());
                }
                Err(e) => {
                    RegistryCounters::inc(&self.counters.storage_failures);
                    tracing::error!(error = %e, "could not write the data dir: answering 503 until a rewrite of the live set succeeds");
                    self.last_error = e.to_string();
                }
            }
        }
        if self
            .last_rewrite
            .is_none_or(|t| now.duration_since(t) >= REWRITE_EVERY)
            && self.rewrite(now)
        {
            tracing::info!(
                nodes = self.table.total(),
                "the data dir is writable again: live set rewritten"
            );
            return Ok(());
        }
        // Not "nothing was stored": the batch's records may have reached the log before the
        // failed sync, and the next successful rewrite stores the live set, this request's
        // change included.
        Err(RegistryError::Storage(self.last_error.clone()))
    }

    /// Rewrites the journal from the live set; true on success.
    fn rewrite(&mut self, now: Instant) -> bool {
        self.last_rewrite = Some(now);
        let unix_now = unix_ms();
        let epoch_now = now;
        let mut live = self.table.iter().map(|(role, node, e)| {
            stored_node(
                role,
                node,
                &e.spec,
                e.deadline,
                e.registered,
                epoch_now,
                unix_now,
            )
        });
        match self.journal.compact(&mut live) {
            Ok(()) => {
                RegistryCounters::inc(&self.counters.compactions);
                true
            }
            Err(e) => {
                RegistryCounters::inc(&self.counters.storage_failures);
                tracing::error!(error = %e, "could not rewrite the data dir");
                self.last_error = e.to_string();
                false
            }
        }
    }

    fn apply(&mut self, cmd: Command, now: Instant) -> Option<Reply> {
        match cmd {
            Command::Put { key, spec, reply } => {
                let result = self.put(key, spec, now);
                Some(Reply::Put(reply, result))
            }
            Command::Delete { key, reply } => {
                let found = self.remove(&key, Removal::Deregistered);
                Some(Reply::Found(reply, found))
            }
            Command::Renew { key, reply } => {
                let found = self.renew(&key, now);
                Some(Reply::Found(reply, found))
            }
            Command::SessionOpen { key, reply } => {
                RegistryCounters::inc(&self.counters.session_opens);
                let id = self.next_session;
                self.next_session += 1;
                let grant = self.table.get_mut(&key).map(|e| {
                    e.session = Some(id);
                    e.cell.set_session(true);
                    SessionGrant {
                        id,
                        ttl: e.spec.ttl,
                    }
                });
                if grant.is_some() {
                    self.renew(&key, now);
                }
                Some(Reply::Session(reply, grant))
            }
            Command::SessionClose { key, id } => {
                let holds = self.table.get(&key).is_some_and(|e| e.session == Some(id));
                if holds {
                    RegistryCounters::inc(&self.counters.session_closes);
                    self.remove(&key, Removal::SessionClosed);
                }
                None
            }
            Command::Barrier { reply } => Some(Reply::Barrier(reply)),
            #[cfg(test)]
            Command::TableRoles { reply } => {
                let _ = reply.send(Ok(self.table.role_entries()));
                None
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
        let existing = self.table.get(&key);
        if existing.is_none() {
            // Checked before anything is created: a refused PUT leaves no trace.
            self.table.admit(&key, &self.limits)?;
        }
        let changed = existing.is_none_or(|e| !e.spec.visible_eq(&spec));
        let unix_now = unix_ms();
        let (registered, session, cell) = match existing {
            Some(e) => (e.registered, e.session, e.cell.clone()),
            None => (now, None, Arc::new(LeaseCell::default())),
        };
        // An unchanged spec keeps its Arc and the readers' encoding of it.
        let kept = existing
            .filter(|_| !changed)
            .map(|e| (e.spec.clone(), e.encoded.clone()));
        let record = if changed {
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
        self.journal.append(&record);
        self.durable |= changed;

        match existing {
            Some(old) => {
                let old_deadline = old.deadline;
                if changed {
                    RegistryCounters::inc(&self.counters.changes);
                    tracing::info!(role = %key.role, node = %key.node, addr = %spec.addr, port = ?spec.port, ttl = spec.ttl, "changed");
                } else {
                    RegistryCounters::inc(&self.counters.renewals);
                }
                self.deadlines.remove(&(old_deadline, key.clone()));
            }
            None => {
                RegistryCounters::inc(&self.counters.registrations);
                tracing::info!(role = %key.role, node = %key.node, addr = %spec.addr, port = ?spec.port, ttl = spec.ttl, "registered");
            }
        }
        self.deadlines.insert((deadline, key.clone()));
        cell.set_deadline(self.table.epoch, deadline);
        let info = NodeInfo {
            key: key.clone(),
            spec: spec.clone(),
            expires_in: deadline - now,
            age: now - registered,
            session: session.is_some(),
        };
        let (spec, encoded) = kept.unwrap_or_else(|| (Arc::new(spec), Arc::default()));
        let entry = Entry {
            spec,
            encoded,
            registered,
            deadline,
            session,
            cell,
        };
        self.table.insert(&key, entry, changed);
        Ok(info)
    }

    fn renew(&mut self, key: &NodeKey, now: Instant) -> bool {
        let epoch = self.table.epoch;
        let Some(e) = self.table.get_mut(key) else {
            return false;
        };
        RegistryCounters::inc(&self.counters.renewals);
        let deadline = now + Duration::from_secs(e.spec.ttl.into());
        let old = std::mem::replace(&mut e.deadline, deadline);
        e.cell.set_deadline(epoch, deadline);
        let ttl = e.spec.ttl;
        self.deadlines.remove(&(old, key.clone()));
        self.deadlines.insert((deadline, key.clone()));
        self.journal.append(&StoredRecord::Renew {
            role: key.role.to_string(),
            node: key.node.to_string(),
            expires_unix_ms: unix_ms() + u64::from(ttl) * 1000,
        });
        true
    }

    fn remove(&mut self, key: &NodeKey, why: Removal) -> bool {
        let Some(e) = self.table.remove(key) else {
            return false;
        };
        self.deadlines.remove(&(e.deadline, key.clone()));
        self.journal.append(&StoredRecord::Del {
            role: key.role.to_string(),
            node: key.node.to_string(),
        });
        self.durable = true;
        let counter = match why {
            Removal::Expired => &self.counters.expiries,
            Removal::Deregistered | Removal::SessionClosed => &self.counters.deregistrations,
        };
        RegistryCounters::inc(counter);
        tracing::info!(role = %key.role, node = %key.node, addr = %e.spec.addr, "{}", why.as_str());
        true
    }

    fn expire(&mut self, now: Instant) {
        while let Some((deadline, _)) = self.deadlines.first() {
            if *deadline > now {
                break;
            }
            let (_, key) = self.deadlines.pop_first().expect("first exists");
            self.remove(&key, Removal::Expired);
        }
    }
}

/// A registration as the journal keeps it, read back (None, logged: invalid, dropped).
pub(super) fn parse_stored(n: StoredNode) -> Option<(NodeKey, NodeSpec)> {
    let (Ok(role), Ok(node), Ok(addr), Ok(service)) = (
        Label::parse(&n.role),
        Label::parse(&n.node),
        n.addr.parse::<IpAddr>(),
        Label::parse(&n.service),
    ) else {
        tracing::warn!(role = %n.role, node = %n.node, "stored registration is invalid, dropped");
        return None;
    };
    let spec = NodeSpec {
        addr,
        port: n.port,
        service,
        ttl: n.ttl,
        weight: n.weight,
        meta: n.meta,
    };
    Some((NodeKey { role, node }, spec))
}

/// A lease as the journal keeps it: instants turned into unix milliseconds.
pub(super) fn stored_node(
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
