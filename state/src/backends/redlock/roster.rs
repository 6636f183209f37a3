//! The Redlock [`RosterStore`](crate::recipes::roster::RosterStore) (recipe [`roster`](crate::recipes::roster)): the Redis roster on every node,
//! decided by a majority as the lock is — so no one node is needed: a member is listed when the same
//! holder has it live on a majority of the nodes, and a renewal that reaches a majority puts the entry
//! back on a node that lost it (restarted empty, say).

use std::time::Duration;

use futures::future::join_all;

use super::{RedlockDistributedLock, quorum_of};
use crate::backends::redis::roster::{HeldEntry, RedisRosterStore};
use crate::stores::roster::{
    RosterEntry, RosterLease, RosterStore, RosterVersion, lease_to_join, validate,
};
use crate::{StateError, StateResult};

/// A [`RosterStore`] over a Redlock's nodes (its connections, its key prefix, its node timeout). Made
/// by [`RedlockDistributedLock::roster_store`].
#[derive(Clone)]
pub struct RedlockRosterStore {
    nodes: Vec<(RedisRosterStore, String)>,
}

impl std::fmt::Debug for RedlockRosterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedlockRosterStore")
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

impl RedlockDistributedLock {
    /// A [`RosterStore`] on this lock's nodes, sharing its connections.
    pub fn roster_store(&self) -> RedlockRosterStore {
        let nodes = self
            .nodes
            .iter()
            .map(|node| {
                let store = RedisRosterStore::from_connection_manager(node.conn.clone())
                    .with_timeout(self.node_timeout);
                // The lock's prefix was validated when it was set.
                let store = store.clone().with_key_prefix(&self.prefix).unwrap_or(store);
                (store, node.address.clone())
            })
            .collect();
        RedlockRosterStore { nodes }
    }
}

/// Each node's answer, in node order.
type Answers<T> = Vec<StateResult<T>>;

impl RedlockRosterStore {
    fn quorum(&self) -> usize {
        quorum_of(self.nodes.len())
    }

    async fn on_every_node<'a, T, F, Fut>(&'a self, request: F) -> Answers<T>
    where
        F: Fn(&'a RedisRosterStore) -> Fut,
        Fut: std::future::Future<Output = StateResult<T>>,
    {
        join_all(self.nodes.iter().map(|(store, _)| request(store))).await
    }

    /// The error when fewer than a majority answered.
    fn short<T>(&self, answers: &Answers<T>, roster: &str, operation: &'static str) -> StateError {
        let failed_nodes = answers
            .iter()
            .zip(&self.nodes)
            .filter_map(|(answer, (_, address))| {
                answer.as_ref().err().map(|err| format!("{address}: {err}"))
            })
            .collect();
        StateError::QuorumNotReached {
            resource: roster.to_owned(),
            operation,
            failed_nodes,
            granted: answers.iter().filter(|answer| answer.is_ok()).count(),
            nodes: self.nodes.len(),
            needed: self.quorum(),
        }
    }

    /// The nodes that answered, or the error when fewer than a majority did.
    fn majority<T>(
        &self,
        answers: Answers<T>,
        roster: &str,
        operation: &'static str,
    ) -> StateResult<Vec<T>> {
        if answers.iter().filter(|answer| answer.is_ok()).count() < self.quorum() {
            return Err(self.short(&answers, roster, operation));
        }
        Ok(answers.into_iter().filter_map(Result::ok).collect())
    }
}

/// The entries the same holder has on at least `quorum` of the nodes' listings, sorted by member:
/// the record of the first, the highest token.
fn held_on_a_majority(listings: Vec<Vec<HeldEntry>>, quorum: usize) -> Vec<RosterEntry> {
    let mut seen: std::collections::BTreeMap<(String, String), (RosterEntry, usize)> =
        std::collections::BTreeMap::new();
    for held in listings.into_iter().flatten() {
        let key = (held.entry.member.clone(), held.holder);
        let (entry, count) = seen.entry(key).or_insert((held.entry.clone(), 0));
        entry.token = entry.token.max(held.entry.token);
        *count += 1;
    }
    seen.into_values()
        .filter(|(_, count)| *count >= quorum)
        .map(|(entry, _)| entry)
        .collect()
}

#[async_trait::async_trait]
impl RosterStore for RedlockRosterStore {
    async fn join(
        &self,
        roster: &str,
        member: &str,
        record: &[u8],
        ttl: Duration,
    ) -> StateResult<Option<RosterLease>> {
        let mut lease = lease_to_join(roster, member, record, ttl)?;
        let answers = self
            .on_every_node(|store| store.join_as(&lease, ttl, 0))
            .await;
        let tokens: Vec<u64> = answers
            .iter()
            .filter_map(|answer| answer.as_ref().ok().copied().flatten())
            .collect();
        if tokens.len() >= self.quorum() {
            lease.token = tokens.iter().copied().max().unwrap_or(0);
            return Ok(Some(lease));
        }
        // No majority: take back what was granted, so that the name is free for the one who has it.
        self.on_every_node(|store| store.leave(&lease)).await;
        let refused = answers
            .iter()
            .filter(|answer| matches!(answer, Ok(None)))
            .count();
        if refused > self.nodes.len() - self.quorum() {
            Ok(None)
        } else {
            Err(self.short(&answers, roster, "join"))
        }
    }

    async fn renew(&self, lease: &RosterLease, ttl: Duration) -> StateResult<bool> {
        validate(&lease.roster, &lease.member, ttl)?;
        let answers = self.on_every_node(|store| store.renew(lease, ttl)).await;
        let renewed = answers
            .iter()
            .filter(|answer| matches!(answer, Ok(true)))
            .count();
        if renewed < self.quorum() {
            if answers.iter().filter(|answer| answer.is_ok()).count() < self.quorum() {
                return Err(self.short(&answers, &lease.roster, "renew"));
            }
            return Ok(false);
        }
        // Held on a majority: put the entry back where a node lost it (restarted empty, or it lapsed
        // there while the node was unreachable), so that one more node lost does not lose the member.
        let repairs = answers
            .iter()
            .zip(&self.nodes)
            .filter(|(answer, _)| matches!(answer, Ok(false)))
            .map(|(_, (store, address))| async move {
                match store.join_as(lease, ttl, lease.token).await {
                    Ok(Some(_)) => {
                        tracing::info!(node = %address, member = %lease.member, roster = %lease.roster, "roster entry restored on a node that had lost it");
                    }
                    Ok(None) => {}
                    Err(err) => {
                        tracing::debug!(node = %address, error = %err, "roster entry not restored");
                    }
                }
            });
        join_all(repairs).await;
        Ok(true)
    }

    async fn leave(&self, lease: &RosterLease) -> StateResult<bool> {
        let answers = self.on_every_node(|store| store.leave(lease)).await;
        let left = answers
            .iter()
            .filter(|answer| matches!(answer, Ok(true)))
            .count();
        Ok(left >= self.quorum())
    }

    async fn members(&self, roster: &str) -> StateResult<Vec<RosterEntry>> {
        crate::stores::roster::validate_name("roster name", roster)?;
        let answers = self.on_every_node(|store| store.held_entries(roster)).await;
        let listings = self.majority(answers, roster, "list")?;
        Ok(held_on_a_majority(listings, self.quorum()))
    }

    /// Changes whenever any node's roster changes or a node stops or starts answering: a spurious
    /// change costs one listing, never a missed one.
    async fn version(&self, roster: &str) -> StateResult<RosterVersion> {
        let answers = self.on_every_node(|store| store.version(roster)).await;
        if answers.iter().filter(|answer| answer.is_ok()).count() < self.quorum() {
            return Err(self.short(&answers, roster, "read the version of"));
        }
        let (mut members, mut digest) = (0u64, 0xcbf2_9ce4_8422_2325_u64);
        for (index, answer) in answers.iter().enumerate() {
            let (count, newest) = answer
                .as_ref()
                .map_or((u64::MAX, u64::MAX), |v| (v.members, v.newest_token));
            members = members.wrapping_add(count);
            for part in [index as u64, count, newest] {
                digest = (digest ^ part).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        Ok(RosterVersion::new(members, digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(member: &str, holder: &str, token: u64) -> HeldEntry {
        HeldEntry {
            entry: RosterEntry {
                member: member.to_owned(),
                record: b"r".to_vec(),
                token,
            },
            holder: holder.to_owned(),
        }
    }

    #[test]
    fn a_member_counts_only_where_one_holder_has_a_majority() {
        let listings = vec![
            vec![held("a", "h1", 3), held("b", "h2", 4)],
            vec![held("a", "h1", 5), held("b", "h9", 6)],
            vec![held("c", "h3", 7)],
        ];
        let members = held_on_a_majority(listings, 2);
        assert_eq!(
            members
                .iter()
                .map(|e| (e.member.as_str(), e.token))
                .collect::<Vec<_>>(),
            vec![("a", 5)],
            "b has two holders, c one node"
        );
    }
}
