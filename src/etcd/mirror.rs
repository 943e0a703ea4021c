//! The mirror: this server's copy of the registrations in etcd, fed in revision order.
//!
//! ```text
//! start:   paginated list at one pinned revision R  -> Listed{R}      applied = R
//! watch:   from applied + 1; events with mod_revision <= applied are dropped (duplicates,
//!          answers "back in time"); each response -> Events           applied = last event
//! broken:  transport error, member hung (the probe moved on) -> resume at applied + 1 on the
//!          next member; never at "now", which would skip the gap silently
//! cancel:  compact_revision != 0 or a cancel -> list again (never re-watch that revision)
//! stuck:   a response over the line limit, or two watches in a row that broke (or stayed
//!          silent while behind) before passing anything on -> list again
//! fragment: the watch asks for fragments; the events of a fragment's last revision wait for
//!          the next fragment (a revision is passed on whole)
//! verify:  every --etcd-resync (±20 %), a list pinned at `applied` -> Verify{applied}: the
//!          owner compares it with its copy at exactly that revision and repairs differences
//!          (etcd 3.4.23 has watch bugs that lose or duplicate events, fixed in later 3.4s)
//! ```
//!
//! A probe reads one key every second (linearizable: it needs a leader) and keeps the link's
//! up/down state; when it had to move to another member, the watch follows. It also tells
//! whether the copy is caught up (at etcd's revision, or nothing under the prefix changed
//! since): `/readyz` is 503 when it has not been for a few seconds.

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

/// Behind etcd this long with the link up: the watch is given up and opened again.
const WATCH_STALLED: Duration = Duration::from_secs(10);
/// Longest interval between two checks that nothing under the prefix changed.
const CHECK_EVERY: Duration = Duration::from_secs(2);

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
        // Keys under the prefix at `applied` (for the probe's "anything pending?" check).
        let mut keys: i64 = 0;
        // Watches in a row that broke before passing anything on.
        let mut failed_resumes = 0u32;
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
                        keys = n as i64;
                        self.link.set_sent(applied, keys);
                        failed_resumes = 0;
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
                    if matches!(e, EtcdError::WatchNotOpened(_)) {
                        // The member is there but does not open the watch: a failed resume
                        // too (a refused connection is etcd away: resume when it is back).
                        failed_resumes += 1;
                        if failed_resumes >= 2 {
                            tracing::warn!(error = %e, resume = applied + 1, "the etcd watch cannot be opened: listing again");
                            need_list = Some(Relist::Stuck);
                        }
                    }
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
            // Events of a fragmented response not passed on yet: those of its last revision,
            // which the next fragment may continue (a resume at applied + 1 must never skip
            // the rest of a revision).
            let mut held: Vec<Event> = Vec::new();
            // This watch passed events on (a resume that did is not a failed one).
            let mut progressed = false;
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = reconnect.notified() => {
                        if self.link.stalled.swap(false, Relaxed) {
                            // The probe found the copy behind etcd for a while with this watch
                            // silent: a failed resume.
                            tracing::warn!(member = %base, applied, "this server's copy has been behind etcd for a while with the watch silent: watching again");
                            if !progressed {
                                failed_resumes += 1;
                            }
                            if failed_resumes >= 2 {
                                need_list = Some(Relist::Stuck);
                            }
                        } else {
                            tracing::info!(from = %base, "moving the etcd watch to another member");
                        }
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
                            held.extend(events);
                            let ready = if resp.fragment {
                                self.link.fragments.fetch_add(1, Relaxed);
                                let last = held.last().map_or(0, |e| e.kv.mod_revision);
                                held.iter().take_while(|e| e.kv.mod_revision < last).count()
                            } else {
                                held.len()
                            };
                            let events: Vec<Event> = held.drain(..ready).collect();
                            if let Some(last) = events.last() {
                                applied = last.kv.mod_revision;
                                keys += key_delta(&events);
                                self.link.set_sent(applied, keys);
                                progressed = true;
                                failed_resumes = 0;
                                if self.tx.send(MirrorMsg::Events(events)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            if !progressed {
                                failed_resumes += 1;
                            }
                            if matches!(e, EtcdError::TooLarge(_)) || failed_resumes >= 2 {
                                // Resuming again would fetch the same thing again (a catch-up
                                // too large, or a member that breaks every resume): a list at
                                // the current revision replaces the history instead.
                                tracing::warn!(member = %base, error = %e, resume = applied + 1, failed_resumes, "the etcd watch cannot resume: listing again");
                                need_list = Some(Relist::Stuck);
                            } else {
                                tracing::info!(member = %base, error = %e, resume = applied + 1, "the etcd watch broke: resuming on the next member");
                            }
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

/// How the number of keys under the prefix changes with `events` (creates and deletes).
fn key_delta(events: &[Event]) -> i64 {
    events
        .iter()
        .map(|e| {
            if e.is_delete() {
                -1
            } else {
                i64::from(e.kv.create_revision == e.kv.mod_revision)
            }
        })
        .sum()
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
    let mut kicked: Option<Instant> = None;
    let mut checked: Option<Instant> = None;
    let mut prev_applied = 0i64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match client.range(&key, &[], 0, 1).await {
            Ok(r) => {
                let seen = r.header.revision;
                link.seen.store(seen, Relaxed);
                link.set_up(true, "");
                // Caught up? Yes if the copy is at etcd's revision. Otherwise (the revisions
                // after it may be other keys': another prefix, the meta key) ask etcd whether
                // anything under the prefix changed after what the mirror passed on, and
                // whether as many keys are there as the mirror counted (a delete leaves no
                // key to compare).
                // The txn makes etcd read every key of the prefix: only while the copy is
                // not moving (not merely applying a burst), and at most every CHECK_EVERY.
                let applied = link.applied.load(Relaxed);
                let (sent, keys) = link.sent();
                let still = std::mem::replace(&mut prev_applied, applied) == applied;
                if applied >= seen {
                    link.set_caught_up();
                } else if sent > 0
                    && applied >= sent
                    && still
                    && checked.is_none_or(|t: Instant| t.elapsed() >= CHECK_EVERY)
                {
                    checked = Some(Instant::now());
                    let prefix = cfg.nodes_prefix();
                    if let Ok(Some(n)) = client
                        .unchanged_since(&prefix, &prefix_end(&prefix), sent)
                        .await
                    {
                        if n == keys {
                            link.set_caught_up();
                        }
                    }
                }
            }
            Err(e) => link.set_up(false, &e.to_string()),
        }
        let w = watching.load(Relaxed);
        if w != usize::MAX && w != client.current().0 {
            reconnect.notify_one();
        } else if w != usize::MAX
            && link.is_up()
            && link.behind().is_some_and(|b| b >= WATCH_STALLED)
            && link.silent() >= WATCH_STALLED
            && kicked.is_none_or(|k: Instant| k.elapsed() >= WATCH_STALLED)
        {
            // Behind for a while with etcd answering and nothing from the watch meanwhile (a
            // black-holed stream, a member that stopped sending; not a long catch-up): watch
            // again; twice in a row, list.
            kicked = Some(Instant::now());
            link.stalled.store(true, Relaxed);
            reconnect.notify_one();
        }
    }
}
