//! The configuration of a fleet instance and its maintenance, and their validation: one clear
//! [`ProcessorError::InvalidInput`] per problem, at construction, before anything connects.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{ProcessorError, ProcessorResult};
use crate::kafka_settings::KafkaSettings;

/// The shortest claim lease: renewals run every third of it, and a backend round trip must fit.
pub const MIN_CLAIM_TTL: Duration = Duration::from_millis(100);

/// How long, by default, a partition stopped at a refused record stays unclaimed before it is tried
/// again (a fixed job deployed meanwhile starts it at once: a new process has no such pause); see
/// [`InstanceConfig::with_rejected_record_pause`].
pub const REJECTED_RECORD_PAUSE: Duration = Duration::from_secs(30);

/// The progress watchdog's default bound: far above a healthy commit (milliseconds) and a broker
/// failover (a leader election on the brokers' defaults takes up to about 18 s), far below "minutes".
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The shortest watchdog bound accepted: below it a partition's ordinary steps would look stalled.
pub const MIN_STALL_TIMEOUT: Duration = Duration::from_secs(1);

fn invalid(what: &'static str, reason: String) -> ProcessorError {
    ProcessorError::InvalidInput { what, reason }
}

/// What a partition does when the offset stored with its state is outside the topic's log: below its
/// start (retention deleted records it never processed) or above its end (the topic was deleted and
/// recreated). A partition with no state yet starts at the log start without asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MissingOffsets {
    /// Refuse to process the partition, with an error naming the offsets (the default: nothing is
    /// skipped without an operator deciding it).
    #[default]
    Fail,
    /// Resume at the log start, skipping what is gone (logged with the offsets skipped).
    Earliest,
    /// Resume at the log end, skipping everything before it (logged with the offsets skipped).
    Latest,
}

impl std::str::FromStr for MissingOffsets {
    type Err = ProcessorError;

    fn from_str(text: &str) -> ProcessorResult<Self> {
        match text {
            "fail" => Ok(MissingOffsets::Fail),
            "earliest" => Ok(MissingOffsets::Earliest),
            "latest" => Ok(MissingOffsets::Latest),
            other => Err(invalid(
                "on-missing-offsets",
                format!("`{other}` must be fail, earliest or latest"),
            )),
        }
    }
}

/// What the output and dead-letter topics promise their readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OutputGuarantee {
    /// Each input record's effect is visible to `read_committed` readers exactly once, across crashes,
    /// hand-offs, frozen owners and restores (the default): each batch's outputs and its input offset
    /// are one Kafka transaction of the partition's transactional producer, committed before its state
    /// is written. Needs brokers with transactions.
    #[default]
    ExactlyOnce,
    /// Outputs are acknowledged before their batch's state is written; a crash in between replays and
    /// publishes them again (duplicates, never losses). No transactions needed.
    AtLeastOnce,
}

impl std::str::FromStr for OutputGuarantee {
    type Err = ProcessorError;

    fn from_str(text: &str) -> ProcessorResult<Self> {
        match text {
            "exactly-once" => Ok(OutputGuarantee::ExactlyOnce),
            "at-least-once" => Ok(OutputGuarantee::AtLeastOnce),
            other => Err(invalid(
                "output-guarantee",
                format!("`{other}` must be exactly-once or at-least-once"),
            )),
        }
    }
}

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
    /// Its partition count at start (read from the brokers by `processor run`); partitions added later
    /// are found every [`topology_refresh`](Self::topology_refresh).
    pub partitions: i32,
    /// How often the topic's partition count is read again from the brokers, so that partitions added
    /// while the fleet runs are claimed and consumed (`None`: never, the count stays as configured).
    pub topology_refresh: Option<Duration>,
    /// Kafka bootstrap servers and client properties (SASL, TLS, tuning) of every client.
    pub kafka: KafkaSettings,
    /// Where this instance keeps local partition state.
    pub state_dir: PathBuf,
    /// Lease of membership and partition claims (renewed every third).
    pub claim_ttl: Duration,
    /// Time between checkpoints of an owned partition.
    pub checkpoint_every: Duration,
    /// Most records in one commit (one atomic write of the changed keys and the next offset); default
    /// 100 000. A commit also comes as soon as the changes and outputs waiting for it fill half the
    /// state cache ([`state_cache_bytes`](Self::state_cache_bytes)), so memory is bounded by bytes
    /// whatever this says.
    pub batch_size: usize,
    /// Longest time applied records wait for their commit (and their outputs): commits happen after
    /// [`batch_size`](Self::batch_size) records or this long, whichever comes first; default 100 ms.
    pub commit_interval: Duration,
    /// How often each owned partition's progress reaches the status and the metrics (not a commit
    /// point: commits follow `batch_size` and `commit_interval` only).
    pub status_interval: Duration,
    /// Bytes of each owned partition's write-back state cache.
    pub state_cache_bytes: usize,
    /// Every output per record, or the latest per key per commit.
    pub output_mode: crate::operator::OutputMode,
    /// How many other instances keep a warm copy of each partition's state (refreshed from its
    /// checkpoints as they appear), so that a new owner starts from local state instead of copying the
    /// whole checkpoint (0: none).
    pub standby_replicas: usize,
    /// How long a partition stopped at a record its job refused (policy `stop`) stays unclaimed by this
    /// instance before it is tried again (default
    /// [`REJECTED_RECORD_PAUSE`], 30 s).
    pub rejected_record_pause: Duration,
    /// How many owned partitions process a batch at the same time (the others wait, and their
    /// prefetch queues fill up and stop fetching).
    pub parallelism: usize,
    /// Retention and compaction of the shared checkpoints (scheduled by the leader).
    pub maintenance: MaintenanceConfig,
    /// How often membership, assignment and fleet duties are re-evaluated.
    pub tick: Duration,
    /// Most members the fleet may have.
    pub max_members: u32,
    /// Topic for the updated aggregates, if any.
    pub output_topic: Option<String>,
    /// What the output and dead-letter topics promise (exactly-once by default).
    pub output_guarantee: OutputGuarantee,
    /// Topic for malformed records, if any (they are logged either way).
    pub dead_letter_topic: Option<String>,
    /// What a partition does when its stored offset is outside the log (default: refuse).
    pub on_missing_offsets: MissingOffsets,
    /// When the checkpoint a partition's record names cannot be read, restore the newest checkpoint that
    /// can (or start empty) instead of refusing — the operator's explicit acceptance of the loss.
    pub restore_older_checkpoint: bool,
    /// Where this instance serves its status (`http://host:port/instances/{id}/status`), recorded with
    /// its membership so that other members and the dashboard find it; `None` without an HTTP endpoint.
    pub status_url: Option<String>,
    /// The progress watchdog's bound (default 30 s; `None`: no watchdog): a partition that has records
    /// waiting past its position — or is starting, committing, checkpointing or handing off — and has
    /// neither applied a batch nor completed a commit or step for this long is given up: its task is
    /// abandoned, its claim released, and it is claimed again with new Kafka clients. A restore may
    /// take ten bounds. Counted in `processor_partition_stalls_total` and the status' `stalls`.
    pub stall_timeout: Option<Duration>,
    /// How long a stop may take (`None`, the default: the claim TTL + 5 s): partitions still not
    /// handed off by then are abandoned — their claims lapse, their next owners resume from the
    /// stored offsets — and [`Instance::run`](crate::Instance::run) returns
    /// [`ProcessorError::ShutdownAbandoned`].
    pub shutdown_timeout: Option<Duration>,
}

impl InstanceConfig {
    /// Defaults: 5 s claims, checkpoints every 2 s, commits of at most 100 000 records at least every
    /// 100 ms, an 8 MiB state cache per partition, as many partitions processing at once
    /// as there are CPUs, maintenance every 10 s keeping 3
    /// checkpoints, 250 ms ticks, the partition count read again every 30 s, no output or dead-letter
    /// topic.
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
            topology_refresh: Some(Duration::from_secs(30)),
            kafka: KafkaSettings::new(brokers),
            state_dir,
            claim_ttl: Duration::from_secs(5),
            checkpoint_every: Duration::from_secs(2),
            batch_size: 100_000,
            commit_interval: Duration::from_millis(100),
            status_interval: Duration::from_millis(500),
            state_cache_bytes: crate::partition::DEFAULT_STATE_CACHE_BYTES,
            output_mode: crate::operator::OutputMode::PerRecord,
            standby_replicas: 0,
            rejected_record_pause: REJECTED_RECORD_PAUSE,
            parallelism: std::thread::available_parallelism().map_or(2, |n| n.get()),
            maintenance: MaintenanceConfig::default(),
            tick: Duration::from_millis(250),
            max_members: 4_096,
            output_topic: None,
            output_guarantee: OutputGuarantee::ExactlyOnce,
            dead_letter_topic: None,
            on_missing_offsets: MissingOffsets::Fail,
            restore_older_checkpoint: false,
            status_url: None,
            stall_timeout: Some(DEFAULT_STALL_TIMEOUT),
            shutdown_timeout: None,
        }
    }

    /// Sets the progress watchdog's bound (`None`: no watchdog); see
    /// [`stall_timeout`](Self::stall_timeout).
    #[must_use]
    pub fn with_stall_timeout(mut self, bound: Option<Duration>) -> Self {
        self.stall_timeout = bound;
        self
    }

    /// Sets how long a stop may take; see [`shutdown_timeout`](Self::shutdown_timeout).
    #[must_use]
    pub fn with_shutdown_timeout(mut self, bound: Duration) -> Self {
        self.shutdown_timeout = Some(bound);
        self
    }

    /// How long a stop may take: [`shutdown_timeout`](Self::shutdown_timeout), or the claim TTL + 5 s.
    pub fn shutdown_bound(&self) -> Duration {
        self.shutdown_timeout
            .unwrap_or(self.claim_ttl + Duration::from_secs(5))
    }

    /// Records `url` as where this instance serves its status (see [`crate::http`]).
    pub fn with_status_url(mut self, url: &str) -> Self {
        self.status_url = Some(url.to_owned());
        self
    }

    /// Sets how often the partition count is read again from the brokers (`None`: never).
    pub fn with_topology_refresh(mut self, every: Option<Duration>) -> Self {
        self.topology_refresh = every;
        self
    }

    /// Sets how many partitions process a batch at the same time (at least 1).
    pub fn with_parallelism(mut self, parallelism: usize) -> Self {
        self.parallelism = parallelism.max(1);
        self
    }

    /// Sets the most members the fleet may have: a ceiling, checked when an instance joins (an instance
    /// finding the fleet full waits outside it). It costs nothing per tick: members are listed in one
    /// request whatever their number.
    pub fn with_max_members(mut self, max_members: u32) -> Self {
        self.max_members = max_members;
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

    /// Sets what the output and dead-letter topics promise.
    pub fn with_output_guarantee(mut self, guarantee: OutputGuarantee) -> Self {
        self.output_guarantee = guarantee;
        self
    }

    /// Publishes each updated aggregate to `topic` (see [`OutputGuarantee`]).
    pub fn with_output_topic(mut self, topic: &str) -> Self {
        self.output_topic = Some(topic.to_owned());
        self
    }

    /// Sends malformed records to `topic` (see [`OutputGuarantee`]) besides logging them.
    pub fn with_dead_letter_topic(mut self, topic: &str) -> Self {
        self.dead_letter_topic = Some(topic.to_owned());
        self
    }

    /// Keeps `replicas` warm copies of each partition's state on other instances (see
    /// [`standby_replicas`](Self::standby_replicas)).
    pub fn with_standby_replicas(mut self, replicas: usize) -> Self {
        self.standby_replicas = replicas;
        self
    }

    /// Keeps a partition stopped at a refused record unclaimed for `pause` before trying it again (see
    /// [`rejected_record_pause`](Self::rejected_record_pause)).
    pub fn with_rejected_record_pause(mut self, pause: Duration) -> Self {
        self.rejected_record_pause = pause;
        self
    }

    /// Commits after `max_records` records or `interval`, whichever comes first.
    pub fn with_commits(mut self, max_records: usize, interval: Duration) -> Self {
        self.batch_size = max_records;
        self.commit_interval = interval;
        self
    }

    /// Reports each partition's progress every `every` (default 500 ms).
    pub fn with_status_interval(mut self, every: Duration) -> Self {
        self.status_interval = every;
        self
    }

    /// Bounds each owned partition's write-back state cache to `bytes`.
    pub fn with_state_cache_bytes(mut self, bytes: usize) -> Self {
        self.state_cache_bytes = bytes;
        self
    }

    /// Publishes every output, or only the latest per key per commit.
    pub fn with_output_mode(mut self, mode: crate::operator::OutputMode) -> Self {
        self.output_mode = mode;
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

    /// Sets what a partition does when its stored offset is outside the log.
    pub fn with_on_missing_offsets(mut self, policy: MissingOffsets) -> Self {
        self.on_missing_offsets = policy;
        self
    }

    /// Accepts losing an unreadable checkpoint of record (see the field).
    pub fn with_restore_older_checkpoint(mut self, accept: bool) -> Self {
        self.restore_older_checkpoint = accept;
        self
    }

    /// Uses `kafka` (servers and client properties) for every client of the instance.
    pub fn with_kafka(mut self, kafka: KafkaSettings) -> Self {
        self.kafka = kafka;
        self
    }

    /// Checks every setting; the first problem found is the error.
    ///
    /// # Errors
    /// [`ProcessorError::InvalidInput`] naming the setting, the value and what it must be.
    pub fn validate(&self) -> ProcessorResult<()> {
        let names = [
            ("instance id", self.instance_id.as_str()),
            ("group", self.group.as_str()),
            ("topic", self.topic.as_str()),
            ("brokers", self.kafka.brokers()),
        ];
        for (what, value) in names {
            if value.trim().is_empty() {
                return Err(invalid(what, "must not be empty".to_owned()));
            }
        }
        crate::resources::validate_topic(&self.topic).map_err(|reason| invalid("topic", reason))?;
        crate::resources::validate_group(&self.group).map_err(|reason| invalid("group", reason))?;
        let other_topics = [
            ("output topic", &self.output_topic),
            ("dead-letter topic", &self.dead_letter_topic),
        ];
        for (what, topic) in other_topics {
            if let Some(topic) = topic {
                crate::resources::validate_topic(topic).map_err(|reason| invalid(what, reason))?;
            }
        }
        if self.instance_id.contains(['\n', '\r']) {
            return Err(invalid(
                "instance id",
                format!("{:?} must be one line", self.instance_id),
            ));
        }
        if let Some(url) = &self.status_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "status url",
                format!("`{url}` must start with http:// or https://"),
            ));
        }
        if self.partitions < 1 {
            return Err(invalid(
                "partitions",
                format!("{} must be at least 1", self.partitions),
            ));
        }
        if let Some(bound) = self.stall_timeout
            && bound < MIN_STALL_TIMEOUT
        {
            return Err(invalid(
                "stall timeout",
                format!(
                    "{bound:?} must be at least {MIN_STALL_TIMEOUT:?} (or no watchdog at all): a partition's ordinary steps take that long"
                ),
            ));
        }
        if self.claim_ttl < MIN_CLAIM_TTL {
            return Err(invalid(
                "claim ttl",
                format!(
                    "{:?} must be at least {MIN_CLAIM_TTL:?} (it is renewed every third)",
                    self.claim_ttl
                ),
            ));
        }
        let positive = [
            ("checkpoint interval", self.checkpoint_every),
            ("commit interval", self.commit_interval),
            ("status interval", self.status_interval),
            ("tick", self.tick),
            ("maintenance interval", self.maintenance.every),
        ];
        for (what, value) in positive {
            if value.is_zero() {
                return Err(invalid(what, "must be longer than zero".to_owned()));
            }
        }
        let counts = [
            ("batch size", self.batch_size),
            ("parallelism", self.parallelism),
            ("max members", self.max_members as usize),
            ("checkpoints kept", self.maintenance.keep_checkpoints),
        ];
        for (what, value) in counts {
            if value == 0 {
                return Err(invalid(what, "must be at least 1".to_owned()));
            }
        }
        Ok(())
    }
}

/// How maintenance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MaintenanceConfig {
    /// How often each partition's job is due.
    pub every: Duration,
    /// Checkpoints kept per partition.
    pub keep_checkpoints: usize,
    /// How long an unreferenced file must have been unused before it is deleted.
    pub grace: Duration,
    /// Lease of task claims and compaction locks (renewed while running).
    pub claim_ttl: Duration,
}

impl Default for MaintenanceConfig {
    /// Every 10 s, keep 3, a 60 s grace, 5 s claims.
    fn default() -> Self {
        MaintenanceConfig {
            every: Duration::from_secs(10),
            keep_checkpoints: 3,
            grace: Duration::from_secs(60),
            claim_ttl: Duration::from_secs(5),
        }
    }
}

impl MaintenanceConfig {
    /// Sets how often each partition's job is due.
    pub fn with_every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    /// Sets how many checkpoints are kept per partition (at least one always is).
    pub fn with_keep_checkpoints(mut self, keep: usize) -> Self {
        self.keep_checkpoints = keep;
        self
    }

    /// Sets how long an unreferenced file must have been unused before it is deleted.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> InstanceConfig {
        InstanceConfig::new("a", "orders", 8, "127.0.0.1:9092", PathBuf::from("/tmp/a"))
    }

    #[test]
    fn defaults_are_valid_and_each_bad_setting_is_named() {
        assert!(config().validate().is_ok());
        let cases: Vec<(InstanceConfig, &str)> = vec![
            (
                InstanceConfig::new("", "orders", 8, "b:1", PathBuf::new()),
                "instance id",
            ),
            (
                InstanceConfig::new("a", "orders", 0, "b:1", PathBuf::new()),
                "partitions",
            ),
            (
                config().with_claim_ttl(Duration::from_millis(10)),
                "claim ttl",
            ),
            (
                config().with_checkpoint_every(Duration::ZERO),
                "checkpoint interval",
            ),
            (
                config().with_maintenance(MaintenanceConfig::default().with_keep_checkpoints(0)),
                "checkpoints kept",
            ),
        ];
        for (config, expected) in cases {
            match config.validate() {
                Err(ProcessorError::InvalidInput { what, .. }) => assert_eq!(what, expected),
                other => panic!("{expected}: {other:?}"),
            }
        }
    }
}
