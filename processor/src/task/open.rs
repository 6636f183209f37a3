//! Opening a partition's state at the start of its claim: reused when the local copy (this instance's
//! own, or a standby's) is as new as the recorded checkpoint, otherwise restored from the latest valid
//! checkpoint (atomically: a scratch directory, then a rename); the stored offset checked against the
//! log; a fencing counter that went back repaired.

use std::sync::Arc;

use super::local_dirs::{
    RESTORING, STANDBY_NEXT, STANDBY_OLD, UNREADABLE, remove_leftovers, replace_dir, sibling,
};
use super::report::partition_labels;
use super::{LOG_BOUNDS_TIMEOUT, METADATA_CALL_BOUND, TaskContext};
use crate::checkpoint::{CheckpointRecord, CheckpointRecords, Manifest};
use crate::config::MissingOffsets;
use crate::error::{ProcessorError, ProcessorResult};
use crate::kafka_calls::bounded;
use crate::resources::{local_state_dir, partition_resource};
use crate::store::{PartitionStore, StateBatch};

impl TaskContext {
    /// Opens the partition's local state: reused if this disk holds the newest state (its token and
    /// offset are not behind the latest valid checkpoint), otherwise replaced by that checkpoint —
    /// restored atomically (scratch directory, then rename). A local directory that does not open is
    /// moved aside and replaced the same way.
    pub(crate) fn prepare_store(
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
            &self.settings.state_dir,
            &self.settings.group,
            &self.settings.topic,
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
    pub(crate) fn start_from_local_copy(
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
        let Ok(manifest) = checkpoints.manifest(&self.settings.topic, partition, &record.manifest)
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
    pub(crate) fn is_as_new_as(
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
    pub(crate) fn count_restore(&self, partition: i32, started: std::time::Instant) {
        self.status.send_modify(|s| s.restores += 1);
        let labels = partition_labels(&self.settings.topic, partition);
        metrics::counter!("processor_restores_total", &labels).increment(1);
        metrics::histogram!("processor_restore_duration_seconds", &labels)
            .record(started.elapsed().as_secs_f64());
    }

    /// The fenced record of `partition`'s newest checkpoint, in this fleet.
    pub(crate) fn checkpoint_records(&self, partition: i32) -> CheckpointRecords {
        CheckpointRecords::new(
            self.services.lock.clone(),
            self.services.registry.clone(),
            &self.settings.group,
            &self.settings.topic,
            partition,
        )
    }

    /// The checkpoint the partition resumes from. The fenced record names it: read and verified, it is
    /// the one; corrupt, the newest older valid one is used instead (logged and counted); unreadable — a
    /// missing mount, a permission error, a deleted manifest — the partition refuses, unless the operator
    /// accepted the loss (`restore_older_checkpoint`). Without a record (a new fleet, or checkpoints from
    /// before records existed), the newest valid checkpoint; a store that cannot be read is an error.
    pub(crate) fn checkpoint_to_restore(
        &self,
        partition: i32,
        recorded: Option<CheckpointRecord>,
    ) -> ProcessorResult<Option<Manifest>> {
        let checkpoints = &self.services.checkpoints;
        let topic = &self.settings.topic;
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
            Err(err) if self.settings.restore_older_checkpoint => {
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

    pub(crate) fn count_corrupt(&self, partition: i32, skipped: &[ProcessorError]) {
        for err in skipped {
            tracing::warn!(partition, error = %err, "skipped a corrupt checkpoint: restoring an older one and replaying from it");
        }
        if !skipped.is_empty() {
            self.status
                .send_modify(|s| s.corrupt_checkpoints_skipped += skipped.len() as u64);
        }
    }

    /// A *fresh* claim's token below one already written for the partition (`err` is the start's
    /// [`ProcessorError::StaleOwner`]) cannot come from a newer owner — nobody else holds the claim —
    /// so the lock backend's fencing counter went back (Redis without `appendonly`, a failover that lost
    /// the last increments). Left alone, every partition would refuse to start until the counter
    /// climbed back on its own. The repair: raise the counter past the highest token recorded, say so
    /// once, and give this claim up; the next claim's token is above every recorded one, so a stale
    /// holder with an old high token is fenced out again. Anything else is returned as it is.
    pub(crate) async fn repair_counter_reset(
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
        let resource = partition_resource(&self.settings.group, &self.settings.topic, partition);
        metrics::counter!("processor_fencing_counter_resets_total", "topic" => self.settings.topic.clone())
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
            instance = %self.settings.instance_id,
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
    pub(crate) async fn ensure_offset_in_log(
        &self,
        store: &Arc<dyn PartitionStore>,
        partition: i32,
        fencing_token: u64,
    ) -> ProcessorResult<()> {
        let (metadata, topic) = (Arc::clone(&self.metadata), self.settings.topic.clone());
        let (low, high) = bounded("fetch watermarks", METADATA_CALL_BOUND, move || {
            metadata.watermarks(&topic, partition, LOG_BOUNDS_TIMEOUT)
        })
        .await?;
        let stored = store.meta()?.map(|meta| meta.next_offset);
        let (offset, to) = match stored {
            Some(offset) if offset < low || offset > high => {
                let to = match self.settings.on_missing_offsets {
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
            instance = %self.settings.instance_id,
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
}

/// Whether `store`'s state was written under at least `token` and reaches at least `offset`.
pub(crate) fn is_at_least(
    store: &Arc<dyn PartitionStore>,
    token: u64,
    offset: i64,
) -> ProcessorResult<bool> {
    Ok(store
        .meta()?
        .is_some_and(|meta| meta.fencing_token >= token && meta.next_offset >= offset))
}
