//! Exactly-once outputs on a real Apache Kafka broker: an owner killed abruptly mid-stream (its open
//! transaction left behind) and a successor that restores older state and replays; a `read_committed`
//! reader of the output topic then sees, per key, every running aggregate exactly once — counts
//! `1, 2, …, n` with no repeat and no gap — and the last one equals the recomputation. The same run with
//! `at-least-once` outputs shows repeats (the check can fail).

// Test code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use processor::aggregation::Aggregate;
use processor::dev::Workload;
use processor::source::high_watermark;
use processor::{Instance, InstanceConfig, KafkaSettings, OutputGuarantee, Services};
use support::{TestBroker, read_committed};
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "orders";
const OUTPUT: &str = "orders.out";
const PARTITIONS: i32 = 2;

/// Per key, the counts of its outputs in the order a `read_committed` reader sees them, and its last
/// aggregate.
fn outputs_by_key(brokers: &str) -> BTreeMap<String, (Vec<u64>, Aggregate)> {
    let mut by_key: BTreeMap<String, (Vec<u64>, Aggregate)> = BTreeMap::new();
    for (key, value) in read_committed(brokers, OUTPUT) {
        let aggregate: Aggregate = serde_json::from_slice(&value).unwrap();
        let entry = by_key
            .entry(String::from_utf8(key).unwrap())
            .or_insert_with(|| (Vec::new(), Aggregate::default()));
        entry.0.push(aggregate.count);
        entry.1 = aggregate;
    }
    by_key
}

/// Runs the scenario with `guarantee`; returns how many outputs repeated an earlier one of their key.
async fn crash_and_take_over(guarantee: OutputGuarantee) -> usize {
    integration_tests::init_tracing();
    let broker = TestBroker::kafka(TOPIC, PARTITIONS).await;
    broker.create_topic(OUTPUT, 2).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 6_000,
        keys: 30,
        seed: 21,
        partitions: PARTITIONS,
    };
    workload
        .produce_range(&brokers, TOPIC, 0..3_000)
        .await
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let services = Services::in_memory(root.path().join("shared")).unwrap();
    let start = |id: &str| {
        // Checkpoints rarely: the successor restores state far behind the outputs already published.
        let config = InstanceConfig::new(id, TOPIC, PARTITIONS, &brokers, root.path().join(id))
            .with_output_topic(OUTPUT)
            .with_output_guarantee(guarantee)
            .with_checkpoint_every(Duration::from_secs(3_600))
            .with_claim_ttl(Duration::from_millis(1_500));
        let instance = Instance::new(config, services.clone()).unwrap();
        let status = instance.status();
        let stop = CancellationToken::new();
        (tokio::spawn(instance.run(stop.clone())), stop, status)
    };

    // "a" processes part of the stream and dies abruptly: no hand-off, a transaction maybe open.
    let (a, _, a_status) = start("a");
    let deadline = Instant::now() + Duration::from_secs(60);
    while a_status.borrow().processed < 1_500 {
        assert!(
            Instant::now() < deadline,
            "a processed too little: {:?}",
            a_status.borrow()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.abort();
    let _ = a.await;

    // "b" takes over from empty state (no checkpoint yet) while the rest arrives.
    let (b, b_stop, b_status) = start("b");
    workload
        .produce_range(&brokers, TOPIC, 3_000..6_000)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while b_status.borrow().processed < 6_000 {
        let ends: i64 = (0..PARTITIONS)
            .map(|p| high_watermark(&KafkaSettings::new(&brokers), TOPIC, p).unwrap())
            .sum();
        assert_eq!(ends, 6_000);
        if Instant::now() > deadline {
            panic!("b did not catch up: {:?}", b_status.borrow());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // b replays what a had done; with exactly-once its replayed outputs are discarded, so it applies
        // everything but publishes only what a had not committed.
        if b_status.borrow().processed >= 6_000 {
            break;
        }
    }
    b_stop.cancel();
    b.await.unwrap().unwrap();

    // The independent verifier (Python, confluent-kafka, its own recomputation) must agree.
    let report = integration_tests::verifier::verify_outputs(&brokers, TOPIC, OUTPUT);
    assert!(report.error.is_none(), "{report:?}");
    match guarantee {
        OutputGuarantee::ExactlyOnce => assert!(report.ok, "{report:?}"),
        _ => assert!(report.duplicates > 0 && report.missing == 0, "{report:?}"),
    }

    let outputs = outputs_by_key(&brokers);
    let expected = workload.expected();
    assert_eq!(outputs.len(), expected.len(), "every key has outputs");
    let mut repeats = 0;
    for (key, (counts, last)) in &outputs {
        let n = expected[key].count;
        assert_eq!(
            last, &expected[key],
            "the last output of {key} is the recomputation"
        );
        let mut seen = std::collections::HashSet::new();
        repeats += counts.iter().filter(|c| !seen.insert(**c)).count();
        let distinct: Vec<u64> = {
            let mut d: Vec<u64> = seen.into_iter().collect();
            d.sort_unstable();
            d
        };
        assert_eq!(
            distinct,
            (1..=n).collect::<Vec<_>>(),
            "no output of {key} is missing"
        );
    }
    repeats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_owner_and_a_replaying_successor_publish_each_effect_once() {
    let repeats = crash_and_take_over(OutputGuarantee::ExactlyOnce).await;
    assert_eq!(repeats, 0, "outputs repeated under exactly-once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_outputs_repeat_after_the_same_crash() {
    let repeats = crash_and_take_over(OutputGuarantee::AtLeastOnce).await;
    assert!(
        repeats > 0,
        "the check cannot see repeats: no output repeated at-least-once"
    );
}

/// librdkafka's mock cluster accepts transactional producers but keeps neither transactional offsets nor
/// aborted-record filtering (the same run on it repeats every replayed output), so instances recognise it
/// and publish at-least-once there, with a warning, instead of promising what it cannot keep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mock_cluster_is_recognised_and_a_real_broker_is_not() {
    let mock = TestBroker::Mock(processor::dev::DevBroker::start(TOPIC, 1).unwrap());
    let real = TestBroker::kafka(TOPIC, 1).await;
    for (broker, expected) in [(&mock, true), (&real, false)] {
        let kafka = KafkaSettings::new(&broker.bootstrap_servers());
        let is_mock = tokio::task::spawn_blocking(move || {
            processor::source::is_mock_cluster(&kafka).unwrap()
        })
        .await
        .unwrap();
        assert_eq!(is_mock, expected, "{}", broker.bootstrap_servers());
    }
}

/// A frozen owner thawed after a newer owner initialised the partition's transactional producer: its
/// next batch must fail as fenced (the error that says why it stops), not as a generic failed send.
/// The broker refuses the old producer when the batch's first output is added to its transaction, so
/// the fence shows on the delivery of a record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_producer_says_it_was_fenced() {
    use processor::partition::BatchReport;
    use processor::sink::TransactionalSink;
    use rdkafka::consumer::{BaseConsumer, Consumer};

    integration_tests::init_tracing();
    let broker = TestBroker::kafka(TOPIC, 1).await;
    broker.create_topic(OUTPUT, 1).await;
    let kafka = KafkaSettings::new(&broker.bootstrap_servers());
    let open = |kafka: KafkaSettings| {
        tokio::task::spawn_blocking(move || {
            TransactionalSink::open(&kafka, "fleet", TOPIC, 0, Some(OUTPUT), None).unwrap()
        })
    };
    let old = open(kafka.clone()).await.unwrap();
    let _new = open(kafka.clone()).await.unwrap();
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .set("group.id", "fleet")
        .create()
        .unwrap();
    let group = std::sync::Arc::new(consumer.group_metadata().unwrap());
    let mut batch = BatchReport::default();
    batch.outputs.push((b"k".to_vec(), b"v".to_vec()));
    batch.next_offset = 1;

    let err = old.commit_batch(&batch, 1, &group).await.unwrap_err();
    assert!(
        matches!(
            err,
            processor::ProcessorError::OutputFenced { partition: 0, .. }
        ),
        "{err}: {err:?}"
    );
}
