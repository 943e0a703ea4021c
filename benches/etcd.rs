//! etcd mode against the embedded server, measured side by side on this machine
//! (`cargo bench --bench etcd`; needs etcd, etcdctl and, for the DNS figure, dnsperf):
//!
//! 1. registration -> visible: a PUT through one of three servers until its A record is in the
//!    DNS of the server that answered (the PUT's own latency: read-your-writes) and of all
//!    three; p50 / p99 / max over 300 registrations;
//! 2. renewals per second through one server (unchanged PUTs, 8 clients): etcd mode vs the
//!    embedded server, run alternately three times, medians;
//! 3. DNS queries per second on one core (one UDP thread, as the tests' servers run; dnsperf): etcd mode vs embedded,
//!    alternately three times, medians (the same snapshot path: expect no difference);
//! 4. a new server joining a cluster that holds 10,000 nodes: start until `/readyz` is 200
//!    and its DNS answers the last node;
//! 5. a silent node (ttl 2 s) until it is gone from all three servers, and the same with the
//!    etcd leader killed right after its last renewal.
//!
//! Real processes on loopback: a three-member etcd cluster (heartbeat 50 ms, election 500 ms,
//! --unsafe-no-fsync as in the tests) and the release binary. Prints a table; asserts nothing.
//! Under `cargo test --all-targets` it runs as a quick smoke test with tiny numbers.

#[path = "../tests/util/mod.rs"]
mod util;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use util::etcd::{serve, EtcdCluster};
use util::{eventually, http, query_msg, udp_raw, ServeProc};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn in_dns(dns: std::net::SocketAddr, name: &str) -> bool {
    udp_raw(dns, &query_msg(name, RecordType::A, None))
        .is_some_and(|r| r.len() > 12 && r[3] & 0x0f == 0 && u16::from_be_bytes([r[6], r[7]]) > 0)
}

fn put(client: &reqwest::blocking::Client, api: &str, role: &str, node: &str, ip: &str) -> u16 {
    client
        .put(format!("{api}/v1/roles/{role}/nodes/{node}"))
        .body(format!(r#"{{"addr":"{ip}","ttl":600}}"#))
        .send()
        .map_or(0, |r| r.status().as_u16())
}

fn put_ttl(
    client: &reqwest::blocking::Client,
    api: &str,
    role: &str,
    node: &str,
    ip: &str,
    ttl: u32,
) -> u16 {
    client
        .put(format!("{api}/v1/roles/{role}/nodes/{node}"))
        .body(format!(r#"{{"addr":"{ip}","ttl":{ttl}}}"#))
        .send()
        .map_or(0, |r| r.status().as_u16())
}

fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

/// Unchanged PUTs of `nodes` pre-registered nodes by 8 clients for `secs`: renewals/s.
fn renewals_per_sec(api: &str, nodes: usize, secs: f64) -> f64 {
    let client = http();
    for i in 0..nodes {
        assert_eq!(put(&client, api, "renew", &format!("n{i}"), &ip(i)), 200);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (stop, done, api) = (stop.clone(), done.clone(), api.to_owned());
            std::thread::spawn(move || {
                let client = http();
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let n = i % nodes;
                    if put(&client, &api, "renew", &format!("n{n}"), &ip(n)) == 200 {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 8;
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

/// dnsperf against `dns` for `secs`: queries per second answered.
fn dnsperf(dns: std::net::SocketAddr, queries: &std::path::Path, secs: u32) -> Option<f64> {
    let out = Command::new("dnsperf")
        .args(["-s", &dns.ip().to_string(), "-p", &dns.port().to_string()])
        .arg("-d")
        .arg(queries)
        .args(["-l", &secs.to_string(), "-c", "4", "-T", "2", "-q", "200"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.contains("Queries per second:"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (regs, renew_secs, reps, big) = if full {
        (300, 5.0, 3, 10_000)
    } else {
        (5, 0.3, 1, 50)
    };
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(dir.path(), 3);
    let servers: Vec<ServeProc> = (0..3)
        .map(|i| serve(dir.path(), &format!("s{i}"), &etcd.endpoints_from(i), &[]))
        .collect();
    let client = http();

    // 1. Registration -> visible.
    let (mut own, mut all) = (Vec::new(), Vec::new());
    for i in 0..regs {
        let s = &servers[i % 3];
        let name = format!("v{i}.vis.cluster.");
        let t0 = Instant::now();
        assert_eq!(put(&client, &s.api(), "vis", &format!("v{i}"), &ip(i)), 200);
        let answered = t0.elapsed();
        assert!(in_dns(s.dns, &name), "read-your-writes broken");
        own.push(answered);
        let mut pending: Vec<_> = servers.iter().map(|s| s.dns).collect();
        while !pending.is_empty() {
            pending.retain(|d| !in_dns(*d, &name));
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "not visible everywhere"
            );
        }
        all.push(t0.elapsed());
    }
    own.sort();
    all.sort();

    // 2. Renewals per second, etcd vs embedded, alternately.
    let embedded = ServeProc::start(
        &dir.path().join("embedded"),
        &dir.path().join("no-zones"),
        &[],
    );
    let (mut r_etcd, mut r_emb) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        r_etcd.push(renewals_per_sec(&servers[0].api(), 100, renew_secs));
        r_emb.push(renewals_per_sec(&embedded.api(), 100, renew_secs));
    }

    // 3. DNS QPS on one core, etcd vs embedded (the same 100 names on both).
    for i in 0..100 {
        assert_eq!(
            put(&client, &embedded.api(), "dns", &format!("d{i}"), &ip(i)),
            200
        );
        assert_eq!(
            put(&client, &servers[0].api(), "dns", &format!("d{i}"), &ip(i)),
            200
        );
    }
    let qfile = dir.path().join("queries");
    let mut q = String::new();
    for i in 0..100 {
        q.push_str(&format!("d{i}.dns.cluster. A\ndns.cluster. A\n"));
    }
    std::fs::write(&qfile, q).unwrap();
    let (mut q_etcd, mut q_emb) = (Vec::new(), Vec::new());
    let have_dnsperf = Command::new("dnsperf").arg("-h").output().is_ok();
    if have_dnsperf {
        let secs = if full { 3 } else { 1 };
        for _ in 0..reps {
            q_etcd.extend(dnsperf(servers[0].dns, &qfile, secs));
            q_emb.extend(dnsperf(embedded.dns, &qfile, secs));
        }
    }

    // 4. A new server joining a cluster with `big` nodes.
    let fillers: Vec<_> = (0..8)
        .map(|t| {
            let apis: Vec<String> = servers.iter().map(|s| s.api()).collect();
            std::thread::spawn(move || {
                let client = http();
                let mut i = t;
                while i < big {
                    assert_eq!(
                        put(&client, &apis[i % 3], "big", &format!("b{i}"), &ip(i)),
                        200
                    );
                    i += 8;
                }
            })
        })
        .collect();
    for f in fillers {
        f.join().unwrap();
    }
    let t0 = Instant::now();
    let joiner = ServeProc::start(
        &dir.path().join("joiner"),
        &dir.path().join("no-zones"),
        &["--etcd", &etcd.endpoints()],
    );
    let listening = t0.elapsed();
    assert!(eventually(Duration::from_secs(60), || {
        http()
            .get(format!("{}/readyz", joiner.api()))
            .send()
            .is_ok_and(|r| r.status().is_success())
    }));
    let ready = t0.elapsed();
    let last = format!("b{}.big.cluster.", big - 1);
    assert!(eventually(Duration::from_secs(30), || in_dns(
        joiner.dns, &last
    )));
    let answering = t0.elapsed();

    // 5. Expiry of a silent node: plain, and across an etcd leader change.
    let mut etcd = etcd;
    let mut silent = |node: &str, kill_leader: bool| -> Duration {
        assert_eq!(
            put_ttl(&client, &servers[0].api(), "exp", node, "10.9.9.9", 2),
            200
        );
        let last = Instant::now();
        if kill_leader {
            let l = etcd.wait_leader(Duration::from_secs(5));
            etcd.kill(l);
        }
        let name = format!("{node}.exp.cluster.");
        let dnss: Vec<_> = servers.iter().map(|s| s.dns).collect();
        while dnss.iter().any(|d| in_dns(*d, &name)) {
            assert!(last.elapsed() < Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(5));
        }
        last.elapsed()
    };
    let plain: Vec<Duration> = (0..reps).map(|i| silent(&format!("p{i}"), false)).collect();
    let across = silent("l0", true);

    println!(
        "\netcd mode, 3 servers over a 3-member etcd cluster ({} run)",
        if full { "full" } else { "smoke" }
    );
    println!("| figure | p50 | p99 | max |");
    println!("|---|---|---|---|");
    println!(
        "| PUT -> 200 (visible in the answering server's DNS), {regs} registrations | {:?} | {:?} | {:?} |",
        pct(&own, 0.5),
        pct(&own, 0.99),
        own.last().unwrap()
    );
    println!(
        "| PUT -> visible in all three servers' DNS | {:?} | {:?} | {:?} |",
        pct(&all, 0.5),
        pct(&all, 0.99),
        all.last().unwrap()
    );
    println!("\n| figure | etcd mode | embedded | ratio |");
    println!("|---|---|---|---|");
    let (re, rm) = (median(r_etcd.clone()), median(r_emb.clone()));
    println!(
        "| renewals/s through one server, 8 clients (median of {reps}: {r_etcd:.0?} vs {r_emb:.0?}) | {re:.0} | {rm:.0} | {:.2} |",
        re / rm
    );
    if have_dnsperf && !q_etcd.is_empty() && !q_emb.is_empty() {
        let (qe, qm) = (median(q_etcd.clone()), median(q_emb.clone()));
        println!(
            "| DNS QPS, one UDP thread (median of {reps}: {q_etcd:.0?} vs {q_emb:.0?}) | {qe:.0} | {qm:.0} | {:.2} |",
            qe / qm
        );
    } else {
        println!("| DNS QPS | dnsperf not installed: not measured | | |");
    }
    println!(
        "\nsilent node (ttl 2 s) gone from all three servers after its last renewal: {plain:?}; \
         with the etcd leader killed right after the renewal: {across:?}"
    );
    println!(
        "\nnew server joining {big} nodes: listening after {listening:?}, /readyz 200 after {ready:?}, DNS has the last node after {answering:?}"
    );
    drop(joiner);
    drop(embedded);
    drop(servers);
}
