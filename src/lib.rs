//! The `callq` binary's library half: the processes of a cluster, the load
//! generator and the demo, shared by the command line, the tests and the
//! benchmarks.
#![forbid(unsafe_code)]

pub mod capture;
pub mod chaos;
pub mod cluster;
pub mod commands;
pub mod crashes;
pub mod demo;
pub mod load;
pub mod replay;
