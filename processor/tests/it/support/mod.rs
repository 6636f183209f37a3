//! The broker a processor suite runs on: librdkafka's in-process mock cluster by default (fast), or a
//! real Apache Kafka node when `PROCESSOR_TEST_BROKER=kafka` (`scripts/test.sh` runs the suites both
//! ways). Some scenarios need what only a real broker does (deleting records, adding partitions): they
//! ask for [`TestBroker::kafka`] whatever the variable says.

#![allow(dead_code, clippy::unwrap_used)] // Each test binary uses part of it.

use integration_tests::KafkaCluster;
use processor::dev::{DevBroker, admin};

/// A broker with the suite's topic.
pub enum TestBroker {
    /// librdkafka's mock cluster.
    Mock(DevBroker),
    /// A real single-node Apache Kafka (KRaft).
    Kafka(KafkaCluster),
}

impl TestBroker {
    /// The suite's broker (see the module) with `topic` of `partitions` partitions.
    pub async fn start(topic: &str, partitions: i32) -> Self {
        match std::env::var("PROCESSOR_TEST_BROKER").as_deref() {
            Ok("kafka") => Self::kafka(topic, partitions).await,
            Ok("mock") | Err(_) => TestBroker::Mock(DevBroker::start(topic, partitions).unwrap()),
            Ok(other) => panic!("PROCESSOR_TEST_BROKER={other}: use `mock` or `kafka`"),
        }
    }

    /// A real single-node Apache Kafka with `topic` of `partitions` partitions.
    pub async fn kafka(topic: &str, partitions: i32) -> Self {
        let cluster = tokio::task::spawn_blocking(KafkaCluster::single)
            .await
            .unwrap();
        let broker = TestBroker::Kafka(cluster);
        broker.create_topic(topic, partitions).await;
        broker
    }

    /// The bootstrap servers.
    pub fn bootstrap_servers(&self) -> String {
        match self {
            TestBroker::Mock(mock) => mock.bootstrap_servers(),
            TestBroker::Kafka(cluster) => cluster.bootstrap_servers(),
        }
    }

    /// Creates another topic (an output or dead-letter topic, say).
    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        match self {
            TestBroker::Mock(mock) => mock.create_topic(topic, partitions).unwrap(),
            TestBroker::Kafka(cluster) => {
                admin::create_topic(&cluster.bootstrap_servers(), topic, partitions, 1, &[])
                    .await
                    .unwrap();
            }
        }
    }

    /// Whether this is a real broker.
    pub fn is_real(&self) -> bool {
        matches!(self, TestBroker::Kafka(_))
    }
}

/// Every record of `topic` a `read_committed` consumer sees, in partition then offset order, as
/// (key, value) — read until each partition's last stable offset.
pub fn read_committed(brokers: &str, topic: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    use std::time::{Duration, Instant};

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "test-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len();
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, i32::try_from(p).unwrap(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut by_partition: Vec<Vec<(Vec<u8>, Vec<u8>)>> = vec![Vec::new(); partitions];
    let mut at_end = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while at_end.len() < partitions {
        assert!(
            Instant::now() < deadline,
            "reading {topic} did not reach its end"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                at_end.remove(&message.partition());
                by_partition[usize::try_from(message.partition()).unwrap()].push((
                    message.key().unwrap_or_default().to_vec(),
                    message.payload().unwrap_or_default().to_vec(),
                ));
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(err)) => panic!("reading {topic}: {err}"),
            None => {}
        }
    }
    by_partition.into_iter().flatten().collect()
}

/// A running instance: its task, its stop and its status.
pub type Running = (
    tokio::task::JoinHandle<processor::ProcessorResult<()>>,
    tokio_util::sync::CancellationToken,
    tokio::sync::watch::Receiver<processor::InstanceStatus>,
);

/// Starts an instance of `config` over `services`.
pub fn start_instance(services: processor::Services, config: processor::InstanceConfig) -> Running {
    let instance = processor::Instance::new(config, services).unwrap();
    let status = instance.status();
    let stop = tokio_util::sync::CancellationToken::new();
    (tokio::spawn(instance.run(stop.clone())), stop, status)
}

/// Waits until `done` holds for the instance's status (failing with `what` and the status after
/// `within`); returns that status.
pub async fn wait_for(
    status: &tokio::sync::watch::Receiver<processor::InstanceStatus>,
    what: &str,
    within: std::time::Duration,
    done: impl Fn(&processor::InstanceStatus) -> bool,
) -> processor::InstanceStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        let now = status.borrow().clone();
        if done(&now) {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {now:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
