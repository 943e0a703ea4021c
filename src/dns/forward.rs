//! Forwarding: names outside every served zone, for clients inside `--allow-recursion`, are
//! relayed to upstream resolvers (dnsmasq's main job), off the authoritative fast path.
//!
//! ```text
//! UDP thread / TCP task --Job (query bytes, reply-to)--> forwarder thread (own runtime)
//!     cache hit?  -> answer, TTLs counted down
//!     rule        -> most specific --forward DOMAIN wins; `DOMAIN=` means never forward
//!     upstreams   -> up ones first (fastest first), each try bounded by --forward-timeout;
//!                    timeout, SERVFAIL, REFUSED, NOTIMP, FORMERR: the next one at once;
//!                    NOERROR and NXDOMAIN are final; whole budget --forward-budget, then SERVFAIL
//!     reply       -> client's ID, RA set, AA clear, cut to the client's UDP size (TC)
//! ```
//!
//! Every upstream query uses a fresh socket (random source port) and a random ID; a reply is
//! taken only when its ID and question match. TC from upstream: the same upstream over TCP.
//! Two timeouts in a row mark an upstream down: it is skipped (unless all are down) and
//! probed every 500 ms until it answers. At start every upstream gets a probe name of its
//! own; if that name ever comes back to us as a query, the upstream forwards to us (a loop)
//! and is disabled.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The payload size asked of upstreams and offered to clients.
const EDNS_SIZE: u16 = 1232;
const MAX_POSITIVE_TTL: u32 = 3600;
const MAX_NEGATIVE_TTL: u32 = 300;
const SERVFAIL_TTL: u32 = 1;
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// Timeouts in a row that mark an upstream down.
const DOWN_AFTER: u32 = 2;

/// One `--forward` rule.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Lower case, fully qualified (`.` for every name).
    pub domain: Name,
    /// Empty: never forward names under `domain`.
    pub upstreams: Vec<SocketAddr>,
}

#[derive(Clone, Debug)]
pub struct ForwardConfig {
    pub rules: Vec<Rule>,
    /// Who may have names forwarded (REFUSED for everyone else).
    pub allow: Vec<IpNet>,
    /// One try on one upstream.
    pub timeout: Duration,
    /// All tries of one query; then SERVFAIL.
    pub budget: Duration,
    /// Cache entries (0: no cache).
    pub cache: usize,
    /// Queries being forwarded at once; more get SERVFAIL.
    pub max_inflight: usize,
}

/// Parses one `--forward` value: `[DOMAIN=]ADDR[:PORT][,ADDR[:PORT]...]`.
pub fn parse_rule(s: &str) -> Result<Rule, String> {
    let (domain, addrs) = match s.split_once('=') {
        Some((d, a)) => (d.trim(), a.trim()),
        None => (".", s.trim()),
    };
    let mut domain = Name::from_ascii(if domain.is_empty() { "." } else { domain })
        .map_err(|e| format!("{domain:?} is not a domain name: {e}"))?
        .to_lowercase();
    domain.set_fqdn(true);
    let upstreams = addrs
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.parse::<SocketAddr>()
                .or_else(|_| a.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .or_else(|_| {
                    a.trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                })
                .map_err(|_| {
                    format!(
                        "{a:?} is not an address (e.g. 10.0.0.53, 10.0.0.53:5353 or [fd00::53]:53)"
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if upstreams.is_empty() && domain.is_root() {
        return Err("no upstream address: give e.g. 10.0.0.53 or corp=10.0.0.53".into());
    }
    Ok(Rule { domain, upstreams })
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
}

/// Counters of one upstream.
#[derive(Default)]
pub struct UpstreamStats {
    pub noerror: AtomicU64,
    pub nxdomain: AtomicU64,
    pub servfail: AtomicU64,
    pub refused: AtomicU64,
    pub other: AtomicU64,
    pub timeouts: AtomicU64,
    pub micros: AtomicU64,
    pub answers: AtomicU64,
}

struct Upstream {
    addr: SocketAddr,
    up: AtomicBool,
    /// Set for good when the loop probe came back.
    looped: AtomicBool,
    fails: AtomicU32,
    /// Smoothed answer time, microseconds.
    srtt: AtomicU64,
    stats: UpstreamStats,
    probe: Name,
}

/// What `/metrics` shows of forwarding.
#[derive(Default)]
pub struct ForwardStats {
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub refused_acl: AtomicU64,
    pub overloaded: AtomicU64,
    pub servfail_budget: AtomicU64,
    upstreams: std::sync::OnceLock<Vec<Arc<Upstream>>>,
}

impl ForwardStats {
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let w = |out: &mut String, name: &str, help: &str, kind: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        w(
            out,
            "rollcall_forward_cache_hits_total",
            "Forwarded names answered from the cache.",
            "counter",
        );
        let _ = writeln!(
            out,
            "rollcall_forward_cache_hits_total {}",
            self.cache_hits.load(Relaxed)
        );
        w(
            out,
            "rollcall_forward_cache_misses_total",
            "Forwarded names not in the cache.",
            "counter",
        );
        let _ = writeln!(
            out,
            "rollcall_forward_cache_misses_total {}",
            self.cache_misses.load(Relaxed)
        );
        w(
            out,
            "rollcall_forward_refused_total",
            "Names outside our zones refused to clients outside --allow-recursion.",
            "counter",
        );
        let _ = writeln!(
            out,
            "rollcall_forward_refused_total {}",
            self.refused_acl.load(Relaxed)
        );
        w(
            out,
            "rollcall_forward_overloaded_total",
            "Queries answered SERVFAIL because --forward-max-inflight were in flight.",
            "counter",
        );
        let _ = writeln!(
            out,
            "rollcall_forward_overloaded_total {}",
            self.overloaded.load(Relaxed)
        );
        w(
            out,
            "rollcall_forward_servfail_total",
            "Queries answered SERVFAIL because no upstream answered within the budget.",
            "counter",
        );
        let _ = writeln!(
            out,
            "rollcall_forward_servfail_total {}",
            self.servfail_budget.load(Relaxed)
        );
        let Some(ups) = self.upstreams.get() else {
            return;
        };
        w(
            out,
            "rollcall_forward_upstream_up",
            "1 while the upstream answers.",
            "gauge",
        );
        for u in ups {
            let _ = writeln!(
                out,
                "rollcall_forward_upstream_up{{upstream=\"{}\"}} {}",
                u.addr,
                u8::from(u.up.load(Relaxed) && !u.looped.load(Relaxed))
            );
        }
        w(
            out,
            "rollcall_forward_queries_total",
            "Upstream answers by rcode (timeout: none in time).",
            "counter",
        );
        for u in ups {
            let s = &u.stats;
            for (rcode, c) in [
                ("NOERROR", &s.noerror),
                ("NXDOMAIN", &s.nxdomain),
                ("SERVFAIL", &s.servfail),
                ("REFUSED", &s.refused),
                ("other", &s.other),
                ("timeout", &s.timeouts),
            ] {
                let _ = writeln!(
                    out,
                    "rollcall_forward_queries_total{{upstream=\"{}\",rcode=\"{rcode}\"}} {}",
                    u.addr,
                    c.load(Relaxed)
                );
            }
        }
        w(
            out,
            "rollcall_forward_latency_seconds",
            "Upstream answer time (sum and count).",
            "summary",
        );
        for u in ups {
            let _ = writeln!(
                out,
                "rollcall_forward_latency_seconds_sum{{upstream=\"{}\"}} {}",
                u.addr,
                u.stats.micros.load(Relaxed) as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "rollcall_forward_latency_seconds_count{{upstream=\"{}\"}} {}",
                u.addr,
                u.stats.answers.load(Relaxed)
            );
        }
    }
}

struct CacheEntry {
    msg: Message,
    stored: Instant,
    ttl: u32,
    seq: u64,
}

#[derive(Hash, PartialEq, Eq, Clone)]
struct Key {
    name: String,
    qtype: u16,
    qclass: u16,
    dnssec_ok: bool,
}

#[derive(Default)]
struct Cache {
    map: HashMap<Key, CacheEntry>,
    order: VecDeque<(Key, u64)>,
    seq: u64,
}

/// Answers as wire bytes, for cache hits served on the UDP threads themselves (plain
/// queries: one question, no DO bit): a read lock, a copy and a few patched bytes, like the
/// authoritative path. Filled by the forwarder thread next to the message cache.
#[derive(Default)]
struct WireCache {
    map: std::sync::RwLock<HashMap<Box<[u8]>, WireEntry>>,
}

struct WireEntry {
    /// The response with ID 0, RD clear, RA set, no OPT record.
    bytes: Box<[u8]>,
    /// End of the question (the client's question is copied over, keeping its case).
    qend: usize,
    /// Where each record's TTL sits, and its TTL when stored.
    ttls: Box<[(u16, u32)]>,
    stored: std::time::Instant,
    expires: std::time::Instant,
}

/// `lowercased wire name + qtype + qclass` of a plain query, its question end, and its EDNS
/// payload (None: no OPT); None when the query is not plain (DO set, several records...).
fn plain_key(q: &[u8], key: &mut Vec<u8>) -> Option<(usize, Option<u16>)> {
    if q.len() < 17 || q[6..10] != [0, 0, 0, 0] {
        return None;
    }
    let qend = question_key(q, key)?;
    let edns = match q[10..12] {
        [0, 0] if q.len() == qend => None,
        [0, 1] => {
            // The OPT record right after the question: root name, type 41.
            let opt = q.get(qend..qend + 11)?;
            if opt[0] != 0 || opt[1..3] != [0, 41] || opt[7] & 0x80 != 0 || opt[6] != 0 {
                return None; // not OPT, DO set, or EDNS version > 0
            }
            Some(u16::from_be_bytes([opt[3], opt[4]]))
        }
        _ => return None,
    };
    Some((qend, edns))
}

/// The cache key of a message's only question (lower-cased wire name, type, class); returns
/// where the question ends.
fn question_key(q: &[u8], key: &mut Vec<u8>) -> Option<usize> {
    if q.len() < 17 || q[4..6] != [0, 1] {
        return None;
    }
    key.clear();
    let mut at = 12;
    loop {
        let len = usize::from(*q.get(at)?);
        if len & 0xC0 != 0 {
            return None;
        }
        key.push(len as u8);
        if len == 0 {
            at += 1;
            break;
        }
        key.extend(
            q.get(at + 1..at + 1 + len)?
                .iter()
                .map(u8::to_ascii_lowercase),
        );
        at += 1 + len;
    }
    key.extend_from_slice(q.get(at..at + 4)?);
    Some(at + 4)
}

/// Where the TTL of each record of an encoded message sits.
fn ttl_offsets(b: &[u8]) -> Option<Vec<(u16, u32)>> {
    let count = |i: usize| usize::from(u16::from_be_bytes([b[i], b[i + 1]]));
    let (qd, rr) = (count(4), count(6) + count(8) + count(10));
    let skip_name = |mut at: usize| -> Option<usize> {
        loop {
            let len = *b.get(at)?;
            if len & 0xC0 == 0xC0 {
                return Some(at + 2);
            }
            if len == 0 {
                return Some(at + 1);
            }
            at += 1 + usize::from(len);
        }
    };
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(at)? + 4;
    }
    let mut out = Vec::with_capacity(rr);
    for _ in 0..rr {
        at = skip_name(at)?;
        let t = b.get(at + 4..at + 8)?;
        out.push((
            u16::try_from(at + 4).ok()?,
            u32::from_be_bytes([t[0], t[1], t[2], t[3]]),
        ));
        let rdlen = usize::from(u16::from_be_bytes([*b.get(at + 8)?, *b.get(at + 9)?]));
        at += 10 + rdlen;
    }
    (at == b.len()).then_some(out)
}

impl WireCache {
    /// Serves a cache hit into `out` (false: not cached, expired, or too big for the client).
    fn answer(&self, q: &[u8], out: &mut Vec<u8>, key: &mut Vec<u8>) -> bool {
        let Some((qend, edns)) = plain_key(q, key) else {
            return false;
        };
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let Some(e) = map.get(key.as_slice()) else {
            return false;
        };
        let now = std::time::Instant::now();
        let limit = edns.map_or(512, |p| usize::from(p.clamp(512, EDNS_SIZE)));
        let opt_len = if edns.is_some() { 11 } else { 0 };
        if now >= e.expires || e.qend != qend || e.bytes.len() + opt_len > limit {
            return false;
        }
        let age = now.duration_since(e.stored).as_secs() as u32;
        out.clear();
        out.extend_from_slice(&e.bytes);
        out[..2].copy_from_slice(&q[..2]);
        out[2] = (out[2] & !0x01) | (q[2] & 0x01);
        out[12..qend].copy_from_slice(&q[12..qend]);
        for &(at, ttl) in e.ttls.iter() {
            let at = usize::from(at);
            out[at..at + 4].copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
        }
        if edns.is_some() {
            let ar = u16::from_be_bytes([out[10], out[11]]) + 1;
            out[10..12].copy_from_slice(&ar.to_be_bytes());
            out.extend_from_slice(&[0, 0, 41]);
            out.extend_from_slice(&EDNS_SIZE.to_be_bytes());
            out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        true
    }

    fn store(&self, key: &Key, m: &Message, ttl: u32, cap: usize) {
        if key.dnssec_ok || ttl == 0 {
            return;
        }
        let mut c = m.clone();
        c.metadata.id = 0;
        c.metadata.message_type = MessageType::Response;
        c.metadata.recursion_desired = false;
        c.metadata.recursion_available = true;
        c.metadata.authoritative = false;
        c.edns = None;
        let Ok(bytes) = c.to_vec() else { return };
        let Some(ttls) = ttl_offsets(&bytes) else {
            return;
        };
        let mut wk = Vec::with_capacity(key.name.len() + 6);
        let Some(qend) = question_key(&bytes, &mut wk) else {
            return;
        };
        let now = std::time::Instant::now();
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= cap {
            map.retain(|_, e| e.expires > now);
            if map.len() >= cap {
                if let Some(k) = map.keys().next().cloned() {
                    map.remove(&k);
                }
            }
        }
        map.insert(
            wk.into_boxed_slice(),
            WireEntry {
                bytes: bytes.into_boxed_slice(),
                qend,
                ttls: ttls.into_boxed_slice(),
                stored: now,
                expires: now + Duration::from_secs(ttl.into()),
            },
        );
    }
}

struct Inner {
    wire: Arc<WireCache>,
    cfg: ForwardConfig,
    upstreams: Vec<Arc<Upstream>>,
    /// Per rule, indices into `upstreams`.
    rules: Vec<(Name, Vec<usize>)>,
    cache: Mutex<Cache>,
    stats: Arc<ForwardStats>,
}

/// The handle the transports hold.
pub struct Forwarder {
    tx: mpsc::Sender<Job>,
    wire: Arc<WireCache>,
    allow: Vec<IpNet>,
    pub stats: Arc<ForwardStats>,
}

impl Forwarder {
    /// A cache hit answered on the caller's thread (UDP), or false: submit the query.
    /// `key` is the caller's scratch buffer.
    pub fn answer_cached(&self, q: &[u8], out: &mut Vec<u8>, key: &mut Vec<u8>) -> bool {
        let hit = self.wire.answer(q, out, key);
        if hit {
            self.stats.cache_hits.fetch_add(1, Relaxed);
        }
        hit
    }

    /// Whether `ip` may have names forwarded.
    pub fn allowed(&self, ip: IpAddr) -> bool {
        super::udp::allowed(&self.allow, ip)
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

/// Starts the forwarder on a thread and runtime of its own. `own` are this server's DNS
/// addresses: an upstream equal to one of them is disabled (a loop).
pub fn start(cfg: ForwardConfig, own: &[SocketAddr], shutdown: CancellationToken) -> Forwarder {
    let mut upstreams: Vec<Arc<Upstream>> = Vec::new();
    let mut rules = Vec::new();
    for r in &cfg.rules {
        let mut idx = Vec::new();
        for a in &r.upstreams {
            let i = match upstreams.iter().position(|u| u.addr == *a) {
                Some(i) => i,
                None => {
                    let probe = Name::from_ascii(format!(
                        "{:016x}.rollcall-loop-check.",
                        rand::random::<u64>()
                    ))
                    .expect("a valid probe name");
                    let ourselves = own.iter().any(|o| same_socket(*o, *a));
                    if ourselves {
                        tracing::error!(upstream = %a, "--forward names this server itself: disabled (it would be a loop)");
                    }
                    upstreams.push(Arc::new(Upstream {
                        addr: *a,
                        up: AtomicBool::new(true),
                        looped: AtomicBool::new(ourselves),
                        fails: AtomicU32::new(0),
                        srtt: AtomicU64::new(0),
                        stats: UpstreamStats::default(),
                        probe,
                    }));
                    upstreams.len() - 1
                }
            };
            idx.push(i);
        }
        rules.push((r.domain.clone(), idx));
    }
    let stats = Arc::new(ForwardStats::default());
    let _ = stats.upstreams.set(upstreams.clone());
    let allow = cfg.allow.clone();
    let wire = Arc::new(WireCache::default());
    let inner = Arc::new(Inner {
        wire: wire.clone(),
        cfg: cfg.clone(),
        upstreams,
        rules,
        cache: Mutex::new(Cache::default()),
        stats: stats.clone(),
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
        wire,
        allow,
        stats,
    }
}

fn same_socket(own: SocketAddr, up: SocketAddr) -> bool {
    own.port() == up.port()
        && (own.ip() == up.ip() || (own.ip().is_unspecified() && up.ip().is_loopback()))
}

async fn run(inner: Arc<Inner>, mut rx: mpsc::Receiver<Job>, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(inner.cfg.max_inflight));
    tokio::spawn(probe_loop(inner.clone(), shutdown.clone()));
    tokio::spawn(loop_check(inner.clone()));
    loop {
        let job = tokio::select! {
            _ = shutdown.cancelled() => return,
            j = rx.recv() => match j { Some(j) => j, None => return },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            inner.stats.overloaded.fetch_add(1, Relaxed);
            if let Some(out) = servfail_for(&job.query) {
                deliver(job.reply, out).await;
            }
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let tcp = matches!(job.reply, Reply::Tcp(_));
            if let Some(out) = inner.handle(&job.query, tcp).await {
                deliver(job.reply, out).await;
            }
            drop(permit);
        });
    }
}

async fn deliver(reply: Reply, out: Vec<u8>) {
    match reply {
        Reply::Udp { socket, to } => {
            let _ = socket.send_to(&out, to);
        }
        Reply::Tcp(tx) => {
            let _ = tx.send(out);
        }
    }
}

/// SERVFAIL with the question, built from the raw query.
fn servfail_for(q: &[u8]) -> Option<Vec<u8>> {
    let msg = Message::from_vec(q).ok()?;
    let mut r = Message::response(msg.metadata.id, msg.metadata.op_code);
    r.metadata.recursion_desired = msg.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.metadata.response_code = ResponseCode::ServFail;
    r.add_queries(msg.queries.iter().cloned());
    r.to_vec().ok()
}

impl Inner {
    /// The response to a forwarded query (None: nothing to send).
    async fn handle(&self, q: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let msg = Message::from_vec(q).ok()?;
        let query = msg.queries.first()?.clone();
        let name = query.name().to_lowercase();
        // One of our loop probes coming back: that upstream forwards to us.
        if let Some(u) = self.upstreams.iter().find(|u| u.probe == name) {
            if !u.looped.swap(true, Relaxed) {
                tracing::error!(upstream = %u.addr, "this upstream forwards our queries back to us (a loop): disabled; fix --forward");
            }
            return Some(client_response(&msg, refused_msg(&msg), tcp, None));
        }
        let client_edns = msg.edns.as_ref().map(|e| e.max_payload());
        let dnssec_ok = msg.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok);
        let key = Key {
            name: name.to_ascii(),
            qtype: u16::from(query.query_type()),
            qclass: u16::from(query.query_class()),
            dnssec_ok,
        };
        if let Some(hit) = self.cached(&key) {
            self.stats.cache_hits.fetch_add(1, Relaxed);
            return Some(client_response(&msg, hit, tcp, client_edns));
        }
        if self.cfg.cache > 0 {
            self.stats.cache_misses.fetch_add(1, Relaxed);
        }
        let rule = self
            .rules
            .iter()
            .filter(|(d, _)| d.zone_of(&name))
            .max_by_key(|(d, _)| d.num_labels());
        let Some((_, ups)) = rule.filter(|(_, u)| !u.is_empty()) else {
            // Not ours to forward: what rollcall answers without forwarding.
            return Some(client_response(&msg, refused_msg(&msg), tcp, None));
        };
        let answer = match self.resolve(&msg, &query, ups, tcp).await {
            Some(a) => a,
            None => {
                // Nobody answered within the budget: SERVFAIL, remembered for a second.
                self.stats.servfail_budget.fetch_add(1, Relaxed);
                let mut sf = refused_msg(&msg);
                sf.metadata.response_code = ResponseCode::ServFail;
                sf
            }
        };
        self.store(key, &answer);
        Some(client_response(&msg, answer, tcp, client_edns))
    }

    fn cached(&self, key: &Key) -> Option<Message> {
        if self.cfg.cache == 0 {
            return None;
        }
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let e = cache.map.get(key)?;
        let age = e.stored.elapsed().as_secs() as u32;
        if age >= e.ttl {
            return None;
        }
        let mut m = e.msg.clone();
        for r in m
            .answers
            .iter_mut()
            .chain(m.authorities.iter_mut())
            .chain(m.additionals.iter_mut())
        {
            r.ttl = r.ttl.saturating_sub(age);
        }
        Some(m)
    }

    fn store(&self, key: Key, m: &Message) {
        if self.cfg.cache == 0 {
            return;
        }
        let ttl = cache_ttl(m);
        if ttl == 0 {
            return;
        }
        self.wire.store(&key, m, ttl, self.cfg.cache);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.seq += 1;
        let seq = cache.seq;
        cache.map.insert(
            key.clone(),
            CacheEntry {
                msg: m.clone(),
                stored: Instant::now(),
                ttl,
                seq,
            },
        );
        cache.order.push_back((key, seq));
        while cache.map.len() > self.cfg.cache {
            let Some((k, s)) = cache.order.pop_front() else {
                break;
            };
            if cache.map.get(&k).is_some_and(|e| e.seq == s) {
                cache.map.remove(&k);
            }
        }
        // Stale order entries (keys stored again since) are dropped as they come up.
        if cache.order.len() > 2 * self.cfg.cache + 64 {
            let Cache { map, order, .. } = &mut *cache;
            order.retain(|(k, s)| map.get(k).is_some_and(|e| e.seq == *s));
        }
    }

    /// Asks the rule's upstreams in turn; None when none answered usefully within the budget.
    async fn resolve(
        &self,
        msg: &Message,
        query: &Query,
        ups: &[usize],
        tcp: bool,
    ) -> Option<Message> {
        let deadline = Instant::now() + self.cfg.budget;
        let mut order: Vec<usize> = ups
            .iter()
            .copied()
            .filter(|&i| !self.upstreams[i].looped.load(Relaxed))
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
            let per_try = self.cfg.timeout.min(deadline - now);
            let started = Instant::now();
            match exchange(u.addr, msg, query, tcp, per_try).await {
                Some(resp) => {
                    let took = started.elapsed().as_micros() as u64;
                    u.stats.micros.fetch_add(took, Relaxed);
                    u.stats.answers.fetch_add(1, Relaxed);
                    let old = u.srtt.load(Relaxed);
                    u.srtt
                        .store(if old == 0 { took } else { (old * 7 + took) / 8 }, Relaxed);
                    self.mark(u, true);
                    let rc = resp.metadata.response_code;
                    let counter = match rc {
                        ResponseCode::NoError => &u.stats.noerror,
                        ResponseCode::NXDomain => &u.stats.nxdomain,
                        ResponseCode::ServFail => &u.stats.servfail,
                        ResponseCode::Refused => &u.stats.refused,
                        _ => &u.stats.other,
                    };
                    counter.fetch_add(1, Relaxed);
                    match rc {
                        ResponseCode::NoError | ResponseCode::NXDomain => return Some(resp),
                        _ => continue, // SERVFAIL, REFUSED, NOTIMP, FORMERR...: the next one
                    }
                }
                None => {
                    u.stats.timeouts.fetch_add(1, Relaxed);
                    self.mark(u, false);
                }
            }
        }
        None
    }

    fn mark(&self, u: &Upstream, answered: bool) {
        if answered {
            u.fails.store(0, Relaxed);
            if !u.up.swap(true, Relaxed) {
                tracing::info!(upstream = %u.addr, "upstream answers again: forwarding to it");
            }
        } else if u.fails.fetch_add(1, Relaxed) + 1 >= DOWN_AFTER && u.up.swap(false, Relaxed) {
            tracing::warn!(upstream = %u.addr, "upstream does not answer: marked down, probed every 500 ms");
        }
    }
}

/// REFUSED for this query (the non-forwarding answer).
fn refused_msg(msg: &Message) -> Message {
    let mut r = Message::response(msg.metadata.id, OpCode::Query);
    r.metadata.response_code = ResponseCode::Refused;
    r.add_queries(msg.queries.iter().cloned());
    r
}

/// How long an answer may be cached.
fn cache_ttl(m: &Message) -> u32 {
    match m.metadata.response_code {
        ResponseCode::ServFail => SERVFAIL_TTL,
        ResponseCode::NoError if !m.answers.is_empty() => m
            .answers
            .iter()
            .map(|r| r.ttl)
            .min()
            .unwrap_or(0)
            .min(MAX_POSITIVE_TTL),
        ResponseCode::NoError | ResponseCode::NXDomain => m
            .authorities
            .iter()
            .find_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            })
            .unwrap_or(0)
            .min(MAX_NEGATIVE_TTL),
        _ => 0,
    }
}

/// The upstream's answer made ours for this client: its ID and RD, RA set, AA clear, OPT as
/// the client asked, cut to the client's UDP size (header and question with TC).
fn client_response(
    client: &Message,
    mut m: Message,
    tcp: bool,
    client_edns: Option<u16>,
) -> Vec<u8> {
    m.metadata.id = client.metadata.id;
    m.metadata.message_type = MessageType::Response;
    m.metadata.recursion_desired = client.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.authoritative = false;
    m.queries = client.queries.clone();
    m.edns = client.edns.as_ref().map(|e| {
        let mut o = Edns::new();
        o.set_max_payload(EDNS_SIZE);
        o.set_dnssec_ok(e.flags().dnssec_ok);
        o
    });
    let limit = if tcp {
        usize::from(u16::MAX)
    } else {
        usize::from(client_edns.map_or(512, |p| p.clamp(512, EDNS_SIZE)))
    };
    let bytes = m.to_vec().unwrap_or_default();
    if bytes.len() <= limit {
        return bytes;
    }
    m.answers.clear();
    m.authorities.clear();
    m.additionals.clear();
    m.metadata.truncation = true;
    m.to_vec().unwrap_or_default()
}

/// One query to one upstream (UDP, then TCP if truncated; TCP for TCP clients).
async fn exchange(
    up: SocketAddr,
    client: &Message,
    query: &Query,
    tcp: bool,
    limit: Duration,
) -> Option<Message> {
    let id: u16 = rand::random();
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = client.metadata.recursion_desired;
    m.metadata.checking_disabled = client.metadata.checking_disabled;
    m.add_query(query.clone());
    let mut e = Edns::new();
    e.set_max_payload(EDNS_SIZE);
    e.set_dnssec_ok(client.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok));
    m.set_edns(e);
    let bytes = m.to_vec().ok()?;
    let deadline = Instant::now() + limit;
    if !tcp {
        match tokio::time::timeout_at(deadline, udp_exchange(up, &bytes, id, query)).await {
            Ok(Some(r)) if !r.metadata.truncation => return Some(r),
            Ok(Some(_)) => {} // truncated: over TCP
            _ => return None,
        }
    }
    tokio::time::timeout_at(deadline, tcp_exchange(up, &bytes, id, query))
        .await
        .ok()
        .flatten()
}

fn matches(r: &Message, id: u16, query: &Query) -> bool {
    r.metadata.id == id
        && r.metadata.message_type == MessageType::Response
        && r.queries.len() == 1
        && r.queries[0].name().to_lowercase() == query.name().to_lowercase()
        && r.queries[0].query_type() == query.query_type()
        && r.queries[0].query_class() == query.query_class()
}

async fn udp_exchange(up: SocketAddr, bytes: &[u8], id: u16, query: &Query) -> Option<Message> {
    let bind: SocketAddr = if up.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(bind).await.ok()?;
    sock.connect(up).await.ok()?;
    sock.send(bytes).await.ok()?;
    let mut buf = vec![0u8; 65535];
    loop {
        // A refused port (ICMP) ends the try at once; anything not ours is ignored.
        let n = sock.recv(&mut buf).await.ok()?;
        if let Ok(r) = Message::from_vec(&buf[..n]) {
            if matches(&r, id, query) {
                return Some(r);
            }
        }
    }
}

async fn tcp_exchange(up: SocketAddr, bytes: &[u8], id: u16, query: &Query) -> Option<Message> {
    let mut s = tokio::net::TcpStream::connect(up).await.ok()?;
    let _ = s.set_nodelay(true);
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    s.write_all(&framed).await.ok()?;
    let len = s.read_u16().await.ok()?;
    let mut buf = vec![0u8; usize::from(len)];
    s.read_exact(&mut buf).await.ok()?;
    let r = Message::from_vec(&buf).ok()?;
    matches(&r, id, query).then_some(r)
}

/// Every 500 ms: each upstream marked down gets `. NS`; any answer brings it back.
async fn probe_loop(inner: Arc<Inner>, shutdown: CancellationToken) {
    let root = Query::query(Name::root(), RecordType::NS);
    let mut tick = tokio::time::interval(PROBE_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for u in &inner.upstreams {
            if u.up.load(Relaxed) || u.looped.load(Relaxed) {
                continue;
            }
            let probe = Message::new(0, MessageType::Query, OpCode::Query);
            if exchange(u.addr, &probe, &root, false, PROBE_EVERY)
                .await
                .is_some()
            {
                inner.mark(u, true);
            }
        }
    }
}

/// Once at start: each upstream is asked for its own probe name; if the name comes back to
/// us as a query, `handle` disables that upstream.
async fn loop_check(inner: Arc<Inner>) {
    for u in &inner.upstreams {
        if u.looped.load(Relaxed) {
            continue;
        }
        let q = Query::query(u.probe.clone(), RecordType::TXT);
        let probe = Message::new(0, MessageType::Query, OpCode::Query);
        let _ = exchange(u.addr, &probe, &q, false, Duration::from_secs(1)).await;
    }
}

/// The networks this host is directly connected to (for the `--allow-recursion` default).
pub fn local_networks() -> Vec<IpNet> {
    let mut nets = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we walk read-only and free with freeifaddrs.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return nets;
        }
        let mut p = ifap;
        while !p.is_null() {
            let ifa = &*p;
            p = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() {
                continue;
            }
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let m = &*(ifa.ifa_netmask as *const libc::sockaddr_in);
                    let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                    let prefix = u32::from_be(m.sin_addr.s_addr).count_ones() as u8;
                    if let Ok(n) = ipnet::Ipv4Net::new(ip, prefix) {
                        nets.push(IpNet::V4(n.trunc()));
                    }
                }
                libc::AF_INET6 => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let m = &*(ifa.ifa_netmask as *const libc::sockaddr_in6);
                    let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                    let prefix: u32 = m.sin6_addr.s6_addr.iter().map(|b| b.count_ones()).sum();
                    if let Ok(n) = ipnet::Ipv6Net::new(ip, prefix as u8) {
                        nets.push(IpNet::V6(n.trunc()));
                    }
                }
                _ => {}
            }
        }
        libc::freeifaddrs(ifap);
    }
    nets.sort();
    nets.dedup();
    nets
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Record;

    #[test]
    fn rules_parse_like_dnsmasq() {
        let r = parse_rule("10.0.0.53").unwrap();
        assert!(r.domain.is_root());
        assert_eq!(r.upstreams, ["10.0.0.53:53".parse().unwrap()]);
        let r = parse_rule("Corp.Example=10.0.0.1:5353,[fd00::53]:53,fd00::54").unwrap();
        assert_eq!(r.domain.to_ascii(), "corp.example.");
        assert_eq!(r.upstreams.len(), 3);
        assert_eq!(r.upstreams[2], "[fd00::54]:53".parse().unwrap());
        let never = parse_rule("local.test=").unwrap();
        assert!(never.upstreams.is_empty());
        assert!(parse_rule("").is_err());
        assert!(parse_rule("corp=not-an-address")
            .unwrap_err()
            .contains("not an address"));
    }

    #[test]
    fn negative_answers_are_cached_per_the_soa_minimum() {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.metadata.response_code = ResponseCode::NXDomain;
        let soa = hickory_proto::rr::rdata::SOA::new(
            Name::from_ascii("ns.test.").unwrap(),
            Name::from_ascii("h.test.").unwrap(),
            1,
            60,
            10,
            600,
            30,
        );
        m.authorities.push(Record::from_rdata(
            Name::from_ascii("test.").unwrap(),
            300,
            RData::SOA(soa),
        ));
        assert_eq!(cache_ttl(&m), 30);
        m.metadata.response_code = ResponseCode::ServFail;
        assert_eq!(cache_ttl(&m), 1);
    }

    #[test]
    fn cache_hits_on_the_udp_thread_keep_the_clients_id_case_and_edns() {
        let wire = WireCache::default();
        let name = Name::from_ascii("www.example.test.").unwrap();
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(name.clone(), RecordType::A));
        for ip in [[192, 0, 2, 1], [192, 0, 2, 2]] {
            m.add_answer(Record::from_rdata(
                name.clone(),
                60,
                RData::A(std::net::Ipv4Addr::from(ip).into()),
            ));
        }
        let key = Key {
            name: "www.example.test.".into(),
            qtype: 1,
            qclass: 1,
            dnssec_ok: false,
        };
        wire.store(&key, &m, 60, 100);
        let mut q = Message::new(0x1234, MessageType::Query, OpCode::Query);
        q.add_query(Query::query(
            Name::from_ascii("WwW.Example.TEST.").unwrap(),
            RecordType::A,
        ));
        q.metadata.recursion_desired = true;
        let mut e = Edns::new();
        e.set_max_payload(1232);
        q.set_edns(e);
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        assert!(wire.answer(&q.to_vec().unwrap(), &mut out, &mut scratch));
        let r = Message::from_vec(&out).unwrap();
        assert_eq!(r.metadata.id, 0x1234);
        assert!(r.metadata.recursion_desired && r.metadata.recursion_available);
        assert!(!r.metadata.authoritative);
        assert_eq!(r.queries[0].name().to_ascii(), "WwW.Example.TEST.");
        assert_eq!(r.answers.len(), 2);
        assert!(r.answers.iter().all(|a| a.ttl <= 60 && a.ttl >= 59));
        assert!(r.edns.is_some(), "the client asked with EDNS");
        // DO set, or another name: not a plain hit.
        let mut e = Edns::new();
        e.set_dnssec_ok(true);
        q.set_edns(e);
        assert!(!wire.answer(&q.to_vec().unwrap(), &mut out, &mut scratch));
        let mut other = Message::new(1, MessageType::Query, OpCode::Query);
        other.add_query(Query::query(
            Name::from_ascii("x.example.test.").unwrap(),
            RecordType::A,
        ));
        assert!(!wire.answer(&other.to_vec().unwrap(), &mut out, &mut scratch));
    }

    #[test]
    fn this_host_has_networks() {
        let nets = local_networks();
        assert!(
            nets.iter()
                .any(|n| n.contains(&"127.0.0.1".parse::<IpAddr>().unwrap())),
            "{nets:?}"
        );
    }
}
