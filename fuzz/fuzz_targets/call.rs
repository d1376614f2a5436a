//! Fuzz target `call`: see `callq_fuzz::wire::call` for the contract it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| callq_fuzz::wire::call(data));
