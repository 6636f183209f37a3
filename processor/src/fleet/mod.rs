//! The fleet: instances of one job that share a topic's partitions, coordinated through the `state`
//! crate rather than Kafka's group rebalancing.
//!
//! - [`instance`]: one [`Instance`] — membership ticks, assignment, partition claims, fleet duties;
//! - [`membership`]: member slots and the rendezvous assignment with bounded loads;
//! - `local_dirs`: partitions' local state directories and their marked scratch siblings;
//! - [`partition_task`]: one owned partition's life — restore or reuse, consume, checkpoint, hand off;
//! - [`maintenance`]: retention and compaction of the shared checkpoints, scheduled by the leader on the
//!   distributed task queue and run by followers under the per-partition compaction lock;
//! - `standby`: warm copies of partitions owned elsewhere (standby replicas), refreshed from their
//!   checkpoints;
//! - [`query`]: queries of live state, answered by a partition's owner;
//! - [`status`]: what an instance reports about itself;
//! - `watchdog`: the progress watchdog that gives up a partition holding its claim without moving;
//! - `backoff`: when a partition this instance gave up (failed, or stopped at a refused record) may be
//!   claimed again.

mod backoff;
pub mod instance;
mod local_dirs;
pub mod maintenance;
pub mod membership;
pub mod partition_task;
pub mod query;
pub mod readiness;
mod standby;
pub mod status;
mod watchdog;

pub use instance::Instance;
pub use status::InstanceStatus;
