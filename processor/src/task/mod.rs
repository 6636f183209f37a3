//! A partition task: one owned partition's life on an instance, from its claim to its hand-off. The
//! fleet ([`crate::fleet`]) decides which partitions an instance owns and claims them; for each it
//! builds a `PartitionTask` from the instance's `TaskContext` (the settings a partition needs, the
//! services, the at-least-once sink) and the kept claim, and runs it:
//!
//! - `open`: the state reused when the local copy is the newest, otherwise restored from
//!   the latest valid checkpoint; the stored offset checked against the log;
//! - `outputs`: exactly-once outputs started (a transactional producer that fences the
//!   earlier owners'), and the state replayed up to the group's committed offset;
//! - [`consume`]: the consume loop — apply records, deliver or transact the batch's outputs, commit the
//!   state;
//! - `checkpoint`: the snapshot, its upload and fenced record, and the hand-off's
//!   final checkpoint;
//! - `report`: progress into the status and the metrics after each segment;
//! - `standby`: a warm copy of a partition owned elsewhere, refreshed from its checkpoints, that a
//!   new owner starts from.
//!
//! The floors read `fleet → task → {source, partition, sink, checkpoint} → store`, as Kafka Streams'
//! `TaskManager → StreamTask → {RecordCollector, ProcessorStateManager}`.

mod checkpoint;
pub mod consume;
mod live;
pub(crate) mod local_dirs;
mod open;
mod outputs;
mod report;
mod standby;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use state::recipes::keeper::KeptLock;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use self::checkpoint::{Published, finish_publishing};
use self::report::{fetch_position, partition_labels, report_progress};
use crate::config::{InstanceConfig, MissingOffsets, OutputGuarantee};
use crate::error::{ProcessorError, ProcessorResult};
use crate::kafka_calls::{DropOffRuntime, bounded};
use crate::kafka_settings::KafkaSettings;
use crate::operator::OutputMode;
use crate::partition::{PartitionProcessor, ensure_claim_current};
use crate::progress::{Phase, Progress};
use crate::services::Services;
use crate::sink::OutputSink;
use crate::source::{MetadataClient, partition_consumer};
use crate::status::InstanceStatus;
use crate::store::PartitionStore;

pub use self::consume::{CommitPolicy, Outputs, consume_partition, consume_segment};
pub(crate) use self::live::OpenStores;
pub(crate) use self::standby::Standby;

/// The shortest consume segment (a checkpoint waiting for the previous upload is retried this often).
const MIN_SEGMENT: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a takeover waits for the log bounds of its partition.
pub(crate) const LOG_BOUNDS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long the processor itself waits for a metadata or group-offset call (librdkafka is handed a
/// shorter timeout; see [`crate::kafka_calls`]).
pub(crate) const METADATA_CALL_BOUND: std::time::Duration = std::time::Duration::from_secs(15);
/// How many watchdog bounds a restore may take before the watchdog counts it as stalled: copying a
/// large checkpoint is rightly silent for a while.
pub(crate) const RESTORE_ALLOWANCE: u32 = 10;

/// The settings a partition's life reads: taken from the instance's configuration once (see the fields
/// of [`InstanceConfig`] of the same names).
#[derive(Debug, Clone)]
pub(crate) struct TaskSettings {
    pub(crate) instance_id: String,
    pub(crate) group: String,
    pub(crate) topic: String,
    pub(crate) kafka: KafkaSettings,
    pub(crate) state_dir: PathBuf,
    pub(crate) claim_ttl: Duration,
    pub(crate) checkpoint_every: Duration,
    pub(crate) batch_size: usize,
    pub(crate) commit_interval: Duration,
    pub(crate) status_interval: Duration,
    pub(crate) state_cache_bytes: usize,
    pub(crate) output_mode: OutputMode,
    pub(crate) output_topic: Option<String>,
    pub(crate) output_guarantee: OutputGuarantee,
    pub(crate) dead_letter_topic: Option<String>,
    pub(crate) on_missing_offsets: MissingOffsets,
    pub(crate) restore_older_checkpoint: bool,
    pub(crate) stall_timeout: Option<Duration>,
}

impl TaskSettings {
    fn of(config: &InstanceConfig) -> Self {
        TaskSettings {
            instance_id: config.instance_id.clone(),
            group: config.group.clone(),
            topic: config.topic.clone(),
            kafka: config.kafka.clone(),
            state_dir: config.state_dir.clone(),
            claim_ttl: config.claim_ttl,
            checkpoint_every: config.checkpoint_every,
            batch_size: config.batch_size,
            commit_interval: config.commit_interval,
            status_interval: config.status_interval,
            state_cache_bytes: config.state_cache_bytes,
            output_mode: config.output_mode,
            output_topic: config.output_topic.clone(),
            output_guarantee: config.output_guarantee,
            dead_letter_topic: config.dead_letter_topic.clone(),
            on_missing_offsets: config.on_missing_offsets,
            restore_older_checkpoint: config.restore_older_checkpoint,
            stall_timeout: config.stall_timeout,
        }
    }
}

/// What every partition task of an instance shares: its settings, the services, the status it reports
/// into, the at-least-once output producer, the processing permits, and the registry of open stores
/// that live queries read.
pub(crate) struct TaskContext {
    pub(crate) settings: TaskSettings,
    pub(crate) services: Services,
    pub(crate) status: watch::Sender<InstanceStatus>,
    /// The at-least-once output path: one producer per instance (exactly-once outputs are a
    /// transactional producer per partition, made by its task).
    pub(crate) sink: Option<OutputSink>,
    /// How many partitions apply and write at once.
    pub(crate) permits: tokio::sync::Semaphore,
    /// Whether the brokers run transactions that work (not librdkafka's mock cluster): asked once.
    pub(crate) transactions_work: tokio::sync::OnceCell<bool>,
    /// The log bounds of partitions (a takeover's offset check, the lag watcher), on one kept client.
    pub(crate) metadata: Arc<MetadataClient>,
    /// The stores of the partitions processed now, for queries of live state.
    pub(crate) open_stores: OpenStores,
    /// One lock per partition, held by the blocking work on its local directory (open, restore,
    /// snapshot) for as long as it runs — also when the watchdog abandoned the task that started it —
    /// so that the partition's next claim never works on the directory beside it.
    local_work: std::sync::Mutex<HashMap<i32, Arc<std::sync::Mutex<()>>>>,
}

impl TaskContext {
    /// The context of an instance of `config`, reporting into `status`.
    ///
    /// # Errors
    /// A Kafka error when the at-least-once producer cannot be created.
    pub(crate) fn new(
        config: &InstanceConfig,
        services: Services,
        status: watch::Sender<InstanceStatus>,
    ) -> ProcessorResult<Self> {
        let has_outputs = config.output_topic.is_some() || config.dead_letter_topic.is_some();
        let sink = if has_outputs {
            Some(OutputSink::new(
                &config.kafka,
                config.output_topic.as_deref(),
                config.dead_letter_topic.as_deref(),
            )?)
        } else {
            None
        };
        Ok(TaskContext {
            settings: TaskSettings::of(config),
            services,
            status,
            sink,
            permits: tokio::sync::Semaphore::new(config.parallelism.max(1)),
            transactions_work: tokio::sync::OnceCell::new(),
            metadata: Arc::new(MetadataClient::new(config.kafka.clone())),
            open_stores: OpenStores::default(),
            local_work: std::sync::Mutex::default(),
        })
    }

    /// The lock of `partition`'s local directory (see the field).
    pub(crate) fn local_work(&self, partition: i32) -> Arc<std::sync::Mutex<()>> {
        let mut locks = self
            .local_work
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(locks.entry(partition).or_default())
    }
}

/// One owned partition's life, from its claim to its hand-off (see the module).
pub(crate) struct PartitionTask {
    ctx: Arc<TaskContext>,
    partition: i32,
    kept: KeptLock,
    /// A standby's copy, still open, when the instance had one.
    warm: Option<Arc<dyn PartitionStore>>,
    progress: Arc<Progress>,
}

impl PartitionTask {
    /// The task of `partition` under the claim `kept`, starting from `warm` (a standby's open copy)
    /// when there is one, reporting its phase and progress to the watchdog through `progress`.
    pub(crate) fn new(
        ctx: Arc<TaskContext>,
        partition: i32,
        kept: KeptLock,
        warm: Option<Arc<dyn PartitionStore>>,
        progress: Arc<Progress>,
    ) -> Self {
        PartitionTask {
            ctx,
            partition,
            kept,
            warm,
            progress,
        }
    }

    /// Runs the partition until `stop` (a hand-off: the final checkpoint lands before the claim is
    /// released) or an error: opens its state, starts its outputs (replaying what is committed
    /// already), then consumes in segments, reporting after each and checkpointing as configured.
    ///
    /// # Errors
    /// Anything that ends the partition's run here: a lost or lapsed claim, a Kafka, store or
    /// checkpoint error. The instance claims it again after a pause.
    pub(crate) async fn run(self, stop: CancellationToken) -> ProcessorResult<()> {
        let PartitionTask {
            ctx,
            partition,
            kept,
            warm,
            progress,
        } = self;
        let fencing_token = kept.fencing_token();
        let lost = kept.lost_token();
        let claimed_at = std::time::Instant::now();
        progress.advance_to(Phase::Starting);
        let recorded = ctx.checkpoint_records(partition).latest().await?;
        let record_read = claimed_at.elapsed();
        progress.advance_to(Phase::Restoring);
        if let Some(bound) = ctx.settings.stall_timeout {
            progress.allow_silence(bound * RESTORE_ALLOWANCE);
        }
        let preparing = Arc::clone(&ctx);
        // Held by the blocking work itself: a restore abandoned by the watchdog finishes (or hangs)
        // before the next claim of the partition touches its directory.
        let local_work = ctx.local_work(partition);
        let store = tokio::task::spawn_blocking(move || {
            let _only_one = local_work
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            preparing.prepare_store(partition, recorded, warm)
        })
        .await
        .map_err(ProcessorError::task(format!(
            "open or restore the state of partition {partition}"
        )))??;
        let state_ready = claimed_at.elapsed();
        progress.advance_to(Phase::Starting);
        if let Err(err) = ctx
            .ensure_offset_in_log(&store, partition, fencing_token)
            .await
        {
            return Err(ctx
                .repair_counter_reset(partition, fencing_token, err)
                .await);
        }
        let bounds_checked = claimed_at.elapsed();
        progress.beat();
        // Queries of live state read this store while the partition runs here.
        let _queryable = ctx
            .open_stores
            .open(partition, Arc::clone(&store), fencing_token);
        let has_outputs = ctx.settings.output_topic.is_some();
        let resumed = PartitionProcessor::resume(
            store.clone(),
            ctx.services.operator.clone(),
            fencing_token,
            lost.clone(),
        );
        let resumed = match resumed {
            Ok(resumed) => resumed,
            Err(err) => {
                return Err(ctx
                    .repair_counter_reset(partition, fencing_token, err)
                    .await);
            }
        };
        let mut processor = resumed
            .with_state_cache_bytes(ctx.settings.state_cache_bytes)
            .with_outputs(has_outputs, ctx.settings.output_mode)
            .with_progress(Arc::clone(&progress))
            .with_claim(kept.context());
        let consumer = DropOffRuntime::new(partition_consumer(
            &ctx.settings.kafka,
            &ctx.settings.group,
            &ctx.settings.topic,
            partition,
            processor.next_offset(),
        )?);
        let consumer_created = claimed_at.elapsed();
        progress.advance_to(Phase::InitialisingOutputs);
        let transactional = ctx.open_transactional_outputs(partition, &consumer).await?;
        if transactional.is_some() {
            progress.advance_to(Phase::Replaying);
            ctx.replay_committed_outputs(&consumer, &mut processor, &stop)
                .await?;
        }
        progress.advance_to(Phase::Consuming);
        // The start took as long as it took (a restore, a busy runtime): a claim that lapsed meanwhile
        // may be another owner's by now, so nothing is started on it.
        ensure_claim_current(&kept.context(), partition, "start")?;
        let outputs = match (&transactional, ctx.sink.as_ref()) {
            (Some((sink, group)), _) => Outputs::Transactional(sink, group),
            (None, Some(sink)) => Outputs::AtLeastOnce(sink),
            (None, None) => Outputs::Discard,
        };
        tracing::info!(instance = %ctx.settings.instance_id, partition, fencing_token, from = processor.next_offset(), ?outputs, "partition started");
        // Where a takeover's start goes (cumulative, from the claim): the checkpoint record read, the
        // state opened or restored, the log's bounds checked, the consumer created, outputs ready.
        tracing::debug!(partition, ?record_read, ?state_ready, ?bounds_checked, ?consumer_created, outputs_ready = ?claimed_at.elapsed(), "partition start timings");
        ctx.status.send_modify(|s| {
            if let Some(p) = s.partition_status.get_mut(&partition) {
                p.processing = true;
                p.next_offset = processor.next_offset();
            }
        });
        let labels = partition_labels(&ctx.settings.topic, partition);
        // The upload of the last snapshot runs while the partition goes on processing; dropped (aborted)
        // with this task.
        let mut publishing: Option<AbortOnDropHandle<ProcessorResult<Published>>> = None;
        let mut publishing_since = tokio::time::Instant::now();
        let mut last_checkpoint = tokio::time::Instant::now();
        // The offset of the last snapshot whose upload is running or recorded.
        let mut checkpointed: Option<i64> = None;
        // Consuming halts when the instance stops or the claim is lost; a pause for the status or a
        // checkpoint is not a halt (and commits nothing: see `consume_segment`).
        let halt = stop.child_token();
        let _lost_halts = {
            let (halt, lost) = (halt.clone(), lost.clone());
            AbortOnDropHandle::new(tokio::spawn(async move {
                lost.cancelled().await;
                halt.cancel();
            }))
        };
        loop {
            // One segment: consume until the status is due for an update (or the next checkpoint, if
            // sooner), ownership is lost, or we stop. A checkpoint due while the previous upload
            // still runs is tried again after a short segment, never in a busy loop.
            let until_checkpoint = ctx
                .settings
                .checkpoint_every
                .saturating_sub(last_checkpoint.elapsed());
            let pause_at = tokio::time::Instant::now()
                + until_checkpoint
                    .clamp(MIN_SEGMENT, ctx.settings.status_interval.max(MIN_SEGMENT));
            let before = processor.stats();
            let consumed = consume_segment(
                &consumer,
                &mut processor,
                ctx.commit_policy(),
                pause_at,
                outputs,
                Some(&ctx.permits),
                &halt,
            )
            .await;
            let after = processor.stats();
            let fetch_position = fetch_position(&consumer, &ctx.settings.topic, partition);
            ctx.report_segment(
                partition,
                &processor,
                &kept,
                fetch_position,
                (before, after),
                &labels,
            );
            consumed?;
            if lost.is_cancelled() {
                return Err(ProcessorError::OwnershipLost {
                    partition,
                    token: fencing_token,
                });
            }
            if transactional.is_none() {
                report_progress(
                    &consumer,
                    &ctx.settings.topic,
                    partition,
                    processor.next_offset(),
                    false,
                );
            }
            if !stop.is_cancelled() && last_checkpoint.elapsed() < ctx.settings.checkpoint_every {
                continue;
            }
            // One upload at a time per partition, in order. One still running is not waited for while
            // the partition has work: the checkpoint is taken at a later segment's end instead.
            if let Some(previous) = publishing.take() {
                if !previous.is_finished() && !stop.is_cancelled() {
                    // An upload that never ends would silently end this partition's checkpoints.
                    if let Some(bound) = ctx.settings.stall_timeout
                        && publishing_since.elapsed() > bound
                    {
                        return Err(ProcessorError::PartitionStalled {
                            partition,
                            phase: Phase::Checkpointing.describe(),
                            silent_for: publishing_since.elapsed(),
                            bound,
                        });
                    }
                    publishing = Some(previous);
                    continue;
                }
                if finish_publishing(partition, previous).await? == Published::Skipped {
                    checkpointed = None;
                }
            }
            last_checkpoint = tokio::time::Instant::now();
            // An idle partition's state is all in its last checkpoint already: none is taken.
            progress.enter(Phase::Checkpointing);
            ensure_claim_current(&kept.context(), partition, "checkpoint")?;
            if checkpointed != Some(processor.next_offset())
                && let Some((scratch, next_offset)) = ctx.snapshot(&store).await?
            {
                checkpointed = Some(next_offset);
                publishing_since = tokio::time::Instant::now();
                publishing = Some(AbortOnDropHandle::new(tokio::spawn(
                    Arc::clone(&ctx).publish(partition, scratch, next_offset, fencing_token),
                )));
            }
            progress.enter(Phase::Consuming);
            if stop.is_cancelled() {
                progress.enter(Phase::HandingOff);
                // Hand-off: the final checkpoint must land before the claim is released.
                ensure_claim_current(&kept.context(), partition, "hand-off")?;
                if let Some(last) = publishing.take() {
                    ctx.finish_hand_off(&store, partition, fencing_token, last)
                        .await?;
                }
                break;
            }
        }
        // The last progress for lag tools, synchronously: the next owner resumes from its own state.
        // (Exactly-once outputs commit the offsets in their transactions instead.)
        // The clients' normal end: closed off the runtime, and waited for (bounded), so that they
        // leave while the brokers are there.
        match transactional {
            None => {
                let (consumer, topic, next_offset) = (
                    consumer.into_inner(),
                    ctx.settings.topic.clone(),
                    processor.next_offset(),
                );
                let _ = bounded(
                    "commit progress and close the consumer",
                    METADATA_CALL_BOUND,
                    move || {
                        report_progress(&consumer, &topic, partition, next_offset, true);
                        drop(consumer);
                        Ok(())
                    },
                )
                .await;
            }
            Some((sink, _)) => {
                consumer
                    .close("close the partition's consumer", METADATA_CALL_BOUND)
                    .await;
                sink.close().await;
            }
        }
        kept.release().await.map_err(|err| match err {
            // The claim lapsed while the hand-off ran (a frozen or slow instance): say so in the
            // partition's own words, like a loss noticed mid-segment.
            state::StateError::LockLost { .. } => ProcessorError::OwnershipLost {
                partition,
                token: fencing_token,
            },
            other => ProcessorError::from(other),
        })?;
        tracing::info!(instance = %ctx.settings.instance_id, partition, "partition handed off");
        Ok(())
    }
}
