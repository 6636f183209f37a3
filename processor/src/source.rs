//! The input side, reading Kafka only: a consumer of one owned partition positioned with `assign()`, the
//! fetch that takes its ready messages (and their headers) for the partition's consume loop
//! ([`crate::task`]), the group's committed offset, and broker metadata (watermarks, partition counts).
//!
//! Partitions are consumed with `assign()` from the offset stored with the partition's state — never from
//! Kafka's committed group offset — so the fleet decides ownership itself (through the `state` crate) and
//! state stays exactly-once.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::error::{ProcessorError, ProcessorResult};
use crate::kafka_settings::KafkaSettings;
use crate::operator::{Header, Record};

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

/// A long-lived client for the log bounds (watermarks) of partitions. Creating a librdkafka client
/// connects to the brokers and reads their metadata — 12–26 ms of a partition takeover on a local broker,
/// measured — so an instance keeps one and reuses it. A request that fails drops the client: the next
/// one connects afresh (a broker that went away, a changed cluster).
pub struct MetadataClient {
    kafka: KafkaSettings,
    client: std::sync::Mutex<Option<Arc<BaseConsumer>>>,
}

impl MetadataClient {
    /// A client for the brokers of `kafka`; it connects at its first request.
    pub fn new(kafka: KafkaSettings) -> Self {
        MetadataClient {
            kafka,
            client: std::sync::Mutex::new(None),
        }
    }

    /// The log start and end (low and high watermarks) of `partition`. Blocking: call it from a
    /// blocking thread.
    ///
    /// # Errors
    /// A Kafka error (creating the client, or the request).
    pub fn watermarks(
        &self,
        topic: &str,
        partition: i32,
        timeout: Duration,
    ) -> ProcessorResult<(i64, i64)> {
        let client = self.client()?;
        client
            .fetch_watermarks(topic, partition, timeout)
            .inspect_err(|_| self.forget(&client))
            .map_err(ProcessorError::kafka("fetch watermarks"))
    }

    /// Connects and reads `topic`'s metadata (its partitions' leaders), so that the first
    /// [`watermarks`](Self::watermarks) is one round trip. Blocking; a failure only means the first
    /// request connects itself.
    pub fn warm_up(&self, topic: &str) {
        if let Ok(client) = self.client()
            && client
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .is_err()
        {
            self.forget(&client);
        }
    }

    fn client(&self) -> ProcessorResult<Arc<BaseConsumer>> {
        let mut slot = self
            .client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(client) = slot.as_ref() {
            return Ok(Arc::clone(client));
        }
        let client: Arc<BaseConsumer> = Arc::new(
            self.kafka
                .client_config()
                .create()
                .map_err(self.kafka.client_error("create a consumer"))?,
        );
        *slot = Some(Arc::clone(&client));
        Ok(client)
    }

    /// Drops `failed` if it is still the shared client.
    fn forget(&self, failed: &Arc<BaseConsumer>) {
        let mut slot = self
            .client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot
            .as_ref()
            .is_some_and(|client| Arc::ptr_eq(client, failed))
        {
            *slot = None;
        }
    }
}

impl std::fmt::Debug for MetadataClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataClient").finish_non_exhaustive()
    }
}

/// How a partition's consumer prefetches, unless the instance's Kafka properties say otherwise.
///
/// - At most 8 MiB queued per partition: a partition that processes slowly stops fetching
///   (librdkafka's default is 64 MiB, and the instance has a consumer per partition).
/// - Once the queue is that full (or holds `queued.min.messages`), librdkafka checks again after
///   `fetch.queue.backoff.ms` — 1 s by default, so a partition that drained its queue in 0.3 s then
///   waited up to 0.7 s with nothing to do. 10 ms keeps the queue topped up; the check is a
///   comparison on the broker thread.
pub const PREFETCH: &[(&str, &str)] = &[
    ("queued.max.messages.kbytes", "8192"),
    ("fetch.queue.backoff.ms", "10"),
];

/// A consumer of exactly one partition, positioned at `from_offset` with `assign()`, prefetching as
/// [`PREFETCH`] says unless the instance's properties set those keys.
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
    let consumer: StreamConsumer = partition_consumer_config(kafka, group)
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

/// The configuration of a partition's consumer: [`PREFETCH`] under the instance's properties, under
/// what the processor's guarantees need.
fn partition_consumer_config(kafka: &KafkaSettings, group: &str) -> rdkafka::ClientConfig {
    let mut config = kafka.client_config_over(PREFETCH);
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        // Never jump silently when the position leaves the log (retention overtook a lagging partition):
        // the consume loop gets an error and the partition stops (see `MissingOffsets`).
        .set("auto.offset.reset", "error");
    config
}

/// Most messages taken from the consumer's queue before they are applied.
pub(crate) const FETCH_BATCH: usize = 1_000;

/// One fetch into `messages` (empty): the messages ready in the consumer's queue, waiting up to `wait`
/// for the first. Returns whether the end offset `until` was reached (the consumer is then positioned
/// back at it).
pub(crate) async fn fetch<'c>(
    stream: &mut rdkafka::consumer::MessageStream<'c, rdkafka::consumer::DefaultConsumerContext>,
    consumer: &StreamConsumer,
    wait: Duration,
    until: Option<i64>,
    stop: &CancellationToken,
    messages: &mut Vec<rdkafka::message::BorrowedMessage<'c>>,
) -> ProcessorResult<bool> {
    use futures::{FutureExt, StreamExt};
    let first = tokio::select! {
        biased;
        _ = stop.cancelled() => return Ok(false),
        received = tokio::time::timeout(wait, stream.next()) => match received {
            Ok(message) => message,
            Err(_) => return Ok(false),
        },
    };
    let mut next = first;
    loop {
        let Some(received) = next else {
            return Err(ProcessorError::ShuttingDown {
                what: "consume (the consumer's stream ended)",
            });
        };
        let message = received.map_err(ProcessorError::kafka("consume"))?;
        if let Some(end) = until.filter(|end| message.offset() >= *end) {
            // Past the end of this run: leave it (and what follows) to the next reader of this
            // consumer, which must start exactly at `end`.
            consumer
                .seek(
                    message.topic(),
                    message.partition(),
                    Offset::Offset(end),
                    Duration::from_secs(10),
                )
                .map_err(ProcessorError::kafka("seek back to the end of a replay"))?;
            return Ok(true);
        }
        messages.push(message);
        if messages.len() >= FETCH_BATCH {
            return Ok(false);
        }
        // What is already queued, without waiting (and without a timer per message).
        match stream.next().now_or_never() {
            Some(received) => next = received,
            None => return Ok(false),
        }
    }
}

/// Whether the consumer's position (the next offset it hands out) is at `end` or past it although the
/// processor applied less: the offsets just below `end` hold no record to read — compacted away, an
/// aborted transaction's, a transaction marker — so waiting for a record at `end - 1` would wait for
/// ever (a replay toward the group's committed offset on a compacted input did).
pub(crate) fn position_reached(consumer: &StreamConsumer, end: i64) -> bool {
    consumer.position().is_ok_and(|positions| {
        positions
            .elements()
            .iter()
            .any(|element| matches!(element.offset(), Offset::Offset(position) if position >= end))
    })
}

/// `records` emptied, as records of another lifetime in the same allocation (collecting a vector's
/// own iterator into elements of the same size reuses its buffer): a batch's records borrow its
/// messages, and the buffer outlives them.
#[expect(
    clippy::unnecessary_filter_map,
    reason = "`filter` cannot change the element's lifetime; `filter_map` does, in place"
)]
pub(crate) fn recycled<'b>(mut records: Vec<Record<'_>>) -> Vec<Record<'b>> {
    records.clear();
    records.into_iter().filter_map(|_| None).collect()
}

/// The headers of a fetch's messages: all in one vector (no allocation per message), and which part of
/// it is each message's (nothing when the operator does not read them).
pub(crate) struct FetchHeaders<'m> {
    all: Vec<Header<'m>>,
    ranges: Vec<std::ops::Range<usize>>,
}

impl<'m> FetchHeaders<'m> {
    /// The headers of the fetch's message `at`.
    pub(crate) fn of(&self, at: usize) -> &[Header<'m>] {
        self.ranges
            .get(at)
            .map_or(&[], |range| &self.all[range.clone()])
    }
}

/// The headers of `messages`, or none at all when the operator does not `read` them (librdkafka
/// allocates a parse buffer for each message asked, even one without headers).
pub(crate) fn headers_of<'m>(
    messages: &'m [rdkafka::message::BorrowedMessage<'_>],
    read: bool,
) -> FetchHeaders<'m> {
    use rdkafka::message::Headers as _;
    let mut all = Vec::new();
    if !read {
        return FetchHeaders {
            all,
            ranges: Vec::new(),
        };
    }
    let ranges = messages
        .iter()
        .map(|message| {
            let from = all.len();
            if let Some(headers) = message.headers() {
                all.extend(headers.iter().map(|header| Header {
                    name: header.key,
                    value: header.value,
                }));
            }
            from..all.len()
        })
        .collect();
    FetchHeaders { all, ranges }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_buffer_is_reused_for_the_next_batch() {
        let mut records = Vec::with_capacity(FETCH_BATCH);
        let payload = vec![1u8; 4];
        records.push(Record::new(0, 1, None, Some(&payload)));
        let pointer = records.as_ptr().cast::<u8>();
        let next: Vec<Record<'static>> = recycled(records);
        assert!(next.is_empty());
        assert_eq!(next.capacity(), FETCH_BATCH);
        assert_eq!(next.as_ptr().cast::<u8>(), pointer, "the same allocation");
    }

    #[test]
    fn a_partition_consumer_prefetches_as_the_instance_properties_say() {
        let plain = partition_consumer_config(&KafkaSettings::new("b:9092"), "g");
        for (key, value) in PREFETCH {
            assert_eq!(plain.get(key), Some(*value), "{key}");
        }
        let tuned = KafkaSettings::new("b:9092")
            .with_pairs([
                "fetch.queue.backoff.ms=250",
                "queued.max.messages.kbytes=1024",
            ])
            .unwrap();
        let config = partition_consumer_config(&tuned, "g");
        assert_eq!(config.get("fetch.queue.backoff.ms"), Some("250"));
        assert_eq!(config.get("queued.max.messages.kbytes"), Some("1024"));
        assert_eq!(config.get("auto.offset.reset"), Some("error"));
        assert_eq!(config.get("group.id"), Some("g"));
    }
}
