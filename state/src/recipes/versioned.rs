//! Optimistic versioned updates: read a value with its version, compute the new value, write it only if
//! the version has not moved (compare-and-set), and retry with exponential backoff otherwise — the
//! row-version pattern, without holding a lock while computing. A batch form updates several keys
//! atomically.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> state::StateResult<()> {
//! use state::recipes::versioned::{optimistic_update, InMemoryVersionedStore};
//! use state::RetryConfig;
//!
//! let store = InMemoryVersionedStore::default();
//! let jackpot = optimistic_update(&store, "jackpot", &RetryConfig::default(), |old| {
//!     let cents: u64 = old.map_or(0, |v| String::from_utf8_lossy(v).parse().unwrap_or(0));
//!     (cents + 250).to_string().into_bytes()
//! })
//! .await?;
//! assert_eq!(jackpot.version, 1);
//! assert_eq!(jackpot.value, b"250");
//! # Ok(()) }
//! ```

use crate::retry::{Budget, Retried, retry_loop};
use crate::{RetryConfig, StateError, StateResult};

pub use crate::stores::versioned::{CasWrite, Versioned, VersionedStore};

/// Reads `key`, computes `update(old)`, and writes it if nobody wrote in between; retries per `retry`.
///
/// # Errors
/// [`StateError::ConcurrencyConflict`] when every attempt collided; a backend error.
pub async fn optimistic_update<S, F>(
    store: &S,
    key: &str,
    retry: &RetryConfig,
    mut update: F,
) -> StateResult<Versioned>
where
    S: VersionedStore + ?Sized,
    F: FnMut(Option<&[u8]>) -> Vec<u8>,
{
    let keys = [key];
    let mut written = optimistic_update_many(store, &keys, retry, |old| {
        vec![update(old[0].as_ref().map(|v| v.value.as_slice()))]
    })
    .await?;
    written.pop().ok_or_else(|| StateError::KeyNotFound {
        key: key.to_owned(),
    })
}

/// The batch form: reads every key, computes all new values from all old ones, and writes them together
/// or not at all; retries per `retry`. `update` gets the old values in the order of `keys` and returns
/// the new ones in the same order.
///
/// # Errors
/// [`StateError::ConcurrencyConflict`] when every attempt collided; [`StateError::InvalidInput`] when
/// `update` returns the wrong number of values or `keys` is empty; a backend error.
pub async fn optimistic_update_many<S, F>(
    store: &S,
    keys: &[&str],
    retry: &RetryConfig,
    mut update: F,
) -> StateResult<Vec<Versioned>>
where
    S: VersionedStore + ?Sized,
    F: FnMut(&[Option<Versioned>]) -> Vec<Vec<u8>>,
{
    if keys.is_empty() {
        return Err(StateError::invalid("keys", "at least one key is needed"));
    }
    // Called once per attempt, never across an await.
    let update = std::sync::Mutex::new(&mut update);
    let retried = retry_loop(retry, Budget::default(), |attempt| {
        let update = &update;
        async move {
            let mut old = Vec::with_capacity(keys.len());
            for key in keys {
                old.push(store.get(key).await?);
            }
            let new = (update.lock().unwrap_or_else(|p| p.into_inner()))(&old);
            if new.len() != keys.len() {
                return Err(StateError::invalid(
                    "update",
                    format!("returned {} values for {} keys", new.len(), keys.len()),
                ));
            }
            let writes: Vec<CasWrite> = keys
                .iter()
                .zip(&old)
                .zip(new)
                .map(|((key, old), value)| CasWrite {
                    key: (*key).to_owned(),
                    expected: old.as_ref().map_or(0, |v| v.version),
                    value,
                })
                .collect();
            if store.compare_and_set(&writes).await? {
                return Ok(Some(
                    writes
                        .into_iter()
                        .map(|w| Versioned {
                            version: w.expected + 1,
                            value: w.value,
                        })
                        .collect(),
                ));
            }
            tracing::trace!(attempt, keys = ?keys, "optimistic update conflicted");
            Ok(None)
        }
    })
    .await?;
    match retried {
        Retried::Done(written) => Ok(written),
        Retried::GaveUp {
            attempts,
            last_error,
        } => Err(
            last_error.unwrap_or_else(|| StateError::ConcurrencyConflict {
                key: keys.join(","),
                attempts,
            }),
        ),
        Retried::Cancelled => Err(StateError::Cancelled {
            operation: "optimistic update",
            resource: keys.join(","),
        }),
    }
}

pub use crate::backends::memory::versioned::InMemoryVersionedStore;

#[cfg(feature = "redis")]
pub use crate::backends::redis::versioned::RedisVersionedStore;

#[cfg(feature = "postgres")]
pub use crate::backends::postgres::versioned::PostgresVersionedStore;

#[cfg(feature = "etcd")]
pub use crate::backends::etcd::versioned::EtcdVersionedStore;
