//! Black-box tests of the `rollcall` binary: what a user sees at the terminal, with `dig`.

#[path = "util/mod.rs"]
mod util;

use std::process::Command;
use std::time::Duration;

use util::*;

const ZONE: &str = "$TTL 60\n@ IN SOA ns.cluster. hostmaster.cluster. 1 60 10 3600 1\n@ IN NS ns.cluster.\nns IN A 127.0.0.1\nproxyserver IN A 10.9.9.9\n";

/// `DIR/zones/cluster.zone` holding [`ZONE`]; returns the zones directory.
fn zones_with_cluster(dir: &std::path::Path) -> std::path::PathBuf {
    let zones = dir.join("zones");
    std::fs::create_dir(&zones).unwrap();
    std::fs::write(zones.join("cluster.zone"), ZONE).unwrap();
    zones
}

fn put(api: &str, role: &str, node: &str, body: &str) -> reqwest::blocking::Response {
    http()
        .put(format!("{api}/v1/roles/{role}/nodes/{node}"))
        .body(body.to_owned())
        .send()
        .unwrap()
}

#[test]
fn dig_sees_nodes_registered_a_moment_before() {
    let dir = tempfile::tempdir().unwrap();
    let zones = zones_with_cluster(dir.path());
    let server = ServeProc::start(&dir.path().join("data"), &zones, &[]);
    for (node, addr) in [("appserver1", "10.0.0.7"), ("appserver2", "10.0.0.8")] {
        let r = put(
            &server.api(),
            "appserver",
            node,
            &format!(r#"{{"addr":"{addr}","port":8080}}"#),
        );
        assert_eq!(r.status(), 200);
    }
    let out = dig(server.dns, &["appserver.cluster", "+short"]);
    let mut got: Vec<&str> = out.lines().collect();
    got.sort();
    assert_eq!(got, ["10.0.0.7", "10.0.0.8"]);
    let out = dig(
        server.dns,
        &["_http._tcp.appserver.cluster", "SRV", "+short"],
    );
    assert!(
        out.contains("0 1 8080 appserver1.appserver.cluster."),
        "{out}"
    );
    let out = dig(server.dns, &["+tcp", "proxyserver.cluster", "+short"]);
    assert_eq!(out.trim(), "10.9.9.9");
    let out = dig(server.dns, &["-x", "10.0.0.8", "+short"]);
    assert_eq!(out.trim(), "appserver2.appserver.cluster.");
    let out = dig(server.dns, &["missing.cluster"]);
    assert!(
        out.contains("status: NXDOMAIN") && out.contains("flags: qr aa"),
        "{out}"
    );
    let out = dig(server.dns, &["example.com"]);
    assert!(out.contains("status: REFUSED"), "{out}");
}

/// One server answering on IPv4 and IPv6 at once (`--dns-listen 127.0.0.1:0,[::1]:0`), over
/// UDP and TCP on each; a bad or repeated address is refused with a sentence.
#[test]
fn dns_on_ipv4_and_ipv6_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let zones = zones_with_cluster(dir.path());
    let server = ServeProc::start_on(
        "127.0.0.1:0,[::1]:0",
        "127.0.0.1:0",
        &dir.path().join("data"),
        &zones,
        &[],
    );
    assert_eq!(server.dns_all.len(), 2, "{:?}", server.dns_all);
    assert!(server.dns_all[0].is_ipv4() && server.dns_all[1].is_ipv6());
    let r = put(&server.api(), "appserver", "a1", r#"{"addr":"10.0.0.7"}"#);
    assert_eq!(r.status(), 200);
    for addr in &server.dns_all {
        for transport in ["+notcp", "+tcp"] {
            let out = dig(*addr, &[transport, "appserver.cluster", "+short"]);
            assert_eq!(out.trim(), "10.0.0.7", "{addr} {transport}: {out}");
        }
    }
    for (arg, want) in [
        ("127.0.0.1:0,nonsense", "is not an address:port"),
        ("127.0.0.1:5353,127.0.0.1:5353", "twice"),
    ] {
        let out = Command::new(rollcall_bin())
            .args(["serve", "--dns-listen", arg, "--data-dir", ""])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{arg}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{arg}: {err}");
    }
}

#[test]
fn sighup_reloads_zone_files_and_keeps_the_old_ones_when_broken() {
    let dir = tempfile::tempdir().unwrap();
    let zones = zones_with_cluster(dir.path());
    let server = ServeProc::start(&dir.path().join("data"), &zones, &[]);
    assert_eq!(
        put(
            &server.api(),
            "app",
            "a1",
            r#"{"addr":"10.0.0.1","ttl":300}"#
        )
        .status(),
        200
    );

    // A good change: a new static name and a new zone file.
    std::fs::write(
        zones.join("cluster.zone"),
        format!("{ZONE}extra IN A 10.9.9.10\n"),
    )
    .unwrap();
    std::fs::write(zones.join("example.test.zone"), "$TTL 60\n@ IN SOA ns hostmaster 5 60 10 3600 1\n@ IN NS ns\nns IN A 127.0.0.1\nwww IN A 192.0.2.1\n").unwrap();
    server.signal("HUP");
    server.wait_log("reloaded zone files", Duration::from_secs(5));
    assert_eq!(
        dig(server.dns, &["extra.cluster", "+short"]).trim(),
        "10.9.9.10"
    );
    assert_eq!(
        dig(server.dns, &["www.example.test", "+short"]).trim(),
        "192.0.2.1"
    );
    assert_eq!(
        dig(server.dns, &["app.cluster", "+short"]).trim(),
        "10.0.0.1",
        "registrations survive a reload"
    );

    // A broken file: reported with file and line, old content still served.
    std::fs::write(
        zones.join("example.test.zone"),
        "$TTL 60\n@ IN SOA ns hostmaster 6 60 10 3600 1\n@ IN NS ns\nwww IN A 192.0.2.300\n",
    )
    .unwrap();
    server.signal("HUP");
    let line = server.wait_log("zone reload failed", Duration::from_secs(5));
    assert!(line.contains("example.test.zone:4"), "{line}");
    assert_eq!(
        dig(server.dns, &["www.example.test", "+short"]).trim(),
        "192.0.2.1"
    );
    assert_eq!(
        dig(server.dns, &["extra.cluster", "+short"]).trim(),
        "10.9.9.10"
    );
    assert_eq!(
        dig(server.dns, &["app.cluster", "+short"]).trim(),
        "10.0.0.1"
    );
}

#[test]
fn registrations_survive_kill_9_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let zones = dir.path().join("zones");
    let data = dir.path().join("data");
    let mut server = ServeProc::start(&data, &zones, &[]);
    assert_eq!(
        put(
            &server.api(),
            "app",
            "a1",
            r#"{"addr":"10.0.0.1","ttl":300}"#
        )
        .status(),
        200
    );
    assert_eq!(
        put(
            &server.api(),
            "app",
            "a2",
            r#"{"addr":"10.0.0.2","ttl":300}"#
        )
        .status(),
        200
    );
    assert_eq!(
        put(
            &server.api(),
            "app",
            "short",
            r#"{"addr":"10.0.0.3","ttl":2}"#
        )
        .status(),
        200
    );
    assert_eq!(
        http()
            .delete(format!("{}/v1/roles/app/nodes/a2", server.api()))
            .send()
            .unwrap()
            .status(),
        204
    );
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    drop(server);

    let server = ServeProc::start(&data, &zones, &[]);
    let body: serde_json::Value = http()
        .get(format!("{}/v1/roles/app", server.api()))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let mut nodes: Vec<&str> = body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    nodes.sort();
    assert_eq!(
        nodes,
        ["a1", "short"],
        "a1 kept, a2 stays deleted, short still in its lease"
    );
    let left = body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "a1")
        .unwrap()["expires_in"]
        .as_f64()
        .unwrap();
    assert!(
        left > 250.0 && left <= 300.0,
        "remaining lease kept: {left}"
    );
    // The short lease runs out on time after the restart.
    assert!(eventually(Duration::from_secs(4), || dig(
        server.dns,
        &["app.cluster", "+short"]
    )
    .trim()
        == "10.0.0.1"));
}

/// Started with the relative defaults' kind of paths (`--zones zones --data-dir data`), the
/// server logs the zone files and the data dir it used as absolute paths.
#[test]
fn the_start_up_log_gives_absolute_paths() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    zones_with_cluster(dir.path());
    let mut child = Command::new(rollcall_bin())
        .args([
            "serve",
            "--dns-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--zones",
            "zones",
            "--data-dir",
            "data",
        ])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        let done = line.contains("listening for HTTP");
        lines.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let root = dir.path().canonicalize().unwrap();
    let zone_file = root.join("zones").join("cluster.zone");
    let data_dir = root.join("data");
    assert!(
        lines.iter().any(|l| l.contains("loaded zone file")
            && l.contains(&format!("file={}", zone_file.display()))),
        "no absolute zone file path {}: {lines:#?}",
        zone_file.display()
    );
    assert!(
        lines.iter().any(|l| l.contains("opened the data dir")
            && l.contains(&format!("data_dir={}", data_dir.display()))),
        "no absolute data dir {}: {lines:#?}",
        data_dir.display()
    );
}

#[test]
fn a_second_server_on_the_same_data_dir_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let zones = dir.path().join("zones");
    let data = dir.path().join("data");
    let _first = ServeProc::start(&data, &zones, &[]);
    let out = Command::new(rollcall_bin())
        .args([
            "serve",
            "--dns-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .arg("--zones")
        .arg(&zones)
        .output()
        .unwrap();
    // A runtime failure (README: exit 1), not a usage error (2).
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is locked by another rollcall"), "{err}");
}

#[test]
fn port_in_use_exits_1_and_bad_zone_files_exit_2_with_a_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let out = Command::new(rollcall_bin())
        .args([
            "serve",
            "--dns-listen",
            &format!("127.0.0.1:{port}"),
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
            "",
        ])
        .arg("--zones")
        .arg(dir.path())
        .output()
        .unwrap();
    // The machine refuses (exit 1), the flags are fine.
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("127.0.0.1:{port}"))
            && err.contains("is in use")
            && err.contains("--dns-listen"),
        "{err}"
    );

    std::fs::write(
        dir.path().join("cluster.zone"),
        "$TTL 60\n@ IN SOA ns hostmaster 1 60 10 3600 1\nbad IN A not-an-ip\n",
    )
    .unwrap();
    let out = Command::new(rollcall_bin())
        .args([
            "serve",
            "--dns-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
            "",
        ])
        .arg("--zones")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cluster.zone:3") && err.contains("fix it"),
        "{err}"
    );

    let out = Command::new(rollcall_bin())
        .args(["serve", "--dns-listen", "nonsense"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("--dns-listen \"nonsense\" is not an address:port"));
}

#[test]
fn sigterm_stops_gracefully_with_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServeProc::start(&dir.path().join("data"), dir.path(), &[]);
    server.signal("TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not stop within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn help_shows_every_flag_with_default_and_env() {
    let out = Command::new(rollcall_bin())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help_lines = String::from_utf8_lossy(&out.stdout).lines().count();
    // clap wraps long lines: compare with whitespace runs folded to one space.
    let help = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for needle in [
        "--dns-listen",
        "[default: 127.0.0.1:1053]",
        "[env: ROLLCALL_DNS_LISTEN=]",
        "[default: 127.0.0.1:8053]",
        "[default: cluster.]",
        "[default: rollcall-data]",
        "ROLLCALL_RECORD_TTL",
    ] {
        assert!(
            help.contains(needle),
            "serve --help lacks {needle:?}:\n{help}"
        );
    }
    // `-h` is the summary: each flag's first sentence, still with its env twin and default;
    // `--help` the whole text.
    let out = Command::new(rollcall_bin())
        .args(["serve", "-h"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let short_lines = String::from_utf8_lossy(&out.stdout).lines().count();
    let short = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for needle in [
        "--dns-listen",
        "[default: 127.0.0.1:1053]",
        "[env: ROLLCALL_DNS_LISTEN=]",
        "Directory of static RFC 1035 zone files",
        "see more with '--help'",
    ] {
        assert!(
            short.contains(needle),
            "serve -h lacks {needle:?}:\n{short}"
        );
    }
    assert!(
        help.contains("A missing directory means no static records")
            && !short.contains("A missing directory means no static records"),
        "serve -h should give the first sentence only:\n{short}"
    );
    assert!(
        short_lines * 3 < help_lines * 2,
        "serve -h ({short_lines} lines) is no summary of --help ({help_lines} lines)"
    );
    for sub in ["register", "hipache-sync", "status"] {
        let out = Command::new(rollcall_bin())
            .args([sub, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("[env: ROLLCALL_API="),
            "{sub}"
        );
    }
}

#[test]
fn slow_clients_are_cut_off_and_do_not_block_others() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProc::start(&dir.path().join("data"), dir.path(), &[]);
    // A slowloris: half a request line, then nothing.
    let mut slow = std::net::TcpStream::connect(server.http).unwrap();
    slow.write_all(b"PUT /v1/roles/app/nodes/a1 HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // Others are served meanwhile.
    assert_eq!(
        put(&server.api(), "app", "a2", r#"{"addr":"10.0.0.2"}"#).status(),
        200
    );
    // The slow one is closed once the header timeout (10 s) passes.
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let t = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_secs(15),
        "still open after {waited:?}"
    );
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
}

#[test]
fn status_prints_roles_and_nodes_and_watches_changes() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProc::start(&dir.path().join("data"), dir.path(), &[]);
    assert_eq!(
        put(
            &server.api(),
            "appserver",
            "app1",
            r#"{"addr":"10.0.0.7","port":8080,"ttl":90}"#
        )
        .status(),
        200
    );
    assert_eq!(
        put(
            &server.api(),
            "frontserver",
            "front1",
            r#"{"addr":"10.0.0.9"}"#
        )
        .status(),
        200
    );

    let out = status(&["--api", &server.api()]).output().unwrap();
    assert_succeeded(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("ROLE"), "{text}");
    let app = text.lines().find(|l| l.contains("app1")).expect("app1 row");
    for cell in ["appserver", "10.0.0.7", "8080", "renewals (ttl 90s)"] {
        assert!(app.contains(cell), "{app:?} lacks {cell}");
    }
    assert!(
        text.contains("front1") && text.contains("2 nodes in 2 roles"),
        "{text}"
    );
    let out = status(&["--api", &server.api()])
        .env("ROLLCALL_ROLE", "appserver")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 nodes in 2 roles"),
        "the agent's ROLLCALL_ROLE filtered status"
    );
    // Several servers: the first that answers is used (a dead one first costs nothing).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_api = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let out = status(&["--api", &format!("{dead_api},{}", server.api())])
        .output()
        .unwrap();
    assert_succeeded(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 nodes in 2 roles"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Counts are pluralised: "1 node in 1 role", "0 nodes in 0 roles".
    let out = status(&["--api", &server.api(), "--role", "frontserver"])
        .output()
        .unwrap();
    assert_succeeded(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\n1 node in 1 role, index "), "{text}");
    let out = status(&["--api", &server.api(), "--role", "nope"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0 nodes in 0 roles, index "), "{text}");

    let out = status(&["--api", &server.api(), "--role", "appserver", "--json"])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(doc["nodes"][0]["node"], "app1");

    // --watch prints again when something changes.
    let mut watch = status(&["--api", &server.api(), "--json", "--watch"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(
        put(&server.api(), "appserver", "app2", r#"{"addr":"10.0.0.8"}"#).status(),
        200
    );
    let second: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(second["nodes"].as_array().unwrap().len(), 3);
    assert!(second["index"].as_u64() > first["index"].as_u64());
    watch.kill().unwrap();
    watch.wait().unwrap();

    // The table form of --watch into a pipe: tables one after another, no escape codes.
    let mut watch = status(&["--api", &server.api(), "--watch"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    let head = lines.next().unwrap().unwrap();
    assert!(head.starts_with("ROLE"), "{head:?}");
    assert!(!head.contains('\x1b'), "escape codes in a pipe: {head:?}");
    watch.kill().unwrap();
    watch.wait().unwrap();

    let out = status(&["--api", "http://127.0.0.1:1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach rollcall"));

    // An error answer is reported as one, with what to do; the token may come from a file.
    let dir = tempfile::tempdir().unwrap();
    let guarded = ServeProc::start(
        &dir.path().join("data"),
        &dir.path().join("zones"),
        &["--token", "s3cret", "--token-reads"],
    );
    let out = status(&["--api", &guarded.api()])
        .env_remove("ROLLCALL_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("401") && err.contains("--token-file") && !err.contains("cannot reach"),
        "{err}"
    );
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let out = status(&["--api", &guarded.api(), "--token-file"])
        .arg(&token_file)
        .output()
        .unwrap();
    assert_succeeded(&out);
    // The agent's environment (ROLLCALL_ROLE, as the images set it) does not filter status,
    // and an inherited ROLLCALL_TOKEN does not conflict with a --token-file given here.
    let out = status(&["--api", &guarded.api(), "--token-file"])
        .arg(&token_file)
        .env("ROLLCALL_TOKEN", "inherited-and-wrong")
        .env("ROLLCALL_ROLE", "appserver")
        .output()
        .unwrap();
    assert_succeeded(&out);
    let both = status(&["--api", &guarded.api(), "--token", "s3cret", "--token-file"])
        .arg(&token_file)
        .output()
        .unwrap();
    assert_eq!(both.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&both.stderr).contains("give one"));
    // https:// to a plain-HTTP server: a sentence, not a TLS library's message (HTTPS itself
    // is tested in tests/tls.rs).
    let out = status(&["--api", &format!("https://{}", guarded.http)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("does not speak TLS there"), "{err}");
    let out = status(&["--api", "ftp://127.0.0.1:8053"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("scheme"));
}

/// `rollcall status` with `args`.
fn status(args: &[&str]) -> Command {
    let mut cmd = Command::new(rollcall_bin());
    cmd.arg("status").args(args);
    cmd
}

#[test]
fn config_file_sets_defaults_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let zones = dir.path().join("zones");
    std::fs::create_dir(&zones).unwrap();
    let cfg = dir.path().join("rollcall.toml");
    std::fs::write(
        &cfg,
        format!(
            "log-format = \"json\"\n[serve]\nzone = \"svc.test.\"\nrecord-ttl = 7\ndata_dir = \"\"\nzones = \"{}\"\nallow-register = [\"127.0.0.0/8\"]\n[status]\njson = true\n",
            zones.display()
        ),
    )
    .unwrap();
    // --zone from the file; --record-ttl from the command line wins over the file.
    let server = ServeProc::start_on(
        "127.0.0.1:0",
        "127.0.0.1:0",
        &dir.path().join("unused"),
        &zones,
        &["--config", cfg.to_str().unwrap(), "--record-ttl", "3"],
    );
    assert_eq!(
        put(
            &server.api(),
            "app",
            "a1",
            r#"{"addr":"127.0.0.5","ttl":60}"#
        )
        .status(),
        200
    );
    assert_eq!(
        put(
            &server.api(),
            "app",
            "a2",
            r#"{"addr":"10.0.0.5","ttl":60}"#
        )
        .status(),
        403,
        "allow-register from the file"
    );
    let out = dig(server.dns, &["app.svc.test", "+noall", "+answer"]);
    assert!(
        out.contains("app.svc.test.\t\t3\tIN\tA\t127.0.0.5"),
        "{out}"
    );

    // Unknown keys are refused with the list of valid ones.
    std::fs::write(&cfg, "[serve]\ndns-listn = \"127.0.0.1:1\"\n").unwrap();
    let out = Command::new(rollcall_bin())
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown key \"dns-listn\" in [serve]") && err.contains("dns-listen"),
        "{err}"
    );
    // Every table is checked, not only the running command's.
    std::fs::write(&cfg, "[serve]\n[status]\nbogus = 1\n").unwrap();
    let out = Command::new(rollcall_bin())
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown key \"bogus\" in [status]"), "{err}");
    std::fs::write(&cfg, "[serve\n").unwrap();
    let out = Command::new(rollcall_bin())
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid TOML"));
}

/// The child command's own arguments (after `--`) never override the config file: the
/// file's `port` applies even when the child takes a `--port` of its own.
#[test]
fn config_values_apply_whatever_follows_the_double_dash() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProc::start(&dir.path().join("data"), &dir.path().join("zones"), &[]);
    let cfg = dir.path().join("reg.toml");
    std::fs::write(
        &cfg,
        format!(
            "[register]\napi = \"{}\"\nrole = \"cfg\"\nnode = \"c1\"\naddr = \"127.0.0.9\"\nport = 8080\n",
            server.api()
        ),
    )
    .unwrap();
    let mut agent = Command::new(rollcall_bin())
        .args([
            "register",
            "--config",
            cfg.to_str().unwrap(),
            "--drain",
            "0",
            "--",
        ])
        .args([
            "sh",
            "-c",
            "exec sleep 60",
            "child",
            "--port",
            "9090",
            "--role",
            "x",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let node = util::eventually(Duration::from_secs(10), || {
        http()
            .get(format!("{}/v1/roles/cfg/nodes/c1", server.api()))
            .send()
            .ok()
            .and_then(|r| r.json::<serde_json::Value>().ok())
            .is_some_and(|v| v["port"] == 8080)
    });
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(node, "the file's port (8080) was not registered");
}

/// A role named like a static name of the dynamic zone would hide it (and `ns` would answer
/// an address other than the NS glue): refused with 409, the static answer stays; a zone
/// reload that adds a static name reserves it too.
#[test]
fn a_role_cannot_hide_a_static_name() {
    let dir = tempfile::tempdir().unwrap();
    let zones = dir.path().join("zones");
    std::fs::create_dir(&zones).unwrap();
    let zone = "$ORIGIN cluster.\n$TTL 60\n@ IN SOA ns hostmaster 1 60 10 3600 1\n@ IN NS ns\nns IN A 127.0.0.1\nproxyserver IN A 10.0.0.99\n";
    std::fs::write(zones.join("cluster.zone"), zone).unwrap();
    let server = ServeProc::start(&dir.path().join("data"), &zones, &[]);
    for role in ["proxyserver", "ns", "NS"] {
        let r = put(&server.api(), role, "n1", r#"{"addr":"10.0.0.5"}"#);
        assert_eq!(r.status(), 409, "role {role}");
        let body: serde_json::Value = r.json().unwrap();
        assert!(body["error"]
            .as_str()
            .unwrap()
            .contains("pick another role name"));
    }
    let out = dig(server.dns, &["proxyserver.cluster", "+short"]);
    assert_eq!(out.trim(), "10.0.0.99");
    assert_eq!(
        put(&server.api(), "web", "n1", r#"{"addr":"10.0.0.5"}"#).status(),
        200
    );
    // Reload with a new static name: reserved from then on.
    std::fs::write(
        zones.join("cluster.zone"),
        format!("{zone}db IN A 10.0.0.98\n"),
    )
    .unwrap();
    server.signal("HUP");
    server.wait_log("zone", Duration::from_secs(5));
    assert!(util::eventually(Duration::from_secs(5), || {
        put(&server.api(), "db", "n1", r#"{"addr":"10.0.0.5"}"#).status() == 409
    }));
}

#[test]
fn sigterm_stops_the_server_even_when_its_stderr_is_gone() {
    // A supervisor that died and closed our log pipe must not make the server unstoppable.
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(rollcall_bin())
        .args([
            "serve",
            "--dns-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
            "",
        ])
        .arg("--zones")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening for HTTP") {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0,
            "server exited"
        );
    }
    drop(stderr);
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("SIGTERM did not stop a server whose stderr is closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

/// What operators alert on, from the real binary: bounded labels, roles kept at 0, sessions and
/// blocking queries in flight, SOA serial, zone loads, journal commit latency, process metrics;
/// every sample line parses.
#[test]
fn metrics_for_operators() {
    let dir = tempfile::tempdir().unwrap();
    let zones = zones_with_cluster(dir.path());
    let server = ServeProc::start(&dir.path().join("data"), &zones, &[]);
    let api = server.api();
    let scrape = || http().get(format!("{api}/metrics")).send().unwrap();
    let r = scrape();
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "text/plain; version=0.0.4"
    );

    // Made-up methods share one label value.
    for m in ["FOO1", "FOO2", "BAR"] {
        let _ = http()
            .request(
                reqwest::Method::from_bytes(m.as_bytes()).unwrap(),
                format!("{api}/v1/roles"),
            )
            .send()
            .unwrap();
    }
    let text = scrape().text().unwrap();
    assert!(
        !text.contains("FOO1") && !text.contains("BAR"),
        "a made-up method became a label"
    );
    assert!(text.contains("method=\"OTHER\""), "{text}");

    // A role that empties stays at 0.
    assert_eq!(
        put(&api, "web", "w1", r#"{"addr":"10.0.0.7"}"#).status(),
        200
    );
    assert_eq!(metric(&api, "rollcall_nodes{role=\"web\"}"), 1.0);
    // A PUT that moves the node is a change, not a renewal (issue 15 #4).
    let renewals = metric(&api, "rollcall_renewals_total");
    assert_eq!(
        put(&api, "web", "w1", r#"{"addr":"10.0.0.8"}"#).status(),
        200
    );
    assert_eq!(metric(&api, "rollcall_changes_total"), 1.0);
    assert_eq!(metric(&api, "rollcall_renewals_total"), renewals);
    assert!(server
        .wait_log("changed", Duration::from_secs(5))
        .contains("addr=10.0.0.8"));
    let d = http()
        .delete(format!("{api}/v1/roles/web/nodes/w1"))
        .send()
        .unwrap();
    assert!(d.status().is_success());
    assert_eq!(metric(&api, "rollcall_nodes{role=\"web\"}"), 0.0);
    assert!(
        metric(
            &api,
            "rollcall_journal_commit_seconds_count{durable=\"true\"}"
        ) >= 2.0
    );

    // A session held by a real agent, and a blocking query waiting.
    assert_eq!(metric(&api, "rollcall_sessions"), 0.0);
    let mut agent = Command::new(rollcall_bin())
        .args([
            "register", "--api", &api, "--role", "s", "--node", "s1", "--addr", "10.0.0.9",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || metric(
        &api,
        "rollcall_sessions"
    ) == 1.0));
    let index = http()
        .get(format!("{api}/v1/roles/s"))
        .send()
        .unwrap()
        .headers()["x-rollcall-index"]
        .to_str()
        .unwrap()
        .to_string();
    let waiter = {
        let api = api.clone();
        std::thread::spawn(move || {
            http()
                .get(format!("{api}/v1/roles/s?index={index}&wait=3s"))
                .send()
                .unwrap()
                .status()
        })
    };
    assert!(eventually(Duration::from_secs(5), || metric(
        &api,
        "rollcall_blocking_queries"
    ) == 1.0));
    assert_eq!(waiter.join().unwrap(), 200);
    assert_eq!(metric(&api, "rollcall_blocking_queries"), 0.0);
    let text = scrape().text().unwrap();
    assert!(
        text.contains("route=\"/v1/roles/{role}\",status=\"200\",blocking=\"true\"")
            && text.contains("route=\"/v1/roles/{role}\",status=\"200\",blocking=\"false\""),
        "blocking queries are not told apart:\n{text}"
    );
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(eventually(Duration::from_secs(5), || metric(
        &api,
        "rollcall_sessions"
    ) == 0.0));

    // The SOA serial is the one dig sees.
    let soa = dig(server.dns, &["cluster", "SOA", "+short"]);
    let serial: f64 = soa.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert_eq!(
        metric(&api, "rollcall_soa_serial{zone=\"cluster.\"}"),
        serial
    );

    // Zone loads: the one at start, then a broken file on SIGHUP.
    assert_eq!(
        metric(&api, "rollcall_zone_loads_total{result=\"ok\"}"),
        1.0
    );
    assert!(metric(&api, "rollcall_zone_last_load_timestamp_seconds") > 1.7e9);
    std::fs::write(zones.join("cluster.zone"), "$TTL 60\n@ IN SOA broken\n").unwrap();
    server.signal("HUP");
    assert!(eventually(Duration::from_secs(5), || metric(
        &api,
        "rollcall_zone_loads_total{result=\"error\"}"
    ) == 1.0));

    // Process metrics, and every sample line is `name{labels} number`.
    let text = scrape().text().unwrap();
    for series in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
    ] {
        assert!(metric(&api, series) > 0.0, "{series}");
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
        assert!(
            name.chars().next().unwrap().is_ascii_alphabetic()
                && (!name.contains('{') || name.ends_with('}')),
            "bad sample {line:?}"
        );
    }
}

/// systemd's readiness protocol: with NOTIFY_SOCKET set, READY=1 once serving, RELOADING=1 and
/// READY=1 around a SIGHUP, STOPPING=1 on SIGTERM (a real unix datagram socket, as systemd's).
#[test]
fn serve_notifies_systemd() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let zones = zones_with_cluster(dir.path());
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("no notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut server = ServeProc::start_env(
        &dir.path().join("data"),
        &zones,
        &[],
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let ready = recv();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // Ready means answering.
    assert!(dig(server.dns, &["ns.cluster", "+short"]).contains("127.0.0.1"));
    server.signal("HUP");
    assert_eq!(recv(), "RELOADING=1");
    assert!(recv().lines().any(|l| l == "READY=1"));
    server.signal("TERM");
    assert_eq!(recv(), "STOPPING=1");
    let status = server.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// The shipped systemd unit passes `systemd-analyze verify` (with this build's binary).
#[test]
fn the_systemd_unit_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/systemd/rollcall.service"),
    )
    .unwrap()
    .replace("/usr/local/bin/rollcall", rollcall_bin().to_str().unwrap());
    let path = dir.path().join("rollcall.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new(require("systemd-analyze"))
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("rollcall.service"),
        "{err}"
    );
}

/// `rollcall check`: exit 0 when the probe passes, 1 with a sentence when it fails, 2 for a
/// target that is not one.
#[test]
fn check_probes_once_for_healthchecks() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProc::start(&dir.path().join("data"), &dir.path().join("zones"), &[]);
    let check = |target: &str| {
        Command::new(rollcall_bin())
            .args(["check", target])
            .output()
            .unwrap()
    };
    assert_eq!(
        check(&format!("{}/healthz", server.api())).status.code(),
        Some(0)
    );
    assert_eq!(
        check(&format!("tcp://{}", server.http)).status.code(),
        Some(0)
    );
    let out = check(&format!("{}/v1/roles/none/nodes/x", server.api()));
    assert_eq!(out.status.code(), Some(1), "a 404 fails");
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = check(&format!("tcp://{closed}"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fails"));
    let out = check("ftp://x");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tcp://HOST:PORT"));
}

/// Shell completions and man pages come from the same definitions as --help: bash loads the
/// script and completes subcommands; every page names its command.
#[test]
fn completions_and_man_pages() {
    let out = Command::new(rollcall_bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("rollcall.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    // Complete `rollcall se<TAB>` and `rollcall serve --dns-l<TAB>` in a real bash.
    let probe = format!(
        "source {}; COMP_WORDS=(rollcall se); COMP_CWORD=1; _rollcall rollcall se rollcall; echo \"${{COMPREPLY[@]}}\"; \
         COMP_WORDS=(rollcall serve --dns-l); COMP_CWORD=2; _rollcall rollcall --dns-l serve; echo \"${{COMPREPLY[@]}}\"",
        script.display()
    );
    let out = Command::new("bash").args(["-c", &probe]).output().unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "{got} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(lines[0].split(' ').any(|w| w == "serve"), "{got}");
    assert!(lines[1].split(' ').any(|w| w == "--dns-listen"), "{got}");

    let pages = dir.path().join("man");
    std::fs::create_dir(&pages).unwrap();
    let out = Command::new(rollcall_bin())
        .args(["man", "--dir"])
        .arg(&pages)
        .output()
        .unwrap();
    assert_succeeded(&out);
    for cmd in [
        "rollcall",
        "rollcall-serve",
        "rollcall-register",
        "rollcall-hipache-sync",
        "rollcall-status",
        "rollcall-check",
    ] {
        let page = std::fs::read_to_string(pages.join(format!("{cmd}.1"))).unwrap();
        assert!(
            page.contains(&format!(".TH {cmd} 1")),
            "{cmd}: {}",
            &page[..200.min(page.len())]
        );
    }
    let serve = std::fs::read_to_string(pages.join("rollcall-serve.1")).unwrap();
    assert!(serve.contains("dns\\-listen") && serve.contains("[default: 127.0.0.1:1053]"));
    // --version names the git revision it was built from.
    let out = Command::new(rollcall_bin())
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // Without git the revision cannot be asked here: the binary must then carry what build.rs
    // found when it was built (build.rs treats a missing git as "no revision"; a binary built
    // before git was installed keeps that until build.rs runs again).
    match Command::new("git")
        .args(["rev-parse", "--short=7", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    {
        Ok(head) if head.status.success() => {
            let rev = String::from_utf8_lossy(&head.stdout).trim().to_string();
            assert_eq!(
                version,
                format!("rollcall {} ({rev})", env!("CARGO_PKG_VERSION"))
            );
        }
        Ok(_) => assert_eq!(version, format!("rollcall {}", env!("CARGO_PKG_VERSION"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "git is not installed (tests/run.sh installs it): checking --version against \
                 what build.rs found, {:?}",
                env!("ROLLCALL_VERSION")
            );
            assert_eq!(version, format!("rollcall {}", env!("ROLLCALL_VERSION")));
        }
        Err(e) => panic!("cannot run `git rev-parse` to check --version: {e}"),
    }
    let main = std::fs::read_to_string(pages.join("rollcall.1")).unwrap();
    assert!(
        main.contains("ROLLCALL_DNS_LISTEN"),
        "the environment twins are explained"
    );
}
