//! librdkafka's mock cluster as a development broker: a real Kafka-protocol broker on loopback ports,
//! in process, for the demo, the fast tests and `processor dev-broker`. Never a production path.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::error::{ProcessorError, ProcessorResult};

/// librdkafka's in-process mock cluster: a real Kafka-protocol broker on loopback ports. No transactions,
/// and only about 5 MiB / 100 000 message sets per partition.
pub struct DevBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl std::fmt::Debug for DevBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevBroker")
            .field("bootstrap", &self.cluster.bootstrap_servers())
            .finish()
    }
}

impl DevBroker {
    /// Starts a one-broker mock cluster with `topic` of `partitions` partitions.
    ///
    /// # Errors
    /// [`ProcessorError::InvalidInput`] for a bad topic or partition count; a Kafka error.
    pub fn start(topic: &str, partitions: i32) -> ProcessorResult<Self> {
        let broker = DevBroker {
            cluster: MockCluster::new(1)
                .map_err(ProcessorError::kafka("start the mock cluster"))?,
        };
        broker.create_topic(topic, partitions)?;
        Ok(broker)
    }

    /// Creates another topic (an output or dead-letter topic, say).
    ///
    /// # Errors
    /// [`ProcessorError::InvalidInput`] for a bad partition count; a Kafka error.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> ProcessorResult<()> {
        if partitions < 1 {
            return Err(ProcessorError::InvalidInput {
                what: "partitions",
                reason: format!("{partitions} must be at least 1"),
            });
        }
        self.cluster
            .create_topic(topic, partitions, 1)
            .map_err(ProcessorError::kafka("create a topic"))
    }

    /// The bootstrap address (`host:port`).
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}
