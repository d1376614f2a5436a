//! The fuzz targets of callq's decoders and the contracts they check.
//!
//! Each target in `fuzz_targets/` hands libFuzzer's input to one check
//! here: [`wire`] for the decoders of `callq-schemas` (calls, replies, the
//! coordinator protocol, `peek`), [`capture`] for the capture-file reader
//! of `callq-node`. The workspace tests include the same files
//! (`schemas/tests/fuzz_corpus.rs`, `node/tests/fuzz_corpus.rs`) and run
//! them, with [`corpus`], on the committed corpus and findings.
#![forbid(unsafe_code)]

pub mod capture;
pub mod corpus;
pub mod wire;

// `callq_node::capture`, compiled from its source: the module needs serde
// alone, and depending on callq-node would build its PostgreSQL, TLS and
// telemetry stack too (see Cargo.toml). The node test that replays the
// corpus imports the real module under this name.
#[path = "../../node/src/capture.rs"]
pub mod capture_format;
