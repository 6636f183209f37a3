//! Where a partition's results go: the output topic (updated aggregates) and the dead-letter topic
//! (malformed records). Two paths: [`OutputSink`], at-least-once (delivered and acknowledged before the
//! batch that produced them commits), and [`TransactionalSink`], exactly-once (each batch's outputs and
//! its input offset in one Kafka transaction, committed before the batch's state is written).

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::error::{ProcessorError, ProcessorResult};
use crate::kafka_calls::{DropOffRuntime, bounded};
use crate::kafka_settings::KafkaSettings;
use crate::partition::BatchReport;

/// A producer that neither reorders nor duplicates on retries (idempotence), batching for 5 ms.
pub(crate) fn idempotent_producer(kafka: &KafkaSettings) -> ProcessorResult<FutureProducer> {
    kafka
        .client_config()
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "15000")
        .create()
        .map_err(kafka.client_error("create a producer"))
}

/// Waits for the broker's acknowledgement of one record.
pub(crate) async fn await_delivery(
    delivery: rdkafka::producer::DeliveryFuture,
) -> ProcessorResult<()> {
    delivery_outcome(delivery)
        .await
        .map_err(ProcessorError::kafka("deliver a record"))
}

/// The broker's answer for one record, as the client's error, so that a caller can tell a fenced
/// producer from other failures. A producer dropped before the answer is `Canceled`.
/// How long a batch waits before trying again to queue a record when the producer's queue is full of
/// other partitions' records (its own deliveries are awaited instead).
const QUEUE_FULL_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// Queues `record` and adds its delivery to `pending`. While the producer's queue is full — a batch can
/// hold more records than librdkafka queues (`queue.buffering.max.messages`, 100 000 by default), and
/// an instance's partitions share one producer — it waits for the oldest delivery of `pending` first
/// (backpressure instead of failing the batch). An error names the step that failed: `queue` or the
/// delivery of an earlier record.
async fn queue_record<K, P>(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, K, P>,
    pending: &mut std::collections::VecDeque<rdkafka::producer::DeliveryFuture>,
    queue: &'static str,
) -> Result<(), (&'static str, KafkaError)>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send_result(record) {
            Ok(delivery) => {
                pending.push_back(delivery);
                return Ok(());
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                match pending.pop_front() {
                    Some(oldest) => delivery_outcome(oldest)
                        .await
                        .map_err(|err| ("deliver a record", err))?,
                    None => tokio::time::sleep(QUEUE_FULL_PAUSE).await,
                }
            }
            Err((err, _)) => return Err((queue, err)),
        }
    }
}

async fn delivery_outcome(delivery: rdkafka::producer::DeliveryFuture) -> Result<(), KafkaError> {
    let delivered = match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((err, _))) => Err(err),
        Err(_) => Err(KafkaError::Canceled),
    };
    if delivered.is_err() {
        metrics::counter!("processor_output_errors_total", "stage" => "delivery").increment(1);
    }
    delivered
}

/// Where a partition's outputs go: updated aggregates to the output topic and malformed records to the
/// dead-letter topic, each sent (and acknowledged) *before* the batch that produced them commits, so
/// nothing is lost downstream: a crash in between replays and resends (at-least-once). The consume loop
/// logs dead letters whether or not a topic is set.
pub struct OutputSink {
    /// Replaced by a new one when it raised a fatal error (an idempotent producer that lost its
    /// sequence is unusable for good): one instance-wide producer must not fail every batch forever.
    producer: std::sync::RwLock<FutureProducer>,
    kafka: KafkaSettings,
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
        kafka: &KafkaSettings,
        output_topic: Option<&str>,
        dead_letter_topic: Option<&str>,
    ) -> ProcessorResult<Self> {
        let producer = idempotent_producer(kafka)?;
        Ok(OutputSink {
            producer: std::sync::RwLock::new(producer),
            kafka: kafka.clone(),
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
        let failed = |(operation, err)| ProcessorError::kafka(operation)(err);
        let producer = self.usable_producer()?;
        let mut pending = std::collections::VecDeque::new();
        if let Some(topic) = &self.output_topic {
            for (key, value) in &report.outputs {
                let record = FutureRecord::to(topic).key(key).payload(value);
                queue_record(&producer, record, &mut pending, "queue an output")
                    .await
                    .map_err(failed)?;
            }
        }
        if let Some(topic) = &self.dead_letter_topic {
            for (offset, reason) in &report.dead_letters {
                let key = format!("{partition}:{offset}");
                let record = FutureRecord::to(topic).key(&key).payload(reason);
                queue_record(&producer, record, &mut pending, "queue a dead letter")
                    .await
                    .map_err(failed)?;
            }
        }
        for delivery in pending {
            await_delivery(delivery).await?;
        }
        Ok(())
    }

    /// The instance's producer, replaced first if it raised a fatal error: every later send of a
    /// producer in that state fails, so keeping it would fail each batch of every partition forever.
    fn usable_producer(&self) -> ProcessorResult<FutureProducer> {
        let current = self
            .producer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let Some((code, reason)) = current.client().fatal_error() else {
            return Ok(current);
        };
        let replacement = idempotent_producer(&self.kafka)?;
        let mut slot = self
            .producer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.client().fatal_error().is_some() {
            tracing::warn!(
                ?code,
                reason,
                "the output producer raised a fatal error: replaced by a new one (the failed batches are retried from their stored offsets)"
            );
            metrics::counter!("processor_output_producers_replaced_total").increment(1);
            let failed = std::mem::replace(&mut *slot, replacement);
            drop(DropOffRuntime::new(failed));
        }
        Ok(slot.clone())
    }
}

/// The timeout handed to librdkafka for a transactional call (initialisation, offsets, commit, abort).
const TRANSACTION_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// How long the processor itself waits for a transactional call: librdkafka does not always keep the
/// timeout above (see [`crate::kafka_calls`]). Past it the call is abandoned and the partition fails, to
/// be claimed again with a new producer, whose initialisation fences this one: nothing of the batch
/// is visible then.
pub(crate) const TRANSACTION_CALL_BOUND: std::time::Duration = std::time::Duration::from_secs(25);

pub use crate::error::TransactionFault;

/// The exactly-once output path of ONE owned partition: a transactional producer whose
/// `transactional.id` is derived from the group, topic and partition ([`transactional_id`]), so the next
/// owner's initialisation fences this one. Each batch's outputs, dead letters AND the partition's next
/// input offset (committed to the group through the transaction) become visible together, or not at all;
/// the state write follows the commit (see DISTRIBUTED_LOCKING.md, "Exactly-once outputs").
pub struct TransactionalSink {
    producer: DropOffRuntime<FutureProducer>,
    /// Set once a call was abandoned past its bound: the producer may still be inside it, so it is
    /// never used again (every later call fails at once; the partition restarts with a new one).
    abandoned: std::sync::atomic::AtomicBool,
    transactional_id: String,
    topic: String,
    partition: i32,
    output_topic: Option<String>,
    dead_letter_topic: Option<String>,
}

impl std::fmt::Debug for TransactionalSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalSink")
            .field("transactional_id", &self.transactional_id)
            .field("output_topic", &self.output_topic)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .finish_non_exhaustive()
    }
}

pub use crate::resources::transactional_id;

impl TransactionalSink {
    /// Creates the partition's transactional producer and initialises it: this fences every earlier
    /// producer of the partition (a previous owner, alive or frozen) and resolves its unfinished
    /// transaction (aborted), so the group's committed offset read afterwards is final. Blocking.
    ///
    /// # Errors
    /// A Kafka error, e.g. brokers without transactions (librdkafka's mock cluster).
    pub fn open(
        kafka: &KafkaSettings,
        group: &str,
        topic: &str,
        partition: i32,
        output_topic: Option<&str>,
        dead_letter_topic: Option<&str>,
    ) -> ProcessorResult<Self> {
        let transactional_id = transactional_id(group, topic, partition);
        let producer: FutureProducer = kafka
            .client_config()
            .set("transactional.id", &transactional_id)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("transaction.timeout.ms", "60000")
            .create()
            .map_err(kafka.client_error("create a transactional producer"))?;
        producer
            .init_transactions(TRANSACTION_CALL_TIMEOUT)
            .map_err(ProcessorError::kafka("initialise transactions"))?;
        Ok(TransactionalSink {
            producer: DropOffRuntime::new(producer),
            abandoned: std::sync::atomic::AtomicBool::new(false),
            transactional_id,
            topic: topic.to_owned(),
            partition,
            output_topic: output_topic.map(str::to_owned),
            dead_letter_topic: dead_letter_topic.map(str::to_owned),
        })
    }

    /// The producer's `transactional.id`.
    pub fn transactional_id(&self) -> &str {
        &self.transactional_id
    }

    /// Destroys the producer on a blocking thread, waiting for that at most the call bound (a producer
    /// whose brokers are gone is written off instead).
    pub async fn close(self) {
        self.producer
            .close("close a transactional producer", TRANSACTION_CALL_BOUND)
            .await;
    }

    /// Publishes a batch's outputs and dead letters and commits `next_offset` of the input partition to
    /// `group` in ONE transaction. Only once this returns `Ok` may the batch's state be written.
    ///
    /// # Errors
    /// [`ProcessorError::OutputFenced`] when a newer owner's producer fenced this one; a Kafka error
    /// (the transaction was aborted: nothing of the batch is visible).
    pub async fn commit_batch(
        &self,
        report: &BatchReport,
        next_offset: i64,
        group: &std::sync::Arc<ConsumerGroupMetadata>,
    ) -> ProcessorResult<()> {
        use std::sync::atomic::Ordering;
        if self.abandoned.load(Ordering::SeqCst) {
            return Err(ProcessorError::KafkaCallTimedOut {
                operation: "an earlier transactional call",
                after: TRANSACTION_CALL_BOUND,
            });
        }
        let started = std::time::Instant::now();
        self.producer
            .begin_transaction()
            .map_err(|err| self.transaction_error("begin a transaction", err))?;
        match self.send_and_commit(report, next_offset, group).await {
            Ok(()) => {
                // The price of exactly-once per batch: RUST_LOG=processor::sink=debug shows it.
                tracing::debug!(
                    partition = self.partition,
                    outputs = report.outputs.len(),
                    next_offset,
                    elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                    "transaction committed"
                );
                Ok(())
            }
            Err(err) => {
                metrics::counter!("processor_output_errors_total", "stage" => "transaction")
                    .increment(1);
                let fault = TransactionFault::of(&err);
                metrics::counter!("processor_transaction_faults_total", "fault" => fault.as_str())
                    .increment(1);
                if fault == TransactionFault::TimedOut {
                    // The producer may still be inside the abandoned call: a second call on it would
                    // only wait behind it ("concurrent operation"). The next owner's initialisation
                    // aborts the open transaction.
                    self.abandoned.store(true, Ordering::SeqCst);
                    return Err(err);
                }
                if !fault.is_aborted() {
                    // Fenced or fatal: the producer can do nothing more; the next owner's (or the next
                    // claim's) initialisation aborts the open transaction.
                    return Err(err);
                }
                let producer = (*self.producer).clone();
                // Best effort: an open transaction that cannot be aborted here is aborted by the broker
                // at its timeout or by the next producer's initialisation.
                let aborted = bounded("abort a transaction", TRANSACTION_CALL_BOUND, move || {
                    producer
                        .abort_transaction(TRANSACTION_CALL_TIMEOUT)
                        .map_err(ProcessorError::kafka("abort a transaction"))
                })
                .await;
                if matches!(aborted, Err(ProcessorError::KafkaCallTimedOut { .. })) {
                    self.abandoned.store(true, Ordering::SeqCst);
                }
                Err(err)
            }
        }
    }

    async fn send_and_commit(
        &self,
        report: &BatchReport,
        next_offset: i64,
        group: &std::sync::Arc<ConsumerGroupMetadata>,
    ) -> ProcessorResult<()> {
        let failed = |(operation, err)| self.transaction_error(operation, err);
        let mut pending = std::collections::VecDeque::new();
        if let Some(topic) = &self.output_topic {
            for (key, value) in &report.outputs {
                let record = FutureRecord::to(topic).key(key).payload(value);
                queue_record(&self.producer, record, &mut pending, "queue an output")
                    .await
                    .map_err(failed)?;
            }
        }
        if let Some(topic) = &self.dead_letter_topic {
            for (offset, reason) in &report.dead_letters {
                let key = format!("{}:{offset}", self.partition);
                let record = FutureRecord::to(topic).key(&key).payload(reason);
                queue_record(&self.producer, record, &mut pending, "queue a dead letter")
                    .await
                    .map_err(failed)?;
            }
        }
        for delivery in pending {
            // A newer owner's initialisation shows here first (the broker refuses to add the output
            // partition to this producer's transaction): it must read as fenced, not as a failed send.
            delivery_outcome(delivery)
                .await
                .map_err(|err| self.transaction_error("deliver a record", err))?;
        }
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(&self.topic, self.partition, Offset::Offset(next_offset))
            .map_err(ProcessorError::kafka("build the offsets to commit"))?;
        let producer = (*self.producer).clone();
        let group = std::sync::Arc::clone(group);
        let committed = bounded("commit a transaction", TRANSACTION_CALL_BOUND, move || {
            Ok(producer
                .send_offsets_to_transaction(&offsets, &group, TRANSACTION_CALL_TIMEOUT)
                .map_err(|err| ("send the offsets to a transaction", err))
                .and_then(|()| {
                    producer
                        .commit_transaction(TRANSACTION_CALL_TIMEOUT)
                        .map_err(|err| ("commit a transaction", err))
                }))
        })
        .await?;
        committed.map_err(|(operation, err)| self.transaction_error(operation, err))
    }

    /// A fenced producer is [`ProcessorError::OutputFenced`]; anything else a
    /// [`ProcessorError::TransactionFailed`] with its [`TransactionFault`] class. The call's own error
    /// may not say it was fenced: once fenced, librdkafka raises a fatal error and purges what is
    /// queued, so a record's delivery fails as "purged" — the producer's fatal error tells the cause.
    fn transaction_error(&self, operation: &'static str, err: KafkaError) -> ProcessorError {
        let is_fence = |code: RDKafkaErrorCode| {
            matches!(
                code,
                RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::Fenced
            )
        };
        let fenced = err.rdkafka_error_code().is_some_and(is_fence)
            || self
                .producer
                .client()
                .fatal_error()
                .is_some_and(|(code, _)| is_fence(code));
        if fenced {
            ProcessorError::OutputFenced {
                partition: self.partition,
                transactional_id: self.transactional_id.clone(),
            }
        } else {
            ProcessorError::TransactionFailed {
                partition: self.partition,
                operation,
                fault: self.fault_class(&err),
                source: Box::new(err),
            }
        }
    }

    /// The class of a failed call's error that is not a fence (see [`TransactionFault`]).
    fn fault_class(&self, err: &KafkaError) -> TransactionFault {
        if self.producer.client().fatal_error().is_some() {
            return TransactionFault::Fatal;
        }
        match err {
            KafkaError::Transaction(err) if err.is_fatal() => TransactionFault::Fatal,
            KafkaError::Transaction(err) if err.txn_requires_abort() => TransactionFault::Abortable,
            KafkaError::Transaction(err) if err.is_retriable() => TransactionFault::Retriable,
            // A record the broker refused: a transactional producer turns a failed produce into an
            // abortable error of its transaction.
            KafkaError::MessageProduction(_) => TransactionFault::Abortable,
            _ => TransactionFault::Other,
        }
    }
}
