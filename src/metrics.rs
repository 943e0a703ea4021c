//! Counters for `/metrics` (Prometheus text format).
//!
//! The one exposition writer ([`Exposition`]) and the counters that are not the DNS server's:
//! the registry writer counts into [`RegistryCounters`] (one writer, relaxed atomics), the API
//! middleware records requests by route and status with a latency histogram ([`ApiMetrics`]).
//! The DNS server owns its counters (`dns::stats`), forwarding and etcd theirs; each renders
//! its families into an [`Exposition`], and `api::metrics` puts the page together. This
//! module depends on no other part of rollcall.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

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
    /// The data dir's commit latency histograms.
    pub fn render_commits(&self, out: &mut Exposition) {
        out.family(
        "rollcall_journal_commit_seconds",
        Kind::Histogram,
        "Data dir commits: durable=\"true\" with fsync (registrations, deregistrations), \"false\" written only (renewals).",
    )
    .histogram(&[("durable", "true")], &self.commit_durable.snapshot())
    .histogram(&[("durable", "false")], &self.commit_buffered.snapshot());
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
    /// The API's request histograms and TLS handshake counts.
    pub fn render(&self, out: &mut Exposition) {
        let map = self
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
            f.sample(&[("result", outcome)], self.tls[i].load(Relaxed));
        }
    }
}

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

/// Something that writes its own families (a subsystem's stats), for the owner of the page
/// to call without knowing its type.
pub trait Render: Send + Sync {
    fn render(&self, out: &mut Exposition);
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

/// The standard process_* families, from /proc/self (Linux); nothing where it cannot be read.
pub fn process_metrics(out: &mut Exposition) {
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
