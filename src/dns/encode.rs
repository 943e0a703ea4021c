//! Wire-format encoding of answer templates: names, headers, questions and records.
//!
//! Role data (`role.rs`) writes its records by hand with these helpers (A, AAAA and SRV are
//! fixed layouts); static zone data goes through hickory's encoder ([`encode_records`]).

use std::net::IpAddr;

use hickory_proto::op::Query;
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};

use super::snapshot::{Template, TYPE_A, TYPE_AAAA};

const CLASS_IN: u16 = 1;

/// `name.example.` -> lower-case wire bytes.
pub fn wire_name(name: &Name) -> Box<[u8]> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.iter() {
        out.push(label.len() as u8);
        out.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    out.push(0);
    out.into_boxed_slice()
}

/// Prepends a label to a wire name.
pub(super) fn prepend(label: &str, suffix: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(label.len() + 1 + suffix.len());
    out.push(label.len() as u8);
    out.extend_from_slice(label.as_bytes());
    out.extend_from_slice(suffix);
    out
}

pub(super) fn header(out: &mut Vec<u8>, an: usize, ar: usize) {
    out.extend_from_slice(&[0, 0, 0x84, 0, 0, 1]);
    out.extend_from_slice(&(an as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(ar as u16).to_be_bytes());
}

pub(super) fn question(out: &mut Vec<u8>, name: &[u8], qtype: u16) {
    out.extend_from_slice(name);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
}

/// Largest offset a compression pointer can hold (14 bits).
pub(super) const MAX_POINTER: usize = 0x3FFF;

/// Writes an RR whose owner is `owner`: a wire-format name, or a compression pointer.
pub(super) fn rr_named(
    out: &mut Vec<u8>,
    owner: &[u8],
    rtype: u16,
    ttl: u32,
    rdata: impl FnOnce(&mut Vec<u8>),
) {
    out.extend_from_slice(owner);
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    let len_at = out.len();
    out.extend_from_slice(&[0, 0]);
    rdata(out);
    let len = (out.len() - len_at - 2) as u16;
    out[len_at..len_at + 2].copy_from_slice(&len.to_be_bytes());
}

/// Writes an RR whose owner is a compression pointer to `owner_at` (at most [`MAX_POINTER`]).
pub(super) fn rr_ptr_owner(
    out: &mut Vec<u8>,
    owner_at: usize,
    rtype: u16,
    ttl: u32,
    rdata: impl FnOnce(&mut Vec<u8>),
) {
    debug_assert!(owner_at <= MAX_POINTER);
    rr_named(
        out,
        &(0xC000 | owner_at as u16).to_be_bytes(),
        rtype,
        ttl,
        rdata,
    );
}

pub(super) fn addr_rdata(out: &mut Vec<u8>, addr: IpAddr) {
    match addr {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

pub(super) fn addr_type(addr: IpAddr) -> u16 {
    if addr.is_ipv4() {
        TYPE_A
    } else {
        TYPE_AAAA
    }
}

/// Encodes arbitrary records (static zone data) with hickory's encoder. Fails when the
/// response would not fit in a DNS message (64 KiB).
pub fn encode_records(
    owner: &Name,
    rtype: RecordType,
    answers: &[Record],
    additionals: &[Record],
) -> Result<Template, String> {
    let mut buf = Vec::with_capacity(512);
    let mut enc = BinEncoder::new(&mut buf);
    let mut h = Vec::with_capacity(12);
    header(&mut h, answers.len(), additionals.len());
    let mut additional_ends = Vec::new();
    let mut answer_end = 0;
    (|| -> Result<(), hickory_proto::ProtoError> {
        enc.emit_vec(&h)?;
        let q = Query::query(owner.to_lowercase(), rtype);
        q.emit(&mut enc)?;
        for r in answers {
            r.emit(&mut enc)?;
        }
        answer_end = enc.offset() as u32;
        for r in additionals {
            r.emit(&mut enc)?;
            additional_ends.push(enc.offset() as u32);
        }
        Ok(())
    })()
    .map_err(|e| format!("the {owner} {rtype} records do not fit in one DNS message: {e}"))?;
    if buf.len() > usize::from(u16::MAX) || answers.len() > usize::from(u16::MAX) {
        return Err(format!(
            "the {owner} {rtype} records do not fit in one DNS message ({} bytes, at most 65535): split them",
            buf.len()
        ));
    }
    Ok(Template {
        bytes: buf.into_boxed_slice(),
        answer_end,
        additional_ends: additional_ends.into(),
        fixed_rr: 0,
    })
}
