//! State work stays off the async runtime, and checkpoints follow the offset:
//! - a store whose writes stall for three claim lifetimes (what a RocksDB write stall does to a caller)
//!   costs the instance none of its claims, even on a runtime with ONE worker thread: lock renewals and
//!   membership never wait behind state work;
//! - an idle partition takes no new checkpoints (and one record later it takes one again);
//! - a partition commits as its commit policy says, however often the instance pauses it to report
//!   its status (a pause is not a commit).

// Test code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use processor::dev::Workload;
use processor::error::ProcessorResult;
use processor::store::memory::InMemoryStores;
use processor::store::{EntryVisitor, PartitionStore, StateBatch, StoreFactory, StoreMeta};
use processor::{InstanceConfig, Services};
use support::{TestBroker, start_instance as start, wait_for};

const TOPIC: &str = "orders";

/// Stores whose first `stalls` writes each block the calling thread for `stall`; `writes` counts the
/// writes that changed something.
struct StallingStores {
    inner: InMemoryStores,
    stalls: Arc<AtomicUsize>,
    stall: Duration,
    writes: Arc<AtomicUsize>,
}

struct StallingStore {
    inner: Arc<dyn PartitionStore>,
    stalls: Arc<AtomicUsize>,
    stall: Duration,
    writes: Arc<AtomicUsize>,
}

impl StoreFactory for StallingStores {
    fn open_store(&self, partition: i32, dir: &Path) -> ProcessorResult<Arc<dyn PartitionStore>> {
        Ok(Arc::new(StallingStore {
            inner: self.inner.open_store(partition, dir)?,
            stalls: self.stalls.clone(),
            stall: self.stall,
            writes: self.writes.clone(),
        }))
    }
}

impl PartitionStore for StallingStore {
    fn partition(&self) -> i32 {
        self.inner.partition()
    }
    fn get(&self, key: &[u8]) -> ProcessorResult<Option<Vec<u8>>> {
        self.inner.get(key)
    }
    fn apply(&self, batch: &StateBatch) -> ProcessorResult<()> {
        let stalled = self
            .stalls
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok();
        if stalled && !batch.is_empty() {
            std::thread::sleep(self.stall); // blocks the thread, as a write stall does
        }
        if !batch.is_empty() {
            self.writes.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.apply(batch)
    }
    fn meta(&self) -> ProcessorResult<Option<StoreMeta>> {
        self.inner.meta()
    }
    fn scan(&self, visit: &mut EntryVisitor<'_>) -> ProcessorResult<()> {
        self.inner.scan(visit)
    }
    fn snapshot_to(&self, dir: &Path) -> ProcessorResult<()> {
        self.inner.snapshot_to(dir)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_stalled_store_costs_no_claim_even_on_one_worker_thread() {
    integration_tests::init_tracing();
    let broker = TestBroker::start(TOPIC, 2).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 2_000,
        keys: 50,
        seed: 11,
        partitions: 2,
    };
    workload.produce(&brokers, TOPIC).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let mut services = Services::in_memory(root.path().join("shared")).unwrap();
    let claim_ttl = Duration::from_millis(600);
    let stalls = Arc::new(AtomicUsize::new(0));
    services.stores = Arc::new(StallingStores {
        inner: InMemoryStores,
        stalls: stalls.clone(),
        stall: claim_ttl * 3,
        writes: Arc::default(),
    });
    let config = InstanceConfig::new("a", TOPIC, 2, &brokers, root.path().join("state"))
        .with_claim_ttl(claim_ttl)
        .with_checkpoint_every(Duration::from_secs(60));
    let (handle, stop, status) = start(services, config);
    wait_for(
        &status,
        "both partitions owned",
        Duration::from_secs(20),
        |s| s.owned.len() == 2,
    )
    .await;
    let tokens = status.borrow().owned.clone();

    // Two stalls of three claim lifetimes each, then the rest of the input.
    stalls.store(2, Ordering::SeqCst);
    workload.produce(&brokers, TOPIC).await.unwrap();
    wait_for(
        &status,
        "all records processed",
        Duration::from_secs(60),
        |s| s.processed == 2 * workload.records,
    )
    .await;
    assert_eq!(stalls.load(Ordering::SeqCst), 0, "the stalls happened");
    let seen = status.borrow().clone();
    assert_eq!(
        seen.owned, tokens,
        "claims kept, same fencing tokens: {seen:?}"
    );
    assert!(seen.partition_errors.is_empty(), "{seen:?}");
    assert!(
        seen.hand_offs.iter().all(|h| h.event == "claimed"),
        "no partition was lost and claimed again: {:?}",
        seen.hand_offs
    );
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_partition_takes_no_new_checkpoints() {
    integration_tests::init_tracing();
    let broker = TestBroker::start(TOPIC, 1).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 300,
        keys: 10,
        seed: 12,
        partitions: 1,
    };
    workload
        .produce_range(&brokers, TOPIC, 0..200)
        .await
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let services = Services::in_memory(root.path().join("shared")).unwrap();
    let config = InstanceConfig::new("a", TOPIC, 1, &brokers, root.path().join("state"))
        .with_checkpoint_every(Duration::from_millis(100));
    let (handle, stop, status) = start(services, config);
    wait_for(
        &status,
        "processed and checkpointed",
        Duration::from_secs(20),
        |s| s.processed == 200 && s.checkpoints >= 1,
    )
    .await;
    // Let the checkpoint covering the last record land, then watch 15 intervals of idleness.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = status.borrow().checkpoints;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        status.borrow().checkpoints,
        before,
        "an idle partition took checkpoints"
    );
    // One more record: the partition is no longer idle, and checkpoints again.
    workload
        .produce_range(&brokers, TOPIC, 200..201)
        .await
        .unwrap();
    wait_for(
        &status,
        "a checkpoint after new input",
        Duration::from_secs(10),
        |s| s.checkpoints > before,
    )
    .await;
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_follow_the_commit_interval_not_the_status_reports() {
    integration_tests::init_tracing();
    let broker = TestBroker::start(TOPIC, 1).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 100,
        keys: 10,
        seed: 13,
        partitions: 1,
    };
    let root = tempfile::tempdir().unwrap();
    let mut services = Services::in_memory(root.path().join("shared")).unwrap();
    let writes = Arc::new(AtomicUsize::new(0));
    services.stores = Arc::new(StallingStores {
        inner: InMemoryStores,
        stalls: Arc::default(),
        stall: Duration::ZERO,
        writes: writes.clone(),
    });
    // Status every 100 ms, commits every 6 s (the record bound out of reach).
    let config = InstanceConfig::new("a", TOPIC, 1, &brokers, root.path().join("state"))
        .with_status_interval(Duration::from_millis(100))
        .with_commits(1_000_000, Duration::from_secs(6))
        .with_checkpoint_every(Duration::from_secs(60));
    let (handle, stop, status) = start(services, config);
    wait_for(
        &status,
        "the partition owned",
        Duration::from_secs(20),
        |s| s.owned.len() == 1,
    )
    .await;
    // Ten rounds of input, 150 ms apart: status reports fall between any two.
    let started = std::time::Instant::now();
    let before = writes.load(Ordering::SeqCst);
    for round in 0..10 {
        workload
            .produce_range(&brokers, TOPIC, round * 10..round * 10 + 10)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    wait_for(
        &status,
        "every record committed",
        Duration::from_secs(20),
        |s| s.processed == workload.records,
    )
    .await;
    let (commits, took) = (writes.load(Ordering::SeqCst) - before, started.elapsed());
    // One commit per 6 s that the input took to arrive, one for the last records, one of slack; a
    // status report (every 100 ms, ten of them at least between the rounds) is no commit.
    let allowed = (took.as_secs_f64() / 6.0) as usize + 2;
    assert!(
        commits <= allowed,
        "{commits} commits of input that arrived within {took:?} (at most {allowed} expected): status reports committed"
    );
    stop.cancel();
    handle.await.unwrap().unwrap();
}
