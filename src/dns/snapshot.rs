//! The immutable DNS snapshot: every answer rollcall can give, pre-encoded in wire format.
//!
//! A [`Snapshot`] holds [`Template`]s, so that answering a query is a hash lookup, a copy and a
//! few patched bytes (see `wire.rs`). Snapshots are made by the [`Builder`](super::Builder)
//! (`builder.rs`) from static zones (`zones.rs`) and per-role data (`role.rs`), and never change
//! once published. This module is types only: it depends on no other part of `dns/`.
//!
//! Wire layout of a template: header (12 bytes, ID 0, QR|AA, counts set), the question with
//! the owner name in lower case, then answer and additional records. Answers name their owner
//! with a pointer to offset 12, so the query's own question bytes can be copied over the
//! template's (same length) to preserve the client's letter case.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::rr::Name;

/// The hash maps of the query path: foldhash, keyed with a per-process random seed (names are
/// registered by clients, so the seed keeps them from choosing colliding keys), several times
/// cheaper than SipHash on the short names looked up per query.
pub type Map<K, V> = HashMap<K, V, RandomState>;
pub type RandomState = foldhash::fast::RandomState;

pub const TYPE_A: u16 = 1;
pub const TYPE_NS: u16 = 2;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_SRV: u16 = 33;

/// Everything the query path reads. Built by the [`Builder`], never mutated.
pub struct Snapshot {
    /// Served zones, most specific (longest apex) first. Static zones are shared by every
    /// snapshot until the zone files are loaded again.
    pub zones: Vec<Arc<Zone>>,
    /// Dynamic data of the first zone, keyed by role label (lower case, no length byte).
    pub roles: Map<Box<[u8]>, Arc<RoleData>>,
    /// Reverse data of every registered node.
    pub reverse: ReverseIndex,
    /// The generation index of the registry this snapshot reflects.
    pub index: u64,
}

pub struct Zone {
    /// Apex in lower-case wire format.
    pub apex: Box<[u8]>,
    pub apex_name: Name,
    /// True for the zone that holds the registered roles.
    pub dynamic: bool,
    /// The apex's own records (SOA, NS, static apex data).
    pub apex_entry: Entry,
    /// Static names of the zone (lower-case wire, absolute), including empty non-terminals.
    pub names: Arc<Map<Box<[u8]>, Entry>>,
    /// The SOA record for negative answers, without its owner name (type..rdata).
    pub soa_tail: Box<[u8]>,
    pub serial: u32,
}

/// The answers of one role: every name under `<role>.<zone>`.
#[derive(Clone, Default)]
pub struct RoleData {
    /// The role's own names (absolute lower-case wire): `role.zone` (A, AAAA, SRV),
    /// `_tcp.role.zone` (an empty non-terminal) and `_svc._tcp.role.zone` (SRV).
    pub names: Map<Box<[u8]>, Entry>,
    /// `node.role.zone` -> its address record, sharded so that a change copies one shard.
    pub nodes: Shards<Box<[u8]>, Entry>,
}

/// One name a reverse lookup answers: a node's absolute wire name and its TTL.
pub type Reverse = (Box<[u8]>, u32);

/// Address -> the names of every registered node with it (any role), sorted by name. A PTR
/// query is one hash lookup, whatever the number of roles and nodes.
pub type ReverseIndex = Shards<IpAddr, Vec<Reverse>>;

impl RoleData {
    /// The entry of a name under this role. `depth` is how many labels precede the zone's
    /// apex (1: the role's own name). A node's name is two deep and never starts with `_`
    /// (labels cannot), which tells it from `_tcp.role.zone`.
    #[inline]
    pub fn get(&self, name: &[u8], depth: usize) -> Option<&Entry> {
        if depth == 2 && name.get(1) != Some(&b'_') {
            self.nodes.get(name)
        } else {
            self.names.get(name)
        }
    }
}

/// A hash map cut into `Arc`-shared shards: cloning it copies one pointer per shard, and a
/// change copies only the shard it touches (copy on write). Lookups cost one extra hash.
/// The shard count doubles as the map grows and halves as it shrinks, so a shard holds
/// between a quarter of [`SHARD_TARGET`] and [`SHARD_TARGET`] entries.
#[derive(Clone)]
pub struct Shards<K, V> {
    /// Picks the shard: keyed per map (not the shards' own hasher), so names cannot be
    /// chosen to pile into one shard.
    pick: RandomState,
    /// A power of two of them.
    shards: Box<[Arc<Map<K, V>>]>,
    len: usize,
}

/// Entries per shard before the shard count doubles.
const SHARD_TARGET: usize = 64;

impl<K: Hash + Eq + Clone, V: Clone> Default for Shards<K, V> {
    fn default() -> Self {
        Shards {
            pick: RandomState::default(),
            shards: Box::new([Arc::new(Map::default())]),
            len: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Shards<K, V> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn shard<Q: Hash + ?Sized>(&self, k: &Q) -> usize {
        self.pick.hash_one(k) as usize & (self.shards.len() - 1)
    }

    #[inline]
    pub fn get<Q>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.shard(k)].get(k)
    }

    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        let i = self.shard(&k);
        let old = Arc::make_mut(&mut self.shards[i]).insert(k, v);
        if old.is_none() {
            self.len += 1;
            if self.len > self.shards.len() * SHARD_TARGET {
                self.reshard(self.shards.len() * 2);
            }
        }
        old
    }

    pub fn remove<Q>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = self.shard(k);
        if !self.shards[i].contains_key(k) {
            return None;
        }
        let old = Arc::make_mut(&mut self.shards[i]).remove(k);
        self.len -= usize::from(old.is_some());
        // Shrinks too, so that a map that was once big does not cost its peak shard count in
        // every clone for ever.
        if self.shards.len() > 1 && self.len < self.shards.len() * SHARD_TARGET / 4 {
            self.reshard(self.shards.len() / 2);
        }
        old
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> + '_ {
        self.shards.iter().flat_map(|s| s.iter())
    }

    fn reshard(&mut self, count: usize) {
        let mut shards: Vec<Map<K, V>> = (0..count).map(|_| Map::default()).collect();
        for shard in self.shards.iter() {
            for (k, v) in shard.iter() {
                let i = self.pick.hash_one(k) as usize & (count - 1);
                shards[i].insert(k.clone(), v.clone());
            }
        }
        self.shards = shards.into_iter().map(Arc::new).collect();
    }

    /// How many shards there are (tests).
    #[cfg(test)]
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Shards shared with `other` (tests: a change copies only what it touches).
    #[cfg(test)]
    pub fn shared_shards(&self, other: &Self) -> usize {
        self.shards
            .iter()
            .zip(other.shards.iter())
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count()
    }
}

/// The RRsets of one name. An entry with no sets is an empty non-terminal (NODATA for all).
#[derive(Default, Clone)]
pub struct Entry {
    pub sets: Vec<RrSet>,
}

impl Entry {
    pub fn get(&self, rtype: u16) -> Option<&RrSet> {
        self.sets.iter().find(|s| s.rtype == rtype)
    }
}

#[derive(Clone)]
pub struct RrSet {
    pub rtype: u16,
    pub rotations: Arc<[Template]>,
}

/// A whole pre-encoded response.
pub struct Template {
    pub bytes: Box<[u8]>,
    /// End of the answer section: a response cut shorter than this lacks answers (TC).
    pub answer_end: u32,
    /// End offset of each additional record, in order: the places a too-long response can be
    /// cut without losing answers.
    pub additional_ends: Box<[u32]>,
    /// Size of every answer record when they all have the same size and nothing follows them
    /// (A/AAAA sets): the query path then rotates the records itself, one step per query, so
    /// every node comes first in turn. 0: the template is sent as it is.
    pub fixed_rr: u16,
}

/// A zone's SOA fields: read from a zone file, or the defaults of the dynamic zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Soa {
    pub mname: Name,
    pub rname: Name,
    pub serial: u32,
    pub refresh: i32,
    pub retry: i32,
    pub expire: i32,
    pub minimum: u32,
    pub ttl: u32,
}
