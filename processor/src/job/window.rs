//! Event time and windows: [`WindowedAggregation`], the built-in aggregation per key *and* per window
//! of record time, written on the typed [`Job`] API.
//!
//! - **Windows** ([`Windows`]): tumbling (`size`) or hopping (`size`, `advance`), aligned to the Unix
//!   epoch, half-open `[start, end)`, by the record's timestamp.
//! - **Watermark**: per partition, the highest timestamp seen. A window *closes* once the watermark
//!   reaches `end + grace`; a record is applied to every window of its timestamp that is still open, so
//!   out-of-order records within the grace period are exact.
//! - **Late records** (every window of theirs closed) are counted (`processor_late_records_total`) and
//!   dead-lettered or dropped ([`LatePolicy`]).
//! - **Expiry**: a closed window's state is deleted in the same commit that closes it (its final result
//!   emitted first with [`EmitMode::OnClose`]): state holds the open windows only, however long the run.
//!
//! Everything — window aggregates, the watermark, the index of open windows — lives in the partition's
//! state and is written in the same atomic commit as the offset: exactly-once like the rest, and a
//! partition that moves resumes its windows where its last commit left them.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use processor::job::JobOperator;
//! use processor::job::window::{EmitMode, WindowedAggregation, Windows};
//! use processor::operator::Record;
//! use processor::partition::PartitionProcessor;
//! use processor::store::{PartitionStore, memory::InMemoryPartitionStore};
//!
//! # fn main() -> processor::ProcessorResult<()> {
//! let windows = Windows::tumbling(Duration::from_secs(60))?.with_grace(Duration::from_secs(10))?;
//! let job = WindowedAggregation::new(windows).with_emit(EmitMode::OnClose);
//! let store: Arc<dyn PartitionStore> = Arc::new(InMemoryPartitionStore::new(0));
//! let mut partition = PartitionProcessor::resume(store, Arc::new(JobOperator::new(job)), 1, Default::default())?;
//! let at = |offset, seconds: i64, amount: &'static [u8]| {
//!     Record::new(0, offset, Some(b"acct-1"), Some(amount)).with_timestamp(seconds * 1_000)
//! };
//! let report = partition.process(&[
//!     at(0, 5, b"10"),
//!     at(1, 65, b"7"),  // the next minute: the first one is not closed yet (grace)
//!     at(2, 50, b"1"),  // out of order, within the grace period: counted in the first minute
//!     at(3, 75, b"2"),  // the watermark passes 60 + 10 s: the first minute closes
//!     at(4, 30, b"99"), // late: its minute is closed
//! ])?;
//! assert_eq!(report.outputs.len(), 1); // the first minute's final result
//! let first: serde_json::Value = serde_json::from_slice(&report.outputs[0].1).unwrap();
//! assert_eq!((first["start"].as_i64(), first["count"].as_u64(), first["sum"].as_i64()), (Some(0), Some(2), Some(11)));
//! assert_eq!(report.dead_letters.len(), 1);
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::codec::{DecimalI64, Json, Skip};
use super::{Context, Input, Job, JobError};
use crate::aggregation::{Aggregate, AggregateCodec};
use crate::error::{ProcessorError, ProcessorResult};
use crate::store::PartitionState;

/// The window layout: size, advance and grace, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    size: i64,
    advance: i64,
    grace: i64,
}

/// `duration` in whole milliseconds, at least `least`.
fn millis(what: &'static str, duration: Duration, least: i64) -> ProcessorResult<i64> {
    i64::try_from(duration.as_millis())
        .ok()
        .filter(|ms| *ms >= least)
        .ok_or_else(|| ProcessorError::InvalidInput {
            what,
            reason: format!(
                "{duration:?}: give at least {least} ms, and at most i64::MAX milliseconds"
            ),
        })
}

impl Windows {
    /// Back-to-back windows of `size` (each record in exactly one), no grace.
    ///
    /// # Errors
    /// [`ProcessorError::InvalidInput`] for a size under 1 ms or beyond `i64` milliseconds.
    pub fn tumbling(size: Duration) -> ProcessorResult<Self> {
        let size = millis("window size", size, 1)?;
        Ok(Windows {
            size,
            advance: size,
            grace: 0,
        })
    }

    /// Windows of `size` starting every `advance` (each record in `size / advance` windows), no grace.
    ///
    /// # Errors
    /// [`ProcessorError::InvalidInput`] unless 1 ms ≤ `advance` ≤ `size`.
    pub fn hopping(size: Duration, advance: Duration) -> ProcessorResult<Self> {
        let size = millis("window size", size, 1)?;
        let advance = millis("window advance", advance, 1)?;
        if advance > size {
            return Err(ProcessorError::InvalidInput {
                what: "window advance",
                reason: format!(
                    "{advance} ms is longer than the window ({size} ms): records between windows would belong to none"
                ),
            });
        }
        Ok(Windows {
            size,
            advance,
            grace: 0,
        })
    }

    /// The same windows, accepting out-of-order records until the watermark passes a window's end by
    /// `grace`.
    ///
    /// # Errors
    /// [`ProcessorError::InvalidInput`] for a grace beyond `i64` milliseconds.
    pub fn with_grace(mut self, grace: Duration) -> ProcessorResult<Self> {
        self.grace = millis("window grace", grace, 0)?;
        Ok(self)
    }

    /// The starts of the windows holding `timestamp`, latest first.
    fn starts_of(&self, timestamp: i64) -> impl Iterator<Item = i64> + '_ {
        let last = timestamp.div_euclid(self.advance) * self.advance;
        std::iter::successors(Some(last), |start| start.checked_sub(self.advance))
            .take_while(move |start| start.saturating_add(self.size) > timestamp)
    }

    /// Whether the window ending at `end` is closed at `watermark`.
    fn closed(&self, end: i64, watermark: i64) -> bool {
        end.saturating_add(self.grace) <= watermark
    }
}

/// What happens to a late record (every window of its timestamp closed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum LatePolicy {
    /// Dead-lettered with its timestamp and the watermark.
    #[default]
    DeadLetter,
    /// Dropped (still counted).
    Drop,
}

/// When a window's result is published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum EmitMode {
    /// After every record (the running result, `"final": false`), and once more when it closes.
    #[default]
    EveryUpdate,
    /// Only when the window closes (`"final": true`): one result per key and window.
    OnClose,
}

/// One window's result, published under the record's key as JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowResult {
    /// The window's start (inclusive), milliseconds since the Unix epoch.
    pub start: i64,
    /// Its end (exclusive).
    pub end: i64,
    /// The aggregate of the window's records.
    #[serde(flatten)]
    pub aggregate: Aggregate,
    /// Whether the window is closed (this is its last result).
    #[serde(rename = "final")]
    pub is_final: bool,
}

/// The built-in aggregation (count, sum, min, max, chain) per key and window of record time; see the
/// [module docs](self). The record's value is a decimal `i64`; a record without a timestamp is refused
/// (dead-lettered).
#[derive(Debug, Clone, Copy)]
pub struct WindowedAggregation {
    windows: Windows,
    late: LatePolicy,
    emit: EmitMode,
}

impl WindowedAggregation {
    /// The aggregation over `windows`, late records dead-lettered, results after every update.
    pub fn new(windows: Windows) -> Self {
        WindowedAggregation {
            windows,
            late: LatePolicy::DeadLetter,
            emit: EmitMode::EveryUpdate,
        }
    }

    /// The same with `late` records handled so.
    #[must_use]
    pub fn with_late_policy(mut self, late: LatePolicy) -> Self {
        self.late = late;
        self
    }

    /// The same publishing results `emit`.
    #[must_use]
    pub fn with_emit(mut self, emit: EmitMode) -> Self {
        self.emit = emit;
        self
    }

    /// The windows.
    pub fn windows(&self) -> Windows {
        self.windows
    }
}

// The state layout (one partition's keys; every key starts with a tag byte):
// - `0x01 start key…`        a window's aggregate (fixed-width), start as order-preserving big-endian;
// - `0x00 'm'`               the partition's windowing meta: watermark, lowest and highest open end;
// - `0x00 'i' end`           how many index chunks the windows ending at `end` have (u32 BE);
// - `0x00 'i' end chunk`     a chunk of the keys with a window ending at `end`: (u32 LE length, key)*.
const WINDOW_TAG: u8 = 0x01;
const META_KEY: &[u8] = b"\x00m";
const INDEX_TAG: &[u8] = b"\x00i";
/// A chunk of the open-window index holds about this many bytes of keys: appending copies one chunk.
const INDEX_CHUNK_BYTES: usize = 2_048;

/// An `i64` as big-endian bytes that sort like the numbers.
fn ordered(value: i64) -> [u8; 8] {
    ((value as u64) ^ (1 << 63)).to_be_bytes()
}

fn window_key(start: i64, key: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(9 + key.len());
    bytes.push(WINDOW_TAG);
    bytes.extend_from_slice(&ordered(start));
    bytes.extend_from_slice(key);
    bytes
}

fn index_key(end: i64, chunk: Option<u32>) -> Vec<u8> {
    let mut bytes = INDEX_TAG.to_vec();
    bytes.extend_from_slice(&ordered(end));
    if let Some(chunk) = chunk {
        bytes.extend_from_slice(&chunk.to_be_bytes());
    }
    bytes
}

/// The partition's watermark and the range of window ends that may still be open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Meta {
    watermark: Option<i64>,
    /// The lowest end with open windows, and the highest (`None`: no window is open).
    open_ends: Option<(i64, i64)>,
}

impl Meta {
    const LEN: usize = 25;

    fn load(state: &mut PartitionState) -> ProcessorResult<Meta> {
        let Some(bytes) = state.get(META_KEY)? else {
            return Ok(Meta::default());
        };
        let bytes: &[u8; Meta::LEN] = bytes.try_into().map_err(|_| {
            ProcessorError::decode(
                "the windowing meta",
                format!("{} bytes, expected {}", bytes.len(), Meta::LEN),
            )
        })?;
        let int = |at: usize| {
            let mut field = [0u8; 8];
            field.copy_from_slice(&bytes[at..at + 8]);
            i64::from_le_bytes(field)
        };
        let flags = bytes[0];
        Ok(Meta {
            watermark: (flags & 1 != 0).then(|| int(1)),
            open_ends: (flags & 2 != 0).then(|| (int(9), int(17))),
        })
    }

    fn store(&self, state: &mut PartitionState) {
        let mut bytes = [0u8; Meta::LEN];
        bytes[0] = u8::from(self.watermark.is_some()) | (u8::from(self.open_ends.is_some()) << 1);
        bytes[1..9].copy_from_slice(&self.watermark.unwrap_or(0).to_le_bytes());
        let (low, high) = self.open_ends.unwrap_or((0, 0));
        bytes[9..17].copy_from_slice(&low.to_le_bytes());
        bytes[17..25].copy_from_slice(&high.to_le_bytes());
        state.put_slice(META_KEY, &bytes);
    }

    fn note_open(&mut self, end: i64) {
        self.open_ends = Some(match self.open_ends {
            None => (end, end),
            Some((low, high)) => (low.min(end), high.max(end)),
        });
    }
}

/// Adds `key` to the index of windows ending at `end`.
fn index_add(state: &mut PartitionState, end: i64, key: &[u8]) -> ProcessorResult<()> {
    let header = index_key(end, None);
    let chunks = read_chunk_count(state, &header)?;
    let mut last = chunks.checked_sub(1);
    let mut record = Vec::with_capacity(4 + key.len());
    let length = u32::try_from(key.len()).map_err(|_| ProcessorError::InvalidInput {
        what: "record key",
        reason: format!("{} bytes: longer than a window index can hold", key.len()),
    })?;
    record.extend_from_slice(&length.to_le_bytes());
    record.extend_from_slice(key);
    if let Some(chunk) = last {
        let mut entry = state.entry(&index_key(end, Some(chunk)))?;
        let current = entry.value().unwrap_or_default();
        if current.len() + record.len() <= INDEX_CHUNK_BYTES {
            let mut grown = Vec::with_capacity(current.len() + record.len());
            grown.extend_from_slice(current);
            grown.extend_from_slice(&record);
            entry.set(&grown);
            return Ok(());
        }
    }
    let chunk = last.map_or(0, |chunk| chunk + 1);
    last = Some(chunk);
    state.put_slice(&index_key(end, last), &record);
    state.put_slice(&header, &(chunk + 1).to_be_bytes());
    Ok(())
}

fn read_chunk_count(state: &mut PartitionState, header: &[u8]) -> ProcessorResult<u32> {
    match state.get(header)? {
        None => Ok(0),
        Some(bytes) => bytes.try_into().map(u32::from_be_bytes).map_err(|_| {
            ProcessorError::decode("a window index header", format!("{} bytes", bytes.len()))
        }),
    }
}

/// The keys with a window ending at `end`, and the index entries gone with them.
fn index_take(state: &mut PartitionState, end: i64) -> ProcessorResult<Vec<Vec<u8>>> {
    let header = index_key(end, None);
    let chunks = read_chunk_count(state, &header)?;
    let mut keys = Vec::new();
    for chunk in 0..chunks {
        let chunk_key = index_key(end, Some(chunk));
        if let Some(mut bytes) = state.get(&chunk_key)? {
            while bytes.len() >= 4 {
                let length = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
                let key = bytes.get(4..4 + length).ok_or_else(|| {
                    ProcessorError::decode("a window index chunk", "a key cut short")
                })?;
                keys.push(key.to_vec());
                bytes = &bytes[4 + length..];
            }
        }
        state.delete(&chunk_key);
    }
    state.delete(&header);
    Ok(keys)
}

impl WindowedAggregation {
    /// Closes every window ending at or before `watermark - grace`: publishes the finals (when asked
    /// for), deletes their state and index.
    fn expire(
        &self,
        ctx: &mut Context<'_, Self>,
        meta: &mut Meta,
        watermark: i64,
    ) -> ProcessorResult<()> {
        while let Some((low, high)) = meta.open_ends {
            if !self.windows.closed(low, watermark) {
                break;
            }
            let start = low - self.windows.size;
            for key in index_take(ctx.raw_state(), low)? {
                let window = window_key(start, &key);
                let state = ctx.raw_state();
                if let Some(bytes) = state.get(&window)? {
                    let aggregate = Aggregate::decode(bytes)?;
                    state.delete(&window);
                    self.publish(ctx, &key, start, aggregate, true)?;
                }
            }
            metrics::counter!("processor_windows_closed_total").increment(1);
            let next = low.saturating_add(self.windows.advance);
            meta.open_ends = (next <= high).then_some((next, high));
        }
        Ok(())
    }

    fn publish(
        &self,
        ctx: &mut Context<'_, Self>,
        key: &[u8],
        start: i64,
        aggregate: Aggregate,
        is_final: bool,
    ) -> ProcessorResult<()> {
        if !ctx.outputs_enabled() || (self.emit == EmitMode::OnClose && !is_final) {
            return Ok(());
        }
        let result = WindowResult {
            start,
            end: start.saturating_add(self.windows.size),
            aggregate,
            is_final,
        };
        let value = serde_json::to_vec(&result)
            .map_err(|err| ProcessorError::encode("a window result", err))?;
        ctx.emit_raw(key, value);
        Ok(())
    }
}

impl Job for WindowedAggregation {
    type Key = ();
    type KeyCodec = Skip;
    type Value = i64;
    type ValueCodec = DecimalI64;
    type State = Aggregate;
    type StateCodec = AggregateCodec;
    type Output = WindowResult;
    type OutputCodec = Json;

    fn process(
        &self,
        input: Input<'_, (), i64>,
        ctx: &mut Context<'_, Self>,
    ) -> Result<(), JobError> {
        let Some(timestamp) = input.timestamp else {
            return Err(JobError::reject(
                "no timestamp: windows need the record's time",
            ));
        };
        let mut meta = Meta::load(ctx.raw_state())?;
        let watermark = meta.watermark.map_or(timestamp, |w| w.max(timestamp));
        let windows = self.windows;
        let open: Vec<i64> = windows
            .starts_of(timestamp)
            .filter(|start| !windows.closed(start.saturating_add(windows.size), watermark))
            .collect();
        if open.is_empty() {
            metrics::counter!("processor_late_records_total").increment(1);
            return match self.late {
                LatePolicy::DeadLetter => Err(JobError::reject(format!(
                    "late: timestamp {timestamp} ms, every window of it closed (watermark {watermark} ms, grace {} ms)",
                    windows.grace
                ))),
                LatePolicy::Drop => Ok(()),
            };
        }
        meta.watermark = Some(watermark);
        for start in open.into_iter().rev() {
            let end = start.saturating_add(windows.size);
            let window = window_key(start, input.raw_key);
            let mut entry = ctx.raw_state().entry(&window)?;
            let is_new = entry.value().is_none();
            let aggregate = entry
                .value()
                .map(Aggregate::decode)
                .transpose()?
                .unwrap_or_default()
                .with_amount(input.value);
            entry.set(&aggregate.encode_fixed());
            if is_new {
                index_add(ctx.raw_state(), end, input.raw_key)?;
                meta.note_open(end);
            }
            self.publish(ctx, input.raw_key, start, aggregate, false)?;
        }
        self.expire(ctx, &mut meta, watermark)?;
        meta.store(ctx.raw_state());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_hold_the_timestamps_they_should() {
        let hopping =
            Windows::hopping(Duration::from_millis(10), Duration::from_millis(5)).unwrap();
        assert_eq!(hopping.starts_of(12).collect::<Vec<_>>(), vec![10, 5]);
        assert_eq!(hopping.starts_of(10).collect::<Vec<_>>(), vec![10, 5]);
        assert_eq!(hopping.starts_of(-3).collect::<Vec<_>>(), vec![-5, -10]);
        let tumbling = Windows::tumbling(Duration::from_millis(10)).unwrap();
        assert_eq!(tumbling.starts_of(19).collect::<Vec<_>>(), vec![10]);
        assert_eq!(tumbling.starts_of(20).collect::<Vec<_>>(), vec![20]);
    }

    #[test]
    fn a_bad_layout_is_one_clear_error() {
        assert!(Windows::tumbling(Duration::ZERO).is_err());
        assert!(Windows::tumbling(Duration::from_micros(500)).is_err());
        let err = Windows::hopping(Duration::from_secs(1), Duration::from_secs(2)).unwrap_err();
        assert!(err.to_string().contains("window advance"), "{err}");
        assert!(
            Windows::tumbling(Duration::from_secs(1))
                .unwrap()
                .with_grace(Duration::ZERO)
                .is_ok()
        );
    }

    #[test]
    fn keys_order_like_their_times() {
        assert!(ordered(-1) < ordered(0));
        assert!(ordered(i64::MIN) < ordered(i64::MAX));
    }
}
