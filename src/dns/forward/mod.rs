//! Forwarding: names outside every served zone, for clients inside `--allow-recursion`, are
//! relayed to upstream resolvers (dnsmasq's main job), off the authoritative fast path.
//!
//! ```text
//! UDP thread --cache hit--> answered on the UDP thread (a read lock, a copy, patched bytes)
//! UDP thread / TCP task --Job (query bytes, client, reply-to)--> forwarder thread (own runtime)
//!     cache hit?     -> answered from the entry
//!     rule           -> most specific --forward DOMAIN wins; `DOMAIN=` means never forward
//!     per client     -> at most --forward-max-per-client queries of one /24 (/56) waiting
//!     same question  -> already asked upstream? wait for that answer (one upstream query)
//!     upstreams      -> up ones first (fastest first), each try bounded by --forward-timeout;
//!                       timeout, SERVFAIL, REFUSED, NOTIMP, FORMERR: the next one at once;
//!                       NOERROR and NXDOMAIN are final; whole budget --forward-budget
//!     reply          -> every waiter gets the entry with its own ID, case and EDNS, cut to its
//!                       UDP size (TC); UDP replies pass the response rate limit
//! ```
//!
//! - `rules.rs`: `--forward` rules and which one covers a name;
//! - `cache.rs`: [`cache::Entry`] (an upstream answer checked and made neutral, served to any
//!   client by patching bytes) and the byte-bounded [`cache::Cache`];
//! - `upstream.rs`: one upstream's health and counters, one query to it (random port, ID and
//!   letter case).
//!
//! Loops: an upstream equal to our own address is disabled for good. Every upstream is also
//! sent a probe name made of fresh random bits, at start, every `LOOP_RECHECK` (30 s) and when it
//! goes down or comes back up; if that name reaches us as a query within `PROBE_WINDOW` (5 s), the upstream
//! forwards to us and is skipped for `LOOP_HOLD` (90 s) (the next probes renew it while the loop
//! lasts). A probe name seen later, or never sent, disables nothing.

pub mod cache;
mod rules;
mod upstream;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::cache::{Cache, Entry, SERVFAIL_TTL};
use self::rules::{is_under, wire_name, Rules};
use self::upstream::{Ask, Upstream};
use super::acl::Acl;
use super::rrl::{RateLimit, Verdict};
use super::wire::{client_query, ClientQuery, Transport};
use crate::dns::stats::DnsCounters;
use crate::metrics::{Exposition, Kind};

pub use self::rules::{parse_rule, Rule};

const PROBE_EVERY: Duration = Duration::from_millis(500);
/// How often every upstream is sent a new loop probe.
const LOOP_RECHECK: Duration = Duration::from_secs(30);
/// How long after it was sent a probe name coming back counts as a loop.
const PROBE_WINDOW: Duration = Duration::from_secs(5);
/// How long an upstream found looping is skipped (renewed by every probe that comes back).
const LOOP_HOLD: Duration = Duration::from_secs(90);
/// `rollcall-loop-check.` in wire form: the suffix of every probe name.
const PROBE_SUFFIX: &[u8] = b"\x13rollcall-loop-check\x00";
const RCODE_SERVFAIL: u8 = 2;
const RCODE_REFUSED: u8 = 5;

#[derive(Clone, Debug)]
pub struct ForwardConfig {
    pub rules: Vec<Rule>,
    /// Who may have names forwarded (REFUSED for everyone else).
    pub allow: Acl,
    /// One try on one upstream.
    pub timeout: Duration,
    /// All tries of one query; then SERVFAIL.
    pub budget: Duration,
    /// Cache entries (0: no cache).
    pub cache: usize,
    /// Cache size in bytes (0: no cache).
    pub cache_bytes: usize,
    /// Distinct questions being asked upstream at once; more get SERVFAIL.
    pub max_inflight: usize,
    /// Queries of one client prefix (/24, /56) waiting at once; more get SERVFAIL.
    pub max_per_client: usize,
}

/// Where a forwarded answer goes.
pub enum Reply {
    /// Sent from (a clone of) the socket the query came in on.
    Udp {
        socket: Arc<std::net::UdpSocket>,
        to: SocketAddr,
    },
    Tcp(oneshot::Sender<Vec<u8>>),
}

pub struct Job {
    pub query: Vec<u8>,
    pub reply: Reply,
    pub client: IpAddr,
}

/// What `/metrics` shows of forwarding.
#[derive(Default)]
pub struct ForwardStats {
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub refused_acl: AtomicU64,
    pub overloaded: AtomicU64,
    pub client_limited: AtomicU64,
    pub coalesced: AtomicU64,
    pub servfail_budget: AtomicU64,
    pub loops: AtomicU64,
    upstreams: std::sync::OnceLock<(Vec<Arc<Upstream>>, Instant)>,
    cache: std::sync::OnceLock<Arc<Cache>>,
}

impl crate::metrics::Render for ForwardStats {
    fn render(&self, out: &mut Exposition) {
        for (name, help, c) in [
            (
                "rollcall_forward_cache_hits_total",
                "Forwarded names answered from the cache.",
                &self.cache_hits,
            ),
            (
                "rollcall_forward_cache_misses_total",
                "Forwarded names not in the cache.",
                &self.cache_misses,
            ),
            (
                "rollcall_forward_refused_total",
                "Names outside our zones refused to clients outside --allow-recursion.",
                &self.refused_acl,
            ),
            (
                "rollcall_forward_overloaded_total",
                "Queries answered SERVFAIL because --forward-max-inflight were in flight.",
                &self.overloaded,
            ),
            (
                "rollcall_forward_client_limited_total",
                "Queries answered SERVFAIL because their client prefix had --forward-max-per-client waiting.",
                &self.client_limited,
            ),
            (
                "rollcall_forward_coalesced_total",
                "Queries that waited for the same question already asked upstream.",
                &self.coalesced,
            ),
            (
                "rollcall_forward_servfail_total",
                "Queries answered SERVFAIL because no upstream answered within the budget.",
                &self.servfail_budget,
            ),
            (
                "rollcall_forward_loops_detected_total",
                "Loop probes that came back to us (an upstream forwarding to us).",
                &self.loops,
            ),
        ] {
            out.counter(name, help, c.load(Relaxed));
        }
        if let Some(cache) = self.cache.get() {
            let u = cache.usage();
            out.gauge(
                "rollcall_forward_cache_bytes",
                "What the forwarding cache holds, in bytes (bounded by --forward-cache-size).",
                u.bytes,
            );
            out.gauge(
                "rollcall_forward_cache_entries",
                "Answers in the forwarding cache.",
                u.entries,
            );
        }
        let Some((ups, epoch)) = self.upstreams.get() else {
            return;
        };
        let now_ms = epoch.elapsed().as_millis() as u64;
        let names: Vec<String> = ups.iter().map(|u| u.addr.to_string()).collect();
        let mut f = out.family(
            "rollcall_forward_upstream_up",
            Kind::Gauge,
            "1 while the upstream answers.",
        );
        for (u, name) in ups.iter().zip(&names) {
            f.sample(
                &[("upstream", name)],
                u8::from(u.up.load(Relaxed) && u.usable(now_ms)),
            );
        }
        let mut f = out.family(
            "rollcall_forward_queries_total",
            Kind::Counter,
            "Upstream answers by rcode (timeout: none in time).",
        );
        for (u, name) in ups.iter().zip(&names) {
            let s = &u.stats;
            for (rcode, c) in [
                ("NOERROR", &s.noerror),
                ("NXDOMAIN", &s.nxdomain),
                ("SERVFAIL", &s.servfail),
                ("REFUSED", &s.refused),
                ("other", &s.other),
                ("timeout", &s.timeouts),
            ] {
                f.sample(&[("upstream", name), ("rcode", rcode)], c.load(Relaxed));
            }
        }
        let mut f = out.family(
            "rollcall_forward_latency_seconds",
            Kind::Summary,
            "Upstream answer time (sum and count).",
        );
        for (u, name) in ups.iter().zip(&names) {
            f.sum_count(
                &[("upstream", name)],
                u.stats.micros.load(Relaxed) as f64 / 1e6,
                u.stats.answers.load(Relaxed),
            );
        }
    }
}

/// The handle the transports hold.
pub struct Forwarder {
    tx: mpsc::Sender<Job>,
    cache: Arc<Cache>,
    allow: Acl,
    pub stats: Arc<ForwardStats>,
}

impl Forwarder {
    /// A cache hit answered on the caller's thread into `out`: Some(truncated), or None
    /// (submit the query). `key` is the caller's scratch buffer.
    pub fn answer_cached(
        &self,
        q: &[u8],
        out: &mut Vec<u8>,
        key: &mut Vec<u8>,
        transport: Transport,
    ) -> Option<bool> {
        if !self.cache.enabled() {
            return None;
        }
        let cq = client_query(q, key)?;
        let entry = self.cache.get(key)?;
        self.stats.cache_hits.fetch_add(1, Relaxed);
        Some(entry.write(q, &cq, cq.limit(transport), out))
    }

    /// Whether `ip` may have names forwarded.
    pub fn allowed(&self, ip: IpAddr) -> bool {
        self.allow.allows(ip)
    }

    /// Hands a query to the forwarder; gives it back when too many are queued.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => {
                self.stats.overloaded.fetch_add(1, Relaxed);
                j
            }
        })
    }
}

/// One client waiting for an answer.
struct Waiter {
    query: Vec<u8>,
    cq: ClientQuery,
    client: IpAddr,
    reply: Reply,
}

/// What the forwarder thread keeps between jobs.
#[derive(Default)]
struct State {
    /// Questions asked upstream now, with the clients waiting for each.
    inflight: HashMap<Vec<u8>, Vec<Waiter>>,
    /// Waiting queries per client prefix.
    per_client: HashMap<u64, usize>,
    waiting: usize,
    /// Loop probe names sent, with their upstream and when.
    probes: HashMap<Vec<u8>, (usize, Instant)>,
}

struct Inner {
    cfg: ForwardConfig,
    upstreams: Vec<Arc<Upstream>>,
    rules: Rules,
    cache: Arc<Cache>,
    stats: Arc<ForwardStats>,
    rate_limit: Arc<RateLimit>,
    /// Counters of the UDP answers sent from this thread (one writer: this thread).
    counters: Arc<DnsCounters>,
    state: Mutex<State>,
    epoch: Instant,
}

/// Starts the forwarder on a thread and runtime of its own. `own` are this server's DNS
/// addresses: an upstream equal to one of them is disabled (a loop). UDP answers sent from the
/// forwarder pass `rate_limit` and are counted in `counters`.
pub fn start(
    cfg: ForwardConfig,
    own: &[SocketAddr],
    rate_limit: Arc<RateLimit>,
    counters: Arc<DnsCounters>,
    shutdown: CancellationToken,
) -> Forwarder {
    let mut upstreams: Vec<Arc<Upstream>> = Vec::new();
    let mut rules = Vec::new();
    for r in &cfg.rules {
        let mut idx = Vec::new();
        for a in &r.upstreams {
            let i = match upstreams.iter().position(|u| u.addr == *a) {
                Some(i) => i,
                None => {
                    let ourselves = own.iter().any(|o| same_socket(*o, *a));
                    if ourselves {
                        tracing::error!(upstream = %a, "--forward names this server itself: disabled (it would be a loop)");
                    }
                    upstreams.push(Arc::new(Upstream::new(*a, ourselves)));
                    upstreams.len() - 1
                }
            };
            idx.push(i);
        }
        rules.push((wire_name(&r.domain), idx));
    }
    let epoch = Instant::now();
    let stats = Arc::new(ForwardStats::default());
    let _ = stats.upstreams.set((upstreams.clone(), epoch));
    let cache = Arc::new(Cache::new(cfg.cache_bytes, cfg.cache));
    let _ = stats.cache.set(cache.clone());
    let allow = cfg.allow.clone();
    let inner = Arc::new(Inner {
        cfg: cfg.clone(),
        upstreams,
        rules: Rules::new(rules),
        cache: cache.clone(),
        stats: stats.clone(),
        rate_limit,
        counters,
        state: Mutex::default(),
        epoch,
    });
    let (tx, rx) = mpsc::channel(cfg.max_inflight.max(16));
    std::thread::Builder::new()
        .name("dns-forward".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the forwarder");
            rt.block_on(run(inner, rx, shutdown));
        })
        .expect("spawning a thread");
    Forwarder {
        tx,
        cache,
        allow,
        stats,
    }
}

fn same_socket(own: SocketAddr, up: SocketAddr) -> bool {
    own.port() == up.port()
        && (own.ip() == up.ip() || (own.ip().is_unspecified() && up.ip().is_loopback()))
}

/// The prefix a client is counted under (/24 for IPv4, /56 for IPv6), as rate limiting does.
fn prefix_of(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => u64::from(u32::from(v4) >> 8),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u64::from(u32::from(v4) >> 8),
            None => (u128::from(v6) >> 72) as u64 | 1 << 63,
        },
    }
}

async fn run(inner: Arc<Inner>, mut rx: mpsc::Receiver<Job>, shutdown: CancellationToken) {
    tokio::spawn(probe_loop(inner.clone(), shutdown.clone()));
    loop {
        let job = tokio::select! {
            _ = shutdown.cancelled() => return,
            j = rx.recv() => match j { Some(j) => j, None => return },
        };
        inner.job(job);
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Takes one query: answers it at once (cache, probe, refused, over a limit) or makes it
    /// wait for its question's upstream answer, asking upstream if nobody has yet.
    fn job(self: &Arc<Self>, job: Job) {
        let mut key = Vec::with_capacity(64);
        let Some(cq) = client_query(&job.query, &mut key) else {
            return; // the transport parsed it already; nothing sane to answer
        };
        let waiter = Waiter {
            query: job.query,
            cq,
            client: job.client,
            reply: job.reply,
        };
        let question_len = key.len() - 1;
        let name_len = question_len - 4;
        if is_under(&key[..name_len], PROBE_SUFFIX) {
            self.probe_came_back(&key[..name_len]);
            return self.send(
                waiter,
                &Entry::empty(&key[..question_len], RCODE_REFUSED, 0),
            );
        }
        if let Some(hit) = self.cache.get(&key) {
            self.stats.cache_hits.fetch_add(1, Relaxed);
            return self.send(waiter, &hit);
        }
        if self.cache.enabled() {
            self.stats.cache_misses.fetch_add(1, Relaxed);
        }
        let Some(ups) = self.rules.upstreams(&key[..name_len]) else {
            // Not ours to forward: what rollcall answers without forwarding.
            return self.send(
                waiter,
                &Entry::empty(&key[..question_len], RCODE_REFUSED, 0),
            );
        };
        let ups = ups.to_vec();
        let prefix = prefix_of(waiter.client);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mine = state.per_client.get(&prefix).copied().unwrap_or(0);
        let over = if mine >= self.cfg.max_per_client {
            Some(&self.stats.client_limited)
        } else if state.waiting >= self.cfg.max_inflight.saturating_mul(8)
            || (!state.inflight.contains_key(&key) && state.inflight.len() >= self.cfg.max_inflight)
        {
            Some(&self.stats.overloaded)
        } else {
            None
        };
        if let Some(counter) = over {
            drop(state);
            counter.fetch_add(1, Relaxed);
            return self.send(
                waiter,
                &Entry::empty(&key[..question_len], RCODE_SERVFAIL, 0),
            );
        }
        *state.per_client.entry(prefix).or_default() += 1;
        state.waiting += 1;
        if let Some(waiters) = state.inflight.get_mut(&key) {
            waiters.push(waiter);
            self.stats.coalesced.fetch_add(1, Relaxed);
            return;
        }
        state.inflight.insert(key.clone(), vec![waiter]);
        drop(state);
        let inner = self.clone();
        tokio::spawn(async move {
            let question = &key[..question_len];
            let flags = key[question_len];
            let ask = Ask {
                question,
                dnssec_ok: flags & 1 != 0,
                checking_disabled: flags & 2 != 0,
            };
            let entry = match inner.resolve(&ask, &ups).await {
                Some(e) => e,
                None => {
                    // Nobody answered within the budget: SERVFAIL, remembered for a second.
                    inner.stats.servfail_budget.fetch_add(1, Relaxed);
                    Entry::empty(question, RCODE_SERVFAIL, SERVFAIL_TTL)
                }
            };
            let entry = Arc::new(entry);
            inner.cache.insert(&key, entry.clone());
            let waiters = {
                let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
                let waiters = state.inflight.remove(&key).unwrap_or_default();
                state.waiting -= waiters.len();
                for w in &waiters {
                    let p = prefix_of(w.client);
                    if let Some(n) = state.per_client.get_mut(&p) {
                        *n -= 1;
                        if *n == 0 {
                            state.per_client.remove(&p);
                        }
                    }
                }
                waiters
            };
            for w in waiters {
                inner.send(w, &entry);
            }
        });
    }

    /// The entry, made this client's, sent to it (UDP: through the rate limit).
    fn send(&self, w: Waiter, entry: &Entry) {
        let mut out = Vec::with_capacity(entry.wire_len() + 16);
        match w.reply {
            Reply::Tcp(tx) => {
                entry.write(&w.query, &w.cq, w.cq.limit(Transport::Tcp), &mut out);
                let _ = tx.send(out);
            }
            Reply::Udp { socket, to } => {
                let mut truncated =
                    entry.write(&w.query, &w.cq, w.cq.limit(Transport::Udp), &mut out);
                match self.rate_limit.check(w.client) {
                    Verdict::Drop => {
                        self.counters.rate_limited();
                        return;
                    }
                    Verdict::Slip => {
                        super::wire::slip(&mut out);
                        self.counters.rate_limited();
                        truncated = true;
                    }
                    Verdict::Send => {}
                }
                self.counters.answered(w.cq.qtype, entry.rcode, truncated);
                let _ = socket.send_to(&out, to);
            }
        }
    }

    /// Asks the rule's upstreams in turn; None when none answered usefully within the budget.
    async fn resolve(self: &Arc<Self>, ask: &Ask<'_>, ups: &[usize]) -> Option<Entry> {
        let deadline = Instant::now() + self.cfg.budget;
        let now_ms = self.now_ms();
        let mut order: Vec<usize> = ups
            .iter()
            .copied()
            .filter(|&i| self.upstreams[i].usable(now_ms))
            .collect();
        // Up ones first, the fastest first; down ones only when nothing else is left.
        order.sort_by_key(|&i| {
            let u = &self.upstreams[i];
            (!u.up.load(Relaxed), u.srtt.load(Relaxed))
        });
        let any_up = order.iter().any(|&i| self.upstreams[i].up.load(Relaxed));
        for i in order {
            let u = &self.upstreams[i];
            if any_up && !u.up.load(Relaxed) {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let try_until = now + self.cfg.timeout.min(deadline - now);
            match u.fetch(ask, try_until).await {
                Some(entry) => {
                    u.answered(now.elapsed(), entry.rcode);
                    if u.mark(true) {
                        self.send_probe(i);
                    }
                    match entry.rcode {
                        0 | 3 => return Some(entry),
                        _ => continue, // SERVFAIL, REFUSED, NOTIMP, FORMERR...: the next one
                    }
                }
                None => {
                    u.stats.timeouts.fetch_add(1, Relaxed);
                    // Silence can be a loop that formed since the last probe: probe now.
                    if u.mark(false) {
                        self.send_probe(i);
                    }
                }
            }
        }
        None
    }

    /// A query for a probe name reached us: if we sent it lately, its upstream forwards to us.
    fn probe_came_back(&self, name: &[u8]) {
        let sent = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.probes.remove(name)
        };
        let Some((i, at)) = sent else {
            tracing::debug!("a loop probe name we did not send lately: ignored");
            return;
        };
        if at.elapsed() > PROBE_WINDOW {
            return;
        }
        let u = &self.upstreams[i];
        let now_ms = self.now_ms();
        self.stats.loops.fetch_add(1, Relaxed);
        if u.set_looped(now_ms + LOOP_HOLD.as_millis() as u64, now_ms) {
            tracing::error!(upstream = %u.addr, "this upstream forwards our queries back to us (a loop): skipped while the loop lasts (probed again every 30 s); fix --forward or that upstream");
        }
    }

    /// Sends upstream `i` a fresh probe name (answered or not, it does not matter: what counts
    /// is whether the name reaches us as a query).
    fn send_probe(self: &Arc<Self>, i: usize) {
        let u = &self.upstreams[i];
        if u.ourselves {
            return;
        }
        let label = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let mut name = vec![label.len() as u8];
        name.extend_from_slice(label.as_bytes());
        name.extend_from_slice(PROBE_SUFFIX);
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state
                .probes
                .retain(|_, (_, at)| at.elapsed() <= PROBE_WINDOW);
            state.probes.insert(name.clone(), (i, Instant::now()));
        }
        let inner = self.clone();
        tokio::spawn(async move {
            let mut question = name;
            question.extend_from_slice(&[0, 16, 0, 1]); // TXT IN
            let ask = Ask {
                question: &question,
                dnssec_ok: false,
                checking_disabled: false,
            };
            let _ = inner.upstreams[i]
                .fetch(&ask, Instant::now() + Duration::from_secs(1))
                .await;
        });
    }
}

/// Every 500 ms, each upstream marked down gets `. NS` (any answer brings it back); every
/// [`LOOP_RECHECK`] (and at start), each upstream gets a loop probe.
async fn probe_loop(inner: Arc<Inner>, shutdown: CancellationToken) {
    let root: &[u8] = &[0, 0, 2, 0, 1];
    let mut tick = tokio::time::interval(PROBE_EVERY);
    let mut next_loop_check = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if Instant::now() >= next_loop_check {
            next_loop_check = Instant::now() + LOOP_RECHECK;
            for i in 0..inner.upstreams.len() {
                inner.send_probe(i);
            }
        }
        let now_ms = inner.now_ms();
        for (i, u) in inner.upstreams.iter().enumerate() {
            if u.up.load(Relaxed) || !u.usable(now_ms) {
                continue;
            }
            let ask = Ask {
                question: root,
                dnssec_ok: false,
                checking_disabled: false,
            };
            if u.fetch(&ask, Instant::now() + PROBE_EVERY).await.is_some() && u.mark(true) {
                inner.send_probe(i);
            }
        }
    }
}
