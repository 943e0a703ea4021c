//! HTTPS on the API with real parts: the real `rollcall serve` with certificates the test makes
//! (rcgen: two CAs, server certificates valid, expired, for another name, client
//! certificates), the real agent and `rollcall status`/`check` over https://, scoped tokens from
//! a token file, client certificates for writes, and certificate and token rotation on SIGHUP
//! while an agent keeps renewing.

#[path = "util/mod.rs"]
mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use util::process::{kill, wait_exit, Killed};
use util::{dns_a, rollcall_bin, ServeProc};

// ---------------------------------------------------------------------------------------------
// Certificates, made here.

/// A CA that signs server and client certificates into PEM files of a directory.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// Its certificate's PEM file.
    pem: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).unwrap();
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, cert.pem()).unwrap();
        Ca { cert, key, pem }
    }

    /// A leaf certificate and its key, written as `<name>.pem` and `<name>.key`.
    fn issue(
        &self,
        dir: &Path,
        name: &str,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
        expired: bool,
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![usage];
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2020, 2, 1);
        }
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn server(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        self.issue(
            dir,
            name,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            false,
        )
    }

    fn client(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        self.issue(dir, name, &[], ExtendedKeyUsagePurpose::ClientAuth, false)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A blocking client trusting `ca` (a PEM file), showing `identity` (cert, key) when given;
/// a new connection per request.
fn https(ca: &Path, identity: Option<&(PathBuf, PathBuf)>) -> reqwest::blocking::Client {
    let mut b = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .pool_max_idle_per_host(0)
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap());
    if let Some((cert, key)) = identity {
        let mut pem = std::fs::read(key).unwrap();
        pem.extend(std::fs::read(cert).unwrap());
        b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// `rollcall <args>`, its stderr lines into a channel (and echoed).
struct Proc {
    child: Killed,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn start(args: &[&str], tag: &str) -> Proc {
        let mut child = Command::new(rollcall_bin())
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("ROLLCALL_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting rollcall");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let tag = tag.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {line}");
                let _ = tx.send(line);
            }
        });
        Proc {
            child: Killed(child),
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `needle`; returns it.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no line containing {needle:?} within {timeout:?}: {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// Every line so far.
    fn drain(&mut self) -> &[String] {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        &self.seen
    }
}

fn serve(dir: &Path, args: &[&str]) -> ServeProc {
    ServeProc::start(&dir.join("data"), &dir.join("zones"), args)
}

/// `rollcall status --api URL args...`: (exit code, stderr).
fn status(api: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(rollcall_bin())
        .args(["status", "--api", api])
        .args(args)
        .env_remove("ROLLCALL_TOKEN")
        .env_remove("ROLLCALL_CA_FILE")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const TOKENS: &str = r#"
[[token]]
name = "appservers"
secret = "app-secret"
roles = ["appserver"]

[[token]]
name = "fronts"
secret = "front-secret"
roles = ["front*"]
"#;

// ---------------------------------------------------------------------------------------------
// The tests.

/// The agent registers over HTTPS (client certificate, scoped token) and holds its session
/// over wss://; a token of `appserver` is refused (403, a sentence naming the role) on
/// `frontserver` for PUT, DELETE and session, from the agent and from a plain client alike.
#[test]
fn agent_over_https_with_a_scoped_token_and_403_outside_its_roles() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "ca");
    let (cert, key) = ca.server(d, "server");
    let client = ca.client(d, "agent");
    let tokens = d.join("tokens.toml");
    std::fs::write(&tokens, TOKENS).unwrap();
    let server = serve(
        d,
        &[
            "--tls-cert",
            s(&cert),
            "--tls-key",
            s(&key),
            "--tls-client-ca",
            s(&ca.pem),
            "--token-file",
            s(&tokens),
        ],
    );
    let api = format!("https://127.0.0.1:{}", server.http.port());
    let tls_flags = [
        "--ca-file",
        s(&ca.pem),
        "--client-cert",
        s(&client.0),
        "--client-key",
        s(&client.1),
    ];

    let mut agent = Proc::start(
        &[
            &[
                "register",
                "--api",
                &api,
                "--role",
                "appserver",
                "--node",
                "a1",
                "--ttl",
                "3",
                "--token",
                "app-secret",
                "--addr",
                "10.0.0.7",
            ][..],
            &tls_flags[..],
        ]
        .concat(),
        "agent",
    );
    agent.wait_for("holding a session", Duration::from_secs(10));
    assert_eq!(
        dns_a(server.dns, "a1.appserver.cluster."),
        Some(vec!["10.0.0.7".to_string()])
    );
    let http = https(&ca.pem, Some(&client));
    let node: serde_json::Value = http
        .get(format!("{api}/v1/roles/appserver/nodes/a1"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(node["session"], true, "{node}");

    // The same token on frontserver: the agent says why, with the server's sentence.
    let mut wrong = Proc::start(
        &[
            &[
                "register",
                "--api",
                &api,
                "--role",
                "frontserver",
                "--node",
                "f1",
                "--ttl",
                "3",
                "--token",
                "app-secret",
                "--addr",
                "10.0.0.8",
            ][..],
            &tls_flags[..],
        ]
        .concat(),
        "wrong-role",
    );
    let line = wrong.wait_for("refused the registration", Duration::from_secs(10));
    assert!(
        line.contains("403")
            && line.contains("token \"appservers\" may not write role frontserver")
            && line.contains("only roles matching appserver"),
        "{line}"
    );
    assert_eq!(dns_a(server.dns, "f1.frontserver.cluster."), Some(vec![]));

    // PUT, DELETE and session with the appserver token on frontserver: 403, nothing changes.
    assert_eq!(
        http.put(format!("{api}/v1/roles/frontserver/nodes/f2"))
            .bearer_auth("front-secret")
            .body(r#"{"addr":"10.0.0.9"}"#)
            .send()
            .unwrap()
            .status(),
        200
    );
    for (method, path) in [
        (reqwest::Method::PUT, "/v1/roles/frontserver/nodes/f2"),
        (reqwest::Method::DELETE, "/v1/roles/frontserver/nodes/f2"),
        (
            reqwest::Method::GET,
            "/v1/roles/frontserver/nodes/f2/session",
        ),
    ] {
        let resp = http
            .request(method.clone(), format!("{api}{path}"))
            .bearer_auth("app-secret")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(r#"{"addr":"10.0.0.9"}"#)
            .send()
            .unwrap();
        assert_eq!(resp.status(), 403, "{method} {path}");
        let body: serde_json::Value = resp.json().unwrap();
        let e = body["error"].as_str().unwrap();
        assert!(
            e.contains("may not write role frontserver") && e.contains("appserver"),
            "{method} {path}: {e}"
        );
    }
    assert_eq!(
        dns_a(server.dns, "f2.frontserver.cluster."),
        Some(vec!["10.0.0.9".to_string()])
    );

    // The agent deregisters over HTTPS on SIGTERM.
    kill(agent.child.0.id(), libc::SIGTERM);
    let status = wait_exit(&mut agent.child.0, Duration::from_secs(10)).expect("agent exits");
    assert_eq!(status.code(), Some(0));
    assert_eq!(dns_a(server.dns, "a1.appserver.cluster."), Some(vec![]));
}

/// What each TLS mistake looks like from the clients: a sentence that says what to do, from
/// `rollcall status` (exit 1) and in the agent's log.
#[test]
fn tls_mistakes_get_sentences_from_the_clients() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "ca");
    let other_ca = Ca::new(d, "other-ca");
    let (cert, key) = ca.server(d, "server");
    let server = serve(d, &["--tls-cert", s(&cert), "--tls-key", s(&key)]);
    let port = server.http.port();
    let api = format!("https://127.0.0.1:{port}");
    // Opened now, checked at the end: one connection that never sends a byte, one that sends
    // the first bytes of a TLS record and stops.
    let silent = (
        std::net::TcpStream::connect(server.http).unwrap(),
        Instant::now(),
    );
    let mut partial = std::net::TcpStream::connect(server.http).unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    let partial = (partial, Instant::now());

    // Right CA: works (and ROLLCALL_CA_FILE is the flag's twin).
    let out = Command::new(rollcall_bin())
        .args(["status", "--api", &api])
        .env("ROLLCALL_CA_FILE", &ca.pem)
        .output()
        .unwrap();
    util::assert_succeeded(&out);
    // `rollcall check` over https, as a container healthcheck would.
    let out = Command::new(rollcall_bin())
        .args(["check", &format!("{api}/healthz"), "--ca-file", s(&ca.pem)])
        .output()
        .unwrap();
    util::assert_succeeded(&out);

    // Wrong CA.
    let (code, err) = status(&api, &["--ca-file", s(&other_ca.pem)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the server's certificate is not signed by a CA this client trusts")
            && err.contains("--ca-file"),
        "{err}"
    );
    let out = Command::new(rollcall_bin())
        .args([
            "check",
            &format!("{api}/healthz"),
            "--ca-file",
            s(&other_ca.pem),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not signed by a CA this client trusts"));
    let mut agent = Proc::start(
        &[
            "register",
            "--api",
            &api,
            "--role",
            "r",
            "--node",
            "n",
            "--ca-file",
            s(&other_ca.pem),
            "--addr",
            "10.0.0.1",
        ],
        "agent-wrong-ca",
    );
    let line = agent.wait_for("cannot register", Duration::from_secs(10));
    assert!(
        line.contains("not signed by a CA this client trusts"),
        "{line}"
    );
    drop(agent);

    // Wrong name: a certificate for localhost only, reached as 127.0.0.1.
    let (cert2, key2) = ca.issue(
        d,
        "named",
        &["localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
        false,
    );
    let named = serve(
        &d.join("named"),
        &["--tls-cert", s(&cert2), "--tls-key", s(&key2)],
    );
    let (code, err) = status(
        &format!("https://127.0.0.1:{}", named.http.port()),
        &["--ca-file", s(&ca.pem)],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("is not valid for the host in the URL"),
        "{err}"
    );
    let (code, err) = status(
        &format!("https://localhost:{}", named.http.port()),
        &["--ca-file", s(&ca.pem)],
    );
    assert_eq!(code, Some(0), "{err}");

    // Expired.
    let (cert3, key3) = ca.issue(
        d,
        "expired",
        &["127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
        true,
    );
    let expired = serve(
        &d.join("expired"),
        &["--tls-cert", s(&cert3), "--tls-key", s(&key3)],
    );
    let (code, err) = status(
        &format!("https://127.0.0.1:{}", expired.http.port()),
        &["--ca-file", s(&ca.pem)],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the server's certificate has expired") && err.contains("SIGHUP"),
        "{err}"
    );

    // Plain HTTP to the TLS port: the server answers a plain 400 that says so, at once.
    let started = Instant::now();
    let (code, err) = status(&format!("http://127.0.0.1:{port}"), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("400")
            && err.contains("this port speaks HTTPS only")
            && err.contains(&format!("use https://127.0.0.1:{port}")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let mut agent = Proc::start(
        &[
            "register",
            "--api",
            &format!("http://127.0.0.1:{port}"),
            "--role",
            "r",
            "--node",
            "n",
            "--addr",
            "10.0.0.1",
        ],
        "agent-plaintext",
    );
    let line = agent.wait_for("refused the registration", Duration::from_secs(10));
    assert!(line.contains("this port speaks HTTPS only"), "{line}");
    drop(agent);
    // A raw TCP client gets the same answer, and the connection closes (no hang).
    let mut raw = std::net::TcpStream::connect(server.http).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    raw.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400 ") && answer.contains("HTTPS only"),
        "{answer}"
    );

    // https:// to a plain-HTTP server.
    let plain = serve(&d.join("plain"), &[]);
    let (code, err) = status(
        &format!("https://{}", plain.http),
        &["--ca-file", s(&ca.pem)],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("the server does not speak TLS there"), "{err}");

    // Clients that start no handshake, or stop in the middle of one, are closed at the
    // handshake deadline (10 s from accept), not held; counted as timeouts.
    for (conn, opened) in [silent, partial] {
        let mut conn = conn;
        let left = Duration::from_secs(13).saturating_sub(opened.elapsed());
        conn.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf);
        assert!(
            matches!(n, Ok(0))
                || n.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{n:?}"
        );
        let took = opened.elapsed();
        assert!(
            took >= Duration::from_secs(9) && took < Duration::from_secs(13),
            "closed after {took:?}"
        );
    }
    let metrics = https(&ca.pem, None)
        .get(format!("{api}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let count = |result: &str| -> u64 {
        let series = format!("rollcall_http_tls_handshakes_total{{result=\"{result}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series)?.parse().ok())
            .unwrap_or_else(|| panic!("{series} not in {metrics}"))
    };
    assert!(count("plaintext") >= 3, "{metrics}");
    assert!(count("failed") >= 3, "{metrics}");
    assert!(count("timeout") >= 2, "{metrics}");
    assert!(count("ok") >= 3, "{metrics}");
}

/// --tls-client-ca: reads need no certificate (a browser, Prometheus), writes do; a
/// certificate from another CA is refused at the handshake, with a sentence.
#[test]
fn client_certificates_are_needed_for_writes_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "ca");
    let other_ca = Ca::new(d, "other-ca");
    let (cert, key) = ca.server(d, "server");
    let good = ca.client(d, "good");
    let stranger = other_ca.client(d, "stranger");
    let server = serve(
        d,
        &[
            "--tls-cert",
            s(&cert),
            "--tls-key",
            s(&key),
            "--tls-client-ca",
            s(&ca.pem),
        ],
    );
    let api = format!("https://127.0.0.1:{}", server.http.port());

    let anon = https(&ca.pem, None);
    for read in ["/healthz", "/metrics", "/v1/roles", "/v1/roles/app", "/"] {
        assert_eq!(
            anon.get(format!("{api}{read}")).send().unwrap().status(),
            200,
            "{read}"
        );
    }
    let resp = anon
        .put(format!("{api}/v1/roles/app/nodes/n1"))
        .body(r#"{"addr":"10.0.0.1"}"#)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(resp
        .text()
        .unwrap()
        .contains("writes need a client certificate"));
    assert_eq!(dns_a(server.dns, "n1.app.cluster."), Some(vec![]));
    let (code, err) = status(&api, &["--ca-file", s(&ca.pem)]);
    assert_eq!(code, Some(0), "status reads without a certificate: {err}");

    let authed = https(&ca.pem, Some(&good));
    assert_eq!(
        authed
            .put(format!("{api}/v1/roles/app/nodes/n1"))
            .body(r#"{"addr":"10.0.0.1","ttl":60}"#)
            .send()
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        dns_a(server.dns, "n1.app.cluster."),
        Some(vec!["10.0.0.1".to_string()])
    );

    // The agent without a certificate: the server's sentence in its log.
    let mut agent = Proc::start(
        &[
            "register",
            "--api",
            &api,
            "--role",
            "app",
            "--node",
            "n2",
            "--ca-file",
            s(&ca.pem),
            "--addr",
            "10.0.0.2",
        ],
        "agent-no-cert",
    );
    let line = agent.wait_for("refused the registration", Duration::from_secs(10));
    assert!(line.contains("writes need a client certificate"), "{line}");
    drop(agent);
    // With one from another CA: the handshake is refused; the agent says what to do.
    let mut agent = Proc::start(
        &[
            "register",
            "--api",
            &api,
            "--role",
            "app",
            "--node",
            "n3",
            "--ca-file",
            s(&ca.pem),
            "--client-cert",
            s(&stranger.0),
            "--client-key",
            s(&stranger.1),
            "--addr",
            "10.0.0.3",
        ],
        "agent-stranger",
    );
    let line = agent.wait_for("cannot register", Duration::from_secs(10));
    assert!(
        line.contains("the server refused this client's certificate"),
        "{line}"
    );
    drop(agent);
    assert_eq!(dns_a(server.dns, "n3.app.cluster."), Some(vec![]));
}

/// SIGHUP rotates the certificate while an agent holds its session and a client renews by
/// PUT on new connections: new handshakes get the new certificate, no renewal fails, the
/// session is never dropped. A broken new certificate keeps the old one (logged). The token
/// file is reloaded the same way.
#[test]
fn sighup_rotates_the_certificate_and_tokens_without_a_failed_renewal() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca1 = Ca::new(d, "ca1");
    let ca2 = Ca::new(d, "ca2");
    let both = d.join("both.pem");
    std::fs::write(
        &both,
        [
            std::fs::read(&ca1.pem).unwrap(),
            std::fs::read(&ca2.pem).unwrap(),
        ]
        .concat(),
    )
    .unwrap();
    let (cert1, key1) = ca1.server(d, "server1");
    let (cert2, key2) = ca2.server(d, "server2");
    let (live_cert, live_key) = (d.join("live.pem"), d.join("live.key"));
    std::fs::copy(&cert1, &live_cert).unwrap();
    std::fs::copy(&key1, &live_key).unwrap();
    let tokens = d.join("tokens.toml");
    std::fs::write(&tokens, TOKENS).unwrap();
    let server = serve(
        d,
        &[
            "--tls-cert",
            s(&live_cert),
            "--tls-key",
            s(&live_key),
            "--token-file",
            s(&tokens),
        ],
    );
    let api = format!("https://127.0.0.1:{}", server.http.port());

    let mut agent = Proc::start(
        &[
            "register",
            "--api",
            &api,
            "--role",
            "appserver",
            "--node",
            "a1",
            "--ttl",
            "1",
            "--token",
            "app-secret",
            "--ca-file",
            s(&both),
            "--addr",
            "10.0.0.7",
        ],
        "agent",
    );
    agent.wait_for("holding a session", Duration::from_secs(10));

    // PUT renewals on a new connection each, all through the rotations.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let renewer = {
        let (api, both, stop) = (api.clone(), both.clone(), stop.clone());
        std::thread::spawn(move || {
            let client = https(&both, None);
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client
                    .put(format!("{api}/v1/roles/appserver/nodes/renewer"))
                    .bearer_auth("app-secret")
                    .body(r#"{"addr":"10.0.0.8","ttl":2}"#)
                    .send()
                {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => failed.push(format!("HTTP {}", r.status())),
                    Err(e) => failed.push(format!("{e:?}")),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        })
    };

    let only1 = https(&ca1.pem, None);
    let only2 = https(&ca2.pem, None);
    let healthz = |c: &reqwest::blocking::Client| c.get(format!("{api}/healthz")).send().is_ok();
    assert!(healthz(&only1) && !healthz(&only2));
    let rotate = |server: &ServeProc, cert: &Path, key: &Path, expect: &str| {
        std::fs::copy(cert, &live_cert).unwrap();
        std::fs::copy(key, &live_key).unwrap();
        server.signal("HUP");
        server.wait_log(expect, Duration::from_secs(5));
    };
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(1200));
        rotate(&server, &cert2, &key2, "reloaded the TLS certificate");
        assert!(
            healthz(&only2) && !healthz(&only1),
            "round {round}: new handshakes get cert 2"
        );
        std::thread::sleep(Duration::from_millis(1200));
        rotate(&server, &cert1, &key1, "reloaded the TLS certificate");
        assert!(
            healthz(&only1) && !healthz(&only2),
            "round {round}: back to cert 1"
        );
    }
    // A broken new certificate: the old one stays, said in the log.
    std::fs::write(&live_cert, "not a certificate\n").unwrap();
    server.signal("HUP");
    let line = server.wait_log("TLS reload failed", Duration::from_secs(5));
    assert!(
        line.contains("--tls-cert") && line.contains("still serving the previous"),
        "{line}"
    );
    assert!(healthz(&only1), "the old certificate is still served");
    std::thread::sleep(Duration::from_millis(1000));

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = renewer.join().unwrap();
    eprintln!(
        "PUT renewals through 6 rotations: {ok} ok, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "failed renewals: {failed:?}");
    assert!(ok > 100, "only {ok} renewals");
    // The agent's session, opened before the first rotation, never ended: no log line of a
    // failed renewal, still the same session, still in DNS.
    let lines = agent.drain().to_vec();
    let bad: Vec<&String> = lines
        .iter()
        .filter(|l| {
            l.contains("session ended")
                || l.contains("cannot register")
                || l.contains("WARN")
                || l.contains("ERROR")
        })
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("holding a session"))
            .count(),
        1,
        "{lines:#?}"
    );
    assert_eq!(
        dns_a(server.dns, "a1.appserver.cluster."),
        Some(vec!["10.0.0.7".to_string()])
    );

    // The token file: the appserver token may write frontserver after a reload; a broken
    // file keeps the tokens it had.
    let put_front = |token: &str| {
        https(&ca1.pem, None)
            .put(format!("{api}/v1/roles/frontserver/nodes/f1"))
            .bearer_auth(token)
            .body(r#"{"addr":"10.0.0.9"}"#)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(put_front("app-secret"), 403);
    std::fs::write(
        &tokens,
        TOKENS.replace(
            r#"roles = ["appserver"]"#,
            r#"roles = ["appserver", "frontserver"]"#,
        ),
    )
    .unwrap();
    server.signal("HUP");
    server.wait_log("reloaded the token file", Duration::from_secs(5));
    assert_eq!(put_front("app-secret"), 200);
    std::fs::write(&tokens, "[[token]]\nsecret = \"\"\n").unwrap();
    server.signal("HUP");
    let line = server.wait_log("token file reload failed", Duration::from_secs(5));
    assert!(line.contains("--token-file"), "{line}");
    assert_eq!(put_front("app-secret"), 200, "the previous tokens stay");
    assert_eq!(put_front("front-secret"), 200);
}

/// hipache-sync follows a role over https:// (with a client certificate and a scoped token
/// for reads) into a real redis-server.
#[test]
fn hipache_sync_follows_a_role_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "ca");
    let (cert, key) = ca.server(d, "server");
    let client = ca.client(d, "sync");
    let tokens = d.join("tokens.toml");
    std::fs::write(&tokens, TOKENS).unwrap();
    let server = serve(
        d,
        &[
            "--tls-cert",
            s(&cert),
            "--tls-key",
            s(&key),
            "--tls-client-ca",
            s(&ca.pem),
            "--token-file",
            s(&tokens),
            "--token-reads",
        ],
    );
    let api = format!("https://127.0.0.1:{}", server.http.port());

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let redis_dir = tempfile::tempdir().unwrap();
    let _redis = Killed(
        Command::new(util::require("redis-server"))
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(redis_dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let redis_url = format!("redis://127.0.0.1:{port}/0");
    let list = || -> Option<Vec<String>> {
        let mut c = redis::Client::open(redis_url.as_str())
            .ok()?
            .get_connection()
            .ok()?;
        redis::cmd("LRANGE")
            .arg("frontend:www.example.com")
            .arg(0)
            .arg(-1)
            .query(&mut c)
            .ok()
    };
    assert!(
        util::eventually(Duration::from_secs(10), || list().is_some()),
        "redis did not start"
    );

    let _sync = Proc::start(
        &[
            "hipache-sync",
            "--api",
            &api,
            "--ca-file",
            s(&ca.pem),
            "--client-cert",
            s(&client.0),
            "--client-key",
            s(&client.1),
            "--token",
            "front-secret",
            "--redis",
            &redis_url,
            "--frontend",
            "www.example.com",
        ],
        "hipache-sync",
    );
    let resp = https(&ca.pem, Some(&client))
        .put(format!("{api}/v1/roles/frontserver/nodes/f1"))
        .bearer_auth("front-secret")
        .body(r#"{"addr":"10.0.0.9","port":8080,"ttl":60}"#)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let want = vec![
        "frontserver".to_string(),
        "http://10.0.0.9:8080".to_string(),
    ];
    assert!(
        util::eventually(Duration::from_secs(10), || list().as_ref() == Some(&want)),
        "{:?}",
        list()
    );
}
