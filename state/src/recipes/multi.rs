//! Multi-resource locking: several resources, all or nothing, acquired in one canonical (sorted) order so
//! that two callers wanting overlapping sets can never deadlock; on any failure or drop, everything taken
//! is released.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> state::StateResult<()> {
//! use std::{sync::Arc, time::Duration};
//! use state::recipes::multi::MultiLock;
//! use state::{DistributedLock, InMemoryDistributedLock};
//!
//! let locks: Arc<dyn DistributedLock> = Arc::new(InMemoryDistributedLock::new());
//! let transfer = MultiLock::acquire(&locks, &["account:9", "account:3"], Duration::from_secs(5)).await?;
//! assert_eq!(transfer.resources(), vec!["account:3", "account:9"]);
//! assert!(MultiLock::try_acquire(&locks, &["account:3"], Duration::from_secs(5)).await?.is_none());
//! transfer.release().await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use crate::{DistributedLock, LockGuard, StateError, StateResult};

/// Several held locks; dropping it releases them all (in the background).
#[must_use = "dropping a MultiLock releases every lock in it"]
#[derive(Debug)]
pub struct MultiLock {
    guards: Vec<LockGuard>,
}

/// Sorted, de-duplicated, non-empty.
fn canonical<'a>(resources: &[&'a str]) -> StateResult<Vec<&'a str>> {
    let mut sorted = resources.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.is_empty() {
        return Err(StateError::invalid(
            "resources",
            "at least one resource is needed",
        ));
    }
    Ok(sorted)
}

impl MultiLock {
    /// Acquires every resource, each waiting per the backend's retry policy, in sorted order.
    ///
    /// # Errors
    /// The first failure (`LockNotAcquired`, a backend error, invalid input); everything taken so far
    /// has been released then.
    ///
    /// # Cancel safety
    /// Cancel safe: locks taken by a dropped future are released by their guards.
    pub async fn acquire(
        lock: &Arc<dyn DistributedLock>,
        resources: &[&str],
        ttl: Duration,
    ) -> StateResult<MultiLock> {
        let mut guards = Vec::new();
        for resource in canonical(resources)? {
            match lock.acquire(resource, ttl).await {
                Ok(guard) => guards.push(guard),
                Err(err) => {
                    release_all(guards).await;
                    return Err(err);
                }
            }
        }
        Ok(MultiLock { guards })
    }

    /// One attempt at every resource: `Ok(None)` (and nothing held) if any is taken.
    ///
    /// # Errors
    /// A backend error or invalid input; nothing is held then.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn try_acquire(
        lock: &Arc<dyn DistributedLock>,
        resources: &[&str],
        ttl: Duration,
    ) -> StateResult<Option<MultiLock>> {
        let mut guards = Vec::new();
        for resource in canonical(resources)? {
            match lock.try_acquire(resource, ttl).await {
                Ok(Some(guard)) => guards.push(guard),
                Ok(None) => {
                    release_all(guards).await;
                    return Ok(None);
                }
                Err(err) => {
                    release_all(guards).await;
                    return Err(err);
                }
            }
        }
        Ok(Some(MultiLock { guards }))
    }

    /// The held resources, in acquisition order.
    pub fn resources(&self) -> Vec<&str> {
        self.guards.iter().map(LockGuard::resource).collect()
    }

    /// The guards, for their fencing tokens.
    pub fn guards(&self) -> &[LockGuard] {
        &self.guards
    }

    /// Whether any of the leases has passed its safe deadline.
    pub fn any_expired(&self) -> bool {
        self.guards.iter().any(LockGuard::is_expired)
    }

    /// Extends every lease to `ttl`.
    ///
    /// # Errors
    /// The first failure (`LockLost` if one was lost); the others are still attempted.
    pub async fn extend(&mut self, ttl: Duration) -> StateResult<()> {
        let mut first_error = None;
        for guard in &mut self.guards {
            if let Err(err) = guard.extend(ttl).await {
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Releases every lock (in reverse order) and reports the first failure.
    ///
    /// # Errors
    /// `LockLost` if any lease had been lost; a backend error.
    pub async fn release(self) -> StateResult<()> {
        let mut first_error = None;
        for guard in self.guards.into_iter().rev() {
            if let Err(err) = guard.release().await {
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

async fn release_all(guards: Vec<LockGuard>) {
    for guard in guards.into_iter().rev() {
        let _ = guard.release().await;
    }
}
