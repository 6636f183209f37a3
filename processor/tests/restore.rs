//! Restores are atomic, and a local state directory that does not open (a crash of an older release
//! half-way through a restore, a damaged disk) is moved aside and replaced from the checkpoint, instead
//! of failing the partition forever.

// Test code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use processor::dev::{DevBroker, Workload};
use processor::inspect::checkpointed_aggregates;
use processor::resources::local_state_dir;
use processor::{Instance, InstanceConfig, Services};
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "orders";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_state_that_does_not_open_is_moved_aside_and_restored() {
    integration_tests::init_tracing();
    let broker = DevBroker::start(TOPIC, 1).unwrap();
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
    let run = |services: Services| {
        let config = InstanceConfig::new("a", TOPIC, 1, &brokers, state_dir.clone())
            .with_checkpoint_every(Duration::from_millis(200));
        let instance = Instance::new(config, services).unwrap();
        let status = instance.status();
        let stop = CancellationToken::new();
        (tokio::spawn(instance.run(stop.clone())), stop, status)
    };

    // First life: process the first half and hand off (a final checkpoint).
    let (handle, stop, status) = run(services.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while status.borrow().processed < 1_000 || status.borrow().checkpoints == 0 {
        assert!(
            Instant::now() < deadline,
            "the first half was not processed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    handle.await.unwrap().unwrap();

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
    let (handle, stop, status) = run(services.clone());
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
