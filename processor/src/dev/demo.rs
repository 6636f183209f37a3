//! `processor demo`: the whole product on one machine with nothing installed — librdkafka's mock cluster
//! in process, in-process locks (or a real Redis/PostgreSQL with a lock URL), RocksDB in a temporary
//! directory. It produces a deterministic workload, runs a fleet, kills one instance abruptly and adds
//! another mid-way, shows what each instance is doing, and at the end compares the checkpointed
//! aggregates with a recomputation of the workload and prints the verdict and the throughput.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{DevBroker, Workload};
use crate::aggregation::KeyedAggregation;
use crate::checkpoint::CheckpointLocation;
use crate::config::{InstanceConfig, MaintenanceConfig};
use crate::error::{ProcessorError, ProcessorResult};
use crate::fleet::{Instance, InstanceStatus};
use crate::http::{LocalInstances, status_url};
use crate::inspect::{checkpointed_entries, checkpointed_offset};
use crate::kafka_settings::KafkaSettings;
use crate::operator::Operator;
use crate::services::Services;
use crate::source::high_watermark;
use crate::store::rocksdb::RocksDbStores;

/// How the demo runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DemoConfig {
    /// `memory`, `redis://…`, `redlock://h1:p1,h2:p2,h3:p3`, `postgres://…` or `etcd://h1:p1,h2:p2` (see
    /// [`state::connect()`]).
    pub lock_url: String,
    /// Topic name.
    pub topic: String,
    /// Partitions.
    pub partitions: i32,
    /// Instances at the start (one is killed, one added).
    pub instances: usize,
    /// The workload.
    pub records: u64,
    /// Distinct keys.
    pub keys: u64,
    /// Seed.
    pub seed: u64,
    /// Where state and checkpoints go (a temporary directory, removed at the end, when `None`).
    pub work_dir: Option<PathBuf>,
    /// Keep the checkpoints in object storage instead (`s3://bucket/prefix`, `gs://…`, `az://…`;
    /// credentials from the environment, see
    /// [`ObjectCheckpointStore::from_url`](crate::checkpoint::ObjectCheckpointStore::from_url)): each
    /// run under a prefix of its own (`{url}/demo-{run}`), left behind.
    pub checkpoint_url: Option<String>,
    /// An existing Kafka cluster to run on (`host:port,…`) instead of librdkafka's in-process mock
    /// cluster: the demo creates a fresh topic there (`{topic}-{run}`) and leaves it behind.
    pub brokers: Option<String>,
    /// The replication factor of that topic on an existing cluster.
    pub replication: i32,
    /// Serve the instances' status on an HTTP endpoint: the demo adds each instance it starts to these
    /// and removes the one it kills (see [`crate::http`]).
    pub status_board: Option<Arc<LocalInstances>>,
    /// The base URL of that endpoint (`http://127.0.0.1:9090`), recorded in the fleet's membership as
    /// where each instance serves its status.
    pub status_base_url: Option<String>,
    /// The job the fleet runs, with its input and the state it must end with; the built-in keyed
    /// aggregation over `records`, `keys` and `seed` when `None`.
    pub job: Option<Arc<dyn DemoJob>>,
}

impl std::fmt::Debug for dyn DemoJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoJob")
            .field("records", &self.records())
            .finish_non_exhaustive()
    }
}

/// A job the demo can run and check: your own [`Job`](crate::job::Job) put through the demo's kill and
/// join, then compared with a recomputation of its input.
pub trait DemoJob: Send + Sync + 'static {
    /// How many input records [`produce`](Self::produce) makes in all.
    fn records(&self) -> u64;

    /// The operator the fleet runs (a [`JobOperator`](crate::job::JobOperator) for a typed job).
    fn operator(&self) -> Arc<dyn Operator>;

    /// Produces input records `range` (of `0..records()`) to `topic`, waiting for the brokers'
    /// acknowledgements. Record `i` must be the same every time (deterministic input).
    fn produce<'a>(
        &'a self,
        brokers: &'a str,
        topic: &'a str,
        range: std::ops::Range<u64>,
    ) -> futures::future::BoxFuture<'a, ProcessorResult<()>>;

    /// The state the fleet must end with, key by key, as stored (every input record applied exactly
    /// once, in partition order).
    ///
    /// # Errors
    /// When the recomputation cannot encode the state.
    fn expected_state(&self) -> ProcessorResult<crate::inspect::StateEntries>;
}

/// The built-in job over a [`Workload`]: the keyed aggregation.
struct BuiltInJob(Workload);

impl DemoJob for BuiltInJob {
    fn records(&self) -> u64 {
        self.0.records
    }

    fn operator(&self) -> Arc<dyn Operator> {
        Arc::new(KeyedAggregation)
    }

    fn produce<'a>(
        &'a self,
        brokers: &'a str,
        topic: &'a str,
        range: std::ops::Range<u64>,
    ) -> futures::future::BoxFuture<'a, ProcessorResult<()>> {
        Box::pin(self.0.produce_range(brokers, topic, range))
    }

    fn expected_state(&self) -> ProcessorResult<crate::inspect::StateEntries> {
        Ok(self
            .0
            .expected()
            .into_iter()
            .map(|(key, aggregate)| (key.into_bytes(), aggregate.encode()))
            .collect())
    }
}

impl Default for DemoConfig {
    /// In-process locks, topic `orders` with 8 partitions, 3 instances, 100 000 records over 1 000 keys.
    fn default() -> Self {
        DemoConfig {
            lock_url: "memory".to_owned(),
            topic: "orders".to_owned(),
            partitions: 8,
            instances: 3,
            records: 100_000,
            keys: 1_000,
            seed: 42,
            work_dir: None,
            checkpoint_url: None,
            brokers: None,
            replication: 1,
            status_board: None,
            status_base_url: None,
            job: None,
        }
    }
}

/// What the demo found.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DemoReport {
    /// Records produced.
    pub records: u64,
    /// Keys in the recomputation.
    pub expected_keys: usize,
    /// Keys whose checkpointed aggregate equals the recomputation.
    pub matching_keys: usize,
    /// Keys that differ or are missing (empty when exact).
    pub mismatches: Vec<String>,
    /// From the fleet's start until every partition's checkpoint covered the whole topic.
    pub processing_time: Duration,
    /// Records applied by all instances, as counted at their checkpoints (a record re-applied after a
    /// restore counts again; work a killed instance did after its last checkpoint does not count).
    pub applied_with_replays: u64,
    /// Final status of each instance, by id (the killed one as it was when killed).
    pub instances: BTreeMap<String, InstanceStatus>,
    /// Leader terms observed (instance ids in order).
    pub leaders: Vec<String>,
}

impl DemoReport {
    /// Whether every key matches the recomputation exactly.
    pub fn exact(&self) -> bool {
        self.mismatches.is_empty() && self.matching_keys == self.expected_keys
    }

    /// Records per second of the whole fleet (workload records over processing time).
    pub fn throughput(&self) -> f64 {
        self.records as f64 / self.processing_time.as_secs_f64().max(1e-9)
    }
}

/// What the demo shows while it runs. The `processor` binary draws it as progress bars; tests pass
/// [`Quiet`]. Every method has an empty default.
pub trait DemoObserver: Send {
    /// Something happened: the broker started, an instance was killed or joined, a new leader.
    fn event(&mut self, message: &str) {
        let _ = message;
    }

    /// Progress, a few times a second: records produced and covered by checkpoints so far, and every
    /// instance's status with whether it is alive (the killed one stays, frozen as it was).
    fn progress(
        &mut self,
        produced: u64,
        checkpointed: u64,
        instances: &BTreeMap<String, (InstanceStatus, bool)>,
    ) {
        let _ = (produced, checkpointed, instances);
    }

    /// The fleet has stopped; the verdict follows.
    fn finish(&mut self) {}
}

/// A [`DemoObserver`] that shows nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quiet;

impl DemoObserver for Quiet {}

struct Member {
    handle: JoinHandle<ProcessorResult<()>>,
    stop: CancellationToken,
    status: watch::Receiver<InstanceStatus>,
    alive: bool,
}

/// Runs the demo, telling `observer` what happens.
///
/// # Errors
/// A broker, lock-backend or I/O error; an invalid configuration. A wrong result is not an error: see
/// [`DemoReport::exact`].
pub async fn run_demo(
    config: DemoConfig,
    observer: &mut dyn DemoObserver,
) -> ProcessorResult<DemoReport> {
    if config.instances < 2 || config.records == 0 || config.keys == 0 {
        return Err(ProcessorError::InvalidInput {
            what: "demo",
            reason: "needs at least 2 instances, 1 record and 1 key".to_owned(),
        });
    }
    let temp = tempfile::tempdir().map_err(ProcessorError::io(std::env::temp_dir()))?;
    let root = config
        .work_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    // A fresh fleet name per run, so runs against a shared Redis, PostgreSQL or Kafka do not meet.
    let group = format!(
        "demo-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let mut config = config;
    let (mock, brokers, where_) = match config.brokers.clone() {
        Some(brokers) => {
            config.topic = format!("{}-{group}", config.topic);
            super::admin::create_topic(
                &brokers,
                &config.topic,
                config.partitions,
                config.replication,
                &[],
            )
            .await?;
            (None, brokers.clone(), format!("Kafka cluster at {brokers}"))
        }
        None => {
            let mock = DevBroker::start(&config.topic, config.partitions)?;
            let brokers = mock.bootstrap_servers();
            (
                Some(mock),
                brokers.clone(),
                format!("mock Kafka cluster at {brokers}"),
            )
        }
    };
    // Each fleet (group: fresh per run) has checkpoints of its own under the directory or the URL.
    let location = match &config.checkpoint_url {
        Some(url) => CheckpointLocation::Url(url.clone()),
        None => CheckpointLocation::Directory(root.join("checkpoints")),
    }
    .for_group(&group);
    let checkpoints = tokio::task::spawn_blocking(move || location.open())
        .await
        .map_err(ProcessorError::task("open the checkpoint store"))??;
    let base = Services::connect_with(&config.lock_url, checkpoints).await?;
    let job: Arc<dyn DemoJob> = config.job.clone().unwrap_or_else(|| {
        Arc::new(BuiltInJob(Workload {
            records: config.records,
            keys: config.keys,
            seed: config.seed,
            partitions: config.partitions,
        }))
    });
    config.records = job.records();
    if config.records == 0 {
        return Err(ProcessorError::InvalidInput {
            what: "demo",
            reason: "the job produces no records".to_owned(),
        });
    }
    observer.event(&format!(
        "{where_}; topic {} with {} partitions; locks: {}; work dir {}",
        config.topic,
        config.partitions,
        config.lock_url,
        root.display()
    ));

    // The first 40 % of the workload, then a pause until the kill, then the rest: the kill always lands
    // mid-stream, with records still to come for the dead instance's partitions.
    let produced = Arc::new(AtomicU64::new(0));
    let (kill_done, mut after_kill) = watch::channel(false);
    let mut producer = {
        let (produced, brokers, topic) = (produced.clone(), brokers.clone(), config.topic.clone());
        let job = Arc::clone(&job);
        Some(tokio::spawn(async move {
            let records = job.records();
            let step = (records / 20).max(1);
            let first_part = records * 2 / 5;
            let mut from = 0;
            while from < records {
                if from >= first_part {
                    let _ = after_kill.wait_for(|killed| *killed).await;
                }
                let to = (from + step).min(records);
                let to = if from < first_part {
                    to.min(first_part.max(1))
                } else {
                    to
                };
                job.produce(&brokers, &topic, from..to).await?;
                produced.store(to, Ordering::Relaxed);
                from = to;
            }
            Ok::<(), ProcessorError>(())
        }))
    };

    let start_member = |id: &str| -> ProcessorResult<Member> {
        let mut instance_config = InstanceConfig::new(
            id,
            &config.topic,
            config.partitions,
            &brokers,
            root.join("state").join(id),
        )
        .with_group(&group)
        .with_checkpoint_every(Duration::from_millis(1_000))
        .with_claim_ttl(Duration::from_secs(3))
        .with_maintenance(
            MaintenanceConfig::default()
                .with_every(Duration::from_secs(3))
                .with_keep_checkpoints(2)
                .with_grace(Duration::from_secs(5)),
        );
        if let Some(base_url) = &config.status_base_url {
            instance_config = instance_config.with_status_url(&status_url(base_url, id));
        }
        let services = Services {
            stores: Arc::new(RocksDbStores::new(32 << 20, 16 << 20)),
            operator: job.operator(),
            ..base.clone()
        };
        let instance = Instance::new(instance_config, services)?;
        if let Some(board) = &config.status_board {
            board.add(Arc::clone(&instance));
        }
        let stop = CancellationToken::new();
        Ok(Member {
            status: instance.status(),
            handle: tokio::spawn(instance.run(stop.clone())),
            stop,
            alive: true,
        })
    };

    let started = Instant::now();
    let mut fleet: BTreeMap<String, Member> = BTreeMap::new();
    let names: Vec<String> = (0..config.instances)
        .map(|i| char::from(b'a' + (i % 26) as u8).to_string())
        .collect();
    for name in &names {
        fleet.insert(name.clone(), start_member(name)?);
    }
    observer.event(&format!("started instances {}", names.join(", ")));
    let victim = names[1].clone();
    let newcomer = char::from(b'a' + (config.instances % 26) as u8).to_string();
    let (mut killed, mut joined) = (false, false);
    let mut leaders: Vec<String> = Vec::new();
    let mut final_statuses: BTreeMap<String, InstanceStatus> = BTreeMap::new();
    let mut ends: Option<Vec<i64>> = None;

    loop {
        let produced_now = produced.load(Ordering::Relaxed);
        let mut checkpointed = 0u64;
        let mut covered = 0;
        for partition in 0..config.partitions {
            let offset = checkpointed_offset(&base, &group, &config.topic, partition)
                .await?
                .unwrap_or(0);
            checkpointed += u64::try_from(offset).unwrap_or(0);
            if let Some(ends) = &ends
                && offset >= ends[partition as usize]
            {
                covered += 1;
            }
        }
        let statuses: BTreeMap<String, (InstanceStatus, bool)> = fleet
            .iter()
            .map(|(id, m)| (id.clone(), (m.status.borrow().clone(), m.alive)))
            .collect();
        if let Some((id, _)) = statuses.iter().find(|(_, (s, alive))| s.leader && *alive)
            && leaders.last() != Some(id)
        {
            observer.event(&format!(
                "instance {id} leads the fleet (schedules maintenance)"
            ));
            leaders.push(id.clone());
        }
        observer.progress(produced_now, checkpointed, &statuses);

        if !killed && checkpointed >= config.records * 3 / 10 {
            if let Some(member) = fleet.get_mut(&victim) {
                member.handle.abort();
                member.alive = false;
                if let Some(board) = &config.status_board {
                    board.remove(&victim);
                }
                final_statuses.insert(victim.clone(), member.status.borrow().clone());
            }
            killed = true;
            let _ = kill_done.send(true);
            observer.event(&format!(
                "killed instance {victim} abruptly (no checkpoint, no hand-off)"
            ));
        }
        if killed && !joined && checkpointed >= config.records / 2 {
            fleet.insert(newcomer.clone(), start_member(&newcomer)?);
            joined = true;
            observer.event(&format!("instance {newcomer} joined the fleet"));
        }
        if let Some(done) = producer.take_if(|handle| handle.is_finished()) {
            done.await
                .map_err(ProcessorError::task("produce the workload"))??;
            let mut marks = Vec::new();
            for partition in 0..config.partitions {
                marks.push(high_watermark(
                    &KafkaSettings::new(&brokers),
                    &config.topic,
                    partition,
                )?);
            }
            ends = Some(marks);
        }
        if killed && joined && ends.is_some() && covered == config.partitions {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let processing_time = started.elapsed();
    observer.event(&format!(
        "every partition checkpointed up to its end after {:.1} s; stopping the fleet gracefully",
        processing_time.as_secs_f64()
    ));
    for member in fleet.values().filter(|m| m.alive) {
        member.stop.cancel();
    }
    let mut applied_with_replays = 0;
    for (id, member) in fleet {
        if member.alive {
            match member.handle.await {
                Ok(outcome) => outcome?,
                Err(err) => return Err(ProcessorError::task(format!("instance {id}"))(err)),
            }
            final_statuses.insert(id.clone(), member.status.borrow().clone());
        }
        applied_with_replays += final_statuses.get(&id).map_or(0, |s| s.processed);
    }
    observer.finish();

    let (state, _skipped) = checkpointed_entries(
        base.checkpoints.as_ref(),
        base.stores.as_ref(),
        &config.topic,
    )?;
    let expected = job.expected_state()?;
    let mut mismatches = Vec::new();
    let mut matching_keys = 0;
    for (key, value) in &expected {
        if state.get(key) == Some(value) {
            matching_keys += 1;
        } else {
            mismatches.push(String::from_utf8_lossy(key).into_owned());
        }
    }
    mismatches.extend(
        state
            .keys()
            .filter(|k| !expected.contains_key(*k))
            .map(|k| String::from_utf8_lossy(k).into_owned()),
    );
    drop(mock);
    Ok(DemoReport {
        records: config.records,
        expected_keys: expected.len(),
        matching_keys,
        mismatches,
        processing_time,
        applied_with_replays,
        instances: final_statuses,
        leaders,
    })
}
