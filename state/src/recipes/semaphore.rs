//! A distributed semaphore: at most N holders of a named resource at once, each permit with a TTL and an
//! owner-checked release.
//!
//! Built on the lock itself: permit `i` is the lock `semaphore:{name}:{i}`, so it works on every backend
//! with that backend's guarantees (TTLs, fencing tokens per permit, cancel safety) — Redis, Redlock,
//! PostgreSQL and in-process alike. Acquiring tries the slots starting at a random one, so contenders
//! spread out; it costs up to N attempts when nearly full.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> state::StateResult<()> {
//! use std::{sync::Arc, time::Duration};
//! use state::recipes::semaphore::Semaphore;
//! use state::{DistributedLock, InMemoryDistributedLock};
//!
//! let locks: Arc<dyn DistributedLock> = Arc::new(InMemoryDistributedLock::new());
//! let seats = Semaphore::new(locks, "tournament:players", 2, Duration::from_secs(30))?;
//! let a = seats.try_acquire().await?.expect("seat 1");
//! let b = seats.try_acquire().await?.expect("seat 2");
//! assert!(seats.try_acquire().await?.is_none()); // full
//! a.release().await?;
//! assert!(seats.try_acquire().await?.is_some());
//! # drop(b);
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use crate::lock::{validate_resource, validate_ttl};
use crate::retry::{Budget, Retried};
use crate::{DistributedLock, LockGuard, RetryConfig, StateError, StateResult};

/// At most `permits` holders of `name` at once.
#[derive(Clone)]
pub struct Semaphore {
    lock: Arc<dyn DistributedLock>,
    name: String,
    permits: u32,
    ttl: Duration,
    retry: RetryConfig,
}

impl std::fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Semaphore")
            .field("name", &self.name)
            .field("permits", &self.permits)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// One held permit; dropping it gives it back (in the background).
#[must_use = "dropping a Permit gives it back at once"]
#[derive(Debug)]
pub struct Permit {
    slot: u32,
    guard: LockGuard,
}

impl Permit {
    /// Which of the N slots this permit holds.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The fencing token of this permit's slot.
    pub fn fencing_token(&self) -> u64 {
        self.guard.fencing_token()
    }

    /// Extends the permit's lease.
    ///
    /// # Errors
    /// `LockLost` when the permit had expired and was given to someone else.
    pub async fn extend(&mut self, ttl: Duration) -> StateResult<()> {
        self.guard.extend(ttl).await
    }

    /// Gives the permit back; `Err(LockLost)` if it had expired (and may be someone else's now).
    ///
    /// # Errors
    /// `LockLost`, or a backend error.
    pub async fn release(self) -> StateResult<()> {
        self.guard.release().await
    }
}

impl Semaphore {
    /// A semaphore of `permits` permits, each held for `ttl` unless extended.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for zero permits, more than 10 000, a bad name or TTL.
    pub fn new(
        lock: Arc<dyn DistributedLock>,
        name: &str,
        permits: u32,
        ttl: Duration,
    ) -> StateResult<Self> {
        if permits == 0 || permits > 10_000 {
            return Err(StateError::invalid(
                "permits",
                format!("{permits} is outside 1..=10000"),
            ));
        }
        validate_resource(&format!("semaphore:{name}:{}", permits - 1))?;
        validate_ttl(ttl)?;
        Ok(Semaphore {
            lock,
            name: name.to_owned(),
            permits,
            ttl,
            retry: RetryConfig::default(),
        })
    }

    /// Sets how [`acquire`](Self::acquire) waits for a free permit.
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    fn slot_resource(&self, slot: u32) -> String {
        format!("semaphore:{}:{slot}", self.name)
    }

    /// One pass over the slots: a permit, or `Ok(None)` when all are held.
    ///
    /// # Errors
    /// A backend error.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn try_acquire(&self) -> StateResult<Option<Permit>> {
        let start = rand::rng().random_range(0..self.permits);
        for step in 0..self.permits {
            let slot = (start + step) % self.permits;
            if let Some(guard) = self
                .lock
                .try_acquire(&self.slot_resource(slot), self.ttl)
                .await?
            {
                return Ok(Some(Permit { slot, guard }));
            }
        }
        Ok(None)
    }

    /// Waits for a permit per the retry policy.
    ///
    /// # Errors
    /// [`StateError::LockNotAcquired`] when none freed up; a backend error.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn acquire(&self) -> StateResult<Permit> {
        let retried =
            crate::retry::retry_loop(&self.retry, Budget::default(), |_| self.try_acquire())
                .await?;
        match retried {
            Retried::Done(permit) => Ok(permit),
            Retried::GaveUp {
                attempts,
                last_error,
            } => Err(last_error.unwrap_or_else(|| StateError::LockNotAcquired {
                resource: format!("semaphore:{}", self.name),
                attempts,
            })),
            Retried::Cancelled => Err(StateError::Cancelled {
                operation: "acquire",
                resource: format!("semaphore:{}", self.name),
            }),
        }
    }

    /// How many permits are free right now (a snapshot: one check per slot).
    ///
    /// # Errors
    /// A backend error.
    pub async fn available_permits(&self) -> StateResult<u32> {
        let mut free = 0;
        for slot in 0..self.permits {
            if !self.lock.is_locked(&self.slot_resource(slot)).await? {
                free += 1;
            }
        }
        Ok(free)
    }
}
