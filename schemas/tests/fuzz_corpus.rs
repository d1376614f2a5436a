#![allow(clippy::unwrap_used)]
//! The fuzz targets' checks of the wire decoders (`fuzz/src/wire.rs`), run
//! on every file of the committed fuzz corpus (`fuzz/corpus/<target>/`)
//! and of the fuzzers' findings (`fuzz/regressions/<target>/`), so that a
//! finding stays fixed without running a fuzzer.

use std::path::{Path, PathBuf};

#[path = "../../fuzz/src/corpus.rs"]
pub mod corpus;
#[path = "../../fuzz/src/wire.rs"]
pub mod wire;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .canonicalize()
        .unwrap()
}

fn replay(target: &str) {
    let (_, check) = wire::TARGETS
        .into_iter()
        .find(|(name, _)| *name == target)
        .unwrap();
    corpus::replay(&fuzz_dir(), target, check);
}

#[test]
fn fuzz_corpus_call() {
    replay("call");
}

#[test]
fn fuzz_corpus_reply() {
    replay("reply");
}

#[test]
fn fuzz_corpus_protocol() {
    replay("protocol");
}

#[test]
fn fuzz_corpus_peek() {
    replay("peek");
}

/// Every target has its test above, so that a new target is not left out.
#[test]
fn fuzz_corpus_covers_every_wire_target() {
    let names: Vec<&str> = wire::TARGETS.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, ["call", "reply", "protocol", "peek"]);
}
