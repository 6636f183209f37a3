//! The lock keeper (watchdog): hold a lock and extend it in the background, and say at once when it is
//! lost — no later than the guard's safe local deadline, so protected work can stop before another holder
//! can start.
//!
//! Every renewal races the safe deadline: an extension that hangs (a frozen server, a cut network, a
//! stalled pool) is abandoned the moment the lease may have run out on the server, and the loss is
//! signalled then — not when the backend's own operation timeout fires. Releasing or dropping a
//! [`KeptLock`] also cancels its lost-token: work holding the context stops whenever the lock is no
//! longer held, for whatever reason.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> state::StateResult<()> {
//! use std::{sync::Arc, time::Duration};
//! use state::recipes::keeper::{with_lock, KeptLock, RenewalPolicy};
//! use state::{DistributedLock, InMemoryDistributedLock};
//!
//! let locks: Arc<dyn DistributedLock> = Arc::new(InMemoryDistributedLock::new());
//!
//! // Run work under a kept lock; `LockLost` if the lock is lost mid-way (the work is dropped then).
//! let sum = with_lock(&locks, "report:daily", Duration::from_secs(3), |ctx| async move {
//!     println!("working with fencing token {}", ctx.fencing_token());
//!     40 + 2
//! })
//! .await?;
//! assert_eq!(sum, 42);
//!
//! // Or hold one yourself:
//! let kept = KeptLock::acquire(&locks, "job:7", Duration::from_secs(3), RenewalPolicy::default()).await?;
//! let lost = kept.lost_token(); // hand this to the work: it is cancelled when the lock is lost
//! assert!(!lost.is_cancelled());
//! kept.release().await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::{DistributedLock, LockGuard, StateError, StateResult};

/// How a [`KeptLock`] renews its lease.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RenewalPolicy {
    /// Time between renewals; `None` means a third of the TTL.
    pub interval: Option<Duration>,
    /// Stop renewing after holding this long (the lock then runs out and is reported lost).
    pub max_hold: Option<Duration>,
    /// Stop renewing after this many renewals.
    pub max_renewals: Option<u32>,
    /// Pause between attempts after a transient renewal error (retried only until the safe deadline).
    pub retry_delay: Duration,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        RenewalPolicy {
            interval: None,
            max_hold: None,
            max_renewals: None,
            retry_delay: Duration::from_millis(50),
        }
    }
}

impl RenewalPolicy {
    /// Checks the policy against the lease `ttl` it will renew: an interval (when set) longer than zero
    /// and shorter than the TTL (a zero interval would spin, a longer one never renew in time), and a
    /// retry delay shorter than the TTL. Every [`KeptLock`] constructor runs this first.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] naming the setting and its value.
    pub fn validate(&self, ttl: Duration) -> StateResult<()> {
        if let Some(interval) = self.interval
            && (interval.is_zero() || interval >= ttl)
        {
            return Err(StateError::invalid(
                "renewal interval",
                format!("{interval:?} must be longer than zero and shorter than the ttl {ttl:?}"),
            ));
        }
        if self.retry_delay >= ttl {
            return Err(StateError::invalid(
                "renewal retry delay",
                format!(
                    "{:?} must be shorter than the ttl {ttl:?}",
                    self.retry_delay
                ),
            ));
        }
        Ok(())
    }

    /// Renew every `interval` instead of every third of the TTL.
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = Some(interval);
        self
    }

    /// Stop renewing after `max_hold`.
    pub fn with_max_hold(mut self, max_hold: Duration) -> Self {
        self.max_hold = Some(max_hold);
        self
    }

    /// Stop renewing after `max_renewals` renewals.
    pub fn with_max_renewals(mut self, max_renewals: u32) -> Self {
        self.max_renewals = Some(max_renewals);
        self
    }
}

/// What work running under a kept lock may know: the resource, the fencing token, and a token that is
/// cancelled the moment the lock is lost. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LockContext {
    resource: Arc<str>,
    fencing_token: u64,
    lost: CancellationToken,
    valid_until: Arc<watch::Sender<Instant>>,
}

impl LockContext {
    /// The locked resource.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The fencing token to send with every protected write.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// Cancelled when the lock is lost (a child token: cancelling it does not affect the lock).
    pub fn lost_token(&self) -> CancellationToken {
        self.lost.child_token()
    }

    /// Whether the lock has been lost.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// The safe local deadline of the latest grant or renewal: the lock is reported lost no later than
    /// this unless a renewal moves it.
    pub fn valid_until(&self) -> Instant {
        *self.valid_until.borrow()
    }
}

/// A lock kept alive by a background renewal task. Release it with [`release`](Self::release); dropping
/// it stops the renewal and releases the lock in the background.
#[must_use = "dropping a KeptLock releases the lock"]
pub struct KeptLock {
    guard: Arc<Mutex<Option<LockGuard>>>,
    context: LockContext,
    renewals: Arc<AtomicU32>,
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
    /// Released or dropped, the lock is no longer held: the context's lost-token fires.
    _lost_on_drop: DropGuard,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for KeptLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptLock")
            .field("resource", &self.context.resource)
            .field("fencing_token", &self.context.fencing_token)
            .field("lost", &self.context.is_lost())
            .field("renewals", &self.renewals())
            .finish()
    }
}

impl KeptLock {
    /// Acquires `resource` (waiting per the backend's retry policy) and keeps it.
    ///
    /// # Errors
    /// As [`DistributedLock::acquire`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn acquire(
        lock: &Arc<dyn DistributedLock>,
        resource: &str,
        ttl: Duration,
        policy: RenewalPolicy,
    ) -> StateResult<KeptLock> {
        policy.validate(ttl)?;
        let guard = lock.acquire(resource, ttl).await?;
        KeptLock::keep(guard, ttl, policy)
    }

    /// One attempt; `Ok(None)` when someone else holds it.
    ///
    /// # Errors
    /// As [`DistributedLock::try_acquire`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn try_acquire(
        lock: &Arc<dyn DistributedLock>,
        resource: &str,
        ttl: Duration,
        policy: RenewalPolicy,
    ) -> StateResult<Option<KeptLock>> {
        policy.validate(ttl)?;
        lock.try_acquire(resource, ttl)
            .await?
            .map(|guard| KeptLock::keep(guard, ttl, policy))
            .transpose()
    }

    /// Starts keeping a guard: renews it to `ttl` every interval until released, dropped or lost.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a policy that cannot keep a lease of `ttl` (see
    /// [`RenewalPolicy::validate`]); the guard is dropped (released) then.
    ///
    /// # Panics
    /// Outside a Tokio runtime (it spawns the renewal task).
    pub fn keep(guard: LockGuard, ttl: Duration, policy: RenewalPolicy) -> StateResult<KeptLock> {
        policy.validate(ttl)?;
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        let deadline = guard.valid_until();
        let backend = guard.lock_service().backend_name();
        let context = LockContext {
            resource: Arc::from(guard.resource()),
            fencing_token: guard.fencing_token(),
            lost: lost.clone(),
            valid_until: Arc::new(watch::channel(deadline).0),
        };
        let guard = Arc::new(Mutex::new(Some(guard)));
        let renewals = Arc::new(AtomicU32::new(0));
        let task = tokio::spawn(renew(
            Renewal {
                guard: Arc::clone(&guard),
                ttl,
                policy,
                lost: lost.clone(),
                stop: stop.clone(),
                renewals: Arc::clone(&renewals),
                resource: Arc::clone(&context.resource),
                valid_until: Arc::clone(&context.valid_until),
                backend,
            },
            deadline,
        ));
        Ok(KeptLock {
            guard,
            context,
            renewals,
            _stop_on_drop: stop.clone().drop_guard(),
            _lost_on_drop: lost.drop_guard(),
            stop,
            task: Some(task),
        })
    }

    /// The resource, fencing token and lost-token, to hand to the protected work.
    pub fn context(&self) -> LockContext {
        self.context.clone()
    }

    /// The fencing token of this hold.
    pub fn fencing_token(&self) -> u64 {
        self.context.fencing_token
    }

    /// The locked resource.
    pub fn resource(&self) -> &str {
        &self.context.resource
    }

    /// A token cancelled the moment the lock is lost (a child: cancelling it changes nothing).
    pub fn lost_token(&self) -> CancellationToken {
        self.context.lost_token()
    }

    /// Resolves when the lock is lost; never while it is held.
    pub async fn lost(&self) {
        self.context.lost.cancelled().await;
    }

    /// Whether the lock has been lost. Once true it stays true.
    pub fn is_lost(&self) -> bool {
        self.context.is_lost()
    }

    /// The safe local deadline of the latest grant or renewal (see [`LockContext::valid_until`]).
    pub fn valid_until(&self) -> Instant {
        self.context.valid_until()
    }

    /// How many times the lease was renewed.
    pub fn renewals(&self) -> u32 {
        self.renewals.load(Ordering::SeqCst)
    }

    /// Stops the renewal (waiting until no extension is in flight), then releases the lock.
    ///
    /// # Errors
    /// [`StateError::LockLost`] if the lock had been lost; a backend error from the release.
    ///
    /// # Cancel safety
    /// If dropped mid-way, the lock is released in the background or expires by its TTL.
    pub async fn release(mut self) -> StateResult<()> {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let guard = self.guard.lock().await.take();
        let lost = self.context.is_lost();
        match guard {
            Some(guard) if !lost => guard.release().await,
            Some(guard) => {
                // Tell the backend anyway (it may still be ours if the loss was only local), but report
                // the loss: the protected work was not covered to the end.
                let _ = guard.release().await;
                Err(StateError::LockLost {
                    resource: self.context.resource.to_string(),
                })
            }
            None => Err(StateError::LockLost {
                resource: self.context.resource.to_string(),
            }),
        }
    }
}

struct Renewal {
    guard: Arc<Mutex<Option<LockGuard>>>,
    ttl: Duration,
    policy: RenewalPolicy,
    lost: CancellationToken,
    stop: CancellationToken,
    renewals: Arc<AtomicU32>,
    resource: Arc<str>,
    valid_until: Arc<watch::Sender<Instant>>,
    /// The backend's metrics label.
    backend: &'static str,
}

impl Renewal {
    fn may_renew(&self, started: Instant) -> bool {
        let renewed = self.renewals.load(Ordering::SeqCst);
        self.policy.max_renewals.is_none_or(|max| renewed < max)
            && self
                .policy
                .max_hold
                .is_none_or(|max| started.elapsed() < max)
    }

    fn declare_lost(&self, why: &str) {
        if !self.lost.is_cancelled() {
            tracing::warn!(resource = %self.resource, why, "kept lock lost");
            crate::telemetry::lock_lost(self.backend);
            self.lost.cancel();
        }
    }
}

/// The renewal loop. It shares the guard (never owns the `KeptLock`), so dropping the `KeptLock` ends it.
async fn renew(renewal: Renewal, mut deadline: Instant) {
    let started = Instant::now();
    let interval = renewal.policy.interval.unwrap_or(renewal.ttl / 3);
    let mut next = started + interval;
    loop {
        let wake = if renewal.may_renew(started) {
            next.min(deadline)
        } else {
            deadline
        };
        tokio::select! {
            _ = renewal.stop.cancelled() => return,
            _ = tokio::time::sleep_until(wake) => {}
        }
        if Instant::now() >= deadline {
            renewal.declare_lost("the lease ran out before it could be renewed");
            return;
        }
        if !renewal.may_renew(started) {
            continue;
        }
        let mut slot = renewal.guard.lock().await;
        let Some(guard) = slot.as_mut() else { return };
        if renewal.stop.is_cancelled() {
            return; // released: never extend after the release began
        }
        // The extension races the safe deadline: past it the server may have expired the lease and
        // granted it to someone else, whatever the backend's own operation timeout says.
        let extended = tokio::select! {
            biased;
            _ = tokio::time::sleep_until(deadline) => None,
            extended = guard.extend(renewal.ttl) => Some(extended),
        };
        match extended {
            None => {
                renewal
                    .declare_lost("the backend did not confirm a renewal before the safe deadline");
                return;
            }
            Some(Ok(())) => {
                renewal.renewals.fetch_add(1, Ordering::SeqCst);
                deadline = guard.valid_until();
                renewal.valid_until.send_replace(deadline);
                next = Instant::now() + interval;
            }
            Some(Err(err)) if err.is_retryable() => {
                tracing::debug!(resource = %renewal.resource, error = %err, "renewal failed, retrying");
                next = Instant::now() + renewal.policy.retry_delay;
            }
            Some(Err(err)) => {
                renewal.declare_lost(&err.to_string());
                return;
            }
        }
    }
}

/// Runs `work` under a kept lock on `resource`: acquires (waiting per the backend's retry policy), renews
/// in the background, and releases when the work is done.
///
/// # Errors
/// [`StateError::LockLost`] if the lock was lost mid-way — the work future is dropped at that moment;
/// the acquire's errors. Work that finished while the lock was held returns its value even if the
/// release after it fails (that failure is logged: the lease then runs out by its TTL).
///
/// # Cancel safety
/// Dropping the future drops the work and releases the lock in the background.
pub async fn with_lock<T, F, Fut>(
    lock: &Arc<dyn DistributedLock>,
    resource: &str,
    ttl: Duration,
    work: F,
) -> StateResult<T>
where
    F: FnOnce(LockContext) -> Fut,
    Fut: Future<Output = T>,
{
    let kept = KeptLock::acquire(lock, resource, ttl, RenewalPolicy::default()).await?;
    run_kept(kept, work).await
}

/// Runs `work` under an already kept lock, as [`with_lock`] does.
///
/// # Errors
/// As [`with_lock`].
///
/// # Cancel safety
/// As [`with_lock`].
pub async fn run_kept<T, F, Fut>(kept: KeptLock, work: F) -> StateResult<T>
where
    F: FnOnce(LockContext) -> Fut,
    Fut: Future<Output = T>,
{
    let outcome = tokio::select! {
        biased;
        _ = kept.lost() => None,
        value = work(kept.context()) => Some(value),
    };
    match outcome {
        Some(value) => {
            // The work finished while the lock was held: its result stands. A release that fails now
            // only means the lease runs out by its TTL instead; it is reported, not returned.
            let resource = kept.resource().to_owned();
            if let Err(err) = kept.release().await {
                tracing::warn!(resource, error = %err, "work finished under the lock; releasing it failed (the lease will expire)");
            }
            Ok(value)
        }
        None => {
            // Lost: say so now. The release goes on in the background (dropping the kept lock hands it
            // to the runtime), so a hung backend cannot hold the caller past the safe deadline.
            let resource = kept.resource().to_owned();
            drop(kept);
            Err(StateError::LockLost { resource })
        }
    }
}
