//! Retry policy for [`DistributedLock::acquire`]: exponential
//! backoff with jitter, written once for every backend.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{DistributedLock, LockGuard, StateError, StateResult};

/// How `acquire` retries a contended (or failing) lock.
///
/// The delay before attempt `n + 1` is `initial_delay * backoff_multiplier^(n-1)`, capped at
/// `max_delay`, and then **jittered**: a uniformly random value between half of it and all of it, so
/// contenders that failed together do not retry in lockstep.
///
/// ```
/// use std::time::Duration;
/// use state::RetryConfig;
///
/// let patient = RetryConfig {
///     max_attempts: 100,
///     initial_delay: Duration::from_millis(10),
///     max_delay: Duration::from_millis(500),
///     backoff_multiplier: 1.5,
/// };
/// assert_eq!(RetryConfig::default().max_attempts, 10);
/// assert_eq!(RetryConfig::no_retry().max_attempts, 1);
/// assert!(patient.max_attempts > RetryConfig::aggressive().max_attempts);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryConfig {
    /// Attempts in total, the first included. `0` is treated as `1`.
    pub max_attempts: u32,
    /// Delay after the first failed attempt (before jitter).
    pub initial_delay: Duration,
    /// Upper bound of any delay (before jitter).
    pub max_delay: Duration,
    /// Growth factor of the delay per attempt; values below `1.0` are treated as `1.0`.
    pub backoff_multiplier: f64,
}

impl Default for RetryConfig {
    /// 10 attempts, 50 ms doubling up to 1 s: gives up after about 5 s of contention.
    fn default() -> Self {
        RetryConfig {
            max_attempts: 10,
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(1),
            backoff_multiplier: 2.0,
        }
    }
}

impl RetryConfig {
    /// A single attempt: `acquire` behaves like `try_acquire` but reports contention as
    /// [`StateError::LockNotAcquired`].
    pub fn no_retry() -> Self {
        RetryConfig {
            max_attempts: 1,
            ..RetryConfig::default()
        }
    }

    /// 50 attempts starting at 10 ms, growing 1.5× up to 200 ms: for short critical sections under
    /// heavy contention (about 8 s in total).
    pub fn aggressive() -> Self {
        RetryConfig {
            max_attempts: 50,
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(200),
            backoff_multiplier: 1.5,
        }
    }

    /// The un-jittered delay after failed attempt number `attempt` (1-based).
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let multiplier = self.backoff_multiplier.max(1.0);
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let scaled = self.initial_delay.as_secs_f64() * multiplier.powi(exponent);
        let capped = scaled.min(self.max_delay.as_secs_f64());
        Duration::try_from_secs_f64(capped).unwrap_or(self.max_delay)
    }

    /// The delay to sleep after failed attempt number `attempt`, jittered into `[base/2, base]`.
    pub fn jittered_delay(&self, attempt: u32) -> Duration {
        let base = self.base_delay(attempt);
        let half = base / 2;
        let spread = u64::try_from(base.saturating_sub(half).as_nanos()).unwrap_or(u64::MAX);
        let extra = if spread == 0 {
            0
        } else {
            rand::rng().random_range(0..=spread)
        };
        half.saturating_add(Duration::from_nanos(extra))
    }

    /// The longest delay a policy may ask for.
    pub const MAX_DELAY: Duration = Duration::from_secs(3600);

    /// Checks the policy: delays of at most [`MAX_DELAY`](Self::MAX_DELAY), `initial_delay <= max_delay`,
    /// a finite multiplier. `acquire` runs this first, so a bad policy is an error, never a panic.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] naming the field and its value.
    pub fn validate(&self) -> StateResult<()> {
        for (what, delay) in [
            ("retry initial delay", self.initial_delay),
            ("retry max delay", self.max_delay),
        ] {
            if delay > Self::MAX_DELAY {
                return Err(StateError::invalid(
                    what,
                    format!("{delay:?} is longer than {:?}", Self::MAX_DELAY),
                ));
            }
        }
        if self.initial_delay > self.max_delay {
            return Err(StateError::invalid(
                "retry initial delay",
                format!(
                    "{:?} is longer than the max delay {:?}",
                    self.initial_delay, self.max_delay
                ),
            ));
        }
        if !self.backoff_multiplier.is_finite() {
            return Err(StateError::invalid(
                "retry backoff multiplier",
                format!("{} is not a finite number", self.backoff_multiplier),
            ));
        }
        Ok(())
    }

    fn attempts(&self) -> u32 {
        self.max_attempts.max(1)
    }

    /// How long `acquire` waits under this policy at most (the un-jittered delays between its
    /// attempts): what a backend that waits for releases instead of sleeping (etcd) uses as its budget.
    pub fn total_wait(&self) -> Duration {
        (1..self.attempts())
            .map(|attempt| self.base_delay(attempt))
            .fold(Duration::ZERO, Duration::saturating_add)
    }
}

/// What bounds a retry loop besides its policy.
#[derive(Debug, Default, Clone, Copy)]
pub struct Budget<'a> {
    /// Keep trying until this instant (the policy's attempt count is then ignored: the wait budget
    /// decides, as Redisson's `tryLock(wait, lease)` does).
    pub until: Option<Instant>,
    /// Give up as soon as this fires (etcd's `Lock(ctx)`).
    pub cancel: Option<&'a CancellationToken>,
    /// Wake from a backoff sleep early when this is notified (a release in the same process).
    pub wake: Option<&'a Notify>,
    /// The attempt itself waits until the lock may be free (etcd's watch on the key) before it reports
    /// contention: contention is then retried at once, and only failures back off.
    pub attempt_waits: bool,
}

/// How a retry loop ended.
#[derive(Debug)]
pub enum Retried<T> {
    /// An attempt succeeded.
    Done(T),
    /// The attempts or the wait budget ran out; the last attempt's retryable error, if it failed.
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error when it was a (retryable) failure rather than contention.
        last_error: Option<StateError>,
    },
    /// The budget's cancel token fired.
    Cancelled,
}

/// The crate's one retry loop — lock acquisition on every backend, semaphores and optimistic updates
/// all run on it: `attempt(n)` until it returns `Some`, sleeping the policy's jittered backoff between
/// attempts, within the [`Budget`]. `Ok(None)` and retryable errors are retried; any other error
/// returns at once. (Hand-written rather than `backon`: it needs wake-ups from local releases and a
/// deadline that also shortens the last sleep, in one place.)
///
/// # Errors
/// [`StateError::InvalidInput`] for an invalid policy; the first non-retryable error of an attempt.
///
/// # Cancel safety
/// As cancel safe as `attempt`'s future: dropping it (also when `cancel` fires) drops the attempt.
pub async fn retry_loop<T, F, Fut>(
    retry: &RetryConfig,
    budget: Budget<'_>,
    mut attempt: F,
) -> StateResult<Retried<T>>
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = StateResult<Option<T>>>,
{
    retry.validate()?;
    let cancelled = || budget.cancel.is_some_and(CancellationToken::is_cancelled);
    let mut made = 0u32;
    loop {
        made = made.saturating_add(1);
        // Registered before the attempt, so a release between the attempt and the sleep still wakes us.
        let woken = budget.wake.map(Notify::notified);
        let outcome = match budget.cancel {
            Some(cancel) => tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(Retried::Cancelled),
                outcome = attempt(made) => outcome,
            },
            None => attempt(made).await,
        };
        let (last_error, contended) = match outcome {
            Ok(Some(value)) => return Ok(Retried::Done(value)),
            Ok(None) => (None, true),
            Err(err) if err.is_retryable() => (Some(err), false),
            Err(err) => return Err(err),
        };
        let now = Instant::now();
        let out_of_budget = match budget.until {
            Some(until) => now >= until,
            None => made >= retry.attempts(),
        };
        if out_of_budget {
            return Ok(Retried::GaveUp {
                attempts: made,
                last_error,
            });
        }
        if contended && budget.attempt_waits {
            continue;
        }
        let mut delay = retry.jittered_delay(made);
        if let Some(until) = budget.until {
            delay = delay.min(until.saturating_duration_since(now));
        }
        let sleep = tokio::time::sleep(delay);
        let cancel = async {
            match budget.cancel {
                Some(cancel) => cancel.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let wake = async {
            match woken {
                Some(woken) => woken.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = wake => {}
            _ = cancel => return Ok(Retried::Cancelled),
        }
        if cancelled() {
            return Ok(Retried::Cancelled);
        }
    }
}

/// `acquire` within a [`Budget`], on [`retry_loop`]: what every backend's `acquire`, `acquire_within`
/// and `acquire_cancellable` run.
///
/// Contention ends in [`StateError::LockNotAcquired`]; if the last attempt failed with a retryable
/// backend error, that error is returned instead so the caller sees *why*; a fired cancel token ends in
/// [`StateError::Cancelled`]. Non-retryable errors (invalid input) return at once.
///
/// # Errors
/// As above.
///
/// # Cancel safety
/// Cancel safe as long as the backend's `try_acquire` is: a guard that was obtained is either returned
/// or, when the future is dropped, released by the guard's `Drop`.
pub async fn acquire_with_budget<L>(
    lock: &L,
    retry: &RetryConfig,
    resource: &str,
    ttl: Duration,
    budget: Budget<'_>,
) -> StateResult<LockGuard>
where
    L: DistributedLock + ?Sized,
{
    let retried = retry_loop(retry, budget, |attempt| {
        if attempt > 1 {
            crate::telemetry::acquire_retried(lock.backend_name());
        }
        lock.try_acquire(resource, ttl)
    })
    .await?;
    acquired(resource, retried)
}

/// What an acquisition retry loop's outcome means to the caller: the guard, `LockNotAcquired` (or the
/// last attempt's retryable error, so the caller sees *why*), or `Cancelled`.
pub(crate) fn acquired(resource: &str, retried: Retried<LockGuard>) -> StateResult<LockGuard> {
    match retried {
        Retried::Done(guard) => {
            tracing::debug!(resource, "lock acquired");
            Ok(guard)
        }
        Retried::GaveUp {
            attempts,
            last_error,
        } => Err(last_error.unwrap_or_else(|| StateError::LockNotAcquired {
            resource: resource.to_owned(),
            attempts,
        })),
        Retried::Cancelled => Err(StateError::Cancelled {
            operation: "acquire",
            resource: resource.to_owned(),
        }),
    }
}

/// The generic `acquire`: [`acquire_with_budget`] bounded by the policy's attempts.
///
/// # Errors
/// As [`acquire_with_budget`].
///
/// # Cancel safety
/// As [`acquire_with_budget`].
pub async fn acquire_with_retry<L>(
    lock: &L,
    retry: &RetryConfig,
    resource: &str,
    ttl: Duration,
) -> StateResult<LockGuard>
where
    L: DistributedLock + ?Sized,
{
    acquire_with_budget(lock, retry, resource, ttl, Budget::default()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_by_the_multiplier_and_stop_at_the_cap() {
        let retry = RetryConfig::default();
        assert_eq!(retry.base_delay(1), Duration::from_millis(50));
        assert_eq!(retry.base_delay(2), Duration::from_millis(100));
        assert_eq!(retry.base_delay(3), Duration::from_millis(200));
        assert_eq!(retry.base_delay(10), Duration::from_secs(1));
        assert_eq!(retry.base_delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_between_half_and_full_delay_and_varies() {
        let retry = RetryConfig::default();
        let samples: Vec<Duration> = (0..200).map(|_| retry.jittered_delay(3)).collect();
        for delay in &samples {
            assert!(*delay >= Duration::from_millis(100) && *delay <= Duration::from_millis(200));
        }
        let distinct: std::collections::HashSet<_> = samples.iter().collect();
        assert!(distinct.len() > 50, "jitter must spread contenders out");
    }

    #[test]
    fn the_total_wait_sums_the_delays_between_attempts() {
        assert_eq!(RetryConfig::no_retry().total_wait(), Duration::ZERO);
        // 50 + 100 + 200 + 400 + 800 + 4 × 1000 ms
        assert_eq!(
            RetryConfig::default().total_wait(),
            Duration::from_millis(5_550)
        );
    }

    #[test]
    fn odd_configs_do_not_panic() {
        let weird = RetryConfig {
            max_attempts: 0,
            initial_delay: Duration::MAX,
            max_delay: Duration::from_secs(2),
            backoff_multiplier: f64::NAN,
        };
        assert_eq!(weird.attempts(), 1);
        assert!(weird.base_delay(5) <= Duration::from_secs(2));
        let _ = weird.jittered_delay(5);
    }
}
