//! A small etcd v3 client over etcd's JSON gateway (`/v3/...`, on by default on every etcd
//! since 3.4), on the HTTP client rollcall already has: no protoc, no generated code.
//!
//! One endpoint is used at a time; a transport error, a timeout or "no leader" moves to the
//! next member, within one budget per call (`--etcd-timeout`). etcd errors that are answers
//! (a compacted revision, an unknown lease) are returned as such, never retried elsewhere.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use tokio::time::Instant;

/// gRPC status codes etcd answers with (in the gateway's `code` field).
const CODE_OUT_OF_RANGE: i64 = 11;
const CODE_NOT_FOUND: i64 = 5;
const CODE_UNAVAILABLE: i64 = 14;
const CODE_DEADLINE: i64 = 4;
const CODE_UNAUTHENTICATED: i64 = 16;
const CODE_PERMISSION_DENIED: i64 = 7;

/// How rollcall proves itself to etcd: TLS (`--etcd-cacert`, `--etcd-cert`, `--etcd-key`) and
/// etcd's own users (`--etcd-user`, `--etcd-password-file`).
#[derive(Clone, Default)]
pub struct Access {
    /// For https:// endpoints (None: the system's CAs, no client certificate).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// etcd user and password: a token from `/v3/auth/authenticate` goes with every call.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("tls", &self.tls.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// The current auth token, shared with open watches (which drop it when etcd refuses it).
type TokenSlot = Arc<std::sync::Mutex<Option<String>>>;

fn drop_token(slot: &TokenSlot, used: &str) {
    let mut t = slot.lock().unwrap_or_else(|p| p.into_inner());
    if t.as_deref() == Some(used) {
        *t = None;
    }
}

/// etcd refused the token (expired, or from before a restart): authenticate again.
fn is_auth_error(code: i64, message: &str) -> bool {
    code == CODE_UNAUTHENTICATED
        || message.contains("invalid auth token")
        || message.contains("token") && (message.contains("expired") || message.contains("invalid"))
}

#[derive(Debug, Default, Deserialize)]
struct AuthResponse {
    #[serde(default)]
    token: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EtcdError {
    /// No member answered within the budget (down, partitioned, or without a leader).
    #[error("etcd is unreachable or has no leader: {0}")]
    Unavailable(String),
    /// The revision asked for was compacted away.
    #[error("etcd: the revision was compacted")]
    Compacted,
    /// The lease does not exist (expired or revoked).
    #[error("etcd: lease not found")]
    LeaseNotFound,
    /// Any other answer etcd gave.
    #[error("etcd refused the request: {0}")]
    Refused(String),
    /// A watch response larger than this server takes in one piece.
    #[error("a watch response over {0} bytes")]
    TooLarge(usize),
    /// The member took the connection but did not open the watch (no answer in time, or an
    /// error status): unlike a refused connection, not a sign that etcd is away.
    #[error("etcd did not open the watch: {0}")]
    WatchNotOpened(String),
}

/// int64 fields come as JSON strings from the gateway; absent means 0.
pub fn i64s<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        S(String),
        I(i64),
    }
    match N::deserialize(d)? {
        N::I(i) => Ok(i),
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

fn b64s<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let s = String::deserialize(d)?;
    B64.decode(s).map_err(serde::de::Error::custom)
}

pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct Header {
    #[serde(default, deserialize_with = "i64s")]
    pub revision: i64,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct Kv {
    #[serde(default, deserialize_with = "b64s")]
    pub key: Vec<u8>,
    #[serde(default, deserialize_with = "i64s")]
    pub create_revision: i64,
    #[serde(default, deserialize_with = "i64s")]
    pub mod_revision: i64,
    #[serde(default, deserialize_with = "b64s")]
    pub value: Vec<u8>,
    #[serde(default, deserialize_with = "i64s")]
    pub lease: i64,
}

#[derive(Debug, Default, Deserialize)]
pub struct RangeResponse {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub kvs: Vec<Kv>,
    #[serde(default)]
    pub more: bool,
    #[serde(default, deserialize_with = "i64s")]
    pub count: i64,
}

#[derive(Debug, Default, Deserialize)]
pub struct DeleteResponse {
    #[serde(default, deserialize_with = "i64s")]
    pub deleted: i64,
    #[serde(default)]
    pub prev_kvs: Vec<Kv>,
}

/// What a one-key transaction ([`Client::put_if`]) compares.
#[derive(Clone, Copy, Debug)]
pub enum Cond {
    /// The key does not exist.
    Absent,
    /// The key was last changed at this revision.
    ModRevision(i64),
}

#[derive(Debug, Default, Deserialize)]
pub struct TxnOp {
    #[serde(default)]
    pub response_range: Option<RangeResponse>,
    #[serde(default)]
    pub response_delete_range: Option<DeleteResponse>,
}

#[derive(Debug, Default, Deserialize)]
pub struct TxnResponse {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub succeeded: bool,
    #[serde(default)]
    pub responses: Vec<TxnOp>,
}

#[derive(Debug, Default, Deserialize)]
struct GrantResponse {
    #[serde(rename = "ID", default, deserialize_with = "i64s")]
    id: i64,
    #[serde(rename = "TTL", default, deserialize_with = "i64s")]
    ttl: i64,
    #[serde(default)]
    error: String,
}

#[derive(Debug, Default, Deserialize)]
struct KeepAliveResult {
    #[serde(rename = "TTL", default, deserialize_with = "i64s")]
    ttl: i64,
}

#[derive(Debug, Deserialize)]
struct Streamed<T> {
    result: Option<T>,
    error: Option<GatewayError>,
}

#[derive(Debug, Default, Deserialize)]
struct GatewayError {
    /// `grpc_code` in the lines of a stream (watch).
    #[serde(default, alias = "grpc_code")]
    code: i64,
    #[serde(default)]
    message: String,
}

#[derive(Debug, Default, Deserialize)]
struct LeasesResponse {
    #[serde(default)]
    leases: Vec<LeaseId>,
}

#[derive(Debug, Default, Deserialize)]
struct LeaseId {
    #[serde(rename = "ID", default, deserialize_with = "i64s")]
    id: i64,
}

/// One watch response (`result` of a line of the watch stream).
#[derive(Debug, Default, Deserialize)]
pub struct WatchResponse {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub created: bool,
    #[serde(default)]
    pub canceled: bool,
    #[serde(default, deserialize_with = "i64s")]
    pub compact_revision: i64,
    #[serde(default)]
    pub cancel_reason: String,
    #[serde(default)]
    pub events: Vec<Event>,
    /// More of the same response follows (the watch asked for fragments).
    #[serde(default)]
    pub fragment: bool,
}

#[derive(Debug, Default, Deserialize)]
pub struct Event {
    /// Absent for PUT (the enum's zero value), "DELETE" for deletes.
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub kv: Kv,
}

impl Event {
    pub fn is_delete(&self) -> bool {
        self.kind == "DELETE"
    }
}

/// Request latency per operation, for `/metrics`.
#[derive(Default)]
pub struct OpStats {
    pub count: AtomicU64,
    pub micros: AtomicU64,
    pub errors: AtomicU64,
}

/// The etcd operations rollcall makes, in the order `/metrics` lists them.
pub const OPS: [&str; 9] = [
    "range",
    "txn",
    "grant",
    "keepalive",
    "revoke",
    "leases",
    "watch",
    "status",
    "timetolive",
];

/// Calls in flight at most (each holds an HTTP connection to etcd): a burst of renewals
/// (50,000 sessions pinging) queues here instead of opening a connection per renewal.
pub const MAX_INFLIGHT: usize = 64;

/// The largest watch response line taken in one piece, by default. With fragments asked for,
/// etcd cuts responses at its request size limit (1.5 MiB by default), so a line is a few MiB
/// at most; a larger one makes the mirror list again instead.
pub const WATCH_LINE_MAX: usize = 64 << 20;

pub struct Client {
    http: reqwest::Client,
    /// Largest watch response line (see [`WATCH_LINE_MAX`]).
    pub watch_line_max: usize,
    inflight: tokio::sync::Semaphore,
    endpoints: Vec<String>,
    current: AtomicUsize,
    timeout: Duration,
    pub stats: [OpStats; OPS.len()],
    user: Option<(String, String)>,
    token: TokenSlot,
    /// One authentication at a time (each is a raft write and a bcrypt check on etcd): the
    /// calls that found no token wait for it instead of each asking for one.
    authenticating: tokio::sync::Mutex<()>,
}

fn op_index(op: &str) -> usize {
    OPS.iter().position(|o| *o == op).unwrap_or(0)
}

impl Client {
    /// `endpoints` are base URLs (`http://127.0.0.1:2379`); `timeout` bounds every call.
    pub fn new(endpoints: Vec<String>, timeout: Duration, dial: Duration) -> Client {
        Client::with_access(endpoints, timeout, dial, Access::default())
    }

    /// [`Client::new`] with TLS settings and an etcd user.
    pub fn with_access(
        endpoints: Vec<String>,
        timeout: Duration,
        dial: Duration,
        access: Access,
    ) -> Client {
        let mut b = reqwest::Client::builder()
            .connect_timeout(dial)
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .no_proxy();
        if let Some(tls) = &access.tls {
            b = b.use_preconfigured_tls((**tls).clone());
        }
        let http = b.build().expect("an HTTP client with these TLS settings");
        Client {
            http,
            watch_line_max: WATCH_LINE_MAX,
            inflight: tokio::sync::Semaphore::new(MAX_INFLIGHT),
            endpoints,
            current: AtomicUsize::new(0),
            timeout,
            stats: Default::default(),
            user: access.user,
            token: TokenSlot::default(),
            authenticating: tokio::sync::Mutex::new(()),
        }
    }

    /// The token to send (authenticating at `base` when there is none), None without a user.
    /// `Err(Ok)`: etcd refused the user (an answer); `Err(Err)`: try the next member.
    async fn token(
        &self,
        base: &str,
        timeout: Duration,
    ) -> Result<Option<String>, Result<EtcdError, Retry>> {
        let Some((user, password)) = &self.user else {
            return Ok(None);
        };
        if let Some(t) = self.token.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(Some(t));
        }
        let Ok(_one) = tokio::time::timeout(timeout, self.authenticating.lock()).await else {
            return Err(Err(Retry(
                "waiting for another authentication to etcd".into(),
            )));
        };
        if let Some(t) = self.token.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(Some(t));
        }
        let url = format!("{base}/v3/auth/authenticate");
        let sent = self
            .http
            .post(&url)
            .json(&json!({ "name": user, "password": password }))
            .timeout(timeout)
            .send()
            .await;
        let resp = sent.map_err(|e| Err(Retry(transport(&url, &e))))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Err(Retry(format!("{url}: {e}"))))?;
        match decode::<AuthResponse>(&bytes, status.is_success(), false) {
            Ok(Ok(r)) if !r.token.is_empty() => {
                *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(r.token.clone());
                Ok(Some(r.token))
            }
            Ok(Ok(_)) => Err(Ok(EtcdError::Refused(format!(
                "etcd gave no token to user {user:?}: is auth enabled on etcd (etcdctl auth enable)?"
            )))),
            Ok(Err(e)) => Err(Ok(EtcdError::Refused(format!(
                "etcd refused user {user:?} ({e}): check --etcd-user and the password \
                 (--etcd-password-file or ROLLCALL_ETCD_PASSWORD)"
            )))),
            Err(r) => Err(Err(r)),
        }
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The member calls go to now.
    pub fn current(&self) -> (usize, &str) {
        let i = self.current.load(Relaxed) % self.endpoints.len();
        (i, &self.endpoints[i])
    }

    /// Moves on from member `from` (if nobody moved already).
    pub fn next_endpoint(&self, from: usize) {
        let _ = self.current.compare_exchange(
            from,
            (from + 1) % self.endpoints.len(),
            Relaxed,
            Relaxed,
        );
    }

    fn record(&self, op: &str, start: Instant, ok: bool) {
        let s = &self.stats[op_index(op)];
        s.count.fetch_add(1, Relaxed);
        s.micros
            .fetch_add(start.elapsed().as_micros() as u64, Relaxed);
        if !ok {
            s.errors.fetch_add(1, Relaxed);
        }
    }

    /// One unary call with failover. `streamed`: the answer is a `{"result": …}` line (the
    /// gateway's form of a streaming RPC, as keepalive is).
    async fn call<T: DeserializeOwned>(
        &self,
        op: &'static str,
        path: &str,
        body: &Value,
        streamed: bool,
    ) -> Result<T, EtcdError> {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let Ok(Ok(_slot)) = tokio::time::timeout_at(deadline, self.inflight.acquire()).await else {
            self.record(op, start, false);
            return Err(EtcdError::Unavailable(format!(
                "{op}: {MAX_INFLIGHT} etcd calls in flight for {:?}",
                self.timeout
            )));
        };
        let mut last = String::from("no member tried");
        let mut tried = 0usize;
        let mut reauthed = false;
        loop {
            let now = Instant::now();
            if now >= deadline {
                self.record(op, start, false);
                return Err(EtcdError::Unavailable(format!(
                    "{op}: no answer within {:?} ({last})",
                    self.timeout
                )));
            }
            // One member may take at most a second of the budget, so that a hung member
            // leaves time for the next one.
            let per_try = (deadline - now).min(Duration::from_secs(1));
            let (i, base) = self.current();
            let url = format!("{base}{path}");
            let outcome = match self.token(base, per_try).await {
                Err(Ok(e)) => Ok(Err(e)),
                Err(Err(r)) => Err(r),
                Ok(token) => {
                    let mut req = self
                        .http
                        .post(&url)
                        .header("Grpc-Metadata-hasleader", "true");
                    if let Some(t) = &token {
                        req = req.header(reqwest::header::AUTHORIZATION, t);
                    }
                    match req.json(body).timeout(per_try).send().await {
                        Ok(resp) => {
                            let status = resp.status();
                            match resp.bytes().await {
                                Ok(bytes) => {
                                    if let (Some(t), false) = (&token, reauthed) {
                                        if status == reqwest::StatusCode::UNAUTHORIZED
                                            || auth_refused(&bytes)
                                        {
                                            // An expired or unknown token: a new one, once.
                                            tracing::info!(%url, "etcd refused the auth token (expired, or etcd restarted): authenticating again");
                                            drop_token(&self.token, t);
                                            reauthed = true;
                                            continue;
                                        }
                                    }
                                    decode::<T>(&bytes, status.is_success(), streamed)
                                }
                                Err(e) => Err(Retry(format!("{url}: {e}"))),
                            }
                        }
                        Err(e) => Err(Retry(transport(&url, &e))),
                    }
                }
            };
            match outcome {
                Ok(Ok(v)) => {
                    self.record(op, start, true);
                    return Ok(v);
                }
                Ok(Err(e)) => {
                    self.record(op, start, false);
                    return Err(e);
                }
                Err(Retry(why)) => {
                    last = why;
                    self.next_endpoint(i);
                    tried += 1;
                    if tried.is_multiple_of(self.endpoints.len()) {
                        // A full pass failed: breathe before the next one.
                        tokio::time::sleep(
                            Duration::from_millis(50).min(deadline - Instant::now().min(deadline)),
                        )
                        .await;
                    }
                }
            }
        }
    }

    /// Linearizable range `[key, end)` at `revision` (0: now), at most `limit` keys (0: all).
    pub async fn range(
        &self,
        key: &[u8],
        end: &[u8],
        revision: i64,
        limit: i64,
    ) -> Result<RangeResponse, EtcdError> {
        let mut body = json!({ "key": b64(key), "range_end": b64(end) });
        if revision > 0 {
            body["revision"] = json!(revision.to_string());
        }
        if limit > 0 {
            body["limit"] = json!(limit.to_string());
        }
        self.call("range", "/v3/kv/range", &body, false).await
    }

    pub(super) async fn txn(&self, body: &Value) -> Result<TxnResponse, EtcdError> {
        self.call("txn", "/v3/kv/txn", body, false).await
    }

    /// `if cond(key) then put(key, value, lease) else range(key)`: a write that loses its
    /// race reads what won (the failure branch's range), never overwrites it.
    pub async fn put_if(
        &self,
        key: &[u8],
        cond: Cond,
        value: &[u8],
        lease: i64,
    ) -> Result<TxnResponse, EtcdError> {
        let k = b64(key);
        let compare = match cond {
            Cond::Absent => json!({"target": "CREATE", "key": k, "create_revision": "0"}),
            Cond::ModRevision(rev) => {
                json!({"target": "MOD", "key": k, "mod_revision": rev.to_string()})
            }
        };
        self.txn(&json!({
            "compare": [compare],
            "success": [{"request_put": {"key": k, "value": b64(value), "lease": lease.to_string()}}],
            "failure": [{"request_range": {"key": k}}],
        }))
        .await
    }

    /// Deletes one key: the revision after it, how many keys went (0 or 1) and what it held.
    pub async fn delete(&self, key: &[u8]) -> Result<(i64, DeleteResponse), EtcdError> {
        let r = self
            .txn(&json!({
                "success": [{"request_delete_range": {"key": b64(key), "prev_kv": true}}],
            }))
            .await?;
        let revision = r.header.revision;
        let del = r
            .responses
            .into_iter()
            .next()
            .and_then(|o| o.response_delete_range)
            .unwrap_or_default();
        Ok((revision, del))
    }

    /// Grants a lease; returns its id and the TTL etcd actually granted.
    pub async fn grant(&self, ttl: u32) -> Result<(i64, i64), EtcdError> {
        let r: GrantResponse = self
            .call(
                "grant",
                "/v3/lease/grant",
                &json!({ "TTL": ttl.to_string() }),
                false,
            )
            .await?;
        if !r.error.is_empty() || r.id == 0 {
            return Err(EtcdError::Refused(format!("lease grant: {}", r.error)));
        }
        Ok((r.id, r.ttl))
    }

    /// How many keys `[key, end)` holds now, if every one of them was last changed at or
    /// before `revision`; None if one changed after it. One read-only txn (no raft write).
    pub async fn unchanged_since(
        &self,
        key: &[u8],
        end: &[u8],
        revision: i64,
    ) -> Result<Option<i64>, EtcdError> {
        let (k, e) = (b64(key), b64(end));
        let r = self
            .txn(&json!({
                "compare": [{"target": "MOD", "result": "LESS", "key": k, "range_end": e,
                             "mod_revision": (revision + 1).to_string()}],
                "success": [{"request_range": {"key": k, "range_end": e, "count_only": true}}],
            }))
            .await?;
        Ok(r.succeeded.then(|| {
            r.responses
                .first()
                .and_then(|o| o.response_range.as_ref())
                .map_or(0, |rr| rr.count)
        }))
    }

    /// Renews a lease; returns the TTL left, 0 if the lease is gone.
    pub async fn keepalive(&self, id: i64) -> Result<i64, EtcdError> {
        let r: KeepAliveResult = self
            .call(
                "keepalive",
                "/v3/lease/keepalive",
                &json!({ "ID": id.to_string() }),
                true,
            )
            .await?;
        Ok(r.ttl)
    }

    /// The seconds a lease has left (etcd's LeaseTimeToLive); 0 or less when it is gone.
    pub async fn time_to_live(&self, id: i64) -> Result<i64, EtcdError> {
        let r: KeepAliveResult = self
            .call(
                "timetolive",
                "/v3/lease/timetolive",
                &json!({ "ID": id.to_string() }),
                false,
            )
            .await?;
        Ok(r.ttl)
    }

    /// Revokes a lease (and deletes the keys attached to it); a lease already gone is fine.
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        match self
            .call::<Value>(
                "revoke",
                "/v3/lease/revoke",
                &json!({ "ID": id.to_string() }),
                false,
            )
            .await
        {
            Ok(_) | Err(EtcdError::LeaseNotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every live lease id.
    pub async fn leases(&self) -> Result<Vec<i64>, EtcdError> {
        let r: LeasesResponse = self
            .call("leases", "/v3/lease/leases", &json!({}), false)
            .await?;
        Ok(r.leases.into_iter().map(|l| l.id).collect())
    }

    /// Opens a watch on `[key, end)` from `start_revision` on member `member`. The caller
    /// reads lines with [`WatchStream::next`].
    pub async fn watch(
        &self,
        member: usize,
        key: &[u8],
        end: &[u8],
        start_revision: i64,
    ) -> Result<WatchStream, EtcdError> {
        let start = Instant::now();
        let base = &self.endpoints[member % self.endpoints.len()];
        // Fragments: etcd cuts a large response (a catch-up after a break) into pieces of at
        // most its request size limit instead of one line of any size.
        let body = json!({ "create_request": {
            "key": b64(key), "range_end": b64(end),
            "start_revision": start_revision.to_string(),
            "fragment": true,
        }});
        let token = match self.token(base, self.timeout).await {
            Ok(t) => t,
            Err(Ok(e)) => {
                self.record("watch", start, false);
                return Err(e);
            }
            Err(Err(Retry(why))) => {
                self.record("watch", start, false);
                return Err(EtcdError::Unavailable(why));
            }
        };
        let mut req = self
            .http
            .post(format!("{base}/v3/watch"))
            .header("Grpc-Metadata-hasleader", "true");
        if let Some(t) = &token {
            req = req.header(reqwest::header::AUTHORIZATION, t);
        }
        let resp = req.json(&body).send();
        let resp = tokio::time::timeout(self.timeout, resp).await;
        let resp = match resp {
            Ok(Ok(r)) if r.status().is_success() => r,
            Ok(Ok(r)) => {
                self.record("watch", start, false);
                if let (Some(t), reqwest::StatusCode::UNAUTHORIZED) = (&token, r.status()) {
                    drop_token(&self.token, t);
                }
                return Err(EtcdError::WatchNotOpened(format!(
                    "{base}: watch answered {}",
                    r.status()
                )));
            }
            Ok(Err(e)) => {
                self.record("watch", start, false);
                return Err(EtcdError::Unavailable(format!(
                    "{base}: {}",
                    crate::etcd::chain(&e)
                )));
            }
            Err(_) => {
                self.record("watch", start, false);
                return Err(EtcdError::WatchNotOpened(format!(
                    "{base}: no answer within {:?}",
                    self.timeout
                )));
            }
        };
        self.record("watch", start, true);
        Ok(WatchStream {
            resp,
            buf: Vec::new(),
            max: self.watch_line_max,
            token: token.map(|t| (self.token.clone(), t)),
        })
    }
}

/// "Try the next member" (transport trouble, no leader).
struct Retry(String);

/// A transport error as a sentence: TLS ones say which flag to give; plain HTTP towards
/// etcd's TLS port (etcd closes the connection without a word) says to use https://.
fn transport(url: &str, e: &reqwest::Error) -> String {
    let s = format!("{url}: {}", crate::etcd::chain(e));
    if url.starts_with("http://") && s.contains("connection closed before message completed") {
        return format!(
            "{s} (if etcd speaks TLS there, use https:// in --etcd, with --etcd-cacert)"
        );
    }
    if url.starts_with("https://") && s.contains("tls handshake eof") {
        return format!("{s} (if etcd does not speak TLS there, use http:// in --etcd)");
    }
    s
}

/// An answer that says the token was refused (`{"error": …, "code": 16}` or, for a
/// streamed call, the same inside the line).
fn auth_refused(bytes: &[u8]) -> bool {
    let line = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
    let Ok(v) = serde_json::from_slice::<Value>(line) else {
        return false;
    };
    let e = if v.get("error").is_some_and(Value::is_object) {
        &v["error"]
    } else {
        &v
    };
    let code = e
        .get("code")
        .or_else(|| e.get("grpc_code"))
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let msg = e
        .get("message")
        .or_else(|| e.get("error"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    (code != 0 || !msg.is_empty()) && is_auth_error(code, msg)
}

fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    ok: bool,
    streamed: bool,
) -> Result<Result<T, EtcdError>, Retry> {
    if bytes.starts_with(b"Client sent an HTTP request to an HTTPS server") {
        return Err(Retry(
            "etcd speaks TLS there: use https:// in --etcd (and --etcd-cacert with the CA \
             that signed etcd's certificate)"
                .into(),
        ));
    }
    if bytes.starts_with(b"CommonName of client sending a request against gateway") {
        // etcd >= 3.4.10 (CVE-2020-15136): 400 for any client certificate with a CN.
        return Ok(Err(EtcdError::Refused(
            "etcd refuses JSON-gateway calls made with a client certificate that has a \
             CommonName: issue --etcd-cert without a CN (e.g. -subj /O=rollcall); the etcd \
             user comes from --etcd-user"
                .into(),
        )));
    }
    if !ok || (!streamed && bytes.starts_with(b"{\"error\"")) {
        let e: GatewayError = serde_json::from_slice(bytes).unwrap_or_default();
        return classify(e).map(Err);
    }
    if streamed {
        let line = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
        let s: Streamed<T> =
            serde_json::from_slice(line).map_err(|e| Retry(format!("undecodable answer: {e}")))?;
        if let Some(e) = s.error {
            return classify(e).map(Err);
        }
        return s
            .result
            .map(Ok)
            .ok_or_else(|| Retry("empty streamed answer".into()));
    }
    serde_json::from_slice(bytes)
        .map(Ok)
        .map_err(|e| Retry(format!("undecodable answer: {e}")))
}

fn classify(e: GatewayError) -> Result<EtcdError, Retry> {
    match e.code {
        CODE_OUT_OF_RANGE if e.message.contains("compacted") => Ok(EtcdError::Compacted),
        CODE_NOT_FOUND if e.message.contains("lease") => Ok(EtcdError::LeaseNotFound),
        CODE_PERMISSION_DENIED => Ok(EtcdError::Refused(format!(
            "{}: the role of --etcd-user must grant readwrite on the keys under --etcd-prefix \
             (see the README, etcd mode: users and TLS)",
            e.message
        ))),
        CODE_UNAVAILABLE | CODE_DEADLINE | 0 => Err(Retry(format!("etcd: {}", e.message))),
        _ if e.message.contains("no leader") || e.message.contains("timed out") => {
            Err(Retry(format!("etcd: {}", e.message)))
        }
        _ => Ok(EtcdError::Refused(e.message)),
    }
}

/// An open watch: newline-delimited `{"result": WatchResponse}` lines.
pub struct WatchStream {
    resp: reqwest::Response,
    buf: Vec<u8>,
    max: usize,
    /// The token the watch was opened with, dropped if etcd refuses it (the next watch
    /// authenticates again).
    token: Option<(TokenSlot, String)>,
}

impl WatchStream {
    /// The next watch response; `Err` when the stream broke (resume from the last applied
    /// revision + 1).
    pub async fn next(&mut self) -> Result<WatchResponse, EtcdError> {
        loop {
            if let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                let s: Streamed<WatchResponse> = serde_json::from_slice(&line).map_err(|e| {
                    EtcdError::Unavailable(format!("undecodable watch response: {e}"))
                })?;
                if let Some(e) = s.error {
                    if let Some((slot, t)) = &self.token {
                        if is_auth_error(e.code, &e.message) {
                            drop_token(slot, t);
                        }
                    }
                    return Err(EtcdError::Unavailable(format!("watch: {}", e.message)));
                }
                if let Some(r) = s.result {
                    if r.canceled && is_auth_error(0, &r.cancel_reason) {
                        // Opened with a token etcd no longer knows: not a cancel of the
                        // watch itself; the next watch authenticates again and resumes.
                        if let Some((slot, t)) = &self.token {
                            drop_token(slot, t);
                        }
                        return Err(EtcdError::Unavailable(format!(
                            "watch: {}",
                            r.cancel_reason
                        )));
                    }
                    return Ok(r);
                }
                continue;
            }
            match self.resp.chunk().await {
                Ok(Some(c)) => {
                    if self.buf.len() + c.len() > self.max {
                        return Err(EtcdError::TooLarge(self.max));
                    }
                    self.buf.extend_from_slice(&c);
                }
                Ok(None) => return Err(EtcdError::Unavailable("the watch stream ended".into())),
                Err(e) => {
                    return Err(EtcdError::Unavailable(format!(
                        "the watch stream broke: {}",
                        crate::etcd::chain(&e)
                    )))
                }
            }
        }
    }
}

/// Shared by the owner's tasks.
pub type SharedClient = Arc<Client>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_tokens_are_told_apart_from_other_errors() {
        let unary = br#"{"error":"etcdserver: invalid auth token","message":"etcdserver: invalid auth token","code":16}"#;
        assert!(auth_refused(unary));
        let stream = br#"{"error":{"grpc_code":16,"http_code":401,"message":"etcdserver: invalid auth token"}}"#;
        assert!(auth_refused(stream));
        let denied = br#"{"error":"etcdserver: permission denied","message":"etcdserver: permission denied","code":7}"#;
        assert!(!auth_refused(denied));
        assert!(!auth_refused(br#"{"header":{"revision":"3"}}"#));
        assert!(is_auth_error(
            0,
            "rpc error: code = Unauthenticated desc = etcdserver: invalid auth token"
        ));
        assert!(!is_auth_error(
            3,
            "etcdserver: authentication failed, invalid user ID or password"
        ));
        let e = decode::<Value>(denied, false, false)
            .ok()
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("--etcd-prefix"), "{e}");
    }

    #[test]
    fn the_password_stays_out_of_debug_output() {
        let a = Access {
            tls: None,
            user: Some(("rollcall".into(), "s3cret".into())),
        };
        let s = format!("{a:?}");
        assert!(s.contains("rollcall") && !s.contains("s3cret"), "{s}");
    }
}
