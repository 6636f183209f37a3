//! A partition's exactly-once output path at its start: the transactional producer initialised (which
//! fences every earlier owner's), and the state brought up to the group's committed offset by a replay
//! whose outputs are discarded (they are visible already).

use std::sync::Arc;

use rdkafka::consumer::ConsumerGroupMetadata;
use tokio_util::sync::CancellationToken;

use super::consume::{Outputs, consume_partition};
use super::{METADATA_CALL_BOUND, TaskContext};
use crate::config::OutputGuarantee;
use crate::error::{ProcessorError, ProcessorResult};
use crate::kafka_calls::bounded;
use crate::partition::PartitionProcessor;
use crate::sink::{TRANSACTION_CALL_BOUND, TransactionalSink};
use crate::source::{committed_offset, is_mock_cluster};

impl TaskContext {
    /// The partition's exactly-once output path, when it has outputs and the guarantee is exactly-once:
    /// its transactional producer, initialised — which fences every earlier owner's producer of the
    /// partition, so none of their transactions can commit from now on — and the consumer's group
    /// metadata its transactions commit offsets for.
    pub(crate) async fn open_transactional_outputs(
        &self,
        partition: i32,
        consumer: &rdkafka::consumer::StreamConsumer,
    ) -> ProcessorResult<Option<(TransactionalSink, Arc<ConsumerGroupMetadata>)>> {
        use rdkafka::consumer::Consumer;
        let config = &self.settings;
        let has_outputs = config.output_topic.is_some() || config.dead_letter_topic.is_some();
        if !has_outputs
            || config.output_guarantee != OutputGuarantee::ExactlyOnce
            || !self.transactions_work().await?
        {
            return Ok(None);
        }
        let group = consumer
            .group_metadata()
            .ok_or_else(|| ProcessorError::Kafka {
                operation: "read the consumer's group metadata",
                source: "the consumer has no group".into(),
            })?;
        let (kafka, group_id, topic) = (
            config.kafka.clone(),
            config.group.clone(),
            config.topic.clone(),
        );
        let (output, dead_letters) = (
            config.output_topic.clone(),
            config.dead_letter_topic.clone(),
        );
        let sink = bounded(
            "initialise a transactional producer",
            TRANSACTION_CALL_BOUND,
            move || {
                TransactionalSink::open(
                    &kafka,
                    &group_id,
                    &topic,
                    partition,
                    output.as_deref(),
                    dead_letters.as_deref(),
                )
            },
        )
        .await?;
        Ok(Some((sink, Arc::new(group))))
    }

    /// Whether exactly-once outputs can work on these brokers: not on librdkafka's mock cluster (asked
    /// once per instance; said once in a warning, then its partitions publish at-least-once).
    pub(crate) async fn transactions_work(&self) -> ProcessorResult<bool> {
        let kafka = self.settings.kafka.clone();
        let instance = self.settings.instance_id.clone();
        self.transactions_work
            .get_or_try_init(|| async move {
                let mock = bounded("read the cluster id", METADATA_CALL_BOUND, move || {
                    is_mock_cluster(&kafka)
                })
                .await?;
                if mock {
                    tracing::warn!(%instance, "librdkafka's mock cluster has no working transactions: outputs are at-least-once here (exactly-once needs a real Kafka cluster)");
                }
                Ok(!mock)
            })
            .await
            .copied()
    }

    /// Brings the state up to the input whose outputs are already committed: the group offset the last
    /// transaction committed (read after our producer fenced every earlier one, so it is final) is
    /// where exactly-once output resumes. State behind it (restored from a checkpoint, or written by an
    /// owner that crashed between its commit and its state write) is rebuilt by replaying the records in
    /// between with their outputs discarded — they are visible already.
    pub(crate) async fn replay_committed_outputs(
        &self,
        consumer: &rdkafka::consumer::StreamConsumer,
        processor: &mut PartitionProcessor,
        stop: &CancellationToken,
    ) -> ProcessorResult<()> {
        let partition = processor.partition();
        let (kafka, group, topic) = (
            self.settings.kafka.clone(),
            self.settings.group.clone(),
            self.settings.topic.clone(),
        );
        let committed = bounded(
            "read the group's committed offset",
            TRANSACTION_CALL_BOUND,
            move || committed_offset(&kafka, &group, &topic, partition),
        )
        .await?;
        let stored = processor.next_offset();
        match reconcile(committed, stored) {
            Reconcile::Replay(committed) => {
                tracing::info!(
                    instance = %self.settings.instance_id,
                    partition,
                    stored,
                    committed,
                    "replaying records whose outputs are already committed (outputs discarded)"
                );
                let before = processor.stats();
                let replayed = consume_partition(
                    consumer,
                    processor,
                    self.commit_policy(),
                    Some(committed),
                    Outputs::Discard,
                    Some(&self.permits),
                    stop,
                )
                .await;
                let after = processor.stats();
                self.status.send_modify(|s| {
                    s.processed += after.applied - before.applied;
                    s.dead_letters += after.dead_letters - before.dead_letters;
                });
                replayed?;
            }
            Reconcile::StateAhead(committed) => {
                tracing::warn!(
                    instance = %self.settings.instance_id,
                    partition,
                    stored,
                    committed = ?committed,
                    "the state is ahead of the committed outputs: the partition ran at-least-once before (or the group's offsets expired); exactly-once output starts at the stored offset"
                );
                metrics::counter!("processor_outputs_behind_state_total", "topic" => self.settings.topic.clone()).increment(1);
            }
            Reconcile::InStep => {}
        }
        Ok(())
    }
}

/// How a starting partition's stored state offset `S` stands against the group's committed offset `K`
/// (the end of the input whose outputs are visible).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reconcile {
    /// `S < K`: replay `[S, K)` with the outputs discarded (they are visible already).
    Replay(i64),
    /// `S > K`, or no `K` at all while the state has progress: the group's offsets expired
    /// (`offsets.retention.minutes`) or the partition ran at-least-once before; a warning, and
    /// exactly-once output from `S`.
    StateAhead(Option<i64>),
    /// `S = K`, or a new partition with neither.
    InStep,
}

fn reconcile(committed: Option<i64>, stored: i64) -> Reconcile {
    match committed {
        Some(committed) if committed > stored => Reconcile::Replay(committed),
        Some(committed) if committed < stored => Reconcile::StateAhead(Some(committed)),
        None if stored > 0 => Reconcile::StateAhead(None),
        _ => Reconcile::InStep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expired group offsets (no committed offset at all while the state has progress) are named, as
    /// the guide's §11 table promises, not passed over in silence.
    #[test]
    fn expired_group_offsets_are_told_apart_from_a_new_partition() {
        assert_eq!(reconcile(Some(50), 10), Reconcile::Replay(50));
        assert_eq!(reconcile(Some(5), 10), Reconcile::StateAhead(Some(5)));
        assert_eq!(reconcile(None, 10), Reconcile::StateAhead(None));
        assert_eq!(reconcile(None, 0), Reconcile::InStep);
        assert_eq!(reconcile(Some(10), 10), Reconcile::InStep);
    }
}
