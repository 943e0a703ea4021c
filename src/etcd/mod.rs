//! etcd mode: several symmetric rollcall servers sharing one etcd cluster.
//!
//! - [`client`]: a small etcd v3 client over the JSON gateway, with member failover;
//! - [`mirror`]: list at one revision, then watch from the next, re-list on compaction, verify
//!   periodically; feeds the etcd owner (`registry::etcd`) in revision order;
//! - this module: settings, where rollcall's keys live under the prefix, and the link's state
//!   as `/readyz` and `/metrics` show it. What a node's key and value hold is the registry's
//!   (`registry::etcd::schema`): this module knows no registry types.
//!
//! Layout in etcd (prefix `--etcd-prefix`, default `/rollcall`):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `<prefix>/v1/nodes/<role>/<node>` | a node (`registry::etcd::schema::NodeValue`, JSON) | the node's current lease |
//! | `<prefix>/v1/meta/serial-base` | unix seconds of the cluster's first use | none |

pub mod client;
pub mod mirror;

use crate::metrics::{Exposition, Kind};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// `rollcall serve --etcd …` settings.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// Client URLs of the members (`http://10.0.0.1:2379`).
    pub endpoints: Vec<String>,
    /// Key prefix (no trailing slash).
    pub prefix: String,
    /// Budget of one etcd call, failover included; then 503.
    pub timeout: Duration,
    /// TCP connect timeout per member.
    pub dial_timeout: Duration,
    /// How often the mirror is compared with a full list.
    pub resync: Duration,
    /// Largest watch response line taken (tests lower it with the environment variable
    /// `ROLLCALL_TEST_ETCD_WATCH_MAX_BYTES`; not a flag).
    pub watch_line_max: usize,
}

impl EtcdConfig {
    pub fn nodes_prefix(&self) -> Vec<u8> {
        format!("{}/v1/nodes/", self.prefix).into_bytes()
    }

    pub fn serial_base_key(&self) -> Vec<u8> {
        format!("{}/v1/meta/serial-base", self.prefix).into_bytes()
    }
}

/// The end of the key range that holds every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Why the mirror listed everything again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relist {
    Start,
    Compacted,
    Canceled,
    Resync,
    /// The watch could not resume (a catch-up too large, or resumes that failed twice).
    Stuck,
}

impl Relist {
    pub const ALL: [Relist; 5] = [
        Relist::Start,
        Relist::Compacted,
        Relist::Canceled,
        Relist::Resync,
        Relist::Stuck,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Relist::Start => "start",
            Relist::Compacted => "compacted",
            Relist::Canceled => "canceled",
            Relist::Resync => "resync",
            Relist::Stuck => "stuck",
        }
    }
}

/// Behind etcd for longer than this: `/readyz` answers 503.
pub const BEHIND_NOT_READY: Duration = Duration::from_secs(5);

/// The state of this server's link to etcd, for `/readyz`, `/metrics` and the logs.
#[derive(Default)]
pub struct Link {
    up: AtomicBool,
    /// The link was up once, or its being down was logged (a server that never reaches etcd
    /// says why once: a wrong CA, a refused user).
    told: AtomicBool,
    /// The mirror has listed at least once since start.
    listed: AtomicBool,
    /// Last revision the mirror applied.
    pub applied: AtomicI64,
    /// Last revision etcd reported (probe).
    pub seen: AtomicI64,
    /// Unix ms of the last successful contact.
    pub last_contact_ms: AtomicU64,
    pub relists: [AtomicU64; Relist::ALL.len()],
    /// Keys and values under the prefix that are not registrations the API would take.
    pub invalid_values: AtomicU64,
    pub repairs: AtomicU64,
    pub dropped_events: AtomicU64,
    /// Unix ms when the copy was last known to hold everything etcd had (0: never).
    caught_up_ms: AtomicU64,
    /// The last revision the mirror passed on, and how many keys were under the prefix then.
    sent: std::sync::Mutex<(i64, i64)>,
    /// Set by the probe when it restarts a silent watch of a copy that stays behind.
    pub stalled: AtomicBool,
    /// Unix ms when the watch last passed events on (or a list completed).
    pub last_events_ms: AtomicU64,
    /// Watch response fragments received.
    pub fragments: AtomicU64,
    pub client: std::sync::OnceLock<Arc<client::Client>>,
}

impl Link {
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Records a contact outcome; logs a line only when the state changes.
    pub fn set_up(&self, up: bool, why: &str) {
        let first_contact = up && self.last_contact_ms.swap(crate::clock::unix_ms(), Relaxed) == 0;
        let told = self.told.swap(true, Relaxed);
        if self.up.swap(up, Relaxed) != up || !told && !up {
            if first_contact {
                tracing::info!("etcd link up");
            } else if up {
                tracing::info!("etcd link up: writes accepted again");
            } else {
                tracing::warn!(reason = %why, "etcd link down: DNS keeps answering the last known set; writes answer 503 until etcd is back");
            }
        }
    }

    pub fn set_listed(&self) {
        self.listed.store(true, Relaxed);
        self.set_caught_up();
    }

    pub fn set_caught_up(&self) {
        self.caught_up_ms.store(crate::clock::unix_ms(), Relaxed);
    }

    /// How long since the copy was last known caught up (None before the first list).
    pub fn behind(&self) -> Option<Duration> {
        match self.caught_up_ms.load(Relaxed) {
            0 => None,
            t => Some(Duration::from_millis(
                crate::clock::unix_ms().saturating_sub(t),
            )),
        }
    }

    pub fn set_sent(&self, revision: i64, keys: i64) {
        *self.sent.lock().unwrap_or_else(|p| p.into_inner()) = (revision, keys);
        self.last_events_ms.store(crate::clock::unix_ms(), Relaxed);
    }

    /// How long since the watch last passed events on (or a list completed).
    pub fn silent(&self) -> Duration {
        Duration::from_millis(
            crate::clock::unix_ms().saturating_sub(self.last_events_ms.load(Relaxed)),
        )
    }

    pub fn sent(&self) -> (i64, i64) {
        *self.sent.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn count_relist(&self, why: Relist) {
        let i = Relist::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.relists[i].fetch_add(1, Relaxed);
    }

    /// Ready: etcd answers and the mirror has a full copy.
    pub fn ready(&self) -> Result<(), String> {
        if !self.listed.load(Relaxed) {
            return Err(
                "not ready: the first list of the registrations in etcd has not completed".into(),
            );
        }
        if !self.is_up() {
            return Err(
                "not ready: etcd is unreachable or has no leader; DNS answers the last known set"
                    .into(),
            );
        }
        if let Some(b) = self.behind().filter(|b| *b > BEHIND_NOT_READY) {
            let lag = (self.seen.load(Relaxed) - self.applied.load(Relaxed)).max(0);
            return Err(format!(
                "not ready: this server's copy has been behind etcd for {:.0} s ({lag} revisions \
                 behind at the last probe); DNS answers what it holds",
                b.as_secs_f64()
            ));
        }
        Ok(())
    }

    /// Prometheus text for the link.
    pub fn render(&self, out: &mut Exposition) {
        out.gauge(
            "rollcall_etcd_up",
            "1 while etcd answers this server.",
            u8::from(self.is_up()),
        );
        let applied = self.applied.load(Relaxed);
        out.gauge(
            "rollcall_etcd_revision",
            "Last etcd revision applied to this server's copy.",
            applied,
        );
        out.gauge(
            "rollcall_etcd_mirror_lag_revisions",
            "Revisions etcd is ahead of this server's copy (last probe).",
            (self.seen.load(Relaxed) - applied).max(0),
        );
        out.gauge(
            "rollcall_etcd_mirror_behind_seconds",
            "Seconds since this server's copy was last known to hold everything etcd had (checked every second; -1 before the first list).",
            self.behind().map_or(-1.0, |b| b.as_secs_f64()),
        );
        out.counter(
            "rollcall_etcd_watch_fragments_total",
            "Watch response fragments received (large responses cut by etcd).",
            self.fragments.load(Relaxed),
        );
        let last = self.last_contact_ms.load(Relaxed);
        let since = if last == 0 {
            -1.0
        } else {
            crate::clock::unix_ms().saturating_sub(last) as f64 / 1000.0
        };
        out.gauge(
            "rollcall_etcd_last_contact_seconds",
            "Seconds since etcd last answered.",
            since,
        );
        let mut f = out.family(
            "rollcall_etcd_relists_total",
            Kind::Counter,
            "Full lists of the registrations, by reason.",
        );
        for (i, r) in Relist::ALL.iter().enumerate() {
            f.sample(&[("reason", r.as_str())], self.relists[i].load(Relaxed));
        }
        out.counter(
            "rollcall_etcd_resync_repairs_total",
            "Differences a verification list found and repaired.",
            self.repairs.load(Relaxed),
        );
        out.counter(
            "rollcall_etcd_invalid_values_total",
            "Keys or values under the prefix that are not registrations the API would take (counted once per key and revision); served by no server.",
            self.invalid_values.load(Relaxed),
        );
        out.counter(
            "rollcall_etcd_dropped_events_total",
            "Watch events ignored (duplicates, old revisions, foreign keys).",
            self.dropped_events.load(Relaxed),
        );
        if let Some(c) = self.client.get() {
            let mut f = out.family(
                "rollcall_etcd_request_seconds",
                Kind::Summary,
                "etcd calls by operation (sum and count; errors separately).",
            );
            for (i, op) in client::OPS.iter().enumerate() {
                let s = &c.stats[i];
                f.sum_count(
                    &[("op", op)],
                    s.micros.load(Relaxed) as f64 / 1e6,
                    s.count.load(Relaxed),
                );
            }
            let mut f = out.family(
                "rollcall_etcd_request_errors_total",
                Kind::Counter,
                "etcd calls that failed, by operation.",
            );
            for (i, op) in client::OPS.iter().enumerate() {
                f.sample(&[("op", op)], c.stats[i].errors.load(Relaxed));
            }
        }
    }
}

/// An error and its sources on one line; a TLS failure as a sentence naming the etcd flags.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    match crate::tls::find_rustls_error(e) {
        Some(r) => crate::tls::etcd_sentence(r),
        None => crate::client::chain(e),
    }
}
