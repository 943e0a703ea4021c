//! The immutable DNS snapshot and the builder that publishes it.
//!
//! A [`Snapshot`] holds every answer rollcall can give, pre-encoded in wire format
//! ([`Template`]s), so that answering a query is a hash lookup, a copy and a few patched bytes
//! (see `wire.rs`). The [`Builder`] owns the parts snapshots are made of: the per-role tables
//! (rebuilt only for roles whose visible set changed) and the static zones (rebuilt on
//! SIGHUP). Publishing clones the outer role map (one `Arc` per role), rebuilds the apex
//! (SOA serial), and swaps the new snapshot in with `ArcSwap::store`. Readers never wait.
//!
//! Wire layout of a template: header (12 bytes, ID 0, QR|AA, counts set), the question with
//! the owner name in lower case, then answer and additional records. Answers name their owner
//! with a pointer to offset 12, so the query's own question bytes can be copied over the
//! template's (same length) to preserve the client's letter case.

use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use hickory_proto::op::Query;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};

use crate::registry::{Label, NodeSpec, Publish, RoleView};

use super::zones::StaticZone;

pub const TYPE_A: u16 = 1;
pub const TYPE_NS: u16 = 2;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_SRV: u16 = 33;
const CLASS_IN: u16 = 1;

/// How many rotations of an SRV set are pre-encoded (its records differ in size and its glue
/// points into them, so it cannot be rotated in place). Queries cycle through them.
const MAX_ROTATIONS: usize = 4;

/// Everything the query path reads. Built by the [`Builder`], never mutated.
pub struct Snapshot {
    /// Served zones, most specific (longest apex) first.
    pub zones: Vec<Zone>,
    /// Dynamic data of the first zone, keyed by role label (lower case, no length byte).
    pub roles: HashMap<Box<[u8]>, Arc<RoleData>>,
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
    pub names: Arc<HashMap<Box<[u8]>, Entry>>,
    /// The SOA record for negative answers, without its owner name (type..rdata).
    pub soa_tail: Box<[u8]>,
    pub serial: u32,
}

/// The answers of one role: every name under `<role>.<zone>`.
#[derive(Clone, Default)]
pub struct RoleData {
    /// The role's own names (absolute lower-case wire): `role.zone` (A, AAAA, SRV),
    /// `_tcp.role.zone` (an empty non-terminal) and `_svc._tcp.role.zone` (SRV).
    pub names: HashMap<Box<[u8]>, Entry>,
    /// `node.role.zone` -> its address record, sharded so that a change copies one shard.
    pub nodes: Shards<Box<[u8]>, Entry>,
    /// Reverse data: address -> (node's absolute wire name, ttl) of each node with it, sorted
    /// by name. A PTR lookup is a hash lookup per role, not a scan of every node.
    pub addrs: Shards<IpAddr, Vec<Reverse>>,
}

/// One name a reverse lookup answers: a node's absolute wire name and its TTL.
pub type Reverse = (Box<[u8]>, u32);

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
/// The shard count doubles as the map grows, so a shard holds about [`SHARD_TARGET`] entries.
#[derive(Clone)]
pub struct Shards<K, V> {
    /// Picks the shard: keyed per map (not the shards' own hasher), so names cannot be
    /// chosen to pile into one shard.
    pick: RandomState,
    /// A power of two of them.
    shards: Box<[Arc<HashMap<K, V>>]>,
    len: usize,
}

/// Entries per shard before the shard count doubles.
const SHARD_TARGET: usize = 64;

impl<K: Hash + Eq + Clone, V: Clone> Default for Shards<K, V> {
    fn default() -> Self {
        Shards {
            pick: RandomState::new(),
            shards: Box::new([Arc::new(HashMap::new())]),
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
        old
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> + '_ {
        self.shards.iter().flat_map(|s| s.iter())
    }

    fn reshard(&mut self, count: usize) {
        let mut shards: Vec<HashMap<K, V>> = (0..count)
            .map(|_| HashMap::with_capacity(SHARD_TARGET))
            .collect();
        for shard in self.shards.iter() {
            for (k, v) in shard.iter() {
                let i = self.pick.hash_one(k) as usize & (count - 1);
                shards[i].insert(k.clone(), v.clone());
            }
        }
        self.shards = shards.into_iter().map(Arc::new).collect();
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

// ----- encoding helpers -------------------------------------------------------------------------

/// `name.example.` -> lower-case wire bytes.
pub fn wire_name(name: &Name) -> Box<[u8]> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.iter() {
        out.push(label.len() as u8);
        out.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    out.push(0);
    out.into_boxed_slice()
}

/// Prepends a label to a wire name.
fn prepend(label: &str, suffix: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(label.len() + 1 + suffix.len());
    out.push(label.len() as u8);
    out.extend_from_slice(label.as_bytes());
    out.extend_from_slice(suffix);
    out
}

fn header(out: &mut Vec<u8>, an: usize, ar: usize) {
    out.extend_from_slice(&[0, 0, 0x84, 0, 0, 1]);
    out.extend_from_slice(&(an as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(ar as u16).to_be_bytes());
}

fn question(out: &mut Vec<u8>, name: &[u8], qtype: u16) {
    out.extend_from_slice(name);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
}

/// Largest offset a compression pointer can hold (14 bits).
const MAX_POINTER: usize = 0x3FFF;

/// Writes an RR whose owner is `owner`: a wire-format name, or a compression pointer.
fn rr_named(
    out: &mut Vec<u8>,
    owner: &[u8],
    rtype: u16,
    ttl: u32,
    rdata: impl FnOnce(&mut Vec<u8>),
) {
    out.extend_from_slice(owner);
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    let len_at = out.len();
    out.extend_from_slice(&[0, 0]);
    rdata(out);
    let len = (out.len() - len_at - 2) as u16;
    out[len_at..len_at + 2].copy_from_slice(&len.to_be_bytes());
}

/// Writes an RR whose owner is a compression pointer to `owner_at` (at most [`MAX_POINTER`]).
fn rr_ptr_owner(
    out: &mut Vec<u8>,
    owner_at: usize,
    rtype: u16,
    ttl: u32,
    rdata: impl FnOnce(&mut Vec<u8>),
) {
    debug_assert!(owner_at <= MAX_POINTER);
    rr_named(
        out,
        &(0xC000 | owner_at as u16).to_be_bytes(),
        rtype,
        ttl,
        rdata,
    );
}

fn addr_rdata(out: &mut Vec<u8>, addr: IpAddr) {
    match addr {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

fn addr_type(addr: IpAddr) -> u16 {
    if addr.is_ipv4() {
        TYPE_A
    } else {
        TYPE_AAAA
    }
}

/// Rotation `r` of `n` items out of `k`: the index the rotation starts at.
fn rotation_start(r: usize, n: usize, k: usize) -> usize {
    r * n / k
}

fn rotations<T>(
    items: &[T],
    mut encode: impl FnMut(&mut dyn Iterator<Item = &T>) -> Template,
) -> Arc<[Template]> {
    let n = items.len();
    let k = n.clamp(1, MAX_ROTATIONS);
    (0..k)
        .map(|r| {
            let start = rotation_start(r, n, k);
            encode(&mut items[start..].iter().chain(items[..start].iter()))
        })
        .collect()
}

/// One node as the DNS sees it.
#[derive(Clone)]
struct DnsNode {
    /// Absolute wire name `node.role.zone`.
    name: Box<[u8]>,
    addr: IpAddr,
    port: Option<u16>,
    weight: u16,
    service: Label,
    ttl: u32,
}

/// The largest response rollcall encodes for a role-wide RRset: a TCP message, less room for
/// an OPT record. A bigger set is cut to what fits (rotations start at different nodes).
const MAX_MESSAGE: usize = u16::MAX as usize - 11;

/// A/AAAA answer at `owner` for `nodes` (all of one address family).
/// One template; the query path rotates its equal-size records (see [`Template::fixed_rr`]).
/// Every node is in it, however many: over TCP the query path sends the rotation's first 4,000
/// or so.
fn address_set(owner: &[u8], rtype: u16, nodes: &[&DnsNode]) -> RrSet {
    let ttl = nodes.iter().map(|n| n.ttl).min().unwrap_or(0);
    // Owner pointer (2) + type, class, TTL, length (10) + address.
    let fixed_rr: u16 = if rtype == TYPE_A {
        2 + 10 + 4
    } else {
        2 + 10 + 16
    };
    let mut out = Vec::with_capacity(12 + owner.len() + 4 + nodes.len() * usize::from(fixed_rr));
    header(&mut out, nodes.len().min(usize::from(u16::MAX)), 0);
    question(&mut out, owner, rtype);
    for n in nodes {
        rr_ptr_owner(&mut out, 12, rtype, ttl, |o| addr_rdata(o, n.addr));
    }
    let end = out.len() as u32;
    let t = Template {
        bytes: out.into_boxed_slice(),
        answer_end: end,
        additional_ends: Box::new([]),
        fixed_rr,
    };
    RrSet {
        rtype,
        rotations: Arc::from([t]),
    }
}

/// SRV answer at `owner` for `nodes`, with every target's address as additional data. Each
/// rotation holds as many SRV records as fit in one TCP message, then as much glue as fits.
fn srv_set(owner: &[u8], nodes: &[&DnsNode]) -> RrSet {
    let ttl = nodes.iter().map(|n| n.ttl).min().unwrap_or(0);
    let estimate = nodes
        .iter()
        .map(|n| 2 + 10 + 6 + n.name.len() + 16)
        .sum::<usize>();
    let capacity = (12 + owner.len() + 4 + estimate).min(MAX_MESSAGE);
    let rotations = rotations(nodes, |it| {
        let mut out = Vec::with_capacity(capacity);
        header(&mut out, 0, 0);
        question(&mut out, owner, TYPE_SRV);
        let mut answered: Vec<(&DnsNode, usize)> = Vec::new();
        for n in it {
            let n: &DnsNode = n;
            // Owner pointer, type..rdlength, priority/weight/port, target.
            if out.len() + 2 + 10 + 6 + n.name.len() > MAX_MESSAGE {
                break;
            }
            rr_ptr_owner(&mut out, 12, TYPE_SRV, ttl, |o| {
                o.extend_from_slice(&0u16.to_be_bytes());
                o.extend_from_slice(&n.weight.to_be_bytes());
                o.extend_from_slice(&n.port.unwrap_or(0).to_be_bytes());
                // RFC 2782: the target is not compressed.
                answered.push((n, o.len()));
                o.extend_from_slice(&n.name);
            });
        }
        let answer_end = out.len() as u32;
        let mut additional_ends = Vec::with_capacity(answered.len());
        for (n, at) in &answered {
            let addr_len = if n.addr.is_ipv4() { 4 } else { 16 };
            let owner_len = if *at <= MAX_POINTER { 2 } else { n.name.len() };
            if out.len() + owner_len + 10 + addr_len > MAX_MESSAGE {
                break;
            }
            if *at <= MAX_POINTER {
                rr_ptr_owner(&mut out, *at, addr_type(n.addr), ttl, |o| {
                    addr_rdata(o, n.addr)
                });
            } else {
                // A compression pointer reaches only the first 16 KiB of a message.
                rr_named(&mut out, &n.name, addr_type(n.addr), ttl, |o| {
                    addr_rdata(o, n.addr)
                });
            }
            additional_ends.push(out.len() as u32);
        }
        out[6..8].copy_from_slice(&(answered.len() as u16).to_be_bytes());
        out[10..12].copy_from_slice(&(additional_ends.len() as u16).to_be_bytes());
        Template {
            bytes: out.into_boxed_slice(),
            answer_end,
            additional_ends: additional_ends.into(),
            fixed_rr: 0,
        }
    });
    RrSet {
        rtype: TYPE_SRV,
        rotations,
    }
}

/// The DNS data of one role, kept up to date change by change: a node's own records and its
/// reverse entry are patched in place (copying one shard), and only the role-wide sets
/// (`role.zone` A/AAAA/SRV, `_svc._tcp.role.zone` SRV) are encoded again, from the nodes kept
/// here. A change to one node of a 20,000-node role therefore copies no per-node data.
pub struct RoleBuild {
    /// `role.zone` in wire form.
    role_name: Box<[u8]>,
    record_ttl: u32,
    nodes: BTreeMap<Label, DnsNode>,
    /// Service names in use, each with its node count: every node's `service` is the key's
    /// own allocation, so grouping by service compares pointers, not strings.
    services: BTreeMap<Label, usize>,
    data: Arc<RoleData>,
}

impl RoleBuild {
    pub fn new(zone: &[u8], role: &Label, record_ttl: u32) -> RoleBuild {
        RoleBuild {
            role_name: prepend(role.as_str(), zone).into_boxed_slice(),
            record_ttl,
            nodes: BTreeMap::new(),
            services: BTreeMap::new(),
            data: Arc::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The role's data as of the last [`RoleBuild::apply`] (shared, never changed after).
    pub fn data(&self) -> Arc<RoleData> {
        self.data.clone()
    }

    /// Applies changed nodes: a spec (added or changed) or `None` (gone).
    pub fn apply(&mut self, changed: &[(&Label, Option<&NodeSpec>)]) {
        let mut data = RoleData {
            names: HashMap::new(),
            nodes: self.data.nodes.clone(),
            addrs: self.data.addrs.clone(),
        };
        for (label, spec) in changed {
            if let Some(old) = self.nodes.remove(*label) {
                if let Some(count) = self.services.get_mut(&old.service) {
                    *count -= 1;
                    if *count == 0 {
                        self.services.remove(&old.service);
                    }
                }
                data.nodes.remove(&old.name[..]);
                if let Some(mut list) = data.addrs.remove(&old.addr) {
                    list.retain(|(name, _)| *name != old.name);
                    if !list.is_empty() {
                        data.addrs.insert(old.addr, list);
                    }
                }
            }
            let Some(spec) = spec else { continue };
            let service = match self.services.get_key_value(&spec.service) {
                Some((interned, _)) => interned.clone(),
                None => spec.service.clone(),
            };
            *self.services.entry(service.clone()).or_insert(0) += 1;
            let n = DnsNode {
                name: prepend(label.as_str(), &self.role_name).into_boxed_slice(),
                addr: spec.addr,
                port: spec.port,
                weight: spec.weight,
                service,
                ttl: self.record_ttl.min(spec.ttl),
            };
            let set = address_set(&n.name, addr_type(n.addr), &[&n]);
            data.nodes.insert(n.name.clone(), Entry { sets: vec![set] });
            let mut list = data.addrs.remove(&n.addr).unwrap_or_default();
            let at = list.partition_point(|(name, _)| *name < n.name);
            list.insert(at, (n.name.clone(), n.ttl));
            data.addrs.insert(n.addr, list);
            self.nodes.insert((*label).clone(), n);
        }
        data.names = self.role_names();
        self.data = Arc::new(data);
    }

    /// The role-wide names, encoded from every node.
    fn role_names(&self) -> HashMap<Box<[u8]>, Entry> {
        let mut names = HashMap::new();
        if self.nodes.is_empty() {
            return names;
        }
        // One pass sorts the nodes into address families and services.
        let (mut v4, mut v6, mut with_port) = (Vec::new(), Vec::new(), Vec::new());
        // Services in order of first appearance; a role rarely has more than one or two.
        let mut services: Vec<(&Label, Vec<&DnsNode>)> = Vec::with_capacity(self.services.len());
        for n in self.nodes.values() {
            if n.addr.is_ipv4() {
                v4.push(n);
            } else {
                v6.push(n);
            }
            if n.port.is_some() {
                with_port.push(n);
                match services.iter_mut().rev().find(|(s, _)| s.same(&n.service)) {
                    Some((_, members)) => members.push(n),
                    None => services.push((&n.service, vec![n])),
                }
            }
        }
        let mut role_entry = Entry::default();
        // role.zone A / AAAA.
        for (rtype, family) in [(TYPE_A, v4), (TYPE_AAAA, v6)] {
            if !family.is_empty() {
                role_entry
                    .sets
                    .push(address_set(&self.role_name, rtype, &family));
            }
        }
        // SRV: all services at role.zone, and per service at _svc._tcp.role.zone.
        if !with_port.is_empty() {
            role_entry.sets.push(srv_set(&self.role_name, &with_port));
            let tcp = prepend("_tcp", &self.role_name);
            services.sort_by(|a, b| a.0.cmp(b.0));
            for (service, members) in services {
                let owner = prepend(&format!("_{service}"), &tcp);
                let entry = Entry {
                    sets: vec![srv_set(&owner, &members)],
                };
                names.insert(owner.into_boxed_slice(), entry);
            }
            names.insert(tcp.into_boxed_slice(), Entry::default());
        }
        names.insert(self.role_name.clone(), role_entry);
        names
    }
}

/// Builds the answers of one role under `zone` (wire apex) from scratch.
pub fn build_role(
    zone: &[u8],
    role: &Label,
    nodes: &[(&Label, &NodeSpec)],
    record_ttl: u32,
) -> RoleData {
    let mut build = RoleBuild::new(zone, role, record_ttl);
    let changed: Vec<(&Label, Option<&NodeSpec>)> =
        nodes.iter().map(|(l, s)| (*l, Some(*s))).collect();
    build.apply(&changed);
    Arc::unwrap_or_clone(build.data)
}

/// Encodes arbitrary records (static zone data) with hickory's encoder. Fails when the
/// response would not fit in a DNS message (64 KiB).
pub fn encode_records(
    owner: &Name,
    rtype: RecordType,
    answers: &[Record],
    additionals: &[Record],
) -> Result<Template, String> {
    let mut buf = Vec::with_capacity(512);
    let mut enc = BinEncoder::new(&mut buf);
    let mut h = Vec::with_capacity(12);
    header(&mut h, answers.len(), additionals.len());
    let mut additional_ends = Vec::new();
    let mut answer_end = 0;
    (|| -> Result<(), hickory_proto::ProtoError> {
        enc.emit_vec(&h)?;
        let q = Query::query(owner.to_lowercase(), rtype);
        q.emit(&mut enc)?;
        for r in answers {
            r.emit(&mut enc)?;
        }
        answer_end = enc.offset() as u32;
        for r in additionals {
            r.emit(&mut enc)?;
            additional_ends.push(enc.offset() as u32);
        }
        Ok(())
    })()
    .map_err(|e| format!("the {owner} {rtype} records do not fit in one DNS message: {e}"))?;
    if buf.len() > usize::from(u16::MAX) || answers.len() > usize::from(u16::MAX) {
        return Err(format!(
            "the {owner} {rtype} records do not fit in one DNS message ({} bytes, at most 65535): split them",
            buf.len()
        ));
    }
    Ok(Template {
        bytes: buf.into_boxed_slice(),
        answer_end,
        additional_ends: additional_ends.into(),
        fixed_rr: 0,
    })
}

/// Settings for the apex of the dynamic zone.
#[derive(Clone, Debug)]
pub struct ZoneSettings {
    pub zone: Name,
    pub record_ttl: u32,
    pub negative_ttl: u32,
    /// Name server host name for SOA MNAME and the NS record.
    pub ns_name: Name,
    /// Address served for `ns_name` when it is inside the zone (the DNS listen address).
    pub ns_addr: Option<IpAddr>,
}

impl ZoneSettings {
    /// The defaults of `rollcall serve` for `zone`: record TTL 5 s, negative TTL 1 s, name
    /// server `ns.<zone>` without an address.
    pub fn new(zone: Name) -> ZoneSettings {
        let ns_name = Name::from_ascii("ns")
            .unwrap()
            .append_domain(&zone)
            .unwrap_or_else(|_| zone.clone());
        ZoneSettings {
            zone,
            record_ttl: 5,
            negative_ttl: 1,
            ns_name,
            ns_addr: None,
        }
    }
}

/// Owns the parts of snapshots and publishes new ones. Lives behind a mutex shared by the
/// registry writer (role changes) and the SIGHUP reloader (static zones); readers never see it.
pub struct Builder {
    settings: ZoneSettings,
    zone_wire: Box<[u8]>,
    /// What the snapshot holds of each role (one `Arc` per role, cloned into every snapshot).
    roles: HashMap<Box<[u8]>, Arc<RoleData>>,
    /// Each role's builder, which keeps what a change is applied to.
    builds: HashMap<Box<[u8]>, RoleBuild>,
    statics: Vec<StaticZone>,
    serial: u32,
    /// etcd mode: the serial is `base + index`, the same on every server.
    serial_base: Option<u32>,
    index: u64,
    out: Arc<ArcSwap<Snapshot>>,
}

impl Builder {
    pub fn new(settings: ZoneSettings, statics: Vec<StaticZone>) -> Builder {
        let zone_wire = wire_name(&settings.zone);
        let mut b = Builder {
            settings,
            zone_wire,
            roles: HashMap::new(),
            builds: HashMap::new(),
            statics,
            serial: 0,
            serial_base: None,
            index: 0,
            out: Arc::new(ArcSwap::from_pointee(Snapshot {
                zones: Vec::new(),
                roles: HashMap::new(),
                index: 0,
            })),
        };
        b.publish_now();
        b
    }

    /// The shared cell readers load snapshots from.
    pub fn cell(&self) -> Arc<ArcSwap<Snapshot>> {
        self.out.clone()
    }

    /// Every static name of the zone files (wire form, lower case).
    pub fn statics_names(&self) -> Vec<Box<[u8]>> {
        self.statics
            .iter()
            .flat_map(|z| z.names.keys().cloned())
            .collect()
    }

    pub fn set_statics(&mut self, statics: Vec<StaticZone>) {
        self.statics = statics;
        self.publish_now();
    }

    pub fn update_roles(&mut self, index: u64, changed: &[RoleView<'_>]) {
        for view in changed {
            let key: Box<[u8]> = view.role.as_str().as_bytes().into();
            let build = self.builds.entry(key.clone()).or_insert_with(|| {
                RoleBuild::new(&self.zone_wire, view.role, self.settings.record_ttl)
            });
            build.apply(&view.changed);
            if build.is_empty() {
                self.builds.remove(&key);
                self.roles.remove(&key);
            } else {
                self.roles.insert(key, build.data());
            }
        }
        self.index = index;
        self.publish_now();
    }

    /// The SOA serial becomes `base + index` from now on.
    pub fn set_serial_base(&mut self, base: u32) {
        self.serial_base = Some(base);
        self.publish_now();
    }

    fn next_serial(&mut self) -> u32 {
        if let Some(base) = self.serial_base {
            self.serial = base.wrapping_add(self.index as u32);
            return self.serial;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(0);
        self.serial = now.max(self.serial.wrapping_add(1));
        self.serial
    }

    fn publish_now(&mut self) {
        let serial = self.next_serial();
        let s = &self.settings;
        let mut zones = Vec::with_capacity(self.statics.len() + 1);

        // The dynamic zone, merged with a static zone of the same name if there is one.
        let same = self.statics.iter().find(|z| z.origin == s.zone);
        let (mname, rname, refresh, retry, expire, soa_ttl, apex_static, names) = match same {
            Some(z) => {
                let soa = z.soa.clone();
                (
                    soa.mname,
                    soa.rname,
                    soa.refresh,
                    soa.retry,
                    soa.expire,
                    soa.ttl,
                    z.apex.clone(),
                    z.names.clone(),
                )
            }
            None => (
                s.ns_name.clone(),
                Name::from_ascii("hostmaster")
                    .unwrap()
                    .append_domain(&s.zone)
                    .unwrap_or_else(|_| s.zone.clone()),
                60,
                10,
                3600,
                s.record_ttl,
                Vec::new(),
                Arc::new(default_names(s)),
            ),
        };
        zones.push(make_zone(
            &s.zone,
            true,
            SoaFields {
                mname,
                rname,
                serial,
                refresh,
                retry,
                expire,
                minimum: s.negative_ttl,
                ttl: soa_ttl,
            },
            apex_static,
            names,
            same.is_none().then_some(s),
        ));
        for z in self.statics.iter().filter(|z| z.origin != s.zone) {
            let soa = z.soa.clone();
            zones.push(make_zone(
                &z.origin,
                false,
                SoaFields {
                    mname: soa.mname,
                    rname: soa.rname,
                    serial: soa.serial,
                    refresh: soa.refresh,
                    retry: soa.retry,
                    expire: soa.expire,
                    minimum: soa.minimum,
                    ttl: soa.ttl,
                },
                z.apex.clone(),
                z.names.clone(),
                None,
            ));
        }
        zones.sort_by_key(|z| std::cmp::Reverse(z.apex.len()));
        self.out.store(Arc::new(Snapshot {
            zones,
            roles: self.roles.clone(),
            index: self.index,
        }));
    }
}

impl Publish for Arc<Mutex<Builder>> {
    fn publish(&mut self, index: u64, changed: &[RoleView<'_>]) {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .update_roles(index, changed);
    }
    fn set_serial_base(&mut self, base: u32) {
        self.lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_serial_base(base);
    }
}

struct SoaFields {
    mname: Name,
    rname: Name,
    serial: u32,
    refresh: i32,
    retry: i32,
    expire: i32,
    minimum: u32,
    ttl: u32,
}

/// Names the dynamic zone serves when no zone file defines it: `ns.<zone>` A, if known.
fn default_names(s: &ZoneSettings) -> HashMap<Box<[u8]>, Entry> {
    let mut names = HashMap::new();
    if let (Some(addr), true) = (s.ns_addr, s.zone.zone_of(&s.ns_name)) {
        let rec = Record::from_rdata(s.ns_name.clone(), s.record_ttl, rdata_for(addr));
        let t = encode_records(&s.ns_name, rec.record_type(), &[rec], &[])
            .expect("one address record fits in a message");
        let rtype = u16::from(addr_record_type(addr));
        names.insert(
            wire_name(&s.ns_name),
            Entry {
                sets: vec![RrSet {
                    rtype,
                    rotations: Arc::from([t]),
                }],
            },
        );
    }
    names
}

fn rdata_for(addr: IpAddr) -> RData {
    match addr {
        IpAddr::V4(a) => RData::A(a.into()),
        IpAddr::V6(a) => RData::AAAA(a.into()),
    }
}

fn addr_record_type(addr: IpAddr) -> RecordType {
    if addr.is_ipv4() {
        RecordType::A
    } else {
        RecordType::AAAA
    }
}

fn make_zone(
    origin: &Name,
    dynamic: bool,
    soa: SoaFields,
    apex_static: Vec<RrSet>,
    names: Arc<HashMap<Box<[u8]>, Entry>>,
    default_ns: Option<&ZoneSettings>,
) -> Zone {
    let soa_rdata = hickory_proto::rr::rdata::SOA::new(
        soa.mname,
        soa.rname,
        soa.serial,
        soa.refresh,
        soa.retry,
        soa.expire,
        soa.minimum,
    );
    let soa_record = Record::from_rdata(origin.clone(), soa.ttl, RData::SOA(soa_rdata.clone()));
    // Negative answers: SOA TTL is min(SOA TTL, MINIMUM) (RFC 2308).
    let neg = Record::from_rdata(
        origin.clone(),
        soa.ttl.min(soa.minimum),
        RData::SOA(soa_rdata),
    );
    let soa_tail = {
        let mut buf = Vec::new();
        let mut enc = BinEncoder::new(&mut buf);
        enc.set_name_encoding(hickory_proto::serialize::binary::NameEncoding::Uncompressed);
        neg.emit(&mut enc).expect("SOA encodes");
        // Drop the owner name: the query path writes a pointer to the apex instead.
        let owner_len = wire_name(origin).len();
        buf[owner_len..].to_vec().into_boxed_slice()
    };

    let mut apex_entry = Entry::default();
    apex_entry.sets.push(RrSet {
        rtype: TYPE_SOA,
        rotations: Arc::from([encode_records(origin, RecordType::SOA, &[soa_record], &[])
            .expect("one SOA record fits in a message")]),
    });
    let mut has_ns = false;
    for set in apex_static {
        has_ns |= set.rtype == TYPE_NS;
        apex_entry.sets.push(set);
    }
    if let (false, Some(s)) = (has_ns, default_ns) {
        let ns = Record::from_rdata(
            origin.clone(),
            3600,
            RData::NS(hickory_proto::rr::rdata::NS(s.ns_name.clone())),
        );
        let glue: Vec<Record> = s
            .ns_addr
            .filter(|_| s.zone.zone_of(&s.ns_name))
            .map(|a| Record::from_rdata(s.ns_name.clone(), s.record_ttl, rdata_for(a)))
            .into_iter()
            .collect();
        apex_entry.sets.push(RrSet {
            rtype: TYPE_NS,
            rotations: Arc::from([encode_records(origin, RecordType::NS, &[ns], &glue)
                .expect("one NS record and its address fit in a message")]),
        });
    }
    Zone {
        apex: wire_name(origin),
        apex_name: origin.clone(),
        dynamic,
        apex_entry,
        names,
        soa_tail,
        serial: soa.serial,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn spec(addr: &str, port: Option<u16>, service: &str, weight: u16) -> NodeSpec {
        NodeSpec {
            addr: addr.parse().unwrap(),
            port,
            service: Label::parse(service).unwrap(),
            ttl: 30,
            weight,
            meta: Default::default(),
        }
    }

    fn bytes_of(e: &Entry) -> Vec<(u16, Vec<Vec<u8>>)> {
        e.sets
            .iter()
            .map(|s| {
                (
                    s.rtype,
                    s.rotations.iter().map(|t| t.bytes.to_vec()).collect(),
                )
            })
            .collect()
    }

    /// Everything a role answers, as bytes: names, nodes, reverse data.
    type Answers = (
        BTreeMap<Vec<u8>, Vec<(u16, Vec<Vec<u8>>)>>,
        BTreeMap<IpAddr, Vec<(Box<[u8]>, u32)>>,
    );

    fn answers(d: &RoleData) -> Answers {
        let mut names = BTreeMap::new();
        for (k, e) in d.names.iter().chain(d.nodes.iter()) {
            assert!(
                names.insert(k.to_vec(), bytes_of(e)).is_none(),
                "a name twice"
            );
        }
        let addrs = d.addrs.iter().map(|(a, l)| (*a, l.clone())).collect();
        (names, addrs)
    }

    /// Random adds, changes (address, port, service, weight) and removals applied one batch at
    /// a time give exactly the data a build from scratch gives, and data already published
    /// never changes under its readers.
    #[test]
    fn changes_applied_one_by_one_match_a_build_from_scratch() {
        let zone = wire_name(&Name::from_ascii("cluster.").unwrap());
        let role = Label::parse("app").unwrap();
        let labels: Vec<Label> = (0..400)
            .map(|i| Label::parse(&format!("n{i}")).unwrap())
            .collect();
        let mut build = RoleBuild::new(&zone, &role, 5);
        let mut model: BTreeMap<Label, NodeSpec> = BTreeMap::new();
        let mut seed = 11u64;
        let mut rand = move |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let mut kept: Vec<(Arc<RoleData>, Answers)> = Vec::new();
        for round in 0..300 {
            let mut batch: BTreeMap<Label, Option<NodeSpec>> = BTreeMap::new();
            for _ in 0..=rand(if round < 20 { 40 } else { 4 }) {
                let label = labels[rand(400) as usize].clone();
                let change = if rand(5) == 0 {
                    None
                } else {
                    // Few addresses, so that nodes share them (PTR lists of several names).
                    let addr = match rand(3) {
                        0 => format!("10.0.0.{}", rand(50)),
                        1 => format!("fd00::{}", rand(20)),
                        _ => format!("10.1.{}.{}", rand(4), rand(250)),
                    };
                    let port = (rand(3) > 0).then(|| 8000 + rand(3) as u16);
                    let service = ["http", "grpc"][rand(2) as usize];
                    Some(spec(&addr, port, service, rand(100) as u16))
                };
                batch.insert(label, change);
            }
            for (l, s) in &batch {
                match s {
                    Some(s) => model.insert(l.clone(), s.clone()),
                    None => model.remove(l),
                };
            }
            let changed: Vec<(&Label, Option<&NodeSpec>)> =
                batch.iter().map(|(l, s)| (l, s.as_ref())).collect();
            build.apply(&changed);
            let all: Vec<(&Label, &NodeSpec)> = model.iter().collect();
            let fresh = build_role(&zone, &role, &all, 5);
            let got = answers(&build.data());
            assert_eq!(got, answers(&fresh), "round {round}");
            assert_eq!(build.is_empty(), model.is_empty());
            if round % 50 == 0 {
                kept.push((build.data(), got));
            }
        }
        for (data, want) in kept {
            assert_eq!(answers(&data), want, "published data changed");
        }
    }

    #[test]
    fn one_change_in_a_big_role_copies_one_shard() {
        let zone = wire_name(&Name::from_ascii("cluster.").unwrap());
        let role = Label::parse("big").unwrap();
        let labels: Vec<Label> = (0..20_000)
            .map(|i| Label::parse(&format!("n{i}")).unwrap())
            .collect();
        let specs: Vec<NodeSpec> = (0..20_000u32)
            .map(|i| NodeSpec {
                addr: std::net::Ipv4Addr::from(0x0a00_0000 + i).into(),
                ..spec("10.0.0.1", Some(80), "http", 1)
            })
            .collect();
        let mut build = RoleBuild::new(&zone, &role, 5);
        let all: Vec<(&Label, Option<&NodeSpec>)> = labels
            .iter()
            .zip(&specs)
            .map(|(l, s)| (l, Some(s)))
            .collect();
        build.apply(&all);
        let before = build.data();
        let moved = NodeSpec {
            weight: 7,
            ..specs[123].clone()
        };
        build.apply(&[(&labels[123], Some(&moved))]);
        let after = build.data();
        let shards = before.nodes.shards.len();
        assert!(shards >= 256, "{shards} shards for 20,000 nodes");
        assert_eq!(after.nodes.shared_shards(&before.nodes), shards - 1);
        assert_eq!(
            after.addrs.shared_shards(&before.addrs),
            after.addrs.shards.len() - 1
        );
        assert_eq!(after.nodes.len(), 20_000);
        // The role-wide SRV sets are cut to one TCP message; each rotation starts elsewhere.
        let srv = after.names[&*build.role_name].get(TYPE_SRV).unwrap();
        let mut firsts = BTreeMap::new();
        for t in srv.rotations.iter() {
            assert!(t.bytes.len() <= MAX_MESSAGE, "{} bytes", t.bytes.len());
            let an = u16::from_be_bytes([t.bytes[6], t.bytes[7]]);
            assert!(an > 1000, "{an} SRV records");
            firsts.insert(
                t.bytes[t.answer_end as usize - 30..t.answer_end as usize].to_vec(),
                an,
            );
        }
        assert_eq!(firsts.len(), MAX_ROTATIONS, "rotations differ");
    }
}
