//! Latency of `rollcall hipache-sync`: from sending a registration change (PUT or DELETE) to
//! rollcall until redis holds the new `frontend:<host>` list, over 100 changes.
//!
//! Real processes on loopback: `redis-server`, `rollcall serve` (with a data dir, so every
//! change is fsynced before it is acknowledged) and `rollcall hipache-sync`. The moment redis is
//! updated is taken from redis itself: a keyspace notification for the list (sent when the
//! sync's MULTI/EXEC runs), after which the list is read back and compared with the expected one.
//!
//! Run: `cargo bench --bench hipache_latency` (needs redis-server on PATH).
//! Optional: `HIPACHE_BENCH_CHANGES=500` for more changes.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROLE: &str = "frontserver";
const HOST: &str = "bench.test";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // Nearest-rank percentile.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn expected(nodes: &BTreeSet<IpAddr>) -> Vec<String> {
    std::iter::once(ROLE.to_owned())
        .chain(nodes.iter().map(|a| format!("http://{a}:8080")))
        .collect()
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` (tests/run.sh) runs this
    // without it: then a short smoke run keeps the benchmark working without slowing the tests.
    let benching = std::env::args().any(|a| a == "--bench");
    let changes: usize = std::env::var("HIPACHE_BENCH_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 100 } else { 5 });
    let bin = env!("CARGO_BIN_EXE_rollcall");
    let dir = tempfile::tempdir().unwrap();

    // redis
    let redis_port = free_port();
    let _redis = Proc(
        Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--notify-keyspace-events", "Kl"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH"),
    );
    let redis_url = format!("redis://127.0.0.1:{redis_port}/0");
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    wait_until("redis", || client.get_connection().is_ok());
    let mut conn = client.get_connection().unwrap();

    // rollcall serve, reporting its HTTP address on stderr
    let mut serve = Command::new(bin)
        .args([
            "serve",
            "--dns-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(["--dns-threads", "1"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--zones")
        .arg(dir.path().join("zones"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(serve.stderr.take().unwrap()).lines();
    let http = loop {
        let line = lines.next().expect("rollcall serve exited").unwrap();
        if let Some(at) = line.find("http=") {
            break line[at + 5..].split_whitespace().next().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let _serve = Proc(serve);
    let api = format!("http://{http}");

    // hipache-sync
    let _sync = Proc(
        Command::new(bin)
            .args([
                "hipache-sync",
                "--api",
                &api,
                "--role",
                ROLE,
                "--redis",
                &redis_url,
            ])
            .args(["--frontend", HOST])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let key = format!("frontend:{HOST}");
    let lrange = |c: &mut redis::Connection| -> Vec<String> {
        redis::cmd("LRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .query(c)
            .unwrap()
    };
    wait_until("the first write", || lrange(&mut conn) == [ROLE]);

    let mut sub_conn = client.get_connection().unwrap();
    sub_conn
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut pubsub = sub_conn.as_pubsub();
    pubsub.subscribe(format!("__keyspace@0__:{key}")).unwrap();

    let http_client = reqwest::blocking::Client::new();
    let mut nodes: BTreeSet<IpAddr> = BTreeSet::new();
    let mut latency = Vec::with_capacity(changes);
    let mut round_trip = Vec::with_capacity(changes);
    let warmup = 5;
    for i in 0..changes + warmup {
        // Grow to 4 nodes, then alternate: add a new node, remove the oldest.
        let add = nodes.len() < 4 || i % 2 == 0;
        let started = Instant::now();
        let resp = if add {
            let addr: IpAddr = format!("10.1.{}.{}", i / 250, i % 250 + 1).parse().unwrap();
            nodes.insert(addr);
            http_client
                .put(format!(
                    "{api}/v1/roles/{ROLE}/nodes/n{}",
                    addr.to_string().replace('.', "-")
                ))
                .json(&serde_json::json!({"addr": addr.to_string(), "port": 8080, "ttl": 600}))
                .send()
                .unwrap()
        } else {
            let addr = *nodes.iter().next().unwrap();
            nodes.remove(&addr);
            http_client
                .delete(format!(
                    "{api}/v1/roles/{ROLE}/nodes/n{}",
                    addr.to_string().replace('.', "-")
                ))
                .send()
                .unwrap()
        };
        let acked = started.elapsed();
        assert!(resp.status().is_success(), "change {i}: {}", resp.status());
        let want = expected(&nodes);
        // The list may already be there (the write can beat the HTTP answer); otherwise wait
        // for the next notification of the key and look again.
        let done = loop {
            let msg = pubsub
                .get_message()
                .expect("no keyspace notification within 10 s");
            let event: String = msg.get_payload().unwrap();
            if event == "rpush" && lrange(&mut conn) == want {
                break started.elapsed();
            }
        };
        if i >= warmup {
            latency.push(done);
            round_trip.push(acked);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    latency.sort();
    round_trip.sort();
    let mean = latency.iter().sum::<Duration>() / latency.len() as u32;
    if !benching {
        println!("(smoke run under cargo test; `cargo bench --bench hipache_latency` measures)");
    }
    println!(
        "hipache-sync: registration change -> redis updated, {} changes (PUT/DELETE sent to \
         rollcall with a data dir, until the MULTI/EXEC notification and LRANGE match)",
        latency.len()
    );
    println!(
        "  median {:.2} ms   p90 {:.2} ms   p99 {:.2} ms   max {:.2} ms   mean {:.2} ms   min {:.2} ms",
        ms(percentile(&latency, 50.0)),
        ms(percentile(&latency, 90.0)),
        ms(percentile(&latency, 99.0)),
        ms(*latency.last().unwrap()),
        ms(mean),
        ms(latency[0]),
    );
    println!(
        "  for comparison, the PUT/DELETE round trip alone: median {:.2} ms   p99 {:.2} ms",
        ms(percentile(&round_trip, 50.0)),
        ms(percentile(&round_trip, 99.0)),
    );
}
