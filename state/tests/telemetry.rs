//! The crate's metrics (see `state::telemetry`), read from a recorder installed for the test's thread:
//! each lock operation is counted with its backend and outcome, retries and lost keepers are counted,
//! leadership publishes its term, and the task queue its events.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use state::recipes::keeper::{KeptLock, RenewalPolicy};
use state::recipes::leader::LeaderElection;
use state::recipes::tasks::{InMemoryTaskStore, TaskQueue};
use state::{DistributedLock, InMemoryDistributedLock, RetryConfig};

/// Counter and gauge values by `name{label=value,…}` (labels sorted).
fn values(snapshotter: &Snapshotter) -> std::collections::BTreeMap<String, f64> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let (_, key) = key.into_parts();
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            #[allow(clippy::cast_precision_loss)]
            match value {
                DebugValue::Counter(n) => (name, n as f64),
                DebugValue::Gauge(x) => (name, x.into_inner()),
                DebugValue::Histogram(samples) => (name, samples.len() as f64),
            }
        })
        .collect()
}

/// Runs `work` on a current-thread runtime with a recorder of its own; returns what was recorded.
fn recorded<F: std::future::Future<Output = ()>>(
    work: impl FnOnce() -> F,
) -> std::collections::BTreeMap<String, f64> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(work());
    });
    values(&snapshotter)
}

#[test]
fn lock_operations_are_counted_by_backend_and_outcome() {
    let seen = recorded(|| async {
        let locks = InMemoryDistributedLock::new().with_retry(RetryConfig {
            max_attempts: 3,
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            ..RetryConfig::default()
        });
        let mut held = locks
            .acquire("orders:1", Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            locks
                .try_acquire("orders:1", Duration::from_secs(5))
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            locks
                .acquire("orders:1", Duration::from_secs(5))
                .await
                .is_err()
        );
        held.extend(Duration::from_secs(5)).await.unwrap();
        held.release().await.unwrap();
    });
    let at = |key: &str| seen.get(key).copied().unwrap_or(0.0);
    assert_eq!(
        at("state_lock_acquire_attempts_total{backend=memory,outcome=acquired}"),
        1.0,
        "{seen:#?}"
    );
    // One try_acquire, then an acquire of three attempts, all on the held lock.
    assert_eq!(
        at("state_lock_acquire_attempts_total{backend=memory,outcome=contended}"),
        4.0
    );
    assert_eq!(at("state_lock_acquire_retries_total{backend=memory}"), 2.0);
    assert_eq!(
        at("state_lock_extends_total{backend=memory,outcome=ok}"),
        1.0
    );
    assert_eq!(
        at("state_lock_releases_total{backend=memory,outcome=ok}"),
        1.0
    );
    assert_eq!(
        at(
            "state_lock_operation_duration_seconds{backend=memory,operation=acquire,outcome=contended}"
        ),
        4.0,
        "one latency sample per attempt"
    );
}

#[test]
fn a_lost_keeper_leadership_and_tasks_are_counted() {
    let seen = recorded(|| async {
        let locks: Arc<dyn DistributedLock> = Arc::new(InMemoryDistributedLock::new());
        // A keeper that may renew once only: its lock runs out and is declared lost.
        let kept = KeptLock::acquire(
            &locks,
            "claim:0",
            Duration::from_millis(300),
            RenewalPolicy::default().with_max_renewals(0),
        )
        .await
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), kept.lost())
            .await
            .unwrap();

        let election =
            LeaderElection::new(locks.clone(), "g", "me", Duration::from_secs(5)).unwrap();
        assert!(election.try_become_leader().await.unwrap());

        let queue = TaskQueue::new(
            locks.clone(),
            Arc::new(InMemoryTaskStore::default()),
            Duration::from_secs(5),
        );
        queue.enqueue(b"job", None).await.unwrap();
        let run = queue.run_next(|_, _| async { Ok(()) }).await.unwrap();
        assert!(run.is_some());
    });
    let at = |key: &str| seen.get(key).copied().unwrap_or(0.0);
    assert_eq!(
        at("state_locks_lost_total{backend=memory}"),
        1.0,
        "{seen:#?}"
    );
    assert_eq!(at("state_leader_changes_total{election=leader:g}"), 1.0);
    assert!(at("state_leader_term{election=leader:g}") > 0.0);
    assert_eq!(at("state_tasks_total{event=claimed}"), 1.0);
    assert_eq!(at("state_tasks_total{event=completed}"), 1.0);
}
