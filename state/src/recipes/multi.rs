//! Multi-resource locking: several resources, all or nothing, acquired in one canonical (sorted) order so
//! that two callers wanting overlapping sets can never deadlock; on any failure or drop, everything taken
//! is released.
//!
//! All or nothing also means all *valid*: waiting for a later resource can eat the lease of an earlier
//! one, so when the set is complete every guard must still have at least the minimum validity (by
//! default half the TTL). If one does not, everything is released and the set is acquired again (up to
//! [`SET_ATTEMPTS`] rounds), never returned half-expired.
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

/// Rounds of acquiring the whole set before `acquire` gives up on leases that keep running short.
pub const SET_ATTEMPTS: u32 = 3;

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
    /// Acquires every resource, each waiting per the backend's retry policy, in sorted order; when `Ok`
    /// returns, every guard is valid for at least half of `ttl`.
    ///
    /// # Errors
    /// The first failure (`LockNotAcquired`, a backend error, invalid input); `LockNotAcquired` naming
    /// the short resource when [`SET_ATTEMPTS`] rounds each ended with a lease below the minimum.
    /// Everything taken has been released then.
    ///
    /// # Cancel safety
    /// Cancel safe: locks taken by a dropped future are released by their guards.
    pub async fn acquire(
        lock: &Arc<dyn DistributedLock>,
        resources: &[&str],
        ttl: Duration,
    ) -> StateResult<MultiLock> {
        Self::acquire_with_min_validity(lock, resources, ttl, ttl / 2).await
    }

    /// As [`acquire`](Self::acquire), with every guard valid for at least `min_validity` when `Ok`
    /// returns.
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire); [`StateError::InvalidInput`] when `min_validity` is not below
    /// `ttl`.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn acquire_with_min_validity(
        lock: &Arc<dyn DistributedLock>,
        resources: &[&str],
        ttl: Duration,
        min_validity: Duration,
    ) -> StateResult<MultiLock> {
        if min_validity >= ttl {
            return Err(StateError::invalid(
                "min validity",
                format!("{min_validity:?} must be shorter than the ttl {ttl:?}"),
            ));
        }
        let sorted = canonical(resources)?;
        let mut short = String::new();
        for round in 1..=SET_ATTEMPTS {
            let mut guards = Vec::with_capacity(sorted.len());
            for resource in &sorted {
                match lock.acquire(resource, ttl).await {
                    Ok(guard) => guards.push(guard),
                    Err(err) => {
                        release_all(guards).await;
                        return Err(err);
                    }
                }
            }
            match first_short(&guards, min_validity) {
                None => return Ok(MultiLock { guards }),
                Some(resource) => {
                    tracing::debug!(
                        resource,
                        round,
                        "a lease ran short while waiting for the rest: acquiring the set again"
                    );
                    short = resource;
                    release_all(guards).await;
                }
            }
        }
        Err(StateError::LockNotAcquired {
            resource: short,
            attempts: SET_ATTEMPTS,
        })
    }

    /// One attempt at every resource: `Ok(None)` (and nothing held) if any is taken (or, on a backend
    /// so slow that a lease ran below half the TTL meanwhile, if any ran short).
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
        if first_short(&guards, ttl / 2).is_some() {
            // Only a very slow backend gets here; treat it like contention.
            release_all(guards).await;
            return Ok(None);
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

/// The first guard with less than `min_validity` left, by resource.
fn first_short(guards: &[LockGuard], min_validity: Duration) -> Option<String> {
    guards
        .iter()
        .find(|guard| guard.time_remaining() < min_validity)
        .map(|guard| guard.resource().to_owned())
}

async fn release_all(guards: Vec<LockGuard>) {
    for guard in guards.into_iter().rev() {
        let _ = guard.release().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InMemoryDistributedLock, RetryConfig};

    #[tokio::test]
    async fn a_set_is_never_returned_with_a_lease_that_ran_short() {
        let patient = RetryConfig {
            max_attempts: 200,
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(20),
            backoff_multiplier: 1.0,
        };
        let locks: Arc<dyn DistributedLock> =
            Arc::new(InMemoryDistributedLock::new().with_retry(patient));
        let ttl = Duration::from_millis(400);
        // "b" is busy for 300 ms: the set takes "a" first, then waits for "b" while a's lease runs.
        let busy = locks.acquire("b", Duration::from_secs(5)).await.unwrap();
        let freed = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            busy.release().await
        });
        let set = MultiLock::acquire(&locks, &["a", "b"], ttl).await.unwrap();
        for guard in set.guards() {
            assert!(
                guard.time_remaining() >= ttl / 2,
                "{} was returned with only {:?} left",
                guard.resource(),
                guard.time_remaining()
            );
        }
        freed.await.unwrap().unwrap();
        set.release().await.unwrap();
        assert!(matches!(
            MultiLock::acquire_with_min_validity(&locks, &["a"], ttl, ttl).await,
            Err(StateError::InvalidInput { .. })
        ));
    }
}
