//! The built-in job: per key, `{count, sum, min, max, chain}` of decimal `i64` amounts
//! ([`KeyedAggregation`]), written on the typed [`Job`](crate::job::Job) API like any user's job, and the
//! [`Aggregate`] it keeps (a compact fixed-width encoding in state, JSON downstream).

use serde::{Deserialize, Serialize};

use crate::error::{ProcessorError, ProcessorResult};
use crate::operator::{Emitter, Operator, Outcome, Record};
use crate::store::PartitionState;

/// The FNV-style multiplier of the order-sensitive chain digest.
pub const CHAIN_MULTIPLIER: u64 = 1_099_511_628_211;

/// The built-in job's state per key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aggregate {
    /// Records seen.
    pub count: u64,
    /// Their sum (wrapping).
    pub sum: i64,
    /// The smallest amount.
    pub min: i64,
    /// The largest amount.
    pub max: i64,
    /// `chain = chain * 1_099_511_628_211 + amount` (wrapping) in offset order, from 0: catches duplicates,
    /// drops and reordering that sums miss.
    pub chain: u64,
}

/// First byte of the fixed-width aggregate encoding. bincode's variable-length integers never start
/// with it, so values written by earlier releases (bincode) still decode.
const FIXED_WIDTH_TAG: u8 = 0xFF;
/// Length of the fixed-width encoding: the tag and five 8-byte little-endian fields.
const FIXED_WIDTH_LEN: usize = 41;

impl Aggregate {
    /// The aggregate after one more `amount`.
    pub fn with_amount(self, amount: i64) -> Aggregate {
        let first = self.count == 0;
        Aggregate {
            count: self.count + 1,
            sum: self.sum.wrapping_add(amount),
            min: if first { amount } else { self.min.min(amount) },
            max: if first { amount } else { self.max.max(amount) },
            chain: self
                .chain
                .wrapping_mul(CHAIN_MULTIPLIER)
                .wrapping_add(amount as u64),
        }
    }

    /// Encodes in the compact fixed-width form (41 bytes: a tag and the five fields, little-endian):
    /// no serde on the hot path.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_fixed().to_vec()
    }

    /// [`encode`](Self::encode) without an allocation.
    pub fn encode_fixed(&self) -> [u8; 41] {
        let mut bytes = [0u8; FIXED_WIDTH_LEN];
        bytes[0] = FIXED_WIDTH_TAG;
        let fields = [
            self.count,
            self.sum as u64,
            self.min as u64,
            self.max as u64,
            self.chain,
        ];
        for (i, field) in fields.into_iter().enumerate() {
            bytes[1 + 8 * i..9 + 8 * i].copy_from_slice(&field.to_le_bytes());
        }
        bytes
    }

    /// Decodes the fixed-width form, or the bincode form earlier releases wrote.
    ///
    /// # Errors
    /// [`ProcessorError::Codec`] for undecodable bytes.
    pub fn decode(bytes: &[u8]) -> ProcessorResult<Aggregate> {
        if bytes.first() == Some(&FIXED_WIDTH_TAG) {
            let fields: Option<[u64; 5]> = (bytes.len() == FIXED_WIDTH_LEN).then(|| {
                std::array::from_fn(|i| {
                    let at = 1 + 8 * i;
                    let mut field = [0u8; 8];
                    field.copy_from_slice(&bytes[at..at + 8]);
                    u64::from_le_bytes(field)
                })
            });
            let [count, sum, min, max, chain] = fields.ok_or_else(|| {
                ProcessorError::decode(
                    "an aggregate",
                    format!("{} bytes, expected {FIXED_WIDTH_LEN}", bytes.len()),
                )
            })?;
            return Ok(Aggregate {
                count,
                sum: sum as i64,
                min: min as i64,
                max: max as i64,
                chain,
            });
        }
        bincode::serde::decode_from_slice(bytes, bincode::config::standard())
            .map(|(aggregate, _)| aggregate)
            .map_err(|err| ProcessorError::decode("an aggregate", err))
    }

    /// The output-topic form: JSON (`{"count":…,"sum":…,"min":…,"max":…,"chain":…}`), readable by any
    /// downstream consumer (the state keeps the compact fixed-width form).
    ///
    /// # Errors
    /// Never in practice; an encoding error otherwise.
    pub fn to_json(&self) -> ProcessorResult<Vec<u8>> {
        serde_json::to_vec(self).map_err(|err| ProcessorError::encode("an aggregate", err))
    }
}

/// The built-in job: key = entity id, value = a decimal `i64` amount; per key `{count, sum, min, max,
/// chain}`, published after each record as JSON ([`Aggregate::to_json`]). Anything else goes to the dead
/// letters.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyedAggregation;

/// Parses a record value as a decimal `i64`.
///
/// # Errors
/// A human-readable reason for anything else.
pub fn parse_amount(value: Option<&[u8]>) -> Result<i64, String> {
    use crate::job::Codec as _;
    let value = value.ok_or("no value")?;
    crate::job::codec::DecimalI64::decode(value).map_err(|err| err.to_string())
}

/// The built-in job is written on the typed [`Job`](crate::job::Job) API like any user's: the key is
/// grouped by but never decoded, the value is a [`DecimalI64`](crate::job::codec::DecimalI64), the
/// state is an [`Aggregate`] in its fixed-width form, the output its JSON.
impl crate::job::Job for KeyedAggregation {
    type Key = ();
    type KeyCodec = crate::job::codec::Skip;
    type Value = i64;
    type ValueCodec = crate::job::codec::DecimalI64;
    type State = Aggregate;
    type StateCodec = AggregateCodec;
    type Output = Aggregate;
    type OutputCodec = crate::job::codec::Json;

    fn process(
        &self,
        input: crate::job::Input<'_, (), i64>,
        ctx: &mut crate::job::Context<'_, Self>,
    ) -> Result<(), crate::job::JobError> {
        let amount = input.value;
        let after =
            ctx.update_state(|before| Some(before.unwrap_or_default().with_amount(amount)))?;
        if let Some(after) = after {
            ctx.emit(&after)?;
        }
        Ok(())
    }

    fn render_state(&self, state: &Aggregate) -> Option<serde_json::Value> {
        serde_json::to_value(state).ok()
    }

    /// The aggregation reads keys and amounts only.
    fn reads_headers(&self) -> bool {
        false
    }
}

/// The built-in job as an [`Operator`]: through [`JobOperator`](crate::job::JobOperator), as any job.
impl Operator for KeyedAggregation {
    fn apply(
        &self,
        record: &Record<'_>,
        state: &mut PartitionState,
        out: &mut Emitter<'_>,
    ) -> ProcessorResult<Outcome> {
        crate::job::JobOperator::new(*self).apply(record, state, out)
    }

    fn render_state(&self, value: &[u8]) -> Option<serde_json::Value> {
        crate::job::JobOperator::new(*self).render_state(value)
    }

    fn reads_headers(&self) -> bool {
        crate::job::Job::reads_headers(self)
    }
}

/// How the built-in job stores an [`Aggregate`]: the fixed-width form ([`Aggregate::encode_fixed`]);
/// reads the bincode form of earlier releases too.
#[derive(Debug, Clone, Copy, Default)]
pub struct AggregateCodec;

impl crate::job::Codec<Aggregate> for AggregateCodec {
    fn encode(value: &Aggregate, into: &mut Vec<u8>) -> Result<(), crate::error::BoxError> {
        into.extend_from_slice(&value.encode_fixed());
        Ok(())
    }

    fn decode(bytes: &[u8]) -> Result<Aggregate, crate::error::BoxError> {
        Aggregate::decode(bytes).map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::{KeyPositions, OutputMode};
    use crate::store::PartitionStore;
    use crate::store::memory::InMemoryPartitionStore;
    use std::sync::Arc;

    fn record<'a>(offset: i64, key: &'a [u8], value: &'a [u8]) -> Record<'a> {
        Record::new(0, offset, Some(key), Some(value))
    }

    fn state() -> PartitionState {
        let store: Arc<dyn PartitionStore> = Arc::new(InMemoryPartitionStore::new(0));
        PartitionState::new(store, 1 << 20)
    }

    #[test]
    fn aggregates_in_order_and_chain_catches_reordering() {
        let a = Aggregate::default()
            .with_amount(5)
            .with_amount(-3)
            .with_amount(10);
        assert_eq!((a.count, a.sum, a.min, a.max), (3, 12, -3, 10));
        let reordered = Aggregate::default()
            .with_amount(-3)
            .with_amount(5)
            .with_amount(10);
        assert_eq!(reordered.sum, a.sum);
        assert_ne!(reordered.chain, a.chain, "the chain sees the order");
        let duplicated = Aggregate::default()
            .with_amount(5)
            .with_amount(5)
            .with_amount(-3)
            .with_amount(10);
        assert_ne!(duplicated.chain, a.chain);
        let expected = ((5u64.wrapping_mul(CHAIN_MULTIPLIER)).wrapping_add(-3i64 as u64))
            .wrapping_mul(CHAIN_MULTIPLIER)
            .wrapping_add(10);
        assert_eq!(a.chain, expected);
    }

    #[test]
    fn fixed_width_encoding_round_trips_and_earlier_bincode_values_still_decode() {
        let a = Aggregate::default().with_amount(i64::MIN).with_amount(7);
        let bytes = a.encode();
        assert_eq!(bytes.len(), 41);
        assert_eq!(Aggregate::decode(&bytes).unwrap(), a);
        let earlier = bincode::serde::encode_to_vec(a, bincode::config::standard()).unwrap();
        assert_eq!(Aggregate::decode(&earlier).unwrap(), a);
        assert!(Aggregate::decode(&bytes[..40]).is_err());
    }

    #[test]
    fn one_key_twice_before_a_commit_sees_its_own_update() {
        let mut state = state();
        let (mut outputs, mut positions) = (Vec::new(), KeyPositions::default());
        let mut out = Emitter::new(Some((&mut outputs, &mut positions)), OutputMode::PerRecord);
        KeyedAggregation
            .apply(&record(0, b"k", b"4"), &mut state, &mut out)
            .unwrap();
        KeyedAggregation
            .apply(&record(1, b"k", b"6"), &mut state, &mut out)
            .unwrap();
        let agg = Aggregate::decode(state.get(b"k").unwrap().unwrap()).unwrap();
        assert_eq!((agg.count, agg.sum), (2, 10));
        assert_eq!(outputs.len(), 2, "one output per record");
    }

    #[test]
    fn latest_per_key_keeps_one_output_per_key_in_first_update_order() {
        let mut state = state();
        let (mut outputs, mut positions) = (Vec::new(), KeyPositions::default());
        let mut out = Emitter::new(
            Some((&mut outputs, &mut positions)),
            OutputMode::LatestPerKey,
        );
        for (offset, key) in [b"a", b"b", b"a", b"a"].into_iter().enumerate() {
            KeyedAggregation
                .apply(&record(offset as i64, key, b"1"), &mut state, &mut out)
                .unwrap();
        }
        let keys: Vec<_> = outputs.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(keys, vec![b"a".to_vec(), b"b".to_vec()]);
        assert!(String::from_utf8_lossy(&outputs[0].1).contains("\"count\":3"));
    }

    #[test]
    fn malformed_values_are_dead_letters_not_errors() {
        let mut state = state();
        let mut out = Emitter::discarding();
        for bad in [&b"12x"[..], b"", b"99999999999999999999", &[0xff, 0xfe]] {
            let outcome = KeyedAggregation
                .apply(&record(0, b"k", bad), &mut state, &mut out)
                .unwrap();
            assert!(matches!(outcome, Outcome::DeadLetter { .. }), "{bad:?}");
        }
        let keyless = Record::new(0, 0, None, Some(b"1"));
        assert!(matches!(
            KeyedAggregation
                .apply(&keyless, &mut state, &mut out)
                .unwrap(),
            Outcome::DeadLetter { .. }
        ));
        assert_eq!(state.changed_keys(), 0);
        assert_eq!(parse_amount(Some(b" -42 ")), Ok(-42));
    }
}
