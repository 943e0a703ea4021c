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
}

#[derive(Debug, Default, Deserialize)]
pub struct DeleteResponse {
    #[serde(default, deserialize_with = "i64s")]
    pub deleted: i64,
    #[serde(default)]
    pub prev_kvs: Vec<Kv>,
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
    #[serde(default)]
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
pub const OPS: [&str; 8] = [
    "range",
    "txn",
    "grant",
    "keepalive",
    "revoke",
    "leases",
    "watch",
    "status",
];

/// Calls in flight at most (each holds an HTTP connection to etcd): a burst of renewals
/// (50,000 sessions pinging) queues here instead of opening a connection per renewal.
pub const MAX_INFLIGHT: usize = 64;

pub struct Client {
    http: reqwest::Client,
    inflight: tokio::sync::Semaphore,
    endpoints: Vec<String>,
    current: AtomicUsize,
    timeout: Duration,
    pub stats: [OpStats; OPS.len()],
}

fn op_index(op: &str) -> usize {
    OPS.iter().position(|o| *o == op).unwrap_or(0)
}

impl Client {
    /// `endpoints` are base URLs (`http://127.0.0.1:2379`); `timeout` bounds every call.
    pub fn new(endpoints: Vec<String>, timeout: Duration, dial: Duration) -> Client {
        let http = reqwest::Client::builder()
            .connect_timeout(dial)
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .no_proxy()
            .build()
            .expect("an HTTP client with default TLS settings");
        Client {
            http,
            inflight: tokio::sync::Semaphore::new(MAX_INFLIGHT),
            endpoints,
            current: AtomicUsize::new(0),
            timeout,
            stats: Default::default(),
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
            let sent = self
                .http
                .post(&url)
                .header("Grpc-Metadata-hasleader", "true")
                .json(body)
                .timeout(per_try)
                .send()
                .await;
            let outcome = match sent {
                Ok(resp) => {
                    let status = resp.status();
                    match resp.bytes().await {
                        Ok(bytes) => decode::<T>(&bytes, status.is_success(), streamed),
                        Err(e) => Err(Retry(format!("{url}: {e}"))),
                    }
                }
                Err(e) => Err(Retry(format!("{url}: {}", crate::etcd::chain(&e)))),
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

    pub async fn txn(&self, body: &Value) -> Result<TxnResponse, EtcdError> {
        self.call("txn", "/v3/kv/txn", body, false).await
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
        let body = json!({ "create_request": {
            "key": b64(key), "range_end": b64(end),
            "start_revision": start_revision.to_string(),
        }});
        let resp = self
            .http
            .post(format!("{base}/v3/watch"))
            .header("Grpc-Metadata-hasleader", "true")
            .json(&body)
            .send();
        let resp = tokio::time::timeout(self.timeout, resp).await;
        let resp = match resp {
            Ok(Ok(r)) if r.status().is_success() => r,
            Ok(Ok(r)) => {
                self.record("watch", start, false);
                return Err(EtcdError::Unavailable(format!(
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
                return Err(EtcdError::Unavailable(format!("{base}: watch: no answer")));
            }
        };
        self.record("watch", start, true);
        Ok(WatchStream {
            resp,
            buf: Vec::new(),
        })
    }
}

/// "Try the next member" (transport trouble, no leader).
struct Retry(String);

fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    ok: bool,
    streamed: bool,
) -> Result<Result<T, EtcdError>, Retry> {
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
                    return Err(EtcdError::Unavailable(format!("watch: {}", e.message)));
                }
                if let Some(r) = s.result {
                    return Ok(r);
                }
                continue;
            }
            match self.resp.chunk().await {
                Ok(Some(c)) => {
                    if self.buf.len() + c.len() > 64 << 20 {
                        return Err(EtcdError::Unavailable(
                            "a watch response over 64 MiB".into(),
                        ));
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
