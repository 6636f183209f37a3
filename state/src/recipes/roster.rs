//! Group membership: a named roster of live members, each with a lease and a small record (an
//! endpoint, say), **listed in one request whatever the group's size** — what a fleet uses to know who
//! is in it (ZooKeeper's ephemeral group nodes, etcd's leased keys under a prefix, Redisson has none).
//!
//! A [`KeptMember`] joins and renews its lease in the background (every third of the TTL) and says
//! when its membership is lost; [`RosterStore::members`] lists the live members, and
//! [`RosterStore::version`] answers, in one constant-size read, whether that list may have changed —
//! renewals do not change it, so a steady group never re-reads its members. Liveness is decided on the
//! store's clock: a member whose lease ran out is never listed, and its late renewal is refused.
//!
//! | backend | store | one listing is |
//! |---|---|---|
//! | in process | [`InMemoryRosterStore`] | a map |
//! | Redis | `RedisRosterStore` | one Lua script over a sorted set of lease ends |
//! | Redlock | `RedlockRosterStore` | the Redis script on every node, a member counted on a majority |
//! | PostgreSQL | `PostgresRosterStore` | one `SELECT` |
//! | etcd | `EtcdRosterStore` | one range read over leased keys |
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> state::StateResult<()> {
//! use std::{sync::Arc, time::Duration};
//! use state::recipes::roster::{InMemoryRosterStore, KeptMember, RosterStore};
//!
//! let roster: Arc<dyn RosterStore> = Arc::new(InMemoryRosterStore::default());
//! let ttl = Duration::from_secs(5);
//! let a = KeptMember::join(&roster, "workers", "a", b"http://10.0.0.1:9090", ttl).await?.expect("free name");
//! let b = KeptMember::join(&roster, "workers", "b", b"http://10.0.0.2:9090", ttl).await?.expect("free name");
//! let seen = roster.version("workers").await?;
//! let names: Vec<String> = roster.members("workers").await?.into_iter().map(|m| m.member).collect();
//! assert_eq!(names, ["a", "b"]);
//! b.leave().await?;
//! assert_ne!(roster.version("workers").await?, seen, "a departure changes the version");
//! assert_eq!(roster.members("workers").await?.len(), 1);
//! # drop(a);
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{StateError, StateResult};

pub use crate::stores::roster::{RosterEntry, RosterLease, RosterStore, RosterVersion};

pub use crate::backends::memory::roster::InMemoryRosterStore;

#[cfg(feature = "redis")]
pub use crate::backends::redis::roster::RedisRosterStore;

#[cfg(feature = "redis")]
pub use crate::backends::redlock::roster::RedlockRosterStore;

#[cfg(feature = "etcd")]
pub use crate::backends::etcd::roster::EtcdRosterStore;

#[cfg(feature = "postgres")]
pub use crate::backends::postgres::roster::PostgresRosterStore;

/// A membership renewed in the background every third of its TTL until it is left, dropped or lost.
/// Dropping it stops the renewals and asks the runtime to remove the entry; [`leave`](Self::leave)
/// removes it and says whether that worked.
pub struct KeptMember {
    roster: Arc<dyn RosterStore>,
    lease: RosterLease,
    lost: CancellationToken,
    renewer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for KeptMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptMember")
            .field("roster", &self.lease.roster)
            .field("member", &self.lease.member)
            .field("token", &self.lease.token)
            .field("lost", &self.lost.is_cancelled())
            .finish()
    }
}

impl KeptMember {
    /// Joins `roster` as `member` with `record` for `ttl` and keeps the membership; `None` when a live
    /// member has that name.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a bad name or TTL; a backend error.
    pub async fn join(
        roster: &Arc<dyn RosterStore>,
        name: &str,
        member: &str,
        record: &[u8],
        ttl: Duration,
    ) -> StateResult<Option<KeptMember>> {
        let Some(lease) = roster.join(name, member, record, ttl).await? else {
            return Ok(None);
        };
        let lost = CancellationToken::new();
        let renewer = tokio::spawn(renew_until_lost(
            Arc::clone(roster),
            lease.clone(),
            ttl,
            lost.clone(),
        ));
        Ok(Some(KeptMember {
            roster: Arc::clone(roster),
            lease,
            lost,
            renewer: Some(renewer),
        }))
    }

    /// The membership's fencing token.
    pub fn token(&self) -> u64 {
        self.lease.token
    }

    /// The lease (roster, member, holder, record, token).
    pub fn lease(&self) -> &RosterLease {
        &self.lease
    }

    /// Whether the membership is lost: a renewal was refused (the lease ran out, or another holder has
    /// the name), or renewals failed until the lease may have run out on the store.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Cancelled when the membership is lost.
    pub fn lost_token(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Leaves the roster at once: others see the member gone without waiting for its lease.
    ///
    /// # Errors
    /// [`StateError::LockLost`] when the membership had already been lost; a backend error.
    pub async fn leave(mut self) -> StateResult<()> {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
        let was_lost = self.lost.is_cancelled();
        self.lost.cancel();
        let left = self.roster.leave(&self.lease).await?;
        if was_lost || !left {
            return Err(StateError::LockLost {
                resource: format!("{}/{}", self.lease.roster, self.lease.member),
            });
        }
        Ok(())
    }
}

impl Drop for KeptMember {
    fn drop(&mut self) {
        let Some(renewer) = self.renewer.take() else {
            return;
        };
        renewer.abort();
        self.lost.cancel();
        // Removing the entry is network work: hand it to the runtime if there is one; otherwise the
        // lease runs out by itself.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (roster, lease) = (Arc::clone(&self.roster), self.lease.clone());
            runtime.spawn(async move {
                let _ = roster.leave(&lease).await;
            });
        }
    }
}

/// Renews every third of `ttl`; a refusal, or errors until the lease may have run out, is a loss.
async fn renew_until_lost(
    roster: Arc<dyn RosterStore>,
    lease: RosterLease,
    ttl: Duration,
    lost: CancellationToken,
) {
    let mut valid_until = crate::lock::safe_deadline(tokio::time::Instant::now(), ttl);
    loop {
        tokio::time::sleep(ttl / 3).await;
        let sent_at = tokio::time::Instant::now();
        let renewal = tokio::time::timeout_at(valid_until, roster.renew(&lease, ttl)).await;
        match renewal {
            Ok(Ok(true)) => valid_until = crate::lock::safe_deadline(sent_at, ttl),
            Ok(Ok(false)) => {
                tracing::warn!(roster = %lease.roster, member = %lease.member, "roster membership lost: the lease ran out or another holder has the name");
                break;
            }
            Ok(Err(err)) if tokio::time::Instant::now() < valid_until => {
                tracing::debug!(roster = %lease.roster, member = %lease.member, error = %err, "roster renewal failed: retrying");
            }
            Ok(Err(_)) | Err(_) => {
                tracing::warn!(roster = %lease.roster, member = %lease.member, "roster membership lost: renewals failed until its lease may have run out");
                break;
            }
        }
    }
    lost.cancel();
}
