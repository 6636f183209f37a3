//! Redis-specific behaviour beyond the conformance suite: server death and pauses, credentials, key
//! layout, and a negative control showing the contention check really detects a missing lock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::adapters::{CounterServer, RedisControl, RedisFixture};
use integration_tests::{RedisServer, free_port};
use redis::AsyncCommands;
use state::conformance::UnsyncCounter;
use state::{DistributedLock, RedisDistributedLock, RetryConfig, StateError};

const TTL: Duration = Duration::from_secs(10);

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_errors_in_bounded_time_then_backend_recovers() {
    let fixture = RedisFixture::start();
    state::conformance::dead_server_errors_then_recovers(&fixture, &RedisControl(&fixture.server))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_server_times_out_instead_of_hanging() {
    let fixture = RedisFixture::start();
    let locks = RedisDistributedLock::new(&fixture.backend.url)
        .await
        .unwrap()
        .with_operation_timeout(Duration::from_millis(300))
        .unwrap()
        .with_retry(RetryConfig::no_retry());
    let held = locks.try_acquire("paused", TTL).await.unwrap().unwrap();
    fixture.server.pause();
    let started = Instant::now();
    let outcome = locks.try_acquire("paused-other", TTL).await;
    let waited = started.elapsed();
    fixture.server.resume();
    match outcome {
        Err(StateError::Timeout { operation, .. }) => assert_eq!(operation, "acquire"),
        other => panic!("expected a timeout from a paused server, got {other:?}"),
    }
    assert!(
        waited < Duration::from_secs(3),
        "waited {waited:?} on a paused server"
    );
    // The lock taken before the pause is intact, and the cancelled acquire left nothing behind.
    held.release().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while locks.is_locked("paused-other").await.unwrap() {
        assert!(
            Instant::now() < deadline,
            "the timed-out acquire left its lock behind"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counter_without_a_lock_loses_updates() {
    // The negative control of `contended_counter_is_exact`: the same workload without the lock
    // must lose increments, or the conformance check could not detect a broken lock.
    let counter = Arc::new(CounterServer::start().await);
    counter.reset().await;
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let counter = Arc::clone(&counter);
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                let value = counter.get().await;
                counter.set(value + 1).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let total = counter.get().await;
    assert!(
        total < 320,
        "unprotected increments should race; got all {total}"
    );
}

#[tokio::test]
async fn unreachable_server_fails_construction_quickly() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let started = Instant::now();
    match RedisDistributedLock::new(&url).await {
        Err(StateError::Backend {
            operation,
            resource,
            ..
        }) => {
            assert_eq!(operation, "connect to");
            assert!(resource.contains("127.0.0.1"));
        }
        Err(StateError::Timeout { .. }) => {}
        other => panic!("expected a connect error, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn password_protected_server_works_and_password_never_shows() {
    let server = RedisServer::start_new();
    let mut admin = raw(&server.url()).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("s3cr3t-pw")
        .query_async(&mut admin)
        .await
        .unwrap();

    let wrong = format!("redis://:wrong-pw@127.0.0.1:{}", server.port());
    let err = RedisDistributedLock::new(&wrong).await.unwrap_err();
    let shown = format!("{err} / {err:?}");
    assert!(!shown.contains("wrong-pw"), "password leaked: {shown}");

    let right = format!("redis://:s3cr3t-pw@127.0.0.1:{}/0", server.port());
    let locks = RedisDistributedLock::new(&right).await.unwrap();
    let debug = format!("{locks:?}");
    assert!(!debug.contains("s3cr3t-pw"), "password leaked: {debug}");
    assert!(debug.contains("***"));
    let guard = locks.try_acquire("secured", TTL).await.unwrap().unwrap();
    assert!(!format!("{guard:?}").contains("s3cr3t-pw"));
    guard.release().await.unwrap();
}

#[tokio::test]
async fn keys_are_prefixed_lease_expires_and_fence_counter_persists() {
    let server = RedisServer::start_new();
    let mut conn = raw(&server.url()).await;
    let billing = RedisDistributedLock::new(&server.url())
        .await
        .unwrap()
        .with_key_prefix("billing:")
        .unwrap();
    let shipping = billing.clone().with_key_prefix("shipping:").unwrap();

    let a = billing.try_acquire("job", TTL).await.unwrap().unwrap();
    let b = shipping.try_acquire("job", TTL).await.unwrap();
    assert!(b.is_some(), "different prefixes are different lock spaces");

    let lease_ttl: i64 = conn.pttl("billing:lock:job").await.unwrap();
    assert!(
        lease_ttl > 0 && lease_ttl <= 10_000,
        "lease PTTL {lease_ttl}"
    );
    let fence_ttl: i64 = conn.pttl("billing:fence:job").await.unwrap();
    assert_eq!(fence_ttl, -1, "the fence counter must not expire");
    let fence: u64 = conn.get("billing:fence:job").await.unwrap();
    assert_eq!(fence, a.fencing_token());

    assert!(billing.clone().with_key_prefix(&"p".repeat(257)).is_err());
    assert!(
        billing
            .clone()
            .with_operation_timeout(Duration::ZERO)
            .is_err()
    );
    a.release().await.unwrap();
}

/// The lease value stored is exactly the token's value (release and extend compare it whole), and the
/// scripts are sent by SHA: a server that forgot them (`SCRIPT FLUSH`, a restart) gets them again.
#[tokio::test]
async fn lease_value_is_the_token_value_and_flushed_scripts_are_loaded_again() {
    let server = RedisServer::start_new();
    let mut conn = raw(&server.url()).await;
    let locks = RedisDistributedLock::new(&server.url()).await.unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut guard = locks.try_acquire("flushed", TTL).await.unwrap().unwrap();
    let stored: String = conn.get("state:lock:flushed").await.unwrap();
    assert_eq!(stored, guard.token().value);
    let info = locks.get_lock_info("flushed").await.unwrap().unwrap();
    assert_eq!(info.value, guard.token().value);
    assert_eq!(info.fencing_token, guard.fencing_token());

    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    locks.extend(&mut guard, TTL).await.unwrap();
    // Someone else's lease under the same key is not ours to release, even with our secret's prefix.
    let ours = guard.token().value.clone();
    let (secret, _) = ours.rsplit_once(':').unwrap();
    let _: () = conn
        .set("state:lock:flushed", format!("{secret}:1"))
        .await
        .unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(matches!(
        guard.release().await,
        Err(StateError::LockLost { .. })
    ));
    let still: String = conn.get("state:lock:flushed").await.unwrap();
    assert_eq!(still, format!("{secret}:1"));
}

#[test]
fn guard_dropped_after_its_runtime_is_gone_neither_panics_nor_blocks() {
    let server = RedisServer::start_new();
    let url = server.url();
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let first = runtime();
    let guard = first.block_on(async {
        let locks = RedisDistributedLock::new(&url).await.unwrap();
        locks
            .try_acquire("orphan", Duration::from_millis(500))
            .await
            .unwrap()
            .unwrap()
    });
    drop(first);
    let started = Instant::now();
    drop(guard); // must not panic or block; the lease simply expires
    assert!(started.elapsed() < Duration::from_millis(100));
    runtime().block_on(async {
        let locks = RedisDistributedLock::new(&url).await.unwrap();
        assert!(
            locks.is_locked("orphan").await.unwrap(),
            "nothing could release it"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(
            !locks.is_locked("orphan").await.unwrap(),
            "the TTL expired it"
        );
    });
}
