//! Coordinated checkpoints: one checkpoint of a scope at a time, taken under a kept lock, and recorded
//! through a [`FencedStore`] with the lock's fencing token, so a writer whose lock was lost (paused,
//! partitioned) can never overwrite the record of a newer checkpoint.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> state::StateResult<()> {
//! use std::{sync::Arc, time::Duration};
//! use state::recipes::checkpoint::{CheckpointCoordinator, CheckpointTarget};
//! use state::recipes::fenced::InMemoryFencedStore;
//! use state::recipes::keeper::LockContext;
//! use state::{InMemoryDistributedLock, StateResult};
//!
//! struct Snapshot;
//! #[async_trait::async_trait]
//! impl CheckpointTarget for Snapshot {
//!     async fn create_checkpoint(&self, ctx: &LockContext) -> StateResult<Vec<u8>> {
//!         Ok(format!("snapshot written under token {}", ctx.fencing_token()).into_bytes())
//!     }
//! }
//!
//! let coordinator = CheckpointCoordinator::new(
//!     Arc::new(InMemoryDistributedLock::new()),
//!     Arc::new(InMemoryFencedStore::default()),
//!     Duration::from_secs(10),
//! );
//! let done = coordinator.checkpoint(&Snapshot).await?.expect("nobody else was checkpointing");
//! assert_eq!(coordinator.latest().await?.unwrap().token, done.fencing_token);
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use crate::recipes::fenced::{FencedStore, FencedValue};
use crate::recipes::keeper::{KeptLock, LockContext, RenewalPolicy, run_kept};
use crate::{DistributedLock, StateResult};

/// What gets checkpointed: creates the checkpoint and returns its record (a manifest, a location, ...),
/// which the coordinator stores fenced. Check `ctx.is_lost()` between long steps.
#[async_trait::async_trait]
pub trait CheckpointTarget: Send + Sync {
    /// Creates a checkpoint while the coordinator holds the scope's lock.
    ///
    /// # Errors
    /// Whatever went wrong; the record is then not written.
    async fn create_checkpoint(&self, ctx: &LockContext) -> StateResult<Vec<u8>>;
}

/// A checkpoint that was taken and recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckpointOutcome {
    /// The scope's lock resource.
    pub resource: String,
    /// The fencing token the record was written with.
    pub fencing_token: u64,
    /// The record.
    pub record: Vec<u8>,
}

/// Takes checkpoints of one scope (lock `global:checkpoint`, or `checkpoint:{scope}`) one at a time.
#[derive(Clone)]
pub struct CheckpointCoordinator {
    lock: Arc<dyn DistributedLock>,
    store: Arc<dyn FencedStore>,
    resource: String,
    ttl: Duration,
}

impl std::fmt::Debug for CheckpointCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointCoordinator")
            .field("resource", &self.resource)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl CheckpointCoordinator {
    /// A coordinator for the global scope (lock `global:checkpoint`).
    pub fn new(lock: Arc<dyn DistributedLock>, store: Arc<dyn FencedStore>, ttl: Duration) -> Self {
        CheckpointCoordinator {
            lock,
            store,
            resource: "global:checkpoint".to_owned(),
            ttl,
        }
    }

    /// Narrows the coordinator to one scope (lock `checkpoint:{scope}`), e.g. a partition.
    pub fn with_scope(mut self, scope: &str) -> Self {
        self.resource = format!("checkpoint:{scope}");
        self
    }

    /// The lock resource (also the key of the fenced record).
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// Takes a checkpoint if nobody else is: `Ok(None)` when another instance holds the scope.
    ///
    /// # Errors
    /// [`StateError::LockLost`](crate::StateError::LockLost) when the lock was lost while checkpointing
    /// (the target's future is dropped then); [`StateError::StaleFencingToken`](crate::StateError) when a
    /// newer holder recorded a checkpoint first; the target's and the backend's errors.
    ///
    /// # Cancel safety
    /// Dropping the future drops the checkpoint and releases the lock.
    pub async fn checkpoint(
        &self,
        target: &dyn CheckpointTarget,
    ) -> StateResult<Option<CheckpointOutcome>> {
        let Some(kept) = KeptLock::try_acquire(
            &self.lock,
            &self.resource,
            self.ttl,
            RenewalPolicy::default(),
        )
        .await?
        else {
            return Ok(None);
        };
        let store = Arc::clone(&self.store);
        let resource = self.resource.clone();
        let outcome = run_kept(kept, |ctx| async move {
            let record = target.create_checkpoint(&ctx).await?;
            store.write(&resource, ctx.fencing_token(), &record).await?;
            Ok(CheckpointOutcome {
                resource,
                fencing_token: ctx.fencing_token(),
                record,
            })
        })
        .await?;
        outcome.map(Some)
    }

    /// Records a checkpoint made under an already held lock with `fencing_token` (for callers that keep
    /// the scope's lock themselves).
    ///
    /// # Errors
    /// [`StateError::StaleFencingToken`](crate::StateError) when a newer holder recorded first.
    pub async fn record(&self, fencing_token: u64, record: &[u8]) -> StateResult<()> {
        self.store
            .write(&self.resource, fencing_token, record)
            .await
    }

    /// The latest recorded checkpoint.
    ///
    /// # Errors
    /// A backend error.
    pub async fn latest(&self) -> StateResult<Option<FencedValue>> {
        self.store.read(&self.resource).await
    }
}
