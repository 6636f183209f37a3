//! The RocksDB [`PartitionStore`]: one database per owned partition (a column family cannot be
//! checkpointed alone), all sharing one block cache and one write-buffer manager so memory stays bounded
//! however many partitions an instance owns.
//!
//! Each database has two column families: `default` for state and `meta` for `next_offset` and
//! `fencing_token`. A [`StateBatch`] becomes one `WriteBatch` across both, written with the WAL on, so
//! state and offset are durable together or not at all. Snapshots are RocksDB checkpoints: hard links to
//! the immutable SST files, so taking one barely depends on the state size.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rocksdb::checkpoint::Checkpoint;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, IteratorMode, Options,
    WriteBatch, WriteBufferManager, WriteOptions,
};

use super::{EntryVisitor, PartitionStore, StateBatch, StoreFactory, StoreMeta};
use crate::error::{ProcessorError, ProcessorResult};

const META_CF: &str = "meta";
const NEXT_OFFSET: &[u8] = b"next_offset";
const FENCING_TOKEN: &[u8] = b"fencing_token";

/// The shared resources of all partition databases of one instance.
pub struct RocksDbStores {
    cache: Cache,
    write_buffers: WriteBufferManager,
    sync_writes: bool,
}

impl std::fmt::Debug for RocksDbStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksDbStores")
            .field("sync_writes", &self.sync_writes)
            .finish_non_exhaustive()
    }
}

impl RocksDbStores {
    /// Shared block cache of `cache_bytes` and write-buffer budget of `write_buffer_bytes` (charged to the
    /// cache, stalling writers when exceeded rather than growing without bound).
    pub fn new(cache_bytes: usize, write_buffer_bytes: usize) -> Self {
        let cache = Cache::new_lru_cache(cache_bytes);
        let write_buffers = WriteBufferManager::new_write_buffer_manager_with_cache(
            write_buffer_bytes,
            true,
            cache.clone(),
        );
        RocksDbStores {
            cache,
            write_buffers,
            sync_writes: false,
        }
    }

    /// `fsync` the WAL on every batch (default off: the WAL survives a process crash either way; turn it
    /// on to survive a machine crash too).
    pub fn with_sync_writes(mut self, sync: bool) -> Self {
        self.sync_writes = sync;
        self
    }

    /// Tuned for the processor's access pattern — point reads of keys that often do not exist yet, and
    /// one write batch per commit:
    /// - bloom filters (10 bits per key) so a read of a new key skips every SST file (no memtable
    ///   bloom: it is allocated as a fraction of the 64 MiB memtable size, which alone can exceed a small
    ///   shared write budget and stall writers for good);
    /// - index and filter blocks charged to the shared block cache (pinned for L0) so memory stays
    ///   within the configured cache however many partitions and files there are;
    /// - LZ4 (RocksDB's default, Snappy, is not compiled in: without this nothing is compressed);
    /// - two background jobs and 256 open files per partition database (it opens one per SST file
    ///   otherwise, without bound).
    fn options(&self) -> Options {
        let mut block = BlockBasedOptions::default();
        block.set_block_cache(&self.cache);
        block.set_bloom_filter(10.0, false);
        block.set_cache_index_and_filter_blocks(true);
        block.set_pin_l0_filter_and_index_blocks_in_cache(true);
        block.set_block_size(16 << 10);
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_block_based_table_factory(&block);
        options.set_write_buffer_manager(&self.write_buffers);
        options.set_compression_type(DBCompressionType::Lz4);
        options.set_max_background_jobs(2);
        options.set_max_open_files(256);
        // A takeover opens the partition's state on its critical path: do not read every SST file's
        // properties at open for compaction statistics (they are gathered as files are read anyway).
        options.set_skip_stats_update_on_db_open(true);
        options
    }

    /// Opens (or creates) the database of `partition` at `path`; also opens snapshots written by
    /// [`PartitionStore::snapshot_to`] once copied into place.
    ///
    /// # Errors
    /// A store error.
    pub fn open(&self, partition: i32, path: &Path) -> ProcessorResult<RocksDbPartitionStore> {
        let options = self.options();
        let meta = ColumnFamilyDescriptor::new(META_CF, self.options());
        let db = DB::open_cf_descriptors(&options, path, vec![meta])
            .map_err(|err| ProcessorError::store(partition, "open", err))?;
        Ok(RocksDbPartitionStore {
            partition,
            path: path.to_path_buf(),
            db,
            write_lock: Mutex::new(()),
            sync_writes: self.sync_writes,
        })
    }
}

impl StoreFactory for RocksDbStores {
    fn open_store(&self, partition: i32, dir: &Path) -> ProcessorResult<Arc<dyn PartitionStore>> {
        Ok(Arc::new(self.open(partition, dir)?))
    }
}

/// One partition's RocksDB database.
pub struct RocksDbPartitionStore {
    partition: i32,
    path: PathBuf,
    db: DB,
    /// Serialises the read-check-write of the fencing token between writers of this partition.
    write_lock: Mutex<()>,
    sync_writes: bool,
}

impl std::fmt::Debug for RocksDbPartitionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksDbPartitionStore")
            .field("partition", &self.partition)
            .field("path", &self.path)
            .finish()
    }
}

fn decode_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_be_bytes)
}

fn decode_i64(bytes: &[u8]) -> Option<i64> {
    bytes.try_into().ok().map(i64::from_be_bytes)
}

impl RocksDbPartitionStore {
    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn meta_cf(&self) -> ProcessorResult<&rocksdb::ColumnFamily> {
        self.db.cf_handle(META_CF).ok_or_else(|| {
            ProcessorError::store(self.partition, "open the meta column family", "missing")
        })
    }

    /// One atomic `WriteBatch`: what `fill` puts in it, the next offset and the fencing token — refused
    /// when a newer owner's token is already recorded.
    fn write(
        &self,
        next_offset: i64,
        fencing_token: u64,
        fill: impl FnOnce(&mut WriteBatch),
    ) -> ProcessorResult<()> {
        let _writer = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(highest) = self
            .read_meta(FENCING_TOKEN)?
            .as_deref()
            .and_then(decode_u64)
            && fencing_token < highest
        {
            return Err(ProcessorError::StaleOwner {
                partition: self.partition,
                token: fencing_token,
                highest,
            });
        }
        let meta = self.meta_cf()?;
        let mut write = WriteBatch::default();
        fill(&mut write);
        write.put_cf(meta, NEXT_OFFSET, next_offset.to_be_bytes());
        write.put_cf(meta, FENCING_TOKEN, fencing_token.to_be_bytes());
        let mut options = WriteOptions::default();
        options.set_sync(self.sync_writes);
        options.disable_wal(false);
        self.db
            .write_opt(write, &options)
            .map_err(|err| ProcessorError::store(self.partition, "write a batch", err))
    }

    fn read_meta(&self, key: &[u8]) -> ProcessorResult<Option<Vec<u8>>> {
        self.db
            .get_cf(self.meta_cf()?, key)
            .map_err(|err| ProcessorError::store(self.partition, "read meta", err))
    }
}

impl PartitionStore for RocksDbPartitionStore {
    fn partition(&self) -> i32 {
        self.partition
    }

    fn approximate_size_bytes(&self) -> u64 {
        [
            rocksdb::properties::TOTAL_SST_FILES_SIZE,
            rocksdb::properties::CUR_SIZE_ALL_MEM_TABLES,
        ]
        .into_iter()
        .filter_map(|property| self.db.property_int_value(property).ok().flatten())
        .sum()
    }

    fn get(&self, key: &[u8]) -> ProcessorResult<Option<Vec<u8>>> {
        self.db
            .get(key)
            .map_err(|err| ProcessorError::store(self.partition, "read", err))
    }

    fn apply(&self, batch: &StateBatch) -> ProcessorResult<()> {
        self.write(batch.next_offset(), batch.fencing_token(), |write| {
            for (key, value) in batch.puts() {
                write.put(key, value);
            }
            for key in batch.deletes() {
                write.delete(key);
            }
        })
    }

    fn apply_changes(
        &self,
        changes: &mut dyn Iterator<Item = (&[u8], Option<&[u8]>)>,
        _count: usize,
        next_offset: i64,
        fencing_token: u64,
    ) -> ProcessorResult<()> {
        self.write(next_offset, fencing_token, |write| {
            for (key, value) in changes {
                match value {
                    Some(value) => write.put(key, value),
                    None => write.delete(key),
                }
            }
        })
    }

    fn meta(&self) -> ProcessorResult<Option<StoreMeta>> {
        let offset = self.read_meta(NEXT_OFFSET)?.as_deref().and_then(decode_i64);
        let token = self
            .read_meta(FENCING_TOKEN)?
            .as_deref()
            .and_then(decode_u64);
        Ok(offset
            .zip(token)
            .map(|(next_offset, fencing_token)| StoreMeta {
                next_offset,
                fencing_token,
            }))
    }

    fn scan(&self, visit: &mut EntryVisitor<'_>) -> ProcessorResult<()> {
        for item in self.db.iterator(IteratorMode::Start) {
            let (key, value) =
                item.map_err(|err| ProcessorError::store(self.partition, "scan", err))?;
            visit(&key, &value)?;
        }
        Ok(())
    }

    fn snapshot_to(&self, dir: &Path) -> ProcessorResult<()> {
        // RocksDB creates `dir` itself but not its parents.
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(ProcessorError::io(parent))?;
        }
        let checkpoint = Checkpoint::new(&self.db)
            .map_err(|err| ProcessorError::store(self.partition, "start a checkpoint", err))?;
        checkpoint
            .create_checkpoint(dir)
            .map_err(|err| ProcessorError::store(self.partition, "create a checkpoint", err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::shared_tests;

    fn open(dir: &Path) -> RocksDbPartitionStore {
        RocksDbStores::new(8 << 20, 4 << 20).open(1, dir).unwrap()
    }

    #[test]
    fn passes_the_shared_store_tests() {
        let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
        shared_tests::new_store_is_empty(&open(dirs[0].path()));
        shared_tests::batch_applies_state_offset_and_token_together(&open(dirs[1].path()));
        shared_tests::stale_owner_is_refused_and_nothing_changes(&open(dirs[2].path()));
        shared_tests::keys_are_binary_safe(&open(dirs[3].path()));
        let changes_dir = tempfile::tempdir().unwrap();
        shared_tests::changes_apply_atomically_like_a_batch(&open(changes_dir.path()));
    }

    #[test]
    fn compression_and_bloom_filters_are_on() {
        let dir = tempfile::tempdir().unwrap();
        let _store = open(dir.path());
        let options = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().starts_with("OPTIONS-"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .expect("an OPTIONS file");
        for wanted in [
            "compression=kLZ4Compression",
            "filter_policy=bloomfilter",
            "cache_index_and_filter_blocks=true",
            "max_open_files=256",
        ] {
            assert!(
                options.contains(wanted),
                "{wanted} missing from the options"
            );
        }
    }

    #[test]
    fn state_and_offset_survive_a_reopen_and_snapshots_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let stores = RocksDbStores::new(8 << 20, 4 << 20);
        {
            let store = stores.open(2, &dir.path().join("db")).unwrap();
            let mut batch = StateBatch::new(100, 4);
            batch.put("k", "v");
            store.apply(&batch).unwrap();
            store.snapshot_to(&dir.path().join("snap")).unwrap();
            let mut after = StateBatch::new(101, 4);
            after.put("k", "v2");
            store.apply(&after).unwrap();
        }
        let reopened = stores.open(2, &dir.path().join("db")).unwrap();
        assert_eq!(reopened.get(b"k").unwrap(), Some(b"v2".to_vec()));
        assert_eq!(reopened.meta().unwrap().unwrap().next_offset, 101);
        let snapshot = stores.open(2, &dir.path().join("snap")).unwrap();
        assert_eq!(snapshot.get(b"k").unwrap(), Some(b"v".to_vec()));
        assert_eq!(snapshot.meta().unwrap().unwrap().next_offset, 100);
    }
}
