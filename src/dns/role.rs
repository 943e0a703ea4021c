//! The DNS data of one role, kept up to date change by change ([`RoleBuild`]).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::registry::{Label, NodeSpec};

use super::encode::{
    addr_rdata, addr_type, header, prepend, question, rr_named, rr_ptr_owner, MAX_POINTER,
};
use super::snapshot::{
    Entry, Map, ReverseIndex, RoleData, RrSet, Template, TYPE_A, TYPE_AAAA, TYPE_SRV,
};

/// How many rotations of an SRV set are pre-encoded (its records differ in size and its glue
/// points into them, so it cannot be rotated in place). Queries cycle through them.
const MAX_ROTATIONS: usize = 4;

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
    // Every record is the same but for its address: fixed-size copies (this loop runs over
    // every node of a role on each change of the role).
    let [t0, t1] = rtype.to_be_bytes();
    let [l0, l1, l2, l3] = ttl.to_be_bytes();
    let head = [0xC0, 12, t0, t1, 0, 1, l0, l1, l2, l3];
    for n in nodes {
        match n.addr {
            IpAddr::V4(a) => {
                let mut rec = [0u8; 16];
                rec[..10].copy_from_slice(&head);
                rec[10..12].copy_from_slice(&4u16.to_be_bytes());
                rec[12..].copy_from_slice(&a.octets());
                out.extend_from_slice(&rec);
            }
            IpAddr::V6(a) => {
                let mut rec = [0u8; 28];
                rec[..10].copy_from_slice(&head);
                rec[10..12].copy_from_slice(&16u16.to_be_bytes());
                rec[12..].copy_from_slice(&a.octets());
                out.extend_from_slice(&rec);
            }
        }
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

/// SRV answer at `owner` for `nodes`, with every target's address as additional data.
///
/// A set that fits in one TCP message gets up to [`MAX_ROTATIONS`] rotations, each starting at
/// a different node. A bigger one is cut into windows of as many SRV records as fit (then as
/// much glue as fits), one after another, so that the windows together cover every node (up to
/// [`MAX_WINDOWS`] of them: about 27,000 nodes with short names); queries cycle through them.
fn srv_set(owner: &[u8], nodes: &[&DnsNode]) -> RrSet {
    let n = nodes.len();
    let ttl = nodes.iter().map(|n| n.ttl).min().unwrap_or(0);
    let estimate = nodes
        .iter()
        .map(|n| 2 + 10 + 6 + n.name.len() + 16)
        .sum::<usize>();
    let capacity = (12 + owner.len() + 4 + estimate).min(MAX_MESSAGE);
    let from = |start: usize| {
        let it = nodes[start..].iter().chain(nodes[..start].iter()).copied();
        srv_message(owner, ttl, it, capacity)
    };
    let (first, fitted) = from(0);
    let mut rotations = vec![first];
    if fitted >= n {
        let k = n.clamp(1, MAX_ROTATIONS);
        rotations.extend((1..k).map(|r| from(r * n / k).0));
    } else {
        let mut start = fitted;
        while start < n && rotations.len() < MAX_WINDOWS {
            let (t, fitted) = from(start);
            rotations.push(t);
            start += fitted.max(1);
        }
    }
    RrSet {
        rtype: TYPE_SRV,
        rotations: rotations.into(),
    }
}

/// Windows of a role too big for one message: at most this many.
const MAX_WINDOWS: usize = 16;

/// One SRV response: as many of `nodes` (in order) as fit in one TCP message, then as much of
/// their glue as fits. Returns the template and how many SRV records it holds.
fn srv_message<'a>(
    owner: &[u8],
    ttl: u32,
    nodes: impl Iterator<Item = &'a DnsNode>,
    capacity: usize,
) -> (Template, usize) {
    let mut out = Vec::with_capacity(capacity);
    header(&mut out, 0, 0);
    question(&mut out, owner, TYPE_SRV);
    let mut answered: Vec<(&DnsNode, usize)> = Vec::new();
    let [l0, l1, l2, l3] = ttl.to_be_bytes();
    for n in nodes {
        // Owner pointer, type..rdlength, priority/weight/port, target: one fixed-size head
        // (this loop runs over up to 16 messages' worth of nodes on each change of the role).
        if out.len() + 2 + 10 + 6 + n.name.len() > MAX_MESSAGE {
            break;
        }
        let [d0, d1] = (6 + n.name.len() as u16).to_be_bytes();
        let [w0, w1] = n.weight.to_be_bytes();
        let [p0, p1] = n.port.unwrap_or(0).to_be_bytes();
        out.extend_from_slice(&[
            0xC0,
            12,
            0,
            TYPE_SRV as u8,
            0,
            1,
            l0,
            l1,
            l2,
            l3,
            d0,
            d1,
            0,
            0,
            w0,
            w1,
            p0,
            p1,
        ]);
        // RFC 2782: the target is not compressed.
        answered.push((n, out.len()));
        out.extend_from_slice(&n.name);
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
    let t = Template {
        bytes: out.into_boxed_slice(),
        answer_end,
        additional_ends: additional_ends.into(),
        fixed_rr: 0,
    };
    (t, answered.len())
}

/// The DNS data of one role, kept up to date change by change: a node's own records and its
/// reverse entry are patched in place (copying one shard), and only the role-wide sets
/// (`role.zone` A/AAAA/SRV, `_svc._tcp.role.zone` SRV) are encoded again, from the nodes kept
/// here. A change to one node of a 20,000-node role copies no other node's records; the
/// role-wide sets still cost O(role size) to encode (every node's address, and up to
/// [`MAX_WINDOWS`] messages of SRV per set).
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

    /// Applies changed nodes: a spec (added or changed) or `None` (gone). `reverse` is the
    /// zone-wide reverse index (address -> node names), shared by every role, kept in step.
    pub fn apply(&mut self, changed: &[(&Label, Option<&NodeSpec>)], reverse: &mut ReverseIndex) {
        let mut data = RoleData {
            names: Map::default(),
            nodes: self.data.nodes.clone(),
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
                if let Some(mut list) = reverse.remove(&old.addr) {
                    list.retain(|(name, _)| *name != old.name);
                    if !list.is_empty() {
                        reverse.insert(old.addr, list);
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
            let mut list = reverse.remove(&n.addr).unwrap_or_default();
            let at = list.partition_point(|(name, _)| *name < n.name);
            list.insert(at, (n.name.clone(), n.ttl));
            reverse.insert(n.addr, list);
            self.nodes.insert((*label).clone(), n);
        }
        data.names = self.role_names();
        self.data = Arc::new(data);
    }

    /// The role-wide names, encoded from every node.
    fn role_names(&self) -> Map<Box<[u8]>, Entry> {
        let mut names = Map::default();
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

/// Builds the answers of one role under `zone` (wire apex) from scratch, with the reverse
/// entries of its nodes.
pub fn build_role(
    zone: &[u8],
    role: &Label,
    nodes: &[(&Label, &NodeSpec)],
    record_ttl: u32,
) -> (RoleData, ReverseIndex) {
    let mut build = RoleBuild::new(zone, role, record_ttl);
    let mut reverse = ReverseIndex::default();
    let changed: Vec<(&Label, Option<&NodeSpec>)> =
        nodes.iter().map(|(l, s)| (*l, Some(*s))).collect();
    build.apply(&changed, &mut reverse);
    (Arc::unwrap_or_clone(build.data), reverse)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use hickory_proto::rr::Name;

    use super::*;
    use crate::dns::encode::wire_name;

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

    fn answers(d: &RoleData, reverse: &ReverseIndex) -> Answers {
        let mut names = BTreeMap::new();
        for (k, e) in d.names.iter().chain(d.nodes.iter()) {
            assert!(
                names.insert(k.to_vec(), bytes_of(e)).is_none(),
                "a name twice"
            );
        }
        let addrs = reverse.iter().map(|(a, l)| (*a, l.clone())).collect();
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
        let mut rand = crate::test_rng::lcg(11);
        let mut reverse = ReverseIndex::default();
        let mut kept: Vec<(Arc<RoleData>, ReverseIndex, Answers)> = Vec::new();
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
            build.apply(&changed, &mut reverse);
            let all: Vec<(&Label, &NodeSpec)> = model.iter().collect();
            let (fresh, fresh_reverse) = build_role(&zone, &role, &all, 5);
            let got = answers(&build.data(), &reverse);
            assert_eq!(got, answers(&fresh, &fresh_reverse), "round {round}");
            assert_eq!(build.is_empty(), model.is_empty());
            if round % 50 == 0 {
                kept.push((build.data(), reverse.clone(), got));
            }
        }
        for (data, reverse, want) in kept {
            assert_eq!(answers(&data, &reverse), want, "published data changed");
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
        let mut reverse = ReverseIndex::default();
        build.apply(&all, &mut reverse);
        let before = build.data();
        let reverse_before = reverse.clone();
        let moved = NodeSpec {
            weight: 7,
            ..specs[123].clone()
        };
        build.apply(&[(&labels[123], Some(&moved))], &mut reverse);
        let after = build.data();
        let shards = before.nodes.shard_count();
        assert!(shards >= 256, "{shards} shards for 20,000 nodes");
        assert_eq!(after.nodes.shared_shards(&before.nodes), shards - 1);
        assert_eq!(
            reverse.shared_shards(&reverse_before),
            reverse.shard_count() - 1
        );
        assert_eq!(after.nodes.len(), 20_000);
        // The role-wide SRV set is cut into windows of one TCP message each, which together
        // name every node.
        let srv = after.names[&*build.role_name].get(TYPE_SRV).unwrap();
        let mut targets = std::collections::BTreeSet::new();
        for t in srv.rotations.iter() {
            assert!(t.bytes.len() <= MAX_MESSAGE, "{} bytes", t.bytes.len());
            let m = hickory_proto::op::Message::from_vec(&t.bytes).expect("decodes");
            assert!(m.answers.len() > 1000, "{} SRV records", m.answers.len());
            targets.extend(m.answers.iter().map(|r| r.data.to_string()));
        }
        assert!(srv.rotations.len() <= MAX_WINDOWS);
        assert_eq!(targets.len(), 20_000, "the windows cover the role");

        // Removing most nodes shrinks the shard tables again (clones stay cheap).
        let gone: Vec<(&Label, Option<&NodeSpec>)> =
            labels[100..].iter().map(|l| (l, None)).collect();
        build.apply(&gone, &mut reverse);
        assert_eq!(build.data().nodes.len(), 100);
        assert!(
            build.data().nodes.shard_count() <= 8,
            "{}",
            build.data().nodes.shard_count()
        );
        assert!(reverse.shard_count() <= 8, "{}", reverse.shard_count());
        assert_eq!(reverse.len(), 100);
    }
}
