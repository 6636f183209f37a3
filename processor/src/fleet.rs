//! One instance of the fleet: announces itself, works out which partitions it should own (rendezvous
//! hashing over the live members), claims them with kept locks, and runs one task per owned partition —
//! restore or reuse local state, consume from the stored offset, checkpoint periodically and on hand-off,
//! release. Partitions it should no longer own are checkpointed and released; partitions whose owner died
//! are claimed once that owner's lease expires.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use state::DistributedLock;
use state::recipes::fenced::FencedStore;
use state::recipes::keeper::{KeptLock, RenewalPolicy};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::CheckpointStore;
use crate::error::{ProcessorError, ProcessorResult};
use crate::kafka::{consume_partition, partition_consumer};
use crate::operator::Operator;
use crate::ownership::{Membership, assigned_to};
use crate::partition::PartitionProcessor;
use crate::partition_resource;
use crate::store::PartitionStore;
use crate::store::rocksdb::RocksDbStores;

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
    /// Checkpoints kept per partition.
    pub keep_checkpoints: usize,
    /// How often membership and assignment are re-evaluated.
    pub tick: Duration,
    /// Most members the fleet may have.
    pub max_members: u32,
}

impl InstanceConfig {
    /// Defaults: 5 s claims, checkpoints every 2 s, batches of 500, keep 3 checkpoints, 250 ms ticks.
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
            keep_checkpoints: 3,
            tick: Duration::from_millis(250),
            max_members: 64,
        }
    }

    /// Sets the checkpoint interval.
    pub fn with_checkpoint_every(mut self, every: Duration) -> Self {
        self.checkpoint_every = every;
        self
    }

    /// Sets the claim lease.
    pub fn with_claim_ttl(mut self, ttl: Duration) -> Self {
        self.claim_ttl = ttl;
        self
    }
}

/// What an instance is doing, for operators and the demo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstanceStatus {
    /// The live members it sees.
    pub members: Vec<String>,
    /// Owned partitions and the fencing token of each claim.
    pub owned: BTreeMap<i32, u64>,
    /// Checkpoints written.
    pub checkpoints: u64,
}

/// The shared services an instance uses.
#[derive(Clone)]
pub struct Services {
    /// Locks (membership, partition claims).
    pub lock: Arc<dyn DistributedLock>,
    /// Membership registry.
    pub registry: Arc<dyn FencedStore>,
    /// Shared checkpoint store.
    pub checkpoints: Arc<dyn CheckpointStore>,
    /// The operator.
    pub operator: Arc<dyn Operator>,
    /// Local RocksDB resources.
    pub stores: Arc<RocksDbStores>,
}

/// One fleet instance.
pub struct Instance {
    config: InstanceConfig,
    services: Services,
    status: watch::Sender<InstanceStatus>,
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
    pub fn new(config: InstanceConfig, services: Services) -> Arc<Self> {
        Arc::new(Instance {
            config,
            services,
            status: watch::channel(InstanceStatus::default()).0,
        })
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
        for token in running.values() {
            token.cancel();
        }
        while tasks.join_next().await.is_some() {}
        let _ = membership.leave().await;
        Ok(())
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
            tracing::info!(
                partition,
                next_offset = manifest.next_offset,
                "restored from checkpoint"
            );
        }
        Ok(Arc::new(self.services.stores.open(partition, &dir)?))
    }

    fn checkpoint(
        &self,
        store: &Arc<dyn PartitionStore>,
        fencing_token: u64,
    ) -> ProcessorResult<()> {
        let Some(meta) = store.meta()? else {
            return Ok(());
        };
        let partition = store.partition();
        let scratch = self.config.state_dir.join(format!(
            ".snapshot-{}-{partition}-{}",
            self.config.topic, meta.next_offset
        ));
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch).map_err(ProcessorError::io(&scratch))?;
        }
        store.snapshot_to(&scratch)?;
        let uploaded = self.services.checkpoints.upload(
            &self.config.topic,
            partition,
            &scratch,
            meta.next_offset,
            fencing_token,
        );
        let _ = std::fs::remove_dir_all(&scratch);
        uploaded?;
        self.services.checkpoints.retain(
            &self.config.topic,
            partition,
            self.config.keep_checkpoints,
        )?;
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
        let store = self.prepare_store(partition)?;
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
            let consumed = consume_partition(
                &consumer,
                &mut processor,
                self.config.batch_size,
                None,
                &segment,
            )
            .await;
            timer.abort();
            consumed?;
            if lost.is_cancelled() {
                return Err(ProcessorError::StaleOwner {
                    partition,
                    token: fencing_token,
                    highest: fencing_token.saturating_add(1),
                });
            }
            self.checkpoint(&store, fencing_token)?;
            if stop.is_cancelled() {
                break;
            }
        }
        drop(consumer);
        kept.release().await.map_err(ProcessorError::from)?;
        tracing::info!(instance = %self.config.instance_id, partition, "partition handed off");
        Ok(())
    }
}
