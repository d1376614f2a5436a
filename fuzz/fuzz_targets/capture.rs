//! Fuzz target `capture`: see `callq_fuzz::capture::capture` for the
//! contract it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| callq_fuzz::capture::capture(data));
