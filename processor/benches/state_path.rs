//! The processor's per-record state path alone, without Kafka: records applied through the built-in
//! aggregation into the state cache, committed into RocksDB — what the throughput bench's "outputs off"
//! row spends beyond consuming. Kafka-free, so it is steady enough to compare two builds of the state
//! path run after run (the throughput bench's rows vary by ±15 % between runs).
//!
//! ```text
//! cargo bench -p fenced-processor --bench state_path            # 8 partitions × 12 500 keys, 1 M records each
//! cargo bench -p fenced-processor --bench state_path -- --quick # a smoke run (what `cargo test` runs)
//! ```
//!
//! The shape follows the throughput bench: 100 k keys over 8 partitions, 1 000 records per apply, a
//! commit every 37 500 records per partition (100 ms at the 3 M records/s the processor reaches
//! there). Two key orders: each partition's keys in a recurring cycle (as the throughput bench's
//! producer writes `k{i % keys}`), and uniformly random. Prints ns per record for applying and for
//! committing, the median and the best of 5 runs.

// Benchmark code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use processor::aggregation::KeyedAggregation;
use processor::operator::Record;
use processor::partition::PartitionProcessor;
use processor::store::StoreFactory;
use processor::store::rocksdb::RocksDbStores;
use tokio_util::sync::CancellationToken;

const PARTITIONS: usize = 8;
const KEYS_PER_PARTITION: usize = 12_500;
const APPLY_BATCH: usize = 1_000;
const COMMIT_EVERY: usize = 37_500;

fn main() {
    let quick =
        !std::env::args().any(|a| a == "--bench") || std::env::args().any(|a| a == "--quick");
    let (records, runs) = if quick { (20_000, 1) } else { (1_000_000, 5) };
    println!(
        "state path: {PARTITIONS} partitions × {KEYS_PER_PARTITION} keys, {records} records each"
    );
    println!();
    println!("| keys | run | apply (ns/record) | commit (ns/record) | total (ns/record) |");
    println!("|---|---|---|---|---|");
    for random in [false, true] {
        let mut results: Vec<(Duration, Duration)> =
            (0..runs).map(|_| run(records, random)).collect();
        let total = (records * PARTITIONS) as f64;
        let per_record = |d: Duration| d.as_secs_f64() * 1e9 / total;
        results.sort_by_key(|(apply, commit)| *apply + *commit);
        let order = if random { "random" } else { "recurring" };
        for (label, (apply, commit)) in
            [("median", results[results.len() / 2]), ("best", results[0])]
        {
            println!(
                "| {order} | {label} | {:.0} | {:.0} | {:.0} |",
                per_record(apply),
                per_record(commit),
                per_record(apply + commit)
            );
        }
    }
}

/// The key index of record `i`: the cycle, or a pseudo-random draw (splitmix64 of `i`).
fn key_index(i: usize, random: bool) -> usize {
    if !random {
        return i % KEYS_PER_PARTITION;
    }
    let mut z = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as usize % KEYS_PER_PARTITION
}

/// One run over fresh stores: time spent applying and committing.
fn run(records: usize, random: bool) -> (Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let stores = RocksDbStores::new(128 << 20, 64 << 20);
    let mut processors: Vec<PartitionProcessor> = (0..PARTITIONS)
        .map(|partition| {
            let store = stores
                .open_store(partition as i32, &dir.path().join(format!("p{partition}")))
                .unwrap();
            PartitionProcessor::resume(
                store,
                Arc::new(KeyedAggregation),
                1,
                CancellationToken::new(),
            )
            .unwrap()
            .with_outputs(false, processor::operator::OutputMode::LatestPerKey)
        })
        .collect();
    let keys: Vec<Vec<Vec<u8>>> = (0..PARTITIONS)
        .map(|p| {
            (0..KEYS_PER_PARTITION)
                .map(|j| format!("k{}", p + PARTITIONS * j).into_bytes())
                .collect()
        })
        .collect();
    let amounts: Vec<Vec<u8>> = (0..2_001)
        .map(|a| (a - 1_000).to_string().into_bytes())
        .collect();
    let (mut applying, mut committing) = (Duration::ZERO, Duration::ZERO);
    let mut since_commit = 0;
    for start in (0..records).step_by(APPLY_BATCH) {
        let end = (start + APPLY_BATCH).min(records);
        for (partition, processor) in processors.iter_mut().enumerate() {
            let batch: Vec<Record<'_>> = (start..end)
                .map(|i| {
                    let key = &keys[partition][key_index(i, random)];
                    let amount = &amounts[(i * 7_919) % amounts.len()];
                    Record::new(partition as i32, i as i64, Some(key), Some(amount))
                })
                .collect();
            let started = Instant::now();
            processor.apply(&batch).unwrap();
            applying += started.elapsed();
        }
        since_commit += end - start;
        if since_commit >= COMMIT_EVERY || end == records {
            since_commit = 0;
            let started = Instant::now();
            for processor in &mut processors {
                processor.commit().unwrap();
            }
            committing += started.elapsed();
        }
    }
    (applying, committing)
}
