//! The transport floor for the DNS benchmarks: answers every datagram by flipping the QR bit
//! and sending it straight back, through the very same batched receive/send loop rollcall uses
//! (`rollcall::dns::udp::serve_batched`). It does no DNS work, so its answers per CPU-second are
//! what kernel UDP on loopback costs; rollcall's distance to it is what is left to win.
//!
//! Usage: null_responder ADDR:PORT [THREADS]

use rollcall::dns::udp;
use tokio_util::sync::CancellationToken;

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:15390".into());
    let threads: usize = args
        .next()
        .map(|t| t.parse().expect("THREADS is a number"))
        .unwrap_or(1);
    let addr = addr.parse().expect("ADDR:PORT");
    let sockets = udp::bind(addr, threads).expect("bind");
    eprintln!("null responder on {}", sockets[0].local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let handles: Vec<_> = sockets
        .into_iter()
        .map(|s| {
            let shutdown = shutdown.clone();
            std::thread::spawn(move || {
                udp::serve_batched(&s, &shutdown, |query, _source, out| {
                    out.clear();
                    out.extend_from_slice(query);
                    if let Some(flags) = out.get_mut(2) {
                        *flags |= 0x80;
                    }
                    true
                })
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
}
