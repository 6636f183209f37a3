//! The write-back state cache: what an [`Operator`](crate::operator::Operator) reads and writes.
//!
//! [`PartitionState`] sits in front of one partition's [`PartitionStore`]. Reads hit the cache first and
//! fill it from the store on a miss (absent keys are cached too); writes stay in the cache, marked dirty,
//! until the partition commits: then every *changed key* becomes one entry of ONE atomic
//! [`StateBatch`] together with the next offset and the fencing token (Kafka Streams' record cache
//! flushes entry by entry; ours is all-or-nothing with the offset). A key updated 1 000 times between
//! two commits is written once.
//!
//! The cache is bounded in bytes. Eviction is by generation (a cheap approximation of LRU): entries live
//! in a *hot* map; when a commit leaves the cache over its budget, the hot map becomes the *cold* one
//! and the old cold map is dropped; a cold entry read again moves back to hot. Dirty entries are never
//! evicted — the caller commits early when they reach half the budget ([`PartitionState::wants_commit`]).

use std::sync::Arc;

use super::inline::{HeldKey, HeldValue, held};
use super::{PartitionStore, StateBatch};
use crate::error::ProcessorResult;

/// An index map: a small hash table of positions into a vector of entries kept in the order they were
/// cached (small keys and values held inside them). The table stays in the CPU cache and entries
/// cached together sit together, so a partition reading its keys in a recurring order reads memory in
/// order; a `HashMap` with keys and values behind their own pointers cost up to four cache misses per
/// lookup (measured: `cargo bench -p fenced-processor --bench state_path`). Keys are hashed with foldhash
/// (hashbrown's default: fast, and seeded per map, so crafted keys cannot force collisions).
type Map = indexmap::IndexMap<HeldKey, Slot, hashbrown::DefaultHashBuilder>;

/// What a cached key holds: its value (`None`: absent or deleted) and whether it changed since the last
/// commit.
#[derive(Debug)]
struct Slot {
    value: Option<HeldValue>,
    dirty: bool,
}

/// Keys looked up together ahead of the records (or changes) that will read them: see
/// [`PartitionState::prefetch`]. 8 and 32 measured the same.
pub(crate) const LOOKUPS_AHEAD: usize = 16;

/// Bytes a cached entry is charged beyond its key and value: the map slot (small keys and values are
/// held inside it, see [`super::inline`]).
const ENTRY_OVERHEAD: usize = 64;

fn charge(key_len: usize, value: Option<&[u8]>) -> usize {
    ENTRY_OVERHEAD + key_len + value.map_or(0, <[u8]>::len)
}

/// What the cache holds, in bytes and in changed keys.
#[derive(Debug, Default)]
struct Usage {
    bytes: usize,
    /// Keys changed since the last commit.
    dirty: usize,
    dirty_bytes: usize,
}

impl Usage {
    /// A cached entry charged `replaced` bytes now charges `added`, and is changed.
    fn changed(&mut self, was_dirty: bool, replaced: usize, added: usize) {
        self.bytes = self.bytes - replaced + added;
        if was_dirty {
            self.dirty_bytes = self.dirty_bytes - replaced + added;
        } else {
            self.dirty += 1;
            self.dirty_bytes += added;
        }
    }

    /// Every change was committed (or forgotten).
    fn clean(&mut self) {
        self.dirty = 0;
        self.dirty_bytes = 0;
    }
}

/// A partition's state as an operator sees it: get, put and delete with read-your-writes, over a
/// bounded write-back cache in front of the partition's store (see the [module docs](self)).
pub struct PartitionState {
    store: Arc<dyn PartitionStore>,
    hot: Map,
    cold: Map,
    usage: Usage,
    budget: usize,
}

impl std::fmt::Debug for PartitionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionState")
            .field("partition", &self.store.partition())
            .field("cached", &(self.hot.len() + self.cold.len()))
            .field("usage", &self.usage)
            .field("budget", &self.budget)
            .finish()
    }
}

impl PartitionState {
    /// A cache of at most about `budget_bytes` in front of `store` (0: nothing is kept between
    /// commits, every read goes to the store; changes still wait for the commit).
    pub fn new(store: Arc<dyn PartitionStore>, budget_bytes: usize) -> Self {
        PartitionState {
            store,
            hot: Map::default(),
            cold: Map::default(),
            usage: Usage::default(),
            budget: budget_bytes,
        }
    }

    /// The partition.
    pub fn partition(&self) -> i32 {
        self.store.partition()
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn PartitionStore> {
        &self.store
    }

    /// The current value of `key`: this partition's latest write to it (committed or not), else the
    /// store's.
    ///
    /// # Errors
    /// A store error reading a key not cached.
    pub fn get(&mut self, key: &[u8]) -> ProcessorResult<Option<&[u8]>> {
        Ok(self.slot(key)?.0.value.as_deref())
    }

    /// The cached entry of `key` (loaded from the store if needed), to read and change with ONE
    /// lookup: what a read-modify-write operator (an aggregation) does per record.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use processor::store::{PartitionState, PartitionStore, memory::InMemoryPartitionStore};
    /// # fn main() -> processor::ProcessorResult<()> {
    /// # let store: Arc<dyn PartitionStore> = Arc::new(InMemoryPartitionStore::new(0));
    /// let mut state = PartitionState::new(store, 1 << 20);
    /// let mut entry = state.entry(b"visits")?;
    /// let visits = entry.value().map_or(0, |v| v[0]) + 1;
    /// entry.set(&[visits]); // reuses the cached buffer
    /// assert_eq!(state.get(b"visits")?, Some(&[1u8][..]));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// A store error reading a key not cached.
    pub fn entry(&mut self, key: &[u8]) -> ProcessorResult<StateEntry<'_>> {
        let (slot, usage) = self.slot(key)?;
        Ok(StateEntry {
            key_len: key.len(),
            slot,
            usage,
        })
    }

    /// Looks `keys` up ahead of the records that will read them — a hint that changes nothing. One
    /// lookup per record in turn waits for its cache miss (the hash bucket of a key seen a whole cycle
    /// of keys ago) before the next can start; independent lookups in a row overlap their misses, and
    /// the records' own lookups that follow find the lines cached.
    pub(crate) fn prefetch<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) {
        for key in keys {
            std::hint::black_box(self.hot.get_index_of(key));
        }
    }

    /// The hot slot of `key`: found, moved back from the cold generation, or loaded from the store.
    fn slot(&mut self, key: &[u8]) -> ProcessorResult<(&mut Slot, &mut Usage)> {
        let PartitionState {
            store,
            hot,
            cold,
            usage,
            ..
        } = self;
        let index = match hot.get_index_of(key) {
            Some(index) => index,
            None => {
                let slot = match cold.swap_remove(key) {
                    Some(slot) => slot,
                    None => {
                        let value = store.get(key)?;
                        usage.bytes += charge(key.len(), value.as_deref());
                        Slot {
                            value: value.map(held),
                            dirty: false,
                        }
                    }
                };
                hot.insert_full(HeldKey::from_slice(key), slot).0
            }
        };
        Ok((&mut hot[index], usage))
    }

    /// Sets `key` to `value` (written at the next commit).
    pub fn put(&mut self, key: &[u8], value: Vec<u8>) {
        self.set(key, Some(value));
    }

    /// Sets `key` to a copy of `value`, reusing the cached value's buffer when the key is cached: no
    /// allocation for a key updated again (the common case of an aggregation).
    pub fn put_slice(&mut self, key: &[u8], value: &[u8]) {
        if let Some(slot) = self.hot.get_mut(key)
            && slot.value.is_some()
        {
            StateEntry {
                key_len: key.len(),
                slot,
                usage: &mut self.usage,
            }
            .set(value);
            return;
        }
        self.set(key, Some(value.to_vec()));
    }

    /// Removes `key` (at the next commit).
    pub fn delete(&mut self, key: &[u8]) {
        self.set(key, None);
    }

    fn set(&mut self, key: &[u8], value: Option<Vec<u8>>) {
        let added = charge(key.len(), value.as_deref());
        let value = value.map(held);
        match self.hot.get_mut(key) {
            Some(slot) => {
                let replaced = charge(key.len(), slot.value.as_deref());
                self.usage.changed(slot.dirty, replaced, added);
                *slot = Slot { value, dirty: true };
            }
            None => {
                if let Some(old) = self.cold.swap_remove(key) {
                    self.usage.bytes -= charge(key.len(), old.value.as_deref());
                }
                self.usage.changed(false, 0, added);
                self.hot
                    .insert(HeldKey::from_slice(key), Slot { value, dirty: true });
            }
        }
    }

    /// How many keys changed since the last commit.
    pub fn changed_keys(&self) -> usize {
        self.usage.dirty
    }

    /// Whether the changes waiting for a commit take half the budget or more: commit now, before the
    /// cache has to hold more than it may.
    pub fn wants_commit(&self) -> bool {
        self.wants_commit_holding(0)
    }

    /// As [`wants_commit`](Self::wants_commit), with `other_bytes` more waiting for the same commit (a
    /// partition's pending outputs) charged to the budget.
    pub fn wants_commit_holding(&self, other_bytes: usize) -> bool {
        let waiting = self.usage.dirty_bytes.saturating_add(other_bytes);
        waiting.saturating_mul(2) >= self.budget.max(1)
    }

    /// Bytes the cache holds (keys, values and bookkeeping).
    pub fn cached_bytes(&self) -> usize {
        self.usage.bytes
    }

    /// Writes every change since the last commit — one entry per changed key, straight from the cache
    /// — with `next_offset` under `fencing_token` in ONE atomic write of the store, and marks the cache
    /// clean; then evicts a generation if the cache is over its budget.
    ///
    /// # Errors
    /// The store's (a stale owner, a write error): the partition must stop then, its cache claims
    /// changes the store never got.
    pub fn commit(&mut self, next_offset: i64, fencing_token: u64) -> ProcessorResult<()> {
        let count = self.usage.dirty;
        let changes = Self::take_changes(&mut self.hot, &mut self.usage);
        self.store
            .apply_changes(&mut changes.into_iter(), count, next_offset, fencing_token)?;
        self.evict_if_over_budget();
        Ok(())
    }

    /// As [`commit`](Self::commit), into `batch` instead of the store (the caller writes it).
    pub fn drain_changes_into(&mut self, batch: &mut StateBatch) {
        for (key, value) in Self::take_changes(&mut self.hot, &mut self.usage) {
            match value {
                Some(value) => batch.put(key, value),
                None => batch.delete(key),
            };
        }
        self.evict_if_over_budget();
    }

    /// Every changed entry, marked clean (in no particular order: a store that wants them sorted sorts
    /// them, see the RocksDB store).
    fn take_changes<'m>(hot: &'m mut Map, usage: &mut Usage) -> Vec<(&'m [u8], Option<&'m [u8]>)> {
        let mut changes = Vec::with_capacity(usage.dirty);
        changes.extend(hot.iter_mut().filter_map(|(key, slot)| {
            if !slot.dirty {
                return None;
            }
            slot.dirty = false;
            Some((&**key, slot.value.as_deref()))
        }));
        usage.clean();
        changes
    }

    fn evict_if_over_budget(&mut self) {
        if self.usage.bytes <= self.budget {
            return;
        }
        // Everything is clean now: the hot generation becomes the cold one, the old cold one goes.
        let evicted: usize = self
            .cold
            .iter()
            .map(|(key, slot)| charge(key.len(), slot.value.as_deref()))
            .sum();
        self.usage.bytes -= evicted;
        self.cold = std::mem::take(&mut self.hot);
        if self.usage.bytes > self.budget {
            // One generation alone is over the budget (a budget smaller than one commit's changes).
            self.cold.clear();
            self.usage.bytes = 0;
        }
    }

    /// Forgets every change since the last commit (a batch whose outputs could not be delivered): the
    /// next reads of those keys go to the store.
    pub fn discard_changes(&mut self) {
        let mut freed = 0;
        self.hot.retain(|key, slot| {
            if slot.dirty {
                freed += charge(key.len(), slot.value.as_deref());
            }
            !slot.dirty
        });
        self.usage.bytes -= freed;
        self.usage.clean();
    }
}

/// One cached key of a [`PartitionState`], from [`PartitionState::entry`]: its value, and changes made
/// without looking the key up again. Changes are written at the next commit, like every write.
#[derive(Debug)]
pub struct StateEntry<'a> {
    key_len: usize,
    slot: &'a mut Slot,
    usage: &'a mut Usage,
}

impl StateEntry<'_> {
    /// The key's current value (`None`: absent or deleted).
    pub fn value(&self) -> Option<&[u8]> {
        self.slot.value.as_deref()
    }

    /// Sets the value to a copy of `value`, reusing the current value's buffer.
    pub fn set(&mut self, value: &[u8]) {
        let replaced = charge(self.key_len, self.slot.value.as_deref());
        self.usage
            .changed(self.slot.dirty, replaced, charge(self.key_len, Some(value)));
        self.slot.dirty = true;
        let buffer = self.slot.value.get_or_insert_with(HeldValue::new);
        buffer.clear();
        buffer.extend_from_slice(value);
    }

    /// Removes the key.
    pub fn delete(&mut self) {
        let replaced = charge(self.key_len, self.slot.value.as_deref());
        self.usage
            .changed(self.slot.dirty, replaced, charge(self.key_len, None));
        self.slot.dirty = true;
        self.slot.value = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::InMemoryPartitionStore;

    fn state(budget: usize) -> (Arc<dyn PartitionStore>, PartitionState) {
        let store: Arc<dyn PartitionStore> = Arc::new(InMemoryPartitionStore::new(0));
        (store.clone(), PartitionState::new(store, budget))
    }

    fn commit(state: &mut PartitionState, store: &dyn PartitionStore, offset: i64) -> StateBatch {
        let mut batch = StateBatch::new(offset, 1);
        state.drain_changes_into(&mut batch);
        store.apply(&batch).unwrap();
        batch
    }

    #[test]
    fn reads_its_own_writes_and_commits_one_entry_per_changed_key() {
        let (store, mut state) = state(1 << 20);
        for i in 0..100u8 {
            state.put(b"counter", vec![i]);
        }
        state.put(b"gone", b"x".to_vec());
        state.delete(b"gone");
        assert_eq!(state.get(b"counter").unwrap(), Some(&[99u8][..]));
        assert_eq!(state.get(b"gone").unwrap(), None);
        assert_eq!(
            store.get(b"counter").unwrap(),
            None,
            "nothing written before the commit"
        );
        let batch = commit(&mut state, store.as_ref(), 100);
        assert_eq!(batch.puts(), &[(b"counter".to_vec(), vec![99u8])]);
        assert_eq!(batch.deletes(), &[b"gone".to_vec()]);
        assert_eq!(store.get(b"counter").unwrap(), Some(vec![99]));
        assert_eq!(state.changed_keys(), 0);
        let empty = commit(&mut state, store.as_ref(), 101);
        assert!(empty.is_empty(), "a clean cache commits no entry");
    }

    #[test]
    fn stays_within_its_budget_and_still_answers_from_the_store() {
        let (store, mut state) = state(20_000);
        for round in 0..5u32 {
            for key in 0..1_000u32 {
                let key = key.to_be_bytes();
                let next = state.get(&key).unwrap().map_or(0, |v| v[0]) + 1;
                state.put(&key, vec![next; 10]);
                if state.wants_commit() {
                    commit(&mut state, store.as_ref(), i64::from(round));
                }
            }
            commit(&mut state, store.as_ref(), i64::from(round));
            assert!(
                state.cached_bytes() <= 20_000,
                "{} bytes cached",
                state.cached_bytes()
            );
        }
        for key in 0..1_000u32 {
            assert_eq!(store.get(&key.to_be_bytes()).unwrap(), Some(vec![5; 10]));
            assert_eq!(state.get(&key.to_be_bytes()).unwrap(), Some(&[5u8; 10][..]));
        }
    }

    #[test]
    fn an_entry_reads_and_changes_its_key_with_the_same_accounting_as_put() {
        let (store, mut state) = state(1 << 20);
        state.put(b"old", b"stored".to_vec());
        commit(&mut state, store.as_ref(), 1);
        let mut entry = state.entry(b"old").unwrap();
        assert_eq!(entry.value(), Some(&b"stored"[..]));
        entry.set(b"changed twice");
        entry.set(b"changed");
        state.entry(b"new").unwrap().set(b"made");
        state.entry(b"gone").unwrap().delete();
        assert_eq!(state.changed_keys(), 3);
        let by_entry = state.cached_bytes();

        let (_, mut by_put) = super::tests::state(1 << 20);
        by_put.put(b"old", b"changed".to_vec());
        by_put.put(b"new", b"made".to_vec());
        by_put.delete(b"gone");
        assert_eq!(by_entry, by_put.cached_bytes(), "same bytes charged");

        let batch = commit(&mut state, store.as_ref(), 2);
        let mut puts = batch.puts().to_vec();
        puts.sort(); // the cache hands its changes over in no particular order
        assert_eq!(
            puts,
            [
                (b"new".to_vec(), b"made".to_vec()),
                (b"old".to_vec(), b"changed".to_vec())
            ]
        );
        assert_eq!(batch.deletes(), &[b"gone".to_vec()]);
        assert_eq!(store.get(b"old").unwrap(), Some(b"changed".to_vec()));
    }

    #[test]
    fn discarded_changes_are_read_from_the_store_again() {
        let (store, mut state) = state(1 << 20);
        state.put(b"k", b"committed".to_vec());
        commit(&mut state, store.as_ref(), 1);
        state.put(b"k", b"never delivered".to_vec());
        state.put(b"new", b"never delivered".to_vec());
        state.discard_changes();
        assert_eq!(state.get(b"k").unwrap(), Some(&b"committed"[..]));
        assert_eq!(state.get(b"new").unwrap(), None);
        assert!(commit(&mut state, store.as_ref(), 2).is_empty());
    }
}
