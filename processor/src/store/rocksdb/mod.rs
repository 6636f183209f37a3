//! The RocksDB [`PartitionStore`]: one database per owned partition (a column family cannot be
//! checkpointed alone), all sharing one block cache and one write-buffer manager so memory stays bounded
//! however many partitions an instance owns.
//!
//! Each database has two column families: `default` for state and `meta` for `next_offset` and
//! `fencing_token`. A [`StateBatch`] becomes one `WriteBatch` across both, written with the WAL on, so
//! state and offset are durable together or not at all. Commits are coalesced (module `pending`): a
//! commit is one delta record beside the offset, and the keys it changed are written one by one only
//! when the deltas fill [`RocksDbStores::with_commit_coalescing`]'s bound. Snapshots are RocksDB
//! checkpoints: hard links to the immutable SST files, so taking one barely depends on the state size.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rocksdb::checkpoint::Checkpoint;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, IteratorMode, Options,
    WriteBatch, WriteBufferManager, WriteOptions,
};

use super::{EntryVisitor, PartitionStore, StateBatch, StoreFactory, StoreMeta};
use crate::error::{ProcessorError, ProcessorResult};

mod pending;

use pending::{Change, PendingCommits};

/// Default bound of the delta records a partition keeps before it folds them into its keys
/// ([`RocksDbStores::with_commit_coalescing`]).
pub const DEFAULT_COMMIT_COALESCING_BYTES: usize = 4 << 20;

const META_CF: &str = "meta";
const NEXT_OFFSET: &[u8] = b"next_offset";
const FENCING_TOKEN: &[u8] = b"fencing_token";
/// The layout a database was written in: 1 (or absent) keys only, 2 keys and delta records.
const FORMAT: &[u8] = b"format";
/// The newest layout this version reads, and the one it writes.
const FORMAT_VERSION: u64 = 2;

/// Memtables that fill the shared write-buffer budget (each memtable is this share of it).
const MEMTABLES_PER_BUDGET: usize = 8;

/// The shared resources of all partition databases of one instance.
pub struct RocksDbStores {
    cache: Cache,
    write_buffers: WriteBufferManager,
    /// Each column family's memtable: a share of the write-buffer budget (see [`RocksDbStores::new`]).
    memtable_bytes: usize,
    sync_writes: bool,
    coalescing_bytes: usize,
}

impl std::fmt::Debug for RocksDbStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksDbStores")
            .field("sync_writes", &self.sync_writes)
            .field("coalescing_bytes", &self.coalescing_bytes)
            .finish_non_exhaustive()
    }
}

impl RocksDbStores {
    /// Shared block cache of `cache_bytes` and write-buffer budget of `write_buffer_bytes` (charged to the
    /// cache, stalling writers when exceeded rather than growing without bound). Each memtable is an
    /// eighth of the budget (1–64 MiB): a busy partition flushes its own small memtable early instead of
    /// growing one to RocksDB's default 64 MiB, which filled the shared budget and stalled EVERY
    /// partition's commits until that flush was done (latency p99 ~570 ms instead of ~120–170 in the
    /// throughput bench's latency phase, in 3 of 5 runs).
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
            memtable_bytes: (write_buffer_bytes / MEMTABLES_PER_BUDGET).clamp(1 << 20, 64 << 20),
            sync_writes: false,
            coalescing_bytes: DEFAULT_COMMIT_COALESCING_BYTES,
        }
    }

    /// Coalesce commits up to `bytes` of delta records per partition (default
    /// [`DEFAULT_COMMIT_COALESCING_BYTES`]; 0: every commit writes its keys one by one). Each commit is
    /// then ONE record beside its offset — as durable, and a fraction of the cost of a memtable insert
    /// per changed key — and a key changed by many commits is written once per fold. Memory: about
    /// twice `bytes` per open partition (the records in the memtable, their latest values for reads).
    pub fn with_commit_coalescing(mut self, bytes: usize) -> Self {
        self.coalescing_bytes = bytes;
        self
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
        options.set_write_buffer_size(self.memtable_bytes);
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
        // Both families listed: one left out (the default, where the state's keys live) would get
        // RocksDB's default options — no compression, no bloom filters, its own cache.
        let families = [rocksdb::DEFAULT_COLUMN_FAMILY_NAME, META_CF]
            .map(|name| ColumnFamilyDescriptor::new(name, options.clone()));
        let db = DB::open_cf_descriptors(&options, path, families)
            .map_err(|err| ProcessorError::store(partition, "open", err))?;
        let mut store = RocksDbPartitionStore {
            partition,
            path: path.to_path_buf(),
            db,
            pending: Mutex::new(PendingCommits::default()),
            sync_writes: self.sync_writes,
            coalescing_bytes: self.coalescing_bytes,
        };
        store.check_format()?;
        let pending = store.read_pending()?;
        *store.pending.get_mut().unwrap_or_else(|p| p.into_inner()) = pending;
        Ok(store)
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
    /// The commits not folded into the keys yet; also serialises the read-check-write of the fencing
    /// token between writers of this partition.
    pending: Mutex<PendingCommits>,
    sync_writes: bool,
    coalescing_bytes: usize,
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

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, PendingCommits> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits `changes` with `next_offset` under `fencing_token` in one atomic `WriteBatch` — refused
    /// when a newer owner's token is already recorded. The changes go in as one delta record while the
    /// pending ones stay within the coalescing bound; otherwise the pending changes and these are
    /// folded into the keys.
    fn write(
        &self,
        mut changes: Vec<Change<'_>>,
        next_offset: i64,
        fencing_token: u64,
    ) -> ProcessorResult<()> {
        let mut pending = self.lock_pending();
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
        write.put_cf(meta, NEXT_OFFSET, next_offset.to_be_bytes());
        write.put_cf(meta, FENCING_TOKEN, fencing_token.to_be_bytes());
        if changes.is_empty() {
            return self.write_batch(write);
        }
        if self.coalescing_bytes > 0 {
            let delta = pending::encode(&changes);
            if pending.bytes() + delta.len() <= self.coalescing_bytes {
                let sequence = pending.next_sequence();
                write.put_cf(meta, pending::delta_key(sequence), &delta);
                self.write_batch(write)?;
                pending.push(sequence, delta.len(), &changes);
                return Ok(());
            }
        }
        if pending.is_empty() {
            sort_by_key(&mut changes);
            put_changes(&mut write, &changes);
            return self.write_batch(write);
        }
        for (key, value) in changes {
            pending.set(key, value);
        }
        self.fold(&mut pending, write)
    }

    /// Writes every pending change into the keys (with what `write` holds already) and deletes the
    /// delta records, in one batch.
    fn fold(&self, pending: &mut PendingCommits, mut write: WriteBatch) -> ProcessorResult<()> {
        let meta = self.meta_cf()?;
        put_changes(&mut write, &pending.sorted());
        for sequence in pending.sequences() {
            write.delete_cf(meta, pending::delta_key(sequence));
        }
        match self.write_batch(write) {
            Ok(()) => {
                pending.folded();
                Ok(())
            }
            Err(err) => {
                // What is pending in memory may now be ahead of the database: read it back.
                *pending = self.read_pending()?;
                Err(err)
            }
        }
    }

    fn write_batch(&self, write: WriteBatch) -> ProcessorResult<()> {
        let mut options = WriteOptions::default();
        options.set_sync(self.sync_writes);
        options.disable_wal(false);
        self.db
            .write_opt(write, &options)
            .map_err(|err| ProcessorError::store(self.partition, "write a batch", err))
    }

    /// Refuses a database written in a newer layout (reading it would miss what it keeps elsewhere), and
    /// records this version's layout in an older or new one.
    fn check_format(&self) -> ProcessorResult<()> {
        let found = self.read_meta(FORMAT)?.as_deref().and_then(decode_u64);
        match found {
            Some(version) if version > FORMAT_VERSION => Err(ProcessorError::store(
                self.partition,
                "open",
                format!(
                    "{} was written by a newer processor (state format {version}; this one reads up to \
                     {FORMAT_VERSION}): run the newer version, or restore the partition from a checkpoint it can read",
                    self.path.display()
                ),
            )),
            Some(FORMAT_VERSION) => Ok(()),
            _ => self
                .db
                .put_cf(self.meta_cf()?, FORMAT, FORMAT_VERSION.to_be_bytes())
                .map_err(|err| {
                    ProcessorError::store(self.partition, "record the state format", err)
                }),
        }
    }

    /// The delta records in the database, oldest first, read back.
    fn read_pending(&self) -> ProcessorResult<PendingCommits> {
        let meta = self.meta_cf()?;
        let mut pending: Option<PendingCommits> = None;
        let from = IteratorMode::From(pending::DELTA_PREFIX, rocksdb::Direction::Forward);
        for item in self.db.iterator_cf(meta, from) {
            let (key, record) = item.map_err(|err| {
                ProcessorError::store(self.partition, "read pending commits", err)
            })?;
            let Some(sequence) = pending::delta_sequence(&key) else {
                break;
            };
            let read = pending.get_or_insert_with(|| PendingCommits::starting_at(sequence));
            pending::decode(&record, &mut |key, value| read.set(key, value)).map_err(|what| {
                ProcessorError::store(
                    self.partition,
                    "read a pending commit back (the database is damaged: restore the partition from a checkpoint)",
                    what,
                )
            })?;
            read.push(sequence, record.len(), &[]);
        }
        Ok(pending.unwrap_or_default())
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
        if let Some(value) = self.lock_pending().get(key) {
            return Ok(value.map(<[u8]>::to_vec));
        }
        self.db
            .get(key)
            .map_err(|err| ProcessorError::store(self.partition, "read", err))
    }

    fn apply(&self, batch: &StateBatch) -> ProcessorResult<()> {
        let changes: Vec<Change<'_>> = batch
            .puts()
            .iter()
            .map(|(key, value)| (&key[..], Some(&value[..])))
            .chain(batch.deletes().iter().map(|key| (&key[..], None)))
            .collect();
        self.write(changes, batch.next_offset(), batch.fencing_token())
    }

    fn apply_changes(
        &self,
        changes: &mut dyn Iterator<Item = (&[u8], Option<&[u8]>)>,
        count: usize,
        next_offset: i64,
        fencing_token: u64,
    ) -> ProcessorResult<()> {
        let mut collected = Vec::with_capacity(count);
        collected.extend(changes);
        self.write(collected, next_offset, fencing_token)
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
        // Fold what is pending first, so the keys alone are the state; the iterator reads the database
        // as it is now, and commits go on while it runs.
        let iterator = {
            let mut pending = self.lock_pending();
            if !pending.is_empty() {
                self.fold(&mut pending, WriteBatch::default())?;
            }
            self.db.iterator(IteratorMode::Start)
        };
        for item in iterator {
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

/// In key order, the last change of a key last: RocksDB's memtable (a skip list) inserts a run of
/// ascending keys from where the previous insert ended instead of searching from the top for each.
fn sort_by_key(changes: &mut [Change<'_>]) {
    changes.sort_by(|a, b| a.0.cmp(b.0));
}

/// Puts or deletes each change, in order.
fn put_changes(write: &mut WriteBatch, changes: &[Change<'_>]) {
    for (key, value) in changes {
        match value {
            Some(value) => write.put(key, value),
            None => write.delete(key),
        }
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
    fn a_busy_partition_flushes_at_its_share_of_the_write_buffer_budget() {
        // A 16 MiB budget: memtables of 2 MiB. Without a share, the partition's memtable would grow
        // past 6 MiB (RocksDB's default is 64 MiB) until the shared budget itself was nearly full.
        let dir = tempfile::tempdir().unwrap();
        let store = RocksDbStores::new(32 << 20, 16 << 20)
            .with_commit_coalescing(0)
            .open(1, dir.path())
            .unwrap();
        for round in 0..6_i64 {
            let mut batch = StateBatch::new(round + 1, 1);
            for key in 0..1_024 {
                batch.put(format!("k{round}-{key}"), vec![7u8; 1_024]);
            }
            store.apply(&batch).unwrap();
        }
        let active = store
            .db
            .property_int_value("rocksdb.cur-size-active-mem-table")
            .unwrap()
            .unwrap();
        assert!(
            active < 3 << 20,
            "6 MiB written, {active} bytes still in the active memtable"
        );
    }

    #[test]
    fn compression_bloom_filters_and_memtable_shares_are_on_in_every_column_family() {
        let dir = tempfile::tempdir().unwrap();
        let _store = open(dir.path());
        let options = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().starts_with("OPTIONS-"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .expect("an OPTIONS file");
        assert!(options.contains("max_open_files=256"));
        // The state's keys live in the default column family: it must be tuned as the meta one is (it
        // was not: opened with descriptors, a family not listed gets RocksDB's default options).
        let section = |name: &str| {
            let from = options
                .find(name)
                .unwrap_or_else(|| panic!("{name} missing from the options"));
            let rest = &options[from + name.len()..];
            rest[..rest.find("\n[").unwrap_or(rest.len())].to_owned()
        };
        for family in ["default", "meta"] {
            let cf = section(&format!("[CFOptions \"{family}\"]"));
            let table = section(&format!("[TableOptions/BlockBasedTable \"{family}\"]"));
            for (wanted, within) in [
                ("compression=kLZ4Compression", &cf),
                // `open` gives a 4 MiB budget: an eighth of it, at least 1 MiB.
                ("write_buffer_size=1048576", &cf),
                ("filter_policy=bloomfilter", &table),
                ("cache_index_and_filter_blocks=true", &table),
            ] {
                assert!(
                    within.contains(wanted),
                    "{wanted} missing from column family {family}"
                );
            }
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

    fn open_coalescing(dir: &Path, bytes: usize) -> RocksDbPartitionStore {
        RocksDbStores::new(8 << 20, 4 << 20)
            .with_commit_coalescing(bytes)
            .open(1, dir)
            .unwrap()
    }

    /// Keys written one by one (the default column family), and delta records waiting for a fold.
    fn written_keys_and_deltas(store: &RocksDbPartitionStore) -> (Vec<Vec<u8>>, usize) {
        let keys = store
            .db
            .iterator(IteratorMode::Start)
            .map(|item| item.unwrap().0.to_vec())
            .collect();
        let meta = store.meta_cf().unwrap();
        let deltas = store
            .db
            .iterator_cf(meta, IteratorMode::Start)
            .filter(|item| pending::delta_sequence(&item.as_ref().unwrap().0).is_some())
            .count();
        (keys, deltas)
    }

    fn commit(store: &RocksDbPartitionStore, offset: i64, changes: &[Change<'_>]) {
        store
            .apply_changes(&mut changes.iter().copied(), changes.len(), offset, 1)
            .unwrap();
    }

    #[test]
    fn passes_the_shared_store_tests_coalescing_off_and_folding_at_every_commit() {
        for bytes in [0, 1] {
            let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
            let open = |i: usize| open_coalescing(dirs[i].path(), bytes);
            shared_tests::new_store_is_empty(&open(0));
            shared_tests::batch_applies_state_offset_and_token_together(&open(1));
            shared_tests::stale_owner_is_refused_and_nothing_changes(&open(2));
            shared_tests::keys_are_binary_safe(&open(3));
            shared_tests::changes_apply_atomically_like_a_batch(&open(4));
        }
    }

    #[test]
    fn commits_wait_as_delta_records_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open_coalescing(dir.path(), 1 << 20);
            commit(&store, 10, &[(b"a", Some(b"1")), (b"b", Some(b"1"))]);
            commit(&store, 20, &[(b"a", None), (b"c", Some(b"3"))]);
            commit(&store, 30, &[(b"b", Some(b"22"))]);
            assert_eq!(
                written_keys_and_deltas(&store),
                (vec![], 3),
                "three commits, three records, no key written yet"
            );
            assert_eq!(store.get(b"a").unwrap(), None);
            assert_eq!(store.get(b"b").unwrap(), Some(b"22".to_vec()));
        } // dropped as a crash would: nothing folded
        let store = open_coalescing(dir.path(), 1 << 20);
        assert_eq!(store.meta().unwrap().unwrap().next_offset, 30);
        assert_eq!(store.get(b"b").unwrap(), Some(b"22".to_vec()));
        assert_eq!(store.get(b"c").unwrap(), Some(b"3".to_vec()));
        assert_eq!(store.get(b"a").unwrap(), None);
        commit(&store, 40, &[(b"d", Some(b"4"))]);
        assert_eq!(written_keys_and_deltas(&store).1, 4, "numbering goes on");
        // A scan folds first, then reads the keys alone.
        let entries = store.entries().unwrap();
        assert_eq!(
            entries,
            vec![
                (b"b".to_vec(), b"22".to_vec()),
                (b"c".to_vec(), b"3".to_vec()),
                (b"d".to_vec(), b"4".to_vec()),
            ]
        );
        assert_eq!(
            written_keys_and_deltas(&store),
            (vec![b"b".to_vec(), b"c".to_vec(), b"d".to_vec()], 0)
        );
        assert_eq!(store.meta().unwrap().unwrap().next_offset, 40);
    }

    #[test]
    fn a_commit_past_the_bound_folds_every_key_once_and_drops_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let value = [7u8; 40];
        let store = open_coalescing(dir.path(), 200); // about three commits of two keys
        let mut folds = 0;
        let mut waiting = 0;
        for offset in 1..=12 {
            commit(
                &store,
                offset,
                &[
                    (b"x", Some(&value)),
                    (b"y", Some(&value[..offset as usize])),
                ],
            );
            let (keys, deltas) = written_keys_and_deltas(&store);
            if deltas < waiting {
                folds += 1;
                assert_eq!((keys.len(), deltas), (2, 0), "a fold leaves no record");
            }
            waiting = deltas;
            assert_eq!(
                store.get(b"y").unwrap(),
                Some(value[..offset as usize].to_vec())
            );
        }
        assert!((3..=6).contains(&folds), "{folds} folds in 12 commits");
        drop(store);
        let store = open_coalescing(dir.path(), 200);
        assert_eq!(store.get(b"y").unwrap(), Some(value[..12].to_vec()));
        assert_eq!(store.meta().unwrap().unwrap().next_offset, 12);
    }

    #[test]
    fn a_snapshot_taken_with_commits_pending_opens_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_coalescing(&dir.path().join("db"), 1 << 20);
        commit(&store, 5, &[(b"k", Some(b"v"))]);
        store.snapshot_to(&dir.path().join("snap")).unwrap();
        commit(&store, 6, &[(b"k", Some(b"v2"))]);
        let snapshot = open_coalescing(&dir.path().join("snap"), 1 << 20);
        assert_eq!(snapshot.get(b"k").unwrap(), Some(b"v".to_vec()));
        assert_eq!(snapshot.meta().unwrap().unwrap().next_offset, 5);
    }

    #[test]
    fn a_database_of_a_newer_format_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            let meta = store.meta_cf().unwrap();
            let found = store.db.get_cf(meta, FORMAT).unwrap();
            assert_eq!(found, Some(FORMAT_VERSION.to_be_bytes().to_vec()));
            store
                .db
                .put_cf(meta, FORMAT, (FORMAT_VERSION + 1).to_be_bytes())
                .unwrap();
        }
        let err = RocksDbStores::new(8 << 20, 4 << 20)
            .open(1, dir.path())
            .unwrap_err();
        let said = format!(
            "{err}: {}",
            std::error::Error::source(&err)
                .map(ToString::to_string)
                .unwrap_or_default()
        );
        assert!(
            said.contains("partition 1") && said.contains("newer processor"),
            "{said}"
        );
    }

    #[test]
    fn a_damaged_delta_record_fails_the_open_with_the_partition_named() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open_coalescing(dir.path(), 1 << 20);
            commit(&store, 5, &[(b"k", Some(b"v"))]);
            let meta = store.meta_cf().unwrap();
            store
                .db
                .put_cf(meta, pending::delta_key(0), [9, 0, 0, 0, 1])
                .unwrap();
        }
        let err = RocksDbStores::new(8 << 20, 4 << 20)
            .open(1, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("partition 1") && err.contains("damaged"),
            "{err}"
        );
    }
}
