//! The module boundaries of ARCHITECTURE.md, checked: every `crate::` path in a module's
//! files (tests included) must name a module that module may depend on. A new import
//! across a boundary fails here with the file and the line, so a boundary is kept by
//! construction rather than by review.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Each top-level module of `src/` and the modules it may name. The order is the
/// layering, bottom up: a module may only depend on modules above it in this list.
const ALLOWED: &[(&str, &[&str])] = &[
    ("core", &[]),
    ("backoff", &[]),
    ("tls", &[]),
    ("template", &[]),
    ("config", &["core"]),
    ("store", &["core", "backoff", "tls"]),
    ("metrics", &["core", "store"]),
    ("verify", &["core", "config", "store", "metrics", "template", "tls"]),
    ("demo", &["tls"]),
    ("admin", &["core", "store", "metrics", "host", "verify"]),
    ("host", &["core", "store", "backoff", "metrics", "admin", "tls"]),
    ("cli", &["core", "store", "admin", "host", "verify"]),
    ("layer", &["core", "config", "store", "backoff", "metrics", "template", "verify"]),
    ("gateway", &["core", "config", "store", "backoff", "metrics", "host", "admin", "demo", "tls", "layer", "verify"]),
    ("runner", &["core", "config", "store", "backoff", "metrics", "host", "tls", "template", "verify"]),
    (
        "consumer",
        &["core", "config", "store", "backoff", "metrics", "host", "admin", "runner", "tls", "template", "verify"],
    ),
];

#[test]
fn no_module_imports_across_a_boundary() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules: BTreeSet<String> = top_level_modules(&src);
    let known: BTreeSet<String> = ALLOWED.iter().map(|(name, _)| (*name).to_owned()).collect();
    assert_eq!(modules, known, "every top-level module of src/ has a row in ALLOWED (and every row a module)");

    let mut crossings = Vec::new();
    for (module, allowed) in ALLOWED {
        for file in files_of(&src, module) {
            let text = std::fs::read_to_string(&file).expect("a readable source file");
            for (line_number, line) in text.lines().enumerate() {
                for named in crate_paths(line) {
                    if named != *module && modules.contains(named) && !allowed.contains(&named) {
                        let file = file.strip_prefix(&src).unwrap_or(&file).display().to_string();
                        crossings.push(format!("src/{file}:{}: {module} must not use crate::{named}", line_number + 1));
                    }
                }
            }
        }
    }
    assert!(crossings.is_empty(), "imports across a module boundary:\n{}", crossings.join("\n"));
}

#[test]
fn the_checker_sees_crate_paths() {
    assert_eq!(crate_paths("use crate::gateway::config::{RawAdmin, parse_toml};"), ["gateway"]);
    assert_eq!(crate_paths("let s = crate::store::open(u); crate::core::decide(a)"), ["store", "core"]);
    assert_eq!(crate_paths("use idem::store; // not crate::"), Vec::<&str>::new());
    assert_eq!(crate_paths("my_crate::x"), Vec::<&str>::new());
}

/// The modules named by `crate::NAME` on a line (outside a trailing `//` comment).
fn crate_paths(line: &str) -> Vec<&str> {
    let code = line.split("//").next().unwrap_or_default();
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        let after = &rest[at + "crate::".len()..];
        let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') && end > 0 {
            found.push(&after[..end]);
        }
        rest = &after[end..];
    }
    found
}

/// `src/NAME.rs` and `src/NAME/` for every module declared at the crate root.
fn top_level_modules(src: &Path) -> BTreeSet<String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("src/lib.rs");
    lib.lines()
        .filter_map(|line| line.trim().strip_prefix("pub mod ").or_else(|| line.trim().strip_prefix("mod ")))
        .map(|rest| rest.trim_end_matches(';').trim().to_owned())
        .collect()
}

/// Every `.rs` file of a top-level module.
fn files_of(src: &Path, module: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let single = src.join(format!("{module}.rs"));
    if single.is_file() {
        files.push(single);
    }
    let mut folders = vec![src.join(module)];
    while let Some(folder) = folders.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}
