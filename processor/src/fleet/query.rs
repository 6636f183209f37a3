//! Queries of live state: the value a key has in the state of the partition that owns it, now, with
//! the offset that value reflects and the owner's fencing token. An instance answers for the partitions
//! it processes; [`crate::http`] routes a query to the owner (`GET /state/{key}` on any member).

use serde::{Deserialize, Serialize};

use super::Instance;
use crate::error::ProcessorResult;

/// The partition a keyed record of `key` goes to among `partitions`, as librdkafka's default
/// partitioner (`consistent_random`) places it: CRC-32 of the key modulo the partition count. Keys
/// produced with another partitioner (the Java client's murmur2) need the partition named explicitly.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    let partitions = u32::try_from(partitions.max(1)).unwrap_or(1);
    i32::try_from(crc32fast::hash(key) % partitions).unwrap_or(0)
}

/// The answer to a query of `key`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StateAnswer {
    /// The key asked for (lossy UTF-8).
    pub key: String,
    /// Its partition.
    pub partition: i32,
    /// The instance that owns the partition and answered.
    pub owner: String,
    /// The owner's fencing token for the partition.
    pub fencing_token: u64,
    /// The value reflects every record below this offset of the partition (its last commit).
    pub next_offset: i64,
    /// Whether the key has a value.
    pub found: bool,
    /// The value as the job renders it (JSON), when it does.
    pub value: Option<serde_json::Value>,
    /// The value's bytes in hex, when the job does not render it.
    pub value_hex: Option<String>,
}

impl Instance {
    /// The partition of `key` on this instance's topic (see [`partition_for_key`]).
    pub fn partition_of(&self, key: &[u8]) -> i32 {
        partition_for_key(key, self.partition_count())
    }

    /// `key`'s value in `partition` (its key partition when `None`), answered from this instance's live
    /// state; `None` when this instance does not process that partition now. The value and the offset
    /// come from the same commit (read again if a commit landed in between). Blocking (a store read).
    ///
    /// # Errors
    /// A store error.
    pub fn query_local(
        &self,
        key: &[u8],
        partition: Option<i32>,
    ) -> ProcessorResult<Option<StateAnswer>> {
        let partition = partition.unwrap_or_else(|| self.partition_of(key));
        let Some((store, fencing_token)) = self.tasks.open_stores.get(partition) else {
            return Ok(None);
        };
        let (value, next_offset) = loop {
            let before = store.meta()?;
            let value = store.get(key)?;
            let after = store.meta()?;
            if before == after {
                break (value, after.map_or(0, |meta| meta.next_offset));
            }
        };
        let rendered = value
            .as_deref()
            .and_then(|bytes| self.services.operator.render_state(bytes));
        Ok(Some(StateAnswer {
            key: String::from_utf8_lossy(key).into_owned(),
            partition,
            owner: self.config.instance_id.clone(),
            fencing_token,
            next_offset,
            found: value.is_some(),
            value_hex: match (&value, &rendered) {
                (Some(bytes), None) => Some(bytes.iter().map(|b| format!("{b:02x}")).collect()),
                _ => None,
            },
            value: rendered,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_go_where_librdkafka_puts_them() {
        // CRC-32 (IEEE) of "123456789" is 0xCBF43926, the check value of the standard.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(
            partition_for_key(b"123456789", 7),
            (0xCBF4_3926u32 % 7) as i32
        );
        assert_eq!(partition_for_key(b"anything", 1), 0);
        assert_eq!(
            partition_for_key(b"anything", 0),
            0,
            "no panic on a bad count"
        );
    }
}
