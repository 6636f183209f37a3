//! The storage contract of the [`roster`](crate::recipes::roster) recipe: a named set of members, each
//! live while its lease is, listed in **one request** whatever the set's size. Each backend implements
//! it in its own folder (`backends/*/roster.rs`): a sorted set read by one script (Redis), one `SELECT`
//! (PostgreSQL), one range read over a prefix of leased keys (etcd), a majority of Redis nodes (Redlock).
//!
//! The store decides liveness on its own clock (the server's time, the lease), never the reader's: an
//! entry whose lease ran out is never listed, and a lapsed member's renewal is refused, so the entry a
//! reader sees is always its current holder's.

use std::time::Duration;

use crate::lock::{validate_resource, validate_ttl};
use crate::{StateError, StateResult};

/// One live member of a roster.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RosterEntry {
    /// The member's name (unique in the roster while it is live).
    pub member: String,
    /// What the member recorded when it joined (an endpoint, say).
    pub record: Vec<u8>,
    /// The fencing token of this membership: greater than the token of every earlier join to the
    /// roster (while a majority of a Redlock's nodes keep their data).
    pub token: u64,
}

/// A membership this process holds: what [`RosterStore::renew`] and [`RosterStore::leave`] need.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RosterLease {
    /// The roster.
    pub roster: String,
    /// The member's name.
    pub member: String,
    /// An unguessable value naming this holder: only it may renew or remove the entry.
    pub holder: String,
    /// The record it joined with.
    pub record: Vec<u8>,
    /// The membership's fencing token.
    pub token: u64,
}

/// What changed in a roster, in one cheap read: a different value than the last one read means the
/// member list may differ (a join, a leave or an expiry), the same value that it does not. Renewals
/// do not change it, so a steady fleet never re-reads its members.
///
/// Every join hands out a token greater than all before it, so (live members, newest token) changes
/// on every join (the newest token grows) and on every departure without a join (the count drops).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RosterVersion {
    /// How many members are live.
    pub members: u64,
    /// The newest token the roster handed out (or its newest live member's).
    pub newest_token: u64,
}

impl RosterVersion {
    /// A version from its two parts (for stores outside this crate).
    pub fn new(members: u64, newest_token: u64) -> Self {
        RosterVersion {
            members,
            newest_token,
        }
    }
}

/// A set of members with leases, listed in one request.
#[async_trait::async_trait]
pub trait RosterStore: Send + Sync + std::fmt::Debug {
    /// Adds `member` to `roster` with `record`, live for `ttl`, unless a live entry of that name is
    /// there already (`None`: another holder has it; try again after its lease, or pick another name).
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for an empty or over-long name or a TTL out of range; a backend
    /// error.
    async fn join(
        &self,
        roster: &str,
        member: &str,
        record: &[u8],
        ttl: Duration,
    ) -> StateResult<Option<RosterLease>>;

    /// Keeps `lease`'s entry live for another `ttl` from now. `false` when the entry lapsed or another
    /// holder took the name since: the membership is lost (join again).
    ///
    /// # Errors
    /// A backend error (the entry lapses by itself when renewals stop).
    async fn renew(&self, lease: &RosterLease, ttl: Duration) -> StateResult<bool>;

    /// Removes `lease`'s entry at once (others see the member gone without waiting for its lease);
    /// `false` when it was no longer this holder's.
    ///
    /// # Errors
    /// A backend error (the entry lapses by itself).
    async fn leave(&self, lease: &RosterLease) -> StateResult<bool>;

    /// The live members of `roster`, sorted by name: one request.
    ///
    /// # Errors
    /// A backend error.
    async fn members(&self, roster: &str) -> StateResult<Vec<RosterEntry>>;

    /// The roster's [`RosterVersion`]: one request with a constant-size answer.
    ///
    /// # Errors
    /// A backend error.
    async fn version(&self, roster: &str) -> StateResult<RosterVersion>;
}

/// Checks the names and TTL of a join or a renewal.
///
/// # Errors
/// [`StateError::InvalidInput`] naming what is wrong.
pub(crate) fn validate(roster: &str, member: &str, ttl: Duration) -> StateResult<()> {
    validate_name("roster name", roster)?;
    validate_name("member name", member)?;
    validate_ttl(ttl)
}

/// Checks a roster or member name as a resource name is checked.
pub(crate) fn validate_name(what: &'static str, name: &str) -> StateResult<()> {
    validate_resource(name).map_err(|err| match err {
        StateError::InvalidInput { reason, .. } => {
            StateError::invalid(what, format!("`{}`: {reason}", shorten(name)))
        }
        other => other,
    })
}

fn shorten(name: &str) -> String {
    name.chars().take(64).collect()
}

/// A fresh holder value for a join.
fn new_holder() -> String {
    crate::LockToken::new_owner_value()
}

/// The lease a join asks for (names and TTL checked, a fresh holder; the token is the store's to set).
///
/// # Errors
/// [`StateError::InvalidInput`] naming what is wrong.
pub(crate) fn lease_to_join(
    roster: &str,
    member: &str,
    record: &[u8],
    ttl: Duration,
) -> StateResult<RosterLease> {
    validate(roster, member, ttl)?;
    Ok(RosterLease {
        roster: roster.to_owned(),
        member: member.to_owned(),
        holder: new_holder(),
        record: record.to_vec(),
        token: 0,
    })
}
