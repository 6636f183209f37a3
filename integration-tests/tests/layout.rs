//! The README's layout map and ARCHITECTURE.md match the tree: every path they name exists. A map entry
//! is a line of the README map's code block indented 0 (a top-level folder), 2 (a path in that folder)
//! or 4 spaces (a path in the folder named by the entry above it), its name running up to the first gap
//! of two spaces; deeper lines continue a description. ARCHITECTURE.md names files in backticks
//! (`task/open.rs`, `processor/tests/it/fleet.rs`): each is found from the repository's root or from
//! one of the crates' `src/`.

// Test code: a failed step is a failed run.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

/// The paths the README's layout map names, relative to the repository root.
fn mapped_paths(readme: &str) -> Vec<PathBuf> {
    const OPENING: &str = "```text\nstate/ ";
    let start = readme
        .find(OPENING)
        .expect("the README's layout map (a text code block starting with `state/`)");
    let block = &readme[start + "```text\n".len()..];
    let block = &block[..block.find("```").unwrap()];
    let (mut top, mut folder) = (PathBuf::new(), PathBuf::new());
    let mut paths = Vec::new();
    for line in block.lines() {
        let indent = line.len() - line.trim_start().len();
        let name = line.trim_start().split("  ").next().unwrap_or_default();
        if name.is_empty() {
            continue;
        }
        let path = match indent {
            0 => {
                top = PathBuf::from(name);
                top.clone()
            }
            2 => {
                folder = top.join(name);
                folder.clone()
            }
            4 => folder.join(name),
            _ => continue,
        };
        paths.push(path);
    }
    paths
}

#[test]
fn every_path_in_the_readme_layout_map_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let paths = mapped_paths(&readme);
    assert!(paths.len() > 40, "the map was not read: {paths:?}");
    let missing: Vec<_> = paths.iter().filter(|p| !root.join(p).exists()).collect();
    assert!(
        missing.is_empty(),
        "the README's layout map names paths that do not exist: {missing:?}"
    );
}

/// The check can fail: a map naming a file that is not there is caught.
#[test]
fn a_map_naming_a_missing_file_is_caught() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let map = "```text\nstate/   the crate\n  src/no_such_file.rs   gone\n```\n";
    let paths = mapped_paths(map);
    assert_eq!(
        paths,
        [
            PathBuf::from("state"),
            PathBuf::from("state/src/no_such_file.rs")
        ]
    );
    assert!(!root.join(&paths[1]).exists());
}

/// The `.rs` files ARCHITECTURE.md names in backticks.
fn named_files(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|quoted| quoted.ends_with(".rs") && !quoted.contains(' '))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_file_architecture_md_names_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let text = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let files = named_files(&text);
    assert!(files.len() > 15, "the names were not read: {files:?}");
    let bases = [
        root.to_path_buf(),
        root.join("processor/src"),
        root.join("state/src"),
    ];
    let missing: Vec<_> = files
        .iter()
        .filter(|file| !bases.iter().any(|base| base.join(file).exists()))
        .collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names files that do not exist: {missing:?}"
    );
    assert_eq!(
        named_files("see `task/gone.rs` and `a b.rs`"),
        ["task/gone.rs"]
    );
}
