//! Lock-safety edge cases on real servers: what a holder gets when the backend fails around its work.

use std::sync::Arc;
use std::time::Duration;

use integration_tests::RedisServer;
use state::recipes::keeper::with_lock;
use state::{DistributedLock, RedisDistributedLock};

/// Work that finished while the lock was held returns its value even when the release after it fails
/// (the server went away at the last moment): the failure is the release's, not the work's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lock_returns_finished_work_when_only_the_release_fails() {
    integration_tests::init_tracing();
    let server = Arc::new(RedisServer::start_new());
    let lock: Arc<dyn DistributedLock> =
        Arc::new(RedisDistributedLock::new(&server.url()).await.unwrap());
    let stopping = Arc::clone(&server);
    let outcome = with_lock(
        &lock,
        "report:daily",
        Duration::from_secs(5),
        |_ctx| async move {
            stopping.stop(); // the work is done; the backend dies before the release
            42
        },
    )
    .await;
    assert_eq!(
        outcome.expect("the finished work's result, not the release's error"),
        42
    );
}

/// Configurations that used to panic, spin or silently never renew are `InvalidInput` errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_invalid_input_never_a_panic() {
    use state::recipes::keeper::{KeptLock, RenewalPolicy};
    use state::{InMemoryDistributedLock, RedlockDistributedLock, RetryConfig, StateError};

    fn invalid<T: std::fmt::Debug>(what: &str, outcome: Result<T, StateError>) {
        match outcome {
            Err(StateError::InvalidInput { .. }) => {}
            other => panic!("{what}: expected InvalidInput, got {other:?}"),
        }
    }

    let ttl = Duration::from_secs(1);
    let forever = RetryConfig {
        max_attempts: 3,
        initial_delay: Duration::MAX,
        max_delay: Duration::MAX,
        backoff_multiplier: 2.0,
    };
    let memory = InMemoryDistributedLock::new();
    let held = memory.try_acquire("busy", ttl).await.unwrap().unwrap();
    invalid(
        "Duration::MAX retry delays",
        memory
            .clone()
            .with_retry(forever.clone())
            .acquire("busy", ttl)
            .await,
    );
    let nan = RetryConfig {
        backoff_multiplier: f64::NAN,
        ..RetryConfig::default()
    };
    invalid("a NaN backoff", nan.validate());
    held.release().await.unwrap();

    let redis = RedisServer::start_new();
    let redis_lock = RedisDistributedLock::new(&redis.url()).await.unwrap();
    invalid(
        "Duration::MAX retry delays on Redis",
        redis_lock.with_retry(forever).acquire("x", ttl).await,
    );
    let redlock = RedlockDistributedLock::new(&[redis.url().as_str()])
        .await
        .unwrap();
    invalid(
        "a drift constant that overflows",
        redlock.with_drift(0.01, Duration::MAX),
    );

    let locks: Arc<dyn DistributedLock> = Arc::new(InMemoryDistributedLock::new());
    for (what, policy) in [
        (
            "a zero renewal interval",
            RenewalPolicy::default().with_interval(Duration::ZERO),
        ),
        (
            "an interval longer than the ttl",
            RenewalPolicy::default().with_interval(ttl * 2),
        ),
    ] {
        invalid(
            what,
            KeptLock::acquire(&locks, "kept", ttl, policy.clone()).await,
        );
        invalid(
            what,
            KeptLock::try_acquire(&locks, "kept", ttl, policy).await,
        );
    }
    assert!(
        !locks.is_locked("kept").await.unwrap(),
        "nothing was acquired"
    );
}

/// A guard can only be extended by the lock service that granted it (or its clones): another service
/// refuses it with a clear error instead of touching its own lock of the same name.
#[tokio::test]
async fn extend_refuses_a_guard_from_another_lock_service() {
    use state::{InMemoryDistributedLock, StateError};

    let ttl = Duration::from_secs(5);
    let granting = InMemoryDistributedLock::new();
    let other = InMemoryDistributedLock::new();
    let mut guard = granting.acquire("orders:3", ttl).await.unwrap();
    let _others_own = other.acquire("orders:3", ttl).await.unwrap();
    match other.extend(&mut guard, ttl).await {
        Err(StateError::InvalidInput { what: "guard", .. }) => {}
        outcome => panic!("a foreign guard must be refused: {outcome:?}"),
    }
    granting.clone().extend(&mut guard, ttl).await.unwrap();
    guard.extend(ttl).await.unwrap();
    guard.release().await.unwrap();
}

/// Acquires cut short (cancelled, timed out) clean up after themselves with a bounded number of release
/// statements — backing off, only when the request may have been sent — instead of a release every
/// 25 ms for twice the operation timeout. Counted in the server's own statement log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_postgres_acquires_clean_up_with_a_bounded_number_of_releases() {
    use integration_tests::PostgresServer;
    use state::PostgresDistributedLock;

    const CANCELLED: usize = 5;
    const MOST_RELEASES_EACH: usize = 10;
    integration_tests::init_tracing();
    let server = PostgresServer::start_new();
    let postgres = PostgresDistributedLock::new(&server.url()).await.unwrap();
    for statement in [
        "ALTER SYSTEM SET log_statement = 'all'",
        "SELECT pg_reload_conf()",
    ] {
        sqlx::query(statement)
            .execute(postgres.pool())
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lock: Arc<dyn DistributedLock> = Arc::new(postgres.clone());
    for i in 0..CANCELLED {
        let resource = format!("storm:{i}");
        let _ = tokio::time::timeout(
            Duration::from_micros(300),
            lock.try_acquire(&resource, Duration::from_secs(30)),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let releases = server
        .log()
        .lines()
        .filter(|line| line.contains("SET expires_at = '-infinity'"))
        .count();
    assert!(
        releases <= CANCELLED * MOST_RELEASES_EACH,
        "{releases} release statements for {CANCELLED} cancelled acquires"
    );
    for i in 0..CANCELLED {
        let resource = format!("storm:{i}");
        assert!(
            !lock.is_locked(&resource).await.unwrap(),
            "{resource}: a cancelled acquire left its lease behind"
        );
    }
    postgres.shutdown().await;
}

/// PostgreSQL advisory mode: an extension the server performed just before the lease ran out, whose
/// answer arrives only after the local TTL monitor's deadline, is never undone by the monitor (release,
/// extension and expiry are one state machine under one mutex). Driven with the fault proxy: requests
/// pass, answers are held across the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_extend_in_flight_at_the_deadline_is_not_undone_by_the_monitor() {
    use integration_tests::adapters::ProxiedPostgres;
    use state::{PostgresDistributedLock, PostgresLockMode};

    let fixture = ProxiedPostgres::start(PostgresLockMode::Advisory).await;
    let advisory = |url: String| async move {
        PostgresDistributedLock::builder(&url)
            .with_mode(PostgresLockMode::Advisory)
            .build()
            .await
            .unwrap()
    };
    let holder = advisory(fixture.url()).await;
    let other = advisory(fixture.server.url()).await;
    let ttl = Duration::from_millis(600);
    let mut guard = holder.try_acquire("race", ttl).await.unwrap().unwrap();
    // One extension first: the session prepares the statement, so the next one is a single round trip
    // (otherwise its execution would wait for the held answer to the prepare).
    guard.extend(ttl).await.unwrap();

    tokio::time::sleep_until(guard.valid_until() - Duration::from_millis(60)).await;
    fixture.proxy.freeze_answers();
    let extending = tokio::spawn(async move {
        let extended = guard.extend(Duration::from_secs(5)).await;
        (guard, extended)
    });
    tokio::time::sleep(Duration::from_millis(300)).await; // the monitor's deadline passes meanwhile
    fixture.proxy.pass();
    let (guard, extended) = extending.await.unwrap();
    extended.expect("the server extended the lease before it ran out");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        other.try_acquire("race", ttl).await.unwrap().is_none(),
        "an extended advisory lock was freed behind its holder's back"
    );
    guard
        .release()
        .await
        .expect("the extended lock is still ours to release");
}

/// PostgreSQL advisory mode keeps each held lock's session in a bounded pool: past its size an acquire
/// fails fast with an error that says what to do, and releasing a lock makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_sessions_come_from_a_bounded_pool_with_a_clear_error_when_exhausted() {
    use integration_tests::PostgresServer;
    use state::{PostgresDistributedLock, PostgresLockMode, StateError};

    let server = PostgresServer::start_new();
    let locks = PostgresDistributedLock::builder(&server.url())
        .with_mode(PostgresLockMode::Advisory)
        .with_pool_size(2)
        .with_operation_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let ttl = Duration::from_secs(30);
    let first = locks.try_acquire("a", ttl).await.unwrap().unwrap();
    let _second = locks.try_acquire("b", ttl).await.unwrap().unwrap();
    match locks.try_acquire("c", ttl).await {
        Err(err @ StateError::Backend { .. }) => {
            let message = format!(
                "{err}: {}",
                std::error::Error::source(&err)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
            assert!(message.contains("with_pool_size"), "{message}");
        }
        other => panic!("a third session must not be opened past the pool's 2: {other:?}"),
    }
    first.release().await.unwrap();
    let third = locks.try_acquire("c", ttl).await.unwrap();
    assert!(third.is_some(), "a released session makes room");
}

/// Released or dropped, a kept lock is no longer held: work holding its context is told so.
#[tokio::test]
async fn releasing_or_dropping_a_kept_lock_cancels_its_context() {
    use state::InMemoryDistributedLock;
    use state::recipes::keeper::{KeptLock, RenewalPolicy};

    let locks: Arc<dyn DistributedLock> = Arc::new(InMemoryDistributedLock::new());
    let ttl = Duration::from_secs(5);
    let released = KeptLock::acquire(&locks, "a", ttl, RenewalPolicy::default())
        .await
        .unwrap();
    let context = released.context();
    released.release().await.unwrap();
    assert!(context.is_lost(), "release must cancel the context");
    let dropped = KeptLock::acquire(&locks, "b", ttl, RenewalPolicy::default())
        .await
        .unwrap();
    let token = dropped.lost_token();
    drop(dropped);
    assert!(token.is_cancelled(), "drop must cancel the lost-token");
}

/// A leading election that is dropped leaves no task behind (its watcher and its renewal both end).
#[tokio::test(flavor = "current_thread")]
async fn a_dropped_leading_election_ends_its_tasks() {
    use state::InMemoryDistributedLock;
    use state::recipes::leader::LeaderElection;

    let metrics = tokio::runtime::Handle::current().metrics();
    let locks: Arc<dyn DistributedLock> = Arc::new(InMemoryDistributedLock::new());
    let baseline = metrics.num_alive_tasks();
    let election = LeaderElection::new(locks, "jobs", "me", Duration::from_secs(5)).unwrap();
    assert!(election.try_become_leader().await.unwrap());
    assert!(metrics.num_alive_tasks() > baseline, "leading runs tasks");
    drop(election);
    for _ in 0..100 {
        if metrics.num_alive_tasks() <= baseline + 1 {
            // The background release of the dropped guard may still be running: let it finish.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if metrics.num_alive_tasks() == baseline {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!(
        "{} tasks still alive after the election was dropped (baseline {baseline})",
        metrics.num_alive_tasks()
    );
}
