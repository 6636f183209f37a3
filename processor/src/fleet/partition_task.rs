//! One owned partition's life on an instance: open its state (reuse the local copy if it is the newest,
//! otherwise restore the latest valid checkpoint), consume from the stored offset in atomic batches,
//! checkpoint periodically (a local snapshot, then an upload and a fenced record in the background) and
//! on hand-off, and release the claim.

use std::path::PathBuf;
use std::sync::Arc;

use state::recipes::keeper::KeptLock;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::instance::Instance;
use super::local_dirs::{
    RESTORING, STANDBY_NEXT, STANDBY_OLD, UNREADABLE, remove_leftovers, replace_dir, sibling,
};
use super::maintenance::hold_compaction_lock;
use super::status::{instant_to_unix_ms, unix_ms};
use crate::checkpoint::{
    CheckpointRecord, CheckpointRecords, CheckpointStore, Manifest, UploadReport,
};
use crate::config::{MissingOffsets, OutputGuarantee};
use crate::error::{ProcessorError, ProcessorResult};
use crate::kafka_calls::{DropOffRuntime, bounded};
use crate::partition::{PartitionProcessor, PartitionStats, ensure_claim_current};
use crate::progress::{Phase, Progress};
use crate::resources::{self, compaction_resource, local_state_dir, partition_resource};
use crate::sink::{TRANSACTION_CALL_BOUND, TransactionalSink};
use crate::source::{
    CommitPolicy, Outputs, committed_offset, consume_partition, consume_segment, is_mock_cluster,
    partition_consumer,
};
use crate::store::{PartitionStore, StateBatch};
use rdkafka::consumer::ConsumerGroupMetadata;

/// Waits for a checkpoint upload of `partition`.
async fn finish_publishing(
    partition: i32,
    upload: AbortOnDropHandle<ProcessorResult<Published>>,
) -> ProcessorResult<Published> {
    upload.await.map_err(ProcessorError::task(format!(
        "upload a checkpoint of partition {partition}"
    )))?
}

/// Whether a checkpoint was uploaded and recorded, or skipped because retention held the partition's
/// compaction lock for longer than a claim lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Published {
    Recorded,
    Skipped,
}

/// The shortest consume segment (a checkpoint waiting for the previous upload is retried this often).
const MIN_SEGMENT: std::time::Duration = std::time::Duration::from_millis(100);

/// Attempts at the final checkpoint of a hand-off while retention holds the compaction lock.
const HAND_OFF_ATTEMPTS: u32 = 3;
/// How long a takeover waits for the log bounds of its partition.
const LOG_BOUNDS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long the processor itself waits for a metadata or group-offset call (librdkafka is handed a
/// shorter timeout; see [`crate::kafka_calls`]).
const METADATA_CALL_BOUND: std::time::Duration = std::time::Duration::from_secs(15);
/// How many watchdog bounds a restore may take before the watchdog counts it as stalled: copying a
/// large checkpoint is rightly silent for a while.
const RESTORE_ALLOWANCE: u32 = 10;

impl Instance {
    /// Opens the partition's local state: reused if this disk holds the newest state (its token and
    /// offset are not behind the latest valid checkpoint), otherwise replaced by that checkpoint —
    /// restored atomically (scratch directory, then rename). A local directory that does not open is
    /// moved aside and replaced the same way.
    pub(super) fn prepare_store(
        &self,
        partition: i32,
        recorded: Option<CheckpointRecord>,
        warm: Option<Arc<dyn PartitionStore>>,
    ) -> ProcessorResult<Arc<dyn PartitionStore>> {
        // A standby's copy older than the record is closed here, and refreshed or restored below.
        if let (Some(store), Some(record)) = (warm, &recorded)
            && self.is_as_new_as(&store, record).unwrap_or(false)
        {
            self.status.send_modify(|s| {
                s.local_starts += 1;
                s.open_copy_starts += 1;
            });
            tracing::info!(
                partition,
                next_offset = record.next_offset,
                "starting from the standby's copy, open: it is as new as the recorded checkpoint"
            );
            return Ok(store);
        }
        let dir = local_state_dir(
            &self.config.state_dir,
            &self.config.group,
            &self.config.topic,
            partition,
        );
        remove_leftovers(&dir, RESTORING);
        remove_leftovers(&dir, STANDBY_NEXT);
        remove_leftovers(&dir, STANDBY_OLD);
        if let Some(record) = &recorded
            && dir.exists()
            && let Some(store) = self.start_from_local_copy(partition, &dir, record)?
        {
            return Ok(store);
        }
        let latest = self.checkpoint_to_restore(partition, recorded)?;
        if dir.exists() {
            match self.services.stores.open_store(partition, &dir) {
                Ok(local) => {
                    let reusable = match (local.meta()?, &latest) {
                        (Some(meta), Some(manifest)) => {
                            meta.fencing_token >= manifest.fencing_token
                                && meta.next_offset >= manifest.next_offset
                        }
                        (_, None) => true,
                        (None, Some(_)) => false,
                    };
                    if reusable {
                        return Ok(local);
                    }
                    drop(local);
                    std::fs::remove_dir_all(&dir).map_err(ProcessorError::io(&dir))?;
                }
                Err(err) if err.disk_failure().is_some() => {
                    // A full or read-only disk is not a damaged store: moving it aside and restoring
                    // would fail the same way, again and again.
                    return Err(err);
                }
                Err(err) => {
                    // A directory that does not open (a crash of an older release mid-restore, a
                    // damaged disk) is kept for inspection, never deleted, and replaced below.
                    let aside = sibling(&dir, UNREADABLE);
                    std::fs::rename(&dir, &aside).map_err(ProcessorError::io(&dir))?;
                    tracing::warn!(partition, error = %err, moved_to = %aside.display(), "local state does not open: moved aside, restoring from the checkpoint");
                }
            }
        }
        if let Some(manifest) = latest {
            // Restored beside the final place and renamed into it: a crash mid-restore leaves only a
            // scratch directory, removed at the next start, never a half-restored state directory.
            let restoring = sibling(&dir, RESTORING);
            let restore_started = std::time::Instant::now();
            let restored = self
                .services
                .checkpoints
                .restore(&manifest, &restoring)
                .and_then(|()| std::fs::rename(&restoring, &dir).map_err(ProcessorError::io(&dir)));
            if let Err(err) = restored {
                let _ = std::fs::remove_dir_all(&restoring);
                return Err(err);
            }
            self.count_restore(partition, restore_started);
            tracing::info!(
                partition,
                next_offset = manifest.next_offset,
                "restored from checkpoint"
            );
        }
        self.services.stores.open_store(partition, &dir)
    }

    /// Starts from the local copy of the partition (a standby's, or this instance's own from an earlier
    /// ownership) when it is as new as the recorded checkpoint — opened as it is, the checkpoint not
    /// even read — or refreshed from that checkpoint incrementally (only files it lacks are copied).
    /// `None` when there is no usable copy or the checkpoint cannot be taken so: the caller restores
    /// the usual way (which verifies the whole checkpoint and falls back to older ones).
    fn start_from_local_copy(
        &self,
        partition: i32,
        dir: &std::path::Path,
        record: &CheckpointRecord,
    ) -> ProcessorResult<Option<Arc<dyn PartitionStore>>> {
        let Some((token, offset)) = Manifest::parse_id(&record.manifest) else {
            return Ok(None);
        };
        let Ok(local) = self.services.stores.open_store(partition, dir) else {
            return Ok(None); // the usual path moves it aside
        };
        if is_at_least(&local, token, offset)? {
            self.status.send_modify(|s| s.local_starts += 1);
            tracing::info!(
                partition,
                next_offset = record.next_offset,
                "starting from the local copy: it is as new as the recorded checkpoint"
            );
            return Ok(Some(local));
        }
        drop(local);
        let checkpoints = &self.services.checkpoints;
        let Ok(manifest) = checkpoints.manifest(&self.config.topic, partition, &record.manifest)
        else {
            return Ok(None);
        };
        let restoring = sibling(dir, RESTORING);
        let started = std::time::Instant::now();
        let report = match checkpoints.restore_incremental(&manifest, &restoring, dir) {
            Ok(report) => report,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&restoring);
                tracing::warn!(partition, error = %err, "the local copy could not be refreshed from the checkpoint; restoring it whole");
                return Ok(None);
            }
        };
        replace_dir(dir, &restoring)?;
        self.count_restore(partition, started);
        tracing::info!(
            partition,
            next_offset = manifest.next_offset,
            copied = report.copied_files,
            reused = report.reused_files,
            copied_bytes = report.copied_bytes,
            "restored from checkpoint onto the local copy"
        );
        Ok(Some(self.services.stores.open_store(partition, dir)?))
    }

    /// Whether `store` holds at least the state of `record`'s checkpoint.
    fn is_as_new_as(
        &self,
        store: &Arc<dyn PartitionStore>,
        record: &CheckpointRecord,
    ) -> ProcessorResult<bool> {
        match Manifest::parse_id(&record.manifest) {
            Some((token, offset)) => is_at_least(store, token, offset),
            None => Ok(false),
        }
    }

    /// A restore of `partition` that began at `started` is done: counted in the status and the metrics.
    fn count_restore(&self, partition: i32, started: std::time::Instant) {
        self.status.send_modify(|s| s.restores += 1);
        let labels = partition_labels(&self.config.topic, partition);
        metrics::counter!("processor_restores_total", &labels).increment(1);
        metrics::histogram!("processor_restore_duration_seconds", &labels)
            .record(started.elapsed().as_secs_f64());
    }

    /// The fenced record of `partition`'s newest checkpoint, in this fleet.
    pub(super) fn checkpoint_records(&self, partition: i32) -> CheckpointRecords {
        CheckpointRecords::new(
            self.services.lock.clone(),
            self.services.registry.clone(),
            &self.config.group,
            &self.config.topic,
            partition,
        )
    }

    /// The checkpoint the partition resumes from. The fenced record names it: read and verified, it is
    /// the one; corrupt, the newest older valid one is used instead (logged and counted); unreadable — a
    /// missing mount, a permission error, a deleted manifest — the partition refuses, unless the operator
    /// accepted the loss (`restore_older_checkpoint`). Without a record (a new fleet, or checkpoints from
    /// before records existed), the newest valid checkpoint; a store that cannot be read is an error.
    fn checkpoint_to_restore(
        &self,
        partition: i32,
        recorded: Option<CheckpointRecord>,
    ) -> ProcessorResult<Option<Manifest>> {
        let checkpoints = &self.services.checkpoints;
        let topic = &self.config.topic;
        let newest_valid = || -> ProcessorResult<Option<Manifest>> {
            let (latest, skipped) = checkpoints.latest_valid(topic, partition)?;
            self.count_corrupt(partition, &skipped);
            Ok(latest)
        };
        let Some(record) = recorded else {
            return newest_valid();
        };
        match checkpoints.checkpoint(topic, partition, &record.manifest) {
            Ok(manifest) => Ok(Some(manifest)),
            Err(err @ ProcessorError::CorruptCheckpoint { .. }) => {
                self.count_corrupt(partition, std::slice::from_ref(&err));
                newest_valid()
            }
            Err(err) if self.config.restore_older_checkpoint => {
                tracing::warn!(partition, checkpoint = %record.manifest, error = %err, "the checkpoint of record cannot be read; restoring an older one as the operator allowed");
                newest_valid().or_else(|older| {
                    tracing::warn!(partition, error = %older, "no older checkpoint can be read either: starting empty, as the operator allowed");
                    Ok(None)
                })
            }
            Err(err) => Err(ProcessorError::CheckpointUnreadable {
                partition,
                checkpoint: record.manifest,
                cause: Box::new(err),
            }),
        }
    }

    fn count_corrupt(&self, partition: i32, skipped: &[ProcessorError]) {
        for err in skipped {
            tracing::warn!(partition, error = %err, "skipped a corrupt checkpoint: restoring an older one and replaying from it");
        }
        if !skipped.is_empty() {
            self.status
                .send_modify(|s| s.corrupt_checkpoints_skipped += skipped.len() as u64);
        }
    }

    /// Waits for the hand-off's final checkpoint. Skipped (retention holds the compaction lock), it is
    /// taken again, up to [`HAND_OFF_ATTEMPTS`] times; still skipped, the claim is released without it
    /// and the next owner restores the previous checkpoint and replays from there (exact, only slower) —
    /// said in a warning, never silently.
    async fn finish_hand_off(
        self: &Arc<Self>,
        store: &Arc<dyn PartitionStore>,
        partition: i32,
        fencing_token: u64,
        last: AbortOnDropHandle<ProcessorResult<Published>>,
    ) -> ProcessorResult<()> {
        let mut outcome = finish_publishing(partition, last).await?;
        let mut attempt = 1;
        while outcome == Published::Skipped && attempt < HAND_OFF_ATTEMPTS {
            attempt += 1;
            tracing::info!(
                partition,
                attempt,
                "final checkpoint skipped (compaction lock busy): taking it again"
            );
            let Some((scratch, next_offset)) = self.snapshot(store).await? else {
                return Ok(());
            };
            outcome = Arc::clone(self)
                .publish(partition, scratch, next_offset, fencing_token)
                .await?;
        }
        if outcome == Published::Skipped {
            tracing::warn!(
                partition,
                attempts = HAND_OFF_ATTEMPTS,
                "handing off without a final checkpoint: retention held the compaction lock; the next owner restores the previous checkpoint and replays from it"
            );
        }
        Ok(())
    }

    /// The local half of a checkpoint: a RocksDB checkpoint (hard links, so the pause does not grow with
    /// the state) in a scratch directory, and the offset it covers; `None` for a partition with no state
    /// yet. Earlier scratch directories of the partition (left by an aborted upload) are removed first.
    pub(super) async fn snapshot(
        &self,
        store: &Arc<dyn PartitionStore>,
    ) -> ProcessorResult<Option<(PathBuf, i64)>> {
        let Some(meta) = store.meta()? else {
            return Ok(None);
        };
        let partition = store.partition();
        let topic = self.config.topic.clone();
        let state_dir = self.config.state_dir.join(&self.config.group);
        let scratch = state_dir.join(resources::snapshot_scratch_name(
            &topic,
            partition,
            meta.next_offset,
        ));
        let store = Arc::clone(store);
        let labels = partition_labels(&self.config.topic, partition);
        let local_work = self.local_work(partition);
        tokio::task::spawn_blocking(move || {
            let _only_one = local_work
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let started = std::time::Instant::now();
            let _pause = PauseTimer(started, labels);
            if let Ok(entries) = std::fs::read_dir(&state_dir) {
                for entry in entries.filter_map(Result::ok) {
                    let name = entry.file_name();
                    if resources::is_snapshot_scratch_of(&name.to_string_lossy(), &topic, partition)
                    {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                }
            }
            store.snapshot_to(&scratch)?;
            Ok(Some((scratch, meta.next_offset)))
        })
        .await
        .map_err(ProcessorError::task(format!(
            "snapshot the state of partition {partition}"
        )))?
    }

    /// The shared half of a checkpoint, while the partition keeps processing: uploads the snapshot in
    /// `scratch` under the ownership fencing token while holding the partition's compaction lock, kept
    /// renewed for as long as the upload takes (so retention cannot delete a file the upload reuses),
    /// confirms every file of the checkpoint is in the store, then records it through the
    /// [`CheckpointRecords`] with the same token (a stale owner's record is refused there too).
    ///
    /// A file missing at the confirmation (removed by a cleaner whose lock had expired under a pause) is
    /// uploaded again, once; a compaction lock lost during the upload leaves the checkpoint unrecorded
    /// (skipped: the next one comes soon).
    pub(super) async fn publish(
        self: Arc<Self>,
        partition: i32,
        scratch: PathBuf,
        next_offset: i64,
        fencing_token: u64,
    ) -> ProcessorResult<Published> {
        let Some(compaction_lock) = hold_compaction_lock(
            &self.services.lock,
            &compaction_resource(&self.config.group, &self.config.topic, partition),
            self.config.claim_ttl,
            self.config.claim_ttl,
        )
        .await?
        else {
            // Retention is running long on this partition: skip this checkpoint, the next one comes
            // soon (a successor would restore the previous one and replay a little more).
            tracing::debug!(partition, "checkpoint skipped: the compaction lock is busy");
            let _ = tokio::fs::remove_dir_all(&scratch).await;
            return Ok(Published::Skipped);
        };
        let (checkpoints, topic) = (
            Arc::clone(&self.services.checkpoints),
            self.config.topic.clone(),
        );
        let upload_started = std::time::Instant::now();
        let uploaded = tokio::task::spawn_blocking(move || {
            let uploaded = upload_confirmed(
                checkpoints.as_ref(),
                &topic,
                partition,
                &scratch,
                next_offset,
                fencing_token,
            );
            let _ = std::fs::remove_dir_all(&scratch);
            uploaded
        })
        .await
        .map_err(ProcessorError::task(format!(
            "upload a checkpoint of partition {partition}"
        )))?;
        let held_throughout = !compaction_lock.is_lost();
        let _ = compaction_lock.release().await;
        let report = uploaded?;
        if !held_throughout {
            tracing::warn!(
                partition,
                checkpoint = %report.manifest.id(),
                "checkpoint not recorded: the compaction lock was lost during its upload"
            );
            return Ok(Published::Skipped);
        }
        self.checkpoint_records(partition)
            .publish(
                fencing_token,
                &CheckpointRecord::new(&report.manifest, &self.config.instance_id),
            )
            .await?;
        let recorded_at = std::time::SystemTime::now();
        self.status.send_modify(|s| {
            s.checkpoints += 1;
            if let Some(p) = s.partition_status.get_mut(&partition) {
                p.last_checkpoint_ms = Some(unix_ms(recorded_at));
            }
        });
        record_checkpoint_metrics(
            &partition_labels(&self.config.topic, partition),
            &report,
            upload_started.elapsed(),
            recorded_at,
        );
        Ok(Published::Recorded)
    }

    /// The partition's exactly-once output path, when it has outputs and the guarantee is exactly-once:
    /// its transactional producer, initialised — which fences every earlier owner's producer of the
    /// partition, so none of their transactions can commit from now on — and the consumer's group
    /// metadata its transactions commit offsets for.
    async fn open_transactional_outputs(
        &self,
        partition: i32,
        consumer: &rdkafka::consumer::StreamConsumer,
    ) -> ProcessorResult<Option<(TransactionalSink, Arc<ConsumerGroupMetadata>)>> {
        use rdkafka::consumer::Consumer;
        let config = &self.config;
        let has_outputs = config.output_topic.is_some() || config.dead_letter_topic.is_some();
        if !has_outputs
            || config.output_guarantee != OutputGuarantee::ExactlyOnce
            || !self.transactions_work().await?
        {
            return Ok(None);
        }
        let group = consumer
            .group_metadata()
            .ok_or_else(|| ProcessorError::Kafka {
                operation: "read the consumer's group metadata",
                source: "the consumer has no group".into(),
            })?;
        let (kafka, group_id, topic) = (
            config.kafka.clone(),
            config.group.clone(),
            config.topic.clone(),
        );
        let (output, dead_letters) = (
            config.output_topic.clone(),
            config.dead_letter_topic.clone(),
        );
        let sink = bounded(
            "initialise a transactional producer",
            TRANSACTION_CALL_BOUND,
            move || {
                TransactionalSink::open(
                    &kafka,
                    &group_id,
                    &topic,
                    partition,
                    output.as_deref(),
                    dead_letters.as_deref(),
                )
            },
        )
        .await?;
        Ok(Some((sink, Arc::new(group))))
    }

    /// Whether exactly-once outputs can work on these brokers: not on librdkafka's mock cluster (asked
    /// once per instance; said once in a warning, then its partitions publish at-least-once).
    async fn transactions_work(&self) -> ProcessorResult<bool> {
        let kafka = self.config.kafka.clone();
        let instance = self.config.instance_id.clone();
        self.transactions_work
            .get_or_try_init(|| async move {
                let mock = bounded("read the cluster id", METADATA_CALL_BOUND, move || {
                    is_mock_cluster(&kafka)
                })
                .await?;
                if mock {
                    tracing::warn!(%instance, "librdkafka's mock cluster has no working transactions: outputs are at-least-once here (exactly-once needs a real Kafka cluster)");
                }
                Ok(!mock)
            })
            .await
            .copied()
    }

    /// Brings the state up to the input whose outputs are already committed: the group offset the last
    /// transaction committed (read after our producer fenced every earlier one, so it is final) is
    /// where exactly-once output resumes. State behind it (restored from a checkpoint, or written by an
    /// owner that crashed between its commit and its state write) is rebuilt by replaying the records in
    /// between with their outputs discarded — they are visible already.
    async fn replay_committed_outputs(
        &self,
        consumer: &rdkafka::consumer::StreamConsumer,
        processor: &mut PartitionProcessor,
        stop: &CancellationToken,
    ) -> ProcessorResult<()> {
        let partition = processor.partition();
        let (kafka, group, topic) = (
            self.config.kafka.clone(),
            self.config.group.clone(),
            self.config.topic.clone(),
        );
        let committed = bounded(
            "read the group's committed offset",
            TRANSACTION_CALL_BOUND,
            move || committed_offset(&kafka, &group, &topic, partition),
        )
        .await?;
        let stored = processor.next_offset();
        match reconcile(committed, stored) {
            Reconcile::Replay(committed) => {
                tracing::info!(
                    instance = %self.config.instance_id,
                    partition,
                    stored,
                    committed,
                    "replaying records whose outputs are already committed (outputs discarded)"
                );
                let before = processor.stats();
                let replayed = consume_partition(
                    consumer,
                    processor,
                    self.commit_policy(),
                    Some(committed),
                    Outputs::Discard,
                    Some(&self.permits),
                    stop,
                )
                .await;
                let after = processor.stats();
                self.status.send_modify(|s| {
                    s.processed += after.applied - before.applied;
                    s.dead_letters += after.dead_letters - before.dead_letters;
                });
                replayed?;
            }
            Reconcile::StateAhead(committed) => {
                tracing::warn!(
                    instance = %self.config.instance_id,
                    partition,
                    stored,
                    committed = ?committed,
                    "the state is ahead of the committed outputs: the partition ran at-least-once before (or the group's offsets expired); exactly-once output starts at the stored offset"
                );
                metrics::counter!("processor_outputs_behind_state_total", "topic" => self.config.topic.clone()).increment(1);
            }
            Reconcile::InStep => {}
        }
        Ok(())
    }

    /// A *fresh* claim's token below one already written for the partition (`err` is the start's
    /// [`ProcessorError::StaleOwner`]) cannot come from a newer owner — nobody else holds the claim —
    /// so the lock backend's fencing counter went back (Redis without `appendonly`, a failover that lost
    /// the last increments). Left alone, every partition would refuse to start until the counter
    /// climbed back on its own. The repair: raise the counter past the highest token recorded, say so
    /// once, and give this claim up; the next claim's token is above every recorded one, so a stale
    /// holder with an old high token is fenced out again. Anything else is returned as it is.
    async fn repair_counter_reset(
        &self,
        partition: i32,
        granted: u64,
        err: ProcessorError,
    ) -> ProcessorError {
        let ProcessorError::StaleOwner { token, highest, .. } = &err else {
            return err;
        };
        if *token != granted || *highest <= granted {
            return err;
        }
        let highest = *highest;
        let resource = partition_resource(&self.config.group, &self.config.topic, partition);
        metrics::counter!("processor_fencing_counter_resets_total", "topic" => self.config.topic.clone())
            .increment(1);
        let raised = self
            .services
            .lock
            .raise_fencing_counter(&resource, highest)
            .await;
        let outcome = match &raised {
            Ok(()) => format!("raised it past {highest}; claiming again"),
            Err(err) => format!(
                "it could not be raised ({err}): raise it past {highest} by hand (DISTRIBUTED_LOCKING.md section 5.2)"
            ),
        };
        tracing::error!(
            instance = %self.config.instance_id,
            partition,
            resource,
            granted,
            recorded = highest,
            "the lock backend's fencing counter went back (a fresh claim got token {granted}, token {highest} is already recorded for the partition): {outcome}"
        );
        ProcessorError::FencingCounterReset {
            partition,
            granted,
            recorded: highest,
            repaired: raised.is_ok(),
        }
    }

    /// Checks the offset stored with the partition's state against the log (`[low, high)`): inside it,
    /// nothing to do; outside it (records deleted by retention, or the topic recreated), the
    /// `on_missing_offsets` policy decides — refuse (the default), or move the stored offset to the log's
    /// start or end in one fenced batch and say what was skipped. A partition without state starts at the
    /// log start.
    async fn ensure_offset_in_log(
        &self,
        store: &Arc<dyn PartitionStore>,
        partition: i32,
        fencing_token: u64,
    ) -> ProcessorResult<()> {
        let (metadata, topic) = (Arc::clone(&self.metadata), self.config.topic.clone());
        let (low, high) = bounded("fetch watermarks", METADATA_CALL_BOUND, move || {
            metadata.watermarks(&topic, partition, LOG_BOUNDS_TIMEOUT)
        })
        .await?;
        let stored = store.meta()?.map(|meta| meta.next_offset);
        let (offset, to) = match stored {
            Some(offset) if offset < low || offset > high => {
                let to = match self.config.on_missing_offsets {
                    MissingOffsets::Fail => {
                        return Err(ProcessorError::OffsetOutOfRange {
                            partition,
                            offset,
                            low,
                            high,
                        });
                    }
                    MissingOffsets::Latest => high,
                    _ => low,
                };
                (offset, to)
            }
            None if low > 0 => (0, low),
            _ => return Ok(()),
        };
        tracing::warn!(
            instance = %self.config.instance_id,
            partition,
            stored = offset,
            log_start = low,
            log_end = high,
            resume_at = to,
            skipped = if to > offset { to - offset } else { 0 },
            "stored offset outside the log: resuming at {to} (records [{offset}, {to}) are not in the state)"
        );
        store.apply(&StateBatch::new(to, fencing_token))
    }

    pub(super) async fn run_partition(
        self: Arc<Self>,
        partition: i32,
        kept: KeptLock,
        warm: Option<Arc<dyn PartitionStore>>,
        stop: CancellationToken,
        progress: Arc<Progress>,
    ) -> ProcessorResult<()> {
        let fencing_token = kept.fencing_token();
        let lost = kept.lost_token();
        let claimed_at = std::time::Instant::now();
        progress.advance_to(Phase::Starting);
        let recorded = self.checkpoint_records(partition).latest().await?;
        let record_read = claimed_at.elapsed();
        progress.advance_to(Phase::Restoring);
        if let Some(bound) = self.config.stall_timeout {
            progress.allow_silence(bound * RESTORE_ALLOWANCE);
        }
        let preparing = Arc::clone(&self);
        // Held by the blocking work itself: a restore abandoned by the watchdog finishes (or hangs)
        // before the next claim of the partition touches its directory.
        let local_work = self.local_work(partition);
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
        if let Err(err) = self
            .ensure_offset_in_log(&store, partition, fencing_token)
            .await
        {
            return Err(self
                .repair_counter_reset(partition, fencing_token, err)
                .await);
        }
        let bounds_checked = claimed_at.elapsed();
        progress.beat();
        // Queries of live state read this store while the partition runs here.
        let _queryable = self
            .open_stores
            .open(partition, Arc::clone(&store), fencing_token);
        let has_outputs = self.config.output_topic.is_some();
        let resumed = PartitionProcessor::resume(
            store.clone(),
            self.services.operator.clone(),
            fencing_token,
            lost.clone(),
        );
        let resumed = match resumed {
            Ok(resumed) => resumed,
            Err(err) => {
                return Err(self
                    .repair_counter_reset(partition, fencing_token, err)
                    .await);
            }
        };
        let mut processor = resumed
            .with_state_cache_bytes(self.config.state_cache_bytes)
            .with_outputs(has_outputs, self.config.output_mode)
            .with_progress(Arc::clone(&progress))
            .with_claim(kept.context());
        let consumer = DropOffRuntime::new(partition_consumer(
            &self.config.kafka,
            &self.config.group,
            &self.config.topic,
            partition,
            processor.next_offset(),
        )?);
        let consumer_created = claimed_at.elapsed();
        progress.advance_to(Phase::InitialisingOutputs);
        let transactional = self
            .open_transactional_outputs(partition, &consumer)
            .await?;
        if transactional.is_some() {
            progress.advance_to(Phase::Replaying);
            self.replay_committed_outputs(&consumer, &mut processor, &stop)
                .await?;
        }
        progress.advance_to(Phase::Consuming);
        // The start took as long as it took (a restore, a busy runtime): a claim that lapsed meanwhile
        // may be another owner's by now, so nothing is started on it.
        ensure_claim_current(&kept.context(), partition, "start")?;
        let outputs = match (&transactional, self.sink.as_ref()) {
            (Some((sink, group)), _) => Outputs::Transactional(sink, group),
            (None, Some(sink)) => Outputs::AtLeastOnce(sink),
            (None, None) => Outputs::Discard,
        };
        tracing::info!(instance = %self.config.instance_id, partition, fencing_token, from = processor.next_offset(), ?outputs, "partition started");
        // Where a takeover's start goes (cumulative, from the claim): the checkpoint record read, the
        // state opened or restored, the log's bounds checked, the consumer created, outputs ready.
        tracing::debug!(partition, ?record_read, ?state_ready, ?bounds_checked, ?consumer_created, outputs_ready = ?claimed_at.elapsed(), "partition start timings");
        self.status.send_modify(|s| {
            if let Some(p) = s.partition_status.get_mut(&partition) {
                p.processing = true;
                p.next_offset = processor.next_offset();
            }
        });
        let labels = partition_labels(&self.config.topic, partition);
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
            let until_checkpoint = self
                .config
                .checkpoint_every
                .saturating_sub(last_checkpoint.elapsed());
            let pause_at = tokio::time::Instant::now()
                + until_checkpoint.clamp(MIN_SEGMENT, self.config.status_interval.max(MIN_SEGMENT));
            let before = processor.stats();
            let consumed = consume_segment(
                &consumer,
                &mut processor,
                self.commit_policy(),
                pause_at,
                outputs,
                Some(&self.permits),
                &halt,
            )
            .await;
            let after = processor.stats();
            let fetch_position = fetch_position(&consumer, &self.config.topic, partition);
            self.report_segment(
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
                    &self.config.topic,
                    partition,
                    processor.next_offset(),
                    false,
                );
            }
            if !stop.is_cancelled() && last_checkpoint.elapsed() < self.config.checkpoint_every {
                continue;
            }
            // One upload at a time per partition, in order. One still running is not waited for while
            // the partition has work: the checkpoint is taken at a later segment's end instead.
            if let Some(previous) = publishing.take() {
                if !previous.is_finished() && !stop.is_cancelled() {
                    // An upload that never ends would silently end this partition's checkpoints.
                    if let Some(bound) = self.config.stall_timeout
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
                && let Some((scratch, next_offset)) = self.snapshot(&store).await?
            {
                checkpointed = Some(next_offset);
                publishing_since = tokio::time::Instant::now();
                publishing = Some(AbortOnDropHandle::new(tokio::spawn(
                    Arc::clone(&self).publish(partition, scratch, next_offset, fencing_token),
                )));
            }
            progress.enter(Phase::Consuming);
            if stop.is_cancelled() {
                progress.enter(Phase::HandingOff);
                // Hand-off: the final checkpoint must land before the claim is released.
                ensure_claim_current(&kept.context(), partition, "hand-off")?;
                if let Some(last) = publishing.take() {
                    self.finish_hand_off(&store, partition, fencing_token, last)
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
                    self.config.topic.clone(),
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
        tracing::info!(instance = %self.config.instance_id, partition, "partition handed off");
        Ok(())
    }
}

/// How a starting partition's stored state offset `S` stands against the group's committed offset `K`
/// (the end of the input whose outputs are visible).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reconcile {
    /// `S < K`: replay `[S, K)` with the outputs discarded (they are visible already).
    Replay(i64),
    /// `S > K`, or no `K` at all while the state has progress: the group's offsets expired
    /// (`offsets.retention.minutes`) or the partition ran at-least-once before; a warning, and
    /// exactly-once output from `S`.
    StateAhead(Option<i64>),
    /// `S = K`, or a new partition with neither.
    InStep,
}

fn reconcile(committed: Option<i64>, stored: i64) -> Reconcile {
    match committed {
        Some(committed) if committed > stored => Reconcile::Replay(committed),
        Some(committed) if committed < stored => Reconcile::StateAhead(Some(committed)),
        None if stored > 0 => Reconcile::StateAhead(None),
        _ => Reconcile::InStep,
    }
}

impl Instance {
    /// When the partition commits: by records or time, as configured.
    fn commit_policy(&self) -> CommitPolicy {
        CommitPolicy::new(self.config.batch_size, self.config.commit_interval)
    }

    /// After a consume segment: the partition's progress into the status and the metrics — records and
    /// dead letters counted, the offset, the lag against the last high watermark read, the state's size
    /// and the claim's expiry.
    fn report_segment(
        &self,
        partition: i32,
        processor: &PartitionProcessor,
        kept: &KeptLock,
        fetch_position: Option<i64>,
        (before, after): (PartitionStats, PartitionStats),
        labels: &[(&'static str, String); 2],
    ) {
        let applied = after.applied - before.applied;
        let dead_letters = after.dead_letters - before.dead_letters;
        let next_offset = processor.next_offset();
        // The high watermark comes from the instance's lag watcher (one metadata request a second for
        // all its partitions, off this loop).
        let high = self
            .status
            .borrow()
            .partition_status
            .get(&partition)
            .and_then(|p| p.high_watermark);
        let lag = high.map(|high| (high - next_offset).max(0));
        // Caught up with the log is progress too: an idle partition is not stalled (nor one whose log
        // end is unknown: the watchdog cannot tell it has work).
        if !super::watchdog::records_past(next_offset, fetch_position, high) {
            processor.progress().beat();
        }
        let state_bytes = processor.store().approximate_size_bytes();
        metrics::counter!("processor_records_processed_total", labels).increment(applied);
        metrics::counter!("processor_dead_letters_total", labels).increment(dead_letters);
        #[allow(clippy::cast_precision_loss)]
        {
            metrics::gauge!("processor_next_offset", labels).set(next_offset as f64);
            metrics::gauge!("processor_state_size_bytes", labels).set(state_bytes as f64);
            if let Some(lag) = lag {
                metrics::gauge!("processor_consumer_lag_records", labels).set(lag as f64);
            }
        }
        let claim_expires_ms = instant_to_unix_ms(kept.valid_until());
        self.status.send_modify(|s| {
            s.processed += applied;
            s.dead_letters += dead_letters;
            if let Some(p) = s.partition_status.get_mut(&partition) {
                p.processing = true;
                p.next_offset = next_offset;
                p.high_watermark = high;
                p.fetch_position = fetch_position;
                p.lag = lag;
                p.state_bytes = state_bytes;
                p.processed += applied;
                p.claim_expires_ms = claim_expires_ms;
            }
        });
    }
}

/// Where `consumer` fetches `partition` next (a local read, no request): `None` before its first fetch.
fn fetch_position(
    consumer: &rdkafka::consumer::StreamConsumer,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    use rdkafka::consumer::Consumer;
    let positions = consumer.position().ok()?;
    match positions.find_partition(topic, partition)?.offset() {
        rdkafka::Offset::Offset(offset) => Some(offset),
        _ => None,
    }
}

/// The `topic` and `partition` labels of a partition's metrics.
fn partition_labels(topic: &str, partition: i32) -> [(&'static str, String); 2] {
    [
        ("topic", topic.to_owned()),
        ("partition", partition.to_string()),
    ]
}

/// Records the snapshot pause (the partition's processing waits for it) when dropped, whichever way the
/// snapshot ends.
/// Whether `store`'s state was written under at least `token` and reaches at least `offset`.
fn is_at_least(store: &Arc<dyn PartitionStore>, token: u64, offset: i64) -> ProcessorResult<bool> {
    Ok(store
        .meta()?
        .is_some_and(|meta| meta.fencing_token >= token && meta.next_offset >= offset))
}

struct PauseTimer(std::time::Instant, [(&'static str, String); 2]);

impl Drop for PauseTimer {
    fn drop(&mut self) {
        metrics::histogram!("processor_checkpoint_pause_seconds", &self.1)
            .record(self.0.elapsed().as_secs_f64());
    }
}

/// A recorded checkpoint's metrics: upload time, bytes copied and reused, and when.
fn record_checkpoint_metrics(
    labels: &[(&'static str, String); 2],
    report: &UploadReport,
    upload: std::time::Duration,
    recorded_at: std::time::SystemTime,
) {
    let total: u64 = report.manifest.files.iter().map(|file| file.size).sum();
    metrics::counter!("processor_checkpoints_total", labels).increment(1);
    metrics::histogram!("processor_checkpoint_upload_duration_seconds", labels)
        .record(upload.as_secs_f64());
    metrics::counter!("processor_checkpoint_uploaded_bytes_total", labels)
        .increment(report.copied_bytes);
    metrics::counter!("processor_checkpoint_reused_bytes_total", labels)
        .increment(total.saturating_sub(report.copied_bytes));
    #[allow(clippy::cast_precision_loss)]
    metrics::gauge!("processor_last_checkpoint_timestamp_seconds", labels)
        .set(unix_ms(recorded_at) as f64 / 1000.0);
}

/// Uploads a checkpoint and confirms every file it names is in the store; a file missing at the
/// confirmation is uploaded again (once: the new upload copies what is missing).
fn upload_confirmed(
    checkpoints: &dyn CheckpointStore,
    topic: &str,
    partition: i32,
    snapshot: &std::path::Path,
    next_offset: i64,
    fencing_token: u64,
) -> ProcessorResult<UploadReport> {
    let report = checkpoints.upload(topic, partition, snapshot, next_offset, fencing_token)?;
    match checkpoints.confirm(&report.manifest) {
        Ok(()) => Ok(report),
        Err(err @ ProcessorError::CorruptCheckpoint { .. }) => {
            tracing::warn!(partition, error = %err, "a file of the new checkpoint vanished before it was recorded: uploading it again");
            let report =
                checkpoints.upload(topic, partition, snapshot, next_offset, fencing_token)?;
            checkpoints.confirm(&report.manifest)?;
            Ok(report)
        }
        Err(err) => Err(err),
    }
}

/// Commits `next_offset` of `partition` to the instance's Kafka group, so that standard tools
/// (`kafka-consumer-groups`, lag exporters) see the fleet's progress and lag. Informational only: the
/// offset stored with the partition's state is what a new owner resumes from, never this one, so a
/// failed commit is logged and otherwise ignored.
fn report_progress(
    consumer: &rdkafka::consumer::StreamConsumer,
    topic: &str,
    partition: i32,
    next_offset: i64,
    wait: bool,
) {
    use rdkafka::consumer::{CommitMode, Consumer};
    let mut offsets = rdkafka::TopicPartitionList::new();
    if offsets
        .add_partition_offset(topic, partition, rdkafka::Offset::Offset(next_offset))
        .is_err()
    {
        return;
    }
    let mode = if wait {
        CommitMode::Sync
    } else {
        CommitMode::Async
    };
    if let Err(err) = consumer.commit(&offsets, mode) {
        tracing::debug!(topic, partition, next_offset, error = %err, "could not commit progress to the group (informational)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::DirectoryCheckpointStore;

    /// Expired group offsets (no committed offset at all while the state has progress) are named, as
    /// the guide's §11 table promises, not passed over in silence.
    #[test]
    fn expired_group_offsets_are_told_apart_from_a_new_partition() {
        assert_eq!(reconcile(Some(50), 10), Reconcile::Replay(50));
        assert_eq!(reconcile(Some(5), 10), Reconcile::StateAhead(Some(5)));
        assert_eq!(reconcile(None, 10), Reconcile::StateAhead(None));
        assert_eq!(reconcile(None, 0), Reconcile::InStep);
        assert_eq!(reconcile(Some(10), 10), Reconcile::InStep);
    }
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// A store whose first upload loses one of its files right after the manifest is written, as when a
    /// cleaner whose lock expired under a pause deletes a file the upload had just reused.
    struct CleanerRace {
        inner: DirectoryCheckpointStore,
        files_dir: PathBuf,
        raced: AtomicBool,
    }

    impl CheckpointStore for CleanerRace {
        fn upload(
            &self,
            topic: &str,
            partition: i32,
            snapshot_dir: &std::path::Path,
            next_offset: i64,
            fencing_token: u64,
        ) -> ProcessorResult<UploadReport> {
            let report =
                self.inner
                    .upload(topic, partition, snapshot_dir, next_offset, fencing_token)?;
            if !self.raced.swap(true, Ordering::SeqCst) {
                let victim = Manifest::blob_name(&report.manifest.files[0]);
                std::fs::remove_file(self.files_dir.join(victim)).unwrap();
            }
            Ok(report)
        }
        fn latest_valid(
            &self,
            topic: &str,
            partition: i32,
        ) -> ProcessorResult<(Option<Manifest>, Vec<ProcessorError>)> {
            self.inner.latest_valid(topic, partition)
        }
        fn checkpoint(&self, topic: &str, partition: i32, id: &str) -> ProcessorResult<Manifest> {
            self.inner.checkpoint(topic, partition, id)
        }
        fn confirm(&self, manifest: &Manifest) -> ProcessorResult<()> {
            self.inner.confirm(manifest)
        }
        fn restore(&self, manifest: &Manifest, dest: &std::path::Path) -> ProcessorResult<()> {
            self.inner.restore(manifest, dest)
        }
        fn retain(
            &self,
            topic: &str,
            partition: i32,
            keep: usize,
            grace: Duration,
        ) -> ProcessorResult<usize> {
            self.inner.retain(topic, partition, keep, grace)
        }
        fn partitions(&self, topic: &str) -> ProcessorResult<Vec<i32>> {
            self.inner.partitions(topic)
        }
    }

    #[test]
    fn a_file_lost_under_the_upload_is_uploaded_again_before_the_checkpoint_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = dir.path().join("snapshot");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(snapshot.join("000007.sst"), b"sorted data").unwrap();
        let store = CleanerRace {
            inner: DirectoryCheckpointStore::new(dir.path().join("shared")).unwrap(),
            files_dir: dir
                .path()
                .join("shared")
                .join("orders")
                .join("0")
                .join("files"),
            raced: AtomicBool::new(false),
        };
        let report = upload_confirmed(&store, "orders", 0, &snapshot, 10, 1).unwrap();
        store
            .checkpoint("orders", 0, &report.manifest.id())
            .expect("the checkpoint to be recorded is complete");

        let missing = store.inner.confirm(&Manifest {
            files: vec![crate::checkpoint::ManifestFile {
                name: "gone.sst".to_owned(),
                size: 1,
                sha256: "00".to_owned(),
            }],
            ..report.manifest
        });
        assert!(
            matches!(missing, Err(ProcessorError::CorruptCheckpoint { .. })),
            "confirm reports a missing file: {missing:?}"
        );
    }
}
