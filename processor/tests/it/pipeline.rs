//! The processor's data path end to end on librdkafka's mock cluster or a real Apache Kafka (see
//! `support`): a deterministic workload over 4 partitions consumed with `assign()` into RocksDB, a crash
//! half-way (everything dropped, nothing graceful), a restart from the offsets stored with the state, and
//! the final state compared with the exact recomputation.

// Test and benchmark code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use crate::support;

use std::collections::BTreeMap;
use std::sync::Arc;

use processor::KafkaSettings;
use processor::aggregation::{Aggregate, KeyedAggregation};
use processor::dev::Workload;
use processor::operator::Operator;
use processor::partition::PartitionProcessor;
use processor::sink::OutputSink;
use processor::source::{high_watermark, partition_consumer};
use processor::store::PartitionStore;
use processor::store::rocksdb::RocksDbStores;
use processor::task::{CommitPolicy, Outputs, consume_partition};
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::TestBroker;
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "orders";
const PARTITIONS: i32 = 4;

/// Runs every partition from its stored offset up to `until(partition)` under `fencing_token`.
async fn run(
    brokers: &str,
    stores: &RocksDbStores,
    dir: &std::path::Path,
    fencing_token: u64,
    until: impl Fn(i32) -> i64,
) -> Vec<Arc<dyn PartitionStore>> {
    let operator: Arc<dyn Operator> = Arc::new(KeyedAggregation);
    let mut tasks = Vec::new();
    let mut opened = Vec::new();
    for partition in 0..PARTITIONS {
        let store: Arc<dyn PartitionStore> = Arc::new(
            stores
                .open(partition, &dir.join(format!("p{partition}")))
                .unwrap(),
        );
        opened.push(store.clone());
        let mut processor = PartitionProcessor::resume(
            store,
            operator.clone(),
            fencing_token,
            CancellationToken::new(),
        )
        .unwrap();
        let consumer = partition_consumer(
            &KafkaSettings::new(brokers),
            "test",
            TOPIC,
            partition,
            processor.next_offset(),
        )
        .unwrap();
        let end = until(partition);
        tasks.push(tokio::spawn(async move {
            let stop = CancellationToken::new();
            consume_partition(
                &consumer,
                &mut processor,
                CommitPolicy::new(500, std::time::Duration::from_millis(100)),
                Some(end),
                Outputs::Discard,
                None,
                &stop,
            )
            .await
            .unwrap();
            processor.next_offset()
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    opened
}

fn dump(stores: &[Arc<dyn PartitionStore>]) -> BTreeMap<String, Aggregate> {
    stores
        .iter()
        .flat_map(|store| store.entries().unwrap())
        .map(|(k, v)| {
            (
                String::from_utf8(k).unwrap(),
                Aggregate::decode(&v).unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_and_resume_on_the_mock_cluster_is_exact() {
    integration_tests::init_tracing();
    let broker = TestBroker::start(TOPIC, PARTITIONS).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 20_000,
        keys: 64,
        seed: 42,
        partitions: PARTITIONS,
    };
    workload.produce(&brokers, TOPIC).await.unwrap();
    let ends: Vec<i64> = (0..PARTITIONS)
        .map(|p| high_watermark(&KafkaSettings::new(&brokers), TOPIC, p).unwrap())
        .collect();
    assert_eq!(ends.iter().sum::<i64>(), 20_000, "every record landed");

    let dir = tempfile::tempdir().unwrap();
    let stores = RocksDbStores::new(16 << 20, 8 << 20);
    // First owner: processes about 40 % and "crashes" (everything dropped, no graceful step).
    let first = run(&brokers, &stores, dir.path(), 1, |p| {
        ends[p as usize] * 2 / 5
    })
    .await;
    let partial: i64 = first
        .iter()
        .map(|s| s.meta().unwrap().unwrap().next_offset)
        .sum();
    assert!(partial > 0 && partial < 20_000);
    drop(first);

    // The next owner resumes from the offsets stored with the state, not from Kafka's.
    let second = run(&brokers, &stores, dir.path(), 2, |p| ends[p as usize]).await;
    let state = dump(&second);
    let expected = workload.expected();
    assert_eq!(state.len(), expected.len());
    for (key, aggregate) in &expected {
        assert_eq!(
            state.get(key),
            Some(aggregate),
            "key {key}: lost, duplicated or reordered"
        );
    }
}

/// Checkpoints every partition's store into the shared store under `fencing_token`.
fn checkpoint_all(
    stores: &[Arc<dyn PartitionStore>],
    shared: &processor::checkpoint::DirectoryCheckpointStore,
    scratch: &std::path::Path,
    fencing_token: u64,
) -> Vec<processor::checkpoint::Manifest> {
    use processor::checkpoint::CheckpointStore;
    stores
        .iter()
        .map(|store| {
            let partition = store.partition();
            let snapshot = scratch.join(format!("snap-{partition}-{}", rand::random::<u32>()));
            store.snapshot_to(&snapshot).unwrap();
            let next_offset = store.meta().unwrap().unwrap().next_offset;
            shared
                .upload(TOPIC, partition, &snapshot, next_offset, fencing_token)
                .unwrap()
                .manifest
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_move_through_checkpoints_and_corrupt_ones_are_skipped() {
    use processor::checkpoint::{CheckpointStore, DirectoryCheckpointStore, Manifest};
    use processor::error::ProcessorError;

    integration_tests::init_tracing();
    let broker = TestBroker::start(TOPIC, PARTITIONS).await;
    let brokers = broker.bootstrap_servers();
    let workload = Workload {
        records: 12_000,
        keys: 40,
        seed: 7,
        partitions: PARTITIONS,
    };
    workload.produce(&brokers, TOPIC).await.unwrap();
    let ends: Vec<i64> = (0..PARTITIONS)
        .map(|p| high_watermark(&KafkaSettings::new(&brokers), TOPIC, p).unwrap())
        .collect();
    let root = tempfile::tempdir().unwrap();
    let shared = DirectoryCheckpointStore::new(root.path().join("shared")).unwrap();
    let stores = RocksDbStores::new(16 << 20, 8 << 20);

    // Instance A owns everything (token 1): checkpoints at ~30 % and ~60 %, then dies.
    let a_dir = root.path().join("a");
    let a = run(&brokers, &stores, &a_dir, 1, |p| ends[p as usize] * 3 / 10).await;
    let older = checkpoint_all(&a, &shared, root.path(), 1);
    drop(a);
    let a = run(&brokers, &stores, &a_dir, 1, |p| ends[p as usize] * 6 / 10).await;
    let newer = checkpoint_all(&a, &shared, root.path(), 1);

    // Bit rot in a file only partition 0's newer checkpoint has.
    let known: std::collections::HashSet<String> =
        older[0].files.iter().map(Manifest::blob_name).collect();
    let fresh = newer[0]
        .files
        .iter()
        .find(|f| !known.contains(&Manifest::blob_name(f)))
        .expect("the newer checkpoint has new files");
    let blob = root
        .path()
        .join("shared")
        .join(TOPIC)
        .join("0")
        .join("files")
        .join(Manifest::blob_name(fresh));
    std::fs::write(&blob, b"bit rot").unwrap();

    // Instance B (token 2) gets every partition with an empty disk: it restores the latest *valid*
    // checkpoint and replays Kafka from that checkpoint's offset.
    let b_dir = root.path().join("b");
    for partition in 0..PARTITIONS {
        let (manifest, skipped) = shared.latest_valid(TOPIC, partition).unwrap();
        let manifest = manifest.expect("a valid checkpoint");
        if partition == 0 {
            assert_eq!(
                manifest.next_offset, older[0].next_offset,
                "fell back to the older checkpoint"
            );
            assert!(matches!(
                skipped.as_slice(),
                [ProcessorError::CorruptCheckpoint { .. }]
            ));
        } else {
            assert_eq!(manifest.next_offset, newer[partition as usize].next_offset);
            assert!(skipped.is_empty());
        }
        shared
            .restore(&manifest, &b_dir.join(format!("p{partition}")))
            .unwrap();
    }
    let b = run(&brokers, &stores, &b_dir, 2, |p| ends[p as usize]).await;
    let state = dump(&b);
    assert_eq!(
        state,
        workload.expected().into_iter().collect(),
        "restored + replayed state is exact"
    );

    // B checkpoints under token 2; A, paused all along, wakes up and tries to publish: refused.
    checkpoint_all(&b, &shared, root.path(), 2);
    let snapshot = root.path().join("late-a");
    a[1].snapshot_to(&snapshot).unwrap();
    match shared.upload(TOPIC, 1, &snapshot, ends[1], 1) {
        Err(ProcessorError::StaleOwner {
            token: 1,
            highest: 2,
            ..
        }) => {}
        other => panic!("a stale owner's checkpoint was accepted: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_and_dead_letters_reach_their_topics_and_never_stop_the_partition() {
    integration_tests::init_tracing();
    let broker = TestBroker::start(TOPIC, PARTITIONS).await;
    broker.create_topic("orders.out", 1).await;
    broker.create_topic("orders.dlq", 1).await;
    let brokers = broker.bootstrap_servers();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let malformed = |i: u64| i % 50 == 7;
    for i in 0..1_000u64 {
        let value = if malformed(i) {
            format!("{i}.5 EUR")
        } else {
            i.to_string()
        };
        let key = format!("k{}", i % 10);
        producer
            .send(
                FutureRecord::to(TOPIC)
                    .partition(0)
                    .key(&key)
                    .payload(&value),
                std::time::Duration::from_secs(5),
            )
            .await
            .unwrap();
    }
    let root = tempfile::tempdir().unwrap();
    let stores = RocksDbStores::new(8 << 20, 4 << 20);
    let store: Arc<dyn PartitionStore> = Arc::new(stores.open(0, &root.path().join("p0")).unwrap());
    let mut processor = PartitionProcessor::resume(
        store,
        Arc::new(KeyedAggregation),
        1,
        CancellationToken::new(),
    )
    .unwrap();
    let consumer = partition_consumer(&KafkaSettings::new(&brokers), "test", TOPIC, 0, 0).unwrap();
    let sink = OutputSink::new(
        &KafkaSettings::new(&brokers),
        Some("orders.out"),
        Some("orders.dlq"),
    )
    .unwrap();
    let stats = consume_partition(
        &consumer,
        &mut processor,
        CommitPolicy::new(128, std::time::Duration::from_millis(100)),
        Some(1_000),
        Outputs::AtLeastOnce(&sink),
        None,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!((stats.applied, stats.dead_letters), (980, 20));
    assert_eq!(
        processor.next_offset(),
        1_000,
        "dead letters do not stop the partition"
    );
    // Nothing crashed, so at-least-once delivered exactly once.
    assert_eq!(
        high_watermark(&KafkaSettings::new(&brokers), "orders.out", 0).unwrap(),
        980
    );
    assert_eq!(
        high_watermark(&KafkaSettings::new(&brokers), "orders.dlq", 0).unwrap(),
        20
    );

    let dlq =
        partition_consumer(&KafkaSettings::new(&brokers), "test", "orders.dlq", 0, 0).unwrap();
    let mut keys = Vec::new();
    for _ in 0..20 {
        let message = dlq.recv().await.unwrap();
        keys.push(String::from_utf8(message.key().unwrap().to_vec()).unwrap());
        assert!(String::from_utf8_lossy(message.payload().unwrap()).contains("EUR"));
    }
    let expected: Vec<String> = (0..1_000u64)
        .filter(|i| malformed(*i))
        .map(|i| format!("0:{i}"))
        .collect();
    assert_eq!(
        keys, expected,
        "each dead letter names its partition and offset, in order"
    );
}

/// Logs the headers of each record it applies, as `name=value` lines; says whether it reads them.
struct HeaderLog {
    reads: bool,
    seen: std::sync::Mutex<Vec<Vec<String>>>,
}

impl Operator for HeaderLog {
    fn apply(
        &self,
        record: &processor::operator::Record<'_>,
        _state: &mut processor::store::PartitionState,
        _out: &mut processor::operator::Emitter<'_>,
    ) -> processor::ProcessorResult<processor::operator::Outcome> {
        let headers = record
            .headers
            .iter()
            .map(|h| {
                let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                format!("{}={value}", h.name)
            })
            .collect();
        self.seen.lock().unwrap().push(headers);
        Ok(processor::operator::Outcome::Applied)
    }

    fn reads_headers(&self) -> bool {
        self.reads
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_reach_an_operator_that_reads_them_and_only_that_one() {
    use rdkafka::message::{Header, OwnedHeaders};
    integration_tests::init_tracing();
    let broker = TestBroker::start(TOPIC, 1).await;
    let brokers = broker.bootstrap_servers();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let with_headers = OwnedHeaders::new()
        .insert(Header {
            key: "trace",
            value: Some("abc"),
        })
        .insert(Header {
            key: "empty",
            value: None::<&str>,
        });
    for headers in [Some(with_headers), None] {
        let mut record = FutureRecord::to(TOPIC).key("k").payload("1");
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        producer
            .send(record, std::time::Duration::from_secs(10))
            .await
            .unwrap();
    }
    for reads in [true, false] {
        let operator = Arc::new(HeaderLog {
            reads,
            seen: Default::default(),
        });
        let store: Arc<dyn PartitionStore> =
            Arc::new(processor::store::memory::InMemoryPartitionStore::new(0));
        let mut processor =
            PartitionProcessor::resume(store, operator.clone(), 1, CancellationToken::new())
                .unwrap();
        let consumer =
            partition_consumer(&KafkaSettings::new(&brokers), "test", TOPIC, 0, 0).unwrap();
        consume_partition(
            &consumer,
            &mut processor,
            CommitPolicy::new(500, std::time::Duration::from_millis(100)),
            Some(2),
            Outputs::Discard,
            None,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        let seen = operator.seen.lock().unwrap().clone();
        let expected: Vec<Vec<String>> = if reads {
            vec![vec!["trace=abc".into(), "empty=".into()], vec![]]
        } else {
            vec![vec![], vec![]]
        };
        assert_eq!(seen, expected, "reads_headers() = {reads}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_producer_queue_is_delivered_whole() {
    integration_tests::init_tracing();
    let broker = TestBroker::start(TOPIC, 1).await;
    broker.create_topic("orders.out", 1).await;
    broker.create_topic("orders.dlq", 1).await;
    let brokers = broker.bootstrap_servers();
    // A producer queue of 50 records, a batch of 300 outputs and 20 dead letters.
    let kafka = KafkaSettings::new(&brokers)
        .with_property("queue.buffering.max.messages", "50")
        .unwrap();
    let sink = OutputSink::new(&kafka, Some("orders.out"), Some("orders.dlq")).unwrap();
    let mut report = processor::partition::BatchReport::default();
    report.outputs = (0..300)
        .map(|i| (format!("k{i}").into_bytes(), i.to_string().into_bytes()))
        .collect();
    report.dead_letters = (0..20).map(|i| (i, "malformed".to_owned())).collect();
    sink.deliver(0, &report).await.unwrap();
    let outputs = support::read_committed(&brokers, "orders.out");
    assert_eq!(outputs, report.outputs, "every output, in order");
    assert_eq!(support::read_committed(&brokers, "orders.dlq").len(), 20);
}
