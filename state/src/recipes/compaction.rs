//! Per-partition compaction: `compaction:partition:{id}` claimed with `try_acquire` (a partition someone
//! else is compacting is skipped, not waited for), and the compaction run under a kept lock that stops it
//! if the lock is lost.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> state::StateResult<()> {
//! use std::{sync::Arc, time::Duration};
//! use state::recipes::compaction::{compact_partition, CompactionOutcome};
//! use state::{DistributedLock, InMemoryDistributedLock};
//!
//! let locks: Arc<dyn DistributedLock> = Arc::new(InMemoryDistributedLock::new());
//! let outcome = compact_partition(&locks, 3, Duration::from_secs(10), |ctx| async move {
//!     // merge files, check ctx.is_lost() between steps ...
//!     Ok(ctx.fencing_token())
//! })
//! .await?;
//! assert!(matches!(outcome, CompactionOutcome::Completed(_)));
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::recipes::keeper::{KeptLock, LockContext, RenewalPolicy, run_kept};
use crate::{DistributedLock, StateError, StateResult};

/// What became of one compaction request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CompactionOutcome<T> {
    /// Another instance holds the partition's compaction lock.
    Skipped,
    /// The compaction ran to the end under the lock.
    Completed(T),
    /// The lock was lost mid-way; the compaction was stopped.
    Lost,
}

/// The lock resource of partition `partition`'s compaction.
pub fn compaction_resource(partition: u32) -> String {
    format!("compaction:partition:{partition}")
}

/// Compacts `partition` if nobody else is: runs `job` under a kept lock.
///
/// # Errors
/// The job's error, or a backend error from the claim.
///
/// # Cancel safety
/// Dropping the future stops the job and releases the lock.
pub async fn compact_partition<T, F, Fut>(
    lock: &Arc<dyn DistributedLock>,
    partition: u32,
    ttl: Duration,
    job: F,
) -> StateResult<CompactionOutcome<T>>
where
    F: FnOnce(LockContext) -> Fut,
    Fut: Future<Output = StateResult<T>>,
{
    compact_resource(lock, &compaction_resource(partition), ttl, job).await
}

/// As [`compact_partition`], on a compaction lock named by the caller (so that, say, two jobs
/// compacting the same partition number of different data never exclude each other).
///
/// # Errors
/// The job's error, or a backend error from the claim.
///
/// # Cancel safety
/// Dropping the future stops the job and releases the lock.
pub async fn compact_resource<T, F, Fut>(
    lock: &Arc<dyn DistributedLock>,
    resource: &str,
    ttl: Duration,
    job: F,
) -> StateResult<CompactionOutcome<T>>
where
    F: FnOnce(LockContext) -> Fut,
    Fut: Future<Output = StateResult<T>>,
{
    let Some(kept) = KeptLock::try_acquire(lock, resource, ttl, RenewalPolicy::default()).await?
    else {
        tracing::debug!(resource, "compaction skipped: claimed elsewhere");
        return Ok(CompactionOutcome::Skipped);
    };
    match run_kept(kept, job).await {
        Ok(Ok(value)) => Ok(CompactionOutcome::Completed(value)),
        Ok(Err(err)) => Err(err),
        Err(StateError::LockLost { .. }) => Ok(CompactionOutcome::Lost),
        Err(err) => Err(err),
    }
}
