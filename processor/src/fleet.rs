//! One instance of the fleet: announces itself, works out which partitions it should own (rendezvous
//! hashing over the live members), claims them with kept locks, and runs one task per owned partition —
//! restore or reuse local state, consume from the stored offset, checkpoint periodically and on hand-off,
//! release. Partitions it should no longer own are checkpointed and released; partitions whose owner died
//! are claimed once that owner's lease expires.
//!
//! Beside the partitions, each instance runs its fleet duties: it campaigns in the leader election
//! `leader:{group}`; the leader schedules the maintenance jobs (see [`crate::maintenance`]) and the
//! followers claim and run them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use state::recipes::checkpoint::CheckpointCoordinator;
use state::recipes::keeper::{KeptLock, RenewalPolicy};
use state::recipes::leader::LeaderElection;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::error::{ProcessorError, ProcessorResult};
use crate::kafka::{OutputSink, consume_partition, partition_consumer};
use crate::maintenance::{
    Maintenance, MaintenanceConfig, MaintenanceOutcome, hold_compaction_lock,
};
use crate::ownership::{Membership, assigned_to};
use crate::partition::PartitionProcessor;
use crate::partition_resource;
pub use crate::services::Services;
use crate::store::PartitionStore;

/// How an instance runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct InstanceConfig {
    /// This instance's id (unique in the fleet).
    pub instance_id: String,
    /// The fleet (also the Kafka group id, for lag monitoring only).
    pub group: String,
    /// The topic.
    pub topic: String,
    /// Its partition count.
    pub partitions: i32,
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Where this instance keeps local partition state.
    pub state_dir: PathBuf,
    /// Lease of membership and partition claims (renewed every third).
    pub claim_ttl: Duration,
    /// Time between checkpoints of an owned partition.
    pub checkpoint_every: Duration,
    /// Records per atomic batch.
    pub batch_size: usize,
    /// How many owned partitions process a batch at the same time (the others wait, and their
    /// prefetch queues fill up and stop fetching).
    pub parallelism: usize,
    /// Retention and compaction of the shared checkpoints (scheduled by the leader).
    pub maintenance: MaintenanceConfig,
    /// How often membership, assignment and fleet duties are re-evaluated.
    pub tick: Duration,
    /// Most members the fleet may have.
    pub max_members: u32,
    /// Topic for the updated aggregates (at-least-once), if any.
    pub output_topic: Option<String>,
    /// Topic for malformed records, if any (they are logged either way).
    pub dead_letter_topic: Option<String>,
}

impl InstanceConfig {
    /// Defaults: 5 s claims, checkpoints every 2 s, batches of 500, as many partitions processing at once
    /// as there are CPUs, maintenance every 10 s keeping 3
    /// checkpoints, 250 ms ticks, no output or dead-letter topic.
    pub fn new(
        instance_id: &str,
        topic: &str,
        partitions: i32,
        brokers: &str,
        state_dir: PathBuf,
    ) -> Self {
        InstanceConfig {
            instance_id: instance_id.to_owned(),
            group: "processor".to_owned(),
            topic: topic.to_owned(),
            partitions,
            brokers: brokers.to_owned(),
            state_dir,
            claim_ttl: Duration::from_secs(5),
            checkpoint_every: Duration::from_secs(2),
            batch_size: 500,
            parallelism: std::thread::available_parallelism().map_or(2, |n| n.get()),
            maintenance: MaintenanceConfig::default(),
            tick: Duration::from_millis(250),
            max_members: 64,
            output_topic: None,
            dead_letter_topic: None,
        }
    }

    /// Sets how many partitions process a batch at the same time (at least 1).
    pub fn with_parallelism(mut self, parallelism: usize) -> Self {
        self.parallelism = parallelism.max(1);
        self
    }

    /// Sets the fleet name (lock namespace; also the Kafka group id, for lag monitoring only).
    pub fn with_group(mut self, group: &str) -> Self {
        self.group = group.to_owned();
        self
    }

    /// Sets how checkpoints are retained and compacted.
    pub fn with_maintenance(mut self, maintenance: MaintenanceConfig) -> Self {
        self.maintenance = maintenance;
        self
    }

    /// Publishes each updated aggregate to `topic` (at-least-once: sent before its batch commits).
    pub fn with_output_topic(mut self, topic: &str) -> Self {
        self.output_topic = Some(topic.to_owned());
        self
    }

    /// Sends malformed records to `topic` (at-least-once) besides logging them.
    pub fn with_dead_letter_topic(mut self, topic: &str) -> Self {
        self.dead_letter_topic = Some(topic.to_owned());
        self
    }

    /// Sets the checkpoint interval.
    pub fn with_checkpoint_every(mut self, every: Duration) -> Self {
        self.checkpoint_every = every;
        self
    }

    /// Sets the claim lease (membership, partitions, leadership and maintenance claims).
    pub fn with_claim_ttl(mut self, ttl: Duration) -> Self {
        self.claim_ttl = ttl;
        self.maintenance.claim_ttl = ttl;
        self
    }
}

/// Waits for a checkpoint upload of `partition`.
async fn finish_publishing(
    partition: i32,
    upload: AbortOnDropHandle<ProcessorResult<()>>,
) -> ProcessorResult<()> {
    upload
        .await
        .map_err(|err| ProcessorError::store(partition, "upload a checkpoint", err))?
}

/// The [`CheckpointCoordinator`] scope of a partition's checkpoints (lock and record
/// `checkpoint:{group}:{topic}:{partition}`).
pub fn checkpoint_scope(group: &str, topic: &str, partition: i32) -> String {
    format!("{group}:{topic}:{partition}")
}

/// The coordinator that records `partition`'s checkpoints (`ttl` only matters for its own
/// `checkpoint()`, which the fleet does not use: it records under the partition claim's token).
fn checkpoint_coordinator(
    services: &Services,
    group: &str,
    topic: &str,
    partition: i32,
    ttl: Duration,
) -> CheckpointCoordinator {
    CheckpointCoordinator::new(services.lock.clone(), services.registry.clone(), ttl)
        .with_scope(&checkpoint_scope(group, topic, partition))
}

/// The offset the latest recorded checkpoint of `partition` covers, from the coordinator's fenced record
/// (cheap: no checkpoint file is read; for progress and lag reports).
///
/// # Errors
/// A backend error.
pub async fn checkpointed_offset(
    services: &Services,
    group: &str,
    topic: &str,
    partition: i32,
) -> ProcessorResult<Option<i64>> {
    let coordinator =
        checkpoint_coordinator(services, group, topic, partition, Duration::from_secs(5));
    let Some(record) = coordinator.latest().await? else {
        return Ok(None);
    };
    Ok(serde_json::from_slice::<serde_json::Value>(&record.value)
        .ok()
        .and_then(|v| v.get("next_offset").and_then(serde_json::Value::as_i64)))
}

/// What an instance is doing, for operators and the demo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstanceStatus {
    /// The live members it sees.
    pub members: Vec<String>,
    /// Owned partitions and the fencing token of each claim.
    pub owned: BTreeMap<i32, u64>,
    /// Whether it leads the fleet now.
    pub leader: bool,
    /// Records applied to state (since start; replays after a restore count again).
    pub processed: u64,
    /// Malformed records sent to the dead letters.
    pub dead_letters: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Partitions whose state was restored from a checkpoint (rather than reused from local disk).
    pub restores: u64,
    /// Maintenance jobs claimed from the task queue.
    pub task_claims: u64,
    /// Of those, compactions that ran under the partition's compaction lock.
    pub compactions: u64,
    /// The last maintenance job and its outcome.
    pub last_task: Option<String>,
}

/// One fleet instance.
pub struct Instance {
    config: InstanceConfig,
    services: Services,
    status: watch::Sender<InstanceStatus>,
    sink: Option<OutputSink>,
    permits: tokio::sync::Semaphore,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("config", &self.config)
            .finish()
    }
}

impl Instance {
    /// An instance with `config` over `services`.
    ///
    /// # Errors
    /// A Kafka error when the producer for the output or dead-letter topic cannot be created.
    pub fn new(config: InstanceConfig, services: Services) -> ProcessorResult<Arc<Self>> {
        let sink = if config.output_topic.is_some() || config.dead_letter_topic.is_some() {
            Some(OutputSink::new(
                &config.brokers,
                config.output_topic.as_deref(),
                config.dead_letter_topic.as_deref(),
            )?)
        } else {
            None
        };
        Ok(Arc::new(Instance {
            services,
            status: watch::channel(InstanceStatus::default()).0,
            sink,
            permits: tokio::sync::Semaphore::new(config.parallelism.max(1)),
            config,
        }))
    }

    /// Status updates.
    pub fn status(&self) -> watch::Receiver<InstanceStatus> {
        self.status.subscribe()
    }

    /// Runs until `stop` fires, then checkpoints and releases every owned partition and leaves the fleet.
    /// Dropping the future instead is an abrupt stop: partition tasks are aborted and their claims lapse.
    ///
    /// # Errors
    /// [`ProcessorError::InvalidInput`] for a bad configuration. Partition failures are logged; the
    /// partition is claimed again on a later tick.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) -> ProcessorResult<()> {
        let mut membership = Membership::new(
            self.services.lock.clone(),
            self.services.registry.clone(),
            &self.config.group,
            &self.config.instance_id,
            self.config.max_members,
            self.config.claim_ttl,
        )?;
        let election = LeaderElection::new(
            self.services.lock.clone(),
            &self.config.group,
            &self.config.instance_id,
            self.config.claim_ttl,
        )?;
        let duties_stop = CancellationToken::new();
        // Aborted with `run`'s future when the instance is dropped abruptly, like the partition tasks.
        let duties = AbortOnDropHandle::new(tokio::spawn(
            Arc::clone(&self).run_duties(election, duties_stop.clone()),
        ));
        let mut tasks: JoinSet<(i32, ProcessorResult<()>)> = JoinSet::new();
        let mut running: HashMap<i32, CancellationToken> = HashMap::new();
        while !stop.is_cancelled() {
            while let Some(done) = tasks.try_join_next() {
                if let Ok((partition, outcome)) = done {
                    running.remove(&partition);
                    self.status.send_modify(|s| {
                        s.owned.remove(&partition);
                    });
                    if let Err(err) = outcome {
                        tracing::warn!(instance = %self.config.instance_id, partition, error = %err, "partition task ended");
                    }
                }
            }
            if let Err(err) = self
                .rebalance(&mut membership, &mut tasks, &mut running)
                .await
            {
                tracing::warn!(instance = %self.config.instance_id, error = %err, "rebalance failed");
            }
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(self.config.tick) => {}
            }
        }
        duties_stop.cancel();
        for token in running.values() {
            token.cancel();
        }
        while tasks.join_next().await.is_some() {}
        let _ = duties.await;
        let _ = membership.leave().await;
        Ok(())
    }

    /// The fleet duties, one round per tick until `stop`: campaign for leadership; as leader, schedule
    /// the maintenance jobs once per term; as a follower (or when alone), claim and run one due job.
    /// Resigns at the end so the next leader need not wait for the lease to lapse.
    async fn run_duties(self: Arc<Self>, election: LeaderElection, stop: CancellationToken) {
        let maintenance = Maintenance::new(
            self.services.lock.clone(),
            self.services.tasks.clone(),
            self.services.checkpoints.clone(),
            &self.config.group,
            &self.config.topic,
            self.config.partitions,
            self.config.maintenance,
        );
        let mut scheduled_term = None;
        while !stop.is_cancelled() {
            match election.try_become_leader().await {
                Ok(leader) => self.status.send_if_modified(|s| {
                    let changed = s.leader != leader;
                    s.leader = leader;
                    changed
                }),
                Err(err) => {
                    tracing::debug!(instance = %self.config.instance_id, error = %err, "campaign failed");
                    false
                }
            };
            let term = election.fencing_token();
            if term.is_some() && term != scheduled_term {
                match maintenance.schedule().await {
                    Ok(created) => {
                        scheduled_term = term;
                        tracing::info!(instance = %self.config.instance_id, term, created, "leading: maintenance scheduled");
                    }
                    Err(err) => {
                        tracing::warn!(instance = %self.config.instance_id, error = %err, "scheduling maintenance failed");
                    }
                }
            }
            let alone = self.status.borrow().members.len() <= 1;
            if term.is_none() || alone {
                // Drain what is due (at most one round over the partitions per tick).
                for _ in 0..self.config.partitions {
                    let run = tokio::select! {
                        _ = stop.cancelled() => break,
                        run = maintenance.run_next() => run,
                    };
                    match run {
                        Ok(Some(run)) => self.record_maintenance(&run.task_id, &run.outcome),
                        Ok(None) => break,
                        Err(err) => {
                            tracing::warn!(instance = %self.config.instance_id, error = %err, "maintenance claim failed");
                            break;
                        }
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(self.config.tick) => {}
            }
        }
        let _ = election.resign().await;
        self.status.send_modify(|s| s.leader = false);
    }

    fn record_maintenance(&self, task_id: &str, outcome: &MaintenanceOutcome) {
        tracing::debug!(instance = %self.config.instance_id, task_id, ?outcome, "maintenance job");
        self.status.send_modify(|s| {
            s.task_claims += 1;
            if matches!(outcome, MaintenanceOutcome::Compacted { .. }) {
                s.compactions += 1;
            }
            s.last_task = Some(format!("{task_id}: {outcome:?}"));
        });
    }

    async fn rebalance(
        self: &Arc<Self>,
        membership: &mut Membership,
        tasks: &mut JoinSet<(i32, ProcessorResult<()>)>,
        running: &mut HashMap<i32, CancellationToken>,
    ) -> ProcessorResult<()> {
        if !membership.announce().await? {
            return Ok(());
        }
        let members = membership.live_members().await?;
        let desired: HashSet<i32> = assigned_to(
            &self.config.topic,
            self.config.partitions,
            &self.config.instance_id,
            &members,
        )
        .into_iter()
        .collect();
        self.status.send_modify(|s| s.members = members.clone());
        for (partition, token) in running.iter() {
            if !desired.contains(partition) {
                token.cancel(); // hand-off: the task checkpoints and releases
            }
        }
        for partition in desired {
            if running.contains_key(&partition) {
                continue;
            }
            let resource = partition_resource(&self.config.topic, partition);
            let policy = RenewalPolicy::default();
            let Some(kept) = KeptLock::try_acquire(
                &self.services.lock,
                &resource,
                self.config.claim_ttl,
                policy,
            )
            .await?
            else {
                continue; // its previous owner still holds it: hand-off or expiry pending
            };
            let token = CancellationToken::new();
            running.insert(partition, token.clone());
            self.status.send_modify(|s| {
                s.owned.insert(partition, kept.fencing_token());
            });
            let instance = Arc::clone(self);
            tasks.spawn(async move {
                let outcome = instance.run_partition(partition, kept, token).await;
                (partition, outcome)
            });
        }
        Ok(())
    }

    /// Opens the partition's local state: reused if this disk holds the newest state (its token and
    /// offset are not behind the latest valid checkpoint), otherwise replaced by that checkpoint.
    fn prepare_store(&self, partition: i32) -> ProcessorResult<Arc<dyn PartitionStore>> {
        let dir = self
            .config
            .state_dir
            .join(format!("{}-{partition}", self.config.topic));
        let (latest, skipped) = self
            .services
            .checkpoints
            .latest_valid(&self.config.topic, partition)?;
        for err in skipped {
            tracing::warn!(partition, error = %err, "skipped a corrupt checkpoint");
        }
        if dir.exists() {
            let local = self.services.stores.open(partition, &dir)?;
            let reusable = match (local.meta()?, &latest) {
                (Some(meta), Some(manifest)) => {
                    meta.fencing_token >= manifest.fencing_token
                        && meta.next_offset >= manifest.next_offset
                }
                (_, None) => true,
                (None, Some(_)) => false,
            };
            if reusable {
                return Ok(Arc::new(local));
            }
            drop(local);
            std::fs::remove_dir_all(&dir).map_err(ProcessorError::io(&dir))?;
        }
        if let Some(manifest) = latest {
            self.services.checkpoints.restore(&manifest, &dir)?;
            self.status.send_modify(|s| s.restores += 1);
            tracing::info!(
                partition,
                next_offset = manifest.next_offset,
                "restored from checkpoint"
            );
        }
        Ok(Arc::new(self.services.stores.open(partition, &dir)?))
    }

    /// The local half of a checkpoint: a RocksDB checkpoint (hard links, so the pause does not grow with
    /// the state) in a scratch directory, and the offset it covers; `None` for a partition with no state
    /// yet. Earlier scratch directories of the partition (left by an aborted upload) are removed first.
    async fn snapshot(
        &self,
        store: &Arc<dyn PartitionStore>,
    ) -> ProcessorResult<Option<(PathBuf, i64)>> {
        let Some(meta) = store.meta()? else {
            return Ok(None);
        };
        let partition = store.partition();
        let prefix = format!(".snapshot-{}-{partition}-", self.config.topic);
        let scratch = self
            .config
            .state_dir
            .join(format!("{prefix}{}", meta.next_offset));
        let (store, state_dir) = (Arc::clone(store), self.config.state_dir.clone());
        tokio::task::spawn_blocking(move || {
            if let Ok(entries) = std::fs::read_dir(&state_dir) {
                for entry in entries.filter_map(Result::ok) {
                    if entry.file_name().to_string_lossy().starts_with(&prefix) {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                }
            }
            store.snapshot_to(&scratch)?;
            Ok(Some((scratch, meta.next_offset)))
        })
        .await
        .map_err(|err| ProcessorError::store(partition, "snapshot the state", err))?
    }

    /// The shared half of a checkpoint, while the partition keeps processing: uploads the snapshot in
    /// `scratch` under the ownership fencing token while holding the partition's compaction lock (so
    /// retention cannot delete a file the upload reuses), then records it through the
    /// [`CheckpointCoordinator`] with the same token (a stale owner's record is refused there too).
    async fn publish(
        self: Arc<Self>,
        partition: i32,
        scratch: PathBuf,
        next_offset: i64,
        fencing_token: u64,
    ) -> ProcessorResult<()> {
        let Some(compaction_lock) = hold_compaction_lock(
            &self.services.lock,
            partition,
            self.config.claim_ttl,
            self.config.claim_ttl,
        )
        .await?
        else {
            // Retention is running long on this partition: skip this checkpoint, the next one comes
            // soon (a successor would restore the previous one and replay a little more).
            tracing::debug!(partition, "checkpoint skipped: the compaction lock is busy");
            let _ = tokio::fs::remove_dir_all(&scratch).await;
            return Ok(());
        };
        let (checkpoints, topic) = (
            Arc::clone(&self.services.checkpoints),
            self.config.topic.clone(),
        );
        let uploaded = tokio::task::spawn_blocking(move || {
            let uploaded =
                checkpoints.upload(&topic, partition, &scratch, next_offset, fencing_token);
            let _ = std::fs::remove_dir_all(&scratch);
            uploaded
        })
        .await
        .map_err(|err| ProcessorError::store(partition, "upload a checkpoint", err))?;
        let _ = compaction_lock.release().await;
        let report = uploaded?;
        let coordinator = checkpoint_coordinator(
            &self.services,
            &self.config.group,
            &self.config.topic,
            partition,
            self.config.claim_ttl,
        );
        let record = serde_json::json!({
            "manifest": report.manifest.id(),
            "next_offset": report.manifest.next_offset,
            "instance": self.config.instance_id,
        });
        match coordinator
            .record(fencing_token, record.to_string().as_bytes())
            .await
        {
            Ok(()) => {}
            Err(state::StateError::StaleFencingToken { highest, .. }) => {
                return Err(ProcessorError::StaleOwner {
                    partition,
                    token: fencing_token,
                    highest,
                });
            }
            Err(err) => return Err(err.into()),
        }
        self.status.send_modify(|s| s.checkpoints += 1);
        Ok(())
    }

    async fn run_partition(
        self: Arc<Self>,
        partition: i32,
        kept: KeptLock,
        stop: CancellationToken,
    ) -> ProcessorResult<()> {
        let fencing_token = kept.fencing_token();
        let lost = kept.lost_token();
        let preparing = Arc::clone(&self);
        let store = tokio::task::spawn_blocking(move || preparing.prepare_store(partition))
            .await
            .map_err(|err| ProcessorError::store(partition, "open or restore the state", err))??;
        let mut processor = PartitionProcessor::resume(
            store.clone(),
            self.services.operator.clone(),
            fencing_token,
            lost.clone(),
        )?;
        let consumer = partition_consumer(
            &self.config.brokers,
            &self.config.group,
            &self.config.topic,
            partition,
            processor.next_offset(),
        )?;
        tracing::info!(instance = %self.config.instance_id, partition, fencing_token, from = processor.next_offset(), "partition started");
        // The upload of the last snapshot runs while the partition goes on processing; dropped (aborted)
        // with this task.
        let mut publishing: Option<AbortOnDropHandle<ProcessorResult<()>>> = None;
        loop {
            // One segment: consume until the next checkpoint is due, ownership is lost, or we stop.
            let segment = stop.child_token();
            let timer = {
                let (segment, lost, every) =
                    (segment.clone(), lost.clone(), self.config.checkpoint_every);
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = lost.cancelled() => {}
                    }
                    segment.cancel();
                })
            };
            let before = processor.stats();
            let consumed = consume_partition(
                &consumer,
                &mut processor,
                self.config.batch_size,
                None,
                self.sink.as_ref(),
                Some(&self.permits),
                &segment,
            )
            .await;
            timer.abort();
            let after = processor.stats();
            self.status.send_modify(|s| {
                s.processed += after.applied - before.applied;
                s.dead_letters += after.dead_letters - before.dead_letters;
            });
            consumed?;
            if lost.is_cancelled() {
                return Err(ProcessorError::StaleOwner {
                    partition,
                    token: fencing_token,
                    highest: fencing_token.saturating_add(1),
                });
            }
            // One upload at a time per partition, in order: the previous one must have landed.
            if let Some(previous) = publishing.take() {
                finish_publishing(partition, previous).await?;
            }
            if let Some((scratch, next_offset)) = self.snapshot(&store).await? {
                publishing = Some(AbortOnDropHandle::new(tokio::spawn(
                    Arc::clone(&self).publish(partition, scratch, next_offset, fencing_token),
                )));
            }
            if stop.is_cancelled() {
                // Hand-off: the final checkpoint must land before the claim is released.
                if let Some(last) = publishing.take() {
                    finish_publishing(partition, last).await?;
                }
                break;
            }
        }
        drop(consumer);
        kept.release().await.map_err(ProcessorError::from)?;
        tracing::info!(instance = %self.config.instance_id, partition, "partition handed off");
        Ok(())
    }
}
