//! A Kafka stream processor with per-partition local state, run as a fleet coordinated through the
//! [`state`] crate (package `fenced-state`): your job, on as many instances as you like, with
//! exactly-once state and outputs through crashes and hand-offs.
//!
//! # Run your job on a fleet
//!
//! Write a [`job::Job`] — typed key, value, state and output — and run it with an [`Instance`] in every
//! process of the fleet. The instances share one lock URL (`redis://…`, `redlock://…`, `postgres://…`,
//! `etcd://…`; `memory` for one process) and one checkpoint directory, and divide the topic's
//! partitions among themselves; kill one, add one, and its partitions move with their state.
//!
//! ```no_run
//! use std::sync::Arc;
//! use processor::job::{Context, Input, Job, JobError, JobOperator, codec};
//! use processor::{CancellationToken, Instance, InstanceConfig, Services};
//!
//! /// Page views per user.
//! struct ViewsPerUser;
//!
//! impl Job for ViewsPerUser {
//!     type Key = String;
//!     type KeyCodec = codec::Utf8;
//!     type Value = serde_json::Value;
//!     type ValueCodec = codec::Json;
//!     type State = u64;
//!     type StateCodec = codec::Bincode;
//!     type Output = u64;
//!     type OutputCodec = codec::Json;
//!
//!     fn process(&self, _view: Input<'_, String, serde_json::Value>, ctx: &mut Context<'_, Self>) -> Result<(), JobError> {
//!         let views = ctx.update_state(|views| Some(views.unwrap_or(0) + 1))?.unwrap_or(0);
//!         ctx.emit(&views)?; // to the output topic, exactly once, under the record's key
//!         Ok(())
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> processor::ProcessorResult<()> {
//!     let mut services = Services::connect("redis://127.0.0.1:6379", "/shared/checkpoints").await?;
//!     services.operator = Arc::new(JobOperator::new(ViewsPerUser));
//!     let config = InstanceConfig::new("instance-1", "page-views", 8, "127.0.0.1:9092", "/var/lib/views".into())
//!         .with_group("views-per-user")
//!         .with_output_topic("views-per-user");
//!     let stop = CancellationToken::new(); // cancel it to hand the partitions off and stop
//!     Instance::new(config, services)?.run(stop).await
//! }
//! ```
//!
//! Before the fleet, try the job on one partition with no broker at all: the [`job`] module's example
//! runs records through a `PartitionProcessor` over an in-memory store. The repository's
//! `docs/jobs.md` goes from zero to a fleet of your job, `docs/operations.md` runs one, and
//! `examples/examples/fraud_counters.rs` is a complete job with its fleet demo
//! (`cargo run -p examples --example fraud_counters`).
//!
//! # The crate
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

// docs.rs (and `RUSTDOCFLAGS="--cfg docsrs" cargo +nightly doc`): items behind a cargo feature say which.
#![cfg_attr(docsrs, feature(doc_cfg))]

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
/// Stops an [`Instance`] (re-exported from `tokio-util`): cancel it, and the instance hands its
/// partitions off and returns.
pub use tokio_util::sync::CancellationToken;

/// The repository's README ("Use it from your own crate"), compiled and run as doctests here, where
/// both libraries are built.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct RepositoryReadme;
