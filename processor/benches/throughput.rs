//! The processor beside a raw consume loop and beside Kafka Streams, on the same broker with the same
//! input, in one run; and the checkpoint pause and upload at two state sizes.
//!
//! Each row is a separate process (this binary run again with `--child`, or the Kafka Streams peer in
//! `benches/kafka-streams`, a JVM), so its CPU time and peak RSS are its own:
//! - **raw**: one rdkafka `StreamConsumer` per partition, draining its queue and counting — the floor;
//! - **ours, outputs off / at-least-once / exactly-once**: a single-instance fleet (in-process locks,
//!   RocksDB, the built-in keyed aggregation, latest output per key per commit, the default commits:
//!   every 100 ms or 100 000 records); and outputs off committing every second (on the real broker);
//! - **Kafka Streams 4.4, at_least_once / exactly_once_v2**: the same aggregation (count/sum/min/max/
//!   chain per key) with its default RocksDB store and record cache, 2 stream threads, commits every
//!   100 ms, `-Xmx512m`.
//!
//! Per row: the bench produces the input, then starts the process, which reports every 10 ms how many
//! records it has done, on its own clock, with its own CPU time (a process saturating both cores can
//! starve the bench's reader, so it stamps its reports itself); records/s and CPU per record come from
//! the reports at 10 % and 90 % of the input (start-up and the last commit excluded). The rows without
//! outputs share one input and take turns over it, round after round (7; `BENCH_REPEATS=N`): each shows
//! its median run, and each ratio to the raw loop its rounds' ratios too. Then, for rows with outputs,
//! a latency phase produces distinct keys at a steady rate and times each from its send to its output
//! becoming visible to a `read_committed` consumer (end to end). Peak RSS is the process's `VmHWM`.
//!
//! ```text
//! cargo bench -p fenced-processor --bench throughput                 # 1 M records, 100 k keys, 8 partitions; 100 k vs 2 M keys
//! cargo bench -p fenced-processor --bench throughput -- --quick      # small counts, every row (under 2 minutes)
//! cargo bench -p fenced-processor --bench throughput -- --only mock  # rows on the mock cluster only (also: real, checkpoints)
//! cargo test  -p fenced-processor --bench throughput                 # a smoke run: every row, tiny counts (the test command's)
//! ```
//!
//! For profiling one row: `BENCH_ROWS=TEXT` runs only rows whose label contains TEXT (`A|B`: either),
//! `BENCH_RECORDS=N`
//! changes the input size (the mock cluster keeps about 5 MiB per partition: beyond ~1 M records its
//! log start moves and the processor refuses the missing offsets, as it should), `BENCH_COMMIT_MS=MS`
//! commits our rows every MS instead of every 100 ms or 100 000 records (`BENCH_COMMIT_RECORDS=N` also
//! bounds a commit to N records; unbounded otherwise), `BENCH_KAFKA="key=value;key=value"` gives the raw
//! loop's and our consumers the same librdkafka properties (`fetch.queue.backoff.ms=1000` brings back
//! librdkafka's default pause after a full prefetch queue, say).

// Benchmark code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use processor::ProcessorResult;
use processor::aggregation::{Aggregate, KeyedAggregation};
use processor::dev::{DevBroker, admin};
use processor::operator::{Emitter, Operator, Outcome, OutputMode, Record};
use processor::source::partition_count;
use processor::store::rocksdb::RocksDbStores;
use processor::store::{PartitionState, PartitionStore};
use processor::{InstanceConfig, KafkaSettings, OutputGuarantee, Services};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 8;

/// Our row without outputs, committing every second instead of every 100 ms: each commit writes every
/// key changed since the last one, so how often a partition commits decides much of its cost.
const OFF_COMMITS_EVERY_SECOND: &str = "off, commits every 1 s";

#[derive(Debug, Clone, Copy)]
struct Sizes {
    records: u64,
    keys: u64,
    latency_records: u64,
    latency_rate: u64,
    small_state: u64,
    large_state: u64,
    /// Rounds of the rows without outputs over their shared input, each row's median run reported:
    /// at 3–4 M records/s the measured 80 % of 1 M records lasts a quarter of a second, and one run
    /// alone is noisy (±15 %).
    repeats: usize,
}

fn sizes(quick: bool, smoke: bool) -> Sizes {
    let mut sizes = if smoke {
        smoke_sizes()
    } else {
        default_sizes(quick)
    };
    if let Some(records) = env_number("BENCH_RECORDS") {
        sizes.records = records;
    }
    if let Some(repeats) = env_number("BENCH_REPEATS") {
        sizes.repeats = usize::try_from(repeats).unwrap_or(1);
    }
    sizes
}

/// The test command's smoke run: every row, a few thousand records.
fn smoke_sizes() -> Sizes {
    Sizes {
        records: 10_000,
        keys: 1_000,
        latency_records: 200,
        latency_rate: 1_000,
        small_state: 2_000,
        large_state: 20_000,
        repeats: 1,
    }
}

fn default_sizes(quick: bool) -> Sizes {
    if quick {
        Sizes {
            records: 50_000,
            keys: 5_000,
            latency_records: 1_000,
            latency_rate: 1_000,
            small_state: 10_000,
            large_state: 200_000,
            repeats: 1,
        }
    } else {
        Sizes {
            records: 1_000_000,
            keys: 100_000,
            latency_records: 10_000,
            latency_rate: 2_000,
            small_state: 100_000,
            large_state: 2_000_000,
            repeats: 7,
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        child(&args[2..]);
        return;
    }
    // `cargo test` runs a bench without `--bench`: a smoke run (tiny counts, every row), to show
    // the bench still works, not to measure.
    let smoke = !args.iter().any(|a| a == "--bench");
    let quick = smoke || args.iter().any(|a| a == "--quick");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|at| args.get(at + 1).cloned());
    let wants = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let sizes = sizes(quick, smoke);
    println!(
        "processor throughput: {} records, {} keys, {PARTITIONS} partitions{}; {} cores",
        sizes.records,
        sizes.keys,
        if quick { " (quick)" } else { "" },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    if wants("mock") {
        let broker = DevBroker::start("warm-up", 1).unwrap();
        let rows = runtime.block_on(mock_rows(&broker, sizes));
        print_table(
            "librdkafka mock cluster (in the bench process)",
            &rows,
            sizes,
        );
    }
    if wants("real") {
        let cluster = integration_tests::KafkaCluster::single();
        let rows = runtime.block_on(real_rows(&cluster.bootstrap_servers(), sizes));
        print_table(
            "Apache Kafka 4.4, one broker (a separate JVM)",
            &rows,
            sizes,
        );
    }
    if wants("checkpoints") {
        checkpoint_rows(sizes);
    }
}

// ---------------------------------------------------------------------------------------------------
// Rows

#[derive(Debug, Clone)]
struct Row {
    label: String,
    records_per_s: f64,
    cpu_s_per_million: f64,
    peak_rss_mb: f64,
    latency_ms: Option<(f64, f64, u64)>,
    /// Records/s of each round, in order (rows run side by side over several rounds; else empty).
    rounds: Vec<f64>,
}

/// How a row's process is started.
enum Peer {
    Raw,
    Ours(&'static str),
    KafkaStreams(&'static str),
}

impl Peer {
    fn label(&self) -> String {
        match self {
            Peer::Raw => "raw rdkafka consume loop (a consumer per partition)".to_owned(),
            Peer::Ours(mode) => format!("ours, outputs {mode}"),
            Peer::KafkaStreams(guarantee) => format!("Kafka Streams 4.4, {guarantee}"),
        }
    }
}

/// `BENCH_ROWS=text` runs only the rows whose label contains `text` (to profile one row);
/// `BENCH_ROWS=a|b` the rows containing either.
fn row_wanted(peer: &Peer) -> bool {
    let label = peer.label();
    std::env::var("BENCH_ROWS").map_or(true, |wanted| {
        wanted.split('|').any(|part| label.contains(part))
    })
}

async fn mock_rows(broker: &DevBroker, sizes: Sizes) -> Vec<Row> {
    let peers: Vec<Peer> = [Peer::Raw, Peer::Ours("off")]
        .into_iter()
        .filter(row_wanted)
        .collect();
    broker.create_topic("mock-in", PARTITIONS).unwrap();
    run_side_by_side(&peers, &broker.bootstrap_servers(), "mock-in", sizes).await
}

async fn real_rows(brokers: &str, sizes: Sizes) -> Vec<Row> {
    let streams = kafka_streams_app();
    // The rows without outputs take turns over one input: a drift of the machine (the broker's JIT, the
    // page cache, another process) reaches each of them alike.
    let side_by_side: Vec<Peer> = [
        Peer::Raw,
        Peer::Ours("off"),
        Peer::Ours(OFF_COMMITS_EVERY_SECOND),
    ]
    .into_iter()
    .filter(row_wanted)
    .collect();
    admin::create_topic(brokers, "in-plain", PARTITIONS, 1, &[])
        .await
        .unwrap();
    let mut rows = run_side_by_side(&side_by_side, brokers, "in-plain", sizes).await;
    let with_outputs = [
        Peer::Ours("at-least-once"),
        Peer::Ours("exactly-once"),
        Peer::KafkaStreams("at_least_once"),
        Peer::KafkaStreams("exactly_once_v2"),
    ];
    for (i, peer) in with_outputs.into_iter().enumerate() {
        if !row_wanted(&peer) {
            continue;
        }
        if matches!(peer, Peer::KafkaStreams(_)) && streams.is_none() {
            eprintln!("{}: skipped (no java or mvn)", peer.label());
            continue;
        }
        let (input, output) = (format!("in-{i}"), format!("out-{i}"));
        for topic in [&input, &output] {
            admin::create_topic(brokers, topic, PARTITIONS, 1, &[])
                .await
                .unwrap();
        }
        produce(brokers, &input, sizes.records, sizes.keys).await;
        rows.push(run_once(&peer, brokers, &input, Some(&output), sizes).await);
    }
    rows
}

/// A row's process, its stdout lines and its stdin (closing it lets the process exit).
struct Running {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    stdin: Option<ChildStdin>,
    _state: tempfile::TempDir,
}

impl Running {
    fn start(peer: &Peer, brokers: &str, input: &str, output: Option<&str>) -> Self {
        let state = tempfile::tempdir().unwrap();
        let mut command = match peer {
            Peer::Raw | Peer::Ours(_) => {
                let mut command = Command::new(std::env::current_exe().unwrap());
                let mode = match peer {
                    Peer::Ours(mode) => *mode,
                    _ => "raw",
                };
                command.args(["--child", mode, brokers, input]);
                command.arg(output.unwrap_or("-")).arg(state.path());
                command
            }
            Peer::KafkaStreams(guarantee) => {
                let (libs, classes, log4j2) = kafka_streams_app().unwrap();
                let mut command = Command::new("java");
                command
                    .args(["-Xms512m", "-Xmx512m", "-XX:+UseG1GC"])
                    .arg(format!("-Dlog4j2.configurationFile={}", log4j2.display()))
                    .arg("-cp")
                    .arg(format!("{}:{}/*", classes.display(), libs.display()))
                    .arg("bench.KeyedAggregation")
                    .args([brokers, input, output.unwrap_or("-"), guarantee])
                    .arg(state.path())
                    .args([&format!("bench-{input}"), "2"]);
                command
            }
        };
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Running {
            child,
            lines,
            stdin,
            _state: state,
        }
    }

    /// Waits until the process reports at least `records` records done; returns its own clock and CPU
    /// time (seconds) at that report (`AT n NANOS CPU_NANOS` lines: a process saturating both cores
    /// can starve the bench's reader, so the process stamps its reports itself).
    fn wait_until(&mut self, records: u64, within: Duration) -> (u64, f64, f64) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let fields: Vec<u64> = line
                        .strip_prefix("AT ")
                        .map(|rest| rest.split(' ').filter_map(|f| f.parse().ok()).collect())
                        .unwrap_or_default();
                    if let [done, nanos, cpu_nanos] = fields[..]
                        && done >= records
                    {
                        return (done, nanos as f64 / 1e9, cpu_nanos as f64 / 1e9);
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("the row's process did not reach {records} records within {within:?}");
                }
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn finish(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Rows without outputs over one input, produced once: `sizes.repeats` rounds, each running every
/// peer once in turn; each row is its median run, with every round's rate kept (for same-round ratios).
async fn run_side_by_side(peers: &[Peer], brokers: &str, input: &str, sizes: Sizes) -> Vec<Row> {
    if peers.is_empty() {
        return Vec::new();
    }
    produce(brokers, input, sizes.records, sizes.keys).await;
    let mut runs: Vec<Vec<Row>> = peers.iter().map(|_| Vec::new()).collect();
    for _ in 0..sizes.repeats.max(1) {
        for (peer, runs) in peers.iter().zip(&mut runs) {
            runs.push(run_once(peer, brokers, input, None, sizes).await);
        }
    }
    runs.into_iter()
        .map(|runs| {
            let rounds: Vec<f64> = runs.iter().map(|run| run.records_per_s).collect();
            let mut sorted = runs;
            sorted.sort_by(|a, b| a.records_per_s.total_cmp(&b.records_per_s));
            let median = sorted.swap_remove(sorted.len() / 2);
            Row { rounds, ..median }
        })
        .collect()
}

/// One run of a row's process over the input already produced.
async fn run_once(
    peer: &Peer,
    brokers: &str,
    input: &str,
    output: Option<&str>,
    sizes: Sizes,
) -> Row {
    let n = sizes.records;
    let mut running = Running::start(peer, brokers, input, output);
    let pid = running.pid();
    // Steady state only: from 10% of the input to 90% (start-up and the last commit excluded).
    let (first, started, cpu_before) = running.wait_until(n / 10, Duration::from_secs(300));
    let (last, ended, cpu_after) =
        running.wait_until((n * 9 / 10).max(first + 1), Duration::from_secs(600));
    let (elapsed, cpu) = (ended - started, cpu_after - cpu_before);
    running.wait_until(n, Duration::from_secs(120));
    let latency_ms = match output {
        Some(output) => Some(latency_phase(brokers, input, output, sizes).await),
        None => None,
    };
    let peak_rss_mb = peak_rss_mb(pid);
    running.finish();
    #[allow(clippy::cast_precision_loss)]
    let measured = (last - first) as f64;
    Row {
        label: peer.label(),
        records_per_s: measured / elapsed,
        cpu_s_per_million: cpu / measured * 1e6,
        peak_rss_mb,
        latency_ms,
        rounds: Vec::new(),
    }
}

fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("enable.idempotence", "true")
        .create()
        .unwrap()
}

/// Produces `records` records (`k{i % keys}`, a decimal amount) as fast as the producer takes them.
async fn produce(brokers: &str, topic: &str, records: u64, keys: u64) {
    let producer = producer(brokers);
    let mut pending = VecDeque::new();
    for i in 0..records {
        let key = format!("k{}", i % keys);
        let amount = ((i * 7_919) % 2_001) as i64 - 1_000;
        let value = amount.to_string();
        loop {
            match producer.send_result(FutureRecord::to(topic).key(&key).payload(&value)) {
                Ok(delivery) => {
                    pending.push_back(delivery);
                    break;
                }
                Err((_, _)) => {
                    // Queue full: wait for the oldest deliveries.
                    for _ in 0..10_000 {
                        match pending.pop_front() {
                            Some(delivery) => {
                                delivery.await.unwrap().unwrap();
                            }
                            None => break,
                        }
                    }
                }
            }
        }
        if pending.len() >= 200_000 {
            for _ in 0..100_000 {
                pending.pop_front().unwrap().await.unwrap().unwrap();
            }
        }
    }
    for delivery in pending {
        delivery.await.unwrap().unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Produces distinct keys `lat-{i}` at a steady rate and times each to its visible output: p50, p99
/// and how many never showed within 30 s.
async fn latency_phase(brokers: &str, input: &str, output: &str, sizes: Sizes) -> (f64, f64, u64) {
    let n = sizes.latency_records as usize;
    let origin = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let seen: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let (ready, positioned) = std::sync::mpsc::channel();
    let reader = {
        let (brokers, output, seen) = (brokers.to_owned(), output.to_owned(), seen.clone());
        std::thread::spawn(move || read_latencies(&brokers, &output, &seen, origin, n, ready))
    };
    let _ = positioned.recv_timeout(Duration::from_secs(30));
    let producer = producer(brokers);
    let every = Duration::from_secs_f64(1.0 / sizes.latency_rate as f64);
    let mut next = tokio::time::Instant::now();
    for (i, slot) in sent.iter().enumerate() {
        tokio::time::sleep_until(next).await;
        next += every;
        let key = format!("lat-{i}");
        slot.store(origin.elapsed().as_nanos() as u64, Ordering::SeqCst);
        let _ = producer.send_result(FutureRecord::to(input).key(&key).payload("1"));
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    reader.join().unwrap();
    let mut latencies: Vec<f64> = sent
        .iter()
        .zip(seen.iter())
        .filter_map(|(sent, seen)| {
            let (sent, seen) = (sent.load(Ordering::SeqCst), seen.load(Ordering::SeqCst));
            (seen > 0).then(|| (seen.saturating_sub(sent)) as f64 / 1e6)
        })
        .collect();
    let missing = (n - latencies.len()) as u64;
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    (at(0.5), at(0.99), missing)
}

fn read_latencies(
    brokers: &str,
    output: &str,
    seen: &[AtomicU64],
    origin: Instant,
    expected: usize,
    ready: std::sync::mpsc::Sender<()>,
) {
    use rdkafka::Message;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "latency-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let partitions = partition_count(&KafkaSettings::new(brokers), output).unwrap();
    let mut assignment = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(output, p, rdkafka::Offset::End)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    // Position at the end before the first latency record is sent (the throughput phase's outputs
    // are not read).
    for _ in 0..20 {
        let _ = consumer.poll(Duration::from_millis(50));
    }
    let _ = ready.send(());
    let deadline =
        Instant::now() + Duration::from_secs(30) + Duration::from_secs(expected as u64 / 500);
    let mut found = 0;
    while found < expected && Instant::now() < deadline {
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) else {
            continue;
        };
        let at = origin.elapsed().as_nanos() as u64;
        let index = message
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(|k| k.strip_prefix("lat-"))
            .and_then(|i| i.parse::<usize>().ok());
        if let Some(slot) = index.and_then(|i| seen.get(i))
            && slot
                .compare_exchange(0, at, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            found += 1;
        }
    }
}

fn print_table(title: &str, rows: &[Row], sizes: Sizes) {
    println!();
    println!("### {title}");
    println!();
    println!(
        "| row | records/s | CPU-s per M records | peak RSS MiB | e2e latency p50 / p99 ms ({} records at {}/s) |",
        sizes.latency_records, sizes.latency_rate
    );
    println!("|---|---|---|---|---|");
    for row in rows {
        let latency = match row.latency_ms {
            Some((p50, p99, 0)) => format!("{p50:.1} / {p99:.1}"),
            Some((p50, p99, missing)) => format!("{p50:.1} / {p99:.1} ({missing} never seen)"),
            None => "–".to_owned(),
        };
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {latency} |",
            row.label, row.records_per_s, row.cpu_s_per_million, row.peak_rss_mb
        );
    }
    let find = |label: &str| rows.iter().find(|r| r.label.starts_with(label));
    let raw = find("raw rdkafka consume loop");
    for label in ["ours, outputs off", "ours, outputs off, commits every 1 s"] {
        let ours = rows.iter().find(|r| r.label == label);
        if let (Some(raw), Some(ours)) = (raw, ours) {
            let per_round: Vec<String> = ours
                .rounds
                .iter()
                .zip(&raw.rounds)
                .map(|(ours, raw)| format!("{:.2}", ours / raw))
                .collect();
            println!(
                "ratio: {label} / raw loop = {:.2} records/s (median runs; round by round: {}), {:.2}x the CPU per record",
                ours.records_per_s / raw.records_per_s,
                per_round.join(" "),
                ours.cpu_s_per_million / raw.cpu_s_per_million
            );
        }
    }
    for (ours, theirs) in [
        (
            "ours, outputs at-least-once",
            "Kafka Streams 4.4, at_least_once",
        ),
        (
            "ours, outputs exactly-once",
            "Kafka Streams 4.4, exactly_once_v2",
        ),
    ] {
        if let (Some(ours), Some(theirs)) = (find(ours), find(theirs)) {
            println!(
                "ratio: {ours} / {theirs}: records per CPU-second {:.2}x, records/s {:.2}x, peak RSS {:.2}x",
                theirs.cpu_s_per_million / ours.cpu_s_per_million,
                ours.records_per_s / theirs.records_per_s,
                ours.peak_rss_mb / theirs.peak_rss_mb,
                ours = ours.label,
                theirs = theirs.label,
            );
        }
    }
    println!(
        "(rates and CPU between 10% and 90% of each row's input, produced before the row starts; rows without outputs share one input and take turns over it, {} round{}, each row's median run shown)",
        sizes.repeats,
        if sizes.repeats == 1 { "" } else { "s" }
    );
}

// ---------------------------------------------------------------------------------------------------
// Checkpoints

fn checkpoint_rows(sizes: Sizes) {
    use processor::checkpoint::CheckpointStore;
    let dir = tempfile::tempdir().unwrap();
    let stores = RocksDbStores::new(128 << 20, 64 << 20);
    println!();
    println!(
        "### checkpoints of one partition (RocksDB checkpoint = hard links, then upload to a directory)"
    );
    println!();
    println!(
        "| state | pause (local snapshot, median of {CHECKPOINT_ROUNDS}) | first upload | next upload (1% of keys changed) |"
    );
    println!("|---|---|---|---|");
    let states = [sizes.small_state, sizes.large_state];
    let opened: Vec<_> = states
        .iter()
        .map(|keys| {
            let store = stores
                .open(0, &dir.path().join(format!("db-{keys}")))
                .unwrap();
            fill(&store, 0, *keys, 1);
            store
        })
        .collect();
    // As in the processor: each checkpoint follows some processing (1 000 keys written since the last
    // one, in the memtable), and is flushed and hard-linked. The two sizes take turns, round after
    // round, so a drift of the disk (writeback of an earlier row's files) reaches both alike.
    let mut pauses: Vec<Vec<Duration>> = states.iter().map(|_| Vec::new()).collect();
    for round in 0..CHECKPOINT_ROUNDS {
        for ((keys, store), pauses) in states.iter().zip(&opened).zip(&mut pauses) {
            fill(store, round * 1_000, round * 1_000 + 1_000, 1);
            let target = dir.path().join(format!("snap-{keys}-{round}"));
            let started = Instant::now();
            store.snapshot_to(&target).unwrap();
            pauses.push(started.elapsed());
        }
    }
    let mut medians = Vec::new();
    for ((keys, store), mut pauses) in states.iter().zip(&opened).zip(pauses) {
        pauses.sort();
        let pause = pauses[pauses.len() / 2];
        let shared = processor::checkpoint::DirectoryCheckpointStore::new(
            dir.path().join(format!("shared-{keys}")),
        )
        .unwrap();
        let started = Instant::now();
        shared
            .upload(
                "bench",
                0,
                &dir.path().join(format!("snap-{keys}-0")),
                *keys as i64,
                1,
            )
            .unwrap();
        let first = started.elapsed();
        fill(store, *keys, keys + keys / 100, 1);
        let next_snapshot = dir.path().join(format!("snap-{keys}-next"));
        store.snapshot_to(&next_snapshot).unwrap();
        let started = Instant::now();
        let report = shared
            .upload("bench", 0, &next_snapshot, (keys + keys / 100) as i64, 1)
            .unwrap();
        let next = started.elapsed();
        println!(
            "| {keys} keys ({:.0} MiB on disk) | {:.2} ms | {:.0} ms | {:.0} ms ({} MiB hashed, {} MiB copied) |",
            store.approximate_size_bytes() as f64 / (1 << 20) as f64,
            pause.as_secs_f64() * 1e3,
            first.as_secs_f64() * 1e3,
            next.as_secs_f64() * 1e3,
            report.hashed_bytes >> 20,
            report.copied_bytes >> 20,
        );
        medians.push(pause);
    }
    println!(
        "ratio: pause at {} keys / pause at {} keys = {:.2} (the sizes took turns, {CHECKPOINT_ROUNDS} rounds)",
        sizes.large_state,
        sizes.small_state,
        medians[1].as_secs_f64() / medians[0].as_secs_f64()
    );
}

/// Checkpoints taken of each state size (the pause shown is their median).
const CHECKPOINT_ROUNDS: u64 = 21;

fn fill(store: &dyn PartitionStore, from: u64, to: u64, token: u64) {
    let mut at = from;
    while at < to {
        let end = (at + 10_000).min(to);
        let mut batch = processor::store::StateBatch::new(end as i64, token);
        for key in at..end {
            let aggregate = Aggregate::default().with_amount(key as i64);
            batch.put(format!("k{key}"), aggregate.encode());
        }
        store.apply(&batch).unwrap();
        at = end;
    }
}

// ---------------------------------------------------------------------------------------------------
// The Kafka Streams peer

// The peer's project travels inside the bench binary: a path baked in at compile time would name
// whichever checkout built the bench first when several share a target directory.
const STREAMS_POM: &str = include_str!("../../benches/kafka-streams/pom.xml");
const STREAMS_SOURCE: &str =
    include_str!("../../benches/kafka-streams/src/main/java/bench/KeyedAggregation.java");
const STREAMS_LOG4J2: &str = include_str!("../../benches/kafka-streams/log4j2.properties");

/// The peer's jars, classes and logging configuration, fetched and compiled once into a cache outside
/// the clone (again when its source changes); `None` without java or mvn.
fn kafka_streams_app() -> Option<(PathBuf, PathBuf, PathBuf)> {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    let cache = home.join(".cache/state-coordination/kafka-streams-peer");
    let (libs, classes, project) = (
        cache.join("libs"),
        cache.join("classes"),
        cache.join("project"),
    );
    let log4j2 = project.join("log4j2.properties");
    let stamp = cache.join(".source");
    let built = std::fs::read_to_string(&stamp).ok().as_deref() == Some(STREAMS_SOURCE);
    if built && std::fs::read_to_string(&log4j2).ok().as_deref() == Some(STREAMS_LOG4J2) {
        return Some((libs, classes, log4j2));
    }
    for tool in ["java", "javac", "mvn"] {
        if Command::new(tool).arg("-version").output().is_err() {
            return None;
        }
    }
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&classes).unwrap();
    std::fs::create_dir_all(&project).unwrap();
    let (pom, source) = (
        project.join("pom.xml"),
        project.join("KeyedAggregation.java"),
    );
    std::fs::write(&pom, STREAMS_POM).unwrap();
    std::fs::write(&source, STREAMS_SOURCE).unwrap();
    std::fs::write(&log4j2, STREAMS_LOG4J2).unwrap();
    let fetched = Command::new("mvn")
        .args(["-q", "-B", "-f"])
        .arg(&pom)
        .args(["dependency:copy-dependencies", "-DincludeScope=runtime"])
        .arg(format!("-DoutputDirectory={}", libs.display()))
        .status()
        .unwrap();
    assert!(fetched.success(), "mvn could not fetch Kafka Streams");
    let compiled = Command::new("javac")
        .arg("-d")
        .arg(&classes)
        .arg("-cp")
        .arg(format!("{}/*", libs.display()))
        .arg(&source)
        .status()
        .unwrap();
    assert!(compiled.success(), "javac failed on {}", source.display());
    std::fs::write(&stamp, STREAMS_SOURCE).unwrap();
    Some((libs, classes, log4j2))
}

// ---------------------------------------------------------------------------------------------------
// Child processes: `--child MODE BROKERS INPUT OUTPUT STATE_DIR`; each prints `AT n NANOS CPU_NANOS`
// (records done, its own clock, its CPU time) every 10 ms until its stdin closes.

fn child(args: &[String]) {
    let [mode, brokers, input, output, state] = args else {
        panic!("--child MODE BROKERS INPUT OUTPUT STATE_DIR, got {args:?}");
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let stop = CancellationToken::new();
    let done = Arc::new(AtomicU64::new(0));
    runtime.block_on(async {
        let work = {
            let (mode, brokers, input, output, state, stop, done) = (
                mode.clone(),
                brokers.clone(),
                input.clone(),
                output.clone(),
                PathBuf::from(state),
                stop.clone(),
                done.clone(),
            );
            tokio::spawn(async move {
                match mode.as_str() {
                    "raw" => raw_loop(&brokers, &input, &done).await,
                    _ => ours(&mode, &brokers, &input, &output, &state, &stop, &done).await,
                }
            })
        };
        // An OS thread, not a task: the work may keep every runtime worker busy.
        {
            let done = done.clone();
            std::thread::spawn(move || {
                let (origin, me) = (Instant::now(), std::process::id());
                loop {
                    let count = done.load(Ordering::Relaxed);
                    let cpu = integration_tests::cpu::cpu_seconds(&[me]);
                    say(&format!(
                        "AT {count} {} {}",
                        origin.elapsed().as_nanos(),
                        (cpu * 1e9) as u64
                    ));
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        }
        // Until the bench closes stdin.
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {}
        })
        .await
        .unwrap();
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), work).await;
    });
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

/// One consumer per partition (as the processor has), each draining its queue as fast as it can.
async fn raw_loop(brokers: &str, input: &str, done: &Arc<AtomicU64>) {
    let kafka = KafkaSettings::new(brokers);
    let partitions = partition_count(&kafka, input).unwrap();
    let tasks: Vec<_> = (0..partitions)
        .map(|partition| {
            let (brokers, input, done) = (brokers.to_owned(), input.to_owned(), done.clone());
            tokio::spawn(async move {
                use futures::StreamExt;
                let mut config = ClientConfig::new();
                // The processor's prefetch tuning: the floor consumes as its consumers do.
                for (key, value) in processor::source::PREFETCH {
                    config.set(*key, *value);
                }
                for (key, value) in bench_kafka_properties() {
                    config.set(key, value);
                }
                let consumer: StreamConsumer = config
                    .set("bootstrap.servers", &brokers)
                    .set("group.id", "raw")
                    .set("enable.auto.commit", "false")
                    .set("enable.partition.eof", "false")
                    .create()
                    .unwrap();
                let mut assignment = rdkafka::TopicPartitionList::new();
                assignment
                    .add_partition_offset(&input, partition, rdkafka::Offset::Beginning)
                    .unwrap();
                consumer.assign(&assignment).unwrap();
                let mut stream = consumer.stream();
                while let Some(message) = stream.next().await {
                    message.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

async fn ours(
    mode: &str,
    brokers: &str,
    input: &str,
    output: &str,
    state: &Path,
    stop: &CancellationToken,
    done: &Arc<AtomicU64>,
) {
    let partitions = partition_count(&KafkaSettings::new(brokers), input).unwrap();
    let mut services = Services::in_memory(state.join("checkpoints")).unwrap();
    services.operator = Arc::new(Counting(done.clone()));
    if let Some(bytes) = env_number("BENCH_COALESCE_BYTES") {
        services.stores = Arc::new(
            RocksDbStores::new(128 << 20, 64 << 20)
                .with_commit_coalescing(usize::try_from(bytes).unwrap_or(usize::MAX)),
        );
    }
    let kafka = bench_kafka_properties()
        .iter()
        .try_fold(KafkaSettings::new(brokers), |kafka, (key, value)| {
            kafka.with_property(key, value)
        })
        .unwrap();
    let mut config = InstanceConfig::new("bench", input, partitions, brokers, state.join("local"))
        .with_kafka(kafka)
        .with_status_interval(Duration::from_millis(100))
        .with_output_mode(OutputMode::LatestPerKey);
    if let Some(interval) = env_number("BENCH_COMMIT_MS") {
        let records = env_number("BENCH_COMMIT_RECORDS").unwrap_or(u64::MAX);
        config = config.with_commits(
            usize::try_from(records).unwrap_or(usize::MAX),
            Duration::from_millis(interval),
        );
    }
    match mode {
        "off" => {}
        OFF_COMMITS_EVERY_SECOND => {
            config = config.with_commits(100_000, Duration::from_secs(1));
        }
        "at-least-once" => {
            config = config
                .with_output_topic(output)
                .with_output_guarantee(OutputGuarantee::AtLeastOnce);
        }
        "exactly-once" => {
            config = config
                .with_output_topic(output)
                .with_output_guarantee(OutputGuarantee::ExactlyOnce);
        }
        other => panic!("unknown mode {other}"),
    }
    let instance = processor::Instance::new(config, services).unwrap();
    instance.run(stop.clone()).await.unwrap();
}

/// Client properties both the raw loop and ours take from `BENCH_KAFKA` (`key=value;key=value`): to
/// try a tuning on both sides of the ratio at once.
fn bench_kafka_properties() -> Vec<(String, String)> {
    std::env::var("BENCH_KAFKA")
        .unwrap_or_default()
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

/// A number from the environment (`None` when unset or not a number).
fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The built-in aggregation, counting the records it applies (as the Kafka Streams peer counts its
/// aggregator's calls): progress as fine-grained on both sides.
struct Counting(Arc<AtomicU64>);

impl Operator for Counting {
    fn apply(
        &self,
        record: &Record<'_>,
        state: &mut PartitionState,
        out: &mut Emitter<'_>,
    ) -> ProcessorResult<Outcome> {
        self.0.fetch_add(1, Ordering::Relaxed);
        KeyedAggregation.apply(record, state, out)
    }

    fn reads_headers(&self) -> bool {
        KeyedAggregation.reads_headers()
    }
}
