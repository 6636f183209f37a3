//! Fleet membership and partition assignment through the `state` crate — not Kafka's group rebalancing.
//!
//! - **Membership**: each instance is a [`KeptMember`] of its job's roster `members:{group}:{topic}`
//!   ([`state::recipes::roster`]; one roster per job, so jobs on other topics never count), named by its
//!   instance id, recording its status endpoint. An instance that dies stops renewing; its lease ends
//!   and the store drops it from everyone's view. Each tick reads the roster's version (one request, a
//!   constant-size answer) and lists the members (one more request) only when it changed: the cost per
//!   instance is the same at 10 or 1 000 instances.
//! - **Assignment**: rendezvous (highest-random-weight) hashing of each partition over the live members'
//!   ids: every instance computes the same owner for every partition from the same member list, and when a
//!   member joins or leaves only the partitions it gains or loses move.
//! - **Claims**: the owner still claims `partition:{topic}:{p}` with a kept lock; the hash only says who
//!   *should* claim. The lock (and its fencing token) is what makes ownership safe when views disagree
//!   for a moment.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use state::recipes::roster::{KeptMember, RosterStore, RosterVersion};

use crate::error::{ProcessorError, ProcessorResult};
use crate::hash::{splitmix64, stable_hash};

/// The rendezvous weight of `member` for `partition` (stable across processes and releases).
///
/// The partition's hash and the member's are computed apart and mixed, so that the weights of P
/// partitions × N members cost P + N hashes and P × N mixes (a few ns each): about 20 ms at
/// 10 000 × 1 000, against 0.3 s hashing every pair's bytes.
fn weight(topic: &str, partition: i32, member: &str) -> u64 {
    mix(partition_hash(topic, partition), member_hash(member))
}

fn partition_hash(topic: &str, partition: i32) -> u64 {
    stable_hash(&[topic.as_bytes(), &partition.to_be_bytes()])
}

fn member_hash(member: &str) -> u64 {
    stable_hash(&[member.as_bytes()])
}

fn mix(partition: u64, member: u64) -> u64 {
    splitmix64(partition ^ member)
}

/// The owner of each partition (an index into the member list), computed once per member list.
type OwnerTable = Arc<Vec<Option<usize>>>;

/// The member lists most recently assigned in this process, with their tables: computing one is
/// O(partitions × members) hashes (about 0.3 s at 10 000 × 1 000), and every tick, status page and state
/// query asks again with the same list until membership changes.
static RECENT: std::sync::Mutex<Vec<Assigned>> = std::sync::Mutex::new(Vec::new());

/// A (topic, partition count, member list) and its owner table.
type Assigned = (String, i32, Vec<String>, OwnerTable);
const RECENT_KEPT: usize = 8;

fn owner_table(topic: &str, partitions: i32, members: &[String]) -> OwnerTable {
    {
        let recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, _, table)) = recent
            .iter()
            .find(|(t, p, m, _)| t == topic && *p == partitions && m == members)
        {
            return Arc::clone(table);
        }
    }
    let table = Arc::new(compute_owners(topic, partitions, members));
    let mut recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
    if recent.len() >= RECENT_KEPT {
        recent.remove(0);
    }
    recent.push((
        topic.to_owned(),
        partitions,
        members.to_vec(),
        Arc::clone(&table),
    ));
    table
}

/// Rendezvous hashing with bounded loads — each partition goes to the member with the highest weight
/// for it that still has room under `ceil(partitions / members)`.
fn compute_owners(topic: &str, partitions: i32, members: &[String]) -> Vec<Option<usize>> {
    let count = usize::try_from(partitions).unwrap_or(0);
    if members.is_empty() {
        return vec![None; count];
    }
    let cap = count.div_ceil(members.len());
    let mut load = vec![0usize; members.len()];
    let hashes: Vec<u64> = members.iter().map(|m| member_hash(m)).collect();
    (0..partitions)
        .map(|partition| {
            let of_partition = partition_hash(topic, partition);
            let owner = (0..members.len())
                .filter(|m| load[*m] < cap)
                .max_by_key(|m| (mix(of_partition, hashes[*m]), members[*m].as_str()));
            if let Some(owner) = owner {
                load[owner] += 1;
            }
            owner
        })
        .collect()
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
    if members.is_empty() || partitions <= 0 {
        return BTreeMap::new();
    }
    owner_table(topic, partitions, members)
        .iter()
        .zip(0..)
        .filter_map(|(owner, partition)| owner.map(|m| (partition, members[m].as_str())))
        .collect()
}

/// The member that should own `partition` of `topic` (`0..partitions`) among `members` (see
/// [`assignment`]); `None` when there are no members or the partition is out of range.
pub fn owner_of<'a>(
    topic: &str,
    partitions: i32,
    partition: i32,
    members: &'a [String],
) -> Option<&'a str> {
    if members.is_empty() || !(0..partitions).contains(&partition) {
        return None;
    }
    let table = owner_table(topic, partitions, members);
    let owner = (*table.get(usize::try_from(partition).ok()?)?)?;
    Some(members[owner].as_str())
}

/// The partitions of `topic` (`0..partitions`) that `member` should own.
pub fn assigned_to(topic: &str, partitions: i32, member: &str, members: &[String]) -> Vec<i32> {
    let Some(me) = members.iter().position(|m| m == member) else {
        return Vec::new();
    };
    if partitions <= 0 {
        return Vec::new();
    }
    owner_table(topic, partitions, members)
        .iter()
        .zip(0..)
        .filter(|(owner, _)| **owner == Some(me))
        .map(|(_, partition)| partition)
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
    if replicas == 0 || partitions <= 0 || !members.iter().any(|m| m == member) {
        return Vec::new();
    }
    let table = owner_table(topic, partitions, members);
    table
        .iter()
        .zip(0..)
        .filter(|(owner, partition)| {
            let Some(owner) = **owner else {
                return false;
            };
            if members[owner] == member {
                return false;
            }
            // `member` is among the `replicas` highest weights after the owner's: fewer than
            // `replicas` other non-owners outrank it.
            let mine = (weight(topic, *partition, member), member);
            members
                .iter()
                .enumerate()
                .filter(|(m, other)| *m != owner && other.as_str() != member)
                .filter(|(_, other)| (weight(topic, *partition, other), other.as_str()) > mine)
                .take(replicas)
                .count()
                < replicas
        })
        .map(|(_, partition)| partition)
        .collect()
}

/// A live member's id and the status endpoint it recorded, if any.
pub type Listed = (String, Option<String>);

/// This instance's membership in a fleet: an entry in the job's roster, renewed in the background.
pub struct Membership {
    roster: Arc<dyn RosterStore>,
    name: String,
    group: String,
    topic: String,
    instance: String,
    max_members: u32,
    ttl: Duration,
    endpoint: Option<String>,
    kept: Option<KeptMember>,
    /// The roster's version when the members were last listed, and that list.
    seen: Option<(RosterVersion, Vec<Listed>)>,
    /// Whether the "cannot join" warning was given since the last successful announce.
    warned_outside: bool,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("roster", &self.name)
            .field("instance", &self.instance)
            .field("token", &self.kept.as_ref().map(KeptMember::token))
            .finish()
    }
}

impl Membership {
    /// Membership of `instance` in the job on `topic` of fleet `group` (roster
    /// [`member_roster_name`](crate::resources::member_roster_name)), with at most `max_members`
    /// members, announced by a lease of `ttl` (renewed every `ttl / 3`).
    ///
    /// # Errors
    /// [`ProcessorError::InvalidInput`] for an empty instance id or a zero `max_members`.
    pub fn new(
        roster: Arc<dyn RosterStore>,
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
            roster,
            name: crate::resources::member_roster_name(group, topic),
            group: group.to_owned(),
            topic: topic.to_owned(),
            instance: instance.to_owned(),
            max_members,
            ttl,
            endpoint: None,
            kept: None,
            seen: None,
            warned_outside: false,
        })
    }

    /// Also records where this instance serves its status (`http://host:port/…`), so that any member —
    /// and the dashboard — can find every other one's.
    pub fn with_endpoint(mut self, url: Option<&str>) -> Self {
        self.endpoint = url.map(str::to_owned);
        self
    }

    /// Joins the roster (if not a member, or if the membership was lost). Returns whether this instance
    /// is a live member now. A steady member costs nothing here: its lease is renewed in the background.
    ///
    /// # Errors
    /// A backend error.
    pub async fn announce(&mut self) -> ProcessorResult<bool> {
        if self.kept.as_ref().is_some_and(|kept| !kept.is_lost()) {
            return Ok(true);
        }
        self.kept = None;
        if self.live_members_with_endpoints().await?.len() >= self.max_members as usize {
            self.warn_outside("the fleet has --max-members members already: waiting outside it (raise --max-members on every instance to run more)");
            return Ok(false);
        }
        let record = self.endpoint.clone().unwrap_or_default();
        match KeptMember::join(
            &self.roster,
            &self.name,
            &self.instance,
            record.as_bytes(),
            self.ttl,
        )
        .await?
        {
            Some(kept) => {
                tracing::info!(group = %self.group, topic = %self.topic, instance = %self.instance, token = kept.token(), "joined the fleet");
                self.kept = Some(kept);
                self.warned_outside = false;
                Ok(true)
            }
            None => {
                self.warn_outside("a live member has this instance id (this instance's previous run, until its lease ends, or a second instance started with the same --instance-id): waiting");
                Ok(false)
            }
        }
    }

    /// Said once per wait, not every tick.
    fn warn_outside(&mut self, why: &str) {
        if !self.warned_outside {
            tracing::warn!(group = %self.group, topic = %self.topic, instance = %self.instance, max_members = self.max_members, "{why}");
            self.warned_outside = true;
        }
    }

    /// The ids of the live members, sorted.
    ///
    /// # Errors
    /// A backend error.
    pub async fn live_members(&mut self) -> ProcessorResult<Vec<String>> {
        Ok(self
            .live_members_with_endpoints()
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// The live members with the status endpoint each recorded, if any, sorted by id. One request
    /// with a constant-size answer while the membership is unchanged (the roster's version), one more
    /// to list the members when it changed — whatever the fleet's size.
    ///
    /// # Errors
    /// A backend error.
    pub async fn live_members_with_endpoints(
        &mut self,
    ) -> ProcessorResult<Vec<(String, Option<String>)>> {
        let version = self.roster.version(&self.name).await?;
        if let Some((seen, members)) = &self.seen
            && *seen == version
        {
            return Ok(members.clone());
        }
        let members: Vec<(String, Option<String>)> = self
            .roster
            .members(&self.name)
            .await?
            .into_iter()
            .map(|entry| {
                let endpoint = String::from_utf8_lossy(&entry.record).into_owned();
                (entry.member, (!endpoint.is_empty()).then_some(endpoint))
            })
            .collect();
        self.seen = Some((version, members.clone()));
        Ok(members)
    }

    /// This instance's id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Leaves the fleet at once (others see it gone without waiting for the TTL).
    ///
    /// # Errors
    /// A backend error; `LockLost` when the membership had already been lost.
    pub async fn leave(&mut self) -> ProcessorResult<()> {
        match self.kept.take() {
            Some(kept) => kept.leave().await.map_err(ProcessorError::from),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use state::recipes::roster::InMemoryRosterStore;

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
        let roster: Arc<dyn RosterStore> = Arc::new(InMemoryRosterStore::default());
        let ttl = Duration::from_secs(5);
        let mut a = Membership::new(roster.clone(), "g", "t", "a", 8, ttl).unwrap();
        let mut b = Membership::new(roster.clone(), "g", "t", "b", 8, ttl).unwrap();
        assert!(a.announce().await.unwrap());
        assert!(b.announce().await.unwrap());
        assert_eq!(a.live_members().await.unwrap(), members(&["a", "b"]));
        let mut c = Membership::new(roster.clone(), "g", "t", "c", 8, ttl)
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
        let mut full = Membership::new(roster.clone(), "g", "t", "c", 1, ttl).unwrap();
        assert!(
            !full.announce().await.unwrap(),
            "--max-members 1, one member"
        );
        let mut twin = Membership::new(roster.clone(), "g", "t", "a", 8, ttl).unwrap();
        assert!(
            !twin.announce().await.unwrap(),
            "a second instance with a live member's id waits outside"
        );
    }

    /// A roster store that counts the requests made to it.
    #[derive(Debug, Default)]
    struct Counting {
        inner: InMemoryRosterStore,
        requests: std::sync::atomic::AtomicUsize,
    }

    impl Counting {
        fn take(&self) -> usize {
            self.requests.swap(0, std::sync::atomic::Ordering::SeqCst)
        }
        fn count(&self) {
            self.requests
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[async_trait::async_trait]
    impl RosterStore for Counting {
        async fn join(
            &self,
            roster: &str,
            member: &str,
            record: &[u8],
            ttl: Duration,
        ) -> state::StateResult<Option<state::recipes::roster::RosterLease>> {
            self.count();
            self.inner.join(roster, member, record, ttl).await
        }
        async fn renew(
            &self,
            lease: &state::recipes::roster::RosterLease,
            ttl: Duration,
        ) -> state::StateResult<bool> {
            self.count();
            self.inner.renew(lease, ttl).await
        }
        async fn leave(
            &self,
            lease: &state::recipes::roster::RosterLease,
        ) -> state::StateResult<bool> {
            self.count();
            self.inner.leave(lease).await
        }
        async fn members(
            &self,
            roster: &str,
        ) -> state::StateResult<Vec<state::recipes::roster::RosterEntry>> {
            self.count();
            self.inner.members(roster).await
        }
        async fn version(&self, roster: &str) -> state::StateResult<RosterVersion> {
            self.count();
            self.inner.version(roster).await
        }
    }

    /// Item 1 of the fleet-at-scale issue: a member's tick cost the same whatever the fleet's size (the
    /// slot scan it replaced made 2 × max_members requests a tick, whatever the fleet).
    #[tokio::test]
    async fn a_steady_tick_is_one_request_whatever_the_fleet_size() {
        let ttl = Duration::from_secs(60);
        for size in [10, 100, 1_000] {
            let counting = Arc::new(Counting::default());
            let roster: Arc<dyn RosterStore> = counting.clone();
            let mut fleet = Vec::new();
            for i in 0..size {
                let mut member =
                    Membership::new(roster.clone(), "g", "t", &format!("m{i}"), 10_000, ttl)
                        .unwrap();
                assert!(member.announce().await.unwrap());
                fleet.push(member);
            }
            let me = &mut fleet[0];
            assert_eq!(me.live_members().await.unwrap().len(), size);
            counting.take();
            for _ in 0..10 {
                assert!(me.announce().await.unwrap());
                assert_eq!(me.live_members().await.unwrap().len(), size);
            }
            assert_eq!(
                counting.take(),
                10,
                "{size} members: one request per steady tick"
            );
            fleet.pop().unwrap().leave().await.unwrap();
            counting.take();
            assert_eq!(fleet[0].live_members().await.unwrap().len(), size - 1);
            assert_eq!(
                counting.take(),
                2,
                "a change: the version, then one listing"
            );
        }
    }

    /// Two jobs of one group (the default group, say) on two topics and one backend: each sees only its
    /// own members, so neither assigns partitions to the other's instances (which would never claim them).
    #[tokio::test]
    async fn jobs_on_other_topics_are_not_members() {
        let roster: Arc<dyn RosterStore> = Arc::new(InMemoryRosterStore::default());
        let ttl = Duration::from_secs(5);
        let join = |topic: &str, id: &str| {
            Membership::new(roster.clone(), "processor", topic, id, 1, ttl).unwrap()
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
