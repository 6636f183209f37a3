//! Kafka plumbing: librdkafka's mock cluster as a development broker, a deterministic workload generator
//! with its exact expected result, and the consume loop of one owned partition.
//!
//! Partitions are consumed with `assign()` from the offset stored with the partition's state — never from
//! Kafka's committed group offset — so the fleet decides ownership itself (through the `state` crate) and
//! state stays exactly-once.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::error::{ProcessorError, ProcessorResult};
use crate::operator::{Aggregate, Record};
use crate::partition::{BatchReport, PartitionProcessor, PartitionStats};

fn kafka_error(what: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> ProcessorError {
    move |err| ProcessorError::Kafka {
        operation: what,
        source: Box::new(err),
    }
}

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
            cluster: MockCluster::new(1).map_err(kafka_error("start the mock cluster"))?,
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
            .map_err(kafka_error("create a topic"))
    }

    /// The bootstrap address (`host:port`).
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}

/// A deterministic workload: record `i` has key `entity-{k}` and a decimal amount, both derived from
/// `seed` and `i`; every key lives in one partition, so its records have a total order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// How many records.
    pub records: u64,
    /// How many distinct keys.
    pub keys: u64,
    /// The seed.
    pub seed: u64,
    /// The topic's partition count.
    pub partitions: i32,
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Workload {
    /// Record `i`: (partition, key, value).
    pub fn record(&self, i: u64) -> (i32, String, String) {
        let key_index = mix(self.seed ^ i.wrapping_mul(0x5851_f42d_4c95_7f2d)) % self.keys.max(1);
        let amount = (mix(self.seed.wrapping_add(i)) % 2_001) as i64 - 1_000;
        let partition = (mix(key_index ^ 0xabcd) % self.partitions.max(1) as u64) as i32;
        (partition, format!("entity-{key_index}"), amount.to_string())
    }

    /// The exact final state: per key, the aggregate of its amounts in production order.
    pub fn expected(&self) -> BTreeMap<String, Aggregate> {
        let mut state: BTreeMap<String, Aggregate> = BTreeMap::new();
        for i in 0..self.records {
            let (_, key, value) = self.record(i);
            if let Ok(amount) = value.parse::<i64>() {
                let entry = state.entry(key).or_default();
                *entry = entry.with_amount(amount);
            }
        }
        state
    }

    /// Produces the workload to `topic`, in order (idempotent producer: no reordering or duplicates on
    /// retries).
    ///
    /// # Errors
    /// A Kafka error.
    pub async fn produce(&self, brokers: &str, topic: &str) -> ProcessorResult<()> {
        self.produce_range(brokers, topic, 0..self.records).await
    }

    /// Produces records `range` of the workload (for producing it in parts), in order.
    ///
    /// # Errors
    /// A Kafka error.
    pub async fn produce_range(
        &self,
        brokers: &str,
        topic: &str,
        range: std::ops::Range<u64>,
    ) -> ProcessorResult<()> {
        let producer = idempotent_producer(brokers)?;
        let mut pending = Vec::with_capacity(1024);
        for i in range {
            let (partition, key, value) = self.record(i);
            let record = FutureRecord::to(topic)
                .partition(partition)
                .key(&key)
                .payload(&value);
            let delivery = producer
                .send_result(record)
                .map_err(|(err, _)| kafka_error("queue a record")(err))?;
            pending.push(delivery);
            if pending.len() >= 1024 {
                for delivery in pending.drain(..) {
                    await_delivery(delivery).await?;
                }
            }
        }
        for delivery in pending {
            await_delivery(delivery).await?;
        }
        Ok(())
    }
}

/// A producer that neither reorders nor duplicates on retries (idempotence), batching for 5 ms.
fn idempotent_producer(brokers: &str) -> ProcessorResult<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "15000")
        .create()
        .map_err(kafka_error("create a producer"))
}

async fn await_delivery(delivery: rdkafka::producer::DeliveryFuture) -> ProcessorResult<()> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((err, _))) => Err(kafka_error("deliver a record")(err)),
        Err(_) => Err(ProcessorError::store(
            -1,
            "deliver a record",
            "producer dropped",
        )),
    }
}

/// The end offset (high watermark) of a partition.
///
/// # Errors
/// A Kafka error.
pub fn high_watermark(brokers: &str, topic: &str, partition: i32) -> ProcessorResult<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(kafka_error("create a consumer"))?;
    consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .map(|(_, high)| high)
        .map_err(kafka_error("fetch watermarks"))
}

/// A consumer of exactly one partition, positioned at `from_offset` with `assign()`.
///
/// # Errors
/// A Kafka error.
pub fn partition_consumer(
    brokers: &str,
    group: &str,
    topic: &str,
    partition: i32,
    from_offset: i64,
) -> ProcessorResult<StreamConsumer> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        // Bounded prefetch per partition: a partition that processes slowly stops fetching.
        .set("queued.max.messages.kbytes", "8192")
        .create()
        .map_err(kafka_error("create a consumer"))?;
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition, Offset::Offset(from_offset))
        .map_err(kafka_error("build an assignment"))?;
    consumer
        .assign(&assignment)
        .map_err(kafka_error("assign a partition"))?;
    Ok(consumer)
}

/// Where a partition's outputs go: updated aggregates to the output topic and malformed records to the
/// dead-letter topic, each sent (and acknowledged) *before* the batch that produced them commits, so
/// nothing is lost downstream: a crash in between replays and resends (at-least-once). The consume loop
/// logs dead letters whether or not a topic is set.
pub struct OutputSink {
    producer: FutureProducer,
    output_topic: Option<String>,
    dead_letter_topic: Option<String>,
}

impl std::fmt::Debug for OutputSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputSink")
            .field("output_topic", &self.output_topic)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .finish()
    }
}

impl OutputSink {
    /// A sink producing to `brokers` (idempotent producer).
    ///
    /// # Errors
    /// A Kafka error creating the producer.
    pub fn new(
        brokers: &str,
        output_topic: Option<&str>,
        dead_letter_topic: Option<&str>,
    ) -> ProcessorResult<Self> {
        let producer = idempotent_producer(brokers)?;
        Ok(OutputSink {
            producer,
            output_topic: output_topic.map(str::to_owned),
            dead_letter_topic: dead_letter_topic.map(str::to_owned),
        })
    }

    /// Sends a batch's outputs and dead letters and waits until the broker has acknowledged them all.
    /// Dead letters carry the source partition and offset in their key (`{partition}:{offset}`) and the
    /// reason as the payload.
    ///
    /// # Errors
    /// A Kafka error; the batch must not be committed then.
    pub async fn deliver(&self, partition: i32, report: &BatchReport) -> ProcessorResult<()> {
        let mut pending = Vec::new();
        if let Some(topic) = &self.output_topic {
            for (key, value) in &report.outputs {
                let record = FutureRecord::to(topic).key(key).payload(value);
                pending.push(
                    self.producer
                        .send_result(record)
                        .map_err(|(err, _)| kafka_error("queue an output")(err))?,
                );
            }
        }
        if let Some(topic) = &self.dead_letter_topic {
            for (offset, reason) in &report.dead_letters {
                let key = format!("{partition}:{offset}");
                let record = FutureRecord::to(topic).key(&key).payload(reason);
                pending.push(
                    self.producer
                        .send_result(record)
                        .map_err(|(err, _)| kafka_error("queue a dead letter")(err))?,
                );
            }
        }
        for delivery in pending {
            await_delivery(delivery).await?;
        }
        Ok(())
    }
}

/// Consumes one partition into `processor` in batches of up to `batch_size` records until `stop` fires
/// (or, with `until`, until the processor reaches that offset). Each batch is one atomic write of state
/// and next offset; with a `sink`, its outputs and dead letters are delivered before it is written. With
/// `permits`, each batch is processed under one permit: an instance bounds how many of its partitions
/// process at once, and a partition waiting for a permit stops fetching once librdkafka's bounded
/// prefetch queue is full (backpressure instead of unbounded buffering).
///
/// # Errors
/// A Kafka or store error, or [`ProcessorError::StaleOwner`] once ownership is lost.
///
/// # Cancel safety
/// Dropping the future loses only the batch being gathered: nothing of it was written.
pub async fn consume_partition(
    consumer: &StreamConsumer,
    processor: &mut PartitionProcessor,
    batch_size: usize,
    until: Option<i64>,
    sink: Option<&OutputSink>,
    permits: Option<&tokio::sync::Semaphore>,
    stop: &CancellationToken,
) -> ProcessorResult<PartitionStats> {
    let linger = Duration::from_millis(20);
    loop {
        if until.is_some_and(|end| processor.next_offset() >= end) || stop.is_cancelled() {
            return Ok(processor.stats());
        }
        let mut messages: Vec<OwnedMessage> = Vec::with_capacity(batch_size);
        while messages.len() < batch_size {
            let wait = if messages.is_empty() {
                Duration::from_millis(200)
            } else {
                linger
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                received = tokio::time::timeout(wait, consumer.recv()) => match received {
                    Ok(Ok(message)) => messages.push(message.detach()),
                    Ok(Err(err)) => return Err(kafka_error("consume")(err)),
                    Err(_) => break,
                },
            }
        }
        if messages.is_empty() {
            continue;
        }
        let records: Vec<Record<'_>> = messages
            .iter()
            .map(|m| Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key(),
                value: m.payload(),
            })
            .collect();
        let _permit = match permits {
            Some(permits) => Some(permits.acquire().await.map_err(|_| {
                ProcessorError::store(processor.partition(), "wait for a permit", "closed")
            })?),
            None => None,
        };
        let prepared = processor.prepare(&records)?;
        for (offset, reason) in &prepared.report().dead_letters {
            tracing::warn!(partition = processor.partition(), offset, reason = %reason, "dead letter");
        }
        if let Some(sink) = sink {
            sink.deliver(processor.partition(), prepared.report())
                .await?;
        }
        processor.commit(prepared)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_are_deterministic_and_keys_stay_in_one_partition() {
        let w = Workload {
            records: 1_000,
            keys: 20,
            seed: 7,
            partitions: 4,
        };
        assert_eq!(w.record(17), w.record(17));
        let mut homes = std::collections::HashMap::new();
        for i in 0..w.records {
            let (partition, key, _) = w.record(i);
            assert_eq!(*homes.entry(key).or_insert(partition), partition);
        }
        let expected = w.expected();
        assert!(expected.len() <= 20);
        assert_eq!(expected.values().map(|a| a.count).sum::<u64>(), 1_000);
        assert_ne!(w.expected(), Workload { seed: 8, ..w }.expected());
    }
}
