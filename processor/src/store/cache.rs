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

use std::collections::HashMap;
use std::sync::Arc;

use super::{PartitionStore, StateBatch};
use crate::error::ProcessorResult;

type Map = HashMap<Box<[u8]>, Slot, foldhash::fast::RandomState>;

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
    /// Keys changed since the last commit, each once.
    dirty: Vec<Box<[u8]>>,
    bytes: usize,
    dirty_bytes: usize,
    budget: usize,
}

impl std::fmt::Debug for PartitionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionState")
            .field("partition", &self.store.partition())
            .field("cached", &(self.hot.len() + self.cold.len()))
            .field("dirty", &self.dirty.len())
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
            dirty: Vec::new(),
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
        if !self.hot.contains_key(key) {
            let slot = match self.cold.remove(key) {
                Some(slot) => slot,
                None => {
                    let value = self.store.get(key)?;
                    self.bytes += charge(key, value.as_ref());
                    Slot {
                        value,
                        dirty: false,
                    }
                }
            };
            self.hot.insert(key.into(), slot);
        }
        Ok(self.hot.get(key).and_then(|slot| slot.value.as_deref()))
    }

    /// Sets `key` to `value` (written at the next commit).
    pub fn put(&mut self, key: &[u8], value: Vec<u8>) {
        self.set(key, Some(value));
    }

    /// Removes `key` (at the next commit).
    pub fn delete(&mut self, key: &[u8]) {
        self.set(key, None);
    }

    fn set(&mut self, key: &[u8], value: Option<Vec<u8>>) {
        let added = charge(key, value.as_ref());
        if let Some(old) = self.cold.remove(key) {
            self.bytes -= charge(key, old.value.as_ref());
        }
        match self.hot.get_mut(key) {
            Some(slot) => {
                let replaced = charge(key, slot.value.as_ref());
                self.bytes = self.bytes - replaced + added;
                if slot.dirty {
                    self.dirty_bytes = self.dirty_bytes - replaced + added;
                } else {
                    self.dirty.push(key.into());
                    self.dirty_bytes += added;
                }
                *slot = Slot { value, dirty: true };
            }
            None => {
                self.bytes += added;
                self.dirty_bytes += added;
                self.dirty.push(key.into());
                self.hot.insert(key.into(), Slot { value, dirty: true });
            }
        }
    }

    /// How many keys changed since the last commit.
    pub fn changed_keys(&self) -> usize {
        self.dirty.len()
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

    /// Moves every change since the last commit into `batch` (one entry per changed key) and marks the
    /// cache clean; evicts a generation if the cache is over its budget. The caller writes `batch`: if
    /// that fails the partition must stop (its cache now claims changes the store never got).
    pub fn drain_changes_into(&mut self, batch: &mut StateBatch) {
        for key in std::mem::take(&mut self.dirty) {
            if let Some(slot) = self.hot.get_mut(&key) {
                slot.dirty = false;
                match &slot.value {
                    Some(value) => batch.put(key.into_vec(), value.clone()),
                    None => batch.delete(key.into_vec()),
                };
            }
        }
        self.dirty_bytes = 0;
        if self.bytes > self.budget {
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
    }

    /// Forgets every change since the last commit (a batch whose outputs could not be delivered): the
    /// next reads of those keys go to the store.
    pub fn discard_changes(&mut self) {
        for key in std::mem::take(&mut self.dirty) {
            if let Some(slot) = self.hot.remove(&key) {
                self.bytes -= charge(&key, slot.value.as_ref());
            }
        }
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
