//! Advisory mode: `pg_try_advisory_lock` held on a dedicated connection per held lock (released on
//! release, on expiry by the monitor task, or when that connection dies), plus the lease row for the
//! fencing token and holder info.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Postgres;
use sqlx::pool::PoolConnection;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{BACKEND, PostgresDistributedLock, lease_token, sql, ttl_millis};
use crate::lock::safe_deadline;
use crate::{DistributedLock, LockGuard, LockToken, StateError, StateResult};

/// A held advisory lock. Release, extension and expiry are one state machine under one mutex: the
/// session's connection is `Some` exactly while the lock is held, and each of them takes the mutex and
/// re-checks before acting — an extension can never succeed on a lock being released, and the monitor
/// never expires a lock whose deadline an extension just moved.
pub(super) struct AdvisoryHold {
    /// The session holding the lock: a connection of the bounded advisory pool (never detached), `None`
    /// once released or expired.
    conn: tokio::sync::Mutex<Option<PoolConnection<Postgres>>>,
    key: i64,
    resource: String,
    /// The local TTL the monitor enforces; moved by each extension.
    deadline: watch::Sender<Instant>,
    /// Ends the monitor (a release; the monitor never aborts itself).
    monitor_stop: CancellationToken,
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
    /// The hold of the advisory lock owned by `owner`, if this process holds it.
    pub(super) fn hold(&self, owner: &str) -> Option<Arc<AdvisoryHold>> {
        self.held().get(owner).cloned()
    }

    pub(super) async fn try_acquire_advisory(
        &self,
        service: Arc<dyn DistributedLock>,
        resource: &str,
        ttl: Duration,
    ) -> StateResult<Option<LockGuard>> {
        let Some(advisory_pool) = &self.inner.advisory_pool else {
            return Err(StateError::invalid("mode", "advisory pool missing"));
        };
        if self.held().values().any(|hold| hold.resource == resource) {
            // Held by this process already: no session needed to know it is taken (each held lock
            // keeps one of the bounded pool's sessions; asking would need another).
            return Ok(None);
        }
        let key = advisory_key(&self.inner.names.table, resource);
        let sent_at = Instant::now();
        // Until the hold owns it, dropping the connection returns it to the advisory pool, whose release
        // hook unlocks everything: a cancelled attempt cannot leave a lock behind.
        let mut conn = match tokio::time::timeout(
            self.inner.operation_timeout,
            advisory_pool.acquire(),
        )
        .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(sqlx::Error::PoolTimedOut)) | Err(_) => {
                return Err(StateError::backend(
                    BACKEND,
                    "acquire",
                    resource,
                    format!(
                        "no advisory connection free within {:?}: each held advisory lock keeps one of the \
                         pool's {} connections (raise `with_pool_size`, or release locks)",
                        self.inner.operation_timeout,
                        advisory_pool.options().get_max_connections()
                    ),
                ));
            }
            Ok(Err(err)) => return Err(StateError::backend(BACKEND, "acquire", resource, err)),
        };
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
        let hold = Arc::new(AdvisoryHold {
            conn: tokio::sync::Mutex::new(Some(conn)),
            key,
            resource: resource.to_owned(),
            deadline: watch::channel(sent_at + ttl).0,
            monitor_stop: CancellationToken::new(),
        });
        // Registered before the monitor starts, so the monitor always finds it.
        self.held().insert(owner.clone(), Arc::clone(&hold));
        tokio::spawn(expire_at_deadline(self.clone(), owner, hold));
        Ok(Some(LockGuard::new(
            service,
            token,
            safe_deadline(sent_at, ttl),
        )))
    }

    /// Releases the advisory lock of `owner`: takes the session out of the hold (under its mutex, so
    /// no extension or expiry runs meanwhile), unlocks, marks the lease row released and returns the
    /// connection to the pool. `Err(LockLost)` when it was not held (any more), or the session had died
    /// (the server freed the lock then).
    pub(super) async fn release_advisory(&self, resource: &str, owner: &str) -> StateResult<()> {
        let lost = || StateError::LockLost {
            resource: resource.to_owned(),
        };
        let hold = self.held().remove(owner).ok_or_else(lost)?;
        hold.monitor_stop.cancel();
        let session = hold.conn.lock().await.take().ok_or_else(lost)?;
        self.end_session(owner, &hold, session).await
    }

    /// Extends the hold of `owner` under its mutex: `Ok(None)` when it is no longer held here.
    pub(super) async fn extend_advisory<T>(
        &self,
        owner: &str,
        sent_at: Instant,
        ttl: Duration,
        extend: impl for<'c> FnOnce(
            &'c mut sqlx::PgConnection,
        ) -> futures::future::BoxFuture<'c, StateResult<Option<T>>>,
    ) -> StateResult<Option<T>> {
        let Some(hold) = self.hold(owner) else {
            return Ok(None);
        };
        let mut conn = hold.conn.lock().await;
        let Some(session) = conn.as_mut() else {
            return Ok(None); // released or expired while we waited for the mutex
        };
        let extended = extend(session).await?;
        if extended.is_some() {
            hold.deadline.send_replace(sent_at + ttl);
        }
        Ok(extended)
    }

    /// Unlocks the session `conn` taken out of `hold` (under its mutex, by the caller), marks the lease
    /// row released, and returns the connection to the pool — or closes it when it failed.
    async fn end_session(
        &self,
        owner: &str,
        hold: &AdvisoryHold,
        mut conn: PoolConnection<Postgres>,
    ) -> StateResult<()> {
        let lost = || StateError::LockLost {
            resource: hold.resource.clone(),
        };
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
        if unlocked.is_err() || marked.is_err() {
            // A broken or hung session must not go back to the pool: closing it ends the session, and
            // the server frees whatever it held.
            drop(conn.detach());
        }
        match (unlocked, marked) {
            (Ok(true), Ok(_)) => Ok(()),
            (Ok(false), _) | (Err(StateError::Backend { .. }), _) => Err(lost()),
            (Err(err), _) | (Ok(true), Err(err)) => Err(err),
        }
    }
}

/// Advisory mode's TTL: unlocks when the deadline passes without an extension. It re-checks the
/// deadline under the hold's mutex, so an extension that was in flight at the deadline wins.
async fn expire_at_deadline(lock: PostgresDistributedLock, owner: String, hold: Arc<AdvisoryHold>) {
    let mut deadline = hold.deadline.subscribe();
    loop {
        let until = *deadline.borrow_and_update();
        tokio::select! {
            _ = hold.monitor_stop.cancelled() => return,
            _ = tokio::time::sleep_until(until) => {}
            changed = deadline.changed() => {
                if changed.is_err() { return }
                continue;
            }
        }
        let mut slot = hold.conn.lock().await;
        if slot.is_none() || hold.monitor_stop.is_cancelled() {
            return; // released meanwhile
        }
        if Instant::now() < *hold.deadline.borrow() {
            continue; // an extension moved the deadline while we waited for the mutex
        }
        // Expired: the session leaves the hold under the mutex, so no extension can follow.
        let Some(session) = slot.take() else { return };
        drop(slot);
        {
            let mut held = lock.held();
            if held.get(&owner).is_some_and(|h| Arc::ptr_eq(h, &hold)) {
                held.remove(&owner);
            }
        }
        let outcome = lock.end_session(&owner, &hold, session).await;
        tracing::debug!(resource = %hold.resource, ?outcome, "advisory lock expired by its TTL");
        return;
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
