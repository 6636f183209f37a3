//! The stream processor: Kafka partitions consumed into per-partition local state, run as a fleet
//! coordinated through the [`state`] crate.
//!
//! This crate is at its start: the consumer, the RocksDB partition stores, checkpoints and the
//! `processor` binary are tracked in the processor issue. Today it only fixes the naming of the
//! coordination resources the fleet will lock, so that other tools can already agree on them.

/// The lock resource that owns partition `partition` of `topic`; held as a kept lock by its owner.
pub fn partition_resource(topic: &str, partition: i32) -> String {
    format!("partition:{topic}:{partition}")
}

/// The lock resource that serialises compaction of one partition's state.
pub fn compaction_resource(partition: i32) -> String {
    format!("compaction:partition:{partition}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_follow_the_documented_scheme() {
        assert_eq!(partition_resource("orders", 3), "partition:orders:3");
        assert_eq!(compaction_resource(7), "compaction:partition:7");
        assert!(state::lock::validate_resource(&partition_resource("orders", 3)).is_ok());
    }
}
