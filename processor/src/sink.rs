//! Where a partition's results go: the output topic (updated aggregates) and the dead-letter topic
//! (malformed records), delivered and acknowledged before the batch that produced them commits.

use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::error::{ProcessorError, ProcessorResult};
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

pub(crate) async fn await_delivery(
    delivery: rdkafka::producer::DeliveryFuture,
) -> ProcessorResult<()> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((err, _))) => Err(ProcessorError::kafka("deliver a record")(err)),
        Err(_) => Err(ProcessorError::Kafka {
            operation: "deliver a record",
            source: "the producer was dropped before the broker acknowledged the record".into(),
        }),
    }
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
        kafka: &KafkaSettings,
        output_topic: Option<&str>,
        dead_letter_topic: Option<&str>,
    ) -> ProcessorResult<Self> {
        let producer = idempotent_producer(kafka)?;
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
                        .map_err(|(err, _)| ProcessorError::kafka("queue an output")(err))?,
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
                        .map_err(|(err, _)| ProcessorError::kafka("queue a dead letter")(err))?,
                );
            }
        }
        for delivery in pending {
            await_delivery(delivery).await?;
        }
        Ok(())
    }
}
