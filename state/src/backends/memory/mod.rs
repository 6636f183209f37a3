//! The in-process backend: one process, many tasks. Same semantics as the server backends (TTLs,
//! owner checks, fencing tokens), no network.
//!
//! Time is Tokio's clock, so tests can use `#[tokio::test(start_paused = true)]` and
//! `tokio::time::advance` to exercise expiry without sleeping.

pub(crate) mod fenced;
pub(crate) mod roster;
pub(crate) mod tasks;
pub(crate) mod versioned;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::lock::{Internal, safe_deadline, validate_resource, validate_ttl};
use crate::retry::{Budget, acquire_with_budget};
use crate::telemetry::{self, Operation};
use crate::{DistributedLock, LockGuard, LockToken, RetryConfig, StateError, StateResult};

/// How many acquisitions pass between sweeps of expired entries.
const SWEEP_EVERY: u64 = 1024;

/// The in-process lock service. Cheap to clone; clones share the same locks.
///
/// Fencing tokens come from one counter shared by all resources of this instance, so they are strictly
/// increasing per resource (and globally) for the life of the process.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> state::StateResult<()> {
/// use std::time::Duration;
/// use state::{DistributedLock, InMemoryDistributedLock, RetryConfig};
///
/// let locks = InMemoryDistributedLock::new().with_retry(RetryConfig::no_retry());
/// let guard = locks.acquire("job:nightly", Duration::from_secs(30)).await?;
/// assert!(locks.is_locked("job:nightly").await?);
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct InMemoryDistributedLock {
    inner: Arc<Inner>,
    retry: RetryConfig,
}

#[derive(Default)]
struct Inner {
    table: Mutex<Table>,
    released: Notify,
}

#[derive(Default)]
struct Table {
    holders: HashMap<String, Holder>,
    last_fence: u64,
}

struct Holder {
    token: LockToken,
    deadline: Instant,
}

impl Table {
    /// The live holder of `resource`, dropping an expired one.
    fn live_holder(&mut self, resource: &str, now: Instant) -> Option<&mut Holder> {
        if self
            .holders
            .get(resource)
            .is_some_and(|holder| holder.deadline <= now)
        {
            self.holders.remove(resource);
        }
        self.holders.get_mut(resource)
    }

    fn sweep_expired(&mut self, now: Instant) {
        self.holders.retain(|_, holder| holder.deadline > now);
    }
}

impl InMemoryDistributedLock {
    /// A new, empty lock service with the default [`RetryConfig`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the retry policy of [`acquire`](DistributedLock::acquire).
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// The retry policy in use.
    pub fn retry_config(&self) -> &RetryConfig {
        &self.retry
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding this mutex cannot leave the table inconsistent (every update is a
        // single insert or remove), so a poisoned lock is safe to keep using.
        self.inner
            .table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn grant(&self, resource: &str, ttl: Duration) -> Option<(LockToken, Instant)> {
        let sent_at = Instant::now();
        let mut table = self.table();
        if table.live_holder(resource, sent_at).is_some() {
            return None;
        }
        table.last_fence += 1;
        if table.last_fence.is_multiple_of(SWEEP_EVERY) {
            table.sweep_expired(sent_at);
        }
        let acquired_at = SystemTime::now();
        let token = LockToken::new(
            resource,
            LockToken::new_owner_value(),
            table.last_fence,
            acquired_at,
            acquired_at + ttl,
        );
        table.holders.insert(
            resource.to_owned(),
            Holder {
                token: token.clone(),
                deadline: sent_at + ttl,
            },
        );
        Some((token, safe_deadline(sent_at, ttl)))
    }
}

impl std::fmt::Debug for InMemoryDistributedLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryDistributedLock")
            .field("held", &self.table().holders.len())
            .field("retry", &self.retry)
            .finish()
    }
}

#[async_trait::async_trait]
impl DistributedLock for InMemoryDistributedLock {
    #[tracing::instrument(level = "debug", skip(self), fields(backend = "memory"))]
    async fn acquire(&self, resource: &str, ttl: Duration) -> StateResult<LockGuard> {
        // Woken early by a release in this process instead of sleeping the whole backoff.
        let budget = Budget {
            wake: Some(&self.inner.released),
            ..Budget::default()
        };
        acquire_with_budget(self, &self.retry, resource, ttl, budget).await
    }

    async fn try_acquire(&self, resource: &str, ttl: Duration) -> StateResult<Option<LockGuard>> {
        telemetry::observe("memory", Operation::Acquire, async move {
            validate_resource(resource)?;
            validate_ttl(ttl)?;
            let granted = self.grant(resource, ttl);
            tracing::trace!(resource, granted = granted.is_some(), "memory try_acquire");
            Ok(granted.map(|(token, valid_until)| {
                LockGuard::new(Arc::new(self.clone()), token, valid_until)
            }))
        })
        .await
    }

    async fn release_internal(
        &self,
        resource: &str,
        token: &LockToken,
        _internal: Internal,
    ) -> StateResult<()> {
        telemetry::observe("memory", Operation::Release, async move {
            validate_resource(resource)?;
            let now = Instant::now();
            let released = {
                let mut table = self.table();
                let owned = table
                    .live_holder(resource, now)
                    .is_some_and(|holder| holder.token.value == token.value);
                if owned {
                    table.holders.remove(resource);
                }
                owned
            };
            if !released {
                return Err(StateError::LockLost {
                    resource: resource.to_owned(),
                });
            }
            self.inner.released.notify_waiters();
            Ok(())
        })
        .await
    }

    async fn is_locked(&self, resource: &str) -> StateResult<bool> {
        validate_resource(resource)?;
        Ok(self.table().live_holder(resource, Instant::now()).is_some())
    }

    fn retry_policy(&self) -> &RetryConfig {
        &self.retry
    }

    fn backend_name(&self) -> &'static str {
        "memory"
    }

    fn service_id(&self, _internal: Internal) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    async fn extend(&self, guard: &mut LockGuard, ttl: Duration) -> StateResult<()> {
        telemetry::observe("memory", Operation::Extend, async move {
            guard.ensure_issued_by(self.service_id(Internal::new()))?;
            validate_ttl(ttl)?;
            let sent_at = Instant::now();
            let expires_at = SystemTime::now() + ttl;
            {
                let mut table = self.table();
                let holder = table
                    .live_holder(guard.resource(), sent_at)
                    .filter(|holder| holder.token.value == guard.token().value)
                    .ok_or_else(|| StateError::LockLost {
                        resource: guard.resource().to_owned(),
                    })?;
                holder.deadline = sent_at + ttl;
                holder.token.expires_at = expires_at;
            }
            guard.record_extension(expires_at, safe_deadline(sent_at, ttl));
            Ok(())
        })
        .await
    }

    async fn raise_fencing_counter(&self, resource: &str, at_least: u64) -> StateResult<()> {
        validate_resource(resource)?;
        let mut table = self.table();
        table.last_fence = table.last_fence.max(at_least);
        Ok(())
    }

    async fn get_lock_info(&self, resource: &str) -> StateResult<Option<LockToken>> {
        validate_resource(resource)?;
        Ok(self
            .table()
            .live_holder(resource, Instant::now())
            .map(|holder| holder.token.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lease_expires_on_the_tokio_clock() {
        let locks = InMemoryDistributedLock::new();
        let guard = locks
            .try_acquire("r", Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        tokio::time::advance(Duration::from_millis(4_950)).await;
        assert!(
            guard.is_expired(),
            "the guard gives up before the lease ends"
        );
        assert!(locks.is_locked("r").await.unwrap());
        tokio::time::advance(Duration::from_millis(50)).await;
        assert!(!locks.is_locked("r").await.unwrap());
        let next = locks
            .try_acquire("r", Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert!(next.fencing_token() > guard.fencing_token());
        assert!(guard.release().await.unwrap_err().is_lock_lost());
    }

    #[tokio::test(start_paused = true)]
    async fn waiter_wakes_on_release_without_waiting_for_its_backoff() {
        let locks = InMemoryDistributedLock::new().with_retry(RetryConfig {
            max_attempts: 3,
            initial_delay: Duration::from_secs(3600),
            max_delay: Duration::from_secs(3600),
            backoff_multiplier: 1.0,
        });
        let held = locks.acquire("r", Duration::from_secs(60)).await.unwrap();
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move { locks.acquire("r", Duration::from_secs(60)).await })
        };
        tokio::task::yield_now().await;
        let start = Instant::now();
        held.release().await.unwrap();
        let guard = waiter.await.unwrap().unwrap();
        assert!(start.elapsed() < Duration::from_secs(1));
        guard.release().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_swept() {
        let locks = InMemoryDistributedLock::new();
        for i in 0..SWEEP_EVERY - 1 {
            locks
                .try_acquire(&format!("r{i}"), Duration::from_millis(10))
                .await
                .unwrap()
                .unwrap()
                .leak();
        }
        tokio::time::advance(Duration::from_millis(20)).await;
        locks
            .try_acquire("last", Duration::from_secs(1))
            .await
            .unwrap()
            .unwrap()
            .leak();
        assert_eq!(locks.table().holders.len(), 1);
    }
}
