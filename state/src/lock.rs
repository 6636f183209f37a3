//! The lock contract: [`DistributedLock`], [`LockToken`] and the input rules every backend shares.
//!
//! # Fencing tokens
//! A lease-based lock cannot by itself stop a holder that was paused (GC, swap, a stopped VM) from
//! writing after its lease ran out and someone else took the lock. Every successful acquisition therefore
//! carries a **fencing token**: a number strictly greater than every token the backend issued before for
//! that resource, also after the previous holder *expired*. Storage that remembers the highest token it
//! has seen and refuses writes carrying a smaller one turns the lock into a safe mutual exclusion
//! (Kleppmann, "How to do distributed locking", 2016). Pass [`LockGuard::fencing_token`] along with
//! every write the lock protects.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::{LockGuard, StateError, StateResult};

/// Longest resource name accepted, in bytes.
pub const MAX_RESOURCE_LEN: usize = 1024;

/// Longest TTL accepted by every backend (365 days). Longer leases are almost always a bug, and
/// every backend can represent this one exactly in milliseconds.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Who holds a lock, since when, until when, and with which fencing token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LockToken {
    /// The locked resource.
    pub resource: String,
    /// The owner's secret: 128 random bits in hex (the Redis backends store it with the acquire time
    /// appended, `"<secret>:<acquired_ms>"`, and this is that whole string). Only the holder of this value
    /// can release or extend.
    pub value: String,
    /// Strictly increasing per resource across all holders, including across expiry. See the module docs.
    pub fencing_token: u64,
    /// When the lock was acquired (the backend's clock where it has one).
    pub acquired_at: SystemTime,
    /// When the backend will expire the lock unless it is extended (the backend's clock where it has one).
    pub expires_at: SystemTime,
}

impl LockToken {
    /// Builds a token; backends call this when they hand out or report a lock.
    pub fn new(
        resource: impl Into<String>,
        value: impl Into<String>,
        fencing_token: u64,
        acquired_at: SystemTime,
        expires_at: SystemTime,
    ) -> Self {
        LockToken {
            resource: resource.into(),
            value: value.into(),
            fencing_token,
            acquired_at,
            expires_at,
        }
    }

    /// A fresh unguessable owner value: 128 bits from the operating system's RNG (`getrandom`), as 32
    /// hex digits. The owner value is the capability to release or extend a lock, so it never comes from
    /// a seeded generator alone (should the OS RNG fail, the thread RNG — a CSPRNG the OS seeded — fills in).
    pub fn new_owner_value() -> String {
        let mut value = String::with_capacity(32);
        push_owner_secret(&mut value);
        value
    }
}

/// Appends a fresh owner secret (see [`LockToken::new_owner_value`]) to `value`.
///
/// A per-thread generator alone is not enough: it is not reseeded in a forked child, and two processes
/// sharing a secret could release each other's locks. Hex by hand into one buffer: this runs per acquire.
pub(crate) fn push_owner_secret(value: &mut String) {
    use rand::{Rng, TryRngCore};
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = [0u8; 16];
    if rand::rngs::OsRng.try_fill_bytes(&mut bytes).is_err() {
        rand::rng().fill(&mut bytes);
    }
    let mut digits = [0u8; 32];
    for (pair, byte) in digits.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0x0f)];
    }
    // Always ASCII.
    value.push_str(std::str::from_utf8(&digits).unwrap_or_default());
}

impl fmt::Debug for LockToken {
    /// The owner value is a capability: only a prefix is shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = self.value.get(..8).unwrap_or(&self.value);
        f.debug_struct("LockToken")
            .field("resource", &self.resource)
            .field("value", &format_args!("{shown}…"))
            .field("fencing_token", &self.fencing_token)
            .field("acquired_at", &self.acquired_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A lock service: in-process, Redis, Redlock or PostgreSQL. Hold it as `Arc<dyn DistributedLock>`.
///
/// Contention is not an error: [`try_acquire`](Self::try_acquire) returns `Ok(None)`; only
/// [`acquire`](Self::acquire) running out of retries is. Every acquisition carries a fencing token
/// (see the [module docs](crate::lock)).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> state::StateResult<()> {
/// use std::{sync::Arc, time::Duration};
/// use state::{DistributedLock, InMemoryDistributedLock};
///
/// let locks: Arc<dyn DistributedLock> = Arc::new(InMemoryDistributedLock::new());
/// let guard = locks.acquire("orders:42", Duration::from_secs(10)).await?;
/// assert!(locks.try_acquire("orders:42", Duration::from_secs(10)).await?.is_none());
/// let token = guard.fencing_token(); // send this with every write the lock protects
/// guard.release().await?;
/// assert!(locks.try_acquire("orders:42", Duration::from_secs(10)).await?.unwrap().fencing_token() > token);
/// # Ok(()) }
/// ```
#[async_trait::async_trait]
pub trait DistributedLock: Send + Sync + fmt::Debug {
    /// Waits (retrying with the backend's [`RetryConfig`](crate::RetryConfig)) until the lock is held
    /// or retries run out.
    ///
    /// # Errors
    /// [`StateError::LockNotAcquired`] when it stayed held, [`StateError::InvalidInput`] for a bad name
    /// or TTL, a backend error when the last attempt failed on the backend.
    ///
    /// # Cancel safety
    /// Cancel safe: a lock obtained by a dropped future is released by its guard's `Drop`.
    async fn acquire(&self, resource: &str, ttl: Duration) -> StateResult<LockGuard>;

    /// Waits at most `wait` for the lock (Redisson's `tryLock(wait, lease)`): retries with the backend's
    /// backoff until `wait` runs out — the policy's attempt count does not apply — then
    /// [`StateError::LockNotAcquired`].
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire).
    ///
    /// # Cancel safety
    /// As [`acquire`](Self::acquire).
    async fn acquire_within(
        &self,
        resource: &str,
        ttl: Duration,
        wait: Duration,
    ) -> StateResult<LockGuard> {
        let budget = crate::retry::Budget {
            until: Some(crate::lock::wait_deadline(wait)?),
            ..Default::default()
        };
        crate::retry::acquire_with_budget(self, self.retry_policy(), resource, ttl, budget).await
    }

    /// Waits for the lock until `cancel` fires (etcd's `Lock(ctx)`), retrying with the backend's
    /// backoff without an attempt limit; a fired token ends the wait with [`StateError::Cancelled`].
    ///
    /// # Errors
    /// [`StateError::Cancelled`]; invalid input; the backend's non-retryable errors.
    ///
    /// # Cancel safety
    /// As [`acquire`](Self::acquire).
    async fn acquire_cancellable(
        &self,
        resource: &str,
        ttl: Duration,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> StateResult<LockGuard> {
        let budget = crate::retry::Budget {
            until: Some(tokio::time::Instant::now() + crate::lock::MAX_TTL),
            cancel: Some(cancel),
            ..Default::default()
        };
        crate::retry::acquire_with_budget(self, self.retry_policy(), resource, ttl, budget).await
    }

    /// The retry policy of [`acquire`](Self::acquire).
    fn retry_policy(&self) -> &crate::RetryConfig;

    /// The backend's name, the `backend` label of its metrics (see [`crate::telemetry`]): `memory`,
    /// `redis`, `redlock`, `postgres`, `etcd`; `custom` unless an implementation says otherwise.
    fn backend_name(&self) -> &'static str {
        "custom"
    }

    /// One attempt: `Ok(None)` when someone else holds it.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a bad name or TTL; a backend error when the backend failed.
    ///
    /// # Cancel safety
    /// Cancel safe: if the future is dropped after the backend granted the lock, the lock is released
    /// in the background (or expires after `ttl`).
    async fn try_acquire(&self, resource: &str, ttl: Duration) -> StateResult<Option<LockGuard>>;

    /// Releases only if `token` still owns `resource`. Only this crate's guards can call it — an
    /// [`Internal`] cannot be made elsewhere; users call [`LockGuard::release`].
    ///
    /// ```compile_fail,E0423
    /// # async fn steal(lock: std::sync::Arc<dyn state::DistributedLock>, token: state::LockToken) {
    /// // Releasing someone else's lock by its token does not compile outside the crate.
    /// let _ = lock.release_internal("orders:3", &token, state::lock::Internal(())).await;
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`StateError::LockLost`] when `token` no longer owns the lock (nothing is changed then).
    async fn release_internal(
        &self,
        resource: &str,
        token: &LockToken,
        internal: Internal,
    ) -> StateResult<()>;

    /// The identity of this lock service, shared by its clones: a guard remembers the service that
    /// granted it, and `extend` refuses a guard granted by another one.
    fn service_id(&self, internal: Internal) -> usize;

    /// Whether anyone currently holds `resource`.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a bad name; a backend error when the backend failed.
    async fn is_locked(&self, resource: &str) -> StateResult<bool>;

    /// Resets the TTL to `ttl` from now and updates the guard's expiry; an error (and no effect) when the
    /// guard no longer owns the lock.
    ///
    /// # Errors
    /// [`StateError::LockLost`] when the guard's lock expired or was taken over; a backend error.
    ///
    /// # Cancel safety
    /// If dropped mid-way the server may or may not have extended; the guard keeps its older, shorter
    /// expiry, which is the safe side.
    async fn extend(&self, guard: &mut LockGuard, ttl: Duration) -> StateResult<()>;

    /// The current holder's token, or `None` when `resource` is free.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a bad name; a backend error when the backend failed.
    async fn get_lock_info(&self, resource: &str) -> StateResult<Option<LockToken>>;

    /// Raises the fencing counter behind `resource` so that every later grant's token is larger than
    /// `at_least`; never lowers it (a smaller `at_least` changes nothing). The repair after the backend
    /// lost its counter (Redis without `appendonly`, a failover to a replica that had not seen the last
    /// increments, a recreated table): tokens would start again below those already written to fenced
    /// storage, and every such write would be refused until the counter climbed back.
    ///
    /// Where the counter is shared (PostgreSQL's sequence, the in-memory counter, etcd's revision) the
    /// raise applies to every resource of the service.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a bad name, or when the backend cannot raise that far (etcd's
    /// tokens are the cluster's revision: it is raised by writing, at most `MAX_ETCD_REVISION_RAISE`
    /// revisions at once);
    /// a backend error.
    async fn raise_fencing_counter(&self, resource: &str, at_least: u64) -> StateResult<()>;
}

/// A capability only this crate can create: it seals the [`DistributedLock`] methods that only guards
/// and backends may call ([`DistributedLock::release_internal`], [`DistributedLock::service_id`]).
#[derive(Debug, Clone, Copy)]
pub struct Internal(());

impl Internal {
    pub(crate) const fn new() -> Self {
        Internal(())
    }
}

/// Checks a resource name: not empty, at most [`MAX_RESOURCE_LEN`] bytes, no NUL character (which some
/// backends cannot store).
///
/// # Errors
/// [`StateError::InvalidInput`] naming the rule that was broken.
pub fn validate_resource(resource: &str) -> StateResult<()> {
    if resource.is_empty() {
        return Err(StateError::invalid("resource name", "must not be empty"));
    }
    if resource.len() > MAX_RESOURCE_LEN {
        return Err(StateError::invalid(
            "resource name",
            format!(
                "is {} bytes, the limit is {MAX_RESOURCE_LEN}",
                resource.len()
            ),
        ));
    }
    if resource.contains('\0') {
        return Err(StateError::invalid(
            "resource name",
            "must not contain NUL characters",
        ));
    }
    Ok(())
}

/// Checks a TTL: at least 1 ms (the backends' resolution) and at most [`MAX_TTL`].
///
/// # Errors
/// [`StateError::InvalidInput`] naming the rule that was broken.
pub fn validate_ttl(ttl: Duration) -> StateResult<()> {
    if ttl < Duration::from_millis(1) {
        return Err(StateError::invalid(
            "ttl",
            format!("{ttl:?} is below the 1 ms resolution of lock leases"),
        ));
    }
    if ttl > MAX_TTL {
        return Err(StateError::invalid(
            "ttl",
            format!("{ttl:?} is longer than the maximum lease of {MAX_TTL:?}"),
        ));
    }
    Ok(())
}

/// The instant a wait of `wait` from now ends (`acquire_within`'s budget).
///
/// # Errors
/// [`StateError::InvalidInput`] when `wait` reaches past what the clock can represent.
pub(crate) fn wait_deadline(wait: Duration) -> StateResult<tokio::time::Instant> {
    tokio::time::Instant::now()
        .checked_add(wait)
        .ok_or_else(|| StateError::invalid("wait", format!("{wait:?} is too long")))
}

/// The drift allowance subtracted from a lease on the client side: 1% of the TTL plus 2 ms (the
/// Redlock paper's clock-drift factor), so a guard believes it has the lock a little less long than the
/// server will keep it.
pub fn drift_allowance(ttl: Duration) -> Duration {
    ttl / 100 + Duration::from_millis(2)
}

/// The instant until which a lease granted for `ttl` on a request **sent** at `sent_at` is safely held:
/// `sent_at + ttl - drift`, on the monotonic clock. Never later than the server's own expiry.
pub fn safe_deadline(sent_at: tokio::time::Instant, ttl: Duration) -> tokio::time::Instant {
    let validity = ttl.saturating_sub(drift_allowance(ttl));
    sent_at.checked_add(validity).unwrap_or(sent_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_are_checked() {
        assert!(validate_resource("orders:42").is_ok());
        assert!(validate_resource("ünïcødé 'quoted'; DROP TABLE x; --").is_ok());
        assert!(validate_resource(&"x".repeat(MAX_RESOURCE_LEN)).is_ok());
        for bad in ["", "a\0b"] {
            assert!(matches!(
                validate_resource(bad),
                Err(StateError::InvalidInput { .. })
            ));
        }
        assert!(validate_resource(&"x".repeat(MAX_RESOURCE_LEN + 1)).is_err());
    }

    #[test]
    fn ttls_are_checked() {
        assert!(validate_ttl(Duration::from_millis(1)).is_ok());
        assert!(validate_ttl(MAX_TTL).is_ok());
        for bad in [
            Duration::ZERO,
            Duration::from_micros(999),
            MAX_TTL + Duration::from_millis(1),
            Duration::MAX,
        ] {
            assert!(validate_ttl(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn safe_deadline_is_before_the_server_expiry() {
        let sent = tokio::time::Instant::now();
        let ttl = Duration::from_secs(10);
        let deadline = safe_deadline(sent, ttl);
        assert_eq!(deadline, sent + Duration::from_millis(9_898));
        // A tiny TTL never yields a deadline after the send instant plus TTL, nor panics.
        assert!(safe_deadline(sent, Duration::from_millis(1)) <= sent + Duration::from_millis(1));
    }

    #[test]
    fn owner_values_are_128_bit_hex_and_unique() {
        let a = LockToken::new_owner_value();
        let b = LockToken::new_owner_value();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn debug_hides_most_of_the_owner_value() {
        let token = LockToken::new(
            "r",
            "0123456789abcdef0123456789abcdef",
            7,
            SystemTime::UNIX_EPOCH,
            SystemTime::UNIX_EPOCH,
        );
        let shown = format!("{token:?}");
        assert!(shown.contains("01234567…"));
        assert!(!shown.contains("0123456789abcdef0123"));
    }
}
