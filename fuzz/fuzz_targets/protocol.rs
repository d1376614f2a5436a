//! Fuzz target `protocol`: see `callq_fuzz::wire::protocol` for the contract it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| callq_fuzz::wire::protocol(data));
