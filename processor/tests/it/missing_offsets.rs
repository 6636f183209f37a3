//! A partition whose stored offset is outside the topic's log — above its end, as after the topic was
//! deleted and recreated, or below its start, as after retention deleted records nobody processed yet (a
//! real broker: the mock cannot delete records) — refuses to process by default, naming the offsets,
//! instead of skipping records silently; and each `--on-missing-offsets` choice does what it says.

// Test code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::path::Path;
use std::time::Duration;

use processor::dev::{Workload, admin};
use processor::resources::local_state_dir;
use processor::store::rocksdb::RocksDbStores;
use processor::store::{PartitionStore, StateBatch};
use processor::{Instance, InstanceConfig, InstanceStatus, MissingOffsets, Services};
use support::{TestBroker, wait_for};
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "orders";
const GROUP: &str = "processor";

/// Local state of partition 0 that claims to have processed up to offset 1 000.
fn seed_state(state_dir: &Path) {
    seed_state_at(state_dir, 1_000);
}

/// Local state of partition 0 that claims to have processed up to `offset`.
fn seed_state_at(state_dir: &Path, offset: i64) {
    let stores = RocksDbStores::new(8 << 20, 4 << 20);
    let store = stores
        .open(0, &local_state_dir(state_dir, GROUP, TOPIC, 0))
        .unwrap();
    let mut batch = StateBatch::new(offset, 0);
    batch.put("entity-old", "from the old topic");
    store.apply(&batch).unwrap();
}

fn stored_offset(state_dir: &Path) -> i64 {
    let stores = RocksDbStores::new(8 << 20, 4 << 20);
    let store = stores
        .open(0, &local_state_dir(state_dir, GROUP, TOPIC, 0))
        .unwrap();
    store.meta().unwrap().unwrap().next_offset
}

/// Runs one instance on a fresh one-partition topic of 10 records, over local state at offset 1 000.
async fn run_over_a_recreated_topic(policy: MissingOffsets) -> (InstanceStatus, i64) {
    let broker = TestBroker::start(TOPIC, 1).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 10,
        keys: 3,
        seed: 5,
        partitions: 1,
    };
    workload.produce(&brokers, TOPIC).await.unwrap();
    run_one_instance(&brokers, 1_000, policy, 10).await
}

/// Runs one instance over local state at `stored` with `policy` until it refuses the partition (`fail`)
/// or has applied `records`; its status then and the offset stored at the end.
async fn run_one_instance(
    brokers: &str,
    stored: i64,
    policy: MissingOffsets,
    records: u64,
) -> (InstanceStatus, i64) {
    let root = tempfile::tempdir().unwrap();
    let state_dir = root.path().join("state");
    seed_state_at(&state_dir, stored);
    let services = Services::in_memory(root.path().join("ck")).unwrap();
    let config = InstanceConfig::new("a", TOPIC, 1, brokers, state_dir.clone())
        .with_on_missing_offsets(policy)
        .with_checkpoint_every(Duration::from_millis(200));
    let instance = Instance::new(config, services).unwrap();
    let status = instance.status();
    let stop = CancellationToken::new();
    let running = tokio::spawn(instance.run(stop.clone()));
    let seen = match policy {
        MissingOffsets::Fail => {
            wait_for(&status, "the refusal", Duration::from_secs(30), |s| {
                s.partition_errors.contains_key(&0)
            })
            .await
        }
        _ => {
            wait_for(&status, "the records", Duration::from_secs(30), |s| {
                s.processed >= records
            })
            .await
        }
    };
    stop.cancel();
    running.await.unwrap().unwrap();
    (seen, stored_offset(&state_dir))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_the_partition_refuses_and_names_the_offsets() {
    let (status, offset) = run_over_a_recreated_topic(MissingOffsets::Fail).await;
    let error = &status.partition_errors[&0];
    assert!(
        error.contains("stored offset 1000 is outside the log [0, 10)"),
        "{error}"
    );
    assert_eq!(status.processed, 0, "nothing was processed");
    assert_eq!(offset, 1_000, "nothing was written");
}

/// A partition that keeps failing (here: its stored offset is outside the log, policy `fail`) is claimed
/// again after a pause that doubles, not on every tick: over six seconds it fails a handful of times,
/// not two dozen, and the status shows the streak and when the next attempt is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_keeps_failing_is_retried_with_a_growing_pause() {
    let broker = TestBroker::start(TOPIC, 1).await;
    let brokers = broker.bootstrap_servers();
    let root = tempfile::tempdir().unwrap();
    let state_dir = root.path().join("state");
    seed_state_at(&state_dir, 1_000);
    let services = Services::in_memory(root.path().join("ck")).unwrap();
    let config = InstanceConfig::new("a", TOPIC, 1, &brokers, state_dir);
    let instance = Instance::new(config, services).unwrap();
    let status = instance.status();
    let stop = CancellationToken::new();
    let running = tokio::spawn(instance.run(stop.clone()));
    wait_for(&status, "the first refusal", Duration::from_secs(30), |s| {
        s.partition_errors.contains_key(&0)
    })
    .await;
    let first = tokio::time::Instant::now();
    let streak = wait_for(&status, "a streak shown", Duration::from_secs(6), |s| {
        s.backoffs.get(&0).is_some_and(|b| b.failures >= 2)
    })
    .await;
    tokio::time::sleep_until(first + Duration::from_secs(6)).await;
    let seen = status.borrow().clone();
    stop.cancel();
    running.await.unwrap().unwrap();
    let failures = seen
        .hand_offs
        .iter()
        .filter(|hand_off| hand_off.event == "failed")
        .count();
    // Pauses of ~0.5, 1, 2, 4 s: at most five failures in the first ~6.5 s (every tick: ~20).
    assert!(
        (2..=6).contains(&failures),
        "{failures} failures in ~6 s: {:?}",
        seen.hand_offs
    );
    let shown = &streak.backoffs[&0];
    let now_ms = processor::status::unix_ms(std::time::SystemTime::now());
    assert!(
        shown.retry_at_ms > now_ms.saturating_sub(10_000),
        "a retry time near now: {shown:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn earliest_resumes_at_the_log_start() {
    let (status, offset) = run_over_a_recreated_topic(MissingOffsets::Earliest).await;
    assert_eq!(
        status.processed, 10,
        "every record of the new log was applied"
    );
    assert_eq!(offset, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_resumes_at_the_log_end() {
    let broker = TestBroker::start(TOPIC, 1).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 15,
        keys: 3,
        seed: 5,
        partitions: 1,
    };
    workload
        .produce_range(&brokers, TOPIC, 0..10)
        .await
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let state_dir = root.path().join("state");
    seed_state(&state_dir);
    let config = InstanceConfig::new("a", TOPIC, 1, &brokers, state_dir.clone())
        .with_on_missing_offsets(MissingOffsets::Latest)
        .with_checkpoint_every(Duration::from_millis(200));
    let instance =
        Instance::new(config, Services::in_memory(root.path().join("ck")).unwrap()).unwrap();
    let status = instance.status();
    let stop = CancellationToken::new();
    let running = tokio::spawn(instance.run(stop.clone()));
    wait_for(&status, "the partition", Duration::from_secs(30), |s| {
        s.owned.contains_key(&0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        status.borrow().processed,
        0,
        "the 10 old records are skipped"
    );
    workload
        .produce_range(&brokers, TOPIC, 10..15)
        .await
        .unwrap();
    wait_for(&status, "the new records", Duration::from_secs(30), |s| {
        s.processed >= 5
    })
    .await;
    stop.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(status.borrow().processed, 5);
    assert_eq!(stored_offset(&state_dir), 15);
}

/// Runs one instance over local state at offset 5 of a partition of 20 records whose first 15 were
/// deleted (retention, or `kafka-delete-records`), on a real broker.
async fn run_after_deleted_records(policy: MissingOffsets) -> (InstanceStatus, i64) {
    let broker = TestBroker::kafka(TOPIC, 1).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 20,
        keys: 3,
        seed: 5,
        partitions: 1,
    };
    workload.produce(&brokers, TOPIC).await.unwrap();
    let log_start = admin::delete_records(&brokers, TOPIC, 0, 15).await.unwrap();
    assert_eq!(log_start, 15);
    run_one_instance(&brokers, 5, policy, 5).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_deleted_before_they_were_processed_are_refused_by_default() {
    let (status, offset) = run_after_deleted_records(MissingOffsets::Fail).await;
    let error = &status.partition_errors[&0];
    assert!(
        error.contains("stored offset 5 is outside the log [15, 20)"),
        "{error}"
    );
    assert_eq!(status.processed, 0, "nothing was processed");
    assert_eq!(offset, 5, "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_deleted_before_they_were_processed_are_skipped_with_earliest() {
    let (status, offset) = run_after_deleted_records(MissingOffsets::Earliest).await;
    assert_eq!(status.processed, 5, "the 5 records left were applied");
    assert_eq!(offset, 20);
}
