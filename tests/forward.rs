//! System tests of forwarding (`serve --forward`): rollcall as the one resolver a container is
//! given. Real upstreams on loopback: NSD serving `example.test` (and `broken.test`, whose
//! zone file is missing, so NSD answers SERVFAIL for it), Debian's dnsmasq answering
//! `other.test` and `broken.test` itself, closed ports and silent sockets as dead upstreams.
//! The one test double is the spoofing upstream (an attacker cannot be had from Debian).

#[path = "util/mod.rs"]
mod util;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use util::nsd::{Nsd, NsdZone};
use util::{metric, query_msg, require, tcp_raw, ServeProc};

fn free_udp_port() -> u16 {
    // Free for both UDP and TCP (NSD and dnsmasq bind both).
    loop {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Asks `server` over UDP from `source` (an address on lo); None on a 3-s timeout.
fn ask_from(source: &str, server: SocketAddr, name: &str, rtype: RecordType) -> Option<Message> {
    let sock = UdpSocket::bind((source, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let q = query_msg(name, rtype, Some(1232));
    sock.send_to(&q, server).unwrap();
    let mut buf = [0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).ok()?;
        let m = Message::from_vec(&buf[..n]).ok()?;
        if m.metadata.id == u16::from_be_bytes([q[0], q[1]]) {
            return Some(m);
        }
    }
}

/// Asks `server` over TCP from `source` (an address on lo).
fn tcp_from(source: &str, server: SocketAddr, name: &str) -> Message {
    use std::io::{Read, Write};
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let src: SocketAddr = format!("{source}:0").parse().unwrap();
    sock.bind(&src.into()).unwrap();
    sock.connect(&server.into()).unwrap();
    let mut stream: std::net::TcpStream = sock.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let q = query_msg(name, RecordType::A, None);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    stream.write_all(&framed).unwrap();
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).unwrap();
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).unwrap();
    Message::from_vec(&buf).unwrap()
}

fn ask(server: SocketAddr, name: &str) -> Option<Message> {
    ask_from("127.0.0.1", server, name, RecordType::A)
}

fn addrs(m: &Message) -> Vec<String> {
    util::addrs(m)
}

fn rcode(m: &Option<Message>) -> Option<ResponseCode> {
    m.as_ref().map(|m| m.metadata.response_code)
}

/// NSD for example.test (zone below) and broken.test (no zone file: SERVFAIL). The zone
/// file's directory lives as long as the NSD.
struct Upstream {
    nsd: Nsd,
    _zones: tempfile::TempDir,
}

impl std::ops::Deref for Upstream {
    type Target = Nsd;
    fn deref(&self) -> &Nsd {
        &self.nsd
    }
}

fn start_nsd() -> Upstream {
    let dir = tempfile::tempdir().unwrap();
    let mut zone = String::from(
        "$ORIGIN example.test.\n$TTL 300\n@ IN SOA ns hostmaster 1 60 10 600 30\n@ IN NS ns\nns IN A 127.0.0.1\nwww IN A 192.0.2.10\nwww IN A 192.0.2.11\nshort 2 IN A 192.0.2.20\n",
    );
    for i in 1..=100 {
        zone.push_str(&format!("big IN A 198.51.100.{i}\n"));
    }
    let file = dir.path().join("example.test.zone");
    std::fs::write(&file, zone).unwrap();
    let nsd = Nsd::start(
        &[
            NsdZone {
                name: "example.test",
                file: Some(&file),
            },
            NsdZone {
                name: "broken.test",
                file: None,
            },
        ],
        false,
    );
    assert_eq!(
        rcode(&ask(nsd.addr, "www.example.test.")),
        Some(ResponseCode::NoError),
        "nsd answers www.example.test"
    );
    Upstream { nsd, _zones: dir }
}

/// Debian's dnsmasq on `port`: `other.test` and `broken.test` answered with `addr`, queries
/// logged (to count what reached it), extra arguments added.
struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
    queries: Arc<Mutex<Vec<String>>>,
}

impl Dnsmasq {
    fn start_on(port: u16, answer: &str, extra: &[&str]) -> Dnsmasq {
        let mut child = Command::new(require("dnsmasq"))
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
            ])
            .args(["--listen-address", "127.0.0.1", "--port", &port.to_string()])
            .args(["--conf-file=/dev/null", "--user=root", "--pid-file="])
            .arg(format!("--address=/other.test/{answer}"))
            .arg(format!("--address=/broken.test/{answer}"))
            .args(["--log-queries", "--log-facility=-", "--local-ttl=60"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting dnsmasq");
        let queries = Arc::new(Mutex::new(Vec::new()));
        let q = queries.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("query[") {
                    q.lock().unwrap().push(line);
                }
            }
        });
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        assert!(
            util::eventually(Duration::from_secs(10), || ask(addr, "a.other.test.")
                .is_some()),
            "dnsmasq did not answer"
        );
        queries.lock().unwrap().clear();
        Dnsmasq {
            child,
            addr,
            queries,
        }
    }

    /// dnsmasq with only `extra` options (no local answers), not waited for.
    fn start_on_raw(port: u16, extra: &[&str]) -> KillOnDrop {
        KillOnDrop(
            Command::new(require("dnsmasq"))
                .args([
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                ])
                .args(["--listen-address", "127.0.0.1", "--port", &port.to_string()])
                .args([
                    "--conf-file=/dev/null",
                    "--user=root",
                    "--pid-file=",
                    "--cache-size=0",
                ])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting dnsmasq"),
        )
    }

    fn start(answer: &str) -> Dnsmasq {
        Self::start_on(free_udp_port(), answer, &[])
    }

    /// Queries it received for names containing `needle` (in any letter case: rollcall
    /// randomises the case of what it asks upstream).
    fn saw(&self, needle: &str) -> usize {
        self.lines(needle).len()
    }

    /// Its log lines about names containing `needle` (any case).
    fn lines(&self, needle: &str) -> Vec<String> {
        // dnsmasq logs a line per query; give the pipe a moment.
        std::thread::sleep(Duration::from_millis(100));
        let needle = needle.to_ascii_lowercase();
        self.queries
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.to_ascii_lowercase().contains(&needle))
            .cloned()
            .collect()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port where nothing listens (queries get ICMP port unreachable).
fn closed() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_udp_port()))
}

/// A socket that reads queries and never answers (kept open while the value lives).
fn silent() -> (UdpSocket, SocketAddr) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let a = s.local_addr().unwrap();
    (s, a)
}

fn serve(dir: &Path, args: &[&str]) -> ServeProc {
    ServeProc::start(&dir.join("data"), &dir.join("zones"), args)
}

#[test]
fn forwarded_answers_rules_acl_and_cache() {
    let nsd = start_nsd();
    let dm = Dnsmasq::start("10.9.9.9");
    let dir = tempfile::tempdir().unwrap();
    let fwd_default = nsd.addr.to_string();
    let fwd_other = format!("other.test={}", dm.addr);
    let s = serve(
        dir.path(),
        &[
            "--forward",
            &fwd_default,
            "--forward",
            &fwd_other,
            "--forward",
            "local.test=",
            "--allow-recursion",
            "127.0.0.1/32,127.0.0.2/32",
        ],
    );

    // Forwarded: the same records as the upstream's own answer; RA set, AA clear.
    let direct = ask(nsd.addr, "www.example.test.").unwrap();
    let via = ask(s.dns, "www.example.test.").unwrap();
    assert_eq!(via.metadata.response_code, ResponseCode::NoError);
    let mut want = addrs(&direct);
    let mut got = addrs(&via);
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert!(
        via.metadata.recursion_available,
        "RA set for a client that may recurse"
    );
    assert!(
        !via.metadata.authoritative,
        "a forwarded answer is not authoritative"
    );
    // Our own names are still ours: authoritative, and RA for this client, over UDP and TCP
    // alike (one policy for both transports).
    let own = ask(s.dns, "ns.cluster.").unwrap();
    assert!(own.metadata.authoritative);
    assert!(own.metadata.recursion_available, "RA over UDP");
    let own_tcp = Message::from_vec(&tcp_raw(
        s.dns,
        &query_msg("ns.cluster.", RecordType::A, None),
    ))
    .unwrap();
    assert!(own_tcp.metadata.authoritative);
    assert!(own_tcp.metadata.recursion_available, "RA over TCP");

    // Per-domain rules: the most specific wins; `DOMAIN=` never forwards.
    assert_eq!(addrs(&ask(s.dns, "x.other.test.").unwrap()), ["10.9.9.9"]);
    assert_eq!(
        rcode(&ask(s.dns, "x.local.test.")),
        Some(ResponseCode::Refused)
    );
    assert_eq!(dm.saw("local.test"), 0);

    // ACL: 127.0.0.3 may query our zones but not recurse; nothing goes upstream for it.
    let refused = ask_from("127.0.0.3", s.dns, "acl.other.test.", RecordType::A);
    assert_eq!(rcode(&refused), Some(ResponseCode::Refused));
    assert!(!refused.unwrap().metadata.recursion_available);
    assert_eq!(
        dm.saw("acl.other.test"),
        0,
        "the upstream saw a refused client's query"
    );
    assert!(ask_from("127.0.0.3", s.dns, "ns.cluster.", RecordType::A)
        .is_some_and(|m| m.metadata.response_code == ResponseCode::NoError));
    let ok = ask_from("127.0.0.2", s.dns, "acl.other.test.", RecordType::A).unwrap();
    assert_eq!(addrs(&ok), ["10.9.9.9"]);
    assert!(metric(&s.api(), "rollcall_forward_refused_total") >= 1.0);
    // Over TCP the same client gets the same answers: REFUSED (counted), no RA, nothing sent
    // upstream; our own names answered, without RA.
    let refused_before = metric(&s.api(), "rollcall_forward_refused_total");
    let tcp_refused = tcp_from("127.0.0.3", s.dns, "acl-tcp.other.test.");
    assert_eq!(tcp_refused.metadata.response_code, ResponseCode::Refused);
    assert!(!tcp_refused.metadata.recursion_available);
    assert_eq!(dm.saw("acl-tcp.other.test"), 0);
    assert_eq!(
        metric(&s.api(), "rollcall_forward_refused_total"),
        refused_before + 1.0
    );
    let tcp_own = tcp_from("127.0.0.3", s.dns, "ns.cluster.");
    assert_eq!(tcp_own.metadata.response_code, ResponseCode::NoError);
    assert!(!tcp_own.metadata.recursion_available);

    // Cache: the second query is not seen upstream, and its TTL counts down.
    let first = ask(s.dns, "cached.other.test.").unwrap();
    let ttl0 = first.answers[0].ttl;
    std::thread::sleep(Duration::from_millis(2100));
    let second = ask(s.dns, "cached.other.test.").unwrap();
    assert_eq!(addrs(&second), ["10.9.9.9"]);
    assert_eq!(
        dm.saw("cached.other.test"),
        1,
        "the cached answer was asked upstream again"
    );
    assert!(
        second.answers[0].ttl + 2 <= ttl0,
        "TTL {ttl0} then {}",
        second.answers[0].ttl
    );
    assert!(metric(&s.api(), "rollcall_forward_cache_hits_total") >= 1.0);

    // Negative caching: NXDOMAIN with NSD's SOA (minimum 30 s), asked upstream once.
    let before = metric(
        &s.api(),
        &format!(
            "rollcall_forward_queries_total{{upstream=\"{}\",rcode=\"NXDOMAIN\"}}",
            nsd.addr
        ),
    );
    for _ in 0..3 {
        assert_eq!(
            rcode(&ask(s.dns, "nope.example.test.")),
            Some(ResponseCode::NXDomain)
        );
    }
    let after = metric(
        &s.api(),
        &format!(
            "rollcall_forward_queries_total{{upstream=\"{}\",rcode=\"NXDOMAIN\"}}",
            nsd.addr
        ),
    );
    assert_eq!(after - before, 1.0, "NXDOMAIN was not cached");

    // TC from upstream -> TCP: 100 A records (1.6 KB) arrive whole over TCP.
    let big = Message::from_vec(&tcp_raw(
        s.dns,
        &query_msg("big.example.test.", RecordType::A, None),
    ))
    .unwrap();
    assert_eq!(big.answers.len(), 100);
    // Over UDP the client gets TC (and retries over TCP itself).
    let udp_big = ask(s.dns, "big.example.test.").unwrap();
    assert!(udp_big.metadata.truncation);
}

#[test]
fn failover_on_timeout_servfail_and_refused_and_servfail_when_all_are_down() {
    let nsd = start_nsd();
    let dm = Dnsmasq::start("10.8.8.8");
    let (_quiet, quiet) = silent();
    let dir = tempfile::tempdir().unwrap();
    let r1 = format!("example.test={quiet},{}", nsd.addr); // silent first
    let r2 = format!("broken.test={},{}", nsd.addr, dm.addr); // SERVFAIL first
    let r3 = format!("other.test={},{}", nsd.addr, dm.addr); // REFUSED first
                                                             // All down: a closed port and three silent ones, 400 ms each, within a 1-s budget.
    let (_q2, quiet2) = silent();
    let (_q3, quiet3) = silent();
    let (_q4, quiet4) = silent();
    let r4 = format!("dead.test={},{quiet2},{quiet3},{quiet4}", closed());
    let s = serve(
        dir.path(),
        &[
            "--forward",
            &r1,
            "--forward",
            &r2,
            "--forward",
            &r3,
            "--forward",
            &r4,
            "--forward-timeout",
            "400ms",
            "--forward-budget",
            "1s",
            "--forward-cache",
            "0",
        ],
    );
    let t = Instant::now();
    let m = ask(s.dns, "www.example.test.").unwrap();
    let took = t.elapsed();
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(
        took < Duration::from_millis(900),
        "timeout failover took {took:?}"
    );
    eprintln!("silent upstream -> next one: answered in {took:?}");

    let t = Instant::now();
    assert_eq!(
        addrs(&ask(s.dns, "x.broken.test.").unwrap()),
        ["10.8.8.8"],
        "SERVFAIL must move on"
    );
    assert_eq!(
        addrs(&ask(s.dns, "x.other.test.").unwrap()),
        ["10.8.8.8"],
        "REFUSED must move on"
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "rcode failover waited: {:?}",
        t.elapsed()
    );
    // NXDOMAIN is final: not asked elsewhere.
    assert_eq!(
        rcode(&ask(s.dns, "nope.example.test.")),
        Some(ResponseCode::NXDomain)
    );

    let t = Instant::now();
    let m = ask(s.dns, "x.dead.test.");
    let took = t.elapsed();
    assert_eq!(rcode(&m), Some(ResponseCode::ServFail));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1500),
        "all down: SERVFAIL after {took:?}, the budget is 1 s"
    );
    eprintln!("all upstreams down: SERVFAIL after {took:?}");

    // Two timeouts marked the silent upstream down: now skipped, no added latency.
    for _ in 0..3 {
        let _ = ask(s.dns, "www.example.test.");
    }
    let t = Instant::now();
    assert_eq!(
        rcode(&ask(s.dns, "www.example.test.")),
        Some(ResponseCode::NoError)
    );
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "a down upstream still costs {:?}",
        t.elapsed()
    );
    assert_eq!(
        metric(
            &s.api(),
            &format!("rollcall_forward_upstream_up{{upstream=\"{quiet}\"}}")
        ),
        0.0
    );

    // Authoritative names are answered at once while the upstreams are black-holed.
    let flood: Vec<_> = (0..20)
        .map(|i| {
            let dns = s.dns;
            std::thread::spawn(move || ask(dns, &format!("q{i}.dead.test.")))
        })
        .collect();
    let t = Instant::now();
    assert!(ask(s.dns, "ns.cluster.").is_some_and(|m| m.metadata.authoritative));
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "an authoritative answer waited {:?}",
        t.elapsed()
    );
    for f in flood {
        let _ = f.join();
    }
}

#[test]
fn a_down_upstream_is_probed_and_used_again() {
    let port = free_udp_port();
    let spare = Dnsmasq::start("10.2.2.2");
    let dir = tempfile::tempdir().unwrap();
    let rule = format!("other.test=127.0.0.1:{port},{}", spare.addr);
    let s = serve(
        dir.path(),
        &[
            "--forward",
            &rule,
            "--forward-timeout",
            "300ms",
            "--forward-cache",
            "0",
        ],
    );
    for _ in 0..3 {
        assert_eq!(addrs(&ask(s.dns, "x.other.test.").unwrap()), ["10.2.2.2"]);
    }
    let first = Dnsmasq::start_on(port, "10.1.1.1", &[]);
    assert!(
        util::eventually(Duration::from_secs(5), || ask(s.dns, "x.other.test.")
            .is_some_and(|m| addrs(&m) == ["10.1.1.1"])),
        "the upstream that came back is not used again"
    );
    drop(first);
}

/// The test double: an "upstream" that first sends a reply with the wrong ID, then one for
/// another question, then the real answer — what an off-path spoofer tries.
fn spoofer() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let reply = |id: u16, name: &str, ip: [u8; 4]| {
                let mut r = Message::response(id, q.metadata.op_code);
                let mut qq = q.queries[0].clone();
                qq.set_name(hickory_proto::rr::Name::from_ascii(name).unwrap());
                r.add_query(qq.clone());
                r.add_answer(hickory_proto::rr::Record::from_rdata(
                    qq.name().clone(),
                    60,
                    RData::A(std::net::Ipv4Addr::from(ip).into()),
                ));
                r.to_vec().unwrap()
            };
            let real = q.queries[0].name().to_ascii();
            let _ = s.send_to(
                &reply(q.metadata.id.wrapping_add(1), &real, [6, 6, 6, 6]),
                from,
            );
            let _ = s.send_to(&reply(q.metadata.id, "evil.test.", [6, 6, 6, 7]), from);
            let _ = s.send_to(&reply(q.metadata.id, &real, [192, 0, 2, 1]), from);
        }
    });
    addr
}

#[test]
fn spoofed_replies_loops_and_the_inflight_cap() {
    let dir = tempfile::tempdir().unwrap();
    let spoof = spoofer();
    let (_quiet, quiet) = silent();
    // Our own address as an upstream: a loop, disabled at start.
    let own_port = free_udp_port();
    let own = format!("127.0.0.1:{own_port}");
    let r1 = format!("spoof.test={spoof}");
    let r2 = format!("slow.test={quiet}");
    let r3 = format!("self.test={own}");
    let s = ServeProc::start_on(
        &own,
        "127.0.0.1:0",
        &dir.path().join("data"),
        &dir.path().join("zones"),
        &[
            "--forward",
            &r1,
            "--forward",
            &r2,
            "--forward",
            &r3,
            "--forward-max-inflight",
            "4",
            "--forward-timeout",
            "2s",
            "--forward-budget",
            "2s",
        ],
    );
    assert_eq!(
        metric(
            &s.api(),
            &format!("rollcall_forward_upstream_up{{upstream=\"{own}\"}}")
        ),
        0.0,
        "an upstream equal to our own address must be disabled"
    );
    assert_eq!(
        addrs(&ask(s.dns, "www.spoof.test.").unwrap()),
        ["192.0.2.1"],
        "a spoofed reply was taken"
    );
    let t = Instant::now();
    assert_eq!(
        rcode(&ask(s.dns, "x.self.test.")),
        Some(ResponseCode::ServFail)
    );
    assert!(t.elapsed() < Duration::from_millis(500));

    // More than --forward-max-inflight at once to a silent upstream: the excess gets a fast
    // SERVFAIL, counted.
    let slow: Vec<_> = (0..12)
        .map(|i| {
            let dns = s.dns;
            std::thread::spawn(move || {
                let t = Instant::now();
                (rcode(&ask(dns, &format!("n{i}.slow.test."))), t.elapsed())
            })
        })
        .collect();
    let results: Vec<_> = slow.into_iter().map(|t| t.join().unwrap()).collect();
    let fast_fail = results
        .iter()
        .filter(|(r, took)| {
            *r == Some(ResponseCode::ServFail) && *took < Duration::from_millis(500)
        })
        .count();
    assert!(fast_fail >= 6, "{results:?}");
    assert!(metric(&s.api(), "rollcall_forward_overloaded_total") >= 6.0);

    // A dnsmasq that forwards everything back to the server that forwards to it: that
    // server's loop probe comes back to it, and the upstream is disabled.
    let dir2 = tempfile::tempdir().unwrap();
    let dm_port = free_udp_port();
    let looper_port = free_udp_port();
    let dm = Dnsmasq::start_on(
        dm_port,
        "10.7.7.7",
        &[&format!("--server=127.0.0.1#{looper_port}")],
    );
    let rule = format!("loop.test={}", dm.addr);
    let looper = ServeProc::start_on(
        &format!("127.0.0.1:{looper_port}"),
        "127.0.0.1:0",
        &dir2.path().join("data2"),
        &dir2.path().join("zones"),
        &["--forward", &rule],
    );
    let up = format!("rollcall_forward_upstream_up{{upstream=\"{}\"}}", dm.addr);
    assert!(
        util::eventually(Duration::from_secs(5), || metric(&looper.api(), &up) == 0.0),
        "an upstream that forwards back to us is not disabled"
    );
    // Names under it now get SERVFAIL at once instead of circling.
    let t = Instant::now();
    assert_eq!(
        rcode(&ask(looper.dns, "x.loop.test.")),
        Some(ResponseCode::ServFail)
    );
    assert!(t.elapsed() < Duration::from_millis(500));
}

/// A child process stopped when the value goes.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A test double for an attacker-controlled upstream (no real resolver answers like this on
/// demand): the first label of the question picks the reply, on UDP and TCP alike.
/// - `many<N>-…`: over UDP a truncated reply (TC); over TCP N A records (hickory does not
///   compress the mixed-case owner names: 40 bytes a record, 60 KB at N = 1500), so the
///   forwarder fetches it whole;
/// - `delay<MS>-…`: one A record after MS milliseconds;
/// - `lower-…`: one A record, the question echoed in lower case (an upstream that drops the
///   letter case of questions);
/// - `hole-…`: never answered;
/// - anything else: one A record, 192.0.2.1, TTL 60.
///
/// Every question it receives is logged with its letter case as received.
struct HostileUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl HostileUpstream {
    fn start() -> HostileUpstream {
        let port = free_udp_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let udp = Arc::new(UdpSocket::bind(addr).unwrap());
        let tcp = std::net::TcpListener::bind(addr).unwrap();
        let log = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let name = q.queries[0].name().to_ascii();
                log.lock().unwrap().push(name.clone());
                let first = name.split('.').next().unwrap_or("").to_ascii_lowercase();
                if first.starts_with("hole-") {
                    continue;
                }
                let delay = first
                    .strip_prefix("delay")
                    .and_then(|r| r.split('-').next())
                    .and_then(|ms| ms.parse::<u64>().ok());
                let reply = Self::reply(&q, &first, false);
                let udp = udp.clone();
                match delay {
                    Some(ms) => {
                        std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_millis(ms));
                            let _ = udp.send_to(&reply, from);
                        });
                    }
                    None => {
                        let _ = udp.send_to(&reply, from);
                    }
                }
            }
        });
        let log = seen.clone();
        std::thread::spawn(move || {
            for conn in tcp.incoming() {
                let Ok(mut conn) = conn else { continue };
                let log = log.clone();
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut len = [0u8; 2];
                    if conn.read_exact(&mut len).is_err() {
                        return;
                    }
                    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if conn.read_exact(&mut buf).is_err() {
                        return;
                    }
                    let Ok(q) = Message::from_vec(&buf) else {
                        return;
                    };
                    let name = q.queries[0].name().to_ascii();
                    log.lock().unwrap().push(format!("tcp {name}"));
                    let first = name.split('.').next().unwrap_or("").to_ascii_lowercase();
                    let reply = Self::reply(&q, &first, true);
                    let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&reply);
                    let _ = conn.write_all(&framed);
                });
            }
        });
        HostileUpstream { addr, seen }
    }

    fn reply(q: &Message, first: &str, tcp: bool) -> Vec<u8> {
        let mut r = Message::response(q.metadata.id, q.metadata.op_code);
        r.metadata.recursion_desired = q.metadata.recursion_desired;
        r.metadata.recursion_available = true;
        let mut question = q.queries[0].clone();
        if first.starts_with("lower-") {
            question.set_name(question.name().to_lowercase());
        }
        r.add_query(question.clone());
        let many = first
            .strip_prefix("many")
            .and_then(|r| r.split('-').next())
            .and_then(|n| n.parse::<u32>().ok());
        let count = match many {
            Some(_) if !tcp => {
                r.metadata.truncation = true;
                0
            }
            Some(n) => n,
            None => 1,
        };
        for i in 0..count {
            r.add_answer(hickory_proto::rr::Record::from_rdata(
                question.name().clone(),
                60,
                RData::A(
                    std::net::Ipv4Addr::from(if many.is_some() {
                        0x0a00_0000 + i
                    } else {
                        0xc000_0201
                    })
                    .into(),
                ),
            ));
        }
        r.to_vec().unwrap()
    }

    /// The questions received whose name contains `needle` (any case).
    fn seen(&self, needle: &str) -> Vec<String> {
        let needle = needle.to_ascii_lowercase();
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|n| n.to_ascii_lowercase().contains(&needle))
            .cloned()
            .collect()
    }
}

/// The server's resident memory (VmRSS), in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Red team round 3, 1.1 and 11: one small query for a name with a 64 KiB answer cost 1–2 MB
/// of cache (743 of them OOM-killed the server in 1.5 GiB), and a 64 KiB answer re-encoded
/// past 64 KiB came back to TCP clients cut, with TC.
#[test]
fn the_cache_is_bounded_in_bytes_and_big_answers_pass_whole() {
    let up = HostileUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let rule = up.addr.to_string();
    let s = serve(
        dir.path(),
        &["--forward", &rule, "--forward-cache-size", "1MiB"],
    );
    // Over TCP, a 1,500-record answer (60 KB) arrives whole, without TC.
    let big = Message::from_vec(&tcp_raw(
        s.dns,
        &query_msg("many1500-whole.evil.test.", RecordType::A, None),
    ))
    .unwrap();
    assert!(!big.metadata.truncation, "TC over TCP");
    assert_eq!(
        big.metadata.response_code,
        ResponseCode::NoError,
        "{:?}",
        big.metadata
    );
    assert_eq!(big.answers.len(), 1500);
    // Over UDP the client gets TC (header and question only).
    let udp_big = ask(s.dns, "many1500-whole.evil.test.").unwrap();
    assert!(udp_big.metadata.truncation && udp_big.answers.is_empty());

    let pid = s.child.id();
    let before = rss_kib(pid);
    // 300 distinct names with 60 KB answers (the red team's `many`: +320 MB before), then 400
    // with 8 KB answers (cacheable, 3.2 MB in all: more than the 1 MiB cache).
    for i in 0..300 {
        let r = ask(s.dns, &format!("many1500-x{i}.evil.test."));
        assert!(r.is_some_and(|m| m.metadata.truncation), "name {i}");
    }
    for i in 0..400 {
        let r = Message::from_vec(&tcp_raw(
            s.dns,
            &query_msg(&format!("many200-y{i}.evil.test."), RecordType::A, None),
        ))
        .unwrap();
        assert_eq!(r.answers.len(), 200, "name {i}");
    }
    let grew_mib = rss_kib(pid).saturating_sub(before) / 1024;
    let cached = metric(&s.api(), "rollcall_forward_cache_bytes");
    assert!(
        cached <= 1024.0 * 1024.0,
        "the cache holds {cached} bytes, over its 1 MiB"
    );
    assert!(
        cached >= 512.0 * 1024.0,
        "the cache holds only {cached} bytes"
    );
    assert!(grew_mib < 64, "the server grew {grew_mib} MiB");
    // A cached 8 KiB answer is served from the cache (not asked again).
    let again = up.seen("many200-y399").len();
    let r = Message::from_vec(&tcp_raw(
        s.dns,
        &query_msg("many200-y399.evil.test.", RecordType::A, None),
    ))
    .unwrap();
    assert_eq!(r.answers.len(), 200);
    assert_eq!(
        up.seen("many200-y399").len(),
        again,
        "the cached answer was asked again"
    );
}

/// Red team round 3, 1.5: 300 identical queries in flight made 300 upstream queries, and the
/// question went out in the client's letter case.
#[test]
fn identical_questions_in_flight_are_asked_once_with_random_letter_case() {
    let up = HostileUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let rule = up.addr.to_string();
    let s = serve(dir.path(), &["--forward", &rule]);
    let name = "delay400-same.Example.TEST.";
    let clients: Vec<_> = (0..50)
        .map(|_| {
            let dns = s.dns;
            std::thread::spawn(move || ask(dns, name))
        })
        .collect();
    let answers: Vec<_> = clients.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().is_some_and(|m| addrs(m) == ["192.0.2.1"])),
        "{answers:?}"
    );
    let asked = up.seen("delay400-same");
    assert!(
        asked.len() <= 2,
        "asked upstream {} times: {asked:?}",
        asked.len()
    );
    assert!(metric(&s.api(), "rollcall_forward_coalesced_total") >= 40.0);

    // 0x20: across 20 names of 26 letters, the case the upstream sees varies.
    let mut upper = 0;
    for i in 0..20 {
        let n = format!("abcdefghijklmnopqrstuvwxyz{i}.test.");
        assert!(ask(s.dns, &n).is_some());
        upper += up
            .seen(&n[..28])
            .iter()
            .filter(|q| q.chars().any(|c| c.is_ascii_uppercase()))
            .count();
    }
    assert!(
        upper >= 15,
        "only {upper} of 20 questions went out with upper-case letters"
    );
    // An upstream that drops the case is still usable (asked again without it).
    let m = ask(s.dns, "lower-caps.test.").unwrap();
    assert_eq!(addrs(&m), ["192.0.2.1"]);
    assert_eq!(m.queries[0].name().to_ascii(), "lower-caps.test.");
}

/// Red team round 3, 1.2 (forwarded answers were not rate limited: 24x amplification) and
/// 1.3 (one client's black-holed names held every in-flight slot).
#[test]
fn forwarded_answers_are_rate_limited_and_one_client_cannot_take_every_slot() {
    let up = HostileUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let rule = up.addr.to_string();
    let s = serve(
        dir.path(),
        &[
            "--forward",
            &rule,
            "--rate-limit",
            "50",
            "--rate-limit-exempt",
            "none",
        ],
    );
    assert!(ask(s.dns, "amp.test.").is_some());
    // 600 queries in about a second from one source: cached and uncached forwarded names.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let started = Instant::now();
    for i in 0..600u32 {
        let name = if i % 2 == 0 {
            "amp.test.".to_string()
        } else {
            format!("amp{i}.test.")
        };
        sock.send_to(&query_msg(&name, RecordType::A, Some(1232)), s.dns)
            .unwrap();
        std::thread::sleep(Duration::from_micros(1500));
    }
    let mut full = 0;
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        if let Ok(m) = Message::from_vec(&buf[..n]) {
            if !m.metadata.truncation {
                full += 1;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64().ceil() + 1.0;
    assert!(
        f64::from(full) <= 50.0 * secs,
        "{full} full answers in about {secs} s at a limit of 50/s"
    );
    assert!(metric(&s.api(), "rollcall_dns_rate_limited_total") > 100.0);

    drop(s);
    // A server of its own for the per-client limit (loopback exempt from RRL, as by default, so
    // that rate limiting cannot be what holds answers back here).
    let dir = tempfile::tempdir().unwrap();
    let s = serve(
        dir.path(),
        &[
            "--forward",
            &rule,
            "--forward-max-per-client",
            "8",
            "--forward-timeout",
            "1s",
            "--forward-budget",
            "1s",
        ],
    );
    // 30 black-holed names at once from 127.0.0.1: 8 wait, the rest get SERVFAIL at once...
    let holes: Vec<_> = (0..30)
        .map(|i| {
            let dns = s.dns;
            std::thread::spawn(move || {
                let t = Instant::now();
                (rcode(&ask(dns, &format!("hole-{i}.test."))), t.elapsed())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    // ...while a client of another /24 is answered.
    let other = ask_from("127.0.1.1", s.dns, "other-client.test.", RecordType::A);
    assert_eq!(
        other.as_ref().map(addrs),
        Some(vec!["192.0.2.1".to_string()])
    );
    let results: Vec<_> = holes.into_iter().map(|t| t.join().unwrap()).collect();
    let fast = results
        .iter()
        .filter(|(r, took)| {
            *r == Some(ResponseCode::ServFail) && *took < Duration::from_millis(500)
        })
        .count();
    assert!(fast >= 20, "{results:?}");
    assert!(metric(&s.api(), "rollcall_forward_client_limited_total") >= 20.0);
}

/// Red team round 3, 1.4: the loop probe name, seen by the upstream, disabled it for good when
/// replayed; a loop that formed after start was never found.
#[test]
fn loop_probes_cannot_be_replayed_and_late_loops_are_found() {
    let up = HostileUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let rule = up.addr.to_string();
    let s = serve(dir.path(), &["--forward", &rule]);
    let probe = util::eventually(Duration::from_secs(3), || {
        !up.seen("rollcall-loop-check").is_empty()
    });
    assert!(probe, "no loop probe was sent at start");
    let name = up.seen("rollcall-loop-check")[0].clone();
    std::thread::sleep(Duration::from_millis(5500));
    assert_eq!(
        rcode(&ask_from("127.0.0.1", s.dns, &name, RecordType::TXT)),
        Some(ResponseCode::Refused)
    );
    let series = format!("rollcall_forward_upstream_up{{upstream=\"{}\"}}", up.addr);
    assert_eq!(
        metric(&s.api(), &series),
        1.0,
        "a replayed probe disabled the upstream"
    );
    assert_eq!(
        addrs(&ask(s.dns, "after-replay.test.").unwrap()),
        ["192.0.2.1"]
    );

    // A loop formed after start: rollcall forwards to a port where dnsmasq starts later,
    // forwarding everything back to rollcall.
    let dir2 = tempfile::tempdir().unwrap();
    let dm_port = free_udp_port();
    let rule = format!("127.0.0.1:{dm_port}");
    let looper = serve(
        dir2.path(),
        &[
            "--forward",
            &rule,
            "--forward-timeout",
            "500ms",
            "--forward-budget",
            "500ms",
        ],
    );
    std::thread::sleep(Duration::from_millis(1500));
    let _dm = Dnsmasq::start_on_raw(
        dm_port,
        &[&format!("--server=127.0.0.1#{}", looper.dns.port())],
    );
    let found = util::eventually(Duration::from_secs(10), || {
        let _ = ask(looper.dns, "late-loop.test.");
        metric(&looper.api(), "rollcall_forward_loops_detected_total") >= 1.0
    });
    assert!(found, "a loop formed after start was not found");
    let t = Instant::now();
    assert_eq!(
        rcode(&ask(looper.dns, "x.late-loop.test.")),
        Some(ResponseCode::ServFail)
    );
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "took {:?}",
        t.elapsed()
    );
}
