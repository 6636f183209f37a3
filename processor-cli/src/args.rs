//! The command line: subcommands and their flags (each flag also from an environment variable; `run`'s
//! also from a `--config` file, see the `settings` module).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use processor::{MissingOffsets, OutputGuarantee};

#[derive(Parser)]
#[command(
    name = "processor",
    about = "Kafka stream processor with fenced, checkpointed per-partition state"
)]
pub(crate) struct Cli {
    /// Log lines on stderr as `text` or `json` (one object per line, with the span fields: instance,
    /// partition, fencing token). `RUST_LOG` filters them.
    #[arg(long, global = true, env = "LOG_FORMAT", default_value = "text")]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// The fleet demo on the embedded default: mock Kafka cluster, in-process locks, RocksDB in a temp dir.
    Demo(DemoArgs),
    /// Run one fleet instance until SIGTERM/SIGINT (then checkpoint, release, exit 0).
    Run(Box<RunArgs>),
    /// Host librdkafka's mock cluster with the topic; prints the bootstrap address first; runs until killed.
    DevBroker {
        /// Topic to create.
        #[arg(long, env = "TOPIC")]
        topic: String,
        /// Its partition count.
        #[arg(long, env = "PARTITIONS", default_value_t = 8)]
        partitions: i32,
        /// More topics to create, one partition each (output and dead-letter topics); repeatable.
        #[arg(long = "also-create", env = "ALSO_CREATE", value_delimiter = ',')]
        also_create: Vec<String>,
    },
    /// Produce the deterministic workload.
    Produce {
        /// Bootstrap servers.
        #[arg(long, env = "BROKERS")]
        brokers: String,
        /// Topic.
        #[arg(long, env = "TOPIC")]
        topic: String,
        /// The topic's partition count (keys are spread over it).
        #[arg(long, env = "PARTITIONS", default_value_t = 8)]
        partitions: i32,
        /// How many records.
        #[arg(long, default_value_t = 100_000)]
        records: u64,
        /// How many distinct keys.
        #[arg(long, default_value_t = 500)]
        keys: u64,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Produce only records `start-at..records` of the workload (to produce it in parts).
        #[arg(long, default_value_t = 0)]
        start_at: u64,
    },
    /// Inspect checkpointed state.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Check a `run` configuration without running.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
pub(crate) enum ConfigCommand {
    /// Resolve flags, environment and `--config` file as `run` would, validate them, and print the
    /// result as JSON with secrets redacted; exits 1 with the problem when invalid.
    Check(Box<RunArgs>),
}

#[derive(Subcommand)]
pub(crate) enum StateCommand {
    /// One JSON line per partition: the offset its latest valid checkpoint covers.
    Offsets {
        /// Where the checkpoints are.
        #[command(flatten)]
        checkpoints: CheckpointArgs,
        /// Topic.
        #[arg(long, env = "TOPIC")]
        topic: String,
        /// The fleet whose checkpoints to read (its `run --group`).
        #[arg(long, env = "GROUP", default_value = "processor")]
        group: String,
    },
    /// One JSON line per key, merged from the latest valid checkpoint of each partition.
    Dump {
        /// Where the checkpoints are.
        #[command(flatten)]
        checkpoints: CheckpointArgs,
        /// Topic.
        #[arg(long, env = "TOPIC")]
        topic: String,
        /// The fleet whose checkpoints to read (its `run --group`).
        #[arg(long, env = "GROUP", default_value = "processor")]
        group: String,
    },
}

/// Where checkpoints are kept: exactly one of a directory and a URL. (Not a required clap group: a
/// `--config` file's value is a flag's default, which clap does not count as given.)
#[derive(clap::Args, Clone, Debug)]
#[group(multiple = false)]
pub(crate) struct CheckpointArgs {
    /// Shared checkpoint directory: one machine, or a mount every instance reaches (NFS, EFS, ...).
    /// Each fleet (`--group`) keeps its checkpoints in a directory of its own under it.
    #[arg(long, env = "CHECKPOINT_DIR")]
    pub(crate) checkpoint_dir: Option<PathBuf>,
    /// Checkpoints in object storage, for a fleet across machines: `s3://bucket/prefix` (Amazon S3 or
    /// an S3-compatible server), `gs://bucket/prefix`, `az://container/prefix` (`file:///path` is the
    /// directory form). Credentials, region and endpoint come from each cloud's standard environment
    /// variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
    /// `GOOGLE_APPLICATION_CREDENTIALS`, `AZURE_STORAGE_ACCOUNT_NAME`, ...) or the instance's role;
    /// never printed. Each fleet (`--group`) keeps its checkpoints under a prefix of its own.
    #[arg(long, env = "CHECKPOINT_URL")]
    pub(crate) checkpoint_url: Option<String>,
}

impl CheckpointArgs {
    /// The location the flags name, for fleet `group`.
    ///
    /// # Errors
    /// Neither flag given.
    pub(crate) fn location(
        &self,
        group: &str,
    ) -> anyhow::Result<processor::checkpoint::CheckpointLocation> {
        use processor::checkpoint::CheckpointLocation;
        let root = match (&self.checkpoint_dir, &self.checkpoint_url) {
            (Some(dir), _) => CheckpointLocation::Directory(dir.clone()),
            (None, Some(url)) => CheckpointLocation::Url(url.clone()),
            (None, None) => anyhow::bail!(
                "where are the checkpoints? give --checkpoint-dir (a directory every instance reaches) or --checkpoint-url (s3://, gs://, az://)"
            ),
        };
        Ok(root.for_group(group))
    }
}

#[derive(clap::Args)]
pub(crate) struct DemoArgs {
    /// `memory` (in-process locks), or a real lock backend: `redis://…`, `redlock://h1:p1,h2:p2,h3:p3`,
    /// `postgres://…`, `etcd://h1:p1,h2:p2`.
    #[arg(long, env = "LOCK_URL", default_value = "memory")]
    pub(crate) lock_url: String,
    /// Records in the workload (the mock cluster keeps about 100 000 message sets per partition).
    #[arg(long, default_value_t = 100_000)]
    pub(crate) records: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 1_000)]
    pub(crate) keys: u64,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 8)]
    pub(crate) partitions: i32,
    /// Instances at the start (one is killed and one added mid-way).
    #[arg(long, default_value_t = 3)]
    pub(crate) instances: usize,
    /// Workload seed.
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Keep state and checkpoints here instead of a temporary directory.
    #[arg(long)]
    pub(crate) work_dir: Option<PathBuf>,
    /// Keep the checkpoints in object storage instead: `s3://bucket/prefix`, `gs://…`, `az://…`
    /// (credentials and endpoint from the cloud's environment variables, as for `run`); each run under
    /// a prefix of its own.
    #[arg(long, env = "CHECKPOINT_URL")]
    pub(crate) checkpoint_url: Option<String>,
    /// Run on an existing Kafka cluster (`host:port,…`) instead of the in-process mock cluster; the demo
    /// creates a fresh topic there (`orders-demo-…`) and leaves it.
    #[arg(long, env = "BROKERS")]
    pub(crate) brokers: Option<String>,
    /// The replication factor of the demo's topic on an existing cluster.
    #[arg(long, default_value_t = 1)]
    pub(crate) replication_factor: i32,
    /// Plain status lines instead of progress bars.
    #[arg(long)]
    pub(crate) no_progress: bool,
    /// Serve metrics, health and the live fleet dashboard here while the demo runs (`127.0.0.1:9090`;
    /// port 0 picks a free one, printed at start).
    #[arg(long, env = "HTTP_ADDR")]
    pub(crate) http: Option<std::net::SocketAddr>,
    /// Keep serving the dashboard this many seconds after the verdict.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) linger_secs: f64,
}

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// A TOML file of settings (keys are the flag names); flags and environment variables override it.
    #[arg(long, env = "CONFIG_FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Serve `/metrics` (Prometheus), `/health`, `/ready`, `/status` and the fleet dashboard `/` here
    /// (`127.0.0.1:9090`; port 0 picks a free one, printed at start).
    #[arg(long, env = "HTTP_ADDR")]
    pub(crate) http: Option<std::net::SocketAddr>,
    /// The base URL other members and the dashboard reach this instance's endpoint at (default:
    /// `http://` and the bound address).
    #[arg(long, env = "HTTP_ADVERTISE")]
    pub(crate) http_advertise: Option<String>,
    /// A bearer token every HTTP request but `/health` and `/ready` must carry
    /// (`Authorization: Bearer TOKEN`; a browser asks for it as the password); members send it when
    /// they forward a state query, so give every member the same one. At least 16 characters.
    #[arg(
        long,
        env = "HTTP_TOKEN",
        hide_env_values = true,
        conflicts_with = "http_token_file"
    )]
    pub(crate) http_token: Option<String>,
    /// A file holding the HTTP token (its first line): keeps it out of the process list.
    #[arg(long, env = "HTTP_TOKEN_FILE")]
    pub(crate) http_token_file: Option<PathBuf>,
    /// A CA certificate file (PEM) that signed other members' `https://` endpoints, trusted besides the
    /// platform's roots when this member forwards a state query to them.
    #[arg(long, env = "HTTP_CA_FILE")]
    pub(crate) http_ca_file: Option<PathBuf>,
    /// Answer HTTP requests only for this `Host` name (repeat for several; default: any): a DNS
    /// rebinding page names its own host and gets 403.
    #[arg(
        long = "http-allowed-host",
        env = "HTTP_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub(crate) http_allowed_hosts: Vec<String>,
    /// Bootstrap servers.
    #[arg(long, env = "BROKERS")]
    pub(crate) brokers: String,
    /// Topic.
    #[arg(long, env = "TOPIC")]
    pub(crate) topic: String,
    /// The topic's partition count, checked against the brokers' (read from them when absent).
    #[arg(long, env = "PARTITIONS")]
    pub(crate) partitions: Option<i32>,
    /// Fleet name. Every lock, record, task and checkpoint path is scoped by the group *and* the topic:
    /// two fleets on one topic, or two jobs on different topics with the same (or the default) group,
    /// each process everything on one backend. Also the Kafka group its progress is committed to.
    #[arg(long, env = "GROUP", default_value = "processor")]
    pub(crate) group: String,
    /// Local state directory of this instance.
    #[arg(long, env = "STATE_DIR")]
    pub(crate) state_dir: PathBuf,
    /// Where the fleet's checkpoints are: a directory or object storage.
    #[command(flatten)]
    pub(crate) checkpoints: CheckpointArgs,
    /// The fleet's lock backend: `redis://…`, `redlock://h1:p1,h2:p2,h3:p3`, `postgres://…` or
    /// `etcd://h1:p1,h2:p2,h3:p3`. Required:
    /// instances that do not share one each own every partition. `memory` only with
    /// `--single-instance`.
    #[arg(long, env = "LOCK_URL")]
    pub(crate) lock_url: Option<String>,
    /// A librdkafka client property (`KEY=VALUE`: `security.protocol=SASL_SSL`, `sasl.password=…`, any
    /// tuning) for every consumer and producer of the instance; repeatable. Secret values are never
    /// logged.
    #[arg(
        long = "kafka-config",
        value_name = "KEY=VALUE",
        env = "KAFKA_CONFIG",
        value_delimiter = ';'
    )]
    pub(crate) kafka_config: Vec<String>,
    /// A file of librdkafka client properties, one `KEY=VALUE` per line (`#` comments); `--kafka-config`
    /// flags override it.
    #[arg(long, env = "KAFKA_CONFIG_FILE")]
    pub(crate) kafka_config_file: Option<PathBuf>,
    /// When a partition's stored offset is outside the topic's log (records deleted by retention, or the
    /// topic recreated): `fail` (refuse the partition, the default), `earliest` or `latest` (skip to the
    /// log's start or end, logged with the offsets skipped).
    #[arg(long, env = "ON_MISSING_OFFSETS", default_value = "fail")]
    pub(crate) on_missing_offsets: MissingOffsets,
    /// Create the checkpoint directory if it does not exist (first use). Without it a missing directory —
    /// an unmounted volume — is an error instead of an empty store.
    #[arg(long, env = "CREATE_CHECKPOINT_DIR")]
    pub(crate) create_checkpoint_dir: bool,
    /// When the checkpoint a partition's record names cannot be read, restore the newest readable one (or
    /// start empty) instead of refusing the partition: accepts losing what that checkpoint held.
    #[arg(long, env = "RESTORE_OLDER_CHECKPOINT")]
    pub(crate) restore_older_checkpoint: bool,
    /// Run as the only instance of the fleet, with in-process locks (no `--lock-url` needed).
    #[arg(long, env = "SINGLE_INSTANCE")]
    pub(crate) single_instance: bool,
    /// Instance id (unique in the fleet; default: a fresh time-ordered UUID, printed at start).
    #[arg(long, env = "INSTANCE_ID")]
    pub(crate) instance_id: Option<String>,
    /// Seconds between checkpoints of an owned partition.
    #[arg(long, env = "CHECKPOINT_INTERVAL_SECS", default_value_t = 2.0)]
    pub(crate) checkpoint_interval_secs: f64,
    /// Seconds a membership, partition or leadership claim lasts without renewal (renewed every third):
    /// how long a dead instance's partitions wait before others take them.
    #[arg(long, env = "CLAIM_TTL_SECS", default_value_t = 5.0)]
    pub(crate) claim_ttl_secs: f64,
    /// Seconds a partition with records waiting (or starting, committing, checkpointing, handing off)
    /// may go without progress before the watchdog gives it up — abandons its task, releases its
    /// claim, and claims it again with new Kafka clients. 0 turns the watchdog off.
    #[arg(long, env = "STALL_TIMEOUT_SECS", default_value_t = 30.0)]
    pub(crate) stall_timeout_secs: f64,
    /// Seconds a stop (SIGTERM, Ctrl-C) may take: partitions not handed off by then are abandoned
    /// (their claims lapse; the next owners resume from the stored offsets) and the process exits
    /// with status 1. Default: the claim TTL + 5 s.
    #[arg(long, env = "SHUTDOWN_TIMEOUT_SECS")]
    pub(crate) shutdown_timeout_secs: Option<f64>,
    /// How many owned partitions process a batch at the same time (default: the CPU count).
    #[arg(long, env = "PARALLELISM")]
    pub(crate) parallelism: Option<usize>,
    /// Seconds between reads of the topic's partition count: partitions added to the topic are claimed
    /// and consumed after at most this long (logged: keyed state does not move with its keys).
    #[arg(long, env = "TOPOLOGY_REFRESH_SECS", default_value_t = 30.0)]
    pub(crate) topology_refresh_secs: f64,
    /// The most instances the fleet may have: a ceiling checked when an instance joins (one finding the
    /// fleet full waits outside it, logged). It costs nothing per tick: membership is one roster per job
    /// (group and topic), listed in one request whatever its size.
    #[arg(long, env = "MAX_MEMBERS", default_value_t = 4_096)]
    pub(crate) max_members: u32,
    /// Checkpoints kept per partition by the maintenance jobs.
    #[arg(long, env = "KEEP_CHECKPOINTS", default_value_t = 3)]
    pub(crate) keep_checkpoints: usize,
    /// Seconds between maintenance runs (retention and compaction) of each partition.
    #[arg(long, env = "MAINTENANCE_INTERVAL_SECS", default_value_t = 10.0)]
    pub(crate) maintenance_interval_secs: f64,
    /// Topic for the updated aggregates (JSON, one per input record).
    #[arg(long, env = "OUTPUT_TOPIC")]
    pub(crate) output_topic: Option<String>,
    /// What the output and dead-letter topics promise: `exactly-once` (the default: each batch's outputs
    /// and input offset in one transaction per partition; `read_committed` readers see each record's
    /// effect once, whatever crashes) or `at-least-once` (for brokers without transactions).
    #[arg(long, env = "OUTPUT_GUARANTEE", default_value = "exactly-once")]
    pub(crate) output_guarantee: OutputGuarantee,
    /// Topic for malformed records (they are logged either way).
    #[arg(long, env = "DEAD_LETTER_TOPIC")]
    pub(crate) dead_letter_topic: Option<String>,
    /// Publish only the latest output per key per commit (as Kafka Streams' record cache does) instead
    /// of one per input record.
    #[arg(long, env = "LATEST_OUTPUT_PER_KEY")]
    pub(crate) latest_output_per_key: bool,
    /// Most records in one commit of a partition (one atomic write of its changed keys and offset).
    #[arg(long, env = "COMMIT_RECORDS", default_value_t = 100_000)]
    pub(crate) commit_records: usize,
    /// Milliseconds applied records wait at most for their commit (and their outputs).
    #[arg(long, env = "COMMIT_INTERVAL_MS", default_value_t = 100)]
    pub(crate) commit_interval_ms: u64,
    /// How many other instances keep a warm copy of each partition's state, refreshed from its
    /// checkpoints: when the owner dies or leaves, the new owner starts from that copy instead of
    /// copying the whole checkpoint (costs each replica the disk of the copy and the refresh I/O).
    #[arg(long, env = "STANDBY_REPLICAS", default_value_t = 0)]
    pub(crate) standby_replicas: usize,
    /// Seconds a partition stopped at a record its job refused (policy `stop`) stays unclaimed by this
    /// instance before it is tried again.
    #[arg(long, env = "REJECTED_RECORD_PAUSE_SECS", default_value_t = 30.0)]
    pub(crate) rejected_record_pause_secs: f64,
    /// MiB of each owned partition's write-back state cache.
    #[arg(long, env = "STATE_CACHE_MB", default_value_t = 8, value_parser = mib_at_least(1))]
    pub(crate) state_cache_mb: u64,
    /// MiB of RocksDB block cache shared by the instance's partitions (index and filter blocks included).
    #[arg(long, env = "BLOCK_CACHE_MB", default_value_t = 128, value_parser = mib_at_least(1))]
    pub(crate) block_cache_mb: u64,
    /// MiB of RocksDB memtables shared by the instance's partitions (writers stall beyond it).
    #[arg(long, env = "WRITE_BUFFER_MB", default_value_t = 64, value_parser = mib_at_least(1))]
    pub(crate) write_buffer_mb: u64,
    /// MiB of commits each owned partition coalesces before it writes their keys one by one: a commit is
    /// then one RocksDB record beside its offset, and a key changed by many commits is written once
    /// (0: every commit writes each key it changed).
    #[arg(long, env = "COMMIT_COALESCING_MB", default_value_t = 4, value_parser = mib_at_least(0))]
    pub(crate) commit_coalescing_mb: u64,
}

/// The most MiB a size flag takes: 1 TiB (more is a typo, and `MiB << 20` must fit a `usize`).
const MAX_MIB: u64 = 1 << 20;

/// A size flag in MiB from `min` to [`MAX_MIB`]: clap refuses the rest naming the flag and the value.
fn mib_at_least(min: u64) -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(min..=MAX_MIB)
}

/// Bytes of a size flag's MiB (bounded by [`MAX_MIB`], so it neither wraps nor overflows).
pub(crate) fn mib_to_bytes(mib: u64) -> usize {
    usize::try_from(mib.min(MAX_MIB) << 20).unwrap_or(usize::MAX)
}
