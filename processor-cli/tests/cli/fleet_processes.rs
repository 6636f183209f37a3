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
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::{
    Broker, CheckpointsAt, Job, PARTITIONS, Proc, TOPIC, assert_state_is_exact_at,
    assert_state_is_exact_of, dev_broker, dev_broker_with, end_offsets, fails_with, offsets_at,
    offsets_of, owned_by_log, produce, produce_to, run_job_instance, run_job_instance_at, wait_for,
};
use integration_tests::{FaultProxy, RedisCluster, RedisServer, S3Server};
use nix::sys::signal::Signal;
use processor::dev::Workload;

#[test]
fn three_processes_with_redis_survive_a_sigkill_and_restart_with_exact_state() {
    let redis = RedisServer::start_new();
    sigkill_restart_and_a_frozen_owner_end_exact(&redis.url());
}

/// The same fleet across "machines": no shared directory — each process has only its own state
/// directory, the checkpoints live only in an S3 server (SeaweedFS), the locks in Redis. The frozen owner
/// reaches the store through a slow proxy, so its freeze lands in the middle of an upload: thawed, it
/// finishes the upload and its publication is refused by the store itself (412 on the fence's
/// conditional write, logged by the instance); frozen again until that is seen, at most eight times (it is seen at the first or second freeze in 5 runs of 5).
#[test]
fn three_processes_with_checkpoints_only_in_s3_survive_kills_and_a_frozen_uploader() {
    let redis = RedisServer::start_new();
    let s3 = S3Server::start_new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let proxy = runtime.block_on(FaultProxy::start(s3.s3_port()));
    let url = s3.url("fleet");
    let direct = CheckpointsAt::Url {
        url: url.clone(),
        env: s3.env(),
    };
    let slow = CheckpointsAt::Url {
        url,
        env: s3.env_for(&format!("http://127.0.0.1:{}", proxy.port())),
    };
    // Every request of p3's to the store takes a second or more: a freeze as soon as bytes flow lands
    // inside a request, most often one of a checkpoint's.
    proxy.delay(Duration::from_millis(500));
    let refused = |root: &Path| {
        let log = std::fs::read_to_string(root.join("p3.log")).unwrap_or_default();
        log.lines().any(|line| {
            line.contains("refused a stale owner's publication") && line.contains("precondition")
        })
    };
    let freeze_p3_mid_request = |root: &Path, fleet: &BTreeMap<&str, Proc>| {
        for attempt in 1..=8 {
            wait_for(
                "p3 to own partitions",
                Duration::from_secs(60),
                root,
                || !owned_by_log(root, "p3").is_empty(),
            );
            let before = proxy.forwarded_bytes();
            wait_until(Duration::from_secs(10), || proxy.forwarded_bytes() > before);
            fleet["p3"].signal(Signal::SIGSTOP);
            std::thread::sleep(Duration::from_secs(7));
            fleet["p3"].signal(Signal::SIGCONT);
            let seen = wait_until(Duration::from_secs(10), || refused(root));
            eprintln!("freeze {attempt}: the store refused p3's late publication: {seen}");
            if seen {
                return;
            }
        }
    };
    let at_for = |id: &str| {
        if id == "p3" {
            slow.clone()
        } else {
            direct.clone()
        }
    };
    let scratch = support::Scratch::new();
    let root: PathBuf = scratch.path();
    let p3_log = run_fleet_scenario(
        &redis.url(),
        &root,
        &at_for,
        &direct,
        &freeze_p3_mid_request,
    );
    assert!(
        p3_log
            .lines()
            .any(|line| line.contains("refused a stale owner's publication")
                && line.contains("precondition")),
        "the store never refused the frozen uploader's late publication (412):\n{p3_log}"
    );
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

/// The scenario of the module docs with every instance on `lock_url`, checkpoints in a directory.
fn sigkill_restart_and_a_frozen_owner_end_exact(lock_url: &str) {
    let freeze_p3 = |root: &Path, fleet: &BTreeMap<&str, Proc>| {
        // A paused owner: p3, while it owns partitions, freezes (SIGSTOP) well past its claims' TTL;
        // the others take its partitions and checkpoint them; when p3 wakes up it must notice it lost
        // them and never publish over the newer owners' checkpoints.
        wait_for(
            "p3 to own partitions",
            Duration::from_secs(60),
            root,
            || !owned_by_log(root, "p3").is_empty(),
        );
        fleet["p3"].signal(Signal::SIGSTOP);
        std::thread::sleep(Duration::from_secs(7));
        fleet["p3"].signal(Signal::SIGCONT);
    };
    let scratch = support::Scratch::new();
    let root: PathBuf = scratch.path();
    let store = CheckpointsAt::Dir(root.join("checkpoints"));
    run_fleet_scenario(lock_url, &root, &|_| store.clone(), &store, &freeze_p3);
}

/// `done()` within `within`, polled every 200 ms.
fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < within {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    done()
}

/// The scenario of the module docs: instance `id` keeps its checkpoints `at_for(id)`, the checks read
/// them `reader`; `freeze` freezes p3 (while p2 is killed and restarted). Returns p3's log.
fn run_fleet_scenario(
    lock_url: &str,
    root: &Path,
    at_for: &dyn Fn(&str) -> CheckpointsAt,
    reader: &CheckpointsAt,
    freeze: &dyn Fn(&Path, &BTreeMap<&str, Proc>),
) -> String {
    let workload = Workload {
        records: 40_000,
        keys: 300,
        seed: 11,
        partitions: PARTITIONS,
    };
    let expected_ends = end_offsets(&workload);
    let job = Job {
        topic: TOPIC,
        group: Some("procs"),
    };

    let (broker, brokers) = Broker::start();
    assert!(brokers.starts_with("127.0.0.1:"), "{brokers}");

    produce(&brokers, &workload, 0..workload.records / 2);
    let start =
        |id: &str| run_job_instance_at(&job, id, &brokers, lock_url, root, &[], &at_for(id));
    let mut fleet: BTreeMap<&str, Proc> = ["p1", "p2", "p3"]
        .into_iter()
        .map(|id| (id, start(id)))
        .collect();

    // Mid-stream: some partitions checkpointed, the first half not yet fully processed.
    wait_for("first checkpoints", Duration::from_secs(60), root, || {
        offsets_at(reader, TOPIC, "procs")
            .values()
            .filter(|o| **o > 0)
            .count()
            >= 3
    });
    // p3 frozen past its claims' TTL (see `freeze`); meanwhile p2 is killed (SIGKILL: no checkpoint,
    // no release) and restarted on its old state directory.
    // The second half arrives in chunks meanwhile, so the frozen owner is in the middle of its work
    // (processing, checkpointing) when it freezes.
    let producer = {
        let (brokers, workload) = (brokers.clone(), workload);
        std::thread::spawn(move || {
            let (half, chunk) = (workload.records / 2, workload.records / 32);
            for start in (half..workload.records).step_by(usize::try_from(chunk).unwrap()) {
                produce(
                    &brokers,
                    &workload,
                    start..(start + chunk).min(workload.records),
                );
                std::thread::sleep(Duration::from_secs(2));
            }
        })
    };
    let victim = fleet.remove("p2").unwrap();
    victim.signal(Signal::SIGKILL);
    drop(victim);
    fleet.insert("p2", start("p2"));
    freeze(root, &fleet);
    producer.join().unwrap();

    wait_for(
        "the fleet to catch up",
        Duration::from_secs(180),
        root,
        || {
            let now = offsets_at(reader, TOPIC, "procs");
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

    assert_state_is_exact_at(reader, &workload, TOPIC, "procs");
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
    let _ = std::fs::remove_dir_all(root);
    p3_log
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

    // Checkpoints nowhere, or at a URL no store serves: one line saying what to give.
    let mut nowhere = run(brokers, "memory");
    nowhere.retain(|arg| !arg.contains("checkpoint") && *arg != checkpoints);
    let err = fails_with(&nowhere);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("--checkpoint-dir") && err.contains("--checkpoint-url"),
        "{err}"
    );
    let mut ftp = nowhere.clone();
    ftp.extend(["--checkpoint-url", "ftp://bucket/x"]);
    let err = fails_with(&ftp);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("unknown scheme `ftp`"), "{err}");
    let mut both = run(brokers, "memory");
    both.extend(["--checkpoint-url", "s3://bucket/x"]);
    let err = fails_with(&both);
    assert!(err.contains("cannot be used with"), "{err}");

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
