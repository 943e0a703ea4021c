//! The DNS side of `rollcall serve`, in-process on port 0, over real UDP and TCP sockets:
//! every row of SPEC's DNS table, truncation, expiry, deregistration and hostile packets.

#[path = "util/mod.rs"]
mod util;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use rollcall::config::ServeConfig;
use rollcall::server::{start, Running};
use util::*;

const ZONE: &str = "$TTL 60\n@ IN SOA ns.cluster. hostmaster.cluster. 1 60 10 3600 1\n@ IN NS ns.cluster.\nns IN A 127.0.0.1\nproxyserver IN A 10.9.9.9\n";

struct Server {
    running: Running,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cluster.zone"), ZONE).unwrap();
        let mut cfg = ServeConfig::for_tests();
        cfg.zones_dir = dir.path().to_owned();
        let running = start(cfg).await.expect("server starts");
        Server {
            running,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    fn dns(&self) -> SocketAddr {
        self.running.dns_addr
    }

    async fn put(&self, role: &str, node: &str, body: &str) {
        let url = format!(
            "http://{}/v1/roles/{role}/nodes/{node}",
            self.running.http_addr
        );
        let resp = self
            .http
            .put(url)
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    }

    async fn delete(&self, role: &str, node: &str) -> u16 {
        let url = format!(
            "http://{}/v1/roles/{role}/nodes/{node}",
            self.running.http_addr
        );
        self.http
            .delete(url)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

fn soa_serial(m: &Message) -> u32 {
    m.answers
        .iter()
        .chain(&m.authorities)
        .find_map(|r| match &r.data {
            RData::SOA(s) => Some(s.serial),
            _ => None,
        })
        .expect("an SOA")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_a_records_rotate_and_node_names_resolve() {
    let s = Server::start().await;
    for i in 1..=3 {
        s.put(
            "appserver",
            &format!("appserver{i}"),
            &format!(r#"{{"addr":"10.0.0.{i}","port":8080}}"#),
        )
        .await;
    }
    let m = udp_query(s.dns(), "appserver.cluster.", RecordType::A, None);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(addrs(&m), ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
    assert!(
        m.answers.iter().all(|r| r.ttl == 5),
        "record TTL is --record-ttl"
    );

    // Order rotates between queries: over a few queries each address comes first at least once.
    let mut firsts = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let m = udp_query(s.dns(), "appserver.cluster.", RecordType::A, None);
        firsts.insert(m.answers[0].data.to_string());
    }
    assert_eq!(firsts.len(), 3, "rotation: {firsts:?}");

    let m = udp_query(
        s.dns(),
        "appserver2.appserver.cluster.",
        RecordType::A,
        None,
    );
    assert_eq!(addrs(&m), ["10.0.0.2"]);
    let m = tcp_query(s.dns(), "appserver2.appserver.cluster.", RecordType::A);
    assert_eq!(addrs(&m), ["10.0.0.2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_nodes_answer_aaaa_and_ipv4_roles_have_nodata_for_aaaa() {
    let s = Server::start().await;
    s.put("db", "db1", r#"{"addr":"fd00::1"}"#).await;
    s.put("web", "web1", r#"{"addr":"10.0.0.1"}"#).await;
    assert_eq!(
        addrs(&udp_query(s.dns(), "db.cluster.", RecordType::AAAA, None)),
        ["fd00::1"]
    );
    let m = udp_query(s.dns(), "web.cluster.", RecordType::AAAA, None);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert!(
        matches!(m.authorities[0].data, RData::SOA(_)),
        "NODATA carries the SOA"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_answers_with_addresses_of_every_target() {
    let s = Server::start().await;
    s.put(
        "appserver",
        "appserver1",
        r#"{"addr":"10.0.0.7","port":8080,"weight":3}"#,
    )
    .await;
    s.put(
        "appserver",
        "appserver2",
        r#"{"addr":"10.0.0.8","port":8081}"#,
    )
    .await;
    s.put(
        "appserver",
        "metrics1",
        r#"{"addr":"10.0.0.9","port":9100,"service":"metrics"}"#,
    )
    .await;
    s.put("appserver", "noport", r#"{"addr":"10.0.0.10"}"#)
        .await;

    let m = udp_query(
        s.dns(),
        "_http._tcp.appserver.cluster.",
        RecordType::SRV,
        None,
    );
    let mut srv: Vec<(u16, u16, u16, String)> = m
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::SRV(v) => (v.priority, v.weight, v.port, v.target.to_ascii()),
            other => panic!("not SRV: {other:?}"),
        })
        .collect();
    srv.sort();
    assert_eq!(
        srv,
        [
            (0, 1, 8081, "appserver2.appserver.cluster.".into()),
            (0, 3, 8080, "appserver1.appserver.cluster.".into())
        ]
    );
    let mut glue: Vec<String> = m
        .additionals
        .iter()
        .map(|r| format!("{} {}", r.name, r.data))
        .collect();
    glue.sort();
    assert_eq!(
        glue,
        [
            "appserver1.appserver.cluster. 10.0.0.7",
            "appserver2.appserver.cluster. 10.0.0.8"
        ]
    );

    // The role name's SRV set has every service; nodes without a port have none.
    let m = udp_query(s.dns(), "appserver.cluster.", RecordType::SRV, None);
    assert_eq!(m.answers.len(), 3);
    assert_eq!(m.additionals.len(), 3);
    let m = udp_query(
        s.dns(),
        "_metrics._tcp.appserver.cluster.",
        RecordType::SRV,
        None,
    );
    assert_eq!(m.answers.len(), 1);
    // _tcp.appserver.cluster is an empty non-terminal: NODATA, not NXDOMAIN.
    let m = udp_query(s.dns(), "_tcp.appserver.cluster.", RecordType::SRV, None);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soa_serial_follows_changes_and_ns_names_the_server() {
    let s = Server::start().await;
    let first = soa_serial(&udp_query(s.dns(), "cluster.", RecordType::SOA, None));
    s.put("app", "a1", r#"{"addr":"10.0.0.1"}"#).await;
    let second = soa_serial(&udp_query(s.dns(), "cluster.", RecordType::SOA, None));
    assert!(second > first, "{second} > {first}");
    // A renewal that changes nothing leaves the serial alone.
    s.put("app", "a1", r#"{"addr":"10.0.0.1"}"#).await;
    assert_eq!(
        soa_serial(&udp_query(s.dns(), "cluster.", RecordType::SOA, None)),
        second
    );
    s.delete("app", "a1").await;
    assert!(soa_serial(&udp_query(s.dns(), "cluster.", RecordType::SOA, None)) > second);

    let m = udp_query(s.dns(), "cluster.", RecordType::NS, None);
    let ns: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
    assert_eq!(ns, ["ns.cluster."]);
    assert_eq!(
        m.additionals
            .iter()
            .map(|r| r.data.to_string())
            .collect::<Vec<_>>(),
        ["127.0.0.1"],
        "NS glue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nxdomain_nodata_refused_and_static_records() {
    let s = Server::start().await;
    s.put("app", "a1", r#"{"addr":"10.0.0.1"}"#).await;

    let m = udp_query(s.dns(), "nope.cluster.", RecordType::A, None);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(m.metadata.authoritative);
    assert_eq!(m.authorities.len(), 1);
    assert!(matches!(m.authorities[0].data, RData::SOA(_)));
    assert_eq!(m.authorities[0].name.to_ascii(), "cluster.");
    assert_eq!(
        m.authorities[0].ttl, 1,
        "negative TTL = min(SOA TTL, MINIMUM)"
    );

    // Below an existing node: still NXDOMAIN.
    let m = udp_query(s.dns(), "x.a1.app.cluster.", RecordType::A, None);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    let m = udp_query(s.dns(), "a1.app.cluster.", RecordType::TXT, None);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty() && matches!(m.authorities[0].data, RData::SOA(_)));

    let m = udp_query(s.dns(), "example.com.", RecordType::A, None);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(!m.metadata.authoritative);
    let m = udp_query(s.dns(), "notcluster.", RecordType::A, None);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);

    // Static data from the zone file, served beside the dynamic records.
    assert_eq!(
        addrs(&udp_query(
            s.dns(),
            "proxyserver.cluster.",
            RecordType::A,
            None
        )),
        ["10.9.9.9"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ptr_for_registered_addresses() {
    let s = Server::start().await;
    s.put("app", "a1", r#"{"addr":"10.0.0.7"}"#).await;
    s.put("db", "d1", r#"{"addr":"fd00::7"}"#).await;
    let m = udp_query(s.dns(), "7.0.0.10.in-addr.arpa.", RecordType::PTR, None);
    assert_eq!(
        m.answers
            .iter()
            .map(|r| r.data.to_string())
            .collect::<Vec<_>>(),
        ["a1.app.cluster."]
    );
    let v6 = "7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.";
    let m = udp_query(s.dns(), v6, RecordType::PTR, None);
    assert_eq!(
        m.answers
            .iter()
            .map(|r| r.data.to_string())
            .collect::<Vec<_>>(),
        ["d1.db.cluster."]
    );
    let m = udp_query(s.dns(), "8.0.0.10.in-addr.arpa.", RecordType::PTR, None);
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::Refused,
        "not an open resolver"
    );

    // Every node at an address, whatever the role, among many others (the per-role address
    // index is searched, not scanned: each hit must still be found).
    for i in 0..300 {
        s.put(
            "app",
            &format!("n{i}"),
            &format!(r#"{{"addr":"10.1.{}.{}"}}"#, i / 200, i % 200 + 1),
        )
        .await;
    }
    s.put("app", "a2", r#"{"addr":"10.0.0.7"}"#).await;
    s.put("db", "d2", r#"{"addr":"10.0.0.7"}"#).await;
    let m = udp_query(s.dns(), "7.0.0.10.in-addr.arpa.", RecordType::PTR, None);
    let mut names: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
    names.sort();
    assert_eq!(
        names,
        ["a1.app.cluster.", "a2.app.cluster.", "d2.db.cluster."]
    );
    for i in [0, 199, 200, 299] {
        let q = format!("{}.{}.1.10.in-addr.arpa.", i % 200 + 1, i / 200);
        let m = udp_query(s.dns(), &q, RecordType::PTR, None);
        let got: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
        assert_eq!(got, [format!("n{i}.app.cluster.")], "{q}");
    }

    // The reverse index follows changes: a node that leaves or moves leaves its old address.
    assert_eq!(s.delete("app", "a1").await, 204);
    s.put("db", "d2", r#"{"addr":"10.0.0.8"}"#).await;
    let ptr = |q: &str| -> Vec<String> {
        let m = udp_query(s.dns(), q, RecordType::PTR, None);
        let mut v: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(ptr("7.0.0.10.in-addr.arpa."), ["a2.app.cluster."]);
    assert_eq!(ptr("8.0.0.10.in-addr.arpa."), ["d2.db.cluster."]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_case_insensitive_and_the_question_keeps_its_case() {
    let s = Server::start().await;
    s.put("appserver", "a1", r#"{"addr":"10.0.0.1"}"#).await;
    let m = udp_query(s.dns(), "ApPsErVeR.ClUsTeR.", RecordType::A, None);
    assert_eq!(addrs(&m), ["10.0.0.1"]);
    assert_eq!(m.queries[0].name().to_ascii(), "ApPsErVeR.ClUsTeR.");
    let m = udp_query(s.dns(), "NOPE.CLUSTER.", RecordType::A, None);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(m.queries[0].name().to_ascii(), "NOPE.CLUSTER.");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eighty_nodes_truncate_over_udp_and_come_whole_over_tcp() {
    let s = Server::start().await;
    for i in 0..80 {
        s.put(
            "big",
            &format!("node{i}"),
            &format!(r#"{{"addr":"10.1.{}.{}","port":80}}"#, i / 200, i % 200 + 1),
        )
        .await;
    }
    // Without EDNS: 512 bytes. 80 A records (16 bytes each) do not fit.
    let raw = udp_raw(s.dns(), &query_msg("big.cluster.", RecordType::A, None)).unwrap();
    assert!(raw.len() <= 512, "{} bytes", raw.len());
    let m = Message::from_vec(&raw).unwrap();
    assert!(m.metadata.truncation, "TC must be set");
    // With EDNS the client's size counts, capped at 1232: 80 * 16 bytes of answers do not fit.
    let raw = udp_raw(
        s.dns(),
        &query_msg("big.cluster.", RecordType::A, Some(4096)),
    )
    .unwrap();
    assert!(raw.len() <= 1232, "capped at 1232, got {}", raw.len());
    assert!(Message::from_vec(&raw).unwrap().metadata.truncation);
    // 40 nodes: too big for 512 bytes, whole within EDNS 1232.
    for i in 0..40 {
        s.put(
            "forty",
            &format!("node{i}"),
            &format!(r#"{{"addr":"10.3.0.{}"}}"#, i + 1),
        )
        .await;
    }
    assert!(
        udp_query(s.dns(), "forty.cluster.", RecordType::A, None)
            .metadata
            .truncation
    );
    let m = udp_query(s.dns(), "forty.cluster.", RecordType::A, Some(1232));
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 40);
    // SRV + glue over EDNS 1232 does not fit: TC, then TCP has everything.
    let m = udp_query(
        s.dns(),
        "_http._tcp.big.cluster.",
        RecordType::SRV,
        Some(1232),
    );
    assert!(m.metadata.truncation);
    let m = tcp_query(s.dns(), "big.cluster.", RecordType::A);
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 80);
    let m = tcp_query(s.dns(), "_http._tcp.big.cluster.", RecordType::SRV);
    assert_eq!((m.answers.len(), m.additionals.len()), (80, 80));
    // With dig, as a user would see it: dig retries over TCP by itself.
    let out = dig(s.dns(), &["big.cluster", "A", "+noedns"]);
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("big.cluster.") && l.contains("\tA\t"))
            .count(),
        80,
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_glue_that_does_not_fit_is_dropped_without_tc() {
    let s = Server::start().await;
    for i in 0..12 {
        s.put(
            "mid",
            &format!("n{i}"),
            &format!(r#"{{"addr":"10.2.0.{}","port":80}}"#, i + 1),
        )
        .await;
    }
    // 12 SRV answers fit in 512 bytes, their 12 glue records do not all fit.
    let raw = udp_raw(
        s.dns(),
        &query_msg("_http._tcp.mid.cluster.", RecordType::SRV, None),
    )
    .unwrap();
    let m = Message::from_vec(&raw).unwrap();
    assert!(raw.len() <= 512);
    assert!(!m.metadata.truncation, "only additional data is missing");
    assert_eq!(m.answers.len(), 12);
    assert!(m.additionals.len() < 12, "{}", m.additionals.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_and_deregistration_show_in_dns() {
    let s = Server::start().await;
    s.put("app", "short", r#"{"addr":"10.0.0.1","ttl":1}"#)
        .await;
    s.put("app", "long", r#"{"addr":"10.0.0.2","ttl":60}"#)
        .await;
    // Read-your-writes: visible right after the 200, no sleep.
    assert_eq!(
        addrs(&udp_query(s.dns(), "app.cluster.", RecordType::A, None)),
        ["10.0.0.1", "10.0.0.2"]
    );
    // TTL never longer than the lease.
    let m = udp_query(s.dns(), "short.app.cluster.", RecordType::A, None);
    assert_eq!(m.answers[0].ttl, 1);

    let t0 = Instant::now();
    assert!(eventually(Duration::from_secs(3), || addrs(&udp_query(
        s.dns(),
        "app.cluster.",
        RecordType::A,
        None
    )) == ["10.0.0.2"]));
    let gone = t0.elapsed();
    assert!(gone > Duration::from_millis(800), "expired early: {gone:?}");
    let m = udp_query(s.dns(), "short.app.cluster.", RecordType::A, None);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    assert_eq!(s.delete("app", "long").await, 204);
    let m = udp_query(s.dns(), "app.cluster.", RecordType::A, None);
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::NXDomain,
        "an emptied role is gone at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_query_wakes_up_on_change() {
    let s = Server::start().await;
    s.put("app", "a1", r#"{"addr":"10.0.0.1"}"#).await;
    let url = format!("http://{}/v1/roles/app", s.running.http_addr);
    let first = s.http.get(&url).send().await.unwrap();
    let index: u64 = first.headers()["x-rollcall-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let waiter = tokio::spawn({
        let url = format!("{url}?index={index}&wait=30s");
        let http = s.http.clone();
        async move {
            let t = Instant::now();
            let r = http.get(url).send().await.unwrap();
            let idx: u64 = r.headers()["x-rollcall-index"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let body: serde_json::Value = r.json().await.unwrap();
            (t.elapsed(), idx, body["nodes"].as_array().unwrap().len())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "returned before any change");
    s.put("app", "a2", r#"{"addr":"10.0.0.2"}"#).await;
    let (took, idx, n) = waiter.await.unwrap();
    assert!(idx > index);
    assert_eq!(n, 2);
    assert!(took < Duration::from_secs(5), "{took:?}");

    // A wait that sees no change returns after the wait with the same index.
    let r = s
        .http
        .get(format!("{url}?index={idx}&wait=200ms"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-rollcall-index"].to_str().unwrap(),
        idx.to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_packets_get_formerr_notimp_or_nothing_and_the_server_keeps_answering() {
    let s = Server::start().await;
    s.put("app", "a1", r#"{"addr":"10.0.0.1"}"#).await;
    let good = query_msg("app.cluster.", RecordType::A, None);

    // Runt and response packets: dropped.
    assert_eq!(udp_raw(s.dns(), &good[..5]), None);
    let mut resp = good.clone();
    resp[2] |= 0x80;
    assert_eq!(udp_raw(s.dns(), &resp), None);

    let rcode = |p: &[u8]| udp_raw(s.dns(), p).map(|r| r[3] & 0x0f);
    // Two questions: FORMERR.
    let mut two = good.clone();
    two[5] = 2;
    assert_eq!(rcode(&two), Some(1));
    // A compression loop in the question: FORMERR.
    let mut lp = good[..12].to_vec();
    lp.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
    assert_eq!(rcode(&lp), Some(1));
    // A name running past the end: FORMERR.
    let mut past = good[..12].to_vec();
    past.extend_from_slice(&[60, b'a', b'b']);
    assert_eq!(rcode(&past), Some(1));
    // Unknown opcode (NOTIFY=4, UPDATE=5, 9): NOTIMP.
    for op in [4u8, 5, 9] {
        let mut p = good.clone();
        p[2] = (p[2] & 0x87) | (op << 3);
        assert_eq!(rcode(&p), Some(4), "opcode {op}");
    }
    // AXFR: refused.
    assert_eq!(
        rcode(&query_msg("cluster.", RecordType::AXFR, None)),
        Some(5)
    );
    // Random garbage of every length: never a crash.
    let mut seed = 0x9e3779b97f4a7c15u64;
    for len in 0..600 {
        let mut p = Vec::with_capacity(len);
        for _ in 0..len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            p.push(seed as u8);
        }
        if p.len() > 2 {
            p[2] &= 0x7f; // a query, so it is parsed rather than dropped
        }
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.send_to(&p, s.dns()).unwrap();
    }
    let m = udp_query(s.dns(), "app.cluster.", RecordType::A, None);
    assert_eq!(addrs(&m), ["10.0.0.1"]);
    let m = tcp_query(s.dns(), "app.cluster.", RecordType::A);
    assert_eq!(addrs(&m), ["10.0.0.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edns_is_echoed_and_unknown_versions_get_badvers() {
    let s = Server::start().await;
    s.put("app", "a1", r#"{"addr":"10.0.0.1"}"#).await;
    let m = udp_query(s.dns(), "app.cluster.", RecordType::A, Some(4096));
    let edns = m.edns.as_ref().expect("OPT in the answer");
    assert_eq!(edns.max_payload(), 1232);
    let out = dig(s.dns(), &["app.cluster", "+edns=1", "+noednsneg"]);
    assert!(out.contains("BADVERS"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_allow_query_are_refused() {
    let mut cfg = ServeConfig::for_tests();
    cfg.allow_query = rollcall::dns::acl::Acl::only(vec!["10.0.0.0/8".parse().unwrap()]);
    let running = start(cfg).await.unwrap();
    let m = udp_query(running.dns_addr, "cluster.", RecordType::SOA, None);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(m.answers.is_empty());
    // Over TCP too, REFUSED as the README promises (it used to close the connection without
    // an answer: issue "What a user trips over", item 11).
    let m = tcp_query(running.dns_addr, "cluster.", RecordType::SOA);
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(m.answers.is_empty());

    let mut cfg = ServeConfig::for_tests();
    cfg.allow_query = rollcall::dns::acl::Acl::only(vec!["127.0.0.0/8".parse().unwrap()]);
    let running = start(cfg).await.unwrap();
    let m = udp_query(running.dns_addr, "cluster.", RecordType::SOA, None);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
}

/// Reads one sample's value from Prometheus text.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("{series} not in /metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_queries_registrations_and_requests() {
    let s = Server::start().await;
    s.put("app", "a1", r#"{"addr":"10.0.0.1","ttl":60}"#).await;
    s.put("app", "a1", r#"{"addr":"10.0.0.1","ttl":60}"#).await;
    s.put("app", "a2", r#"{"addr":"10.0.0.2","ttl":60}"#).await;
    assert_eq!(s.delete("app", "a2").await, 204);
    for _ in 0..7 {
        udp_query(s.dns(), "app.cluster.", RecordType::A, None);
    }
    udp_query(s.dns(), "nope.cluster.", RecordType::AAAA, None);
    udp_query(s.dns(), "example.com.", RecordType::SRV, None);
    tcp_query(s.dns(), "app.cluster.", RecordType::A);
    let url = format!("http://{}/metrics", s.running.http_addr);
    let text = s.http.get(url).send().await.unwrap().text().await.unwrap();
    assert_eq!(
        sample(
            &text,
            r#"rollcall_dns_queries_total{transport="udp",qtype="A"}"#
        ),
        7.0
    );
    assert_eq!(
        sample(
            &text,
            r#"rollcall_dns_queries_total{transport="udp",qtype="AAAA"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"rollcall_dns_responses_total{transport="udp",rcode="NXDOMAIN"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"rollcall_dns_responses_total{transport="udp",rcode="REFUSED"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"rollcall_dns_queries_total{transport="tcp",qtype="A"}"#
        ),
        1.0
    );
    assert_eq!(sample(&text, "rollcall_registrations_total"), 2.0);
    assert_eq!(sample(&text, "rollcall_renewals_total"), 1.0);
    assert_eq!(sample(&text, "rollcall_deregistrations_total"), 1.0);
    assert_eq!(sample(&text, r#"rollcall_nodes{role="app"}"#), 1.0);
    assert_eq!(
        sample(
            &text,
            r#"rollcall_http_request_duration_seconds_count{method="PUT",route="/v1/roles/{role}/nodes/{node}",status="200",blocking="false"}"#
        ),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_node_srv_answer_over_tcp_stays_valid_past_16k_and_64k() {
    use rollcall::registry::{Label, NodeKey, NodeSpec};
    let s = Server::start().await;
    let mut pending = Vec::new();
    for i in 0..1000u32 {
        let reg = s.running.registry.clone();
        pending.push(tokio::spawn(async move {
            let key = NodeKey {
                role: Label::parse("appserver").unwrap(),
                node: Label::parse(&format!("appserver-{i}")).unwrap(),
            };
            let spec = NodeSpec {
                addr: std::net::Ipv4Addr::from(0x0a00_0000 + i).into(),
                port: Some(8080),
                service: Label::parse("http").unwrap(),
                ttl: 300,
                weight: 10,
                meta: Default::default(),
            };
            reg.put(key, spec).await.unwrap();
        }));
    }
    for p in pending {
        p.await.unwrap();
    }
    // Answers alone are ~50 KB; with glue the whole set would pass 64 KB, and glue records
    // beyond 16 KB cannot point back at their SRV target.
    let raw = tcp_raw(
        s.dns(),
        &query_msg("_http._tcp.appserver.cluster.", RecordType::SRV, None),
    );
    assert!(raw.len() <= 65535);
    let m = Message::from_vec(&raw).expect("the big answer decodes");
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 1000);
    assert!(
        m.additionals.len() > 300,
        "glue that fits is kept: {}",
        m.additionals.len()
    );
    for r in &m.additionals {
        let RData::A(a) = &r.data else {
            panic!("not an A: {r}")
        };
        let i = u32::from(a.0) - 0x0a00_0000;
        assert_eq!(
            r.name.to_ascii(),
            format!("appserver-{i}.appserver.cluster."),
            "glue owner matches its address"
        );
    }
    let out = dig(s.dns(), &["+tcp", "_http._tcp.appserver.cluster", "SRV"]);
    assert!(
        out.contains("ANSWER: 1000") && !out.contains("bad label"),
        "{}",
        &out[..out.len().min(600)]
    );
}
