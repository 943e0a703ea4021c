//! One upstream resolver: its health (up/down, smoothed answer time, loop state), its counters,
//! and one query to it ([`Upstream::fetch`]).
//!
//! Every query has a fresh socket (random source port), a random ID and a question whose
//! letter case is randomised (0x20): a reply is taken only when its ID, question and case
//! match, so a forger must guess the port, the ID and the case of every letter. An upstream
//! that does not keep the case is asked again without it at once and from then on (logged
//! once). A truncated UDP reply is fetched again over TCP.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::cache::{Bad, Entry};

/// The payload size asked of upstreams.
const EDNS_SIZE: u16 = 1232;
/// Timeouts in a row that mark an upstream down.
const DOWN_AFTER: u32 = 2;

/// Counters of one upstream.
#[derive(Default)]
pub struct UpstreamStats {
    pub noerror: AtomicU64,
    pub nxdomain: AtomicU64,
    pub servfail: AtomicU64,
    pub refused: AtomicU64,
    pub other: AtomicU64,
    pub timeouts: AtomicU64,
    pub micros: AtomicU64,
    pub answers: AtomicU64,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub up: AtomicBool,
    /// This server's own address: disabled for good.
    pub ourselves: bool,
    /// Milliseconds (since the forwarder started) until which the upstream counts as a loop;
    /// 0: not a loop.
    looped_until: AtomicU64,
    fails: AtomicU32,
    /// Smoothed answer time, microseconds.
    pub srtt: AtomicU64,
    /// Whether the upstream keeps the letter case of questions (0x20).
    caps: AtomicBool,
    pub stats: UpstreamStats,
}

/// What a query sent upstream asks: the question in lower case (wire name, type, class) and
/// the DO and CD bits.
pub struct Ask<'a> {
    pub question: &'a [u8],
    pub dnssec_ok: bool,
    pub checking_disabled: bool,
}

impl Upstream {
    pub fn new(addr: SocketAddr, ourselves: bool) -> Upstream {
        Upstream {
            addr,
            up: AtomicBool::new(true),
            ourselves,
            looped_until: AtomicU64::new(0),
            fails: AtomicU32::new(0),
            srtt: AtomicU64::new(0),
            caps: AtomicBool::new(true),
            stats: UpstreamStats::default(),
        }
    }

    /// Whether queries may go to this upstream now (`now_ms`: since the forwarder started).
    pub fn usable(&self, now_ms: u64) -> bool {
        !self.ourselves && self.looped_until.load(Relaxed) <= now_ms
    }

    /// Marks the upstream a loop until `until_ms`; true when it was not one already.
    pub fn set_looped(&self, until_ms: u64, now_ms: u64) -> bool {
        self.looped_until.swap(until_ms, Relaxed) <= now_ms
    }

    /// Records a try's result; true when the upstream just came back up or went down (both
    /// are moments to look for a loop again).
    pub fn mark(&self, answered: bool) -> bool {
        if answered {
            self.fails.store(0, Relaxed);
            if !self.up.swap(true, Relaxed) {
                tracing::info!(upstream = %self.addr, "upstream answers again: forwarding to it");
                return true;
            }
        } else if self.fails.fetch_add(1, Relaxed) + 1 >= DOWN_AFTER && self.up.swap(false, Relaxed)
        {
            tracing::warn!(upstream = %self.addr, "upstream does not answer: marked down, probed every 500 ms");
            return true;
        }
        false
    }

    /// Counts an answer that took `took`.
    pub fn answered(&self, took: Duration, rcode: u8) {
        let took = took.as_micros() as u64;
        self.stats.micros.fetch_add(took, Relaxed);
        self.stats.answers.fetch_add(1, Relaxed);
        let old = self.srtt.load(Relaxed);
        self.srtt
            .store(if old == 0 { took } else { (old * 7 + took) / 8 }, Relaxed);
        let counter = match rcode {
            0 => &self.stats.noerror,
            3 => &self.stats.nxdomain,
            2 => &self.stats.servfail,
            5 => &self.stats.refused,
            _ => &self.stats.other,
        };
        counter.fetch_add(1, Relaxed);
    }

    /// One query to this upstream, over UDP then TCP if truncated, before `deadline`. None: no
    /// usable reply in time.
    pub async fn fetch(&self, ask: &Ask<'_>, deadline: Instant) -> Option<Entry> {
        for _ in 0..2 {
            let caps = self.caps.load(Relaxed);
            let id: u16 = rand::random();
            let (bytes, sent) = query_bytes(ask, id, caps);
            let got = tokio::time::timeout_at(deadline, async {
                match udp(self.addr, &bytes, id, &sent, ask.question).await {
                    Err(Bad::Truncated) => tcp(self.addr, &bytes, id, &sent, ask.question).await,
                    r => r,
                }
            })
            .await
            .ok()?;
            match got {
                Ok(e) => return Some(e),
                Err(Bad::CaseDiffers) if caps => {
                    if self.caps.swap(false, Relaxed) {
                        tracing::warn!(upstream = %self.addr, "upstream does not keep the letter case of questions: asking it without 0x20 randomisation from now on");
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }
}

/// The query sent upstream, and its question as sent (letter case randomised when `caps`).
fn query_bytes(ask: &Ask<'_>, id: u16, caps: bool) -> (Vec<u8>, Vec<u8>) {
    let mut sent = ask.question.to_vec();
    if caps {
        let name_end = sent.len() - 4;
        let mut bits = rand::random::<u64>();
        let mut used = 0;
        let mut at = 0;
        while at < name_end && sent[at] != 0 {
            let len = usize::from(sent[at]);
            for b in &mut sent[at + 1..(at + 1 + len).min(name_end)] {
                if b.is_ascii_alphabetic() {
                    if bits & 1 == 1 {
                        *b = b.to_ascii_uppercase();
                    }
                    bits >>= 1;
                    used += 1;
                    if used == 64 {
                        bits = rand::random();
                        used = 0;
                    }
                }
            }
            at += 1 + len;
        }
    }
    let mut q = Vec::with_capacity(12 + sent.len() + 11);
    q.extend_from_slice(&id.to_be_bytes());
    q.push(0x01); // RD
    q.push(if ask.checking_disabled { 0x10 } else { 0 });
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]);
    q.extend_from_slice(&sent);
    q.extend_from_slice(&[0, 0, 41]);
    q.extend_from_slice(&EDNS_SIZE.to_be_bytes());
    q.extend_from_slice(&[0, 0, if ask.dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
    (q, sent)
}

async fn udp(
    up: SocketAddr,
    bytes: &[u8],
    id: u16,
    sent: &[u8],
    lower: &[u8],
) -> Result<Entry, Bad> {
    let bind: SocketAddr = if up.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|_| Bad::NotOurs)?;
    sock.connect(up).await.map_err(|_| Bad::NotOurs)?;
    sock.send(bytes).await.map_err(|_| Bad::NotOurs)?;
    let mut buf = vec![0u8; 65535];
    loop {
        // A refused port (ICMP) ends the try at once (as no answer); anything not ours is
        // ignored and the wait goes on.
        let n = match sock.recv(&mut buf).await {
            Ok(n) => n,
            Err(_) => return Err(Bad::Malformed),
        };
        match Entry::from_upstream(&buf[..n], id, sent, lower) {
            Err(Bad::NotOurs) | Err(Bad::Malformed) => continue,
            r => return r,
        }
    }
}

async fn tcp(
    up: SocketAddr,
    bytes: &[u8],
    id: u16,
    sent: &[u8],
    lower: &[u8],
) -> Result<Entry, Bad> {
    let mut s = tokio::net::TcpStream::connect(up)
        .await
        .map_err(|_| Bad::Malformed)?;
    let _ = s.set_nodelay(true);
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    s.write_all(&framed).await.map_err(|_| Bad::Malformed)?;
    let len = s.read_u16().await.map_err(|_| Bad::Malformed)?;
    let mut buf = vec![0u8; usize::from(len)];
    s.read_exact(&mut buf).await.map_err(|_| Bad::Malformed)?;
    match Entry::from_upstream(&buf, id, sent, lower) {
        Err(Bad::Truncated) => Err(Bad::Malformed),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_go_out_with_random_case_and_come_back_only_with_it() {
        let lower = b"\x0bexampleabcd\x04test\x00\x00\x01\x00\x01";
        let ask = Ask {
            question: lower,
            dnssec_ok: false,
            checking_disabled: false,
        };
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let (q, sent) = query_bytes(&ask, 7, true);
            assert!(sent.eq_ignore_ascii_case(lower));
            assert_eq!(&q[12..12 + sent.len()], &sent[..]);
            seen.insert(sent);
        }
        assert!(
            seen.len() > 10,
            "the case varies from query to query: {}",
            seen.len()
        );
        let (_, plain) = query_bytes(&ask, 7, false);
        assert_eq!(&plain[..], &lower[..]);
    }
}
