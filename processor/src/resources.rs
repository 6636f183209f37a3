//! The names the fleet coordinates on, in one place: lock resources, fenced-record scopes and task ids.
//! Every name that two instances must agree on is built here and nowhere else.
//!
//! Every name is scoped by the fleet's group, so two jobs on one topic and one lock backend never
//! share (or split) partitions, records or maintenance.
//!
//! | name | what |
//! |---|---|
//! | `partition:{group}:{topic}:{p}` | the kept claim of a partition's owner |
//! | `member:{group}:{slot}` | a membership slot (see [`crate::fleet::membership`]) |
//! | `leader:{group}` | the leader election |
//! | `checkpoint:{group}:{topic}:{p}` | the fenced checkpoint record of a partition |
//! | `maintain:{group}:{topic}:{p}` | the recurring maintenance job of a partition |
//! | `compaction:{group}:{topic}:{p}` | the compaction lock (uploads and retention exclude each other) |
//! | `{checkpoint dir}/{group}/` | the fleet's shared checkpoints ([`checkpoint_root`]) |
//! | `{state dir}/{group}/{topic}-{p}` | an owned partition's local state ([`local_state_dir`]) |

use std::path::{Path, PathBuf};

/// The lock resource that owns partition `partition` of `topic` in fleet `group`; held as a kept lock
/// by its owner.
pub fn partition_resource(group: &str, topic: &str, partition: i32) -> String {
    format!("partition:{group}:{topic}:{partition}")
}

/// The compaction lock of `partition` of `topic` in fleet `group`.
pub fn compaction_resource(group: &str, topic: &str, partition: i32) -> String {
    format!("compaction:{group}:{topic}:{partition}")
}

/// Where fleet `group` keeps its shared checkpoints under the configured checkpoint directory.
pub fn checkpoint_root(checkpoint_dir: &Path, group: &str) -> PathBuf {
    checkpoint_dir.join(group)
}

/// Where an instance keeps the local state of `partition` of `topic` for fleet `group`.
pub fn local_state_dir(state_dir: &Path, group: &str, topic: &str, partition: i32) -> PathBuf {
    state_dir.join(group).join(format!("{topic}-{partition}"))
}

/// The [`CheckpointCoordinator`](state::recipes::checkpoint::CheckpointCoordinator) scope of a
/// partition's checkpoint record (lock and record `checkpoint:{group}:{topic}:{partition}`).
pub fn checkpoint_scope(group: &str, topic: &str, partition: i32) -> String {
    format!("{group}:{topic}:{partition}")
}

/// The id of the recurring maintenance job of `partition` of `topic` in fleet `group`.
pub fn maintenance_task_id(group: &str, topic: &str, partition: i32) -> String {
    format!("maintain:{group}:{topic}:{partition}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_follow_the_documented_scheme() {
        assert_eq!(partition_resource("g", "orders", 3), "partition:g:orders:3");
        assert!(state::lock::validate_resource(&partition_resource("g", "orders", 3)).is_ok());
        assert_eq!(
            compaction_resource("g", "orders", 3),
            "compaction:g:orders:3"
        );
        assert_eq!(checkpoint_scope("g", "orders", 3), "g:orders:3");
        assert_eq!(maintenance_task_id("g", "orders", 3), "maintain:g:orders:3");
    }
}
