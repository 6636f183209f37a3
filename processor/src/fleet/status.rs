//! What an instance is doing, published on a `watch` channel for operators, the demo and tests.

use std::collections::BTreeMap;

/// What an instance is doing, for operators and the demo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstanceStatus {
    /// The live members it sees.
    pub members: Vec<String>,
    /// The topic's partition count as this instance last read it (grows when partitions are added).
    pub partitions: i32,
    /// Owned partitions and the fencing token of each claim.
    pub owned: BTreeMap<i32, u64>,
    /// Whether it leads the fleet now.
    pub leader: bool,
    /// Records applied to state (since start; replays after a restore count again).
    pub processed: u64,
    /// Malformed records sent to the dead letters.
    pub dead_letters: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Partitions whose state was restored from a checkpoint (rather than reused from local disk).
    pub restores: u64,
    /// Maintenance jobs claimed from the task queue.
    pub task_claims: u64,
    /// Of those, compactions that ran under the partition's compaction lock.
    pub compactions: u64,
    /// The last maintenance job and its outcome.
    pub last_task: Option<String>,
    /// Corrupt checkpoints skipped when restoring (a newer one was damaged; an older one was restored and
    /// replayed).
    pub corrupt_checkpoints_skipped: u64,
    /// Why each partition's task last ended with an error (cleared when a task of it ends cleanly), for
    /// operators.
    pub partition_errors: BTreeMap<i32, String>,
}
