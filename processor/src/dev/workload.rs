//! A deterministic workload generator with its exact expected result: what the demo, the tests and the
//! benchmarks produce and compare the fleet's state with.

use std::collections::BTreeMap;

use rdkafka::producer::FutureRecord;

use crate::aggregation::Aggregate;
use crate::error::{ProcessorError, ProcessorResult};
use crate::hash::splitmix64;
use crate::kafka_settings::KafkaSettings;
use crate::sink::{await_delivery, idempotent_producer};

/// A deterministic workload: record `i` has key `entity-{k}` and a decimal amount, both derived from
/// `seed` and `i`; every key lives in one partition, so its records have a total order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// How many records.
    pub records: u64,
    /// How many distinct keys.
    pub keys: u64,
    /// The seed.
    pub seed: u64,
    /// The topic's partition count.
    pub partitions: i32,
}

impl Workload {
    /// Record `i`: (partition, key, value).
    pub fn record(&self, i: u64) -> (i32, String, String) {
        let key_index =
            splitmix64(self.seed ^ i.wrapping_mul(0x5851_f42d_4c95_7f2d)) % self.keys.max(1);
        let amount = (splitmix64(self.seed.wrapping_add(i)) % 2_001) as i64 - 1_000;
        let partition = (splitmix64(key_index ^ 0xabcd) % self.partitions.max(1) as u64) as i32;
        (partition, format!("entity-{key_index}"), amount.to_string())
    }

    /// The exact final state: per key, the aggregate of its amounts in production order.
    pub fn expected(&self) -> BTreeMap<String, Aggregate> {
        let mut state: BTreeMap<String, Aggregate> = BTreeMap::new();
        for i in 0..self.records {
            let (_, key, value) = self.record(i);
            if let Ok(amount) = value.parse::<i64>() {
                let entry = state.entry(key).or_default();
                *entry = entry.with_amount(amount);
            }
        }
        state
    }

    /// Produces the workload to `topic`, in order (idempotent producer: no reordering or duplicates on
    /// retries).
    ///
    /// # Errors
    /// A Kafka error.
    pub async fn produce(&self, brokers: &str, topic: &str) -> ProcessorResult<()> {
        self.produce_range(brokers, topic, 0..self.records).await
    }

    /// Produces records `range` of the workload (for producing it in parts), in order.
    ///
    /// # Errors
    /// A Kafka error.
    pub async fn produce_range(
        &self,
        brokers: &str,
        topic: &str,
        range: std::ops::Range<u64>,
    ) -> ProcessorResult<()> {
        let producer = idempotent_producer(&KafkaSettings::new(brokers))?;
        let mut pending = Vec::with_capacity(1024);
        for i in range {
            let (partition, key, value) = self.record(i);
            let record = FutureRecord::to(topic)
                .partition(partition)
                .key(&key)
                .payload(&value);
            let delivery = producer
                .send_result(record)
                .map_err(|(err, _)| ProcessorError::kafka("queue a record")(err))?;
            pending.push(delivery);
            if pending.len() >= 1024 {
                for delivery in pending.drain(..) {
                    await_delivery(delivery).await?;
                }
            }
        }
        for delivery in pending {
            await_delivery(delivery).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_are_deterministic_and_keys_stay_in_one_partition() {
        let w = Workload {
            records: 1_000,
            keys: 20,
            seed: 7,
            partitions: 4,
        };
        assert_eq!(w.record(17), w.record(17));
        let mut homes = std::collections::HashMap::new();
        for i in 0..w.records {
            let (partition, key, _) = w.record(i);
            assert_eq!(*homes.entry(key).or_insert(partition), partition);
        }
        let expected = w.expected();
        assert!(expected.len() <= 20);
        assert_eq!(expected.values().map(|a| a.count).sum::<u64>(), 1_000);
        assert_ne!(w.expected(), Workload { seed: 8, ..w }.expected());
    }
}
