//! [`PostgresLockBuilder`]: the URL, schema, table, mode, pool size and timeouts of a
//! [`PostgresDistributedLock`], validated when it connects.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::Postgres;
use sqlx::pool::PoolOptions;
use sqlx::postgres::{PgConnectOptions, PgPool};

use super::schema::{Statements, TableNames};
use super::{
    DEFAULT_ADVISORY_TABLE, DEFAULT_LEASE_TABLE, Inner, PostgresDistributedLock, PostgresLockMode,
};
use crate::redact::redact_url;
use crate::{RetryConfig, StateError, StateResult};

/// Builds a [`PostgresDistributedLock`] with a non-default schema, table, mode or pool.
#[derive(Clone)]
pub struct PostgresLockBuilder {
    pub(super) url: String,
    /// The application's own pool, when built with [`PostgresDistributedLock::builder_from_pool`].
    pub(super) pool: Option<PgPool>,
    pub(super) schema: String,
    pub(super) table: Option<String>,
    pub(super) mode: PostgresLockMode,
    pub(super) retry: RetryConfig,
    pub(super) pool_size: u32,
    pub(super) operation_timeout: Duration,
}

impl fmt::Debug for PostgresLockBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresLockBuilder")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// Server-side TCP keepalives of the advisory sessions: a holder partitioned from the server (or
/// killed without closing its socket) loses its session, and so its advisory locks, within about
/// `idle + interval * count` = 10 + 5 * 3 = 25 s, instead of the kernel default of over two hours.
pub(super) const ADVISORY_KEEPALIVES: [(&str, &str); 3] = [
    ("tcp_keepalives_idle", "10"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
];

impl PostgresLockBuilder {
    /// The schema holding the lock tables (default `public`; created if missing).
    pub fn with_schema(mut self, schema: &str) -> Self {
        schema.clone_into(&mut self.schema);
        self
    }

    /// The lease table (default `state_locks`, or `state_advisory_locks` in advisory mode). Keep lease and
    /// advisory mode on different tables.
    pub fn with_table(mut self, table: &str) -> Self {
        self.table = Some(table.to_owned());
        self
    }

    /// The locking mode (default [`PostgresLockMode::Lease`]).
    pub fn with_mode(mut self, mode: PostgresLockMode) -> Self {
        self.mode = mode;
        self
    }

    /// The retry policy of `acquire`.
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// The most pooled connections (default 16). Advisory mode has a second pool of this size for its
    /// sessions: each held advisory lock keeps one of them, so this also bounds how many advisory
    /// locks one handle holds at once (an acquire past it fails with a clear error).
    pub fn with_pool_size(mut self, size: u32) -> Self {
        self.pool_size = size;
        self
    }

    /// Bounds every database call, connection included (default 5 s).
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Connects, creates or migrates the lock tables, and returns the backend.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a malformed URL, schema or table name, a zero pool size or
    /// timeout; a backend error when the server cannot be reached or the migration fails.
    ///
    /// # Cancel safety
    /// Cancel safe: a migration cut short is rolled back by the server.
    pub async fn build(self) -> StateResult<PostgresDistributedLock> {
        let options = match &self.pool {
            Some(pool) => (*pool.connect_options()).clone(),
            None => {
                let scheme_ok = ["postgres://", "postgresql://"]
                    .iter()
                    .any(|scheme| self.url.starts_with(scheme));
                if !scheme_ok {
                    return Err(StateError::invalid(
                        "postgres url",
                        "must start with postgres:// or postgresql://",
                    ));
                }
                PgConnectOptions::from_str(&self.url).map_err(|err| invalid_url(&err))?
            }
        };
        let table = self.table.clone().unwrap_or_else(|| {
            match self.mode {
                PostgresLockMode::Lease => DEFAULT_LEASE_TABLE,
                PostgresLockMode::Advisory => DEFAULT_ADVISORY_TABLE,
            }
            .to_owned()
        });
        let names = TableNames::new(&self.schema, &table)?;
        if self.pool_size == 0 {
            return Err(StateError::invalid("pool size", "must be at least 1"));
        }
        if self.operation_timeout.is_zero() {
            return Err(StateError::invalid("operation timeout", "must not be zero"));
        }
        let address = match &self.pool {
            Some(_) => "(application pool)".to_owned(),
            None => redact_url(&self.url),
        };
        let pool = match &self.pool {
            Some(pool) => pool.clone(),
            None => PoolOptions::<Postgres>::new()
                .max_connections(self.pool_size)
                .acquire_timeout(self.operation_timeout)
                .test_before_acquire(false)
                .connect_lazy_with(options.clone()),
        };
        let advisory_pool = (self.mode == PostgresLockMode::Advisory).then(|| {
            PoolOptions::<Postgres>::new()
                .max_connections(self.pool_size)
                .acquire_timeout(self.operation_timeout)
                .test_before_acquire(false)
                // A connection returns here without a lock: attempts that were refused or cut short
                // (cancelled, failed) before their lock was handed to a guard, and sessions whose lock
                // was released. Scrub it anyway, so a pooled connection can never carry a session lock.
                .after_release(|conn, _| {
                    Box::pin(async move {
                        sqlx::query("SELECT pg_advisory_unlock_all()")
                            .execute(&mut *conn)
                            .await?;
                        Ok(true)
                    })
                })
                .connect_lazy_with(options.options(ADVISORY_KEEPALIVES))
        });
        let lock = PostgresDistributedLock {
            inner: Arc::new(Inner {
                statements: Statements::new(&names),
                names,
                pool,
                advisory_pool,
                mode: self.mode,
                address,
                operation_timeout: self.operation_timeout,
                held: Mutex::new(HashMap::new()),
                cleanups: tokio_util::task::TaskTracker::new(),
                owns_pool: self.pool.is_none(),
            }),
            retry: self.retry,
        };
        let address = lock.inner.address.clone();
        lock.within("connect to", &address, lock.migrate()).await?;
        tracing::debug!(server = %lock.inner.address, table = %lock.inner.names.table, mode = ?lock.inner.mode, "postgres lock backend ready");
        Ok(lock)
    }
}

/// A URL the driver rejected. The driver's message can quote the URL's parameters, so only its kind
/// is kept: never a credential in an error.
fn invalid_url(err: &sqlx::Error) -> StateError {
    let reason = match err {
        sqlx::Error::Configuration(_) => {
            "not a valid PostgreSQL URL (check its host, port and parameters)"
        }
        _ => "not a PostgreSQL URL",
    };
    StateError::invalid("postgres url", reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_credential_form_appears_in_debug_or_errors() {
        for url in [
            "postgres://app:hunter2@db:5432/app?sslmode=require",
            "postgres://app@db:5432/app?password=hunter2",
            "postgres://app@db:5432/app?sslmode=bogus&password=hunter2",
        ] {
            let builder = PostgresDistributedLock::builder(url);
            let shown = format!("{builder:?}");
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        // A URL the driver rejects: the error says what is wrong, never what the URL held.
        let rejected = PostgresDistributedLock::builder(
            "postgres://app:hunter2@db:5432/app?sslmode=bogus&password=hunter2",
        )
        .build()
        .await;
        match rejected {
            Err(err @ StateError::InvalidInput { .. }) => {
                let shown = format!("{err} {err:?}");
                assert!(!shown.contains("hunter2"), "{shown}");
            }
            other => panic!("a bad sslmode must be refused: {other:?}"),
        }
    }
}
