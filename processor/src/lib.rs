//! The stream processor: Kafka partitions consumed into per-partition local state, run as a fleet
//! coordinated through the [`state`] crate.
//!
//! The rooms, from the record's way in to its way out:
//! - [`source`]: reading Kafka — the consumer of one owned partition (`assign()` from the offset stored
//!   with the state), its fetches, the group's committed offset, watermarks;
//! - [`task`]: one owned partition's life from claim to hand-off — open (restore or reuse), the consume
//!   loop of atomic batches ([`task::consume_partition`]), checkpoints, hand-off;
//! - [`partition`]: one owned partition's processing — operator, one atomic batch of state + next offset
//!   under the ownership fencing token, replays skipped (exactly-once state), nothing written once lost;
//! - [`job`]: your own job on the fleet — typed keys and values, what a record does to its key's
//!   state, what a refused record does ([`job::OnError`]);
//! - [`operator`]: the [`operator::Operator`] trait the partition runs (a job is one);
//! - [`aggregation`]: the built-in keyed aggregation (`{count, sum, min, max, chain}` per key,
//!   malformed values to the dead letters);
//! - [`store`]: per-partition state stores behind [`store::PartitionStore`], opened through a
//!   [`store::StoreFactory`] (RocksDB with a shared block cache and write-buffer manager, or in memory);
//! - [`progress`]: a partition's progress clock, which the fleet's watchdog reads;
//! - [`sink`]: outputs and dead letters, delivered before the batch that produced them commits;
//! - `kafka_calls`: blocking librdkafka calls under the processor's own deadline, and clients dropped off
//!   the async workers;
//! - [`checkpoint`]: checkpoints in a shared store (manifests written last, checksums, incremental
//!   uploads, retention) and the typed, fenced checkpoint record;
//! - [`fleet`]: instances sharing a topic — membership, assignment, partition claims as kept locks, one
//!   [`task`] per owned partition, standbys, the watchdog, leader-scheduled maintenance;
//! - [`status`]: what an instance reports about itself;
//! - [`config`]: the instance configuration and its validation;
//! - [`kafka_settings`]: the bootstrap servers and librdkafka client properties of every client;
//! - [`services`]: the backends an instance coordinates through, built from one lock URL;
//! - [`resources`]: every lock, record and task name the fleet coordinates on;
//! - [`inspect`]: reading what the fleet checkpointed;
//! - [`http`]: the operations endpoint — metrics, health and readiness, status, the dashboard, queries
//!   of live state, and who may ask ([`http::HttpAccess`]);
//! - [`dev`]: development fixtures — the mock-cluster broker, the deterministic workload and the demo;
//! - [`error`]: the one error type.
//!
//! The `processor` binary (package `processor-cli`) adds the command line and the demo's terminal UI;
//! this library depends on neither.

pub mod aggregation;
pub mod checkpoint;
pub mod config;
pub mod dev;
pub mod error;
pub mod fleet;
mod hash;
pub mod http;
pub mod inspect;
pub mod job;
mod kafka_calls;
pub mod kafka_settings;
pub mod operator;
pub mod partition;
pub mod progress;
pub mod resources;
pub mod services;
pub mod sink;
pub mod source;
pub mod status;
pub mod store;
pub mod task;

pub use config::{InstanceConfig, MaintenanceConfig, MissingOffsets, OutputGuarantee};
pub use error::{ProcessorError, ProcessorResult};
pub use fleet::{Instance, InstanceStatus};
pub use kafka_settings::KafkaSettings;
pub use services::Services;
