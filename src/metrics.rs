//! Counters for `/metrics` (Prometheus text format).
//!
//! The DNS hot path counts into per-thread blocks ([`DnsCounters`]), each written by one thread
//! only with plain relaxed load + store (no locked instruction, no shared cache line), and summed
//! when `/metrics` is scraped. The registry writer counts into [`RegistryCounters`] (one
//! writer, relaxed atomics). The API middleware records requests by route and status with a
//! latency histogram ([`ApiMetrics`]).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Query types counted by name; everything else is "other".
const QTYPES: [(u16, &str); 9] = [
    (1, "A"),
    (28, "AAAA"),
    (33, "SRV"),
    (12, "PTR"),
    (6, "SOA"),
    (2, "NS"),
    (255, "ANY"),
    (252, "AXFR"),
    (0, "other"),
];
/// Response codes counted by name; index 6 is BADVERS, 7 anything else.
const RCODES: [&str; 8] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS", "other",
];

/// One thread's (or one transport's) DNS counters.
#[repr(align(128))]
#[derive(Default)]
pub struct DnsCounters {
    qtype: [AtomicU64; QTYPES.len()],
    rcode: [AtomicU64; RCODES.len()],
    truncated: AtomicU64,
    dropped: AtomicU64,
    rate_limited: AtomicU64,
}

#[inline]
fn bump(c: &AtomicU64) {
    // Single writer per block: no read-modify-write instruction needed.
    c.store(c.load(Relaxed).wrapping_add(1), Relaxed);
}

impl DnsCounters {
    /// Counts an answered query. Only the owning thread may call this (see module docs).
    #[inline]
    pub fn answered(&self, qtype: u16, rcode: u8, truncated: bool) {
        let (qi, ri) = slots(qtype, rcode);
        bump(&self.qtype[qi]);
        bump(&self.rcode[ri]);
        if truncated {
            bump(&self.truncated);
        }
    }

    #[inline]
    pub fn dropped(&self) {
        bump(&self.dropped);
    }

    /// A response held back (dropped or slipped) by rate limiting.
    #[inline]
    pub fn rate_limited(&self) {
        bump(&self.rate_limited);
    }
}

/// TCP answers come from many tasks: they share one block with atomic adds (TCP is rare).
#[derive(Default)]
pub struct SharedDnsCounters(DnsCounters);

impl SharedDnsCounters {
    pub fn answered(&self, qtype: u16, rcode: u8, truncated: bool) {
        let (c, (qi, ri)) = (&self.0, slots(qtype, rcode));
        c.qtype[qi].fetch_add(1, Relaxed);
        c.rcode[ri].fetch_add(1, Relaxed);
        if truncated {
            c.truncated.fetch_add(1, Relaxed);
        }
    }
}

/// The counter slots of a query type and a response code (see `QTYPES`, `RCODES`).
#[inline]
fn slots(qtype: u16, rcode: u8) -> (usize, usize) {
    let qi = QTYPES
        .iter()
        .position(|(t, _)| *t == qtype)
        .unwrap_or(QTYPES.len() - 1);
    let ri = match rcode {
        0..=5 => usize::from(rcode),
        16 => 6,
        _ => 7,
    };
    (qi, ri)
}

/// All DNS counters: one block per UDP thread, one shared block for TCP.
#[derive(Default)]
pub struct DnsStats {
    udp: Mutex<Vec<Arc<DnsCounters>>>,
    pub tcp: SharedDnsCounters,
    /// Forwarding's counters, when `--forward` is on.
    pub forward: std::sync::OnceLock<Arc<crate::dns::forward::ForwardStats>>,
    /// The published snapshot, for the zones' SOA serials.
    pub snapshot: std::sync::OnceLock<Arc<arc_swap::ArcSwap<crate::dns::snapshot::Snapshot>>>,
    /// Zone file loads (the one at start and every SIGHUP): results, and the last good one.
    pub zone_loads_ok: AtomicU64,
    pub zone_loads_failed: AtomicU64,
    /// Unix time (ms) of the last successful load; its duration (µs).
    pub zone_last_load_ms: AtomicU64,
    pub zone_last_load_us: AtomicU64,
}

impl DnsStats {
    /// Records one load of the zone files.
    pub fn zone_load(&self, ok: bool, took: Duration) {
        if ok {
            self.zone_loads_ok.fetch_add(1, Relaxed);
            self.zone_last_load_ms
                .store(crate::clock::unix_ms(), Relaxed);
            self.zone_last_load_us
                .store(took.as_micros() as u64, Relaxed);
        } else {
            self.zone_loads_failed.fetch_add(1, Relaxed);
        }
    }
}

impl DnsStats {
    /// A new block for one UDP thread.
    pub fn udp_thread(&self) -> Arc<DnsCounters> {
        let c = Arc::new(DnsCounters::default());
        self.udp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(c.clone());
        c
    }
}

/// Registry events, counted by the writer.
#[derive(Default)]
pub struct RegistryCounters {
    pub registrations: AtomicU64,
    pub renewals: AtomicU64,
    pub deregistrations: AtomicU64,
    pub expiries: AtomicU64,
    pub session_opens: AtomicU64,
    pub session_closes: AtomicU64,
    pub publishes: AtomicU64,
    /// PUTs that changed a registered node's address, port or anything else shown.
    pub changes: AtomicU64,
    /// Failed journal writes, syncs or rewrites.
    pub storage_failures: AtomicU64,
    /// Journal rewrites of the live set (compactions and recoveries).
    pub compactions: AtomicU64,
    /// Journal commits: with fsync (registrations, deregistrations) and without (renewals).
    pub commit_durable: AtomicHistogram,
    pub commit_buffered: AtomicHistogram,
}

/// A latency histogram written by one thread (the registry writer) with relaxed atomics.
#[derive(Default)]
pub struct AtomicHistogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl AtomicHistogram {
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(took.as_nanos() as u64, Relaxed);
    }

    fn snapshot(&self) -> Histogram {
        let mut h = Histogram::default();
        for (i, b) in self.buckets.iter().enumerate() {
            h.buckets[i] = b.load(Relaxed);
        }
        h.count = self.count.load(Relaxed);
        h.sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        h
    }
}

impl RegistryCounters {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }
}

const BUCKETS: [f64; 10] = [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];

#[derive(Default, Clone)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.buckets[i] += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }
}

/// API requests by (method, route, status, blocking), with latency. Every label comes from a
/// bounded set: methods are named or OTHER, routes are the router's (or "unmatched").
#[derive(Default)]
pub struct ApiMetrics {
    requests: Mutex<BTreeMap<(String, String, u16, bool), Histogram>>,
    /// TLS handshakes on the API port by outcome (see [`TLS_OUTCOMES`]); all 0 without TLS.
    tls: [AtomicU64; TLS_OUTCOMES.len()],
}

/// How a connection to the TLS port started: `ok` (handshake done), `failed` (refused by
/// either side: a bad certificate, an unknown CA, no common protocol), `timeout` (no
/// handshake within the deadline), `plaintext` (a plain-HTTP request, answered 400).
pub const TLS_OUTCOMES: [&str; 4] = ["ok", "failed", "timeout", "plaintext"];

impl ApiMetrics {
    /// Counts one TLS handshake outcome, a name of [`TLS_OUTCOMES`].
    pub fn tls_handshake(&self, outcome: &str) {
        if let Some(i) = TLS_OUTCOMES.iter().position(|o| *o == outcome) {
            self.tls[i].fetch_add(1, Relaxed);
        }
    }

    /// The count of one outcome (tests).
    pub fn tls_handshakes(&self, outcome: &str) -> u64 {
        TLS_OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .map_or(0, |i| self.tls[i].load(Relaxed))
    }

    /// `blocking`: a blocking query (`?index=`), which waits by design and would drown the
    /// latency of plain GETs.
    pub fn record(&self, method: &str, route: &str, status: u16, blocking: bool, took: Duration) {
        let secs = took.as_secs_f64();
        let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((method.to_owned(), route.to_owned(), status, blocking))
            .or_default()
            .observe(secs);
    }
}

fn sum_blocks<'a>(
    blocks: impl Iterator<Item = &'a DnsCounters>,
) -> ([u64; QTYPES.len()], [u64; RCODES.len()], u64, u64) {
    let (mut q, mut r, mut t, mut d) = ([0; QTYPES.len()], [0; RCODES.len()], 0, 0);
    for b in blocks {
        for (i, c) in b.qtype.iter().enumerate() {
            q[i] += c.load(Relaxed);
        }
        for (i, c) in b.rcode.iter().enumerate() {
            r[i] += c.load(Relaxed);
        }
        t += b.truncated.load(Relaxed);
        d += b.dropped.load(Relaxed);
    }
    (q, r, t, d)
}

fn rate_limited<'a>(blocks: impl Iterator<Item = &'a DnsCounters>) -> u64 {
    blocks.map(|b| b.rate_limited.load(Relaxed)).sum()
}

/// The one Prometheus text-format writer every subsystem renders with: a family's `# HELP`
/// and `# TYPE` always go out together, before its samples, and label values are escaped.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

/// A family's type.
#[derive(Clone, Copy)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::Summary => "summary",
        }
    }
}

/// The samples of one family (see [`Exposition::family`]).
pub struct Family<'a> {
    out: &'a mut String,
    name: &'a str,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition {
            out: String::with_capacity(8192),
        }
    }

    /// Starts a family: its HELP and TYPE lines; add its samples to what this returns.
    pub fn family<'a>(&'a mut self, name: &'a str, kind: Kind, help: &str) -> Family<'a> {
        let _ = writeln!(
            self.out,
            "# HELP {name} {}\n# TYPE {name} {}",
            help.replace('\\', "\\\\").replace('\n', "\\n"),
            kind.as_str()
        );
        Family {
            out: &mut self.out,
            name,
        }
    }

    /// A counter family with one unlabelled sample.
    pub fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.family(name, Kind::Counter, help).sample(&[], v);
    }

    /// A gauge family with one unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, v: impl std::fmt::Display) {
        self.family(name, Kind::Gauge, help).sample(&[], v);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

impl Family<'_> {
    /// One sample of the family, with these labels (values escaped).
    pub fn sample(&mut self, labels: &[(&str, &str)], v: impl std::fmt::Display) -> &mut Self {
        let name = self.name;
        self.suffixed(name, "", labels, v);
        self
    }

    fn suffixed(
        &mut self,
        name: &str,
        suffix: &str,
        labels: &[(&str, &str)],
        v: impl std::fmt::Display,
    ) {
        let _ = write!(self.out, "{name}{suffix}");
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"");
                for c in val.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {v}");
    }

    /// A summary's `_sum` and `_count` samples.
    pub fn sum_count(&mut self, labels: &[(&str, &str)], sum: f64, count: u64) -> &mut Self {
        let name = self.name;
        self.suffixed(name, "_sum", labels, sum);
        self.suffixed(name, "_count", labels, count);
        self
    }

    /// A histogram's buckets, sum and count.
    fn histogram(&mut self, labels: &[(&str, &str)], h: &Histogram) -> &mut Self {
        let name = self.name;
        let mut with_le: Vec<(&str, &str)> = labels.to_vec();
        let les: Vec<String> = BUCKETS.iter().map(|b| b.to_string()).collect();
        for (i, le) in les.iter().enumerate() {
            with_le.push(("le", le));
            self.suffixed(name, "_bucket", &with_le, h.buckets[i]);
            with_le.pop();
        }
        with_le.push(("le", "+Inf"));
        self.suffixed(name, "_bucket", &with_le, h.count);
        self.suffixed(name, "_sum", labels, h.sum);
        self.suffixed(name, "_count", labels, h.count);
        self
    }
}

/// What the API knows at scrape time.
pub struct Live<'a> {
    pub index: u64,
    /// Live nodes per role; roles seen before and empty now are listed with 0.
    pub roles: &'a [(String, usize)],
    pub sessions: usize,
    pub blocking_queries: usize,
}

/// Renders the DNS, registry, API and process families (the `/metrics` handler adds etcd's).
pub fn render(dns: &DnsStats, reg: &RegistryCounters, api: &ApiMetrics, live: &Live) -> Exposition {
    let mut out = Exposition::new();
    out.family(
        "rollcall_build_info",
        Kind::Gauge,
        "Version of the running rollcall.",
    )
    .sample(
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("revision", env!("ROLLCALL_GIT_REV")),
        ],
        1,
    );

    let udp = dns.udp.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let per_transport = [
        ("udp", sum_blocks(udp.iter().map(|b| &**b))),
        ("tcp", sum_blocks(std::iter::once(&dns.tcp.0))),
    ];
    let mut f = out.family(
        "rollcall_dns_queries_total",
        Kind::Counter,
        "DNS queries answered, by transport and query type.",
    );
    for (transport, (q, ..)) in &per_transport {
        for (i, (_, name)) in QTYPES.iter().enumerate() {
            f.sample(&[("transport", transport), ("qtype", name)], q[i]);
        }
    }
    let mut f = out.family(
        "rollcall_dns_responses_total",
        Kind::Counter,
        "DNS responses, by transport and response code.",
    );
    for (transport, (_, r, ..)) in &per_transport {
        for (i, name) in RCODES.iter().enumerate() {
            f.sample(&[("transport", transport), ("rcode", name)], r[i]);
        }
    }
    out.counter(
        "rollcall_dns_truncated_total",
        "UDP answers sent with TC set (the client retries over TCP).",
        per_transport[0].1 .2,
    );
    out.counter(
        "rollcall_dns_dropped_total",
        "Datagrams dropped unanswered (runts, responses).",
        per_transport[0].1 .3,
    );
    out.counter(
        "rollcall_dns_rate_limited_total",
        "UDP responses held back by rate limiting (--rate-limit): dropped, or sent truncated (slip).",
        rate_limited(udp.iter().map(|b| &**b)),
    );

    let events = [
        (
            "rollcall_registrations_total",
            "New registrations.",
            &reg.registrations,
        ),
        (
            "rollcall_renewals_total",
            "Lease renewals (PUT of an unchanged node, session heartbeats).",
            &reg.renewals,
        ),
        (
            "rollcall_deregistrations_total",
            "Deregistrations (DELETE, closed sessions).",
            &reg.deregistrations,
        ),
        (
            "rollcall_expiries_total",
            "Leases that ran out.",
            &reg.expiries,
        ),
        (
            "rollcall_session_opens_total",
            "Sessions opened.",
            &reg.session_opens,
        ),
        (
            "rollcall_session_closes_total",
            "Sessions whose connection closed while holding a node.",
            &reg.session_closes,
        ),
        (
            "rollcall_snapshot_publishes_total",
            "DNS snapshots published.",
            &reg.publishes,
        ),
        (
            "rollcall_changes_total",
            "PUTs that changed a registered node (address, port, service, ttl, weight, meta).",
            &reg.changes,
        ),
        (
            "rollcall_storage_failures_total",
            "Failed writes, syncs or rewrites of the data dir (requests answered 503).",
            &reg.storage_failures,
        ),
        (
            "rollcall_journal_rewrites_total",
            "Rewrites of the data dir's log from the live set (compactions, recoveries).",
            &reg.compactions,
        ),
    ];
    for (name, help, c) in events {
        out.counter(name, help, c.load(Relaxed));
    }
    out.gauge(
        "rollcall_index",
        "Generation index of the registry.",
        live.index,
    );
    let mut f = out.family("rollcall_nodes", Kind::Gauge, "Live nodes per role.");
    for (role, n) in live.roles {
        f.sample(&[("role", role)], n);
    }

    let map = api
        .requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut f = out.family(
        "rollcall_http_request_duration_seconds",
        Kind::Histogram,
        "HTTP API requests by method, route and status.",
    );
    for ((method, route, status, blocking), h) in map {
        let (status, blocking) = (status.to_string(), blocking.to_string());
        f.histogram(
            &[
                ("method", &method),
                ("route", &route),
                ("status", &status),
                ("blocking", &blocking),
            ],
            &h,
        );
    }
    let mut f = out.family(
        "rollcall_http_tls_handshakes_total",
        Kind::Counter,
        "Connections to the API's TLS port by how they started: ok, failed (a refused \
         certificate or protocol), timeout, plaintext (a plain-HTTP request, answered 400).",
    );
    for (i, outcome) in TLS_OUTCOMES.iter().enumerate() {
        f.sample(&[("result", outcome)], api.tls[i].load(Relaxed));
    }
    out.gauge(
        "rollcall_sessions",
        "Open WebSocket sessions (one per node that holds one).",
        live.sessions,
    );
    out.gauge(
        "rollcall_blocking_queries",
        "Blocking queries (GET ...?index=) waiting now.",
        live.blocking_queries,
    );
    if let Some(cell) = dns.snapshot.get() {
        let mut f = out.family(
            "rollcall_soa_serial",
            Kind::Gauge,
            "SOA serial of each served zone.",
        );
        for z in &cell.load().zones {
            f.sample(&[("zone", &z.apex_name.to_string())], z.serial);
        }
    }
    out.family(
        "rollcall_zone_loads_total",
        Kind::Counter,
        "Loads of the zone files (at start and on SIGHUP), by result; a failed one keeps the previous zones.",
    )
    .sample(&[("result", "ok")], dns.zone_loads_ok.load(Relaxed))
    .sample(&[("result", "error")], dns.zone_loads_failed.load(Relaxed));
    out.gauge(
        "rollcall_zone_last_load_timestamp_seconds",
        "When the zone files last loaded successfully (Unix time).",
        dns.zone_last_load_ms.load(Relaxed) as f64 / 1000.0,
    );
    out.gauge(
        "rollcall_zone_last_load_duration_seconds",
        "How long that load took.",
        dns.zone_last_load_us.load(Relaxed) as f64 / 1e6,
    );
    out.family(
        "rollcall_journal_commit_seconds",
        Kind::Histogram,
        "Data dir commits: durable=\"true\" with fsync (registrations, deregistrations), \"false\" written only (renewals).",
    )
    .histogram(&[("durable", "true")], &reg.commit_durable.snapshot())
    .histogram(&[("durable", "false")], &reg.commit_buffered.snapshot());
    process_metrics(&mut out);
    if let Some(f) = dns.forward.get() {
        f.render(&mut out);
    }
    out
}

/// The standard process_* families, from /proc/self (Linux); nothing where it cannot be read.
fn process_metrics(out: &mut Exposition) {
    // SAFETY: sysconf with constant names, no pointers.
    let (tck, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
            libc::sysconf(libc::_SC_PAGESIZE).max(1) as f64,
        )
    };
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may hold spaces) in parentheses.
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        // rest[0] is field 3 (state): utime 14, stime 15, starttime 22, vsize 23, rss 24.
        let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        if let (Some(u), Some(s)) = (field(14), field(15)) {
            out.family(
                "process_cpu_seconds_total",
                Kind::Counter,
                "User and system CPU time.",
            )
            .sample(&[], (u + s) / tck);
        }
        if let Some(v) = field(23) {
            out.gauge("process_virtual_memory_bytes", "Virtual memory size.", v);
        }
        if let Some(r) = field(24) {
            out.gauge(
                "process_resident_memory_bytes",
                "Resident memory size.",
                r * page,
            );
        }
        let btime = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())
        });
        if let (Some(start), Some(btime)) = (field(22), btime) {
            out.gauge(
                "process_start_time_seconds",
                "Start time of the process (Unix time).",
                btime + start / tck,
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        out.gauge(
            "process_open_fds",
            "Open file descriptors.",
            fds.count() as f64,
        );
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        out.gauge(
            "process_max_fds",
            "Limit of open file descriptors.",
            lim.rlim_cur as f64,
        );
    }
}
