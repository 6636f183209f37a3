//! Standby replicas: warm copies of partitions this instance does not own, so that when it becomes
//! their owner (the owner died or left) it starts from local state instead of copying the whole
//! checkpoint.
//!
//! A standby copy follows the partition's *checkpoints*, not its input: each time the fenced
//! [`CheckpointRecord`](crate::checkpoint::CheckpointRecord) names a newer checkpoint, the copy is
//! refreshed from it incrementally ([`CheckpointStore::restore_incremental`]: immutable SST files it
//! already has are linked, only new ones are copied, every file is verified) into a scratch directory
//! that then replaces the copy. Following checkpoints keeps a standby exactly as safe as a restore:
//! it never holds state ahead of what the owner's outputs committed (a standby tailing the input could,
//! and its new owner would then skip outputs an aborted transaction never published). A new owner
//! whose local copy is as new as the recorded checkpoint opens it as it is; one a checkpoint behind
//! refreshes it incrementally; either way it replays only the records after the checkpoint.
//!
//! [`CheckpointStore::restore_incremental`]: crate::checkpoint::CheckpointStore::restore_incremental

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::TaskContext;
use super::local_dirs::{STANDBY_NEXT, STANDBY_OLD, remove_leftovers, replace_dir, sibling};
use crate::checkpoint::{CheckpointRecord, RestoreReport};
use crate::error::{ProcessorError, ProcessorResult};
use crate::resources::local_state_dir;
use crate::store::PartitionStore;

/// A running standby of one partition: stop it with `stop`, then await `task` before the partition's
/// directory is used by anything else.
pub(crate) struct Standby {
    pub(crate) stop: CancellationToken,
    /// Ends with the copy, open (see [`Standby::finish`]); aborted when the standby is dropped (an
    /// instance dropped abruptly takes its standbys along: nothing of it keeps running).
    pub(crate) task: AbortOnDropHandle<Option<Arc<dyn PartitionStore>>>,
}

impl Standby {
    /// Stops the standby and waits until its directory is no longer touched (a refresh in flight
    /// finishes its swap first). Returns the copy, still open, when the standby had it open: a new
    /// owner starts from it without opening the database again.
    pub(crate) async fn finish(self) -> Option<Arc<dyn PartitionStore>> {
        self.stop.cancel();
        self.task.await.ok().flatten()
    }
}

impl TaskContext {
    /// Starts keeping a standby copy of `partition`.
    pub(crate) fn start_standby(self: &Arc<Self>, partition: i32) -> Standby {
        let stop = CancellationToken::new();
        let context = Arc::clone(self);
        let task = AbortOnDropHandle::new(tokio::spawn({
            let stop = stop.clone();
            async move { context.keep_standby(partition, stop).await }
        }));
        self.status.send_modify(|s| {
            s.standbys.insert(partition, None);
        });
        Standby { stop, task }
    }

    /// Refreshes the copy whenever a newer checkpoint is recorded, until `stop`.
    /// Keeps the copy refreshed until `stop`, and ends with it open (the database opened after each
    /// refresh, off the takeover's path), for a new owner to start from without opening it.
    async fn keep_standby(
        self: Arc<Self>,
        partition: i32,
        stop: CancellationToken,
    ) -> Option<Arc<dyn PartitionStore>> {
        let mut synced: Option<String> = None;
        let mut open: Option<Arc<dyn PartitionStore>> = None;
        loop {
            if let Err(err) = self
                .refresh_standby(partition, &mut synced, &mut open)
                .await
            {
                metrics::counter!("processor_standby_refresh_failures_total").increment(1);
                tracing::warn!(instance = %self.settings.instance_id, partition, error = %err, "standby refresh failed; retrying at the next interval");
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.settings.checkpoint_every) => {}
            }
        }
        self.status.send_modify(|s| {
            s.standbys.remove(&partition);
        });
        open
    }

    async fn refresh_standby(
        self: &Arc<Self>,
        partition: i32,
        synced: &mut Option<String>,
        open: &mut Option<Arc<dyn PartitionStore>>,
    ) -> ProcessorResult<()> {
        let record = self.checkpoint_records(partition).latest().await?;
        let Some(record) = record else {
            return Ok(());
        };
        if synced.as_deref() == Some(record.manifest.as_str()) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let context = Arc::clone(self);
        let refreshing = record.clone();
        let was_open = open.take();
        let (report, reopened) = tokio::task::spawn_blocking(move || {
            context.refresh_standby_copy(partition, &refreshing, was_open)
        })
        .await
        .map_err(ProcessorError::task(format!(
            "refresh the standby copy of partition {partition}"
        )))?;
        *open = reopened;
        let report = report?;
        metrics::histogram!("processor_standby_refresh_seconds")
            .record(started.elapsed().as_secs_f64());
        tracing::debug!(
            partition,
            next_offset = record.next_offset,
            copied = report.copied_files,
            reused = report.reused_files,
            copied_bytes = report.copied_bytes,
            open = open.is_some(),
            "standby copy refreshed"
        );
        self.status.send_modify(|s| {
            s.standbys.insert(partition, Some(record.next_offset));
        });
        *synced = Some(record.manifest);
        Ok(())
    }

    /// Refreshes the copy from `record`'s checkpoint and opens it; `open`, the copy as it was, is
    /// closed before its directory is replaced. Returns the refreshed copy open (or the old one, still
    /// open, when the refresh failed before touching the directory).
    fn refresh_standby_copy(
        &self,
        partition: i32,
        record: &CheckpointRecord,
        open: Option<Arc<dyn PartitionStore>>,
    ) -> (
        ProcessorResult<RestoreReport>,
        Option<Arc<dyn PartitionStore>>,
    ) {
        let dir = local_state_dir(
            &self.settings.state_dir,
            &self.settings.group,
            &self.settings.topic,
            partition,
        );
        let refreshed = self.refresh_standby_dir(partition, record, &dir, open);
        match refreshed {
            Ok((report, None)) => {
                // Opened here, on the standby's time: a takeover then finds it open. A copy that does
                // not open is no worse than before: the new owner opens (or restores) it itself.
                let reopened = self.services.stores.open_store(partition, &dir).ok();
                (Ok(report), reopened)
            }
            Ok((report, kept)) => (Ok(report), kept),
            Err((err, kept)) => (Err(err), kept),
        }
    }

    /// Restores `record`'s checkpoint beside `dir` incrementally, then closes `open` and swaps the new
    /// copy in. On a failure before the swap, `open` is handed back untouched.
    #[allow(clippy::type_complexity)]
    fn refresh_standby_dir(
        &self,
        partition: i32,
        record: &CheckpointRecord,
        dir: &std::path::Path,
        open: Option<Arc<dyn PartitionStore>>,
    ) -> Result<
        (RestoreReport, Option<Arc<dyn PartitionStore>>),
        (ProcessorError, Option<Arc<dyn PartitionStore>>),
    > {
        remove_leftovers(dir, STANDBY_NEXT);
        remove_leftovers(dir, STANDBY_OLD);
        let manifest = match self.services.checkpoints.manifest(
            &self.settings.topic,
            partition,
            &record.manifest,
        ) {
            Ok(manifest) => manifest,
            Err(err) => return Err((err, open)),
        };
        let next = sibling(dir, STANDBY_NEXT);
        let report = match self
            .services
            .checkpoints
            .restore_incremental(&manifest, &next, dir)
        {
            Ok(report) => report,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&next);
                return Err((err, open));
            }
        };
        // The open database must be closed before its directory moves away.
        drop(open);
        match replace_dir(dir, &next) {
            Ok(()) => Ok((report, None)),
            Err(err) => Err((err, None)),
        }
    }
}
