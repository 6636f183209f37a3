//! What an instance is doing, published on a `watch` channel for operators, the demo, tests and the
//! HTTP `/status` endpoint (it serialises to the JSON that endpoint serves).

use std::collections::{BTreeMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Recent hand-offs kept in the status (oldest dropped first).
pub const RECENT_HAND_OFFS: usize = 20;

/// What an instance is doing, for operators and the demo.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct InstanceStatus {
    /// This instance's id.
    pub instance_id: String,
    /// Its fleet (group).
    pub group: String,
    /// The topic it consumes.
    pub topic: String,
    /// The live members it sees.
    pub members: Vec<String>,
    /// Where each live member serves its status (members started with an HTTP endpoint), by id.
    pub member_endpoints: BTreeMap<String, String>,
    /// The topic's partition count as this instance last read it (grows when partitions are added).
    pub partitions: i32,
    /// Owned partitions and the fencing token of each claim.
    pub owned: BTreeMap<i32, u64>,
    /// What each owned partition is doing.
    pub partition_status: BTreeMap<i32, PartitionStatus>,
    /// Whether it leads the fleet now.
    pub leader: bool,
    /// The fencing token of its current leadership term (while leading).
    pub leader_term: Option<u64>,
    /// Records applied to state (since start; replays after a restore count again).
    pub processed: u64,
    /// Malformed records sent to the dead letters.
    pub dead_letters: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Partitions whose state was restored from a checkpoint (rather than reused from local disk).
    pub restores: u64,
    /// Partitions this instance keeps a standby copy of, and the offset that copy covers (`None` until
    /// its first refresh).
    pub standbys: BTreeMap<i32, Option<i64>>,
    /// Partitions this instance started owning from a current local copy (a standby's, or its own
    /// from an earlier ownership) with nothing to restore.
    pub local_starts: u64,
    /// Of those, starts that took a standby's copy over with its database already open (nothing opened
    /// on the takeover's path).
    pub open_copy_starts: u64,
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
    /// Partitions this instance recently started or stopped owning, newest last.
    pub hand_offs: VecDeque<HandOff>,
    /// Partitions the progress watchdog gave up (they held their claim without moving; see
    /// [`InstanceConfig::stall_timeout`](crate::InstanceConfig::stall_timeout)).
    pub stalls: u64,
    /// Partitions this instance gave up and holds back from claiming for now: after failures in a row
    /// (a pause doubling from 0.5 s to 30 s) or a record their job refused.
    pub backoffs: BTreeMap<i32, PartitionBackoffStatus>,
}

/// A partition held back from claiming (see [`InstanceStatus::backoffs`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PartitionBackoffStatus {
    /// Its tasks' failures in a row (0 when only a refused record holds it back).
    pub failures: u32,
    /// When this instance may claim it again, in milliseconds since the Unix epoch.
    pub retry_at_ms: u64,
}

/// One owned partition, as its task last reported it (about twice a second).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PartitionStatus {
    /// The fencing token of this instance's claim.
    pub fencing_token: u64,
    /// Whether its state is open and it consumes (`false` while it restores or catches up on outputs
    /// already committed).
    pub processing: bool,
    /// The next offset to apply (everything below it is in the state).
    pub next_offset: i64,
    /// The partition's end offset as the consumer last saw it (`None` until the first fetch).
    pub high_watermark: Option<i64>,
    /// Where its consumer fetches next (`None` until known): past the records applied, and past
    /// transaction markers, which hold no record — so at the log end it equals the high watermark
    /// even when [`next_offset`](Self::next_offset) cannot.
    pub fetch_position: Option<i64>,
    /// Records between the state and the log end (`None` until the first fetch).
    pub lag: Option<i64>,
    /// Approximate bytes of its local state (files and memtables).
    pub state_bytes: u64,
    /// Records applied by this claim.
    pub processed: u64,
    /// When its last checkpoint was recorded, in milliseconds since the Unix epoch.
    pub last_checkpoint_ms: Option<u64>,
    /// When its claim expires unless renewed (renewed every third of the TTL), in milliseconds since the
    /// Unix epoch.
    pub claim_expires_ms: u64,
}

/// A partition this instance started or stopped owning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct HandOff {
    /// The partition.
    pub partition: i32,
    /// `claimed` (with the new fencing token) or `released` (or `failed`, with the task's error).
    pub event: String,
    /// The claim's fencing token.
    pub fencing_token: u64,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl InstanceStatus {
    /// Remembers a hand-off, keeping the last [`RECENT_HAND_OFFS`].
    pub(crate) fn record_hand_off(&mut self, partition: i32, event: &str, fencing_token: u64) {
        if self.hand_offs.len() >= RECENT_HAND_OFFS {
            self.hand_offs.pop_front();
        }
        self.hand_offs.push_back(HandOff {
            partition,
            event: event.to_owned(),
            fencing_token,
            at_ms: unix_ms(SystemTime::now()),
        });
    }
}

/// Milliseconds since the Unix epoch (0 for a time before it).
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `deadline` (a monotonic instant) as milliseconds since the Unix epoch.
pub(crate) fn instant_to_unix_ms(deadline: tokio::time::Instant) -> u64 {
    let now = tokio::time::Instant::now();
    let wall = SystemTime::now();
    let at = if deadline >= now {
        wall + (deadline - now)
    } else {
        wall - (now - deadline)
    };
    unix_ms(at)
}
