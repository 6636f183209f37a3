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
