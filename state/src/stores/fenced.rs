//! The storage contract of the [`fenced`](crate::recipes::fenced) recipe: values written under fencing
//! tokens, a write with a token below the highest accepted one refused. Each backend implements it in
//! its own folder (`backends/*/fenced.rs`).

use crate::{StateError, StateResult};

/// A value and the highest fencing token accepted for its key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FencedValue {
    /// The highest token accepted for the key, by a write or a [`fence`](FencedStore::fence).
    pub token: u64,
    /// The bytes written.
    pub value: Vec<u8>,
}

/// A key-value store whose writes are fenced.
#[async_trait::async_trait]
pub trait FencedStore: Send + Sync + std::fmt::Debug {
    /// Stores `value` under `key` if `token` is at least the highest token accepted for `key`
    /// (equal tokens are the same holder writing again).
    ///
    /// # Errors
    /// [`StateError::StaleFencingToken`] when a higher token has written; a backend error.
    async fn write(&self, key: &str, token: u64, value: &[u8]) -> StateResult<()>;

    /// The last accepted value and the highest accepted token.
    ///
    /// # Errors
    /// A backend error.
    async fn read(&self, key: &str) -> StateResult<Option<FencedValue>>;

    /// Raises the highest token accepted for `key` to `token` — from now on a write with a lower token is
    /// refused — and returns the current value: the read of a read-modify-write under a lock.
    ///
    /// # Errors
    /// [`StateError::StaleFencingToken`] when a higher token was accepted; a backend error.
    async fn fence(&self, key: &str, token: u64) -> StateResult<Option<FencedValue>>;
}

pub(crate) fn stale(key: &str, token: u64, highest: u64) -> StateError {
    StateError::StaleFencingToken {
        key: key.to_owned(),
        token,
        highest,
    }
}
