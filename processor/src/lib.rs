//! The stream processor: Kafka partitions consumed into per-partition local state, run as a fleet
//! coordinated through the [`state`] crate.
//!
//! **What an embedder uses** (the documented surface):
//! - [`Instance`] and [`InstanceConfig`] ([`config`]): one member of a fleet, its settings and their
//!   validation; [`Services`] ([`services`]): the backends it coordinates through, from one lock URL;
//! - [`job`]: your own job on the fleet — typed keys and values, what a record does to its key's state,
//!   what a refused record does ([`job::OnError`]); [`operator`]: the lower-level [`operator::Operator`]
//!   trait a job implements; [`aggregation`]: the built-in keyed aggregation;
//! - [`store`] and [`checkpoint`]: the per-partition state stores ([`store::PartitionStore`], RocksDB or
//!   in memory) and the shared checkpoint store ([`checkpoint::CheckpointStore`]), both replaceable;
//! - [`fleet`]: membership and assignment, queries of live state, maintenance; [`status`]: what an
//!   instance reports about itself; [`http`]: the operations endpoint (metrics, probes, status, the
//!   dashboard, live queries, and who may ask: [`http::HttpAccess`]); [`inspect`]: reading what a fleet
//!   checkpointed;
//! - [`kafka_settings`]: the brokers and librdkafka properties of every client; [`error`]: the one
//!   error type.
//!
//! **Inside** (public for this crate's binary, tests and benches, hidden from these docs, not a stable
//! API): `task` (one owned partition's life from claim to hand-off, and its consume loop), `source`
//! (reading Kafka), `partition` (one atomic batch of state, next offset and fencing token), `sink`
//! (outputs: acknowledged, or one transaction per batch), `progress` (the watchdog's clock),
//! `resources` (every lock, record and task name), `dev` (the mock-cluster broker, the deterministic
//! workload and the demo). `ARCHITECTURE.md` at the repository's root walks the floors
//! (`fleet → task → {source, partition, sink, checkpoint} → store`) and a record's trip.
//!
//! The `processor` binary (package `processor-cli`) adds the command line and the demo's terminal UI;
//! this library depends on neither.

pub mod aggregation;
pub mod checkpoint;
pub mod config;
#[doc(hidden)]
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
#[doc(hidden)]
pub mod partition;
#[doc(hidden)]
pub mod progress;
#[doc(hidden)]
pub mod resources;
pub mod services;
#[doc(hidden)]
pub mod sink;
#[doc(hidden)]
pub mod source;
pub mod status;
pub mod store;
#[doc(hidden)]
pub mod task;

pub use config::{InstanceConfig, MaintenanceConfig, MissingOffsets, OutputGuarantee};
pub use error::{ProcessorError, ProcessorResult};
pub use fleet::{Instance, InstanceStatus};
pub use kafka_settings::KafkaSettings;
pub use services::Services;
