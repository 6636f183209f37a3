//! Hand-off time with and without standby replicas: an owner killed abruptly (no hand-off, no final
//! checkpoint) and the other instance of a two-instance fleet taking its partition over — from the kill
//! until the new owner has applied records produced after it. Run on a real single-node Apache Kafka
//! (started here) with in-process locks and RocksDB, at 100 k and 2 M keys of state in one partition.
//!
//! ```text
//! cargo bench -p fenced-processor --bench handoff            # 100 k and 2 M keys (a few minutes)
//! cargo bench -p fenced-processor --bench handoff -- --quick # 100 k keys only
//! cargo test  -p fenced-processor --bench handoff            # a smoke run at 10 k keys (the test command's)
//! ```
//!
//! Printed per row: the hand-off (kill → the new owner processing, i.e. its state open and its consumer
//! positioned), its parts — until the partition was claimed (the claim's TTL running out: the same with
//! or without standbys) and from the claim until processing (opening the standby copy, or verifying and
//! restoring the checkpoint) — the time until 1 000 records produced after the kill were applied (the
//! producer's own start included), and what the new owner restored.

// Benchmark code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use processor::dev::admin;
use processor::{Instance, InstanceConfig, InstanceStatus, Services};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const CLAIM_TTL: Duration = Duration::from_secs(1);
const AFTER_KILL: u64 = 1_000;

struct Row {
    keys: u64,
    standbys: usize,
    total: Duration,
    to_claim: Duration,
    claim_to_open: Duration,
    restores: u64,
    local_starts: u64,
    checkpoint_mib: f64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `cargo test` runs a bench without `--bench`: a smoke run (one small state), to show the bench
    // still works, not to measure.
    let smoke = !args.iter().any(|a| a == "--bench");
    integration_tests::init_tracing(); // RUST_LOG=processor=debug shows each step of a takeover
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cluster = integration_tests::KafkaCluster::single();
    let brokers = cluster.bootstrap_servers();
    let sizes: &[u64] = if smoke {
        &[10_000]
    } else if quick {
        &[100_000]
    } else {
        &[100_000, 2_000_000]
    };
    println!(
        "hand-off: owner killed, the other instance of two takes over; claim TTL {CLAIM_TTL:?}; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut rows = Vec::new();
    for &keys in sizes {
        for standbys in [0, 1] {
            let row = runtime.block_on(run(&brokers, keys, standbys));
            eprintln!(
                "{keys} keys, {standbys} standby: {:?} (claim after {:?})",
                row.total, row.to_claim
            );
            rows.push(row);
        }
    }
    println!(
        "| keys | standby replicas | kill → processing | kill → claimed | claimed → processing (state opened or restored) | kill → caught up | restores / local starts | checkpoint MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {} / {} | {:.1} |",
            row.keys,
            row.standbys,
            ms(row.to_claim + row.claim_to_open),
            ms(row.to_claim),
            ms(row.claim_to_open),
            ms(row.total),
            row.restores,
            row.local_starts,
            row.checkpoint_mib
        );
    }
    for pair in rows.chunks(2) {
        if let [without, with] = pair {
            println!(
                "{} keys: with one standby / without: kill → processing {:.2}×, claimed → processing {:.2}×",
                without.keys,
                ms(with.to_claim + with.claim_to_open)
                    / ms(without.to_claim + without.claim_to_open),
                ms(with.claim_to_open) / ms(without.claim_to_open)
            );
        }
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

async fn run(brokers: &str, keys: u64, standbys: usize) -> Row {
    let topic = format!("handoff-{keys}-{standbys}");
    admin::create_topic(brokers, &topic, 1, 1, &[])
        .await
        .unwrap();
    produce(brokers, &topic, 0..keys).await;
    let root = tempfile::tempdir().unwrap();
    let services = Services::in_memory(root.path().join("checkpoints")).unwrap();
    let config = |id: &str| {
        InstanceConfig::new(id, &topic, 1, brokers, root.path().join(id))
            .with_checkpoint_every(Duration::from_secs(2))
            .with_claim_ttl(CLAIM_TTL)
            .with_standby_replicas(standbys)
    };
    let start = |id: &str| {
        let instance = Instance::new(config(id), services.clone()).unwrap();
        let status = instance.status();
        let stop = CancellationToken::new();
        (tokio::spawn(instance.run(stop.clone())), stop, status)
    };
    // The owner is the member the assignment gives the partition when both are in the fleet (the
    // second to start must not take it over: it is the standby).
    let members = ["a".to_owned(), "b".to_owned()];
    let owner = processor::fleet::membership::owner_of(&topic, 1, 0, &members).unwrap();
    let other = if owner == "a" { "b" } else { "a" };
    let (a, _a_stop, a_status) = start(owner);
    let end = i64::try_from(keys).unwrap();
    wait(&a_status, Duration::from_secs(600), |s| {
        s.partition_status
            .get(&0)
            .is_some_and(|p| p.next_offset == end)
    })
    .await;
    let (b, b_stop, b_status) = start(other);
    // a's checkpoint covers everything (an idle partition takes no more), and b's copy follows it.
    let checkpoints = root.path().join("checkpoints");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let covered = newest_checkpoint_offset(&checkpoints, &topic) == Some(end);
        let standby_ready = standbys == 0 || b_status.borrow().standbys.get(&0) == Some(&Some(end));
        if covered && standby_ready {
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoint covers the input");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Plus a random part of the successor's 250 ms tick: the claim wait depends on where in its tick
    // the kill falls, and a fixed delay after the standby's refresh (which follows a tick) would always
    // hit the same phase.
    let phase = Duration::from_millis(rand::random_range(0..250));
    tokio::time::sleep(Duration::from_millis(500) + phase).await;
    let checkpoint_mib = dir_bytes(&checkpoints) as f64 / f64::from(1 << 20);

    let killed = Instant::now();
    a.abort();
    let _ = a.await;
    // Produced while the successor takes over (a producer's start alone takes hundreds of ms).
    let producing = {
        let (brokers, topic) = (brokers.to_owned(), topic.clone());
        tokio::spawn(async move { produce(&brokers, &topic, keys..keys + AFTER_KILL).await })
    };
    let mut claimed = None;
    let mut opened = None;
    let target = end + i64::try_from(AFTER_KILL).unwrap();
    let caught_up = loop {
        let now = b_status.borrow().clone();
        if claimed.is_none() && now.owned.contains_key(&0) {
            claimed = Some(Instant::now());
        }
        if opened.is_none() && now.partition_status.get(&0).is_some_and(|p| p.processing) {
            opened = Some(Instant::now());
        }
        if now
            .partition_status
            .get(&0)
            .is_some_and(|p| p.next_offset >= target)
        {
            break (Instant::now(), now);
        }
        assert!(
            killed.elapsed() < Duration::from_secs(600),
            "b never caught up"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    producing.await.unwrap();
    let claimed = claimed.unwrap_or(caught_up.0);
    let opened = opened.unwrap_or(caught_up.0);
    b_stop.cancel();
    b.await.unwrap().unwrap();
    Row {
        keys,
        standbys,
        total: caught_up.0 - killed,
        to_claim: claimed - killed,
        claim_to_open: opened - claimed,
        restores: caught_up.1.restores,
        local_starts: caught_up.1.local_starts,
        checkpoint_mib,
    }
}

async fn wait(
    status: &watch::Receiver<InstanceStatus>,
    within: Duration,
    done: impl Fn(&InstanceStatus) -> bool,
) {
    let deadline = Instant::now() + within;
    while !done(&status.borrow()) {
        assert!(
            Instant::now() < deadline,
            "timed out: {:?}",
            status.borrow()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The offset the newest manifest of partition 0 covers (manifests are named `{token}-{offset}`).
fn newest_checkpoint_offset(checkpoints: &std::path::Path, topic: &str) -> Option<i64> {
    let dir = checkpoints.join(topic).join("0").join("manifests");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let id = name.strip_suffix(".json")?;
            processor::checkpoint::Manifest::parse_id(id)
        })
        .max()
        .map(|(_, offset)| offset)
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                dir_bytes(&path)
            } else {
                e.metadata().map_or(0, |m| m.len())
            }
        })
        .sum()
}

/// Records `range`: key `k{i}` (every key distinct), an amount that varies (state that compresses like
/// real state, not like a constant).
async fn produce(brokers: &str, topic: &str, range: std::ops::Range<u64>) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let mut pending = VecDeque::new();
    for i in range {
        let key = format!("k{i}");
        let amount = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20).to_string();
        loop {
            match producer.send_result(FutureRecord::to(topic).key(&key).payload(&amount)) {
                Ok(delivery) => {
                    pending.push_back(delivery);
                    break;
                }
                Err(_) => {
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
    }
    for delivery in pending {
        delivery.await.unwrap().unwrap();
    }
}
