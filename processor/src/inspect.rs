//! Reading what the fleet checkpointed: the offset each partition's latest valid checkpoint covers, and
//! the aggregates merged from those checkpoints (what `processor state offsets|dump` print and what the
//! demo and the tests compare with the recomputation).

use std::collections::BTreeMap;

use crate::checkpoint::CheckpointStore;
use crate::error::{ProcessorError, ProcessorResult};
use crate::operator::Aggregate;
use crate::store::PartitionStore;
use crate::store::rocksdb::RocksDbStores;

/// One partition's latest valid checkpoint.
#[derive(Debug)]
#[non_exhaustive]
pub struct PartitionCheckpoint {
    /// The partition.
    pub partition: i32,
    /// The offset the checkpoint covers (the next one to process).
    pub next_offset: i64,
    /// The owner's fencing token it was written under.
    pub fencing_token: u64,
    /// Newer checkpoints that were corrupt and skipped.
    pub skipped: Vec<ProcessorError>,
}

/// The latest valid checkpoint of every partition of `topic` that has one.
///
/// # Errors
/// An I/O error listing the store.
pub fn checkpoint_offsets(
    store: &dyn CheckpointStore,
    topic: &str,
) -> ProcessorResult<Vec<PartitionCheckpoint>> {
    let mut out = Vec::new();
    for partition in store.partitions(topic)? {
        let (manifest, skipped) = store.latest_valid(topic, partition)?;
        if let Some(manifest) = manifest {
            out.push(PartitionCheckpoint {
                partition,
                next_offset: manifest.next_offset,
                fencing_token: manifest.fencing_token,
                skipped,
            });
        }
    }
    Ok(out)
}

/// The aggregates of `topic` merged from the latest valid checkpoint of each partition (restored into a
/// temporary directory and read), by key; plus the corrupt checkpoints that were skipped.
///
/// # Errors
/// An I/O, store or decoding error.
pub fn checkpointed_aggregates(
    store: &dyn CheckpointStore,
    topic: &str,
) -> ProcessorResult<(BTreeMap<String, Aggregate>, Vec<ProcessorError>)> {
    let scratch = tempfile::tempdir().map_err(ProcessorError::io(std::env::temp_dir()))?;
    let stores = RocksDbStores::new(32 << 20, 16 << 20);
    let mut merged = BTreeMap::new();
    let mut skipped_all = Vec::new();
    for partition in store.partitions(topic)? {
        let (manifest, skipped) = store.latest_valid(topic, partition)?;
        skipped_all.extend(skipped);
        let Some(manifest) = manifest else { continue };
        let dir = scratch.path().join(partition.to_string());
        store.restore(&manifest, &dir)?;
        let state = stores.open(partition, &dir)?;
        for (key, value) in state.entries()? {
            merged.insert(
                String::from_utf8_lossy(&key).into_owned(),
                Aggregate::decode(&value)?,
            );
        }
    }
    Ok((merged, skipped_all))
}
