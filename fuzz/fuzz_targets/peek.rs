//! Fuzz target `peek`: see `callq_fuzz::wire::peek` for the contract it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| callq_fuzz::wire::peek(data));
