//! The mirror: this server's copy of the registrations in etcd, fed in revision order.
//!
//! ```text
//! start:   paginated list at one pinned revision R  -> Listed{R}      applied = R
//! watch:   from applied + 1; events with mod_revision <= applied are dropped (duplicates,
//!          answers "back in time"); each response -> Events           applied = last event
//! broken:  transport error, member hung (the probe moved on) -> resume at applied + 1 on the
//!          next member; never at "now", which would skip the gap silently
//! cancel:  compact_revision != 0 or a cancel -> list again (never re-watch that revision)
//! verify:  every --etcd-resync (±20 %), a list pinned at `applied` -> Verify{applied}: the
//!          owner compares it with its copy at exactly that revision and repairs differences
//!          (etcd 3.4.23 has watch bugs that lose or duplicate events, fixed in later 3.4s)
//! ```
//!
//! A probe reads one key every second (linearizable: it needs a leader) and keeps the link's
//! up/down state; when it had to move to another member, the watch follows.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, Notify};
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

use super::client::{b64, Client, EtcdError, Event, Kv};
use super::{prefix_end, EtcdConfig, Link, Relist};

/// What the mirror tells the owner, in revision order.
pub enum MirrorMsg {
    /// Everything at `revision`: replace the copy.
    Listed {
        revision: i64,
        kvs: Vec<Kv>,
        why: Relist,
    },
    /// Events after the last applied revision, in order.
    Events(Vec<Event>),
    /// Everything at `revision`, which is the last revision sent: compare and repair.
    Verify { revision: i64, kvs: Vec<Kv> },
    /// The cluster's SOA serial base (learnt once).
    SerialBase(u32),
}

const PAGE: i64 = 500;

/// A full list of the node keys, paginated, pinned at one revision (`revision` 0: now).
pub async fn list_all(
    client: &Client,
    cfg: &EtcdConfig,
    revision: i64,
) -> Result<(i64, Vec<Kv>), EtcdError> {
    let prefix = cfg.nodes_prefix();
    let end = prefix_end(&prefix);
    let mut from = prefix;
    let mut pinned = revision;
    let mut kvs = Vec::new();
    loop {
        let page = client.range(&from, &end, pinned, PAGE).await?;
        if pinned == 0 {
            pinned = page.header.revision;
        }
        let more = page.more;
        if let Some(last) = page.kvs.last() {
            from = last.key.clone();
            from.push(0);
        }
        kvs.extend(page.kvs);
        if !more {
            return Ok((pinned, kvs));
        }
    }
}

/// Creates the serial base once for the cluster, or reads it.
async fn serial_base(client: &Client, cfg: &EtcdConfig) -> Result<u32, EtcdError> {
    let key = b64(&cfg.serial_base_key());
    let now = crate::clock::unix_secs() as u32;
    let r = client
        .txn(&json!({
            "compare": [{"target": "CREATE", "key": key, "create_revision": "0"}],
            "success": [{"request_put": {"key": key, "value": b64(now.to_string().as_bytes())}}],
            "failure": [{"request_range": {"key": key}}],
        }))
        .await?;
    if r.succeeded {
        return Ok(now);
    }
    let v = r
        .responses
        .first()
        .and_then(|o| o.response_range.as_ref())
        .and_then(|rr| rr.kvs.first())
        .and_then(|kv| std::str::from_utf8(&kv.value).ok()?.trim().parse().ok());
    Ok(v.unwrap_or(now))
}

fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.8..1.2))
}

pub struct Mirror {
    pub client: Arc<Client>,
    pub cfg: EtcdConfig,
    pub link: Arc<Link>,
    pub tx: mpsc::Sender<MirrorMsg>,
    pub shutdown: CancellationToken,
}

impl Mirror {
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        let watching = Arc::new(AtomicUsize::new(usize::MAX));
        let reconnect = Arc::new(Notify::new());
        tokio::spawn(probe(
            self.client.clone(),
            self.cfg.clone(),
            self.link.clone(),
            watching.clone(),
            reconnect.clone(),
            self.shutdown.clone(),
        ));
        tokio::spawn(self.run(watching, reconnect))
    }

    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = sleep(d) => true,
        }
    }

    async fn run(self, watching: Arc<AtomicUsize>, reconnect: Arc<Notify>) {
        let mut applied: i64 = 0;
        let mut need_list = Some(Relist::Start);
        let mut serial_sent = false;
        let mut next_verify = Instant::now() + jittered(self.cfg.resync);
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            if !serial_sent {
                match serial_base(&self.client, &self.cfg).await {
                    Ok(base) => {
                        serial_sent = true;
                        if self.tx.send(MirrorMsg::SerialBase(base)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        self.link.set_up(false, &e.to_string());
                        if !self.pause(Duration::from_millis(250)).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            if let Some(why) = need_list {
                let start = Instant::now();
                match list_all(&self.client, &self.cfg, 0).await {
                    Ok((revision, kvs)) => {
                        let n = kvs.len();
                        self.link.count_relist(why);
                        self.link.set_up(true, "");
                        tracing::info!(
                            revision,
                            nodes = n,
                            reason = why.as_str(),
                            ms = start.elapsed().as_millis() as u64,
                            "listed the registrations in etcd"
                        );
                        if self
                            .tx
                            .send(MirrorMsg::Listed { revision, kvs, why })
                            .await
                            .is_err()
                        {
                            return;
                        }
                        applied = revision;
                        need_list = None;
                    }
                    Err(e) => {
                        self.link.set_up(false, &e.to_string());
                        if !self.pause(Duration::from_millis(250)).await {
                            return;
                        }
                        continue;
                    }
                }
            }

            let (member, base) = self.client.current();
            let base = base.to_owned();
            let mut stream = match self
                .client
                .watch(
                    member,
                    &self.cfg.nodes_prefix(),
                    &prefix_end(&self.cfg.nodes_prefix()),
                    applied + 1,
                )
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "could not open the etcd watch");
                    self.link.set_up(false, &e.to_string());
                    self.client.next_endpoint(member);
                    if !self.pause(Duration::from_millis(100)).await {
                        return;
                    }
                    continue;
                }
            };
            watching.store(member, Relaxed);
            tracing::debug!(member = %base, from = applied + 1, "watching etcd");
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = reconnect.notified() => {
                        tracing::info!(from = %base, "moving the etcd watch to another member");
                        break;
                    }
                    _ = tokio::time::sleep_until(next_verify) => {
                        next_verify = Instant::now() + jittered(self.cfg.resync);
                        match list_all(&self.client, &self.cfg, applied).await {
                            Ok((revision, kvs)) => {
                                if self.tx.send(MirrorMsg::Verify { revision, kvs }).await.is_err() {
                                    return;
                                }
                            }
                            Err(EtcdError::Compacted) => {
                                need_list = Some(Relist::Resync);
                                break;
                            }
                            Err(e) => tracing::warn!(error = %e, "could not verify this server's copy against etcd; trying again later"),
                        }
                    }
                    r = stream.next() => match r {
                        Ok(resp) => {
                            if resp.compact_revision != 0 {
                                tracing::warn!(applied, compacted = resp.compact_revision, "etcd compacted revisions this server had not seen: listing again");
                                need_list = Some(Relist::Compacted);
                                break;
                            }
                            if resp.canceled {
                                tracing::warn!(reason = %resp.cancel_reason, "etcd canceled the watch: listing again");
                                need_list = Some(Relist::Canceled);
                                break;
                            }
                            self.link.set_up(true, "");
                            let before = applied;
                            let mut events = resp.events;
                            let n = events.len();
                            events.retain(|e| e.kv.mod_revision > before);
                            if events.len() < n {
                                self.link.dropped_events.fetch_add((n - events.len()) as u64, Relaxed);
                            }
                            if let Some(last) = events.last() {
                                applied = last.kv.mod_revision;
                                if self.tx.send(MirrorMsg::Events(events)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            tracing::info!(member = %base, error = %e, resume = applied + 1, "the etcd watch broke: resuming on the next member");
                            self.client.next_endpoint(member);
                            break;
                        }
                    }
                }
            }
            watching.store(usize::MAX, Relaxed);
        }
    }
}

/// Every second: is etcd there, with a leader? Moves the watch when the member it uses stops
/// answering.
async fn probe(
    client: Arc<Client>,
    cfg: EtcdConfig,
    link: Arc<Link>,
    watching: Arc<AtomicUsize>,
    reconnect: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let key = cfg.serial_base_key();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match client.range(&key, &[], 0, 1).await {
            Ok(r) => {
                link.seen.store(r.header.revision, Relaxed);
                link.set_up(true, "");
            }
            Err(e) => link.set_up(false, &e.to_string()),
        }
        let w = watching.load(Relaxed);
        if w != usize::MAX && w != client.current().0 {
            reconnect.notify_one();
        }
    }
}
