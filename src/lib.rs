//! The `callq` binary's library half: the commands of the command line.
//! The harness they share with the tests and the benchmarks is
//! `callq-testkit`.
#![forbid(unsafe_code)]

pub mod capture;
pub mod commands;
pub mod replay;
