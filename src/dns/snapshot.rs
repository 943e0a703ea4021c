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

use std::collections::{BTreeMap, HashMap};
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
#[derive(Default)]
pub struct RoleData {
    /// Absolute lower-case wire names -> answers.
    pub names: HashMap<Box<[u8]>, Entry>,
    /// Reverse data: (address, node's absolute wire name, ttl), sorted by address, so that a
    /// PTR lookup is a binary search per role, not a scan of every node.
    pub addrs: Vec<(IpAddr, Box<[u8]>, u32)>,
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
struct DnsNode<'a> {
    /// Absolute wire name `node.role.zone`.
    name: Vec<u8>,
    spec: &'a NodeSpec,
    ttl: u32,
}

/// A/AAAA answer at `owner` for `nodes` (all of one address family).
/// One template; the query path rotates its equal-size records (see [`Template::fixed_rr`]).
fn address_set(owner: &[u8], rtype: u16, nodes: &[&DnsNode<'_>]) -> RrSet {
    let ttl = nodes.iter().map(|n| n.ttl).min().unwrap_or(0);
    let mut out = Vec::with_capacity(64 + nodes.len() * 28);
    header(&mut out, nodes.len(), 0);
    question(&mut out, owner, rtype);
    for n in nodes {
        rr_ptr_owner(&mut out, 12, rtype, ttl, |o| addr_rdata(o, n.spec.addr));
    }
    let end = out.len() as u32;
    // Owner pointer (2) + type, class, TTL, length (10) + address.
    let fixed_rr = if rtype == TYPE_A {
        2 + 10 + 4
    } else {
        2 + 10 + 16
    };
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

/// SRV answer at `owner` for `nodes`, with every target's address as additional data.
fn srv_set(owner: &[u8], nodes: &[&DnsNode<'_>]) -> RrSet {
    let ttl = nodes.iter().map(|n| n.ttl).min().unwrap_or(0);
    let rotations = rotations(nodes, |it| {
        let nodes: Vec<&&DnsNode<'_>> = it.collect();
        let mut out = Vec::with_capacity(64 + nodes.len() * 80);
        header(&mut out, nodes.len(), nodes.len());
        question(&mut out, owner, TYPE_SRV);
        let mut targets = Vec::with_capacity(nodes.len());
        for n in &nodes {
            rr_ptr_owner(&mut out, 12, TYPE_SRV, ttl, |o| {
                o.extend_from_slice(&0u16.to_be_bytes());
                o.extend_from_slice(&n.spec.weight.to_be_bytes());
                o.extend_from_slice(&n.spec.port.unwrap_or(0).to_be_bytes());
                // RFC 2782: the target is not compressed.
                targets.push(o.len());
                o.extend_from_slice(&n.name);
            });
        }
        let answer_end = out.len() as u32;
        let mut additional_ends = Vec::with_capacity(nodes.len());
        for (n, at) in nodes.iter().zip(targets) {
            if at <= MAX_POINTER {
                rr_ptr_owner(&mut out, at, addr_type(n.spec.addr), ttl, |o| {
                    addr_rdata(o, n.spec.addr)
                });
            } else {
                // A compression pointer reaches only the first 16 KiB of a message.
                rr_named(&mut out, &n.name, addr_type(n.spec.addr), ttl, |o| {
                    addr_rdata(o, n.spec.addr)
                });
            }
            additional_ends.push(out.len() as u32);
        }
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

/// Builds the answers of one role under `zone` (wire apex).
pub fn build_role(
    zone: &[u8],
    role: &Label,
    nodes: &[(&Label, &NodeSpec)],
    record_ttl: u32,
) -> RoleData {
    let role_name = prepend(role.as_str(), zone);
    let dns_nodes: Vec<DnsNode<'_>> = nodes
        .iter()
        .map(|(node, spec)| DnsNode {
            name: prepend(node.as_str(), &role_name),
            spec,
            ttl: record_ttl.min(spec.ttl),
        })
        .collect();
    let mut data = RoleData::default();
    let mut role_entry = Entry::default();

    // role.zone A / AAAA, and node.role.zone A / AAAA.
    for rtype in [TYPE_A, TYPE_AAAA] {
        let family: Vec<&DnsNode<'_>> = dns_nodes
            .iter()
            .filter(|n| addr_type(n.spec.addr) == rtype)
            .collect();
        if !family.is_empty() {
            role_entry
                .sets
                .push(address_set(&role_name, rtype, &family));
        }
    }
    for n in &dns_nodes {
        let set = address_set(&n.name, addr_type(n.spec.addr), &[n]);
        data.names
            .insert(n.name.clone().into_boxed_slice(), Entry { sets: vec![set] });
        data.addrs
            .push((n.spec.addr, n.name.clone().into_boxed_slice(), n.ttl));
    }
    data.addrs.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));

    // SRV: all services at role.zone, and per service at _svc._tcp.role.zone.
    let with_port: Vec<&DnsNode<'_>> = dns_nodes.iter().filter(|n| n.spec.port.is_some()).collect();
    if !with_port.is_empty() {
        role_entry.sets.push(srv_set(&role_name, &with_port));
        let tcp = prepend("_tcp", &role_name);
        let mut services: BTreeMap<&str, Vec<&DnsNode<'_>>> = BTreeMap::new();
        for n in &with_port {
            services.entry(n.spec.service.as_str()).or_default().push(n);
        }
        for (service, members) in services {
            let owner = prepend(&format!("_{service}"), &tcp);
            data.names.insert(
                owner.clone().into_boxed_slice(),
                Entry {
                    sets: vec![srv_set(&owner, &members)],
                },
            );
        }
        data.names.insert(tcp.into_boxed_slice(), Entry::default());
    }
    data.names.insert(role_name.into_boxed_slice(), role_entry);
    data
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
    roles: HashMap<Box<[u8]>, Arc<RoleData>>,
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
            if view.nodes.is_empty() {
                self.roles.remove(&key);
            } else {
                let data = build_role(
                    &self.zone_wire,
                    view.role,
                    &view.nodes,
                    self.settings.record_ttl,
                );
                self.roles.insert(key, Arc::new(data));
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
