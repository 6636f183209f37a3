//! A fleet of processor instances in one process on the mock cluster: 3 instances over 8 partitions, one
//! stopped abruptly mid-stream and a fourth added; the state in the final checkpoints equals the exact
//! recomputation (no record lost or double-counted). Once with RocksDB partition stores, once with the
//! in-memory ones: the fleet only knows the `StoreFactory` trait.

// Test code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use processor::KafkaSettings;
use processor::dev::Workload;
use processor::inspect::checkpointed_aggregates;
use processor::source::high_watermark;
use processor::store::StoreFactory;
use processor::store::memory::InMemoryStores;
use processor::{Instance, InstanceConfig, MaintenanceConfig, Services};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use support::TestBroker;
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "orders";
const PARTITIONS: i32 = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_survives_an_abrupt_stop_and_a_join_with_exact_state() {
    abrupt_stop_and_join_is_exact(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_on_in_memory_stores_survives_an_abrupt_stop_and_a_join_with_exact_state() {
    abrupt_stop_and_join_is_exact(Some(Arc::new(InMemoryStores))).await;
}

/// The scenario, on the default RocksDB stores or on `stores`.
async fn abrupt_stop_and_join_is_exact(stores: Option<Arc<dyn StoreFactory>>) {
    integration_tests::init_tracing();
    let broker = TestBroker::start(TOPIC, PARTITIONS).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 24_000,
        keys: 64,
        seed: 3,
        partitions: PARTITIONS,
    };
    workload
        .produce_range(&brokers, TOPIC, 0..12_000)
        .await
        .unwrap();

    let root = tempfile::tempdir().unwrap();
    let mut services = Services::in_memory(root.path().join("shared")).unwrap();
    if let Some(stores) = stores {
        services.stores = stores;
    }
    let shared = services.checkpoints.clone();
    let start = |id: &str| {
        let config = InstanceConfig::new(id, TOPIC, PARTITIONS, &brokers, root.path().join(id))
            .with_checkpoint_every(Duration::from_millis(300))
            .with_claim_ttl(Duration::from_millis(1500))
            .with_maintenance(
                MaintenanceConfig::default()
                    .with_every(Duration::from_millis(500))
                    .with_keep_checkpoints(2)
                    .with_grace(Duration::from_millis(500)),
            );
        let stop = CancellationToken::new();
        let instance = Instance::new(config, services.clone()).unwrap();
        let status = instance.status();
        (tokio::spawn(instance.run(stop.clone())), stop, status)
    };
    let mut fleet = vec![start("a"), start("b"), start("c")];
    let b_status = fleet[1].2.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while b_status.borrow().owned.is_empty() || b_status.borrow().checkpoints == 0 {
        assert!(
            Instant::now() < deadline,
            "b never owned and checkpointed a partition"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b_owned: Vec<i32> = b_status.borrow().owned.keys().copied().collect();

    // "b" dies abruptly while the rest of the stream is still arriving: its tasks are aborted mid-batch,
    // nothing graceful happens. Its partitions go to the others (and to "d", which joins).
    let (crashed, _, _) = fleet.remove(1);
    crashed.abort();
    let _ = crashed.await;
    workload
        .produce_range(&brokers, TOPIC, 12_000..24_000)
        .await
        .unwrap();
    fleet.push(start("d"));
    let ends: Vec<i64> = (0..PARTITIONS)
        .map(|p| high_watermark(&KafkaSettings::new(&brokers), TOPIC, p).unwrap())
        .collect();
    assert_eq!(ends.iter().sum::<i64>(), 24_000);

    // Wait until every partition's latest checkpoint covers the whole partition.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let covered = (0..PARTITIONS).all(|p| {
            shared
                .latest_valid(TOPIC, p)
                .ok()
                .and_then(|(m, _)| m)
                .is_some_and(|m| m.next_offset >= ends[p as usize])
        });
        if covered {
            break;
        }
        assert!(Instant::now() < deadline, "the fleet did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Someone else took over b's partitions, with a newer claim.
    for p in &b_owned {
        let (manifest, _) = shared.latest_valid(TOPIC, *p).unwrap();
        assert!(manifest.unwrap().next_offset >= ends[*p as usize]);
    }
    // Fleet duties ran: one leader at a time scheduled the maintenance jobs, and they were claimed and
    // run (retention + compaction under the compaction lock) while checkpoints kept coming.
    let statuses: Vec<_> = fleet.iter().map(|(_, _, s)| s.borrow().clone()).collect();
    assert_eq!(
        statuses.iter().filter(|s| s.leader).count(),
        1,
        "exactly one leader: {statuses:?}"
    );
    assert!(
        statuses.iter().map(|s| s.compactions).sum::<u64>() > 0,
        "no maintenance job ran: {statuses:?}"
    );
    for (_, stop, _) in &fleet {
        stop.cancel();
    }
    for (handle, _, _) in fleet {
        handle.await.unwrap().unwrap();
    }
    // Lag tools see the fleet's progress: the group's committed offsets are the processed ones.
    let lag_tool: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "processor")
        .create()
        .unwrap();
    let mut wanted = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        wanted.add_partition(TOPIC, p);
    }
    let committed = lag_tool
        .committed_offsets(wanted, Duration::from_secs(10))
        .unwrap();
    for p in 0..PARTITIONS {
        let offset = committed.find_partition(TOPIC, p).unwrap().offset();
        assert_eq!(
            offset,
            Offset::Offset(ends[p as usize]),
            "partition {p}: the group's committed offset"
        );
    }
    // Retention kept the checkpoint history short (keep 2, plus at most the ones written since the last
    // maintenance run).
    for p in 0..PARTITIONS {
        let manifests = std::fs::read_dir(
            root.path()
                .join("shared")
                .join(TOPIC)
                .join(p.to_string())
                .join("manifests"),
        )
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".json")
        })
        .count();
        assert!(
            manifests <= 12,
            "partition {p} has {manifests} checkpoints: retention did not run"
        );
    }

    // The state in the final checkpoints is exactly the recomputation.
    let (state, skipped) =
        checkpointed_aggregates(shared.as_ref(), services.stores.as_ref(), TOPIC).unwrap();
    assert!(skipped.is_empty());
    let expected = workload.expected();
    assert_eq!(state.len(), expected.len());
    for (key, aggregate) in &expected {
        assert_eq!(
            state.get(key),
            Some(aggregate),
            "key {key}: lost, duplicated or reordered"
        );
    }
}

/// Two fleets (groups) on one topic and one Redis: every name they coordinate on is scoped by group, so
/// each processes the whole topic and ends exact — neither splits the partitions with the other nor
/// reads its checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_fleets_on_one_topic_and_one_redis_each_process_everything() {
    use processor::resources::checkpoint_root;

    integration_tests::init_tracing();
    let broker = TestBroker::start(TOPIC, PARTITIONS).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 6_000,
        keys: 40,
        seed: 9,
        partitions: PARTITIONS,
    };
    workload.produce(&brokers, TOPIC).await.unwrap();
    let ends: Vec<i64> = (0..PARTITIONS)
        .map(|p| high_watermark(&KafkaSettings::new(&brokers), TOPIC, p).unwrap())
        .collect();
    let redis = integration_tests::RedisServer::start_new();
    let root = tempfile::tempdir().unwrap();
    let mut fleets = Vec::new();
    for group in ["billing", "search"] {
        let services = Services::connect(
            &redis.url(),
            checkpoint_root(&root.path().join("ck"), group),
        )
        .await
        .unwrap();
        let mut members = Vec::new();
        for id in ["a", "b"] {
            let config = InstanceConfig::new(
                id,
                TOPIC,
                PARTITIONS,
                &brokers,
                root.path().join("state").join(id),
            )
            .with_group(group)
            .with_checkpoint_every(Duration::from_millis(300))
            .with_claim_ttl(Duration::from_millis(1500));
            let stop = CancellationToken::new();
            let instance = Instance::new(config, services.clone()).unwrap();
            members.push((tokio::spawn(instance.run(stop.clone())), stop));
        }
        fleets.push((group, services, members));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for (group, services, _) in &fleets {
        loop {
            let covered = (0..PARTITIONS).all(|p| {
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
                "fleet {group} never covered the whole topic: the fleets split the partitions"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let expected = workload.expected();
    for (group, services, members) in fleets {
        for (_, stop) in &members {
            stop.cancel();
        }
        for (handle, _) in members {
            handle.await.unwrap().unwrap();
        }
        let (state, _) = checkpointed_aggregates(
            services.checkpoints.as_ref(),
            services.stores.as_ref(),
            TOPIC,
        )
        .unwrap();
        assert_eq!(
            state, expected,
            "fleet {group}: its state is the whole topic's"
        );
    }
}

/// A runtime too busy to renew (here: the test blocks the only runtime thread for three claim TTLs
/// right after a mass claim) never starts a partition on a claim that lapsed meanwhile: the start
/// checks the claim's safe deadline first, and the partition is claimed again under a new token.
/// Before, the start went on with the old token until the keeper noticed the loss.
#[tokio::test(flavor = "current_thread")]
async fn a_partition_is_never_started_on_a_claim_that_lapsed_during_its_start() {
    use std::collections::{BTreeMap, BTreeSet};

    let broker = TestBroker::start(TOPIC, PARTITIONS).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 2_000,
        keys: 40,
        seed: 21,
        partitions: PARTITIONS,
    };
    workload.produce(&brokers, TOPIC).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let services = Services::in_memory(root.path().join("ck")).unwrap();
    let ttl = Duration::from_millis(500);
    let config = InstanceConfig::new("a", TOPIC, PARTITIONS, &brokers, root.path().join("a"))
        .with_claim_ttl(ttl);
    let instance = Instance::new(config, services).unwrap();
    let status = instance.status();
    let stop = CancellationToken::new();
    let run = tokio::spawn(instance.run(stop.clone()));
    // The moment claims exist: which (partition, token) were taken, and which already run.
    let claimed = loop {
        let now = status.borrow().clone();
        if !now.owned.is_empty() {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let before: BTreeMap<i32, u64> = claimed.owned.clone();
    let already: BTreeSet<i32> = claimed
        .partition_status
        .iter()
        .filter(|(_, p)| p.processing)
        .map(|(partition, _)| *partition)
        .collect();
    std::thread::sleep(3 * ttl); // the whole runtime stops: no renewal, no step
    let mut late_starts = Vec::new();
    let watch_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < watch_until {
        for (partition, p) in &status.borrow().partition_status {
            let lapsed = before.get(partition) == Some(&p.fencing_token);
            if p.processing && lapsed && !already.contains(partition) {
                late_starts.push((*partition, p.fencing_token));
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    late_starts.dedup();
    assert!(
        late_starts.is_empty(),
        "partitions started on claims that had lapsed (partition, token): {late_starts:?}"
    );
    let after = status.borrow().clone();
    assert_eq!(
        after.owned.len(),
        PARTITIONS as usize,
        "all claimed again under new tokens: {after:?}"
    );
    stop.cancel();
    run.await.unwrap().unwrap();
}

/// The lock backend loses its fencing counters (a Redis without `appendonly` restarted): fresh claims
/// get tokens far below those already in the partitions' state. The instance sees it at the start
/// (a fresh claim cannot be older than what is recorded), raises the counters past the recorded
/// tokens, claims again, and goes on processing with exact state — no operator, no thousand failed
/// claims while the counter climbs back by one per attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fencing_counter_reset_is_repaired_without_an_operator() {
    use processor::resources::{checkpoint_root, partition_resource};

    let broker = TestBroker::start(TOPIC, PARTITIONS).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 2_000,
        keys: 40,
        seed: 17,
        partitions: PARTITIONS,
    };
    workload
        .produce_range(&brokers, TOPIC, 0..1_000)
        .await
        .unwrap();
    let redis = integration_tests::RedisServer::start_new(); // no appendonly: a restart loses it all
    let root = tempfile::tempdir().unwrap();
    let services = Services::connect(
        &redis.url(),
        checkpoint_root(&root.path().join("ck"), "processor"),
    )
    .await
    .unwrap();
    // The counters of a long-lived fleet: every partition's tokens are in the thousands.
    for partition in 0..PARTITIONS {
        let resource = partition_resource("processor", TOPIC, partition);
        services
            .lock
            .raise_fencing_counter(&resource, 5_000)
            .await
            .unwrap();
    }
    let config = || {
        InstanceConfig::new("a", TOPIC, PARTITIONS, &brokers, root.path().join("a"))
            .with_checkpoint_every(Duration::from_millis(300))
            .with_claim_ttl(Duration::from_millis(1_500))
    };
    let processed_through = |status: &processor::InstanceStatus, end: &[i64]| {
        (0..PARTITIONS).all(|p| {
            status
                .partition_status
                .get(&p)
                .is_some_and(|s| s.next_offset >= end[p as usize])
        })
    };
    let ends = |records: u64| -> Vec<i64> {
        (0..PARTITIONS)
            .map(|p| (0..records).filter(|i| workload.record(*i).0 == p).count() as i64)
            .collect()
    };
    let first_ends = ends(1_000);
    let (run, stop, status) = support::start_instance(services.clone(), config());
    let before = support::wait_for(&status, "the first run", Duration::from_secs(60), |s| {
        processed_through(s, &first_ends)
    })
    .await;
    assert!(
        before.owned.values().all(|token| *token > 5_000),
        "{before:?}"
    );
    stop.cancel();
    run.await.unwrap().unwrap();

    redis.restart(); // every counter (and lease) is gone: the next grants start at 1
    workload
        .produce_range(&brokers, TOPIC, 1_000..2_000)
        .await
        .unwrap();
    let all_ends = ends(2_000);
    let (run, stop, status) = support::start_instance(services.clone(), config());
    let after = support::wait_for(
        &status,
        "processing on after the reset",
        Duration::from_secs(60),
        |s| processed_through(s, &all_ends),
    )
    .await;
    assert!(
        after.owned.values().all(|token| *token > 5_000),
        "claimed again above every recorded token: {:?}",
        after.owned
    );
    stop.cancel();
    run.await.unwrap().unwrap();
    let (state, _) = checkpointed_aggregates(
        services.checkpoints.as_ref(),
        services.stores.as_ref(),
        TOPIC,
    )
    .unwrap();
    assert_eq!(state, workload.expected(), "exact through the reset");
}
