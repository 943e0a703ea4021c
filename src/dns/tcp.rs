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

use super::snapshot::Snapshot;
use super::wire::{answer, Outcome, Transport};
use crate::metrics::DnsStats;

pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle timeout once three quarters of the slots are taken.
pub const BUSY_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// Time a client has to take an answer off our hands.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_CONNECTIONS: usize = 1024;

pub async fn serve(
    listener: TcpListener,
    snapshots: Arc<ArcSwap<Snapshot>>,
    allow: Arc<[ipnet::IpNet]>,
    forward: Option<Arc<super::forward::Forwarder>>,
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
        let refused = !allow.is_empty() && !super::udp::allowed(&allow, peer.ip());
        // Forwarding for this client, if it may recurse.
        let forward = forward.clone().filter(|f| f.allowed(peer.ip()));
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many dns tcp connections, closing");
            continue;
        };
        let snapshots = snapshots.clone();
        let shutdown = shutdown.clone();
        let stats = stats.clone();
        let permits = permits.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = connection(stream, &snapshots, &stats, &permits, refused, forward.as_deref()) => {}
            }
            drop(permit);
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    snapshots: &ArcSwap<Snapshot>,
    stats: &DnsStats,
    permits: &Semaphore,
    refused: bool,
    forward: Option<&super::forward::Forwarder>,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 512];
    let mut out = Vec::with_capacity(4096);
    let mut framed = Vec::with_capacity(4096 + 2);
    let mut rotation = rand::random::<u32>();
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
        let outcome = if refused {
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
        let outcome = match (outcome, forward) {
            (Outcome::NotOurs { qtype }, Some(f)) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let job = super::forward::Job {
                    query: buf[..len].to_vec(),
                    reply: super::forward::Reply::Tcp(tx),
                };
                let rcode = match f.submit(job) {
                    Ok(()) => match rx.await {
                        Ok(answer) => {
                            out.clear();
                            out.extend_from_slice(&answer);
                            out.get(3).map_or(2, |b| b & 0x0f)
                        }
                        Err(_) => {
                            super::wire::set_rcode(&mut out, 2);
                            2
                        }
                    },
                    Err(_) => {
                        super::wire::set_rcode(&mut out, 2);
                        2
                    }
                };
                if out.len() > 3 {
                    out[3] |= 0x80;
                }
                Outcome::Answered {
                    rcode,
                    truncated: false,
                    qtype,
                }
            }
            (Outcome::NotOurs { qtype }, None) => Outcome::Answered {
                rcode: super::wire::RCODE_REFUSED,
                truncated: false,
                qtype,
            },
            (o, _) => o,
        };
        if let Outcome::Answered {
            rcode,
            truncated,
            qtype,
        } = outcome
        {
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
