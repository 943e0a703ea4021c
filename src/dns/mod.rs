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
//! - `forward.rs`: names outside our zones relayed upstream (`--forward`), off the fast path.
//!
//! Nothing here takes a lock while answering: readers load the current [`Snapshot`] from an
//! `ArcSwap` that only the [`Builder`] stores into.

pub mod builder;
pub mod encode;
pub mod forward;
pub mod role;
pub mod rrl;
pub mod snapshot;
pub mod tcp;
pub mod udp;
pub mod wire;
pub mod zones;

pub use builder::{Builder, ZoneSettings};
pub use snapshot::Snapshot;
