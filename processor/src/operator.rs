//! What the processor does with each record: the [`Operator`] trait, and the built-in keyed aggregation.
//!
//! An operator turns one record into a [`StateBatch`] update, reading the current state through the
//! store. The partition task applies the batch together with the next offset, atomically, so an operator
//! never has to think about exactly-once: it only has to be deterministic.

use serde::{Deserialize, Serialize};

use crate::error::{ProcessorError, ProcessorResult};
use crate::store::{PartitionStore, StateBatch};

/// The FNV-style multiplier of the order-sensitive chain digest.
pub const CHAIN_MULTIPLIER: u64 = 1_099_511_628_211;

/// One consumed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
    /// The key, if any.
    pub key: Option<&'a [u8]>,
    /// The value, if any.
    pub value: Option<&'a [u8]>,
}

/// What became of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The record updated the state; `output` is the new value to publish downstream, if any.
    Applied {
        /// The key the output belongs to.
        key: Vec<u8>,
        /// The updated value, serialised for an output topic.
        output: Option<Vec<u8>>,
    },
    /// The record is malformed: it goes to the dead-letter topic (or log) and the partition moves on.
    DeadLetter {
        /// Why.
        reason: String,
    },
}

/// A user-pluggable record processor. Must be deterministic: the same records in the same order give the
/// same state, whichever instance applies them.
pub trait Operator: Send + Sync {
    /// Adds the effect of `record` to `batch`, reading current state from `store`.
    ///
    /// Reads see the store *before* `batch`; an operator that may update one key twice in a batch must
    /// look at the batch too (see [`KeyedAggregation`]).
    ///
    /// # Errors
    /// A store error (the batch is then not applied and the partition stops).
    fn apply(
        &self,
        record: &Record<'_>,
        store: &dyn PartitionStore,
        batch: &mut StateBatch,
    ) -> ProcessorResult<Outcome>;
}

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

    /// Encodes with bincode.
    ///
    /// # Errors
    /// Never in practice; an encoding error otherwise.
    pub fn encode(&self) -> ProcessorResult<Vec<u8>> {
        bincode::serde::encode_to_vec(self, bincode::config::standard())
            .map_err(|err| ProcessorError::encode("an aggregate", err))
    }

    /// Decodes bincode.
    ///
    /// # Errors
    /// [`ProcessorError::Codec`] for undecodable bytes.
    pub fn decode(bytes: &[u8]) -> ProcessorResult<Aggregate> {
        bincode::serde::decode_from_slice(bytes, bincode::config::standard())
            .map(|(aggregate, _)| aggregate)
            .map_err(|err| ProcessorError::decode("an aggregate", err))
    }

    /// The output-topic form: JSON (`{"count":…,"sum":…,"min":…,"max":…,"chain":…}`), readable by any
    /// downstream consumer (the state keeps the compact bincode form).
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
    let value = value.ok_or("no value")?;
    let text = std::str::from_utf8(value).map_err(|_| "value is not UTF-8".to_owned())?;
    text.trim()
        .parse::<i64>()
        .map_err(|err| format!("`{}` is not a decimal i64: {err}", text.escape_debug()))
}

impl Operator for KeyedAggregation {
    fn apply(
        &self,
        record: &Record<'_>,
        store: &dyn PartitionStore,
        batch: &mut StateBatch,
    ) -> ProcessorResult<Outcome> {
        let Some(key) = record.key else {
            return Ok(Outcome::DeadLetter {
                reason: "no key".to_owned(),
            });
        };
        let amount = match parse_amount(record.value) {
            Ok(amount) => amount,
            Err(reason) => return Ok(Outcome::DeadLetter { reason }),
        };
        // The latest value of the key: this batch's own pending write wins over the store.
        let pending = batch
            .puts()
            .iter()
            .rev()
            .find(|(k, _)| k.as_slice() == key)
            .map(|(_, v)| v.clone());
        let current = match pending {
            Some(bytes) => Some(bytes),
            None => store.get(key)?,
        };
        let before = current
            .as_deref()
            .map(Aggregate::decode)
            .transpose()?
            .unwrap_or_default();
        let after = before.with_amount(amount);
        batch.put(key.to_vec(), after.encode()?);
        Ok(Outcome::Applied {
            key: key.to_vec(),
            output: Some(after.to_json()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::InMemoryPartitionStore;

    fn record<'a>(offset: i64, key: &'a [u8], value: &'a [u8]) -> Record<'a> {
        Record {
            partition: 0,
            offset,
            key: Some(key),
            value: Some(value),
        }
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
    fn one_key_twice_in_a_batch_sees_its_own_update() {
        let store = InMemoryPartitionStore::new(0);
        let mut batch = StateBatch::new(2, 1);
        KeyedAggregation
            .apply(&record(0, b"k", b"4"), &store, &mut batch)
            .unwrap();
        KeyedAggregation
            .apply(&record(1, b"k", b"6"), &store, &mut batch)
            .unwrap();
        store.apply(&batch).unwrap();
        let agg = Aggregate::decode(&store.get(b"k").unwrap().unwrap()).unwrap();
        assert_eq!((agg.count, agg.sum), (2, 10));
    }

    #[test]
    fn malformed_values_are_dead_letters_not_errors() {
        let store = InMemoryPartitionStore::new(0);
        let mut batch = StateBatch::new(1, 1);
        for bad in [&b"12x"[..], b"", b"99999999999999999999", &[0xff, 0xfe]] {
            let outcome = KeyedAggregation
                .apply(&record(0, b"k", bad), &store, &mut batch)
                .unwrap();
            assert!(matches!(outcome, Outcome::DeadLetter { .. }), "{bad:?}");
        }
        let keyless = Record {
            partition: 0,
            offset: 0,
            key: None,
            value: Some(b"1"),
        };
        assert!(matches!(
            KeyedAggregation
                .apply(&keyless, &store, &mut batch)
                .unwrap(),
            Outcome::DeadLetter { .. }
        ));
        assert!(batch.is_empty());
        assert_eq!(parse_amount(Some(b" -42 ")), Ok(-42));
    }
}
