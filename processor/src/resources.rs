//! The names the fleet coordinates on, in one place: lock resources, fenced-record scopes and task ids.
//! Every name that two instances must agree on is built here and nowhere else.
//!
//! | name | what |
//! |---|---|
//! | `partition:{topic}:{p}` | the kept claim of a partition's owner |
//! | `member:{group}:{slot}` | a membership slot (see [`crate::fleet::membership`]) |
//! | `leader:{group}` | the leader election |
//! | `checkpoint:{group}:{topic}:{p}` | the fenced checkpoint record of a partition |
//! | `maintain:{group}:{topic}:{p}` | the recurring maintenance job of a partition |
//! | `compaction:partition:{p}` | the compaction lock (the `state` compaction recipe's name) |

/// The lock resource that owns partition `partition` of `topic`; held as a kept lock by its owner.
pub fn partition_resource(topic: &str, partition: i32) -> String {
    format!("partition:{topic}:{partition}")
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
        assert_eq!(partition_resource("orders", 3), "partition:orders:3");
        assert!(state::lock::validate_resource(&partition_resource("orders", 3)).is_ok());
        assert_eq!(checkpoint_scope("g", "orders", 3), "g:orders:3");
        assert_eq!(maintenance_task_id("g", "orders", 3), "maintain:g:orders:3");
    }
}
