//! Standby replicas: an instance that keeps a standby copy of a partition refreshes it from the
//! partition's checkpoints, and when the owner dies it starts from that copy — nothing restored — and
//! the state stays exact. Without standbys the same takeover restores the checkpoint (the counters can
//! tell the two apart).

// Test code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::time::Duration;

use processor::checkpoint::ObjectCheckpointStore;
use processor::dev::Workload;
use processor::inspect::checkpointed_aggregates;
use processor::{InstanceConfig, Services};
use support::{TestBroker, start_instance, wait_for};

const TOPIC: &str = "orders";

/// Returns the successor's restores, starts from a local copy, and of those the starts that took a
/// standby's copy over already open.
async fn owner_dies_and_the_other_instance_takes_over(standby_replicas: usize) -> (u64, u64, u64) {
    let root = tempfile::tempdir().unwrap();
    let services = Services::in_memory(root.path().join("checkpoints")).unwrap();
    owner_dies_and_the_other_instance_takes_over_on(services, standby_replicas).await
}

/// [`owner_dies_and_the_other_instance_takes_over`] with the checkpoints in `services`.
async fn owner_dies_and_the_other_instance_takes_over_on(
    services: Services,
    standby_replicas: usize,
) -> (u64, u64, u64) {
    integration_tests::init_tracing();
    let broker = TestBroker::start(TOPIC, 1).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 6_000,
        keys: 500,
        seed: 5,
        partitions: 1,
    };
    workload
        .produce_range(&brokers, TOPIC, 0..4_000)
        .await
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let config = |id: &str| {
        InstanceConfig::new(id, TOPIC, 1, &brokers, root.path().join(id))
            .with_checkpoint_every(Duration::from_millis(300))
            .with_claim_ttl(Duration::from_millis(1_500))
            .with_standby_replicas(standby_replicas)
    };
    // "a" is the member the assignment gives the partition when both are in the fleet.
    let members = ["a".to_owned(), "b".to_owned()];
    let (first, second) = match processor::fleet::membership::owner_of(TOPIC, 1, 0, &members) {
        Some("a") => ("a", "b"),
        _ => ("b", "a"),
    };
    let (a, _, a_status) = start_instance(services.clone(), config(first));
    let a_now = wait_for(
        &a_status,
        "a to own the partition",
        Duration::from_secs(30),
        |s| !s.owned.is_empty(),
    )
    .await;
    assert!(a_now.owned.contains_key(&0));
    let (b, b_stop, b_status) = start_instance(services.clone(), config(second));
    // a checkpoints everything; b's copy (if it keeps one) follows the last checkpoint.
    wait_for(
        &a_status,
        "a to process and checkpoint",
        Duration::from_secs(60),
        |s| {
            s.partition_status
                .get(&0)
                .is_some_and(|p| p.next_offset == 4_000)
                && s.checkpoints > 0
        },
    )
    .await;
    let b_now = if standby_replicas > 0 {
        wait_for(
            &b_status,
            "b's standby copy to catch up",
            Duration::from_secs(60),
            |s| s.standbys.get(&0) == Some(&Some(4_000)),
        )
        .await
    } else {
        tokio::time::sleep(Duration::from_secs(1)).await;
        b_status.borrow().clone()
    };
    assert!(b_now.owned.is_empty(), "b owns nothing yet: {b_now:?}");

    // a dies abruptly: no hand-off, no final checkpoint. Its claim stays held for a few ticks, as a
    // crashed owner's lease does until its TTL runs out: b's first attempts to claim fail (and its
    // standby must still be there when a claim finally succeeds).
    a.abort();
    let _ = a.await;
    // (a's claim is released in the background as a is dropped: take it as soon as it is free — b
    // only tries once per 250 ms tick, so this almost always comes first.)
    let claim = processor::resources::partition_resource(&config(second).group, TOPIC, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let held = loop {
        match services
            .lock
            .try_acquire(&claim, Duration::from_secs(10))
            .await
        {
            Ok(Some(guard)) => break Some(guard),
            _ if b_status.borrow().owned.contains_key(&0) => break None,
            _ => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "a's claim was never released"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    };
    if let Some(held) = held {
        tokio::time::sleep(Duration::from_millis(800)).await;
        held.release().await.unwrap();
    }
    workload
        .produce_range(&brokers, TOPIC, 4_000..6_000)
        .await
        .unwrap();
    let b_after = wait_for(
        &b_status,
        "b to take over and catch up",
        Duration::from_secs(60),
        |s| {
            s.partition_status
                .get(&0)
                .is_some_and(|p| p.next_offset == 6_000)
        },
    )
    .await;
    assert!(
        b_after.standbys.is_empty(),
        "an owner keeps no standby of its own partition"
    );
    b_stop.cancel();
    b.await.unwrap().unwrap();

    let (state, skipped) = checkpointed_aggregates(
        services.checkpoints.as_ref(),
        services.stores.as_ref(),
        TOPIC,
    )
    .unwrap();
    assert!(skipped.is_empty());
    assert_eq!(state, workload.expected(), "exact through the takeover");
    (
        b_after.restores,
        b_after.local_starts,
        b_after.open_copy_starts,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_from_its_warm_copy_without_restoring() {
    let starts = owner_dies_and_the_other_instance_takes_over(1).await;
    assert_eq!(
        starts,
        (0, 1, 1),
        "(restores, local starts, open-copy starts): the standby's open copy is taken over"
    );
}

/// The same with the checkpoints in object storage (`object_store`'s in-memory store): the standby's
/// copy is refreshed from there, incrementally, and taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_refreshed_from_object_storage_takes_over_without_restoring() {
    let bucket = std::sync::Arc::new(object_store::memory::InMemory::new());
    let store =
        ObjectCheckpointStore::new(bucket, "checkpoints".into(), "memory://checkpoints").unwrap();
    let services = Services::in_memory_with(std::sync::Arc::new(store));
    let starts = owner_dies_and_the_other_instance_takes_over_on(services, 1).await;
    assert_eq!(
        starts,
        (0, 1, 1),
        "(restores, local starts, open-copy starts): the standby's open copy is taken over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_standbys_the_same_takeover_restores_the_checkpoint() {
    let starts = owner_dies_and_the_other_instance_takes_over(0).await;
    assert_eq!(
        starts,
        (1, 0, 0),
        "(restores, local starts, open-copy starts)"
    );
}

/// An instance dropped abruptly (its `run` future aborted, as a crashed embedder's task is) leaves no
/// task of its own behind: its standby's task ends with it, instead of holding the instance (or its
/// partition tasks' context) and swapping the partition's directory under a later owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_instance_leaves_no_standby_task_behind() {
    let broker = TestBroker::start(TOPIC, 1).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 500,
        keys: 50,
        seed: 9,
        partitions: 1,
    };
    workload.produce(&brokers, TOPIC).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let services = Services::in_memory(root.path().join("checkpoints")).unwrap();
    let config = |id: &str| {
        InstanceConfig::new(id, TOPIC, 1, &brokers, root.path().join(id))
            .with_checkpoint_every(Duration::from_millis(200))
            .with_standby_replicas(1)
    };
    let members = ["a".to_owned(), "b".to_owned()];
    let (owner, follower) = match processor::fleet::membership::owner_of(TOPIC, 1, 0, &members) {
        Some("a") => ("a", "b"),
        _ => ("b", "a"),
    };
    let (_owner, owner_stop, owner_status) = start_instance(services.clone(), config(owner));
    wait_for(&owner_status, "the owner", Duration::from_secs(30), |s| {
        s.owned.contains_key(&0) && s.checkpoints > 0
    })
    .await;
    let standby = processor::Instance::new(config(follower), services.clone()).unwrap();
    let weak = std::sync::Arc::downgrade(&standby);
    let status = standby.status();
    let run = tokio::spawn(standby.run(tokio_util::sync::CancellationToken::new()));
    wait_for(&status, "a standby copy", Duration::from_secs(30), |s| {
        matches!(s.standbys.get(&0), Some(Some(_)))
    })
    .await;
    run.abort();
    let _ = run.await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while weak.upgrade().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dropped instance is still held 5 s later (by a task of its own)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its partition tasks' shared context (which the standby's task holds) is gone too: the last
    // sender of the status is dropped with it, closing the channel.
    while status.has_changed().is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dropped instance's task context is still held 5 s later (by a standby's task)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    owner_stop.cancel();
}
