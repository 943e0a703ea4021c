//! The query path: one datagram (or TCP message) in, one response out, answered from a
//! [`Snapshot`]. No locks, no heap allocation on the common path (the caller owns `out`), and
//! no panics on any input: every index is checked.
//!
//! Positive answers are copies of pre-encoded templates with the ID, the RD bit and the
//! question bytes (the client's letter case) patched in. Negative answers are assembled from
//! the question and the zone's pre-encoded SOA. PTR answers for registered addresses are
//! looked up in the zone-wide reverse index and encoded on the fly.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::snapshot::{Entry, RoleData, Snapshot, Template, Zone, TYPE_CNAME, TYPE_PTR};

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;
pub const RCODE_REFUSED: u8 = 5;

const TYPE_OPT: u16 = 41;
const TYPE_IXFR: u16 = 251;
const TYPE_AXFR: u16 = 252;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const CLASS_ANY: u16 = 255;

/// The payload size rollcall advertises and the most it sends over UDP (DNS flag day 2020).
pub const MAX_UDP_PAYLOAD: u16 = 1232;
const OPT_LEN: usize = 11;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What [`answer`] did, for counters and tests.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    /// Nothing to send (a response packet, a runt).
    Drop,
    /// `qtype` is 0 when the question could not be read.
    Answered {
        rcode: u8,
        truncated: bool,
        qtype: u16,
    },
    /// The name is in none of our zones (nor a reverse name of a registered address): `out`
    /// holds REFUSED, which is the answer unless the caller forwards the query upstream.
    NotOurs { qtype: u16 },
}

fn not_ours(o: Outcome) -> Outcome {
    match o {
        Outcome::Answered { qtype, .. } => Outcome::NotOurs { qtype },
        o => o,
    }
}

/// Turns the response in `out` (one with a header) into SERVFAIL.
pub fn set_rcode(out: &mut [u8], rcode: u8) {
    if out.len() >= 4 {
        out[3] = (out[3] & 0xF0) | (rcode & 0x0F);
    }
}

/// A parsed question: the name in lower case plus where its labels start.
struct Question {
    name: [u8; 256],
    len: usize,
    labels: [u8; 128],
    nlabels: usize,
    qtype: u16,
    qclass: u16,
    /// End of the question in the query (offset 12 + name + 4).
    end: usize,
}

struct Edns {
    payload: u16,
    version: u8,
}

/// A query that passed the header checks: whether it carried EDNS (and which version), and the
/// largest response the transport allows. Its question is parsed into the caller's
/// [`Question`] (one stack slot, filled in place: never moved).
struct Parsed {
    opt: bool,
    edns_version: u8,
    limit: usize,
}

/// A query that cannot be parsed far enough to have a question.
enum Unparsed {
    /// Not answered at all (a response packet, a runt).
    Drop,
    /// An error answer with the header only.
    HeaderOnly(u8),
}

/// What a parsed query asks for, decided before a byte of the answer is written. Each kind has
/// one responder in [`answer`]; "forward this" is [`Kind::NotOurs`] (the transport decides),
/// and "transfer this" is [`Kind::Transfer`] (refused today).
enum Kind<'s> {
    /// An EDNS version rollcall does not speak: BADVERS.
    BadVersion,
    /// An error answer that echoes the question (FORMERR for qtype OPT, REFUSED for classes
    /// other than IN and ANY).
    Error(u8),
    /// AXFR or IXFR of one of our zones.
    Transfer,
    /// A name in none of our zones.
    NotOurs,
    /// PTR (or ANY) of a reverse name outside our zones: a registered address, maybe.
    Reverse(IpAddr),
    /// A name in `zone`, whose apex starts at label `apex_label` of the question.
    Authoritative { zone: &'s Zone, apex_label: usize },
}

/// Answers the query in `q` into `out` (cleared first). `rotation` is the caller's round-robin
/// counter (one per thread or connection); it is advanced for multi-record answers.
///
/// Three steps: [`parse`] (header, question, EDNS), [`classify`] (which [`Kind`] of query,
/// against the snapshot's zones), then the kind's responder.
pub fn answer(
    snap: &Snapshot,
    q: &[u8],
    out: &mut Vec<u8>,
    transport: Transport,
    rotation: &mut u32,
) -> Outcome {
    out.clear();
    let mut question = Question::new();
    let parsed = match parse(q, transport, &mut question) {
        Ok(p) => p,
        Err(Unparsed::Drop) => return Outcome::Drop,
        Err(Unparsed::HeaderOnly(rcode)) => return header_only(q, out, rcode),
    };
    let question = &question;
    let (opt, limit) = (parsed.opt, parsed.limit);
    match classify(snap, question, &parsed) {
        Kind::Authoritative { zone, apex_label } => authoritative(
            snap, q, question, zone, apex_label, out, limit, opt, rotation,
        ),
        Kind::BadVersion => {
            // BADVERS (16): upper 8 bits of the extended rcode live in the OPT record.
            start_response(q, question, out, RCODE_NOERROR);
            push_opt(out, 1);
            Outcome::Answered {
                rcode: 16,
                truncated: false,
                qtype: question.qtype,
            }
        }
        Kind::Error(rcode) => respond(q, question, out, rcode, opt),
        Kind::Transfer => respond(q, question, out, RCODE_REFUSED, opt),
        Kind::NotOurs => not_ours(respond(q, question, out, RCODE_REFUSED, opt)),
        Kind::Reverse(addr) => answer_ptr(snap, q, question, addr, out, limit, opt),
    }
}

/// Header checks, the question and EDNS: everything that can be read without the snapshot.
fn parse(q: &[u8], transport: Transport, question: &mut Question) -> Result<Parsed, Unparsed> {
    if q.len() < 12 || q[2] & 0x80 != 0 {
        return Err(Unparsed::Drop);
    }
    let opcode = (q[2] >> 3) & 0x0f;
    let qdcount = u16::from_be_bytes([q[4], q[5]]);
    if opcode != 0 {
        return Err(Unparsed::HeaderOnly(RCODE_NOTIMP));
    }
    if qdcount != 1 {
        return Err(Unparsed::HeaderOnly(RCODE_FORMERR));
    }
    if !parse_question(q, question) {
        return Err(Unparsed::HeaderOnly(RCODE_FORMERR));
    }
    let edns = parse_edns(q, question.end).map_err(|()| Unparsed::HeaderOnly(RCODE_FORMERR))?;
    let limit = match (transport, &edns) {
        (Transport::Tcp, _) => usize::from(u16::MAX),
        (Transport::Udp, None) => 512,
        (Transport::Udp, Some(e)) => usize::from(e.payload.clamp(512, MAX_UDP_PAYLOAD)),
    };
    Ok(Parsed {
        opt: edns.is_some(),
        edns_version: edns.map_or(0, |e| e.version),
        limit,
    })
}

/// What forwarding needs of a client's query, from the same parse the authoritative path
/// uses: where the question ends and the client's EDNS (payload size, DO bit) if it sent OPT.
/// The cache key goes into the caller's buffer: the lower-cased wire name, qtype, qclass, then
/// one byte of flags (DO = 1, CD = 2); equal keys ask an upstream the same question.
pub struct ClientQuery {
    /// End of the question in the query.
    pub qend: usize,
    /// The client's UDP payload size when it sent an OPT record.
    pub edns: Option<u16>,
    pub dnssec_ok: bool,
    pub checking_disabled: bool,
    pub qtype: u16,
}

impl ClientQuery {
    /// The largest response this client takes over `transport`.
    pub fn limit(&self, transport: Transport) -> usize {
        match transport {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => usize::from(self.edns.map_or(512, |p| p.clamp(512, MAX_UDP_PAYLOAD))),
        }
    }
}

/// Parses a query for forwarding, its cache key into `key` (None: not a query with one
/// question, or a malformed one). No allocation beyond `key`'s growth.
pub fn client_query(q: &[u8], key: &mut Vec<u8>) -> Option<ClientQuery> {
    let mut question = Question::new();
    parse(q, Transport::Tcp, &mut question).ok()?;
    let question = &question;
    let (edns, dnssec_ok) = match opt_flags(q, question.end) {
        Some((payload, flags)) => (Some(payload), flags & 0x8000 != 0),
        None => (None, false),
    };
    let checking_disabled = q[3] & 0x10 != 0;
    key.clear();
    key.extend_from_slice(&question.name[..question.len]);
    key.extend_from_slice(&question.qtype.to_be_bytes());
    key.extend_from_slice(&question.qclass.to_be_bytes());
    key.push(u8::from(dnssec_ok) | u8::from(checking_disabled) << 1);
    Some(ClientQuery {
        qend: question.end,
        edns,
        dnssec_ok,
        checking_disabled,
        qtype: question.qtype,
    })
}

/// The OPT record's payload size and flags (DO is the top bit), if the query has one.
fn opt_flags(q: &[u8], mut pos: usize) -> Option<(u16, u16)> {
    let count = |i: usize| u16::from_be_bytes([q[i], q[i + 1]]) as usize;
    for _ in 0..count(6) + count(8) + count(10) {
        pos = skip_name(q, pos)?;
        let fixed = q.get(pos..pos + 10)?;
        if u16::from_be_bytes([fixed[0], fixed[1]]) == TYPE_OPT {
            return Some((
                u16::from_be_bytes([fixed[2], fixed[3]]),
                u16::from_be_bytes([fixed[6], fixed[7]]),
            ));
        }
        pos += 10 + usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
    }
    None
}

/// Where the (possibly compressed) name starting at `pos` ends; None past the end or on a
/// reserved label type.
pub fn skip_name(b: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let len = *b.get(pos)?;
        match len & 0xC0 {
            0xC0 => return (pos + 2 <= b.len()).then_some(pos + 2),
            0 if len == 0 => return Some(pos + 1),
            0 => pos += 1 + usize::from(len),
            _ => return None,
        }
    }
}

/// Which kind of query this is, against the snapshot's zones.
fn classify<'s>(snap: &'s Snapshot, question: &Question, parsed: &Parsed) -> Kind<'s> {
    if parsed.opt && parsed.edns_version > 0 {
        return Kind::BadVersion;
    }
    if question.qtype == TYPE_OPT {
        return Kind::Error(RCODE_FORMERR);
    }
    if question.qclass != CLASS_IN && question.qclass != CLASS_ANY {
        return Kind::Error(RCODE_REFUSED);
    }
    match find_zone(snap, question) {
        Some(_) if question.qtype == TYPE_AXFR || question.qtype == TYPE_IXFR => Kind::Transfer,
        Some((zone, apex_label)) => Kind::Authoritative { zone, apex_label },
        None if question.qtype == TYPE_PTR || question.qtype == TYPE_ANY => {
            reverse_addr(question).map_or(Kind::NotOurs, Kind::Reverse)
        }
        None => Kind::NotOurs,
    }
}

/// A name in one of our zones: the apex, then the role's data, then the zone's static names;
/// a template, NODATA or NXDOMAIN.
#[allow(clippy::too_many_arguments)]
fn authoritative(
    snap: &Snapshot,
    q: &[u8],
    question: &Question,
    zone: &Zone,
    apex_label: usize,
    out: &mut Vec<u8>,
    limit: usize,
    opt: bool,
    rotation: &mut u32,
) -> Outcome {
    let name = &question.name[..question.len];
    let dynamic: Option<&Entry> = if zone.dynamic && apex_label > 0 {
        let role_at = usize::from(question.labels[apex_label - 1]);
        let role_len = usize::from(name[role_at]);
        snap.roles
            .get(&name[role_at + 1..role_at + 1 + role_len])
            .and_then(|r: &std::sync::Arc<RoleData>| r.get(name, apex_label))
    } else {
        None
    };
    let fixed: Option<&Entry> = if apex_label == 0 {
        Some(&zone.apex_entry)
    } else {
        zone.names.get(name)
    };
    if dynamic.is_none() && fixed.is_none() {
        return negative(q, question, zone, apex_label, out, RCODE_NXDOMAIN, opt);
    }
    match pick(dynamic, question.qtype, rotation).or_else(|| pick(fixed, question.qtype, rotation))
    {
        Some((t, shift)) => from_template(q, question, t, shift, out, limit, opt),
        None => negative(q, question, zone, apex_label, out, RCODE_NOERROR, opt),
    }
}

/// The template answering `qtype` at an entry: the RRset of that type, else a CNAME, else for
/// ANY the first RRset only (RFC 8482).
fn pick<'e>(
    entry: Option<&'e Entry>,
    qtype: u16,
    rotation: &mut u32,
) -> Option<(&'e Template, usize)> {
    let e = entry?;
    let set = if qtype == TYPE_ANY {
        e.sets.first()
    } else {
        e.get(qtype).or_else(|| e.get(TYPE_CNAME))
    }?;
    let n = set.rotations.len();
    let t = set.rotations.get(*rotation as usize % n)?;
    let records = t
        .bytes
        .get(6..8)
        .map_or(0, |c| usize::from(u16::from_be_bytes([c[0], c[1]])));
    let shift = if t.fixed_rr > 0 && records > 1 {
        *rotation as usize % records
    } else {
        0
    };
    if n > 1 || records > 1 {
        *rotation = rotation.wrapping_add(1);
    }
    Some((t, shift))
}

impl Question {
    fn new() -> Question {
        Question {
            name: [0; 256],
            len: 0,
            labels: [0; 128],
            nlabels: 0,
            qtype: 0,
            qclass: 0,
            end: 0,
        }
    }
}

/// Reads the question of `q` into `question` (lower case); false when it is malformed.
fn parse_question(q: &[u8], question: &mut Question) -> bool {
    let mut pos = 12;
    question.len = 0;
    question.nlabels = 0;
    loop {
        let Some(&len) = q.get(pos) else {
            return false;
        };
        let len = usize::from(len);
        if len & 0xc0 != 0 {
            return false; // compression (or the reserved label types) in a question: not from a real client
        }
        if question.len + len + 1 > 255 || question.nlabels >= 127 {
            return false;
        }
        let Some(label) = q.get(pos + 1..pos + 1 + len) else {
            return false;
        };
        question.labels[question.nlabels] = question.len as u8;
        question.nlabels += 1;
        question.name[question.len] = len as u8;
        let dst = &mut question.name[question.len + 1..question.len + 1 + len];
        dst.copy_from_slice(label);
        dst.make_ascii_lowercase();
        question.len += len + 1;
        pos += len + 1;
        if len == 0 {
            break;
        }
    }
    // The root label was counted as a label; drop it from the label list.
    question.nlabels -= 1;
    let Some(tail) = q.get(pos..pos + 4) else {
        return false;
    };
    question.qtype = u16::from_be_bytes([tail[0], tail[1]]);
    question.qclass = u16::from_be_bytes([tail[2], tail[3]]);
    question.end = pos + 4;
    true
}

/// Walks the answer, authority and additional sections for an OPT record.
fn parse_edns(q: &[u8], mut pos: usize) -> Result<Option<Edns>, ()> {
    let count = |i: usize| u16::from_be_bytes([q[i], q[i + 1]]) as usize;
    let (an, ns, ar) = (count(6), count(8), count(10));
    let mut edns = None;
    for i in 0..an + ns + ar {
        // Owner name: labels, ending in a root label or a pointer.
        loop {
            let len = *q.get(pos).ok_or(())?;
            if len & 0xc0 == 0xc0 {
                pos += 2;
                break;
            }
            if len & 0xc0 != 0 {
                return Err(());
            }
            pos += usize::from(len) + 1;
            if len == 0 {
                break;
            }
        }
        let fixed = q.get(pos..pos + 10).ok_or(())?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let class = u16::from_be_bytes([fixed[2], fixed[3]]);
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        if rtype == TYPE_OPT {
            if i < an + ns || edns.is_some() {
                return Err(());
            }
            edns = Some(Edns {
                payload: class,
                version: fixed[5],
            });
        }
        pos += 10 + rdlen;
        if pos > q.len() {
            return Err(());
        }
    }
    Ok(edns)
}

/// The most specific served zone containing the name, and the index of its apex's first label
/// in the question (0: the name is the apex).
fn find_zone<'s>(snap: &'s Snapshot, question: &Question) -> Option<(&'s Zone, usize)> {
    let name = &question.name[..question.len];
    for zone in &snap.zones {
        let apex = &zone.apex[..];
        if apex.len() > name.len() || !name.ends_with(apex) {
            continue;
        }
        let at = name.len() - apex.len();
        if at == 0 {
            return Some((zone, 0));
        }
        if let Some(i) = question.labels[..question.nlabels]
            .iter()
            .position(|&l| usize::from(l) == at)
        {
            return Some((zone, i));
        }
    }
    None
}

/// Header for a response: ID, QR, opcode and RD from the query; AA; the given rcode.
fn write_header(q: &[u8], out: &mut Vec<u8>, rcode: u8, aa: bool, counts: [u16; 4]) {
    out.extend_from_slice(&q[..2]);
    out.push(0x80 | (q[2] & 0x79) | if aa { 0x04 } else { 0 });
    out.push(rcode);
    for c in counts {
        out.extend_from_slice(&c.to_be_bytes());
    }
}

/// REFUSED for a client outside `--allow-query` (or any query that must not be answered).
pub fn refuse(q: &[u8], out: &mut Vec<u8>) -> Outcome {
    out.clear();
    if q.len() < 12 || q[2] & 0x80 != 0 {
        return Outcome::Drop;
    }
    header_only(q, out, RCODE_REFUSED)
}

/// Cuts a response in `out` down to its header and question, TC set (what rate limiting's
/// slip sends). A response without a question is left alone.
pub fn slip(out: &mut Vec<u8>) {
    if out.len() < 12 || out[4..6] != [0, 1] {
        return;
    }
    let mut at = 12;
    while let Some(&len) = out.get(at) {
        if len == 0 || len & 0xC0 != 0 {
            break;
        }
        at += 1 + usize::from(len);
    }
    let end = at + 1 + 4;
    if out.get(at) != Some(&0) || end > out.len() {
        return;
    }
    out.truncate(end);
    out[2] |= 0x02;
    out[6..12].copy_from_slice(&[0; 6]);
}

fn header_only(q: &[u8], out: &mut Vec<u8>, rcode: u8) -> Outcome {
    write_header(q, out, rcode, false, [0; 4]);
    Outcome::Answered {
        rcode,
        truncated: false,
        qtype: 0,
    }
}

fn start_response(q: &[u8], question: &Question, out: &mut Vec<u8>, rcode: u8) {
    write_header(q, out, rcode, false, [1, 0, 0, 0]);
    out.extend_from_slice(&q[12..question.end]);
}

/// A response with the question and no records (REFUSED, FORMERR).
fn respond(q: &[u8], question: &Question, out: &mut Vec<u8>, rcode: u8, opt: bool) -> Outcome {
    start_response(q, question, out, rcode);
    finish(out, question, rcode, false, opt)
}

/// Ends every response that carries the question: TC when asked, the OPT record when the query
/// had one, and the outcome for the counters.
fn finish(
    out: &mut Vec<u8>,
    question: &Question,
    rcode: u8,
    truncated: bool,
    opt: bool,
) -> Outcome {
    if truncated {
        out[2] |= 0x02;
    }
    if opt {
        push_opt(out, 0);
    }
    Outcome::Answered {
        rcode,
        truncated,
        qtype: question.qtype,
    }
}

/// Appends an OPT record and counts it in ARCOUNT.
fn push_opt(out: &mut Vec<u8>, ext_rcode: u8) {
    let p = MAX_UDP_PAYLOAD.to_be_bytes();
    out.extend_from_slice(&[0, 0, 41, p[0], p[1], ext_rcode, 0, 0, 0, 0, 0]);
    let ar = u16::from_be_bytes([out[10], out[11]]) + 1;
    out[10..12].copy_from_slice(&ar.to_be_bytes());
}

/// NXDOMAIN or NODATA: the question plus the zone's SOA in the authority section, its owner a
/// pointer to the apex inside the question.
fn negative(
    q: &[u8],
    question: &Question,
    zone: &Zone,
    apex_label: usize,
    out: &mut Vec<u8>,
    rcode: u8,
    opt: bool,
) -> Outcome {
    write_header(q, out, rcode, true, [1, 0, 1, 0]);
    out.extend_from_slice(&q[12..question.end]);
    // Where the apex starts inside the question (label 0 starts at 0).
    let apex_at = usize::from(question.labels[apex_label]);
    out.extend_from_slice(&(0xC000u16 | (12 + apex_at) as u16).to_be_bytes());
    out.extend_from_slice(&zone.soa_tail);
    finish(out, question, rcode, false, opt)
}

/// Copies template `t` (its first `shift` answer records moved to the end when it is
/// rotatable, see `Template::fixed_rr`), patched for the query.
fn from_template(
    q: &[u8],
    question: &Question,
    t: &Template,
    shift: usize,
    out: &mut Vec<u8>,
    limit: usize,
    opt: bool,
) -> Outcome {
    let extra = if opt { OPT_LEN } else { 0 };
    let bytes = &t.bytes[..];
    if bytes.len() < question.end
        || bytes.len() + extra > limit && t.answer_end as usize + extra > limit
    {
        if limit == usize::from(u16::MAX) && t.fixed_rr > 0 && bytes.len() >= question.end {
            // Over TCP there is nowhere to retry: the largest answer that fits, taken from the
            // rotation, so that every node still comes first in turn.
            return largest_that_fits(q, question, t, shift, out, limit - extra, opt);
        }
        // The answers do not fit: header and question only, TC set. The client retries over TCP.
        write_header(q, out, RCODE_NOERROR, true, [1, 0, 0, 0]);
        out.extend_from_slice(&q[12..question.end]);
        return finish(out, question, RCODE_NOERROR, true, opt);
    }
    let mut end = bytes.len();
    let mut additionals = t.additional_ends.len();
    if end + extra > limit {
        // Keep every answer, and as many additional records as fit (no TC: nothing needed is missing).
        additionals = t
            .additional_ends
            .iter()
            .take_while(|&&e| e as usize + extra <= limit)
            .count();
        end = if additionals == 0 {
            t.answer_end as usize
        } else {
            t.additional_ends[additionals - 1] as usize
        };
    }
    let split = question.end + shift * usize::from(t.fixed_rr);
    if shift > 0 && end == t.answer_end as usize && split < end {
        out.extend_from_slice(&bytes[..question.end]);
        out.extend_from_slice(&bytes[split..end]);
        out.extend_from_slice(&bytes[question.end..split]);
    } else {
        out.extend_from_slice(&bytes[..end]);
    }
    out[..2].copy_from_slice(&q[..2]);
    out[2] = 0x84 | (q[2] & 0x01);
    out[3] = RCODE_NOERROR;
    out[10..12].copy_from_slice(&(additionals as u16).to_be_bytes());
    out[12..question.end].copy_from_slice(&q[12..question.end]);
    finish(out, question, RCODE_NOERROR, false, opt)
}

/// As many of a fixed-size RRset's records as fit in `room` bytes, starting at record `shift`.
fn largest_that_fits(
    q: &[u8],
    question: &Question,
    t: &Template,
    shift: usize,
    out: &mut Vec<u8>,
    room: usize,
    opt: bool,
) -> Outcome {
    let rr = usize::from(t.fixed_rr);
    let first = question.end;
    let total = (t.answer_end as usize).saturating_sub(first) / rr;
    let n = (room.saturating_sub(first) / rr).min(total);
    out.extend_from_slice(&t.bytes[..first]);
    for i in 0..n {
        let j = (shift + i) % total.max(1);
        out.extend_from_slice(&t.bytes[first + j * rr..first + (j + 1) * rr]);
    }
    out[..2].copy_from_slice(&q[..2]);
    out[2] = 0x84 | (q[2] & 0x01);
    out[3] = RCODE_NOERROR;
    out[6..8].copy_from_slice(&(n as u16).to_be_bytes());
    out[8..12].copy_from_slice(&[0, 0, 0, 0]);
    out[12..first].copy_from_slice(&q[12..first]);
    finish(out, question, RCODE_NOERROR, false, opt)
}

/// `4.3.2.1.in-addr.arpa.` / 32 nibbles `.ip6.arpa.` -> the address.
fn reverse_addr(question: &Question) -> Option<IpAddr> {
    let name = &question.name[..question.len];
    let labels: Vec<&[u8]> = (0..question.nlabels)
        .map(|i| {
            let at = usize::from(question.labels[i]);
            &name[at + 1..at + 1 + usize::from(name[at])]
        })
        .collect();
    match labels.as_slice() {
        [d, c, b, a, in_addr, arpa] if in_addr == b"in-addr" && arpa == b"arpa" => {
            let octet = |l: &[u8]| std::str::from_utf8(l).ok()?.parse::<u8>().ok();
            Some(IpAddr::V4(Ipv4Addr::new(
                octet(a)?,
                octet(b)?,
                octet(c)?,
                octet(d)?,
            )))
        }
        [nibbles @ .., ip6, arpa] if nibbles.len() == 32 && ip6 == b"ip6" && arpa == b"arpa" => {
            let mut v = 0u128;
            for l in nibbles.iter().rev() {
                let [c] = l else { return None };
                v = v << 4 | u128::from((*c as char).to_digit(16)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(v)))
        }
        _ => None,
    }
}

/// PTR for a registered address: every node with that address, named `node.role.zone`.
fn answer_ptr(
    snap: &Snapshot,
    q: &[u8],
    question: &Question,
    addr: IpAddr,
    out: &mut Vec<u8>,
    limit: usize,
    opt: bool,
) -> Outcome {
    let mut found = 0u16;
    write_header(q, out, RCODE_NOERROR, true, [1, 0, 0, 0]);
    out.extend_from_slice(&q[12..question.end]);
    if let Some(names) = snap.reverse.get(&addr) {
        for (name, ttl) in names {
            if out.len() > limit {
                break; // truncated below: no need to write what cannot be sent
            }
            out.extend_from_slice(&[0xC0, 12, 0, TYPE_PTR as u8, 0, 1]);
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&(name.len() as u16).to_be_bytes());
            out.extend_from_slice(name);
            found += 1;
        }
    }
    if found == 0 {
        out.clear();
        return not_ours(respond(q, question, out, RCODE_REFUSED, opt));
    }
    out[6..8].copy_from_slice(&found.to_be_bytes());
    if out.len() + if opt { OPT_LEN } else { 0 } > limit {
        out.truncate(question.end);
        out[6..8].copy_from_slice(&[0, 0]);
        return finish(out, question, RCODE_NOERROR, true, opt);
    }
    finish(out, question, RCODE_NOERROR, false, opt)
}
