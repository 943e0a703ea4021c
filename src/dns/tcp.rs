//! DNS over TCP: one tokio task per connection, messages answered in order, an idle timeout and
//! a cap on concurrent connections. Same query path as UDP, without a size limit below 64 KiB.

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
pub const MAX_CONNECTIONS: usize = 1024;

pub async fn serve(
    listener: TcpListener,
    snapshots: Arc<ArcSwap<Snapshot>>,
    allow: Arc<[ipnet::IpNet]>,
    stats: Arc<DnsStats>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "dns tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if !allow.is_empty() && !super::udp::allowed(&allow, peer.ip()) {
            tracing::debug!(%peer, "dns tcp client outside --allow-query, closing");
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many dns tcp connections, closing");
            continue;
        };
        let snapshots = snapshots.clone();
        let shutdown = shutdown.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = connection(stream, &snapshots, &stats) => {}
            }
            drop(permit);
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    snapshots: &ArcSwap<Snapshot>,
    stats: &DnsStats,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 512];
    let mut out = Vec::with_capacity(4096);
    let mut framed = Vec::with_capacity(4096 + 2);
    let mut rotation = rand::random::<u32>();
    loop {
        let len = match tokio::time::timeout(IDLE_TIMEOUT, stream.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            _ => return Ok(()),
        };
        if buf.len() < len {
            buf.resize(len, 0);
        }
        tokio::time::timeout(IDLE_TIMEOUT, stream.read_exact(&mut buf[..len]))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        let outcome = answer(
            &snapshots.load(),
            &buf[..len],
            &mut out,
            Transport::Tcp,
            &mut rotation,
        );
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
            stream.write_all(&framed).await?;
        }
    }
}
