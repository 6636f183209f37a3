//! Lease mode: one row per resource, taken by one statement (`INSERT … ON CONFLICT … DO UPDATE … WHERE
//! expired … RETURNING`) and expired by the server's clock. No session state.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{BACKEND, PostgresDistributedLock, lease_token, sql, ttl_millis};
use crate::guard::PendingAcquire;
use crate::lock::safe_deadline;
use crate::{DistributedLock, LockGuard, LockToken, StateError, StateResult};

impl PostgresDistributedLock {
    pub(super) async fn try_acquire_lease(
        &self,
        service: Arc<dyn DistributedLock>,
        resource: &str,
        ttl: Duration,
    ) -> StateResult<Option<LockGuard>> {
        let owner = LockToken::new_owner_value();
        let sent_at = Instant::now();
        // No connection, no request: a failure here leaves nothing to clean up.
        let mut conn = self
            .within("acquire", resource, self.inner.pool.acquire())
            .await?;
        // From here the INSERT may reach the server. A cancelled one may still commit after a release
        // sent on another pooled connection: the clean-up retries (backing off) for as long as this
        // call could have run.
        let pending = PendingAcquire::arm(&service, resource, &owner)
            .retrying_for(self.inner.operation_timeout * 2)
            .tracked_by(&self.inner.cleanups);
        let row = self
            .within(
                "acquire",
                resource,
                sqlx::query(sql(&self.inner.statements.acquire))
                    .bind(resource)
                    .bind(&owner)
                    .bind(ttl_millis(ttl))
                    .fetch_optional(&mut *conn),
            )
            .await?;
        pending.disarm();
        let Some(row) = row else { return Ok(None) };
        let token = lease_token(resource, owner, &row)
            .map_err(|err| StateError::backend(BACKEND, "acquire", resource, err))?;
        Ok(Some(LockGuard::new(
            service,
            token,
            safe_deadline(sent_at, ttl),
        )))
    }
}
