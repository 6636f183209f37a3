//! Retention decides "unused for the grace period" on the checkpoint store's clock alone: an uploader
//! whose wall clock is hours behind, or a cleaner whose clock is hours ahead, never gets a file that an
//! upload just reused deleted. Each skewed party is this test binary run again under libfaketime (a
//! separate process with its own wall clock), doing one step through the public API.

// Test code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::clock_skew::skew_clock;
use processor::checkpoint::{CheckpointStore, DirectoryCheckpointStore};

const TOPIC: &str = "orders";
const GRACE: Duration = Duration::from_secs(600);

/// Runs the ignored step `name` of this binary with its wall clock shifted by `offset`, on `root`.
fn run_skewed(name: &str, offset: &str, root: &Path) {
    // Test names are paths below the binary's root (`checkpoint_clock::step`).
    let suite = module_path!()
        .split_once("::")
        .map_or("", |(_, suite)| suite);
    let name = format!("{suite}::{name}");
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--ignored", "--exact", &name, "--nocapture"])
        .env("CHECKPOINT_ROOT", root);
    let output = skew_clock(&mut command, offset).output().unwrap();
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("1 passed"),
        "the skewed step {name} did not run: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn root() -> PathBuf {
    PathBuf::from(
        std::env::var_os("CHECKPOINT_ROOT").expect("run by checkpoint_clock's parent test"),
    )
}

fn snapshot(root: &Path) -> PathBuf {
    root.join("snapshot")
}

fn blobs(store_root: &Path) -> usize {
    std::fs::read_dir(
        store_root
            .join("shared")
            .join(TOPIC)
            .join("0")
            .join("files"),
    )
    .unwrap()
    .count()
}

/// Drops every manifest, so the files stand unreferenced, as they do between an upload's reuse of them
/// and its manifest becoming visible: only their recent use protects them then.
fn unreference_all(store_root: &Path) {
    let manifests = store_root
        .join("shared")
        .join(TOPIC)
        .join("0")
        .join("manifests");
    for entry in std::fs::read_dir(manifests).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
}

#[test]
#[ignore = "a step run by reused_files_survive_retention_whatever_the_clocks_say under libfaketime"]
fn step_upload_reusing_files() {
    let root = root();
    let store = DirectoryCheckpointStore::new(root.join("shared")).unwrap();
    let report = store.upload(TOPIC, 0, &snapshot(&root), 20, 1).unwrap();
    assert!(report.reused_files > 0, "the step must reuse (touch) files");
}

#[test]
#[ignore = "a step run by reused_files_survive_retention_whatever_the_clocks_say under libfaketime"]
fn step_retain() {
    let store = DirectoryCheckpointStore::new(root().join("shared")).unwrap();
    store.retain(TOPIC, 0, 1, GRACE, None).unwrap();
}

#[test]
fn reused_files_survive_retention_whatever_the_clocks_say() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(snapshot(root)).unwrap();
    std::fs::write(snapshot(root).join("000007.sst"), b"sorted data").unwrap();
    std::fs::write(snapshot(root).join("CURRENT"), b"MANIFEST-000009\n").unwrap();
    let store = DirectoryCheckpointStore::new(root.join("shared")).unwrap();
    store.upload(TOPIC, 0, &snapshot(root), 10, 1).unwrap();
    let files = blobs(root);

    // An uploader two hours behind reuses the files; a cleaner on time must see them as just used.
    run_skewed("step_upload_reusing_files", "-2h", root);
    unreference_all(root);
    store.retain(TOPIC, 0, 1, GRACE, None).unwrap();
    assert_eq!(
        blobs(root),
        files,
        "files reused by a slow-clocked uploader were deleted"
    );

    // A cleaner two hours ahead must not see files used a moment ago as unused for two hours.
    store.upload(TOPIC, 0, &snapshot(root), 30, 1).unwrap();
    unreference_all(root);
    run_skewed("step_retain", "+2h", root);
    assert_eq!(
        blobs(root),
        files,
        "a fast-clocked cleaner deleted files just used"
    );

    // Negative control: with no grace at all, unreferenced files do go (the check above can fail).
    store.retain(TOPIC, 0, 1, Duration::ZERO, None).unwrap();
    assert_eq!(blobs(root), 0, "unreferenced files outlived a zero grace");
}
