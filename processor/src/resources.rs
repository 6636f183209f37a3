//! The names the fleet coordinates on, in one place: lock resources, fenced-record scopes and task ids.
//! Every name that two instances must agree on is built here and nowhere else.
//!
//! Every name is scoped by the fleet's group *and* its topic: two jobs on one topic with different
//! groups, or on different topics with one group (the default `processor`, say), never share (or split)
//! members, leadership, partitions, records or maintenance on one lock backend.
//!
//! | name | what |
//! |---|---|
//! | `partition:{group}:{topic}:{p}` | the kept claim of a partition's owner |
//! | `members:{group}:{topic}` | the job's roster of live members ([`member_roster_name`], see [`crate::fleet::membership`]) |
//! | `leader:{group}:{topic}` | the leader election ([`leader_election_name`]) |
//! | `checkpoint:{group}:{topic}:{p}` | the fenced checkpoint record of a partition |
//! | `maintain:{group}:{topic}:{p}` | the recurring maintenance job of a partition |
//! | `compaction:{group}:{topic}:{p}` | the compaction lock (uploads and retention exclude each other) |
//! | `{checkpoint dir}/{group}/` | the fleet's shared checkpoints ([`checkpoint_root`]) |
//! | `{checkpoint url}/{group}/` | the same in object storage ([`checkpoint_url_root`]) |
//! | `{state dir}/{group}/{topic}-{p}` | an owned partition's local state ([`local_state_dir`]) |
//! | `{state dir}/{group}/.snapshot-{topic}-{p}+{offset}` | a checkpoint's local scratch ([`snapshot_scratch_name`]) |
//! | `{group, '.' and '%' escaped}.{topic}.{p}` | the partition's Kafka `transactional.id` ([`transactional_id`]) |
//!
//! Every name decodes to one (group, topic, partition): a topic is a Kafka topic name (`[A-Za-z0-9._-]`,
//! checked by [`validate_topic`]), so a `:` or `+` after it cannot belong to it; a partition is a number,
//! read from the right; a group may hold anything but a path separator ([`validate_group`]), and where a
//! name puts a `.` after it (the transactional id) its own dots are escaped. Two fleets that differ in any
//! part never share a name (a property test checks each builder).

use std::path::{Path, PathBuf};

/// The lock resource that owns partition `partition` of `topic` in fleet `group`; held as a kept lock
/// by its owner.
pub fn partition_resource(group: &str, topic: &str, partition: i32) -> String {
    format!("partition:{group}:{topic}:{partition}")
}

/// The roster (group membership, [`state::recipes::roster`]) of the job on `topic` in fleet `group`:
/// one roster per job, so members of jobs on other topics (or in other groups) are never counted.
pub fn member_roster_name(group: &str, topic: &str) -> String {
    format!("members:{group}:{topic}")
}

/// The name of the leader election of the job on `topic` in fleet `group` (lock resource
/// `leader:{group}:{topic}`): one leader, and one set of maintenance duties, per job.
pub fn leader_election_name(group: &str, topic: &str) -> String {
    format!("{group}:{topic}")
}

/// The compaction lock of `partition` of `topic` in fleet `group`.
pub fn compaction_resource(group: &str, topic: &str, partition: i32) -> String {
    format!("compaction:{group}:{topic}:{partition}")
}

/// Where fleet `group` keeps its shared checkpoints under the configured checkpoint directory.
pub fn checkpoint_root(checkpoint_dir: &Path, group: &str) -> PathBuf {
    checkpoint_dir.join(group)
}

/// Where fleet `group` keeps its checkpoints in the object storage at `checkpoint_url`.
pub fn checkpoint_url_root(checkpoint_url: &str, group: &str) -> String {
    format!("{}/{group}", checkpoint_url.trim_end_matches('/'))
}

/// Where an instance keeps the local state of `partition` of `topic` for fleet `group`.
pub fn local_state_dir(state_dir: &Path, group: &str, topic: &str, partition: i32) -> PathBuf {
    state_dir.join(group).join(format!("{topic}-{partition}"))
}

/// The [`CheckpointCoordinator`](state::recipes::checkpoint::CheckpointCoordinator) scope of a
/// partition's checkpoint record (lock and record `checkpoint:{group}:{topic}:{partition}`).
pub fn checkpoint_scope(group: &str, topic: &str, partition: i32) -> String {
    format!("{group}:{topic}:{partition}")
}

/// The Kafka `transactional.id` of the producer of `partition` of `topic` in fleet `group`: one per
/// partition and fleet, whoever owns it, so that ownership moves fence the previous owner's producer.
///
/// `{group}.{topic}.{partition}` with the group's `%` and `.` percent-escaped: without that, group
/// `a.b` with topic `c` and group `a` with topic `b.c` would share an id and fence each other for ever.
/// A group without either character keeps the id earlier versions gave it.
pub fn transactional_id(group: &str, topic: &str, partition: i32) -> String {
    let group = group.replace('%', "%25").replace('.', "%2E");
    format!("{group}.{topic}.{partition}")
}

/// The name of the scratch directory a local snapshot of `partition` of `topic` at `offset` is taken
/// into (under the fleet's state directory): `.snapshot-{topic}-{partition}+{offset}`.
pub fn snapshot_scratch_name(topic: &str, partition: i32, offset: i64) -> String {
    format!("{}{offset}", snapshot_scratch_prefix(topic, partition))
}

/// Whether the directory entry `name` is a scratch directory of `partition` of `topic` (this version's
/// or the one before, `.snapshot-{topic}-{partition}-{offset}`), never another partition's: topic
/// `T` partition 1 must not take topic `T-1` partition 2's.
pub fn is_snapshot_scratch_of(name: &str, topic: &str, partition: i32) -> bool {
    if name.starts_with(&snapshot_scratch_prefix(topic, partition)) {
        return true;
    }
    let legacy = format!(".snapshot-{topic}-{partition}-");
    name.strip_prefix(&legacy)
        .is_some_and(|offset| !offset.is_empty() && offset.bytes().all(|b| b.is_ascii_digit()))
}

/// `+` is not a topic character, so this prefix ends where the partition's number does.
fn snapshot_scratch_prefix(topic: &str, partition: i32) -> String {
    format!(".snapshot-{topic}-{partition}+")
}

/// Checks a topic name as Kafka does: 1 to 249 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
///
/// # Errors
/// A sentence saying what is wrong, for the caller's error.
pub fn validate_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > 249 {
        return Err(format!("`{topic}` must be 1 to 249 characters long"));
    }
    if topic == "." || topic == ".." {
        return Err(format!("`{topic}` is not a topic name"));
    }
    match topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(format!(
            "`{topic}` has {c:?}: Kafka topic names are letters, digits, '.', '_' and '-'"
        )),
        None => Ok(()),
    }
}

/// Checks a group name: it names a directory under the state and checkpoint directories, so it is
/// one path component (no `/`, `\\`, NUL or line break, not `.` or `..`).
///
/// # Errors
/// A sentence saying what is wrong, for the caller's error.
pub fn validate_group(group: &str) -> Result<(), String> {
    if group == "." || group == ".." {
        return Err(format!("`{group}` is not a directory name"));
    }
    match group
        .chars()
        .find(|c| matches!(c, '/' | '\\' | '\0' | '\n' | '\r'))
    {
        Some(c) => Err(format!(
            "{group:?} has {c:?}: a group names a directory, so it is one path component"
        )),
        None => Ok(()),
    }
}

/// The id of the recurring maintenance job of `partition` of `topic` in fleet `group`.
pub fn maintenance_task_id(group: &str, topic: &str, partition: i32) -> String {
    format!("maintain:{group}:{topic}:{partition}")
}

/// The partition whose maintenance job `id` is, if `id` is one of the job on `topic` in fleet `group`
/// (the inverse of [`maintenance_task_id`]; a group may hold `:`, so the whole shape is checked).
pub fn maintenance_task_partition(group: &str, topic: &str, id: &str) -> Option<i32> {
    let partition = id
        .strip_prefix("maintain:")?
        .strip_prefix(group)?
        .strip_prefix(':')?
        .strip_prefix(topic)?
        .strip_prefix(':')?;
    if !partition.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    partition.parse::<i32>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_follow_the_documented_scheme() {
        assert_eq!(partition_resource("g", "orders", 3), "partition:g:orders:3");
        assert!(state::lock::validate_resource(&partition_resource("g", "orders", 3)).is_ok());
        assert_eq!(
            compaction_resource("g", "orders", 3),
            "compaction:g:orders:3"
        );
        assert_eq!(checkpoint_scope("g", "orders", 3), "g:orders:3");
        assert_eq!(maintenance_task_id("g", "orders", 3), "maintain:g:orders:3");
        assert_eq!(member_roster_name("g", "orders"), "members:g:orders");
        assert_eq!(
            maintenance_task_partition("g", "orders", "maintain:g:orders:3"),
            Some(3)
        );
        // Group `a` on topic `b` does not take the job of group `a:b` on topic `c`.
        assert_eq!(
            maintenance_task_partition("a", "b", "maintain:a:b:c:3"),
            None
        );
        assert_eq!(
            maintenance_task_partition("g", "orders", "maintain:g:orders:-3"),
            None
        );
        assert_eq!(leader_election_name("g", "orders"), "g:orders");
        assert!(state::lock::validate_resource(&member_roster_name("g", "orders")).is_ok());
    }

    #[test]
    fn a_dotted_group_and_a_dotted_topic_do_not_share_a_transactional_id() {
        assert_ne!(
            transactional_id("a.b", "c", 0),
            transactional_id("a", "b.c", 0)
        );
        assert_eq!(
            transactional_id("g", "orders", 3),
            "g.orders.3",
            "unchanged"
        );
        assert_eq!(transactional_id("a.b%", "c", 0), "a%2Eb%25.c.0");
    }

    #[test]
    fn a_partitions_scratch_is_never_anothers() {
        let name = snapshot_scratch_name("T-1", 2, 40);
        assert!(is_snapshot_scratch_of(&name, "T-1", 2));
        assert!(!is_snapshot_scratch_of(&name, "T", 1), "{name}");
        assert!(is_snapshot_scratch_of(".snapshot-T-1-40", "T", 1), "legacy");
        assert!(
            !is_snapshot_scratch_of(".snapshot-T-1-2-40", "T", 1),
            "legacy"
        );
    }

    #[test]
    fn bad_topics_and_groups_are_refused() {
        for bad in ["", ".", "..", "a:b", "a b", "a+b", &"x".repeat(250)] {
            assert!(validate_topic(bad).is_err(), "{bad:?}");
        }
        assert!(validate_topic("orders.v2_eu-1").is_ok());
        for bad in [".", "..", "a/b", "a\\b", "a\nb"] {
            assert!(validate_group(bad).is_err(), "{bad:?}");
        }
        assert!(validate_group("team:a.b %x").is_ok());
    }

    mod distinct_names {
        use super::*;
        use proptest::prelude::*;

        fn topic() -> impl Strategy<Value = String> {
            "[a-c.\\-_]{1,6}".prop_filter("a topic name", |t| validate_topic(t).is_ok())
        }
        fn group() -> impl Strategy<Value = String> {
            "[a-c.:%+\\-_]{1,6}".prop_filter("a group name", |g| validate_group(g).is_ok())
        }
        fn part() -> impl Strategy<Value = (String, String, i32)> {
            (group(), topic(), 0..12i32)
        }

        proptest! {
            /// Distinct (group, topic, partition) give distinct names, in every builder.
            #[test]
            fn distinct_inputs_give_distinct_names(a in part(), b in part(), offset in 0..200i64) {
                prop_assume!(a != b);
                let (ga, ta, pa) = (&a.0, &a.1, a.2);
                let (gb, tb, pb) = (&b.0, &b.1, b.2);
                prop_assert_ne!(partition_resource(ga, ta, pa), partition_resource(gb, tb, pb));
                prop_assert_ne!(compaction_resource(ga, ta, pa), compaction_resource(gb, tb, pb));
                prop_assert_ne!(checkpoint_scope(ga, ta, pa), checkpoint_scope(gb, tb, pb));
                prop_assert_ne!(maintenance_task_id(ga, ta, pa), maintenance_task_id(gb, tb, pb));
                prop_assert_ne!(transactional_id(ga, ta, pa), transactional_id(gb, tb, pb));
                if (ga, ta) != (gb, tb) {
                    prop_assert_ne!(member_roster_name(ga, ta), member_roster_name(gb, tb));
                }
                let id = maintenance_task_id(gb, tb, pb);
                prop_assert_eq!(
                    maintenance_task_partition(ga, ta, &id),
                    (ga == gb && ta == tb).then_some(pb),
                    "{} taken by {:?}", id, a
                );
                if (ga, ta) != (gb, tb) {
                    prop_assert_ne!(leader_election_name(ga, ta), leader_election_name(gb, tb));
                }
                prop_assert_ne!(
                    local_state_dir(Path::new("/s"), ga, ta, pa),
                    local_state_dir(Path::new("/s"), gb, tb, pb)
                );
                if ga == gb {
                    // Scratch names live in one group's directory: no other partition's is taken.
                    let other = snapshot_scratch_name(tb, pb, offset);
                    prop_assert!(!is_snapshot_scratch_of(&other, ta, pa), "{} taken by {:?}", other, a);
                }
            }
        }
    }
}
