//! The documents point at real code: every test SECURITY.md and RELIABILITY.md name as a
//! defence's proof exists where they say, and every source file they name exists. (They named
//! files that had moved, and tests that had been renamed.)

use imdsgate_e2e::tools::workspace_root;
use std::path::{Path, PathBuf};

/// The backticked spans of `text`, in order.
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// The Rust sources a reference to `file` covers: the file itself and, for a module with a
/// folder (`x.rs` beside `x/`, or `x/mod.rs`), everything under that folder (tests live in sibling
/// files).
fn sources(file: &Path) -> Vec<PathBuf> {
    let mut found = vec![file.to_path_buf()];
    let folder = match file.file_name().and_then(|n| n.to_str()) {
        Some("mod.rs" | "lib.rs") => file.parent().map(Path::to_path_buf),
        _ => Some(file.with_extension("")),
    };
    let mut stack: Vec<PathBuf> = folder.into_iter().filter(|f| f.is_dir()).collect();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }
    found
}

/// What `text` says once parenthesised asides (a metric's value, "(property)") are dropped.
fn without_asides(text: &str) -> String {
    let mut depth = 0usize;
    text.chars()
        .filter(|&c| {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                _ => return depth == 0,
            }
            false
        })
        .collect()
}

/// `(file, test)` pairs a document names: every backticked `…/*.rs` path anywhere (the test is
/// empty), and in the last cell of each table row (the tests), each backticked test name
/// (a lowercase identifier) with the path written before it.
fn references(doc: &str) -> Vec<(String, String)> {
    let is_path = |s: &str| s.ends_with(".rs") && s.contains('/');
    let mut refs: Vec<(String, String)> =
        backticked(doc).into_iter().filter(|s| is_path(s)).map(|s| (s.to_string(), String::new())).collect();
    for line in doc.lines().filter(|l| l.starts_with('|')) {
        let Some(tests) = line.trim_end_matches('|').rsplit('|').next() else { continue };
        let tests = without_asides(tests);
        let mut file: Option<&str> = None;
        for span in backticked(&tests) {
            if is_path(span) {
                file = Some(span);
            } else if let Some(file) = file
                && !span.is_empty()
                && span.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                refs.push((file.to_string(), span.to_string()));
            }
        }
    }
    refs
}

#[test]
fn every_test_and_file_the_documents_name_exists() {
    let root = workspace_root();
    let mut missing = Vec::new();
    let mut checked = 0;
    for doc in ["SECURITY.md", "RELIABILITY.md"] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        for (file, test) in references(&text) {
            let path = root.join(&file);
            if !path.exists() {
                missing.push(format!("{doc}: {file} does not exist"));
                continue;
            }
            if test.is_empty() {
                continue;
            }
            checked += 1;
            let defined = sources(&path).iter().any(|source| {
                std::fs::read_to_string(source).unwrap_or_default().contains(&format!("fn {test}("))
            });
            if !defined {
                missing.push(format!("{doc}: no fn {test} in {file} (or its module's folder)"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} of the documents' references are stale:\n{}",
        missing.len(),
        missing.join("\n")
    );
    assert!(checked > 50, "only {checked} test references found: is the parser still reading the tables?");
}
