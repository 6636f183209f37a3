//! An in-process [`PartitionStore`]: a sorted map behind a mutex. Snapshots are one bincode file.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::{EntryVisitor, PartitionStore, StateBatch, StoreFactory, StoreMeta};
use crate::error::{ProcessorError, ProcessorResult};

const SNAPSHOT_FILE: &str = "memory-store.bin";

#[derive(Default, Serialize, Deserialize)]
struct Contents {
    entries: BTreeMap<Vec<u8>, Vec<u8>>,
    meta: Option<(i64, u64)>,
}

/// The [`StoreFactory`] of in-memory stores: a directory holds at most a snapshot (written by
/// [`PartitionStore::snapshot_to`] or restored from a checkpoint), which `open_store` loads; the live state
/// is never written back to disk, so after a crash a partition restores from its last checkpoint and
/// replays from Kafka.
#[derive(Debug, Clone, Copy, Default)]
pub struct InMemoryStores;

impl StoreFactory for InMemoryStores {
    fn open_store(&self, partition: i32, dir: &Path) -> ProcessorResult<Arc<dyn PartitionStore>> {
        if dir.join(SNAPSHOT_FILE).exists() {
            Ok(Arc::new(InMemoryPartitionStore::load(partition, dir)?))
        } else {
            Ok(Arc::new(InMemoryPartitionStore::new(partition)))
        }
    }
}

/// A partition's state in memory.
pub struct InMemoryPartitionStore {
    partition: i32,
    contents: Mutex<Contents>,
}

impl InMemoryPartitionStore {
    /// An empty store for `partition`.
    pub fn new(partition: i32) -> Self {
        InMemoryPartitionStore {
            partition,
            contents: Mutex::new(Contents::default()),
        }
    }

    /// Loads a snapshot written by [`PartitionStore::snapshot_to`].
    ///
    /// # Errors
    /// An I/O error, or [`ProcessorError::CorruptCheckpoint`] for an unreadable snapshot.
    pub fn load(partition: i32, dir: &Path) -> ProcessorResult<Self> {
        let path = dir.join(SNAPSHOT_FILE);
        let bytes = std::fs::read(&path).map_err(ProcessorError::io(&path))?;
        let (contents, _): (Contents, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).map_err(
                |err| ProcessorError::CorruptCheckpoint {
                    path: path.clone(),
                    reason: err.to_string(),
                },
            )?;
        Ok(InMemoryPartitionStore {
            partition,
            contents: Mutex::new(contents),
        })
    }

    fn contents(&self) -> MutexGuard<'_, Contents> {
        self.contents.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl PartitionStore for InMemoryPartitionStore {
    fn partition(&self) -> i32 {
        self.partition
    }

    fn approximate_size_bytes(&self) -> u64 {
        self.contents()
            .entries
            .iter()
            .map(|(key, value)| (key.len() + value.len()) as u64)
            .sum()
    }

    fn get(&self, key: &[u8]) -> ProcessorResult<Option<Vec<u8>>> {
        Ok(self.contents().entries.get(key).cloned())
    }

    fn apply(&self, batch: &StateBatch) -> ProcessorResult<()> {
        let mut contents = self.contents();
        if let Some((_, highest)) = contents.meta
            && batch.fencing_token() < highest
        {
            return Err(ProcessorError::StaleOwner {
                partition: self.partition,
                token: batch.fencing_token(),
                highest,
            });
        }
        for (key, value) in batch.puts() {
            contents.entries.insert(key.clone(), value.clone());
        }
        for key in batch.deletes() {
            contents.entries.remove(key);
        }
        contents.meta = Some((batch.next_offset(), batch.fencing_token()));
        Ok(())
    }

    fn meta(&self) -> ProcessorResult<Option<StoreMeta>> {
        Ok(self
            .contents()
            .meta
            .map(|(next_offset, fencing_token)| StoreMeta {
                next_offset,
                fencing_token,
            }))
    }

    fn scan(&self, visit: &mut EntryVisitor<'_>) -> ProcessorResult<()> {
        // One entry at a time, the lock released between them, so `visit` may read the store.
        let mut after: Option<Vec<u8>> = None;
        loop {
            let next = {
                let contents = self.contents();
                let mut range = match &after {
                    Some(last) => contents
                        .entries
                        .range::<[u8], _>((Bound::Excluded(last.as_slice()), Bound::Unbounded)),
                    None => contents.entries.range::<[u8], _>(..),
                };
                range.next().map(|(k, v)| (k.clone(), v.clone()))
            };
            let Some((key, value)) = next else {
                return Ok(());
            };
            visit(&key, &value)?;
            after = Some(key);
        }
    }

    fn snapshot_to(&self, dir: &Path) -> ProcessorResult<()> {
        let bytes = {
            let contents = self.contents();
            bincode::serde::encode_to_vec(&*contents, bincode::config::standard())
                .map_err(|err| ProcessorError::store(self.partition, "snapshot", err))?
        };
        std::fs::create_dir_all(dir).map_err(ProcessorError::io(dir))?;
        let path = dir.join(SNAPSHOT_FILE);
        std::fs::write(&path, bytes).map_err(ProcessorError::io(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::shared_tests;

    #[test]
    fn passes_the_shared_store_tests() {
        shared_tests::new_store_is_empty(&InMemoryPartitionStore::new(0));
        shared_tests::batch_applies_state_offset_and_token_together(&InMemoryPartitionStore::new(
            0,
        ));
        shared_tests::stale_owner_is_refused_and_nothing_changes(&InMemoryPartitionStore::new(0));
        shared_tests::keys_are_binary_safe(&InMemoryPartitionStore::new(0));
        shared_tests::changes_apply_atomically_like_a_batch(&InMemoryPartitionStore::new(0));
    }

    #[test]
    fn snapshot_round_trips() {
        let store = InMemoryPartitionStore::new(4);
        let mut batch = StateBatch::new(42, 9);
        batch.put("k", "v");
        store.apply(&batch).unwrap();
        let dir = tempfile::tempdir().unwrap();
        store.snapshot_to(&dir.path().join("snap")).unwrap();
        let loaded = InMemoryPartitionStore::load(4, &dir.path().join("snap")).unwrap();
        assert_eq!(loaded.entries().unwrap(), store.entries().unwrap());
        assert_eq!(loaded.meta().unwrap(), store.meta().unwrap());
    }
}
