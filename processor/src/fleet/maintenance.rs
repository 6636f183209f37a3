//! Fleet-wide maintenance of the shared checkpoint store: retention (keep the last K checkpoints of a
//! partition) and compaction (delete the files no kept checkpoint references).
//!
//! - The **leader** — one instance, elected with [`LeaderElection`](state::recipes::leader::LeaderElection)
//!   — schedules the work: at the start of each term it makes sure one recurring job per partition,
//!   `maintain:{group}:{topic}:{p}`, exists in the [`TaskQueue`]. The jobs survive the leader: the queue keeps
//!   them due every period whoever leads.
//! - **Followers** claim due jobs (`task:maintain:{group}:{topic}:{p}`, kept alive by heartbeats while running)
//!   and run them; a job that crashed mid-run is run again by someone else, and each period completes once.
//! - Each run takes the partition's **compaction lock** (`compaction:{group}:{topic}:{p}`, through the
//!   compaction recipe), which the partition's owner also takes — kept, renewed — while it uploads a
//!   checkpoint: an upload that reuses a file and the retention that would delete it never overlap. For
//!   the case where a lock expired under a paused process, files are also only deleted after a grace
//!   period without use (measured on the store's clock alone), and an uploader confirms every file of
//!   its checkpoint is there before it records it.

use std::sync::Arc;

use state::recipes::compaction::{CompactionOutcome, compact_resource};
use state::recipes::fenced::FencedStore;
use state::recipes::tasks::{TaskOutcome, TaskQueue, TaskStore};
use state::{DistributedLock, StateError, StateResult};

use crate::checkpoint::CheckpointStore;
use crate::checkpoint::record::CheckpointRecords;
use crate::config::MaintenanceConfig;
use crate::resources::{compaction_resource, maintenance_task_id};

/// What one claimed job did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MaintenanceOutcome {
    /// Retention ran under the compaction lock and the job completed; old checkpoints removed.
    Compacted {
        /// Checkpoints removed.
        removed_checkpoints: usize,
    },
    /// Someone else held the partition's compaction lock (an upload or another cleaner); the job
    /// completed without work (the next period retries).
    Skipped,
    /// The job ran, but its period had been completed elsewhere meanwhile.
    AlreadyCompleted,
    /// The claim or the compaction lock was lost mid-run; the job was stopped and stays due.
    Lost,
    /// The job failed and stays due.
    Failed(String),
}

/// One claimed job.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MaintenanceRun {
    /// The task id.
    pub task_id: String,
    /// The partition it maintained (`None` when the job's payload named none: it failed).
    pub partition: Option<i32>,
    /// The claim's fencing token.
    pub fencing_token: u64,
    /// What happened.
    pub outcome: MaintenanceOutcome,
}

/// Maintenance of one topic's checkpoints.
#[derive(Clone)]
pub struct Maintenance {
    queue: TaskQueue,
    lock: Arc<dyn DistributedLock>,
    checkpoints: Arc<dyn CheckpointStore>,
    /// The fenced checkpoint records: retention never deletes the checkpoint a partition's record names.
    registry: Arc<dyn FencedStore>,
    group: String,
    topic: String,
    config: MaintenanceConfig,
}

impl std::fmt::Debug for Maintenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maintenance")
            .field("topic", &self.topic)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Maintenance {
    /// Maintenance of the partitions of `topic` in `checkpoints` for fleet `group`, with jobs in `tasks`
    /// and the partitions' checkpoint records in `registry`.
    pub fn new(
        lock: Arc<dyn DistributedLock>,
        tasks: Arc<dyn TaskStore>,
        checkpoints: Arc<dyn CheckpointStore>,
        registry: Arc<dyn FencedStore>,
        group: &str,
        topic: &str,
        config: MaintenanceConfig,
    ) -> Self {
        Maintenance {
            // Only this job's maintenance: other jobs (other topics or groups) on the same task store
            // have jobs of their own, and running one here would compact the wrong partition and mark
            // theirs done.
            queue: TaskQueue::new(Arc::clone(&lock), tasks, config.claim_ttl)
                .only_tasks(is_maintenance_task_of(group, topic)),
            lock,
            checkpoints,
            registry,
            group: group.to_owned(),
            topic: topic.to_owned(),
            config,
        }
    }

    /// The leader's duty: makes sure the recurring job of every partition below `partitions` exists (the
    /// count grows when partitions are added to the topic). Returns how many were created (0 when an
    /// earlier leader already scheduled them all).
    ///
    /// # Errors
    /// A task-store error.
    pub async fn schedule(&self, partitions: i32) -> StateResult<usize> {
        let mut created = 0;
        for partition in 0..partitions {
            let id = maintenance_task_id(&self.group, &self.topic, partition);
            if self
                .queue
                .ensure_recurring(&id, self.config.every, partition.to_string().as_bytes())
                .await?
            {
                created += 1;
            }
        }
        Ok(created)
    }

    /// A follower's duty: claims the first due job nobody holds and runs it; `Ok(None)` when nothing is
    /// due.
    ///
    /// # Errors
    /// A task-store or lock error from claiming.
    pub async fn run_next(&self) -> StateResult<Option<MaintenanceRun>> {
        let mut ran: Option<(i32, MaintenanceOutcome)> = None;
        let record = &mut ran;
        let run = self
            .queue
            .run_next(|task, _claim| async move {
                let partition = parse_partition(&task.payload)?;
                *record = Some((partition, self.compact(partition).await?));
                Ok(())
            })
            .await?;
        let Some(run) = run else { return Ok(None) };
        let partition = ran.as_ref().map(|(p, _)| *p);
        let outcome = match (run.outcome, ran) {
            (TaskOutcome::Completed, Some((_, outcome))) => outcome,
            (TaskOutcome::Completed, None) => MaintenanceOutcome::Skipped,
            (TaskOutcome::AlreadyCompleted, _) => MaintenanceOutcome::AlreadyCompleted,
            (TaskOutcome::Lost, _) => MaintenanceOutcome::Lost,
            (TaskOutcome::Failed(reason), _) => MaintenanceOutcome::Failed(reason),
            (other, _) => MaintenanceOutcome::Failed(format!("{other:?}")),
        };
        Ok(Some(MaintenanceRun {
            task_id: run.id,
            partition,
            fencing_token: run.fencing_token,
            outcome,
        }))
    }

    /// Retention of one partition under its compaction lock.
    async fn compact(&self, partition: i32) -> StateResult<MaintenanceOutcome> {
        let resource = compaction_resource(&self.group, &self.topic, partition);
        let outcome = compact_resource(&self.lock, &resource, self.config.claim_ttl, |ctx| {
            let store = Arc::clone(&self.checkpoints);
            let (topic, keep, grace) = (
                self.topic.clone(),
                self.config.keep_checkpoints,
                self.config.grace,
            );
            let records = CheckpointRecords::new(
                Arc::clone(&self.lock),
                Arc::clone(&self.registry),
                &self.group,
                &self.topic,
                partition,
            );
            async move {
                // Read under the compaction lock, before the listing: a record published after this
                // names a checkpoint newer than every one retention sees, which it never deletes.
                let recorded = records
                    .latest()
                    .await
                    .map_err(|err| storage("read the checkpoint record before retention", err))?
                    .map(|record| record.manifest);
                let removed = tokio::task::spawn_blocking(move || {
                    store.retain(&topic, partition, keep, grace, recorded.as_deref())
                })
                .await
                .map_err(|err| storage("run retention", err))?
                .map_err(|err| storage("run retention", err))?;
                if ctx.is_lost() {
                    return Err(StateError::LockLost {
                        resource: ctx.resource().to_owned(),
                    });
                }
                Ok(removed)
            }
        })
        .await?;
        Ok(match outcome {
            CompactionOutcome::Completed(removed_checkpoints) => MaintenanceOutcome::Compacted {
                removed_checkpoints,
            },
            CompactionOutcome::Lost => MaintenanceOutcome::Lost,
            _ => MaintenanceOutcome::Skipped,
        })
    }
}

fn storage(operation: &str, err: impl std::error::Error + Send + Sync + 'static) -> StateError {
    StateError::StorageError {
        operation: operation.to_owned(),
        source: Box::new(err),
    }
}

/// Whether a task id is one of the maintenance jobs of the job on `topic` in fleet `group`.
fn is_maintenance_task_of(group: &str, topic: &str) -> state::recipes::tasks::TaskFilter {
    let (group, topic) = (group.to_owned(), topic.to_owned());
    Arc::new(move |id: &str| {
        crate::resources::maintenance_task_partition(&group, &topic, id).is_some()
    })
}

fn parse_partition(payload: &[u8]) -> StateResult<i32> {
    std::str::from_utf8(payload)
        .ok()
        .and_then(|text| text.parse::<i32>().ok())
        .filter(|p| *p >= 0)
        .ok_or_else(|| StateError::invalid("maintenance payload", "not a partition number"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::checkpoint::record::CheckpointRecord;
    use crate::checkpoint::{DirectoryCheckpointStore, hold_compaction_lock};
    use state::InMemoryDistributedLock;
    use state::recipes::fenced::InMemoryFencedStore;
    use state::recipes::tasks::InMemoryTaskStore;

    #[tokio::test]
    async fn the_leader_schedules_once_and_a_follower_cleans_each_partition() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoints =
            Arc::new(DirectoryCheckpointStore::new(dir.path().join("shared")).unwrap());
        let snapshot = dir.path().join("snap");
        std::fs::create_dir_all(&snapshot).unwrap();
        for offset in 1..=5 {
            std::fs::write(snapshot.join("state.sst"), format!("v{offset}")).unwrap();
            checkpoints.upload("t", 1, &snapshot, offset, 1).unwrap();
        }
        let lock: Arc<dyn DistributedLock> = Arc::new(InMemoryDistributedLock::new());
        let tasks: Arc<dyn TaskStore> = Arc::new(InMemoryTaskStore::default());
        let config = MaintenanceConfig {
            keep_checkpoints: 2,
            grace: Duration::ZERO,
            ..MaintenanceConfig::default()
        };
        let maintenance = Maintenance::new(
            lock.clone(),
            tasks,
            checkpoints.clone(),
            Arc::new(InMemoryFencedStore::default()),
            "g",
            "t",
            config,
        );
        assert_eq!(maintenance.schedule(2).await.unwrap(), 2);
        assert_eq!(
            maintenance.schedule(2).await.unwrap(),
            0,
            "a second leader adds nothing"
        );

        let mut outcomes = Vec::new();
        while let Some(run) = maintenance.run_next().await.unwrap() {
            outcomes.push((run.partition, run.outcome));
        }
        outcomes.sort_by_key(|(p, _)| *p);
        assert_eq!(
            outcomes,
            vec![
                (
                    Some(0),
                    MaintenanceOutcome::Compacted {
                        removed_checkpoints: 0
                    }
                ),
                (
                    Some(1),
                    MaintenanceOutcome::Compacted {
                        removed_checkpoints: 3
                    }
                ),
            ]
        );
        assert!(
            maintenance.run_next().await.unwrap().is_none(),
            "not due again yet"
        );
        let (latest, _) = checkpoints.latest_valid("t", 1).unwrap();
        assert_eq!(latest.unwrap().next_offset, 5);

        // While the owner holds the compaction lock (uploading), a cleaner skips the partition — also
        // when the upload takes several times the lock's TTL (the lock is kept renewed).
        let held = hold_compaction_lock(
            &lock,
            &compaction_resource("g", "t", 1),
            Duration::from_millis(300),
            Duration::from_secs(1),
        )
        .await
        .unwrap()
        .expect("free");
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert_eq!(
            maintenance.compact(1).await.unwrap(),
            MaintenanceOutcome::Skipped
        );
        assert!(!held.is_lost());
        held.release().await.unwrap();
        assert!(parse_partition(b"-3").is_err() && parse_partition(b"x").is_err());
    }

    /// The checkpoint the partition's record names survives retention although newer ones exist (an
    /// owner uploaded twice and crashed, or failed to record, each time): with `keep 1`, retention used
    /// to delete it, leaving a record that names nothing — and every later owner refused the partition.
    #[tokio::test]
    async fn retention_never_deletes_the_recorded_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoints: Arc<dyn CheckpointStore> =
            Arc::new(DirectoryCheckpointStore::new(dir.path().join("shared")).unwrap());
        let snapshot = dir.path().join("snap");
        std::fs::create_dir_all(&snapshot).unwrap();
        let upload = |offset: i64| {
            std::fs::write(snapshot.join("state.sst"), format!("v{offset}")).unwrap();
            checkpoints
                .upload("t", 0, &snapshot, offset, 7)
                .unwrap()
                .manifest
        };
        let recorded = upload(1);
        let (_, newest) = (upload(2), upload(3));
        let lock: Arc<dyn DistributedLock> = Arc::new(InMemoryDistributedLock::new());
        let registry: Arc<dyn FencedStore> = Arc::new(InMemoryFencedStore::default());
        CheckpointRecords::new(lock.clone(), registry.clone(), "g", "t", 0)
            .publish(7, &CheckpointRecord::new(&recorded, "a"))
            .await
            .unwrap();
        let config = MaintenanceConfig {
            keep_checkpoints: 1,
            grace: Duration::ZERO,
            ..MaintenanceConfig::default()
        };
        let tasks: Arc<dyn TaskStore> = Arc::new(InMemoryTaskStore::default());
        let maintenance =
            Maintenance::new(lock, tasks, checkpoints.clone(), registry, "g", "t", config);
        maintenance.schedule(1).await.unwrap();
        let run = maintenance.run_next().await.unwrap().expect("due");
        assert_eq!(
            run.outcome,
            MaintenanceOutcome::Compacted {
                removed_checkpoints: 1
            },
            "only the unrecorded middle one goes"
        );
        let still = checkpoints.checkpoint("t", 0, &recorded.id());
        assert!(still.is_ok(), "the recorded checkpoint is gone: {still:?}");
        let (latest, _) = checkpoints.latest_valid("t", 0).unwrap();
        assert_eq!(latest.unwrap().id(), newest.id());
    }

    /// Two jobs of one group on two topics share a task store: each one's followers run only its own
    /// maintenance jobs (running the other's would compact the wrong partition and mark theirs done).
    #[tokio::test]
    async fn a_job_never_runs_another_jobs_maintenance() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoints: Arc<dyn CheckpointStore> =
            Arc::new(DirectoryCheckpointStore::new(dir.path().join("shared")).unwrap());
        let lock: Arc<dyn DistributedLock> = Arc::new(InMemoryDistributedLock::new());
        let tasks: Arc<dyn TaskStore> = Arc::new(InMemoryTaskStore::default());
        let job = |topic: &str| {
            let config = MaintenanceConfig::default();
            Maintenance::new(
                lock.clone(),
                tasks.clone(),
                checkpoints.clone(),
                Arc::new(InMemoryFencedStore::default()),
                "processor",
                topic,
                config,
            )
        };
        let (orders, clicks) = (job("orders"), job("clicks"));
        assert_eq!(orders.schedule(3).await.unwrap(), 3);
        assert_eq!(clicks.schedule(2).await.unwrap(), 2);
        let mut ran = Vec::new();
        while let Some(run) = orders.run_next().await.unwrap() {
            ran.push(run.task_id);
        }
        ran.sort();
        assert_eq!(
            ran,
            [
                "maintain:processor:orders:0",
                "maintain:processor:orders:1",
                "maintain:processor:orders:2"
            ]
        );
        let mut theirs = 0;
        while clicks.run_next().await.unwrap().is_some() {
            theirs += 1;
        }
        assert_eq!(theirs, 2, "the other job's maintenance was left to it");
    }
}
