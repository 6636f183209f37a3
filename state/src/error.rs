//! The one error type of the crate.
//!
//! Every fallible operation returns [`StateResult`]. Variants say what happened and to which resource;
//! driver errors (redis-rs, sqlx) are kept as a boxed [`std::error::Error::source`] rather than
//! interpolated into the message, so error reporters do not print them twice and driver types stay
//! out of the public API.

use std::time::Duration;

/// A boxed driver error kept as the `source` of a [`StateError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of every fallible operation in this crate.
pub type StateResult<T> = Result<T, StateError>;

/// What went wrong, and to which resource.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// `acquire` gave up: the lock stayed held by someone else for every attempt.
    #[error("lock on `{resource}` not acquired after {attempts} attempts: held by another owner")]
    LockNotAcquired {
        /// The resource that was asked for.
        resource: String,
        /// How many attempts were made.
        attempts: u32,
    },

    /// The caller's token no longer owns the lock: it expired, was released, or another owner took it
    /// over. Returned by `release` and `extend` with a stale guard; a false unlock is never silent.
    #[error(
        "lock on `{resource}` is no longer held by this owner (expired, released or taken over)"
    )]
    LockLost {
        /// The resource whose lock was lost.
        resource: String,
    },

    /// The caller passed something the backend cannot accept (empty or over-long resource name, zero or
    /// unrepresentable TTL, malformed URL, ...). Never retryable.
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// What was invalid (`resource name`, `ttl`, `redis url`, ...).
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },

    /// The backend failed (connection refused, protocol error, server error, ...).
    #[error("{backend} backend failed to {operation} `{resource}`")]
    Backend {
        /// The backend's name (`redis`, `postgres`, ...).
        backend: &'static str,
        /// The operation that failed (`acquire`, `release`, `extend`, `connect`, ...).
        operation: &'static str,
        /// The resource the operation was for (or the server address for `connect`).
        resource: String,
        /// The driver's error.
        #[source]
        source: BoxError,
    },

    /// The backend did not answer within the configured operation timeout.
    #[error("{backend} backend timed out after {timeout:?} trying to {operation} `{resource}`")]
    Timeout {
        /// The backend's name.
        backend: &'static str,
        /// The operation that timed out.
        operation: &'static str,
        /// The resource the operation was for.
        resource: String,
        /// The timeout that elapsed.
        timeout: Duration,
    },

    /// A multi-node backend could not get a majority of its nodes to agree.
    #[error(
        "quorum not reached for `{resource}` on {operation}: {granted} of {nodes} nodes agreed, {needed} needed; failed nodes: [{}]",
        .failed_nodes.join("; ")
    )]
    QuorumNotReached {
        /// The resource.
        resource: String,
        /// The operation (`acquire`, `extend`, `release`, `inspect`, `connect`).
        operation: &'static str,
        /// The nodes that failed or timed out, each with what went wrong (passwords redacted).
        failed_nodes: Vec<String>,
        /// Nodes that granted the request.
        granted: usize,
        /// Nodes asked.
        nodes: usize,
        /// The quorum size.
        needed: usize,
    },

    /// An optimistic update kept colliding with concurrent writers until its retries ran out.
    #[error("concurrent updates to `{key}` kept conflicting after {attempts} attempts")]
    ConcurrencyConflict {
        /// The key being updated.
        key: String,
        /// How many attempts were made.
        attempts: u32,
    },

    /// A write carried a fencing token lower than one the store has already accepted for that key: the
    /// writer's lock was lost and someone newer has written. Never retryable.
    #[error("stale fencing token {token} for `{key}`: the store has already seen {highest}")]
    StaleFencingToken {
        /// The key written.
        key: String,
        /// The writer's token.
        token: u64,
        /// The highest token the store has accepted for the key.
        highest: u64,
    },

    /// A multi-step backend transaction did not commit.
    #[error("transaction failed: {reason}")]
    TransactionFailed {
        /// Why it failed.
        reason: String,
    },

    /// A key that had to exist does not.
    #[error("key `{key}` not found")]
    KeyNotFound {
        /// The missing key.
        key: String,
    },

    /// The caller cancelled the operation (its cancellation token fired) before it could finish.
    #[error("{operation} of `{resource}` was cancelled")]
    Cancelled {
        /// What was being done.
        operation: &'static str,
        /// The resource.
        resource: String,
    },

    /// Local or shared storage failed.
    #[error("storage error during {operation}")]
    StorageError {
        /// What was being done.
        operation: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
}

impl StateError {
    /// Whether repeating the same call later may succeed: contention, timeouts and backend
    /// failures are; invalid input and a lost lock are not (a lost lock must be re-acquired).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StateError::LockNotAcquired { .. }
                | StateError::Backend { .. }
                | StateError::Timeout { .. }
                | StateError::QuorumNotReached { .. }
                | StateError::ConcurrencyConflict { .. }
                | StateError::TransactionFailed { .. }
        )
    }

    /// Shorthand for an [`StateError::InvalidInput`].
    pub fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        StateError::InvalidInput {
            what,
            reason: reason.into(),
        }
    }

    /// Shorthand for a [`StateError::Backend`] wrapping a driver error.
    pub fn backend(
        backend: &'static str,
        operation: &'static str,
        resource: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        StateError::Backend {
            backend,
            operation,
            resource: resource.into(),
            source: source.into(),
        }
    }

    /// Whether this error means the caller's lock is gone.
    pub fn is_lock_lost(&self) -> bool {
        matches!(self, StateError::LockLost { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_error_keeps_driver_error_as_source_not_in_message() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = StateError::backend("redis", "acquire", "orders", io);
        assert_eq!(err.to_string(), "redis backend failed to acquire `orders`");
        let source = std::error::Error::source(&err).expect("has a source");
        assert_eq!(source.to_string(), "refused");
        assert!(err.is_retryable());
    }

    #[test]
    fn invalid_input_and_lost_lock_are_not_retryable() {
        assert!(!StateError::invalid("ttl", "zero").is_retryable());
        let lost = StateError::LockLost {
            resource: "r".into(),
        };
        assert!(!lost.is_retryable());
        assert!(lost.is_lock_lost());
    }
}
