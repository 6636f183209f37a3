//! Redlock under node failures: killed, paused (SIGSTOP) and restarted nodes, a minority partition, and
//! fencing tokens across nodes whose counters have drifted apart.

use std::time::{Duration, Instant};

use integration_tests::adapters::RedlockFixture;
use redis::AsyncCommands;
use state::{DistributedLock, RedlockDistributedLock, RetryConfig, StateError};

const TTL: Duration = Duration::from_secs(10);
const NODE_TIMEOUT: Duration = Duration::from_millis(100);
/// Generous bound for "no hang": far above the node timeout, far below a stuck call.
const NO_HANG: Duration = Duration::from_secs(3);

async fn client(fixture: &RedlockFixture) -> RedlockDistributedLock {
    fixture
        .client()
        .await
        .with_node_timeout(NODE_TIMEOUT)
        .unwrap()
        .with_retry(RetryConfig::no_retry())
}

async fn node_conn(fixture: &RedlockFixture, i: usize) -> redis::aio::MultiplexedConnection {
    redis::Client::open(fixture.cluster.node(i).url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_three_killed_everything_keeps_working() {
    let fixture = RedlockFixture::start(3);
    let locks = client(&fixture).await;
    fixture.cluster.node(2).stop();
    let mut guard = locks
        .try_acquire("one-down", TTL)
        .await
        .unwrap()
        .expect("2 of 3 grant");
    assert!(locks.is_locked("one-down").await.unwrap());
    let info = locks
        .get_lock_info("one-down")
        .await
        .unwrap()
        .expect("held");
    assert_eq!(info.value, guard.token().value);
    assert!(locks.try_acquire("one-down", TTL).await.unwrap().is_none());
    guard
        .extend(Duration::from_secs(20))
        .await
        .expect("2 of 3 extend");
    guard.release().await.expect("2 of 3 release");
    assert!(!locks.is_locked("one-down").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_killed_acquire_fails_with_quorum_error_in_bounded_time() {
    let fixture = RedlockFixture::start(3);
    let locks = client(&fixture).await;
    let mut held = locks.try_acquire("held", TTL).await.unwrap().unwrap();
    fixture.cluster.node(0).stop();
    fixture.cluster.node(1).stop();
    let started = Instant::now();
    match locks.try_acquire("two-down", TTL).await {
        Err(StateError::QuorumNotReached {
            granted,
            nodes,
            needed,
            failed_nodes,
            ..
        }) => {
            assert!(granted < needed);
            assert_eq!((nodes, needed), (3, 2));
            assert_eq!(
                failed_nodes.len(),
                2,
                "the error names the failed nodes: {failed_nodes:?}"
            );
            let ports = [
                fixture.cluster.node(0).port(),
                fixture.cluster.node(1).port(),
            ];
            for port in ports {
                assert!(failed_nodes.iter().any(|n| n.contains(&port.to_string())));
            }
        }
        Err(other) => panic!("expected QuorumNotReached, got {other}"),
        Ok(guard) => panic!("acquired with 1 of 3 nodes: {guard:?}"),
    }
    assert!(started.elapsed() < NO_HANG);
    // Nobody may believe it holds anything it cannot confirm with a majority.
    assert!(locks.acquire("two-down", TTL).await.is_err());
    assert!(matches!(
        held.extend(TTL).await,
        Err(StateError::QuorumNotReached { .. })
    ));
    assert!(
        locks.is_locked("held").await.is_err(),
        "no quorum view, no answer"
    );

    // Service resumes once the nodes are back (empty: no persistence).
    fixture.cluster.node(0).start();
    fixture.cluster.node(1).start();
    let deadline = Instant::now() + Duration::from_secs(10);
    let guard = loop {
        match locks.try_acquire("two-down", TTL).await {
            Ok(Some(guard)) => break guard,
            other if Instant::now() < deadline => {
                drop(other);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("no recovery: {other:?}"),
        }
    };
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_node_does_not_stall_acquire_extend_or_release() {
    let fixture = RedlockFixture::start(3);
    let locks = client(&fixture).await;
    fixture.cluster.node(1).pause();
    let result = async {
        for round in 0..5 {
            let started = Instant::now();
            let mut guard = locks
                .try_acquire("paused", TTL)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("round {round}: 2 of 3 must grant"));
            guard.extend(TTL).await.unwrap();
            guard.release().await.unwrap();
            assert!(
                started.elapsed() < NO_HANG,
                "round {round}: {:?}",
                started.elapsed()
            );
        }
    }
    .await;
    fixture.cluster.node(1).resume();
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_partition_cannot_produce_a_second_holder() {
    let fixture = RedlockFixture::start(3);
    let (a, b, c) = (0, 1, 2);
    let first = client(&fixture).await;
    let second = client(&fixture).await;

    // The first client gets the lock through {A, B} only: C is unreachable while it acquires.
    fixture.cluster.node(c).pause();
    let held = first
        .try_acquire("partition", TTL)
        .await
        .unwrap()
        .expect("A and B grant");
    fixture.cluster.node(c).resume();
    let mut on_c = node_conn(&fixture, c).await;
    let exists: bool = on_c.exists("state:lock:partition").await.unwrap();
    assert!(!exists, "C never saw the first lease");

    // Now A is cut off: the second client can reach B (held) and C (free) — a minority for it.
    fixture.cluster.node(a).pause();
    for _ in 0..10 {
        match second.try_acquire("partition", TTL).await {
            Ok(None) => {}
            Err(StateError::QuorumNotReached { .. }) => {}
            Ok(Some(guard)) => panic!("second holder through a minority: {guard:?}"),
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    fixture.cluster.node(a).resume();
    assert_eq!(
        second
            .get_lock_info("partition")
            .await
            .unwrap()
            .map(|t| t.value),
        Some(held.token().value.clone())
    );
    let _ = b;
    held.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_stay_monotonic_when_node_counters_diverge() {
    let fixture = RedlockFixture::start(3);
    let locks = client(&fixture).await;
    // Node 0 has counted far ahead (it granted many attempts the others did not see).
    let mut node0 = node_conn(&fixture, 0).await;
    let _: () = node0.set("state:fence:fenced", 1_000u64).await.unwrap();

    let mut last = 0;
    let mut tokens = Vec::new();
    for round in 0..6 {
        // Alternate which node is unreachable, so successive quorums differ: {1,2}, {0,2}, {0,1}, ...
        let cut = round % 3;
        fixture.cluster.node(cut).pause();
        let guard = locks.try_acquire("fenced", TTL).await;
        fixture.cluster.node(cut).resume();
        let guard = guard
            .unwrap()
            .unwrap_or_else(|| panic!("round {round}: not granted"));
        assert!(
            guard.fencing_token() > last,
            "round {round} (node {cut} cut): token {} after {last}; all: {tokens:?}",
            guard.fencing_token()
        );
        last = guard.fencing_token();
        tokens.push(last);
        guard.release().await.unwrap();
    }
    assert!(
        last > 1_000,
        "the tokens caught up with the most advanced node: {tokens:?}"
    );
}

/// Settling a token moves only the counters of nodes this attempt holds. Another attempt holds node 1
/// (its lease, and its own increment of the counter to 131) while this one is granted nodes 0 and 2
/// with counters that differ (92 and 142): the token is 142, settled on node 0 — and node 1's counter
/// stays the other attempt's 131. Before, the settle raised every node, and counted any node at or
/// above the token: one holder could count a node another holder's increment had just brought to that
/// value, and both handed out the same token (the torture suite's "token granted twice", Redlock with a
/// minority of nodes restarted, under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_a_token_never_moves_a_counter_under_another_holders_lease() {
    let fixture = RedlockFixture::start(3);
    let locks = client(&fixture).await;
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(node_conn(&fixture, i).await);
    }
    let _: () = nodes[0].set("state:fence:settled", 91u64).await.unwrap();
    let _: () = nodes[1].set("state:fence:settled", 130u64).await.unwrap();
    let _: () = nodes[2].set("state:fence:settled", 141u64).await.unwrap();
    // The other attempt, granted on node 1 only so far: its lease and its increment (131).
    let _: () = redis::cmd("SET")
        .arg("state:lock:settled")
        .arg("other-attempt:0")
        .arg("PX")
        .arg(10_000)
        .query_async(&mut nodes[1])
        .await
        .unwrap();
    let _: u64 = nodes[1].incr("state:fence:settled", 1).await.unwrap();

    let guard = locks
        .try_acquire("settled", TTL)
        .await
        .unwrap()
        .expect("granted by nodes 0 and 2");
    assert_eq!(guard.fencing_token(), 142, "the highest of its grants");
    tokio::time::sleep(Duration::from_millis(200)).await; // a raise still in flight would land now
    let mut counters = Vec::new();
    for node in &mut nodes {
        counters.push(node.get::<_, u64>("state:fence:settled").await.unwrap());
    }
    assert_eq!(
        counters,
        vec![142, 131, 142],
        "node 1's counter is the other holder's"
    );
    guard.release().await.unwrap();
}

#[tokio::test]
async fn construction_checks_its_input_and_needs_a_majority() {
    assert!(matches!(
        RedlockDistributedLock::new(&[]).await,
        Err(StateError::InvalidInput { .. })
    ));
    let fixture = RedlockFixture::start(3);
    let urls = fixture.cluster.urls();
    assert!(matches!(
        RedlockDistributedLock::new(&[urls[0].as_str(), urls[0].as_str(), urls[1].as_str()]).await,
        Err(StateError::InvalidInput { .. })
    ));
    assert!(matches!(
        RedlockDistributedLock::new(&[urls[0].as_str(), "nonsense"]).await,
        Err(StateError::InvalidInput { .. })
    ));
    // One node down at start: fine, it is reconnected to later.
    fixture.cluster.node(2).stop();
    let all: Vec<&str> = urls.iter().map(String::as_str).collect();
    let locks = RedlockDistributedLock::new(&all)
        .await
        .expect("2 of 3 answer");
    fixture.cluster.node(2).start();
    let guard = locks.try_acquire("late-node", TTL).await.unwrap().unwrap();
    guard.release().await.unwrap();
    // Two down at start: refused, naming them.
    fixture.cluster.node(0).stop();
    fixture.cluster.node(1).stop();
    match RedlockDistributedLock::new(&all).await {
        Err(StateError::QuorumNotReached { failed_nodes, .. }) => assert_eq!(failed_nodes.len(), 2),
        other => panic!("expected QuorumNotReached, got {other:?}"),
    }
    let locks = locks.with_drift(0.7, Duration::ZERO);
    assert!(matches!(locks, Err(StateError::InvalidInput { .. })));
}

/// Lock info decides on a majority, as acquire does: a hung (SIGSTOPped) minority node adds nothing to
/// `get_lock_info` or `is_locked` (before, both waited for every node: the hung one's timeout, 250 ms at
/// least, on every call). The fastest of five rounds is compared, so a loaded machine's pauses do not
/// decide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspection_decides_on_a_majority_without_waiting_for_a_hung_node() {
    let fixture = RedlockFixture::start(3);
    let locks = fixture
        .client()
        .await
        .with_node_timeout(Duration::from_secs(2))
        .unwrap()
        .with_retry(RetryConfig::no_retry());
    let guard = locks.try_acquire("inspected", TTL).await.unwrap().unwrap();
    // The acquire returned at a majority: hang a node the lease does not need (one without it, if any).
    let mut hung = 2;
    for node in 0..3 {
        let held: bool = node_conn(&fixture, node)
            .await
            .exists("state:lock:inspected")
            .await
            .unwrap();
        if !held {
            hung = node;
        }
    }
    fixture.cluster.node(hung).pause();
    let result = async {
        for resource in ["inspected", "free"] {
            let mut fastest = Duration::MAX;
            for _ in 0..5 {
                let started = Instant::now();
                let info = locks.get_lock_info(resource).await.unwrap();
                let locked = locks.is_locked(resource).await.unwrap();
                fastest = fastest.min(started.elapsed());
                assert_eq!(info.is_some(), resource == "inspected");
                assert_eq!(locked, resource == "inspected");
            }
            assert!(
                fastest < Duration::from_millis(100),
                "{resource}: two inspections took {fastest:?} at best with one node of three hung"
            );
        }
        assert_eq!(
            locks
                .get_lock_info("inspected")
                .await
                .unwrap()
                .unwrap()
                .fencing_token,
            guard.fencing_token()
        );
    }
    .await;
    fixture.cluster.node(hung).resume();
    result
}

/// The roster (fleet membership) on Redlock needs no one node: with the first node restarted empty,
/// then paused past the members' TTL, every member stays listed at every read, and the renewals put
/// the entries back on the node that lost them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roster_survives_a_node_restarted_empty_and_a_hung_node() {
    use state::recipes::roster::{KeptMember, RosterStore};
    let fixture = RedlockFixture::start(3);
    let roster: std::sync::Arc<dyn RosterStore> =
        std::sync::Arc::new(client(&fixture).await.roster_store());
    let ttl = Duration::from_millis(1_500);
    let mut kept = Vec::new();
    for member in ["a", "b", "c"] {
        kept.push(
            KeptMember::join(&roster, "fleet", member, b"", ttl)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let listed_throughout = |for_how_long: Duration| {
        let roster = roster.clone();
        async move {
            let until = Instant::now() + for_how_long;
            while Instant::now() < until {
                let names: Vec<String> = roster
                    .members("fleet")
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|entry| entry.member)
                    .collect();
                assert_eq!(names, ["a", "b", "c"], "a member vanished from the view");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    fixture.cluster.node(0).stop();
    fixture.cluster.node(0).start();
    listed_throughout(ttl * 2).await;
    let mut first = node_conn(&fixture, 0).await;
    let restored: usize = first.zcard("state:roster:fleet:deadlines").await.unwrap();
    assert_eq!(
        restored, 3,
        "renewals put the entries back on the emptied node"
    );
    fixture.cluster.node(0).pause();
    let result = listed_throughout(ttl * 2).await;
    fixture.cluster.node(0).resume();
    assert!(kept.iter().all(|member| !member.is_lost()));
    result
}
