//! `rollcall docker`: registers the containers of one docker host from the docker engine's
//! events, with no agent inside them.
//!
//! The engine is asked over its unix socket (bollard). Every event that may change what a
//! container is to rollcall (start, restart, unpause, pause, kill, die, stop, destroy, rename,
//! health_status, network connect/disconnect) makes the watcher inspect that container again
//! and apply what it finds: the inspection, not the event, is the truth, so events replayed or
//! seen twice change nothing. A running container carrying `rollcall.role` gets a keeper — the
//! agent's own ([`crate::agent::NodeKeeper`]) in PUT-renewal mode — whose gate (the agent's
//! `--check` channel) is open while the container is unpaused and, with a HEALTHCHECK, healthy;
//! a closed gate makes the keeper DELETE the node, an open one PUT it again. A container that
//! stops (or is sent a stop signal: the `kill` event of `docker stop` comes before the process
//! exits) has its keeper stopped, which DELETEs the node at once.
//!
//! Why PUT renewals and not the agent's session: a session's connection closing removes its
//! node, so every restart of the watcher would empty DNS of the host's containers. With
//! renewals the registrations outlive the watcher for their TTL; a restarted watcher PUTs the
//! same nodes again, which the server takes as renewals (nothing changes in DNS); a dead host's
//! containers leave DNS within their TTL.
//!
//! Resync: at start and after a lost event stream (reconnecting with backoff), the watcher
//! lists the running containers, applies each, forgets the ones that are gone, and DELETEs the
//! nodes it registered (meta `docker-watcher` = its ID) that no live container wants. It
//! subscribes to events from just before the list, so nothing that happens meanwhile is missed.
//!
//! `container.rs`: what a container is to rollcall, from `docker inspect` alone.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::errors::Error as DockerError;
use bollard::models::{ContainerInspectResponse, EventMessage, EventMessageTypeEnum};
use bollard::query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder};
use bollard::{Docker, API_DEFAULT_VERSION};
use futures_util::StreamExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::agent::{Gate, NodeKeeper, Plan};
use crate::cli::DockerArgs;
use crate::client::{chain, Backoff};
use crate::registry::{Label, MAX_TTL, MIN_TTL};

mod container;
pub(crate) use container::*;

/// Longest wait for one request to the docker engine (the event stream's headers included).
const DOCKER_TIMEOUT: u64 = 10;
/// Longest wait for one request to rollcall's API during a resync.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// Event-stream reconnection: first step and cap.
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Signals of a `kill` event that stop the container (docker stop sends TERM, then KILL).
const STOP_SIGNALS: [i32; 4] = [libc::SIGINT, libc::SIGQUIT, libc::SIGKILL, libc::SIGTERM];
/// The events that may change what a container is to rollcall.
const EVENTS: [&str; 12] = [
    "start",
    "restart",
    "unpause",
    "pause",
    "kill",
    "die",
    "stop",
    "destroy",
    "rename",
    "health_status",
    "connect",
    "disconnect",
];

/// `rollcall docker`'s flags, validated.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    pub apis: Vec<String>,
    pub token: Option<String>,
    /// TLS to the API (`--ca-file`, `--client-cert`, `--client-key`), as the agent's.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub tls_files: crate::tls::ClientFiles,
    /// The socket's path (without `unix://`).
    pub socket: String,
    pub network: Option<String>,
    pub ttl: u32,
    pub watcher_id: Option<String>,
    pub deregister_on_exit: bool,
}

impl WatchConfig {
    pub fn from_args(a: DockerArgs) -> Result<WatchConfig, String> {
        let apis = crate::client::api_urls(&a.client.api)?;
        let token = crate::config::read_token(a.client.token, a.client.token_file.as_ref())
            .map_err(|e| e.to_string())?;
        if token
            .as_deref()
            .is_some_and(|t| !t.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(
                "the token contains spaces or control characters: it must be one word".into(),
            );
        }
        if !(MIN_TTL..=MAX_TTL).contains(&a.ttl) {
            return Err(format!(
                "--ttl {} is out of range: use {MIN_TTL} to {MAX_TTL} seconds",
                a.ttl
            ));
        }
        let socket = a
            .docker_socket
            .strip_prefix("unix://")
            .unwrap_or(&a.docker_socket)
            .to_string();
        if socket.is_empty() || socket.contains("://") {
            return Err(format!(
                "--docker-socket {:?}: give the path of the docker engine's unix socket, e.g. \
                 /var/run/docker.sock",
                a.docker_socket
            ));
        }
        let watcher_id = a.watcher_id.filter(|w| !w.trim().is_empty());
        let tls_files = a.client.tls.files();
        let urls: Vec<&str> = apis.iter().map(String::as_str).collect();
        let tls = crate::client::tls_for(&tls_files, &urls)?;
        Ok(WatchConfig {
            apis,
            token,
            tls,
            tls_files,
            socket,
            network: a.network.filter(|n| !n.trim().is_empty()),
            ttl: a.ttl,
            watcher_id,
            deregister_on_exit: a.deregister_on_exit,
        })
    }
}

/// Connects to the engine and agrees on an API version; the error says what to do.
async fn connect(socket: &str) -> Result<Docker, String> {
    let hint = format!("cannot reach the docker engine at {socket}");
    let docker = Docker::connect_with_unix(socket, DOCKER_TIMEOUT, API_DEFAULT_VERSION).map_err(
        |e| match e {
            DockerError::SocketNotFoundError(_) => format!(
                "{hint}: no such socket. Is dockerd running? In a container, mount the \
                     host's socket (-v /var/run/docker.sock:/var/run/docker.sock); see \
                     --docker-socket"
            ),
            e => format!("{hint}: {}; see --docker-socket", chain(&e)),
        },
    )?;
    docker.negotiate_version().await.map_err(|e| {
        format!(
            "{hint}: {}. Is dockerd running, and may this user use its socket? See \
             --docker-socket",
            chain(&e)
        )
    })
}

fn unix_now() -> String {
    let t = SystemTime::now()
        .checked_sub(Duration::from_secs(1))
        .unwrap_or(UNIX_EPOCH)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:09}", t.as_secs(), t.subsec_nanos())
}

type Key = (Label, Label);

/// A container the watcher keeps registered.
struct Managed {
    name: String,
    key: Key,
    /// The container's process ID at the last inspection.
    pid: i64,
    body: serde_json::Value,
    gate: watch::Sender<Gate>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

struct Watcher {
    cfg: Arc<WatchConfig>,
    docker: Docker,
    http: reqwest::Client,
    id: String,
    /// By container ID.
    managed: HashMap<String, Managed>,
    /// Keepers deregistering their node: a new keeper of the same node waits for its DELETE.
    leaving: HashMap<Key, JoinHandle<()>>,
    /// Containers sent a stop signal (a `kill` event) and not started since: the process ID
    /// the container had then (0: unknown), so that a new run (another PID) is not taken for
    /// the stopping one.
    stopping: HashMap<String, i64>,
    /// The last warning logged per container (each said once).
    warned: HashMap<String, String>,
}

pub async fn run(args: DockerArgs) -> Result<u8, (u8, String)> {
    let cfg = Arc::new(WatchConfig::from_args(args).map_err(|e| (2, e))?);
    let sig = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| (1, format!("cannot install a {name} handler: {e}")))
    };
    let mut term = sig(SignalKind::terminate(), "SIGTERM")?;
    let mut int = sig(SignalKind::interrupt(), "SIGINT")?;
    crate::shutdown::ignore_hangup("rollcall docker has nothing to reload");
    let http = crate::client::http(Duration::from_secs(2), Some(API_TIMEOUT), cfg.tls.as_ref())
        // A fresh connection per request, as the agent: nothing stale after a server restart.
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|e| (1, format!("cannot build the HTTP client: {e}")))?;
    let docker = connect(&cfg.socket).await.map_err(|e| (1, e))?;
    let id = match &cfg.watcher_id {
        Some(id) => id.clone(),
        None => docker
            .info()
            .await
            .ok()
            .and_then(|i| i.id)
            .filter(|i| !i.is_empty())
            .ok_or_else(|| {
                (
                    1,
                    format!(
                        "the docker engine at {} did not tell its ID: give --watcher-id",
                        cfg.socket
                    ),
                )
            })?,
    };
    tracing::info!(
        docker = %cfg.socket, api = %cfg.apis.join(","), watcher = %id, ttl = cfg.ttl,
        network = cfg.network.as_deref().unwrap_or("(the container's only one)"),
        "rollcall docker starting: registering containers labelled {ROLE}"
    );
    let mut w = Watcher {
        cfg,
        docker,
        http,
        id,
        managed: HashMap::new(),
        leaving: HashMap::new(),
        stopping: HashMap::new(),
        warned: HashMap::new(),
    };
    let stop = CancellationToken::new();
    let watching = {
        let stop = stop.clone();
        async move {
            w.watch(&stop).await;
            w
        }
    };
    tokio::pin!(watching);
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        // The watch loop returns only once stopped.
        _ = &mut watching => "the end of the watch loop",
    };
    stop.cancel();
    let w = watching.await;
    w.shut_down(name).await;
    Ok(0)
}

impl Watcher {
    /// Resync, follow events; after a lost stream, back off and do it again. Until `stop`.
    async fn watch(&mut self, stop: &CancellationToken) {
        let mut backoff = Backoff::new(BACKOFF_START);
        let mut lost = false;
        while !stop.is_cancelled() {
            let since = unix_now();
            let filters: HashMap<&str, Vec<&str>> = HashMap::from([
                ("type", vec!["container", "network"]),
                ("event", EVENTS.to_vec()),
            ]);
            let opts = EventsOptionsBuilder::new()
                .since(&since)
                .filters(&filters)
                .build();
            match self.resync().await {
                Ok(n) => {
                    if lost {
                        tracing::info!(containers = n, "the docker engine is back: resynced");
                    } else {
                        tracing::info!(containers = n, "resynced: following the engine's events");
                    }
                }
                Err(e) => {
                    if !lost {
                        tracing::warn!("cannot list the containers ({e}); retrying with backoff");
                    }
                    lost = true;
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next(BACKOFF_CAP)) => continue,
                    }
                }
            }
            let mut events = self.docker.events(Some(opts));
            let why = loop {
                let ev = tokio::select! {
                    _ = stop.cancelled() => return,
                    ev = events.next() => ev,
                };
                match ev {
                    Some(Ok(ev)) => {
                        backoff.reset();
                        self.event(ev).await;
                    }
                    Some(Err(e)) => break chain(&e),
                    None => break "the engine closed the stream".to_string(),
                }
            };
            tracing::warn!("lost the docker engine's event stream ({why}); resyncing with backoff");
            lost = true;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.next(BACKOFF_CAP)) => {}
            }
        }
    }

    async fn event(&mut self, ev: EventMessage) {
        let action = ev.action.as_deref().unwrap_or("");
        let verb = action.split(':').next().unwrap_or("").trim();
        let actor = ev.actor.unwrap_or_default();
        let attrs = actor.attributes.unwrap_or_default();
        let id = match ev.typ {
            Some(EventMessageTypeEnum::CONTAINER) => actor.id.unwrap_or_default(),
            Some(EventMessageTypeEnum::NETWORK) => {
                attrs.get("container").cloned().unwrap_or_default()
            }
            _ => return,
        };
        if id.is_empty() {
            return;
        }
        let known = self.managed.contains_key(&id) || self.warned.contains_key(&id);
        // Container events carry the container's labels: skip the unlabelled ones cheaply.
        let labelled = ev.typ == Some(EventMessageTypeEnum::CONTAINER) && attrs.contains_key(ROLE);
        if !known && !labelled {
            return;
        }
        match verb {
            "kill" => {
                let signal = attrs.get("signal").and_then(|s| s.parse::<i32>().ok());
                if signal.is_some_and(|s| STOP_SIGNALS.contains(&s)) {
                    let pid = self.managed.get(&id).map_or(0, |m| m.pid);
                    self.stopping.insert(id.clone(), pid);
                    // Out of DNS now, even if the engine does not answer the inspection (it
                    // is stopping itself, say).
                    if let Some(m) = self.managed.get(&id) {
                        m.gate.send_if_modified(|g| {
                            let changed = g.passes();
                            if changed {
                                *g = Gate::Fail("the container is stopping".into());
                            }
                            changed
                        });
                    }
                }
            }
            "start" | "restart" => {
                self.stopping.remove(&id);
            }
            "destroy" => {
                self.forget(&id, "removed");
                self.warned.remove(&id);
                return;
            }
            _ => {}
        }
        tracing::debug!(container = %short_id(&id), action, "event");
        if !self.refresh(&id).await && matches!(verb, "die" | "stop") {
            // The engine said so, even if it cannot say more now.
            self.forget(&id, "stopped");
        }
    }

    /// Inspects one container and applies what it finds; false when the engine did not answer.
    async fn refresh(&mut self, id: &str) -> bool {
        match self.docker.inspect_container(id, None).await {
            Ok(info) => self.apply(id, &info),
            Err(DockerError::DockerResponseServerError {
                status_code: 404, ..
            }) => self.forget(id, "removed"),
            Err(e) => {
                tracing::warn!(
                    container = %short_id(id),
                    "cannot inspect the container ({}); it is looked at again at the next resync",
                    chain(&e)
                );
                return false;
            }
        }
        true
    }

    /// Makes the keepers match one container's inspection.
    fn apply(&mut self, id: &str, info: &ContainerInspectResponse) {
        let name = name(info);
        if !running(info) {
            self.stopping.remove(id);
            let status = info
                .state
                .as_ref()
                .and_then(|s| s.status)
                .map(|s| s.to_string())
                .unwrap_or_else(|| "stopped".into());
            self.forget(id, &status);
            return;
        }
        let target = match target(info, self.cfg.network.as_deref(), self.cfg.ttl, &self.id) {
            Ok(Some(t)) => t,
            Ok(None) => {
                self.forget(id, "no rollcall.role label");
                return;
            }
            Err(why) => {
                if self.warned.get(id) != Some(&why) {
                    tracing::warn!(container = %name, "not registered: {why}");
                    self.warned.insert(id.to_string(), why);
                }
                self.forget(id, "not registrable");
                return;
            }
        };
        self.warned.remove(id);
        let pid = info.state.as_ref().and_then(|s| s.pid).unwrap_or(0);
        // A stop signal seen for an earlier run (another PID) does not hold this one.
        if self
            .stopping
            .get(id)
            .is_some_and(|then| *then != 0 && *then != pid)
        {
            self.stopping.remove(id);
        }
        let gate = if self.stopping.contains_key(id) {
            Gate::Fail("the container is stopping".into())
        } else {
            gate(info)
        };
        let key = (target.role.clone(), target.node.clone());
        if let Some(m) = self.managed.get(id) {
            if m.key == key && m.body == target.body {
                m.gate.send_if_modified(|g| {
                    let changed = *g != gate;
                    *g = gate.clone();
                    changed
                });
                if let Some(m) = self.managed.get_mut(id) {
                    m.pid = pid;
                }
                return;
            }
            let m = self.managed.remove(id).expect("present");
            if m.key == key {
                // Same node, new address or labels: the new keeper's PUT replaces it in place.
                tracing::info!(container = %name, role = %key.0, node = %key.1, "changed: registering again");
                m.task.abort();
            } else {
                tracing::info!(container = %name, "renamed: the old node leaves");
                self.leave(m);
            }
        } else {
            tracing::info!(
                container = %name, role = %key.0, node = %key.1, addr = %target.body["addr"].as_str().unwrap_or(""),
                port = %target.body.get("port").map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                "watching the container"
            );
        }
        self.spawn(id, name, target, gate, pid);
    }

    fn spawn(&mut self, id: &str, name: String, t: Target, gate: Gate, pid: i64) {
        let key = (t.role.clone(), t.node.clone());
        let before = self.leaving.remove(&key);
        let plan = Arc::new(Plan {
            apis: self.cfg.apis.clone(),
            role: t.role.clone(),
            node: t.node.clone(),
            body: t.body.clone(),
            ttl: t.ttl,
            check: None,
            drain: Duration::ZERO,
            stop_signal: None,
            token: self.cfg.token.clone(),
            tls: self.cfg.tls.clone(),
            tls_files: self.cfg.tls_files.clone(),
            command: Vec::new(),
            sessions: false,
        });
        let (tx, rx) = watch::channel(gate);
        let stop = CancellationToken::new();
        let keeper = NodeKeeper::new(plan, self.http.clone());
        let span = tracing::info_span!("container", name = %name);
        let st = stop.clone();
        let task = tokio::spawn(
            async move {
                if let Some(b) = before {
                    let _ = b.await;
                }
                keeper.keep(st, Some(rx)).await;
            }
            .instrument(span),
        );
        self.managed.insert(
            id.to_string(),
            Managed {
                name,
                key,
                pid,
                body: t.body,
                gate: tx,
                stop,
                task,
            },
        );
    }

    /// Stops a keeper: it DELETEs its node (if registered) on its own time.
    fn leave(&mut self, m: Managed) {
        m.stop.cancel();
        self.leaving.retain(|_, h| !h.is_finished());
        self.leaving.insert(m.key, m.task);
    }

    fn forget(&mut self, id: &str, why: &str) {
        if let Some(m) = self.managed.remove(id) {
            tracing::info!(container = %m.name, role = %m.key.0, node = %m.key.1, "container {why}: deregistering");
            self.leave(m);
        }
    }

    /// Lists the running containers, applies each, forgets the rest, and deregisters the
    /// nodes this watcher registered that no live container wants. The number of containers
    /// registered or waiting to be.
    async fn resync(&mut self) -> Result<usize, String> {
        let filters: HashMap<&str, Vec<&str>> = HashMap::from([("label", vec![ROLE])]);
        let list = self
            .docker
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .all(false)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(|e| chain(&e))?;
        let live: HashSet<String> = list.into_iter().filter_map(|c| c.id).collect();
        let gone: Vec<String> = self
            .managed
            .keys()
            .filter(|id| !live.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            self.refresh(&id).await;
        }
        for id in &live {
            self.refresh(id).await;
        }
        self.warned.retain(|id, _| live.contains(id));
        self.stopping.retain(|id, _| live.contains(id));
        if let Err(e) = self.sweep().await {
            tracing::warn!(
                "cannot check the server for nodes of containers that are gone ({e}); they \
                 leave when their leases run out"
            );
        }
        Ok(self.managed.len())
    }

    /// DELETEs the nodes marked with this watcher's ID that no managed, passing container
    /// holds (their containers went while no watcher ran, or turned unhealthy meanwhile).
    async fn sweep(&self) -> Result<(), String> {
        let wanted: HashSet<&Key> = self
            .managed
            .values()
            .filter(|m| m.gate.borrow().passes())
            .map(|m| &m.key)
            .collect();
        let mut last = String::new();
        for api in &self.cfg.apis {
            match self.ours(api).await {
                Ok(nodes) => {
                    for (role, node) in nodes {
                        let (Ok(r), Ok(n)) = (Label::parse(&role), Label::parse(&node)) else {
                            continue;
                        };
                        if wanted.contains(&(r, n)) {
                            continue;
                        }
                        let url = format!("{api}/v1/roles/{role}/nodes/{node}");
                        match self.auth(self.http.delete(&url)).send().await {
                            Ok(r) if r.status().is_success() || r.status().as_u16() == 404 => {
                                tracing::info!(%role, %node, "deregistered: no live container of this host wants it")
                            }
                            Ok(r) => {
                                tracing::warn!(%role, %node, status = %r.status(), "cannot deregister a node whose container is gone")
                            }
                            Err(e) => {
                                tracing::warn!(%role, %node, "cannot deregister a node whose container is gone: {}", chain(&e))
                            }
                        }
                    }
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.cfg.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// (role, node) of every node on `api` whose meta says this watcher registered it.
    async fn ours(&self, api: &str) -> Result<Vec<(String, String)>, String> {
        let get = |path: String| async move {
            let resp = self
                .auth(self.http.get(format!("{api}{path}")))
                .send()
                .await
                .map_err(|e| chain(&e))?;
            if !resp.status().is_success() {
                return Err(format!("GET {path}: HTTP {}", resp.status()));
            }
            resp.json::<serde_json::Value>()
                .await
                .map_err(|e| chain(&e))
        };
        let roles = get("/v1/roles".into()).await?;
        let mut out = Vec::new();
        for role in roles["roles"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(r, _)| r)
        {
            let nodes = get(format!("/v1/roles/{role}")).await?;
            for n in nodes["nodes"].as_array().into_iter().flatten() {
                if n["meta"][META_WATCHER].as_str() == Some(self.id.as_str()) {
                    if let Some(node) = n["node"].as_str() {
                        out.push((role.clone(), node.to_string()));
                    }
                }
            }
        }
        Ok(out)
    }

    async fn shut_down(self, signal: &str) {
        let n = self.managed.len();
        if self.cfg.deregister_on_exit {
            tracing::info!(
                signal,
                containers = n,
                "stopping: deregistering every container"
            );
            let mut tasks = Vec::new();
            for (_, m) in self.managed {
                m.stop.cancel();
                tasks.push(m.task);
            }
            tasks.extend(self.leaving.into_values());
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                futures_util::future::join_all(tasks),
            )
            .await;
        } else {
            tracing::info!(
                signal,
                containers = n,
                "stopping: the registrations stay until their leases run out; a watcher started \
                 before then takes them over without a change (--deregister-on-exit removes \
                 them now)"
            );
            for (_, m) in self.managed {
                m.task.abort();
            }
            // DELETEs in flight are finished: their containers are gone.
            let _ = tokio::time::timeout(
                Duration::from_secs(3),
                futures_util::future::join_all(self.leaving.into_values()),
            )
            .await;
        }
    }
}
