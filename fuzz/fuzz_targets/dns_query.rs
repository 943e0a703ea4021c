#![no_main]
//! Bytes in -> the DNS query path (UDP and TCP) -> an answer that hickory decodes, or nothing.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rollcall::fuzz::dns_query(data));
