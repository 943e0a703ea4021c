//! The red team's read attack (2026-12): a thousand blocking GETs on a 20,000-node role, woken
//! together by one change, used to copy the role inside the registry writer once per request
//! (400 of them needed more than 1 GB: OOM-killed in 4 s, DNS down with it). Now readers share
//! the published snapshot and stream it a chunk at a time: the real binary's peak RSS is
//! measured while a thousand such answers are in flight, with DNS answering throughout.

#[path = "util/mod.rs"]
mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::rr::RecordType;
use util::*;

fn status_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_thousand_blocking_gets_on_a_twenty_thousand_node_role_stay_in_bounded_memory() {
    let zones = tempfile::tempdir().unwrap();
    let server = ServeProc::start(
        std::path::Path::new(""),
        zones.path(),
        &["--max-waits-per-client", "5000"],
    );
    let api = server.api();
    let pid = server.child.id();

    // 20,000 nodes, registered by 250 keep-alive clients (so that the writer takes big batches:
    // every batch that touches the role rebuilds all of its DNS data, see the README).
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..250)
        .map(|_| {
            let (api, next) = (api.clone(), next.clone());
            std::thread::spawn(move || {
                let client = http();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= 20_000 {
                        break;
                    }
                    let body = format!(
                        r#"{{"addr":"10.{}.{}.{}","port":8080,"ttl":3600,"meta":{{"version":"1.2.3"}}}}"#,
                        i / 65536,
                        (i / 256) % 256,
                        i % 256
                    );
                    let r = client
                        .put(format!("{api}/v1/roles/big/nodes/n{i}"))
                        .body(body)
                        .send()
                        .unwrap();
                    assert_eq!(r.status(), 200);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let index: u64 = http()
        .get(format!("{api}/v1/roles/big"))
        .send()
        .unwrap()
        .headers()["x-rollcall-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let rss_before = status_kb(pid, "VmRSS:");

    // 1,000 blocking queries on the role, each on its own connection with a small receive
    // buffer, reading nothing until the end.
    let mut waiters = Vec::new();
    for _ in 0..1000 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(16 * 1024).unwrap();
        s.connect(&server.http.into()).unwrap();
        let mut s: TcpStream = s.into();
        write!(
            s,
            "GET /v1/roles/big?index={index}&wait=60s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        .unwrap();
        waiters.push(s);
    }
    std::thread::sleep(Duration::from_secs(1));
    // One change wakes them all.
    let r = http()
        .put(format!("{api}/v1/roles/big/nodes/n0"))
        .body(r#"{"addr":"10.200.0.1","ttl":3600}"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    std::thread::sleep(Duration::from_secs(3));
    // DNS answers throughout, over UDP and TCP.
    for _ in 0..20 {
        let m = udp_query(server.dns, "n7.big.cluster.", RecordType::A, None);
        assert_eq!(m.answers.len(), 1);
        let m = tcp_query(server.dns, "big.cluster.", RecordType::A);
        assert!(m.answers.len() > 3000, "{}", m.answers.len());
    }
    let rss_during = status_kb(pid, "VmRSS:");
    let peak = status_kb(pid, "VmHWM:");

    // Every waiter got its answer started: a 200 with the new index.
    for s in &mut waiters {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head = [0u8; 256];
        let mut got = 0;
        while got < 64 {
            let n = s.read(&mut head[got..]).unwrap();
            assert!(n > 0, "closed before the answer");
            got += n;
        }
        let text = String::from_utf8_lossy(&head[..got]);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }
    eprintln!(
        "1000 blocking GETs woken on a 20,000-node role: RSS {} MB before, {} MB during, peak {} MB",
        rss_before / 1024,
        rss_during / 1024,
        peak / 1024
    );
    assert!(peak < 300 * 1024, "peak RSS {} MB", peak / 1024);
    drop(waiters);
}
