//! A partition's consume loop: records fetched from its consumer ([`crate::source`]) are applied to its
//! state as they arrive and committed in atomic batches — each batch's outputs first, where [`Outputs`]
//! says (the at-least-once producer, or one Kafka transaction with the batch's next input offset), then
//! the state write. Usable without the fleet: [`consume_partition`] drives one partition.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{ConsumerGroupMetadata, StreamConsumer};
use tokio_util::sync::CancellationToken;

use crate::error::{ProcessorError, ProcessorResult};
use crate::operator::Record;
use crate::partition::{PartitionProcessor, PartitionStats};
use crate::progress::Phase;
use crate::sink::{OutputSink, TransactionalSink};
use crate::source::{FETCH_BATCH, fetch, headers_of, position_reached, recycled};

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

/// When a partition commits what it applied: after `max_records` records or `max_interval`, whichever
/// comes first — and at once when the changes fill half its state cache, or the consume loop stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitPolicy {
    /// Most records (applied or dead letters) in one commit.
    pub max_records: usize,
    /// Longest time records wait for their commit (and their outputs).
    pub max_interval: Duration,
}

impl CommitPolicy {
    /// Commits of at most `max_records` records, at least every `max_interval`.
    pub fn new(max_records: usize, max_interval: Duration) -> Self {
        CommitPolicy {
            max_records: max_records.max(1),
            max_interval,
        }
    }
}

/// How long an idle partition waits for a record before it looks at `stop` again (a cancelled `stop`
/// wakes it at once).
const IDLE_WAIT: Duration = Duration::from_millis(200);

/// Runs `work` where it may block: on a multi-threaded runtime the worker hands its other tasks (lock
/// renewals, membership) to another thread first, so a RocksDB write stall never delays them; on a
/// current-thread runtime (tests) it just runs.
fn off_the_runtime<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// Consumes one partition into `processor` until `stop` fires (or, with `until`, until the processor
/// reaches exactly that offset: records from `until` on are left to the consumer's next reader).
/// Records are applied as they arrive and committed as `commits` says: each commit is one atomic write
/// of the changed keys and the next offset, made only after its outputs went where `outputs` says. With
/// `permits`, applying and writing hold one permit (delivering outputs does not): an instance bounds
/// how many of its partitions work at once, and a partition waiting for a permit stops fetching once
/// librdkafka's bounded prefetch queue is full (backpressure instead of unbounded buffering). State work
/// runs off the async workers ([`tokio::task::block_in_place`]).
///
/// # Errors
/// A Kafka or store error, or [`ProcessorError::StaleOwner`] once ownership is lost.
///
/// # Cancel safety
/// Dropping the future loses only what was applied since the last commit: nothing of it was written.
pub async fn consume_partition(
    consumer: &StreamConsumer,
    processor: &mut PartitionProcessor,
    commits: CommitPolicy,
    until: Option<i64>,
    outputs: Outputs<'_>,
    permits: Option<&tokio::sync::Semaphore>,
    stop: &CancellationToken,
) -> ProcessorResult<PartitionStats> {
    let ends = Ends {
        until,
        pause_at: None,
    };
    consume(consumer, processor, commits, ends, outputs, permits, stop).await
}

/// As [`consume_partition`], and returns at `pause_at` too — *without* committing what is not due:
/// records applied keep waiting for their commit as `commits` says (counted from the oldest one, see
/// [`PartitionProcessor::pending_since`]) while the caller reports progress or takes a checkpoint of
/// what is committed, then calls again. A pause is no commit: the commit interval configured holds
/// however often the caller pauses.
///
/// # Errors
/// As [`consume_partition`].
///
/// # Cancel safety
/// As [`consume_partition`].
pub async fn consume_segment(
    consumer: &StreamConsumer,
    processor: &mut PartitionProcessor,
    commits: CommitPolicy,
    pause_at: tokio::time::Instant,
    outputs: Outputs<'_>,
    permits: Option<&tokio::sync::Semaphore>,
    stop: &CancellationToken,
) -> ProcessorResult<PartitionStats> {
    let ends = Ends {
        until: None,
        pause_at: Some(pause_at),
    };
    consume(consumer, processor, commits, ends, outputs, permits, stop).await
}

/// Where a consume call ends besides `stop`: an end offset (everything before it is committed), and a
/// pause (nothing is committed for it).
#[derive(Debug, Clone, Copy)]
struct Ends {
    until: Option<i64>,
    pause_at: Option<tokio::time::Instant>,
}

async fn consume(
    consumer: &StreamConsumer,
    processor: &mut PartitionProcessor,
    commits: CommitPolicy,
    ends: Ends,
    outputs: Outputs<'_>,
    permits: Option<&tokio::sync::Semaphore>,
    stop: &CancellationToken,
) -> ProcessorResult<PartitionStats> {
    let mut stream = consumer.stream();
    let mut reached_end = false;
    // One batch's messages and records, in buffers kept from batch to batch: allocated per batch, each
    // large allocation and free made glibc consolidate its free lists (2–3 % of the process).
    let mut messages = Vec::with_capacity(FETCH_BATCH);
    let mut spare_records: Vec<Record<'static>> = Vec::with_capacity(FETCH_BATCH);
    loop {
        let done = reached_end
            || ends.until.is_some_and(|end| {
                processor.applied_to() >= end || position_reached(consumer, end)
            })
            || stop.is_cancelled();
        // How long the oldest record applied has waited for its commit (`None`: nothing waits).
        let waited = processor.has_pending().then(|| {
            processor
                .pending_since()
                .map_or(Duration::MAX, |since| since.elapsed())
        });
        let due = waited.is_some_and(|waited| {
            done || waited >= commits.max_interval
                || processor.pending_records() >= commits.max_records
                || processor.wants_commit()
        });
        if due {
            commit_pending(processor, outputs, permits).await?;
        }
        if done {
            return Ok(processor.stats());
        }
        let now = tokio::time::Instant::now();
        if ends.pause_at.is_some_and(|at| now >= at) {
            return Ok(processor.stats());
        }
        let until_due = match waited {
            Some(waited) if !due => commits.max_interval.saturating_sub(waited),
            _ => IDLE_WAIT,
        };
        let wait = ends.pause_at.map_or(until_due, |at| {
            until_due.min(at.saturating_duration_since(now))
        });
        reached_end = fetch(&mut stream, consumer, wait, ends.until, stop, &mut messages).await?;
        if messages.is_empty() {
            continue;
        }
        let headers = headers_of(&messages, processor.reads_headers());
        let mut records = recycled(std::mem::take(&mut spare_records));
        records.extend(messages.iter().enumerate().map(|(at, m)| {
            let record = Record::new(m.partition(), m.offset(), m.key(), m.payload())
                .with_headers(headers.of(at));
            match m.timestamp().to_millis() {
                Some(timestamp) => record.with_timestamp(timestamp),
                None => record,
            }
        }));
        let applied = {
            let _permit = processing_permit(permits).await?;
            off_the_runtime(|| processor.apply(&records))
        };
        spare_records = recycled(records);
        drop(headers);
        messages.clear();
        applied?;
    }
}

async fn processing_permit(
    permits: Option<&tokio::sync::Semaphore>,
) -> ProcessorResult<Option<tokio::sync::SemaphorePermit<'_>>> {
    match permits {
        Some(permits) => {
            permits
                .acquire()
                .await
                .map(Some)
                .map_err(|_| ProcessorError::ShuttingDown {
                    what: "wait for a processing permit",
                })
        }
        None => Ok(None),
    }
}

/// Publishes what was applied since the last commit where `outputs` says, then writes it.
async fn commit_pending(
    processor: &mut PartitionProcessor,
    outputs: Outputs<'_>,
    permits: Option<&tokio::sync::Semaphore>,
) -> ProcessorResult<()> {
    for (offset, reason) in &processor.pending().dead_letters {
        tracing::warn!(partition = processor.partition(), offset, reason = %reason, "dead letter");
    }
    let was = processor.progress().phase();
    processor.progress().enter(Phase::Committing);
    match outputs {
        Outputs::Discard => {}
        Outputs::AtLeastOnce(sink) => {
            sink.deliver(processor.partition(), processor.pending())
                .await?;
        }
        Outputs::Transactional(sink, group) => {
            sink.commit_batch(processor.pending(), processor.applied_to(), group)
                .await?;
        }
    }
    let _permit = processing_permit(permits).await?;
    off_the_runtime(|| processor.commit())?;
    processor.progress().enter(was);
    Ok(())
}
