//! The backend conformance suite: one set of behaviours every [`DistributedLock`] must show, written
//! once and run against every backend (in-process, Redis, Redlock, PostgreSQL) — and against your own
//! deployment, with the `conformance` feature.
//!
//! Each check is a public async function that panics with a message on a violation. The
//! [`conformance_tests!`](crate::conformance_tests) macro expands to one `#[tokio::test]` per check:
//!
//! ```ignore
//! use std::sync::Arc;
//! use state::conformance::{ConformanceBackend, InProcessCounter};
//! use state::{DistributedLock, InMemoryDistributedLock, RetryConfig};
//!
//! struct Memory(InMemoryDistributedLock);
//!
//! #[async_trait::async_trait]
//! impl ConformanceBackend for Memory {
//!     async fn lock(&self, retry: RetryConfig) -> Arc<dyn DistributedLock> {
//!         Arc::new(self.0.clone().with_retry(retry))
//!     }
//! }
//!
//! state::conformance_tests!(Memory(InMemoryDistributedLock::new()), InProcessCounter::default());
//! ```
//!
//! Resource names are random per check, so checks can share one server and run in parallel.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

mod checks;

pub use checks::*;

use crate::lock::{MAX_RESOURCE_LEN, MAX_TTL};
use crate::{DistributedLock, LockGuard, RetryConfig, StateError};

/// How the suite gets handles to the backend under test.
#[async_trait::async_trait]
pub trait ConformanceBackend: Send + Sync {
    /// A handle to the lock service under test whose `acquire` uses `retry`. All handles made by one
    /// backend value must share the same locks (as clones or connections to the same server do).
    async fn lock(&self, retry: RetryConfig) -> Arc<dyn DistributedLock>;

    /// How much later than its TTL the service may free an expired lease for others (never how much
    /// sooner: a guard's own deadline always follows the TTL asked for). Zero for services with
    /// millisecond expiry; etcd counts leases in whole seconds and sweeps expired ones every 500 ms.
    fn expiry_slack(&self) -> Duration {
        Duration::ZERO
    }
}

/// How long after taking a [`SHORT_TTL`] lease the suite waits before expecting it freed.
fn after_short_ttl(backend: &dyn ConformanceBackend) -> Duration {
    SHORT_TTL + Duration::from_millis(100) + backend.expiry_slack()
}

/// A deliberately unsynchronised counter (read, then write) that only a working lock keeps exact.
#[async_trait::async_trait]
pub trait UnsyncCounter: Send + Sync {
    /// Sets the counter to zero.
    async fn reset(&self);
    /// Reads the counter.
    async fn get(&self) -> u64;
    /// Overwrites the counter.
    async fn set(&self, value: u64);
}

/// An [`UnsyncCounter`] in process memory that yields between read and write, so unprotected
/// increments really do race.
#[derive(Debug, Default)]
pub struct InProcessCounter(AtomicU64);

#[async_trait::async_trait]
impl UnsyncCounter for InProcessCounter {
    async fn reset(&self) {
        self.0.store(0, Ordering::SeqCst);
    }
    async fn get(&self) -> u64 {
        let value = self.0.load(Ordering::SeqCst);
        tokio::task::yield_now().await;
        value
    }
    async fn set(&self, value: u64) {
        tokio::task::yield_now().await;
        self.0.store(value, Ordering::SeqCst);
    }
}

/// Stops and starts the server behind a backend, for the dead-server check.
#[async_trait::async_trait]
pub trait ServerControl: Send + Sync {
    /// Stops the server (kill or pause); the backend's calls must then fail in bounded time.
    async fn stop(&self);
    /// Starts it again at the same address.
    async fn start(&self);
}

/// How long any single call may take before the suite calls it a hang.
pub const CALL_BOUND: Duration = Duration::from_secs(10);

const TTL: Duration = Duration::from_secs(10);
const SHORT_TTL: Duration = Duration::from_millis(300);

fn resource(check: &str) -> String {
    format!("conformance:{check}:{:016x}", rand::random::<u64>())
}

fn quick() -> RetryConfig {
    RetryConfig::no_retry()
}

async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(CALL_BOUND, fut).await {
        Ok(value) => value,
        Err(_) => panic!("{what} did not finish within {CALL_BOUND:?}"),
    }
}

async fn must_acquire(lock: &Arc<dyn DistributedLock>, resource: &str, ttl: Duration) -> LockGuard {
    bounded("try_acquire", lock.try_acquire(resource, ttl))
        .await
        .unwrap_or_else(|err| panic!("try_acquire({resource}) failed: {err:?}"))
        .unwrap_or_else(|| panic!("try_acquire({resource}) found the lock held"))
}

async fn must_be_free(lock: &Arc<dyn DistributedLock>, resource: &str) -> bool {
    !bounded("is_locked", lock.is_locked(resource))
        .await
        .unwrap_or_else(|err| panic!("is_locked({resource}) failed: {err:?}"))
}

/// Polls until `resource` is free, for at most `within`.
async fn wait_until_free(
    lock: &Arc<dyn DistributedLock>,
    resource: &str,
    within: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if must_be_free(lock, resource).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Expands to one `#[tokio::test]` per conformance check. The first argument is an expression giving a
/// [`ConformanceBackend`] (it may `.await`), the second an `Arc`-able [`UnsyncCounter`] for the
/// contention check. The calling crate needs `tokio` with the `macros` and `rt-multi-thread` features.
#[macro_export]
macro_rules! conformance_tests {
    ($backend:expr, $counter:expr) => {
        $crate::__conformance_checks!($backend;
            exclusive_acquire,
            try_acquire_is_none_while_held,
            acquire_after_release,
            takeover_after_ttl_expiry,
            extend_keeps_lock_past_original_ttl,
            stale_guard_cannot_extend_or_release,
            fencing_tokens_strictly_increase,
            raising_the_fencing_counter_moves_later_tokens_past_it,
            dropping_guard_releases_lock,
            cancelled_acquire_leaves_no_lock,
            lock_info_reports_holder,
            awkward_resource_names_work,
            bad_input_is_rejected,
            waiting_is_bounded_and_cancellable
        );

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn contended_counter_is_exact() {
            let backend = $backend;
            let counter: ::std::sync::Arc<dyn $crate::conformance::UnsyncCounter> =
                ::std::sync::Arc::new($counter);
            $crate::conformance::contended_counter_is_exact(&backend, counter, 32, 10).await;
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_checks {
    ($backend:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let backend = $backend;
                $crate::conformance::$check(&backend).await;
            }
        )*
    };
}
