#![no_main]
//! Bytes in -> the journal replay of start-up: no panic, bounded work (see rollcall::fuzz).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rollcall::fuzz::journal_replay(data));
