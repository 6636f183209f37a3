//! The checkpoint record: which checkpoint of a partition is the newest published one, kept in the
//! fleet's fenced registry through the `state` crate's
//! [`CheckpointCoordinator`] under the owner's claim token, so a stale owner's record is refused.
//! One typed, versioned format, written by the partition task after each upload and read by whoever
//! needs the fleet's progress (the demo, `inspect`).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use state::DistributedLock;
use state::recipes::checkpoint::CheckpointCoordinator;
use state::recipes::fenced::FencedStore;

use super::Manifest;
use crate::error::{ProcessorError, ProcessorResult};
use crate::resources::checkpoint_scope;

/// The record format this release writes (and the newest it reads).
pub const RECORD_FORMAT: u32 = 1;

fn first_format() -> u32 {
    1
}

/// One published checkpoint of a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CheckpointRecord {
    /// The record format ([`RECORD_FORMAT`]); records written before the field existed are format 1.
    #[serde(default = "first_format")]
    pub format: u32,
    /// The id of the checkpoint's manifest ([`Manifest::id`]).
    pub manifest: String,
    /// The offset the checkpoint covers (the next one to process).
    pub next_offset: i64,
    /// The instance that published it.
    pub instance: String,
}

impl CheckpointRecord {
    /// The record of `manifest`, published by `instance`.
    pub fn new(manifest: &Manifest, instance: &str) -> Self {
        CheckpointRecord {
            format: RECORD_FORMAT,
            manifest: manifest.id(),
            next_offset: manifest.next_offset,
            instance: instance.to_owned(),
        }
    }

    /// The record's bytes (JSON).
    ///
    /// # Errors
    /// [`ProcessorError::Codec`] (not in practice).
    pub fn encode(&self) -> ProcessorResult<Vec<u8>> {
        serde_json::to_vec(self).map_err(|err| ProcessorError::encode("a checkpoint record", err))
    }

    /// Reads a record.
    ///
    /// # Errors
    /// [`ProcessorError::Codec`] for bytes that are not a record, or a record of a newer format than
    /// this release reads.
    pub fn decode(bytes: &[u8]) -> ProcessorResult<Self> {
        let record: CheckpointRecord = serde_json::from_slice(bytes)
            .map_err(|err| ProcessorError::decode("a checkpoint record", err))?;
        if record.format > RECORD_FORMAT {
            return Err(ProcessorError::decode(
                "a checkpoint record",
                format!(
                    "format {} is newer than this release reads ({RECORD_FORMAT}): upgrade the processor",
                    record.format
                ),
            ));
        }
        Ok(record)
    }
}

/// The checkpoint records of one partition of a fleet.
pub struct CheckpointRecords {
    coordinator: CheckpointCoordinator,
    partition: i32,
}

impl std::fmt::Debug for CheckpointRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointRecords")
            .field("resource", &self.coordinator.resource())
            .finish()
    }
}

impl CheckpointRecords {
    /// The records of `partition` of `topic` in fleet `group`, in `registry`.
    pub fn new(
        lock: Arc<dyn DistributedLock>,
        registry: Arc<dyn FencedStore>,
        group: &str,
        topic: &str,
        partition: i32,
    ) -> Self {
        // The coordinator's own TTL only matters for its `checkpoint()`, which the fleet does not use:
        // it records under the partition claim's token.
        let coordinator = CheckpointCoordinator::new(lock, registry, Duration::from_secs(5))
            .with_scope(&checkpoint_scope(group, topic, partition));
        CheckpointRecords {
            coordinator,
            partition,
        }
    }

    /// Publishes `record` under the owner's claim token.
    ///
    /// # Errors
    /// [`ProcessorError::StaleOwner`] when a newer owner already recorded; a backend error.
    pub async fn publish(
        &self,
        fencing_token: u64,
        record: &CheckpointRecord,
    ) -> ProcessorResult<()> {
        match self
            .coordinator
            .record(fencing_token, &record.encode()?)
            .await
        {
            Ok(()) => Ok(()),
            Err(state::StateError::StaleFencingToken { highest, .. }) => {
                Err(ProcessorError::StaleOwner {
                    partition: self.partition,
                    token: fencing_token,
                    highest,
                })
            }
            Err(err) => Err(err.into()),
        }
    }

    /// The newest published record, if any.
    ///
    /// # Errors
    /// A backend error; [`ProcessorError::Codec`] for a record this release cannot read.
    pub async fn latest(&self) -> ProcessorResult<Option<CheckpointRecord>> {
        match self.coordinator.latest().await? {
            Some(value) => Ok(Some(CheckpointRecord::decode(&value.value)?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_read_the_unversioned_format() {
        let record = CheckpointRecord {
            format: RECORD_FORMAT,
            manifest: "00000000000000000042-00000000000000000007".to_owned(),
            next_offset: 42,
            instance: "a".to_owned(),
        };
        assert_eq!(
            CheckpointRecord::decode(&record.encode().unwrap()).unwrap(),
            record
        );
        let unversioned = br#"{"manifest":"m","next_offset":5,"instance":"b"}"#;
        let old = CheckpointRecord::decode(unversioned).unwrap();
        assert_eq!((old.format, old.next_offset), (1, 5));
        let newer = br#"{"format":99,"manifest":"m","next_offset":5,"instance":"b"}"#;
        assert!(matches!(
            CheckpointRecord::decode(newer),
            Err(ProcessorError::Codec { .. })
        ));
        assert!(CheckpointRecord::decode(b"not json").is_err());
    }
}
