//! `rollcall hipache-sync`: keeps hipache's redis keys equal to one role's live nodes.
//!
//! Two tasks share one `watch` channel:
//! - the *follower* reads the role from the rollcall API with Consul-style blocking queries
//!   (`GET /v1/roles/{role}?index=N&wait=…`) and publishes the list hipache should see;
//! - the *writer* makes redis match it: for every `--frontend` host, `frontend:<host>` becomes
//!   `[identifier, backend URLs sorted…]` and `dead:<host>` is deleted, all in one
//!   `MULTI`/`EXEC`, so hipache (which reads in one `MULTI` per request) never sees a missing,
//!   empty or half-written list.
//!
//! Invariants:
//! - the list is never deleted between two writes: `DEL` + variadic `RPUSH` run inside one
//!   transaction, and zero live nodes still leave the identifier (hipache then answers 502);
//! - nothing is written before the role has been read once: an unreachable rollcall never
//!   empties hipache's list, the last known set stays;
//! - backend order is stable (sorted by address, then port) so hipache's dead marks keep
//!   pointing at the right backends while the membership is unchanged; they are cleared with
//!   every change of the list;
//! - a list that already equals the wanted one is not rewritten (its dead marks stay), except
//!   right after start and after any reconnect to redis or to rollcall, when every list is
//!   rewritten in full (redis may have come back empty, rollcall may have changed while away);
//! - every second the writer re-reads the lists (one pipelined `LRANGE` per host): a redis that
//!   restarted, was flushed or was edited by hand is put right within about a second;
//! - errors are retried with jittered exponential backoff; each link (rollcall, redis) logs
//!   once when it goes down and once when it comes back, never once per retry.
//!
//! Files: `config.rs` (flags → [`SyncConfig`]), `follower.rs`, `writer.rs`, and here [`run`]
//! wiring the two tasks, the `Wanted` list between them and each link's up/down state.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use reqwest::Url;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api::model::{NodeOut, RoleOut};
use crate::cli::HipacheArgs;
use crate::registry::Label;

/// Longest wait of one blocking query (shortened to `--interval` when that is shorter).
const BLOCKING_WAIT: Duration = Duration::from_secs(30);
/// Extra time a blocking query may take beyond its wait before it counts as failed.
const HTTP_GRACE: Duration = Duration::from_secs(10);
/// Connect timeout for the rollcall API and redis.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a redis command may take before the connection is given up and made again.
const REDIS_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the writer re-reads the lists from redis.
const REDIS_CHECK: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

mod config;
mod follower;
mod writer;

use crate::client::chain;
pub use config::*;
use follower::*;
use writer::*;

pub async fn run(args: HipacheArgs) -> Result<u8, (u8, String)> {
    let cfg = SyncConfig::from_args(args).map_err(|e| (2, e))?;
    let cancel = crate::shutdown::on_signals();
    crate::shutdown::ignore_hangup(
        "hipache-sync has nothing to reload (it follows the role and checks redis continuously)",
    );
    run_with(cfg, cancel).await
}

/// Runs until `cancel` fires; returns 0 then.
pub async fn run_with(cfg: SyncConfig, cancel: CancellationToken) -> Result<u8, (u8, String)> {
    // Like every client subcommand: rollcall is reached directly, never through a proxy.
    let http = crate::client::http(CONNECT_TIMEOUT, None, cfg.tls.as_ref())
        .build()
        .map_err(|e| (1, format!("cannot set up the HTTP client: {}", chain(&e))))?;
    let client = redis::Client::open(cfg.redis.clone())
        .map_err(|e| (2, format!("--redis {}: {e}", cfg.redis_shown)))?;
    let hosts: Vec<String> = cfg.frontends.iter().map(|h| cfg.list_key(h)).collect();
    tracing::info!(
        role = %cfg.role,
        api = %cfg.api,
        redis = %cfg.redis_shown,
        keys = %hosts.join(" "),
        "hipache-sync starting: following role {} into {}",
        cfg.role,
        hosts.join(", ")
    );
    let (tx, rx) = watch::channel(None);
    let follower = Follower {
        cfg: cfg.clone(),
        http,
        tx,
        at: std::sync::atomic::AtomicUsize::new(0),
    };
    let follow_task = tokio::spawn(follower.run(cancel.clone()));
    let writer = Writer {
        cfg,
        client,
        conn: None,
        link: Link::new("redis"),
        last_written: None,
    };
    writer.run(rx, cancel.clone()).await;
    cancel.cancel();
    let _ = follow_task.await;
    tracing::info!("hipache-sync stopped; the lists stay as last written");
    Ok(0)
}

/// What the writer should make redis hold.
#[derive(Clone, Debug, PartialEq)]
struct Wanted {
    list: Vec<String>,
    /// Bumped on every (re)connection to rollcall: the writer then rewrites everything.
    epoch: u64,
}

/// Up/down state of one link, so each change is logged once.
struct Link {
    name: &'static str,
    down: Option<(Instant, u32)>,
    ever_up: bool,
}

impl Link {
    fn new(name: &'static str) -> Link {
        Link {
            name,
            down: None,
            ever_up: false,
        }
    }

    /// Records a success; true when this is a reconnection (or the first connection).
    fn up(&mut self, target: &str) -> bool {
        let was_down = self.down.take();
        let first = !self.ever_up;
        self.ever_up = true;
        if let Some((since, failures)) = was_down {
            tracing::info!(
                link = self.name,
                target,
                failures,
                down_for_ms = since.elapsed().as_millis() as u64,
                "{} at {target} is reachable again",
                self.name
            );
            true
        } else {
            first
        }
    }

    fn down(&mut self, target: &str, error: &str) {
        match &mut self.down {
            Some((_, failures)) => {
                *failures += 1;
                tracing::debug!(link = self.name, target, error, "still failing; retrying");
            }
            None => {
                self.down = Some((Instant::now(), 1));
                tracing::warn!(
                    link = self.name,
                    target,
                    error,
                    "{} at {target} is unreachable: {error}; retrying with backoff",
                    self.name
                );
            }
        }
    }
}

/// Sleeps for `d`; false when cancelled first.
async fn pause(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn args(extra: &[&str]) -> HipacheArgs {
        use clap::Parser;
        let mut argv = vec!["rollcall", "hipache-sync"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(argv).unwrap().command {
            crate::cli::Command::HipacheSync(a) => a,
            _ => unreachable!(),
        }
    }

    fn node(addr: &str, port: Option<u16>) -> NodeOut {
        NodeOut {
            role: "frontserver".into(),
            node: format!("n-{}", addr.replace([':', '.'], "-")),
            addr: addr.into(),
            port,
            service: "http".into(),
            ttl: 5,
            weight: 1,
            meta: BTreeMap::new(),
            expires_in: 5.0,
            age: 0.0,
            session: false,
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("15").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        for bad in ["abc", "", "10x", "-1s", "s", "1e9999"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn list_is_sorted_deduplicated_and_bracketed() {
        let cfg = SyncConfig::from_args(args(&["--frontend", "www.example.com"])).unwrap();
        let nodes = [
            node("10.0.0.10", Some(8080)),
            node("fd00::1", Some(8080)),
            node("10.0.0.9", None),
            node("10.0.0.9", Some(8080)),
            node("10.0.0.10", Some(8080)),
        ];
        assert_eq!(
            cfg.hipache_list(&nodes),
            [
                "frontserver",
                "http://10.0.0.9:80",
                "http://10.0.0.9:8080",
                "http://10.0.0.10:8080",
                "http://[fd00::1]:8080"
            ]
        );
        assert_eq!(cfg.hipache_list(&[]), ["frontserver"]);
        let cfg = SyncConfig::from_args(args(&[
            "--frontend",
            "a",
            "--port",
            "9000",
            "--scheme",
            "HTTPS",
            "--identifier",
            "site",
        ]))
        .unwrap();
        assert_eq!(
            cfg.hipache_list(&nodes[..3]),
            [
                "site",
                "https://10.0.0.9:9000",
                "https://10.0.0.10:9000",
                "https://[fd00::1]:9000"
            ]
        );
        let cfg = SyncConfig::from_args(args(&["--frontend", "a", "--scheme", "https"])).unwrap();
        assert_eq!(
            cfg.hipache_list(&nodes[2..3]),
            ["frontserver", "https://10.0.0.9:443"]
        );
    }

    #[test]
    fn flags_are_validated() {
        let ok = SyncConfig::from_args(args(&[
            "--api",
            "http://dns:8053/base",
            "--role",
            "FrontServer",
            "--redis",
            "redis://:s3cret@127.0.0.1:6380/3#hip:",
            "--frontend",
            "WWW.Example.com,*.example.com",
            "--frontend",
            "www.example.com",
            "--interval",
            "0",
        ]))
        .unwrap();
        assert_eq!(
            ok.role_url.as_str(),
            "http://dns:8053/base/v1/roles/frontserver"
        );
        assert_eq!(ok.frontends, ["www.example.com", "*.example.com"]);
        assert_eq!(ok.prefix, "hip:");
        assert_eq!(ok.redis.redis.db, 3);
        assert_eq!(ok.redis.redis.password.as_deref(), Some("s3cret"));
        assert!(!ok.redis_shown.contains("s3cret"));
        assert_eq!(ok.interval, None);
        assert_eq!(
            ok.list_key("www.example.com"),
            "hip:frontend:www.example.com"
        );
        for (bad, needle) in [
            (vec!["--frontend", ""], "--frontend"),
            (vec!["--frontend", "a,,b"], "--frontend"),
            (vec!["--frontend", "a b"], "--frontend"),
            (vec!["--frontend", "a", "--interval", "abc"], "--interval"),
            (vec!["--frontend", "a", "--redis", "http://x"], "--redis"),
            (
                vec!["--frontend", "a", "--redis", "redis://h:port"],
                "--redis",
            ),
            (
                vec!["--frontend", "a", "--redis", "redis://h/notadb"],
                "--redis",
            ),
            (vec!["--frontend", "a", "--redis", "rediss://h"], "TLS"),
            (vec!["--frontend", "a", "--api", "nope"], "--api"),
            (vec!["--frontend", "a", "--api", "ftp://x"], "--api"),
            (vec!["--frontend", "a", "--role", "bad_role"], "--role"),
            (vec!["--frontend", "a", "--scheme", "ftp"], "--scheme"),
            (vec!["--frontend", "a", "--port", "0"], "--port"),
            (vec!["--frontend", "a", "--identifier", " "], "--identifier"),
        ] {
            let e = SyncConfig::from_args(args(&bad)).unwrap_err();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
    }

    #[test]
    fn wildcard_lookup_chain() {
        assert_eq!(
            more_specific("a.b.example.com", "*.example.com"),
            ["a.b.example.com", "*.b.example.com"]
        );
        assert_eq!(
            more_specific("a.example.com", "*.example.com"),
            ["a.example.com"]
        );
        assert_eq!(more_specific("a.b.c", "*"), ["a.b.c", "*.b.c", "*.c"]);
        assert_eq!(glob_escape("dead:*.x[1]"), "dead:\\*.x\\[1\\]");
    }
}
