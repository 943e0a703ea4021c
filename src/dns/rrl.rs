//! Response rate limiting for UDP, in NSD's style: responses are counted per source prefix
//! (/24 for IPv4, /56 for IPv6) per second; beyond the limit, every `slip`-th response goes out
//! truncated (TC, no records: a real resolver retries over TCP, which a spoofed source cannot)
//! and the rest are dropped. A forged-source flood then gets at most `limit` full answers a
//! second out of the server per victim prefix, and rollcall stops being an amplifier.
//!
//! One table shared by every UDP thread: a fixed array of atomic buckets (second, count),
//! indexed by a hash of the prefix, so the query path takes no lock and allocates nothing.
//! Sources in `exempt` are not counted. By default that is loopback and the private networks
//! of interfaces without a default route ([`super::acl::trusted_local_networks`]): the
//! cluster's own clients (a compose stack's nginx resolvers share one /24) are never held back,
//! while a source on the network the world comes in through is.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use super::acl::Acl;

const BUCKETS: usize = 1 << 16;

/// Settings (`--rate-limit`, `--rate-limit-slip`, `--rate-limit-exempt`).
#[derive(Clone, Debug)]
pub struct RateLimitConfig {
    /// Responses per second per prefix; 0 turns rate limiting off.
    pub limit: u32,
    /// Every `slip`-th response over the limit is sent truncated; 0 drops them all.
    pub slip: u32,
    pub exempt: Acl,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            limit: 200,
            slip: 2,
            exempt: Acl::only(super::acl::trusted_local_networks()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Send,
    /// Send a truncated response instead.
    Slip,
    Drop,
}

pub struct RateLimit {
    config: RateLimitConfig,
    /// (second << 32) | responses counted in that second.
    buckets: Box<[AtomicU64]>,
}

impl RateLimit {
    pub fn new(config: RateLimitConfig) -> RateLimit {
        let buckets = if config.limit == 0 {
            Box::default()
        } else {
            (0..BUCKETS).map(|_| AtomicU64::new(0)).collect()
        };
        RateLimit { config, buckets }
    }

    /// Whether a response to `source` may go out now (counting it).
    pub fn check(&self, source: IpAddr) -> Verdict {
        if self.config.limit == 0 || self.config.exempt.allows(source) {
            return Verdict::Send;
        }
        let prefix: u64 = match source {
            IpAddr::V4(v4) => u64::from(u32::from(v4) >> 8),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => u64::from(u32::from(v4) >> 8),
                None => (u128::from(v6) >> 72) as u64 | 1 << 63,
            },
        };
        // Fibonacci hashing: the top bits of the product spread neighbouring prefixes.
        let at = (prefix.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48) as usize % self.buckets.len();
        let bucket = &self.buckets[at];
        let now = coarse_secs();
        let mut cur = bucket.load(Ordering::Relaxed);
        let count = loop {
            let next = if (cur >> 32) as u32 == now {
                cur + 1
            } else {
                u64::from(now) << 32 | 1
            };
            match bucket.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break (next & 0xffff_ffff) as u32,
                Err(v) => cur = v,
            }
        };
        if count <= self.config.limit {
            return Verdict::Send;
        }
        let over = count - self.config.limit;
        if self.config.slip > 0 && over.is_multiple_of(self.config.slip) {
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }
}

/// Seconds on the coarse monotonic clock (a vDSO read, no syscall).
fn coarse_secs() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_prefix_with_slip_and_exempts_loopback() {
        let rl = RateLimit::new(RateLimitConfig {
            limit: 10,
            slip: 2,
            exempt: Acl::only(vec!["127.0.0.0/8".parse().unwrap()]),
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let same_prefix: IpAddr = "192.0.2.200".parse().unwrap();
        let other: IpAddr = "198.51.100.1".parse().unwrap();
        let verdicts: Vec<Verdict> = (0..30)
            .map(|i| rl.check(if i % 2 == 0 { a } else { same_prefix }))
            .collect();
        // Unless the second turned over mid-test, 10 go out, then slip / drop alternate.
        if verdicts.iter().filter(|v| **v == Verdict::Send).count() == 10 {
            assert!(verdicts[..10].iter().all(|v| *v == Verdict::Send));
            assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Slip).count(), 10);
            assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Drop).count(), 10);
        }
        assert_eq!(rl.check(other), Verdict::Send);
        for _ in 0..100 {
            assert_eq!(rl.check("127.0.0.1".parse().unwrap()), Verdict::Send);
        }
        let off = RateLimit::new(RateLimitConfig {
            limit: 0,
            ..RateLimitConfig::default()
        });
        for _ in 0..100 {
            assert_eq!(off.check(a), Verdict::Send);
        }
    }
}
