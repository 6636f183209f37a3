//! The shared services a fleet instance coordinates through: the lock backend, the fenced registry
//! (checkpoint records), the roster (membership), the task store of fleet-wide jobs, the shared checkpoint store,
//! the operator and the factory of local partition stores.
//!
//! [`Services::connect`] builds them all from one lock URL through [`state::connect()`] — `memory` (one
//! process), `redis://…`, `redlock://h1,h2,h3`, `postgres://…` or `etcd://h1,h2,h3` — so every coordination structure lives
//! in the same backend.

use std::path::PathBuf;
use std::sync::Arc;

use state::recipes::fenced::{FencedStore, InMemoryFencedStore};
use state::recipes::roster::{InMemoryRosterStore, RosterStore};
use state::recipes::tasks::{InMemoryTaskStore, TaskStore};
use state::{DistributedLock, InMemoryDistributedLock, StateError};

use crate::aggregation::KeyedAggregation;
use crate::checkpoint::{CheckpointStore, DirectoryCheckpointStore};
use crate::error::{ProcessorError, ProcessorResult};
use crate::operator::Operator;
use crate::store::StoreFactory;
use crate::store::rocksdb::RocksDbStores;

/// The shared services an instance uses. Clone it to run several instances in one process (they then
/// share the in-process lock table, like separate processes share a Redis).
#[derive(Clone)]
pub struct Services {
    /// Locks: partition claims, leadership, compaction and task claims.
    pub lock: Arc<dyn DistributedLock>,
    /// Fenced records: the checkpoint records.
    pub registry: Arc<dyn FencedStore>,
    /// Group membership: each job's roster of live members.
    pub roster: Arc<dyn RosterStore>,
    /// The task store of fleet-wide jobs (retention and compaction of checkpoints).
    pub tasks: Arc<dyn TaskStore>,
    /// The shared checkpoint store.
    pub checkpoints: Arc<dyn CheckpointStore>,
    /// The operator.
    pub operator: Arc<dyn Operator>,
    /// Opens the local partition stores: RocksDB by default (one block cache and write-buffer manager
    /// for every partition of the instance), or any other [`StoreFactory`] such as the in-memory one.
    pub stores: Arc<dyn StoreFactory>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("tasks", &self.tasks)
            .finish_non_exhaustive()
    }
}

/// Block cache shared by the partitions of one instance.
const CACHE_BYTES: usize = 128 << 20;
/// Memtable budget shared by the partitions of one instance.
const WRITE_BUFFER_BYTES: usize = 64 << 20;

impl Services {
    /// In-process services (locks, registry and tasks in memory) over the checkpoint directory
    /// `checkpoint_dir`, with the built-in keyed aggregation and RocksDB partition stores.
    ///
    /// # Errors
    /// An I/O error when `checkpoint_dir` cannot be created or written.
    pub fn in_memory(checkpoint_dir: impl Into<PathBuf>) -> ProcessorResult<Self> {
        Ok(Self::in_memory_with(Arc::new(
            DirectoryCheckpointStore::new(checkpoint_dir)?,
        )))
    }

    /// In-process services over the checkpoint store `checkpoints` (an
    /// [`ObjectCheckpointStore`](crate::checkpoint::ObjectCheckpointStore), say).
    pub fn in_memory_with(checkpoints: Arc<dyn CheckpointStore>) -> Self {
        Services {
            lock: Arc::new(InMemoryDistributedLock::new()),
            registry: Arc::new(InMemoryFencedStore::default()),
            roster: Arc::new(InMemoryRosterStore::default()),
            tasks: Arc::new(InMemoryTaskStore::default()),
            checkpoints,
            operator: Arc::new(KeyedAggregation),
            stores: Arc::new(RocksDbStores::new(CACHE_BYTES, WRITE_BUFFER_BYTES)),
        }
    }

    /// Services on the backend named by `lock_url` — `memory`, `redis://…`, `rediss://…`,
    /// `redlock://h1:p1,h2:p2,h3:p3`, `postgres://…`, `etcd://h1:p1,h2:p2` (see [`state::connect()`]): locks, registry and task
    /// store all live there, sharing its connections.
    ///
    /// # Errors
    /// [`ProcessorError::InvalidInput`] (`lock url`) for an unknown scheme or a malformed URL; the
    /// backend's error when it cannot be reached; an I/O error for the checkpoint directory.
    pub async fn connect(
        lock_url: &str,
        checkpoint_dir: impl Into<PathBuf>,
    ) -> ProcessorResult<Self> {
        let checkpoints = Arc::new(DirectoryCheckpointStore::new(checkpoint_dir)?);
        Self::connect_with(lock_url, checkpoints).await
    }

    /// As [`connect`](Self::connect), with the checkpoint store `checkpoints` (see
    /// [`CheckpointLocation::open`](crate::checkpoint::CheckpointLocation::open)).
    ///
    /// # Errors
    /// As [`connect`](Self::connect), without the directory's.
    pub async fn connect_with(
        lock_url: &str,
        checkpoints: Arc<dyn CheckpointStore>,
    ) -> ProcessorResult<Self> {
        let mut services = Services::in_memory_with(checkpoints);
        let backend = state::connect(lock_url).await.map_err(|err| match err {
            StateError::InvalidInput { what, reason } => {
                ProcessorError::InvalidInput { what, reason }
            }
            other => other.into(),
        })?;
        tracing::info!(backend = %backend.description, "coordination backend");
        services.lock = backend.lock;
        services.registry = backend.fenced;
        services.roster = backend.roster;
        services.tasks = backend.tasks;
        Ok(services)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_lock_urls_are_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Services::connect("zookeeper://x", dir.path())
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            ProcessorError::InvalidInput {
                what: "lock url",
                ..
            }
        ));
        assert!(Services::connect("memory", dir.path()).await.is_ok());
    }
}
