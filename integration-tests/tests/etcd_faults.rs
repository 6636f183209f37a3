//! The etcd backend under real faults, beyond the conformance suite: the leader killed while locks are
//! held and acquires are in flight, a client frozen behind the fault proxy whose late fenced writes
//! must be rejected, a member cut off from its peers that must not grant, and waiting that wakes on the
//! release itself (a watch), not on a poll; and renewals that leave no lease behind.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration_tests::EtcdCluster;
use integration_tests::adapters::ProxiedEtcd;
use state::recipes::fenced::{EtcdFencedStore, FencedStore};
use state::recipes::keeper::{KeptLock, RenewalPolicy};
use state::{DistributedLock, EtcdDistributedLock, RetryConfig, StateError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

async fn connect(url: &str) -> EtcdDistributedLock {
    EtcdDistributedLock::new(url)
        .await
        .unwrap_or_else(|err| panic!("connect to {url}: {err}"))
}

/// One successful critical section of the leader-kill run.
#[derive(Debug, Clone, Copy)]
struct Entry {
    at: Instant,
    token: u64,
}

/// What the contenders of the leader-kill run saw.
#[derive(Default)]
struct Contention {
    inside: AtomicUsize,
    overlaps: AtomicUsize,
    /// Critical sections that ended after the holder's safe deadline (the lock may have been free).
    overran: AtomicUsize,
    errors: AtomicUsize,
    /// In lock order: pushed while inside.
    entries: Mutex<Vec<Entry>>,
}

impl Contention {
    fn entries(&self) -> Vec<Entry> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Acquires `resource` over and over until `stop`, holding it 20 ms each time.
async fn contend(
    lock: EtcdDistributedLock,
    resource: &str,
    seen: Arc<Contention>,
    stop: CancellationToken,
) {
    const TTL: Duration = Duration::from_secs(3);
    while !stop.is_cancelled() {
        let guard = match lock
            .acquire_within(resource, TTL, Duration::from_secs(2))
            .await
        {
            Ok(guard) => guard,
            Err(StateError::LockNotAcquired { .. }) => continue,
            Err(err) => {
                tracing::debug!(error = %err, "acquire failed (failover)");
                seen.errors.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if seen.inside.fetch_add(1, Ordering::SeqCst) != 0 {
            seen.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        seen.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Entry {
                at: Instant::now(),
                token: guard.fencing_token(),
            });
        tokio::time::sleep(Duration::from_millis(20)).await;
        if guard.is_expired() {
            seen.overran.fetch_add(1, Ordering::SeqCst);
        }
        seen.inside.fetch_sub(1, Ordering::SeqCst);
        // During the failover the release may fail: the lease then frees the lock within its TTL.
        if let Err(err) = guard.release().await {
            tracing::debug!(error = %err, "release failed (failover)");
        }
    }
}

/// Kill the etcd leader while three locks are held and four clients keep acquiring a fourth: never two
/// holders, tokens keep increasing across the new leader's term, service resumes within 10 s, the held
/// locks stay held through the failover and their holder can release them after it; then the old
/// leader comes back as a follower and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_keeps_one_holder_and_increasing_tokens() {
    integration_tests::init_tracing();
    let cluster = EtcdCluster::three();
    let url = cluster.url("leaderkill");
    let holder = connect(&url).await;
    let mut held = Vec::new();
    for i in 0..3 {
        let guard = holder
            .acquire(&format!("held-{i}"), Duration::from_secs(30))
            .await
            .expect("acquire a lock to hold through the failover");
        held.push(guard);
    }

    let seen = Arc::new(Contention::default());
    let stop = CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let lock = connect(&url).await;
        workers.push(tokio::spawn(contend(
            lock,
            "hot",
            Arc::clone(&seen),
            stop.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let leader_index = (0..cluster.len())
        .find(|&i| cluster.member(i).is_leader())
        .expect("the cluster has a leader");
    let killed_at = Instant::now();
    cluster.member(leader_index).kill();
    tokio::time::sleep(Duration::from_secs(6)).await;
    cluster.member(leader_index).start();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    for worker in workers {
        worker.await.expect("a contender panicked");
    }

    let entries = seen.entries();
    let before = entries.iter().filter(|e| e.at < killed_at).count();
    let resumed = entries
        .iter()
        .find(|e| e.at >= killed_at)
        .map(|e| e.at - killed_at)
        .expect("no lock was granted after the leader was killed");
    tracing::info!(
        before,
        after = entries.len() - before,
        ?resumed,
        errors = seen.errors.load(Ordering::SeqCst),
        "leader-kill run"
    );
    assert!(before > 0, "no lock was granted before the kill");
    assert_eq!(
        seen.overlaps.load(Ordering::SeqCst),
        0,
        "two holders at once"
    );
    assert_eq!(
        seen.overran.load(Ordering::SeqCst),
        0,
        "a holder outlived its lease"
    );
    for pair in entries.windows(2) {
        assert!(
            pair[1].token > pair[0].token,
            "fencing tokens went backwards: {} then {}",
            pair[0].token,
            pair[1].token
        );
    }
    assert!(
        resumed < Duration::from_secs(10),
        "service resumed {resumed:?} after the leader was killed"
    );

    let other = connect(&url).await;
    for guard in held {
        let resource = guard.resource().to_owned();
        assert!(
            other
                .try_acquire(&resource, Duration::from_secs(5))
                .await
                .expect("ask")
                .is_none(),
            "{resource} was granted to a second holder after the failover"
        );
        guard
            .release()
            .await
            .unwrap_or_else(|err| panic!("release {resource} after the failover: {err}"));
    }
}

/// A client frozen behind the proxy mid-lease is told `lost` by its safe deadline; once etcd expires its
/// lease, another client gets a higher token and writes; the frozen client's writes — the one in flight
/// during the freeze and one sent after the thaw — are rejected by the fenced store, and the value is the
/// new holder's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_client_is_told_lost_and_its_late_fenced_writes_are_rejected() {
    const TTL: Duration = Duration::from_secs(2);
    let fixture = ProxiedEtcd::start().await;
    let frozen: Arc<dyn DistributedLock> = Arc::new(connect(&fixture.url("fence")).await);
    let direct = connect(&fixture.cluster.url("fence")).await;
    let frozen_store = EtcdFencedStore::new(
        connect(&fixture.url("fence")).await.client().clone(),
        "fence/",
    );
    let direct_store = EtcdFencedStore::new(direct.client().clone(), "fence/");

    let kept = KeptLock::acquire(&frozen, "ledger", TTL, RenewalPolicy::default())
        .await
        .expect("acquire through the proxy");
    let old_token = kept.context().fencing_token();
    frozen_store
        .write("ledger", old_token, b"old holder")
        .await
        .expect("a write while the lock is held");

    fixture.proxy.freeze();
    let valid_until = kept.context().valid_until();
    let late = tokio::spawn(async move {
        let written = frozen_store
            .write("ledger", old_token, b"old holder, late")
            .await;
        (frozen_store, written)
    });
    tokio::time::timeout_at(valid_until + Duration::from_millis(100), kept.lost())
        .await
        .expect("the frozen holder was not told it lost the lock by its safe deadline");

    let new_guard = direct
        .acquire_within("ledger", TTL, Duration::from_secs(10))
        .await
        .expect("the lock frees once etcd expires the frozen holder's lease");
    assert!(new_guard.fencing_token() > old_token);
    direct_store
        .write("ledger", new_guard.fencing_token(), b"new holder")
        .await
        .expect("the new holder writes");

    fixture.proxy.pass();
    let (frozen_store, in_flight) = late.await.expect("the late write task");
    assert!(
        in_flight.is_err(),
        "the write in flight during the freeze must not succeed"
    );
    match frozen_store
        .write("ledger", old_token, b"old holder, after the thaw")
        .await
    {
        Err(StateError::StaleFencingToken { token, highest, .. }) => {
            assert_eq!((token, highest), (old_token, new_guard.fencing_token()));
        }
        other => panic!("a write with the old token after the thaw: {other:?}"),
    }
    let stored = direct_store
        .read("ledger")
        .await
        .expect("read")
        .expect("a value");
    assert_eq!(stored.value, b"new holder");
    assert_eq!(stored.token, new_guard.fencing_token());
    new_guard.release().await.expect("release");
    drop(kept);
}

/// With two of three members paused (SIGSTOP), the remaining one still answers its client but has no
/// quorum: it grants nothing (an error within the operation timeout, never a lock); once the others
/// resume, the same handle acquires.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_cut_off_from_the_majority_cannot_grant_a_lock() {
    integration_tests::init_tracing();
    let cluster = EtcdCluster::three();
    let lone = cluster.member(2);
    let lock = connect(&format!("etcd://{}/minority", lone.address()))
        .await
        .with_operation_timeout(Duration::from_secs(1))
        .expect("a valid timeout")
        .with_retry(RetryConfig::no_retry());
    cluster.member(0).pause();
    cluster.member(1).pause();

    for attempt in 0..3 {
        let started = Instant::now();
        match lock.try_acquire("minority", Duration::from_secs(5)).await {
            Err(err) => assert!(err.is_retryable(), "{err}"),
            Ok(granted) => panic!(
                "attempt {attempt}: a member without quorum answered {:?}",
                granted.map(|guard| guard.fencing_token())
            ),
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    cluster.member(0).resume();
    cluster.member(1).resume();
    let guard = lock
        .acquire_within("minority", Duration::from_secs(5), Duration::from_secs(15))
        .await
        .expect("the lock is granted once the majority is back");
    guard.release().await.expect("release");
}

/// Waiting is a watch on the key, not a poll: with a retry policy whose backoff is 30 s, a waiter still
/// gets the lock within a moment of its release, after a single failed attempt; and a wait that runs
/// out on a lock that stays held makes one attempt, not one per backoff step.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_wakes_on_the_release_not_on_a_poll() {
    integration_tests::init_tracing();
    let cluster = EtcdCluster::single();
    let url = cluster.url("watch");
    let holder = connect(&url).await;
    let sluggish = RetryConfig {
        max_attempts: 3,
        initial_delay: Duration::from_secs(30),
        max_delay: Duration::from_secs(30),
        backoff_multiplier: 1.0,
    };
    let waiter = connect(&url).await.with_retry(sluggish);

    let held = holder
        .acquire("job", Duration::from_secs(30))
        .await
        .expect("acquire");
    match waiter
        .acquire_within("job", Duration::from_secs(5), Duration::from_secs(2))
        .await
    {
        Err(StateError::LockNotAcquired { attempts, .. }) => assert_eq!(attempts, 1),
        other => panic!("a held lock must run the wait out: {other:?}"),
    }

    let released_at = Arc::new(Mutex::new(None));
    let releaser = {
        let released_at = Arc::clone(&released_at);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            held.release().await.expect("release");
            *released_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        })
    };
    let guard = waiter
        .acquire("job", Duration::from_secs(5))
        .await
        .expect("the waiter gets the lock after the release");
    let got_at = Instant::now();
    releaser.await.expect("the releaser");
    let released_at = released_at
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .expect("released");
    let lag = got_at.saturating_duration_since(released_at);
    assert!(
        lag < Duration::from_secs(5),
        "the waiter took {lag:?} after the release: it slept its backoff instead of watching"
    );
    guard.release().await.expect("release");
}

/// A lock renewed many times holds one lease, not one per renewal: each extend moves the key to a new
/// lease and revokes the one it left (before, every renewal's lease lingered in the cluster until its
/// TTL ran out — a long-held lock renewed every few seconds left a trail of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_leave_no_lease_behind() {
    integration_tests::init_tracing();
    let cluster = EtcdCluster::single();
    let lock = connect(&cluster.url("leases")).await;
    let mut guard = lock
        .acquire("renewed", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(cluster.lease_count(), 1, "the acquisition's lease");
    for _ in 0..5 {
        guard.extend(Duration::from_secs(60)).await.unwrap();
    }
    assert_eq!(
        cluster.lease_count(),
        1,
        "five renewals leave the one lease the key lives on"
    );
    guard.release().await.unwrap();
    assert_eq!(cluster.lease_count(), 0, "the release revokes the last one");
}
