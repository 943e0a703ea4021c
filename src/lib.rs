//! rollcall: service discovery for elastic container stacks.
//!
//! Layout (see ARCHITECTURE.md for the why):
//! - [`cli`]: raw flags; [`config`]: validated settings built once from them;
//! - [`registry`]: the single owner of registrations (leases, expiry, index, change feed);
//! - [`journal`]: the embedded registry owner's log in the data directory;
//! - [`etcd`]: etcd mode (several servers): client, mirror, link state (no registry types:
//!   the node schema is `registry::etcd::schema`);
//! - [`dns`]: snapshot, query path, UDP and TCP transports, DNS policy and ACLs, rate limiting,
//!   forwarding, zone files, its counters;
//! - [`api`]: the HTTP API (axum); [`tls`]: HTTPS for it, both ends (rustls);
//! - [`metrics`]: the one Prometheus exposition writer (a leaf: it imports nothing of ours);
//! - [`server`]: `rollcall serve`, wiring the above together; [`shutdown`], [`systemd`],
//!   [`net`], [`clock`]: its small helpers;
//! - [`agent`], [`hipache`], [`status`], [`docker`]: the client subcommands, over [`client`];
//! - [`fuzz`]: the entry points `fuzz/` and `tests/fuzz_smoke.rs` share.

pub mod agent;
pub mod api;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod dns;
pub mod docker;
pub mod etcd;
pub mod fuzz;
pub mod hipache;
pub mod journal;
pub mod metrics;
pub mod net;
pub mod registry;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod systemd;
#[cfg(test)]
mod test_rng;
pub mod tls;
