//! UDP: one socket per thread, all bound to the same address with `SO_REUSEPORT`, each served
//! by a blocking loop on its own OS thread: receive, answer from the snapshot, send. No task
//! spawn, no channel, no allocation per datagram (the buffers live as long as the thread).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio_util::sync::CancellationToken;

use super::snapshot::Snapshot;
use super::wire::{answer, Outcome, Transport};

/// Binds `count` sockets to `addr` (port 0: the first socket picks, the rest follow).
pub fn bind(addr: SocketAddr, count: usize) -> io::Result<Vec<UdpSocket>> {
    let mut sockets = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count.max(1) {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_port(true)?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        // Absorb bursts rather than drop them; the kernel caps this at net.core.rmem_max.
        let _ = s.set_recv_buffer_size(4 << 20);
        let _ = s.set_send_buffer_size(4 << 20);
        s.bind(&addr.into())?;
        // Wake up now and then to notice shutdown.
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        let s: UdpSocket = s.into();
        addr = s.local_addr()?;
        sockets.push(s);
    }
    Ok(sockets)
}

/// Serves each socket on its own thread until `shutdown` fires.
pub fn spawn(
    sockets: Vec<UdpSocket>,
    snapshots: Arc<ArcSwap<Snapshot>>,
    shutdown: CancellationToken,
) -> Vec<std::thread::JoinHandle<()>> {
    sockets
        .into_iter()
        .enumerate()
        .map(|(i, socket)| {
            let snapshots = snapshots.clone();
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || serve(socket, &snapshots, &shutdown))
                .expect("spawning a thread")
        })
        .collect()
}

fn serve(socket: UdpSocket, snapshots: &ArcSwap<Snapshot>, shutdown: &CancellationToken) {
    let mut cache = arc_swap::Cache::new(snapshots);
    let mut buf = [0u8; 4096];
    let mut out = Vec::with_capacity(4096);
    let mut rotation = 0u32;
    while !shutdown.is_cancelled() {
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::debug!(error = %e, "udp receive failed");
                continue;
            }
        };
        if peer.port() == 0 {
            continue;
        }
        let snap = cache.load();
        if let Outcome::Answered { .. } =
            answer(snap, &buf[..n], &mut out, Transport::Udp, &mut rotation)
        {
            let _ = socket.send_to(&out, peer);
        }
    }
}
