//! The stores of the partitions an instance processes now, registered by their tasks for as long as
//! they run: what queries of live state read ([`crate::fleet::query`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::store::PartitionStore;

/// Each processed partition's store and the fencing token it runs under.
type ByPartition = HashMap<i32, (Arc<dyn PartitionStore>, u64)>;

/// The stores of the partitions an instance processes now.
#[derive(Default)]
pub(crate) struct OpenStores(Mutex<ByPartition>);

impl OpenStores {
    fn lock(&self) -> std::sync::MutexGuard<'_, ByPartition> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `partition` is processed from `store` under `fencing_token` until the guard drops.
    pub(crate) fn open(
        &self,
        partition: i32,
        store: Arc<dyn PartitionStore>,
        fencing_token: u64,
    ) -> OpenStoreGuard<'_> {
        self.lock().insert(partition, (store, fencing_token));
        OpenStoreGuard {
            stores: self,
            partition,
            fencing_token,
        }
    }

    pub(crate) fn get(&self, partition: i32) -> Option<(Arc<dyn PartitionStore>, u64)> {
        self.lock().get(&partition).cloned()
    }
}

/// Removes a partition's store from the open ones when its task ends.
pub(crate) struct OpenStoreGuard<'a> {
    stores: &'a OpenStores,
    partition: i32,
    fencing_token: u64,
}

impl Drop for OpenStoreGuard<'_> {
    fn drop(&mut self) {
        let mut open = self.stores.lock();
        // A newer claim of the same partition may have registered meanwhile: leave it.
        if open
            .get(&self.partition)
            .is_some_and(|(_, token)| *token == self.fencing_token)
        {
            open.remove(&self.partition);
        }
    }
}
