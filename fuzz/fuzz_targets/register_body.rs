#![no_main]
//! Bytes in -> the register body parser -> a valid spec or a 4xx with words.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rollcall::fuzz::register_body(data));
