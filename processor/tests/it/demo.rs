//! The README's main command, `processor demo`, as a test: on in-process locks, a real Redis, Redlock, a
//! real PostgreSQL and a three-member etcd (on the mock cluster), and on a real Apache Kafka broker, the
//! fleet (3 instances, one killed abruptly mid-stream, one added) must end with state
//! equal to the exact recomputation, with a leader elected and maintenance jobs run.

// Test and benchmark code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use processor::dev::demo::{DemoConfig, Quiet, run_demo};

use integration_tests::{RedisCluster, RedisServer};

fn small_demo(lock_url: &str) -> DemoConfig {
    let mut config = DemoConfig::default();
    config.lock_url = lock_url.to_owned();
    config.records = 30_000;
    config.keys = 200;
    config
}

async fn check(config: DemoConfig) {
    let report = run_demo(config, &mut Quiet).await.expect("the demo runs");
    assert!(
        report.exact(),
        "{} of {} keys differ: {:?}",
        report.mismatches.len(),
        report.expected_keys,
        &report.mismatches[..report.mismatches.len().min(10)]
    );
    assert_eq!(
        report.instances.len(),
        4,
        "a, b (killed), c and d: {:?}",
        report.instances
    );
    assert!(!report.leaders.is_empty(), "nobody led the fleet");
    assert!(
        report
            .instances
            .values()
            .map(|s| s.task_claims)
            .sum::<u64>()
            > 0,
        "no maintenance job was claimed: {:?}",
        report.instances
    );
    assert!(report.applied_with_replays >= report.records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_demo_is_exact_on_in_process_locks() {
    integration_tests::init_tracing();
    check(small_demo("memory")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_demo_is_exact_on_a_real_redis() {
    integration_tests::init_tracing();
    let redis = RedisServer::start_new();
    check(small_demo(&redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_demo_is_exact_on_a_real_postgres() {
    integration_tests::init_tracing();
    let postgres = integration_tests::PostgresServer::start_new();
    check(small_demo(&postgres.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_demo_is_exact_on_redlock_over_three_redis_servers() {
    integration_tests::init_tracing();
    let nodes = RedisCluster::new(3);
    let hosts: Vec<String> = (0..nodes.len())
        .map(|i| format!("127.0.0.1:{}", nodes.node(i).port()))
        .collect();
    check(small_demo(&format!("redlock://{}", hosts.join(",")))).await;
}

/// `processor demo --brokers HOST:PORT`: the same demo on an existing (here: a real Apache Kafka) cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_demo_is_exact_on_a_real_kafka_broker() {
    integration_tests::init_tracing();
    let kafka = tokio::task::spawn_blocking(integration_tests::KafkaCluster::single)
        .await
        .unwrap();
    let mut config = small_demo("memory");
    config.brokers = Some(kafka.bootstrap_servers());
    check(config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_demo_is_exact_on_a_three_member_etcd() {
    integration_tests::init_tracing();
    let etcd = integration_tests::EtcdCluster::three();
    check(small_demo(&etcd.url("demo"))).await;
}
