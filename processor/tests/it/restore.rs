//! Restores are atomic, and a local state directory that does not open (a crash of an older release
//! half-way through a restore, a damaged disk) is moved aside and replaced from the checkpoint, instead
//! of failing the partition forever.

// Test code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::time::{Duration, Instant};

use processor::dev::Workload;
use processor::inspect::checkpointed_aggregates;
use processor::resources::local_state_dir;
use processor::{InstanceConfig, Services};
use support::{Running, TestBroker, start_instance};

const TOPIC: &str = "orders";

fn start(services: &Services, brokers: &str, id: &str, state_dir: &std::path::Path) -> Running {
    start_with(services, config(brokers, id, state_dir))
}

/// The configuration of instance `id`: one partition, checkpoints every 200 ms.
fn config(brokers: &str, id: &str, state_dir: &std::path::Path) -> InstanceConfig {
    InstanceConfig::new(id, TOPIC, 1, brokers, state_dir.to_path_buf())
        .with_checkpoint_every(Duration::from_millis(200))
}

fn start_with(services: &Services, config: InstanceConfig) -> Running {
    start_instance(services.clone(), config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_state_that_does_not_open_is_moved_aside_and_restored() {
    integration_tests::init_tracing();
    let broker = TestBroker::start(TOPIC, 1).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 2_000,
        keys: 20,
        seed: 8,
        partitions: 1,
    };
    workload
        .produce_range(&brokers, TOPIC, 0..1_000)
        .await
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let state_dir = root.path().join("state");
    let services = Services::in_memory(root.path().join("ck")).unwrap();
    // First life: process the first half and hand off (a final checkpoint).
    first_life(&services, &brokers, &state_dir, 1_000).await;

    // The local directory is left as a crash half-way through an old, in-place restore leaves it.
    let local = local_state_dir(&state_dir, "processor", TOPIC, 0);
    std::fs::remove_dir_all(&local).unwrap();
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(local.join("CURRENT"), b"MANIFEST-000009\n").unwrap();

    // Second life: the partition restores and goes on; the broken directory is kept beside it.
    workload
        .produce_range(&brokers, TOPIC, 1_000..2_000)
        .await
        .unwrap();
    let (handle, stop, status) = start(&services, &brokers, "a", &state_dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let covered = services
            .checkpoints
            .latest_valid(TOPIC, 0)
            .unwrap()
            .0
            .is_some_and(|m| m.next_offset >= 2_000);
        if covered {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the partition never recovered: {:?}",
            status.borrow()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status.borrow().restores, 1);
    stop.cancel();
    handle.await.unwrap().unwrap();
    let aside = std::fs::read_dir(local.parent().unwrap())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".unreadable-"))
        .count();
    assert_eq!(aside, 1, "the unreadable directory is kept for inspection");
    let (state, _) = checkpointed_aggregates(
        services.checkpoints.as_ref(),
        services.stores.as_ref(),
        TOPIC,
    )
    .unwrap();
    assert_eq!(state, workload.expected(), "exact across the restore");
}

/// Runs one instance over `services` until partition 0 has processed `records` and checkpointed once,
/// then stops it gracefully (a final checkpoint and record, unless the last one already covers the
/// partition's offset: an idle partition takes none).
async fn first_life(services: &Services, brokers: &str, state_dir: &std::path::Path, records: u64) {
    let (handle, stop, status) = start(services, brokers, "a", state_dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    while status.borrow().processed < records || status.borrow().checkpoints < 1 {
        assert!(Instant::now() < deadline, "the first life did not process");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    handle.await.unwrap().unwrap();
}

/// The newest manifest of partition 0: the checkpoint of record after a graceful stop.
fn newest_manifest(checkpoints: &std::path::Path) -> std::path::PathBuf {
    let dir = checkpoints.join(TOPIC).join("0").join("manifests");
    let mut manifests: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    manifests.sort();
    manifests.pop().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_checkpoint_of_record_refuses_instead_of_starting_empty() {
    integration_tests::init_tracing();
    let broker = TestBroker::start(TOPIC, 1).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 500,
        keys: 10,
        seed: 4,
        partitions: 1,
    };
    workload.produce(&brokers, TOPIC).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let (state_dir, checkpoints) = (root.path().join("state"), root.path().join("ck"));
    let services = Services::in_memory(&checkpoints).unwrap();
    first_life(&services, &brokers, &state_dir, 500).await;

    // The new owner has no local state, and the recorded checkpoint cannot be read (its manifest is
    // replaced by a directory: reading it is an I/O error, as with a permission error or a bad mount).
    std::fs::remove_dir_all(local_state_dir(&state_dir, "processor", TOPIC, 0)).unwrap();
    let recorded = newest_manifest(&checkpoints);
    std::fs::remove_file(&recorded).unwrap();
    std::fs::create_dir(&recorded).unwrap();

    let (handle, stop, status) = start(&services, &brokers, "b", &root.path().join("state-b"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let error = loop {
        if let Some(error) = status.borrow().partition_errors.get(&0) {
            break error.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no refusal: {:?}",
            status.borrow()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(error.contains("cannot be read"), "{error}");
    assert_eq!(
        status.borrow().processed,
        0,
        "nothing was replayed into empty state"
    );
    stop.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_checkpoint_of_record_falls_back_to_an_older_one_and_says_so() {
    integration_tests::init_tracing();
    let broker = TestBroker::start(TOPIC, 1).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 500,
        keys: 10,
        seed: 6,
        partitions: 1,
    };
    let root = tempfile::tempdir().unwrap();
    let (state_dir, checkpoints) = (root.path().join("state"), root.path().join("ck"));
    let services = Services::in_memory(&checkpoints).unwrap();
    // Two checkpoints at different offsets: one to corrupt, an older one to fall back to.
    workload
        .produce_range(&brokers, TOPIC, 0..250)
        .await
        .unwrap();
    first_life(&services, &brokers, &state_dir, 250).await;
    workload
        .produce_range(&brokers, TOPIC, 250..500)
        .await
        .unwrap();
    first_life(&services, &brokers, &state_dir, 250).await;
    std::fs::remove_dir_all(local_state_dir(&state_dir, "processor", TOPIC, 0)).unwrap();
    // Corrupt the recorded checkpoint's manifest (unparsable: damage, not an I/O failure).
    std::fs::write(newest_manifest(&checkpoints), b"{ not a manifest").unwrap();

    let (handle, stop, status) = start(&services, &brokers, "b", &root.path().join("state-b"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while status.borrow().checkpoints == 0 {
        assert!(
            Instant::now() < deadline,
            "no progress: {:?}",
            status.borrow()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    handle.await.unwrap().unwrap();
    let seen = status.borrow().clone();
    assert!(seen.corrupt_checkpoints_skipped >= 1, "{seen:?}");
    assert_eq!(
        seen.restores, 1,
        "the older checkpoint was restored: {seen:?}"
    );
    assert!(seen.partition_errors.is_empty(), "{seen:?}");
    let (state, _) = checkpointed_aggregates(
        services.checkpoints.as_ref(),
        services.stores.as_ref(),
        TOPIC,
    )
    .unwrap();
    assert_eq!(
        state,
        workload.expected(),
        "exact after the fallback and replay"
    );
}

/// A hand-off whose final checkpoint finds retention holding the compaction lock takes it again instead
/// of releasing the partition without it (the successor would restore an older checkpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_off_takes_its_final_checkpoint_again_when_retention_held_the_lock() {
    use processor::resources::compaction_resource;

    integration_tests::init_tracing();
    let broker = TestBroker::start(TOPIC, 1).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 500,
        keys: 10,
        seed: 3,
        partitions: 1,
    };
    workload
        .produce_range(&brokers, TOPIC, 0..300)
        .await
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let services = Services::in_memory(root.path().join("ck")).unwrap();
    let (handle, stop, status) = start_with(
        &services,
        config(&brokers, "a", &root.path().join("state"))
            .with_claim_ttl(Duration::from_millis(1_000)),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while status.borrow().processed < 300 || status.borrow().checkpoints == 0 {
        assert!(Instant::now() < deadline, "no first checkpoint");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Retention (played by the test) holds the compaction lock while the rest arrives and the owner
    // hands off: every checkpoint meanwhile is skipped.
    let retention = services
        .lock
        .acquire(
            &compaction_resource("processor", TOPIC, 0),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    workload
        .produce_range(&brokers, TOPIC, 300..500)
        .await
        .unwrap();
    while status.borrow().processed < 500 {
        assert!(Instant::now() < deadline, "the rest was not processed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    // The first final attempt waits a claim (1 s) behind the upload in flight (up to 1 s), then gives up.
    tokio::time::sleep(Duration::from_millis(2_600)).await;
    retention.release().await.unwrap();
    handle.await.unwrap().unwrap();
    let (latest, _) = services.checkpoints.latest_valid(TOPIC, 0).unwrap();
    assert_eq!(
        latest.map(|m| m.next_offset),
        Some(500),
        "the hand-off's final checkpoint landed after retention let go"
    );
}
