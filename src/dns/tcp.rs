//! DNS over TCP: one tokio task per connection, messages answered in order, an idle timeout and
//! a cap on concurrent connections. Same query path as UDP, without a size limit below 64 KiB.
//!
//! Nobody holds a slot for free: reads and writes each have a deadline (a client that never
//! reads its answers loses its slot), the idle timeout drops to 1 s once three quarters of the
//! slots are taken (NSD does the same), a zero-length message ends the connection, and clients
//! outside `--allow-query` get REFUSED like over UDP.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use std::net::IpAddr;

use super::forward::Forwarder;
use super::policy::{Client, NotOurs, Policy};
use super::snapshot::Snapshot;
use super::stats::DnsStats;
use super::wire::{answer, Outcome, Transport};

pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle timeout once three quarters of the slots are taken.
pub const BUSY_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// Time a client has to take an answer off our hands.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_CONNECTIONS: usize = 1024;

pub async fn serve(
    listener: TcpListener,
    snapshots: Arc<ArcSwap<Snapshot>>,
    policy: Arc<Policy>,
    stats: Arc<DnsStats>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = crate::net::AcceptBackoff::new("dns tcp");
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            },
        };
        backoff.ok();
        let client = policy.client(Some(peer.ip()));
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many dns tcp connections, closing");
            continue;
        };
        let snapshots = snapshots.clone();
        let shutdown = shutdown.clone();
        let stats = stats.clone();
        let permits = permits.clone();
        let policy = policy.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = connection(stream, peer.ip(), &snapshots, &stats, &permits, &policy, client) => {}
            }
            drop(permit);
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    peer: IpAddr,
    snapshots: &ArcSwap<Snapshot>,
    stats: &DnsStats,
    permits: &Semaphore,
    policy: &Policy,
    client: Client,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 512];
    let mut out = Vec::with_capacity(4096);
    let mut framed = Vec::with_capacity(4096 + 2);
    let mut rotation = rand::random::<u32>();
    let mut key = Vec::with_capacity(264);
    loop {
        let idle = if permits.available_permits() < MAX_CONNECTIONS / 4 {
            BUSY_IDLE_TIMEOUT
        } else {
            IDLE_TIMEOUT
        };
        let len = match tokio::time::timeout(idle, stream.read_u16()).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Ok(()),
            Ok(Ok(len)) => usize::from(len),
        };
        if buf.len() < len {
            buf.resize(len, 0);
        }
        tokio::time::timeout(IDLE_TIMEOUT, stream.read_exact(&mut buf[..len]))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        let outcome = if !client.may_query {
            super::wire::refuse(&buf[..len], &mut out)
        } else {
            answer(
                &snapshots.load(),
                &buf[..len],
                &mut out,
                Transport::Tcp,
                &mut rotation,
            )
        };
        let outcome = match outcome {
            Outcome::NotOurs { qtype } => match policy.not_ours(client) {
                NotOurs::Refuse => Outcome::Answered {
                    rcode: super::wire::RCODE_REFUSED,
                    truncated: false,
                    qtype,
                },
                NotOurs::Forward(f) => {
                    let q = &buf[..len];
                    let (rcode, truncated) =
                        match f.answer_cached(q, &mut out, &mut key, Transport::Tcp) {
                            Some(truncated) => (out[3] & 0x0f, truncated),
                            None => (forward(f, q, peer, &mut out).await, false),
                        };
                    Outcome::Answered {
                        rcode,
                        truncated,
                        qtype,
                    }
                }
            },
            o => o,
        };
        if let Outcome::Answered {
            rcode,
            truncated,
            qtype,
        } = outcome
        {
            policy.finish(client, &mut out);
            stats.tcp.answered(qtype, rcode, truncated);
            framed.clear();
            framed.extend_from_slice(&(out.len() as u16).to_be_bytes());
            framed.extend_from_slice(&out);
            tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&framed))
                .await
                .map_err(|_| std::io::ErrorKind::TimedOut)??;
        }
    }
}

/// A query handed to the forwarder; its answer (or SERVFAIL) in `out`. Returns the rcode.
async fn forward(f: &Forwarder, q: &[u8], peer: IpAddr, out: &mut Vec<u8>) -> u8 {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = super::forward::Job {
        query: q.to_vec(),
        client: peer,
        reply: super::forward::Reply::Tcp(tx),
    };
    if f.submit(job).is_ok() {
        if let Ok(answer) = rx.await {
            out.clear();
            out.extend_from_slice(&answer);
            return out.get(3).map_or(2, |b| b & 0x0f);
        }
    }
    super::wire::set_rcode(out, 2);
    2
}
