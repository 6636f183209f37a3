//! Per-account fraud counters — your own job on the processor fleet (see `examples/src/fraud.rs` and
//! `docs/jobs.md`).
//!
//! ```text
//! # The whole fleet on one machine, nothing installed: librdkafka's mock cluster, in-process locks,
//! # three instances, one killed abruptly and one joining mid-stream; the verdict compares every
//! # account's state with a recomputation of the input.
//! cargo run -p examples --example fraud_counters
//! cargo run -p examples --example fraud_counters -- --lock-url redis://127.0.0.1:6379
//!
//! # One member of a real fleet (run it on several machines with the same brokers, lock URL, topic and
//! # shared checkpoint directory; each with its own id and state directory):
//! cargo run -p examples --example fraud_counters -- fleet --brokers HOST:9092 \
//!     --lock-url redis://HOST:6379 --topic payments --output-topic alerts \
//!     --instance-id a --state-dir /var/lib/fraud/a --checkpoint-dir /mnt/shared/fraud
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use examples::fraud::{FraudCounters, PaymentsDemo};
use processor::dev::demo::{DemoConfig, DemoJob, Quiet, run_demo};
use processor::job::JobOperator;
use processor::store::rocksdb::RocksDbStores;
use processor::{Instance, InstanceConfig, KafkaSettings, Services};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "Per-account fraud counters on the processor fleet")]
struct Args {
    /// `memory`, `redis://…`, `postgres://…`, … (any URL `state::connect` accepts).
    #[arg(long, global = true, default_value = "memory")]
    lock_url: String,
    /// Payments to produce (demo).
    #[arg(long, default_value_t = 50_000)]
    payments: u64,
    /// Accounts (demo).
    #[arg(long, default_value_t = 2_000)]
    accounts: u64,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one member of a fleet until Ctrl-C or SIGTERM.
    Fleet {
        /// Bootstrap servers.
        #[arg(long)]
        brokers: String,
        /// The payments topic.
        #[arg(long, default_value = "payments")]
        topic: String,
        /// Where alerts go (none when absent).
        #[arg(long)]
        output_topic: Option<String>,
        /// This member's id (unique in the fleet).
        #[arg(long)]
        instance_id: String,
        /// Local state of this member.
        #[arg(long)]
        state_dir: PathBuf,
        /// Checkpoints, shared by the fleet.
        #[arg(long)]
        checkpoint_dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    let job = FraudCounters::default();
    match args.command {
        None => demo(&args.lock_url, job, args.payments, args.accounts).await,
        Some(Command::Fleet {
            brokers,
            topic,
            output_topic,
            instance_id,
            state_dir,
            checkpoint_dir,
        }) => {
            let kafka = KafkaSettings::new(&brokers);
            let partitions = {
                let (kafka, topic) = (kafka.clone(), topic.clone());
                tokio::task::spawn_blocking(move || {
                    processor::source::partition_count(&kafka, &topic)
                })
                .await??
            };
            let mut services = Services::connect(&args.lock_url, checkpoint_dir)
                .await
                .context("lock backend")?;
            services.operator = Arc::new(JobOperator::new(job));
            services.stores = Arc::new(RocksDbStores::new(64 << 20, 32 << 20));
            let mut config =
                InstanceConfig::new(&instance_id, &topic, partitions, &brokers, state_dir)
                    .with_group("fraud-counters");
            if let Some(output) = &output_topic {
                config = config.with_output_topic(output);
            }
            let instance = Instance::new(config, services)?;
            let stop = CancellationToken::new();
            let signal = stop.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                signal.cancel();
            });
            instance.run(stop).await?;
            Ok(())
        }
    }
}

async fn demo(
    lock_url: &str,
    job: FraudCounters,
    payments: u64,
    accounts: u64,
) -> anyhow::Result<()> {
    let demo = PaymentsDemo {
        job,
        payments,
        accounts,
    };
    let mut config = DemoConfig::default();
    config.lock_url = lock_url.to_owned();
    config.topic = "payments".to_owned();
    config.job = Some(Arc::new(demo) as Arc<dyn DemoJob>);
    println!(
        "fraud counters: {payments} payments over {accounts} accounts, 3 instances (one killed, one joining), locks: {lock_url}"
    );
    let report = run_demo(config, &mut Quiet).await?;
    let alerts: u32 = demo.expected_accounts().values().map(|a| a.alerts).sum();
    println!(
        "{} accounts, {alerts} alerts raised; {} of {} accounts match the recomputation; {:.0} payments/s",
        report.expected_keys,
        report.matching_keys,
        report.expected_keys,
        report.throughput()
    );
    if !report.exact() {
        bail!(
            "state differs from the recomputation: {:?}",
            report.mismatches
        );
    }
    println!("exact: every account's state is what the input says, through a kill and a join");
    Ok(())
}
