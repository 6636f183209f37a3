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
use crate::operator::{Emitter, KeyPositions, Operator, Outcome, OutputMode, Record};
use crate::progress::Progress;
use crate::store::cache::LOOKUPS_AHEAD;
use crate::store::{PartitionState, PartitionStore};

/// The write-back cache budget of a partition unless configured: 8 MiB.
pub const DEFAULT_STATE_CACHE_BYTES: usize = 8 << 20;

/// Bytes a pending output is charged beyond its key and value (two vectors' headers).
const OUTPUT_OVERHEAD: usize = 48;

/// What the records applied since the last commit did, and — once committed — where the partition is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchReport {
    /// Records applied.
    pub applied: usize,
    /// Records skipped because they were below the stored offset (replays).
    pub skipped: usize,
    /// Malformed records, with their offset and why: for the dead-letter topic or log.
    pub dead_letters: Vec<(i64, String)>,
    /// Updated values to publish downstream (key, value), in the order the output mode keeps them.
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
    /// Commits written.
    pub batches: u64,
}

/// Processing of one owned partition: records are applied to a write-back cache of its state
/// ([`apply`](Self::apply)) and written, changed keys plus next offset in one atomic batch, by
/// [`commit`](Self::commit).
pub struct PartitionProcessor {
    state: PartitionState,
    operator: Arc<dyn Operator>,
    fencing_token: u64,
    lost: CancellationToken,
    /// The claim's safe deadline, read before every apply and commit (none: only `lost` counts).
    claim: Option<state::recipes::keeper::LockContext>,
    /// The first offset not yet committed.
    next_offset: i64,
    /// The first offset not yet applied (committed or not).
    applied_to: i64,
    pending: BatchReport,
    /// When the first record waiting for a commit was applied (`None`: nothing waits).
    pending_since: Option<tokio::time::Instant>,
    /// Bytes of the outputs waiting for the commit, charged to the state cache's budget.
    output_bytes: usize,
    positions: KeyPositions,
    emit: bool,
    output_mode: OutputMode,
    stats: PartitionStats,
    /// Beaten by every batch applied and every commit (read by the fleet's progress watchdog).
    progress: Arc<Progress>,
}

impl std::fmt::Debug for PartitionProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionProcessor")
            .field("partition", &self.state.partition())
            .field("fencing_token", &self.fencing_token)
            .field("next_offset", &self.next_offset)
            .field("applied_to", &self.applied_to)
            .field("stats", &self.stats)
            .finish()
    }
}

impl PartitionProcessor {
    /// Resumes `store` under ownership `fencing_token`: from the offset stored with the state, or 0 for a
    /// new store. `lost` is the ownership claim's lost-token. Outputs are kept per record and the
    /// state cache holds [`DEFAULT_STATE_CACHE_BYTES`] until configured otherwise.
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
        let next_offset = meta.map_or(0, |m| m.next_offset);
        Ok(PartitionProcessor {
            next_offset,
            applied_to: next_offset,
            state: PartitionState::new(store, DEFAULT_STATE_CACHE_BYTES),
            operator,
            fencing_token,
            lost,
            claim: None,
            pending: BatchReport::default(),
            pending_since: None,
            output_bytes: 0,
            positions: KeyPositions::default(),
            emit: true,
            output_mode: OutputMode::PerRecord,
            stats: PartitionStats::default(),
            progress: Arc::new(Progress::new()),
        })
    }

    /// Bounds the write-back cache to about `bytes` (see [`PartitionState`]).
    #[must_use]
    pub fn with_state_cache_bytes(mut self, bytes: usize) -> Self {
        let store = Arc::clone(self.state.store());
        self.state = PartitionState::new(store, bytes);
        self
    }

    /// Keeps outputs as `mode` says, or none at all with `emit` false (no output topic: operators skip
    /// building them).
    #[must_use]
    pub fn with_outputs(mut self, emit: bool, mode: OutputMode) -> Self {
        self.emit = emit;
        self.output_mode = mode;
        self
    }

    /// Beats `progress` at every batch applied and every commit, so that a watchdog can tell a partition
    /// that moves from one that hangs.
    #[must_use]
    pub fn with_progress(mut self, progress: Arc<Progress>) -> Self {
        self.progress = progress;
        self
    }

    /// The progress clock this processor beats.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// The first offset not yet committed: where a successor would consume from.
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// The first offset not yet applied (equal to [`next_offset`](Self::next_offset) when nothing waits
    /// for a commit): where this processor consumes from.
    pub fn applied_to(&self) -> i64 {
        self.applied_to
    }

    /// The partition.
    pub fn partition(&self) -> i32 {
        self.state.partition()
    }

    /// The ownership fencing token this processor writes under.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// Counters since resume (committed records only).
    pub fn stats(&self) -> PartitionStats {
        self.stats
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn PartitionStore> {
        self.state.store()
    }

    /// What the records applied since the last commit will publish: outputs and dead letters.
    pub fn pending(&self) -> &BatchReport {
        &self.pending
    }

    /// Whether records were applied (or skipped past) since the last commit.
    pub fn has_pending(&self) -> bool {
        self.applied_to > self.next_offset
    }

    /// Whether the changes and outputs waiting for a commit fill half the state cache's budget: commit
    /// before reading on. (Outputs kept per record grow with every record; charged to the same budget,
    /// the memory a partition holds for its next commit stays bounded however large the records.)
    pub fn wants_commit(&self) -> bool {
        self.state.wants_commit_holding(self.output_bytes)
    }

    /// When the oldest record waiting for a commit was applied; `None` when none waits. A commit
    /// policy's interval counts from here: no record waits longer, whatever the caller did in between.
    pub fn pending_since(&self) -> Option<tokio::time::Instant> {
        self.pending_since
    }

    /// Whether the operator reads records' headers ([`Operator::reads_headers`]): a consumer hands it
    /// records without them otherwise.
    pub fn reads_headers(&self) -> bool {
        self.operator.reads_headers()
    }

    /// Records (applied or dead letters) waiting for a commit.
    pub fn pending_records(&self) -> usize {
        self.pending.applied + self.pending.dead_letters.len()
    }

    /// Applies `records` (in offset order) and commits them as one atomic batch. Records below
    /// [`applied_to`](Self::applied_to) are skipped. Nothing is written once ownership is lost.
    ///
    /// # Errors
    /// [`ProcessorError::StaleOwner`] when ownership was lost; [`ProcessorError::InvalidInput`] for records
    /// out of order or of another partition; a store error (nothing since the last commit is written
    /// then).
    pub fn process(&mut self, records: &[Record<'_>]) -> ProcessorResult<BatchReport> {
        self.apply(records)?;
        self.commit()
    }

    /// Checks the claim's safe deadline too before every apply and commit: a claim whose renewal was
    /// delayed past it (a busy runtime) may already be another owner's, whatever `lost` says yet.
    #[must_use]
    pub fn with_claim(mut self, claim: state::recipes::keeper::LockContext) -> Self {
        self.claim = Some(claim);
        self
    }

    fn ensure_owner(&self) -> ProcessorResult<()> {
        if self.lost.is_cancelled() {
            return Err(ProcessorError::StaleOwner {
                partition: self.partition(),
                token: self.fencing_token,
                highest: self.fencing_token.saturating_add(1),
            });
        }
        if let Some(claim) = &self.claim {
            ensure_claim_current(claim, self.partition(), "commit")?;
        }
        Ok(())
    }

    /// Runs `records` through the operator into the state cache, writing nothing: their outputs and
    /// dead letters join [`pending`](Self::pending), for a caller that publishes them before
    /// [`commit`](Self::commit) (a crash in between replays the records and publishes them again).
    ///
    /// # Errors
    /// As [`process`](Self::process); after an error the records applied since the last commit are in
    /// an unknown state: [`discard_pending`](Self::discard_pending) or drop the processor.
    pub fn apply(&mut self, records: &[Record<'_>]) -> ProcessorResult<()> {
        self.ensure_owner()?;
        let partition = self.partition();
        let outputs_before = self.pending.outputs.len();
        for (at, record) in records.iter().enumerate() {
            // Most operators keep state under the record's key: those keys are looked up ahead.
            if at % LOOKUPS_AHEAD == 0 {
                let ahead = &records[at..records.len().min(at + LOOKUPS_AHEAD)];
                self.state.prefetch(ahead.iter().filter_map(|r| r.key));
            }
            if record.partition != partition {
                return Err(ProcessorError::InvalidInput {
                    what: "record",
                    reason: format!(
                        "offset {} belongs to partition {}, not {partition}",
                        record.offset, record.partition,
                    ),
                });
            }
            if record.offset < self.next_offset {
                self.pending.skipped += 1;
                continue;
            }
            if record.offset < self.applied_to {
                return Err(ProcessorError::InvalidInput {
                    what: "record",
                    reason: format!(
                        "offset {} after {}: out of order",
                        record.offset,
                        self.applied_to - 1
                    ),
                });
            }
            let mut out = Emitter::new(
                self.emit
                    .then_some((&mut self.pending.outputs, &mut self.positions)),
                self.output_mode,
            );
            match self.operator.apply(record, &mut self.state, &mut out)? {
                Outcome::Applied => self.pending.applied += 1,
                Outcome::DeadLetter { reason } => {
                    self.pending.dead_letters.push((record.offset, reason));
                }
            }
            self.applied_to = record.offset + 1;
        }
        if self.pending_since.is_none() && self.has_pending() {
            self.pending_since = Some(tokio::time::Instant::now());
        }
        // Outputs added (a replaced latest-per-key output changes little: the keys are bounded).
        self.output_bytes += self.pending.outputs[outputs_before..]
            .iter()
            .map(|(key, value)| OUTPUT_OVERHEAD + key.len() + value.len())
            .sum::<usize>();
        self.progress.beat();
        Ok(())
    }

    /// Writes everything applied since the last commit: the changed keys and the next offset in one
    /// atomic write under the fencing token. Returns what the commit covered.
    ///
    /// # Errors
    /// [`ProcessorError::StaleOwner`] when ownership was lost meanwhile; a store error. The processor
    /// must be dropped then: its cache holds changes the store does not.
    pub fn commit(&mut self) -> ProcessorResult<BatchReport> {
        self.ensure_owner()?;
        if self.applied_to > self.next_offset {
            self.state.commit(self.applied_to, self.fencing_token)?;
            self.next_offset = self.applied_to;
            self.stats.batches += 1;
        }
        let mut report = std::mem::take(&mut self.pending);
        self.pending_since = None;
        self.output_bytes = 0;
        self.positions.clear();
        self.stats.applied += report.applied as u64;
        self.stats.dead_letters += report.dead_letters.len() as u64;
        report.next_offset = self.next_offset;
        self.progress.beat();
        Ok(report)
    }

    /// Forgets everything applied since the last commit (its outputs could not be delivered): state
    /// changes, outputs, dead letters; processing continues from [`next_offset`](Self::next_offset).
    pub fn discard_pending(&mut self) {
        self.state.discard_changes();
        self.pending = BatchReport::default();
        self.pending_since = None;
        self.output_bytes = 0;
        self.positions.clear();
        self.applied_to = self.next_offset;
    }
}

/// `Ok` while `claim` is held and its safe deadline is ahead; [`ProcessorError::OwnershipLost`] once
/// it is lost, [`ProcessorError::ClaimLapsed`] once the deadline passed (counted in
/// `processor_claim_lapsed_steps_total{step}`): `step` must not act then.
///
/// # Errors
/// As above.
pub fn ensure_claim_current(
    claim: &state::recipes::keeper::LockContext,
    partition: i32,
    step: &'static str,
) -> ProcessorResult<()> {
    if claim.is_lost() {
        return Err(ProcessorError::OwnershipLost {
            partition,
            token: claim.fencing_token(),
        });
    }
    let now = tokio::time::Instant::now();
    let deadline = claim.valid_until();
    if now >= deadline {
        metrics::counter!("processor_claim_lapsed_steps_total", "step" => step).increment(1);
        return Err(ProcessorError::ClaimLapsed {
            partition,
            token: claim.fencing_token(),
            step,
            late_by: now - deadline,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregation::{Aggregate, KeyedAggregation};
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
                .map(|i| Record::new(0, i as i64, Some(&self.0[i].0), Some(&self.0[i].1)))
                .collect()
        }

        fn expected(&self) -> std::collections::BTreeMap<Vec<u8>, Aggregate> {
            let mut out = std::collections::BTreeMap::new();
            for (key, value) in &self.0 {
                if let Ok(amount) = crate::aggregation::parse_amount(Some(value)) {
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

    /// Emits a 1 KiB output per record, all under one key (state stays one small entry).
    struct BigOutputs;

    impl Operator for BigOutputs {
        fn apply(
            &self,
            _record: &Record<'_>,
            state: &mut PartitionState,
            out: &mut Emitter<'_>,
        ) -> ProcessorResult<Outcome> {
            state.put(b"k", vec![1]);
            out.emit(b"k", vec![0; 1024]);
            Ok(Outcome::Applied)
        }
    }

    #[test]
    fn outputs_kept_per_record_count_toward_the_commit_budget() {
        let store: Arc<dyn PartitionStore> = Arc::new(InMemoryPartitionStore::new(0));
        let mut processor =
            PartitionProcessor::resume(store, Arc::new(BigOutputs), 1, CancellationToken::new())
                .unwrap()
                .with_state_cache_bytes(64 << 10)
                .with_outputs(true, OutputMode::PerRecord);
        let log = Log::new(40);
        // 20 outputs of 1 KiB: under half of 64 KiB.
        processor.apply(&log.records(0, 20)).unwrap();
        assert!(!processor.wants_commit(), "20 KiB of 64 KiB waiting");
        // 40: over half.
        processor.apply(&log.records(20, 40)).unwrap();
        assert!(processor.wants_commit(), "40 KiB of 64 KiB waiting");
        let report = processor.commit().unwrap();
        assert_eq!(report.outputs.len(), 40);
        assert!(!processor.wants_commit(), "nothing waits after the commit");
        // Kept latest per key, one output whatever the records.
        let mut latest = processor.with_outputs(true, OutputMode::LatestPerKey);
        let log = Log::new(100);
        latest.apply(&log.records(40, 100)).unwrap();
        assert!(!latest.wants_commit(), "one output of 1 KiB waiting");
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
