//! The gateway's architecture, checked: top-level modules import one way (each only the ones
//! before it in [`LAYERS`]), and no source file is a grab-bag (at most [`MAX_LINES`] lines
//! before its tests). The list is the layer picture of `gateway/README.md`.
//!
//! It reads the sources: every `crate::NAME` path outside comments counts as an import of the
//! top-level module `NAME`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Top-level modules, lowest first. A module may use the ones before it, never after.
const LAYERS: &[&str] = &[
    "error", "version", "metrics", "security", "db", "config", "command", "raft", "cluster",
    "ingress", "export", "backup", "http", "daemon", "embed", "cli",
];

/// Imports that break the order, each with the reason it is allowed for now.
const EXCEPTIONS: &[(&str, &str, &str)] = &[];

/// Lines a source file may have before its `#[cfg(test)]` module.
const MAX_LINES: usize = 700;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src dir") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`None` for the crate roots).
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).expect("under src");
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

/// The code of a line, without its `//` comment (string literals holding `//` are rare
/// enough in this crate not to matter: a false import would only make the test stricter).
fn code(line: &str) -> &str {
    match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    }
}

/// The top-level modules `text` names through `crate::`.
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let mut rest = code(line);
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `crate::{a, b}` groups are not used in this crate; a name is required.
            assert!(!name.is_empty(), "unparsed crate path in: {line}");
            out.insert(name);
            rest = after;
        }
    }
    out
}

#[test]
fn test_imports_flow_one_way() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut violations = Vec::new();
    for file in &files {
        let Some(module) = module_of(file) else {
            continue;
        };
        let Some(own) = rank(&module) else {
            violations.push(format!(
                "{}: module `{module}` is not in LAYERS (add it where it belongs)",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read source");
        for used in imports(&text) {
            let allowed = used == module
                || rank(&used).is_some_and(|r| r < own)
                || EXCEPTIONS
                    .iter()
                    .any(|(from, to, _)| *from == module && *to == used);
            if !allowed {
                violations.push(format!(
                    "{}: `{module}` uses `crate::{used}`, which is not below it",
                    file.display()
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports against the layer order:\n{}",
        violations.join("\n")
    );
}

#[test]
fn test_no_grab_bag_files() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut long = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read source");
        let lines = text
            .lines()
            .take_while(|l| !l.starts_with("#[cfg(test)]"))
            .count();
        if lines > MAX_LINES {
            long.push(format!("{}: {lines} lines", file.display()));
        }
    }
    assert!(
        long.is_empty(),
        "files over {MAX_LINES} lines before their tests:\n{}",
        long.join("\n")
    );
}

#[test]
fn test_the_checker_sees_imports() {
    let text =
        "use crate::db::Store;\n// crate::http in a comment\nlet x = crate::raft::io_err(e);";
    let found: Vec<String> = imports(text).into_iter().collect();
    assert_eq!(found, ["db", "raft"]);
}
