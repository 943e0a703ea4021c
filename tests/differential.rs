//! Differential test against NSD (issue 6): for every distinct query of the DNS benchmark's
//! query file, rollcall and a real NSD serving the same data give the same rcode, the same AA
//! and TC flags and the same answer set (compared as sets: order, TTLs and letter case of names
//! ignored), over UDP without EDNS, UDP with EDNS (1232) and TCP.
//!
//! The data is the benchmark's own: `benches/gen-dataset.py` writes the zone `cluster.`
//! (SOA, NS and glue, N frontservers, M appservers: role A, per-instance A, `_http._tcp.<role>`
//! SRV), `services.tsv` and the dnsperf query file `queries.txt`. NSD serves `cluster.zone` as
//! it is; rollcall serves the apex lines of it (everything before the first `; role` line, as
//! `benches/candidate.sh` does) and gets every instance of `services.tsv` registered over its
//! HTTP API, the way rollcall is meant to be fed.
//!
//! Besides the answer set, every response must echo the question exactly (the client's letter
//! case), carry an OPT record exactly when the query had one, and have the same authority
//! section as NSD's (the SOA of negative answers). The additional section is not compared with
//! the benchmark's NSD, which runs with `minimal-responses: yes` and adds no SRV glue at all;
//! rollcall's glue is checked against a second NSD without minimal responses instead (see the
//! end of `compare`).
//!
//! Where rollcall differs from NSD by design (README "DNS"), `Known` below says so and the
//! documented behaviour is asserted instead of equality.
//!
//! Cases: the benchmark's default (N=2, M=10); M=100, where role answers no longer fit in a
//! UDP datagram; and N=20 M=74, at the edges: `appserver.cluster A` is 1,230 bytes with EDNS
//! (fits in 1,232), the frontserver SRV answers fit with EDNS but their glue only in part.

mod util;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::txt::Parser;

use util::{query_msg, require, tcp_raw, udp_raw, ServeProc};

// ------------------------------------------------------------------------------ dataset --

struct Service {
    role: String,
    /// Lower case, with the final dot.
    fqdn: String,
    addr: String,
    port: u16,
}

/// A dataset written by `benches/gen-dataset.py`, and what the test needs from it.
struct Dataset {
    dir: tempfile::TempDir,
    origin: Name,
    /// The zone's lines before the first role block: SOA, NS, the name server's address.
    apex_text: String,
    /// TTL of the instances' records (rollcall gets it as --record-ttl).
    record_ttl: u32,
    /// SOA MINIMUM (rollcall gets it as --negative-ttl, so the SOA rdata is comparable).
    soa_minimum: u32,
    /// SRV target (lower case, final dot) -> weight, as in the zone.
    weights: HashMap<String, u16>,
    /// NS targets at the apex.
    ns_targets: Vec<String>,
    services: Vec<Service>,
    /// Distinct queries of queries.txt, in order of first appearance.
    queries: Vec<(String, RecordType)>,
    /// Lines of queries.txt.
    query_lines: usize,
}

impl Dataset {
    fn generate(frontservers: usize, appservers: usize) -> Dataset {
        let python = require("python3");
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/gen-dataset.py");
        let out = Command::new(python)
            .arg(&script)
            .arg("--out")
            .arg(dir.path())
            .args(["-n", &frontservers.to_string()])
            .args(["-m", &appservers.to_string()])
            .output()
            .expect("running benches/gen-dataset.py");
        assert!(
            out.status.success(),
            "gen-dataset.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let zone_path = dir.path().join("cluster.zone");
        let zone_text = std::fs::read_to_string(&zone_path).unwrap();
        let origin = Name::from_ascii("cluster.").unwrap();
        let (_, sets) = Parser::new(
            zone_text.as_str(),
            Some(zone_path.clone()),
            Some(origin.clone()),
        )
        .parse()
        .expect("the generated zone parses");
        let records: Vec<&Record> = sets
            .values()
            .flat_map(|s| s.records_without_rrsigs())
            .collect();

        let soa_minimum = records
            .iter()
            .find_map(|r| match &r.data {
                RData::SOA(s) => Some(s.minimum),
                _ => None,
            })
            .expect("the zone has an SOA");
        let ns_targets: Vec<String> = records
            .iter()
            .filter_map(|r| match &r.data {
                RData::NS(ns) if r.name == origin => Some(lower(&ns.0)),
                _ => None,
            })
            .collect();
        let weights: HashMap<String, u16> = records
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some((lower(&s.target), s.weight)),
                _ => None,
            })
            .collect();

        let apex_text: String = zone_text
            .lines()
            .take_while(|l| !l.starts_with("; role"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(
            apex_text.len() < zone_text.len(),
            "cluster.zone has no `; role` line: the apex cannot be told from the role blocks"
        );

        let services: Vec<Service> = std::fs::read_to_string(dir.path().join("services.tsv"))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                assert_eq!(f.len(), 4, "services.tsv line {l:?}");
                Service {
                    role: f[0].to_owned(),
                    fqdn: fqdn(f[1]).to_ascii_lowercase(),
                    addr: f[2].to_owned(),
                    port: f[3].parse().unwrap(),
                }
            })
            .collect();
        assert_eq!(services.len(), frontservers + appservers);

        let record_ttl = records
            .iter()
            .find(|r| lower(&r.name) == services[0].fqdn)
            .map(|r| r.ttl)
            .expect("the first instance has a record in the zone");

        let text = std::fs::read_to_string(dir.path().join("queries.txt")).unwrap();
        let mut seen = BTreeSet::new();
        let mut queries = Vec::new();
        let mut query_lines = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            query_lines += 1;
            let (name, rtype) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("queries.txt line {line:?}"));
            let q = (
                fqdn(name.trim()),
                RecordType::from_str(rtype.trim()).unwrap(),
            );
            if seen.insert(q.clone()) {
                queries.push(q);
            }
        }
        assert!(!queries.is_empty(), "queries.txt is empty");

        Dataset {
            dir,
            origin,
            apex_text,
            record_ttl,
            soa_minimum,
            weights,
            ns_targets,
            services,
            queries,
            query_lines,
        }
    }

    fn zone_file(&self) -> PathBuf {
        self.dir.path().join("cluster.zone")
    }

    fn roles(&self) -> BTreeSet<&str> {
        self.services.iter().map(|s| s.role.as_str()).collect()
    }

    /// A few queries beyond the query file: apex, negative answers of every kind, the empty
    /// non-terminal, letter case, a name outside the zone, and the documented differences.
    fn extra_queries(&self) -> Vec<(String, RecordType)> {
        use RecordType::*;
        let z = self.origin.to_ascii();
        let first = |role: &str| {
            self.services
                .iter()
                .find(|s| s.role == role)
                .map(|s| s.fqdn.clone())
                .unwrap()
        };
        let mut v = vec![
            (z.clone(), SOA),
            (z.clone(), NS),
            (z.clone(), A),
            (z.clone(), AAAA),
            (z.clone(), ANY), // Known::Any
            (format!("nosuch.{z}"), SRV),
            ("www.example.com.".to_owned(), A), // outside every zone: REFUSED
        ];
        for ns in &self.ns_targets {
            v.push((ns.clone(), A));
            v.push((ns.clone(), AAAA));
        }
        for role in self.roles() {
            let inst = first(role);
            v.extend([
                (format!("{role}.{z}"), AAAA),
                (format!("{role}.{z}"), TXT),
                (format!("{role}.{z}"), SRV), // Known::RoleSrv
                (format!("{role}.{z}"), ANY), // Known::Any
                (format!("_http._tcp.{role}.{z}"), SRV),
                (format!("_http._tcp.{role}.{z}"), A),
                // the empty non-terminal: NODATA
                (format!("_tcp.{role}.{z}"), SRV),
                (format!("_tcp.{role}.{z}"), A),
                // below an instance, below the SRV owner, another service: NXDOMAIN
                (format!("nosuch.{inst}"), A),
                (format!("nosuch._http._tcp.{role}.{z}"), SRV),
                (format!("_ftp._tcp.{role}.{z}"), SRV),
                (format!("_http._udp.{role}.{z}"), SRV),
                (inst.clone(), SRV),
                (inst.clone(), ANY),
                (format!("_tcp.{role}.{z}"), ANY),
                (format!("nosuch.{inst}"), ANY),
                // letter case: same answers, the question echoed as asked
                (mangle(&format!("{role}.{z}")), A),
                (mangle(&format!("_http._tcp.{role}.{z}")), SRV),
                (mangle(&inst), A),
                (mangle(&inst), AAAA),
                (mangle(&format!("nosuch.{inst}")), A),
                (mangle(&format!("_tcp.{role}.{z}")), SRV),
            ]);
        }
        v.push((mangle(&z), SOA));
        v.push((mangle(&format!("nosuch-1.{z}")), A));
        v
    }
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    }
}

fn lower(name: &Name) -> String {
    fqdn(&name.to_ascii()).to_ascii_lowercase()
}

/// `appserver.cluster.` -> `ApPsErVeR.ClUsTeR.`
fn mangle(name: &str) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------- NSD --

use util::nsd::{Nsd, NsdZone};

// ----------------------------------------------------------------------------- rollcall --

/// rollcall serving the dataset: the apex from a zone file, every instance registered over
/// the HTTP API (lease 86400 s, the SRV weight of the zone).
fn start_rollcall(ds: &Dataset, work: &Path) -> ServeProc {
    let zones = work.join("zones");
    std::fs::create_dir_all(&zones).unwrap();
    std::fs::write(zones.join("cluster.zone"), &ds.apex_text).unwrap();
    let record_ttl = ds.record_ttl.to_string();
    let negative_ttl = ds.soa_minimum.to_string();
    let serve = ServeProc::start(
        &work.join("data"),
        &zones,
        &[
            "--zone",
            &ds.origin.to_ascii(),
            "--record-ttl",
            &record_ttl,
            "--negative-ttl",
            &negative_ttl,
        ],
    );
    let http = util::http();
    for s in &ds.services {
        let node = s.fqdn.split('.').next().unwrap();
        let mut body = serde_json::json!({"addr": s.addr, "port": s.port, "ttl": 86400});
        if let Some(w) = ds.weights.get(&s.fqdn) {
            body["weight"] = (*w).into();
        }
        let url = format!("{}/v1/roles/{}/nodes/{node}", serve.api(), s.role);
        let resp = http.put(&url).json(&body).send().unwrap();
        let status = resp.status();
        assert_eq!(
            status,
            200,
            "PUT {url}: {}",
            resp.text().unwrap_or_default()
        );
    }
    // Every registration is in DNS once its PUT returned; check the count anyway.
    let roles: serde_json::Value = http
        .get(format!("{}/v1/roles", serve.api()))
        .send()
        .unwrap()
        .json()
        .unwrap();
    for role in ds.roles() {
        let n = ds.services.iter().filter(|s| s.role == role).count();
        assert_eq!(roles["roles"][role], n, "registered {role}s: {roles}");
    }
    serve
}

// ---------------------------------------------------------------------------- compare --

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Transport {
    Udp,
    UdpEdns,
    Tcp,
}

const TRANSPORTS: [Transport; 3] = [Transport::Udp, Transport::UdpEdns, Transport::Tcp];
const EDNS_SIZE: u16 = 1232;

/// What is compared of one response.
#[derive(Debug)]
struct View {
    rcode: ResponseCode,
    aa: bool,
    tc: bool,
    edns: bool,
    answers: BTreeSet<String>,
    authority: BTreeSet<String>,
    additional: Vec<Record>,
    /// Answer and authority records with their TTLs (not compared; counted for the report).
    ttls: BTreeSet<String>,
    size: usize,
}

/// A record as compared: lower-case owner, type and rdata; no TTL. The SOA serial is left out:
/// rollcall manages it (it increases on every registration), NSD serves the file's.
fn rr_key(r: &Record) -> String {
    let data = match &r.data {
        RData::SOA(s) => format!(
            "{} {} <serial> {} {} {} {}",
            s.mname, s.rname, s.refresh, s.retry, s.expire, s.minimum
        ),
        d => d.to_string(),
    };
    format!("{} {} {}", lower(&r.name), r.record_type(), data).to_ascii_lowercase()
}

/// Sends one query and checks what any response must satisfy whoever sent it: the same ID,
/// QR, the question echoed byte for byte (letter case included).
fn ask(server: SocketAddr, name: &str, rtype: RecordType, t: Transport) -> View {
    let edns = (t == Transport::UdpEdns).then_some(EDNS_SIZE);
    let q = query_msg(name, rtype, edns);
    let raw = match t {
        Transport::Tcp => tcp_raw(server, &q),
        // Loopback does not lose datagrams, but a busy machine can be slow: one retry.
        _ => udp_raw(server, &q)
            .or_else(|| udp_raw(server, &q))
            .unwrap_or_else(|| panic!("{server}: no UDP answer to {name} {rtype}")),
    };
    let m = Message::from_vec(&raw)
        .unwrap_or_else(|e| panic!("{server}: {name} {rtype} {t:?}: answer does not decode: {e}"));
    assert_eq!(
        m.metadata.id,
        u16::from_be_bytes([q[0], q[1]]),
        "{server}: ID"
    );
    assert_eq!(
        m.metadata.message_type,
        hickory_proto::op::MessageType::Response
    );
    let question: Vec<(String, RecordType)> = m
        .queries
        .iter()
        .map(|q| (q.name().to_ascii(), q.query_type()))
        .collect();
    assert_eq!(
        question,
        [(name.to_owned(), rtype)],
        "{server}: {name} {rtype} {t:?}: the question must be echoed as asked"
    );
    View {
        rcode: m.metadata.response_code,
        aa: m.metadata.authoritative,
        tc: m.metadata.truncation,
        edns: m.edns.is_some(),
        answers: m.answers.iter().map(rr_key).collect(),
        authority: m.authorities.iter().map(rr_key).collect(),
        additional: m.additionals.clone(),
        ttls: m
            .answers
            .iter()
            .chain(&m.authorities)
            .map(|r| format!("{} ttl {}", rr_key(r), r.ttl))
            .collect(),
        size: raw.len(),
    }
}

/// Differences by design between rollcall and NSD (README, "DNS").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    None,
    /// `<role>.cluster. SRV`: rollcall answers the SRV set of all the role's services (README
    /// table); the zone file has no SRV there, so NSD answers NODATA.
    RoleSrv,
    /// `ANY`: one RRset (RFC 8482), which one is the server's choice.
    Any,
}

fn known(ds: &Dataset, name: &str, rtype: RecordType) -> Known {
    let lname = fqdn(name).to_ascii_lowercase();
    let z = ds.origin.to_ascii();
    if rtype == RecordType::ANY {
        Known::Any
    } else if rtype == RecordType::SRV && ds.roles().iter().any(|r| lname == format!("{r}.{z}")) {
        Known::RoleSrv
    } else {
        Known::None
    }
}

#[derive(Clone, Copy)]
struct Servers {
    rollcall: SocketAddr,
    /// NSD as the benchmark runs it (minimal-responses: yes): the reference for everything
    /// but the additional section.
    nsd: SocketAddr,
    /// NSD with minimal-responses: no, the reference for SRV and NS glue.
    nsd_full: SocketAddr,
}

/// Totals over a case, for the report.
#[derive(Default, Debug)]
struct Tally {
    exchanges: usize,
    /// Exchanges where rollcall set TC: "name type transport".
    truncated: Vec<String>,
    glue_trimmed_rollcall: usize,
    glue_trimmed_nsd: usize,
    glue_differs: Vec<String>,
    largest: usize,
    /// Exchanges with equal answer and authority sets but different TTLs (not compared).
    ttl_differs: Vec<String>,
    /// Exchanges where a documented difference (`Known`) showed.
    known_seen: Vec<String>,
    /// rollcall's response to every exchange, for the per-case checks that the case tests
    /// what it means to.
    rollcall: HashMap<(String, RecordType, Transport), Seen>,
}

#[derive(Clone, Copy, Debug)]
struct Seen {
    tc: bool,
    size: usize,
    answers: usize,
    additional: usize,
}

impl Tally {
    fn seen(&self, name: &str, rtype: RecordType, t: Transport) -> Seen {
        self.rollcall[&(name.to_owned(), rtype, t)]
    }
}

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Udp => "udp",
        Transport::UdpEdns => "udp+edns",
        Transport::Tcp => "tcp",
    }
}

/// Compares one query over one transport; returns the differences found (empty: equal).
fn compare(
    ds: &Dataset,
    servers: &Servers,
    name: &str,
    rtype: RecordType,
    t: Transport,
    tally: &mut Tally,
) -> Vec<String> {
    let Servers { rollcall, nsd, .. } = *servers;
    let r = ask(rollcall, name, rtype, t);
    let n = ask(nsd, name, rtype, t);
    let k = known(ds, name, rtype);
    let q = Asked { name, rtype, t, k };
    let mut found = header_diffs(&q, &r, &n);
    found.extend(set_diffs(ds, servers, &q, &r, &n));
    found.extend(glue_diffs(servers, &q, &r));
    let mut diffs: Vec<String> = found
        .into_iter()
        .map(|(what, rv, nv)| {
            format!(
                "{name} {rtype} over {}: {what}: rollcall {rv}, NSD {nv}",
                transport_name(t)
            )
        })
        .collect();
    for d in [
        check_additional(&r, "rollcall"),
        check_additional(&n, "NSD"),
    ]
    .into_iter()
    .flatten()
    {
        diffs.push(format!("{name} {rtype} over {}: {d}", transport_name(t)));
    }
    count(tally, &q, &r, &n);
    diffs
}

/// One question as [`compare`] asked it, with what the test knows differs by design.
struct Asked<'a> {
    name: &'a str,
    rtype: RecordType,
    t: Transport,
    k: Known,
}

/// A difference: what differs, rollcall's value, NSD's.
type Diff = (String, String, String);

fn diff(what: &str, rv: String, nv: String) -> Diff {
    (what.to_owned(), rv, nv)
}

/// Header-level differences: the OPT record, rcode, AA, TC.
fn header_diffs(q: &Asked<'_>, r: &View, n: &View) -> Vec<Diff> {
    let (t, k) = (q.t, q.k);
    let mut diffs = Vec::new();
    let mut differ = |what: &str, rv: String, nv: String| diffs.push(diff(what, rv, nv));
    let edns_wanted = t == Transport::UdpEdns;
    if r.edns != edns_wanted || n.edns != edns_wanted {
        differ(
            "OPT record in the response (expected when the query had one)",
            r.edns.to_string(),
            n.edns.to_string(),
        );
    }
    if r.rcode != n.rcode {
        differ("rcode", format!("{:?}", r.rcode), format!("{:?}", n.rcode));
    }
    if r.aa != n.aa {
        differ("AA", r.aa.to_string(), n.aa.to_string());
    }
    // RoleSrv: NSD has nothing to truncate there; rollcall's TC is checked below.
    if r.tc != n.tc && k != Known::RoleSrv {
        differ(
            "TC",
            format!("{} ({} bytes)", r.tc, r.size),
            format!("{} ({} bytes)", n.tc, n.size),
        );
    }
    diffs
}

/// The answer and authority sets, by kind of name (rollcall differs from NSD by design for
/// some: [`Known`]).
fn set_diffs(ds: &Dataset, servers: &Servers, q: &Asked<'_>, r: &View, n: &View) -> Vec<Diff> {
    let Servers { rollcall, nsd, .. } = *servers;
    let (name, t, k) = (q.name, q.t, q.k);
    let mut diffs = Vec::new();
    let mut differ = |what: &str, rv: String, nv: String| diffs.push(diff(what, rv, nv));
    match k {
        Known::None => {
            if r.answers != n.answers {
                differ(
                    "answer set",
                    format!("{:?}", r.answers),
                    format!("{:?}", n.answers),
                );
            }
            if r.authority != n.authority {
                differ(
                    "authority section",
                    format!("{:?}", r.authority),
                    format!("{:?}", n.authority),
                );
            }
        }
        Known::RoleSrv => {
            // NSD: NODATA with the SOA. rollcall: the SRV records of `_http._tcp.<role>`, owned
            // by `<role>.cluster.` (TC over UDP when they do not fit, as for any answer).
            if !n.answers.is_empty() || n.tc || !n.authority.iter().any(|a| a.contains(" soa ")) {
                differ(
                    "NODATA expected from NSD",
                    String::new(),
                    format!("{:?} {:?}", n.answers, n.authority),
                );
            }
            let owner = fqdn(name).to_ascii_lowercase();
            let service = format!("_http._tcp.{owner}");
            let want: BTreeSet<String> = ask(nsd, &service, RecordType::SRV, Transport::Tcp)
                .answers
                .iter()
                .map(|a| a.replacen(&service, &owner, 1))
                .collect();
            // TC (header and question only) is fine over UDP when the set does not fit.
            let got_want = if r.tc { BTreeSet::new() } else { want };
            if r.answers != got_want || !r.authority.is_empty() || r.tc && t == Transport::Tcp {
                differ(
                    "the role's SRV set (README)",
                    format!("{:?} {:?}", r.answers, r.authority),
                    format!("{got_want:?}"),
                );
            }
        }
        Known::Any => {
            // Both answer ANY with one RRset (RFC 8482; NSD 4.6 does so too), but which one
            // is each server's choice: rollcall's must be one whole RRset of the name, the
            // answer to a query for that type (NSD's, or rollcall's own where they differ by
            // design), or NODATA/NXDOMAIN like NSD's when the name has no RRset.
            let types: BTreeSet<&str> = r
                .answers
                .iter()
                .filter_map(|a| a.split(' ').nth(1))
                .collect();
            let ok = match types.iter().next() {
                _ if r.tc => r.answers.is_empty(),
                None => r.answers == n.answers && r.authority == n.authority,
                Some(_) if types.len() > 1 => false,
                Some(ty) => {
                    let ty = RecordType::from_str(&ty.to_ascii_uppercase()).unwrap();
                    let by = match known(ds, name, ty) {
                        Known::None => nsd,
                        _ => rollcall,
                    };
                    r.answers == ask(by, name, ty, Transport::Tcp).answers
                }
            };
            if !ok {
                differ(
                    "ANY: one whole RRset of the name",
                    format!("{:?}", r.answers),
                    format!("{:?}", n.answers),
                );
            }
        }
    }
    diffs
}

/// rollcall's glue against NSD's without minimal-responses.
fn glue_diffs(servers: &Servers, q: &Asked<'_>, r: &View) -> Vec<Diff> {
    let (name, rtype, t, k) = (q.name, q.rtype, q.t, q.k);
    let mut diffs = Vec::new();
    let mut differ = |what: &str, rv: String, nv: String| diffs.push(diff(what, rv, nv));
    // The additional sections are not compared with each other: NSD with minimal-responses
    // (the benchmark's setting) adds no SRV glue at all, rollcall adds every target's address
    // that fits. rollcall's glue is checked against NSD without minimal-responses instead:
    // what rollcall gives must be NSD's glue (or part of it when trimmed), and over TCP all
    // of it.
    let targets = targets_of(r);
    if !targets.is_empty() {
        // For RoleSrv the glue is that of the service's SRV set.
        let glue_of = match k {
            Known::RoleSrv => format!("_http._tcp.{}", fqdn(name).to_ascii_lowercase()),
            _ => name.to_owned(),
        };
        let full = ask(servers.nsd_full, &glue_of, rtype, Transport::Tcp);
        let keys = |v: &View| -> BTreeSet<String> {
            v.additional
                .iter()
                .filter(|a| targets.contains(&lower(&a.name)))
                .map(rr_key)
                .collect()
        };
        let (rg, fg) = (keys(r), keys(&full));
        if !rg.is_subset(&fg) || (t == Transport::Tcp && rg != fg) {
            differ(
                "SRV/NS glue (NSD without minimal-responses, over TCP)",
                format!("{rg:?}"),
                format!("{fg:?}"),
            );
        }
    }
    diffs
}

/// What the summary reports: every exchange, the largest message, TC, the differences by
/// design that were seen, TTLs, trimmed glue.
fn count(tally: &mut Tally, q: &Asked<'_>, r: &View, n: &View) {
    let (name, rtype, t, k) = (q.name, q.rtype, q.t, q.k);
    tally.exchanges += 1;
    tally.rollcall.insert(
        (name.to_owned(), rtype, t),
        Seen {
            tc: r.tc,
            size: r.size,
            answers: r.answers.len(),
            additional: r.additional.len(),
        },
    );
    tally.largest = tally.largest.max(r.size).max(n.size);
    if r.tc {
        tally
            .truncated
            .push(format!("{name} {rtype} {}", transport_name(t)));
    }
    if k != Known::None && (r.answers != n.answers || r.tc != n.tc) {
        tally.known_seen.push(format!(
            "{k:?}: {name} {rtype} {}: rollcall {} answers{}, NSD {} answers{}",
            transport_name(t),
            r.answers.len(),
            if r.tc { " TC" } else { "" },
            n.answers.len(),
            if n.tc { " TC" } else { "" },
        ));
    }
    if r.answers == n.answers && r.authority == n.authority && r.ttls != n.ttls {
        tally.ttl_differs.push(format!(
            "{name} {rtype}: rollcall {:?}, NSD {:?}",
            r.ttls.difference(&n.ttls).collect::<Vec<_>>(),
            n.ttls.difference(&r.ttls).collect::<Vec<_>>()
        ));
    }
    let glue = |v: &View| v.additional.len();
    let targets = |v: &View| targets_of(v).len();
    if !r.tc && glue(r) < targets(r) {
        tally.glue_trimmed_rollcall += 1;
    }
    if !n.tc && glue(n) < targets(n) {
        tally.glue_trimmed_nsd += 1;
    }
    if glue(r) != glue(n) && k == Known::None {
        tally.glue_differs.push(format!(
            "{name} {rtype} {}: additional records rollcall {}, NSD {} (answers {})",
            transport_name(t),
            glue(r),
            glue(n),
            r.answers.len()
        ));
    }
}

/// SRV and NS targets of the answer section (lower case).
fn targets_of(v: &View) -> BTreeSet<String> {
    v.answers
        .iter()
        .filter_map(|a| {
            let f: Vec<&str> = a.split(' ').collect();
            match f.get(1).copied() {
                Some("srv") => f.get(5).map(|s| s.to_string()),
                Some("ns") => f.get(2).map(|s| s.to_string()),
                _ => None,
            }
        })
        .collect()
}

/// What every additional section must be (either server): addresses of the answer's SRV/NS
/// targets, each at most once, and nothing after a TC reply.
fn check_additional(v: &View, who: &str) -> Option<String> {
    let targets = targets_of(v);
    let mut seen = BTreeSet::new();
    for a in &v.additional {
        let owner = lower(&a.name);
        let ok = matches!(a.record_type(), RecordType::A | RecordType::AAAA)
            && targets.contains(&owner)
            && seen.insert(rr_key(a));
        if !ok {
            return Some(format!("{who}: unexpected additional record {}", rr_key(a)));
        }
    }
    if v.tc && !v.additional.is_empty() {
        return Some(format!("{who}: additional records after TC"));
    }
    None
}

/// One case: dataset, NSD, rollcall, every query over every transport.
fn differential(frontservers: usize, appservers: usize) -> Tally {
    let ds = Dataset::generate(frontservers, appservers);
    let work = tempfile::tempdir().unwrap();
    let (origin, file) = (ds.origin.to_ascii(), ds.zone_file());
    let zone = [NsdZone {
        name: &origin,
        file: Some(&file),
    }];
    let mut nsd = Nsd::start(&zone, true);
    let mut nsd_full = Nsd::start(&zone, false);
    let mut rollcall = start_rollcall(&ds, work.path());

    let servers = Servers {
        rollcall: rollcall.dns,
        nsd: nsd.addr,
        nsd_full: nsd_full.addr,
    };
    // The extras that the query file does not have already.
    let mut seen: BTreeSet<(String, RecordType)> = ds.queries.iter().cloned().collect();
    let extras: Vec<(String, RecordType)> = ds
        .extra_queries()
        .into_iter()
        .filter(|q| seen.insert(q.clone()))
        .collect();
    let all: Vec<&(String, RecordType)> = ds.queries.iter().chain(&extras).collect();
    let mut tally = Tally::default();
    let mut diffs = Vec::new();
    for (name, rtype) in &all {
        for t in TRANSPORTS {
            diffs.extend(compare(&ds, &servers, name, *rtype, t, &mut tally));
        }
    }

    eprintln!(
        "differential N={frontservers} M={appservers}: queries.txt {} lines, {} distinct \
         + {} extra queries, x {} transports = {} exchanges per server; TC from rollcall: {:?}; \
         glue trimmed without TC: rollcall {}, NSD {}; largest response {} bytes",
        ds.query_lines,
        ds.queries.len(),
        extras.len(),
        TRANSPORTS.len(),
        tally.exchanges,
        tally.truncated,
        tally.glue_trimmed_rollcall,
        tally.glue_trimmed_nsd,
        tally.largest,
    );
    // Not compared (see compare()): how often the additional sections differ, a few examples.
    eprintln!(
        "  additional sections differ (not compared) in {} exchanges",
        tally.glue_differs.len()
    );
    for g in tally.glue_differs.iter().take(3) {
        eprintln!("    e.g. {g}");
    }
    eprintln!(
        "  documented differences seen in {} exchanges",
        tally.known_seen.len()
    );
    for g in &tally.known_seen {
        eprintln!("    {g}");
    }
    eprintln!(
        "  TTLs differ (not compared) in {} exchanges",
        tally.ttl_differs.len()
    );
    for g in tally.ttl_differs.iter().take(3) {
        eprintln!("    e.g. {g}");
    }
    assert!(
        diffs.is_empty(),
        "N={frontservers} M={appservers}: {} differences between rollcall and NSD:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    // Both servers are still the processes we started: nothing crashed along the way.
    assert!(
        rollcall.child.try_wait().unwrap().is_none(),
        "rollcall exited"
    );
    assert!(nsd.running(), "nsd exited");
    assert!(nsd_full.running(), "nsd exited");
    tally
}

/// The benchmark's default dataset (dns-bench.sh without -n/-m).
#[test]
fn same_answers_as_nsd_default_dataset() {
    use Transport::*;
    let tally = differential(2, 10);
    // The ten SRV records (uncompressed targets, RFC 2782) are over 512 bytes: TC without
    // EDNS, for NSD too; with EDNS they fit with all their glue.
    let srv = "_http._tcp.appserver.cluster.";
    assert!(tally.seen(srv, RecordType::SRV, Udp).tc);
    let s = tally.seen(srv, RecordType::SRV, UdpEdns);
    assert!(!s.tc && s.answers == 10 && s.additional == 10, "{s:?}");
}

/// 100 appservers: role A and SRV answers need TCP (TC over UDP, with and without EDNS).
#[test]
fn same_answers_as_nsd_hundred_appservers() {
    use Transport::*;
    let tally = differential(2, 100);
    for (name, rtype) in [
        ("appserver.cluster.", RecordType::A),
        ("_http._tcp.appserver.cluster.", RecordType::SRV),
    ] {
        assert!(tally.seen(name, rtype, Udp).tc && tally.seen(name, rtype, UdpEdns).tc);
        let s = tally.seen(name, rtype, Tcp);
        assert!(!s.tc && s.answers == 100, "{name} {rtype} over TCP: {s:?}");
    }
}

/// At the size limits: `appserver.cluster A` (74 records) is 1,230 bytes with EDNS and does
/// not fit in 512; the 20 frontserver SRV records fit with EDNS, their glue only in part.
#[test]
fn same_answers_as_nsd_at_the_size_limits() {
    use Transport::*;
    let tally = differential(20, 74);
    let a = "appserver.cluster.";
    assert!(tally.seen(a, RecordType::A, Udp).tc);
    let s = tally.seen(a, RecordType::A, UdpEdns);
    assert!(!s.tc && s.answers == 74 && s.size > 1200, "{s:?}");
    let srv = "_http._tcp.frontserver.cluster.";
    let s = tally.seen(srv, RecordType::SRV, UdpEdns);
    assert!(
        !s.tc && s.answers == 20 && s.additional > 0 && s.additional < 20,
        "glue trimmed without TC: {s:?}"
    );
}
