//! Partitions added to the topic while the fleet runs are found (the partition count is read again from
//! the brokers), claimed and consumed, and the state ends exact. A real broker: the mock cluster cannot
//! add partitions.

// Test code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::time::{Duration, Instant};

use processor::KafkaSettings;
use processor::dev::{Workload, admin};
use processor::inspect::checkpointed_aggregates;
use processor::source::high_watermark;
use processor::store::rocksdb::RocksDbStores;
use processor::{Instance, InstanceConfig, Services};
use support::TestBroker;
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "orders";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_added_while_running_are_claimed_and_consumed() {
    integration_tests::init_tracing();
    let broker = TestBroker::kafka(TOPIC, 2).await;
    let brokers = broker.bootstrap_servers();
    let root = tempfile::tempdir().unwrap();
    let services = Services::in_memory(root.path().join("shared")).unwrap();
    let start = |id: &str| {
        let config = InstanceConfig::new(id, TOPIC, 2, &brokers, root.path().join(id))
            .with_checkpoint_every(Duration::from_millis(300))
            .with_topology_refresh(Some(Duration::from_millis(500)));
        let instance = Instance::new(config, services.clone()).unwrap();
        let status = instance.status();
        let stop = CancellationToken::new();
        (tokio::spawn(instance.run(stop.clone())), stop, status)
    };
    let fleet = [start("a"), start("b")];
    let owned = |fleet: &[(
        _,
        _,
        tokio::sync::watch::Receiver<processor::InstanceStatus>,
    )]| {
        fleet
            .iter()
            .map(|(_, _, status)| status.borrow().owned.len())
            .sum::<usize>()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while owned(&fleet) < 2 {
        assert!(
            Instant::now() < deadline,
            "the fleet never owned both partitions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The topic grows to 4 partitions; the workload (keyed over 4 partitions) arrives after.
    admin::add_partitions(&brokers, TOPIC, 4).await.unwrap();
    let workload = Workload {
        records: 4_000,
        keys: 40,
        seed: 11,
        partitions: 4,
    };
    workload.produce(&brokers, TOPIC).await.unwrap();
    let ends: Vec<i64> = (0..4)
        .map(|p| high_watermark(&KafkaSettings::new(&brokers), TOPIC, p).unwrap())
        .collect();
    assert!(
        ends[2] > 0 && ends[3] > 0,
        "the new partitions have records: {ends:?}"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let covered = (0..4).all(|p| {
            services
                .checkpoints
                .latest_valid(TOPIC, p)
                .ok()
                .and_then(|(m, _)| m)
                .is_some_and(|m| m.next_offset >= ends[p as usize])
        });
        if covered {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new partitions were not consumed: {:?}",
            fleet
                .iter()
                .map(|(_, _, s)| s.borrow().clone())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (_, _, status) in &fleet {
        assert_eq!(
            status.borrow().partitions,
            4,
            "every instance saw the new count"
        );
    }
    for (_, stop, _) in &fleet {
        stop.cancel();
    }
    for (handle, _, _) in fleet {
        handle.await.unwrap().unwrap();
    }
    let (state, skipped) = checkpointed_aggregates(
        services.checkpoints.as_ref(),
        &RocksDbStores::new(8 << 20, 4 << 20),
        TOPIC,
    )
    .unwrap();
    assert!(skipped.is_empty());
    assert_eq!(state, workload.expected(), "the state is exact");
}
