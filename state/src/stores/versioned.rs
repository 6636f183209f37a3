//! The storage contract of the [`versioned`](crate::recipes::versioned) recipe: values with versions,
//! written by compare-and-set over one or several keys. Each backend implements it in its own folder
//! (`backends/*/versioned.rs`).

use crate::StateResult;

/// A value and its version (1 for the first write; 0 means "absent" in compare-and-set).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Versioned {
    /// Incremented by every successful write.
    pub version: u64,
    /// The bytes.
    pub value: Vec<u8>,
}

/// One conditional write: set `key` to `value` if its version is still `expected` (0 = absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasWrite {
    /// The key.
    pub key: String,
    /// The version the writer read (0 when the key was absent).
    pub expected: u64,
    /// The new value.
    pub value: Vec<u8>,
}

/// A store of versioned values with an atomic multi-key compare-and-set.
#[async_trait::async_trait]
pub trait VersionedStore: Send + Sync + std::fmt::Debug {
    /// The current value and version of `key`.
    ///
    /// # Errors
    /// A backend error.
    async fn get(&self, key: &str) -> StateResult<Option<Versioned>>;

    /// Applies every write if every expectation holds, else none: `Ok(false)` on a conflict.
    ///
    /// # Errors
    /// A backend error.
    async fn compare_and_set(&self, writes: &[CasWrite]) -> StateResult<bool>;
}
