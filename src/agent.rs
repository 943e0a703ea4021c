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
//! The moving parts: [`Plan`] (the validated flags), the *keeper* task (register, session,
//! renewals, backoff, deregistration when stopped), the *check* task (feeds a watch channel) and
//! [`run`], which owns the signals and the child.

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
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::cli::RegisterArgs;
use crate::registry::{parse_service, Label, MAX_TTL, MIN_TTL};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

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

// ---------------------------------------------------------------------------------------------
// Flags, validated.

/// A health check: `tcp://HOST:PORT` (connects) or `http://HOST:PORT/PATH` (GET, 2xx passes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    Tcp(String),
    Http(String),
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Tcp(a) => write!(f, "tcp://{a}"),
            Check::Http(u) => f.write_str(u),
        }
    }
}

impl Check {
    pub fn parse(s: &str) -> Result<Check, String> {
        let bad = |why: &str| {
            format!(
                "--check {s:?} {why}: use tcp://HOST:PORT or http://HOST:PORT/PATH \
                 (e.g. tcp://127.0.0.1:8080)"
            )
        };
        let url = reqwest::Url::parse(s).map_err(|e| bad(&format!("is not a URL ({e})")))?;
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("has no host"))?;
        match url.scheme() {
            "tcp" => {
                let port = url.port().ok_or_else(|| bad("has no port"))?;
                Ok(Check::Tcp(format!("{host}:{port}")))
            }
            "http" => Ok(Check::Http(url.to_string())),
            "https" => Err(bad("uses https, which this build does not speak")),
            other => Err(bad(&format!("has the unknown scheme {other:?}"))),
        }
    }

    async fn run(&self, http: &reqwest::Client) -> Result<(), String> {
        match self {
            Check::Tcp(addr) => {
                match tokio::time::timeout(CHECK_TIMEOUT, TcpStream::connect(addr)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no connection within {CHECK_TIMEOUT:?}")),
                }
            }
            Check::Http(url) => match http.get(url).timeout(CHECK_TIMEOUT).send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("HTTP {}", r.status())),
                Err(e) => Err(chain(&e)),
            },
        }
    }
}

pub use crate::clock::parse_duration;

/// `rollcall check TARGET`: one probe, as the agent's --check runs it (2-s timeout).
pub async fn check_once(target: &str) -> Result<u8, (u8, String)> {
    let check = Check::parse(target).map_err(|e| (2, e.replacen("--check ", "", 1)))?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(CHECK_TIMEOUT)
        .build()
        .map_err(|e| (1, format!("cannot build an HTTP client: {e}")))?;
    match check.run(&http).await {
        Ok(()) => Ok(0),
        Err(e) => Err((1, format!("{check} fails: {e}"))),
    }
}

/// This host's name, as the kernel has it.
fn host_name() -> std::io::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates when it fits.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// The node name used when `--node` is not given: the host name's first label, lower-cased.
pub fn default_node_name() -> Result<Label, String> {
    let host = host_name().map_err(|e| {
        format!("--node is not given and the host name cannot be read ({e}): pass --node NAME")
    })?;
    let first = host.split('.').next().unwrap_or("");
    Label::parse(first).map_err(|e| {
        format!(
            "--node is not given and the host name {host:?} is not a usable node name: \
             {first:?} {e}; pass --node NAME"
        )
    })
}

pub use crate::client::api_url;

/// Everything `rollcall register` was asked to do, validated.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Base URLs of the API servers, without a trailing slash (`http://127.0.0.1:8053`), in
    /// the order they are tried.
    pub apis: Vec<String>,
    pub role: Label,
    pub node: Label,
    /// The PUT body.
    pub body: serde_json::Value,
    pub ttl: u32,
    pub check: Option<Check>,
    pub drain: Duration,
    /// What the child gets instead of the stop signal the agent received (--stop-signal).
    pub stop_signal: Option<libc::c_int>,
    pub token: Option<String>,
    pub command: Vec<String>,
}

impl Plan {
    pub fn from_args(a: RegisterArgs) -> Result<Plan, String> {
        let apis = crate::client::api_urls(&a.api)?;

        let role = Label::parse(&a.role).map_err(|e| format!("--role {:?} {e}", a.role))?;
        let node = match &a.node {
            Some(n) => Label::parse(n).map_err(|e| format!("--node {n:?} {e}"))?,
            None => default_node_name()?,
        };
        if !(MIN_TTL..=MAX_TTL).contains(&a.ttl) {
            return Err(format!(
                "--ttl {} is out of range: use {MIN_TTL} to {MAX_TTL} seconds",
                a.ttl
            ));
        }
        let service =
            parse_service(&a.service).map_err(|e| format!("--service {:?} {e}", a.service))?;
        let mut body = serde_json::json!({
            "ttl": a.ttl,
            "service": service.as_str(),
            "weight": a.weight,
        });
        if let Some(addr) = &a.addr {
            let ip: IpAddr = addr.parse().map_err(|_| {
                format!("--addr {addr:?} is not an IP address (e.g. 10.0.0.7 or fd00::7)")
            })?;
            body["addr"] = ip.to_string().into();
        } else if let Some((ip, via)) = outward_addr(&apis) {
            // A server on this host sees us as 127.0.0.1: register the address the others see.
            tracing::info!(
                addr = %ip,
                "registering {ip}, this host's address towards {via}: a server on loopback \
                 would see 127.0.0.1 (--addr sets it)"
            );
            body["addr"] = ip.to_string().into();
        }
        if let Some(port) = a.port {
            if port == 0 {
                return Err("--port 0 is not a port: use 1 to 65535".into());
            }
            body["port"] = port.into();
        }
        let check = a.check.as_deref().map(Check::parse).transpose()?;
        let drain = parse_duration(&a.drain).map_err(|e| format!("--drain {e}"))?;
        let stop_signal = a
            .stop_signal
            .as_deref()
            .map(parse_signal)
            .transpose()
            .map_err(|e| format!("--stop-signal {e}"))?;
        let token =
            crate::config::read_token(a.token, a.token_file.as_ref()).map_err(|e| e.to_string())?;
        if let Some(t) = &token {
            if !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(
                    "the token contains spaces or control characters: it must be one word".into(),
                );
            }
        }
        if a.command.first().is_some_and(|c| c.is_empty()) {
            return Err("the command after -- is empty".into());
        }
        Ok(Plan {
            apis,
            role,
            node,
            body,
            ttl: a.ttl,
            check,
            drain,
            stop_signal,
            token,
            command: a.command,
        })
    }

    fn node_url(&self, api: &str) -> String {
        format!("{}/v1/roles/{}/nodes/{}", api, self.role, self.node)
    }

    fn session_url(&self, api: &str) -> String {
        // `api` starts with http://, checked in from_args.
        format!("ws{}/session", &self.node_url(api)["http".len()..])
    }

    /// Several servers: a silent one is left quickly, and requests time out sooner.
    fn failover(&self) -> bool {
        self.apis.len() > 1
    }

    fn request_timeout(&self) -> Duration {
        if self.failover() {
            FAILOVER_TIMEOUT
        } else {
            REQUEST_TIMEOUT
        }
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(u64::from(self.ttl))
    }

    /// Ping (or PUT-renewal) period: ttl/3, so two beats may be lost before the lease runs out.
    fn beat(&self) -> Duration {
        self.ttl() / 3
    }

    /// How often a passing check is repeated.
    fn check_every(&self) -> Duration {
        self.beat()
            .clamp(Duration::from_millis(250), Duration::from_secs(10))
    }

    /// Backoff cap while the server is away: soon enough to catch it back within the lease.
    fn backoff_cap(&self) -> Duration {
        self.beat()
            .clamp(Duration::from_millis(500), Duration::from_secs(5))
    }
}

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
// The health check task.

#[derive(Clone, Debug, PartialEq, Eq)]
enum CheckState {
    /// Not run yet.
    Pending,
    Pass,
    Fail(String),
}

impl CheckState {
    fn passes(&self) -> bool {
        *self == CheckState::Pass
    }
}

/// Runs the check until `stop`; the channel changes only when pass/fail flips.
fn spawn_check(
    check: Check,
    every: Duration,
    stop: CancellationToken,
) -> watch::Receiver<CheckState> {
    let (tx, rx) = watch::channel(CheckState::Pending);
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(CHECK_TIMEOUT)
            .build()
            .unwrap_or_default();
        loop {
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = check.run(&http) => r,
            };
            let passing = result.is_ok();
            tx.send_if_modified(|s| {
                let flipped = s.passes() != passing || *s == CheckState::Pending;
                if flipped {
                    *s = match result {
                        Ok(()) => CheckState::Pass,
                        Err(e) => CheckState::Fail(e),
                    };
                }
                flipped
            });
            let wait = if passing { every } else { CHECK_RETRY };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    });
    rx
}

/// Waits for the check to change; never returns without a check (or once its task is gone).
async fn check_changed(check: &mut Option<watch::Receiver<CheckState>>) {
    match check {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await
            }
        }
        None => std::future::pending().await,
    }
}

// ---------------------------------------------------------------------------------------------
// The keeper: keeps the node registered until stopped, then deregisters it.

/// What the agent is doing; each change is logged once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Starting,
    WaitingForCheck,
    CheckFailing,
    /// Server unreachable or failing: retrying with backoff.
    Retrying,
    /// The server refused the registration (4xx): retrying slowly.
    Rejected,
    /// Registered, holding a session.
    Session,
    /// Registered, renewing by PUT.
    Renewing,
}

enum PutError {
    Retry(String),
    Rejected(String),
}

enum SessionError {
    /// The node is not registered (its lease ran out between PUT and session): PUT again.
    NotFound,
    /// The server cannot be reached: back off.
    Unreachable(String),
    /// The server (or something in between) does not do sessions: renew by PUT.
    Unsupported(String),
}

enum HoldEnd {
    /// Asked to stop; the session is still open.
    Stopped(Ws),
    /// The check fails; the session is still open.
    CheckFailed(Ws),
    /// The session ended; the socket, when the server may still consider it live.
    Ended(String, Option<Ws>),
}

/// How a pause ended.
enum Wake {
    Stop,
    Check,
    Elapsed,
}

struct Keeper {
    plan: Arc<Plan>,
    http: reqwest::Client,
    state: State,
    /// A PUT may have landed: deregister on the way out.
    registered: bool,
    /// A session given up on while the server may still hold it: closed only after the next
    /// session is open, so that its late close cannot remove the node in between.
    stale: Option<Ws>,
    /// The server in use (an index into `plan.apis`).
    at: usize,
}

impl Keeper {
    fn new(plan: Arc<Plan>, http: reqwest::Client) -> Keeper {
        Keeper {
            plan,
            http,
            state: State::Starting,
            registered: false,
            stale: None,
            at: 0,
        }
    }

    fn api(&self) -> &str {
        &self.plan.apis[self.at]
    }

    /// Moves to the next server (with several), saying why.
    fn move_on(&mut self, why: &str) {
        if !self.plan.failover() {
            return;
        }
        let from = self.at;
        self.at = (self.at + 1) % self.plan.apis.len();
        tracing::warn!(from = %self.plan.apis[from], to = %self.api(), "moving to the next rollcall server ({why})");
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.plan.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Logs a change of state (and nothing when the state stays the same).
    fn enter(&mut self, next: State, detail: &str) {
        let prev = self.state;
        if prev == next {
            return;
        }
        self.state = next;
        let p = &self.plan;
        let beat = fmt_dur(p.beat());
        let again = matches!(prev, State::Retrying | State::Rejected);
        match next {
            State::Starting => {}
            State::WaitingForCheck => tracing::info!(
                check = %p.check.as_ref().map(|c| c.to_string()).unwrap_or_default(),
                "waiting for the check to pass before registering"
            ),
            State::CheckFailing => tracing::warn!(
                check = %p.check.as_ref().map(|c| c.to_string()).unwrap_or_default(),
                "check fails ({detail}): not registered until it passes again"
            ),
            State::Retrying => tracing::warn!(
                api = %p.apis[self.at],
                "cannot register ({detail}); retrying with backoff"
            ),
            State::Rejected => tracing::error!(
                api = %p.apis[self.at],
                "the server refused the registration ({detail}); retrying every {}s at most \
                 — fix the flags or the server's settings",
                REJECTED_CAP.as_secs()
            ),
            State::Session => tracing::info!(
                role = %p.role, node = %p.node, addr = detail, ttl = p.ttl, api = %p.apis[self.at],
                "{}registered; holding a session (ping every {beat})",
                if again { "server is back: " } else { "" }
            ),
            State::Renewing => tracing::warn!(
                role = %p.role, node = %p.node,
                "registered, but no session ({detail}): renewing by PUT every {beat}, \
                 trying the session again every {}s",
                SESSION_RETRY.as_secs()
            ),
        }
    }

    /// PUTs to the current server, then to each other one while they fail (a pass).
    async fn put(&mut self) -> Result<String, PutError> {
        let mut result = self.put_once().await;
        for _ in 1..self.plan.apis.len() {
            match &result {
                Err(PutError::Retry(why)) => {
                    let why = why.clone();
                    self.move_on(&why);
                    result = self.put_once().await;
                }
                _ => break,
            }
        }
        result
    }

    async fn put_once(&mut self) -> Result<String, PutError> {
        // Until the answer is in, the PUT may have landed (even if this future is dropped).
        let before = self.registered;
        self.registered = true;
        let req = self
            .auth(self.http.put(self.plan.node_url(self.api())))
            .timeout(self.plan.request_timeout())
            .json(&self.plan.body);
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                if e.is_connect() {
                    // Never reached the server: nothing changed there.
                    self.registered = before;
                }
                return Err(PutError::Retry(chain(&e)));
            }
        };
        let status = resp.status();
        if status.is_success() {
            let v: serde_json::Value = resp.json().await.unwrap_or_default();
            return Ok(v["addr"].as_str().unwrap_or("?").to_owned());
        }
        let msg = crate::client::error_message(&resp.text().await.unwrap_or_default());
        let detail = format!("HTTP {status}: {msg}");
        if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
            // A refused request changes nothing.
            self.registered = before;
            Err(PutError::Rejected(detail))
        } else {
            Err(PutError::Retry(detail))
        }
    }

    async fn deregister(&mut self) {
        // The current server first, then the others while they fail: one answer is enough.
        let mut last = String::new();
        for attempt in 0..self.plan.apis.len() {
            if attempt > 0 {
                self.move_on(&last);
            }
            let req = self
                .auth(self.http.delete(self.plan.node_url(self.api())))
                .timeout(DEREGISTER_TIMEOUT);
            match req.send().await {
                Ok(r) if r.status().is_success() || r.status().as_u16() == 404 => {
                    tracing::info!(role = %self.plan.role, node = %self.plan.node, "deregistered");
                    self.registered = false;
                    return;
                }
                Ok(r) if r.status().is_server_error() => last = format!("HTTP {}", r.status()),
                Ok(r) => {
                    tracing::warn!(
                        status = %r.status(),
                        "the server refused the deregistration: the node goes when its session \
                         closes or its lease runs out"
                    );
                    self.registered = false;
                    return;
                }
                Err(e) => last = chain(&e),
            }
        }
        tracing::warn!(
            "could not deregister ({last}): the node goes when its session closes or its lease \
             runs out"
        );
        self.registered = false;
    }

    async fn open_session(&self) -> Result<Ws, SessionError> {
        let mut req = self
            .plan
            .session_url(self.api())
            .into_client_request()
            .map_err(|e| SessionError::Unsupported(e.to_string()))?;
        if let Some(t) = &self.plan.token {
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| SessionError::Unsupported("bad token".into()))?;
            req.headers_mut()
                .insert(tungstenite::http::header::AUTHORIZATION, v);
        }
        let connect = tokio_tungstenite::connect_async_with_config(req, None, true);
        let limit = self.plan.request_timeout();
        match tokio::time::timeout(limit, connect).await {
            Err(_) => Err(SessionError::Unreachable(format!(
                "no session handshake within {limit:?}"
            ))),
            Ok(Ok((ws, _))) => Ok(ws),
            Ok(Err(tungstenite::Error::Http(resp))) if resp.status().as_u16() == 404 => {
                Err(SessionError::NotFound)
            }
            Ok(Err(tungstenite::Error::Http(resp))) if resp.status().is_server_error() => {
                Err(SessionError::Unreachable(format!(
                    "the session request got HTTP {}",
                    resp.status()
                )))
            }
            Ok(Err(tungstenite::Error::Http(resp))) => Err(SessionError::Unsupported(format!(
                "the session request got HTTP {}",
                resp.status()
            ))),
            Ok(Err(
                e @ (tungstenite::Error::Io(_)
                | tungstenite::Error::ConnectionClosed
                | tungstenite::Error::AlreadyClosed),
            )) => Err(SessionError::Unreachable(chain(&e))),
            Ok(Err(e)) => Err(SessionError::Unsupported(chain(&e))),
        }
    }

    /// Sleeps `d`, waking early when asked to stop or when the check changes.
    async fn pause(
        d: Duration,
        stop: &CancellationToken,
        check: &mut Option<watch::Receiver<CheckState>>,
    ) -> Wake {
        tokio::select! {
            _ = stop.cancelled() => Wake::Stop,
            _ = check_changed(check) => Wake::Check,
            _ = tokio::time::sleep(d) => Wake::Elapsed,
        }
    }

    /// Holds a session: pings every ttl/3, and gives up on a server silent for a whole ttl.
    async fn hold(
        &mut self,
        mut ws: Ws,
        stop: &CancellationToken,
        check: &mut Option<watch::Receiver<CheckState>>,
    ) -> HoldEnd {
        let beat = self.plan.beat().max(Duration::from_millis(100));
        let mut ticker = tokio::time::interval_at(Instant::now() + beat, beat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        // With several servers, a ping left unanswered until the next one is enough to move
        // on: the lease (renewed by each answered ping) then still has a third of its ttl.
        let mut pinged: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return HoldEnd::Stopped(ws),
                _ = check_changed(check) => {
                    if !check.as_mut().is_some_and(|rx| rx.borrow_and_update().passes()) {
                        return HoldEnd::CheckFailed(ws);
                    }
                }
                _ = ticker.tick() => {
                    if heard.elapsed() > self.plan.ttl()
                        || (self.plan.failover() && pinged.is_some_and(|p| heard < p))
                    {
                        return HoldEnd::Ended(
                            format!("no answer from the server for {:.1}s", heard.elapsed().as_secs_f64()),
                            Some(ws),
                        );
                    }
                    pinged = Some(Instant::now());
                    let ping = ws.send(Message::Ping(tungstenite::Bytes::new()));
                    match tokio::time::timeout(beat, ping).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return HoldEnd::Ended(chain(&e), None),
                        Err(_) => return HoldEnd::Ended("a ping could not be sent".into(), Some(ws)),
                    }
                }
                msg = ws.next() => match msg {
                    Some(Ok(Message::Close(frame))) => {
                        let why = frame
                            .map(|f| f.reason.to_string())
                            .filter(|r| !r.is_empty())
                            .unwrap_or_else(|| "the server closed the session".into());
                        return HoldEnd::Ended(why, None);
                    }
                    None => return HoldEnd::Ended("the connection closed".into(), None),
                    Some(Err(e)) => return HoldEnd::Ended(chain(&e), None),
                    Some(Ok(_)) => heard = Instant::now(),
                },
            }
        }
    }

    async fn close(ws: Ws) {
        let mut ws = ws;
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }

    /// Keeps the node registered until `stop`, then deregisters it. Returns whether it was
    /// (or may have been) registered when stopped, i.e. whether resolvers may still hold it.
    async fn keep(
        mut self,
        stop: CancellationToken,
        mut check: Option<watch::Receiver<CheckState>>,
    ) -> bool {
        let mut backoff = crate::client::Backoff::new(BACKOFF_START);
        let cap = self.plan.backoff_cap();
        // In PUT-renewal mode: no session attempt before this.
        let mut session_after: Option<Instant> = None;
        'outer: loop {
            if stop.is_cancelled() {
                break;
            }
            // 1. The check gate.
            if let Some(rx) = check.as_mut() {
                let now = rx.borrow_and_update().clone();
                if !now.passes() {
                    if self.registered {
                        self.deregister().await;
                    }
                    if let Some(ws) = self.stale.take() {
                        Self::close(ws).await;
                    }
                    match now {
                        CheckState::Fail(why) => self.enter(State::CheckFailing, &why),
                        _ => self.enter(State::WaitingForCheck, ""),
                    }
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = check_changed(&mut check) => {}
                    }
                    continue;
                }
            }

            // 2. Register. Asked to stop meanwhile: a PUT in flight may finish (bounded), so
            // that whether it landed, not a guess, decides the deregistration and the drain.
            let limit = self.plan.request_timeout();
            let put = {
                let fut = self.put();
                tokio::pin!(fut);
                tokio::select! {
                    r = &mut fut => Some(r),
                    _ = stop.cancelled() => {
                        let _ = tokio::time::timeout(limit, &mut fut).await;
                        None
                    }
                }
            };
            let Some(put) = put else { break };
            let addr = match put {
                Ok(addr) => addr,
                Err(e) => {
                    let wait = match e {
                        PutError::Retry(why) => {
                            self.enter(State::Retrying, &why);
                            backoff.next(cap)
                        }
                        PutError::Rejected(why) => {
                            self.enter(State::Rejected, &why);
                            backoff.next(REJECTED_CAP)
                        }
                    };
                    if let Wake::Stop = Self::pause(wait, &stop, &mut check).await {
                        break;
                    }
                    continue;
                }
            };

            // 3. The session.
            if session_after.is_none_or(|t| Instant::now() >= t) {
                let opened = tokio::select! {
                    _ = stop.cancelled() => break,
                    r = self.open_session() => r,
                };
                match opened {
                    Ok(ws) => {
                        session_after = None;
                        if let Some(old) = self.stale.take() {
                            drop(old);
                        }
                        self.enter(State::Session, &addr);
                        let since = Instant::now();
                        match self.hold(ws, &stop, &mut check).await {
                            HoldEnd::Stopped(ws) => {
                                self.deregister().await;
                                Self::close(ws).await;
                                return true;
                            }
                            HoldEnd::CheckFailed(ws) => {
                                self.deregister().await;
                                Self::close(ws).await;
                                continue;
                            }
                            HoldEnd::Ended(why, ws) => {
                                self.stale = ws;
                                self.move_on(&why);
                                // The next session is news worth a log line.
                                self.state = State::Starting;
                                tracing::info!("session ended ({why}); registering again");
                                // A session that keeps ending at once must not spin.
                                if since.elapsed() < self.plan.ttl() {
                                    let wait = backoff.next(cap);
                                    if let Wake::Stop = Self::pause(wait, &stop, &mut check).await {
                                        break;
                                    }
                                } else {
                                    backoff.reset();
                                }
                                continue;
                            }
                        }
                    }
                    Err(SessionError::NotFound) => {
                        let wait = backoff.next(cap);
                        if let Wake::Stop = Self::pause(wait, &stop, &mut check).await {
                            break;
                        }
                        continue;
                    }
                    Err(SessionError::Unreachable(why)) => {
                        self.move_on(&why);
                        self.enter(State::Retrying, &why);
                        let wait = backoff.next(cap);
                        if let Wake::Stop = Self::pause(wait, &stop, &mut check).await {
                            break;
                        }
                        continue;
                    }
                    Err(SessionError::Unsupported(why)) => {
                        session_after = Some(Instant::now() + SESSION_RETRY);
                        self.enter(State::Renewing, &why);
                    }
                }
            } else {
                self.enter(State::Renewing, "session unavailable");
            }

            // 4. No session: renew by PUT every ttl/3 until a session attempt is due again.
            backoff.reset();
            loop {
                match Self::pause(self.plan.beat(), &stop, &mut check).await {
                    Wake::Stop => break 'outer,
                    Wake::Check => continue 'outer,
                    Wake::Elapsed => {}
                }
                if session_after.is_none_or(|t| Instant::now() >= t) {
                    continue 'outer;
                }
                let put = tokio::select! {
                    _ = stop.cancelled() => break 'outer,
                    r = self.put() => r,
                };
                if put.is_err() {
                    // Step 2 will tell what is wrong, and back off.
                    continue 'outer;
                }
            }
        }
        let was = self.registered;
        if was {
            self.deregister().await;
        }
        if let Some(ws) = self.stale.take() {
            Self::close(ws).await;
        }
        was
    }
}

// ---------------------------------------------------------------------------------------------
// The child command.

/// Processes the command leaves behind (a daemonizing script, a shell's background job)
/// are re-parented to the agent (a child subreaper, and PID 1 in a container): reap them as
/// they exit, so that none stays a zombie. The command itself is left to its own `wait`.
async fn reap_orphans(command: libc::pid_t) {
    let Ok(mut chld) = signal(SignalKind::child()) else {
        return;
    };
    let me = std::process::id() as libc::pid_t;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = chld.recv() => {}
            _ = tick.tick() => {}
        }
        for pid in zombie_children(me) {
            if pid != command {
                // SAFETY: waitpid on one exited child of ours that is not the command.
                unsafe {
                    libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
                }
            }
        }
    }
}

/// Children of `parent` that have exited and not been waited for (from /proc).
fn zombie_children(parent: libc::pid_t) -> Vec<libc::pid_t> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (state, ppid) = (
            f.next(),
            f.next().and_then(|p| p.parse::<libc::pid_t>().ok()),
        );
        if state == Some("Z") && ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

fn spawn_child(command: &[String]) -> Result<tokio::process::Child, String> {
    let (prog, args) = command.split_first().expect("checked non-empty");
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args);
    // Its own process group: a Ctrl-C at a terminal reaches the agent only, which deregisters
    // and drains before passing the signal on to the group.
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    {
        // SAFETY: the closure only makes async-signal-safe system calls. The child is forked by
        // the thread that runs `run` (the main thread, via block_on), which lives until the
        // agent exits: so if the agent dies, even by `kill -9`, the child gets SIGTERM instead
        // of running on unregistered.
        let parent = std::process::id() as libc::pid_t;
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("the agent exited"));
                }
                Ok(())
            });
        }
    }
    cmd.spawn().map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            ": no such program (is it on PATH?)"
        } else {
            ""
        };
        format!("cannot run {prog:?}: {e}{hint}")
    })
}

/// Sends `sig` to the child's process group (the child itself, should the group be gone).
fn forward(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: plain kill(2) calls.
    unsafe {
        if libc::kill(-pid, sig) != 0 {
            libc::kill(pid, sig);
        }
    }
}

/// With a server on loopback among several (`--api http://127.0.0.1:8053,http://rc-b:8053`, the
/// topology of a server beside every nginx), the server on loopback would register 127.0.0.1.
/// Then the address to register is this host's source address towards the first server not on
/// loopback (a UDP `connect`, which sends nothing), or towards the default route when that
/// server's name does not resolve. None when no API is on loopback, or every one is.
fn outward_addr(apis: &[String]) -> Option<(IpAddr, String)> {
    let host_port = |api: &str| -> Option<(String, u16)> {
        let url = reqwest::Url::parse(api).ok()?;
        Some((
            url.host_str()?.trim_matches(['[', ']']).to_string(),
            url.port_or_known_default()?,
        ))
    };
    let is_loopback = |host: &str| {
        host.eq_ignore_ascii_case("localhost")
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    };
    let hosts: Vec<(String, u16)> = apis.iter().filter_map(|a| host_port(a)).collect();
    if !hosts.iter().any(|(h, _)| is_loopback(h)) {
        return None;
    }
    let (remote, port) = hosts.iter().find(|(h, _)| !is_loopback(h))?;
    let source = |to: std::net::SocketAddr| -> Option<IpAddr> {
        let any: std::net::SocketAddr = if to.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = std::net::UdpSocket::bind(any).ok()?;
        sock.connect(to).ok()?;
        let ip = sock.local_addr().ok()?.ip();
        (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
    };
    use std::net::ToSocketAddrs;
    let resolved: Vec<std::net::SocketAddr> = (remote.as_str(), *port)
        .to_socket_addrs()
        .map(|a| a.collect())
        .unwrap_or_default();
    if let Some(ip) = resolved.iter().find_map(|a| source(*a)) {
        return Some((ip, format!("{remote}:{port}")));
    }
    // Unresolvable for now: the default route's source address (192.0.2.1 is TEST-NET-1).
    source(([192, 0, 2, 1], 9).into()).map(|ip| (ip, "the default route".to_string()))
}

/// A signal by name: `QUIT`, `SIGQUIT` or `quit`.
fn parse_signal(name: &str) -> Result<libc::c_int, String> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    Ok(match bare {
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "HUP" => libc::SIGHUP,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "KILL" => libc::SIGKILL,
        _ => {
            return Err(format!(
                "{name:?} is not a signal the agent sends: use TERM, INT, QUIT, HUP, USR1, USR2 or KILL"
            ))
        }
    })
}

fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGWINCH => "SIGWINCH",
        _ => "signal",
    }
}

/// The child's exit code, or 128 + the signal that killed it (as shells report it).
fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(s)) => (128 + s) as u8,
        _ => 1,
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
    let http = crate::client::http(Duration::from_secs(2), Some(REQUEST_TIMEOUT))
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
    let check = plan
        .check
        .clone()
        .map(|c| spawn_check(c, plan.check_every(), stop.clone()));

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
        for bad in [
            "tcp://127.0.0.1",
            "udp://1.2.3.4:5",
            "127.0.0.1:80",
            "https://x/y",
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
                &["--role", "r", "--node", "n", "--api", "https://x"][..],
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
        let host = host_name().unwrap();
        match default_node_name() {
            Ok(l) => assert_eq!(
                l.as_str(),
                host.split('.').next().unwrap().to_ascii_lowercase()
            ),
            Err(e) => assert!(e.contains("--node"), "{e}"),
        }
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
