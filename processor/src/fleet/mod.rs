//! The fleet: instances of one job that share a topic's partitions, coordinated through the `state`
//! crate rather than Kafka's group rebalancing.
//!
//! - [`instance`]: one [`Instance`] — membership ticks, assignment, partition claims (each owned
//!   partition run by a [`crate::task`]), standby copies started and stopped, fleet duties;
//! - [`membership`]: the job's roster of live members and the rendezvous assignment with bounded loads;
//! - [`maintenance`]: retention and compaction of the shared checkpoints, scheduled by the leader on the
//!   distributed task queue and run by followers under the per-partition compaction lock;
//! - [`query`]: queries of live state, answered by a partition's owner;
//! - `watchdog`: the progress watchdog that gives up a partition holding its claim without moving;
//! - `backoff`: when a partition this instance gave up (failed, or stopped at a refused record) may be
//!   claimed again.

mod backoff;
pub mod instance;
pub mod maintenance;
pub mod membership;
pub mod query;
pub mod readiness;
mod watchdog;

pub use crate::status::InstanceStatus;
pub use instance::Instance;
