//! Fleet membership and partition assignment through the `state` crate — not Kafka's group rebalancing.
//!
//! - **Membership**: each instance holds a kept lock on one *member slot* `member:{group}:{topic}:{slot}`
//!   (slots `0..max_members`, like a semaphore; one set per job, so jobs on other topics never count) and records its instance id in a [`FencedStore`] under that
//!   slot with the slot's fencing token. The live members are the held slots. An instance that dies stops
//!   renewing; its slot expires and it drops out of everyone's view.
//! - **Assignment**: rendezvous (highest-random-weight) hashing of each partition over the live members'
//!   ids: every instance computes the same owner for every partition from the same member list, and when a
//!   member joins or leaves only the partitions it gains or loses move.
//! - **Claims**: the owner still claims `partition:{topic}:{p}` with a kept lock; the hash only says who
//!   *should* claim. The lock (and its fencing token) is what makes ownership safe when views disagree
//!   for a moment.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use state::DistributedLock;
use state::recipes::fenced::FencedStore;
use state::recipes::keeper::{KeptLock, RenewalPolicy};

use crate::error::{ProcessorError, ProcessorResult};
use crate::hash::stable_hash;

/// The rendezvous weight of `member` for `partition` (stable across processes and releases).
fn weight(topic: &str, partition: i32, member: &str) -> u64 {
    stable_hash(&[
        topic.as_bytes(),
        &partition.to_be_bytes(),
        member.as_bytes(),
    ])
}

/// Who should own each partition of `topic` (`0..partitions`) among `members`: rendezvous hashing with
/// bounded loads — each partition goes to the member with the highest weight for it that still has room
/// under `ceil(partitions / members)`. Every instance computes the same map from the same member list;
/// the split is fair (no member gets more than one above another), and a change of membership moves
/// mostly the partitions of the member that came or went. Empty when there are no members.
pub fn assignment<'a>(
    topic: &str,
    partitions: i32,
    members: &'a [String],
) -> BTreeMap<i32, &'a str> {
    let mut owners = BTreeMap::new();
    if members.is_empty() || partitions <= 0 {
        return owners;
    }
    let cap = usize::try_from(partitions)
        .unwrap_or(0)
        .div_ceil(members.len());
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    for partition in 0..partitions {
        let owner = members
            .iter()
            .filter(|m| load.get(m.as_str()).copied().unwrap_or(0) < cap)
            .max_by_key(|m| (weight(topic, partition, m), m.as_str()));
        if let Some(owner) = owner {
            *load.entry(owner.as_str()).or_insert(0) += 1;
            owners.insert(partition, owner.as_str());
        }
    }
    owners
}

/// The member that should own `partition` of `topic` (`0..partitions`) among `members` (see
/// [`assignment`]); `None` when there are no members or the partition is out of range.
pub fn owner_of<'a>(
    topic: &str,
    partitions: i32,
    partition: i32,
    members: &'a [String],
) -> Option<&'a str> {
    assignment(topic, partitions, members).remove(&partition)
}

/// The partitions of `topic` (`0..partitions`) that `member` should own.
pub fn assigned_to(topic: &str, partitions: i32, member: &str, members: &[String]) -> Vec<i32> {
    assignment(topic, partitions, members)
        .into_iter()
        .filter(|(_, owner)| *owner == member)
        .map(|(partition, _)| partition)
        .collect()
}

/// The partitions of `topic` (`0..partitions`) for which `member` keeps one of the `replicas` standby
/// copies: the members after the owner in each partition's rendezvous order (highest weight first).
/// Stable like the assignment: a member coming or going moves few standbys.
pub fn standby_of(
    topic: &str,
    partitions: i32,
    member: &str,
    members: &[String],
    replicas: usize,
) -> Vec<i32> {
    if replicas == 0 {
        return Vec::new();
    }
    assignment(topic, partitions, members)
        .into_iter()
        .filter(|(partition, owner)| {
            *owner != member && {
                let mut others: Vec<&String> =
                    members.iter().filter(|m| m.as_str() != *owner).collect();
                others
                    .sort_by_key(|m| std::cmp::Reverse((weight(topic, *partition, m), m.as_str())));
                others.iter().take(replicas).any(|m| m.as_str() == member)
            }
        })
        .map(|(partition, _)| partition)
        .collect()
}

/// This instance's membership in a fleet.
pub struct Membership {
    lock: Arc<dyn DistributedLock>,
    registry: Arc<dyn FencedStore>,
    group: String,
    topic: String,
    instance: String,
    max_members: u32,
    ttl: Duration,
    endpoint: Option<String>,
    slot: Option<(u32, KeptLock)>,
    /// Whether the "every slot is taken" warning was given since the last successful announce.
    warned_full: bool,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("group", &self.group)
            .field("topic", &self.topic)
            .field("instance", &self.instance)
            .field("slot", &self.slot.as_ref().map(|(slot, _)| *slot))
            .finish()
    }
}

impl Membership {
    /// Membership of `instance` in the job on `topic` of fleet `group`, with at most `max_members`
    /// members, announced by leases of `ttl` (renewed every `ttl / 3`).
    ///
    /// # Errors
    /// [`ProcessorError::InvalidInput`] for an empty instance id or a zero `max_members`.
    pub fn new(
        lock: Arc<dyn DistributedLock>,
        registry: Arc<dyn FencedStore>,
        group: &str,
        topic: &str,
        instance: &str,
        max_members: u32,
        ttl: Duration,
    ) -> ProcessorResult<Self> {
        if instance.is_empty() || max_members == 0 {
            return Err(ProcessorError::InvalidInput {
                what: "membership",
                reason: "the instance id must not be empty and max_members must be at least 1"
                    .to_owned(),
            });
        }
        Ok(Membership {
            lock,
            registry,
            group: group.to_owned(),
            topic: topic.to_owned(),
            instance: instance.to_owned(),
            max_members,
            ttl,
            endpoint: None,
            slot: None,
            warned_full: false,
        })
    }

    /// Also records where this instance serves its status (`http://host:port/…`), so that any member —
    /// and the dashboard — can find every other one's.
    pub fn with_endpoint(mut self, url: Option<&str>) -> Self {
        self.endpoint = url.map(str::to_owned);
        self
    }

    /// The registry value of this member: its id, then its endpoint on a second line if it has one.
    fn record(&self) -> Vec<u8> {
        match &self.endpoint {
            Some(url) => format!("{}\n{url}", self.instance).into_bytes(),
            None => self.instance.as_bytes().to_vec(),
        }
    }

    fn slot_resource(&self, slot: u32) -> String {
        crate::resources::member_slot_resource(&self.group, &self.topic, slot)
    }

    /// Takes a member slot (if not holding one, or if the held one was lost) and records this instance in
    /// it. Returns whether this instance is a live member now.
    ///
    /// # Errors
    /// A backend error.
    pub async fn announce(&mut self) -> ProcessorResult<bool> {
        if self.slot.as_ref().is_some_and(|(_, kept)| !kept.is_lost()) {
            return Ok(true);
        }
        self.slot = None;
        for slot in 0..self.max_members {
            let resource = self.slot_resource(slot);
            if let Some(kept) =
                KeptLock::try_acquire(&self.lock, &resource, self.ttl, RenewalPolicy::default())
                    .await?
            {
                self.registry
                    .write(&resource, kept.fencing_token(), &self.record())
                    .await?;
                tracing::info!(group = %self.group, topic = %self.topic, instance = %self.instance, slot, "joined the fleet");
                self.slot = Some((slot, kept));
                self.warned_full = false;
                return Ok(true);
            }
        }
        if !self.warned_full {
            // Said once per wait, not every tick.
            tracing::warn!(group = %self.group, topic = %self.topic, instance = %self.instance, max_members = self.max_members, "every member slot is taken: waiting outside the fleet (raise --max-members on every instance to run more)");
            self.warned_full = true;
        }
        Ok(false)
    }

    /// The ids of the live members (held slots), sorted.
    ///
    /// # Errors
    /// A backend error.
    pub async fn live_members(&self) -> ProcessorResult<Vec<String>> {
        Ok(self
            .live_members_with_endpoints()
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// The live members (held slots) with the status endpoint each recorded, if any, sorted by id.
    ///
    /// # Errors
    /// A backend error.
    pub async fn live_members_with_endpoints(
        &self,
    ) -> ProcessorResult<Vec<(String, Option<String>)>> {
        let mut members = Vec::new();
        for slot in 0..self.max_members {
            let resource = self.slot_resource(slot);
            let Some(holder) = self.lock.get_lock_info(&resource).await? else {
                continue;
            };
            // The registry entry must be the current holder's (same fencing token), not a dead one's.
            if let Some(entry) = self.registry.read(&resource).await?
                && entry.token == holder.fencing_token
            {
                let record = String::from_utf8_lossy(&entry.value).into_owned();
                let mut lines = record.splitn(2, '\n');
                let id = lines.next().unwrap_or_default().to_owned();
                members.push((id, lines.next().map(str::to_owned)));
            }
        }
        members.sort();
        members.dedup_by(|a, b| a.0 == b.0);
        Ok(members)
    }

    /// This instance's id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Leaves the fleet at once (others see it gone without waiting for the TTL).
    ///
    /// # Errors
    /// A backend error; `LockLost` when the slot had already been lost.
    pub async fn leave(&mut self) -> ProcessorResult<()> {
        match self.slot.take() {
            Some((_, kept)) => kept.release().await.map_err(ProcessorError::from),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use state::InMemoryDistributedLock;
    use state::recipes::fenced::InMemoryFencedStore;

    fn members(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn every_partition_has_exactly_one_owner_and_the_split_is_fair() {
        for (partitions, ids) in [
            (8, vec!["a", "b", "c"]),
            (600, vec!["a", "b", "c"]),
            (7, vec!["p1", "p2", "p3", "p4"]),
            (3, vec!["x", "y", "z", "w", "v"]),
        ] {
            let fleet = members(&ids);
            let counts: Vec<usize> = fleet
                .iter()
                .map(|m| assigned_to("orders", partitions, m, &fleet).len())
                .collect();
            assert_eq!(counts.iter().sum::<usize>(), partitions as usize);
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(max - min <= 1, "{partitions} over {ids:?}: {counts:?}");
            for p in 0..partitions {
                assert!(owner_of("orders", partitions, p, &fleet).is_some());
            }
        }
        assert_eq!(owner_of("orders", 8, 0, &[]), None);
        assert_eq!(owner_of("orders", 8, 8, &members(&["a"])), None);
    }

    #[test]
    fn a_member_leaving_moves_its_own_partitions_and_few_others() {
        let before = members(&["a", "b", "c", "d"]);
        let after = members(&["a", "b", "d"]);
        let (old, new) = (assignment("t", 240, &before), assignment("t", 240, &after));
        let moved_needlessly = (0..240)
            .filter(|p| old[p] != "c" && old[p] != new[p])
            .count();
        assert!(
            old.values().filter(|o| **o == "c").count() == 60 && !new.values().any(|o| *o == "c")
        );
        // Plain rendezvous would move none; the load bound moves a few to stay fair.
        assert!(
            moved_needlessly <= 40,
            "{moved_needlessly} of 180 moved needlessly"
        );
        assert_eq!(assignment("t", 240, &before), old, "deterministic");
    }

    #[tokio::test]
    async fn members_announce_see_each_other_and_leave() {
        let lock: Arc<dyn DistributedLock> = Arc::new(InMemoryDistributedLock::new());
        let registry: Arc<dyn FencedStore> = Arc::new(InMemoryFencedStore::default());
        let ttl = Duration::from_secs(5);
        let mut a = Membership::new(lock.clone(), registry.clone(), "g", "t", "a", 8, ttl).unwrap();
        let mut b = Membership::new(lock.clone(), registry.clone(), "g", "t", "b", 8, ttl).unwrap();
        assert!(a.announce().await.unwrap());
        assert!(b.announce().await.unwrap());
        assert_eq!(a.live_members().await.unwrap(), members(&["a", "b"]));
        let mut c = Membership::new(lock.clone(), registry.clone(), "g", "t", "c", 8, ttl)
            .unwrap()
            .with_endpoint(Some("http://127.0.0.1:9/instances/c/status"));
        assert!(c.announce().await.unwrap());
        assert_eq!(
            b.live_members_with_endpoints().await.unwrap(),
            vec![
                ("a".to_owned(), None),
                ("b".to_owned(), None),
                (
                    "c".to_owned(),
                    Some("http://127.0.0.1:9/instances/c/status".to_owned())
                )
            ]
        );
        c.leave().await.unwrap();
        b.leave().await.unwrap();
        assert_eq!(a.live_members().await.unwrap(), members(&["a"]));
        let mut full = Membership::new(lock, registry, "g", "t", "c", 1, ttl).unwrap();
        assert!(!full.announce().await.unwrap(), "no free slot among 1");
    }

    /// Two jobs of one group (the default group, say) on two topics and one backend: each sees only its
    /// own members, so neither assigns partitions to the other's instances (which would never claim them).
    #[tokio::test]
    async fn jobs_on_other_topics_are_not_members() {
        let lock: Arc<dyn DistributedLock> = Arc::new(InMemoryDistributedLock::new());
        let registry: Arc<dyn FencedStore> = Arc::new(InMemoryFencedStore::default());
        let ttl = Duration::from_secs(5);
        let join = |topic: &str, id: &str| {
            Membership::new(
                lock.clone(),
                registry.clone(),
                "processor",
                topic,
                id,
                1,
                ttl,
            )
            .unwrap()
        };
        let (mut orders, mut clicks) = (join("orders", "o1"), join("clicks", "c1"));
        assert!(orders.announce().await.unwrap());
        assert!(
            clicks.announce().await.unwrap(),
            "a slot of the other job's is not this job's"
        );
        assert_eq!(orders.live_members().await.unwrap(), members(&["o1"]));
        assert_eq!(clicks.live_members().await.unwrap(), members(&["c1"]));
    }
}
