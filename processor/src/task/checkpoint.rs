//! A partition's checkpoints: the local snapshot (a RocksDB checkpoint in a scratch directory, the
//! partition paused for it), then the upload and the fenced record in the background while the
//! partition goes on, and the final checkpoint of a hand-off.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::task::AbortOnDropHandle;

use super::TaskContext;
use super::report::partition_labels;
use crate::checkpoint::{CheckpointRecord, CheckpointStore, UploadReport, hold_compaction_lock};
use crate::error::{ProcessorError, ProcessorResult};
use crate::resources::{self, compaction_resource};
use crate::status::unix_ms;
use crate::store::PartitionStore;

/// Waits for a checkpoint upload of `partition`.
pub(crate) async fn finish_publishing(
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
pub(crate) enum Published {
    Recorded,
    Skipped,
}

/// Attempts at the final checkpoint of a hand-off while retention holds the compaction lock.
const HAND_OFF_ATTEMPTS: u32 = 3;

impl TaskContext {
    /// Waits for the hand-off's final checkpoint. Skipped (retention holds the compaction lock), it is
    /// taken again, up to [`HAND_OFF_ATTEMPTS`] times; still skipped, the claim is released without it
    /// and the next owner restores the previous checkpoint and replays from there (exact, only slower) —
    /// said in a warning, never silently.
    pub(crate) async fn finish_hand_off(
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
    pub(crate) async fn snapshot(
        &self,
        store: &Arc<dyn PartitionStore>,
    ) -> ProcessorResult<Option<(PathBuf, i64)>> {
        let Some(meta) = store.meta()? else {
            return Ok(None);
        };
        let partition = store.partition();
        let topic = self.settings.topic.clone();
        let state_dir = self.settings.state_dir.join(&self.settings.group);
        let scratch = state_dir.join(resources::snapshot_scratch_name(
            &topic,
            partition,
            meta.next_offset,
        ));
        let store = Arc::clone(store);
        let labels = partition_labels(&self.settings.topic, partition);
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
    pub(crate) async fn publish(
        self: Arc<Self>,
        partition: i32,
        scratch: PathBuf,
        next_offset: i64,
        fencing_token: u64,
    ) -> ProcessorResult<Published> {
        let Some(compaction_lock) = hold_compaction_lock(
            &self.services.lock,
            &compaction_resource(&self.settings.group, &self.settings.topic, partition),
            self.settings.claim_ttl,
            self.settings.claim_ttl,
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
            self.settings.topic.clone(),
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
                &CheckpointRecord::new(&report.manifest, &self.settings.instance_id),
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
            &partition_labels(&self.settings.topic, partition),
            &report,
            upload_started.elapsed(),
            recorded_at,
        );
        Ok(Published::Recorded)
    }
}

/// Records the snapshot pause (the partition's processing waits for it) when dropped, whichever way the
/// snapshot ends.
struct PauseTimer(std::time::Instant, [(&'static str, String); 2]);

impl Drop for PauseTimer {
    fn drop(&mut self) {
        metrics::histogram!("processor_checkpoint_pause_seconds", &self.1)
            .record(self.0.elapsed().as_secs_f64());
    }
}

/// A recorded checkpoint's metrics: upload time, bytes copied and reused, and when.
pub(crate) fn record_checkpoint_metrics(
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
pub(crate) fn upload_confirmed(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{DirectoryCheckpointStore, Manifest};
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
            recorded: Option<&str>,
        ) -> ProcessorResult<usize> {
            self.inner.retain(topic, partition, keep, grace, recorded)
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
