//! The in-process [`RosterStore`](crate::recipes::roster::RosterStore) (recipe [`roster`](crate::recipes::roster)): for tests, examples and a single process.
//! Time is Tokio's clock, like the in-process lock's.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::StateResult;
use crate::stores::roster::{
    RosterEntry, RosterLease, RosterStore, RosterVersion, lease_to_join, validate,
};

struct Member {
    holder: String,
    record: Vec<u8>,
    token: u64,
    deadline: Instant,
}

#[derive(Default)]
struct Roster {
    members: BTreeMap<String, Member>,
    last_token: u64,
}

impl Roster {
    fn drop_expired(&mut self, now: Instant) {
        self.members.retain(|_, member| member.deadline > now);
    }

    fn held_by(&mut self, lease: &RosterLease, now: Instant) -> Option<&mut Member> {
        self.drop_expired(now);
        self.members
            .get_mut(&lease.member)
            .filter(|member| member.holder == lease.holder)
    }
}

/// A [`RosterStore`] in process memory.
#[derive(Default)]
pub struct InMemoryRosterStore {
    rosters: Mutex<HashMap<String, Roster>>,
}

impl std::fmt::Debug for InMemoryRosterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryRosterStore")
            .finish_non_exhaustive()
    }
}

impl InMemoryRosterStore {
    fn with_roster<T>(&self, roster: &str, change: impl FnOnce(&mut Roster, Instant) -> T) -> T {
        // Every update is one insert or remove: a poisoned lock leaves nothing half-done.
        let mut rosters = self.rosters.lock().unwrap_or_else(|p| p.into_inner());
        change(
            rosters.entry(roster.to_owned()).or_default(),
            Instant::now(),
        )
    }
}

#[async_trait::async_trait]
impl RosterStore for InMemoryRosterStore {
    async fn join(
        &self,
        roster: &str,
        member: &str,
        record: &[u8],
        ttl: Duration,
    ) -> StateResult<Option<RosterLease>> {
        let mut lease = lease_to_join(roster, member, record, ttl)?;
        Ok(self.with_roster(roster, |entries, now| {
            entries.drop_expired(now);
            if entries.members.contains_key(member) {
                return None;
            }
            entries.last_token += 1;
            lease.token = entries.last_token;
            entries.members.insert(
                member.to_owned(),
                Member {
                    holder: lease.holder.clone(),
                    record: lease.record.clone(),
                    token: lease.token,
                    deadline: now + ttl,
                },
            );
            Some(lease)
        }))
    }

    async fn renew(&self, lease: &RosterLease, ttl: Duration) -> StateResult<bool> {
        validate(&lease.roster, &lease.member, ttl)?;
        Ok(self.with_roster(&lease.roster, |entries, now| {
            entries
                .held_by(lease, now)
                .map(|member| member.deadline = now + ttl)
                .is_some()
        }))
    }

    async fn leave(&self, lease: &RosterLease) -> StateResult<bool> {
        Ok(self.with_roster(&lease.roster, |entries, now| {
            entries.held_by(lease, now).is_some() && entries.members.remove(&lease.member).is_some()
        }))
    }

    async fn members(&self, roster: &str) -> StateResult<Vec<RosterEntry>> {
        Ok(self.with_roster(roster, |entries, now| {
            entries.drop_expired(now);
            entries
                .members
                .iter()
                .map(|(name, member)| RosterEntry {
                    member: name.clone(),
                    record: member.record.clone(),
                    token: member.token,
                })
                .collect()
        }))
    }

    async fn version(&self, roster: &str) -> StateResult<RosterVersion> {
        Ok(self.with_roster(roster, |entries, now| {
            entries.drop_expired(now);
            RosterVersion::new(entries.members.len() as u64, entries.last_token)
        }))
    }
}
