//! A full disk under the state directory (a 256 KiB tmpfs): the processor stops, exiting non-zero with
//! one line that names the cause and the directory — before this fix it moved its state aside as
//! "unreadable" and retried forever (951 directories in a minute, never an error). Restarted with space,
//! the same group ends with the exact state: nothing it acknowledged was lost.
//!
//! Mounting a tmpfs needs root: the test command runs as root (CI does); elsewhere the test says it was
//! skipped and why.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support;
use crate::support::{
    PARTITIONS, Proc, TOPIC, assert_state_is_exact, dev_broker, fails_with, offsets, processor,
    produce, wait_for,
};
use nix::sys::signal::Signal;
use processor::dev::Workload;

/// A mounted tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mount a {size} tmpfs on {}",
            dir.display()
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn run_args<'a>(brokers: &'a str, state: &'a str, checkpoints: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--brokers",
        brokers,
        "--topic",
        TOPIC,
        "--group",
        "procs",
        "--instance-id",
        "x",
        "--single-instance",
        "--state-dir",
        state,
        "--checkpoint-dir",
        checkpoints,
        "--create-checkpoint-dir",
        "--checkpoint-interval-secs",
        "0.5",
    ]
}

#[test]
fn a_full_state_disk_stops_the_instance_with_one_clear_line_and_loses_nothing() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: mounting a tmpfs needs root (the test command runs as root in CI)");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    let tiny = Tmpfs::mount(&root.join("tiny"), "256k");
    let (full_state, checkpoints) = (tiny.0.join("state"), root.join("checkpoints"));
    let (full_state, checkpoints_str) =
        (full_state.to_str().unwrap(), checkpoints.to_str().unwrap());

    let (mut broker, brokers) = dev_broker();
    let workload = Workload {
        records: 20_000,
        keys: 200,
        seed: 3,
        partitions: PARTITIONS,
    };
    produce(&brokers, &workload, 0..workload.records);

    let err = fails_with(&run_args(&brokers, full_state, checkpoints_str));
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(
        last.contains("No space left on device")
            && last.contains(full_state)
            && last.contains("free space"),
        "{last}"
    );
    let aside = walk(&tiny.0)
        .into_iter()
        .filter(|path| path.to_string_lossy().contains(".unreadable-"))
        .count();
    assert_eq!(aside, 0, "state moved aside as unreadable on a full disk");

    // With space, the same group finishes from whatever was checkpointed: exact.
    let roomy = root.join("state");
    let expected_ends = support::end_offsets(&workload);
    let mut instance = Proc(
        processor(&run_args(
            &brokers,
            roomy.to_str().unwrap(),
            checkpoints_str,
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap(),
    );
    wait_for(
        "the restarted instance to catch up",
        Duration::from_secs(120),
        root,
        || {
            let now = offsets(&checkpoints);
            (0..PARTITIONS).all(|p| now.get(&p) == Some(expected_ends.get(&p).unwrap_or(&0)))
        },
    );
    instance.signal(Signal::SIGTERM);
    assert!(instance.wait_exit(Duration::from_secs(30)).success());
    broker.signal(Signal::SIGTERM);
    let _ = broker.wait_exit(Duration::from_secs(10));
    assert_state_is_exact(&checkpoints, &workload);
}

/// Every path under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            found.extend(walk(&path));
            found.push(path);
        }
    }
    found
}
