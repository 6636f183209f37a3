//! The input side: a consumer of one owned partition positioned with `assign()`, the consume loop that
//! turns its records into atomic batches, and broker metadata (watermarks).
//!
//! Partitions are consumed with `assign()` from the offset stored with the partition's state — never from
//! Kafka's committed group offset — so the fleet decides ownership itself (through the `state` crate) and
//! state stays exactly-once.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::error::{ProcessorError, ProcessorResult};
use crate::kafka_settings::KafkaSettings;
use crate::operator::Record;
use crate::partition::{PartitionProcessor, PartitionStats};
use crate::sink::{OutputSink, TransactionalSink};

/// The end offset (high watermark) of a partition.
///
/// # Errors
/// A Kafka error.
pub fn high_watermark(kafka: &KafkaSettings, topic: &str, partition: i32) -> ProcessorResult<i64> {
    watermarks(kafka, topic, partition).map(|(_, high)| high)
}

/// How many partitions `topic` has, from the brokers' metadata — never a guess.
///
/// # Errors
/// [`ProcessorError::InvalidInput`] (`topic`) when the topic does not exist; a Kafka error when the
/// brokers cannot be reached.
pub fn partition_count(kafka: &KafkaSettings, topic: &str) -> ProcessorResult<i32> {
    let consumer: BaseConsumer<LastBrokerError> = kafka
        .client_config()
        .create_with_context(LastBrokerError::default())
        .map_err(kafka.client_error("create a consumer"))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|err| match refusal_of(&consumer) {
            // The request only says "transport failure": the reason is in librdkafka's error callback.
            Some(reason) => ProcessorError::BrokersRefused {
                brokers: kafka.brokers().to_owned(),
                reason: kafka.redact(&reason),
            },
            None => ProcessorError::kafka("fetch the topic's metadata")(err),
        })?;
    let missing = || ProcessorError::InvalidInput {
        what: "topic",
        reason: format!(
            "`{topic}` does not exist on {}: create it first (the processor never creates topics)",
            kafka.brokers()
        ),
    };
    let found = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(missing)?;
    match found.error() {
        None if !found.partitions().is_empty() => {
            Ok(i32::try_from(found.partitions().len()).unwrap_or(i32::MAX))
        }
        None => Err(missing()),
        Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {
            Err(missing())
        }
        Some(code) => Err(ProcessorError::Kafka {
            operation: "read the topic's metadata",
            source: format!("{code:?}").into(),
        }),
    }
}

/// A client context that remembers why the brokers refused the client (a failed SASL login, a TLS
/// handshake failure): librdkafka says so only through its error callback, while the request itself
/// fails with a bare "transport failure".
#[derive(Default)]
struct LastBrokerError(std::sync::Mutex<Option<String>>);

impl LastBrokerError {
    /// The last authentication or TLS failure reported, if any.
    fn refusal(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl rdkafka::ClientContext for LastBrokerError {
    /// librdkafka's own lines about this short-lived probe go to debug: what matters of them is in the
    /// one error the probe returns.
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        tracing::debug!(?level, facility, message, "librdkafka (probe)");
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let refused = matches!(
            error.rdkafka_error_code(),
            Some(
                rdkafka::types::RDKafkaErrorCode::Authentication
                    | rdkafka::types::RDKafkaErrorCode::SaslAuthenticationFailed
                    | rdkafka::types::RDKafkaErrorCode::SSL
            )
        ) || reason.contains("SASL authentication")
            || reason.contains("SSL handshake");
        if refused {
            *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reason.to_owned());
        }
    }
}

impl rdkafka::consumer::ConsumerContext for LastBrokerError {}

/// Why the brokers refused `consumer`, after serving the events librdkafka queued (its error callback
/// runs only when the client is polled).
fn refusal_of(consumer: &BaseConsumer<LastBrokerError>) -> Option<String> {
    for _ in 0..5 {
        if let Some(reason) = consumer.context().refusal() {
            return Some(reason);
        }
        let _ = consumer.poll(Duration::from_millis(20));
    }
    consumer.context().refusal()
}

/// The log start and end (low and high watermarks) of a partition.
///
/// # Errors
/// A Kafka error.
pub fn watermarks(
    kafka: &KafkaSettings,
    topic: &str,
    partition: i32,
) -> ProcessorResult<(i64, i64)> {
    let consumer: BaseConsumer = kafka
        .client_config()
        .create()
        .map_err(kafka.client_error("create a consumer"))?;
    consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .map_err(ProcessorError::kafka("fetch watermarks"))
}

/// A consumer of exactly one partition, positioned at `from_offset` with `assign()`.
///
/// # Errors
/// A Kafka error.
pub fn partition_consumer(
    kafka: &KafkaSettings,
    group: &str,
    topic: &str,
    partition: i32,
    from_offset: i64,
) -> ProcessorResult<StreamConsumer> {
    let consumer: StreamConsumer = kafka
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        // Never jump silently when the position leaves the log (retention overtook a lagging partition):
        // the consume loop gets an error and the partition stops (see `MissingOffsets`).
        .set("auto.offset.reset", "error")
        // Bounded prefetch per partition: a partition that processes slowly stops fetching.
        .set("queued.max.messages.kbytes", "8192")
        .create()
        .map_err(kafka.client_error("create a consumer"))?;
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition, Offset::Offset(from_offset))
        .map_err(ProcessorError::kafka("build an assignment"))?;
    consumer
        .assign(&assignment)
        .map_err(ProcessorError::kafka("assign a partition"))?;
    Ok(consumer)
}

/// Where each batch's outputs and dead letters go before the batch's state is written.
#[derive(Clone, Copy)]
pub enum Outputs<'a> {
    /// Nowhere: no output topic, or a replay whose outputs are already committed.
    Discard,
    /// Delivered and acknowledged first (at-least-once).
    AtLeastOnce(&'a OutputSink),
    /// Published with the batch's next input offset in one transaction, committed first (exactly-once);
    /// the group metadata is the partition consumer's.
    Transactional(&'a TransactionalSink, &'a Arc<ConsumerGroupMetadata>),
}

impl std::fmt::Debug for Outputs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outputs::Discard => f.write_str("Discard"),
            Outputs::AtLeastOnce(sink) => f.debug_tuple("AtLeastOnce").field(sink).finish(),
            Outputs::Transactional(sink, _) => f.debug_tuple("Transactional").field(sink).finish(),
        }
    }
}

/// Consumes one partition into `processor` in batches of up to `batch_size` records until `stop` fires
/// (or, with `until`, until the processor reaches exactly that offset: records from `until` on are left
/// to the consumer's next reader). Each batch is one atomic write of state
/// and next offset, made only after its outputs went where `outputs` says. With
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
    outputs: Outputs<'_>,
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
                    Ok(Ok(message)) => {
                        if let Some(end) = until.filter(|end| message.offset() >= *end) {
                            // Past the end of this run: leave it (and what follows) to the next reader
                            // of this consumer, which must start exactly at `end`.
                            consumer
                                .seek(
                                    message.topic(),
                                    message.partition(),
                                    Offset::Offset(end),
                                    Duration::from_secs(10),
                                )
                                .map_err(ProcessorError::kafka("seek back to the end of a replay"))?;
                            break;
                        }
                        messages.push(message.detach());
                    }
                    Ok(Err(err)) => return Err(ProcessorError::kafka("consume")(err)),
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
            Some(permits) => {
                Some(
                    permits
                        .acquire()
                        .await
                        .map_err(|_| ProcessorError::ShuttingDown {
                            what: "wait for a processing permit",
                        })?,
                )
            }
            None => None,
        };
        let prepared = processor.prepare(&records)?;
        for (offset, reason) in &prepared.report().dead_letters {
            tracing::warn!(partition = processor.partition(), offset, reason = %reason, "dead letter");
        }
        match outputs {
            Outputs::Discard => {}
            Outputs::AtLeastOnce(sink) => {
                sink.deliver(processor.partition(), prepared.report())
                    .await?;
            }
            Outputs::Transactional(sink, group) => {
                if let Some(next_offset) = prepared.next_offset() {
                    sink.commit_batch(prepared.report(), next_offset, group)
                        .await?;
                }
            }
        }
        processor.commit(prepared)?;
    }
}

/// The offset of `partition` of `topic` committed to `group` — by the exactly-once path, the end of the
/// input whose outputs are committed; `None` when nothing was committed. Read with `read_committed`
/// semantics (librdkafka asks the coordinator for stable offsets), so an open transaction's offsets
/// never count. Blocking.
///
/// # Errors
/// A Kafka error.
pub fn committed_offset(
    kafka: &KafkaSettings,
    group: &str,
    topic: &str,
    partition: i32,
) -> ProcessorResult<Option<i64>> {
    let consumer: BaseConsumer = kafka
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(kafka.client_error("create a consumer"))?;
    let mut wanted = TopicPartitionList::new();
    wanted.add_partition(topic, partition);
    let committed = consumer
        .committed_offsets(wanted, Duration::from_secs(30))
        .map_err(ProcessorError::kafka("read the group's committed offset"))?;
    Ok(committed
        .find_partition(topic, partition)
        .and_then(|element| match element.offset() {
            Offset::Offset(offset) => Some(offset),
            _ => None,
        }))
}

/// Whether the brokers are librdkafka's mock cluster (the embedded development broker), by the cluster
/// id it reports (`mockCluster…`). It accepts transactional producers but neither keeps the offsets
/// committed in a transaction nor hides aborted records, so exactly-once outputs cannot work on it.
/// Blocking.
///
/// # Errors
/// A Kafka error when the brokers cannot be asked.
pub fn is_mock_cluster(kafka: &KafkaSettings) -> ProcessorResult<bool> {
    let consumer: BaseConsumer = kafka
        .client_config()
        .create()
        .map_err(kafka.client_error("create a consumer"))?;
    let id = consumer
        .client()
        .fetch_cluster_id(Duration::from_secs(10))
        .ok_or_else(|| ProcessorError::Kafka {
            operation: "read the cluster id",
            source: format!("no answer from {}", kafka.brokers()).into(),
        })?;
    Ok(id.starts_with("mockCluster"))
}
