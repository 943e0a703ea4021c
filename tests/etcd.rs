//! System tests of etcd mode: a real three-member etcd cluster (Debian's etcd 3.4.23, on
//! loopback ports picked per test) and three `rollcall serve --etcd` processes, with real
//! agents (`rollcall register`), real DNS over UDP and the HTTP API.
//!
//! "Never disappears" is checked by polling DNS every 20–50 ms for the whole window; bounds
//! on timing are generous ceilings (the machines are shared), the figures for the README
//! come from `benches/etcd.rs`.

#[path = "util/mod.rs"]
mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use util::etcd::{serve, signal_proc, wait_ready, EtcdCluster};
use util::{eventually, http, metric, query_msg, role_nodes, rollcall_bin, udp_raw, ServeProc};

struct Three {
    dir: tempfile::TempDir,
    etcd: EtcdCluster,
    s: Vec<ServeProc>,
}

/// Three members, three servers; server i lists the members starting with member i.
fn three() -> Three {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(dir.path(), 3);
    let s = (0..3)
        .map(|i| serve(dir.path(), &format!("s{i}"), &etcd.endpoints_from(i), &[]))
        .collect();
    Three { dir, etcd, s }
}

fn put(api: &str, role: &str, node: &str, body: &str) -> (u16, serde_json::Value) {
    match http()
        .put(format!("{api}/v1/roles/{role}/nodes/{node}"))
        .body(body.to_owned())
        .timeout(Duration::from_secs(10))
        .send()
    {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().unwrap_or_default())
        }
        Err(e) => (0, serde_json::json!({ "error": e.to_string() })),
    }
}

fn delete(api: &str, role: &str, node: &str) -> u16 {
    http()
        .delete(format!("{api}/v1/roles/{role}/nodes/{node}"))
        .timeout(Duration::from_secs(10))
        .send()
        .map_or(0, |r| r.status().as_u16())
}

/// The A records of `name` on `dns`, or None when the server did not answer NOERROR.
fn a(dns: SocketAddr, name: &str) -> Option<BTreeSet<String>> {
    let raw = udp_raw(dns, &query_msg(name, RecordType::A, None))?;
    let m = Message::from_vec(&raw).ok()?;
    match m.metadata.response_code {
        ResponseCode::NoError => Some(util::addrs(&m).into_iter().collect()),
        ResponseCode::NXDomain => Some(BTreeSet::new()),
        _ => None,
    }
}

fn has(dns: SocketAddr, name: &str, ip: &str) -> bool {
    a(dns, name).is_some_and(|s| s.contains(ip))
}

fn soa_serial(dns: SocketAddr) -> u32 {
    let raw = udp_raw(dns, &query_msg("cluster.", RecordType::SOA, None)).unwrap();
    let m = Message::from_vec(&raw).unwrap();
    match &m.answers[0].data {
        hickory_proto::rr::RData::SOA(soa) => soa.serial,
        other => panic!("not a SOA: {other:?}"),
    }
}

fn status_of(api: &str, path: &str) -> u16 {
    http()
        .get(format!("{api}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .map_or(0, |r| r.status().as_u16())
}

/// Polls `dns` for `ip` under `name` every 20 ms in a thread until stopped; counts misses.
struct Watcher {
    stop: Arc<AtomicBool>,
    misses: Arc<AtomicUsize>,
    polls: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Watcher {
    fn start(dns: SocketAddr, name: &str, ip: &str) -> Watcher {
        let (stop, misses, polls) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (s, m, p) = (stop.clone(), misses.clone(), polls.clone());
        let (name, ip) = (name.to_owned(), ip.to_owned());
        let start = Instant::now();
        let thread = std::thread::spawn(move || {
            let mut notes = Vec::new();
            while !s.load(Ordering::Relaxed) {
                p.fetch_add(1, Ordering::Relaxed);
                match a(dns, &name) {
                    Some(set) if set.contains(&ip) => {}
                    other => {
                        m.fetch_add(1, Ordering::Relaxed);
                        notes.push(format!("{:?}: {other:?}", start.elapsed()));
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            notes
        });
        Watcher {
            stop,
            misses,
            polls,
            thread: Some(thread),
        }
    }

    /// Stops; returns (misses, polls, notes).
    fn finish(mut self) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let notes = self.thread.take().unwrap().join().unwrap();
        (
            self.misses.load(Ordering::Relaxed),
            self.polls.load(Ordering::Relaxed),
            notes,
        )
    }
}

/// `rollcall register` with `--api` over several servers; stderr lines go to a channel.
struct Agent {
    child: Child,
    log: mpsc::Receiver<String>,
}

impl Agent {
    fn start(apis: &[&ServeProc], node: &str, ip: &str, ttl: u32) -> Agent {
        let apis: Vec<String> = apis.iter().map(|s| s.api()).collect();
        let mut child = Command::new(rollcall_bin())
            .args(["register", "--api", &apis.join(","), "--role", "app"])
            .args(["--node", node, "--addr", ip, "--ttl", &ttl.to_string()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        let name = node.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
                let _ = tx.send(line);
            }
        });
        Agent { child, log: rx }
    }

    fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .log
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!("the agent logged no {needle:?} within {timeout:?}"),
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_registration_is_visible_on_every_server_and_renews_through_any() {
    let t = three();
    let (s1, s2, s3) = (&t.s[0], &t.s[1], &t.s[2]);

    // Read-your-writes on the server that answered: in its DNS when the 200 arrives.
    let (code, body) = put(&s1.api(), "app", "n1", r#"{"addr":"10.1.0.1","ttl":30}"#);
    assert_eq!(code, 200, "{body}");
    assert!(
        has(s1.dns, "app.cluster.", "10.1.0.1"),
        "not in S1's DNS at once"
    );
    for s in [s2, s3] {
        assert!(
            eventually(Duration::from_secs(2), || has(
                s.dns,
                "app.cluster.",
                "10.1.0.1"
            )),
            "not on {} within 2 s",
            s.api()
        );
    }

    // Index and serial are the same everywhere for the same state.
    let idx = |s: &ServeProc| {
        http()
            .get(format!("{}/v1/roles/app", s.api()))
            .send()
            .unwrap()
            .headers()["x-rollcall-index"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert!(eventually(Duration::from_secs(2), || {
        idx(s1) == idx(s2) && idx(s2) == idx(s3)
    }));
    assert!(eventually(Duration::from_secs(2), || {
        soa_serial(s1.dns) == soa_serial(s2.dns) && soa_serial(s2.dns) == soa_serial(s3.dns)
    }));
    let before = soa_serial(s1.dns);

    // A blocking query on S2 wakes for a write through S3.
    let i = idx(s2);
    let waiter = {
        let api = s2.api();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let v: serde_json::Value = http()
                .get(format!("{api}/v1/roles/app?index={i}&wait=10s"))
                .send()
                .unwrap()
                .json()
                .unwrap();
            (t0.elapsed(), v)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        put(&s3.api(), "app", "n2", r#"{"addr":"10.1.0.2","ttl":2}"#).0,
        200
    );
    let (took, v) = waiter.join().unwrap();
    assert!(
        took < Duration::from_secs(5),
        "blocking query took {took:?}"
    );
    assert!(v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["node"] == "n2"));
    assert!(soa_serial(s1.dns) > before || soa_serial(s2.dns) > before);

    // n2 (ttl 2) renewed through S2 and S3 in turn: present everywhere throughout.
    let watchers: Vec<Watcher> =
        t.s.iter()
            .map(|s| Watcher::start(s.dns, "app.cluster.", "10.1.0.2"))
            .collect();
    let mut last_renewal = Instant::now();
    for k in 0..8 {
        std::thread::sleep(Duration::from_millis(500));
        let via = if k % 2 == 0 { s2 } else { s3 };
        let (code, body) = put(&via.api(), "app", "n2", r#"{"addr":"10.1.0.2","ttl":2}"#);
        assert_eq!(code, 200, "renewal through {}: {body}", via.api());
        last_renewal = Instant::now();
    }
    for w in watchers {
        let (misses, polls, notes) = w.finish();
        assert_eq!(
            misses, 0,
            "n2 missing in {misses} of {polls} polls: {notes:?}"
        );
    }
    // Renewals stop: gone from every server within ttl + the lessor tick + a margin.
    let stopped = last_renewal;
    for s in &t.s {
        assert!(
            eventually(Duration::from_secs(5), || !has(
                s.dns,
                "app.cluster.",
                "10.1.0.2"
            )),
            "n2 still on {} 5 s after its last renewal",
            s.api()
        );
    }
    eprintln!(
        "n2 gone everywhere {:?} after its last renewal (ttl 2 s)",
        stopped.elapsed()
    );
    assert!(has(s3.dns, "app.cluster.", "10.1.0.1"));
    // etcd raises a ttl below its minimum; the API reports what was granted.
    let (code, body) = put(&s2.api(), "app", "n3", r#"{"addr":"10.1.0.3","ttl":1}"#);
    assert_eq!(code, 200);
    assert!(body["ttl"].as_u64().unwrap() >= 1);
    assert_eq!(delete(&s3.api(), "app", "n3"), 204);
    assert!(
        !has(s3.dns, "app.cluster.", "10.1.0.3"),
        "a DELETE is visible at once on the server that answered"
    );
    assert_eq!(delete(&s1.api(), "app", "n3"), 404);
}

#[test]
fn agents_fail_over_and_a_stale_close_removes_nothing() {
    let t = three();
    let (s1, s2, s3) = (&t.s[0], &t.s[1], &t.s[2]);

    // 1. Agent killed: its session closes, the lease is revoked, gone everywhere at once.
    let mut gone = Agent::start(&[s1, s2, s3], "k1", "10.2.0.1", 5);
    gone.wait_log("holding a session", Duration::from_secs(10));
    for s in &t.s {
        assert!(eventually(Duration::from_secs(2), || has(
            s.dns,
            "app.cluster.",
            "10.2.0.1"
        )));
    }
    gone.child.kill().unwrap();
    let t0 = Instant::now();
    for s in &t.s {
        assert!(
            eventually(Duration::from_secs(2), || !has(
                s.dns,
                "app.cluster.",
                "10.2.0.1"
            )),
            "a killed agent's node stays on {} (its ttl is 5 s: the session close must remove it)",
            s.api()
        );
    }
    eprintln!(
        "killed agent gone from all three servers after {:?}",
        t0.elapsed()
    );
    drop(gone);

    // 2. The server holding the session frozen (SIGSTOP): the agent moves on, the node never
    //    leaves the other servers' DNS; then the frozen server wakes and its late close of the
    //    old session removes nothing.
    let agent = Agent::start(&[s1, s2, s3], "f1", "10.2.0.2", 3);
    agent.wait_log("holding a session", Duration::from_secs(10));
    for s in [s2, s3] {
        assert!(eventually(Duration::from_secs(2), || has(
            s.dns,
            "app.cluster.",
            "10.2.0.2"
        )));
    }
    let w2 = Watcher::start(s2.dns, "app.cluster.", "10.2.0.2");
    let w3 = Watcher::start(s3.dns, "app.cluster.", "10.2.0.2");
    signal_proc(s1, libc::SIGSTOP);
    agent.wait_log(
        "moving to the next rollcall server",
        Duration::from_secs(10),
    );
    agent.wait_log("holding a session", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(4)); // more than the ttl: renewed through S2
    signal_proc(s1, libc::SIGCONT);
    std::thread::sleep(Duration::from_secs(4)); // S1's stale close has run by now
    for (name, w) in [("S2", w2), ("S3", w3)] {
        let (misses, polls, notes) = w.finish();
        assert_eq!(
            misses, 0,
            "f1 left {name}'s DNS in {misses} of {polls} polls: {notes:?}"
        );
    }
    assert!(eventually(Duration::from_secs(3), || has(
        s1.dns,
        "app.cluster.",
        "10.2.0.2"
    )));
    let node = role_nodes(&s3.api(), "app").unwrap();
    assert_eq!(node["f1"]["session"], true, "{node:?}");
}

#[test]
fn killing_the_server_that_holds_a_session_loses_nothing() {
    let mut t = three();
    let agent = Agent::start(&[&t.s[0], &t.s[1], &t.s[2]], "h1", "10.3.0.1", 3);
    agent.wait_log("holding a session", Duration::from_secs(10));
    for s in &t.s {
        assert!(eventually(Duration::from_secs(2), || has(
            s.dns,
            "app.cluster.",
            "10.3.0.1"
        )));
    }
    let w2 = Watcher::start(t.s[1].dns, "app.cluster.", "10.3.0.1");
    let w3 = Watcher::start(t.s[2].dns, "app.cluster.", "10.3.0.1");
    let s1 = t.s.remove(0);
    signal_proc(&s1, libc::SIGKILL);
    agent.wait_log("moving to the next rollcall server", Duration::from_secs(5));
    agent.wait_log("holding a session", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(6)); // two ttls on the new server
    for (name, w) in [("S2", w2), ("S3", w3)] {
        let (misses, polls, notes) = w.finish();
        assert_eq!(
            misses, 0,
            "h1 left {name}'s DNS in {misses} of {polls} polls: {notes:?}"
        );
    }
    drop(s1);
}

#[test]
fn losing_the_etcd_leader_under_load_fails_no_query_and_loses_no_node() {
    let mut t = three();
    let apis: Vec<String> = t.s.iter().map(|s| s.api()).collect();
    let dnss: Vec<SocketAddr> = t.s.iter().map(|s| s.dns).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let errors = Arc::new(Mutex::new(Vec::new()));
    // A node in place before: queried throughout.
    assert_eq!(
        put(
            &apis[0],
            "load",
            "base",
            r#"{"addr":"10.4.0.254","ttl":30}"#
        )
        .0,
        200
    );

    // Writers: new registrations and renewals through every server.
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let (apis, stop, acked, errors) =
                (apis.clone(), stop.clone(), acked.clone(), errors.clone());
            std::thread::spawn(move || {
                let mut k = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let node = format!("w{w}-{k}");
                    let api = &apis[(k as usize + w) % 3];
                    let t0 = Instant::now();
                    let (code, body) = put(
                        api,
                        "load",
                        &node,
                        &format!(r#"{{"addr":"10.4.{w}.{}","ttl":30}}"#, k % 250 + 1),
                    );
                    if code == 200 {
                        acked.lock().unwrap().insert(node.clone());
                        // and renew the previous one through another server
                        if k > 0 {
                            let prev = format!("w{w}-{}", k - 1);
                            let _ = put(
                                &apis[(k as usize + w + 1) % 3],
                                "load",
                                &prev,
                                &format!(r#"{{"addr":"10.4.{w}.{}","ttl":30}}"#, (k - 1) % 250 + 1),
                            );
                        }
                    } else {
                        errors
                            .lock()
                            .unwrap()
                            .push((code, t0.elapsed(), body.to_string()));
                    }
                    k += 1;
                    std::thread::sleep(Duration::from_millis(30));
                }
            })
        })
        .collect();
    // Readers: every server, all the time.
    let readers: Vec<_> = dnss
        .iter()
        .map(|&dns| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut bad) = (0, Vec::new());
                let t0 = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    match a(dns, "base.load.cluster.") {
                        Some(s) if s.contains("10.4.0.254") => ok += 1,
                        other => bad.push(format!("{:?}: {other:?}", t0.elapsed())),
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                (ok, bad)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let leader = t.etcd.wait_leader(Duration::from_secs(5));
    eprintln!("killing etcd leader m{}", leader + 1);
    let killed = Instant::now();
    t.etcd.kill(leader);
    let new_leader = t.etcd.wait_leader(Duration::from_secs(10));
    eprintln!(
        "new leader m{} after {:?}",
        new_leader + 1,
        killed.elapsed()
    );
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    for (i, r) in readers.into_iter().enumerate() {
        let (ok, bad) = r.join().unwrap();
        assert!(
            bad.is_empty(),
            "S{}: {} failed DNS queries of {}: {bad:?}",
            i + 1,
            bad.len(),
            ok + bad.len()
        );
        eprintln!("S{}: {ok} DNS queries answered, none failed", i + 1);
    }
    let errors = errors.lock().unwrap();
    eprintln!("write errors during the election: {errors:?}");
    for (code, took, body) in errors.iter() {
        assert_eq!(*code, 503, "only 503s while etcd elects a leader: {body}");
        assert!(
            *took < Duration::from_secs(4),
            "a write took {took:?} to fail"
        );
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "only {} writes acknowledged", acked.len());
    // Writes are back after the election, and no acknowledged node is lost on any server.
    assert_eq!(
        put(&apis[1], "load", "after", r#"{"addr":"10.4.9.9","ttl":30}"#).0,
        200
    );
    for api in &apis {
        assert!(
            eventually(Duration::from_secs(3), || {
                role_nodes(api, "load").is_some_and(|n| acked.iter().all(|k| n.contains_key(k)))
            }),
            "{api} lost acknowledged nodes"
        );
    }
}

#[test]
fn quorum_loss_keeps_dns_and_refuses_writes_then_recovers() {
    let mut t = three();
    let apis: Vec<String> = t.s.iter().map(|s| s.api()).collect();
    for k in 0..5 {
        let (code, body) = put(
            &apis[k % 3],
            "q",
            &format!("n{k}"),
            &format!(r#"{{"addr":"10.5.0.{}","ttl":5}}"#, k + 1),
        );
        assert_eq!(code, 200, "{body}");
    }
    let want: BTreeSet<String> = (1..=5).map(|k| format!("10.5.0.{k}")).collect();
    for s in &t.s {
        assert!(eventually(Duration::from_secs(2), || a(
            s.dns,
            "q.cluster."
        )
        .as_ref()
            == Some(&want)));
    }
    // Two of three members gone: no quorum.
    t.etcd.kill(1);
    t.etcd.kill(2);
    let t0 = Instant::now();
    let (code, body) = {
        let r = http()
            .put(format!("{}/v1/roles/q/nodes/new", apis[0]))
            .body(r#"{"addr":"10.5.0.9","ttl":5}"#)
            .send()
            .unwrap();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        (r.status().as_u16(), (retry, r.text().unwrap()))
    };
    let took = t0.elapsed();
    assert_eq!(code, 503, "{body:?}");
    assert_eq!(body.0.as_deref(), Some("1"), "503 carries Retry-After");
    assert!(body.1.contains("etcd"), "the error says why: {}", body.1);
    assert!(took < Duration::from_millis(3500), "the 503 took {took:?}");
    eprintln!("PUT without quorum: 503 after {took:?}");
    // Renewals are refused the same way, and nothing registered leaves DNS: for longer than
    // the leases (5 s), on every server.
    let (code, _) = put(&apis[1], "q", "n1", r#"{"addr":"10.5.0.2","ttl":5}"#);
    assert_eq!(code, 503);
    let until = Instant::now() + Duration::from_secs(8);
    let mut polls = 0;
    while Instant::now() < until {
        for s in &t.s {
            assert_eq!(
                a(s.dns, "q.cluster.").as_ref(),
                Some(&want),
                "DNS changed without quorum on {}",
                s.api()
            );
            polls += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("{polls} DNS polls without quorum: all answered the last known set");
    for api in &apis {
        assert_eq!(status_of(api, "/readyz"), 503);
        assert_eq!(status_of(api, "/healthz"), 200);
        assert_eq!(metric(api, "rollcall_etcd_up"), 0.0);
    }
    // Quorum back: writes resume, nothing was lost (etcd restarts every lease at full TTL on a
    // new leader).
    t.etcd.restart(1);
    t.etcd.restart(2);
    t.etcd.wait_leader(Duration::from_secs(20));
    let back = Instant::now();
    assert!(eventually(Duration::from_secs(15), || put(
        &apis[2],
        "q",
        "new",
        r#"{"addr":"10.5.0.9","ttl":5}"#
    )
    .0 == 200));
    eprintln!("writes back {:?} after the leader", back.elapsed());
    for (k, api) in apis.iter().enumerate() {
        assert_eq!(
            put(
                api,
                "q",
                &format!("n{k}"),
                &format!(r#"{{"addr":"10.5.0.{}","ttl":5}}"#, k + 1)
            )
            .0,
            200
        );
    }
    let mut want = want;
    want.insert("10.5.0.9".into());
    for s in &t.s {
        assert!(
            eventually(Duration::from_secs(5), || a(s.dns, "q.cluster.").as_ref()
                == Some(&want)),
            "{}: {:?}",
            s.api(),
            a(s.dns, "q.cluster.")
        );
        wait_ready(s, Duration::from_secs(5));
    }
}

#[test]
fn a_server_that_missed_a_compacted_history_lists_again_and_agrees() {
    let mut t = three();
    let apis: Vec<String> = t.s.iter().map(|s| s.api()).collect();
    for k in 0..50 {
        assert_eq!(
            put(
                &apis[0],
                "c",
                &format!("n{k}"),
                &format!(r#"{{"addr":"10.6.0.{}","ttl":60}}"#, k + 1)
            )
            .0,
            200
        );
    }
    // S2 watches member m2 (its first endpoint). Freeze S2, take m2 away, change a lot,
    // compact past everything S2 has seen.
    signal_proc(&t.s[1], libc::SIGSTOP);
    t.etcd.kill(1);
    t.etcd.wait_leader(Duration::from_secs(10));
    for k in 0..50 {
        if k % 2 == 0 {
            assert_eq!(delete(&apis[0], "c", &format!("n{k}")), 204);
        }
    }
    for k in 50..150 {
        assert_eq!(
            put(
                &apis[2],
                "c",
                &format!("n{k}"),
                &format!(r#"{{"addr":"10.6.1.{}","ttl":60}}"#, k - 49)
            )
            .0,
            200
        );
    }
    let rev = t.etcd.revision();
    t.etcd
        .ctl(&["compact", &rev.to_string()])
        .expect("etcdctl compact");
    signal_proc(&t.s[1], libc::SIGCONT);
    assert!(
        eventually(Duration::from_secs(10), || metric(
            &apis[1],
            "rollcall_etcd_relists_total{reason=\"compacted\"}"
        ) >= 1.0),
        "S2 did not list again after the compaction"
    );
    let want = role_nodes(&apis[0], "c").unwrap();
    assert_eq!(want.len(), 125);
    assert!(eventually(Duration::from_secs(5), || {
        role_nodes(&apis[1], "c").is_some_and(|n| n.keys().eq(want.keys()))
    }));
    assert_eq!(a(t.s[1].dns, "c.cluster."), a(t.s[0].dns, "c.cluster."));
    for k in [0, 1, 49, 50, 149] {
        let name = format!("n{k}.c.cluster.");
        assert_eq!(a(t.s[1].dns, &name), a(t.s[0].dns, &name), "{name}");
    }
}

#[test]
fn no_acknowledged_registration_is_lost_when_servers_crash() {
    let mut t = three();
    let urls: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(t.s.iter().map(|s| s.api()).collect()));
    let stop = Arc::new(AtomicBool::new(false));
    let fates = Arc::new(Mutex::new(BTreeMap::<String, bool>::new())); // node -> registered
    let unknown = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (urls, stop, fates, unknown) =
                (urls.clone(), stop.clone(), fates.clone(), unknown.clone());
            std::thread::spawn(move || {
                let mut k = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let api = urls.lock().unwrap()[(k + w) % 3].clone();
                    let node = format!("w{w}-{}", k / 2);
                    if k % 6 == 5 {
                        // delete an earlier one
                        let old = format!("w{w}-{}", k / 4);
                        match delete(&api, "crash", &old) {
                            204 => {
                                fates.lock().unwrap().insert(old, false);
                            }
                            // No answer or a 5xx (the server was killed mid-request, or lost
                            // etcd): the delete may or may not have been committed. Its fate is
                            // unknown, so the node is checked no more (acknowledged writes only).
                            0 | 500..=599 => {
                                fates.lock().unwrap().remove(&old);
                                unknown.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {}
                        }
                    } else if put(
                        &api,
                        "crash",
                        &node,
                        &format!(r#"{{"addr":"10.7.{w}.{}","ttl":60}}"#, k % 250 + 1),
                    )
                    .0 == 200
                    {
                        fates.lock().unwrap().insert(node, true);
                    }
                    k += 1;
                }
            })
        })
        .collect();
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        let victim = round % 3;
        let _ = t.s[victim].child.kill(); // SIGKILL, reaped (its data dir lock goes with it)
        let _ = t.s[victim].child.wait();
        let name = format!("s{victim}");
        let fresh = serve(t.dir.path(), &name, &t.etcd.endpoints_from(victim), &[]);
        urls.lock().unwrap()[victim] = fresh.api();
        t.s[victim] = fresh;
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let fates = fates.lock().unwrap().clone();
    eprintln!(
        "{} acknowledged fates checked; {} deletes of unknown outcome (server killed mid-request)",
        fates.len(),
        unknown.load(Ordering::Relaxed)
    );
    assert!(fates.len() > 30, "only {} acknowledged writes", fates.len());
    for s in &t.s {
        let holds = eventually(Duration::from_secs(3), || {
            role_nodes(&s.api(), "crash")
                .is_some_and(|n| fates.iter().all(|(k, reg)| n.contains_key(k) == *reg))
        });
        let wrong: Vec<String> = role_nodes(&s.api(), "crash")
            .map(|n| {
                fates
                    .iter()
                    .filter(|(k, reg)| n.contains_key(*k) != **reg)
                    .map(|(k, reg)| {
                        format!("{k} (acknowledged {})", if *reg { "PUT" } else { "DELETE" })
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            holds,
            "{}: an acknowledged write's fate does not hold: {wrong:?}",
            s.api()
        );
    }
}

#[test]
fn a_server_restarted_during_an_outage_answers_from_its_local_copy() {
    let mut t = three();
    for k in 0..3 {
        assert_eq!(
            put(
                &t.s[0].api(),
                "cold",
                &format!("n{k}"),
                &format!(r#"{{"addr":"10.8.0.{}","ttl":30}}"#, k + 1)
            )
            .0,
            200
        );
    }
    let want: BTreeSet<String> = (1..=3).map(|k| format!("10.8.0.{k}")).collect();
    assert!(eventually(Duration::from_secs(3), || a(
        t.s[1].dns,
        "cold.cluster."
    )
    .as_ref()
        == Some(&want)));
    std::thread::sleep(Duration::from_millis(2500)); // the local copy is saved within a second or two
    t.etcd.kill(0);
    t.etcd.kill(1);
    t.etcd.kill(2);
    signal_proc(&t.s[1], libc::SIGKILL);
    let (dns, httpa) = (t.s[1].dns.to_string(), t.s[1].http.to_string());
    let old = t.s.remove(1);
    drop(old);
    let restarted = ServeProc::start_full(
        &dns,
        &httpa,
        &t.dir.path().join("s1"),
        &t.dir.path().join("no-zones"),
        &["--etcd", &t.etcd.endpoints(), "--etcd-timeout", "1s"],
        &[],
    );
    assert_eq!(
        a(restarted.dns, "cold.cluster.").as_ref(),
        Some(&want),
        "no local copy served"
    );
    assert_eq!(status_of(&restarted.api(), "/readyz"), 503);
    assert_eq!(status_of(&restarted.api(), "/healthz"), 200);
}
