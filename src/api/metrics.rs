//! The `/metrics` page: every subsystem renders its own families into one [`Exposition`];
//! this is only their order (the README's list is the contract).

use std::sync::atomic::Ordering::Relaxed;

use crate::dns::stats::DnsStats;
use crate::metrics::{ApiMetrics, Exposition, Kind, RegistryCounters};

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

    dns.render_traffic(&mut out);

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

    api.render(&mut out);
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
    dns.render_zones(&mut out);
    reg.render_commits(&mut out);
    crate::metrics::process_metrics(&mut out);
    dns.render_forward(&mut out);
    out
}
