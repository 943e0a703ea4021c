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
//! | PUT, unchanged (renewal) | keepalive(L) and range(k), at once: k still on L? | 0 |
//! | PUT, changed, same ttl | txn(mod = m ? put k lease L) | 1 |
//! | PUT, ttl changed | grant L′; txn(mod = m ? put k lease L′); revoke L | 2 + 1 |
//! | DELETE | txn(delete k); revoke L, before the reply | 1 + 1 |
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

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::table::{Entry, Table};
use super::{
    Command, LeaseCell, Limits, NodeInfo, NodeKey, NodeSpec, RegistryError, SessionGrant, Validate,
};
use crate::etcd::client::{Client, Cond, EtcdError, Kv};
use crate::etcd::mirror::MirrorMsg;
use crate::etcd::{EtcdConfig, Link};

mod schema;
use crate::journal::{Journal, Loaded, StoredNode};
use crate::metrics::RegistryCounters;
use schema::NodeValue;

/// Longest a write's reply waits for this server's copy to show it.
const VISIBLE_WAIT: Duration = Duration::from_secs(1);
/// Lines logged about invalid keys in one batch; beyond, one line sums them up.
const INVALID_LOGGED_PER_BATCH: usize = 20;
/// Most events applied before the owner looks at its commands again.
const EVENTS_PER_CHUNK: usize = 512;
/// Shortest interval between two publications while changes keep coming.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// How often the lease cells of nodes about to show as expiring are refreshed from etcd.
const LEASES_EVERY: Duration = Duration::from_millis(250);
/// A cell is refreshed when it was last set a quarter of its ttl ago (agents renew every
/// third), and at least a second ago.
const LEASE_MIN_AGE: Duration = Duration::from_secs(1);
/// Most leases asked about per refresh, and at once.
const LEASES_PER_REFRESH: usize = 64;
const LEASES_AT_ONCE: usize = 8;

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

/// A registration read from etcd: the node, its spec, when it was registered (unix ms) and
/// whether a session holds it.
type Decoded = (NodeKey, NodeSpec, u64, bool);

/// A node as a command's task sees it when it starts.
#[derive(Clone)]
struct Cur {
    /// None: etcd holds a value under the key that is not a registration (treated as absent;
    /// a PUT overwrites it).
    spec: Option<NodeSpec>,
    held: Held,
    cell: Option<Arc<LeaseCell>>,
}

/// Shared by the command tasks.
struct Ctx {
    client: Arc<Client>,
    cfg: EtcdConfig,
    /// The API's rules for a registration, applied to every value read from etcd.
    validate: Validate,
    counters: Arc<RegistryCounters>,
    applied: watch::Receiver<i64>,
    epoch: Instant,
    /// The smallest TTL etcd grants (learnt from the first raised grant).
    min_ttl: AtomicU32,
    /// Revisions replies are waiting to see applied (how many replies for each): the owner
    /// publishes at once when one is reached (see [`Owner::publish`]).
    waits: std::sync::Mutex<std::collections::BTreeMap<i64, usize>>,
    /// Told by a reply that starts waiting: the owner publishes what it holds back.
    wake: tokio::sync::Notify,
}

/// One reply waiting for a revision, counted in [`Ctx::waits`] while it lives.
struct Waiting<'a> {
    ctx: &'a Ctx,
    revision: i64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut w = self.ctx.waits.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = w.get_mut(&self.revision) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.revision);
            }
        }
    }
}

fn unavailable(e: EtcdError) -> RegistryError {
    RegistryError::Unavailable(format!(
        "{e}: the request is not acknowledged (repeating it is safe); DNS keeps answering the \
         last known set; retry shortly"
    ))
}

impl Ctx {
    /// Waits until this server's copy shows `revision`; an error after [`VISIBLE_WAIT`]: the
    /// write is in etcd, but a 200 would promise it in this server's DNS.
    async fn visible(&self, revision: i64) -> Result<(), RegistryError> {
        let mut rx = self.applied.clone();
        if *rx.borrow() >= revision {
            return Ok(());
        }
        *self
            .waits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(revision)
            .or_default() += 1;
        let _waiting = Waiting {
            ctx: self,
            revision,
        };
        // The owner may have applied it already and held the publication back.
        self.wake.notify_one();
        let shown = tokio::time::timeout(VISIBLE_WAIT, rx.wait_for(|a| *a >= revision))
            .await
            .is_ok_and(|r| r.is_ok());
        if shown {
            return Ok(());
        }
        Err(RegistryError::Unavailable(format!(
            "the change is committed in etcd (revision {revision}), but this server's copy \
                 did not show it within {VISIBLE_WAIT:?}: this server is behind etcd, and other \
                 servers may show the change before it does; repeating the request is safe, \
                 or use another server"
        )))
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
        let k = schema::node_key(&self.cfg, key);
        let r = self
            .client
            .range(&k, &[], 0, 1)
            .await
            .map_err(unavailable)?;
        Ok(r.kvs.first().map(|kv| self.cur_of(kv)))
    }

    /// A key-value under the prefix as a registration, if it is one the API would have taken:
    /// its key in canonical form, its value readable and valid. `Err` has the node the key
    /// names (if it names one) and why the value is refused.
    fn decode(&self, kv: &Kv) -> Result<Decoded, (Option<NodeKey>, String)> {
        let Some(key) = schema::parse_key(&self.cfg, &kv.key) else {
            return Err((
                None,
                "the key is not <prefix>/v1/nodes/<role>/<node> in lower case".into(),
            ));
        };
        match NodeValue::decode(&kv.value) {
            Ok((spec, registered, session)) => match (self.validate)(&key, &spec) {
                Ok(()) => Ok((key, spec, registered, session)),
                Err(why) => Err((Some(key), why)),
            },
            Err(why) => Err((Some(key), why)),
        }
    }

    fn cur_of(&self, kv: &Kv) -> Cur {
        match self.decode(kv) {
            Ok((_, spec, registered_unix_ms, _)) => Cur {
                spec: Some(spec),
                held: Held {
                    lease: kv.lease,
                    mod_rev: kv.mod_revision,
                    registered_unix_ms,
                },
                cell: None,
            },
            Err(_) => Cur {
                spec: None,
                held: Held {
                    lease: 0,
                    mod_rev: kv.mod_revision,
                    registered_unix_ms: 0,
                },
                cell: None,
            },
        }
    }

    /// The node as a txn that lost its compare read it (its failure branch is a range of the
    /// key).
    fn read_back(&self, r: &crate::etcd::client::TxnResponse) -> Option<Cur> {
        r.responses
            .first()
            .and_then(|o| o.response_range.as_ref())
            .and_then(|rr| rr.kvs.first())
            .map(|kv| self.cur_of(kv))
    }

    async fn put(
        self: Arc<Self>,
        key: NodeKey,
        mut spec: NodeSpec,
        mut cur: Option<Cur>,
    ) -> Result<NodeInfo, RegistryError> {
        spec.ttl = self.raise_ttl(spec.ttl);
        let k = schema::node_key(&self.cfg, &key);
        let cell = cur.as_ref().and_then(|c| c.cell.clone());
        for _ in 0..5 {
            // The common case: an unchanged PUT is a renewal, a keepalive of the node's lease,
            // with a read of the key beside it. This server's copy may not have seen a DELETE
            // through another server yet (whose revoke of the lease follows the delete): a
            // renewal is acknowledged only if the key is still there, on the lease renewed.
            // Both calls go out at once, so a renewal costs one round trip.
            if let Some(c) = cur
                .as_ref()
                .filter(|c| c.spec.as_ref() == Some(&spec) && c.held.lease != 0)
            {
                let lease = c.held.lease;
                let (left, now) = tokio::join!(self.client.keepalive(lease), self.reread(&key));
                let left = left.map_err(unavailable)?;
                let now = now?;
                match now {
                    Some(n)
                        if left > 0 && n.held.lease == lease && n.spec.as_ref() == Some(&spec) =>
                    {
                        // What etcd holds may be newer than this server's copy (a PUT repeated
                        // after a 503, or a copy behind): a 200 promises it here too.
                        self.visible(n.held.mod_rev).await?;
                        RegistryCounters::inc(&self.counters.renewals);
                        if let Some(cell) = &cell {
                            cell.set_deadline(
                                self.epoch,
                                Instant::now() + Duration::from_secs(left as u64),
                            );
                        }
                        return Ok(info(key, spec, left, n.held.registered_unix_ms, false));
                    }
                    // Deleted, changed or moved to another lease meanwhile: go on from what
                    // etcd holds now (a fresh registration if the key is gone).
                    Some(n) if n.held.lease != lease || n.spec.as_ref() != Some(&spec) => {
                        cur = Some(n)
                    }
                    None => cur = None,
                    // The lease is gone (expired between two renewals): register again.
                    Some(mut n) => {
                        n.held.lease = 0;
                        cur = Some(n);
                    }
                }
                continue;
            }
            let same_ttl_lease = cur
                .as_ref()
                .filter(|c| c.spec.as_ref().is_some_and(|s| s.ttl == spec.ttl) && c.held.lease != 0)
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
                .filter(|c| c.spec.is_some())
                .map_or_else(crate::clock::unix_ms, |c| c.held.registered_unix_ms);
            let value = NodeValue::new(&spec, registered, "put").encode();
            let cond = match &cur {
                Some(c) => Cond::ModRevision(c.held.mod_rev),
                None => Cond::Absent,
            };
            let txn = self.client.put_if(&k, cond, &value, lease).await;
            match txn {
                Ok(r) if r.succeeded => {
                    let old = cur.as_ref().map_or(0, |c| c.held.lease);
                    if fresh && old != lease {
                        self.revoke_later(old);
                    }
                    self.visible(r.header.revision).await?;
                    return Ok(info(key, spec, granted, registered, false));
                }
                Ok(r) => {
                    if fresh {
                        self.revoke_later(lease);
                    }
                    cur = self.read_back(&r);
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
        let (revision, del) = self
            .client
            .delete(&schema::node_key(&self.cfg, &key))
            .await
            .map_err(unavailable)?;
        if del.deleted == 0 {
            return Ok(false);
        }
        // A value that was not a registration is gone now, but nothing was registered.
        let was_node = del
            .prev_kvs
            .first()
            .is_none_or(|kv| self.cur_of(kv).spec.is_some());
        // The lease is revoked before the reply (beside the wait for this server's copy): once
        // the 204 is out, no keepalive of the old lease succeeds, so a session or a renewal
        // through a server that has not seen the delete yet cannot go on holding it.
        // (Not the lease of a value that was no registration: it may be anybody's.)
        let lease = del
            .prev_kvs
            .first()
            .filter(|_| was_node)
            .map_or(0, |kv| kv.lease);
        let revoke = async {
            if lease != 0 {
                if let Err(e) = self.client.revoke(lease).await {
                    tracing::debug!(lease, error = %e, "could not revoke a deleted node's lease (it runs out by itself)");
                }
            }
        };
        let ((), visible) = tokio::join!(revoke, self.visible(revision));
        visible?;
        Ok(was_node)
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
        let k = schema::node_key(&self.cfg, &key);
        for _ in 0..5 {
            let Some((c, spec)) = cur.clone().and_then(|c| Some((c.clone(), c.spec?))) else {
                return Ok(None);
            };
            let (lease, granted) = self.client.grant(spec.ttl).await.map_err(unavailable)?;
            self.learn_ttl(spec.ttl, granted);
            let value = NodeValue::new(&spec, c.held.registered_unix_ms, "session").encode();
            let cond = Cond::ModRevision(c.held.mod_rev);
            let txn = self.client.put_if(&k, cond, &value, lease).await;
            match txn {
                Ok(r) if r.succeeded => {
                    self.revoke_later(c.held.lease);
                    self.visible(r.header.revision).await?;
                    return Ok(Some(SessionGrant {
                        id: lease as u64,
                        ttl: granted.max(1) as u32,
                    }));
                }
                Ok(r) => {
                    self.revoke_later(lease);
                    cur = self.read_back(&r);
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

/// A mirror message cut into pieces of about [`EVENTS_PER_CHUNK`] events, each ending at the
/// end of a revision (a revision is published whole).
fn chunks(m: MirrorMsg) -> Vec<MirrorMsg> {
    let MirrorMsg::Events(mut events) = m else {
        return vec![m];
    };
    let mut out = Vec::new();
    while events.len() > EVENTS_PER_CHUNK {
        let rev = events[EVENTS_PER_CHUNK - 1].kv.mod_revision;
        let cut = EVENTS_PER_CHUNK
            + events[EVENTS_PER_CHUNK..]
                .iter()
                .take_while(|e| e.kv.mod_revision == rev)
                .count();
        let rest = events.split_off(cut);
        out.push(MirrorMsg::Events(events));
        events = rest;
    }
    out.push(MirrorMsg::Events(events));
    out
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
    /// No save before this (see [`Owner::save`]).
    next_save: Option<Instant>,
    /// Applied to the table, not published yet (see [`Owner::publish`]).
    unpublished: Option<i64>,
    last_publish: Instant,
    /// Keys under the prefix whose value is not a registration, with the revision counted.
    invalid: HashMap<Vec<u8>, i64>,
    /// Lines logged about such keys in the current batch (a flood is summed up).
    invalid_logged: usize,
    /// When each leased node's cell is next refreshed from etcd, soonest first (and the
    /// other way round, to move an entry).
    lease_due: std::collections::BTreeSet<(Instant, NodeKey)>,
    lease_at: HashMap<NodeKey, Instant>,
}

pub(super) struct Parts {
    pub client: Arc<Client>,
    pub cfg: EtcdConfig,
    pub validate: Validate,
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
        validate: parts.validate,
        counters: counters.clone(),
        applied: applied_rx,
        epoch: table.epoch,
        min_ttl: AtomicU32::new(1),
        waits: Default::default(),
        wake: tokio::sync::Notify::new(),
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
        next_save: None,
        unpublished: None,
        last_publish: Instant::now()
            .checked_sub(PUBLISH_EVERY)
            .unwrap_or_else(Instant::now),
        invalid: HashMap::new(),
        invalid_logged: 0,
        lease_due: Default::default(),
        lease_at: HashMap::new(),
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
        let mut leases = tokio::time::interval(LEASES_EVERY);
        leases.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let refreshing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ctx = self.ctx.clone();
        let wake = &ctx.wake;
        loop {
            let publish_at = self.unpublished.map(|_| self.last_publish + PUBLISH_EVERY);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                // Commands first: each only starts a task of its own, and a flood of changes
                // written straight into etcd must not keep them waiting.
                n = rx.recv_many(&mut cmds, 1024) => {
                    if n == 0 { break }
                    for c in cmds.drain(..) {
                        self.command(c);
                    }
                }
                n = mirror.recv_many(&mut msgs, 64) => {
                    if n == 0 { break }
                    self.apply_batch(&mut msgs, &mut rx, &mut cmds).await;
                }
                _ = tokio::time::sleep_until(publish_at.unwrap_or_else(Instant::now)), if publish_at.is_some() => {
                    self.publish_now();
                }
                _ = wake.notified() => {
                    let held_back = self.unpublished;
                    self.publish(held_back);
                }
                _ = save.tick() => self.save(false),
                _ = leases.tick() => self.refresh_leases(&refreshing),
            }
        }
        self.save(true);
        self.table.close();
    }

    /// Applies mirror messages in chunks of about [`EVENTS_PER_CHUNK`] events (never splitting
    /// a revision), starting the commands that arrived meanwhile after each chunk, and
    /// publishing at most every [`PUBLISH_EVERY`]: 100,000 keys written straight into etcd
    /// hold a PUT through this server back by no more than a chunk's work before its etcd calls
    /// start.
    async fn apply_batch(
        &mut self,
        msgs: &mut Vec<MirrorMsg>,
        rx: &mut mpsc::Receiver<Command>,
        cmds: &mut Vec<Command>,
    ) {
        let now = Instant::now();
        let mut revision = None;
        let mut done = 0usize;
        let mut listed = false;
        for m in msgs.drain(..) {
            // A list is published at once: /readyz says ready from then on.
            listed |= matches!(m, MirrorMsg::Listed { .. });
            for part in chunks(m) {
                if let MirrorMsg::Events(e) = &part {
                    done += e.len();
                }
                if let Some(r) = self.apply(part, now) {
                    revision = Some(r);
                }
                if done >= EVENTS_PER_CHUNK {
                    done = 0;
                    self.publish(revision.take());
                    tokio::task::yield_now().await;
                    while let Ok(c) = rx.try_recv() {
                        cmds.push(c);
                    }
                    for c in cmds.drain(..) {
                        self.command(c);
                    }
                }
            }
        }
        self.publish(revision);
        if listed {
            self.publish_now();
            self.link.set_listed();
        }
        if self.invalid_logged > INVALID_LOGGED_PER_BATCH {
            tracing::warn!(
                more = self.invalid_logged - INVALID_LOGGED_PER_BATCH,
                "more keys under the prefix in etcd are not registrations the API would take: not served, not logged one by one (rollcall_etcd_invalid_values_total)"
            );
        }
        self.invalid_logged = 0;
    }

    /// Nodes are renewed by keepalives through any server, which change nothing this server
    /// sees: each node's lease cell (what `expires_in`, the status page and `rollcall status`
    /// show) is set when its key changes, and refreshed here from etcd's LeaseTimeToLive once
    /// it is a quarter of the node's ttl old (at least a second; at most
    /// [`LEASES_PER_REFRESH`] leases every [`LEASES_EVERY`], the stalest first). A lease gone
    /// leaves the cell as it is: its key's delete follows.
    fn refresh_leases(&mut self, refreshing: &Arc<std::sync::atomic::AtomicBool>) {
        if refreshing.load(Relaxed) || !self.link.is_up() {
            return;
        }
        let epoch = self.table.epoch;
        let now = Instant::now();
        let mut due: Vec<(i64, Arc<LeaseCell>)> = Vec::new();
        while due.len() < LEASES_PER_REFRESH {
            let Some((at, key)) = self.lease_due.first().cloned() else {
                break;
            };
            if at > now {
                break;
            }
            self.lease_due.pop_first();
            self.lease_at.remove(&key);
            let lease = self.held.get(&key).map_or(0, |h| h.lease);
            if let Some(e) = self.table.get(&key).filter(|_| lease != 0) {
                due.push((lease, e.cell.clone()));
                let ttl = e.spec.ttl;
                self.schedule_lease(&key, lease, ttl, now);
            }
        }
        if due.is_empty() {
            return;
        }
        refreshing.store(true, Relaxed);
        let (client, refreshing) = (self.ctx.client.clone(), refreshing.clone());
        tokio::spawn(async move {
            use futures_util::StreamExt;
            futures_util::stream::iter(due)
                .for_each_concurrent(LEASES_AT_ONCE, |(lease, cell)| {
                    let client = client.clone();
                    async move {
                        if let Ok(left) = client.time_to_live(lease).await {
                            if left > 0 {
                                cell.set_deadline(
                                    epoch,
                                    Instant::now() + Duration::from_secs(left as u64),
                                );
                            }
                        }
                    }
                })
                .await;
            refreshing.store(false, Relaxed);
        });
    }

    /// The table now stands at `revision`: publish, and wake the replies waiting for it. A
    /// publication re-encodes each changed role whole for DNS: under a flood of changes they
    /// are made at most every [`PUBLISH_EVERY`] (the rest waits in the table).
    fn publish(&mut self, revision: Option<i64>) {
        let Some(r) = revision else { return };
        self.unpublished = Some(r);
        // A reply waiting for a revision reached is never held back (read-your-writes
        // latency stays a watch hop).
        let awaited = self
            .ctx
            .waits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first_key_value()
            .is_some_and(|(w, _)| *w <= r);
        if awaited || self.last_publish.elapsed() >= PUBLISH_EVERY {
            self.publish_now();
        }
    }

    fn publish_now(&mut self) {
        let Some(r) = self.unpublished.take() else {
            return;
        };
        if self.table.flush_at(r as u64) {
            RegistryCounters::inc(&self.counters.publishes);
        }
        self.last_publish = Instant::now();
        self.link.applied.store(r, Relaxed);
        self.applied_tx.send_replace(r);
    }

    /// Saves the copy to the data dir when it changed (a cache: etcd is the truth). A save
    /// holds the owner (commands and changes wait): with many nodes it is made at most every
    /// ten times its own duration, so that saving takes at most a tenth of the owner's time.
    fn save(&mut self, now_anyway: bool) {
        if !self.unsaved || (!now_anyway && self.next_save.is_some_and(|at| Instant::now() < at)) {
            return;
        }
        let (now, unix_now) = (Instant::now(), crate::clock::unix_ms());
        // The lease is etcd's: the copy never expires by itself (a day is "never" here).
        let kept = now + Duration::from_secs(86_400);
        let mut live = self.table.iter().map(|(role, node, e)| {
            super::writer::stored_node(role, node, &e.spec, kept, e.registered, now, unix_now)
        });
        let result = self.journal.compact(&mut live);
        self.next_save = Some(Instant::now() + now.elapsed() * 10);
        match result {
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
            spec: Some((*e.spec).clone()),
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
                    last = Some(ev.kv.mod_revision);
                    if ev.is_delete() {
                        self.invalid.remove(&ev.kv.key);
                        if let Some(key) = schema::parse_key(&self.ctx.cfg, &ev.kv.key) {
                            self.remove(&key, true);
                        }
                    } else if let Some((key, spec, registered, session)) = self.node_of(&ev.kv) {
                        self.put_node(&key, spec, &ev.kv, registered, session, now, true);
                    }
                }
                last
            }
            MirrorMsg::Listed { revision, kvs, .. } => {
                self.replace(revision, kvs, now, false);
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
        let mut still_invalid = std::collections::HashSet::new();
        for kv in &kvs {
            let same = schema::parse_key(&self.ctx.cfg, &kv.key).filter(|key| {
                self.held
                    .get(key)
                    .is_some_and(|h| h.mod_rev == kv.mod_revision && h.lease == kv.lease)
                    && self.table.get(key).is_some()
            });
            if let Some(key) = same {
                // Validated when it was applied.
                seen.insert(key);
                continue;
            }
            let Some((key, spec, registered, session)) = self.node_of(kv) else {
                still_invalid.insert(kv.key.clone());
                continue;
            };
            differ += 1;
            if verify {
                tracing::warn!(role = %key.role, node = %key.node, "repair: etcd has this node (changed), this server's copy did not");
            }
            self.put_node(&key, spec, kv, registered, session, now, !verify);
            seen.insert(key);
        }
        self.invalid.retain(|k, _| still_invalid.contains(k));
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

    /// A key-value under the prefix as a node, or None when it is not a registration the API
    /// would take: then the node its key names (if any) is removed, as if the key were absent,
    /// the same on every server; counted once per key and revision, logged once per key.
    fn node_of(&mut self, kv: &Kv) -> Option<Decoded> {
        match self.ctx.decode(kv) {
            Ok(node) => {
                self.invalid.remove(&kv.key);
                Some(node)
            }
            Err((key, why)) => {
                let before = self.invalid.insert(kv.key.clone(), kv.mod_revision);
                if before != Some(kv.mod_revision) {
                    self.link.invalid_values.fetch_add(1, Relaxed);
                }
                if before.is_none() {
                    self.invalid_logged += 1;
                    if self.invalid_logged <= INVALID_LOGGED_PER_BATCH {
                        tracing::warn!(key = %String::from_utf8_lossy(&kv.key), revision = kv.mod_revision, reason = %why, "a key under the prefix in etcd is not a registration the API would take: not served (as if absent)");
                    }
                }
                if let Some(key) = key {
                    self.remove(&key, true);
                }
                None
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn put_node(
        &mut self,
        key: &NodeKey,
        spec: NodeSpec,
        kv: &Kv,
        registered_unix_ms: u64,
        session: bool,
        now: Instant,
        log: bool,
    ) {
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
        let ttl = entry.spec.ttl;
        self.table.insert(key, entry, visible);
        self.held.insert(key.clone(), held);
        self.schedule_lease(key, held.lease, ttl, now);
        self.unsaved |= visible;
    }

    /// The node's lease cell is next refreshed a quarter of its ttl from `now` (at least
    /// [`LEASE_MIN_AGE`]); never without a lease.
    fn schedule_lease(&mut self, key: &NodeKey, lease: i64, ttl: u32, now: Instant) {
        if let Some(at) = self.lease_at.remove(key) {
            self.lease_due.remove(&(at, key.clone()));
        }
        if lease != 0 {
            let at = now + (Duration::from_secs(ttl.into()) / 4).max(LEASE_MIN_AGE);
            self.lease_due.insert((at, key.clone()));
            self.lease_at.insert(key.clone(), at);
        }
    }

    fn remove(&mut self, key: &NodeKey, log: bool) {
        self.held.remove(key);
        self.schedule_lease(key, 0, 0, Instant::now());
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
            watch_line_max: crate::etcd::client::WATCH_LINE_MAX,
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
                // The API's rules are tested in tests/etcd.rs; here: the ttl range only.
                validate: Arc::new(|_: &NodeKey, spec: &NodeSpec| {
                    (1..=86_400)
                        .contains(&spec.ttl)
                        .then_some(())
                        .ok_or_else(|| "ttl out of range".to_owned())
                }),
                counters: counters.clone(),
                applied: applied_rx,
                epoch: table.epoch,
                min_ttl: AtomicU32::new(1),
                waits: Default::default(),
                wake: tokio::sync::Notify::new(),
            }),
            table,
            held: HashMap::new(),
            applied_tx,
            link: Arc::new(Link::default()),
            limits: Limits::default(),
            counters,
            journal: Box::new(MemoryJournal),
            unsaved: false,
            next_save: None,
            unpublished: None,
            last_publish: Instant::now(),
            invalid: HashMap::new(),
            invalid_logged: 0,
            lease_due: Default::default(),
            lease_at: HashMap::new(),
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
        assert_eq!(o.link.invalid_values.load(Relaxed), 2);
        // A good value overwritten with garbage (or with what the API refuses) removes the
        // node, as if the key were gone; the same key and revision again is not counted again.
        let mut garbage = put_ev("b", 22, 22);
        garbage.kv.value = b"not json".to_vec();
        let mut ttl0 = put_ev("d", 4, 23);
        ttl0.kv.value = String::from_utf8(ttl0.kv.value)
            .unwrap()
            .replace("\"ttl\":30", "\"ttl\":0")
            .into_bytes();
        let upper = {
            let mut e = put_ev("e", 5, 24);
            e.kv.key = b"/rollcall/v1/nodes/App/E".to_vec();
            e
        };
        feed(&mut o, MirrorMsg::Events(vec![garbage, ttl0, upper]));
        assert_eq!(nodes(&o), BTreeMap::new());
        assert_eq!(o.link.invalid_values.load(Relaxed), 5);
        let mut again = kv("b", 22, 22, 7);
        again.value = b"not json".to_vec();
        feed(
            &mut o,
            MirrorMsg::Verify {
                revision: 24,
                kvs: vec![again],
            },
        );
        assert_eq!(o.link.invalid_values.load(Relaxed), 5);
        assert_eq!(o.link.repairs.load(Relaxed), 2);
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
