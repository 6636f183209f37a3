//! The fleet as operators run it: separate `processor` OS processes coordinating through a real Redis.
//!
//! `processor dev-broker` hosts the mock cluster; three `processor run` instances share a checkpoint
//! directory and a `redis-server`; half the workload is produced, one instance is killed with SIGKILL
//! mid-stream (no checkpoint, no release: its claims must lapse) and restarted on its old state
//! directory; another is frozen with SIGSTOP past its claims' TTL and thawed (a paused owner: fenced, it
//! must notice and never publish over the new owners); the rest is produced, and once every partition's
//! checkpoint covers the whole topic the instances are stopped with SIGTERM (exit 0) and
//! `processor state dump` must equal the exact recomputation of the workload.

// A test: helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::support::{
    Broker, Job, PARTITIONS, Proc, TOPIC, assert_state_is_exact, assert_state_is_exact_of,
    dev_broker, dev_broker_with, end_offsets, fails_with, offsets, offsets_of, owned_by_log,
    produce, produce_to, run_instance, run_job_instance, wait_for,
};
use integration_tests::{RedisCluster, RedisServer};
use nix::sys::signal::Signal;
use processor::dev::Workload;

#[test]
fn three_processes_with_redis_survive_a_sigkill_and_restart_with_exact_state() {
    let redis = RedisServer::start_new();
    sigkill_restart_and_a_frozen_owner_end_exact(&redis.url());
}

/// The same fleet coordinating through Redlock over three `redis-server`s (`redlock://h1,h2,h3`).
#[test]
fn three_processes_with_redlock_survive_a_sigkill_and_restart_with_exact_state() {
    let nodes = RedisCluster::new(3);
    let hosts: Vec<String> = (0..nodes.len())
        .map(|i| format!("127.0.0.1:{}", nodes.node(i).port()))
        .collect();
    sigkill_restart_and_a_frozen_owner_end_exact(&format!("redlock://{}", hosts.join(",")));
}

/// The same fleet coordinating through a three-member etcd cluster (`etcd://h1,h2,h3`).
#[test]
fn three_processes_with_etcd_survive_a_sigkill_and_restart_with_exact_state() {
    let etcd = integration_tests::EtcdCluster::three();
    sigkill_restart_and_a_frozen_owner_end_exact(&etcd.url("fleet"));
}

/// Two jobs, on `orders` (8 partitions) and on `clicks`, both with the default group, two instances
/// each on one Redis: each job processes all of its partitions and both end exact. (Membership and
/// leadership used to be scoped by the group alone: the four instances were one fleet, each job
/// assigned partitions to the other's instances, which never claimed them, and those partitions were
/// silently never processed.)
#[test]
fn two_jobs_on_two_topics_with_the_default_group_on_one_redis_both_end_exact() {
    let scratch = support::Scratch::new();
    let root: PathBuf = scratch.path();
    let redis = RedisServer::start_new();
    let (mut broker, brokers) = dev_broker_with(&["--also-create", "clicks"]);
    let orders = Job {
        topic: TOPIC,
        group: None,
    };
    let clicks = Job {
        topic: "clicks",
        group: None,
    };
    let orders_load = Workload {
        records: 6_000,
        keys: 200,
        seed: 3,
        partitions: PARTITIONS,
    };
    let clicks_load = Workload {
        records: 3_000,
        keys: 100,
        seed: 4,
        partitions: 1,
    };
    produce_to(&brokers, orders.topic, &orders_load, 0..orders_load.records);
    produce_to(&brokers, clicks.topic, &clicks_load, 0..clicks_load.records);
    let mut fleet: BTreeMap<&str, Proc> = [
        ("o1", &orders),
        ("o2", &orders),
        ("c1", &clicks),
        ("c2", &clicks),
    ]
    .into_iter()
    .map(|(id, job)| {
        (
            id,
            run_job_instance(job, id, &brokers, &redis.url(), &root, &[]),
        )
    })
    .collect();
    let checkpoints = root.join("checkpoints");
    wait_for(
        "both jobs to process all their partitions",
        Duration::from_secs(90),
        &root,
        || {
            offsets_of(&checkpoints, orders.topic, orders.group()) == end_offsets(&orders_load)
                && offsets_of(&checkpoints, clicks.topic, clicks.group())
                    == end_offsets(&clicks_load)
        },
    );
    for proc in fleet.values() {
        proc.signal(Signal::SIGTERM);
    }
    for (id, proc) in &mut fleet {
        let status = proc.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "{id} exited with {status} after SIGTERM");
    }
    broker.signal(Signal::SIGTERM);
    assert!(broker.wait_exit(Duration::from_secs(10)).success());
    assert_state_is_exact_of(&checkpoints, &orders_load, orders.topic, orders.group());
    assert_state_is_exact_of(&checkpoints, &clicks_load, clicks.topic, clicks.group());
}

/// The scenario of the module docs with every instance on `lock_url`.
fn sigkill_restart_and_a_frozen_owner_end_exact(lock_url: &str) {
    let scratch = support::Scratch::new();
    let root: PathBuf = scratch.path();
    let workload = Workload {
        records: 40_000,
        keys: 300,
        seed: 11,
        partitions: PARTITIONS,
    };
    let expected_ends = end_offsets(&workload);

    let (broker, brokers) = Broker::start();
    assert!(brokers.starts_with("127.0.0.1:"), "{brokers}");

    produce(&brokers, &workload, 0..workload.records / 2);
    let url = lock_url.to_owned();
    let mut fleet: BTreeMap<&str, Proc> = ["p1", "p2", "p3"]
        .into_iter()
        .map(|id| (id, run_instance(id, &brokers, &url, &root)))
        .collect();
    let checkpoints = root.join("checkpoints");

    // Mid-stream: some partitions checkpointed, the first half not yet fully processed.
    wait_for("first checkpoints", Duration::from_secs(60), &root, || {
        offsets(&checkpoints).values().filter(|o| **o > 0).count() >= 3
    });
    // A paused owner: p3, while it owns partitions, freezes (SIGSTOP) well past its claims' TTL; the
    // others take its partitions and checkpoint them; when p3 wakes up it must notice it lost them and
    // never publish over the newer owners' checkpoints. Meanwhile p2 is killed (SIGKILL: no checkpoint,
    // no release) and restarted on its old state directory.
    wait_for(
        "p3 to own partitions",
        Duration::from_secs(60),
        &root,
        || !owned_by_log(&root, "p3").is_empty(),
    );
    let frozen = &fleet["p3"];
    frozen.signal(Signal::SIGSTOP);
    let victim = fleet.remove("p2").unwrap();
    victim.signal(Signal::SIGKILL);
    drop(victim);
    fleet.insert("p2", run_instance("p2", &brokers, &url, &root));
    std::thread::sleep(Duration::from_secs(7));
    fleet["p3"].signal(Signal::SIGCONT);
    produce(&brokers, &workload, workload.records / 2..workload.records);

    wait_for(
        "the fleet to catch up",
        Duration::from_secs(180),
        &root,
        || {
            let now = offsets(&checkpoints);
            (0..PARTITIONS).all(|p| now.get(&p) == Some(expected_ends.get(&p).unwrap_or(&0)))
        },
    );
    for proc in fleet.values() {
        proc.signal(Signal::SIGTERM);
    }
    for (id, proc) in &mut fleet {
        let status = proc.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "{id} exited with {status} after SIGTERM");
    }
    broker.stop();

    assert_state_is_exact(&checkpoints, &workload);
    // The paused owner found out it lost its partitions and stopped, instead of writing on: fenced at the
    // store, its claim found lost, or a step refused because the claim lapsed while it was frozen (these
    // errors read "stale owner of partition ..."), or — when the thaw found it inside a backend call
    // whose deadline had passed meanwhile — its keeper reporting the partition's claim lost.
    let p3_log = std::fs::read_to_string(root.join("p3.log")).unwrap_or_default();
    assert!(
        p3_log.contains("stale owner") || support::reports_a_lost_partition_claim(&p3_log),
        "p3 never noticed it lost its partitions:\n{p3_log}"
    );
    for id in ["p1", "p2", "p3"] {
        let log = std::fs::read_to_string(root.join(format!("{id}.log"))).unwrap_or_default();
        assert!(!log.contains("panicked"), "{id}: {log}");
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn operator_mistakes_give_one_line_errors_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let checkpoints = dir.path().join("ck");
    let (state, checkpoints) = (state.to_str().unwrap(), checkpoints.to_str().unwrap());
    let run = |brokers: &'static str, lock_url: &'static str| {
        let mut args = vec![
            "run",
            "--brokers",
            brokers,
            "--topic",
            TOPIC,
            "--instance-id",
            "x",
            "--state-dir",
            state,
            "--checkpoint-dir",
            checkpoints,
            "--create-checkpoint-dir",
        ];
        if lock_url == "memory" {
            args.push("--single-instance");
        } else {
            args.extend(["--lock-url", lock_url]);
        }
        args
    };

    // No broker there: one line naming it.
    let err = fails_with(&run("127.0.0.1:1", "memory"));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("127.0.0.1:1"), "{err}");

    // A broker, but the lock backend is unreachable or unknown.
    let (mut broker, brokers) = dev_broker();
    let brokers: &'static str = Box::leak(brokers.into_boxed_str());
    let err = fails_with(&run(brokers, "redis://127.0.0.1:1"));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("lock backend"), "{err}");
    let err = fails_with(&run(brokers, "zookeeper://127.0.0.1:2181"));
    assert!(err.contains("lock url"), "{err}");

    // A forgotten lock URL must not let every process own every partition: refused, one line.
    let mut no_lock_url = run(brokers, "memory");
    no_lock_url.retain(|arg| *arg != "--single-instance");
    let err = fails_with(&no_lock_url);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("--lock-url") && err.contains("--single-instance"),
        "{err}"
    );
    let mut memory_in_a_fleet = no_lock_url.clone();
    memory_in_a_fleet.extend(["--lock-url", "memory"]);
    let err = fails_with(&memory_in_a_fleet);
    assert!(err.contains("--single-instance"), "{err}");

    // Client properties reach the Kafka clients: an unknown one is one line naming it, and a secret
    // given beside it never shows; a property the processor owns is refused.
    let mut properties = run(brokers, "memory");
    properties.extend([
        "--kafka-config",
        "sasl.password=hunter2-kafka",
        "--kafka-config",
        "no.such.property=1",
    ]);
    let err = fails_with(&properties);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no.such.property"), "{err}");
    assert!(!err.contains("hunter2-kafka"), "{err}");
    let mut reserved = run(brokers, "memory");
    reserved.extend(["--kafka-config", "enable.auto.commit=true"]);
    let err = fails_with(&reserved);
    assert!(err.contains("enable.auto.commit"), "{err}");

    // A topic that does not exist, and a partition count that disagrees with the brokers'.
    let mut no_topic = run(brokers, "memory");
    no_topic[4] = "no-such-topic";
    let err = fails_with(&no_topic);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("no-such-topic") && err.contains("does not exist"),
        "{err}"
    );
    let mut wrong_count = run(brokers, "memory");
    wrong_count.extend(["--partitions", "3"]);
    let err = fails_with(&wrong_count);
    assert!(err.contains("--partitions says 3"), "{err}");

    // A checkpoint directory that is not there (an unmounted volume) is not an empty store.
    let mut unmounted = run(brokers, "memory");
    unmounted.retain(|arg| *arg != "--create-checkpoint-dir");
    let never_created = dir.path().join("not-mounted");
    unmounted[10] = never_created.to_str().unwrap();
    let err = fails_with(&unmounted);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("does not exist") && err.contains("--create-checkpoint-dir"),
        "{err}"
    );

    // An unwritable state directory (a file stands where the directory should be).
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let blocked = file.join("state");
    let mut args = run(brokers, "memory");
    args[8] = blocked.to_str().unwrap();
    let err = fails_with(&args);
    assert!(err.contains("state dir"), "{err}");

    // A bad flag value.
    let err = fails_with(&[
        "run",
        "--brokers",
        brokers,
        "--topic",
        TOPIC,
        "--checkpoint-interval-secs",
        "-1",
    ]);
    assert!(!err.is_empty());
    broker.signal(Signal::SIGTERM);
    assert!(broker.wait_exit(Duration::from_secs(10)).success());
}

/// SIGTERM while `processor run` is still starting (here: its first metadata request hangs on a
/// "broker" that accepts connections and never answers) ends it cleanly, by its own exit, instead of
/// by the signal's default action. Failed before the fix: the handler was installed only once the
/// instance had started, so the process died of the signal.
#[test]
fn sigterm_during_start_up_ends_the_process_cleanly() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let brokers = silent.local_addr().unwrap().to_string();
    let scratch = support::Scratch::new();
    let root = scratch.path();
    let mut proc = Proc(
        support::processor(&[
            "run",
            "--brokers",
            &brokers,
            "--topic",
            TOPIC,
            "--single-instance",
            "--state-dir",
            root.join("state").to_str().unwrap(),
            "--checkpoint-dir",
            root.join("checkpoints").to_str().unwrap(),
            "--create-checkpoint-dir",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(1_500));
    proc.signal(Signal::SIGTERM);
    let status = proc.wait_exit(Duration::from_secs(10));
    assert!(
        status.code().is_some(),
        "the process died of the signal instead of exiting: {status}"
    );
    assert!(status.success(), "{status}");
    drop(silent);
}
