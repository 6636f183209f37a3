//! Advisory mode: `pg_try_advisory_lock` held on a dedicated connection per held lock (released on
//! release, on expiry by the monitor task, or when that connection dies), plus the lease row for the
//! fencing token and holder info.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgConnection;
use tokio::time::Instant;

use super::{BACKEND, PostgresDistributedLock, lease_token, sql, ttl_millis};
use crate::lock::safe_deadline;
use crate::{DistributedLock, LockGuard, LockToken, StateError, StateResult};

/// A held advisory lock: its own connection, and the monitor that enforces its TTL.
pub(super) struct AdvisoryHold {
    pub(super) conn: Arc<tokio::sync::Mutex<PgConnection>>,
    pub(super) key: i64,
    pub(super) resource: String,
    pub(super) deadline: tokio::sync::watch::Sender<Instant>,
    pub(super) monitor: tokio::task::AbortHandle,
}

/// Stable 64-bit FNV-1a of the table and resource name: the advisory lock key. Different resources can
/// share a key (about one pair in 2^32 among 2^32 names); a collision only makes two resources exclude
/// each other, it never lets two holders share one.
pub(super) fn advisory_key(table: &str, resource: &str) -> i64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for byte in table.bytes().chain([0]).chain(resource.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// The two 32-bit halves of a key as `pg_locks` shows them (`classid`, `objid`).
pub(super) fn key_halves(key: i64) -> (i64, i64) {
    let bits = u64::from_ne_bytes(key.to_ne_bytes());
    ((bits >> 32) as i64, (bits & 0xffff_ffff) as i64)
}

impl PostgresDistributedLock {
    pub(super) async fn try_acquire_advisory(
        &self,
        service: Arc<dyn DistributedLock>,
        resource: &str,
        ttl: Duration,
    ) -> StateResult<Option<LockGuard>> {
        let Some(advisory_pool) = &self.inner.advisory_pool else {
            return Err(StateError::invalid("mode", "advisory pool missing"));
        };
        let key = advisory_key(&self.inner.names.table, resource);
        let sent_at = Instant::now();
        // From here until the connection is detached, dropping it returns it to the advisory pool, whose
        // release hook unlocks everything: a cancelled attempt cannot leave a lock behind.
        let mut conn = self
            .within("acquire", resource, advisory_pool.acquire())
            .await?;
        let locked: bool = self
            .within(
                "acquire",
                resource,
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(key)
                    .fetch_one(&mut *conn),
            )
            .await?;
        if !locked {
            return Ok(None);
        }
        let owner = LockToken::new_owner_value();
        let row = self
            .within(
                "acquire",
                resource,
                sqlx::query(sql(&self.inner.statements.take_over))
                    .bind(resource)
                    .bind(&owner)
                    .bind(ttl_millis(ttl))
                    .fetch_one(&mut *conn),
            )
            .await?;
        let token = lease_token(resource, owner.clone(), &row)
            .map_err(|err| StateError::backend(BACKEND, "acquire", resource, err))?;
        let conn = Arc::new(tokio::sync::Mutex::new(conn.detach()));
        let (deadline, watch) = tokio::sync::watch::channel(sent_at + ttl);
        let monitor = tokio::spawn(expire_at_deadline(self.clone(), owner.clone(), watch));
        self.held().insert(
            owner,
            AdvisoryHold {
                conn,
                key,
                resource: resource.to_owned(),
                deadline,
                monitor: monitor.abort_handle(),
            },
        );
        Ok(Some(LockGuard::new(
            service,
            token,
            safe_deadline(sent_at, ttl),
        )))
    }

    /// Unlocks and closes a held advisory lock's connection, and marks its lease row released.
    /// `Err(LockLost)` when the session had died (the server freed the lock then).
    pub(super) async fn unlock_advisory(&self, owner: &str, hold: AdvisoryHold) -> StateResult<()> {
        hold.monitor.abort();
        let mut conn = hold.conn.lock().await;
        let unlocked = self
            .within(
                "release",
                &hold.resource,
                sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1)")
                    .bind(hold.key)
                    .fetch_one(&mut *conn),
            )
            .await;
        let marked = self
            .within(
                "release",
                &hold.resource,
                sqlx::query(sql(&self.inner.statements.release))
                    .bind(&hold.resource)
                    .bind(owner)
                    .execute(&mut *conn),
            )
            .await;
        drop(conn); // the connection closes with the last reference to it: the session ends
        match (unlocked, marked) {
            (Ok(true), Ok(_)) => Ok(()),
            (Ok(false), _) | (Err(StateError::Backend { .. }), _) => Err(StateError::LockLost {
                resource: hold.resource.clone(),
            }),
            (Err(err), _) | (Ok(true), Err(err)) => Err(err),
        }
    }
}

/// Advisory mode's TTL: unlocks when the deadline passes without an extension. Owns no guard.
async fn expire_at_deadline(
    lock: PostgresDistributedLock,
    owner: String,
    mut deadline: tokio::sync::watch::Receiver<Instant>,
) {
    loop {
        let until = *deadline.borrow_and_update();
        tokio::select! {
            _ = tokio::time::sleep_until(until) => break,
            changed = deadline.changed() => if changed.is_err() { return },
        }
    }
    let hold = lock.held().remove(&owner);
    if let Some(hold) = hold {
        let resource = hold.resource.clone();
        let outcome = lock.unlock_advisory(&owner, hold).await;
        tracing::debug!(resource, ?outcome, "advisory lock expired by its TTL");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advisory_keys_are_stable_and_table_scoped() {
        let key = advisory_key("state_locks", "orders");
        assert_eq!(key, advisory_key("state_locks", "orders"));
        assert_ne!(key, advisory_key("other_table", "orders"));
        assert_ne!(key, advisory_key("state_locks", "orders2"));
        // Pinned: the key must never change between releases, or old and new processes would not
        // exclude each other.
        assert_eq!(advisory_key("", ""), 0xaf63_bd4c_8601_b7df_u64 as i64);
        let (high, low) = key_halves(-1);
        assert_eq!((high, low), (0xffff_ffff, 0xffff_ffff));
    }
}
