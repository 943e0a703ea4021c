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

/// Validated settings of `rollcall hipache-sync`.
#[derive(Clone, Debug)]
pub struct SyncConfig {
    /// `…/v1/roles/<role>` on the rollcall API (the first server's).
    pub role_url: Url,
    /// The same on every `--api` server, in the order they are tried.
    pub role_urls: Vec<Url>,
    pub api: String,
    pub role: Label,
    pub redis: redis::ConnectionInfo,
    /// The redis URL without its password, for logs.
    pub redis_shown: String,
    /// Key prefix (hipache's `redis://…#prefix`), usually empty.
    pub prefix: String,
    /// Frontend hosts, lower case, without duplicates, in the order given.
    pub frontends: Vec<String>,
    pub identifier: String,
    pub scheme: String,
    pub port: Option<u16>,
    /// Re-read the role at least this often (None: rely on blocking queries alone).
    pub interval: Option<Duration>,
    pub token: Option<String>,
}

pub use crate::clock::parse_duration;

/// A frontend host as hipache looks it up: a host name, `*.<domain>` or the catch-all `*`.
fn parse_frontend(raw: &str) -> Result<String, String> {
    let host = raw.trim().to_ascii_lowercase();
    let bad = |why: &str| {
        format!(
            "--frontend {raw:?} {why}: give the Host header hipache serves, e.g. \
             --frontend www.example.com (or *.example.com, or * for every host)"
        )
    };
    if host.is_empty() {
        return Err(bad("is empty"));
    }
    if host == "*" {
        return Ok(host);
    }
    let name = host.strip_prefix("*.").unwrap_or(&host);
    if name.is_empty() || name.len() > 253 {
        return Err(bad("is not a host name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(bad(&format!("contains {c:?}")));
    }
    if name.split('.').any(str::is_empty) {
        return Err(bad("has an empty label"));
    }
    Ok(host)
}

/// The redis URL without its password, for messages and logs.
fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// `…/v1/roles/<role>` on one `--api` server, validated.
fn role_url_of(api_s: &str, role: &Label) -> Result<Url, String> {
    let base = crate::client::api_url(api_s)?;
    Url::parse(&format!("{base}/v1/roles/{role}")).map_err(|e| format!("--api {api_s:?}: {e}"))
}

impl SyncConfig {
    /// Validates the flags; every error names the flag and what would be accepted.
    pub fn from_args(a: HipacheArgs) -> Result<SyncConfig, String> {
        // rollcall API: one or more servers
        let role = Label::parse(a.role.trim()).map_err(|e| {
            format!(
                "--role {:?} {e}: give the role the frontservers register under",
                a.role
            )
        })?;
        let mut role_urls = Vec::new();
        for api_s in a.api.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            role_urls.push(role_url_of(api_s, &role)?);
        }
        let Some(role_url) = role_urls.first().cloned() else {
            return Err(
                "--api is empty: give the URL of a rollcall server, e.g. http://127.0.0.1:8053"
                    .into(),
            );
        };

        // redis, with hipache's optional `#prefix`
        let raw = a.redis.trim();
        let (url, prefix) = match raw.split_once('#') {
            Some((u, p)) => (u, p.to_owned()),
            None => (raw, String::new()),
        };
        let redis_shown = redact(raw);
        let scheme_ok = url.starts_with("redis://")
            || url.starts_with("unix://")
            || url.starts_with("redis+unix://");
        if !scheme_ok {
            let hint = if url.starts_with("rediss://") {
                "TLS (rediss://) is not supported by this build; use redis://"
            } else {
                "use redis://[:password@]host[:port][/db], e.g. redis://127.0.0.1:6379"
            };
            return Err(format!("--redis {redis_shown:?} is not usable: {hint}"));
        }
        let redis = redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| {
            format!(
                "--redis {redis_shown:?} is not a redis URL ({e}): use \
                 redis://[:password@]host[:port][/db], e.g. redis://127.0.0.1:6379/0"
            )
        })?;

        // frontends
        let mut frontends = Vec::new();
        for f in &a.frontends {
            let host = parse_frontend(f)?;
            if !frontends.contains(&host) {
                frontends.push(host);
            }
        }
        if frontends.is_empty() {
            return Err(
                "no --frontend given: name at least one host hipache serves, e.g. \
                        --frontend www.example.com"
                    .into(),
            );
        }

        let identifier = match a.identifier {
            None => role.to_string(),
            Some(id) if id.trim().is_empty() => {
                return Err(
                    "--identifier is empty: give a name for hipache's logs, or leave \
                            it out to use the role name"
                        .into(),
                )
            }
            Some(id) => id.trim().to_owned(),
        };
        let scheme = a.scheme.trim().to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!(
                "--scheme {:?} is not one hipache proxies to: use http or https",
                a.scheme
            ));
        }
        if a.port == Some(0) {
            return Err(
                "--port 0 is not a port: use 1 to 65535, or leave it out to use each \
                        node's registered port"
                    .into(),
            );
        }
        let interval = parse_duration(&a.interval)
            .map_err(|e| format!("--interval {e}; 0 turns the periodic re-read off"))?;
        let interval = (!interval.is_zero()).then_some(interval);
        let token =
            crate::config::read_token(a.token, a.token_file.as_ref()).map_err(|e| e.to_string())?;
        Ok(SyncConfig {
            role_url,
            role_urls,
            api: a.api.join(","),
            role,
            redis,
            redis_shown,
            prefix,
            frontends,
            identifier,
            scheme,
            port: a.port,
            interval,
            token,
        })
    }

    fn list_key(&self, host: &str) -> String {
        format!("{}frontend:{host}", self.prefix)
    }

    fn dead_key(&self, host: &str) -> String {
        format!("{}dead:{host}", self.prefix)
    }

    /// How long one blocking query waits.
    fn wait(&self) -> Duration {
        self.interval
            .map_or(BLOCKING_WAIT, |i| i.min(BLOCKING_WAIT))
    }

    /// The list hipache should see for these nodes: the identifier, then one URL per distinct
    /// backend, sorted by address then port.
    pub fn hipache_list(&self, nodes: &[NodeOut]) -> Vec<String> {
        let default_port = if self.scheme == "https" { 443 } else { 80 };
        let backends: BTreeSet<(IpAddr, u16)> = nodes
            .iter()
            .filter_map(|n| {
                let ip = n.addr.parse::<IpAddr>().ok()?;
                Some((ip, self.port.or(n.port).unwrap_or(default_port)))
            })
            .collect();
        std::iter::once(self.identifier.clone())
            .chain(
                backends
                    .into_iter()
                    .map(|(ip, port)| backend_url(&self.scheme, ip, port)),
            )
            .collect()
    }
}

/// `http://10.0.0.5:8080`, `http://[fd00::5]:8080`.
pub fn backend_url(scheme: &str, ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{scheme}://{v4}:{port}"),
        IpAddr::V6(v6) => format!("{scheme}://[{v6}]:{port}"),
    }
}

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
    let http = crate::client::http(CONNECT_TIMEOUT, None)
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

use crate::client::chain;

/// Follows the role on the rollcall API and publishes the wanted list.
struct Follower {
    cfg: SyncConfig,
    http: reqwest::Client,
    tx: watch::Sender<Option<Wanted>>,
    /// The `--api` server followed now (index into `cfg.role_urls`).
    at: std::sync::atomic::AtomicUsize,
}

impl Follower {
    async fn run(self, cancel: CancellationToken) {
        let mut link = Link::new("rollcall");
        let mut backoff = crate::client::Backoff::new(BACKOFF_MIN);
        let mut epoch = 0u64;
        // None: the next read is a plain one (start, or after an error).
        let mut index: Option<u64> = None;
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.fetch(index) => r,
            };
            match result {
                Ok(role) => {
                    // A plain read follows a (re)connection; an index that went backwards
                    // means rollcall restarted between two queries.
                    let reconnected =
                        link.up(&self.cfg.api) || index.is_none_or(|i| role.index < i);
                    if reconnected {
                        epoch += 1;
                    }
                    index = Some(role.index);
                    backoff.reset();
                    let list = self.cfg.hipache_list(&role.nodes);
                    self.tx.send_if_modified(|cur| {
                        let changed = reconnected || cur.as_ref().is_none_or(|w| w.list != list);
                        if changed {
                            tracing::debug!(
                                index = role.index,
                                nodes = role.nodes.len(),
                                "role read"
                            );
                            *cur = Some(Wanted { list, epoch });
                        }
                        changed
                    });
                }
                Err(e) => {
                    link.down(&self.cfg.api, &e);
                    index = None;
                    let n = self.cfg.role_urls.len();
                    if n > 1 {
                        // Sticky: move on only when the server in use fails.
                        use std::sync::atomic::Ordering::Relaxed;
                        let at = (self.at.load(Relaxed) + 1) % n;
                        self.at.store(at, Relaxed);
                        tracing::warn!(to = %self.cfg.role_urls[at], "following the role on the next rollcall server");
                        if at != 0 {
                            continue; // back off only after a whole pass failed
                        }
                    }
                    if !pause(backoff.next(BACKOFF_MAX), &cancel).await {
                        return;
                    }
                }
            }
        }
    }

    /// Reads the role; with an index, waits (blocking query) until it changes past it.
    async fn fetch(&self, index: Option<u64>) -> Result<RoleOut, String> {
        let at = self.at.load(std::sync::atomic::Ordering::Relaxed);
        let mut url = self.cfg.role_urls[at % self.cfg.role_urls.len()].clone();
        let timeout = match index {
            Some(i) => {
                let wait = self.cfg.wait();
                url.query_pairs_mut()
                    .append_pair("index", &i.to_string())
                    .append_pair("wait", &format!("{}ms", wait.as_millis()));
                wait + HTTP_GRACE
            }
            None => HTTP_GRACE,
        };
        let mut req = self.http.get(url).timeout(timeout);
        if let Some(t) = &self.cfg.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| chain(&e))?;
        let status = resp.status();
        if !status.is_success() {
            let msg = crate::client::error_message(&resp.text().await.unwrap_or_default());
            return Err(format!("the API answered {status}: {msg}"));
        }
        resp.json::<RoleOut>()
            .await
            .map_err(|e| format!("the API's answer is not a role: {}", chain(&e)))
    }
}

/// Makes redis hold the wanted lists.
struct Writer {
    cfg: SyncConfig,
    client: redis::Client,
    conn: Option<MultiplexedConnection>,
    link: Link,
    /// The list last written (to tell a change of the role from a list changed behind us).
    last_written: Option<Vec<String>>,
}

/// Why a write happens, for the log.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Reason {
    /// Start, or reconnection to redis or rollcall: everything is rewritten.
    Full,
    /// The role changed.
    Change,
    /// The list in redis differs although the role did not change (redis lost it, or someone
    /// edited it).
    Repair,
}

impl Writer {
    async fn run(mut self, mut rx: watch::Receiver<Option<Wanted>>, cancel: CancellationToken) {
        let mut backoff = crate::client::Backoff::new(BACKOFF_MIN);
        // Rewrite everything on the next successful write.
        let mut full = true;
        let mut written_epoch = 0u64;
        loop {
            let wanted = rx.borrow_and_update().clone();
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.sync(wanted.as_ref(), full || wanted.as_ref().is_some_and(|w| w.epoch != written_epoch)) => r,
            };
            match result {
                Ok(new_conn) => {
                    backoff.reset();
                    if let Some(w) = &wanted {
                        written_epoch = w.epoch;
                        full = false;
                    } else if new_conn {
                        // Nothing known yet: the first list will be written in full anyway.
                        full = true;
                    }
                }
                Err(e) => {
                    self.conn = None;
                    self.link.down(&self.cfg.redis_shown, &e);
                    full = true;
                    if !pause(backoff.next(BACKOFF_MAX), &cancel).await {
                        return;
                    }
                    continue;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(REDIS_CHECK) => {}
            }
        }
    }

    /// Connects when needed, then makes every list equal `wanted` (all of them when `full`).
    /// Returns whether a new connection was made.
    async fn sync(&mut self, wanted: Option<&Wanted>, full: bool) -> Result<bool, String> {
        let mut new_conn = false;
        if self.conn.is_none() {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(CONNECT_TIMEOUT)
                .set_response_timeout(REDIS_TIMEOUT);
            let mut conn = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(|e| e.to_string())?;
            let _: String = redis::cmd("PING")
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            self.conn = Some(conn);
            new_conn = true;
            self.link.up(&self.cfg.redis_shown);
        }
        let Some(wanted) = wanted else {
            if !new_conn {
                let conn = self.conn.as_mut().expect("connected above");
                let _: String = redis::cmd("PING")
                    .query_async(conn)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            return Ok(new_conn);
        };
        let full = full || new_conn;
        self.write(&wanted.list, full)
            .await
            .map_err(|e| e.to_string())?;
        Ok(new_conn)
    }

    /// Writes `list` to every frontend whose list differs (every frontend when `full`), in one
    /// transaction.
    async fn write(&mut self, list: &[String], full: bool) -> redis::RedisResult<()> {
        let cfg = &self.cfg;
        let conn = self.conn.as_mut().expect("connected before write");
        let stale: Vec<&String> = if full {
            cfg.frontends.iter().collect()
        } else {
            let mut p = redis::pipe();
            for host in &cfg.frontends {
                p.lrange(cfg.list_key(host), 0, -1);
            }
            match p.query_async::<Vec<Vec<String>>>(conn).await {
                Ok(current) => cfg
                    .frontends
                    .iter()
                    .zip(current)
                    .filter(|(_, cur)| cur.as_slice() != list)
                    .map(|(h, _)| h)
                    .collect(),
                // Not a list (WRONGTYPE) or the like: rewrite everything, which fixes it.
                Err(e) if !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped()) => {
                    cfg.frontends.iter().collect()
                }
                Err(e) => return Err(e),
            }
        };
        if stale.is_empty() {
            return Ok(());
        }
        // Dead marks of hosts that reach a wildcard frontend are keyed by the requested host.
        let mut extra_dead = Vec::new();
        for host in &stale {
            if host.starts_with('*') {
                extra_dead.extend(wildcard_dead_keys(conn, &cfg.prefix, host).await?);
            }
        }
        let mut tx = redis::pipe();
        tx.atomic();
        for host in &stale {
            let key = cfg.list_key(host);
            tx.del(&key).ignore();
            tx.rpush(&key, list).ignore();
            tx.del(cfg.dead_key(host)).ignore();
        }
        if !extra_dead.is_empty() {
            tx.del(&extra_dead).ignore();
        }
        let started = Instant::now();
        tx.query_async::<()>(conn).await?;
        let reason = if full {
            Reason::Full
        } else if self.last_written.as_deref() == Some(list) {
            Reason::Repair
        } else {
            Reason::Change
        };
        let keys: Vec<String> = stale.iter().map(|h| cfg.list_key(h)).collect();
        let keys = keys.join(" ");
        let backends = list.len() - 1;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        match reason {
            Reason::Full => tracing::info!(
                keys,
                backends,
                ms,
                "wrote the full state: {backends} backends"
            ),
            Reason::Change => {
                tracing::info!(keys, backends, ms, "role changed: {backends} backends")
            }
            Reason::Repair => tracing::warn!(
                keys,
                backends,
                ms,
                "the list in redis differed from the role (redis restarted or flushed, or \
                 someone edited it): restored {backends} backends"
            ),
        }
        tracing::debug!(list = ?list, "written");
        self.last_written = Some(list.to_vec());
        Ok(())
    }
}

/// Escapes redis glob characters.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Frontend keys hipache would try before reaching the wildcard `ours` (`*` or `*.domain`)
/// for the requested `host`: the exact name and every more specific wildcard.
fn more_specific(host: &str, ours: &str) -> Vec<String> {
    let suffix = &ours[1..]; // "" for "*", ".domain" for "*.domain"
    let mut v = vec![host.to_owned()];
    let mut rest = host;
    while let Some(i) = rest.find('.') {
        let parent = &rest[i..];
        if parent.len() <= suffix.len() {
            break;
        }
        v.push(format!("*{parent}"));
        rest = &rest[i + 1..];
    }
    v
}

/// `dead:<host>` keys of requested hosts that reach the wildcard frontend `ours` (no exact
/// or more specific frontend of their own).
async fn wildcard_dead_keys(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    ours: &str,
) -> redis::RedisResult<Vec<String>> {
    let dead_prefix = format!("{prefix}dead:");
    let pattern = format!("{}*{}", glob_escape(&dead_prefix), glob_escape(&ours[1..]));
    let mut found = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        found.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    found.retain(|k| k != &format!("{dead_prefix}{ours}"));
    if found.is_empty() {
        return Ok(found);
    }
    let mut p = redis::pipe();
    for key in &found {
        let host = &key[dead_prefix.len()..];
        let keys: Vec<String> = more_specific(host, ours)
            .iter()
            .map(|h| format!("{prefix}frontend:{h}"))
            .collect();
        p.exists(keys);
    }
    let owned: Vec<u64> = p.query_async(conn).await?;
    Ok(found
        .into_iter()
        .zip(owned)
        .filter(|(_, n)| *n == 0)
        .map(|(k, _)| k)
        .collect())
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
            (vec!["--frontend", "a", "--api", "https://x"], "--api"),
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
