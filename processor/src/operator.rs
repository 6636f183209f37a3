//! What the processor does with each record: the [`Operator`] trait, the [`Record`] it gets and the
//! [`Emitter`] its outputs go through. The built-in keyed aggregation is in [`crate::aggregation`];
//! typed jobs in [`crate::job`].
//!
//! An operator reads and writes the partition's state through [`PartitionState`] (a write-back cache with
//! read-your-writes) and emits outputs through an [`Emitter`]. The partition commits the changed keys
//! together with the next offset, atomically, so an operator never has to think about exactly-once: it
//! only has to be deterministic.

use crate::error::ProcessorResult;
use crate::store::PartitionState;

/// One consumed record, borrowed from the consumer's buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Record<'a> {
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
    /// The key, if any.
    pub key: Option<&'a [u8]>,
    /// The value, if any.
    pub value: Option<&'a [u8]>,
    /// The record's timestamp in milliseconds since the Unix epoch (its producer's create time, or the
    /// broker's append time when the topic says so), if it has one: the event time of windows.
    pub timestamp: Option<i64>,
    /// Its headers, in the order they were produced.
    pub headers: &'a [Header<'a>],
}

/// One header of a [`Record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// The header's name.
    pub name: &'a str,
    /// Its value (`None`: a null value).
    pub value: Option<&'a [u8]>,
}

impl<'a> Record<'a> {
    /// A record at `offset` of `partition`, with no timestamp and no headers.
    pub fn new(
        partition: i32,
        offset: i64,
        key: Option<&'a [u8]>,
        value: Option<&'a [u8]>,
    ) -> Self {
        Record {
            partition,
            offset,
            key,
            value,
            timestamp: None,
            headers: &[],
        }
    }

    /// The same record with `timestamp` (milliseconds since the Unix epoch).
    #[must_use]
    pub fn with_timestamp(mut self, timestamp: i64) -> Self {
        self.timestamp = Some(timestamp);
        self
    }

    /// The same record with `headers`.
    #[must_use]
    pub fn with_headers(mut self, headers: &'a [Header<'a>]) -> Self {
        self.headers = headers;
        self
    }

    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .find(|header| header.name == name)
            .and_then(|header| header.value)
    }
}

/// What became of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The record updated the state (and may have emitted outputs).
    Applied,
    /// The record is malformed: it goes to the dead-letter topic (or log) and the partition moves on.
    DeadLetter {
        /// Why.
        reason: String,
    },
}

/// How outputs are kept between two commits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutputMode {
    /// Every output, in record order (a key updated 10 times between commits is published 10 times).
    #[default]
    PerRecord,
    /// The latest output per key per commit, in the order keys were first updated (Kafka Streams' record
    /// cache does this): fewer, equally final records downstream.
    LatestPerKey,
}

/// Where each key's output sits among the pending outputs ([`OutputMode::LatestPerKey`]).
pub(crate) type KeyPositions = hashbrown::HashMap<Vec<u8>, usize>;

/// The outputs emitted since the last commit, and where each key's sits.
pub(crate) type PendingOutputs<'a> = (&'a mut Vec<(Vec<u8>, Vec<u8>)>, &'a mut KeyPositions);

/// Where an operator's outputs go: to the partition's pending outputs when the partition has an output
/// topic, nowhere otherwise ([`enabled`](Self::enabled) says which, so an operator can skip building
/// them).
pub struct Emitter<'a> {
    pending: Option<PendingOutputs<'a>>,
    mode: OutputMode,
}

impl std::fmt::Debug for Emitter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emitter")
            .field("enabled", &self.enabled())
            .field("mode", &self.mode)
            .finish()
    }
}

impl<'a> Emitter<'a> {
    pub(crate) fn new(pending: Option<PendingOutputs<'a>>, mode: OutputMode) -> Self {
        Emitter { pending, mode }
    }

    /// An emitter that drops everything (tests, replays).
    pub fn discarding() -> Emitter<'static> {
        Emitter {
            pending: None,
            mode: OutputMode::PerRecord,
        }
    }

    /// This emitter, borrowed for a shorter time (to hand to a callee that keeps it).
    pub fn reborrow(&mut self) -> Emitter<'_> {
        Emitter {
            pending: self
                .pending
                .as_mut()
                .map(|(outputs, positions)| (&mut **outputs, &mut **positions)),
            mode: self.mode,
        }
    }

    /// Whether emitted outputs go anywhere.
    pub fn enabled(&self) -> bool {
        self.pending.is_some()
    }

    /// Publishes `value` under `key` downstream (at the partition's next commit).
    pub fn emit(&mut self, key: &[u8], value: Vec<u8>) {
        let Some((outputs, positions)) = self.pending.as_mut() else {
            return;
        };
        match self.mode {
            OutputMode::PerRecord => outputs.push((key.to_vec(), value)),
            OutputMode::LatestPerKey => match positions.get(key) {
                Some(&at) => outputs[at].1 = value,
                None => {
                    positions.insert(key.to_vec(), outputs.len());
                    outputs.push((key.to_vec(), value));
                }
            },
        }
    }
}

/// A user-pluggable record processor. Must be deterministic: the same records in the same order give the
/// same state, whichever instance applies them.
///
/// A count per key, published as text when the partition has an output topic:
///
/// ```
/// use std::sync::Arc;
/// use processor::operator::{Emitter, Operator, Outcome, Record};
/// use processor::partition::PartitionProcessor;
/// use processor::store::{PartitionState, PartitionStore};
/// use processor::store::memory::InMemoryPartitionStore;
/// use processor::ProcessorResult;
///
/// struct CountPerKey;
///
/// impl Operator for CountPerKey {
///     fn apply(
///         &self,
///         record: &Record<'_>,
///         state: &mut PartitionState,
///         out: &mut Emitter<'_>,
///     ) -> ProcessorResult<Outcome> {
///         let Some(key) = record.key else {
///             return Ok(Outcome::DeadLetter { reason: "no key".to_owned() });
///         };
///         let count = state
///             .get(key)?
///             .and_then(|bytes| bytes.try_into().ok())
///             .map_or(0, u64::from_le_bytes)
///             + 1;
///         state.put(key, count.to_le_bytes().to_vec()); // read back at once; written at the commit
///         if out.enabled() {
///             out.emit(key, count.to_string().into_bytes());
///         }
///         Ok(Outcome::Applied)
///     }
/// }
///
/// # fn main() -> ProcessorResult<()> {
/// let store: Arc<dyn PartitionStore> = Arc::new(InMemoryPartitionStore::new(0));
/// let mut partition = PartitionProcessor::resume(
///     store.clone(),
///     Arc::new(CountPerKey),
///     1,
///     Default::default(),
/// )?;
/// let records: Vec<Record<'_>> = (0..3)
///     .map(|offset| Record::new(0, offset, Some(b"k"), None))
///     .collect();
/// let report = partition.process(&records)?; // applied, then ONE write: the changed key + offset 3
/// assert_eq!(report.outputs.len(), 3);
/// assert_eq!(store.get(b"k")?, Some(3u64.to_le_bytes().to_vec()));
/// assert_eq!(store.meta()?.map(|meta| meta.next_offset), Some(3));
/// # Ok(())
/// # }
/// ```
pub trait Operator: Send + Sync {
    /// Applies `record` to `state` (reads see every earlier record's writes, committed or not) and
    /// emits its outputs, if any, through `out`.
    ///
    /// # Errors
    /// A store error (nothing since the last commit is written then, and the partition stops).
    fn apply(
        &self,
        record: &Record<'_>,
        state: &mut PartitionState,
        out: &mut Emitter<'_>,
    ) -> ProcessorResult<Outcome>;

    /// A stored value as JSON, for queries of live state (`None`: the query shows its bytes in hex).
    fn render_state(&self, value: &[u8]) -> Option<serde_json::Value> {
        let _ = value;
        None
    }

    /// Whether [`apply`](Self::apply) reads [`Record::headers`] (the default: yes). An operator that
    /// never does says `false` and gets every record without headers: librdkafka parses a message's
    /// headers only when asked, and asking costs an allocation per message even when it has none.
    fn reads_headers(&self) -> bool {
        true
    }
}
