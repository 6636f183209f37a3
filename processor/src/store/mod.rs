//! Per-partition state stores. The trait never names RocksDB: [`rocksdb`] is the production store,
//! [`memory`] the in-process one for tests and light pipelines; both pass one shared test module.
//! Operators never see a store directly: they read and write through [`cache::PartitionState`], the
//! write-back cache in front of it.
//!
//! Every change goes through a [`StateBatch`]: state updates, the partition's next offset and the owner's
//! fencing token, applied **atomically** (one RocksDB `WriteBatch` with the WAL on). On restart the
//! partition resumes from the offset stored with its state, so state is exactly-once whatever instant the
//! process died at. A batch whose fencing token is lower than the one recorded is refused: an instance
//! that lost ownership cannot write over its successor's state.

pub mod cache;
mod inline;
pub mod memory;
pub mod rocksdb;

pub use cache::{PartitionState, StateEntry};

use std::path::Path;
use std::sync::Arc;

use crate::error::ProcessorResult;

/// One atomic change to a partition's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateBatch {
    puts: Vec<(Vec<u8>, Vec<u8>)>,
    deletes: Vec<Vec<u8>>,
    next_offset: i64,
    fencing_token: u64,
}

impl StateBatch {
    /// A batch that, once applied, records `next_offset` (the first offset not yet applied) under the
    /// owner's `fencing_token`.
    pub fn new(next_offset: i64, fencing_token: u64) -> Self {
        StateBatch {
            next_offset,
            fencing_token,
            ..StateBatch::default()
        }
    }

    /// Sets `key` to `value`.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.puts.push((key.into(), value.into()));
        self
    }

    /// Removes `key`.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) -> &mut Self {
        self.deletes.push(key.into());
        self
    }

    /// Moves the offset this batch records forward.
    pub fn set_next_offset(&mut self, next_offset: i64) {
        self.next_offset = next_offset;
    }

    /// The offset recorded by this batch.
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// The fencing token this batch is written under.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// The state updates.
    pub fn puts(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.puts
    }

    /// The deletions.
    pub fn deletes(&self) -> &[Vec<u8>] {
        &self.deletes
    }

    /// Whether the batch changes no key (it may still move the offset).
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty()
    }
}

/// Receives each state entry of a [`PartitionStore::scan`]: key and value; an error stops the scan.
pub type EntryVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> ProcessorResult<()> + 'a;

/// What a store remembers besides the state: where to resume and under which owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreMeta {
    /// The first offset not yet applied.
    pub next_offset: i64,
    /// The fencing token of the last batch applied.
    pub fencing_token: u64,
}

/// One partition's local state.
///
/// Calls are synchronous (RocksDB's are): from async code, keep batches small or call through
/// `tokio::task::spawn_blocking`.
pub trait PartitionStore: Send + Sync {
    /// The partition this store holds.
    fn partition(&self) -> i32;

    /// The value of `key`.
    ///
    /// # Errors
    /// A store error.
    fn get(&self, key: &[u8]) -> ProcessorResult<Option<Vec<u8>>>;

    /// Applies `batch` atomically: all of it (state, offset, token) or nothing.
    ///
    /// # Errors
    /// [`ProcessorError::StaleOwner`](crate::error::ProcessorError::StaleOwner) when the batch's token is
    /// lower than the recorded one; a store error.
    fn apply(&self, batch: &StateBatch) -> ProcessorResult<()>;

    /// Applies `changes` (key, new value or `None` to delete; `count` of them, a capacity hint) with
    /// `next_offset` under `fencing_token`, atomically, as [`apply`](Self::apply) does a
    /// [`StateBatch`]: how the state cache commits without copying its entries into a batch first.
    ///
    /// # Errors
    /// As [`apply`](Self::apply).
    fn apply_changes(
        &self,
        changes: &mut dyn Iterator<Item = (&[u8], Option<&[u8]>)>,
        count: usize,
        next_offset: i64,
        fencing_token: u64,
    ) -> ProcessorResult<()> {
        let mut batch = StateBatch::new(next_offset, fencing_token);
        batch.puts.reserve(count);
        for (key, value) in changes {
            match value {
                Some(value) => batch.put(key, value),
                None => batch.delete(key),
            };
        }
        self.apply(&batch)
    }

    /// Where to resume, and under which owner the state was last written; `None` for a new store.
    ///
    /// # Errors
    /// A store error.
    fn meta(&self) -> ProcessorResult<Option<StoreMeta>>;

    /// Visits every state entry in key order, one at a time (nothing is collected); stops at the first
    /// error `visit` returns.
    ///
    /// # Errors
    /// A store error, or `visit`'s.
    fn scan(&self, visit: &mut EntryVisitor<'_>) -> ProcessorResult<()>;

    /// Every state entry in key order, collected (for tests and small stores; [`scan`](Self::scan)
    /// streams).
    ///
    /// # Errors
    /// A store error.
    fn entries(&self) -> ProcessorResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut entries = Vec::new();
        self.scan(&mut |key, value| {
            entries.push((key.to_vec(), value.to_vec()));
            Ok(())
        })?;
        Ok(entries)
    }

    /// Writes a consistent snapshot of the whole store (state and meta) into the new directory `dir`, from
    /// which the store's [`StoreFactory`] can reopen it. For RocksDB
    /// these are hard links, so the cost does not grow with the state size.
    ///
    /// # Errors
    /// A store or I/O error.
    fn snapshot_to(&self, dir: &Path) -> ProcessorResult<()>;

    /// Approximately how many bytes the state takes (files and memory), for status and metrics; 0 when
    /// the store cannot tell. Cheap: no scan.
    fn approximate_size_bytes(&self) -> u64 {
        0
    }
}

/// Opens partition stores of one kind: the fleet gets its stores through this, never naming their type,
/// so the same fleet runs on RocksDB ([`rocksdb::RocksDbStores`]) or in memory
/// ([`memory::InMemoryStores`]).
pub trait StoreFactory: Send + Sync {
    /// Opens the store of `partition` kept in `dir`: the state left there by an earlier run or restored
    /// there from a snapshot, or a new empty store when `dir` holds none.
    ///
    /// # Errors
    /// A store or I/O error.
    fn open_store(&self, partition: i32, dir: &Path) -> ProcessorResult<Arc<dyn PartitionStore>>;
}

/// Checks every store implementation the same way (TiKV's `engine_traits_tests` idea).
#[cfg(test)]
pub(crate) mod shared_tests {
    use super::*;
    use crate::error::ProcessorError;

    pub fn new_store_is_empty(store: &dyn PartitionStore) {
        assert_eq!(store.meta().unwrap(), None);
        assert_eq!(store.get(b"k").unwrap(), None);
        assert!(store.entries().unwrap().is_empty());
    }

    pub fn batch_applies_state_offset_and_token_together(store: &dyn PartitionStore) {
        let mut batch = StateBatch::new(10, 3);
        batch.put("a", "1").put("b", "2");
        store.apply(&batch).unwrap();
        assert_eq!(store.get(b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(
            store.meta().unwrap(),
            Some(StoreMeta {
                next_offset: 10,
                fencing_token: 3
            })
        );
        let mut next = StateBatch::new(12, 3);
        next.put("a", "11").delete("b");
        store.apply(&next).unwrap();
        assert_eq!(
            store.entries().unwrap(),
            vec![(b"a".to_vec(), b"11".to_vec())]
        );
        assert_eq!(store.meta().unwrap().unwrap().next_offset, 12);
    }

    pub fn stale_owner_is_refused_and_nothing_changes(store: &dyn PartitionStore) {
        let mut first = StateBatch::new(5, 7);
        first.put("k", "from 7");
        store.apply(&first).unwrap();
        let mut stale = StateBatch::new(9, 6);
        stale.put("k", "from 6");
        match store.apply(&stale) {
            Err(ProcessorError::StaleOwner { token, highest, .. }) => {
                assert_eq!((token, highest), (6, 7))
            }
            other => panic!("stale batch accepted: {other:?}"),
        }
        assert_eq!(store.get(b"k").unwrap(), Some(b"from 7".to_vec()));
        assert_eq!(store.meta().unwrap().unwrap().next_offset, 5);
        let mut newer = StateBatch::new(9, 8);
        newer.put("k", "from 8");
        store.apply(&newer).unwrap();
        assert_eq!(store.meta().unwrap().unwrap().fencing_token, 8);
    }

    pub fn changes_apply_atomically_like_a_batch(store: &dyn PartitionStore) {
        store.apply(StateBatch::new(1, 2).put("gone", "x")).unwrap();
        let changes: Vec<(&[u8], Option<&[u8]>)> =
            vec![(b"a", Some(b"1")), (b"gone", None), (b"b", Some(b"2"))];
        store
            .apply_changes(&mut changes.into_iter(), 3, 7, 2)
            .unwrap();
        assert_eq!(
            store.entries().unwrap(),
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec())
            ]
        );
        assert_eq!(
            store.meta().unwrap(),
            Some(StoreMeta {
                next_offset: 7,
                fencing_token: 2
            })
        );
        let stale: Vec<(&[u8], Option<&[u8]>)> = vec![(b"a", Some(b"stale"))];
        assert!(matches!(
            store.apply_changes(&mut stale.into_iter(), 1, 9, 1),
            Err(ProcessorError::StaleOwner { .. })
        ));
        assert_eq!(store.get(b"a").unwrap(), Some(b"1".to_vec()));
    }

    pub fn keys_are_binary_safe(store: &dyn PartitionStore) {
        let mut batch = StateBatch::new(1, 1);
        batch
            .put(vec![0u8, 255, 0], vec![1u8, 0, 1])
            .put("ünïcødé", "✓");
        store.apply(&batch).unwrap();
        assert_eq!(store.get(&[0, 255, 0]).unwrap(), Some(vec![1, 0, 1]));
        assert_eq!(
            store.get("ünïcødé".as_bytes()).unwrap(),
            Some("✓".as_bytes().to_vec())
        );
    }
}
