//! The `callq` binary's library half: the load generator and the demo,
//! shared by the command line and the benchmarks.
#![forbid(unsafe_code)]

pub mod chaos;
pub mod cluster;
pub mod demo;
pub mod load;
