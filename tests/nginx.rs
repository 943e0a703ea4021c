//! System tests of the frontserver tier with real parts: `rollcall serve`, a real nginx (Debian's
//! 1.22) running the shipped `docker/frontserver/nginx.conf` (addresses substituted), and bottle
//! appservers (`docker/appserver/app.py`), each wrapped by
//! `rollcall register ... -- python3 app.py` on its own loopback address (127.0.0.N, node appN).
//!
//! Timings are measured and printed, never asserted tightly: the bounds below are generous
//! ceilings on behaviour ("gone at once" = within 2 s, "expires with its TTL" = not in the first
//! second, gone within TTL + 3 s). The figures for the README come from
//! `cargo run --release --example agent_timings`.

#[path = "util/mod.rs"]
mod util;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use util::netns::{ip, NetNs};
use util::process::{alive, children_of, cmdline, kill, wait_exit, Killed};
use util::{api_nodes, dns_a, echo_lines, eventually, require, rollcall_bin, ServeProc};

const ROLE: &str = "appserver";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A python3 that has bottle (Debian's python3-bottle lives in /usr/bin/python3's path; a
/// pyenv or venv python3 earlier on PATH may not see it).
fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        for candidate in ["/usr/bin/python3", "python3"] {
            let ok = Command::new(candidate)
                .args(["-c", "import bottle"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return PathBuf::from(candidate);
            }
        }
        panic!(
            "python3 with bottle is not installed: run tests/run.sh, which installs python3-bottle"
        );
    })
}

// ---------------------------------------------------------------------------------------------
// Processes, ports, DNS.

/// A port free for both UDP and TCP on 127.0.0.1 (for DNS).
fn free_dns_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A TCP port free on every one of `ips`.
fn free_tcp_port(ips: &[Ipv4Addr]) -> u16 {
    loop {
        let first = TcpListener::bind((ips[0], 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        let rest: Vec<_> = ips[1..]
            .iter()
            .map(|ip| TcpListener::bind((*ip, port)))
            .collect();
        if rest.iter().all(Result::is_ok) {
            return port;
        }
    }
}

fn in_dns(dns: SocketAddr, ip: &str) -> bool {
    dns_a(dns, &format!("{ROLE}.cluster.")).is_some_and(|a| a.iter().any(|x| x == ip))
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// nginx with the shipped config.

/// Replaces `from` by `to` in the config's non-comment lines; it must occur there exactly once,
/// so that a change to the shipped file breaks this test instead of silently not applying.
fn substitute(conf: &str, from: &str, to: &str) -> String {
    let mut hits = 0;
    let out: Vec<String> = conf
        .lines()
        .map(|line| {
            if !line.trim_start().starts_with('#') && line.contains(from) {
                hits += line.matches(from).count();
                line.replace(from, to)
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert_eq!(
        hits, 1,
        "docker/frontserver/nginx.conf should contain {from:?} once outside comments"
    );
    out.join("\n") + "\n"
}

struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    fn start(dir: &Path, dns: SocketAddr, app_port: u16) -> Nginx {
        let nginx = require("nginx");
        std::fs::create_dir_all(dir).unwrap();
        let shipped = std::fs::read_to_string(repo().join("docker/frontserver/nginx.conf"))
            .expect("reading docker/frontserver/nginx.conf");
        let port = free_tcp_port(&[Ipv4Addr::LOCALHOST]);
        let conf = substitute(
            &shipped,
            "resolver 127.0.0.1:1053 ",
            &format!("resolver {dns} "),
        );
        let conf = substitute(&conf, "listen 80;", &format!("listen 127.0.0.1:{port};"));
        let conf = substitute(
            &conf,
            "http://$appservers:8080;",
            &format!("http://$appservers:{app_port};"),
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let access = std::fs::File::create(dir.join("access.log")).unwrap();
        let mut child = Command::new(nginx)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf_path)
            .args(["-e", "stderr", "-g"])
            .arg(format!(
                "daemon off; pid {};",
                dir.join("nginx.pid").display()
            ))
            .stdin(Stdio::null())
            .stdout(access)
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting nginx");
        echo_lines(child.stderr.take().unwrap(), "nginx".into());
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let up = eventually(Duration::from_secs(10), || {
            TcpStream::connect(addr).is_ok() || child.try_wait().unwrap().is_some()
        });
        assert!(
            up && child.try_wait().unwrap().is_none(),
            "nginx did not start"
        );
        Nginx {
            child,
            addr,
            dir: dir.to_owned(),
        }
    }

    fn workers(&self) -> Vec<u32> {
        let mut w = children_of(self.child.id());
        w.sort();
        w
    }

    /// The last `n` lines of the access log (which shows every upstream tried per request).
    fn access_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let workers = children_of(self.child.id());
        kill(self.child.id(), libc::SIGTERM);
        if wait_exit(&mut self.child, Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for w in workers {
            if alive(w) && cmdline(w).contains("nginx") {
                kill(w, libc::SIGKILL);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Appservers under the agent.

/// `rollcall register ... -- python3 app.py` for node appN on 127.0.0.N.
struct App {
    agent: Child,
    node: String,
    ip: String,
    python: u32,
}

impl App {
    fn start(api: &str, n: u8, port: u16, extra: &[&str]) -> App {
        let node = format!("app{n}");
        let ip = format!("127.0.0.{n}");
        let mut agent = Command::new(rollcall_bin())
            .args([
                "register", "--api", api, "--role", ROLE, "--node", &node, "--addr", &ip,
            ])
            .args(["--port", &port.to_string(), "--ttl", "3", "--drain", "2s"])
            .args(extra)
            .arg("--")
            .arg(python())
            .arg(repo().join("docker/appserver/app.py"))
            .env("APP_NODE", &node)
            .env("APP_HOST", &ip)
            .env("APP_PORT", port.to_string())
            .env("APP_ACCESS_LOG", "0")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting rollcall register");
        echo_lines(agent.stderr.take().unwrap(), node.clone());
        let mut python = 0;
        let found = eventually(Duration::from_secs(10), || {
            python = children_of(agent.id()).into_iter().next().unwrap_or(0);
            python != 0
        });
        assert!(found, "{node}: the agent did not start its command");
        App {
            agent,
            node,
            ip,
            python,
        }
    }

    fn pid(&self) -> u32 {
        self.agent.id()
    }

    /// Whether the appserver answers directly (not through nginx).
    fn answers(&self, port: u16) -> bool {
        client()
            .get(format!("http://{}:{port}/hello/direct", self.ip))
            .timeout(Duration::from_secs(2))
            .send()
            .is_ok_and(|r| r.status().is_success())
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let mut kids = children_of(self.agent.id());
        kids.push(self.python);
        let _ = self.agent.kill();
        let _ = self.agent.wait();
        for k in kids {
            if alive(k) && cmdline(k).contains("app.py") {
                kill(k, libc::SIGKILL);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The whole stack.

struct Stack {
    server: ServeProc,
    nginx: Nginx,
    /// The port every appserver listens on (each on its own address).
    port: u16,
    apps: Vec<App>,
    dns_listen: String,
    http_listen: String,
    dir: tempfile::TempDir,
}

impl Stack {
    /// rollcall on fixed free ports, nginx, and appservers app2.. on 127.0.0.2..
    fn start(apps: u8) -> Stack {
        require("nginx");
        python();
        let dir = tempfile::tempdir().unwrap();
        let dns_listen = format!("127.0.0.1:{}", free_dns_port());
        let http_listen = format!("127.0.0.1:{}", free_tcp_port(&[Ipv4Addr::LOCALHOST]));
        let server = ServeProc::start_on(
            &dns_listen,
            &http_listen,
            &dir.path().join("data"),
            &dir.path().join("zones"),
            &[],
        );
        let ips: Vec<Ipv4Addr> = (2..=6).map(|n| Ipv4Addr::new(127, 0, 0, n)).collect();
        let port = free_tcp_port(&ips);
        let nginx = Nginx::start(&dir.path().join("nginx"), server.dns, port);
        let mut stack = Stack {
            server,
            nginx,
            port,
            apps: Vec::new(),
            dns_listen,
            http_listen,
            dir,
        };
        for n in 2..2 + apps {
            stack.add(n, &[]);
        }
        stack.wait_serving();
        stack
    }

    fn add(&mut self, n: u8, extra: &[&str]) {
        let app = App::start(&self.server.api(), n, self.port, extra);
        self.apps.push(app);
    }

    fn app(&mut self, node: &str) -> &mut App {
        self.apps.iter_mut().find(|a| a.node == node).unwrap()
    }

    /// Every appserver answers directly, is in DNS, and nginx answers.
    fn wait_serving(&self) {
        for app in &self.apps {
            assert!(
                eventually(Duration::from_secs(15), || app.answers(self.port)),
                "{} does not answer on {}:{}",
                app.node,
                app.ip,
                self.port
            );
            assert!(
                eventually(Duration::from_secs(5), || in_dns(self.server.dns, &app.ip)),
                "{} is not in DNS",
                app.node
            );
        }
        assert!(
            eventually(Duration::from_secs(10), || self.get().is_ok()),
            "nginx does not serve: {}",
            self.nginx.access_tail(5)
        );
    }

    fn url(&self) -> String {
        format!("http://{}/hello/test", self.nginx.addr)
    }

    /// One request through nginx: the node that answered, or what went wrong.
    fn get(&self) -> Result<String, String> {
        get(&client(), &self.url())
    }

    fn dns_role(&self) -> Vec<String> {
        dns_a(self.server.dns, &format!("{ROLE}.cluster.")).unwrap_or_default()
    }
}

fn get(client: &reqwest::blocking::Client, url: &str) -> Result<String, String> {
    let resp = client.get(url).send().map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    let body = resp.text().map_err(|e| e.to_string())?;
    match body
        .strip_prefix("Hello test, I'm ")
        .and_then(|b| b.strip_suffix(" !"))
    {
        Some(node) if status.is_success() => Ok(node.to_owned()),
        _ => Err(format!("{status}: {body:?}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Continuous load through nginx.

struct Outcome {
    start: Instant,
    end: Instant,
    result: Result<String, String>,
}

struct Load {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
    /// Requests answered so far, per node.
    seen: Arc<Mutex<BTreeMap<String, usize>>>,
    threads: Vec<JoinHandle<Vec<Outcome>>>,
}

impl Load {
    /// `threads` clients sending requests back to back (5 ms apart) until finished.
    fn start(url: String, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let threads = (0..threads)
            .map(|_| {
                let (stop, count, url) = (stop.clone(), count.clone(), url.clone());
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let client = client();
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let start = Instant::now();
                        let result = get(&client, &url);
                        if let Ok(node) = &result {
                            *seen.lock().unwrap().entry(node.clone()).or_insert(0) += 1;
                        }
                        out.push(Outcome {
                            start,
                            end: Instant::now(),
                            result,
                        });
                        count.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    out
                })
            })
            .collect();
        let load = Load {
            stop,
            count,
            seen,
            threads,
        };
        let n = load.count.load(Ordering::Relaxed);
        assert!(
            eventually(Duration::from_secs(10), || load
                .count
                .load(Ordering::Relaxed)
                >= n + 10),
            "the load does not get going"
        );
        load
    }

    /// Requests answered by `node` so far.
    fn seen(&self, node: &str) -> usize {
        self.seen.lock().unwrap().get(node).copied().unwrap_or(0)
    }

    /// Waits until the load has run `n` more requests (false after 30 s).
    fn run_for(&self, n: usize) -> bool {
        let base = self.count.load(Ordering::Relaxed);
        eventually(Duration::from_secs(30), || {
            self.count.load(Ordering::Relaxed) >= base + n
        })
    }

    fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<Outcome> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort_by_key(|o| o.start);
        all
    }
}

fn failures(outcomes: &[Outcome], t0: Instant) -> Vec<String> {
    outcomes
        .iter()
        .filter_map(|o| {
            o.result.as_ref().err().map(|e| {
                format!(
                    "request at +{:?} (took {:?}): {e}",
                    o.start.saturating_duration_since(t0),
                    o.end - o.start
                )
            })
        })
        .collect()
}

fn served_by(outcomes: &[Outcome]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for o in outcomes {
        if let Ok(node) = &o.result {
            *m.entry(node.clone()).or_insert(0) += 1;
        }
    }
    m
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// (1) Requests through nginx reach all three appservers, each with a fair share.
#[test]
fn nginx_spreads_requests_over_all_appservers() {
    let stack = Stack::start(3);
    let client = client();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..300 {
        let node = get(&client, &stack.url())
            .unwrap_or_else(|e| panic!("request {i} through nginx failed: {e}"));
        *counts.entry(node).or_insert(0) += 1;
    }
    eprintln!("300 requests through nginx: {counts:?}");
    assert_eq!(
        counts.keys().cloned().collect::<Vec<_>>(),
        ["app2", "app3", "app4"],
        "every appserver should be reached"
    );
    // nginx picks a random starting address per request: ~100 each, sd ~8.
    for (node, n) in &counts {
        assert!(
            *n >= 60,
            "{node} got {n} of 300 requests: not a fair share ({counts:?})"
        );
    }
}

/// (2) A fourth appserver that starts is served by nginx without any reload, and (registered
/// only once its --check passes) its start costs no request.
#[test]
fn nginx_serves_a_new_appserver_without_reload() {
    let mut stack = Stack::start(3);
    let workers = stack.nginx.workers();
    let load = Load::start(stack.url(), 2);
    let t0 = Instant::now();
    let check = format!("http://127.0.0.5:{}/health", stack.port);
    stack.add(5, &["--check", &check]);
    let in_dns_ok = eventually(Duration::from_secs(15), || {
        in_dns(stack.server.dns, "127.0.0.5")
    });
    let t_dns = t0.elapsed();
    assert!(in_dns_ok, "app5 never reached DNS: {:?}", stack.dns_role());
    // Each nginx worker has its own resolver cache: wait until the load (whose connections may
    // sit on any worker) has been answered by app5 a few times.
    let served = eventually(Duration::from_secs(15), || load.seen("app5") >= 20);
    let t_served = t0.elapsed();
    assert!(
        served,
        "nginx never sent a request to app5: {}",
        stack.nginx.access_tail(10)
    );
    assert!(load.run_for(100));
    let outcomes = load.finish();
    eprintln!(
        "app5 started at +0: in DNS at +{t_dns:?}, served 20 times through nginx at +{t_served:?}; \
         {} requests meanwhile, served by {:?}",
        outcomes.len(),
        served_by(&outcomes)
    );
    let failed = failures(&outcomes, t0);
    assert!(
        failed.is_empty(),
        "requests failed while app5 joined: {failed:#?}"
    );
    assert!(served_by(&outcomes).contains_key("app5"));
    assert!(
        stack.nginx.child.try_wait().unwrap().is_none(),
        "nginx exited"
    );
    assert_eq!(
        stack.nginx.workers(),
        workers,
        "nginx workers changed: was it reloaded?"
    );
}

/// (3) An appserver stopped with SIGTERM deregisters first, drains, then stops; requests run
/// continuously through nginx and not one fails.
#[test]
fn sigterm_scales_down_without_a_failed_request() {
    let mut stack = Stack::start(3);
    let dns = stack.server.dns;
    let load = Load::start(stack.url(), 2);
    let t0 = Instant::now();
    kill(stack.app("app3").pid(), libc::SIGTERM);
    let gone = eventually(Duration::from_secs(2), || !in_dns(dns, "127.0.0.3"));
    let t_gone = t0.elapsed();
    assert!(
        gone,
        "app3 still in DNS 2 s after SIGTERM: {:?}",
        stack.dns_role()
    );
    let status = wait_exit(&mut stack.app("app3").agent, Duration::from_secs(15))
        .expect("the agent did not exit within 15 s of SIGTERM");
    let t_exit = t0.elapsed();
    // The appserver finished its requests and exited 0; the agent passes that on.
    assert_eq!(status.code(), Some(0), "agent exit status {status:?}");
    assert!(
        t_exit >= t_gone + Duration::from_millis(1500),
        "the agent should deregister, then drain (--drain 2s), then stop the appserver: \
         gone from DNS at +{t_gone:?}, exited at +{t_exit:?}"
    );
    // Keep the load running past the exit, so requests meet the departed address if nginx
    // still had it.
    assert!(load.run_for(150));
    let outcomes = load.finish();
    let last_app3 = outcomes
        .iter()
        .filter(|o| o.result.as_deref() == Ok("app3"))
        .map(|o| o.end.saturating_duration_since(t0))
        .max();
    eprintln!(
        "SIGTERM at +0: gone from DNS at +{t_gone:?}, last request served by app3 at \
         +{last_app3:?}, agent exited at +{t_exit:?}; {} requests, served by {:?}",
        outcomes.len(),
        served_by(&outcomes)
    );
    let failed = failures(&outcomes, t0);
    assert!(
        failed.is_empty(),
        "requests failed during the scale-down: {failed:#?}\n{}",
        stack.nginx.access_tail(30)
    );
    let after: Vec<&Outcome> = outcomes.iter().filter(|o| o.start > t0 + t_exit).collect();
    assert!(
        after.len() >= 50,
        "too few requests after the exit: {}",
        after.len()
    );
    assert!(after.iter().all(|o| o.result.as_deref() != Ok("app3")));
}

/// (4) An agent killed with `kill -9` vanishes from DNS at once (its session socket closes) and
/// takes its appserver with it; an agent that goes silent (SIGSTOP: its socket stays open, no
/// pings) expires with its TTL, and comes back when it resumes. No request fails meanwhile.
#[test]
fn killed_agent_vanishes_at_once_silent_one_expires_with_its_ttl() {
    let mut stack = Stack::start(3);
    let dns = stack.server.dns;
    let api = stack.server.api();
    let load = Load::start(stack.url(), 2);
    let t0 = Instant::now();

    // kill -9
    let app4 = stack.app("app4");
    let python = app4.python;
    let t = Instant::now();
    let _ = app4.agent.kill();
    let gone = eventually(Duration::from_secs(2), || !in_dns(dns, "127.0.0.4"));
    let t_kill_gone = t.elapsed();
    assert!(gone, "app4 still in DNS 2 s after kill -9 of its agent");
    let _ = app4.agent.wait();
    assert!(
        eventually(Duration::from_secs(5), || !alive(python)),
        "the appserver outlived its killed agent"
    );

    // SIGSTOP: silent, socket open. Pings every 1 s, lease 3 s: it expires 2 to 3 s after the
    // last ping, so it must still be there for the first second.
    let app2 = stack.app("app2").pid();
    let t = Instant::now();
    kill(app2, libc::SIGSTOP);
    let early = eventually(Duration::from_secs(1), || !in_dns(dns, "127.0.0.2"));
    assert!(
        !early,
        "app2 vanished at once, but a silent node should live out its lease"
    );
    let expired = eventually(Duration::from_secs(6), || !in_dns(dns, "127.0.0.2"));
    let t_silent_gone = t.elapsed();
    kill(app2, libc::SIGCONT);
    assert!(
        expired,
        "app2 did not expire within 7 s of going silent (ttl 3)"
    );
    let back = eventually(Duration::from_secs(10), || {
        in_dns(dns, "127.0.0.2")
            && api_nodes(&api, ROLE).is_some_and(|n| n.get("app2") == Some(&true))
    });
    let t_back = t.elapsed();
    assert!(back, "app2 did not come back after SIGCONT");

    assert!(load.run_for(50));
    let outcomes = load.finish();
    eprintln!(
        "kill -9 of the agent -> gone from DNS in {t_kill_gone:?}; SIGSTOP -> expired after \
         {t_silent_gone:?} (ttl 3 s), SIGCONT -> back at +{t_back:?}; {} requests, served by {:?}",
        outcomes.len(),
        served_by(&outcomes)
    );
    let failed = failures(&outcomes, t0);
    assert!(
        failed.is_empty(),
        "requests failed: {failed:#?}\n{}",
        stack.nginx.access_tail(30)
    );
}

/// (5) rollcall killed with `kill -9` and started again with the same data dir on the same
/// ports: the agents re-attach (a session each) and nginx keeps serving all appservers.
#[test]
fn rollcall_restart_agents_reattach_nginx_keeps_serving() {
    let mut stack = Stack::start(3);
    let load = Load::start(stack.url(), 2);
    let t0 = Instant::now();
    let _ = stack.server.child.kill(); // SIGKILL
    let _ = stack.server.child.wait();
    let t_down = t0.elapsed();
    stack.server = ServeProc::start_on(
        &stack.dns_listen,
        &stack.http_listen,
        &stack.dir.path().join("data"),
        &stack.dir.path().join("zones"),
        &[],
    );
    let t_up = t0.elapsed();
    let api = stack.server.api();
    let all = |n: &BTreeMap<String, bool>| {
        ["app2", "app3", "app4"]
            .iter()
            .all(|a| n.get(*a) == Some(&true))
    };
    let reattached = eventually(Duration::from_secs(10), || {
        api_nodes(&api, ROLE).is_some_and(|n| all(&n))
    });
    let t_attached = t0.elapsed();
    assert!(
        reattached,
        "the agents did not re-attach: {:?}",
        api_nodes(&api, ROLE)
    );
    assert_eq!(stack.dns_role(), ["127.0.0.2", "127.0.0.3", "127.0.0.4"]);

    // nginx keeps serving. A resolver query nginx sent in the few ms rollcall was down is lost,
    // and nginx 1.22 re-sends it only after 5 s (requests waiting on it get a 502 after
    // resolver_timeout): so failures are counted over the whole restart but asserted only from
    // 6 s after it. From then on every request succeeds and all three appservers are reached.
    let settled = t0 + t_up + Duration::from_secs(6);
    let enough = eventually(Duration::from_secs(30), || {
        Instant::now() >= settled + Duration::from_secs(2)
    });
    assert!(enough);
    assert!(load.run_for(100));
    let outcomes = load.finish();
    let restart_failures = failures(&outcomes, t0);
    let after: Vec<Outcome> = outcomes
        .into_iter()
        .filter(|o| o.start >= settled)
        .collect();
    eprintln!(
        "rollcall killed at +0 (reaped at +{t_down:?}), up again at +{t_up:?}, all agents \
         re-attached at +{t_attached:?}; failed requests across the restart: {} {:#?}",
        restart_failures.len(),
        restart_failures
    );
    let failed = failures(&after, t0);
    assert!(
        failed.is_empty(),
        "requests failed after the restart: {failed:#?}"
    );
    assert!(
        after.len() >= 200,
        "too few requests after the restart: {}",
        after.len()
    );
    let by = served_by(&after);
    assert_eq!(
        by.keys().cloned().collect::<Vec<_>>(),
        ["app2", "app3", "app4"],
        "after the restart nginx should reach every appserver: {by:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// A real silent network loss: the agent in its own network namespace, the link taken down.

/// A node whose network vanishes (the agent runs in a network namespace whose veth link is
/// taken down: no FIN, no RST, nothing) expires with its TTL, and registers again when the
/// network is back.
#[test]
fn silent_network_loss_expires_with_its_ttl() {
    require("ip");
    let ns = NetNs::create();
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProc::start_on(
        "127.0.0.1:0",
        &format!("{}:0", ns.host_ip),
        &dir.path().join("data"),
        &dir.path().join("zones"),
        &[],
    );
    let mut child = Command::new(require("ip"))
        .args(["netns", "exec", &ns.name])
        .arg(rollcall_bin())
        .args([
            "register",
            "--api",
            &server.api(),
            "--role",
            "edge",
            "--node",
            "n1",
            "--ttl",
            "3",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the agent in the namespace");
    echo_lines(child.stderr.take().unwrap(), "agent-in-netns".into());
    let _agent = Killed(child); // `ip netns exec` execs: this PID is the agent's.
    let name = "n1.edge.cluster.";
    let present = || dns_a(server.dns, name).is_some_and(|a| !a.is_empty());
    assert!(
        eventually(Duration::from_secs(10), || dns_a(server.dns, name)
            .is_some_and(|a| a == [ns.ns_ip.clone()])),
        "n1 not registered with the address the server sees ({}): {:?}",
        ns.ns_ip,
        dns_a(server.dns, name)
    );
    let t = Instant::now();
    ip(&["link", "set", &ns.host_if, "down"]);
    let early = eventually(Duration::from_secs(1), || !present());
    assert!(
        !early,
        "the node vanished at once; a silent node should live out its lease"
    );
    let expired = eventually(Duration::from_secs(6), || !present());
    let t_gone = t.elapsed();
    ip(&["link", "set", &ns.host_if, "up"]);
    assert!(
        expired,
        "the node did not expire within 7 s of losing its network (ttl 3)"
    );
    let t = Instant::now();
    let back = eventually(Duration::from_secs(15), present);
    eprintln!(
        "network down -> gone from DNS after {t_gone:?} (ttl 3 s); network up -> registered \
         again after {:?}",
        t.elapsed()
    );
    assert!(
        back,
        "the agent did not register again once the network was back"
    );
}

// ---------------------------------------------------------------------------------------------
// Several rollcall servers over etcd.

/// The topology the README recommends: a rollcall server beside nginx (its only `resolver`),
/// sharing a three-member etcd cluster with two more servers that the agents register
/// through. Killing both remote servers (`kill -9`) under load costs no request: the agents
/// move to the surviving server within their lease, and the local server's DNS never loses a
/// node.
#[test]
fn nginx_through_a_local_server_survives_killing_the_other_servers() {
    require("nginx");
    python();
    let dir = tempfile::tempdir().unwrap();
    let etcd = util::etcd::EtcdCluster::start(dir.path(), 3);
    // Every node here is on loopback (127.0.0.2-4): in etcd mode a loopback address is refused
    // unless the servers allow any address (they cannot tell which host it is local to).
    let any = ["--allow-any-addr"];
    let local = util::etcd::serve(dir.path(), "local", &etcd.endpoints_from(0), &any);
    let mut remote: Vec<ServeProc> = (1..3)
        .map(|i| util::etcd::serve(dir.path(), &format!("r{i}"), &etcd.endpoints_from(i), &any))
        .collect();
    let ips: Vec<Ipv4Addr> = (2..=4).map(|n| Ipv4Addr::new(127, 0, 0, n)).collect();
    let port = free_tcp_port(&ips);
    let nginx = Nginx::start(&dir.path().join("nginx"), local.dns, port);
    // Agents know every server, the remote ones first.
    let apis = format!("{},{},{}", remote[0].api(), remote[1].api(), local.api());
    let apps: Vec<App> = (2..=4).map(|n| App::start(&apis, n, port, &[])).collect();
    for app in &apps {
        assert!(eventually(Duration::from_secs(15), || app.answers(port)));
        assert!(eventually(Duration::from_secs(5), || in_dns(
            local.dns, &app.ip
        )));
    }
    let url = format!("http://{}/hello/test", nginx.addr);
    assert!(eventually(Duration::from_secs(10), || get(&client(), &url).is_ok()));

    let load = Load::start(url, 2);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    for r in &mut remote {
        let _ = r.child.kill();
        let _ = r.child.wait();
        std::thread::sleep(Duration::from_secs(2));
    }
    // Longer than the agents' lease (3 s) twice over: they renew through the local server now.
    std::thread::sleep(Duration::from_secs(7));
    assert!(load.run_for(50));
    let outcomes = load.finish();
    let failed = failures(&outcomes, t0);
    eprintln!(
        "{} requests through nginx while both remote rollcall servers were killed: {} failed",
        outcomes.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "requests failed: {failed:#?}");
    assert!(
        outcomes.len() >= 300,
        "too few requests: {}",
        outcomes.len()
    );
    let by = served_by(&outcomes[outcomes.len() / 2..]);
    assert_eq!(
        by.keys().cloned().collect::<Vec<_>>(),
        ["app2", "app3", "app4"],
        "every appserver still reached after the remote servers died: {by:?}"
    );
    let nodes = api_nodes(&local.api(), ROLE).unwrap();
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    drop(apps);
    drop(etcd);
}
