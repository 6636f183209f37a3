//! Fenced writes: storage that accepts a write only if its fencing token is at least the highest it has
//! seen for that key, atomically. This is how fencing tokens become safety: a holder whose lease ran out
//! (paused, partitioned, slow) is refused once a newer holder has written.
//!
//! A read-modify-write needs one more step: the new holder **fences** the key as it reads it
//! ([`FencedStore::fence`]), so a stale holder's write is refused even when it lands between the new
//! holder's read and its write (plain fenced writes would take it: its token is still the highest
//! *written*). The torture suite found exactly that interleaving with PostgreSQL advisory locks, whose
//! TTL is enforced by the stale holder's own process when it resumes.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> state::StateResult<()> {
//! use state::recipes::fenced::{FencedStore, InMemoryFencedStore};
//! use state::StateError;
//!
//! let store = InMemoryFencedStore::default();
//! store.write("checkpoint:orders", 7, b"offset=100").await?;
//! store.write("checkpoint:orders", 9, b"offset=180").await?;
//! let stale = store.write("checkpoint:orders", 8, b"offset=150").await;
//! assert!(matches!(stale, Err(StateError::StaleFencingToken { highest: 9, .. })));
//! assert_eq!(store.read("checkpoint:orders").await?.unwrap().value, b"offset=180");
//! # Ok(()) }
//! ```

pub use crate::stores::fenced::{FencedStore, FencedValue};

pub use crate::backends::memory::fenced::InMemoryFencedStore;

#[cfg(feature = "redis")]
pub use crate::backends::redis::fenced::RedisFencedStore;

#[cfg(feature = "etcd")]
pub use crate::backends::etcd::fenced::EtcdFencedStore;

#[cfg(feature = "postgres")]
pub use crate::backends::postgres::fenced::PostgresFencedStore;
