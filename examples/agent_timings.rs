//! How fast does DNS follow the node agent? Measures, over N repetitions (default 12):
//!
//! * agent start      -> the node's name answers in DNS
//! * SIGTERM          -> the name is gone (the agent deregisters)
//! * kill -9          -> the name is gone (the kernel closes the session socket)
//! * silent loss      -> the name is gone (the lease, --ttl 3, runs out). As root with `ip`:
//!   the agent runs in its own network namespace and its veth link is taken down at a random
//!   point of the ping cycle; otherwise the agent is SIGSTOPped (socket open, silent).
//!
//! Run (the example drives the release binary, which cargo does not build for examples):
//!
//! ```text
//! cargo build --release && cargo run --release --example agent_timings [-- REPETITIONS]
//! ```
//!
//! DNS is polled every millisecond over UDP, so the figures are good to about 1 ms.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};

const TTL: &str = "3";

fn rollcall_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ROLLCALL_BIN") {
        return p.into();
    }
    // target/release/examples/agent_timings -> target/release/rollcall
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("rollcall"))
        .unwrap();
    if !bin.is_file() {
        eprintln!(
            "{} is missing: run `cargo build --release` first (or set ROLLCALL_BIN)",
            bin.display()
        );
        std::process::exit(2);
    }
    bin
}

fn kill(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a process this program started.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

fn run(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A UDP DNS client polling one name.
struct Dns {
    sock: UdpSocket,
    server: SocketAddr,
    id: u16,
}

impl Dns {
    fn new(server: SocketAddr) -> Dns {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        Dns {
            sock,
            server,
            id: 0,
        }
    }

    /// Whether `name` has an A record now.
    fn present(&mut self, name: &str) -> bool {
        self.id = self.id.wrapping_add(1);
        let mut m = Message::new(self.id, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        self.sock
            .send_to(&m.to_vec().unwrap(), self.server)
            .unwrap();
        let mut buf = [0u8; 4096];
        loop {
            let Ok(n) = self.sock.recv(&mut buf) else {
                return false;
            };
            if let Ok(r) = Message::from_vec(&buf[..n]) {
                if r.id == self.id {
                    return !r.answers.is_empty();
                }
            }
        }
    }

    /// Polls every millisecond until `present(name) == want`; the time it took.
    fn until(&mut self, name: &str, want: bool, since: Instant) -> Duration {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.present(name) != want {
            assert!(
                Instant::now() < deadline,
                "{name} did not become {want} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        since.elapsed()
    }
}

struct Server {
    child: Child,
    dns: SocketAddr,
    http: SocketAddr,
}

impl Server {
    fn start(http_ip: &str, dir: &std::path::Path) -> Server {
        let mut child = Command::new(rollcall_bin())
            .args(["serve", "--dns-listen", "127.0.0.1:0", "--http-listen"])
            .arg(format!("{http_ip}:0"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--zones")
            .arg(dir.join("zones"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting rollcall serve");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let field = |line: &str, key: &str| -> SocketAddr {
            let at = line.find(key).unwrap() + key.len();
            line[at..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let (mut dns, mut http) = (None, None);
        while dns.is_none() || http.is_none() {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("rollcall serve did not start");
            if line.contains("listening for DNS") {
                dns = Some(field(&line, "udp="));
            }
            if line.contains("listening for HTTP") {
                http = Some(field(&line, "http="));
            }
        }
        Server {
            child,
            dns: dns.unwrap(),
            http: http.unwrap(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        kill(self.child.id(), libc::SIGTERM);
        let _ = self.child.wait();
    }
}

/// A network namespace with a veth pair, for a real silent network loss.
struct NetNs {
    name: String,
    host_if: String,
    host_ip: String,
}

impl NetNs {
    fn create() -> Option<NetNs> {
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } != 0 || !run("ip", &["-V"]) {
            return None;
        }
        let id = std::process::id();
        let net = format!("10.232.{}.{}", (id >> 8) % 256, (id % 64) * 4);
        let base: Vec<u8> = net.split('.').map(|p| p.parse().unwrap()).collect();
        let host_ip = format!("10.232.{}.{}", base[2], base[3] + 1);
        let ns_ip = format!("10.232.{}.{}", base[2], base[3] + 2);
        let ns = NetNs {
            name: format!("rollcall-timings-{id}"),
            host_if: format!("rct{}", id % 1_000_000),
            host_ip,
        };
        let peer = format!("rcu{}", id % 1_000_000);
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), ns.name.clone()],
            vec![
                "link".into(),
                "add".into(),
                ns.host_if.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                peer.clone(),
            ],
            vec![
                "link".into(),
                "set".into(),
                peer.clone(),
                "netns".into(),
                ns.name.clone(),
            ],
            vec![
                "addr".into(),
                "add".into(),
                format!("{}/30", ns.host_ip),
                "dev".into(),
                ns.host_if.clone(),
            ],
            vec!["link".into(), "set".into(), ns.host_if.clone(), "up".into()],
            vec![
                "-n".into(),
                ns.name.clone(),
                "addr".into(),
                "add".into(),
                format!("{ns_ip}/30"),
                "dev".into(),
                peer.clone(),
            ],
            vec![
                "-n".into(),
                ns.name.clone(),
                "link".into(),
                "set".into(),
                peer.clone(),
                "up".into(),
            ],
        ];
        for s in &steps {
            let args: Vec<&str> = s.iter().map(String::as_str).collect();
            if !run("ip", &args) {
                eprintln!("ip {} failed: falling back to SIGSTOP", args.join(" "));
                return None;
            }
        }
        Some(ns)
    }

    fn link(&self, up: bool) {
        assert!(run(
            "ip",
            &["link", "set", &self.host_if, if up { "up" } else { "down" }]
        ));
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        run("ip", &["netns", "del", &self.name]);
        run("ip", &["link", "del", &self.host_if]);
    }
}

fn agent(api: &str, node: &str, netns: Option<&str>) -> Child {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(rollcall_bin());
            c
        }
        None => Command::new(rollcall_bin()),
    };
    cmd.args([
        "register", "--api", api, "--role", "timing", "--node", node, "--ttl", TTL,
    ])
    .env("RUST_LOG", "warn")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("starting rollcall register")
}

fn summary(label: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = if v.len() % 2 == 1 {
        ms(v[v.len() / 2])
    } else {
        (ms(v[v.len() / 2 - 1]) + ms(v[v.len() / 2])) / 2.0
    };
    println!(
        "{label:<40} n={:<3} median {:>8.1} ms   min {:>8.1} ms   max {:>8.1} ms",
        v.len(),
        median,
        ms(v[0]),
        ms(v[v.len() - 1])
    );
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("REPETITIONS is a number"))
        .unwrap_or(12);
    let dir = tempfile::tempdir().unwrap();
    let netns = NetNs::create();
    let server = Server::start(
        netns.as_ref().map_or("127.0.0.1", |n| n.host_ip.as_str()),
        dir.path(),
    );
    let api = format!("http://{}", server.http);
    let mut dns = Dns::new(server.dns);
    eprintln!(
        "rollcall at {api}, DNS {}; {reps} repetitions; silent loss by {}",
        server.dns,
        if netns.is_some() {
            "taking a network namespace's veth link down"
        } else {
            "SIGSTOP of the agent (not root, or no `ip`)"
        }
    );

    let (mut start, mut term, mut kill9, mut silent) = (vec![], vec![], vec![], vec![]);
    for i in 0..reps {
        // Start -> in DNS, then SIGTERM -> gone.
        let node = format!("t{i}");
        let name = format!("{node}.timing.cluster.");
        let t = Instant::now();
        let mut a = agent(&api, &node, None);
        start.push(dns.until(&name, true, t));
        std::thread::sleep(Duration::from_millis(rand::random_range(100..1100)));
        let t = Instant::now();
        kill(a.id(), libc::SIGTERM);
        term.push(dns.until(&name, false, t));
        let _ = a.wait();

        // kill -9 -> gone.
        let node = format!("k{i}");
        let name = format!("{node}.timing.cluster.");
        let mut a = agent(&api, &node, None);
        dns.until(&name, true, Instant::now());
        std::thread::sleep(Duration::from_millis(rand::random_range(100..1100)));
        let t = Instant::now();
        let _ = a.kill();
        kill9.push(dns.until(&name, false, t));
        let _ = a.wait();

        // Silent loss -> gone, at a random point of the ping cycle.
        let node = format!("s{i}");
        let name = format!("{node}.timing.cluster.");
        let mut a = agent(&api, &node, netns.as_ref().map(|n| n.name.as_str()));
        dns.until(&name, true, Instant::now());
        std::thread::sleep(Duration::from_millis(rand::random_range(1000..2000)));
        let t = Instant::now();
        match &netns {
            Some(n) => n.link(false),
            None => kill(a.id(), libc::SIGSTOP),
        }
        silent.push(dns.until(&name, false, t));
        match &netns {
            Some(n) => n.link(true),
            None => kill(a.id(), libc::SIGCONT),
        }
        let _ = a.kill();
        let _ = a.wait();
        eprintln!(
            "  #{i}: start {:?}, SIGTERM {:?}, kill -9 {:?}, silent {:?}",
            start[i], term[i], kill9[i], silent[i]
        );
    }
    println!();
    summary("agent start -> name in DNS", start);
    summary("SIGTERM -> name gone", term);
    summary("kill -9 of the agent -> name gone", kill9);
    summary(
        &format!(
            "silent loss (--ttl {TTL}, {}) -> gone",
            if netns.is_some() { "netns" } else { "SIGSTOP" }
        ),
        silent,
    );
}
