//! The processor's data path against a raw consume loop on the same broker in the same run, and
//! checkpoint creation time at two state sizes.
//!
//! - raw: one `StreamConsumer` per partition, `assign()`ed from 0, receiving until the end offset;
//! - full: the same consumers feeding `PartitionProcessor` (keyed aggregation, RocksDB, state + next
//!   offset in one `WriteBatch` per batch of 500 records);
//! - checkpoint: `snapshot_to` (RocksDB checkpoint = hard links) of a small and a 20× larger store.
//!
//! ```text
//! cargo bench -p benches --bench processor    # 4 × 50 000 records; 10 000 vs 200 000 keys
//! cargo test  -p benches --bench processor    # smoke run with small counts
//! ```

// Test and benchmark code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use processor::KafkaSettings;
use processor::dev::{DevBroker, Workload};
use processor::operator::{KeyedAggregation, Operator};
use processor::partition::PartitionProcessor;
use processor::source::{Outputs, consume_partition, high_watermark, partition_consumer};
use processor::store::rocksdb::RocksDbStores;
use processor::store::{PartitionStore, StateBatch};
use rdkafka::consumer::StreamConsumer;
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "bench";
const PARTITIONS: i32 = 4;

struct Sizes {
    records: u64,
    small_keys: u32,
    large_keys: u32,
}

fn sizes() -> Sizes {
    if std::env::args().any(|arg| arg == "--bench") {
        Sizes {
            records: 200_000,
            small_keys: 10_000,
            large_keys: 200_000,
        }
    } else {
        Sizes {
            records: 20_000,
            small_keys: 1_000,
            large_keys: 20_000,
        }
    }
}

async fn raw_consume(consumer: StreamConsumer, end: i64) -> u64 {
    use rdkafka::Message;
    let mut seen = 0;
    while let Ok(message) = consumer.recv().await {
        seen += 1;
        if message.offset() + 1 >= end {
            break;
        }
    }
    seen
}

fn filled_store(
    stores: &RocksDbStores,
    dir: &std::path::Path,
    keys: u32,
) -> Arc<dyn PartitionStore> {
    let store: Arc<dyn PartitionStore> = Arc::new(stores.open(0, dir).expect("open"));
    for chunk in (0..keys).collect::<Vec<_>>().chunks(5_000) {
        let mut batch = StateBatch::new(i64::from(*chunk.last().expect("chunk")) + 1, 1);
        for key in chunk {
            batch.put(format!("entity-{key:09}"), vec![7u8; 100]);
        }
        store.apply(&batch).expect("fill");
    }
    store
}

fn time_snapshot(store: &Arc<dyn PartitionStore>, dir: &std::path::Path) -> Duration {
    let mut best = Duration::MAX;
    for round in 0..5 {
        let target = dir.join(format!("snapshot-{round}"));
        let started = Instant::now();
        store.snapshot_to(&target).expect("snapshot");
        best = best.min(started.elapsed());
    }
    best
}

#[tokio::main]
async fn main() {
    let sizes = sizes();
    let broker = DevBroker::start(TOPIC, PARTITIONS).expect("mock cluster");
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: sizes.records,
        keys: 50_000,
        seed: 1,
        partitions: PARTITIONS,
    };
    workload.produce(&brokers, TOPIC).await.expect("produce");
    let ends: Vec<i64> = (0..PARTITIONS)
        .map(|p| high_watermark(&KafkaSettings::new(&brokers), TOPIC, p).expect("watermark"))
        .collect();

    // Raw: consume only.
    let started = Instant::now();
    let tasks: Vec<_> = (0..PARTITIONS)
        .map(|p| {
            let consumer = partition_consumer(&KafkaSettings::new(&brokers), "raw", TOPIC, p, 0)
                .expect("consumer");
            tokio::spawn(raw_consume(consumer, ends[p as usize]))
        })
        .collect();
    let mut raw_records = 0;
    for task in tasks {
        raw_records += task.await.expect("raw task");
    }
    let raw_rate = raw_records as f64 / started.elapsed().as_secs_f64();

    // Full path: consume, aggregate, write state + offset atomically.
    let dir = tempfile::tempdir().expect("temp dir");
    let stores = RocksDbStores::new(64 << 20, 32 << 20);
    let operator: Arc<dyn Operator> = Arc::new(KeyedAggregation);
    let started = Instant::now();
    let tasks: Vec<_> = (0..PARTITIONS)
        .map(|p| {
            let store: Arc<dyn PartitionStore> = Arc::new(
                stores
                    .open(p, &dir.path().join(format!("p{p}")))
                    .expect("store"),
            );
            let mut processor =
                PartitionProcessor::resume(store, operator.clone(), 1, CancellationToken::new())
                    .expect("resume");
            let consumer = partition_consumer(&KafkaSettings::new(&brokers), "full", TOPIC, p, 0)
                .expect("consumer");
            let end = ends[p as usize];
            tokio::spawn(async move {
                let stop = CancellationToken::new();
                consume_partition(
                    &consumer,
                    &mut processor,
                    processor::source::CommitPolicy::new(10_000, Duration::from_millis(100)),
                    Some(end),
                    Outputs::Discard,
                    None,
                    &stop,
                )
                .await
                .expect("consume")
                .applied
            })
        })
        .collect();
    let mut full_records = 0;
    for task in tasks {
        full_records += task.await.expect("full task");
    }
    let full_rate = full_records as f64 / started.elapsed().as_secs_f64();

    // Checkpoint creation at two state sizes.
    let small = filled_store(&stores, &dir.path().join("small"), sizes.small_keys);
    let large = filled_store(&stores, &dir.path().join("large"), sizes.large_keys);
    let small_time = time_snapshot(&small, &dir.path().join("small-snaps"));
    let large_time = time_snapshot(&large, &dir.path().join("large-snaps"));

    println!(
        "{} records over {PARTITIONS} partitions of librdkafka's mock cluster, one run",
        sizes.records
    );
    println!("| path | records/s |");
    println!("|---|---|");
    println!("| raw rdkafka consume (assign, recv) | {raw_rate:.0} |");
    println!(
        "| full: consume → aggregate → RocksDB WriteBatch (state + offset) | {full_rate:.0} |"
    );
    println!("ratio: full / raw = {:.2}", full_rate / raw_rate);
    println!();
    println!("| state size | checkpoint creation (best of 5) |");
    println!("|---|---|");
    println!(
        "| {} keys × 100 B | {:.2} ms |",
        sizes.small_keys,
        small_time.as_secs_f64() * 1e3
    );
    println!(
        "| {} keys × 100 B | {:.2} ms |",
        sizes.large_keys,
        large_time.as_secs_f64() * 1e3
    );
    println!(
        "ratio: large / small checkpoint time = {:.2} for {}x the state",
        large_time.as_secs_f64() / small_time.as_secs_f64(),
        sizes.large_keys / sizes.small_keys
    );
}
