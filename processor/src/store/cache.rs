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

use hashbrown::hash_map::EntryRef;

use super::{PartitionStore, StateBatch};
use crate::error::ProcessorResult;

/// Keys are hashed with foldhash (hashbrown's default: fast, and seeded per map, so crafted keys
/// cannot force collisions).
type Map = hashbrown::HashMap<Box<[u8]>, Slot>;

/// What a cached key holds: its value (`None`: absent or deleted) and whether it changed since the last
/// commit.
#[derive(Debug)]
struct Slot {
    value: Option<Vec<u8>>,
    dirty: bool,
}

/// Bytes a cached entry is charged beyond its key and value: the map slot, the boxes' headers.
const ENTRY_OVERHEAD: usize = 64;

fn charge(key: &[u8], value: Option<&Vec<u8>>) -> usize {
    ENTRY_OVERHEAD + key.len() + value.map_or(0, Vec::len)
}

/// A partition's state as an operator sees it: get, put and delete with read-your-writes, over a
/// bounded write-back cache in front of the partition's store (see the [module docs](self)).
pub struct PartitionState {
    store: Arc<dyn PartitionStore>,
    hot: Map,
    cold: Map,
    /// Keys changed since the last commit.
    dirty: usize,
    bytes: usize,
    dirty_bytes: usize,
    budget: usize,
}

impl std::fmt::Debug for PartitionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionState")
            .field("partition", &self.store.partition())
            .field("cached", &(self.hot.len() + self.cold.len()))
            .field("dirty", &self.dirty)
            .field("bytes", &self.bytes)
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
            dirty: 0,
            bytes: 0,
            dirty_bytes: 0,
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
        let PartitionState {
            store,
            hot,
            cold,
            bytes,
            ..
        } = self;
        let slot = match hot.entry_ref(key) {
            EntryRef::Occupied(entry) => entry.into_mut(),
            EntryRef::Vacant(entry) => {
                let slot = match cold.remove(key) {
                    Some(slot) => slot,
                    None => {
                        let value = store.get(key)?;
                        *bytes += charge(key, value.as_ref());
                        Slot {
                            value,
                            dirty: false,
                        }
                    }
                };
                entry.insert(slot)
            }
        };
        Ok(slot.value.as_deref())
    }

    /// Sets `key` to `value` (written at the next commit).
    pub fn put(&mut self, key: &[u8], value: Vec<u8>) {
        self.set(key, Some(value));
    }

    /// Sets `key` to a copy of `value`, reusing the cached value's buffer when the key is cached: no
    /// allocation for a key updated again (the common case of an aggregation).
    pub fn put_slice(&mut self, key: &[u8], value: &[u8]) {
        if let Some(slot) = self.hot.get_mut(key)
            && let Some(buffer) = slot.value.as_mut()
        {
            let (before, after) = (key.len() + buffer.len(), key.len() + value.len());
            self.bytes = self.bytes + after - before;
            if slot.dirty {
                self.dirty_bytes = self.dirty_bytes + after - before;
            } else {
                slot.dirty = true;
                self.dirty += 1;
                self.dirty_bytes += ENTRY_OVERHEAD + after;
            }
            buffer.clear();
            buffer.extend_from_slice(value);
            return;
        }
        self.set(key, Some(value.to_vec()));
    }

    /// Removes `key` (at the next commit).
    pub fn delete(&mut self, key: &[u8]) {
        self.set(key, None);
    }

    fn set(&mut self, key: &[u8], value: Option<Vec<u8>>) {
        let added = charge(key, value.as_ref());
        match self.hot.entry_ref(key) {
            EntryRef::Occupied(mut entry) => {
                let slot = entry.get_mut();
                let replaced = charge(key, slot.value.as_ref());
                self.bytes = self.bytes - replaced + added;
                if slot.dirty {
                    self.dirty_bytes = self.dirty_bytes - replaced + added;
                } else {
                    self.dirty += 1;
                    self.dirty_bytes += added;
                }
                *slot = Slot { value, dirty: true };
            }
            EntryRef::Vacant(entry) => {
                if let Some(old) = self.cold.remove(key) {
                    self.bytes -= charge(key, old.value.as_ref());
                }
                self.bytes += added;
                self.dirty += 1;
                self.dirty_bytes += added;
                entry.insert(Slot { value, dirty: true });
            }
        }
    }

    /// How many keys changed since the last commit.
    pub fn changed_keys(&self) -> usize {
        self.dirty
    }

    /// Whether the changes waiting for a commit take half the budget or more: commit now, before the
    /// cache has to hold more than it may.
    pub fn wants_commit(&self) -> bool {
        self.dirty_bytes.saturating_mul(2) >= self.budget.max(1)
    }

    /// Bytes the cache holds (keys, values and bookkeeping).
    pub fn cached_bytes(&self) -> usize {
        self.bytes
    }

    /// Writes every change since the last commit — one entry per changed key, straight from the cache
    /// — with `next_offset` under `fencing_token` in ONE atomic write of the store, and marks the cache
    /// clean; then evicts a generation if the cache is over its budget.
    ///
    /// # Errors
    /// The store's (a stale owner, a write error): the partition must stop then, its cache claims
    /// changes the store never got.
    pub fn commit(&mut self, next_offset: i64, fencing_token: u64) -> ProcessorResult<()> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut changes: Vec<(&[u8], Option<&[u8]>)> = Vec::with_capacity(dirty);
        changes.extend(self.hot.iter_mut().filter_map(|(key, slot)| {
            if !slot.dirty {
                return None;
            }
            slot.dirty = false;
            Some((&**key, slot.value.as_deref()))
        }));
        // In key order: RocksDB's memtable (a skip list) inserts a run of ascending keys from where
        // the previous insert ended instead of searching from the top for each.
        changes.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let written =
            self.store
                .apply_changes(&mut changes.into_iter(), dirty, next_offset, fencing_token);
        self.dirty_bytes = 0;
        written?;
        self.evict_if_over_budget();
        Ok(())
    }

    /// As [`commit`](Self::commit), into `batch` instead of the store (the caller writes it).
    pub fn drain_changes_into(&mut self, batch: &mut StateBatch) {
        for (key, slot) in self.hot.iter_mut().filter(|(_, slot)| slot.dirty) {
            slot.dirty = false;
            match &slot.value {
                Some(value) => batch.put(key.to_vec(), value.clone()),
                None => batch.delete(key.to_vec()),
            };
        }
        self.dirty = 0;
        self.dirty_bytes = 0;
        self.evict_if_over_budget();
    }

    fn evict_if_over_budget(&mut self) {
        if self.bytes <= self.budget {
            return;
        }
        // Everything is clean now: the hot generation becomes the cold one, the old cold one goes.
        let evicted: usize = self
            .cold
            .iter()
            .map(|(key, slot)| charge(key, slot.value.as_ref()))
            .sum();
        self.bytes -= evicted;
        self.cold = std::mem::take(&mut self.hot);
        if self.bytes > self.budget {
            // One generation alone is over the budget (a budget smaller than one commit's changes).
            self.cold.clear();
            self.bytes = 0;
        }
    }

    /// Forgets every change since the last commit (a batch whose outputs could not be delivered): the
    /// next reads of those keys go to the store.
    pub fn discard_changes(&mut self) {
        let mut freed = 0;
        self.hot.retain(|key, slot| {
            if slot.dirty {
                freed += charge(key, slot.value.as_ref());
            }
            !slot.dirty
        });
        self.bytes -= freed;
        self.dirty = 0;
        self.dirty_bytes = 0;
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
