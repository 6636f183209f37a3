//! One instance of the fleet: announces itself, works out which partitions it should own (rendezvous
//! hashing over the live members), claims them with kept locks, and runs one task per owned partition
//! (see [`crate::task`]). Partitions it should no longer own are handed off; partitions whose
//! owner died are claimed once that owner's lease expires.
//!
//! Beside the partitions, each instance runs its fleet duties: it campaigns in the leader election
//! `leader:{group}:{topic}`; the leader schedules the maintenance jobs (see [`super::maintenance`]) and the
//! followers claim and run them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use state::recipes::keeper::{KeptLock, RenewalPolicy};
use state::recipes::leader::LeaderElection;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use super::backoff::PartitionBackoff;
use super::maintenance::{Maintenance, MaintenanceOutcome};
use super::membership::{Membership, assigned_to, standby_of};
use crate::config::InstanceConfig;
use crate::error::{ProcessorError, ProcessorResult};
use crate::kafka_calls::bounded;
use crate::progress::Progress;
use crate::resources::partition_resource;
use crate::services::Services;
use crate::source::partition_count;
use crate::status::{InstanceStatus, PartitionBackoffStatus, PartitionStatus, instant_to_unix_ms};
use crate::task::{PartitionTask, Standby, TaskContext};

/// How often the lag watcher reads the owned partitions' high watermarks.
const LAG_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// How long the topology watcher waits for the partition count (librdkafka is handed 10 s).
const TOPOLOGY_CALL_BOUND: std::time::Duration = std::time::Duration::from_secs(15);

/// One fleet instance.
pub struct Instance {
    pub(super) config: InstanceConfig,
    pub(super) services: Services,
    pub(super) status: watch::Sender<InstanceStatus>,
    /// What the partition tasks share: settings, services, the status sender, the at-least-once
    /// sink, the processing permits, the open stores of live queries.
    pub(super) tasks: Arc<TaskContext>,
    /// The topic's partition count: the configured one, raised when the brokers report more.
    partitions: AtomicI32,
    /// Partitions this instance gave up and until when they are not claimed again: after a failure (a
    /// growing pause) or a record their job refused (policy `stop`).
    backoff: std::sync::Mutex<PartitionBackoff>,
}

/// Where it was before it moved to the configuration (the setting's default belongs there).
pub use crate::config::REJECTED_RECORD_PAUSE;

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
    /// [`ProcessorError::InvalidInput`] for a bad configuration (see [`InstanceConfig::validate`]); a
    /// Kafka error when the producer for the output or dead-letter topic cannot be created.
    pub fn new(config: InstanceConfig, services: Services) -> ProcessorResult<Arc<Self>> {
        config.validate()?;
        let status = InstanceStatus {
            instance_id: config.instance_id.clone(),
            group: config.group.clone(),
            topic: config.topic.clone(),
            partitions: config.partitions,
            ..InstanceStatus::default()
        };
        let status = watch::channel(status).0;
        // The at-least-once path is one producer per instance (also the fallback on librdkafka's mock
        // cluster, which has no working transactions); the exactly-once one is a transactional producer
        // per owned partition, made by the partition's task.
        let tasks = Arc::new(TaskContext::new(&config, services.clone(), status.clone())?);
        Ok(Arc::new(Instance {
            services,
            status,
            tasks,
            partitions: AtomicI32::new(config.partitions),
            backoff: std::sync::Mutex::default(),
            config,
        }))
    }

    /// Status updates.
    pub fn status(&self) -> watch::Receiver<InstanceStatus> {
        self.status.subscribe()
    }

    /// Its configuration.
    pub fn config(&self) -> &InstanceConfig {
        &self.config
    }

    /// The services it coordinates through.
    pub fn services(&self) -> &Services {
        &self.services
    }

    /// Runs until `stop` fires, then checkpoints and releases every owned partition and leaves the fleet.
    /// Dropping the future instead is an abrupt stop: partition tasks are aborted and their claims lapse.
    ///
    /// # Errors
    /// [`ProcessorError::InvalidInput`] for a bad configuration;
    /// [`ProcessorError::DiskUnusable`] when a partition failed on a
    /// disk that refuses writes (the instance stops, fail-closed). Other partition failures are logged;
    /// the partition is claimed again on a later tick.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) -> ProcessorResult<()> {
        let mut membership = Membership::new(
            self.services.roster.clone(),
            &self.config.group,
            &self.config.topic,
            &self.config.instance_id,
            self.config.max_members,
            self.config.claim_ttl,
        )?
        .with_endpoint(self.config.status_url.as_deref());
        let election = LeaderElection::new(
            self.services.lock.clone(),
            &crate::resources::leader_election_name(&self.config.group, &self.config.topic),
            &self.config.instance_id,
            self.config.claim_ttl,
        )?;
        let duties_stop = CancellationToken::new();
        // Aborted with `run`'s future when the instance is dropped abruptly, like the partition tasks.
        let duties_span = tracing::info_span!("duties", instance = %self.config.instance_id, group = %self.config.group);
        let duties = AbortOnDropHandle::new(tokio::spawn(
            Arc::clone(&self)
                .run_duties(election, duties_stop.clone())
                .instrument(duties_span),
        ));
        let _lag = AbortOnDropHandle::new(tokio::spawn(
            Arc::clone(&self).watch_lag(LAG_EVERY, duties_stop.clone()),
        ));
        // Connected before the first takeover needs it (a partition's start reads its log bounds).
        let (metadata, topic) = (Arc::clone(&self.tasks.metadata), self.config.topic.clone());
        drop(tokio::task::spawn_blocking(move || {
            metadata.warm_up(&topic)
        }));
        let _topology = self.config.topology_refresh.map(|every| {
            AbortOnDropHandle::new(tokio::spawn(
                Arc::clone(&self).watch_topology(every, duties_stop.clone()),
            ))
        });
        let mut tasks: JoinSet<(i32, ProcessorResult<()>)> = JoinSet::new();
        let mut running: HashMap<i32, CancellationToken> = HashMap::new();
        let mut standbys: HashMap<i32, Standby> = HashMap::new();
        let mut fatal: Option<ProcessorError> = None;
        while !stop.is_cancelled() && fatal.is_none() {
            while let Some(done) = tasks.try_join_next() {
                if let Ok((partition, outcome)) = done {
                    running.remove(&partition);
                    self.status.send_modify(|s| {
                        let token = s.owned.remove(&partition).unwrap_or(0);
                        s.partition_status.remove(&partition);
                        match &outcome {
                            Ok(()) => {
                                s.partition_errors.remove(&partition);
                                s.record_hand_off(partition, "released", token);
                            }
                            Err(err) => {
                                s.partition_errors.insert(partition, err.to_string());
                                s.record_hand_off(partition, "failed", token);
                            }
                        };
                    });
                    self.publish_ownership_metrics();
                    if outcome.is_err() {
                        metrics::counter!("processor_partition_failures_total", "topic" => self.config.topic.clone()).increment(1);
                    }
                    let now = tokio::time::Instant::now();
                    if let Err(err) = &outcome {
                        let (pause, failures) = self.backoff().failed(partition, now);
                        tracing::warn!(instance = %self.config.instance_id, partition, error = %err, failures, retry_in_ms = pause.as_millis(), "partition task ended; claimed again after a pause");
                    } else {
                        self.backoff().succeeded(partition);
                    }
                    if let Err(err) = outcome {
                        if matches!(err, ProcessorError::Rejected { .. }) {
                            // Stopped by the job's policy: not a crash loop of claim, restore, refuse.
                            let pause = self.config.rejected_record_pause;
                            tracing::error!(instance = %self.config.instance_id, partition, pause_secs = pause.as_secs_f64(), "partition stopped at a record its job refused; released, and not claimed again for a while");
                            self.backoff().hold_until(partition, now + pause);
                        }
                        if let Some(reason) = err.disk_failure() {
                            fatal = Some(ProcessorError::DiskUnusable {
                                reason,
                                context: err.to_string(),
                                state_dir: self.config.state_dir.clone(),
                            });
                        }
                    }
                }
            }
            if fatal.is_some() {
                break;
            }
            self.publish_backoff();
            if let Err(err) = self
                .rebalance(&mut membership, &mut tasks, &mut running, &mut standbys)
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
        let bound = self.config.shutdown_bound();
        let deadline = tokio::time::Instant::now() + bound;
        let abandoned = self.drain(&mut tasks, &mut running, deadline).await;
        let finish_rest = async {
            for (_, standby) in standbys.drain() {
                standby.finish().await;
            }
            let _ = duties.await;
            let _ = membership.leave().await;
        };
        // Whatever is left past the bound lapses by its TTL (membership, leadership, standbys).
        let _ = tokio::time::timeout_at(
            deadline.max(tokio::time::Instant::now() + std::time::Duration::from_secs(1)),
            finish_rest,
        )
        .await;
        if fatal.is_none() && !abandoned.is_empty() {
            fatal = Some(ProcessorError::ShutdownAbandoned {
                partitions: abandoned,
                after: bound,
            });
        }
        match fatal {
            Some(err) => {
                tracing::error!(instance = %self.config.instance_id, error = %err, "instance stopped");
                Err(err)
            }
            None => Ok(()),
        }
    }

    /// Waits until `deadline` for the partition tasks to hand off; returns the partitions whose tasks
    /// had not ended by then, aborted (their claims released in the background or lapsing by TTL).
    async fn drain(
        &self,
        tasks: &mut JoinSet<(i32, ProcessorResult<()>)>,
        running: &mut HashMap<i32, CancellationToken>,
        deadline: tokio::time::Instant,
    ) -> Vec<i32> {
        loop {
            match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                Ok(Some(Ok((partition, outcome)))) => {
                    running.remove(&partition);
                    if let Err(err) = outcome {
                        tracing::warn!(instance = %self.config.instance_id, partition, error = %err, "partition task ended");
                    }
                }
                Ok(Some(Err(_))) => {}
                Ok(None) => return Vec::new(),
                Err(_) => break,
            }
        }
        let mut abandoned: Vec<i32> = running.keys().copied().collect();
        abandoned.sort_unstable();
        tracing::error!(instance = %self.config.instance_id, partitions = ?abandoned, "stop bound reached: abandoning the partitions not yet handed off");
        tasks.abort_all();
        // Aborted tasks end at their next await; one stuck inside a blocking call is left behind.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.detach_all();
        abandoned
    }

    /// The topic's partition count now.
    pub(super) fn partition_count(&self) -> i32 {
        self.partitions.load(Ordering::SeqCst)
    }

    /// Reads the topic's partition count from the brokers every `every` until `stop`, and raises the
    /// instance's count when partitions were added: the next rebalance claims them. Off the rebalance
    /// loop, so that a slow metadata request never delays membership.
    async fn watch_topology(self: Arc<Self>, every: std::time::Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let (kafka, topic) = (self.config.kafka.clone(), self.config.topic.clone());
            let counted = bounded("read the partition count", TOPOLOGY_CALL_BOUND, move || {
                partition_count(&kafka, &topic)
            })
            .await;
            match counted {
                Ok(count) => self.observe_partition_count(count),
                Err(err) => {
                    tracing::debug!(instance = %self.config.instance_id, error = %err, "could not read the partition count");
                }
            }
        }
    }

    /// Reads the high watermark of every owned partition every `every` until `stop` (one client, one
    /// request per partition, on a blocking thread), and publishes each partition's lag — records between
    /// its state and the log end — in the status and the `processor_consumer_lag_records` gauge.
    async fn watch_lag(self: Arc<Self>, every: std::time::Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let owned: Vec<i32> = self
                .status
                .borrow()
                .partition_status
                .keys()
                .copied()
                .collect();
            if owned.is_empty() {
                continue;
            }
            let (metadata, topic) = (Arc::clone(&self.tasks.metadata), self.config.topic.clone());
            // One second per partition at most (librdkafka's timeout), and our own bound on the whole.
            let bound = LAG_EVERY * u32::try_from(owned.len()).unwrap_or(u32::MAX) + LAG_EVERY;
            let reading = bounded("fetch watermarks", bound, move || {
                Ok(owned
                    .into_iter()
                    .filter_map(|partition| {
                        metadata
                            .watermarks(&topic, partition, LAG_EVERY)
                            .ok()
                            .map(|(_, high)| (partition, high))
                    })
                    .collect::<Vec<(i32, i64)>>())
            })
            .await;
            let Ok(highs) = reading else { continue };
            self.status.send_modify(|s| {
                for (partition, high) in highs {
                    if let Some(p) = s.partition_status.get_mut(&partition) {
                        let lag = (high - p.next_offset).max(0);
                        p.high_watermark = Some(high);
                        p.lag = Some(lag);
                        #[allow(clippy::cast_precision_loss)]
                        metrics::gauge!("processor_consumer_lag_records", "topic" => self.config.topic.clone(), "partition" => partition.to_string())
                            .set(lag as f64);
                    }
                }
            });
        }
    }

    /// Takes in a partition count read from the brokers. Kafka only ever adds partitions; fewer than
    /// before means the topic was deleted and recreated, which the partitions' offset checks refuse, so
    /// the count never shrinks here.
    fn observe_partition_count(&self, count: i32) {
        let before = self.partitions.fetch_max(count, Ordering::SeqCst);
        if count > before {
            tracing::warn!(
                instance = %self.config.instance_id,
                topic = %self.config.topic,
                from = before,
                to = count,
                "the topic has new partitions: claiming them. Keyed state does not move with its keys: a key the producers now send to a new partition starts from empty state there, and its earlier state stays in its old partition"
            );
            self.status.send_modify(|s| s.partitions = count);
        } else if count < before {
            tracing::warn!(
                instance = %self.config.instance_id,
                topic = %self.config.topic,
                known = before,
                reported = count,
                "the brokers report fewer partitions than before: was the topic deleted and recreated?"
            );
        }
    }

    /// The fleet duties, one round per tick until `stop`: campaign for leadership; as leader, schedule
    /// the maintenance jobs once per term; as a follower (or when alone), claim and run one due job.
    /// Resigns at the end so the next leader need not wait for the lease to lapse.
    async fn run_duties(self: Arc<Self>, election: LeaderElection, stop: CancellationToken) {
        let maintenance = Maintenance::new(
            self.services.lock.clone(),
            self.services.tasks.clone(),
            self.services.checkpoints.clone(),
            self.services.registry.clone(),
            &self.config.group,
            &self.config.topic,
            self.config.maintenance,
        );
        let mut scheduled = None;
        while !stop.is_cancelled() {
            match election.try_become_leader().await {
                Ok(leader) => {
                    let term = election.fencing_token();
                    metrics::gauge!("processor_leader", "group" => self.config.group.clone())
                        .set(if leader { 1.0 } else { 0.0 });
                    self.status.send_if_modified(|s| {
                        let changed = s.leader != leader || s.leader_term != term;
                        s.leader = leader;
                        s.leader_term = term;
                        changed
                    })
                }
                Err(err) => {
                    tracing::debug!(instance = %self.config.instance_id, error = %err, "campaign failed");
                    false
                }
            };
            let term = election.fencing_token();
            let partitions = self.partition_count();
            // Once per term, and again when partitions were added.
            if term.is_some() && scheduled != Some((term, partitions)) {
                match maintenance.schedule(partitions).await {
                    Ok(created) => {
                        scheduled = Some((term, partitions));
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
                for _ in 0..partitions {
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
        metrics::gauge!("processor_leader", "group" => self.config.group.clone()).set(0.0);
        self.status.send_modify(|s| {
            s.leader = false;
            s.leader_term = None;
        });
    }

    /// The owned-partition gauge, from the status.
    fn publish_ownership_metrics(&self) {
        let owned = self.status.borrow().owned.len();
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!("processor_owned_partitions", "topic" => self.config.topic.clone())
            .set(owned as f64);
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
        standbys: &mut HashMap<i32, Standby>,
    ) -> ProcessorResult<()> {
        if !membership.announce().await? {
            return Ok(());
        }
        let listed = membership.live_members_with_endpoints().await?;
        let members: Vec<String> = listed.iter().map(|(id, _)| id.clone()).collect();
        let endpoints: std::collections::BTreeMap<String, String> = listed
            .into_iter()
            .filter_map(|(id, url)| url.map(|url| (id, url)))
            .collect();
        let desired: HashSet<i32> = assigned_to(
            &self.config.topic,
            self.partition_count(),
            &self.config.instance_id,
            &members,
        )
        .into_iter()
        .collect();
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!("processor_fleet_members", "group" => self.config.group.clone())
            .set(members.len() as f64);
        self.status.send_if_modified(|s| {
            let changed = s.members != members || s.member_endpoints != endpoints;
            s.members.clone_from(&members);
            s.member_endpoints = endpoints;
            changed
        });
        for (partition, token) in running.iter() {
            if !desired.contains(partition) {
                token.cancel(); // hand-off: the task checkpoints and releases
            }
        }
        self.keep_standbys(&members, &desired, running, standbys);
        for partition in desired {
            if running.contains_key(&partition) {
                continue;
            }
            if self.backoff().holds(partition, tokio::time::Instant::now()) {
                continue;
            }
            let resource = partition_resource(&self.config.group, &self.config.topic, partition);
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
                s.partition_status.insert(
                    partition,
                    PartitionStatus {
                        fencing_token: kept.fencing_token(),
                        claim_expires_ms: instant_to_unix_ms(kept.valid_until()),
                        ..PartitionStatus::default()
                    },
                );
                s.record_hand_off(partition, "claimed", kept.fencing_token());
            });
            self.publish_ownership_metrics();
            let instance = Arc::clone(self);
            // Every log line of the partition's task carries who, which partition and which claim.
            let span = tracing::info_span!(
                "partition",
                instance = %self.config.instance_id,
                partition,
                fencing_token = kept.fencing_token()
            );
            // A standby copy of the partition stops first: its refresh must not touch the directory
            // the partition opens.
            let standby = standbys.remove(&partition);
            tasks.spawn(
                async move {
                    let warm = match standby {
                        Some(standby) => standby.finish().await,
                        None => None,
                    };
                    let progress = Arc::new(Progress::new());
                    // The watchdog winning drops the partition's task: its claim is released in the
                    // background and its clients destroyed off the async workers.
                    let outcome = tokio::select! {
                        outcome = PartitionTask::new(Arc::clone(&instance.tasks), partition, kept, warm, Arc::clone(&progress)).run(token) => outcome,
                        stalled = instance.stalled(partition, &progress) => Err(stalled),
                    };
                    (partition, outcome)
                }
                .instrument(span),
            );
        }
        Ok(())
    }

    /// The lock of `partition`'s local directory work (see the field).
    fn backoff(&self) -> std::sync::MutexGuard<'_, PartitionBackoff> {
        self.backoff
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Shows the partitions held back now in the status (`backoffs`) and as a gauge.
    fn publish_backoff(&self) {
        let now = tokio::time::Instant::now();
        let held: std::collections::BTreeMap<i32, PartitionBackoffStatus> = self
            .backoff()
            .held(now)
            .map(|(partition, failures, retry_at_ms)| {
                (
                    partition,
                    PartitionBackoffStatus {
                        failures,
                        retry_at_ms,
                    },
                )
            })
            .collect();
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!("processor_partitions_backing_off", "topic" => self.config.topic.clone())
            .set(held.len() as f64);
        self.status.send_if_modified(|s| {
            let changed = s.backoffs != held;
            if changed {
                s.backoffs = held;
            }
            changed
        });
    }

    /// Starts the standby copies this instance should keep (`standby_replicas` per partition, on the
    /// members after the owner in rendezvous order) and stops the others. Never for a partition this
    /// instance owns or is about to.
    fn keep_standbys(
        self: &Arc<Self>,
        members: &[String],
        desired: &HashSet<i32>,
        running: &HashMap<i32, CancellationToken>,
        standbys: &mut HashMap<i32, Standby>,
    ) {
        let wanted: HashSet<i32> = standby_of(
            &self.config.topic,
            self.partition_count(),
            &self.config.instance_id,
            members,
            self.config.standby_replicas,
        )
        .into_iter()
        .filter(|p| !desired.contains(p) && !running.contains_key(p))
        .collect();
        for (partition, standby) in standbys.iter() {
            // One this instance is about to own stays: the takeover stops it and starts from its
            // copy, still open.
            if !wanted.contains(partition) && !desired.contains(partition) {
                standby.stop.cancel(); // its task ends after any refresh in flight
            }
        }
        // A stopped standby keeps its entry until its task has ended, so that a new owner of the
        // partition (or a restarted standby) never meets a refresh still swapping the directory.
        standbys.retain(|_, standby| !(standby.stop.is_cancelled() && standby.task.is_finished()));
        for partition in wanted {
            standbys
                .entry(partition)
                .or_insert_with(|| self.tasks.start_standby(partition));
        }
    }
}
