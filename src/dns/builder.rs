//! The [`Builder`]: owns what snapshots are made of and publishes new ones.
//!
//! It keeps one [`RoleBuild`] per role, to which the registry's changed nodes are applied (a
//! node's own records and reverse entry are patched in one copy-on-write shard; only the
//! role-wide sets are encoded again), and the static zones, encoded once when loaded (on start
//! and SIGHUP). Publishing re-encodes the dynamic zone's apex (its SOA serial moves), clones
//! the outer role map (one `Arc` per role) and swaps the new snapshot in with
//! `ArcSwap::store`. Readers never wait.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};

use crate::registry::{Publish, RoleView};

use super::encode::{encode_records, wire_name};
use super::role::RoleBuild;
use super::snapshot::{Entry, Map, ReverseIndex, RrSet, Snapshot, Soa, Zone, TYPE_NS, TYPE_SOA};
use super::zones::StaticZone;

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

/// `<label>.<zone>`: the default name server (`ns`) and SOA contact (`hostmaster`) of a zone.
/// Fails only when the result would be longer than a domain name may be.
pub fn default_name(label: &str, zone: &Name) -> Result<Name, hickory_proto::ProtoError> {
    Name::from_ascii(label)?.append_domain(zone)
}

impl ZoneSettings {
    /// The defaults of `rollcall serve` for `zone`: record TTL 5 s, negative TTL 1 s, name
    /// server `ns.<zone>` without an address.
    pub fn new(zone: Name) -> ZoneSettings {
        let ns_name = default_name("ns", &zone).unwrap_or_else(|_| zone.clone());
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
    /// Each role's builder, which keeps what a change is applied to and the role's current
    /// data (one `Arc`, shared by every snapshot until the role changes).
    builds: HashMap<Box<[u8]>, RoleBuild>,
    /// Every node's reverse entry, kept in step by the role builders.
    reverse: ReverseIndex,
    statics: Vec<StaticZone>,
    /// The zones of `statics` other than the dynamic one, encoded once per load.
    static_zones: Vec<Arc<Zone>>,
    /// What the dynamic zone serves without a zone file of its own (`ns.<zone>`).
    default_names: Arc<Map<Box<[u8]>, Entry>>,
    serial: u32,
    /// etcd mode: the serial is `base + index`, the same on every server.
    serial_base: Option<u32>,
    index: u64,
    out: Arc<ArcSwap<Snapshot>>,
}

impl Builder {
    pub fn new(settings: ZoneSettings, statics: Vec<StaticZone>) -> Builder {
        let zone_wire = wire_name(&settings.zone);
        let static_zones = encode_statics(&statics, &settings.zone);
        let default_names = Arc::new(default_names(&settings));
        let mut b = Builder {
            settings,
            zone_wire,
            builds: HashMap::new(),
            reverse: ReverseIndex::default(),
            statics,
            static_zones,
            default_names,
            serial: 0,
            serial_base: None,
            index: 0,
            out: Arc::new(ArcSwap::from_pointee(Snapshot {
                zones: Vec::new(),
                roles: Map::default(),
                reverse: ReverseIndex::default(),
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
        self.static_zones = encode_statics(&statics, &self.settings.zone);
        self.statics = statics;
        self.publish_now();
    }

    pub fn update_roles(&mut self, index: u64, changed: &[RoleView<'_>]) {
        for view in changed {
            let key: Box<[u8]> = view.role.as_str().as_bytes().into();
            let build = self.builds.entry(key.clone()).or_insert_with(|| {
                RoleBuild::new(&self.zone_wire, view.role, self.settings.record_ttl)
            });
            build.apply(&view.changed, &mut self.reverse);
            if build.is_empty() {
                self.builds.remove(&key);
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
        // The dynamic zone, merged with a static zone of the same name if there is one. Its SOA
        // serial moves with every publish; the zone file's other SOA fields are kept.
        let same = self.statics.iter().find(|z| z.origin == s.zone);
        let dynamic = match same {
            Some(z) => make_zone(
                &s.zone,
                true,
                Soa {
                    serial,
                    minimum: s.negative_ttl,
                    ..z.soa.clone()
                },
                z.apex.clone(),
                z.names.clone(),
                None,
            ),
            None => make_zone(
                &s.zone,
                true,
                Soa {
                    mname: s.ns_name.clone(),
                    rname: default_name("hostmaster", &s.zone).unwrap_or_else(|_| s.zone.clone()),
                    serial,
                    refresh: 60,
                    retry: 10,
                    expire: 3600,
                    minimum: s.negative_ttl,
                    ttl: s.record_ttl,
                },
                Vec::new(),
                self.default_names.clone(),
                Some(s),
            ),
        };
        let mut zones = Vec::with_capacity(self.static_zones.len() + 1);
        zones.push(Arc::new(dynamic));
        zones.extend(self.static_zones.iter().cloned());
        zones.sort_by_key(|z| std::cmp::Reverse(z.apex.len()));
        self.out.store(Arc::new(Snapshot {
            zones,
            roles: self
                .builds
                .iter()
                .map(|(role, build)| (role.clone(), build.data()))
                .collect(),
            reverse: self.reverse.clone(),
            index: self.index,
        }));
    }
}

/// The static zones other than the dynamic one, encoded once (on load), for every snapshot.
fn encode_statics(statics: &[StaticZone], dynamic: &Name) -> Vec<Arc<Zone>> {
    statics
        .iter()
        .filter(|z| z.origin != *dynamic)
        .map(|z| {
            Arc::new(make_zone(
                &z.origin,
                false,
                z.soa.clone(),
                z.apex.clone(),
                z.names.clone(),
                None,
            ))
        })
        .collect()
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

/// Names the dynamic zone serves when no zone file defines it: `ns.<zone>` A, if known.
fn default_names(s: &ZoneSettings) -> Map<Box<[u8]>, Entry> {
    let mut names = Map::default();
    if let (Some(addr), true) = (s.ns_addr, s.zone.zone_of(&s.ns_name)) {
        let rec = Record::from_rdata(s.ns_name.clone(), s.record_ttl, rdata_for(addr));
        let rtype = rec.record_type();
        let t = encode_records(&s.ns_name, rtype, &[rec], &[])
            .expect("one address record fits in a message");
        let rtype = u16::from(rtype);
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

fn make_zone(
    origin: &Name,
    dynamic: bool,
    soa: Soa,
    apex_static: Vec<RrSet>,
    names: Arc<Map<Box<[u8]>, Entry>>,
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
