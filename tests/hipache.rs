//! System tests of `rollcall hipache-sync`: the real binary between the real `rollcall serve`
//! and a real `redis-server` (Debian package), each on loopback ports picked free. Every
//! assertion is on the exact `LRANGE frontend:<host> 0 -1` that hipache would read.

#[path = "util/mod.rs"]
mod util;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use util::{eventually, http, require, rollcall_bin, ServeProc};

const ROLE: &str = "frontserver";
const CONVERGE: Duration = Duration::from_secs(20);

/// A free loopback TCP port (bound, read, released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` on loopback, nothing saved to disk, killed (by PID) when dropped.
struct RedisProc {
    child: Child,
    port: u16,
    password: Option<String>,
    _dir: TempDir,
    /// A cached connection per db, made again after any error.
    conns: Mutex<Vec<(i64, redis::Connection)>>,
}

impl RedisProc {
    /// Starts redis on a free port.
    fn start(extra: &[&str]) -> RedisProc {
        for _ in 0..5 {
            if let Some(r) = Self::try_start(free_port(), extra) {
                return r;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// Starts redis on `port` (e.g. the port of a redis that was just stopped).
    fn start_on(port: u16, extra: &[&str]) -> RedisProc {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = Self::try_start(port, extra) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server could not start again on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn try_start(port: u16, extra: &[&str]) -> Option<RedisProc> {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(require("redis-server"))
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        let password = extra
            .windows(2)
            .find(|w| w[0] == "--requirepass")
            .map(|w| w[1].to_owned());
        let r = RedisProc {
            port,
            password,
            _dir: dir,
            conns: Mutex::new(Vec::new()),
            child: {
                // Moved in below once it answers.
                let ready = eventually(Duration::from_secs(10), || {
                    if child.try_wait().unwrap().is_some() {
                        return true;
                    }
                    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                });
                if !ready || child.try_wait().unwrap().is_some() {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
                child
            },
        };
        // The port may answer before redis is ready for commands, or belong to someone else.
        let pinged = eventually(Duration::from_secs(10), || {
            r.query::<String>(0, &redis::cmd("PING")).as_deref() == Some("PONG")
        });
        pinged.then_some(r)
    }

    /// `redis://[:pw@]127.0.0.1:port/db`.
    fn url(&self, db: i64) -> String {
        match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}/{db}", self.port),
            None => format!("redis://127.0.0.1:{}/{db}", self.port),
        }
    }

    /// Runs `f` on a connection to `db`; None when redis cannot be reached or answers an error.
    fn with_conn<T>(
        &self,
        db: i64,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Option<T> {
        let mut conns = self.conns.lock().unwrap();
        let at = match conns.iter().position(|(d, _)| *d == db) {
            Some(i) => i,
            None => {
                let client = redis::Client::open(self.url(db)).unwrap();
                let conn = client
                    .get_connection_with_timeout(Duration::from_secs(2))
                    .ok()?;
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                conns.push((db, conn));
                conns.len() - 1
            }
        };
        match f(&mut conns[at].1) {
            Ok(v) => Some(v),
            Err(_) => {
                conns.remove(at);
                None
            }
        }
    }

    fn query<T: redis::FromRedisValue>(&self, db: i64, cmd: &redis::Cmd) -> Option<T> {
        self.with_conn(db, |c| cmd.query(c))
    }

    /// Runs a pipeline (a transaction when `atomic`) in db 0 and panics on failure.
    fn run_pipe<T: redis::FromRedisValue>(&self, p: &redis::Pipeline) -> T {
        self.with_conn(0, |c| p.query(c))
            .unwrap_or_else(|| panic!("redis pipeline {:?} failed", p.get_packed_pipeline()))
    }

    /// Runs `cmd` in db 0 and panics on failure.
    fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        self.query(0, cmd)
            .unwrap_or_else(|| panic!("redis command {:?} failed", cmd.get_packed_command()))
    }

    fn lrange(&self, db: i64, key: &str) -> Option<Vec<String>> {
        self.query(db, redis::cmd("LRANGE").arg(key).arg(0).arg(-1))
    }

    fn exists(&self, key: &str) -> bool {
        self.run::<i64>(redis::cmd("EXISTS").arg(key)) == 1
    }

    /// How many LRANGE commands redis has served (a barrier: the sync's periodic check ran).
    fn lrange_calls(&self) -> u64 {
        let info: String = self.run(redis::cmd("INFO").arg("commandstats"));
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_lrange:calls="))
            .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
    }

    /// Waits until `key` in `db` holds exactly `want`.
    fn wait_list_in(&self, db: i64, key: &str, want: &[String]) {
        let mut last = None;
        let ok = eventually(CONVERGE, || {
            last = self.lrange(db, key);
            last.as_deref() == Some(want)
        });
        assert!(ok, "{key} (db {db}): wanted {want:?}, last saw {last:?}");
    }

    fn wait_list(&self, key: &str, want: &[String]) {
        self.wait_list_in(0, key, want);
    }
}

impl RedisProc {
    /// Kills redis (by PID) and waits for it; the port is free again afterwards.
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.conns.lock().unwrap().clear();
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `rollcall hipache-sync` process; its stderr is echoed and kept for assertions.
struct SyncProc {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl SyncProc {
    fn start(args: &[&str], env: &[(&str, &str)]) -> SyncProc {
        let mut child = Command::new(rollcall_bin())
            .arg("hipache-sync")
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,rollcall::hipache=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting rollcall hipache-sync");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[sync] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        SyncProc { child, log }
    }

    /// Log lines containing every one of `needles`.
    fn count(&self, needles: &[&str]) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    fn wait_log(&self, needles: &[&str], at_least: usize) {
        assert!(
            eventually(CONVERGE, || self.count(needles) >= at_least),
            "expected {at_least} log line(s) with {needles:?}; log: {:#?}",
            self.log.lock().unwrap()
        );
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for SyncProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The list hipache should read: the identifier, then the backends as given.
fn list(identifier: &str, backends: &[&str]) -> Vec<String> {
    std::iter::once(identifier)
        .chain(backends.iter().copied())
        .map(str::to_owned)
        .collect()
}

fn put(api: &str, node: &str, body: serde_json::Value) {
    put_auth(api, node, body, None);
}

fn put_auth(api: &str, node: &str, body: serde_json::Value, token: Option<&str>) {
    let mut req = http()
        .put(format!("{api}/v1/roles/{ROLE}/nodes/{node}"))
        .json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().unwrap();
    assert_eq!(resp.status(), 200, "PUT {node}: {:?}", resp.text());
}

fn register(api: &str, node: &str, addr: &str, ttl: u32) {
    put(
        api,
        node,
        serde_json::json!({"addr": addr, "port": 8080, "ttl": ttl}),
    );
}

fn deregister(api: &str, node: &str) {
    let resp = http()
        .delete(format!("{api}/v1/roles/{ROLE}/nodes/{node}"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 204, "DELETE {node}");
}

/// rollcall serve (data dir kept on disk) + redis + the directories they use.
struct Stack {
    redis: RedisProc,
    serve: ServeProc,
    _dir: TempDir,
}

impl Stack {
    fn start() -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let serve = ServeProc::start(&dir.path().join("data"), &dir.path().join("zones"), &[]);
        Stack {
            redis: RedisProc::start(&[]),
            serve,
            _dir: dir,
        }
    }

    fn sync(&self, extra: &[&str]) -> SyncProc {
        let api = self.serve.api();
        let redis = self.redis.url(0);
        let mut args = vec!["--api", &api, "--role", ROLE, "--redis", &redis];
        args.extend_from_slice(extra);
        SyncProc::start(&args, &[])
    }
}

/// Registering, adding, deregistering and expiring frontservers; dead marks kept while the
/// list is unchanged and cleared with every change; zero nodes leave the identifier; SIGTERM
/// exits 0 and leaves the list.
#[test]
fn lists_follow_the_role() {
    let s = Stack::start();
    let api = s.serve.api();
    let key = "frontend:www.example.test";
    let dead = "dead:www.example.test";
    let mut sync = s.sync(&["--frontend", "www.example.test"]);

    // Nothing registered yet: the identifier alone (hipache answers 502, not 400).
    s.redis.wait_list(key, &list(ROLE, &[]));

    register(&api, "front1", "10.0.0.1", 300);
    register(&api, "front2", "10.0.0.2", 300);
    s.redis.wait_list(
        key,
        &list(ROLE, &["http://10.0.0.1:8080", "http://10.0.0.2:8080"]),
    );

    register(&api, "front3", "10.0.0.3", 300);
    let three = list(
        ROLE,
        &[
            "http://10.0.0.1:8080",
            "http://10.0.0.2:8080",
            "http://10.0.0.3:8080",
        ],
    );
    s.redis.wait_list(key, &three);

    // hipache marks backend 1 dead. A renewal changes nothing: after two more periodic checks
    // the mark must still be there.
    s.redis.run_pipe::<()>(
        redis::pipe()
            .atomic()
            .sadd(dead, 1)
            .ignore()
            .expire(dead, 30)
            .ignore()
            .publish("dead", "www.example.test;http://10.0.0.2:8080;1;3")
            .ignore(),
    );
    register(&api, "front2", "10.0.0.2", 300);
    let calls = s.redis.lrange_calls();
    assert!(eventually(CONVERGE, || s.redis.lrange_calls() >= calls + 2));
    assert!(
        s.redis.exists(dead),
        "dead marks were cleared without a change"
    );
    assert_eq!(s.redis.lrange(0, key).unwrap(), three);

    // Deregistering changes the list, and the marks go in the same transaction.
    deregister(&api, "front2");
    let after = list(ROLE, &["http://10.0.0.1:8080", "http://10.0.0.3:8080"]);
    s.redis.wait_list(key, &after);
    assert!(
        !s.redis.exists(dead),
        "dead marks survived a change of the list"
    );

    // A node that stops renewing disappears when its lease runs out.
    register(&api, "short", "10.0.0.4", 1);
    s.redis.wait_list(
        key,
        &list(
            ROLE,
            &[
                "http://10.0.0.1:8080",
                "http://10.0.0.3:8080",
                "http://10.0.0.4:8080",
            ],
        ),
    );
    s.redis.wait_list(key, &after);

    // Everyone gone: the identifier stays, the key is never deleted.
    deregister(&api, "front1");
    deregister(&api, "front3");
    s.redis.wait_list(key, &list(ROLE, &[]));

    // SIGTERM: exit 0, and the list stays as last written.
    register(&api, "front5", "10.0.0.5", 300);
    let last = list(ROLE, &["http://10.0.0.5:8080"]);
    s.redis.wait_list(key, &last);
    // SIGHUP is logged and ignored (its default would end the process with 129).
    sync.signal("HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        sync.child.try_wait().unwrap().is_none(),
        "SIGHUP ended hipache-sync"
    );
    sync.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = sync.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "hipache-sync did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    assert_eq!(s.redis.lrange(0, key).unwrap(), last);
}

/// redis killed and started again empty on the same port: the lists come back, with one log
/// line for the outage and one for the recovery however many retries happen in between. A
/// FLUSHALL, a list edited by hand and a key of the wrong type are put right too.
#[test]
fn redis_restarted_empty_gets_the_lists_back() {
    let mut s = Stack::start();
    let api = s.serve.api();
    let key = "frontend:www.example.test";
    let sync = s.sync(&["--frontend", "www.example.test"]);
    register(&api, "front1", "10.0.0.1", 300);
    register(&api, "front2", "10.0.0.2", 300);
    let two = list(ROLE, &["http://10.0.0.1:8080", "http://10.0.0.2:8080"]);
    s.redis.wait_list(key, &two);

    let port = s.redis.port;
    s.redis.stop();
    // Down long enough for several retries; they are logged at debug level only.
    sync.wait_log(&["redis at", "is unreachable"], 1);
    sync.wait_log(&["still failing"], 3);
    s.redis = RedisProc::start_on(port, &[]);
    assert_eq!(
        s.redis.lrange(0, key),
        Some(vec![]),
        "the new redis starts empty"
    );
    s.redis.wait_list(key, &two);
    sync.wait_log(&["redis at", "is reachable again"], 1);
    assert_eq!(sync.count(&["WARN", "redis at", "is unreachable"]), 1);
    assert_eq!(sync.count(&["redis at", "is reachable again"]), 1);

    s.redis.run::<()>(&redis::cmd("FLUSHALL"));
    s.redis.wait_list(key, &two);
    s.redis.run::<()>(redis::cmd("LPOP").arg(key));
    s.redis.wait_list(key, &two);
    s.redis
        .run::<()>(redis::cmd("SET").arg(key).arg("not a list"));
    s.redis.wait_list(key, &two);

    // Still following the role.
    register(&api, "front3", "10.0.0.3", 300);
    s.redis.wait_list(
        key,
        &list(
            ROLE,
            &[
                "http://10.0.0.1:8080",
                "http://10.0.0.2:8080",
                "http://10.0.0.3:8080",
            ],
        ),
    );
    // One backend left: said so in the singular.
    deregister(&api, "front2");
    deregister(&api, "front3");
    s.redis
        .wait_list(key, &list(ROLE, &["http://10.0.0.1:8080"]));
    sync.wait_log(&["role changed: 1 backend "], 1);
    assert_eq!(sync.count(&[" 1 backends"]), 0);
    // Write times are logged rounded (`ms=0.47`), without float noise (`ms=0.47237100000000004`).
    sync.wait_log(&["role changed", "ms="], 1);
    let log = sync.log.lock().unwrap();
    let times: Vec<&str> = log
        .iter()
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| w.strip_prefix("ms="))
        .collect();
    assert!(!times.is_empty(), "{log:#?}");
    for t in times {
        let decimals = t.split_once('.').map_or(0, |(_, d)| d.len());
        assert!(
            t.parse::<f64>().is_ok() && decimals <= 2,
            "ms={t} is not rounded"
        );
    }
}

/// rollcall killed and started again (same data dir, same HTTP port): while it is away the
/// last known list stays (and is even restored into a flushed redis); afterwards changes are
/// followed again although the new server's index starts over.
#[test]
fn rollcall_restarted_keeps_the_lists_right() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let zones = dir.path().join("zones");
    let http_addr = format!("127.0.0.1:{}", free_port());
    let serve = ServeProc::start_on("127.0.0.1:0", &http_addr, &data, &zones, &[]);
    let redis = RedisProc::start(&[]);
    let api = serve.api();
    let key = "frontend:www.example.test";
    let sync = SyncProc::start(
        &[
            "--api",
            &api,
            "--redis",
            &redis.url(0),
            "--frontend",
            "www.example.test",
        ],
        &[],
    );
    for i in 1..=4 {
        register(&api, &format!("front{i}"), &format!("10.0.0.{i}"), 300);
    }
    deregister(&api, "front4");
    let three = list(
        ROLE,
        &[
            "http://10.0.0.1:8080",
            "http://10.0.0.2:8080",
            "http://10.0.0.3:8080",
        ],
    );
    redis.wait_list(key, &three);

    drop(serve);
    sync.wait_log(&["rollcall at", "is unreachable"], 1);
    assert_eq!(
        redis.lrange(0, key).unwrap(),
        three,
        "the list changed while rollcall was down"
    );
    redis.run::<()>(&redis::cmd("FLUSHALL"));
    redis.wait_list(key, &three);

    let serve = ServeProc::start_on("127.0.0.1:0", &http_addr, &data, &zones, &[]);
    sync.wait_log(&["rollcall at", "is reachable again"], 1);
    assert_eq!(redis.lrange(0, key).unwrap(), three);
    assert_eq!(sync.count(&["WARN", "rollcall at", "is unreachable"]), 1);

    deregister(&api, "front1");
    redis.wait_list(
        key,
        &list(ROLE, &["http://10.0.0.2:8080", "http://10.0.0.3:8080"]),
    );
    register(&api, "front9", "10.0.0.9", 300);
    redis.wait_list(
        key,
        &list(
            ROLE,
            &[
                "http://10.0.0.2:8080",
                "http://10.0.0.3:8080",
                "http://10.0.0.9:8080",
            ],
        ),
    );
    drop(serve);
}

/// Two frontend hosts (and a wildcard) hold the same list after every change; dead marks of
/// hosts served by the wildcard are cleared, those of hosts with their own frontend are not.
#[test]
fn several_frontends_move_in_step() {
    let s = Stack::start();
    let api = s.serve.api();
    let hosts = ["a.example.test", "b.example.test", "*.wild.test"];
    let _sync = s.sync(&[
        "--frontend",
        "a.example.test",
        "--frontend",
        "B.Example.Test,*.wild.test",
    ]);
    let check = |want: &[String]| {
        for h in hosts {
            s.redis.wait_list(&format!("frontend:{h}"), want);
        }
    };
    check(&list(ROLE, &[]));
    register(&api, "front1", "10.0.0.1", 300);
    check(&list(ROLE, &["http://10.0.0.1:8080"]));
    register(&api, "front2", "10.0.0.2", 300);
    check(&list(
        ROLE,
        &["http://10.0.0.1:8080", "http://10.0.0.2:8080"],
    ));

    // A host with its own frontend under the wildcard's domain, and dead marks everywhere.
    s.redis.run::<()>(
        redis::cmd("RPUSH")
            .arg("frontend:own.wild.test")
            .arg("other")
            .arg("http://192.0.2.1:80"),
    );
    for d in [
        "dead:a.example.test",
        "dead:b.example.test",
        "dead:x.wild.test",
        "dead:y.z.wild.test",
        "dead:own.wild.test",
        "dead:unrelated.test",
    ] {
        s.redis.run::<()>(redis::cmd("SADD").arg(d).arg(0));
    }
    deregister(&api, "front1");
    check(&list(ROLE, &["http://10.0.0.2:8080"]));
    for d in [
        "dead:a.example.test",
        "dead:b.example.test",
        "dead:x.wild.test",
        "dead:y.z.wild.test",
    ] {
        assert!(!s.redis.exists(d), "{d} survived a change of the list");
    }
    for d in ["dead:own.wild.test", "dead:unrelated.test"] {
        assert!(
            s.redis.exists(d),
            "{d} belongs to another frontend and was deleted"
        );
    }
    assert_eq!(
        s.redis.lrange(0, "frontend:own.wild.test").unwrap(),
        list("other", &["http://192.0.2.1:80"])
    );
}

/// While a writer churns the role, a reader doing hipache's own read (MULTI; LRANGE…;
/// SMEMBERS dead:host; EXEC) never sees a missing, empty or identifier-less list, and the two
/// frontends are never seen apart.
#[test]
fn hipache_never_reads_a_broken_list_during_churn() {
    let s = Stack::start();
    let api = s.serve.api();
    let _sync = s.sync(&[
        "--frontend",
        "a.example.test",
        "--frontend",
        "b.example.test",
    ]);
    s.redis
        .wait_list("frontend:a.example.test", &list(ROLE, &[]));

    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let url = s.redis.url(0);
        let done = done.clone();
        std::thread::spawn(move || {
            let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut seen = std::collections::BTreeSet::new();
            let mut reads = 0u64;
            while !done.load(Ordering::Relaxed) {
                let (a, b, _dead): (Vec<String>, Vec<String>, Vec<String>) = redis::pipe()
                    .atomic()
                    .lrange("frontend:a.example.test", 0, -1)
                    .lrange("frontend:b.example.test", 0, -1)
                    .smembers("dead:a.example.test")
                    .query(&mut conn)
                    .unwrap();
                reads += 1;
                assert!(!a.is_empty(), "hipache read a missing or empty list");
                assert_eq!(a[0], ROLE, "element 0 is not the identifier: {a:?}");
                assert!(
                    a[1..].iter().all(|u| u.starts_with("http://10.0.0.")),
                    "not a backend list: {a:?}"
                );
                // 10.0.0.1 to 10.0.0.6: text order is address order.
                assert!(a[1..].windows(2).all(|w| w[0] < w[1]), "not sorted: {a:?}");
                assert_eq!(a, b, "the two frontends were seen apart");
                seen.insert(a);
            }
            (reads, seen.len())
        })
    };
    // hipache marking backends dead while the list moves.
    let marker = {
        let url = s.redis.url(0);
        let done = done.clone();
        std::thread::spawn(move || {
            let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
            while !done.load(Ordering::Relaxed) {
                let _: () = redis::pipe()
                    .atomic()
                    .sadd("dead:a.example.test", 0)
                    .ignore()
                    .expire("dead:a.example.test", 30)
                    .ignore()
                    .query(&mut conn)
                    .unwrap();
                std::thread::sleep(Duration::from_millis(3));
            }
        })
    };

    for i in 0..120u32 {
        let n = i % 6;
        register(&api, &format!("f{n}"), &format!("10.0.0.{}", n + 1), 300);
        if i % 3 != 0 {
            let _ = http()
                .delete(format!("{api}/v1/roles/{ROLE}/nodes/f{}", (i + 2) % 6))
                .send()
                .unwrap();
        }
    }
    // The final state converges too.
    let role: serde_json::Value = http()
        .get(format!("{api}/v1/roles/{ROLE}"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let mut addrs: Vec<std::net::IpAddr> = role["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["addr"].as_str().unwrap().parse().unwrap())
        .collect();
    addrs.sort();
    let urls: Vec<String> = addrs.iter().map(|a| format!("http://{a}:8080")).collect();
    let want = list(ROLE, &urls.iter().map(String::as_str).collect::<Vec<_>>());
    s.redis.wait_list("frontend:a.example.test", &want);
    s.redis.wait_list("frontend:b.example.test", &want);
    done.store(true, Ordering::Relaxed);
    let (reads, distinct) = reader.join().expect("the reader saw a broken list");
    marker.join().unwrap();
    eprintln!("reader: {reads} reads, {distinct} distinct lists");
    assert!(
        reads > 100,
        "only {reads} reads: the reader did not run alongside the churn"
    );
    assert!(
        distinct >= 3,
        "only {distinct} distinct lists seen: the churn was not observed"
    );
}

/// --identifier, --port, --scheme https, IPv6 backends, a redis password, a db number and
/// hipache's `#prefix`, a token-protected API (--token-file, and ROLLCALL_* environment twins).
#[test]
fn options_password_db_prefix_token_and_env() {
    let dir = tempfile::tempdir().unwrap();
    let serve = ServeProc::start(
        &dir.path().join("data"),
        &dir.path().join("zones"),
        &["--token", "t0ken", "--token-reads"],
    );
    let redis = RedisProc::start(&["--requirepass", "s3cret"]);
    let api = serve.api();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "t0ken\n").unwrap();
    let url = format!("{}#hip:", redis.url(2));
    let _one = SyncProc::start(
        &[
            "--api",
            &api,
            "--redis",
            &url,
            "--frontend",
            "site.test",
            "--identifier",
            "mysite",
            "--port",
            "9000",
            "--scheme",
            "https",
            "--token-file",
            token_file.to_str().unwrap(),
        ],
        &[],
    );
    let redis_url = redis.url(0);
    let _two = SyncProc::start(
        &[],
        &[
            ("ROLLCALL_API", api.as_str()),
            ("ROLLCALL_REDIS", redis_url.as_str()),
            ("ROLLCALL_FRONTEND", "x.test,y.test"),
            ("ROLLCALL_TOKEN", "t0ken"),
            ("ROLLCALL_INTERVAL", "500ms"),
        ],
    );
    let wrong = SyncProc::start(
        &[
            "--api",
            &api,
            "--redis",
            &url,
            "--frontend",
            "never.test",
            "--token",
            "wrong",
        ],
        &[],
    );
    let bad_pw = format!("redis://:nope@127.0.0.1:{}/0", redis.port);
    let unauth = SyncProc::start(
        &[
            "--api",
            &api,
            "--redis",
            &bad_pw,
            "--frontend",
            "never.test",
            "--token",
            "t0ken",
        ],
        &[],
    );

    put_auth(
        &api,
        "v4",
        serde_json::json!({"addr": "10.0.0.1", "ttl": 300}),
        Some("t0ken"),
    );
    put_auth(
        &api,
        "v6",
        serde_json::json!({"addr": "fd00::1", "port": 8080, "ttl": 300}),
        Some("t0ken"),
    );
    redis.wait_list_in(
        2,
        "hip:frontend:site.test",
        &list(
            "mysite",
            &["https://10.0.0.1:9000", "https://[fd00::1]:9000"],
        ),
    );
    assert_eq!(
        redis.lrange(0, "hip:frontend:site.test"),
        Some(vec![]),
        "written to db 0"
    );
    assert_eq!(
        redis.lrange(2, "frontend:site.test"),
        Some(vec![]),
        "prefix ignored"
    );
    for h in ["x.test", "y.test"] {
        redis.wait_list(
            &format!("frontend:{h}"),
            &list(ROLE, &["http://10.0.0.1:80", "http://[fd00::1]:8080"]),
        );
    }

    // A wrong API token or redis password: logged once, retried, nothing written.
    wrong.wait_log(&["rollcall at", "is unreachable", "401"], 1);
    unauth.wait_log(&["redis at", "is unreachable"], 1);
    // Several retries later, still one line each.
    wrong.wait_log(&["still failing"], 3);
    unauth.wait_log(&["still failing"], 3);
    assert_eq!(wrong.count(&["is unreachable"]), 1);
    assert_eq!(unauth.count(&["is unreachable"]), 1);
    assert_eq!(redis.lrange(2, "hip:frontend:never.test"), Some(vec![]));
    assert_eq!(redis.lrange(0, "frontend:never.test"), Some(vec![]));
}

/// Bad flags exit with code 2 and a sentence naming the flag and what to do.
#[test]
fn bad_flags_exit_2_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-token");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "--frontend"),
        (vec!["--frontend", ""], "--frontend"),
        (vec!["--frontend", "a b"], "--frontend"),
        (vec!["--frontend", "a", "--interval", "abc"], "--interval"),
        (vec!["--frontend", "a", "--interval=-5s"], "--interval"),
        (
            vec!["--frontend", "a", "--redis", "http://127.0.0.1:6379"],
            "redis://",
        ),
        (
            vec!["--frontend", "a", "--redis", "redis://127.0.0.1:port"],
            "--redis",
        ),
        (
            vec!["--frontend", "a", "--redis", "redis://127.0.0.1/x"],
            "--redis",
        ),
        (vec!["--frontend", "a", "--api", "127.0.0.1:8053"], "--api"),
        (vec!["--frontend", "a", "--role", "front_server"], "--role"),
        (vec!["--frontend", "a", "--scheme", "gopher"], "--scheme"),
        (vec!["--frontend", "a", "--port", "0"], "--port"),
        (vec!["--frontend", "a", "--port", "70000"], "--port"),
        (
            vec!["--frontend", "a", "--token-file", missing.to_str().unwrap()],
            "--token-file",
        ),
    ];
    for (args, needle) in cases {
        let out = Command::new(rollcall_bin())
            .arg("hipache-sync")
            .args(&args)
            .env_remove("ROLLCALL_FRONTEND")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: {err:?} does not mention {needle}"
        );
    }
    // --help shows every flag with its default.
    let out = Command::new(rollcall_bin())
        .args(["hipache-sync", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--api",
        "--role",
        "--redis",
        "--frontend",
        "--identifier",
        "--scheme",
        "--port",
        "--interval",
        "--token",
        "--token-file",
        "[default: 60s]",
        "[default: frontserver]",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}: {help}");
    }
}

/// The frontservers' own agents (`rollcall register`): SIGTERM deregisters at once, and so does
/// `kill -9` (the agent's session closes); the list follows both.
#[test]
fn agents_leaving_are_followed() {
    let s = Stack::start();
    let api = s.serve.api();
    let key = "frontend:www.example.test";
    let _sync = s.sync(&["--frontend", "www.example.test"]);
    let agent = |n: u8| {
        Command::new(rollcall_bin())
            .args(["register", "--api", &api, "--role", ROLE])
            .args([
                "--node",
                &format!("front{n}"),
                "--addr",
                &format!("10.0.0.{n}"),
            ])
            .args(["--port", "8080", "--ttl", "60"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut agents: Vec<Child> = (1..=3).map(agent).collect();
    s.redis.wait_list(
        key,
        &list(
            ROLE,
            &[
                "http://10.0.0.1:8080",
                "http://10.0.0.2:8080",
                "http://10.0.0.3:8080",
            ],
        ),
    );

    let ok = Command::new("kill")
        .args(["-TERM", &agents[1].id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    // Within CONVERGE (20 s), far sooner than the 60 s lease: the agent deregistered.
    s.redis.wait_list(
        key,
        &list(ROLE, &["http://10.0.0.1:8080", "http://10.0.0.3:8080"]),
    );
    let _ = agents[1].wait();

    agents[0].kill().unwrap(); // SIGKILL
    let _ = agents[0].wait();
    s.redis
        .wait_list(key, &list(ROLE, &["http://10.0.0.3:8080"]));
    for a in &mut agents {
        let _ = a.kill();
        let _ = a.wait();
    }
}

/// With several `--api` servers, hipache-sync follows the first that answers: a dead one first
/// in the list costs nothing but a connect error.
#[test]
fn follows_the_next_api_server_when_one_is_down() {
    let s = Stack::start();
    let live = s.serve.api();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let redis = s.redis.url(0);
    let apis = format!("{dead},{live}");
    let _sync = SyncProc::start(
        &[
            "--api",
            &apis,
            "--role",
            ROLE,
            "--redis",
            &redis,
            "--frontend",
            "www.example.test",
        ],
        &[],
    );
    register(&live, "front1", "10.0.0.1", 300);
    s.redis.wait_list(
        "frontend:www.example.test",
        &list(ROLE, &["http://10.0.0.1:8080"]),
    );
}
