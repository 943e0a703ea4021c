//! The authoritative DNS server.
//!
//! - `snapshot.rs`: the immutable answer set (types only);
//! - `builder.rs`: the [`Builder`], which owns what snapshots are made of and publishes them;
//! - `role.rs`: one role's data, kept up to date change by change;
//! - `encode.rs`: wire-format encoding of answer templates;
//! - `wire.rs`: the query path (bytes in, bytes out) shared by UDP and TCP;
//! - `udp.rs`: one `SO_REUSEPORT` socket per thread, a tight receive-answer-send loop;
//! - `tcp.rs`: tokio tasks, one per connection, length-prefixed messages;
//! - `zones.rs`: static zone files;
//! - `forward/`: names outside our zones relayed upstream (`--forward`), off the fast path;
//! - `policy.rs`: what one client may do (query, recurse), the same over UDP and TCP;
//! - `acl.rs`: the [`acl::Acl`] type of `--allow-query`, `--allow-recursion`,
//!   `--rate-limit-exempt`, and the trusted default networks;
//! - `rrl.rs`: response rate limiting, applied to every UDP response;
//! - `stats.rs`: its counters (per-thread blocks) and their `/metrics` families.
//!
//! Nothing here takes a lock while answering: readers load the current [`Snapshot`] from an
//! `ArcSwap` that only the [`Builder`] stores into.

pub mod acl;
pub mod builder;
pub mod encode;
pub mod forward;
pub mod policy;
pub mod role;
pub mod rrl;
pub mod snapshot;
pub mod stats;
pub mod tcp;
pub mod udp;
pub mod wire;
pub mod zones;

pub use builder::{Builder, ZoneSettings};
pub use snapshot::Snapshot;
