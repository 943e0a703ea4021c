//! The DNS server's counters, and their families on `/metrics`.
//!
//! The hot path counts into per-thread blocks ([`DnsCounters`]), each written by one thread
//! only with plain relaxed load + store (no locked instruction, no shared cache line), and
//! summed when `/metrics` is scraped. TCP answers share one block ([`SharedDnsCounters`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::metrics::{Exposition, Kind, Render};

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
    /// Forwarding's counters, when `--forward` is on (they render themselves: this module
    /// does not know forwarding's types).
    pub forward: std::sync::OnceLock<Arc<dyn Render>>,
    /// The published snapshot, for the zones' SOA serials.
    pub snapshot: std::sync::OnceLock<Arc<arc_swap::ArcSwap<super::snapshot::Snapshot>>>,
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

impl DnsStats {
    /// Queries, responses, truncations, drops and rate limiting, by transport.
    pub fn render_traffic(&self, out: &mut Exposition) {
        let udp = self.udp.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let per_transport = [
            ("udp", sum_blocks(udp.iter().map(|b| &**b))),
            ("tcp", sum_blocks(std::iter::once(&self.tcp.0))),
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
    }

    /// The served zones' SOA serials and the zone file loads.
    pub fn render_zones(&self, out: &mut Exposition) {
        if let Some(cell) = self.snapshot.get() {
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
    .sample(&[("result", "ok")], self.zone_loads_ok.load(Relaxed))
    .sample(&[("result", "error")], self.zone_loads_failed.load(Relaxed));
        out.gauge(
            "rollcall_zone_last_load_timestamp_seconds",
            "When the zone files last loaded successfully (Unix time).",
            self.zone_last_load_ms.load(Relaxed) as f64 / 1000.0,
        );
        out.gauge(
            "rollcall_zone_last_load_duration_seconds",
            "How long that load took.",
            self.zone_last_load_us.load(Relaxed) as f64 / 1e6,
        );
    }

    /// Forwarding's families, when `--forward` is on.
    pub fn render_forward(&self, out: &mut Exposition) {
        if let Some(f) = self.forward.get() {
            f.render(out);
        }
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
