//! Runs a target's check on every file of its committed corpus
//! (`fuzz/corpus/<target>/`) and findings (`fuzz/regressions/<target>/`),
//! so that the workspace tests keep what the fuzzers found fixed without
//! running a fuzzer. `schemas/tests/fuzz_corpus.rs` and
//! `node/tests/fuzz_corpus.rs` include this file.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// A fuzz target's name and check: the check panics when the decoder
/// breaks its contract on the input.
pub type Target = (&'static str, fn(&[u8]));

/// Runs `check` on every file of `<fuzz_dir>/corpus/<target>/` and
/// `<fuzz_dir>/regressions/<target>/` (which may be absent); panics listing
/// every file that fails, or when the corpus is missing or empty. Returns
/// how many files passed.
pub fn replay(fuzz_dir: &Path, target: &str, check: fn(&[u8])) -> usize {
    let corpus = files(&fuzz_dir.join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "no corpus for `{target}` in {}: run fuzz/make-corpus.py",
        fuzz_dir.display()
    );
    let findings = files(&fuzz_dir.join("regressions").join(target));
    let mut failed = Vec::new();
    for path in corpus.iter().chain(&findings) {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "the `{target}` check fails on these files (replay one from the repository root \
         with `RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz --sanitizer none {target} FILE`):\n  {}",
        failed.join("\n  ")
    );
    corpus.len() + findings.len()
}

/// The files of a folder, sorted; none if it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| {
            entry
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .path()
        })
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}
