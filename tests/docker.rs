//! System test of the container stack: `docker/docker-compose.yml` brought up with the real
//! docker daemon (Debian's docker.io) and compose (Debian's docker-compose 1.29, or `docker
//! compose` v2 when ROLLCALL_TEST_COMPOSE says so), images built from `docker/` with the release
//! binary, exactly as the README's docker command does.
//!
//! One test, one stack, the checks in sequence (each needs the state the previous one left):
//! DNS lists the containers; each frontserver spreads over every appserver; scale 3 -> 4 served
//! without an nginx reload; `docker stop` of an appserver and of a frontserver under load with
//! zero failed requests; `docker kill` of an appserver gone from DNS (timed); frontserver scaling
//! followed by the proxyserver's redis list; a restart of the rollcall container (registrations
//! back from the volume, agents re-attached, nginx serving); a rolling replacement of the
//! appservers (`docker/roll.sh`) with zero failed requests and the role never empty.
//!
//! The proxy tier. With ROLLCALL_TEST_HIPACHE_TARBALL=FILE (a tar.gz of hipache 0.3.1 with its
//! node_modules, see docker/proxyserver/vendor/README.md; CI sets it), the proxyserver is built
//! at its real `hipache` stage from that file (copied into docker/proxyserver/vendor/ for the
//! build, removed after) and the load goes through **real hipache**, on the proxyserver's
//! address, as the README's `curl` does. Without it (hipache needs the npm registry otherwise)
//! the proxyserver is built at its `sync` stage (redis + `rollcall hipache-sync`, port 80
//! answering 503), and the load goes through a **stand-in for hipache** written here: it reads
//! the same redis list hipache reads (`frontend:localhost`, re-read every 100 ms through
//! `redis-cli` in the proxyserver container; hipache reads it on every request) and sends each
//! request to a random URL of it, with no retry (hipache retries up to 3 times: the stand-in is
//! the stricter client). Either way the demo appserver names the frontserver a request came
//! through (its `X-Peer-Addr` header), so every check can say which frontserver served.
//!
//! A second test, `zero_touch_containers`, runs `docker/docker-compose.watch.yml` over the same
//! stack: appservers and frontservers from plain images (no rollcall inside) registered by a
//! `rollcall docker` service through the docker socket. It times their arrival in DNS, scaling
//! up and down, `docker kill`, `docker pause`/`unpause`, a failing health check and a restart
//! of the watcher (nothing may leave DNS meanwhile), each under load through the proxy tier.
//! The two tests run one after the other (they share the daemon and the cores).
//!
//! The test needs root (the docker daemon) and creates only its own things: a compose project
//! `rollcalltest<pid>`, its network on a free /24, its volume, images tagged `test-<pid>`, a
//! throw-away container of the proxyserver image (the 503 page), the copied hipache tarball, and
//! the `debian:12-slim` base when it is missing (seeded with docker/seed-debian.sh). All are
//! removed at the end, pass or fail (set ROLLCALL_TEST_KEEP_BASE=1 to keep a seeded base image).

#[path = "util/mod.rs"]
mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use util::{eventually, query_msg, require};

const FRONTEND: &str = "localhost";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    out
}

fn run_ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn docker(args: &[&str]) -> String {
    run_ok(Command::new("docker").args(args))
}

/// A /24 no route, no docker network of this machine and none of `taken` uses: `172.31.N`.
fn free_net(taken: &[&str]) -> String {
    let routes = run_ok(Command::new(require("ip")).args(["-4", "route", "show", "table", "all"]));
    let nets = docker(&["network", "ls", "-q"]);
    let mut used = routes;
    for id in nets.split_whitespace() {
        used.push_str(&docker(&[
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
            id,
        ]));
    }
    let seed = std::process::id() as usize;
    (0..150)
        .map(|i| format!("172.31.{}", 100 + (seed + i) % 150))
        .find(|p| !used.contains(&format!("{p}.")) && !taken.contains(&p.as_str()))
        .expect("no free 172.31.x.0/24 for the test's network")
}

/// The images the stacks run (tagged `test-<pid>`), and the base image when the test seeded it:
/// removed when dropped.
struct Images {
    tag: String,
    /// The hipache tarball's name in docker/proxyserver/vendor/ (copied there for the build,
    /// removed when dropped): the proxyserver is built at its real `hipache` stage. None: at
    /// its `sync` stage, with the stand-in.
    hipache_tarball: Option<String>,
}

impl Images {
    /// The hipache tarball ROLLCALL_TEST_HIPACHE_TARBALL names, copied into the build context.
    fn vendor_hipache(tag: &str) -> Option<String> {
        let path = std::env::var_os("ROLLCALL_TEST_HIPACHE_TARBALL").filter(|p| !p.is_empty())?;
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "ROLLCALL_TEST_HIPACHE_TARBALL={}: no such file (a tar.gz of hipache 0.3.1 with its \
             node_modules: docker/proxyserver/vendor/README.md)",
            path.display()
        );
        let name = format!("rollcall-{tag}-hipache.tar.gz");
        std::fs::copy(&path, repo().join("docker/proxyserver/vendor").join(&name))
            .unwrap_or_else(|e| panic!("copying {} into the build context: {e}", path.display()));
        Some(name)
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        if let Some(name) = &self.hipache_tarball {
            let _ = std::fs::remove_file(repo().join("docker/proxyserver/vendor").join(name));
        }
        if std::env::var_os("ROLLCALL_TEST_KEEP_STACK").is_some() {
            return;
        }
        for image in [
            "rollcall-server",
            "rollcall-appserver",
            "rollcall-frontserver",
            "rollcall-proxyserver",
            "rollcall-etcd",
            "rollcall-plain-appserver",
            "rollcall-plain-frontserver",
        ] {
            let _ = run(Command::new("docker").args(["rmi", &format!("{image}:{}", self.tag)]));
        }
        let last = FINISHED.fetch_add(1, Ordering::SeqCst) + 1 == DOCKER_TESTS;
        if last
            && SEEDED_BASE.load(Ordering::SeqCst)
            && std::env::var_os("ROLLCALL_TEST_KEEP_BASE").is_none()
        {
            let _ = run(Command::new("docker").args(["rmi", "debian:12-slim"]));
        }
    }
}

/// A stack under test (one compose project); its containers, network and volumes are removed
/// when dropped.
struct Stack {
    project: String,
    tag: String,
    net: String,
    /// The /24 of docker-compose.etcd.yml's `registry` network (etcd's own).
    etcd_net: String,
    compose: Vec<String>,
    files: Vec<PathBuf>,
    /// See [`Images::hipache_tarball`].
    hipache_tarball: Option<String>,
}

impl Stack {
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("COMPOSE_PROJECT_NAME", self.project.clone()),
            (
                "COMPOSE_FILE",
                self.files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":"),
            ),
            ("ROLLCALL_NET", self.net.clone()),
            ("ROLLCALL_ETCD_NET", self.etcd_net.clone()),
            ("ROLLCALL_TAG", self.tag.clone()),
            (
                "ROLLCALL_PROXY_STAGE",
                if self.hipache_tarball.is_some() {
                    "hipache"
                } else {
                    "sync"
                }
                .into(),
            ),
            (
                "HIPACHE_TARBALL",
                self.hipache_tarball.clone().unwrap_or_default(),
            ),
            // The published port of the proxyserver: any free one (`docker port` tells).
            ("ROLLCALL_PUBLISH", "0".into()),
            ("ROLLCALL_FRONTEND", FRONTEND.into()),
        ]
    }

    fn compose_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.compose[0]);
        c.args(&self.compose[1..])
            .args(args)
            .current_dir(repo().join("docker"));
        for (k, v) in self.env() {
            c.env(k, v);
        }
        c
    }

    fn compose(&self, args: &[&str]) -> String {
        run_ok(&mut self.compose_cmd(args))
    }

    /// `up -d` with this many appservers and frontservers (compose 1.29 scales every service
    /// not named back to its `scale:`, so both are always named).
    fn scale(&self, appservers: usize, frontservers: usize) {
        self.compose(&[
            "up",
            "-d",
            "--scale",
            &format!("appserver={appservers}"),
            "--scale",
            &format!("frontserver={frontservers}"),
        ]);
    }

    /// `build`, then `up` with 3 appservers and 2 frontservers, each timed and printed.
    fn bring_up(&self, built: &str, up: &str) {
        // compose 1.29 leaves the container of a failed build step behind unless told not to
        // (v2 builds with BuildKit, which leaves none).
        let force_rm: &[&str] = if self.compose[0].ends_with("docker-compose") {
            &["--force-rm"]
        } else {
            &[]
        };
        let t = Instant::now();
        self.compose(&[&["build"][..], force_rm, &["proxyserver"][..]].concat());
        eprintln!(
            "compose build proxyserver ({}): {:.1} s",
            match &self.hipache_tarball {
                Some(t) => format!("hipache stage, hipache 0.3.1 from {t}"),
                None => "sync stage".into(),
            },
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        self.compose(&[&["build"][..], force_rm].concat());
        eprintln!("{built}: {:.1} s", t.elapsed().as_secs_f64());
        let t = Instant::now();
        self.scale(3, 2);
        eprintln!("{up}: {:.1} s", t.elapsed().as_secs_f64());
    }

    /// Running containers of a service (full ids, sorted).
    fn ids(&self, service: &str) -> Vec<String> {
        let out = docker(&[
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ]);
        let mut v: Vec<String> = out.split_whitespace().map(str::to_string).collect();
        v.sort();
        v
    }

    fn one(&self, service: &str) -> String {
        let ids = self.ids(service);
        assert_eq!(ids.len(), 1, "one {service} container expected: {ids:?}");
        ids[0].clone()
    }

    fn dns(&self) -> SocketAddr {
        format!("{}.53:1053", self.net).parse().unwrap()
    }

    fn redis_list(&self) -> Vec<String> {
        let proxy = self.one("proxyserver");
        let out = docker(&[
            "exec",
            &proxy,
            "redis-cli",
            "lrange",
            &format!("frontend:{FRONTEND}"),
            "0",
            "-1",
        ]);
        out.lines().map(str::to_string).collect()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::env::var_os("ROLLCALL_TEST_KEEP_STACK").is_some() {
            eprintln!(
                "ROLLCALL_TEST_KEEP_STACK: leaving project {} up",
                self.project
            );
            return;
        }
        let out = run(&mut self.compose_cmd(&[
            "down",
            "--volumes",
            "--remove-orphans",
            "--timeout",
            "3",
        ]));
        if !out.status.success() {
            eprintln!(
                "cleanup: compose down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // What roll.sh or a failed step may have left with the project's label.
        let left = run(Command::new("docker").args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
        ]));
        for id in String::from_utf8_lossy(&left.stdout).split_whitespace() {
            let _ = run(Command::new("docker").args(["rm", "-f", id]));
        }
        for net in ["cluster", "registry"] {
            let _ = run(Command::new("docker").args([
                "network",
                "rm",
                &format!("{}_{net}", self.project),
            ]));
        }
    }
}

/// The container's address on the stack's network (`<project>_cluster`; a frontserver over
/// etcd is on etcd's `registry` network too), or on its only network.
fn ip_of(id: &str) -> String {
    let out = docker(&[
        "inspect",
        "-f",
        "{{range $n, $s := .NetworkSettings.Networks}}{{$n}}={{$s.IPAddress}} {{end}}",
        id,
    ]);
    let nets: Vec<(&str, &str)> = out
        .split_whitespace()
        .filter_map(|p| p.split_once('='))
        .collect();
    match nets.as_slice() {
        [(_, ip)] => ip.to_string(),
        _ => nets
            .iter()
            .find(|(n, _)| n.ends_with("_cluster"))
            .unwrap_or_else(|| panic!("container {id}: no address on a *_cluster network: {out}"))
            .1
            .to_string(),
    }
}

fn hostname_of(id: &str) -> String {
    docker(&["inspect", "-f", "{{.Config.Hostname}}", id])
        .trim()
        .to_string()
}

fn ips(ids: &[String]) -> BTreeSet<String> {
    ids.iter().map(|i| ip_of(i)).collect()
}

/// `A name` from the rollcall container: the sorted addresses, or None (no answer / error).
fn dns_a(dns: SocketAddr, name: &str) -> Option<BTreeSet<String>> {
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let q = query_msg(name, RecordType::A, None);
    sock.send_to(&q, dns).ok()?;
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    let m = Message::from_vec(&buf[..n]).ok()?;
    Some(util::addrs(&m).into_iter().collect())
}

// ---------------------------------------------------------------------------------------------
// Load: one new connection per request, as the trial's load.py.

#[derive(Clone, Debug)]
struct Sample {
    at: Instant,
    target: String,
    /// The appserver node that answered, or what went wrong.
    result: Result<String, String>,
    /// The frontserver the request came through, as the appserver saw it (`X-Peer-Addr`).
    via: Option<String>,
}

/// Where the load goes: a fixed list of frontserver addresses, or the stand-in for hipache.
#[derive(Clone)]
struct Targets(Arc<RwLock<Vec<String>>>);

struct Load {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    threads: Vec<JoinHandle<()>>,
}

/// GET `path` with `Host: localhost` (one connection): the whole response, head and body.
fn get_raw(addr: &str, path: &str) -> Result<String, String> {
    let sa: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s =
        TcpStream::connect_timeout(&sa, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {FRONTEND}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.to_string())?;
    Ok(body)
}

/// GET /hello/load with `Host: localhost`: the appserver node that answered, and the address it
/// saw the request come from (the frontserver).
fn get(addr: &str) -> Result<(String, Option<String>), String> {
    let body = get_raw(addr, "/hello/load")?;
    let status = body.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!(
            "HTTP {status}: {}",
            body.lines().next().unwrap_or("")
        ));
    }
    let via = body
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .lines()
        .find_map(|h| {
            let (k, v) = h.split_once(':')?;
            k.eq_ignore_ascii_case("x-peer-addr")
                .then(|| v.trim().to_string())
        });
    // "Hello load, I'm <node> !"
    body.rsplit("I'm ")
        .next()
        .map(|n| (n.trim_end_matches(['!', ' ', '\n', '\r']).to_string(), via))
        .ok_or_else(|| format!("unexpected body {body:?}"))
}

impl Load {
    /// `threads` clients, each: pick a target at random, GET, pause 20 ms.
    fn start(targets: Targets, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..threads)
            .map(|i| {
                let (stop, samples, targets) = (stop.clone(), samples.clone(), targets.clone());
                std::thread::spawn(move || {
                    let mut n = i;
                    while !stop.load(Ordering::Relaxed) {
                        let target = {
                            let t = targets.0.read().unwrap();
                            if t.is_empty() {
                                None
                            } else {
                                n = n.wrapping_mul(1103515245).wrapping_add(12345);
                                Some(t[(n >> 8) % t.len()].clone())
                            }
                        };
                        let (result, via) = match target.as_deref().map(get) {
                            Some(Ok((node, via))) => (Ok(node), via),
                            Some(Err(e)) => (Err(e), None),
                            None => (Err("no target: the list is empty".into()), None),
                        };
                        samples.lock().unwrap().push(Sample {
                            at: Instant::now(),
                            target: target.unwrap_or_default(),
                            result,
                            via,
                        });
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            })
            .collect();
        Load {
            stop,
            samples,
            threads,
        }
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        Arc::try_unwrap(self.samples)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_else(|a| a.lock().unwrap().clone())
    }
}

fn failures(samples: &[Sample]) -> Vec<&Sample> {
    samples.iter().filter(|s| s.result.is_err()).collect()
}

fn summary(what: &str, samples: &[Sample], t0: Instant) -> usize {
    let failed = failures(samples);
    eprintln!(
        "{what}: {} requests, {} failed{}",
        samples.len(),
        failed.len(),
        failed
            .iter()
            .take(5)
            .map(|s| format!(
                "\n    +{:.2}s {} {:?}",
                s.at.saturating_duration_since(t0).as_secs_f64(),
                s.target,
                s.result
            ))
            .collect::<String>()
    );
    failed.len()
}

/// The stand-in for hipache: keeps `targets` equal to the proxyserver's redis list
/// (`frontend:localhost` = [identifier, http://addr:port, ...]), re-read every 100 ms.
struct StandIn {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StandIn {
    fn start(proxy: String, targets: Targets) -> StandIn {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let out = Command::new("docker")
                    .args([
                        "exec",
                        &proxy,
                        "redis-cli",
                        "lrange",
                        "frontend:localhost",
                        "0",
                        "-1",
                    ])
                    .output();
                if let Ok(out) = out {
                    if out.status.success() {
                        let list: Vec<String> = String::from_utf8_lossy(&out.stdout)
                            .lines()
                            .skip(1)
                            .filter_map(|u| u.strip_prefix("http://").map(str::to_string))
                            .collect();
                        *targets.0.write().unwrap() = list;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        StandIn {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Each change of an answer: when, and the addresses (None: no answer).
type Changes = Vec<(Instant, Option<BTreeSet<String>>)>;

/// Polls `A appserver.cluster` every 10 ms; records each change of the answer.
struct DnsWatch {
    stop: Arc<AtomicBool>,
    changes: Arc<Mutex<Changes>>,
    thread: Option<JoinHandle<()>>,
}

impl DnsWatch {
    fn start(dns: SocketAddr, name: &'static str) -> DnsWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let changes = Arc::new(Mutex::new(Vec::new()));
        let (s, c) = (stop.clone(), changes.clone());
        let thread = std::thread::spawn(move || {
            let mut last: Option<Option<BTreeSet<String>>> = None;
            while !s.load(Ordering::Relaxed) {
                let now = dns_a(dns, name);
                if last.as_ref() != Some(&now) {
                    c.lock().unwrap().push((Instant::now(), now.clone()));
                    last = Some(now);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        DnsWatch {
            stop,
            changes,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Changes {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.changes.lock().unwrap().clone()
    }

    /// When `ip` was first missing from an answer after `t0`.
    fn gone_at(changes: &Changes, ip: &str, t0: Instant) -> Option<Duration> {
        changes
            .iter()
            .filter(|(at, _)| *at >= t0)
            .find(|(_, set)| set.as_ref().is_some_and(|s| !s.contains(ip)))
            .map(|(at, _)| *at - t0)
    }
}

fn nginx_master(id: &str) -> String {
    docker(&["exec", id, "cat", "/run/nginx.pid"])
        .trim()
        .to_string()
}

/// PIDs (host's view) of the nginx worker processes in a container: a reload replaces them.
fn nginx_workers(id: &str) -> BTreeSet<String> {
    docker(&["top", id, "-eo", "pid,args"])
        .lines()
        .filter(|l| l.contains("nginx: worker"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn node_names(ids: &[String]) -> BTreeMap<String, String> {
    ids.iter().map(|i| (hostname_of(i), i.clone())).collect()
}

fn compose_program() -> Vec<String> {
    match std::env::var("ROLLCALL_TEST_COMPOSE") {
        Ok(c) if !c.trim().is_empty() => c.split_whitespace().map(str::to_string).collect(),
        _ => {
            require("docker-compose");
            vec!["docker-compose".into()]
        }
    }
}

/// Where the load "through the proxy tier" goes: real hipache on the proxyserver's address
/// (hipache stage), or the stand-in following the proxyserver's redis list (sync stage). Checks
/// that requests through it reach every one of `fronts` (the frontservers) and nothing fails.
fn through_proxy(
    stack: &Stack,
    proxy: &str,
    fronts: &BTreeSet<String>,
) -> (Targets, Option<StandIn>) {
    let targets = Targets(Arc::new(RwLock::new(Vec::new())));
    let standin = if stack.hipache_tarball.is_some() {
        let target = format!("{}:80", ip_of(proxy));
        // start.sh starts hipache once the list is in redis (or after 30 s), and hipache takes
        // a moment to spawn its workers: wait until it answers, then measure.
        let mut last = Err(String::new());
        assert!(
            eventually(Duration::from_secs(45), || {
                last = get(&target);
                last.is_ok()
            }),
            "hipache on {target} does not answer: {last:?}"
        );
        *targets.0.write().unwrap() = vec![target];
        None
    } else {
        let standin = StandIn::start(proxy.to_string(), targets.clone());
        assert!(eventually(Duration::from_secs(5), || {
            targets.0.read().unwrap().len() == fronts.len()
        }));
        Some(standin)
    };
    let what = if standin.is_some() {
        "the stand-in for hipache"
    } else {
        "hipache"
    };
    let t0 = Instant::now();
    let load = Load::start(targets.clone(), 4);
    std::thread::sleep(Duration::from_secs(3));
    let samples = load.finish();
    assert_eq!(summary(&format!("through {what}"), &samples, t0), 0);
    let seen: BTreeSet<String> = samples.iter().filter_map(|s| s.via.clone()).collect();
    assert_eq!(
        &seen, fronts,
        "requests through {what} should reach every frontserver"
    );
    (targets, standin)
}

/// A container this test started outside compose: removed when dropped.
struct ThrowAway(String);

impl Drop for ThrowAway {
    fn drop(&mut self) {
        let _ = run(Command::new("docker").args(["rm", "-f", &self.0]));
    }
}

/// Port 80 of a proxyserver without hipache (the `sync` stage, or HIPACHE_CMD empty) answers
/// 503 with a page that says so and names the frontservers, not a bare connection reset.
fn assert_no_hipache_page(addr: &str, fronts: &BTreeSet<String>) {
    let mut page = String::new();
    let ok = eventually(Duration::from_secs(20), || {
        page = get_raw(addr, "/hello/you").unwrap_or_else(|e| e);
        page.starts_with("HTTP/1.1 503 ")
            && fronts
                .iter()
                .all(|f| page.contains(&format!("http://{f}:80")))
    });
    assert!(ok, "port 80 without hipache at {addr}: {page}");
    assert!(page.contains("no hipache in this proxyserver"), "{page}");
    assert!(page.contains("ROLLCALL_PROXY_STAGE=sync"), "{page}");
}

/// The docker tests share one daemon and the machine's 2 cores: they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());
/// The docker tests in this file, and how many have finished: the last one removes a base
/// image this process seeded.
const DOCKER_TESTS: usize = 2;
static FINISHED: AtomicUsize = AtomicUsize::new(0);
static SEEDED_BASE: AtomicBool = AtomicBool::new(false);

/// What every docker test needs first: a daemon, the release binary, the base image.
fn setup() -> Images {
    require("docker");
    let info = run(Command::new("docker").args(["info", "-f", "{{.ServerVersion}}"]));
    assert!(
        info.status.success(),
        "no docker daemon answers (tests/run.sh installs docker.io and starts dockerd): {}",
        String::from_utf8_lossy(&info.stderr)
    );
    eprintln!(
        "docker daemon {}",
        String::from_utf8_lossy(&info.stdout).trim()
    );

    // What ships: the release binary, built now if it is out of date.
    let t = Instant::now();
    run_ok(
        Command::new(env!("CARGO"))
            .args(["build", "--release", "--locked", "--bin", "rollcall"])
            .current_dir(repo()),
    );
    eprintln!("cargo build --release: {:.1} s", t.elapsed().as_secs_f64());

    let missing_base = run(Command::new("docker").args(["image", "inspect", "debian:12-slim"]))
        .status
        .code()
        != Some(0);
    let tag = format!("test-{}", std::process::id());
    let images = Images {
        hipache_tarball: Images::vendor_hipache(&tag),
        tag,
    };
    eprintln!(
        "proxy tier: {}",
        match &images.hipache_tarball {
            Some(_) => "real hipache 0.3.1 (the proxyserver's hipache stage, from \
                        ROLLCALL_TEST_HIPACHE_TARBALL)"
                .to_string(),
            None => "the proxyserver's sync stage and a stand-in for hipache (set \
                     ROLLCALL_TEST_HIPACHE_TARBALL to build and use real hipache)"
                .to_string(),
        }
    );
    if missing_base {
        let t = Instant::now();
        run_ok(&mut Command::new(repo().join("docker/seed-debian.sh")));
        SEEDED_BASE.store(true, Ordering::SeqCst);
        eprintln!(
            "seeded debian:12-slim in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    images
}

#[test]
fn the_stack_in_containers() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let images = setup();
    eprintln!("\n== one rollcall server (docker/docker-compose.yml)");
    one_server(&images);
    eprintln!("\n== several rollcall servers over etcd (+ docker/docker-compose.etcd.yml)");
    over_etcd(&images);
}

fn stack(images: &Images, suffix: &str, files: &[&str]) -> Stack {
    let net = free_net(&[]);
    Stack {
        project: format!("rollcalltest{}{suffix}", std::process::id()),
        tag: images.tag.clone(),
        etcd_net: free_net(&[&net]),
        net,
        compose: compose_program(),
        files: files
            .iter()
            .map(|f| repo().join("docker").join(f))
            .collect(),
        hipache_tarball: images.hipache_tarball.clone(),
    }
}

fn one_server(images: &Images) {
    let stack = stack(images, "", &["docker-compose.yml"]);
    stack.bring_up("compose build (4 images)", "compose up (7 containers)");

    let dns = stack.dns();
    let apps = stack.ids("appserver");
    let fronts = stack.ids("frontserver");
    assert_eq!((apps.len(), fronts.len()), (3, 2));
    let app_ips = ips(&apps);

    // 1. DNS lists exactly the appservers' container addresses (and the frontservers').
    let t = Instant::now();
    assert!(
        eventually(Duration::from_secs(30), || dns_a(dns, "appserver.cluster.")
            .is_some_and(|a| a == app_ips)),
        "appserver.cluster should be {app_ips:?}, is {:?}",
        dns_a(dns, "appserver.cluster.")
    );
    eprintln!(
        "all appservers in DNS {:.2} s after up",
        t.elapsed().as_secs_f64()
    );
    let front_ips = ips(&fronts);
    assert!(eventually(Duration::from_secs(30), || dns_a(
        dns,
        "frontserver.cluster."
    )
    .is_some_and(|a| a == front_ips)));
    let server = stack.one("rollcall");
    let proxy = stack.one("proxyserver");
    assert_eq!(
        dns_a(dns, "ns.cluster."),
        Some(BTreeSet::from([ip_of(&server)])),
        "ns.cluster is the server's own address"
    );
    assert_eq!(ip_of(&server), format!("{}.53", stack.net));
    assert_eq!(
        dns_a(dns, "proxyserver.cluster."),
        Some(BTreeSet::from([ip_of(&proxy)]))
    );
    // The proxyserver's redis holds the frontservers.
    let want_list = |ips: &BTreeSet<String>| -> Vec<String> {
        std::iter::once("frontserver".to_string())
            .chain(ips.iter().map(|i| format!("http://{i}:80")))
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(20), || stack.redis_list()
            == want_list(&front_ips)),
        "redis frontend:localhost = {:?}, want {:?}",
        stack.redis_list(),
        want_list(&front_ips)
    );

    // The README's `curl -H 'Host: localhost' http://127.0.0.1/hello/you`, on the host port the
    // proxyserver is published on: real hipache answers through a frontserver; without hipache
    // (sync stage) port 80 answers a 503 page that says why.
    let published = docker(&["port", &proxy, "80/tcp"]);
    let port = published
        .lines()
        .next()
        .and_then(|l| l.trim().rsplit(':').next())
        .unwrap_or_else(|| panic!("the proxyserver's port 80 is not published: {published:?}"))
        .to_string();
    let local = format!("127.0.0.1:{port}");
    if stack.hipache_tarball.is_some() {
        let mut answer = String::new();
        assert!(
            eventually(Duration::from_secs(20), || {
                answer = get_raw(&local, "/hello/you").unwrap_or_else(|e| e);
                answer.starts_with("HTTP/1.1 200 ") && answer.contains("Hello you, I'm ")
            }),
            "curl through hipache on {local}: {answer}"
        );
        eprintln!("through hipache on {local}: {:?}", answer.lines().last());
        // The same image without hipache (HIPACHE_CMD empty, as in the sync stage).
        let plain = ThrowAway(
            docker(&[
                "run",
                "-d",
                "--network",
                &format!("{}_cluster", stack.project),
                "-e",
                "HIPACHE_CMD=",
                "-e",
                "ROLLCALL_API=http://rollcall:8053",
                &format!("rollcall-proxyserver:{}", stack.tag),
            ])
            .trim()
            .to_string(),
        );
        assert_no_hipache_page(&format!("{}:80", ip_of(&plain.0)), &front_ips);
        drop(plain);
    } else {
        assert_no_hipache_page(&local, &front_ips);
    }
    eprintln!("without hipache: port 80 answers 503 with a page saying so");

    // 2. Requests through each frontserver spread over all appservers.
    let direct = Targets(Arc::new(RwLock::new(
        front_ips.iter().map(|i| format!("{i}:80")).collect(),
    )));
    let t0 = Instant::now();
    let load = Load::start(direct.clone(), 4);
    std::thread::sleep(Duration::from_secs(4));
    let samples = load.finish();
    assert_eq!(summary("spread", &samples, t0), 0);
    let names = node_names(&apps);
    for fs in &front_ips {
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for s in samples.iter().filter(|s| s.target.starts_with(fs.as_str())) {
            *per.entry(s.result.as_deref().unwrap()).or_default() += 1;
        }
        eprintln!("frontserver {fs}: {per:?}");
        assert_eq!(
            per.keys().map(|k| k.to_string()).collect::<BTreeSet<_>>(),
            names.keys().cloned().collect::<BTreeSet<_>>(),
            "frontserver {fs} did not reach every appserver"
        );
    }

    // 3. Scale appservers 3 -> 4 under load: served by both frontservers, no nginx reload.
    let masters: Vec<String> = fronts.iter().map(|f| nginx_master(f)).collect();
    let workers: Vec<BTreeSet<String>> = fronts.iter().map(|f| nginx_workers(f)).collect();
    assert!(workers.iter().all(|w| !w.is_empty()));
    let watch = DnsWatch::start(dns, "appserver.cluster.");
    let load = Load::start(direct.clone(), 4);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    stack.scale(4, 2);
    let up_took = t0.elapsed();
    let apps4 = stack.ids("appserver");
    assert_eq!(apps4.len(), 4);
    let new_id = apps4.iter().find(|i| !apps.contains(i)).unwrap().clone();
    let new_name = hostname_of(&new_id);
    let new_ip = ip_of(&new_id);
    let served_by_all = || {
        let s = load.samples.lock().unwrap();
        front_ips.iter().all(|fs| {
            s.iter().any(|x| {
                x.target.starts_with(fs.as_str()) && x.result.as_deref() == Ok(new_name.as_str())
            })
        })
    };
    assert!(
        eventually(Duration::from_secs(20), served_by_all),
        "the new appserver {new_name} was not served by both frontservers"
    );
    let first_served = {
        let s = load.samples.lock().unwrap();
        s.iter()
            .find(|x| x.result.as_deref() == Ok(new_name.as_str()))
            .map(|x| x.at - t0)
            .unwrap()
    };
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.finish();
    let changes = watch.finish();
    let in_dns = changes
        .iter()
        .find(|(at, s)| *at >= t0 && s.as_ref().is_some_and(|s| s.contains(&new_ip)))
        .map(|(at, _)| *at - t0);
    eprintln!(
        "scale 3 -> 4: compose {:.2} s, in DNS +{:.2} s, first served +{:.2} s",
        up_took.as_secs_f64(),
        in_dns.unwrap_or_default().as_secs_f64(),
        first_served.as_secs_f64()
    );
    assert_eq!(summary("scale 3 -> 4", &samples, t0), 0);
    let after: Vec<String> = fronts.iter().map(|f| nginx_master(f)).collect();
    assert_eq!(masters, after, "nginx was restarted");
    let workers_after: Vec<BTreeSet<String>> = fronts.iter().map(|f| nginx_workers(f)).collect();
    assert_eq!(
        workers, workers_after,
        "nginx was reloaded (new worker processes)"
    );

    // From here on the load goes through the proxy tier: real hipache, or the stand-in for it
    // (see the top of this file).
    let (via_proxy, standin) = through_proxy(&stack, &proxy, &front_ips);

    // 4. docker stop of an appserver under load: zero failed requests.
    let victim = apps4[0].clone();
    let victim_ip = ip_of(&victim);
    let victim_name = hostname_of(&victim);
    let watch = DnsWatch::start(dns, "appserver.cluster.");
    let load = Load::start(via_proxy.clone(), 4);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    docker(&["stop", &victim]);
    let stop_took = t0.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.finish();
    let changes = watch.finish();
    let gone = DnsWatch::gone_at(&changes, &victim_ip, t0);
    let last_served = samples
        .iter()
        .filter(|s| s.result.as_deref() == Ok(victim_name.as_str()))
        .map(|s| s.at.saturating_duration_since(t0))
        .max();
    eprintln!(
        "docker stop appserver: returned after {:.2} s, gone from DNS +{:.3} s, last served +{:.2} s",
        stop_took.as_secs_f64(),
        gone.map(|g| g.as_secs_f64()).unwrap_or(f64::NAN),
        last_served.map(|g| g.as_secs_f64()).unwrap_or(f64::NAN)
    );
    assert!(gone.is_some(), "the stopped appserver stayed in DNS");
    assert_eq!(summary("docker stop appserver", &samples, t0), 0);
    let exit = docker(&["inspect", "-f", "{{.State.ExitCode}}", &victim]);
    assert_eq!(
        exit.trim(),
        "0",
        "the appserver's agent exits 0 after a clean stop"
    );

    // 5. docker stop of a frontserver under load: zero failed requests.
    let fvictim = fronts[0].clone();
    let fvictim_ip = ip_of(&fvictim);
    let load = Load::start(via_proxy.clone(), 4);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    docker(&["stop", &fvictim]);
    let stop_took = t0.elapsed();
    let list_after = stack.redis_list();
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.finish();
    let last_served = samples
        .iter()
        .filter(|s| s.via.as_deref() == Some(fvictim_ip.as_str()) && s.result.is_ok())
        .map(|s| s.at.saturating_duration_since(t0))
        .max();
    eprintln!(
        "docker stop frontserver: returned after {:.2} s, last request through it +{:.2} s",
        stop_took.as_secs_f64(),
        last_served.map(|g| g.as_secs_f64()).unwrap_or(f64::NAN)
    );
    assert!(
        !list_after.contains(&format!("http://{fvictim_ip}:80")),
        "the stopped frontserver is still in redis: {list_after:?}"
    );
    assert_eq!(summary("docker stop frontserver", &samples, t0), 0);
    let exit = docker(&["inspect", "-f", "{{.State.ExitCode}}", &fvictim]);
    assert_eq!(
        exit.trim(),
        "0",
        "nginx stopped gracefully (SIGQUIT) and the agent exit 0"
    );
    let logs = run(Command::new("docker").args(["logs", &fvictim]));
    let log = String::from_utf8_lossy(&logs.stderr);
    assert!(
        log.contains("SIGQUIT"),
        "the agent did not send nginx SIGQUIT after the drain:\n{log}"
    );

    // 6. Scaling frontservers: the proxyserver's redis list follows. (First the stopped
    //    containers go, or compose would start them again.)
    stack.compose(&["rm", "-f"]);
    let t0 = Instant::now();
    stack.scale(3, 3);
    let fronts3 = stack.ids("frontserver");
    assert_eq!(fronts3.len(), 3);
    let f3 = ips(&fronts3);
    assert!(
        eventually(Duration::from_secs(20), || stack.redis_list()
            == want_list(&f3)),
        "redis should list 3 frontservers {f3:?}: {:?}",
        stack.redis_list()
    );
    eprintln!(
        "frontservers 1 -> 3: redis list follows in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let t0 = Instant::now();
    stack.scale(3, 2);
    let f2 = ips(&stack.ids("frontserver"));
    assert_eq!(f2.len(), 2);
    assert!(
        eventually(Duration::from_secs(20), || stack.redis_list()
            == want_list(&f2)),
        "redis should list 2 frontservers {f2:?}: {:?}",
        stack.redis_list()
    );
    eprintln!(
        "frontservers 3 -> 2: redis list follows in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let apps3 = stack.ids("appserver");
    assert_eq!(apps3.len(), 3);
    assert!(eventually(Duration::from_secs(20), || dns_a(
        dns,
        "appserver.cluster."
    )
    .is_some_and(|a| a == ips(&apps3))));

    // 7. docker kill of an appserver: gone from DNS (the agent's session closes with it).
    let kvictim = apps3[0].clone();
    let kvictim_ip = ip_of(&kvictim);
    let watch = DnsWatch::start(dns, "appserver.cluster.");
    let load = Load::start(via_proxy.clone(), 4);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    docker(&["kill", &kvictim]);
    assert!(
        eventually(Duration::from_secs(10), || dns_a(dns, "appserver.cluster.")
            .is_some_and(|a| !a.contains(&kvictim_ip))),
        "the killed appserver stayed in DNS"
    );
    std::thread::sleep(Duration::from_secs(2));
    let samples = load.finish();
    let changes = watch.finish();
    let gone = DnsWatch::gone_at(&changes, &kvictim_ip, t0).unwrap();
    let slow = samples.iter().filter(|s| s.at >= t0).count();
    eprintln!(
        "docker kill appserver: gone from DNS +{:.3} s ({} requests after the kill)",
        gone.as_secs_f64(),
        slow
    );
    assert!(
        gone < Duration::from_secs(5),
        "gone only after the lease: {gone:?}"
    );
    assert_eq!(summary("docker kill appserver", &samples, t0), 0);
    stack.compose(&["rm", "-f"]);
    stack.scale(3, 2);
    let apps3 = stack.ids("appserver");
    assert!(eventually(Duration::from_secs(20), || dns_a(
        dns,
        "appserver.cluster."
    )
    .is_some_and(|a| a == ips(&apps3))));

    // 8. Restart of the rollcall container: registrations back from the volume, agents
    //    re-attached, nginx serving.
    let load = Load::start(via_proxy.clone(), 4);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    docker(&["restart", "-t", "5", &server]);
    let restart_took = t0.elapsed();
    let back = eventually(Duration::from_secs(10), || {
        dns_a(dns, "appserver.cluster.").is_some_and(|a| a == ips(&apps3))
    });
    let dns_back = t0.elapsed();
    assert!(back, "appservers not back in DNS after the restart");
    let logs = run(Command::new("docker").args(["logs", "--since", "30s", &server]));
    let log = String::from_utf8_lossy(&logs.stderr);
    assert!(
        log.contains("restored registrations"),
        "the server did not restore from its volume:\n{log}"
    );
    // Every agent re-attached: each node's session is live again (the API, from the host).
    let api = format!("http://{}.53:8053", stack.net);
    let attached = eventually(Duration::from_secs(15), || {
        let v: serde_json::Value = match util::http()
            .get(format!("{api}/v1/roles/appserver"))
            .send()
            .and_then(|r| r.json())
        {
            Ok(v) => v,
            Err(_) => return false,
        };
        let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
        nodes.len() == 3 && nodes.iter().all(|n| n["session"] == true)
    });
    let attached_at = t0.elapsed();
    assert!(
        attached,
        "the agents did not re-attach to the restarted server"
    );
    // nginx 1.22 resends a lost resolver query only after 5 s (hard-coded), and requests that
    // wait on it fail after resolver_timeout (2 s): a query sent while the server was down costs
    // a few 502s until then (counted above, not hidden). From 6 s on, nothing may fail.
    let settle_from = t0 + Duration::from_secs(6);
    std::thread::sleep(settle_from.saturating_duration_since(Instant::now()));
    std::thread::sleep(Duration::from_secs(4));
    let samples = load.finish();
    let late: Vec<Sample> = samples
        .iter()
        .filter(|s| s.at >= settle_from + Duration::from_secs(2))
        .cloned()
        .collect();
    eprintln!(
        "docker restart rollcall: returned {:.2} s, appservers in DNS +{:.2} s, agents re-attached +{:.2} s",
        restart_took.as_secs_f64(),
        dns_back.as_secs_f64(),
        attached_at.as_secs_f64()
    );
    summary("during the restart", &samples, t0);
    assert!(!late.is_empty());
    assert_eq!(
        summary("after the restart", &late, settle_from),
        0,
        "nginx is not serving after the rollcall restart"
    );

    // 9. Rolling replacement of the appservers: the role is never empty, nothing fails.
    let watch = DnsWatch::start(dns, "appserver.cluster.");
    let load = Load::start(via_proxy.clone(), 4);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    let compose_env = stack.compose.join(" ");
    let mut roll = Command::new(repo().join("docker/roll.sh"));
    roll.arg("appserver").env("COMPOSE", &compose_env);
    for (k, v) in stack.env() {
        roll.env(k, v);
    }
    run_ok(&mut roll);
    let roll_took = t0.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.finish();
    let changes = watch.finish();
    let smallest = changes
        .iter()
        .filter(|(at, _)| *at >= t0)
        .map(|(_, s)| s.as_ref().map_or(0, |s| s.len()))
        .min()
        .unwrap_or(0);
    let rolled = stack.ids("appserver");
    eprintln!(
        "roll.sh appserver: {:.1} s for 3 replicas, smallest answer {} addresses",
        roll_took.as_secs_f64(),
        smallest
    );
    assert_eq!(rolled.len(), 3);
    assert!(
        rolled.iter().all(|i| !apps3.contains(i)),
        "not every appserver was replaced"
    );
    assert!(
        smallest >= 3,
        "the role shrank during the roll: {smallest} addresses"
    );
    assert_eq!(summary("roll.sh appserver", &samples, t0), 0);
    assert!(eventually(Duration::from_secs(20), || dns_a(
        dns,
        "appserver.cluster."
    )
    .is_some_and(|a| a == ips(&rolled))));

    drop(standin);
    let t0 = Instant::now();
    drop(stack);
    eprintln!(
        "cleanup (compose down, images): {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// `true` when every answer recorded after `t0` held all of `want` (no timeout either).
fn never_lost(
    changes: &[(Instant, Option<BTreeSet<String>>)],
    want: &BTreeSet<String>,
    t0: Instant,
) -> bool {
    changes
        .iter()
        .filter(|(at, _)| *at >= t0)
        .all(|(_, s)| s.as_ref().is_some_and(|s| s.is_superset(want)))
}

/// `etcdctl ARGS` inside an etcd member (as root: it reads every key and password of the
/// stack's pki volume), over TLS with the members' certificate.
fn etcdctl(stack: &Stack, member: &str, args: &str) -> Output {
    let id = stack.one(member);
    let pki = "/etc/rollcall-etcd";
    run(Command::new("docker").args([
        "exec",
        "-u",
        "0",
        &id,
        "sh",
        "-c",
        &format!(
            "ETCDCTL_API=3 etcdctl --endpoints https://127.0.0.1:2379 --cacert {pki}/ca.pem \
             --cert {pki}/etcd.pem --key {pki}/etcd.key --dial-timeout 2s {args}"
        ),
    ]))
}

/// The etcd service (`etcd1`..`etcd3`) that leads, asked of each member itself.
fn etcd_leader(stack: &Stack) -> String {
    for i in 1..=3 {
        let out = etcdctl(stack, &format!("etcd{i}"), "endpoint status -w json");
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            continue;
        };
        let status = &v[0]["Status"];
        if status["leader"].is_u64() && status["leader"] == status["header"]["member_id"] {
            return format!("etcd{i}");
        }
    }
    panic!("no etcd member says it leads");
}

/// etcd is nobody else's: not reachable from an appserver, TLS with client certificates only,
/// authentication on, and rollcall's user limited to its prefix.
fn etcd_is_closed(stack: &Stack, app: &str) {
    let etcd1 = format!("{}.21", stack.etcd_net);
    // From an appserver (on the stack's network only), no route to etcd.
    let out = run(Command::new("docker").args([
        "exec",
        app,
        "python3",
        "-c",
        "import socket, sys; socket.create_connection((sys.argv[1], 2379), 3); print('connected')",
        &etcd1,
    ]));
    assert!(
        !out.status.success(),
        "an appserver reached etcd at {etcd1}:2379: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!(
        "an appserver cannot reach etcd: {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
    );
    // Plain HTTP, and TLS without a client certificate, are refused.
    let member = stack.one("etcd1");
    let pki = "/etc/rollcall-etcd";
    let check = |args: &[&str]| {
        run(Command::new("docker")
            .args(["exec", &member, "rollcall", "check"])
            .args(args))
    };
    let plain = check(&["http://127.0.0.1:2379/health"]);
    assert!(!plain.status.success(), "etcd answered plain HTTP");
    let ca = format!("{pki}/ca.pem");
    let no_cert = check(&["--ca-file", &ca, "https://127.0.0.1:2379/health"]);
    assert!(
        !no_cert.status.success(),
        "etcd answered a client without a certificate"
    );
    let (cert, key) = (format!("{pki}/etcd.pem"), format!("{pki}/etcd.key"));
    let with_cert = check(&[
        "--ca-file",
        &ca,
        "--client-cert",
        &cert,
        "--client-key",
        &key,
        "https://127.0.0.1:2379/health",
    ]);
    assert!(
        with_cert.status.success(),
        "etcd refused the members' own certificate: {}",
        String::from_utf8_lossy(&with_cert.stderr)
    );
    // Authentication is on: a certificate that names no user reads nothing.
    let anon = etcdctl(stack, "etcd1", "get --prefix --keys-only /rollcall/");
    assert!(
        !anon.status.success()
            && String::from_utf8_lossy(&anon.stderr).contains("permission denied"),
        "etcd served keys to a client that is no user: {:?}",
        anon
    );
    // rollcall's user reads and writes its prefix, and nothing else.
    let user = format!("--user rollcall:$(cat {pki}/rollcall-password)");
    let mine = etcdctl(
        stack,
        "etcd1",
        &format!("{user} get --prefix --keys-only /rollcall/"),
    );
    assert!(
        mine.status.success() && String::from_utf8_lossy(&mine.stdout).contains("/appserver/"),
        "rollcall's user cannot read its prefix: {mine:?}"
    );
    let other = etcdctl(stack, "etcd1", &format!("{user} put /elsewhere x"));
    assert!(
        !other.status.success()
            && String::from_utf8_lossy(&other.stderr).contains("permission denied"),
        "rollcall's user wrote outside its prefix: {other:?}"
    );
    eprintln!(
        "etcd: plain HTTP refused, TLS without a client certificate refused, a certificate \
         naming no user reads nothing, rollcall's user is held to /rollcall/"
    );
}

fn over_etcd(images: &Images) {
    let stack = stack(
        images,
        "etcd",
        &["docker-compose.yml", "docker-compose.etcd.yml"],
    );
    stack.bring_up("compose build (the etcd image; the others cached)", "compose up (3 etcd, 2 rollcall, 3 appservers, 2 frontservers with their own rollcall, proxyserver)");
    let net = stack.net.clone();
    let apps = stack.ids("appserver");
    let fronts = stack.ids("frontserver");
    assert_eq!((apps.len(), fronts.len()), (3, 2));
    let app_ips = ips(&apps);
    let front_ips = ips(&fronts);
    let central: Vec<SocketAddr> = [53, 54]
        .iter()
        .map(|h| format!("{net}.{h}:1053").parse().unwrap())
        .collect();
    let locals: Vec<SocketAddr> = front_ips
        .iter()
        .map(|ip| format!("{ip}:1053").parse().unwrap())
        .collect();

    // 1. Every server (the two central ones, each frontserver's own) answers the same sets, and
    //    the frontservers are registered with their container addresses (their agents register
    //    through the server on their own loopback first).
    let t = Instant::now();
    for srv in central.iter().chain(&locals) {
        assert!(
            eventually(Duration::from_secs(30), || {
                dns_a(*srv, "appserver.cluster.").is_some_and(|a| a == app_ips)
                    && dns_a(*srv, "frontserver.cluster.").is_some_and(|a| a == front_ips)
            }),
            "server {srv}: appserver {:?} (want {app_ips:?}), frontserver {:?} (want {front_ips:?})",
            dns_a(*srv, "appserver.cluster."),
            dns_a(*srv, "frontserver.cluster.")
        );
    }
    eprintln!(
        "all 4 servers answer every node {:.2} s after up",
        t.elapsed().as_secs_f64()
    );
    let want_list: Vec<String> = std::iter::once("frontserver".to_string())
        .chain(front_ips.iter().map(|i| format!("http://{i}:80")))
        .collect();
    assert!(
        eventually(Duration::from_secs(20), || stack.redis_list() == want_list),
        "redis: {:?}, want {want_list:?}",
        stack.redis_list()
    );

    etcd_is_closed(&stack, &apps[0]);

    let proxy = stack.one("proxyserver");
    let (via_proxy, standin) = through_proxy(&stack, &proxy, &front_ips);

    // 2. kill -9 of the rollcall server the appservers hold their sessions on, under load.
    let rc1 = stack.one("rollcall");
    let watch2 = DnsWatch::start(central[1], "appserver.cluster.");
    let watch_local = DnsWatch::start(locals[0], "appserver.cluster.");
    let load = Load::start(via_proxy.clone(), 4);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    docker(&["kill", &rc1]);
    let api2 = format!("http://{net}.54:8053");
    let moved = eventually(Duration::from_secs(15), || {
        util::api_nodes(&api2, "appserver")
            .is_some_and(|s| s.len() == 3 && s.values().all(|live| *live))
    });
    let moved_at = t0.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let samples = load.finish();
    let (c2, cl) = (watch2.finish(), watch_local.finish());
    eprintln!(
        "docker kill rollcall: appservers' sessions on rollcall2 +{:.2} s",
        moved_at.as_secs_f64()
    );
    assert!(
        moved,
        "the agents did not move to rollcall2: {:?}",
        util::api_nodes(&api2, "appserver")
    );
    assert!(
        never_lost(&c2, &app_ips, t0) && never_lost(&cl, &app_ips, t0),
        "an appserver left the other servers' answers: {c2:?} / {cl:?}"
    );
    assert_eq!(summary("docker kill rollcall", &samples, t0), 0);

    // 3. kill -9 of the etcd leader, under load.
    let leader = etcd_leader(&stack);
    let leader_id = stack.one(&leader);
    let watch2 = DnsWatch::start(central[1], "appserver.cluster.");
    let watch_local = DnsWatch::start(locals[1], "appserver.cluster.");
    let load = Load::start(via_proxy.clone(), 4);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    docker(&["kill", &leader_id]);
    std::thread::sleep(Duration::from_secs(4));
    let samples = load.finish();
    let (c2, cl) = (watch2.finish(), watch_local.finish());
    eprintln!("docker kill {leader} (the etcd leader)");
    assert!(
        never_lost(&c2, &app_ips, t0) && never_lost(&cl, &app_ips, t0),
        "an appserver left the answers during the etcd election: {c2:?} / {cl:?}"
    );
    assert_eq!(summary("docker kill etcd leader", &samples, t0), 0);

    // 4. Writes still work with one central server and 2 of 3 etcd members: scale 3 -> 4 under
    //    load, then docker stop of an appserver.
    let load = Load::start(via_proxy.clone(), 4);
    let t0 = Instant::now();
    stack.compose(&[
        "up",
        "-d",
        "--no-deps",
        "--no-recreate",
        "--scale",
        "appserver=4",
        "appserver",
    ]);
    let apps4 = stack.ids("appserver");
    assert_eq!(apps4.len(), 4);
    let new_id = apps4.iter().find(|i| !apps.contains(i)).unwrap().clone();
    let new_name = hostname_of(&new_id);
    let served = eventually(Duration::from_secs(20), || {
        let s = load.samples.lock().unwrap();
        front_ips.iter().all(|fs| {
            s.iter().any(|x| {
                x.via.as_deref() == Some(fs.as_str())
                    && x.result.as_deref() == Ok(new_name.as_str())
            })
        })
    });
    let served_at = t0.elapsed();
    assert!(
        served,
        "the new appserver was not served by both frontservers"
    );
    let all4 = ips(&apps4);
    for srv in std::iter::once(&central[1]).chain(&locals) {
        assert!(eventually(Duration::from_secs(10), || dns_a(
            *srv,
            "appserver.cluster."
        )
        .is_some_and(|a| a == all4)));
    }
    let victim = apps[0].clone();
    let victim_ip = ip_of(&victim);
    let t1 = Instant::now();
    docker(&["stop", &victim]);
    for srv in std::iter::once(&central[1]).chain(&locals) {
        assert!(
            eventually(Duration::from_secs(5), || dns_a(*srv, "appserver.cluster.")
                .is_some_and(|a| !a.contains(&victim_ip) && a.len() == 3)),
            "the stopped appserver stayed in {srv}"
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.finish();
    eprintln!(
        "scale 3 -> 4 with rollcall and {leader} down: served by both frontservers +{:.2} s; docker stop appserver {:.2} s",
        served_at.as_secs_f64(),
        t1.elapsed().as_secs_f64()
    );
    assert_eq!(summary("scale up and stop, degraded", &samples, t0), 0);

    drop(standin);
    let t0 = Instant::now();
    drop(stack);
    eprintln!(
        "cleanup (compose down): {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// Zero-touch containers: docker/docker-compose.watch.yml, plain images registered by
// `rollcall docker`.

/// The container's name as the watcher makes it a node name (`proj_appserver_1` ->
/// `proj-appserver-1`).
fn node_of(id: &str) -> String {
    let name = docker(&["inspect", "-f", "{{.Name}}", id]);
    let mut out = String::new();
    for c in name.trim().trim_start_matches('/').chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_string()
}

/// When `ip` was first in an answer after `t0`.
fn back_at(changes: &Changes, ip: &str, t0: Instant) -> Option<Duration> {
    changes
        .iter()
        .filter(|(at, _)| *at >= t0)
        .find(|(_, set)| set.as_ref().is_some_and(|s| s.contains(ip)))
        .map(|(at, _)| *at - t0)
}

fn secs(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.3} s", d.as_secs_f64()))
        .unwrap_or_else(|| "never".into())
}

#[test]
fn zero_touch_containers() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let images = setup();
    eprintln!(
        "\n== zero-touch containers: plain images registered by rollcall docker \
         (+ docker/docker-compose.watch.yml)"
    );
    let stack = stack(
        &images,
        "watch",
        &["docker-compose.yml", "docker-compose.watch.yml"],
    );
    stack.bring_up("compose build (5 images)", "compose up (8 containers)");
    let t_up = Instant::now();
    let dns = stack.dns();
    let apps = stack.ids("appserver");
    let fronts = stack.ids("frontserver");
    assert_eq!((apps.len(), fronts.len()), (3, 2));
    let watcher = stack.one("watcher");
    assert_eq!(
        docker(&[
            "inspect",
            "-f",
            "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}",
            &watcher
        ])
        .trim(),
        "none",
        "the watcher runs without the server image's health check"
    );

    // 1. The plain containers have no rollcall inside, and appear in DNS all the same, under
    //    their container names, once their health checks pass.
    for id in apps.iter().chain(&fronts) {
        let found = docker(&["exec", id, "sh", "-c", "command -v rollcall; true"]);
        assert_eq!(found.trim(), "", "{id} has rollcall inside");
    }
    let app_ips = ips(&apps);
    let front_ips = ips(&fronts);
    assert!(
        eventually(Duration::from_secs(30), || {
            dns_a(dns, "appserver.cluster.").is_some_and(|a| a == app_ips)
                && dns_a(dns, "frontserver.cluster.").is_some_and(|a| a == front_ips)
        }),
        "appserver.cluster should be {app_ips:?}, is {:?}; frontserver.cluster should be \
         {front_ips:?}, is {:?}",
        dns_a(dns, "appserver.cluster."),
        dns_a(dns, "frontserver.cluster.")
    );
    eprintln!(
        "zero-touch: all 5 containers in DNS {:.2} s after compose up returned",
        t_up.elapsed().as_secs_f64()
    );
    for id in &apps {
        let name = format!("{}.appserver.cluster.", node_of(id));
        assert_eq!(
            dns_a(dns, &name),
            Some(BTreeSet::from([ip_of(id)])),
            "{name} should be the container's address"
        );
    }
    let proxy = stack.one("proxyserver");
    let (via_proxy, _standin) = through_proxy(&stack, &proxy, &front_ips);

    // 2. Scale appservers 3 -> 4 under load: the new one in DNS once healthy, 0 failed.
    let watch = DnsWatch::start(dns, "appserver.cluster.");
    let load = Load::start(via_proxy.clone(), 4);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    stack.scale(4, 2);
    let up_took = t0.elapsed();
    let apps4 = stack.ids("appserver");
    assert_eq!(apps4.len(), 4);
    let new_id = apps4.iter().find(|i| !apps.contains(i)).unwrap().clone();
    let new_ip = ip_of(&new_id);
    let new_host = hostname_of(&new_id);
    assert!(
        eventually(Duration::from_secs(20), || load
            .samples
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.result.as_deref() == Ok(new_host.as_str()))),
        "the new appserver was never served"
    );
    let first_served = load
        .samples
        .lock()
        .unwrap()
        .iter()
        .find(|s| s.result.as_deref() == Ok(new_host.as_str()))
        .map(|s| s.at - t0);
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.finish();
    let changes = watch.finish();
    let in_dns = back_at(&changes, &new_ip, t0);
    eprintln!(
        "zero-touch: scale 3 -> 4: compose {:.2} s, in DNS +{}, first served +{}",
        up_took.as_secs_f64(),
        secs(in_dns),
        secs(first_served)
    );
    assert!(in_dns.is_some());
    assert_eq!(summary("zero-touch: scale 3 -> 4", &samples, t0), 0);

    // 3. Scale appservers 4 -> 3 under load (compose stops one: SIGTERM, the `kill` event):
    //    out of DNS at once, 0 failed.
    let ips4: BTreeMap<String, String> = apps4.iter().map(|i| (i.clone(), ip_of(i))).collect();
    let watch = DnsWatch::start(dns, "appserver.cluster.");
    let load = Load::start(via_proxy.clone(), 4);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    stack.scale(3, 2);
    let down_took = t0.elapsed();
    let apps3 = stack.ids("appserver");
    assert_eq!(apps3.len(), 3);
    let gone_id = apps4.iter().find(|i| !apps3.contains(i)).unwrap().clone();
    let gone_ip = ips4[&gone_id].clone();
    std::thread::sleep(Duration::from_secs(2));
    let samples = load.finish();
    let changes = watch.finish();
    let gone = DnsWatch::gone_at(&changes, &gone_ip, t0);
    eprintln!(
        "zero-touch: scale 4 -> 3: compose {:.2} s, gone from DNS +{}",
        down_took.as_secs_f64(),
        secs(gone)
    );
    assert!(gone.is_some(), "the removed appserver stayed in DNS");
    assert_eq!(summary("zero-touch: scale 4 -> 3", &samples, t0), 0);

    // 4. docker kill of an appserver under load: out of DNS at the `kill` event, 0 failed.
    let victim = apps3[0].clone();
    let victim_ip = ip_of(&victim);
    let watch = DnsWatch::start(dns, "appserver.cluster.");
    let load = Load::start(via_proxy.clone(), 4);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    docker(&["kill", &victim]);
    std::thread::sleep(Duration::from_secs(2));
    let samples = load.finish();
    let changes = watch.finish();
    let gone = DnsWatch::gone_at(&changes, &victim_ip, t0);
    eprintln!(
        "zero-touch: docker kill appserver: gone from DNS +{}",
        secs(gone)
    );
    assert!(gone.is_some(), "the killed appserver stayed in DNS");
    assert_eq!(
        summary("zero-touch: docker kill appserver", &samples, t0),
        0
    );
    // Back to 3 running appservers (compose starts the killed one again).
    stack.scale(3, 2);
    let apps3 = stack.ids("appserver");
    let app_ips = ips(&apps3);
    assert!(
        eventually(Duration::from_secs(20), || dns_a(dns, "appserver.cluster.")
            .is_some_and(|a| a == app_ips)),
        "3 appservers again"
    );

    // 5. docker pause / unpause of an appserver under load: out of DNS while paused, back
    //    after. A request nginx sent it just before holds until the unpause (counted, not
    //    asserted: the existing stack's test has no pause either).
    let victim = apps3[1].clone();
    let victim_ip = ip_of(&victim);
    let watch = DnsWatch::start(dns, "appserver.cluster.");
    let load = Load::start(via_proxy.clone(), 4);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    docker(&["pause", &victim]);
    std::thread::sleep(Duration::from_secs(3));
    let t1 = Instant::now();
    docker(&["unpause", &victim]);
    std::thread::sleep(Duration::from_secs(3));
    let samples = load.finish();
    let changes = watch.finish();
    let gone = DnsWatch::gone_at(&changes, &victim_ip, t0);
    let back = back_at(&changes, &victim_ip, t1);
    let failed = summary("zero-touch: docker pause + unpause appserver", &samples, t0);
    eprintln!(
        "zero-touch: docker pause appserver: gone from DNS +{}; unpause: back in DNS +{}; \
         {failed} of {} requests failed",
        secs(gone),
        secs(back),
        samples.len()
    );
    assert!(gone.is_some(), "the paused appserver stayed in DNS");
    assert!(back.is_some(), "the unpaused appserver did not come back");

    // 6. A failing health check: out of DNS once docker says unhealthy, back once healthy;
    //    the app still answers meanwhile, so nothing fails.
    let victim = apps3[2].clone();
    let victim_ip = ip_of(&victim);
    let watch = DnsWatch::start(dns, "appserver.cluster.");
    let load = Load::start(via_proxy.clone(), 4);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    docker(&["exec", &victim, "touch", "/tmp/unhealthy"]);
    assert!(
        eventually(Duration::from_secs(20), || dns_a(dns, "appserver.cluster.")
            .is_some_and(|a| !a.contains(&victim_ip))),
        "the unhealthy appserver stayed in DNS"
    );
    let t1 = Instant::now();
    docker(&["exec", &victim, "rm", "/tmp/unhealthy"]);
    assert!(
        eventually(Duration::from_secs(20), || dns_a(dns, "appserver.cluster.")
            .is_some_and(|a| a.contains(&victim_ip))),
        "the healthy appserver did not come back"
    );
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.finish();
    let changes = watch.finish();
    let gone = DnsWatch::gone_at(&changes, &victim_ip, t0);
    let back = back_at(&changes, &victim_ip, t1);
    eprintln!(
        "zero-touch: health check failing: gone from DNS +{} (interval 2 s x 2 retries); \
         passing again: back +{}",
        secs(gone),
        secs(back)
    );
    assert_eq!(summary("zero-touch: unhealthy appserver", &samples, t0), 0);

    // 7. Restarting the watcher under load: nothing leaves DNS, nothing fails.
    let app_ips = ips(&apps3);
    let apps_watch = DnsWatch::start(dns, "appserver.cluster.");
    let fronts_watch = DnsWatch::start(dns, "frontserver.cluster.");
    let load = Load::start(via_proxy.clone(), 4);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    docker(&["restart", "-t", "5", &watcher]);
    let restart_took = t0.elapsed();
    // Past one renewal period of the new watcher (ttl 10 s / 3) and more.
    std::thread::sleep(Duration::from_secs(5));
    let samples = load.finish();
    let a = apps_watch.finish();
    let f = fronts_watch.finish();
    eprintln!(
        "zero-touch: docker restart of the watcher: {:.2} s; appserver.cluster answers seen: \
         {}, frontserver.cluster: {}",
        restart_took.as_secs_f64(),
        a.len(),
        f.len()
    );
    // Every answer (a query lost on the way is no answer, not a change) is the whole set.
    for (what, changes, want) in [("appserver", &a, &app_ips), ("frontserver", &f, &front_ips)] {
        assert!(
            changes
                .iter()
                .all(|(_, s)| s.as_ref().is_none_or(|s| s == want)),
            "{what}.cluster changed during the watcher's restart: {changes:?}"
        );
    }
    assert_eq!(summary("zero-touch: watcher restart", &samples, t0), 0);
    let logs = run(Command::new("docker").args(["logs", &watcher]));
    let log = String::from_utf8_lossy(&logs.stderr);
    assert!(
        log.contains("stopping: the registrations stay"),
        "the watcher's log:\n{log}"
    );
}

/// `rollcall docker` without an engine, or with bad flags, says what to do (no daemon needed).
#[test]
fn the_watcher_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    let out = run(Command::new(util::rollcall_bin()).args([
        "docker",
        "--docker-socket",
        socket.to_str().unwrap(),
    ]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cannot reach the docker engine at {}: no such socket. Is dockerd running?",
            socket.display()
        )) && err.contains("see --docker-socket"),
        "{err}"
    );
    // A socket nobody listens on.
    let _dead = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    drop(_dead);
    let out = run(Command::new(util::rollcall_bin()).args([
        "docker",
        "--docker-socket",
        &format!("unix://{}", socket.display()),
    ]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the docker engine") && err.contains("Is dockerd running"),
        "{err}"
    );
    for (args, needle) in [
        (&["--ttl", "0"][..], "--ttl 0 is out of range"),
        (&["--api", "ftp://x"][..], "--api"),
        (
            &["--docker-socket", "tcp://127.0.0.1:2375"][..],
            "--docker-socket",
        ),
    ] {
        let out = run(Command::new(util::rollcall_bin()).arg("docker").args(args));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let out = run(Command::new(util::rollcall_bin()).args(["docker", "--help"]));
    let help = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for needle in [
        "rollcall.role (required",
        "rollcall.network",
        "rollcall.meta.KEY",
        "HEALTHCHECK",
        "[env: ROLLCALL_DOCKER_SOCKET=]",
        "[default: /var/run/docker.sock]",
        "[env: ROLLCALL_DOCKER_TTL=]",
        "--deregister-on-exit",
    ] {
        assert!(
            help.contains(needle),
            "docker --help lacks {needle:?}:\n{help}"
        );
    }
}
