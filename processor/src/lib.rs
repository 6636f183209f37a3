//! The stream processor: Kafka partitions consumed into per-partition local state, run as a fleet
//! coordinated through the [`state`] crate.
//!
//! The modules:
//! - [`store`]: per-partition state stores behind [`store::PartitionStore`] (RocksDB with a shared block
//!   cache and write-buffer manager, and in-memory), where state updates, the next offset and the owner's
//!   fencing token are applied in one atomic batch;
//! - [`checkpoint`]: checkpoints in a shared store with manifests written last and atomically, checksums,
//!   incremental uploads, fenced publishing and retention;
//! - [`operator`]: the [`operator::Operator`] trait and the built-in keyed aggregation
//!   (`{count, sum, min, max, chain}` per key, malformed values to the dead letters);
//! - [`partition`]: one owned partition's processing — operator, atomic batch of state + next offset
//!   under the ownership fencing token, replays skipped (exactly-once state), nothing written once lost;
//! - [`kafka`]: the mock cluster as a development broker, a deterministic workload with its exact
//!   expected result, and the `assign()`-based consume loop of one partition;
//! - [`fleet`]: one fleet instance — membership, rendezvous assignment, claims as kept locks, one task
//!   per owned partition (restore or reuse, consume, checkpoint, hand off);
//! - [`ownership`]: fleet membership through member-slot leases and rendezvous assignment of partitions;
//! - [`maintenance`]: retention and compaction of the shared checkpoints, scheduled by the elected leader
//!   through the distributed task queue and run by followers under the per-partition compaction lock;
//! - [`inspect`]: the checkpointed offsets and aggregates, as `processor state` prints them;
//! - [`demo`]: the fleet demo (`processor demo`) with its verdict against a recomputation;
//! - [`services`]: the backends an instance coordinates through, built from one lock URL;
//! - the lock resource names the fleet coordinates on.

pub mod checkpoint;
pub mod demo;
pub mod error;
pub mod fleet;
pub mod inspect;
pub mod kafka;
pub mod maintenance;
pub mod operator;
pub mod ownership;
pub mod partition;
pub mod services;
pub mod store;

pub use error::{ProcessorError, ProcessorResult};
pub use services::Services;

/// The lock resource that owns partition `partition` of `topic`; held as a kept lock by its owner.
pub fn partition_resource(topic: &str, partition: i32) -> String {
    format!("partition:{topic}:{partition}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_follow_the_documented_scheme() {
        assert_eq!(partition_resource("orders", 3), "partition:orders:3");
        assert!(state::lock::validate_resource(&partition_resource("orders", 3)).is_ok());
    }
}
