//! The checks of the conformance suite, one public async function each (see the module above).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::*;

/// A held lock is exclusive: a second `acquire` gives up with `LockNotAcquired`.
pub async fn exclusive_acquire(backend: &dyn ConformanceBackend) {
    let lock = backend.lock(RetryConfig::default()).await;
    let contender = backend.lock(quick()).await;
    let name = resource("exclusive");
    let guard = bounded("acquire", lock.acquire(&name, TTL))
        .await
        .expect("first acquire succeeds");
    assert_eq!(guard.resource(), name);
    assert!(!guard.is_expired());
    assert!(guard.time_remaining() > TTL / 2);
    match bounded("acquire", contender.acquire(&name, TTL)).await {
        Err(StateError::LockNotAcquired { resource, attempts }) => {
            assert_eq!(resource, name);
            assert_eq!(attempts, 1);
        }
        other => panic!("second acquire must fail with LockNotAcquired, got {other:?}"),
    }
    guard.release().await.expect("release succeeds");
}

/// `try_acquire` returns `Ok(None)` while the lock is held, and the lock while it is free.
pub async fn try_acquire_is_none_while_held(backend: &dyn ConformanceBackend) {
    let lock = backend.lock(quick()).await;
    let name = resource("try");
    assert!(must_be_free(&lock, &name).await);
    let guard = must_acquire(&lock, &name, TTL).await;
    assert!(!must_be_free(&lock, &name).await);
    let second = bounded("try_acquire", lock.try_acquire(&name, TTL))
        .await
        .expect("try_acquire does not error on contention");
    assert!(second.is_none(), "a held lock must not be granted twice");
    guard.release().await.expect("release succeeds");
}

/// After a release the lock can be taken again at once, and `is_locked` follows.
pub async fn acquire_after_release(backend: &dyn ConformanceBackend) {
    let lock = backend.lock(quick()).await;
    let name = resource("reacquire");
    for _ in 0..3 {
        let guard = must_acquire(&lock, &name, TTL).await;
        assert!(!must_be_free(&lock, &name).await);
        guard.release().await.expect("release succeeds");
        assert!(must_be_free(&lock, &name).await);
    }
}

/// A lease that is not extended expires and another owner takes over.
pub async fn takeover_after_ttl_expiry(backend: &dyn ConformanceBackend) {
    let lock = backend.lock(quick()).await;
    let name = resource("expiry");
    let first = must_acquire(&lock, &name, SHORT_TTL).await;
    assert!(
        bounded("try_acquire", lock.try_acquire(&name, TTL))
            .await
            .expect("no error")
            .is_none()
    );
    tokio::time::sleep(after_short_ttl(backend)).await;
    assert!(first.is_expired(), "the guard knows its lease ran out");
    assert_eq!(first.time_remaining(), Duration::ZERO);
    let second = must_acquire(&lock, &name, TTL).await;
    assert!(second.fencing_token() > first.fencing_token());
    second.release().await.expect("release succeeds");
    drop(first.leak());
}

/// `extend` keeps the lock held past its original TTL and moves the guard's deadline.
pub async fn extend_keeps_lock_past_original_ttl(backend: &dyn ConformanceBackend) {
    let lock = backend.lock(quick()).await;
    let name = resource("extend");
    let mut guard = must_acquire(&lock, &name, SHORT_TTL).await;
    let before = guard.valid_until();
    let expires_before = guard.token().expires_at;
    tokio::time::sleep(SHORT_TTL / 2).await;
    bounded("extend", guard.extend(Duration::from_secs(2)))
        .await
        .expect("owner can extend");
    assert!(guard.valid_until() > before);
    assert!(guard.token().expires_at > expires_before);
    tokio::time::sleep(SHORT_TTL).await;
    assert!(!guard.is_expired());
    assert!(
        !must_be_free(&lock, &name).await,
        "extended lock still held"
    );
    assert!(
        bounded("try_acquire", lock.try_acquire(&name, TTL))
            .await
            .expect("no error")
            .is_none()
    );
    let info = bounded("get_lock_info", lock.get_lock_info(&name))
        .await
        .expect("info")
        .expect("held");
    assert_eq!(info.value, guard.token().value);
    guard.release().await.expect("release succeeds");
}

/// A guard whose lease expired and was taken over can neither extend nor release, and trying does
/// not disturb the new holder.
pub async fn stale_guard_cannot_extend_or_release(backend: &dyn ConformanceBackend) {
    let lock = backend.lock(quick()).await;
    let name = resource("stale");
    let mut stale = must_acquire(&lock, &name, SHORT_TTL).await;
    tokio::time::sleep(after_short_ttl(backend)).await;
    let holder = must_acquire(&lock, &name, TTL).await;
    match bounded("extend", stale.extend(TTL)).await {
        Err(StateError::LockLost { resource }) => assert_eq!(resource, name),
        other => panic!("extend with a stale guard must be LockLost, got {other:?}"),
    }
    match bounded("release", stale.release()).await {
        Err(StateError::LockLost { resource }) => assert_eq!(resource, name),
        other => panic!("release with a stale guard must be LockLost, got {other:?}"),
    }
    let info = bounded("get_lock_info", lock.get_lock_info(&name))
        .await
        .expect("info")
        .expect("the new holder still holds it");
    assert_eq!(info.value, holder.token().value);
    assert_eq!(info.fencing_token, holder.fencing_token());
    holder
        .release()
        .await
        .expect("the new holder releases normally");
}

/// Fencing tokens strictly increase across holders: after release and after expiry.
pub async fn fencing_tokens_strictly_increase(backend: &dyn ConformanceBackend) {
    let lock = backend.lock(quick()).await;
    let name = resource("fencing");
    let mut last = 0;
    for round in 0..5 {
        let guard = must_acquire(&lock, &name, TTL).await;
        assert!(
            guard.fencing_token() > last,
            "round {round}: token did not increase"
        );
        last = guard.fencing_token();
        guard.release().await.expect("release succeeds");
    }
    let expiring = must_acquire(&lock, &name, SHORT_TTL).await;
    assert!(expiring.fencing_token() > last);
    last = expiring.fencing_token();
    drop(expiring.leak());
    tokio::time::sleep(after_short_ttl(backend)).await;
    let after_expiry = must_acquire(&lock, &name, TTL).await;
    assert!(
        after_expiry.fencing_token() > last,
        "token must increase across expiry"
    );
    after_expiry.release().await.expect("release succeeds");
}

/// Raising the fencing counter makes every later token larger than the raise, and never lowers it:
/// the repair after a backend lost its counter.
pub async fn raising_the_fencing_counter_moves_later_tokens_past_it(
    backend: &dyn ConformanceBackend,
) {
    let lock = backend.lock(quick()).await;
    let name = resource("raise");
    let first = must_acquire(&lock, &name, TTL).await;
    let before = first.fencing_token();
    first.release().await.expect("release succeeds");
    // A few hundred above: what a counter reset behind a busy fleet looks like, and few enough
    // revisions for etcd, which writes its way up.
    let raised = before + 300;
    bounded(
        "raise_fencing_counter",
        lock.raise_fencing_counter(&name, raised),
    )
    .await
    .expect("the counter is raised");
    let after = must_acquire(&lock, &name, TTL).await;
    assert!(
        after.fencing_token() > raised,
        "token {} after raising past {raised}",
        after.fencing_token()
    );
    let next_expected = after.fencing_token();
    after.release().await.expect("release succeeds");
    bounded(
        "raise_fencing_counter",
        lock.raise_fencing_counter(&name, before),
    )
    .await
    .expect("a lower raise is no error");
    let again = must_acquire(&lock, &name, TTL).await;
    assert!(
        again.fencing_token() > next_expected,
        "a lower raise must not lower the counter: {} after {next_expected}",
        again.fencing_token()
    );
    again.release().await.expect("release succeeds");
    let invalid = lock.raise_fencing_counter("", 1).await;
    assert!(
        matches!(invalid, Err(StateError::InvalidInput { .. })),
        "{invalid:?}"
    );
}

/// Dropping an unreleased guard releases the lock in the background.
pub async fn dropping_guard_releases_lock(backend: &dyn ConformanceBackend) {
    let lock = backend.lock(quick()).await;
    let name = resource("drop");
    let guard = must_acquire(&lock, &name, Duration::from_secs(60)).await;
    drop(guard);
    assert!(
        wait_until_free(&lock, &name, Duration::from_secs(5)).await,
        "a dropped guard must release long before its 60 s TTL"
    );
    must_acquire(&lock, &name, TTL)
        .await
        .release()
        .await
        .expect("release");
}

/// A `try_acquire` cancelled at any point leaves no lock behind (beyond a short background cleanup):
/// the future is dropped after its 1st, 2nd, ... `Pending` poll, with a pause before each drop so the
/// server has executed the request and only the reply is outstanding — the window in which a naive
/// backend leaks a lease until its TTL. Then the same with timeouts of growing length.
pub async fn cancelled_acquire_leaves_no_lock(backend: &dyn ConformanceBackend) {
    use std::task::Poll;
    let lock = backend.lock(quick()).await;
    let name = resource("cancel");
    let long_ttl = Duration::from_secs(60);
    // Warm up first (connections made, server-side scripts cached), so that the first `Pending` is
    // the acquire request itself in flight.
    must_acquire(&lock, &name, long_ttl)
        .await
        .release()
        .await
        .expect("release");
    let mut cancelled_in_flight = 0;
    for drop_after in 1..=6 {
        let mut attempt = Box::pin(lock.try_acquire(&name, long_ttl));
        let mut pending = 0;
        let finished = loop {
            match futures::poll!(attempt.as_mut()) {
                Poll::Ready(result) => break Some(result.expect("try_acquire works")),
                Poll::Pending if pending + 1 == drop_after => break None,
                Poll::Pending => {
                    pending += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        if finished.is_none() {
            cancelled_in_flight += 1;
            // Let the request reach the server and its reply arrive before cancelling.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(attempt);
        drop(finished);
        assert!(
            wait_until_free(&lock, &name, Duration::from_secs(5)).await,
            "dropped after {drop_after} pending polls: the lock stayed held"
        );
    }
    tracing::debug!(cancelled_in_flight, "acquires cancelled while in flight");
    for step in 0..20u64 {
        let cancel_after = Duration::from_micros(step * 100);
        let attempt = tokio::time::timeout(cancel_after, lock.try_acquire(&name, long_ttl));
        if let Ok(result) = attempt.await {
            drop(result.expect("try_acquire works"));
        }
        assert!(
            wait_until_free(&lock, &name, Duration::from_secs(5)).await,
            "cancelled after {cancel_after:?}: the lock stayed held"
        );
    }
}

/// `get_lock_info` reports the holder's token; `None` when free.
pub async fn lock_info_reports_holder(backend: &dyn ConformanceBackend) {
    let lock = backend.lock(quick()).await;
    let name = resource("info");
    assert!(
        bounded("get_lock_info", lock.get_lock_info(&name))
            .await
            .expect("info")
            .is_none()
    );
    let guard = must_acquire(&lock, &name, TTL).await;
    let info = bounded("get_lock_info", lock.get_lock_info(&name))
        .await
        .expect("info")
        .expect("held");
    assert_eq!(info.resource, name);
    assert_eq!(info.value, guard.token().value);
    assert_eq!(info.fencing_token, guard.fencing_token());
    assert!(info.expires_at > info.acquired_at);
    let lease = info
        .expires_at
        .duration_since(info.acquired_at)
        .expect("expiry after acquisition");
    assert!(
        lease <= TTL + Duration::from_millis(50),
        "lease {lease:?} longer than the TTL"
    );
    guard.release().await.expect("release");
    assert!(
        bounded("get_lock_info", lock.get_lock_info(&name))
            .await
            .expect("info")
            .is_none()
    );
}

/// Resource names are user data: quotes, semicolons, unicode, spaces, braces and the longest allowed
/// name all work, and distinct names are distinct locks.
pub async fn awkward_resource_names_work(backend: &dyn ConformanceBackend) {
    let lock = backend.lock(quick()).await;
    let suffix = resource("awkward");
    let names = [
        format!("it's; DROP TABLE locks; -- {suffix}"),
        format!("ünïcødé 🔒 {suffix}"),
        format!("{{braces}} *glob* ?x [y] {suffix}"),
        format!("{suffix}{}", "x".repeat(MAX_RESOURCE_LEN - suffix.len())),
    ];
    let mut guards = Vec::new();
    for name in &names {
        guards.push(must_acquire(&lock, name, TTL).await);
    }
    for name in &names {
        assert!(
            bounded("try_acquire", lock.try_acquire(name, TTL))
                .await
                .expect("ok")
                .is_none()
        );
        let info = lock.get_lock_info(name).await.expect("info").expect("held");
        assert_eq!(&info.resource, name);
    }
    for guard in guards {
        guard.release().await.expect("release");
    }
}

/// Every kind of bad input is a clear `InvalidInput` error from every operation, never a panic, and
/// leaves a valid lock untouched.
pub async fn bad_input_is_rejected(backend: &dyn ConformanceBackend) {
    let lock = backend.lock(quick()).await;
    let good = resource("badinput");
    let too_long = "x".repeat(MAX_RESOURCE_LEN + 1);
    let bad_names = ["", too_long.as_str(), "nul\0inside"];
    let bad_ttls = [
        Duration::ZERO,
        Duration::from_micros(500),
        MAX_TTL + Duration::from_millis(1),
        Duration::MAX,
    ];
    let invalid = |what: &str, result: Result<(), StateError>| match result {
        Err(StateError::InvalidInput { .. }) => {}
        other => panic!("{what}: expected InvalidInput, got {other:?}"),
    };
    for name in bad_names {
        let shown = format!("{:?}", name.get(..20).unwrap_or(name));
        invalid(
            &format!("try_acquire({shown})"),
            lock.try_acquire(name, TTL).await.map(drop),
        );
        invalid(
            &format!("acquire({shown})"),
            lock.acquire(name, TTL).await.map(drop),
        );
        invalid(
            &format!("is_locked({shown})"),
            lock.is_locked(name).await.map(drop),
        );
        invalid(
            &format!("get_lock_info({shown})"),
            lock.get_lock_info(name).await.map(drop),
        );
    }
    let mut guard = must_acquire(&lock, &good, TTL).await;
    for ttl in bad_ttls {
        invalid(
            &format!("try_acquire ttl {ttl:?}"),
            lock.try_acquire(&good, ttl).await.map(drop),
        );
        invalid(
            &format!("acquire ttl {ttl:?}"),
            lock.acquire(&good, ttl).await.map(drop),
        );
        invalid(&format!("extend ttl {ttl:?}"), guard.extend(ttl).await);
    }
    let stolen = guard.token().clone();
    invalid(
        "release_internal(\"\")",
        lock.release_internal("", &stolen, crate::lock::Internal::new())
            .await,
    );
    assert!(
        !must_be_free(&lock, &good).await,
        "bad input must not disturb a held lock"
    );
    guard.release().await.expect("the good lock is intact");
}

/// Mutual exclusion under contention: `tasks` tasks each increment an unsynchronised counter
/// `increments` times under the lock; the total is exact and no two tasks are ever inside at once.
pub async fn contended_counter_is_exact(
    backend: &dyn ConformanceBackend,
    counter: Arc<dyn UnsyncCounter>,
    tasks: usize,
    increments: usize,
) {
    let patient = RetryConfig {
        max_attempts: 2_000,
        initial_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(20),
        backoff_multiplier: 1.5,
    };
    let name = resource("counter");
    counter.reset().await;
    let inside = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let lock = backend.lock(patient.clone()).await;
        let counter = Arc::clone(&counter);
        let (inside, overlaps, name) = (Arc::clone(&inside), Arc::clone(&overlaps), name.clone());
        handles.push(tokio::spawn(async move {
            for _ in 0..increments {
                let guard = lock
                    .acquire(&name, TTL)
                    .await
                    .expect("acquire under contention");
                if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                let value = counter.get().await;
                counter.set(value + 1).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                guard.release().await.expect("release under contention");
            }
        }));
    }
    for handle in handles {
        handle.await.expect("task did not panic");
    }
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two holders were inside at once"
    );
    assert_eq!(
        counter.get().await,
        (tasks * increments) as u64,
        "lost updates"
    );
}

/// With the server stopped, calls fail with an error within [`CALL_BOUND`] (no hang, no panic); once it
/// is back, the same handle works again without being rebuilt.
pub async fn dead_server_errors_then_recovers(
    backend: &dyn ConformanceBackend,
    server: &dyn ServerControl,
) {
    let lock = backend.lock(quick()).await;
    let name = resource("deadserver");
    let held = must_acquire(&lock, &name, TTL).await;
    server.stop().await;
    let other = resource("deadserver-other");
    assert!(
        bounded(
            "try_acquire on a dead server",
            lock.try_acquire(&other, TTL)
        )
        .await
        .is_err()
    );
    assert!(
        bounded("is_locked on a dead server", lock.is_locked(&other))
            .await
            .is_err()
    );
    assert!(
        bounded("get_lock_info on a dead server", lock.get_lock_info(&name))
            .await
            .is_err()
    );
    match bounded("acquire on a dead server", lock.acquire(&other, TTL)).await {
        Err(err) => assert!(
            err.is_retryable(),
            "a dead server is a retryable failure: {err}"
        ),
        Ok(_) => panic!("acquire succeeded on a dead server"),
    }
    assert!(
        bounded("release on a dead server", held.release())
            .await
            .is_err()
    );
    server.start().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let guard = loop {
        match bounded("try_acquire after restart", lock.try_acquire(&other, TTL)).await {
            Ok(Some(guard)) => break guard,
            Ok(None) => panic!("{other} is held after the restart by nobody we know"),
            Err(err) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %err, "backend not back yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!(
                "backend did not recover within 20 s: {err} (source: {:?})",
                std::error::Error::source(&err)
            ),
        }
    };
    guard.release().await.expect("release after recovery");
}

/// Waiting has a budget and can be cancelled: `acquire_within` gives up when its wait runs out (not
/// after a number of attempts), returns the lock as soon as it is freed within the wait, and
/// `acquire_cancellable` ends with `Cancelled` when its token fires.
pub async fn waiting_is_bounded_and_cancellable(backend: &dyn ConformanceBackend) {
    use tokio::time::Instant;
    let holder = backend.lock(quick()).await;
    let waiter = backend.lock(RetryConfig::default()).await;
    let name = resource("waiting");
    let held = must_acquire(&holder, &name, TTL).await;

    let wait = Duration::from_millis(400);
    let started = Instant::now();
    match bounded("acquire_within", waiter.acquire_within(&name, TTL, wait)).await {
        Err(StateError::LockNotAcquired { .. }) => {}
        other => panic!("acquire_within on a held lock must run out of its wait: {other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= wait && waited < wait + Duration::from_secs(2),
        "acquire_within waited {waited:?} for a budget of {wait:?}"
    );

    let cancel = tokio_util::sync::CancellationToken::new();
    let canceller = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            cancel.cancel();
        })
    };
    let started = Instant::now();
    match bounded(
        "acquire_cancellable",
        waiter.acquire_cancellable(&name, TTL, &cancel),
    )
    .await
    {
        Err(StateError::Cancelled { .. }) => {}
        other => panic!("a cancelled wait must end with Cancelled: {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "cancellation took {:?}",
        started.elapsed()
    );
    let _ = canceller.await;

    let releaser = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        held.release().await
    });
    let guard = bounded(
        "acquire_within a freed lock",
        waiter.acquire_within(&name, TTL, Duration::from_secs(5)),
    )
    .await
    .unwrap_or_else(|err| panic!("the lock was freed within the wait: {err}"));
    assert!(matches!(releaser.await, Ok(Ok(()))));
    guard.release().await.expect("release");
}

/// How late a loss signal may come after the safe deadline in [`hung_backend_reports_lost_by_the_safe_deadline`]
/// (scheduling slack; the renewal itself is not allowed to wait past the deadline).
pub const LOSS_SLACK: Duration = Duration::from_millis(100);

/// With the server *hung* (`server.stop()` must make it accept requests and never answer — a frozen
/// network proxy, or a SIGSTOP'd server), every holder is told the lock is lost no later than its safe
/// deadline + [`LOSS_SLACK`]: a [`KeptLock`](crate::recipes::keeper::KeptLock), work under
/// [`with_lock`](crate::recipes::keeper::with_lock) (dropped at that moment) and an elected leader
/// (stepped down). A renewal that waits for the backend's own operation timeout fails this check.
pub async fn hung_backend_reports_lost_by_the_safe_deadline(
    backend: &dyn ConformanceBackend,
    server: &dyn ServerControl,
) {
    use crate::recipes::keeper::{KeptLock, RenewalPolicy, with_lock};
    use crate::recipes::leader::{LeaderElection, Leadership};
    use tokio::time::Instant;

    const HUNG_TTL: Duration = Duration::from_millis(1500);
    let lock = backend.lock(quick()).await;

    let kept = bounded(
        "acquire a kept lock",
        KeptLock::acquire(
            &lock,
            &resource("hung-kept"),
            HUNG_TTL,
            RenewalPolicy::default(),
        ),
    )
    .await
    .unwrap_or_else(|err| panic!("acquire a kept lock: {err}"));

    let (context_tx, context_rx) = tokio::sync::oneshot::channel();
    let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<Instant>();
    let work = {
        let lock = Arc::clone(&lock);
        let name = resource("hung-with-lock");
        tokio::spawn(async move {
            with_lock(&lock, &name, HUNG_TTL, |ctx| async move {
                /// Records the instant the work future is dropped.
                struct OnDrop(Option<tokio::sync::oneshot::Sender<Instant>>);
                impl Drop for OnDrop {
                    fn drop(&mut self) {
                        if let Some(tx) = self.0.take() {
                            let _ = tx.send(Instant::now());
                        }
                    }
                }
                let _on_drop = OnDrop(Some(dropped_tx));
                let _ = context_tx.send(ctx);
                std::future::pending::<()>().await
            })
            .await
        })
    };
    let context = bounded("with_lock starts its work", context_rx)
        .await
        .unwrap_or_else(|_| panic!("with_lock never ran its work"));

    let election = LeaderElection::new(Arc::clone(&lock), &resource("hung-leader"), "me", HUNG_TTL)
        .unwrap_or_else(|err| panic!("leader election: {err}"));
    assert!(
        bounded("campaign", election.try_become_leader())
            .await
            .unwrap_or_else(|err| panic!("campaign: {err}")),
        "the only candidate must lead"
    );
    let term = election
        .term_context()
        .unwrap_or_else(|| panic!("a leader has a term"));
    let mut leadership = election.watch();

    // Steady state: renewals have happened; then the backend hangs.
    let renewed_by = Instant::now() + HUNG_TTL * 2;
    while kept.renewals() < 1 {
        assert!(Instant::now() < renewed_by, "the kept lock never renewed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
    let hung_at = Instant::now();

    let kept_lost = async {
        bounded("a kept lock's loss signal", kept.lost()).await;
        Instant::now()
    };
    let leader_lost = async {
        bounded(
            "the leader stepping down",
            leadership.wait_for(|state| *state == Leadership::Follower),
        )
        .await
        .unwrap_or_else(|_| panic!("the election's state channel closed"));
        Instant::now()
    };
    let work_dropped = async {
        bounded("work under with_lock being dropped", dropped_rx)
            .await
            .unwrap_or_else(|_| panic!("with_lock's work was never dropped"))
    };
    let (kept_at, leader_at, work_at) = tokio::join!(kept_lost, leader_lost, work_dropped);
    for (what, at, deadline) in [
        ("a kept lock", kept_at, kept.valid_until()),
        ("work under with_lock", work_at, context.valid_until()),
        ("the leader", leader_at, term.valid_until()),
    ] {
        assert!(
            at <= deadline + LOSS_SLACK,
            "{what} was told it lost the lock {:?} after its safe deadline (hung {:?} before the deadline)",
            at - deadline,
            deadline.saturating_duration_since(hung_at),
        );
    }
    match bounded("with_lock returning", work).await {
        Ok(Err(StateError::LockLost { .. })) => {}
        other => panic!("with_lock must end with LockLost: {other:?}"),
    }
    server.start().await;
    drop(kept);
    drop(election);
}
