//! UDP: one socket per thread, all bound to the same address with `SO_REUSEPORT`, each served
//! by a blocking loop on its own OS thread: receive a batch (`recvmmsg`), answer each datagram
//! from the snapshot, send the batch (`sendmmsg`). No task spawn, no channel, no allocation per
//! datagram: the buffers live as long as the thread.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio_util::sync::CancellationToken;

use super::policy::{NotOurs, Policy};
use super::rrl::Verdict;
use super::snapshot::Snapshot;
use super::wire::{answer, refuse, Outcome, Transport, RCODE_REFUSED};

use super::stats::DnsStats;
use std::net::IpAddr;

/// Datagrams per `recvmmsg`/`sendmmsg` call.
pub const BATCH: usize = 32;
/// Largest datagram read; longer ones are truncated by the kernel and answered FORMERR or not.
const MAX_DATAGRAM: usize = 4096;

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
    policy: Arc<Policy>,
    stats: Arc<DnsStats>,
    shutdown: CancellationToken,
) -> Vec<std::thread::JoinHandle<()>> {
    sockets
        .into_iter()
        .enumerate()
        .map(|(i, socket)| {
            let snapshots = snapshots.clone();
            let shutdown = shutdown.clone();
            let policy = policy.clone();
            let counters = stats.udp_thread();
            // Forwarded answers leave from the same address and port the query came to.
            let reply_socket = policy
                .forward
                .as_ref()
                .and_then(|_| socket.try_clone().ok())
                .map(Arc::new);
            std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || {
                    let mut cache = arc_swap::Cache::new(&*snapshots);
                    let mut rotation = 0u32;
                    let mut key = Vec::with_capacity(264);
                    serve_batched(&socket, &shutdown, |query, source, out| {
                        let ip = source_ip(source);
                        let client = policy.client(ip);
                        let outcome = if !client.may_query {
                            refuse(query, out)
                        } else {
                            answer(cache.load(), query, out, Transport::Udp, &mut rotation)
                        };
                        let (rcode, truncated, qtype) = match outcome {
                            Outcome::Answered {
                                rcode,
                                truncated,
                                qtype,
                            } => (rcode, truncated, qtype),
                            Outcome::Drop => {
                                counters.dropped();
                                return false;
                            }
                            Outcome::NotOurs { qtype } => match policy.not_ours(client) {
                                NotOurs::Refuse => (RCODE_REFUSED, false, qtype),
                                NotOurs::Forward(f) => {
                                    if let Some(truncated) =
                                        f.answer_cached(query, out, &mut key, Transport::Udp)
                                    {
                                        (out[3] & 0x0f, truncated, qtype)
                                    } else {
                                        let (Some(to), Some(socket), Some(client_ip)) =
                                            (source_addr(source), &reply_socket, ip)
                                        else {
                                            return false;
                                        };
                                        let job = super::forward::Job {
                                            query: query.to_vec(),
                                            client: client_ip,
                                            reply: super::forward::Reply::Udp {
                                                socket: socket.clone(),
                                                to,
                                            },
                                        };
                                        if f.submit(job).is_ok() {
                                            return false; // the forwarder answers
                                        }
                                        // Too many queued: a fast SERVFAIL.
                                        super::wire::set_rcode(out, 2);
                                        (2, false, qtype)
                                    }
                                }
                            },
                        };
                        // Every response sent from here passes the rate limit.
                        match ip.map(|ip| policy.rate_limit.check(ip)) {
                            Some(Verdict::Drop) => {
                                counters.rate_limited();
                                false
                            }
                            Some(Verdict::Slip) => {
                                super::wire::slip(out);
                                policy.finish(client, out);
                                counters.rate_limited();
                                counters.answered(qtype, rcode, true);
                                true
                            }
                            _ => {
                                policy.finish(client, out);
                                counters.answered(qtype, rcode, truncated);
                                true
                            }
                        }
                    })
                })
                .expect("spawning a thread")
        })
        .collect()
}

/// Receives datagrams in batches, calls `respond(query, source, out)` for each (true: send `out` back
/// to the sender) and sends the responses in one batch. Returns when `shutdown` fires.
///
/// Also used by the benchmark suite's null responder, so that both pay the same syscalls.
pub fn serve_batched(
    socket: &UdpSocket,
    shutdown: &CancellationToken,
    mut respond: impl FnMut(&[u8], &libc::sockaddr_storage, &mut Vec<u8>) -> bool,
) {
    let fd = socket.as_raw_fd();
    let mut bufs = vec![[0u8; MAX_DATAGRAM]; BATCH];
    let mut outs: Vec<Vec<u8>> = (0..BATCH)
        .map(|_| Vec::with_capacity(MAX_DATAGRAM))
        .collect();
    // SAFETY (all blocks below): the arrays are sized BATCH, every pointer placed in a header
    // points into `bufs`, `outs` or `addrs`, which outlive the calls and are not moved or
    // resized while the kernel holds the pointers (only during recvmmsg/sendmmsg).
    let mut addrs: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut rx_iov: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: MAX_DATAGRAM,
        })
        .collect();
    let mut rx: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut tx_iov: Vec<libc::iovec> = vec![
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0
        };
        BATCH
    ];
    let mut tx: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let addr_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;

    // Every receive header points at its own buffer and address slot for good; after a
    // receive only the headers the kernel filled are reset (it writes their name length, flags
    // and length), so a batch of one costs one reset, not BATCH.
    for i in 0..BATCH {
        rx[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
        rx[i].msg_hdr.msg_namelen = addr_len;
        rx[i].msg_hdr.msg_iov = &mut rx_iov[i];
        rx[i].msg_hdr.msg_iovlen = 1;
        rx[i].msg_len = 0;
    }
    let mut filled = 0;
    while !shutdown.is_cancelled() {
        for h in &mut rx[..filled] {
            h.msg_hdr.msg_namelen = addr_len;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        filled = 0;
        let n = unsafe {
            libc::recvmmsg(
                fd,
                rx.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            let e = io::Error::last_os_error();
            if !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
            ) {
                tracing::debug!(error = %e, "udp receive failed");
            }
            continue;
        }
        filled = n as usize;
        let mut count = 0;
        for i in 0..n as usize {
            let len = (rx[i].msg_len as usize).min(MAX_DATAGRAM);
            if rx[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || source_port(&addrs[i]) == 0 {
                continue;
            }
            let (query, out) = (&bufs[i][..len], &mut outs[count]);
            if !respond(query, &addrs[i], out) {
                continue;
            }
            tx_iov[count] = libc::iovec {
                iov_base: out.as_mut_ptr().cast(),
                iov_len: out.len(),
            };
            tx[count].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
            tx[count].msg_hdr.msg_namelen = rx[i].msg_hdr.msg_namelen;
            tx[count].msg_hdr.msg_iov = &mut tx_iov[count];
            tx[count].msg_hdr.msg_iovlen = 1;
            count += 1;
        }
        let mut sent = 0;
        while sent < count {
            let r =
                unsafe { libc::sendmmsg(fd, tx[sent..].as_mut_ptr(), (count - sent) as u32, 0) };
            if r <= 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // A send error concerns one peer (e.g. unreachable): skip it, send the rest.
                sent += 1;
                continue;
            }
            sent += r as usize;
        }
    }
}

fn source_port(addr: &libc::sockaddr_storage) -> u16 {
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            u16::from_be(sin.sin_port)
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6 =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            u16::from_be(sin6.sin6_port)
        }
        _ => 0,
    }
}

fn source_addr(addr: &libc::sockaddr_storage) -> Option<SocketAddr> {
    source_ip(addr).map(|ip| SocketAddr::new(ip, source_port(addr)))
}

fn source_ip(addr: &libc::sockaddr_storage) -> Option<IpAddr> {
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(IpAddr::from(
                u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6 =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(IpAddr::from(sin6.sin6_addr.s6_addr))
        }
        _ => None,
    }
}
