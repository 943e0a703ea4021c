//! `rollcall register`: the node agent.
//!
//! It registers the node (`PUT`), then holds a WebSocket session whose pings (every ttl/3) renew
//! the lease, so that the agent's death — even `kill -9`, which makes the kernel close the
//! socket — removes the node at once, while a node that goes silent expires with its TTL.
//! Where the session cannot be had (a proxy that does not pass WebSockets, say) it renews by
//! `PUT` every ttl/3 instead and tries the session again now and then. While the server is away
//! it retries with jittered exponential backoff, and when the server is back it registers again
//! (`PUT`, then a new session): the server may have restarted. It logs each change of state
//! once, not each retry.
//!
//! With `--check`, the node is registered only while the check passes. With `-- COMMAND`, the
//! command runs as a child in its own process group: when it exits the agent deregisters and
//! exits with its code; on SIGTERM/SIGINT the agent deregisters first, waits `--drain` so that
//! resolvers stop handing out the address, then passes the signal on and waits for the child.
//! Other signals (HUP, QUIT, USR1, USR2, WINCH) are passed on at once.
//!
//! The moving parts, one file each: `plan.rs` ([`Plan`], the validated flags), `keeper.rs` (the
//! task that registers, holds the session or renews, backs off, deregisters when stopped),
//! `check.rs` (the health check task, feeding a watch channel), `child.rs` (the command: spawn,
//! signals, orphans, exit code) and, here, [`run`], which owns the signals and wires them up.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::cli::RegisterArgs;
use crate::registry::{parse_service, Label, MAX_TTL, MIN_TTL};

type Ws = WebSocketStream<crate::client::Stream>;

/// Longest wait for one API request (PUT, session handshake).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the DELETE on the way out: a server that is away cannot be helped.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(2);
/// With several `--api` servers: a request slower than this moves on to the next server.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(2);
/// In PUT-renewal mode, how often to try for a session again.
const SESSION_RETRY: Duration = Duration::from_secs(30);
/// Longest wait for one health check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a check that does not pass (yet) is tried.
const CHECK_RETRY: Duration = Duration::from_millis(250);
/// First backoff step; it doubles up to a cap.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Backoff cap after the server *refused* a registration (a setting to fix, not an outage).
const REJECTED_CAP: Duration = Duration::from_secs(30);

mod check;
mod child;
mod keeper;
mod plan;

use check::*;
use child::*;
use keeper::*;
pub use plan::*;
// For `rollcall docker`, which keeps one node per container with the same keeper.
pub(crate) use check::CheckState as Gate;
pub(crate) use keeper::Keeper as NodeKeeper;

// ---------------------------------------------------------------------------------------------
// Small helpers.

use crate::client::chain;

fn fmt_dur(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

// ---------------------------------------------------------------------------------------------
// Entry point.

pub async fn run(args: RegisterArgs) -> Result<u8, (u8, String)> {
    let plan = Arc::new(Plan::from_args(args).map_err(|e| (2, e))?);
    let sig = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| (1, format!("cannot install a {name} handler: {e}")))
    };
    let mut term = sig(SignalKind::terminate(), "SIGTERM")?;
    let mut int = sig(SignalKind::interrupt(), "SIGINT")?;
    let http = crate::client::http(
        Duration::from_secs(2),
        Some(REQUEST_TIMEOUT),
        plan.tls.as_ref(),
    )
    // A fresh connection per request: nothing stale to trip over after a server restart.
    .pool_max_idle_per_host(0)
    .build()
    .map_err(|e| (1, format!("cannot build the HTTP client: {e}")))?;

    tracing::info!(
        api = %plan.apis.join(","), role = %plan.role, node = %plan.node, ttl = plan.ttl,
        check = %plan.check.as_ref().map(|c| c.to_string()).unwrap_or_default(),
        "rollcall register starting"
    );
    let stop = CancellationToken::new();
    let check = match plan.check.clone() {
        Some(c) => {
            let http = check_client(&c, &plan.tls_files).map_err(|e| (2, e))?;
            Some(spawn_check(c, http, plan.check_every(), stop.clone()))
        }
        None => None,
    };

    let child = if plan.command.is_empty() {
        None
    } else {
        // Orphans of the command come to us (not to init), to be reaped: see reap_orphans.
        // SAFETY: prctl with an integer argument, no pointers.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
        let child = spawn_child(&plan.command).map_err(|e| (1, e))?;
        tracing::info!(pid = child.id(), command = ?plan.command, "started the command");
        Some(child)
    };
    let keeper = tokio::spawn(Keeper::new(plan.clone(), http).keep(stop.clone(), check));

    let Some(child) = child else {
        crate::shutdown::ignore_hangup(
            "the agent has nothing to reload (with a command, SIGHUP goes to it)",
        );
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "stopping: deregistering");
        stop.cancel();
        let _ = keeper.await;
        return Ok(0);
    };
    supervise(child, plan, stop, keeper, term, int).await
}

/// Runs until the child exits; deregisters before passing SIGTERM/SIGINT on.
async fn supervise(
    mut child: tokio::process::Child,
    plan: Arc<Plan>,
    stop: CancellationToken,
    keeper: JoinHandle<bool>,
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
) -> Result<u8, (u8, String)> {
    let pid = child.id().map(|p| p as libc::pid_t).unwrap_or(0);
    tokio::spawn(reap_orphans(pid));
    let mut passed = Vec::new();
    for (kind, no) in [
        (SignalKind::hangup(), libc::SIGHUP),
        (SignalKind::quit(), libc::SIGQUIT),
        (SignalKind::user_defined1(), libc::SIGUSR1),
        (SignalKind::user_defined2(), libc::SIGUSR2),
        (SignalKind::window_change(), libc::SIGWINCH),
    ] {
        let s = signal(kind).map_err(|e| {
            (
                1,
                format!("cannot install a {} handler: {e}", signal_name(no)),
            )
        })?;
        passed.push((s, no));
    }
    let mut keeper = Some(keeper);
    // A stop signal waiting for the drain to end.
    let mut pending: Option<(libc::c_int, Instant)> = None;

    loop {
        let stop_sig = tokio::select! {
            status = child.wait() => {
                let code = match status {
                    Ok(s) => {
                        if keeper.is_some() {
                            tracing::info!(status = %s, "the command exited; deregistering");
                        } else {
                            tracing::info!(status = %s, "the command exited");
                        }
                        exit_code(s)
                    }
                    Err(e) => {
                        tracing::error!("cannot wait for the command: {e}");
                        1
                    }
                };
                stop.cancel();
                if let Some(k) = keeper.take() {
                    let _ = k.await;
                }
                return Ok(code);
            }
            _ = term.recv() => libc::SIGTERM,
            _ = int.recv() => libc::SIGINT,
            _ = async {
                match pending {
                    Some((_, at)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let (sig, _) = pending.take().expect("armed");
                tracing::info!(signal = signal_name(sig), pid, "drain over: passing the signal on");
                forward(pid, sig);
                continue;
            }
            no = async {
                let waits = passed.iter_mut().map(|(s, no)| {
                    let no = *no;
                    Box::pin(async move {
                        s.recv().await;
                        no
                    })
                });
                futures_util::future::select_all(waits).await.0
            } => {
                tracing::info!(signal = signal_name(no), pid, "passing the signal on");
                forward(pid, no);
                continue;
            }
        };
        let received = stop_sig;
        // What the command gets: --stop-signal, else the signal received.
        let stop_sig = plan.stop_signal.unwrap_or(received);
        if let Some(k) = keeper.take() {
            tracing::info!(signal = signal_name(received), "stopping: deregistering");
            stop.cancel();
            let was_registered = k.await.unwrap_or(true);
            if plan.drain.is_zero() || !was_registered {
                // Nothing to drain when no resolver was ever handed the address.
                tracing::info!(signal = signal_name(stop_sig), pid, "passing the signal on");
                forward(pid, stop_sig);
            } else {
                tracing::info!(
                    "draining for {} before passing the signal on (a second signal cuts it short)",
                    fmt_dur(plan.drain)
                );
                pending = Some((stop_sig, Instant::now() + plan.drain));
            }
        } else {
            // A second stop signal: no more waiting.
            pending = None;
            tracing::info!(
                signal = signal_name(stop_sig),
                pid,
                "passing the signal on now"
            );
            forward(pid, stop_sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn plan(args: &[&str]) -> Result<Plan, String> {
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            a: RegisterArgs,
        }
        let p = P::try_parse_from(std::iter::once("register").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Plan::from_args(p.a)
    }

    #[test]
    fn a_server_on_loopback_among_others_registers_the_outward_address() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Only loopback (one host), or none: the server's view is right.
        assert_eq!(outward_addr(&v(&["http://127.0.0.1:8053"])), None);
        assert_eq!(
            outward_addr(&v(&["http://127.0.0.1:8053", "http://localhost:9"])),
            None
        );
        assert_eq!(outward_addr(&v(&["http://10.9.9.9:8053"])), None);
        // Loopback first, then a remote server: this host's address towards it, never loopback.
        if let Some((ip, _)) = outward_addr(&v(&["http://127.0.0.1:8053", "http://192.0.2.7:8053"]))
        {
            assert!(!ip.is_loopback() && !ip.is_unspecified(), "{ip}");
        }
        let p = plan(&[
            "--role",
            "r",
            "--node",
            "n",
            "--addr",
            "10.0.0.9",
            "--api",
            "http://127.0.0.1:8053,http://192.0.2.7:8053",
        ])
        .unwrap();
        assert_eq!(p.body["addr"], "10.0.0.9", "--addr wins");
        assert_eq!(
            plan(&["--role", "r", "--node", "n"])
                .unwrap()
                .body
                .get("addr"),
            None
        );
    }

    #[test]
    fn stop_signals_by_name() {
        assert_eq!(parse_signal("QUIT"), Ok(libc::SIGQUIT));
        assert_eq!(parse_signal("sigquit"), Ok(libc::SIGQUIT));
        assert_eq!(parse_signal("SIGTERM"), Ok(libc::SIGTERM));
        assert!(parse_signal("STOP").unwrap_err().contains("QUIT"));
        assert_eq!(
            plan(&["--role", "r", "--node", "n"]).unwrap().stop_signal,
            None
        );
        assert_eq!(
            plan(&["--role", "r", "--node", "n", "--stop-signal", "QUIT"])
                .unwrap()
                .stop_signal,
            Some(libc::SIGQUIT)
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("6s").unwrap(), Duration::from_secs(6));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        for bad in ["", "s", "-1s", "5x", "1e9s", "NaN"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn checks() {
        assert_eq!(
            Check::parse("tcp://127.0.0.1:8080").unwrap(),
            Check::Tcp("127.0.0.1:8080".into())
        );
        assert_eq!(
            Check::parse("tcp://[::1]:80").unwrap(),
            Check::Tcp("[::1]:80".into())
        );
        assert_eq!(
            Check::parse("http://127.0.0.1:8080/health").unwrap(),
            Check::Http("http://127.0.0.1:8080/health".into())
        );
        assert_eq!(
            Check::parse("https://127.0.0.1:8443/health").unwrap(),
            Check::Http("https://127.0.0.1:8443/health".into())
        );
        for bad in [
            "tcp://127.0.0.1",
            "udp://1.2.3.4:5",
            "127.0.0.1:80",
            "ftp://x/y",
        ] {
            let e = Check::parse(bad).unwrap_err();
            assert!(e.contains("--check"), "{e}");
        }
    }

    #[test]
    fn plans() {
        let p = plan(&[
            "--api",
            "http://127.0.0.1:8053/",
            "--role",
            "AppServer",
            "--node",
            "App1",
            "--addr",
            "10.0.0.7",
            "--port",
            "8080",
            "--ttl",
            "3",
            "--drain",
            "2s",
            "--",
            "python3",
            "app.py",
        ])
        .unwrap();
        assert_eq!(p.role.as_str(), "appserver");
        assert_eq!(p.node.as_str(), "app1");
        assert_eq!(
            p.session_url(&p.apis[0]),
            "ws://127.0.0.1:8053/v1/roles/appserver/nodes/app1/session"
        );
        assert_eq!(p.apis, ["http://127.0.0.1:8053"]);
        assert!(p.tls.is_none(), "no TLS set-up for http:// only");
        let s = plan(&["--api", "https://rc:8443", "--role", "r", "--node", "n"]).unwrap();
        assert_eq!(
            s.session_url(&s.apis[0]),
            "wss://rc:8443/v1/roles/r/nodes/n/session"
        );
        assert!(s.tls.is_some());
        assert_eq!(p.body["addr"], "10.0.0.7");
        assert_eq!(p.body["port"], 8080);
        assert_eq!(p.body["ttl"], 3);
        assert_eq!(p.beat(), Duration::from_secs(1));
        assert_eq!(p.drain, Duration::from_secs(2));
        assert_eq!(p.command, ["python3", "app.py"]);

        let p = plan(&["--role", "web", "--node", "n1"]).unwrap();
        assert!(p.body.get("addr").is_none() && p.body.get("port").is_none());
        assert_eq!(p.drain, Duration::from_secs(6));

        for (args, needle) in [
            (&["--role", "bad_role", "--node", "n"][..], "--role"),
            (&["--role", "r", "--node=-n"][..], "--node"),
            (&["--role", "r", "--node", "n", "--ttl", "0"][..], "--ttl"),
            (&["--role", "r", "--node", "n", "--addr", "x"][..], "--addr"),
            (&["--role", "r", "--node", "n", "--port", "0"][..], "--port"),
            (
                &["--role", "r", "--node", "n", "--drain", "soon"][..],
                "--drain",
            ),
            (
                // https:// is accepted since issue 23; another scheme is not.
                &["--role", "r", "--node", "n", "--api", "ftp://x"][..],
                "--api",
            ),
            (
                &["--role", "r", "--node", "n", "--check", "ftp://x:1"][..],
                "--check",
            ),
        ] {
            let e = plan(args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn node_defaults_to_the_host_name() {
        use super::plan::node_name_from_host;
        assert_eq!(
            node_name_from_host("web-1.example.com").unwrap().as_str(),
            "web-1"
        );
        assert_eq!(node_name_from_host("WEB-1").unwrap().as_str(), "web-1");
        for bad in ["WEB_1", "-x", "", ".example.com"] {
            let e = node_name_from_host(bad).unwrap_err();
            assert!(
                e.contains("--node NAME") && e.contains(&format!("{bad:?}")),
                "{bad:?}: {e}"
            );
        }
        // This machine's own name goes through the same function.
        let host = host_name().unwrap();
        assert_eq!(
            default_node_name().map(|l| l.to_string()),
            node_name_from_host(&host).map(|l| l.to_string())
        );
    }

    #[test]
    fn exit_codes() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(std::process::ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(
            exit_code(std::process::ExitStatus::from_raw(libc::SIGTERM)),
            143
        );
    }
}
