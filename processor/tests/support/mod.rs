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
