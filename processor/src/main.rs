//! The `processor` binary: run a fleet instance, host a development broker, produce a deterministic
//! workload, and inspect checkpointed state. Flags can also come from environment variables.
//!
//! ```text
//! processor dev-broker --topic orders --partitions 8          # prints the bootstrap address first
//! processor produce --brokers HOST:PORT --topic orders --partitions 8 --records 100000 --keys 500 --seed 1
//! processor run --brokers HOST:PORT --topic orders --partitions 8 --state-dir /var/lib/p1 \
//!     --checkpoint-dir /shared/checkpoints --lock-url redis://127.0.0.1:6379 --instance-id p1
//! processor state offsets --checkpoint-dir /shared/checkpoints --topic orders
//! processor state dump --checkpoint-dir /shared/checkpoints --topic orders
//! ```

// A command-line tool: its output is stdout.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use processor::checkpoint::{CheckpointStore, DirectoryCheckpointStore};
use processor::fleet::{Instance, InstanceConfig, Services};
use processor::kafka::{DevBroker, Workload};

use processor::operator::{Aggregate, KeyedAggregation};
use processor::store::PartitionStore;
use processor::store::rocksdb::RocksDbStores;
use state::recipes::fenced::{
    FencedStore, InMemoryFencedStore, PostgresFencedStore, RedisFencedStore,
};
use state::{
    DistributedLock, InMemoryDistributedLock, PostgresDistributedLock, RedisDistributedLock,
};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "processor",
    about = "Kafka stream processor with fenced, checkpointed per-partition state"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one fleet instance until SIGTERM/SIGINT (then checkpoint, release, exit 0).
    Run(RunArgs),
    /// Host librdkafka's mock cluster with the topic; prints the bootstrap address first; runs until killed.
    DevBroker {
        /// Topic to create.
        #[arg(long, env = "TOPIC")]
        topic: String,
        /// Its partition count.
        #[arg(long, env = "PARTITIONS", default_value_t = 8)]
        partitions: i32,
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
    },
    /// Inspect checkpointed state.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// One JSON line per partition: the offset its latest valid checkpoint covers.
    Offsets {
        /// The shared checkpoint directory.
        #[arg(long, env = "CHECKPOINT_DIR")]
        checkpoint_dir: PathBuf,
        /// Topic.
        #[arg(long, env = "TOPIC")]
        topic: String,
    },
    /// One JSON line per key, merged from the latest valid checkpoint of each partition.
    Dump {
        /// The shared checkpoint directory.
        #[arg(long, env = "CHECKPOINT_DIR")]
        checkpoint_dir: PathBuf,
        /// Topic.
        #[arg(long, env = "TOPIC")]
        topic: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Bootstrap servers.
    #[arg(long, env = "BROKERS")]
    brokers: String,
    /// Topic.
    #[arg(long, env = "TOPIC")]
    topic: String,
    /// The topic's partition count.
    #[arg(long, env = "PARTITIONS", default_value_t = 8)]
    partitions: i32,
    /// Fleet name (also the Kafka group id, for lag monitoring only).
    #[arg(long, env = "GROUP", default_value = "processor")]
    group: String,
    /// Local state directory of this instance.
    #[arg(long, env = "STATE_DIR")]
    state_dir: PathBuf,
    /// Shared checkpoint directory.
    #[arg(long, env = "CHECKPOINT_DIR")]
    checkpoint_dir: PathBuf,
    /// `memory` (single process), `redis://…` or `postgres://…`.
    #[arg(long, env = "LOCK_URL", default_value = "memory")]
    lock_url: String,
    /// Instance id (unique in the fleet).
    #[arg(long, env = "INSTANCE_ID")]
    instance_id: String,
    /// Seconds between checkpoints of an owned partition.
    #[arg(long, env = "CHECKPOINT_INTERVAL_SECS", default_value_t = 2.0)]
    checkpoint_interval_secs: f64,
}

async fn services(lock_url: &str, checkpoint_dir: PathBuf) -> anyhow::Result<Services> {
    let (lock, registry): (Arc<dyn DistributedLock>, Arc<dyn FencedStore>) = if lock_url == "memory"
    {
        (
            Arc::new(InMemoryDistributedLock::new()),
            Arc::new(InMemoryFencedStore::default()),
        )
    } else if lock_url.starts_with("redis") {
        (
            Arc::new(
                RedisDistributedLock::new(lock_url)
                    .await
                    .context("lock backend")?,
            ),
            Arc::new(
                RedisFencedStore::new(lock_url)
                    .await
                    .context("membership registry")?,
            ),
        )
    } else if lock_url.starts_with("postgres") {
        let lock = PostgresDistributedLock::new(lock_url)
            .await
            .context("lock backend")?;
        let registry = PostgresFencedStore::new(lock.pool().clone()).await?;
        (Arc::new(lock), Arc::new(registry))
    } else {
        bail!("--lock-url must be memory, redis://… or postgres://…");
    };
    Ok(Services {
        lock,
        registry,
        checkpoints: Arc::new(
            DirectoryCheckpointStore::new(checkpoint_dir).context("checkpoint dir")?,
        ),
        operator: Arc::new(KeyedAggregation),
        stores: Arc::new(RocksDbStores::new(128 << 20, 64 << 20)),
    })
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    if !(args.checkpoint_interval_secs > 0.0 && args.checkpoint_interval_secs.is_finite()) {
        bail!("--checkpoint-interval-secs must be positive");
    }
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("state dir {} is not writable", args.state_dir.display()))?;
    // Fail fast, with one line, when the broker or topic is not there.
    processor::kafka::high_watermark(&args.brokers, &args.topic, 0).with_context(|| {
        format!(
            "broker {} (topic {}) is not reachable",
            args.brokers, args.topic
        )
    })?;
    let services = services(&args.lock_url, args.checkpoint_dir.clone()).await?;
    let mut config = InstanceConfig::new(
        &args.instance_id,
        &args.topic,
        args.partitions,
        &args.brokers,
        args.state_dir,
    )
    .with_checkpoint_every(Duration::from_secs_f64(args.checkpoint_interval_secs));
    config.group = args.group;
    let instance = Instance::new(config, services);
    let stop = CancellationToken::new();
    let signals = stop.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        signals.cancel();
    });
    instance.run(stop).await?;
    Ok(())
}

/// Writes one line to stdout; a closed pipe (`| head`) ends the output quietly.
fn emit(out: &mut impl std::io::Write, line: serde_json::Value) -> anyhow::Result<bool> {
    match writeln!(out, "{line}") {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(err) => Err(err.into()),
    }
}

fn dump(checkpoint_dir: PathBuf, topic: &str, offsets_only: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let store = DirectoryCheckpointStore::new(checkpoint_dir)?;
    let scratch = tempfile::tempdir()?;
    let stores = RocksDbStores::new(32 << 20, 16 << 20);
    let mut merged = std::collections::BTreeMap::new();
    for partition in store.partitions(topic)? {
        let (manifest, skipped) = store.latest_valid(topic, partition)?;
        for err in skipped {
            eprintln!("skipped a corrupt checkpoint of partition {partition}: {err}");
        }
        let Some(manifest) = manifest else { continue };
        if offsets_only {
            let line = serde_json::json!({"partition": partition, "offset": manifest.next_offset,
                                          "fencing_token": manifest.fencing_token});
            if !emit(&mut out, line)? {
                return Ok(());
            }
            continue;
        }
        let dir = scratch.path().join(partition.to_string());
        store.restore(&manifest, &dir)?;
        let state = stores.open(partition, &dir)?;
        for (key, value) in state.entries()? {
            merged.insert(
                String::from_utf8_lossy(&key).into_owned(),
                Aggregate::decode(&value)?,
            );
        }
    }
    for (key, a) in merged {
        let line = serde_json::json!({"key": key, "count": a.count, "sum": a.sum, "min": a.min,
                                      "max": a.max, "chain": a.chain});
        if !emit(&mut out, line)? {
            break;
        }
    }
    Ok(())
}

async fn dev_broker(topic: &str, partitions: i32) -> anyhow::Result<()> {
    let broker = DevBroker::start(topic, partitions)?;
    println!("{}", broker.bootstrap_servers());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(broker);
    Ok(())
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run(args) => run(args).await,
        Command::DevBroker { topic, partitions } => dev_broker(&topic, partitions).await,
        Command::Produce {
            brokers,
            topic,
            partitions,
            records,
            keys,
            seed,
        } => {
            let workload = Workload {
                records,
                keys,
                seed,
                partitions,
            };
            workload
                .produce(&brokers, &topic)
                .await
                .map_err(anyhow::Error::from)
        }
        Command::State {
            command:
                StateCommand::Offsets {
                    checkpoint_dir,
                    topic,
                },
        } => dump(checkpoint_dir, &topic, true),
        Command::State {
            command:
                StateCommand::Dump {
                    checkpoint_dir,
                    topic,
                },
        } => dump(checkpoint_dir, &topic, false),
    };
    if let Err(err) = outcome {
        eprintln!("processor: {err:#}");
        std::process::exit(1);
    }
}
