//! What the red team (2026-12) did to the server's sockets, and what it gets now: connections
//! that cost nothing to hold are closed, DNS over TCP cannot be locked out, big roles stay
//! resolvable over TCP, browsers cannot reach the API from another site. In-process server on
//! port 0, real sockets.

#[path = "util/mod.rs"]
mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use rollcall::config::ServeConfig;
use rollcall::registry::{Label, NodeKey, NodeSpec};
use rollcall::server::start;
use util::*;

/// Reads until EOF (or error); returns what was read and how long it took.
fn read_to_close(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let t0 = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("still open after {limit:?} ({} bytes read)", got.len())
            }
            Err(_) => break,
        }
    }
    (got, t0.elapsed())
}

/// Sends `request`; returns what came back within 2 s (or until the server closed).
fn http_raw(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_slow_and_http2_connections_are_closed() {
    let running = start(ServeConfig::for_tests()).await.unwrap();
    let addr = running.http_addr;
    let silent = std::thread::spawn(move || {
        // Never sends a byte: closed by the header timeout (10 s), not held forever.
        let mut s = TcpStream::connect(addr).unwrap();
        read_to_close(&mut s, Duration::from_secs(15)).1
    });
    let slow = std::thread::spawn(move || {
        // Headers, then a body that never comes: 408 within the body timeout.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"PUT /v1/roles/app/nodes/n1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{\"ttl\":").unwrap();
        let (got, took) = read_to_close(&mut s, Duration::from_secs(15));
        (String::from_utf8_lossy(&got).into_owned(), took)
    });
    let idle = std::thread::spawn(move || {
        // A keep-alive connection left idle after one request.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        read_to_close(&mut s, Duration::from_secs(15)).1
    });
    // HTTP/2 with prior knowledge is not spoken at all.
    let h2 = http_raw(addr, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    assert!(!h2.contains("\0\0"), "an HTTP/2 SETTINGS frame came back");

    let took = silent.join().unwrap();
    assert!(
        took <= Duration::from_secs(12),
        "silent connection held {took:?}"
    );
    let (resp, took) = slow.join().unwrap();
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(took <= Duration::from_secs(12), "slow body held {took:?}");
    let took = idle.join().unwrap();
    assert!(
        took <= Duration::from_secs(12),
        "idle keep-alive held {took:?}"
    );
    // Nothing was registered by the slow body.
    assert_eq!(running.registry.roles().unwrap().1.len(), 0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_origin_checks_stop_rebinding_and_cross_site_sessions() {
    let running = start(ServeConfig::for_tests()).await.unwrap();
    let addr = running.http_addr;
    let get = |host: &str| {
        http_raw(
            addr,
            &format!("GET /v1/roles HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
    };
    for ok in [
        "127.0.0.1",
        &addr.to_string(),
        "localhost:8053",
        "dns:8053",
        "rollcall.cluster",
        "[::1]:8053",
    ] {
        let r = get(ok);
        assert!(r.starts_with("HTTP/1.1 200"), "Host {ok}: {r}");
    }
    for bad in [
        "attacker.example.com",
        "rebind.attacker.example:8053",
        "cluster.example",
    ] {
        let r = get(bad);
        assert!(r.starts_with("HTTP/1.1 403"), "Host {bad}: {r}");
        assert!(r.contains("--allow-host"), "{r}");
    }

    // A session opened from another site's page is refused, before the upgrade.
    let http = reqwest::Client::new();
    let r = http
        .put(format!("http://{addr}/v1/roles/app/nodes/n1"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let upgrade = |origin: &str| {
        http_raw(
            addr,
            &format!(
                "GET /v1/roles/app/nodes/n1/session HTTP/1.1\r\nHost: {addr}\r\nOrigin: {origin}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            ),
        )
    };
    let r = upgrade("http://evil.example");
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holds_at_most_one_live_session() {
    use futures_util::{SinkExt, StreamExt};
    let running = start(ServeConfig::for_tests()).await.unwrap();
    let addr = running.http_addr;
    let r = reqwest::Client::new()
        .put(format!("http://{addr}/v1/roles/app/nodes/n1"))
        .body(r#"{"ttl":30}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let url = format!("ws://{addr}/v1/roles/app/nodes/n1/session");
    let (mut first, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (mut second, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    // The first is closed by the server; the node stays, held by the second.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match first.next().await {
                None | Some(Err(_)) => break,
                Some(Ok(m)) if m.is_close() => break,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the older session stayed open");
    second
        .send(tokio_tungstenite::tungstenite::Message::Ping(vec![].into()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let node = running
        .registry
        .node(&NodeKey {
            role: Label::parse("app").unwrap(),
            node: Label::parse("n1").unwrap(),
        })
        .unwrap()
        .expect("the node stays registered");
    assert!(node.session);
    running.stop().await;
}

async fn fill_role(running: &rollcall::server::Running, role: &str, n: u32) {
    let mut pending = Vec::new();
    for i in 0..n {
        let reg = running.registry.clone();
        let role = role.to_owned();
        pending.push(tokio::spawn(async move {
            let key = NodeKey {
                role: Label::parse(&role).unwrap(),
                node: Label::parse(&format!("n{i}")).unwrap(),
            };
            let spec = NodeSpec {
                addr: std::net::Ipv4Addr::from(0x0a00_0000 + i).into(),
                port: Some(8080),
                service: Label::parse("http").unwrap(),
                ttl: 600,
                weight: 1,
                meta: Default::default(),
            };
            reg.put(key, spec).await.unwrap();
        }));
    }
    for p in pending {
        p.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_too_big_for_one_tcp_message_gets_the_largest_answer_that_fits() {
    let running = start(ServeConfig::for_tests()).await.unwrap();
    fill_role(&running, "huge", 5000).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let raw = tcp_raw(
            running.dns_addr,
            &query_msg("huge.cluster.", RecordType::A, None),
        );
        assert!(raw.len() <= 65535);
        let m = Message::from_vec(&raw).expect("decodes");
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(!m.metadata.truncation, "TC over TCP");
        assert!(m.answers.len() > 4000, "{} answers", m.answers.len());
        seen.extend(m.answers.iter().map(|r| r.data.to_string()));
    }
    assert!(
        seen.len() > 4100,
        "the rotation moves: {} distinct",
        seen.len()
    );
    // Over UDP it is still TC, for the client to retry over TCP.
    let m = udp_query(running.dns_addr, "huge.cluster.", RecordType::A, Some(1232));
    assert!(m.metadata.truncation);
    running.stop().await;
}

/// The SRV sets of a role too big for one TCP message: the largest answer that fits, from a
/// rotation that moves, never an empty TC answer (it was empty with TC before: issue 11 #5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_srv_set_too_big_for_one_tcp_message_gets_the_largest_answer_that_fits() {
    let running = start(ServeConfig::for_tests()).await.unwrap();
    fill_role(&running, "huge", 5000).await;
    for name in ["_http._tcp.huge.cluster.", "huge.cluster."] {
        let mut seen = std::collections::BTreeSet::new();
        let mut most = 0;
        for _ in 0..4 {
            let raw = tcp_raw(running.dns_addr, &query_msg(name, RecordType::SRV, None));
            assert!(raw.len() <= 65535);
            let m = Message::from_vec(&raw).expect("decodes");
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
            assert!(!m.metadata.truncation, "TC over TCP for {name}");
            assert!(
                m.answers.len() > 1000,
                "{name}: {} answers",
                m.answers.len()
            );
            assert!(m.answers.iter().all(|r| r.record_type() == RecordType::SRV));
            most = most.max(m.answers.len());
            seen.extend(m.answers.iter().map(|r| r.data.to_string()));
        }
        assert!(
            seen.len() > most,
            "{name}: the rotation moves ({} distinct)",
            seen.len()
        );
        // Over UDP it is TC, for the client to retry over TCP.
        let m = udp_query(running.dns_addr, name, RecordType::SRV, Some(1232));
        assert!(m.metadata.truncation, "{name} over UDP");
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_clients_that_never_read_lose_their_slot() {
    let running = start(ServeConfig::for_tests()).await.unwrap();
    fill_role(&running, "big", 2000).await; // ~32 KB answers
    let dns = running.dns_addr;
    let q = query_msg("big.cluster.", RecordType::A, None);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    let pipelined = framed.repeat(200);
    // 100 clients pipeline 200 queries each (~6 MB of answers apiece) and never read.
    let mut hogs = Vec::new();
    for _ in 0..100 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(&dns.into()).unwrap();
        let mut s: TcpStream = s.into();
        s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
        let _ = s.write_all(&pipelined);
        hogs.push(s);
    }
    // Other clients are answered meanwhile...
    let m = tcp_query(dns, "cluster.", RecordType::SOA);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    // ...and each hog is dropped once it has not read for the write timeout.
    let t0 = Instant::now();
    let mut closed = 0;
    for mut s in hogs {
        let left = Duration::from_secs(25).saturating_sub(t0.elapsed());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        if t0.elapsed() < Duration::from_secs(25) {
            closed += 1;
        }
    }
    assert_eq!(closed, 100, "hogs still connected after 25 s");
    running.stop().await;
}

/// Sends `n` copies of `query` from one socket as fast as it can and collects what comes back
/// until 1 s of silence: (answers with records, truncated answers, bytes sent, bytes received).
fn flood(dns: SocketAddr, query: &[u8], n: usize) -> (usize, usize, usize, usize) {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let s2 = socket2::SockRef::from(&sock);
    s2.set_recv_buffer_size(8 << 20).unwrap();
    sock.connect(dns).unwrap();
    let reader = {
        let sock = sock.try_clone().unwrap();
        std::thread::spawn(move || {
            sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let (mut full, mut tc, mut bytes) = (0, 0, 0);
            let mut buf = [0u8; 4096];
            while let Ok(len) = sock.recv(&mut buf) {
                bytes += len;
                let m = Message::from_vec(&buf[..len]).expect("a valid response");
                if m.metadata.truncation {
                    assert!(m.answers.is_empty());
                    tc += 1;
                } else if !m.answers.is_empty() {
                    full += 1;
                }
            }
            (full, tc, bytes)
        })
    };
    for _ in 0..n {
        let _ = sock.send(query);
        std::thread::sleep(Duration::from_micros(100));
    }
    let (full, tc, received) = reader.join().unwrap();
    (full, tc, n * query.len(), received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limiting_keeps_rollcall_from_amplifying() {
    let mut cfg = ServeConfig::for_tests();
    cfg.rate_limit = rollcall::dns::rrl::RateLimitConfig {
        limit: 50,
        slip: 2,
        exempt: rollcall::dns::acl::Acl::nobody(), // the test's loopback source stands for a spoofed victim
    };
    let running = start(cfg).await.unwrap();
    fill_role(&running, "app", 60).await;
    let q = query_msg("app.cluster.", RecordType::A, Some(1232));
    let dns = running.dns_addr;
    let t0 = Instant::now();
    let (full, tc, sent, received) = tokio::task::spawn_blocking(move || flood(dns, &q, 3000))
        .await
        .unwrap();
    let secs = t0.elapsed().as_secs_f64().ceil() as usize;
    eprintln!(
        "rate limit 50/s, slip 2: 3000 queries in ~{secs} s -> {full} full answers, {tc} truncated; bytes out/in {:.2} ({received} / {sent})",
        received as f64 / sent as f64
    );
    assert!(full <= 50 * (secs + 1), "{full} full answers in {secs} s");
    assert!(
        tc >= 500,
        "slip sends every 2nd response over the limit truncated: {tc}"
    );
    assert!(received as f64 / sent as f64 <= 2.0, "still amplifying");
    let metrics = reqwest::get(format!("http://{}/metrics", running.http_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let limited: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rollcall_dns_rate_limited_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(limited >= 2000, "{limited}");
    running.stop().await;

    // By default loopback is exempt (and so are the benchmarks): everything is answered.
    let running = start(ServeConfig::for_tests()).await.unwrap();
    fill_role(&running, "app", 60).await;
    let q = query_msg("app.cluster.", RecordType::A, Some(1232));
    let dns = running.dns_addr;
    let (full, tc, _, _) = tokio::task::spawn_blocking(move || flood(dns, &q, 1000))
        .await
        .unwrap();
    assert_eq!((full, tc), (1000, 0));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_an_rrset_over_64k_keeps_the_old_zones_and_names_the_file() {
    // Before: the encoder's error reached an `expect` on the reload path and stopped the server.
    let dir = tempfile::tempdir().unwrap();
    let good = "$ORIGIN example.\n$TTL 60\n@ IN SOA ns hostmaster 7 60 10 3600 2\n@ IN NS ns\nns IN A 127.0.0.1\nwww IN A 10.0.0.1\n";
    std::fs::write(dir.path().join("example.zone"), good).unwrap();
    let mut cfg = ServeConfig::for_tests();
    cfg.zones_dir = dir.path().to_owned();
    let running = start(cfg).await.unwrap();
    let mut bad = good.to_string();
    for i in 0..300 {
        bad.push_str(&format!("@ IN TXT \"{}\" \"{i}\"\n", "x".repeat(250)));
    }
    std::fs::write(dir.path().join("example.zone"), bad).unwrap();
    let e = running.reload_zones().expect_err("the reload is refused");
    assert!(e.to_string().contains("example.zone"), "{e}");
    let m = udp_query(running.dns_addr, "www.example.", RecordType::A, None);
    assert_eq!(m.answers.len(), 1, "the old zone is still served");
    running.stop().await;
}

/// Red team round 3, 3: RRL was on by default with only loopback exempt, and a compose
/// stack's resolvers share one /24: one client at 300 q/s lost 16 % of its answers. By
/// default the private networks of interfaces without the default route are exempt: a server
/// in its own network namespace (a private /30 on a veth, no default route) answers a
/// neighbour's 300 q/s in full; with `--rate-limit-exempt none` the same load is held back
/// (so this test can tell the two apart).
#[test]
fn default_rate_limit_never_holds_back_the_served_network() {
    use util::netns::NetNs;
    let ns = NetNs::create_in(232);
    let dir = tempfile::tempdir().unwrap();
    let zones = dir.path().join("zones");
    std::fs::create_dir_all(&zones).unwrap();
    let server: SocketAddr = format!("{}:1053", ns.ns_ip).parse().unwrap();
    let run = |extra: &[&str]| -> (usize, usize) {
        let child = util::process::Killed(
            std::process::Command::new(require("ip"))
                .args(["netns", "exec", &ns.name])
                .arg(rollcall_bin())
                .args([
                    "serve",
                    "--dns-listen",
                    "0.0.0.0:1053",
                    "--http-listen",
                    "127.0.0.1:18053",
                ])
                .args(["--data-dir", ""])
                .arg("--zones")
                .arg(&zones)
                .args(extra)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("starting rollcall in the namespace"),
        );
        let sock = std::net::UdpSocket::bind(format!("{}:0", ns.host_ip)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let q = query_msg("cluster.", RecordType::SOA, Some(1232));
        let mut buf = [0u8; 4096];
        let up = eventually(Duration::from_secs(10), || {
            sock.send_to(&q, server).is_ok() && sock.recv(&mut buf).is_ok()
        });
        assert!(up, "rollcall in the namespace does not answer");
        while sock.recv(&mut buf).is_ok() {}
        // 300 q/s for 3 s from one neighbour (well over the 200/s limit), answers read as
        // they come (a socket buffer holds only a few hundred datagrams).
        let sent = 900;
        let (mut full, mut truncated) = (0, 0);
        let mut count = |n: usize, buf: &[u8]| match Message::from_vec(&buf[..n]) {
            Ok(m) if m.metadata.truncation => truncated += 1,
            Ok(_) => full += 1,
            Err(_) => {}
        };
        sock.set_nonblocking(true).unwrap();
        let start = Instant::now();
        for i in 0..sent {
            let due = start + Duration::from_micros(i as u64 * 3333);
            while Instant::now() < due {
                match sock.recv(&mut buf) {
                    Ok(n) => count(n, &buf),
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
            sock.send_to(&q, server).unwrap();
        }
        sock.set_nonblocking(false).unwrap();
        while let Ok(n) = sock.recv(&mut buf) {
            count(n, &buf);
        }
        drop(child);
        (full, truncated)
    };
    let (full, truncated) = run(&[]);
    assert_eq!(
        (full, truncated),
        (900, 0),
        "the default held back the served network's queries"
    );
    let (full, _) = run(&["--rate-limit-exempt", "none"]);
    assert!(
        full < 800,
        "with no exemption 300 q/s should be limited: {full} full answers"
    );
}
