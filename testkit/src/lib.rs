//! callq's harness, shared by the `callq` binary (`callq demo`, `callq
//! replay --into`), the tests and the benchmarks:
//!
//! - [`cluster`]: a whole cluster in one process on the embedded broker
//!   ([`LocalCluster`]), whose workers can be started, killed and drained;
//! - [`load`]: a load generator with latency percentiles;
//! - [`chaos`]: a load under faults over any [`chaos::Fleet`], with an
//!   account of how every call ended;
//! - [`faults`]: crash plans for workers, supplied to them as a probe;
//! - [`crashes`]: replay of a capture file with crashes injected;
//! - [`netns`]: a process in a network namespace of its own, whose link to
//!   the host can be cut (a partition that keeps its connections) and
//!   restored;
//! - [`capture`] and [`replay`]: capture from any tap, replay onto a broker
//!   or into handlers;
//! - [`demo`]: what `callq demo` runs.
//!
//! It runs on the embedded broker; where a test needs a real one, it
//! connects it itself and hands it over as an `Arc<dyn Broker>`.
#![forbid(unsafe_code)]

pub mod capture;
pub mod chaos;
pub mod cluster;
pub mod crashes;
pub mod demo;
pub mod faults;
pub mod load;
pub mod netns;
pub mod replay;

pub use cluster::{ClusterOptions, LocalCluster};
