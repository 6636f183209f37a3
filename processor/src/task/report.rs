//! What a partition reports after each consume segment: its progress into the instance's status and
//! the metrics, and (at-least-once) its offset to the Kafka group for lag tools.

use state::recipes::keeper::KeptLock;

use super::TaskContext;
use super::consume::CommitPolicy;
use crate::partition::{PartitionProcessor, PartitionStats};
use crate::progress::records_past;
use crate::status::instant_to_unix_ms;

impl TaskContext {
    /// When the partition commits: by records or time, as configured.
    pub(crate) fn commit_policy(&self) -> CommitPolicy {
        CommitPolicy::new(self.settings.batch_size, self.settings.commit_interval)
    }

    /// After a consume segment: the partition's progress into the status and the metrics — records and
    /// dead letters counted, the offset, the lag against the last high watermark read, the state's size
    /// and the claim's expiry.
    pub(crate) fn report_segment(
        &self,
        partition: i32,
        processor: &PartitionProcessor,
        kept: &KeptLock,
        fetch_position: Option<i64>,
        (before, after): (PartitionStats, PartitionStats),
        labels: &[(&'static str, String); 2],
    ) {
        let applied = after.applied - before.applied;
        let dead_letters = after.dead_letters - before.dead_letters;
        let next_offset = processor.next_offset();
        // The high watermark comes from the instance's lag watcher (one metadata request a second for
        // all its partitions, off this loop).
        let high = self
            .status
            .borrow()
            .partition_status
            .get(&partition)
            .and_then(|p| p.high_watermark);
        let lag = high.map(|high| (high - next_offset).max(0));
        // Caught up with the log is progress too: an idle partition is not stalled (nor one whose log
        // end is unknown: the watchdog cannot tell it has work).
        if !records_past(next_offset, fetch_position, high) {
            processor.progress().beat();
        }
        let state_bytes = processor.store().approximate_size_bytes();
        metrics::counter!("processor_records_processed_total", labels).increment(applied);
        metrics::counter!("processor_dead_letters_total", labels).increment(dead_letters);
        #[allow(clippy::cast_precision_loss)]
        {
            metrics::gauge!("processor_next_offset", labels).set(next_offset as f64);
            metrics::gauge!("processor_state_size_bytes", labels).set(state_bytes as f64);
            if let Some(lag) = lag {
                metrics::gauge!("processor_consumer_lag_records", labels).set(lag as f64);
            }
        }
        let claim_expires_ms = instant_to_unix_ms(kept.valid_until());
        self.status.send_modify(|s| {
            s.processed += applied;
            s.dead_letters += dead_letters;
            if let Some(p) = s.partition_status.get_mut(&partition) {
                p.processing = true;
                p.next_offset = next_offset;
                p.high_watermark = high;
                p.fetch_position = fetch_position;
                p.lag = lag;
                p.state_bytes = state_bytes;
                p.processed += applied;
                p.claim_expires_ms = claim_expires_ms;
            }
        });
    }
}

/// Where `consumer` fetches `partition` next (a local read, no request): `None` before its first fetch.
pub(crate) fn fetch_position(
    consumer: &rdkafka::consumer::StreamConsumer,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    use rdkafka::consumer::Consumer;
    let positions = consumer.position().ok()?;
    match positions.find_partition(topic, partition)?.offset() {
        rdkafka::Offset::Offset(offset) => Some(offset),
        _ => None,
    }
}

/// The `topic` and `partition` labels of a partition's metrics.
pub(crate) fn partition_labels(topic: &str, partition: i32) -> [(&'static str, String); 2] {
    [
        ("topic", topic.to_owned()),
        ("partition", partition.to_string()),
    ]
}

/// Commits `next_offset` of `partition` to the instance's Kafka group, so that standard tools
/// (`kafka-consumer-groups`, lag exporters) see the fleet's progress and lag. Informational only: the
/// offset stored with the partition's state is what a new owner resumes from, never this one, so a
/// failed commit is logged and otherwise ignored.
pub(crate) fn report_progress(
    consumer: &rdkafka::consumer::StreamConsumer,
    topic: &str,
    partition: i32,
    next_offset: i64,
    wait: bool,
) {
    use rdkafka::consumer::{CommitMode, Consumer};
    let mut offsets = rdkafka::TopicPartitionList::new();
    if offsets
        .add_partition_offset(topic, partition, rdkafka::Offset::Offset(next_offset))
        .is_err()
    {
        return;
    }
    let mode = if wait {
        CommitMode::Sync
    } else {
        CommitMode::Async
    };
    if let Err(err) = consumer.commit(&offsets, mode) {
        tracing::debug!(topic, partition, next_offset, error = %err, "could not commit progress to the group (informational)");
    }
}
