//! The `processor` binary: run a fleet instance, host a development broker, produce a deterministic
//! workload, and inspect checkpointed state. Flags can also come from environment variables.
//!
//! ```text
//! processor demo                                              # the whole fleet, nothing to install
//! processor demo --lock-url redis://127.0.0.1:6379            # the same on a real Redis
//! processor dev-broker --topic orders --partitions 8          # prints the bootstrap address first
//! processor produce --brokers HOST:PORT --topic orders --partitions 8 --records 100000 --keys 500 --seed 1
//! processor run --brokers HOST:PORT --topic orders --partitions 8 --state-dir /var/lib/p1 \
//!     --checkpoint-dir /shared/checkpoints --lock-url redis://127.0.0.1:6379 --instance-id p1
//! processor state offsets --checkpoint-dir /shared/checkpoints --topic orders
//! processor state dump --checkpoint-dir /shared/checkpoints --topic orders
//! processor run --config /etc/processor.toml --http 127.0.0.1:9090   # metrics, health, dashboard
//! processor config check --config /etc/processor.toml                 # the resolved settings
//! ```
//!
//! Every `run` setting comes, in this order of precedence, from its flag, its environment variable, the
//! TOML file of `--config` (keys are the flag names: `claim-ttl-secs = 5` or `claim_ttl_secs = 5`), or
//! its default.

// A command-line tool: its output is stdout.
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Duration;

mod args;
mod console;
mod settings;
mod telemetry;

use anyhow::{Context, bail};
use processor::checkpoint::{CheckpointLocation, CheckpointStore};
use processor::dev::demo::{DemoConfig, run_demo};
use processor::dev::{DevBroker, Workload};
use processor::http::{HttpAccess, LocalInstances, MetricsRender};
use processor::inspect::{checkpoint_offsets, checkpointed_aggregates};
use processor::operator::OutputMode;
use processor::store::rocksdb::RocksDbStores;
use processor::{Instance, InstanceConfig, KafkaSettings, MaintenanceConfig, Services};
use tokio_util::sync::CancellationToken;

use crate::args::{Command, ConfigCommand, DemoArgs, LogFormat, RunArgs, StateCommand};
use crate::console::Console;

fn positive_secs(flag: &str, secs: f64) -> anyhow::Result<Duration> {
    if secs > 0.0 && secs.is_finite() && secs < 1e9 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        bail!("{flag} must be a positive number of seconds")
    }
}

/// The instance configuration from the flags, for instance `instance_id`; the flags' own ranges are
/// checked here, the rest by [`InstanceConfig::validate`].
fn instance_config(args: &RunArgs, instance_id: &str) -> anyhow::Result<InstanceConfig> {
    let checkpoint_every =
        positive_secs("--checkpoint-interval-secs", args.checkpoint_interval_secs)?;
    let maintenance_every = positive_secs(
        "--maintenance-interval-secs",
        args.maintenance_interval_secs,
    )?;
    let claim_ttl = positive_secs("--claim-ttl-secs", args.claim_ttl_secs)?;
    let rejected_record_pause = positive_secs(
        "--rejected-record-pause-secs",
        args.rejected_record_pause_secs,
    )?;
    let topology_refresh = positive_secs("--topology-refresh-secs", args.topology_refresh_secs)?;
    let mut config = InstanceConfig::new(
        instance_id,
        &args.topic,
        args.partitions.unwrap_or(1),
        &args.brokers,
        args.state_dir.clone(),
    )
    .with_group(&args.group)
    .with_topology_refresh(Some(topology_refresh))
    .with_checkpoint_every(checkpoint_every)
    .with_maintenance(
        MaintenanceConfig::default()
            .with_every(maintenance_every)
            .with_keep_checkpoints(args.keep_checkpoints),
    )
    .with_claim_ttl(claim_ttl)
    .with_max_members(args.max_members);
    let stall_timeout = if args.stall_timeout_secs == 0.0 {
        None
    } else {
        Some(positive_secs(
            "--stall-timeout-secs",
            args.stall_timeout_secs,
        )?)
    };
    config = config.with_stall_timeout(stall_timeout);
    if let Some(secs) = args.shutdown_timeout_secs {
        config = config.with_shutdown_timeout(positive_secs("--shutdown-timeout-secs", secs)?);
    }
    match args.parallelism {
        Some(0) => bail!("--parallelism must be at least 1"),
        Some(n) => config = config.with_parallelism(n),
        None => {}
    }
    config = config.with_output_guarantee(args.output_guarantee);
    if let Some(topic) = &args.output_topic {
        config = config.with_output_topic(topic);
    }
    if let Some(topic) = &args.dead_letter_topic {
        config = config.with_dead_letter_topic(topic);
    }
    if args.commit_records == 0 || args.commit_interval_ms == 0 {
        bail!("--commit-records and --commit-interval-ms must be at least 1");
    }
    let output_mode = if args.latest_output_per_key {
        OutputMode::LatestPerKey
    } else {
        OutputMode::PerRecord
    };
    config = config
        .with_commits(
            args.commit_records,
            Duration::from_millis(args.commit_interval_ms),
        )
        .with_state_cache_bytes(crate::args::mib_to_bytes(args.state_cache_mb))
        .with_standby_replicas(args.standby_replicas)
        .with_rejected_record_pause(rejected_record_pause)
        .with_output_mode(output_mode)
        .with_kafka(kafka_settings(args)?)
        .with_on_missing_offsets(args.on_missing_offsets)
        .with_restore_older_checkpoint(args.restore_older_checkpoint);
    config.validate()?;
    Ok(config)
}

/// `--brokers`, then the properties of `--kafka-config-file`, then every `--kafka-config`.
fn kafka_settings(args: &RunArgs) -> anyhow::Result<KafkaSettings> {
    let mut kafka = KafkaSettings::new(&args.brokers);
    if let Some(file) = &args.kafka_config_file {
        kafka = kafka.with_file(file)?;
    }
    Ok(kafka.with_pairs(args.kafka_config.iter().map(String::as_str))?)
}

/// The lock URL `run` coordinates through. A forgotten `LOCK_URL` must not make every process own
/// every partition: in-process locks only for an instance that says it is alone.
fn fleet_lock_url(args: &RunArgs) -> anyhow::Result<&str> {
    match (args.lock_url.as_deref(), args.single_instance) {
        (None, true) => Ok("memory"),
        (Some("memory"), true) => Ok("memory"),
        (Some("memory"), false) => bail!(
            "--lock-url memory coordinates nothing between processes: pass --single-instance if this is the only instance, or a shared lock backend (redis://, redlock://, postgres://)"
        ),
        (Some(url), false) => Ok(url),
        (Some(_), true) => bail!(
            "--single-instance runs on in-process locks: drop --lock-url, or drop --single-instance to join a fleet"
        ),
        (None, false) => bail!(
            "--lock-url (or LOCK_URL) is required: the fleet's instances must share a lock backend (redis://, redlock://, postgres://); pass --single-instance to run alone"
        ),
    }
}

/// The instance id: `--instance-id`, or a fresh time-ordered UUID (v7).
fn resolved_instance_id(args: &RunArgs) -> String {
    args.instance_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

async fn run(args: RunArgs, metrics: Option<MetricsRender>) -> anyhow::Result<()> {
    // Listening for SIGTERM first: a signal during the start (connecting to the brokers and the lock
    // backend can take seconds) stops the process cleanly instead of killing it mid-way.
    let stop = stop_on_signals()?;
    let starting = start_instance(args, metrics, stop.clone());
    let (instance, _server) = tokio::select! {
        biased;
        () = stop.cancelled() => {
            tracing::info!("stopped while starting");
            return Ok(());
        }
        started = starting => started?,
    };
    instance.run(stop).await?;
    Ok(())
}

/// A token cancelled by SIGTERM or Ctrl-C (the handlers are installed before this returns).
fn stop_on_signals() -> anyhow::Result<CancellationToken> {
    let stop = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install the SIGTERM handler")?;
    let signals = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        signals.cancel();
    });
    Ok(stop)
}

/// Everything `run` does before the instance runs: configuration, the HTTP endpoint, the brokers' and
/// the lock backend's first answers. Returns the instance and its HTTP server's task.
async fn start_instance(
    args: RunArgs,
    metrics: Option<MetricsRender>,
    stop: CancellationToken,
) -> anyhow::Result<(Arc<Instance>, Option<tokio::task::JoinHandle<()>>)> {
    let lock_url = fleet_lock_url(&args)?.to_owned();
    let instance_id = resolved_instance_id(&args);
    if args.instance_id.is_none() {
        println!("instance id: {instance_id}");
    }
    let mut config = instance_config(&args, &instance_id)?;
    let access = http_access(&args)?;
    let http = match args.http {
        Some(addr) => {
            let listener = processor::http::bind(addr).await?;
            let bound = listener.local_addr()?;
            let base = args
                .http_advertise
                .clone()
                .unwrap_or_else(|| format!("http://{bound}"));
            println!("http: {base}/ (dashboard), {base}/metrics, {base}/ready");
            config = config.with_status_url(&processor::http::status_url(&base, &instance_id));
            config.validate()?;
            Some(listener)
        }
        None => None,
    };
    if let Some(dir) = &args.checkpoints.checkpoint_dir
        && !dir.is_dir()
        && !args.create_checkpoint_dir
    {
        bail!(
            "checkpoint dir {} does not exist: mount it (a missing mount must not look like an empty store), or pass --create-checkpoint-dir for a new fleet",
            dir.display()
        );
    }
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("state dir {} is not writable", args.state_dir.display()))?;
    // Fail fast, with one line, when the broker or topic is not there (with the instance's client
    // settings: a bad property or a refused login shows here). The partition count is the brokers'.
    // (On a blocking thread: a SIGTERM meanwhile is heard.)
    let (kafka, topic) = (config.kafka.clone(), args.topic.clone());
    let counted =
        tokio::task::spawn_blocking(move || processor::source::partition_count(&kafka, &topic))
            .await
            .context("read the topic's partition count")?;
    config.partitions = match counted {
        Ok(count) => count,
        Err(
            err @ (processor::ProcessorError::InvalidInput { .. }
            | processor::ProcessorError::BrokersRefused { .. }),
        ) => return Err(err.into()),
        Err(err) => {
            return Err(anyhow::Error::from(err)
                .context(format!("broker {} is not reachable", args.brokers)));
        }
    };
    if let Some(flag) = args.partitions
        && flag != config.partitions
    {
        bail!(
            "topic {} has {} partitions on the brokers, --partitions says {flag}: drop the flag or fix it",
            args.topic,
            config.partitions
        );
    }
    // Each fleet (group) has checkpoints of its own under the shared directory or prefix.
    let checkpoints =
        open_checkpoints(&args.checkpoints.location(&args.group)?, &args.topic).await?;
    let mut services = Services::connect_with(&lock_url, checkpoints)
        .await
        .context("lock backend")?; // its errors name the server, password redacted
    services.stores = Arc::new(
        RocksDbStores::new(
            crate::args::mib_to_bytes(args.block_cache_mb),
            crate::args::mib_to_bytes(args.write_buffer_mb),
        )
        .with_commit_coalescing(crate::args::mib_to_bytes(args.commit_coalescing_mb)),
    );
    let instance = Instance::new(config, services)?;
    let server = http.map(|listener| {
        let instances = Arc::new(LocalInstances::default());
        instances.add(Arc::clone(&instance));
        serve_in_background(listener, instances, metrics, access, stop)
    });
    Ok((instance, server))
}

/// Writes one line to stdout; a closed pipe (`| head`) ends the output quietly.
fn emit(out: &mut impl std::io::Write, line: serde_json::Value) -> anyhow::Result<bool> {
    match writeln!(out, "{line}") {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(err) => Err(err.into()),
    }
}

/// The stores `state dump` restores checkpoints into: RocksDB, as `run` writes them.
fn inspection_stores() -> RocksDbStores {
    RocksDbStores::new(32 << 20, 16 << 20)
}

/// Opens the checkpoint store at `location` and reads it once (the topic's partitions), so a wrong
/// bucket, refused credentials or an unreachable service fail the start with one line.
async fn open_checkpoints(
    location: &CheckpointLocation,
    topic: &str,
) -> anyhow::Result<Arc<dyn CheckpointStore>> {
    let (location, topic) = (location.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let store = location
            .open()
            .with_context(|| format!("checkpoint store {location}"))?;
        store
            .partitions(&topic)
            .with_context(|| format!("checkpoint store {location} cannot be read"))?;
        Ok(store)
    })
    .await
    .context("open the checkpoint store")?
}

fn dump(location: CheckpointLocation, topic: &str, offsets_only: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let store = location
        .open()
        .with_context(|| format!("checkpoint store {location}"))?;
    let store = &*store;
    if offsets_only {
        for checkpoint in checkpoint_offsets(store, topic)? {
            for err in &checkpoint.skipped {
                eprintln!(
                    "skipped a corrupt checkpoint of partition {}: {err}",
                    checkpoint.partition
                );
            }
            let line = serde_json::json!({"partition": checkpoint.partition,
                                          "offset": checkpoint.next_offset,
                                          "fencing_token": checkpoint.fencing_token});
            if !emit(&mut out, line)? {
                return Ok(());
            }
        }
        return Ok(());
    }
    let (merged, skipped) = checkpointed_aggregates(store, &inspection_stores(), topic)?;
    for err in skipped {
        eprintln!("skipped a corrupt checkpoint: {err}");
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

/// Who may use the HTTP endpoint: `--http-token` (or its file) and `--http-allowed-host`.
pub(crate) fn http_access(args: &RunArgs) -> anyhow::Result<HttpAccess> {
    let mut access = HttpAccess::default();
    let token = match &args.http_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--http-token-file {}", path.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        ),
        None => args.http_token.clone(),
    };
    if let Some(token) = token {
        access = access.with_token(&token)?;
    }
    if let Some(ca) = &args.http_ca_file {
        access = access.with_forwarding_ca(ca)?;
    }
    Ok(access.with_allowed_hosts(args.http_allowed_hosts.iter().map(String::as_str))?)
}

/// Serves the operations endpoint until `stop` (a failure is logged: the instance keeps running).
fn serve_in_background(
    listener: tokio::net::TcpListener,
    instances: Arc<LocalInstances>,
    metrics: Option<MetricsRender>,
    access: HttpAccess,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let router = processor::http::router(instances, metrics, access);
    tokio::spawn(async move {
        if let Err(err) = processor::http::serve(listener, router, stop).await {
            tracing::error!(error = %err, "the HTTP endpoint stopped");
        }
    })
}

async fn demo(args: DemoArgs, metrics: Option<MetricsRender>) -> anyhow::Result<()> {
    let mut config = DemoConfig::default();
    let stop_http = CancellationToken::new();
    let server = match args.http {
        Some(addr) => {
            let listener = processor::http::bind(addr).await?;
            let base = format!("http://{}", listener.local_addr()?);
            println!("dashboard: {base}/   (metrics: {base}/metrics)");
            let instances = Arc::new(LocalInstances::default());
            config.status_board = Some(Arc::clone(&instances));
            config.status_base_url = Some(base);
            Some(serve_in_background(
                listener,
                instances,
                metrics,
                HttpAccess::default(),
                stop_http.clone(),
            ))
        }
        None => None,
    };
    let outcome = run_demo_and_report(config, args).await;
    if let Some(server) = server {
        stop_http.cancel();
        let _ = server.await;
    }
    outcome
}

async fn run_demo_and_report(mut config: DemoConfig, args: DemoArgs) -> anyhow::Result<()> {
    config.lock_url = args.lock_url;
    config.records = args.records;
    config.keys = args.keys;
    config.partitions = args.partitions;
    config.instances = args.instances;
    config.seed = args.seed;
    config.work_dir = args.work_dir;
    config.checkpoint_url = args.checkpoint_url;
    config.brokers = args.brokers;
    config.replication = args.replication_factor;
    let (records, keys) = (config.records, config.keys);
    let mut console = Console::new(records, !args.no_progress);
    let report = run_demo(config, &mut console).await?;
    if args.linger_secs > 0.0 {
        tokio::time::sleep(positive_secs("--linger-secs", args.linger_secs)?).await;
    }
    println!();
    println!("instances at the end:");
    for (id, s) in &report.instances {
        println!(
            "  {id}: applied {:>7}  checkpoints {:>3}  restores {:>2}  task claims {:>3}  compactions {:>3}",
            s.processed, s.checkpoints, s.restores, s.task_claims, s.compactions
        );
    }
    println!("leaders, in order: {}", report.leaders.join(" -> "));
    println!(
        "throughput: {records} records in {:.1} s = {:.0} records/s for the fleet (records applied by the instances, counted at checkpoints: {})",
        report.processing_time.as_secs_f64(),
        report.throughput(),
        report.applied_with_replays
    );
    if report.exact() {
        println!(
            "verdict: EXACT - all {} keys ({records} records over {keys} keys) equal the recomputation (count, sum, min, max, order-sensitive chain)",
            report.expected_keys
        );
        Ok(())
    } else {
        println!(
            "verdict: WRONG - {} of {} keys differ: {:?}",
            report.mismatches.len(),
            report.expected_keys,
            report.mismatches.iter().take(10).collect::<Vec<_>>()
        );
        bail!("the fleet's state differs from the recomputation")
    }
}

async fn dev_broker(topic: &str, partitions: i32, also_create: &[String]) -> anyhow::Result<()> {
    let broker = DevBroker::start(topic, partitions)?;
    for extra in also_create {
        broker.create_topic(extra, 1)?;
    }
    println!("{}", broker.bootstrap_servers());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(broker);
    Ok(())
}

/// Logs to stderr as text or JSON lines, filtered by `RUST_LOG` (default `default_level`).
fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

/// How long the runtime waits at exit for blocking threads: a Kafka call abandoned past its bound may
/// never return, and must not keep the process alive (its claims are released or lapse already).
const EXIT_GRACE: Duration = Duration::from_secs(2);

fn main() {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("processor: cannot start the async runtime: {err}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(run_command());
    runtime.shutdown_timeout(EXIT_GRACE);
    std::process::exit(code);
}

/// Runs the command line's command; the process exit status.
async fn run_command() -> i32 {
    let cli = match settings::parse_cli() {
        Ok(cli) => cli,
        Err(err) => {
            eprintln!("processor: {err:#}");
            return 2;
        }
    };
    // The demo draws progress bars: only warnings interrupt them unless RUST_LOG says otherwise.
    let default_level = if matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info"
    };
    init_logging(cli.log_format, default_level);
    let serves_http = match &cli.command {
        Command::Demo(args) => args.http.is_some(),
        Command::Run(args) => args.http.is_some(),
        _ => false,
    };
    let metrics = if serves_http {
        match telemetry::install_prometheus() {
            Ok(render) => Some(render),
            Err(err) => {
                eprintln!("processor: {err:#}");
                return 1;
            }
        }
    } else {
        None
    };
    let outcome = match cli.command {
        Command::Demo(args) => demo(args, metrics).await,
        Command::Run(args) => run(*args, metrics).await,
        Command::Config {
            command: ConfigCommand::Check(args),
        } => settings::check(&args),
        Command::DevBroker {
            topic,
            partitions,
            also_create,
        } => dev_broker(&topic, partitions, &also_create).await,
        Command::Produce {
            brokers,
            topic,
            partitions,
            records,
            keys,
            seed,
            start_at,
        } => {
            let workload = Workload {
                records,
                keys,
                seed,
                partitions,
            };
            if start_at > records {
                eprintln!("processor: --start-at must not exceed --records");
                return 2;
            }
            workload
                .produce_range(&brokers, &topic, start_at..records)
                .await
                .map_err(anyhow::Error::from)
        }
        Command::State {
            command:
                StateCommand::Offsets {
                    checkpoints,
                    topic,
                    group,
                },
        } => checkpoints
            .location(&group)
            .and_then(|location| dump(location, &topic, true)),
        Command::State {
            command:
                StateCommand::Dump {
                    checkpoints,
                    topic,
                    group,
                },
        } => checkpoints
            .location(&group)
            .and_then(|location| dump(location, &topic, false)),
    };
    if let Err(err) = outcome {
        eprintln!("processor: {err:#}");
        return 1;
    }
    0
}
