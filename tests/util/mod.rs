//! Shared helpers for the integration and system tests: start the real `rollcall` binary (or
//! the server in-process), talk DNS over real sockets with hickory-proto's message codec, and
//! find the system tools the tests need (a missing tool is a failure, never a silent skip).
#![allow(dead_code)]

pub mod etcd;
pub mod netns;
pub mod nsd;
pub mod process;
pub mod proxy;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};

/// The `rollcall` binary cargo built for this test run.
pub fn rollcall_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rollcall"))
}

/// Panics with an install hint when a system tool is missing (tests/run.sh installs them).
pub fn require(tool: &str) -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
    {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!("{tool} is not installed: run tests/run.sh, which installs what the tests need");
}

/// A `rollcall serve` process on loopback with port 0, killed (SIGKILL) when dropped.
pub struct ServeProc {
    pub child: Child,
    pub dns: SocketAddr,
    /// Every DNS address, in --dns-listen order (`dns` is the first).
    pub dns_all: Vec<SocketAddr>,
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    /// stderr lines after start-up.
    pub log: mpsc::Receiver<String>,
}

impl ServeProc {
    /// Starts `rollcall serve` with `args` added to loopback port-0 defaults.
    pub fn start(data_dir: &Path, zones: &Path, args: &[&str]) -> ServeProc {
        Self::start_on("127.0.0.1:0", "127.0.0.1:0", data_dir, zones, args)
    }

    pub fn start_on(
        dns: &str,
        http: &str,
        data_dir: &Path,
        zones: &Path,
        args: &[&str],
    ) -> ServeProc {
        Self::start_full(dns, http, data_dir, zones, args, &[])
    }

    /// Like [`ServeProc::start`], with extra environment variables.
    pub fn start_env(
        data_dir: &Path,
        zones: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> ServeProc {
        Self::start_full("127.0.0.1:0", "127.0.0.1:0", data_dir, zones, args, env)
    }

    pub fn start_full(
        dns: &str,
        http: &str,
        data_dir: &Path,
        zones: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> ServeProc {
        let mut child = Command::new(rollcall_bin())
            .envs(env.iter().copied())
            .args([
                "serve",
                "--dns-listen",
                dns,
                "--http-listen",
                http,
                "--dns-threads",
                "1",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--zones")
            .arg(zones)
            .args(args)
            // TEST_RUST_LOG=debug shows the servers' debug logs in a failing test's output.
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting rollcall serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[serve] {line}");
                if tx.send(line).is_err() {
                    // keep draining so the child never blocks on a full pipe
                }
            }
        });
        let (mut dns_all, mut http) = (Vec::new(), None);
        let deadline = Instant::now() + Duration::from_secs(20);
        // Kills the child if anything below panics, so no test leaves a server behind.
        struct Guard(Option<Child>);
        impl Drop for Guard {
            fn drop(&mut self) {
                if let Some(c) = self.0.as_mut() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
        let mut guard = Guard(Some(child));
        while http.is_none() {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| {
                    let status = guard.0.as_mut().map(|c| c.try_wait());
                    panic!("rollcall serve did not report its addresses; status {status:?}")
                });
            if line.contains("listening for DNS") {
                dns_all.push(field(&line, "udp="));
            }
            if line.contains("listening for HTTP") {
                http = Some(field(&line, "http="));
            }
        }
        let child = guard.0.take().expect("still here");
        ServeProc {
            child,
            dns: *dns_all
                .first()
                .expect("rollcall serve reported no DNS address"),
            dns_all,
            http: http.unwrap(),
            data_dir: data_dir.to_owned(),
            log: rx,
        }
    }

    pub fn api(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .log
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(_) => panic!("no log line containing {needle:?} within {timeout:?}"),
            }
        }
    }
}

impl Drop for ServeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field(line: &str, key: &str) -> SocketAddr {
    // Text logs: `key=value`; JSON logs (--log-format json): `"key":"value"`.
    if line.trim_start().starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
        let k = key.trim_end_matches('=');
        return v["fields"][k]
            .as_str()
            .unwrap_or_else(|| panic!("{k} not in {line:?}"))
            .parse()
            .unwrap();
    }
    let at = line
        .find(key)
        .unwrap_or_else(|| panic!("{key} not in {line:?}"))
        + key.len();
    line[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A query message for `name`/`rtype`, with EDNS advertising `edns` bytes when given.
pub fn query_msg(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn rand_id() -> u16 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        & 0xffff) as u16
}

/// Sends raw bytes over UDP and returns the raw response (None on a 2 s timeout).
pub fn udp_raw(server: SocketAddr, packet: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.send_to(packet, server).unwrap();
    let mut buf = [0u8; 65535];
    let n = sock.recv(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

/// Sends raw bytes over TCP (length-prefixed) and returns the raw response.
pub fn tcp_raw(server: SocketAddr, packet: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(server).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(packet);
    s.write_all(&framed).unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).unwrap();
    buf
}

/// Queries over UDP and decodes the answer.
pub fn udp_query(server: SocketAddr, name: &str, rtype: RecordType, edns: Option<u16>) -> Message {
    let resp = udp_raw(server, &query_msg(name, rtype, edns)).expect("no UDP answer within 2 s");
    Message::from_vec(&resp).expect("answer decodes")
}

/// Queries over TCP and decodes the answer.
pub fn tcp_query(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
    Message::from_vec(&tcp_raw(server, &query_msg(name, rtype, None))).expect("answer decodes")
}

/// The addresses in the answer section, sorted.
pub fn addrs(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            hickory_proto::rr::RData::A(a) => Some(a.0.to_string()),
            hickory_proto::rr::RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

/// Runs `dig` with `args` and returns its stdout.
pub fn dig(server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new(require("dig"))
        .arg(format!("@{}", server.ip()))
        .args([
            "-p",
            &server.port().to_string(),
            "+norec",
            "+time=2",
            "+tries=1",
        ])
        .args(args)
        .output()
        .expect("running dig");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `f` every 5 ms until it returns true or `timeout` passes; returns whether it did.
/// Asserts that a finished command exited 0, showing its stderr when it did not.
#[track_caller]
pub fn assert_succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A blocking HTTP client for tests.
pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// The value of one series of `/metrics` (`name` or `name{labels}`); panics when it is absent.
pub fn metric(api: &str, series: &str) -> f64 {
    let text = http()
        .get(format!("{api}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{series} not in /metrics:\n{text}"))
}

/// The A records of `name`, sorted; None when the server does not answer.
pub fn dns_a(dns: SocketAddr, name: &str) -> Option<Vec<String>> {
    let resp = udp_raw(dns, &query_msg(name, RecordType::A, None))?;
    Message::from_vec(&resp).ok().map(|m| addrs(&m))
}

/// Prints a child's stderr lines with a prefix.
pub fn echo_lines(stream: impl std::io::Read + Send + 'static, prefix: String) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            eprintln!("[{prefix}] {line}");
        }
    });
}

/// Every node of `role` from one server's API, by node name (its JSON as the API gives it);
/// None when the server does not answer within 5 s.
pub fn role_nodes(
    api: &str,
    role: &str,
) -> Option<std::collections::BTreeMap<String, serde_json::Value>> {
    let v: serde_json::Value = http()
        .get(format!("{api}/v1/roles/{role}"))
        .timeout(Duration::from_secs(5))
        .send()
        .ok()?
        .json()
        .ok()?;
    Some(
        v["nodes"]
            .as_array()?
            .iter()
            .map(|n| (n["node"].as_str().unwrap_or("").to_owned(), n.clone()))
            .collect(),
    )
}

/// `(node, session)` for every node of `role`, from the API.
pub fn api_nodes(api: &str, role: &str) -> Option<std::collections::BTreeMap<String, bool>> {
    Some(
        role_nodes(api, role)?
            .into_iter()
            .map(|(k, n)| (k, n["session"].as_bool().unwrap_or(false)))
            .collect(),
    )
}
