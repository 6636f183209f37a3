//! The README's layout map matches the tree: every path it names exists. A map entry is a line of the
//! map's code block indented 0 (a top-level folder), 2 (a path in that folder) or 4 spaces (a path in
//! the folder named by the entry above it), its name running up to the first gap of two spaces; deeper
//! lines continue a description.

// Test code: a failed step is a failed run.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

/// The paths the README's layout map names, relative to the repository root.
fn mapped_paths(readme: &str) -> Vec<PathBuf> {
    let start = readme
        .find("```\nstate/ ")
        .expect("the README's layout map (a code block starting with `state/`)");
    let block = &readme[start + 4..];
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
    let map = "```\nstate/   the crate\n  src/no_such_file.rs   gone\n```\n";
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
