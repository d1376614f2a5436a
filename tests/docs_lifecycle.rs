//! docs/ARCHITECTURE.md leads from every step of a call's life to the
//! function that owns it: each row of its lifecycle table names a file that
//! exists and a function that file defines. A rename that leaves the table
//! behind fails here.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;

/// The rows of the table between the `lifecycle-table` markers: (step,
/// file, functions).
fn rows(doc: &str) -> Vec<(String, String, Vec<String>)> {
    let start = doc
        .find("<!-- lifecycle-table:start -->")
        .expect("docs/ARCHITECTURE.md has no lifecycle table (<!-- lifecycle-table:start -->)");
    let end = doc[start..]
        .find("<!-- lifecycle-table:end -->")
        .expect("the lifecycle table is not closed (<!-- lifecycle-table:end -->)");
    doc[start..start + end]
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---") && !l.starts_with("| step"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            assert_eq!(cells.len(), 3, "a row has three cells: {l}");
            let code = |c: &str| c.trim_matches('`').to_owned();
            let functions = cells[2]
                .split(',')
                .map(|f| code(f.trim()))
                .filter(|f| !f.is_empty())
                .collect();
            (cells[0].to_owned(), code(cells[1]), functions)
        })
        .collect()
}

#[test]
fn every_lifecycle_step_names_a_file_that_defines_its_function() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).unwrap();
    let rows = rows(&doc);
    assert!(rows.len() >= 15, "the table lists {} steps", rows.len());
    let mut missing = Vec::new();
    for (step, file, functions) in &rows {
        let Ok(source) = std::fs::read_to_string(root.join(file)) else {
            missing.push(format!("{step}: no file `{file}`"));
            continue;
        };
        assert!(!functions.is_empty(), "{step}: no function named");
        for f in functions {
            // `Type::method` is defined as `fn method`.
            let name = f.rsplit("::").next().unwrap();
            let defined = source.lines().any(|line| {
                let line = line.trim_start();
                line.split("fn ").skip(1).any(|rest| {
                    rest.starts_with(name) && rest[name.len()..].starts_with(['(', '<'])
                })
            });
            if !defined {
                missing.push(format!("{step}: `{file}` defines no function `{f}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md is out of date:\n{}",
        missing.join("\n")
    );
}
