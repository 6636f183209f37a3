//! Exactly-once outputs of a fleet of `processor` OS processes on a 3-broker Apache Kafka cluster
//! (replication factor 3, `min.insync.replicas=2`), checked by an independent verifier (Python,
//! confluent-kafka, its own recomputation of the input; see `integration-tests/verifier/`).
//!
//! Three instances coordinate through Redis and publish every running aggregate to an output topic.
//! While the workload arrives in parts: chaos cycles — p1 or p2 at random, at a random moment, SIGKILLed
//! and restarted or frozen with SIGSTOP past its claims' TTL and thawed (5 cycles; `CHAOS_CYCLES=20` for
//! a longer run; `CHAOS_SEED` replays a run, whose seed is printed; `CHAOS_RUNS=20` repeats the whole
//! run on fresh clusters with 20 seeds — the soak) — then one owner frozen with SIGSTOP well
//! past its claims' TTL and thawed (a zombie: its successor's producer fenced its transactional id, so
//! nothing it produces after the takeover may become visible, and it must stop processing the
//! partitions it lost), and the broker leading input partition 0 killed and restarted mid-run. Then a
//! `read_committed` reader must see, per key, each running aggregate exactly once, the last one equal to
//! the recomputation, the fleet caught up within 3 minutes of the last record and every SIGTERM answered
//! within the stop bound (claim TTL + 5 s). The same run with `--output-guarantee at-least-once` shows
//! repeats (the verifier can fail).

// A test: helpers panic on failure by design.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use crate::support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::support::{
    PARTITIONS, Proc, TOPIC, offsets, owned_by_log, produce, run_instance_with, wait_for,
};
use integration_tests::verifier::{VerifierReport, verify_outputs};
use integration_tests::{KafkaCluster, RedisServer};
use nix::sys::signal::Signal;
use processor::dev::{Workload, admin};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const OUTPUT: &str = "orders.out";
const DEAD_LETTERS: &str = "orders.dlq";
/// The claims' TTL of the run, and the stop bound that follows from it (TTL + 5 s, the default).
const CLAIM_TTL_SECS: u64 = 2;
const STOP_BOUND: Duration = Duration::from_secs(CLAIM_TTL_SECS + 5);
/// How long the fleet may take to catch up after the last record was produced (the progress
/// watchdog's default bound is 30 s; a broker restart and a zombie fit well inside).
const CATCH_UP_WITHIN: Duration = Duration::from_secs(180);

/// One chaos run at a time: three brokers and three instances already fill two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn log_of(root: &Path, id: &str) -> String {
    std::fs::read_to_string(root.join(format!("{id}.log"))).unwrap_or_default()
}

/// What one chaos run measured.
struct ChaosOutcome {
    report: VerifierReport,
    seed: u64,
    caught_up_after: Duration,
    stopped_in: Vec<Duration>,
}

/// The run of the module docs with `--output-guarantee guarantee` and `seed` (random when `None`).
fn chaos_run(guarantee: &str, seed: Option<u64>) -> ChaosOutcome {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let scratch = support::Scratch::new();
    let root: PathBuf = scratch.path();
    let cluster = KafkaCluster::three();
    let brokers = cluster.bootstrap_servers();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime
        .block_on(admin::create_topic(&brokers, TOPIC, PARTITIONS, 3, &[]))
        .unwrap();
    runtime
        .block_on(admin::create_topic(&brokers, OUTPUT, 4, 3, &[]))
        .unwrap();
    runtime
        .block_on(admin::create_topic(&brokers, DEAD_LETTERS, 1, 3, &[]))
        .unwrap();
    let redis = RedisServer::start_new();
    let workload = Workload {
        records: 24_000,
        keys: 200,
        seed: 5,
        partitions: PARTITIONS,
    };
    let expected_ends = support::end_offsets(&workload);
    let cycles: u64 = std::env::var("CHAOS_CYCLES")
        .ok()
        .and_then(|cycles| cycles.parse().ok())
        .unwrap_or(5);
    let seed: u64 = seed.unwrap_or_else(rand::random);
    println!("chaos: CHAOS_SEED={seed} CHAOS_CYCLES={cycles} replays this run");
    let mut rng = StdRng::seed_from_u64(seed);
    let chunk = workload.records / (cycles + 3);
    let mut produced = 0;
    let produce_next = |produced: &mut u64| {
        let end = (*produced + chunk).min(workload.records);
        produce(&brokers, &workload, *produced..end);
        *produced = end;
    };
    produce_next(&mut produced);

    // Checkpoints every 3 s: a partition that moves after a kill is restored from state seconds behind
    // the outputs its owner already published, so every run replays (and at-least-once repeats).
    // (Claims last CLAIM_TTL_SECS: `run_instance_with` passes `--claim-ttl-secs 2`.)
    let extra = [
        "--output-topic",
        OUTPUT,
        "--dead-letter-topic",
        DEAD_LETTERS,
        "--output-guarantee",
        guarantee,
        "--checkpoint-interval-secs",
        "3",
    ];
    let start = |id: &str| run_instance_with(id, &brokers, &redis.url(), &root, &extra);
    let mut fleet: BTreeMap<&str, Proc> = ["p1", "p2", "p3"]
        .into_iter()
        .map(|id| (id, start(id)))
        .collect();
    let checkpoints = root.join("checkpoints");
    wait_for("first checkpoints", Duration::from_secs(90), &root, || {
        offsets(&checkpoints).values().filter(|o| **o > 0).count() >= 3
    });

    // Chaos cycles: p1 or p2, a random moment after the next part of the input arrives;
    // SIGKILL + restart on its old state directory (its partitions taken over once its claims lapse,
    // 2 s), or SIGSTOP past the claims' TTL and SIGCONT. The first cycle always kills, so every run
    // replays.
    for cycle in 0..cycles {
        produce_next(&mut produced);
        std::thread::sleep(Duration::from_millis(rng.random_range(100..800)));
        // p3 is spared: it is the zombie of the next step, which needs it owning partitions from
        // one uninterrupted run.
        let id = ["p1", "p2"][rng.random_range(0..2)];
        if cycle == 0 || rng.random_bool(0.7) {
            println!("chaos cycle {cycle}: SIGKILL {id}");
            let victim = fleet.remove(id).unwrap();
            victim.signal(Signal::SIGKILL);
            drop(victim);
            std::thread::sleep(Duration::from_millis(3_000));
            fleet.insert(id, start(id));
        } else {
            println!("chaos cycle {cycle}: SIGSTOP {id}");
            fleet[id].signal(Signal::SIGSTOP);
            std::thread::sleep(Duration::from_millis(rng.random_range(2_500..5_000)));
            fleet[id].signal(Signal::SIGCONT);
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    // A zombie: p3 frozen while it owns partitions, well past its claims' TTL (2 s), then thawed.
    wait_for(
        "p3 to own partitions",
        Duration::from_secs(60),
        &root,
        || !owned_by_log(&root, "p3").is_empty(),
    );
    fleet["p3"].signal(Signal::SIGSTOP);
    produce_next(&mut produced);
    std::thread::sleep(Duration::from_secs(7));
    fleet["p3"].signal(Signal::SIGCONT);

    // The broker leading input partition 0 dies mid-run and comes back.
    let leader = admin::partition_leaders(&brokers, TOPIC).unwrap()[0];
    let node = cluster
        .node_by_id(u32::try_from(leader).unwrap())
        .expect("partition 0 has a live leader");
    node.kill();
    produce_next(&mut produced);
    std::thread::sleep(Duration::from_secs(3));
    node.start();
    while produced < workload.records {
        produce_next(&mut produced);
    }
    let all_produced = std::time::Instant::now();

    wait_for("the fleet to catch up", CATCH_UP_WITHIN, &root, || {
        let now = offsets(&checkpoints);
        (0..PARTITIONS).all(|p| now.get(&p) == Some(expected_ends.get(&p).unwrap_or(&0)))
    });
    let caught_up_after = all_produced.elapsed();
    for proc in fleet.values() {
        proc.signal(Signal::SIGTERM);
    }
    let stopping = std::time::Instant::now();
    let mut stopped_in = Vec::new();
    for (id, proc) in &mut fleet {
        // Every SIGTERM is answered within the stop bound (plus the process' own exit).
        let status = proc.wait_exit(STOP_BOUND + Duration::from_secs(5));
        stopped_in.push(stopping.elapsed());
        assert!(status.success(), "{id} exited with {status} after SIGTERM");
    }
    // The thawed zombie noticed: its claim was gone (stale owner), its producer fenced, or (thawed
    // inside a backend call whose deadline had passed) its keeper reported the partition's claim lost.
    let zombie = log_of(&root, "p3");
    assert!(
        zombie.contains("stale owner of partition")
            || zombie.contains("fenced by a newer owner")
            || support::reports_a_lost_partition_claim(&zombie),
        "the thawed owner never noticed it lost its partitions:\n{zombie}"
    );
    let report = verify_outputs(&brokers, TOPIC, OUTPUT);
    println!("verifier, {guarantee}: {report:?}");
    ChaosOutcome {
        report,
        seed,
        caught_up_after,
        stopped_in,
    }
}

/// The seed of the first run: `CHAOS_SEED`, or random.
fn first_seed() -> Option<u64> {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
}

/// One run by default; `CHAOS_RUNS=20` is the soak (seeds `CHAOS_SEED`, +1, +2, … when given).
#[test]
fn three_processes_on_three_brokers_publish_each_effect_exactly_once_through_kills_a_zombie_and_a_broker_restart()
 {
    let runs: u64 = std::env::var("CHAOS_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(1);
    let first = first_seed();
    for run in 0..runs {
        let outcome = chaos_run("exactly-once", first.map(|seed| seed + run));
        let report = &outcome.report;
        println!(
            "soak run {}/{runs}: CHAOS_SEED={} exact={} caught up {:.1?} after the last record, SIGTERM answered in {:.1?}",
            run + 1,
            outcome.seed,
            report.ok,
            outcome.caught_up_after,
            outcome.stopped_in
        );
        assert!(report.error.is_none(), "{report:?}");
        assert!(report.ok, "exactly-once violated: {report:?}");
        assert_eq!(report.inputs, 24_000);
    }
}

#[test]
fn the_same_run_at_least_once_shows_repeats() {
    let report = chaos_run("at-least-once", first_seed()).report;
    assert!(report.error.is_none(), "{report:?}");
    assert!(
        report.duplicates > 0 && report.missing == 0 && report.mismatched == 0,
        "the verifier saw no repeats at-least-once: {report:?}"
    );
}
