//! The contract of the capture-file reader of `callq-node`
//! (`callq_node::capture::Reader`, the format of docs/REPLAY.md), checked
//! on any input.
//!
//! The check panics, naming the rule broken, when the reader breaks its
//! contract; a panic of the reader itself fails it just the same. The
//! `capture` fuzz target runs it on what libFuzzer makes up, and
//! `node/tests/fuzz_corpus.rs` on the committed corpus and findings (it
//! includes this file). In both, `crate::capture_format` is the module
//! `callq_node::capture`: the fuzz crate compiles its source, the node
//! test imports it.

use crate::capture_format::{FORMAT_VERSION, Reader, Record, Writer};
use crate::corpus::Target;

/// The checks of the fuzz targets, by target name.
pub const TARGETS: [Target; 1] = [("capture", capture)];

/// A capture file: the reader either refuses the header, naming line 1, or
/// reads the header and then goes through every line once, each record or
/// error on a line of its own, in order, every error with a reason; the
/// records it read, written again with the header by `Writer`, read back
/// the same, without an error.
pub fn capture(data: &[u8]) {
    let lines = data.split(|b| *b == b'\n').count();
    let mut reader = match Reader::new(data) {
        Ok(reader) => reader,
        Err(e) => {
            assert_eq!(e.line, 1, "a bad header is line 1: {e}");
            bounded_reason(data, &e.reason);
            return;
        }
    };
    assert_eq!(reader.header.callq_capture, FORMAT_VERSION);
    let header = reader.header.clone();
    let mut records = Vec::new();
    let mut last = 1;
    while let Some(item) = reader.next() {
        let line = reader.line();
        assert!(
            last < line && line <= lines,
            "line {line} follows line {last} and is in the file ({lines} lines)"
        );
        last = line;
        match item {
            Ok(record) => records.push(record),
            Err(e) => {
                assert_eq!(e.line, line, "an error names its own line: {e}");
                bounded_reason(data, &e.reason);
            }
        }
    }
    let mut writer = Writer::new(Vec::new(), &header.broker, &header.service)
        .expect("writing to memory does not fail");
    for record in &records {
        writer
            .write(record)
            .expect("writing to memory does not fail");
    }
    let written = writer.finish().expect("writing to memory does not fail");
    let again = Reader::new(written.as_slice()).expect("a written header reads back");
    assert_eq!(again.header, header, "the header reads back the same");
    let reread: Result<Vec<Record>, _> = again.collect();
    assert_eq!(
        reread.as_ref(),
        Ok(&records),
        "written records read back the same"
    );
}

/// A reason is not empty, and bounded by the size of the file.
fn bounded_reason(data: &[u8], reason: &str) {
    assert!(!reason.is_empty(), "an error gives its reason");
    assert!(
        reason.len() <= 4 * data.len() + 1024,
        "the reason ({} bytes) is bounded by the file ({} bytes)",
        reason.len(),
        data.len()
    );
}
