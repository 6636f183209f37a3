//! Transaction mode: `pg_advisory_xact_lock` inside the caller's own transaction, so the protected writes
//! and the lock commit or roll back together.

use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::{AssertSqlSafe, PgConnection};

use super::advisory::advisory_key;
use super::{BACKEND, PostgresDistributedLock};
use crate::StateError;
use crate::lock::validate_resource;

impl PostgresDistributedLock {
    /// Runs `work` inside a transaction that first takes `pg_advisory_xact_lock` on `resource`, waiting at
    /// most `wait` for it. The lock is released when the transaction ends, so the protected writes and the
    /// lock commit (when `work` returns `Ok`) or roll back (`Err`, or a dropped future) together: no lease
    /// can expire mid-way, and no fencing token is needed. Excludes the advisory mode's locks on the same
    /// resource and table, not the lease mode's.
    ///
    /// ```no_run
    /// # async fn demo(locks: state::PostgresDistributedLock) -> Result<(), state::StateError> {
    /// use std::time::Duration;
    /// let balance: i64 = locks
    ///     .with_transaction_lock("account:42", Duration::from_secs(5), |tx| {
    ///         Box::pin(async move {
    ///             let row: (i64,) = sqlx::query_as("UPDATE accounts SET balance = balance - 10 \
    ///                                               WHERE id = 42 RETURNING balance")
    ///                 .fetch_one(&mut *tx)
    ///                 .await
    ///                 .map_err(|err| state::StateError::backend("postgres", "debit", "account:42", err))?;
    ///             Ok::<_, state::StateError>(row.0)
    ///         })
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`StateError::LockNotAcquired`] when the lock stayed held for `wait`; a backend error when the
    /// transaction fails; `work`'s own error (the transaction is rolled back).
    ///
    /// # Cancel safety
    /// Dropping the future rolls the transaction back and frees the lock.
    pub async fn with_transaction_lock<T, E, F>(
        &self,
        resource: &str,
        wait: Duration,
        work: F,
    ) -> Result<T, E>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, E>>,
        E: From<StateError>,
    {
        validate_resource(resource)?;
        let key = advisory_key(&self.inner.names.table, resource);
        let fail = |operation: &'static str| {
            let resource = resource.to_owned();
            move |err: sqlx::Error| StateError::backend(BACKEND, operation, resource, err)
        };
        let mut tx = self.inner.pool.begin().await.map_err(fail("begin"))?;
        let timeout_ms = wait.as_millis().clamp(1, i32::MAX as u128);
        sqlx::query(AssertSqlSafe(format!(
            "SET LOCAL lock_timeout = {timeout_ms}"
        )))
        .execute(&mut *tx)
        .await
        .map_err(fail("acquire"))?;
        let locked = sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(key)
            .execute(&mut *tx)
            .await;
        match locked {
            Ok(_) => {}
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55P03") => {
                return Err(StateError::LockNotAcquired {
                    resource: resource.to_owned(),
                    attempts: 1,
                }
                .into());
            }
            Err(err) => return Err(fail("acquire")(err).into()),
        }
        sqlx::query("SET LOCAL lock_timeout = 0")
            .execute(&mut *tx)
            .await
            .map_err(fail("acquire"))?;
        let value = work(&mut tx).await?;
        tx.commit().await.map_err(fail("commit"))?;
        Ok(value)
    }
}
