//! Distributed locks with **fencing tokens**, and the coordination recipes built on them.
//!
//! One contract, [`DistributedLock`], with interchangeable backends:
//!
//! | backend | type | cargo feature |
//! |---|---|---|
//! | in-process (default, one process, many tasks) | [`InMemoryDistributedLock`] | always on |
//! | one Redis server | [`RedisDistributedLock`] | `redis` (default) |
//! | several Redis servers, majority quorum (Redlock) | [`RedlockDistributedLock`] | `redis` (default) |
//! | PostgreSQL: lease table, advisory locks, transaction locks | `PostgresDistributedLock` | `postgres` |
//! | etcd: a lease per guard, the key's create revision as fencing token | `EtcdDistributedLock` | `etcd` |
//!
//! Every acquisition returns a [`LockGuard`] carrying a [`LockToken`] whose `fencing_token` is strictly
//! greater than every token issued before for that resource, so storage can reject writes from a holder
//! whose lease already ran out (see [`lock`] for why a TTL alone is not enough). Dropping a guard releases
//! the lock in the background; [`LockGuard::release`] releases it and reports whether it was still ours.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> state::StateResult<()> {
//! use std::{sync::Arc, time::Duration};
//! use state::{DistributedLock, InMemoryDistributedLock};
//!
//! let locks: Arc<dyn DistributedLock> = Arc::new(InMemoryDistributedLock::new());
//! let guard = locks.acquire("checkpoint:orders", Duration::from_secs(30)).await?;
//! println!("holding with fencing token {}", guard.fencing_token());
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! The `conformance` feature makes the shared backend test suite public ([`conformance`]), so a
//! deployment can be checked with the same tests this crate runs against every backend.
//!
//! The user guide, `DISTRIBUTED_LOCKING.md` in the repository, shows every backend and recipe with
//! runnable code. Runnable examples live in the repository's `examples` crate: `quickstart`,
//! `leader_election`, `checkpoint`, `compaction`, `task_queue`, `multi_lock` (`cargo run -p examples
//! --example quickstart`). The package is `fenced-state` on crates.io; the library is `state`.

// docs.rs (and `RUSTDOCFLAGS="--cfg docsrs" cargo +nightly doc`): each item behind a cargo feature
// says which one.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backends;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod connect;
pub mod error;
pub mod guard;
pub mod lock;
pub mod recipes;
mod redact;
pub mod retry;
mod stores;
pub mod telemetry;

#[cfg(feature = "etcd")]
pub use backends::etcd::EtcdDistributedLock;
pub use backends::memory::InMemoryDistributedLock;
#[cfg(feature = "postgres")]
pub use backends::postgres::{PostgresDistributedLock, PostgresLockBuilder, PostgresLockMode};
#[cfg(feature = "redis")]
pub use backends::redis::RedisDistributedLock;
#[cfg(feature = "redis")]
pub use backends::redlock::RedlockDistributedLock;
pub use connect::{Backend, connect, connect_with_retry};
pub use error::{StateError, StateResult};
pub use guard::LockGuard;
pub use lock::{DistributedLock, LockToken};
pub use redact::{redact_lock_url, redact_url};
pub use retry::RetryConfig;

/// The user guide, `DISTRIBUTED_LOCKING.md`, compiled and run as doctests so its code cannot rot (it
/// shows every backend, so it is checked with all of them built).
#[cfg(all(doctest, feature = "redis", feature = "postgres", feature = "etcd"))]
#[doc = include_str!("../../DISTRIBUTED_LOCKING.md")]
pub struct UserGuide;

/// The crate's README (its page on crates.io), compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct CrateReadme;
