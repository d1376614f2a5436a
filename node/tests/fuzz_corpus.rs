#![allow(clippy::unwrap_used)]
//! The `capture` fuzz target's check of the capture-file reader
//! (`fuzz/src/capture.rs`), run on every file of the committed fuzz corpus
//! (`fuzz/corpus/capture/`) and of the fuzzer's findings
//! (`fuzz/regressions/capture/`), so that a finding stays fixed without
//! running a fuzzer.

use std::path::Path;

// The name the shared check reads the capture module by.
use callq_node::capture as capture_format;

#[path = "../../fuzz/src/capture.rs"]
pub mod capture;
#[path = "../../fuzz/src/corpus.rs"]
pub mod corpus;

#[test]
fn fuzz_corpus_capture() {
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .canonicalize()
        .unwrap();
    for (target, check) in capture::TARGETS {
        corpus::replay(&fuzz_dir, target, check);
    }
}
