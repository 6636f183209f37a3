//! The progress watchdog: a partition that holds its claim and makes no progress is worse than a
//! crash — a crash is taken over within the claim's TTL, a hung partition never is. Each partition
//! task runs beside a watchdog that reads its [`Progress`] clock and its status; when the partition
//! has work and has not moved for longer than the bound, the watchdog wins the race, the task is
//! dropped (its claim released in the background, its Kafka clients destroyed off the async workers,
//! blocking calls still inside librdkafka written off), and the partition is claimed again with new
//! clients on the next tick.
//!
//! "Has work": while starting, restoring, initialising its producer, replaying, committing,
//! checkpointing or handing off, always (each of those ends on its own; a restore gets
//! [`RESTORE_ALLOWANCE`](crate::task::RESTORE_ALLOWANCE) bounds of silence); while consuming, only when the log
//! has records past the consumer's fetch position — an idle partition at the log end is not stalled.

use std::time::Duration;

use crate::error::ProcessorError;
use crate::progress::{Phase, Progress};

use super::instance::Instance;
use crate::progress::records_past;
use crate::status::PartitionStatus;

/// How often the watchdog looks, at most.
const LOOK_EVERY: Duration = Duration::from_secs(1);

impl Instance {
    /// Resolves with [`ProcessorError::PartitionStalled`] once `partition` has work and its progress
    /// has not moved for the configured bound; never without a bound.
    pub(super) async fn stalled(&self, partition: i32, progress: &Progress) -> ProcessorError {
        let Some(bound) = self.config.stall_timeout else {
            return std::future::pending().await;
        };
        let every = (bound / 4).clamp(Duration::from_millis(50), LOOK_EVERY);
        loop {
            tokio::time::sleep(every).await;
            let silent_for = progress.silent_for();
            if silent_for < bound {
                continue;
            }
            let phase = progress.phase();
            let has_work = phase != Phase::Consuming
                || self
                    .status
                    .borrow()
                    .partition_status
                    .get(&partition)
                    .is_some_and(records_waiting);
            if !has_work {
                continue;
            }
            metrics::counter!(
                "processor_partition_stalls_total",
                "topic" => self.config.topic.clone(),
                "phase" => phase.describe()
            )
            .increment(1);
            self.status.send_modify(|s| s.stalls += 1);
            tracing::error!(
                instance = %self.config.instance_id,
                partition,
                phase = phase.describe(),
                ?silent_for,
                ?bound,
                "partition made no progress with work waiting: abandoning its task and releasing its claim"
            );
            return ProcessorError::PartitionStalled {
                partition,
                phase: phase.describe(),
                silent_for,
                bound,
            };
        }
    }
}

/// Whether the log holds records the partition's consumer has not fetched (nor applied).
fn records_waiting(status: &PartitionStatus) -> bool {
    records_past(
        status.next_offset,
        status.fetch_position,
        status.high_watermark,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_wait_only_past_the_fetch_position() {
        let mut status = PartitionStatus {
            next_offset: 10,
            ..PartitionStatus::default()
        };
        assert!(!records_waiting(&status), "no high watermark known yet");
        status.high_watermark = Some(12);
        assert!(records_waiting(&status));
        // A transaction marker at offset 11: the consumer's position is past it, no record waits.
        status.fetch_position = Some(12);
        assert!(!records_waiting(&status));
        status.high_watermark = Some(20);
        assert!(records_waiting(&status));
    }
}
