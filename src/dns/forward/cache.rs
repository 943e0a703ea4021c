//! Forwarded answers as wire bytes: one [`Entry`] per answer, shared by every client that asks
//! the same question, and one byte-bounded [`Cache`] of them.
//!
//! An entry is the upstream's reply made neutral (ID 0, RD clear, RA set, AA clear, no OPT, the
//! question in lower case) and checked record by record when it arrives, so serving it is a
//! copy and a few patched bytes: the client's ID, RD bit and letter case, TTLs counted down, an
//! OPT record if the client sent one, or header + question + TC when it is too big for the
//! client's UDP size. The bytes are what the upstream sent, never re-encoded: an answer that
//! fits in 64 KiB from upstream fits for our clients too.
//!
//! The cache is bounded in bytes (`--forward-cache-size`, what each entry really costs:
//! its bytes, key, TTL table and bookkeeping) and in entries (`--forward-cache`); answers over
//! [`MAX_CACHED`] bytes are served but not kept. Oldest stored first out.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::dns::wire::{skip_name, ClientQuery};

const TYPE_SOA: u16 = 6;
const TYPE_OPT: u16 = 41;
/// Positive answers are kept at most this long, negative ones (NXDOMAIN, NODATA) at most
/// [`MAX_NEGATIVE_TTL`], SERVFAIL for [`SERVFAIL_TTL`].
pub(super) const MAX_POSITIVE_TTL: u32 = 3600;
pub(super) const MAX_NEGATIVE_TTL: u32 = 300;
pub(super) const SERVFAIL_TTL: u32 = 1;
/// Answers larger than this are served to the clients that asked but never cached.
pub const MAX_CACHED: usize = 16 * 1024;
/// What an entry costs beyond its bytes, key and TTL table: the `Arc`, the map slot, the order
/// queue slot and the allocator's rounding (measured order of magnitude, not exact).
const ENTRY_OVERHEAD: usize = 160;
/// The payload size rollcall offers its clients in forwarded answers.
const EDNS_SIZE: u16 = 1232;

/// One answer, ready to be served to any client that asked the same question.
pub struct Entry {
    /// ID 0, RD clear, RA set, AA clear, TC clear, no OPT record, question in lower case.
    bytes: Box<[u8]>,
    /// End of the question.
    qend: usize,
    /// Where each record's TTL sits and its value when stored.
    ttls: Box<[(u16, u32)]>,
    stored: Instant,
    /// How long it may be cached (0: not at all).
    pub ttl: u32,
    pub rcode: u8,
}

/// Why an upstream reply was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Bad {
    /// Not the reply to our query (ID, question): ignored, the wait goes on.
    NotOurs,
    /// The question matches but not its letter case (0x20): an upstream that does not keep
    /// case, or a forgery.
    CaseDiffers,
    /// Truncated: ask again over TCP.
    Truncated,
    /// Records that do not parse.
    Malformed,
}

impl Entry {
    /// Checks an upstream reply against the query we sent (`id`, and `question`: the wire
    /// question with the letter case we sent) and makes it an entry. `lower` is the question
    /// in lower case (the cache key's name, type and class).
    pub fn from_upstream(
        reply: &[u8],
        id: u16,
        question: &[u8],
        lower: &[u8],
    ) -> Result<Entry, Bad> {
        if reply.len() < 12 || reply[..2] != id.to_be_bytes() || reply[2] & 0x80 == 0 {
            return Err(Bad::NotOurs);
        }
        let qend = 12 + question.len();
        if reply[4..6] != [0, 1] || reply.get(12..qend).is_none() {
            return Err(Bad::NotOurs);
        }
        let got = &reply[12..qend];
        if got != question {
            return Err(if got.eq_ignore_ascii_case(question) {
                Bad::CaseDiffers
            } else {
                Bad::NotOurs
            });
        }
        if (reply[2] >> 3) & 0x0f != 0 {
            return Err(Bad::Malformed);
        }
        if reply[2] & 0x02 != 0 {
            return Err(Bad::Truncated);
        }
        let count = |i: usize| usize::from(u16::from_be_bytes([reply[i], reply[i + 1]]));
        let (an, ns, ar) = (count(6), count(8), count(10));
        let mut at = qend;
        let mut ttls = Vec::with_capacity(an + ns + ar);
        let mut opt: Option<(usize, usize)> = None;
        let mut min_answer_ttl: Option<u32> = None;
        let mut soa_minimum: Option<u32> = None;
        let mut bytes = reply.to_vec();
        for i in 0..an + ns + ar {
            let start = at;
            at = skip_name(reply, at).ok_or(Bad::Malformed)?;
            let fixed = reply.get(at..at + 10).ok_or(Bad::Malformed)?;
            let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
            let mut ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
            let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
            let end = at + 10 + rdlen;
            if end > reply.len() {
                return Err(Bad::Malformed);
            }
            if rtype == TYPE_OPT {
                if i < an + ns || opt.is_some() {
                    return Err(Bad::Malformed);
                }
                opt = Some((start, end));
                at = end;
                continue;
            }
            if opt.is_some() {
                // OPT is the last record of every reply we know; one in the middle would make
                // cutting it out move names that later records point at.
                return Err(Bad::Malformed);
            }
            // RFC 2181 §8: a TTL with the top bit set means zero.
            if ttl & 0x8000_0000 != 0 {
                ttl = 0;
                bytes[at + 4..at + 8].copy_from_slice(&[0; 4]);
            }
            if i < an {
                min_answer_ttl = Some(min_answer_ttl.map_or(ttl, |m| m.min(ttl)));
            } else if i < an + ns && rtype == TYPE_SOA && rdlen >= 22 && soa_minimum.is_none() {
                let m = &reply[end - 4..end];
                soa_minimum = Some(ttl.min(u32::from_be_bytes([m[0], m[1], m[2], m[3]])));
            }
            ttls.push((u16::try_from(at + 4).map_err(|_| Bad::Malformed)?, ttl));
            at = end;
        }
        // Trailing bytes after the last record are dropped; so is the OPT record (last).
        let end = opt.map_or(at, |(start, _)| start);
        bytes.truncate(end);
        if opt.is_some() {
            bytes[10..12].copy_from_slice(&((ar - 1) as u16).to_be_bytes());
        }
        bytes[..2].copy_from_slice(&[0, 0]);
        bytes[2] = 0x80; // QR; opcode 0; AA, TC, RD clear (RD is the client's, patched in)
        bytes[3] |= 0x80; // RA; AD, CD and the rcode as the upstream said
        bytes[12..qend].copy_from_slice(lower);
        let rcode = reply[3] & 0x0f;
        let ttl = match rcode {
            0 if an > 0 => min_answer_ttl.unwrap_or(0).min(MAX_POSITIVE_TTL),
            0 | 3 => soa_minimum.unwrap_or(0).min(MAX_NEGATIVE_TTL),
            _ => 0,
        };
        Ok(Entry {
            bytes: bytes.into_boxed_slice(),
            qend,
            ttls: ttls.into_boxed_slice(),
            stored: Instant::now(),
            ttl,
            rcode,
        })
    }

    /// An answer with the question and no records (`rcode`: SERVFAIL when no upstream answered,
    /// REFUSED for names never forwarded), kept `ttl` seconds.
    pub fn empty(lower_question: &[u8], rcode: u8, ttl: u32) -> Entry {
        let mut bytes = vec![0, 0, 0x80, 0x80 | rcode, 0, 1, 0, 0, 0, 0, 0, 0];
        bytes.extend_from_slice(lower_question);
        Entry {
            qend: bytes.len(),
            bytes: bytes.into_boxed_slice(),
            ttls: Box::default(),
            stored: Instant::now(),
            ttl,
            rcode,
        }
    }

    /// What keeping this entry costs, in bytes.
    pub fn cost(&self, key_len: usize) -> usize {
        self.bytes.len() + self.ttls.len() * 8 + 2 * key_len + ENTRY_OVERHEAD
    }

    /// The answer's size on the wire (without OPT).
    pub fn wire_len(&self) -> usize {
        self.bytes.len()
    }

    fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.stored) >= Duration::from_secs(self.ttl.into())
    }

    /// This answer for the client's query `q` (parsed as `cq`) into `out`: the client's ID,
    /// RD bit and letter case, TTLs counted down, OPT if the client sent one; header, question
    /// and TC when larger than `limit`. Returns whether it was truncated.
    pub fn write(&self, q: &[u8], cq: &ClientQuery, limit: usize, out: &mut Vec<u8>) -> bool {
        out.clear();
        let opt_len = if cq.edns.is_some() { 11 } else { 0 };
        let truncated = self.bytes.len() + opt_len > limit || cq.qend != self.qend;
        if truncated {
            out.extend_from_slice(&self.bytes[..self.qend]);
            out[2] |= 0x02;
            out[6..12].copy_from_slice(&[0; 6]);
        } else {
            out.extend_from_slice(&self.bytes);
            let age = self.stored.elapsed().as_secs().min(u64::from(u32::MAX)) as u32;
            for &(at, ttl) in self.ttls.iter() {
                let at = usize::from(at);
                out[at..at + 4].copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
            }
        }
        out[..2].copy_from_slice(&q[..2]);
        out[2] |= q[2] & 0x01;
        let qend = self.qend.min(cq.qend);
        out[12..qend].copy_from_slice(&q[12..qend]);
        if cq.edns.is_some() {
            let ar = u16::from_be_bytes([out[10], out[11]]).saturating_add(1);
            out[10..12].copy_from_slice(&ar.to_be_bytes());
            out.extend_from_slice(&[0, 0, 41]);
            out.extend_from_slice(&EDNS_SIZE.to_be_bytes());
            out.extend_from_slice(&[0, 0, if cq.dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
        }
        truncated
    }
}

/// Forwarded answers by question, bounded in bytes and entries; read by the UDP threads (a
/// read lock and an `Arc` clone), written by the forwarder thread.
pub struct Cache {
    store: RwLock<Store>,
    max_bytes: usize,
    max_entries: usize,
}

#[derive(Default)]
struct Store {
    map: HashMap<Arc<[u8]>, (Arc<Entry>, u64)>,
    /// Keys in the order stored, with the sequence number they were stored under (a key
    /// stored again leaves a stale slot here, skipped when it comes up).
    order: VecDeque<(Arc<[u8]>, u64)>,
    seq: u64,
    bytes: usize,
}

/// What the cache holds now (for `/metrics`).
pub struct Usage {
    pub bytes: usize,
    pub entries: usize,
}

impl Cache {
    pub fn new(max_bytes: usize, max_entries: usize) -> Cache {
        Cache {
            store: RwLock::default(),
            max_bytes,
            max_entries,
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_bytes > 0 && self.max_entries > 0
    }

    /// The live entry for `key`, if any.
    pub fn get(&self, key: &[u8]) -> Option<Arc<Entry>> {
        if !self.enabled() {
            return None;
        }
        let store = self.store.read().unwrap_or_else(|p| p.into_inner());
        let (e, _) = store.map.get(key)?;
        (!e.expired(Instant::now())).then(|| e.clone())
    }

    /// Keeps `entry` under `key` when it may be cached and is small enough; evicts the oldest
    /// entries until the cache is within its bounds again.
    pub fn insert(&self, key: &[u8], entry: Arc<Entry>) {
        if !self.enabled() || entry.ttl == 0 || entry.wire_len() > MAX_CACHED {
            return;
        }
        let cost = entry.cost(key.len());
        if cost > self.max_bytes {
            return;
        }
        let key: Arc<[u8]> = key.into();
        let mut store = self.store.write().unwrap_or_else(|p| p.into_inner());
        let store = &mut *store;
        store.seq += 1;
        let seq = store.seq;
        if let Some((old, _)) = store.map.insert(key.clone(), (entry, seq)) {
            store.bytes -= old.cost(key.len());
        }
        store.bytes += cost;
        store.order.push_back((key, seq));
        while store.bytes > self.max_bytes || store.map.len() > self.max_entries {
            let Some((k, s)) = store.order.pop_front() else {
                break;
            };
            if store.map.get(&k).is_some_and(|(_, cur)| *cur == s) {
                if let Some((e, _)) = store.map.remove(&k) {
                    store.bytes -= e.cost(k.len());
                }
            }
        }
        if store.order.len() > 2 * store.map.len() + 64 {
            let Store { map, order, .. } = store;
            order.retain(|(k, s)| map.get(k).is_some_and(|(_, cur)| cur == s));
        }
    }

    pub fn usage(&self) -> Usage {
        let store = self.store.read().unwrap_or_else(|p| p.into_inner());
        Usage {
            bytes: store.bytes,
            entries: store.map.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    fn reply(id: u16, qname: &str, answers: usize, ttl: u32) -> Vec<u8> {
        let name = Name::from_ascii(qname).unwrap();
        let mut m = Message::new(id, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(name.clone(), RecordType::A));
        for i in 0..answers {
            m.add_answer(Record::from_rdata(
                name.clone(),
                ttl,
                RData::A(std::net::Ipv4Addr::from(0x0a00_0000 + i as u32).into()),
            ));
        }
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
        m.to_vec().unwrap()
    }

    fn query(id: u16, qname: &str, edns: bool) -> (Vec<u8>, ClientQuery, Vec<u8>) {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(
            Name::from_ascii(qname).unwrap(),
            RecordType::A,
        ));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(1232);
            m.set_edns(e);
        }
        let q = m.to_vec().unwrap();
        let mut key = Vec::new();
        let cq = crate::dns::wire::client_query(&q, &mut key).unwrap();
        (q, cq, key)
    }

    fn question_of(key: &[u8]) -> &[u8] {
        &key[..key.len() - 1]
    }

    #[test]
    fn entries_keep_the_clients_id_case_and_edns_and_count_ttls_down() {
        let (_, _, key) = query(1, "www.example.test.", false);
        let sent = b"\x03wWw\x07exAmple\x04test\x00\x00\x01\x00\x01";
        let mut r = reply(77, "wWw.exAmple.test.", 2, 60);
        let e = Entry::from_upstream(&r, 77, sent, question_of(&key)).unwrap();
        assert_eq!((e.rcode, e.ttl), (0, 60));
        let (q, cq, _) = query(0x1234, "WWW.Example.TEST.", true);
        let mut out = Vec::new();
        assert!(!e.write(&q, &cq, 1232, &mut out));
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert!(m.metadata.recursion_desired && m.metadata.recursion_available);
        assert!(!m.metadata.authoritative && !m.metadata.truncation);
        assert_eq!(m.queries[0].name().to_ascii(), "WWW.Example.TEST.");
        assert_eq!(m.answers.len(), 2);
        assert!(m.edns.is_some(), "the client sent OPT");
        // Another ID, wrong case, another name: not ours.
        assert_eq!(
            Entry::from_upstream(&r, 78, sent, question_of(&key)).err(),
            Some(Bad::NotOurs)
        );
        let lower = b"\x03www\x07example\x04test\x00\x00\x01\x00\x01";
        assert_eq!(
            Entry::from_upstream(&r, 77, lower, question_of(&key)).err(),
            Some(Bad::CaseDiffers)
        );
        // Truncated replies go to TCP; a record cut short is malformed.
        r[2] |= 0x02;
        assert_eq!(
            Entry::from_upstream(&r, 77, sent, question_of(&key)).err(),
            Some(Bad::Truncated)
        );
        r[2] &= !0x02;
        let cut = &r[..r.len() - 15];
        assert_eq!(
            Entry::from_upstream(cut, 77, sent, question_of(&key)).err(),
            Some(Bad::Malformed)
        );
    }

    #[test]
    fn too_big_for_the_client_is_header_question_and_tc() {
        let (q, cq, key) = query(9, "big.example.test.", false);
        let sent = question_of(&key).to_vec();
        let r = reply(5, "big.example.test.", 200, 60);
        let e = Entry::from_upstream(&r, 5, &sent, &sent).unwrap();
        let mut out = Vec::new();
        assert!(e.write(&q, &cq, 512, &mut out));
        let m = Message::from_vec(&out).unwrap();
        assert!(m.metadata.truncation);
        assert_eq!((m.answers.len(), m.queries.len()), (0, 1));
        // Over TCP, all 200 records as the upstream sent them.
        assert!(!e.write(&q, &cq, 65535, &mut out));
        assert_eq!(Message::from_vec(&out).unwrap().answers.len(), 200);
    }

    #[test]
    fn ttls_with_the_top_bit_set_are_zero_and_never_cached() {
        let (_, _, key) = query(1, "x.test.", false);
        let q = question_of(&key).to_vec();
        let r = reply(3, "x.test.", 1, 0x8000_0005);
        let e = Entry::from_upstream(&r, 3, &q, &q).unwrap();
        assert_eq!(e.ttl, 0);
        let cache = Cache::new(1 << 20, 100);
        cache.insert(&key, Arc::new(e));
        assert!(cache.get(&key).is_none());
    }

    #[test]
    fn the_cache_is_bounded_in_bytes_whatever_the_answers() {
        let cache = Cache::new(64 * 1024, 1_000_000);
        let mut biggest = 0;
        for i in 0..2_000 {
            let name = format!("n{i}.example.test.");
            let (_, _, key) = query(1, &name, false);
            let q = question_of(&key).to_vec();
            let r = reply(3, &name, 1 + i % 100, 60);
            let e = Entry::from_upstream(&r, 3, &q, &q).unwrap();
            cache.insert(&key, Arc::new(e));
            biggest = biggest.max(cache.usage().bytes);
        }
        assert!(biggest <= 64 * 1024, "{biggest} bytes");
        assert!(cache.usage().entries > 10);
        // An answer over MAX_CACHED is never kept.
        let (_, _, key) = query(1, "huge.test.", false);
        let q = question_of(&key).to_vec();
        let e = Entry::from_upstream(&reply(3, "huge.test.", 2_000, 60), 3, &q, &q).unwrap();
        assert!(e.wire_len() > MAX_CACHED);
        cache.insert(&key, Arc::new(e));
        assert!(cache.get(&key).is_none());
        // The most recent small entry is there; the first ones were evicted.
        let (_, _, first) = query(1, "n0.example.test.", false);
        assert!(cache.get(&first).is_none());
        let (_, _, last) = query(1, "n1999.example.test.", false);
        assert!(cache.get(&last).is_some());
    }

    #[test]
    fn negative_answers_are_kept_for_the_soa_minimum() {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.metadata.response_code = ResponseCode::NXDomain;
        let name = Name::from_ascii("nope.test.").unwrap();
        m.add_query(Query::query(name, RecordType::A));
        let soa = hickory_proto::rr::rdata::SOA::new(
            Name::from_ascii("ns.test.").unwrap(),
            Name::from_ascii("h.test.").unwrap(),
            1,
            60,
            10,
            600,
            30,
        );
        m.authorities.push(Record::from_rdata(
            Name::from_ascii("test.").unwrap(),
            300,
            RData::SOA(soa),
        ));
        let (_, _, key) = query(1, "nope.test.", false);
        let q = question_of(&key).to_vec();
        let e = Entry::from_upstream(&m.to_vec().unwrap(), 1, &q, &q).unwrap();
        assert_eq!((e.rcode, e.ttl), (3, 30));
        assert_eq!(Entry::empty(&q, 2, SERVFAIL_TTL).ttl, 1);
    }
}
