//! Exactly-once outputs on a real Apache Kafka broker: an owner killed abruptly mid-stream (its open
//! transaction left behind) and a successor that restores older state and replays; a `read_committed`
//! reader of the output topic then sees, per key, every running aggregate exactly once — counts
//! `1, 2, …, n` with no repeat and no gap — and the last one equals the recomputation. The same run with
//! `at-least-once` outputs shows repeats (the check can fail).

// Test code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used)]

use crate::support;

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

/// A real broker with the input and output topics, for tests of one partition's transactional sink:
/// sinks of partition 0 of group `fleet`, and that group's metadata (what a partition's consumer
/// hands its transactions).
struct SinkFixture {
    broker: TestBroker,
    kafka: KafkaSettings,
    group: std::sync::Arc<rdkafka::consumer::ConsumerGroupMetadata>,
}

impl SinkFixture {
    async fn start() -> Self {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        integration_tests::init_tracing();
        let broker = TestBroker::kafka(TOPIC, 1).await;
        broker.create_topic(OUTPUT, 1).await;
        let kafka = KafkaSettings::new(&broker.bootstrap_servers());
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap_servers())
            .set("group.id", "fleet")
            .create()
            .unwrap();
        let group = std::sync::Arc::new(consumer.group_metadata().unwrap());
        SinkFixture {
            broker,
            kafka,
            group,
        }
    }

    /// A new transactional sink of the partition, initialised (which fences the earlier ones).
    async fn open_sink(&self) -> processor::sink::TransactionalSink {
        let kafka = self.kafka.clone();
        tokio::task::spawn_blocking(move || {
            processor::sink::TransactionalSink::open(&kafka, "fleet", TOPIC, 0, Some(OUTPUT), None)
                .unwrap()
        })
        .await
        .unwrap()
    }
}

/// A batch of one output, keyed `key`, ending before `next_offset`.
fn batch_of_one(key: &str, next_offset: i64) -> processor::partition::BatchReport {
    let mut batch = processor::partition::BatchReport::default();
    batch.outputs.push((key.as_bytes().to_vec(), b"v".to_vec()));
    batch.next_offset = next_offset;
    batch
}

/// A frozen owner thawed after a newer owner initialised the partition's transactional producer: its
/// next batch must fail as fenced (the error that says why it stops), not as a generic failed send.
/// The broker refuses the old producer when the batch's first output is added to its transaction, so
/// the fence shows on the delivery of a record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_producer_says_it_was_fenced() {
    let world = SinkFixture::start().await;
    let old = world.open_sink().await;
    let _new = world.open_sink().await;

    let err = old
        .commit_batch(&batch_of_one("k", 1), 1, &world.group)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            processor::ProcessorError::OutputFenced { partition: 0, .. }
        ),
        "{err}: {err:?}"
    );
}

/// A broker behind a fault proxy: the instance under test bootstraps through the proxy, so every
/// connection it makes goes through it (the broker advertises the proxy's port on that listener);
/// the test's own clients use the direct listener. Returns the cluster, the proxy and the instance's
/// bootstrap address.
async fn broker_behind_a_proxy(
    topics: &[(&str, i32)],
) -> (
    integration_tests::KafkaCluster,
    integration_tests::FaultProxy,
    String,
) {
    let listen = integration_tests::free_port();
    let proxy = integration_tests::FaultProxy::start(listen).await;
    let advertised = proxy.port();
    let cluster = tokio::task::spawn_blocking(move || {
        integration_tests::KafkaCluster::single_with_proxied_listener(listen, advertised)
    })
    .await
    .unwrap();
    for (topic, partitions) in topics {
        processor::dev::admin::create_topic(
            &cluster.bootstrap_servers(),
            topic,
            *partitions,
            1,
            &[],
        )
        .await
        .unwrap();
    }
    (cluster, proxy, format!("127.0.0.1:{advertised}"))
}

/// An instance's world for the hang tests: a broker behind a proxy with the input and output topics,
/// the first half of `records` produced, and in-memory services over a temp dir.
struct HangFixture {
    cluster: integration_tests::KafkaCluster,
    proxy: integration_tests::FaultProxy,
    /// The instance's bootstrap address (through the proxy).
    proxied: String,
    workload: Workload,
    root: tempfile::TempDir,
    services: Services,
}

impl HangFixture {
    async fn start(records: u64, seed: u64) -> Self {
        let (cluster, proxy, proxied) =
            broker_behind_a_proxy(&[(TOPIC, PARTITIONS), (OUTPUT, 2)]).await;
        let workload = Workload {
            records,
            keys: 40,
            seed,
            partitions: PARTITIONS,
        };
        workload
            .produce_range(&cluster.bootstrap_servers(), TOPIC, 0..records / 2)
            .await
            .unwrap();
        let root = tempfile::tempdir().unwrap();
        let services = Services::in_memory(root.path().join("shared")).unwrap();
        HangFixture {
            cluster,
            proxy,
            proxied,
            workload,
            root,
            services,
        }
    }

    /// The configuration of instance `a`, publishing to the output topic through the proxy.
    fn config(&self) -> InstanceConfig {
        InstanceConfig::new(
            "a",
            TOPIC,
            PARTITIONS,
            &self.proxied,
            self.root.path().join("a"),
        )
        .with_output_topic(OUTPUT)
        .with_claim_ttl(Duration::from_secs(2))
    }

    /// Waits until the instance has committed the first half.
    async fn wait_for_the_first_half(
        &self,
        status: &tokio::sync::watch::Receiver<processor::InstanceStatus>,
    ) {
        let first = Workload {
            records: self.workload.records / 2,
            ..self.workload
        };
        support::wait_for(status, "the first half", Duration::from_secs(90), |s| {
            caught_up(s, &ends_of(&first))
        })
        .await;
    }

    /// Produces the second half directly (not through the proxy).
    async fn produce_the_second_half(&self) {
        let records = self.workload.records;
        self.workload
            .produce_range(
                &self.cluster.bootstrap_servers(),
                TOPIC,
                records / 2..records,
            )
            .await
            .unwrap();
    }
}

/// The end offset of each input partition after `workload`.
fn ends_of(workload: &Workload) -> Vec<i64> {
    let mut ends = vec![0i64; usize::try_from(workload.partitions).unwrap()];
    for i in 0..workload.records {
        ends[usize::try_from(workload.record(i).0).unwrap()] += 1;
    }
    ends
}

fn caught_up(status: &processor::InstanceStatus, ends: &[i64]) -> bool {
    ends.iter().enumerate().all(|(p, end)| {
        status
            .partition_status
            .get(&i32::try_from(p).unwrap())
            .is_some_and(|s| s.next_offset == *end)
    })
}

/// The stall of issue 38, reproduced: every Kafka connection the instance has open hangs for good
/// (no answer, no reset — a connection that outlived its broker behind a middlebox), while new
/// connections work. Without a bound of its own the partition's owner waits inside librdkafka
/// (socket timeouts of a minute, and transactional calls that never time out) and keeps renewing its
/// claim: nothing moves. With the progress watchdog the partition is given up within the bound and
/// claimed again with new clients; it catches up, and a `read_committed` reader sees each output once.
///
/// Fails on the code before the watchdog: `stall_timeout` did not exist, and the instance did not
/// catch up within the wait below (checked by running it with `with_stall_timeout(None)`).
#[test]
fn a_partition_whose_kafka_connections_hang_is_given_up_and_catches_up_with_new_clients() {
    const WATCHDOG: Duration = Duration::from_secs(5);
    integration_tests::init_tracing();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let world = HangFixture::start(4_000, 38).await;
        let config = world
            .config()
            .with_checkpoint_every(Duration::from_secs(1))
            .with_stall_timeout(Some(WATCHDOG));
        let (run, stop, status) = support::start_instance(world.services.clone(), config);
        world.wait_for_the_first_half(&status).await;

        world.proxy.hang_open();
        let hung_at = Instant::now();
        world.produce_the_second_half().await;
        let ends = ends_of(&world.workload);
        let done = support::wait_for(
            &status,
            "catching up after the hang",
            WATCHDOG + Duration::from_secs(30),
            |s| caught_up(s, &ends),
        )
        .await;
        println!(
            "caught up {:?} after the connections hung; stalls: {}",
            hung_at.elapsed(),
            done.stalls
        );
        assert!(done.stalls >= 1, "the watchdog never fired: {done:?}");
        stop.cancel();
        run.await.unwrap().unwrap();
        let direct = world.cluster.bootstrap_servers();
        let report = integration_tests::verifier::verify_outputs(&direct, TOPIC, OUTPUT);
        assert!(report.error.is_none(), "{report:?}");
        assert!(report.ok, "exactly-once violated: {report:?}");
        assert_eq!(report.inputs, 4_000);
    });
    // Calls abandoned inside librdkafka end whenever it lets them: the test does not wait for them.
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// A stop is bounded: with a commit in flight on connections that hang (outputs applied, their
/// transaction unanswered), `run` returns within the stop bound, names the partitions it abandoned,
/// and their claims are released — instead of waiting for librdkafka (a minute, or for ever).
/// Fails on the code before the bound: `run` waited for every partition task to end.
#[test]
fn a_stop_ends_within_its_bound_while_a_commit_hangs() {
    const BOUND: Duration = Duration::from_secs(3);
    integration_tests::init_tracing();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let world = HangFixture::start(2_000, 39).await;
        // Commits wait up to 5 s for more records: records applied after the first half wait for
        // theirs when the connections hang, and the stop has to commit them.
        let config = world
            .config()
            .with_commits(1_000_000, Duration::from_secs(5))
            .with_stall_timeout(None)
            .with_shutdown_timeout(BOUND);
        let (run, stop, status) = support::start_instance(world.services.clone(), config);
        world.wait_for_the_first_half(&status).await;
        world.produce_the_second_half().await;
        // Fetched and applied, waiting for their commit.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        world.proxy.hang_open();
        let stopping = Instant::now();
        stop.cancel();
        let outcome = tokio::time::timeout(BOUND + Duration::from_secs(10), run)
            .await
            .expect("run ended within its stop bound")
            .unwrap();
        let took = stopping.elapsed();
        println!("stopped in {took:?}: {outcome:?}");
        assert!(
            matches!(
                outcome,
                Err(processor::ProcessorError::ShutdownAbandoned { ref partitions, .. }) if !partitions.is_empty()
            ),
            "{outcome:?}"
        );
        assert!(took < BOUND + Duration::from_secs(5), "took {took:?}");
        // The abandoned claims are released (or lapse): a successor can claim every partition.
        let lock = world.services.lock.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        for partition in 0..PARTITIONS {
            let resource = processor::resources::partition_resource("processor", TOPIC, partition);
            loop {
                if lock
                    .try_acquire(&resource, Duration::from_secs(2))
                    .await
                    .unwrap()
                    .is_some()
                {
                    break;
                }
                assert!(Instant::now() < deadline, "{resource} stayed claimed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        drop(world);
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// The transaction fault classes of issue 32.9 (see `processor::sink::TransactionFault`), one test each
/// where a real broker can produce them: `fenced` is [`a_fenced_producer_says_it_was_fenced`], `timed
/// out` (the processor's own bound) the paused coordinator below and the hang tests above. `retriable`
/// and a fatal error other than a fence are not produced on demand by a broker here: librdkafka retries
/// retriable errors inside the call, and with the coordinator paused it returned nothing before the
/// processor's bound; their handling (abort, resp. drop the producer; restart) is the same path.
///
/// `abortable`: the broker refuses the outputs (the output topic's `max.message.bytes` is smaller than
/// a record batch), so librdkafka makes the transaction abortable. The batch is aborted — its state is
/// not written, nothing of it is visible — the partition restarts with a new producer after a growing
/// pause, and once the topic accepts the outputs again it catches up with each output exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abortable_transaction_is_aborted_and_the_partition_catches_up_once_the_broker_accepts_it()
 {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;

    integration_tests::init_tracing();
    let broker = TestBroker::kafka(TOPIC, PARTITIONS).await;
    let brokers = broker.bootstrap_servers();
    // 100 bytes: no batch of outputs fits, the coordinator's transaction markers (79 bytes) do — a
    // broker that cannot write a marker leaves the transaction unfinished for good.
    processor::dev::admin::create_topic(&brokers, OUTPUT, 2, 1, &[("max.message.bytes", "100")])
        .await
        .unwrap();
    let workload = Workload {
        records: 1_000,
        keys: 20,
        seed: 32,
        partitions: PARTITIONS,
    };
    workload
        .produce_range(&brokers, TOPIC, 0..workload.records)
        .await
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let services = Services::in_memory(root.path().join("shared")).unwrap();
    let config = InstanceConfig::new("a", TOPIC, PARTITIONS, &brokers, root.path().join("a"))
        .with_output_topic(OUTPUT)
        .with_claim_ttl(Duration::from_secs(2));
    let (run, stop, status) = support::start_instance(services, config);

    let refused = support::wait_for(
        &status,
        "a transaction refused as abortable",
        Duration::from_secs(60),
        |s| {
            s.partition_errors
                .values()
                .any(|e| e.contains("(abortable)"))
        },
    )
    .await;
    println!("refused: {:?}", refused.partition_errors);
    // Nothing of a refused batch reached the state: no partition moved.
    assert!(
        refused
            .partition_status
            .values()
            .all(|p| p.next_offset == 0),
        "state written past an aborted transaction: {refused:?}"
    );
    assert!(read_committed(&brokers, OUTPUT).is_empty());

    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let accept =
        AlterConfig::new(ResourceSpecifier::Topic(OUTPUT)).set("max.message.bytes", "1048588");
    for result in admin
        .alter_configs([&accept], &AdminOptions::new())
        .await
        .unwrap()
    {
        result.unwrap();
    }
    let ends = ends_of(&workload);
    support::wait_for(
        &status,
        "catching up once the outputs are accepted",
        Duration::from_secs(90),
        |s| caught_up(s, &ends),
    )
    .await;
    stop.cancel();
    run.await.unwrap().unwrap();
    let report = integration_tests::verifier::verify_outputs(&brokers, TOPIC, OUTPUT);
    assert!(report.error.is_none(), "{report:?}");
    assert!(report.ok, "exactly-once violated: {report:?}");
    assert_eq!(report.inputs, workload.records);
}

/// `timed out`, with the transaction coordinator's node paused (SIGSTOP) while a batch commits its
/// input offset: librdkafka neither answers nor keeps its own 20 s timeout (no `retriable` error comes
/// back), so the processor's bound ends the call — the commit's outcome unknown. The producer is never
/// called again, and a new producer's initialisation (the partition's next claim) settles the
/// transaction before anything else commits: the reader sees the batches before and after, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_with_its_coordinator_paused_is_abandoned_at_its_bound_and_a_new_producer_settles_it()
 {
    use processor::ProcessorError;
    use processor::partition::BatchReport;

    let world = SinkFixture::start().await;
    let TestBroker::Kafka(cluster) = &world.broker else {
        unreachable!("asked for a real broker")
    };
    let (group, batch) = (&world.group, batch_of_one);

    let old = world.open_sink().await;
    old.commit_batch(&batch("first", 1), 1, group)
        .await
        .unwrap();
    // No outputs in the paused batch: only the offsets' commit talks to the coordinator.
    cluster.node(0).pause();
    let started = Instant::now();
    let err = old
        .commit_batch(&BatchReport::default(), 2, group)
        .await
        .unwrap_err();
    cluster.node(0).resume();
    println!("failed after {:?}: {err}", started.elapsed());
    assert!(
        matches!(
            err,
            ProcessorError::KafkaCallTimedOut {
                operation: "commit a transaction",
                ..
            }
        ),
        "{err}: {err:?}"
    );
    // Abandoned: the producer is not called again, not even to abort.
    let again = old.commit_batch(&batch("second", 2), 2, group).await;
    assert!(
        matches!(again, Err(ProcessorError::KafkaCallTimedOut { .. })),
        "{again:?}"
    );

    let new = world.open_sink().await;
    new.commit_batch(&batch("third", 3), 3, group)
        .await
        .unwrap();
    new.close().await;
    let keys: Vec<Vec<u8>> = read_committed(&world.broker.bootstrap_servers(), OUTPUT)
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert_eq!(keys, [b"first".to_vec(), b"third".to_vec()]);
}

/// A replay toward the group's committed offset `K` ends even when no record sits just below `K`: here
/// the input's last records were written in a transaction, so its commit marker is the log's last
/// offset, and the group's offset was set to the log end past it — as `kafka-consumer-groups
/// --reset-offsets --to-latest` or a Java consumer's commit of its position does, and as a compacted
/// input leaves it. The replay applies every record below `K` (outputs discarded), ends at the
/// consumer's position, and the partition goes on publishing new records' outputs.
///
/// Fails on the code before the position check: the replay waited for a record at or past `K` that
/// never came (the partition stayed `Replaying`; checked by removing the check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_ends_at_a_committed_offset_with_no_record_just_below_it() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
    use rdkafka::{Offset, TopicPartitionList};

    integration_tests::init_tracing();
    let broker = TestBroker::kafka(TOPIC, 1).await;
    broker.create_topic(OUTPUT, 1).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 15,
        keys: 5,
        seed: 33,
        partitions: 1,
    };
    // Records 0..10 in one committed transaction: offsets 0..=9, its marker at 10.
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("transactional.id", "an-upstream-job")
        .create()
        .unwrap();
    producer.init_transactions(Duration::from_secs(30)).unwrap();
    producer.begin_transaction().unwrap();
    for i in 0..10 {
        let (_, key, value) = workload.record(i);
        producer
            .send(
                FutureRecord::to(TOPIC)
                    .partition(0)
                    .key(&key)
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    producer
        .commit_transaction(Duration::from_secs(30))
        .unwrap();
    // The commit returns before the coordinator has written its markers: wait for the stable end.
    let deadline = Instant::now() + Duration::from_secs(20);
    let log_end = loop {
        let end = high_watermark(&KafkaSettings::new(&brokers), TOPIC, 0).unwrap();
        if end > 0 || Instant::now() > deadline {
            break end;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(log_end, 11, "ten records and a commit marker");
    // The fleet's group offset at the log end, past the marker.
    let group: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "processor")
        .create()
        .unwrap();
    let mut at_end = TopicPartitionList::new();
    at_end
        .add_partition_offset(TOPIC, 0, Offset::Offset(log_end))
        .unwrap();
    group.commit(&at_end, CommitMode::Sync).unwrap();
    drop(group);

    let root = tempfile::tempdir().unwrap();
    let services = Services::in_memory(root.path().join("shared")).unwrap();
    let config = InstanceConfig::new("a", TOPIC, 1, &brokers, root.path().join("a"))
        .with_output_topic(OUTPUT);
    let (run, stop, status) = support::start_instance(services, config);
    support::wait_for(
        &status,
        "the replay to end and the partition to consume",
        Duration::from_secs(30),
        |s| {
            s.partition_status
                .get(&0)
                .is_some_and(|p| p.processing && p.next_offset == 10)
        },
    )
    .await;
    // New records after the marker: applied and published (the replayed ones were not).
    workload
        .produce_range(&brokers, TOPIC, 10..15)
        .await
        .unwrap();
    support::wait_for(&status, "the new records", Duration::from_secs(30), |s| {
        s.partition_status
            .get(&0)
            .is_some_and(|p| p.next_offset == 16)
    })
    .await;
    stop.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(read_committed(&brokers, OUTPUT).len(), 5);
}
