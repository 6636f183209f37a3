//! The append-only history of a torture run: one JSON line per event, written by the workers (critical
//! sections) and the orchestrator (kills), read back by the checker.
//!
//! A critical section leaves two lines: an [`Event::Intent`] just before its fenced write (so a holder
//! killed after the write still leaves a trace) and an [`Event::Outcome`] after it. Lines are flushed one
//! by one; a line torn by a SIGKILL is skipped when reading.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What the fenced store said to a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteOutcome {
    /// The store took the write.
    Accepted,
    /// The store refused it: a higher token had written.
    Rejected,
    /// The store failed (the outcome is unknown).
    Failed,
}

/// One line of a history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A holder of `resource` with `token` (since `start_ns`, when its acquire returned) is about to
    /// write `value` (the counter it read + 1).
    Intent {
        /// The worker process (numbered by the orchestrator).
        process: u32,
        /// The task within the process.
        task: u32,
        /// The locked resource.
        resource: String,
        /// The lock's fencing token.
        token: u64,
        /// When the lock was granted.
        start_ns: u64,
        /// When the holder's read of the counter returned (a fence of the key, when fencing is on).
        read_ns: u64,
        /// When the write was sent (just after this line).
        write_ns: u64,
        /// The value about to be written.
        value: u64,
    },
    /// The write of the section with `token` ended at `end_ns` (the end of the critical section).
    Outcome {
        /// The worker process.
        process: u32,
        /// The task within the process.
        task: u32,
        /// The locked resource.
        resource: String,
        /// The lock's fencing token.
        token: u64,
        /// When the write returned.
        end_ns: u64,
        /// What the store said.
        write: WriteOutcome,
    },
    /// The orchestrator killed `process` (SIGKILL) at `at_ns`: none of its sections lasts past that.
    Killed {
        /// The worker process.
        process: u32,
        /// When the kill was sent.
        at_ns: u64,
    },
}

/// Now on `CLOCK_MONOTONIC`, in nanoseconds: one clock for every process of the machine (libfaketime is
/// told to leave it alone).
pub fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always readable on Linux");
    let seconds = u64::try_from(now.tv_sec()).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec()).unwrap_or(0);
    seconds * 1_000_000_000 + nanos
}

/// Appends events to one history file, a flushed line each.
#[derive(Debug)]
pub struct HistoryWriter {
    file: File,
}

impl HistoryWriter {
    /// Opens (creating or appending to) `path`.
    ///
    /// # Errors
    /// When the file cannot be opened.
    pub fn open(path: &Path) -> std::io::Result<HistoryWriter> {
        let file = File::options().create(true).append(true).open(path)?;
        Ok(HistoryWriter { file })
    }

    /// Appends `event` as one line (one `write` call, so concurrent writers never interleave within a
    /// line).
    ///
    /// # Errors
    /// When the write fails.
    pub fn append(&mut self, event: &Event) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.flush()
    }
}

/// Every event of every `*.jsonl` file in `dir` (torn lines skipped), in file order.
///
/// # Errors
/// When the directory or a file cannot be read.
pub fn read_dir(dir: &Path) -> std::io::Result<Vec<Event>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "jsonl"))
        .collect();
    paths.sort();
    let mut events = Vec::new();
    for path in paths {
        for line in BufReader::new(File::open(&path)?).lines() {
            if let Ok(event) = serde_json::from_str(&line?) {
                events.push(event);
            }
        }
    }
    Ok(events)
}
