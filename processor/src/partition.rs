//! One owned partition's processing, independent of where records come from: apply records through the
//! operator and write state plus the next offset in one atomic batch, under the ownership fencing token.
//!
//! Exactly-once state follows from three rules: the batch carries the offset it advances to; processing
//! resumes from the offset stored with the state (never from Kafka's committed offset); and records below
//! that offset — replays after a restart or a restore — are skipped. An instance that lost ownership (its
//! lost-token fired, or the store has seen a newer owner's token) writes nothing more.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::error::{ProcessorError, ProcessorResult};
use crate::operator::{Operator, Outcome, Record};
use crate::store::{PartitionStore, StateBatch};

/// What one batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchReport {
    /// Records applied.
    pub applied: usize,
    /// Records skipped because they were below the stored offset (replays).
    pub skipped: usize,
    /// Malformed records, with their offset and why: for the dead-letter topic or log.
    pub dead_letters: Vec<(i64, String)>,
    /// Updated values to publish downstream (key, value), in offset order.
    pub outputs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The offset processing continues from.
    pub next_offset: i64,
}

/// Counters of a partition since it was resumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionStats {
    /// Records applied.
    pub applied: u64,
    /// Dead letters.
    pub dead_letters: u64,
    /// Batches written.
    pub batches: u64,
}

/// Processing of one owned partition.
pub struct PartitionProcessor {
    store: Arc<dyn PartitionStore>,
    operator: Arc<dyn Operator>,
    fencing_token: u64,
    lost: CancellationToken,
    next_offset: i64,
    stats: PartitionStats,
}

impl std::fmt::Debug for PartitionProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionProcessor")
            .field("partition", &self.store.partition())
            .field("fencing_token", &self.fencing_token)
            .field("next_offset", &self.next_offset)
            .field("stats", &self.stats)
            .finish()
    }
}

impl PartitionProcessor {
    /// Resumes `store` under ownership `fencing_token`: from the offset stored with the state, or 0 for a
    /// new store. `lost` is the ownership claim's lost-token.
    ///
    /// # Errors
    /// [`ProcessorError::StaleOwner`] when the store already holds state written by a newer owner; a
    /// store error.
    pub fn resume(
        store: Arc<dyn PartitionStore>,
        operator: Arc<dyn Operator>,
        fencing_token: u64,
        lost: CancellationToken,
    ) -> ProcessorResult<Self> {
        let meta = store.meta()?;
        if let Some(meta) = meta
            && meta.fencing_token > fencing_token
        {
            return Err(ProcessorError::StaleOwner {
                partition: store.partition(),
                token: fencing_token,
                highest: meta.fencing_token,
            });
        }
        Ok(PartitionProcessor {
            next_offset: meta.map_or(0, |m| m.next_offset),
            store,
            operator,
            fencing_token,
            lost,
            stats: PartitionStats::default(),
        })
    }

    /// The first offset not yet applied: where to consume from.
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// The partition.
    pub fn partition(&self) -> i32 {
        self.store.partition()
    }

    /// The ownership fencing token this processor writes under.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// Counters since resume.
    pub fn stats(&self) -> PartitionStats {
        self.stats
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn PartitionStore> {
        &self.store
    }

    /// Applies `records` (in offset order) as one atomic batch. Records below [`next_offset`](Self::next_offset)
    /// are skipped. Nothing is written once ownership is lost.
    ///
    /// # Errors
    /// [`ProcessorError::StaleOwner`] when ownership was lost; [`ProcessorError::InvalidInput`] for records
    /// out of order or of another partition; a store error (nothing of the batch is written then).
    pub fn process(&mut self, records: &[Record<'_>]) -> ProcessorResult<BatchReport> {
        let prepared = self.prepare(records)?;
        self.commit(prepared)
    }

    fn ensure_owner(&self) -> ProcessorResult<()> {
        if self.lost.is_cancelled() {
            return Err(ProcessorError::StaleOwner {
                partition: self.partition(),
                token: self.fencing_token,
                highest: self.fencing_token.saturating_add(1),
            });
        }
        Ok(())
    }

    /// Runs `records` through the operator without writing anything: the batch and its report (outputs
    /// and dead letters), for a caller that publishes them before [`commit`](Self::commit) (at-least-once
    /// downstream: a crash in between replays the records and publishes them again).
    ///
    /// # Errors
    /// As [`process`](Self::process).
    pub fn prepare(&self, records: &[Record<'_>]) -> ProcessorResult<PreparedBatch> {
        self.ensure_owner()?;
        let mut report = BatchReport::default();
        let mut batch = StateBatch::new(self.next_offset, self.fencing_token);
        let mut last = self.next_offset - 1;
        for record in records {
            if record.partition != self.partition() {
                return Err(ProcessorError::InvalidInput {
                    what: "record",
                    reason: format!(
                        "offset {} belongs to partition {}, not {}",
                        record.offset,
                        record.partition,
                        self.partition()
                    ),
                });
            }
            if record.offset < self.next_offset {
                report.skipped += 1;
                continue;
            }
            if record.offset <= last {
                return Err(ProcessorError::InvalidInput {
                    what: "record",
                    reason: format!("offset {} after {last}: out of order", record.offset),
                });
            }
            last = record.offset;
            match self
                .operator
                .apply(record, self.store.as_ref(), &mut batch)?
            {
                Outcome::Applied { key, output } => {
                    report.applied += 1;
                    if let Some(value) = output {
                        report.outputs.push((key, value));
                    }
                }
                Outcome::DeadLetter { reason } => report.dead_letters.push((record.offset, reason)),
            }
        }
        Ok(PreparedBatch {
            batch,
            report,
            from_offset: self.next_offset,
            last,
        })
    }

    /// Writes a prepared batch: state and next offset in one atomic write under the fencing token.
    ///
    /// # Errors
    /// [`ProcessorError::StaleOwner`] when ownership was lost meanwhile; [`ProcessorError::InvalidInput`]
    /// when the batch was prepared at another offset; a store error.
    pub fn commit(&mut self, prepared: PreparedBatch) -> ProcessorResult<BatchReport> {
        self.ensure_owner()?;
        let PreparedBatch {
            mut batch,
            mut report,
            from_offset,
            last,
        } = prepared;
        if from_offset != self.next_offset {
            return Err(ProcessorError::InvalidInput {
                what: "prepared batch",
                reason: format!(
                    "prepared at offset {from_offset}, the partition is at {}",
                    self.next_offset
                ),
            });
        }
        if last >= self.next_offset {
            batch.set_next_offset(last + 1);
            self.store.apply(&batch)?;
            self.next_offset = last + 1;
            self.stats.batches += 1;
        }
        self.stats.applied += report.applied as u64;
        self.stats.dead_letters += report.dead_letters.len() as u64;
        report.next_offset = self.next_offset;
        Ok(report)
    }
}

/// A batch run through the operator but not yet written (see [`PartitionProcessor::prepare`]).
#[derive(Debug)]
pub struct PreparedBatch {
    batch: StateBatch,
    report: BatchReport,
    from_offset: i64,
    last: i64,
}

impl PreparedBatch {
    /// What the batch will do: its outputs and dead letters are final.
    pub fn report(&self) -> &BatchReport {
        &self.report
    }

    /// The partition's next offset once the batch is written; `None` when every record of the batch
    /// was a replay below the partition's offset (nothing to write, nothing to publish).
    pub fn next_offset(&self) -> Option<i64> {
        (self.last >= self.from_offset).then_some(self.last + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::{Aggregate, KeyedAggregation};
    use crate::store::memory::InMemoryPartitionStore;

    struct Log(Vec<(Vec<u8>, Vec<u8>)>);

    impl Log {
        /// A deterministic workload: key `k{i % 7}`, amount `i * 3 - 50`, every 13th malformed.
        fn new(n: usize) -> Self {
            Log((0..n)
                .map(|i| {
                    let value = if i % 13 == 12 {
                        "oops".to_owned()
                    } else {
                        (i as i64 * 3 - 50).to_string()
                    };
                    (format!("k{}", i % 7).into_bytes(), value.into_bytes())
                })
                .collect())
        }

        fn records(&self, from: usize, to: usize) -> Vec<Record<'_>> {
            (from..to)
                .map(|i| Record {
                    partition: 0,
                    offset: i as i64,
                    key: Some(&self.0[i].0),
                    value: Some(&self.0[i].1),
                })
                .collect()
        }

        fn expected(&self) -> std::collections::BTreeMap<Vec<u8>, Aggregate> {
            let mut out = std::collections::BTreeMap::new();
            for (key, value) in &self.0 {
                if let Ok(amount) = crate::operator::parse_amount(Some(value)) {
                    let entry: &mut Aggregate = out.entry(key.clone()).or_default();
                    *entry = entry.with_amount(amount);
                }
            }
            out
        }
    }

    fn state(store: &dyn PartitionStore) -> std::collections::BTreeMap<Vec<u8>, Aggregate> {
        store
            .entries()
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, Aggregate::decode(&v).unwrap()))
            .collect()
    }

    #[test]
    fn replays_after_a_crash_are_exactly_once() {
        let log = Log::new(300);
        let store: Arc<dyn PartitionStore> = Arc::new(InMemoryPartitionStore::new(0));
        let operator: Arc<dyn Operator> = Arc::new(KeyedAggregation);
        let mut first = PartitionProcessor::resume(
            store.clone(),
            operator.clone(),
            1,
            CancellationToken::new(),
        )
        .unwrap();
        for chunk in log.records(0, 170).chunks(40) {
            first.process(chunk).unwrap();
        }
        drop(first); // crash: whatever Kafka had committed is irrelevant

        let mut second =
            PartitionProcessor::resume(store.clone(), operator, 2, CancellationToken::new())
                .unwrap();
        assert_eq!(second.next_offset(), 170);
        // The consumer re-delivers from an older position: duplicates are skipped.
        let report = second.process(&log.records(100, 300)).unwrap();
        assert_eq!(report.skipped, 70);
        assert_eq!(report.next_offset, 300);
        assert_eq!(state(store.as_ref()), log.expected());
        assert!(!report.dead_letters.is_empty());
    }

    #[test]
    fn a_lost_or_superseded_owner_writes_nothing() {
        let log = Log::new(20);
        let store: Arc<dyn PartitionStore> = Arc::new(InMemoryPartitionStore::new(0));
        let operator: Arc<dyn Operator> = Arc::new(KeyedAggregation);
        let lost = CancellationToken::new();
        let mut old =
            PartitionProcessor::resume(store.clone(), operator.clone(), 3, lost.clone()).unwrap();
        old.process(&log.records(0, 10)).unwrap();
        let mut new = PartitionProcessor::resume(
            store.clone(),
            operator.clone(),
            4,
            CancellationToken::new(),
        )
        .unwrap();
        new.process(&log.records(10, 15)).unwrap();
        // The old owner did not notice yet: the store refuses its token.
        assert!(matches!(
            old.process(&log.records(10, 20)),
            Err(ProcessorError::StaleOwner { .. })
        ));
        // Once its lost-token fires it does not even try.
        lost.cancel();
        assert!(matches!(
            old.process(&log.records(15, 20)),
            Err(ProcessorError::StaleOwner { .. })
        ));
        assert!(matches!(
            PartitionProcessor::resume(store.clone(), operator, 3, CancellationToken::new()),
            Err(ProcessorError::StaleOwner { .. })
        ));
        assert_eq!(store.meta().unwrap().unwrap().next_offset, 15);
    }

    #[test]
    fn out_of_order_and_foreign_records_are_refused() {
        let log = Log::new(5);
        let store: Arc<dyn PartitionStore> = Arc::new(InMemoryPartitionStore::new(0));
        let mut p = PartitionProcessor::resume(
            store.clone(),
            Arc::new(KeyedAggregation),
            1,
            CancellationToken::new(),
        )
        .unwrap();
        let mut records = log.records(0, 3);
        records.swap(1, 2);
        assert!(matches!(
            p.process(&records),
            Err(ProcessorError::InvalidInput { .. })
        ));
        assert_eq!(
            store.meta().unwrap(),
            None,
            "nothing of a refused batch is written"
        );
        let mut foreign = log.records(0, 1);
        foreign[0].partition = 9;
        assert!(p.process(&foreign).is_err());
    }
}
