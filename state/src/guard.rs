//! [`LockGuard`]: proof of holding a lock, released on drop without blocking.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::runtime::Handle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::lock::Internal;
use crate::{DistributedLock, LockToken, StateError, StateResult};

/// A held lock. Release it with [`release`](Self::release) to learn whether the release worked;
/// dropping it releases in the background.
///
/// # Drop
/// `Drop` never blocks and never panics: it hands the release to the Tokio runtime the lock was acquired
/// on. If that runtime is gone, nothing is sent and the lease simply expires after its TTL.
///
/// # Local expiry
/// The guard's deadline is computed on the safe side: from the instant the acquire (or extend) request was
/// *sent*, minus a drift allowance ([`drift_allowance`](crate::lock::drift_allowance)), on the monotonic
/// clock. So [`is_expired`](Self::is_expired) turns true before the server can have expired the lease.
#[must_use = "dropping a LockGuard releases the lock at once"]
#[clippy::has_significant_drop]
pub struct LockGuard {
    token: LockToken,
    valid_until: Instant,
    lock: Arc<dyn DistributedLock>,
    /// [`DistributedLock::service_id`] of the service that granted it.
    issuer: usize,
    runtime: Option<Handle>,
    armed: bool,
}

impl LockGuard {
    /// Wraps a lease a backend just granted. `valid_until` must be the safe local deadline
    /// ([`safe_deadline`](crate::lock::safe_deadline)). Captures the current Tokio runtime for the
    /// release on drop. Only backends make guards; users get them from `acquire`:
    ///
    /// ```compile_fail,E0624
    /// # fn forge(lock: std::sync::Arc<dyn state::DistributedLock>, token: state::LockToken) {
    /// let _ = state::LockGuard::new(lock, token, tokio::time::Instant::now());
    /// # }
    /// ```
    pub(crate) fn new(
        lock: Arc<dyn DistributedLock>,
        token: LockToken,
        valid_until: Instant,
    ) -> Self {
        LockGuard {
            token,
            valid_until,
            issuer: lock.service_id(Internal::new()),
            lock,
            runtime: Handle::try_current().ok(),
            armed: true,
        }
    }

    /// The locked resource.
    pub fn resource(&self) -> &str {
        &self.token.resource
    }

    /// The full token: owner value, fencing token, server-side times.
    pub fn token(&self) -> &LockToken {
        &self.token
    }

    /// The fencing token of this acquisition: send it with every write the lock protects.
    pub fn fencing_token(&self) -> u64 {
        self.token.fencing_token
    }

    /// Whether the safe local deadline has passed: the lock may be held by someone else now.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.valid_until
    }

    /// How long the lock is still safely held (zero once expired).
    pub fn time_remaining(&self) -> Duration {
        self.valid_until.saturating_duration_since(Instant::now())
    }

    /// The safe local deadline on the monotonic (Tokio) clock.
    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }

    /// Refuses a guard that the service `service_id` did not grant (a backend's `extend` checks this
    /// first).
    pub(crate) fn ensure_issued_by(&self, service_id: usize) -> StateResult<()> {
        if self.issuer == service_id {
            Ok(())
        } else {
            Err(StateError::invalid(
                "guard",
                format!(
                    "the guard of `{}` was granted by another lock service: extend it with the \
                     service that granted it (or call guard.extend)",
                    self.token.resource
                ),
            ))
        }
    }

    /// The backend that granted this lock.
    pub fn lock_service(&self) -> &Arc<dyn DistributedLock> {
        &self.lock
    }

    /// Extends the lease to `ttl` from now; shorthand for `backend.extend(&mut guard, ttl)`.
    ///
    /// # Errors
    /// [`StateError::LockLost`] when the lock is no longer ours.
    ///
    /// # Cancel safety
    /// See [`DistributedLock::extend`].
    pub async fn extend(&mut self, ttl: Duration) -> StateResult<()> {
        let lock = Arc::clone(&self.lock);
        lock.extend(self, ttl).await
    }

    /// Records a renewed lease; backends call this from `extend` after the server agreed.
    ///
    /// ```compile_fail,E0624
    /// # fn lengthen(guard: &mut state::LockGuard) {
    /// guard.record_extension(std::time::SystemTime::now(), tokio::time::Instant::now());
    /// # }
    /// ```
    pub(crate) fn record_extension(&mut self, expires_at: SystemTime, valid_until: Instant) {
        self.token.expires_at = expires_at;
        self.valid_until = valid_until;
    }

    /// Releases the lock and reports whether it was still ours.
    ///
    /// # Errors
    /// [`StateError::LockLost`] when the lease had expired or been taken over
    /// (a false unlock is never silent); a backend error when the backend could not be reached, in which
    /// case the lease expires after its TTL.
    ///
    /// # Cancel safety
    /// If dropped mid-way the release may or may not have reached the backend; the TTL is the backstop.
    pub async fn release(mut self) -> StateResult<()> {
        self.armed = false;
        let outcome = self
            .lock
            .release_internal(&self.token.resource, &self.token, Internal::new())
            .await;
        match &outcome {
            Ok(()) => tracing::debug!(resource = %self.token.resource, "lock released"),
            Err(err) => {
                tracing::debug!(resource = %self.token.resource, error = %err, "lock release failed")
            }
        }
        outcome
    }

    /// Gives up the guard without releasing: the lease stays until its TTL runs out. Returns the token
    /// (its fencing token stays valid for writes until then).
    pub fn leak(mut self) -> LockToken {
        self.armed = false;
        self.token.clone()
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        let Some(runtime) = self.runtime.take() else {
            return; // no runtime to release on: the TTL expires the lease
        };
        let lock = Arc::clone(&self.lock);
        let token = self.token.clone();
        // Spawning on a handle whose runtime has shut down drops the task without running it: the
        // TTL is the safety net then.
        runtime.spawn(async move {
            match lock.release_internal(&token.resource, &token, Internal::new()).await {
                Ok(()) => tracing::debug!(resource = %token.resource, "dropped lock released"),
                Err(err) => {
                    tracing::debug!(resource = %token.resource, error = %err, "dropped lock release failed")
                }
            }
        });
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("token", &self.token)
            .field("time_remaining", &self.time_remaining())
            .field("lock", &self.lock)
            .finish()
    }
}

/// Cancel safety for network acquires: armed with the new owner value right before the request may be
/// sent, it releases (compare-and-delete, so only our own lease) in the background if the acquire future
/// is dropped or times out after the server may have granted the lease. Disarmed once a guard exists, or
/// when the request provably never left (no connection could be had): nothing to clean up then.
///
/// The clean-up is bounded: a release that finds nothing is retried with exponential backoff (from
/// [`CLEANUP_FIRST_DELAY`], doubling) only for `retry_for` and at most [`CLEANUP_MAX_ATTEMPTS`] times, on
/// the backend's [`TaskTracker`] when it has one, so the backend can wait for its clean-ups on shutdown.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) struct PendingAcquire<'a> {
    lock: &'a Arc<dyn DistributedLock>,
    resource: &'a str,
    owner: &'a str,
    runtime: Option<Handle>,
    tracker: Option<&'a TaskTracker>,
    armed: bool,
    /// How long the cleanup keeps retrying a release that found nothing: a backend whose cancelled
    /// request may still execute *after* a release sent on another connection (PostgreSQL through a pool)
    /// needs this; a backend that orders both on one connection (Redis) does not.
    retry_for: Duration,
}

/// The first pause between clean-up releases that found nothing.
pub(crate) const CLEANUP_FIRST_DELAY: Duration = Duration::from_millis(25);
/// The most releases one clean-up sends.
pub(crate) const CLEANUP_MAX_ATTEMPTS: u32 = 10;

#[cfg_attr(not(feature = "redis"), allow(dead_code))]
impl<'a> PendingAcquire<'a> {
    /// Borrows what the clean-up would need and copies it only if the clean-up runs (an acquire runs
    /// this every time; the clean-up is rare).
    pub(crate) fn arm(
        lock: &'a Arc<dyn DistributedLock>,
        resource: &'a str,
        owner: &'a str,
    ) -> Self {
        PendingAcquire {
            lock,
            resource,
            owner,
            runtime: Handle::try_current().ok(),
            tracker: None,
            armed: true,
            retry_for: Duration::ZERO,
        }
    }

    /// Keeps retrying the cleanup release for `retry_for` while it finds no lease of ours.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn retrying_for(mut self, retry_for: Duration) -> Self {
        self.retry_for = retry_for;
        self
    }

    /// Runs the clean-up on `tracker` (which the backend drains on shutdown).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn tracked_by(mut self, tracker: &'a TaskTracker) -> Self {
        self.tracker = Some(tracker);
        self
    }

    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for PendingAcquire<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        let lock = Arc::clone(self.lock);
        let now = SystemTime::now();
        let token = LockToken::new(self.resource, self.owner, 0, now, now);
        let retry_for = self.retry_for;
        let cleanup = async move {
            // Err(LockLost) is the usual outcome: the request never reached the server. Where the
            // cancelled request can still land later, try again for a while, backing off.
            let started = Instant::now();
            let mut delay = CLEANUP_FIRST_DELAY;
            for _ in 0..CLEANUP_MAX_ATTEMPTS {
                match lock
                    .release_internal(&token.resource, &token, Internal::new())
                    .await
                {
                    Ok(()) | Err(StateError::InvalidInput { .. }) => return,
                    Err(_) if started.elapsed() + delay > retry_for => return,
                    Err(_) => {
                        tokio::time::sleep(delay).await;
                        delay = delay.saturating_mul(2);
                    }
                }
            }
        };
        // Spawning on a runtime that has shut down drops the task: the TTL is the safety net then.
        match self.tracker {
            Some(tracker) => drop(tracker.spawn_on(cleanup, &runtime)),
            None => drop(runtime.spawn(cleanup)),
        }
    }
}
