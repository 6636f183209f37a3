//! Reading what the fleet checkpointed: the offset each partition's latest valid checkpoint covers, the
//! aggregates merged from those checkpoints (what `processor state offsets|dump` print and what the demo
//! and the tests compare with the recomputation), and the offsets of the fenced checkpoint records (the
//! fleet's progress, read without touching a checkpoint file).

use std::collections::BTreeMap;

use crate::aggregation::Aggregate;
use crate::checkpoint::CheckpointRecords;
use crate::checkpoint::CheckpointStore;
use crate::error::{ProcessorError, ProcessorResult};
use crate::services::Services;
use crate::store::StoreFactory;

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
/// temporary directory, opened with `stores` — the kind of store that wrote them — and streamed), by
/// key; plus the corrupt checkpoints that were skipped.
///
/// # Errors
/// An I/O, store or decoding error.
pub fn checkpointed_aggregates(
    store: &dyn CheckpointStore,
    stores: &dyn StoreFactory,
    topic: &str,
) -> ProcessorResult<(BTreeMap<String, Aggregate>, Vec<ProcessorError>)> {
    let (entries, skipped) = checkpointed_entries(store, stores, topic)?;
    let mut merged = BTreeMap::new();
    for (key, value) in entries {
        merged.insert(
            String::from_utf8_lossy(&key).into_owned(),
            Aggregate::decode(&value)?,
        );
    }
    Ok((merged, skipped))
}

/// State entries by key, as stored.
pub type StateEntries = BTreeMap<Vec<u8>, Vec<u8>>;

/// Every state entry of `topic` (any job's: keys and values as stored) merged from the latest valid
/// checkpoint of each partition, by key; plus the corrupt checkpoints that were skipped.
///
/// # Errors
/// An I/O or store error.
pub fn checkpointed_entries(
    store: &dyn CheckpointStore,
    stores: &dyn StoreFactory,
    topic: &str,
) -> ProcessorResult<(StateEntries, Vec<ProcessorError>)> {
    let scratch = tempfile::tempdir().map_err(ProcessorError::io(std::env::temp_dir()))?;
    let mut merged = BTreeMap::new();
    let mut skipped_all = Vec::new();
    for partition in store.partitions(topic)? {
        let (manifest, skipped) = store.latest_valid(topic, partition)?;
        skipped_all.extend(skipped);
        let Some(manifest) = manifest else { continue };
        let dir = scratch.path().join(partition.to_string());
        store.restore(&manifest, &dir)?;
        let state = stores.open_store(partition, &dir)?;
        state.scan(&mut |key, value| {
            merged.insert(key.to_vec(), value.to_vec());
            Ok(())
        })?;
    }
    Ok((merged, skipped_all))
}

/// The offset the latest recorded checkpoint of `partition` covers, from its fenced
/// [`CheckpointRecord`](crate::checkpoint::CheckpointRecord) (cheap: no checkpoint file is read; for
/// progress and lag reports).
///
/// # Errors
/// A backend error, or a record this release cannot read.
pub async fn checkpointed_offset(
    services: &Services,
    group: &str,
    topic: &str,
    partition: i32,
) -> ProcessorResult<Option<i64>> {
    let records = CheckpointRecords::new(
        services.lock.clone(),
        services.registry.clone(),
        group,
        topic,
        partition,
    );
    Ok(records.latest().await?.map(|record| record.next_offset))
}
