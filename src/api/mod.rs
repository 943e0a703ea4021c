//! The HTTP API (`/v1`), built with axum. [`router`] makes the app; `server.rs` serves it.
//!
//! Handlers validate everything before they call the registry, so bad input changes nothing.
//! A successful `PUT` returns after the registry has made the node durable and visible in DNS.

pub mod error;
mod metrics;
pub mod model;
pub mod serve;
pub mod session;
mod stream;
pub mod tokens;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Extension, Json, Router};
use ipnet::IpNet;
use serde::Deserialize;

use crate::registry::{
    parse_service, Label, NodeKey, NodeSpec, Registry, DEFAULT_TTL, MAX_TTL, MIN_TTL,
};
use error::ApiError;
use model::{ErrorBody, Health, NodeOut, RegisterBody, RoleOut, RolesOut, SdTargetGroup};

/// Largest request body accepted.
pub const BODY_LIMIT: usize = crate::registry::BODY_MAX;
/// Longest blocking query (`wait`) honoured; longer waits are cut to this.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
const DEFAULT_WAIT: Duration = Duration::from_secs(300);

/// Access rules for the API.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// Bearer tokens, one of which is required for writes (and reads with `token_reads`), and
    /// what each may write (`--token`, `--token-file`); empty: no token needed. Swapped on
    /// SIGHUP when read from a file.
    pub tokens: Arc<arc_swap::ArcSwap<tokens::Tokens>>,
    pub token_reads: bool,
    /// Writes need a client certificate verified by `--tls-client-ca` (reads do not).
    pub client_cert_writes: bool,
    /// When non-empty, the peer must be inside one of these to register, deregister or open a
    /// session, and so must the registered address.
    pub allow_register: Vec<IpNet>,
    /// Host names (lower case, no port) accepted in the `Host` header besides IP literals,
    /// single-label names and names in `zone` (`--allow-host`).
    pub allow_hosts: Vec<String>,
    /// The served zone, lower case without the final dot ("" accepts no zone names).
    pub zone: String,
    /// Accept any registered address, loopback from remote peers, link-local and metadata
    /// addresses included (`--allow-any-addr`).
    pub any_addr: bool,
    /// Registrations are shared with other servers (etcd mode): a loopback address is refused
    /// even from a peer on this host (it would name another host on every other server).
    pub shared: bool,
}

#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub access: Arc<Access>,
    /// Fires when the server stops: sessions then end without deregistering anyone.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Caps on long-lived requests: blocking queries and sessions each hold a permit.
    pub waiters: Arc<tokio::sync::Semaphore>,
    pub sessions: Arc<tokio::sync::Semaphore>,
    pub dns_stats: Arc<crate::dns::stats::DnsStats>,
    pub api_metrics: Arc<crate::metrics::ApiMetrics>,
    /// Longest blocking query (`--max-wait`).
    pub max_wait: Duration,
    /// Blocking queries in progress per client address.
    pub waiters_by_peer: Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
    pub max_waiters_per_client: usize,
    /// The live session of each node: opening a new one ends the old one.
    pub live_sessions: Arc<
        std::sync::Mutex<
            std::collections::HashMap<NodeKey, (u64, tokio_util::sync::CancellationToken)>,
        >,
    >,
    /// Roles that would hide a static name of the dynamic zone (from the zone files, and the
    /// name server's own name): registering under them is refused. Updated on zone reloads.
    pub reserved_roles: Arc<arc_swap::ArcSwap<std::collections::BTreeSet<String>>>,
    /// Every role `/metrics` has shown (at most KNOWN_ROLES_MAX): listed at 0 once empty.
    pub known_roles: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

/// Roles remembered for `rollcall_nodes{role} 0`; beyond, new roles are shown only while live.
const KNOWN_ROLES_MAX: usize = 1024;

/// Blocking queries in progress at most; more get 503.
pub const MAX_WAITERS: usize = 10_000;
/// Open sessions at most; more get 503 (agents fall back to PUT renewals).
pub const MAX_SESSIONS: usize = 50_000;
/// Blocking queries in progress per client address, by default (`--max-waits-per-client`).
pub const MAX_WAITERS_PER_CLIENT: usize = 256;
/// Time a client has to send a request's body once its headers arrived.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

impl AppState {
    pub fn new(
        registry: Registry,
        access: Access,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> AppState {
        AppState {
            registry,
            access: Arc::new(access),
            shutdown,
            waiters: Arc::new(tokio::sync::Semaphore::new(MAX_WAITERS)),
            sessions: Arc::new(tokio::sync::Semaphore::new(MAX_SESSIONS)),
            dns_stats: Arc::default(),
            api_metrics: Arc::default(),
            max_wait: MAX_WAIT,
            waiters_by_peer: Arc::default(),
            max_waiters_per_client: MAX_WAITERS_PER_CLIENT,
            live_sessions: Arc::default(),
            reserved_roles: Arc::default(),
            known_roles: Arc::default(),
        }
    }

    /// Shares the set of reserved role names (see [`AppState::reserved_roles`]).
    pub fn with_reserved_roles(
        mut self,
        reserved: Arc<arc_swap::ArcSwap<std::collections::BTreeSet<String>>>,
    ) -> AppState {
        self.reserved_roles = reserved;
        self
    }

    /// Caps blocking queries per client address.
    pub fn with_max_waiters_per_client(mut self, n: usize) -> AppState {
        self.max_waiters_per_client = n;
        self
    }

    /// A permit for one blocking query of `peer`: the global cap and the per-client cap.
    fn waiter(&self, peer: IpAddr) -> Result<Waiter, ApiError> {
        let global = permit(&self.waiters, "blocking queries", MAX_WAITERS)?;
        let mut by_peer = self
            .waiters_by_peer
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = by_peer.entry(peer).or_insert(0);
        if *n >= self.max_waiters_per_client {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "too many blocking queries from {peer} in progress (limit {} per client, --max-waits-per-client): retry later",
                    self.max_waiters_per_client
                ),
            ));
        }
        *n += 1;
        Ok(Waiter {
            _global: global,
            peer,
            by_peer: self.waiters_by_peer.clone(),
        })
    }

    /// Caps blocking queries at `max_wait` (and their default wait with it).
    pub fn with_max_wait(mut self, max_wait: Duration) -> AppState {
        self.max_wait = max_wait;
        self
    }

    /// Uses the DNS transports' counters for `/metrics`.
    pub fn with_dns_stats(mut self, stats: Arc<crate::dns::stats::DnsStats>) -> AppState {
        self.dns_stats = stats;
        self
    }
}

/// One blocking query's place under both caps; released on drop.
struct Waiter {
    _global: tokio::sync::OwnedSemaphorePermit,
    peer: IpAddr,
    by_peer: Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut by_peer = self.by_peer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                by_peer.remove(&self.peer);
            }
        }
    }
}

/// A permit of one of the caps on long-lived requests, or a 503 naming the cap.
pub(crate) fn permit(
    cap: &Arc<tokio::sync::Semaphore>,
    what: &str,
    limit: usize,
) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    cap.clone()
        .try_acquire_owned()
        .map_err(|_| busy(what, limit))
}

/// 503 for a request over one of the caps.
fn busy(what: &str, limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("too many {what} in progress (limit {limit}): retry later"),
    )
}

/// Nodes embedded in the status page at most (the page's own blocking queries show the rest).
const PAGE_NODES: usize = 2_000;

/// The API description, generated from the handlers' annotations; served at `/v1/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "rollcall",
        description = "Service discovery: nodes register under roles with a lease; DNS answers the live set."
    ),
    paths(
        node_put,
        node_delete,
        node_get,
        roles_list,
        role_get,
        session::session,
        sd_prometheus,
        healthz,
        readyz,
        metrics
    ),
    components(schemas(RegisterBody, NodeOut, RolesOut, RoleOut, ErrorBody, Health, SdTargetGroup)),
    modifiers(&BearerScheme)
)]
pub struct ApiDoc;

/// The `bearer` security scheme: `Authorization: Bearer <--token>`, required for writes when
/// the server has a token, and for reads too with --token-reads.
struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        doc.components.get_or_insert_with(Default::default).add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The server's --token. Required for PUT and DELETE when the server has one, \
                         and for every read with --token-reads. /healthz and /readyz never need it.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The status page: roles, nodes and leases ticking down, refreshed by blocking queries.
async fn page(State(state): State<AppState>) -> Result<axum::response::Html<String>, ApiError> {
    let view = state.registry.view()?;
    let index = view.index;
    let now = tokio::time::Instant::now();
    let nodes: Vec<NodeOut> = view
        .roles
        .iter()
        .flat_map(|(role, r)| r.nodes.iter().map(move |n| (role, n)))
        .take(PAGE_NODES)
        .map(|(role, n)| NodeOut::from(&view.node_info(role, n, now)))
        .collect();
    // `<` escaped so that no value can close the script element.
    let initial = serde_json::json!({ "index": index, "nodes": nodes })
        .to_string()
        .replace('<', "\\u003c");
    Ok(axum::response::Html(
        include_str!("page.html").replace("/*INITIAL*/null", &initial),
    ))
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(<ApiDoc as utoipa::OpenApi>::openapi())
}

/// The whole API as a router; serve it with `into_make_service_with_connect_info::<SocketAddr>()`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/roles", get(roles_list))
        .route("/v1/roles/{role}", get(role_get))
        .route(
            "/v1/roles/{role}/nodes/{node}",
            put(node_put).delete(node_delete).get(node_get),
        )
        .route(
            "/v1/roles/{role}/nodes/{node}/session",
            get(session::session),
        )
        .route("/v1/sd/prometheus", get(sd_prometheus))
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::not_found("no such endpoint: see the HTTP API section of the README")
        })
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn(body_deadline))
        .layer(middleware::from_fn_with_state(state.clone(), check_host))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Turns the framework's own plain-text rejections (bad query string, wrong method, failed
/// WebSocket upgrade) into the API's JSON error shape, so every error reads the same.
async fn json_errors(req: axum::extract::Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, BODY_LIMIT)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text.trim().to_owned()
    };
    let mut out = ApiError::new(status, message).into_response();
    for (name, value) in parts
        .headers
        .iter()
        .filter(|(n, _)| *n == axum::http::header::ALLOW)
    {
        out.headers_mut().insert(name, value.clone());
    }
    out
}

/// Reads a request's body within [`BODY_TIMEOUT`] (a slow body holds a connection for free
/// otherwise); handlers then get it whole.
async fn body_deadline(req: axum::extract::Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, BODY_LIMIT + 1)).await {
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )
        .into_response(),
        Ok(Err(_)) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {} KiB", BODY_LIMIT / 1024),
        )
        .into_response(),
        Ok(Ok(bytes)) => {
            next.run(axum::extract::Request::from_parts(
                parts,
                axum::body::Body::from(bytes),
            ))
            .await
        }
    }
}

/// The `Host` header must name this server the way a client of it would: an IP literal, a
/// single-label name (`localhost`, a compose service name), a name in the served zone, or one
/// of `--allow-host`. A page of another site that rebinds its own name to our address (DNS
/// rebinding) sends that site's name, which has at least two labels, and is refused.
async fn check_host(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    if let Some(host) = req.headers().get(axum::http::header::HOST) {
        if !host_allowed(&state.access, host.as_bytes()) {
            let shown = String::from_utf8_lossy(host.as_bytes()).into_owned();
            return ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "Host {shown:?} is not a name of this server: use its address, or start it with --allow-host NAME (DNS rebinding protection)"
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}

pub(crate) fn host_allowed(access: &Access, host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let host = host.trim().to_ascii_lowercase();
    // [v6]:port, v6 alone is not valid in Host; name:port or v4:port.
    let name = if let Some(rest) = host.strip_prefix('[') {
        return rest
            .split_once(']')
            .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok());
    } else {
        host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h)
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let hostname = |n: &str| {
        !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    };
    if !hostname(name) {
        return false;
    }
    if !name.contains('.') {
        return true;
    }
    let zone = access.zone.as_str();
    if !zone.is_empty() && (name == zone || name.ends_with(&format!(".{zone}"))) {
        return true;
    }
    access.allow_hosts.iter().any(|h| h == name)
}

/// Methods counted by name in the metrics; any other is counted as `OTHER`.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}

/// Counts every request by method, matched route and status, with its latency.
async fn record(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let blocking = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv.starts_with("index=")));
    let resp = next.run(req).await;
    state.api_metrics.record(
        method_label(&method),
        &route,
        resp.status().as_u16(),
        blocking,
        started.elapsed(),
    );
    resp
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is case-insensitive
/// (RFC 9110 section 11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

/// Whether a request writes: anything but GET and HEAD, and opening a session (a GET).
fn is_write(req: &axum::extract::Request) -> bool {
    !matches!(*req.method(), Method::GET | Method::HEAD) || req.uri().path().ends_with("/session")
}

/// Bearer-token check for writes (and reads with `--token-reads`), in constant time; the
/// token's [`tokens::Scope`] goes into the request for the write handlers, which check the
/// role once parsed. With `--tls-client-ca`, writes also need a verified client certificate.
async fn authorize(
    State(state): State<AppState>,
    mut req: axum::extract::Request,
    next: Next,
) -> Response {
    let write = is_write(&req);
    let tokens = state.access.tokens.load();
    let exempt = matches!(req.uri().path(), "/healthz" | "/readyz");
    if !tokens.is_empty() && (write || state.access.token_reads) && !exempt {
        let given = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .unwrap_or("");
        let Some(scope) = tokens.find(given.as_bytes()) else {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong token: send 'Authorization: Bearer <token>' (the server's --token, or one of its --token-file)",
            )
            .into_response();
        };
        if !write && !scope.read {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "{} may not read (read = false in the server's --token-file): use a token that may",
                    scope.label()
                ),
            )
            .into_response();
        }
        req.extensions_mut().insert(scope);
    }
    if write && state.access.client_cert_writes {
        let transport = req
            .extensions()
            .get::<serve::Transport>()
            .copied()
            .unwrap_or_default();
        if !transport.client_cert {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                if transport.tls {
                    "writes need a client certificate signed by the server's --tls-client-ca: \
                     give --client-cert and --client-key (reads need none)"
                } else {
                    "writes need a client certificate signed by the server's --tls-client-ca, \
                     over https://: give --client-cert and --client-key (reads need none)"
                },
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Checks the request's token may write `role` (403 with a sentence if not). Requests that
/// came without a scope were let through by [`authorize`] because the server has no tokens.
pub(crate) fn check_scope(scope: Option<&tokens::Scope>, role: &Label) -> Result<(), ApiError> {
    match scope {
        None => Ok(()),
        Some(s) => s.may_write(role.as_str()).map_err(|why| {
            tracing::info!(token = %s.label(), %role, "write refused: outside the token's roles");
            ApiError::new(StatusCode::FORBIDDEN, why)
        }),
    }
}

pub(crate) fn parse_key(role: &str, node: &str) -> Result<NodeKey, ApiError> {
    Ok(NodeKey {
        role: parse_role(role)?,
        node: Label::parse(node)
            .map_err(|e| ApiError::bad_request(format!("node name {node:?} {e}")))?,
    })
}

fn parse_role(role: &str) -> Result<Label, ApiError> {
    Label::parse(role).map_err(|e| ApiError::bad_request(format!("role name {role:?} {e}")))
}

/// The peer's address, with IPv4-mapped IPv6 addresses turned back into IPv4.
pub(crate) fn peer_ip(peer: SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        ip => ip,
    }
}

/// Checks `--allow-register` for a peer that deregisters or opens a session.
pub(crate) fn check_peer(access: &Access, peer: IpAddr) -> Result<(), ApiError> {
    if access.allow_register.is_empty() || access.allow_register.iter().any(|n| n.contains(&peer)) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "your address {peer} is outside the networks allowed to register (--allow-register)"
        ),
    ))
}

/// Why an address may not be registered (without `--allow-any-addr`): nobody could reach a
/// service there, or it is a well-known target (the cloud metadata service is link-local).
/// `local_peer`: registered by a node on this host, for this host only (loopback is allowed).
fn special_addr(local_peer: bool, addr: IpAddr) -> Option<&'static str> {
    let v4 = match addr {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    };
    if addr.is_unspecified() {
        return Some("unspecified");
    }
    if addr.is_multicast() || v4.is_some_and(|v| v.is_broadcast()) {
        return Some("a multicast or broadcast address");
    }
    let link_local = match (v4, addr) {
        (Some(v4), _) => v4.is_link_local(),
        (None, IpAddr::V6(v6)) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        _ => false,
    };
    if link_local {
        return Some("link-local (169.254.0.0/16, fe80::/10: the metadata service lives there)");
    }
    if (addr.is_loopback() || v4.is_some_and(|v| v.is_loopback())) && !local_peer {
        return Some(
            "loopback, registered from another host or shared with other servers through etcd \
             (only a node on this host can register one, with one server)",
        );
    }
    None
}

/// Special addresses, refused without `--allow-any-addr`.
fn check_special(access: &Access, local_peer: bool, addr: IpAddr) -> Result<(), ApiError> {
    if !access.any_addr {
        if let Some(why) = special_addr(local_peer, addr) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("address {addr} cannot be registered: it is {why}; start the server with --allow-any-addr to accept it"),
            ));
        }
    }
    Ok(())
}

/// `--allow-register` for one address (the peer's or the registered one).
fn check_inside(access: &Access, what: &str, ip: IpAddr) -> Result<(), ApiError> {
    if access.allow_register.is_empty() || access.allow_register.iter().any(|n| n.contains(&ip)) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        format!("{what} {ip} is outside the networks allowed to register (--allow-register)"),
    ))
}

/// The check a registration read from etcd must pass to be served: exactly the API's for a
/// `PUT` (the reserved roles, [`parse_spec`] on the value as a body, the address rules), so
/// that what etcd holds but the API would refuse is, on every server alike, not registered.
pub fn registration_check(
    access: Arc<Access>,
    reserved: Arc<arc_swap::ArcSwap<std::collections::BTreeSet<String>>>,
) -> crate::registry::Validate {
    Arc::new(move |key: &NodeKey, spec: &NodeSpec| {
        if reserved.load().contains(key.role.as_str()) {
            return Err(format!(
                "role {} would hide a static name of the zone (a PUT gets 409)",
                key.role
            ));
        }
        let body = RegisterBody {
            addr: Some(spec.addr.to_string()),
            port: spec.port.map(u32::from),
            service: Some(spec.service.to_string()),
            ttl: Some(spec.ttl.into()),
            weight: Some(spec.weight.into()),
            meta: Some(
                spec.meta
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect(),
            ),
        };
        let again = parse_spec(body, spec.addr).map_err(|e| e.message)?;
        check_special(&access, false, spec.addr).map_err(|e| e.message)?;
        check_inside(&access, "the registered address", spec.addr).map_err(|e| e.message)?;
        if again != *spec {
            return Err("not in the form the API stores".into());
        }
        Ok(())
    })
}

/// Checks `--allow-register` for the peer and the address being registered.
fn check_allowed(access: &Access, peer: IpAddr, addr: IpAddr) -> Result<(), ApiError> {
    check_special(access, peer.is_loopback() && !access.shared, addr)?;
    check_inside(access, "your address", peer)?;
    check_inside(access, "the registered address", addr)
}

/// Turns a register body into a validated spec; every error names the field.
pub fn parse_spec(body: RegisterBody, peer: IpAddr) -> Result<NodeSpec, ApiError> {
    let addr = match body.addr {
        None => peer,
        Some(a) => a.trim().parse::<IpAddr>().map_err(|_| {
            ApiError::bad_request(format!("addr {a:?} is not an IPv4 or IPv6 address"))
        })?,
    };
    if addr.is_unspecified() || addr.is_multicast() || addr == IpAddr::from([255, 255, 255, 255]) {
        return Err(ApiError::bad_request(format!(
            "addr {addr} cannot be served: give the node's unicast address"
        )));
    }
    let port = match body.port {
        None => None,
        Some(p @ 1..=65535) => Some(p as u16),
        Some(p) => {
            return Err(ApiError::bad_request(format!(
                "port {p} is out of range: use 1 to 65535"
            )))
        }
    };
    let service = parse_service(body.service.as_deref().unwrap_or("http")).map_err(|e| {
        ApiError::bad_request(format!(
            "service {:?} {e}",
            body.service.unwrap_or_default()
        ))
    })?;
    let ttl = body.ttl.unwrap_or(u64::from(DEFAULT_TTL));
    if !(u64::from(MIN_TTL)..=u64::from(MAX_TTL)).contains(&ttl) {
        return Err(ApiError::bad_request(format!(
            "ttl {ttl} is out of range: use {MIN_TTL} to {MAX_TTL} seconds"
        )));
    }
    let weight = body.weight.unwrap_or(1);
    if weight > 65535 {
        return Err(ApiError::bad_request(format!(
            "weight {weight} is out of range: use 0 to 65535"
        )));
    }
    let mut meta = BTreeMap::new();
    for (k, v) in body.meta.unwrap_or_default() {
        let serde_json::Value::String(s) = v else {
            return Err(ApiError::bad_request(format!("meta.{k} must be a string")));
        };
        meta.insert(k, s);
    }
    Ok(NodeSpec {
        addr,
        port,
        service,
        ttl: ttl as u32,
        weight: weight as u16,
        meta,
    })
}

/// Parses and validates a register body as the `PUT` handler does (also the fuzzing entry).
pub fn parse_register(body: &[u8], peer: IpAddr) -> Result<NodeSpec, ApiError> {
    parse_spec(parse_body(Ok(Bytes::copy_from_slice(body)))?, peer)
}

/// Reads a JSON body; an empty body is `{}`.
fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<RegisterBody, ApiError> {
    let body = body.map_err(|r| {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                format!("the body is larger than {} KiB", BODY_LIMIT / 1024),
            )
        } else {
            ApiError::new(status, format!("cannot read the body: {r}"))
        }
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(RegisterBody::default());
    }
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("the body is not a valid register request: {e}"))
    })
}

#[utoipa::path(put, path = "/v1/roles/{role}/nodes/{node}", summary = "Register or renew a node", security((), ("bearer" = [])), tag = "nodes",
    params(("role" = String, Path, description = "Role: a DNS label (a-z 0-9 -, 1-63, upper case folded)", pattern = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"), ("node" = String, Path, description = "Node: a DNS label", pattern = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")),
    request_body(content = Option<RegisterBody>, content_type = "application/json"),
    responses(
        (status = 200, description = "Registered or renewed; durable and visible in DNS", body = NodeOut),
        (status = 400, description = "Bad label, address, ttl, port, field or JSON", body = ErrorBody),
        (status = 401, description = "Token required (--token)", body = ErrorBody),
        (status = 403, description = "Outside --allow-register, a role the token may not write (--token-file), or no client certificate (--tls-client-ca)", body = ErrorBody),
        (status = 409, description = "The role would hide a static name of the zone (e.g. ns)", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 503, description = "Shutting down, the data dir cannot be written, or (etcd mode) etcd unreachable or this server's copy behind: retry after Retry-After", body = ErrorBody),
        (status = 507, description = "--max-nodes or --max-nodes-per-role reached", body = ErrorBody),
    ))]
async fn node_put(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    scope: Option<Extension<tokens::Scope>>,
    Path((role, node)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<NodeOut>, ApiError> {
    let key = parse_key(&role, &node)?;
    check_scope(scope.as_deref(), &key.role)?;
    if state.reserved_roles.load().contains(key.role.as_str()) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "role {} would hide the static name {}.{} of the zone files (or the name \
                 server's name): pick another role name",
                key.role, key.role, state.access.zone
            ),
        ));
    }
    let peer = peer_ip(peer);
    let spec = parse_spec(parse_body(body)?, peer)?;
    check_allowed(&state.access, peer, spec.addr)?;
    let info = state.registry.put(key, spec).await?;
    Ok(Json(NodeOut::from(&info)))
}

#[utoipa::path(delete, path = "/v1/roles/{role}/nodes/{node}", summary = "Deregister a node", security((), ("bearer" = [])), tag = "nodes",
    params(("role" = String, Path, description = "Role: a DNS label (a-z 0-9 -, 1-63, upper case folded)", pattern = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"), ("node" = String, Path, description = "Node: a DNS label", pattern = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")),
    responses(
        (status = 204, description = "Deregistered"),
        (status = 400, description = "Bad label", body = ErrorBody),
        (status = 401, description = "Token required (--token)", body = ErrorBody),
        (status = 403, description = "Outside --allow-register, a role the token may not write (--token-file), or no client certificate (--tls-client-ca)", body = ErrorBody),
        (status = 404, description = "Not registered", body = ErrorBody),
        (status = 503, description = "Shutting down, the data dir cannot be written, or (etcd mode) etcd unreachable or this server's copy behind: retry after Retry-After", body = ErrorBody),
    ))]
async fn node_delete(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    scope: Option<Extension<tokens::Scope>>,
    Path((role, node)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let key = parse_key(&role, &node)?;
    check_scope(scope.as_deref(), &key.role)?;
    check_peer(&state.access, peer_ip(peer))?;
    if state.registry.delete(key).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "node {node} is not registered under role {role}"
        )))
    }
}

#[utoipa::path(get, path = "/v1/roles/{role}/nodes/{node}", summary = "One node, with its lease", security((), ("bearer" = [])), tag = "nodes",
    params(("role" = String, Path, description = "Role: a DNS label (a-z 0-9 -, 1-63, upper case folded)", pattern = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"), ("node" = String, Path, description = "Node: a DNS label", pattern = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")),
    responses(
        (status = 200, description = "The node", body = NodeOut),
        (status = 400, description = "Bad label", body = ErrorBody),
        (status = 401, description = "Token required (--token-reads)", body = ErrorBody),
        (status = 404, description = "Not registered", body = ErrorBody),
        (status = 503, description = "Shutting down", body = ErrorBody),
    ))]
async fn node_get(
    State(state): State<AppState>,
    Path((role, node)): Path<(String, String)>,
) -> Result<Json<NodeOut>, ApiError> {
    let key = parse_key(&role, &node)?;
    state
        .registry
        .node(&key)?
        .map(|n| Json(NodeOut::from(&n)))
        .ok_or_else(|| {
            ApiError::not_found(format!("node {node} is not registered under role {role}"))
        })
}

#[utoipa::path(get, path = "/v1/roles", summary = "Every non-empty role and its node count", security((), ("bearer" = [])), tag = "roles",
    params(("index" = Option<u64>, Query, description = "Blocking query: wait until the index exceeds this", minimum = 0), ("wait" = Option<String>, Query, description = "Longest wait: 500ms, 30s, 2m, 1h, 1d or seconds (default 5m, at most --max-wait)", pattern = r"^[0-9]{1,6}(\.[0-9]{1,6})?(ms|s|m|h|d)?$")),
    responses(
        (status = 200, description = "Roles and node counts", body = RolesOut,
            headers(("X-Rollcall-Index" = u64, description = "Generation index"))),
        (status = 400, description = "Bad index or wait", body = ErrorBody),
        (status = 401, description = "Token required (--token-reads)", body = ErrorBody),
        (status = 503, description = "Too many blocking queries, or shutting down", body = ErrorBody),
    ))]
async fn roles_list(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<BlockingParams>,
) -> Result<Response, ApiError> {
    let (index, roles) = match params.blocking(state.max_wait)? {
        None => state.registry.roles()?,
        Some((index, wait)) => {
            let _permit = state.waiter(peer_ip(peer))?;
            state.registry.roles_after(index, wait).await?
        }
    };
    let body = RolesOut {
        index,
        roles: roles.into_iter().map(|(r, n)| (r.to_string(), n)).collect(),
    };
    Ok(with_index(index, Json(body)))
}

#[derive(Deserialize)]
struct BlockingParams {
    index: Option<String>,
    wait: Option<String>,
}

impl BlockingParams {
    /// Validates both parameters (even `wait` alone) and returns `(index, wait)` when the
    /// request is a blocking query.
    fn blocking(&self, max_wait: Duration) -> Result<Option<(u64, Duration)>, ApiError> {
        let wait = self
            .wait
            .as_deref()
            .map(parse_wait)
            .transpose()?
            .unwrap_or(DEFAULT_WAIT)
            .min(max_wait);
        let Some(index) = &self.index else {
            return Ok(None);
        };
        // Indexes are JSON integers (int64): an index past i64::MAX was never handed out.
        let index: u64 = index
            .parse()
            .ok()
            .filter(|i| *i <= i64::MAX as u64)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "index {index:?} is not an index: use the X-Rollcall-Index of an earlier answer (0 to {})",
                    i64::MAX
                ))
            })?;
        Ok(Some((index, wait)))
    }
}

#[utoipa::path(get, path = "/v1/roles/{role}", summary = "A role's live nodes; blocking with ?index=", security((), ("bearer" = [])), tag = "roles",
    params(("role" = String, Path, description = "Role: a DNS label", pattern = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"), ("index" = Option<u64>, Query, description = "Blocking query: wait until the index exceeds this", minimum = 0), ("wait" = Option<String>, Query, description = "Longest wait: 500ms, 30s, 2m, 1h, 1d or seconds (default 5m, at most --max-wait)", pattern = r"^[0-9]{1,6}(\.[0-9]{1,6})?(ms|s|m|h|d)?$")),
    responses(
        (status = 200, description = "The role's live nodes (empty for an unknown role)", body = RoleOut,
            headers(("X-Rollcall-Index" = u64, description = "Index of the role's last change"))),
        (status = 400, description = "Bad label, index or wait", body = ErrorBody),
        (status = 401, description = "Token required (--token-reads)", body = ErrorBody),
        (status = 503, description = "Too many blocking queries, or shutting down", body = ErrorBody),
    ))]
async fn role_get(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(role): Path<String>,
    Query(params): Query<BlockingParams>,
) -> Result<Response, ApiError> {
    let role = parse_role(&role)?;
    let (view, snap) = match params.blocking(state.max_wait)? {
        None => {
            let view = state.registry.view()?;
            let snap = view.roles.get(&role).cloned();
            (view, snap)
        }
        Some((index, wait)) => {
            let _permit = state.waiter(peer_ip(peer))?;
            state
                .registry
                .role_snapshot_after(&role, index, wait)
                .await?
        }
    };
    let index = snap.as_ref().map_or(0, |s| s.index);
    let body = stream::role_body(view, role, snap);
    let headers = [(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    )];
    Ok(with_index(index, (headers, body)))
}

/// `?role=` of `GET /v1/sd/prometheus`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SdParams {
    role: Option<String>,
}

#[utoipa::path(get, path = "/v1/sd/prometheus", tag = "nodes",
    summary = "Registered nodes as Prometheus targets (http_sd_config)",
    description = "Every live node (or those of one role) as a Prometheus HTTP service discovery target group: `[{\"targets\":[\"host:port\"],\"labels\":{...}}]`, `[]` when there are none, the full list every time. Point `http_sd_configs` at it; relabel on `__meta_rollcall_role` and friends.",
    params(("role" = Option<String>, Query, description = "Only this role's nodes", pattern = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")),
    responses(
        (status = 200, description = "The target groups", body = [SdTargetGroup]),
        (status = 400, description = "Bad role", body = ErrorBody),
        (status = 401, description = "Token required (--token-reads)", body = ErrorBody),
    ))]
async fn sd_prometheus(
    State(state): State<AppState>,
    Query(params): Query<SdParams>,
) -> Result<Json<Vec<SdTargetGroup>>, ApiError> {
    let role = params.role.as_deref().map(parse_role).transpose()?;
    let view = state.registry.view()?;
    let now = tokio::time::Instant::now();
    let groups = view
        .roles
        .iter()
        .filter(|(r, _)| role.as_ref().is_none_or(|want| want == *r))
        .flat_map(|(r, snap)| snap.nodes.iter().map(move |n| (r, n)))
        .map(|(r, n)| SdTargetGroup::from_node(&view.node_info(r, n, now)))
        .collect();
    Ok(Json(groups))
}

/// `30s`, `500ms`, `2m`, or a bare number of seconds.
/// A `wait=` value, in the one duration syntax (`clock::parse_duration`); a wait longer than
/// the server allows is cut to it by the caller, not refused.
pub fn parse_wait(s: &str) -> Result<Duration, ApiError> {
    let secs =
        crate::clock::parse_secs(s).map_err(|e| ApiError::bad_request(format!("wait {e}")))?;
    Ok(Duration::from_secs_f64(
        secs.min(crate::clock::MAX_DURATION.as_secs_f64()),
    ))
}

fn with_index(index: u64, body: impl IntoResponse) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert("x-rollcall-index", HeaderValue::from(index));
    (headers, body).into_response()
}

#[utoipa::path(get, path = "/healthz", summary = "Whether the process serves", tag = "operations",
    responses((status = 200, description = "Serving", body = Health), (status = 503, description = "Shutting down", body = ErrorBody)))]
async fn healthz(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    let (index, roles) = state.registry.roles()?;
    Ok(Json(Health {
        status: "ok".into(),
        index,
        roles: roles.len(),
    }))
}

/// Ready: this server takes writes and holds a full copy of the registrations. In etcd mode
/// 503 while etcd is unreachable or has no leader (DNS still answers the last known set);
/// the embedded server is ready while it runs. For load balancers in front of the API;
/// `/healthz` says whether the process serves at all.
#[utoipa::path(get, path = "/readyz", summary = "Whether it is ready (etcd mode: listed etcd)", tag = "operations",
    responses((status = 200, description = "Ready", body = Health), (status = 503, description = "Not ready, with the reason", body = ErrorBody)))]
async fn readyz(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    state
        .registry
        .ready()
        .map_err(|why| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why).retry_after(1))?;
    let view = state.registry.view()?;
    Ok(Json(Health {
        status: "ready".into(),
        index: view.index,
        roles: view.role_counts().len(),
    }))
}

#[utoipa::path(get, path = "/metrics", summary = "Prometheus metrics", security((), ("bearer" = [])), tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        (status = 401, description = "Token required (--token-reads)", body = ErrorBody),
        (status = 503, description = "Shutting down", body = ErrorBody)))]
async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let (index, roles) = state.registry.roles()?;
    let mut roles: Vec<(String, usize)> =
        roles.into_iter().map(|(r, n)| (r.to_string(), n)).collect();
    {
        // Roles seen before and empty now stay, at 0, so that "fewer than N" alerts fire at 0.
        let mut known = state.known_roles.lock().unwrap_or_else(|p| p.into_inner());
        for (r, _) in &roles {
            if known.len() < KNOWN_ROLES_MAX || known.contains(r) {
                known.insert(r.clone());
            }
        }
        let present: std::collections::BTreeSet<String> =
            roles.iter().map(|(r, _)| r.clone()).collect();
        roles.extend(known.difference(&present).map(|r| (r.clone(), 0)));
        roles.sort();
    }
    let sessions = state
        .live_sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .len();
    let blocking_queries = state
        .waiters_by_peer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .sum();
    let mut out = metrics::render(
        &state.dns_stats,
        state.registry.counters(),
        &state.api_metrics,
        &metrics::Live {
            index,
            roles: &roles,
            sessions,
            blocking_queries,
        },
    );
    if let Some(link) = state.registry.etcd_link() {
        link.render(&mut out);
    }
    let text = out.finish();
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response())
}

#[cfg(test)]
mod tests;
