//! The per-partition compaction lock, held by the owner while it uploads a checkpoint and by retention
//! while it deletes old ones: the two never run at once on a partition.

use std::sync::Arc;
use std::time::Duration;

use state::DistributedLock;
use state::recipes::keeper::{KeptLock, RenewalPolicy};

use crate::error::ProcessorResult;

/// Waits up to `wait` for the compaction lock `resource` (see
/// [`compaction_resource`](crate::resources::compaction_resource): taken by the owner while it uploads a
/// checkpoint, so retention cannot run concurrently) and keeps it renewed until released, however long
/// the upload takes; `Ok(None)` when `wait` ran out.
///
/// # Errors
/// A lock backend error.
pub(crate) async fn hold_compaction_lock(
    lock: &Arc<dyn DistributedLock>,
    resource: &str,
    ttl: Duration,
    wait: Duration,
) -> ProcessorResult<Option<KeptLock>> {
    let acquire = KeptLock::acquire(lock, resource, ttl, RenewalPolicy::default());
    match tokio::time::timeout(wait, acquire).await {
        Ok(kept) => Ok(Some(kept?)),
        Err(_) => Ok(None),
    }
}
