//! System tests of the node agent on its own (`rollcall register`, with and without a child
//! command) against the real `rollcall serve`: signals, drain, stop signal, checks, exit codes,
//! orphans. The agent in front of nginx and bottle is in `tests/nginx.rs`.

#[path = "util/mod.rs"]
mod util;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use util::process::{alive, children_of, cmdline, kill, wait_exit, Killed};
use util::{api_nodes, dns_a, echo_lines, eventually, rollcall_bin, ServeProc};

// ---------------------------------------------------------------------------------------------
// The agent on its own.

fn agent(api: &str, args: &[&str]) -> Child {
    let mut child = Command::new(rollcall_bin())
        .args(["register", "--api", api, "--ttl", "3"])
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting rollcall register");
    echo_lines(child.stderr.take().unwrap(), "agent".into());
    child
}

/// Without a command: SIGTERM and SIGINT deregister, then exit 0. The address defaults to the
/// one the server sees.
#[test]
fn agent_without_a_command_deregisters_on_sigterm_and_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProc::start(&dir.path().join("data"), &dir.path().join("zones"), &[]);
    for (sig, node) in [(libc::SIGTERM, "n-term"), (libc::SIGINT, "n-int")] {
        let mut a = Killed(agent(&server.api(), &["--role", "solo", "--node", node]));
        let name = format!("{node}.solo.cluster.");
        assert!(
            eventually(Duration::from_secs(10), || dns_a(server.dns, &name)
                .is_some_and(|a| a == ["127.0.0.1"])),
            "{node} not registered with its peer address"
        );
        kill(a.0.id(), sig);
        let status = wait_exit(&mut a.0, Duration::from_secs(10)).expect("agent did not exit");
        assert_eq!(status.code(), Some(0));
        assert!(api_nodes(&server.api(), "solo").is_some_and(|n| !n.contains_key(node)));
        assert_eq!(dns_a(server.dns, &name), Some(vec![]));
    }
}

/// SIGHUP (a closed terminal, a stray `kill -HUP`) does not end an agent without a command:
/// it logs and keeps the node registered.
#[test]
fn agent_without_a_command_survives_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProc::start(&dir.path().join("data"), &dir.path().join("zones"), &[]);
    let mut a = Killed(agent(&server.api(), &["--role", "solo", "--node", "n-hup"]));
    let name = "n-hup.solo.cluster.";
    assert!(eventually(Duration::from_secs(10), || {
        dns_a(server.dns, name).is_some_and(|a| !a.is_empty())
    }));
    kill(a.0.id(), libc::SIGHUP);
    assert!(
        wait_exit(&mut a.0, Duration::from_secs(1)).is_none(),
        "SIGHUP ended the agent"
    );
    assert!(dns_a(server.dns, name).is_some_and(|a| !a.is_empty()));
    kill(a.0.id(), libc::SIGTERM);
    let status = wait_exit(&mut a.0, Duration::from_secs(10)).expect("agent did not exit");
    assert_eq!(status.code(), Some(0));
}

/// What the command leaves behind (a shell's background job that outlives it) is re-parented
/// to the agent and reaped when it exits: no zombies, whether the agent is PID 1 or not.
#[test]
fn agent_reaps_the_orphans_of_its_command() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProc::start(&dir.path().join("data"), &dir.path().join("zones"), &[]);
    let mut a = Killed(agent(
        &server.api(),
        &[
            "--role",
            "reap",
            "--node",
            "r1",
            "--drain",
            "0",
            "--",
            "sh",
            "-c",
            "(sleep 0.3 &); exec sleep 60",
        ],
    ));
    let me = a.0.id();
    // The orphaned `sleep 0.3` becomes the agent's child...
    assert!(
        eventually(Duration::from_secs(5), || children_of(me).iter().any(
            |c| cmdline(*c).contains("sleep0.3") || cmdline(*c).contains("sleep 0.3")
        )),
        "the orphan was not re-parented to the agent: {:?}",
        children_of(me)
            .iter()
            .map(|c| cmdline(*c))
            .collect::<Vec<_>>()
    );
    // ...and once it exits, it is reaped: no zombie child.
    std::thread::sleep(Duration::from_millis(1500));
    let zombies: Vec<u32> = children_of(me)
        .into_iter()
        .filter(|c| {
            std::fs::read_to_string(format!("/proc/{c}/stat"))
                .ok()
                .and_then(|s| {
                    s.rfind(')')
                        .map(|i| s[i + 1..].trim_start().starts_with('Z'))
                })
                .unwrap_or(false)
        })
        .collect();
    assert!(
        zombies.is_empty(),
        "zombie children of the agent: {zombies:?}"
    );
    assert!(
        children_of(me).iter().any(|c| cmdline(*c).contains("60")),
        "the command itself still runs"
    );
    kill(me, libc::SIGTERM);
    let status = wait_exit(&mut a.0, Duration::from_secs(10)).expect("agent did not exit");
    assert_eq!(status.code(), Some(143));
}

/// With `--check`: registered only while the check passes.
#[test]
fn agent_is_registered_only_while_its_check_passes() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProc::start(&dir.path().join("data"), &dir.path().join("zones"), &[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let check = format!("tcp://127.0.0.1:{port}");
    let _a = Killed(agent(
        &server.api(),
        &[
            "--role",
            "checked",
            "--node",
            "c1",
            "--addr",
            "127.0.0.9",
            "--check",
            &check,
        ],
    ));
    let name = "c1.checked.cluster.";
    let present = || dns_a(server.dns, name).is_some_and(|a| !a.is_empty());
    assert!(
        !eventually(Duration::from_millis(1500), present),
        "registered while the check fails"
    );
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    assert!(
        eventually(Duration::from_secs(5), present),
        "not registered once the check passes"
    );
    drop(listener);
    assert!(
        eventually(Duration::from_secs(5), || !present()),
        "still registered after the check started failing"
    );
    let _listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    assert!(
        eventually(Duration::from_secs(5), present),
        "not registered again"
    );
}

/// With a command: the child's exit code is passed on (128+N when killed by signal N), and
/// the node is deregistered when it exits; bad flags exit 2, a command that cannot run exits 1.
#[test]
fn agent_passes_on_the_command_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProc::start(&dir.path().join("data"), &dir.path().join("zones"), &[]);
    let api = server.api();
    for (script, code) in [
        ("sleep 0.5; exit 7", 7),
        ("sleep 0.5; kill -9 $$", 137),
        ("exit 0", 0),
    ] {
        let mut a = Killed(agent(
            &api,
            &["--role", "cmd", "--node", "k1", "--", "sh", "-c", script],
        ));
        let status = wait_exit(&mut a.0, Duration::from_secs(10)).expect("agent did not exit");
        assert_eq!(status.code(), Some(code), "{script}");
        assert!(
            api_nodes(&api, "cmd").is_some_and(|n| n.is_empty()),
            "{script}: left registered"
        );
    }
    let mut a = Killed(agent(&api, &["--role", "Bad_Role", "--node", "k1"]));
    let status = wait_exit(&mut a.0, Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(2));
    let mut a = Killed(agent(
        &api,
        &["--role", "cmd", "--node", "k1", "--", "/nonexistent/app"],
    ));
    let status = wait_exit(&mut a.0, Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(1));
}

/// The drain after SIGTERM: skipped when the node was never registered (nothing to drain), cut
/// short by a second signal.
#[test]
fn agent_drain_is_skipped_when_unregistered_and_cut_by_a_second_signal() {
    // Never registered: the server is not there. SIGTERM reaches the command at once.
    let unused = TcpListener::bind("127.0.0.1:0").unwrap();
    let api = format!("http://{}", unused.local_addr().unwrap());
    drop(unused);
    let mut a = Killed(agent(
        &api,
        &[
            "--role", "d", "--node", "d1", "--drain", "30s", "--", "sleep", "60",
        ],
    ));
    assert!(eventually(Duration::from_secs(10), || !children_of(
        a.0.id()
    )
    .is_empty()));
    let t = Instant::now();
    kill(a.0.id(), libc::SIGTERM);
    let status = wait_exit(&mut a.0, Duration::from_secs(10))
        .expect("the agent waited out a drain for a node that was never registered");
    assert_eq!(status.code(), Some(143), "sleep killed by SIGTERM");
    eprintln!("unregistered: SIGTERM -> exit in {:?}", t.elapsed());

    // Registered: the first SIGTERM deregisters and starts a 30-s drain; a second one ends it.
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProc::start(&dir.path().join("data"), &dir.path().join("zones"), &[]);
    let mut a = Killed(agent(
        &server.api(),
        &[
            "--role", "d", "--node", "d2", "--drain", "30s", "--", "sleep", "60",
        ],
    ));
    let name = "d2.d.cluster.";
    let present = || dns_a(server.dns, name).is_some_and(|a| !a.is_empty());
    assert!(eventually(Duration::from_secs(10), present));
    kill(a.0.id(), libc::SIGTERM);
    assert!(
        eventually(Duration::from_secs(5), || !present()),
        "not deregistered"
    );
    assert!(
        wait_exit(&mut a.0, Duration::from_millis(500)).is_none(),
        "the command was stopped without a drain"
    );
    let sleep = children_of(a.0.id());
    assert!(
        sleep.iter().all(|p| alive(*p)) && !sleep.is_empty(),
        "the command is still running during the drain"
    );
    let t = Instant::now();
    kill(a.0.id(), libc::SIGTERM);
    let status = wait_exit(&mut a.0, Duration::from_secs(10))
        .expect("a second SIGTERM did not end the drain");
    assert_eq!(status.code(), Some(143));
    eprintln!("second SIGTERM -> exit in {:?}", t.elapsed());
}

/// `--stop-signal QUIT` (nginx's graceful stop): the agent deregisters on SIGTERM, drains, then
/// sends the command SIGQUIT, not the SIGTERM it received.
#[test]
fn agent_sends_the_stop_signal_it_is_told_after_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServeProc::start(&dir.path().join("data"), &dir.path().join("zones"), &[]);
    let mut a = Killed(agent(
        &server.api(),
        &[
            "--role",
            "q",
            "--node",
            "q1",
            "--drain",
            "300ms",
            "--stop-signal",
            "quit",
            "--",
            "sh",
            "-c",
            "trap 'exit 7' QUIT; trap 'exit 9' TERM; while :; do sleep 0.05; done",
        ],
    ));
    let name = "q1.q.cluster.";
    let present = || dns_a(server.dns, name).is_some_and(|a| !a.is_empty());
    assert!(eventually(Duration::from_secs(10), present));
    let t = Instant::now();
    kill(a.0.id(), libc::SIGTERM);
    assert!(
        eventually(Duration::from_secs(5), || !present()),
        "not deregistered"
    );
    let status = wait_exit(&mut a.0, Duration::from_secs(10)).expect("the agent did not exit");
    let took = t.elapsed();
    assert_eq!(
        status.code(),
        Some(7),
        "the command should have got SIGQUIT (exit 7), not SIGTERM (exit 9)"
    );
    assert!(took >= Duration::from_millis(300), "no drain: {took:?}");
    eprintln!("SIGTERM -> deregistered, drained, SIGQUIT -> exit in {took:?}");

    // A name the agent does not know is refused before anything starts.
    let out = Command::new(env!("CARGO_BIN_EXE_rollcall"))
        .args([
            "register",
            "--role",
            "q",
            "--stop-signal",
            "STOP",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--stop-signal") && err.contains("QUIT"),
        "{err}"
    );
}
