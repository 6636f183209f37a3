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

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{RedisCluster, RedisServer};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use processor::dev::Workload;

const BIN: &str = env!("CARGO_BIN_EXE_processor");
const TOPIC: &str = "orders";
const PARTITIONS: i32 = 8;

/// A child process killed on drop (a failing test leaves nothing running).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.0.id()).unwrap());
        kill(pid, signal).unwrap();
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit in {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn processor(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args).env(
        "RUST_LOG",
        std::env::var("FLEET_TEST_LOG").unwrap_or_else(|_| "info".to_owned()),
    );
    command
}

/// The broker of the multi-process scenario: `processor dev-broker` (the mock cluster, in its own
/// process) by default, or a real Apache Kafka node with `PROCESSOR_TEST_BROKER=kafka`.
enum Broker {
    Dev(Proc),
    /// Held for its `Drop`, which stops the broker.
    Kafka(#[allow(dead_code)] integration_tests::KafkaCluster),
}

impl Broker {
    fn start() -> (Broker, String) {
        match std::env::var("PROCESSOR_TEST_BROKER").as_deref() {
            Ok("kafka") => {
                let cluster = integration_tests::KafkaCluster::single();
                let brokers = cluster.bootstrap_servers();
                tokio::runtime::Runtime::new()
                    .unwrap()
                    .block_on(processor::dev::admin::create_topic(
                        &brokers,
                        TOPIC,
                        PARTITIONS,
                        1,
                        &[],
                    ))
                    .unwrap();
                (Broker::Kafka(cluster), brokers)
            }
            Ok("mock") | Err(_) => {
                let (proc, brokers) = dev_broker();
                (Broker::Dev(proc), brokers)
            }
            Ok(other) => panic!("PROCESSOR_TEST_BROKER={other}: use `mock` or `kafka`"),
        }
    }

    /// Stops the broker; the dev broker must exit cleanly on SIGTERM.
    fn stop(self) {
        if let Broker::Dev(mut proc) = self {
            proc.signal(Signal::SIGTERM);
            assert!(proc.wait_exit(Duration::from_secs(10)).success());
        }
    }
}

/// `processor dev-broker` for the topic, and the bootstrap address it printed first.
fn dev_broker() -> (Proc, String) {
    let mut broker = Proc(
        processor(&["dev-broker", "--topic", TOPIC])
            .args(["--partitions", &PARTITIONS.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut first_line = String::new();
    BufReader::new(broker.0.stdout.take().unwrap())
        .read_line(&mut first_line)
        .unwrap();
    (broker, first_line.trim().to_owned())
}

fn run_instance(id: &str, brokers: &str, redis: &str, root: &Path) -> Proc {
    let state_dir = root.join("state").join(id);
    let checkpoint_dir = root.join("checkpoints");
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(root.join(format!("{id}.log")))
        .unwrap();
    // No --partitions: the count comes from the brokers.
    let child = processor(&["run", "--brokers", brokers, "--topic", TOPIC])
        .args(["--group", "procs", "--instance-id", id, "--lock-url", redis])
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--checkpoint-dir")
        .arg(&checkpoint_dir)
        .arg("--create-checkpoint-dir")
        .args(["--checkpoint-interval-secs", "0.5"])
        .args(["--maintenance-interval-secs", "1", "--claim-ttl-secs", "2"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

fn produce(brokers: &str, workload: &Workload, range: std::ops::Range<u64>) {
    let status = processor(&["produce", "--brokers", brokers, "--topic", TOPIC])
        .args(["--partitions", &workload.partitions.to_string()])
        .args(["--records", &range.end.to_string()])
        .args(["--start-at", &range.start.to_string()])
        .args(["--keys", &workload.keys.to_string()])
        .args(["--seed", &workload.seed.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "produce failed");
}

/// `processor state offsets`: partition -> checkpointed offset.
fn offsets(checkpoint_dir: &Path) -> BTreeMap<i32, i64> {
    let out = processor(&["state", "offsets", "--topic", TOPIC, "--group", "procs"])
        .arg("--checkpoint-dir")
        .arg(checkpoint_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "state offsets failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            (
                i32::try_from(v["partition"].as_i64().unwrap()).unwrap(),
                v["offset"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// The partitions `id` owns now, by its log: started and neither handed off nor ended since.
fn owned_by_log(root: &Path, id: &str) -> std::collections::BTreeSet<i32> {
    let log = std::fs::read_to_string(root.join(format!("{id}.log"))).unwrap_or_default();
    let mut owned = std::collections::BTreeSet::new();
    for line in log.lines() {
        let plain: String = line
            .split('\u{1b}')
            .map(|part| part.split_once('m').map_or(part, |(_, rest)| rest))
            .collect();
        let Some(partition) = plain
            .split_whitespace()
            .find_map(|word| word.strip_prefix("partition="))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if plain.contains("partition started") {
            owned.insert(partition);
        } else if plain.contains("partition handed off") || plain.contains("partition task ended") {
            owned.remove(&partition);
        }
    }
    owned
}

fn wait_for(what: &str, within: Duration, logs: &Path, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() > deadline {
            let mut tails = String::new();
            for id in ["p1", "p2", "p3"] {
                let log =
                    std::fs::read_to_string(logs.join(format!("{id}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                tails.push_str(&format!(
                    "\n--- {id} ---\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
            panic!("timed out waiting for {what}{tails}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

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

/// The scenario of the module docs with every instance on `lock_url`.
fn sigkill_restart_and_a_frozen_owner_end_exact(lock_url: &str) {
    let root: PathBuf = tempfile::tempdir().unwrap().keep();
    let workload = Workload {
        records: 40_000,
        keys: 300,
        seed: 11,
        partitions: PARTITIONS,
    };
    let mut expected_ends = vec![0i64; PARTITIONS as usize];
    for i in 0..workload.records {
        expected_ends[workload.record(i).0 as usize] += 1;
    }

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
            (0..PARTITIONS).all(|p| now.get(&p) == Some(&expected_ends[p as usize]))
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

    let out = processor(&["state", "dump", "--topic", TOPIC, "--group", "procs"])
        .arg("--checkpoint-dir")
        .arg(&checkpoints)
        .output()
        .unwrap();
    assert!(out.status.success());
    let dumped: BTreeMap<String, serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            (v["key"].as_str().unwrap().to_owned(), v)
        })
        .collect();
    let expected = workload.expected();
    assert_eq!(dumped.len(), expected.len());
    for (key, a) in &expected {
        let got = &dumped[key];
        assert_eq!(
            (
                got["count"].as_u64(),
                got["sum"].as_i64(),
                got["min"].as_i64(),
                got["max"].as_i64(),
                got["chain"].as_u64()
            ),
            (
                Some(a.count),
                Some(a.sum),
                Some(a.min),
                Some(a.max),
                Some(a.chain)
            ),
            "key {key}: lost, duplicated or reordered"
        );
    }
    // The paused owner found out it was stale and stopped (fenced), instead of writing on.
    let p3_log = std::fs::read_to_string(root.join("p3.log")).unwrap_or_default();
    assert!(
        p3_log.contains("stale owner"),
        "p3 never noticed it lost its partitions:\n{p3_log}"
    );
    for id in ["p1", "p2", "p3"] {
        let log = std::fs::read_to_string(root.join(format!("{id}.log"))).unwrap_or_default();
        assert!(!log.contains("panicked"), "{id}: {log}");
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// Runs `processor` with `args` and returns (exit success, stderr).
fn fails_with(args: &[&str]) -> String {
    // A mistake must be refused at start: a process still running after 30 s was not refused (killed, so
    // the test fails instead of hanging).
    let mut child = processor(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} was not refused: still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "{args:?}: no error message");
    stderr
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
