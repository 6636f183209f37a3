//! The PostgreSQL backend, in three modes.
//!
//! - **Lease** (default, [`PostgresDistributedLock::new`]): a lease table the backend creates if missing.
//!   Acquire is one statement and one round trip (`INSERT … ON CONFLICT … DO UPDATE … WHERE expired …
//!   RETURNING`); time is the server's (`clock_timestamp()`), never a client clock; fencing tokens come from
//!   a sequence, drawn *after* the row lock is taken, so they strictly increase across holders and across
//!   expiry. No session state: works through any pool and transaction-pooling PgBouncer.
//! - **Advisory** ([`PostgresDistributedLock::advisory`]): `pg_try_advisory_lock` held on a connection of
//!   its own per held lock, released on release or when that connection dies; a monitor task enforces the
//!   TTL. The lease row is still written (fencing token, holder info). Needs session state: not through a
//!   transaction-pooling PgBouncer.
//! - **Transaction** ([`PostgresDistributedLock::with_transaction_lock`]): `pg_advisory_xact_lock` inside
//!   the caller's own transaction, so the protected writes and the lock commit or roll back together — the
//!   strongest form, needing no fencing.
//!
//! # Schema
//! ```sql
//! CREATE SEQUENCE {schema}.{table}_fence;
//! CREATE TABLE {schema}.{table} (
//!     resource    text        PRIMARY KEY,
//!     owner       text        NOT NULL,
//!     fence       bigint      NOT NULL,
//!     acquired_at timestamptz NOT NULL,
//!     expires_at  timestamptz NOT NULL
//! );
//! CREATE TABLE {schema}.{table}_schema_version (version int PRIMARY KEY, applied_at timestamptz);
//! ```
//! Migrations are versioned, idempotent and serialised between concurrent starters by a transaction-scoped
//! advisory lock. Released leases keep their row (expired), so that every later acquisition takes the
//! `DO UPDATE` path, where the fencing token is drawn under the row lock.
//!
//! # Layout
//! `builder.rs` (connection, pool and mode settings), `schema.rs` (validated table names, the SQL of every
//! operation, migrations), `lease.rs`, `advisory.rs` and `transaction.rs` (one file per mode); `mod.rs`
//! holds the service and dispatches each [`DistributedLock`] call to its mode.

pub(crate) mod fenced;
pub(crate) mod roster;
pub(crate) mod tasks;
pub(crate) mod versioned;

mod advisory;
mod builder;
mod lease;
mod schema;
mod transaction;

pub use builder::PostgresLockBuilder;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgPool, PgRow};
use sqlx::{AssertSqlSafe, Row};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::lock::{Internal, safe_deadline, validate_resource, validate_ttl};
use crate::retry::acquire_with_retry;
use crate::telemetry::{self, Operation};
use crate::{DistributedLock, LockGuard, LockToken, RetryConfig, StateError, StateResult};

use advisory::{AdvisoryHold, advisory_key, key_halves};
pub(crate) use schema::create_serialized;
use schema::{Statements, TableNames};

/// A recipe store's table: `"schema"."table"` with both names validated as the lock tables' are, and
/// the bare table name (for the names of its indexes). The recipe stores use it so their tables can live
/// in the application's schema beside the lock table.
pub(crate) fn recipe_table(schema: &str, table: &str) -> StateResult<(String, String)> {
    let names = TableNames::new(schema, table)?;
    Ok((names.qualified, names.table))
}

const BACKEND: &str = "postgres";
const DEFAULT_SCHEMA: &str = "public";
const DEFAULT_LEASE_TABLE: &str = "state_locks";
const DEFAULT_ADVISORY_TABLE: &str = "state_advisory_locks";
const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_POOL_SIZE: u32 = 16;

/// Which locking primitive a [`PostgresDistributedLock`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PostgresLockMode {
    /// A lease row per resource, expired by the server's clock. Pool- and PgBouncer-friendly.
    Lease,
    /// A session advisory lock on a dedicated connection per held lock, plus the lease row for fencing.
    Advisory,
}

/// A lock service on PostgreSQL. Cheap to clone; clones share the pool and the held advisory locks.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> state::StateResult<()> {
/// use std::time::Duration;
/// use state::{DistributedLock, PostgresDistributedLock};
///
/// let locks = PostgresDistributedLock::new("postgres://app:secret@db.internal/app?sslmode=require").await?;
/// let guard = locks.acquire("invoice:7", Duration::from_secs(10)).await?;
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresDistributedLock {
    inner: Arc<Inner>,
    retry: RetryConfig,
}

struct Inner {
    names: TableNames,
    statements: Statements,
    pool: PgPool,
    advisory_pool: Option<PgPool>,
    mode: PostgresLockMode,
    address: String,
    operation_timeout: Duration,
    /// Advisory mode: the dedicated connection of every lock this process holds, by owner value.
    held: Mutex<HashMap<String, Arc<AdvisoryHold>>>,
    /// Background clean-ups of acquires cancelled after their request may have been sent.
    cleanups: TaskTracker,
    /// Whether `pool` is ours to close (not the application's, from `builder_from_pool`).
    owns_pool: bool,
}

fn millis_to_time(ms: i64) -> SystemTime {
    u64::try_from(ms)
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
        .unwrap_or(UNIX_EPOCH)
}

fn ttl_millis(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

/// Reads `fence, acquired_ms, expires_ms` into a token.
fn lease_token(resource: &str, owner: String, row: &PgRow) -> Result<LockToken, sqlx::Error> {
    let fence: i64 = row.try_get("fence")?;
    let acquired: i64 = row.try_get("acquired_ms")?;
    let expires: i64 = row.try_get("expires_ms")?;
    Ok(LockToken::new(
        resource,
        owner,
        u64::try_from(fence).unwrap_or(0),
        millis_to_time(acquired),
        millis_to_time(expires),
    ))
}

fn sql(text: &Arc<str>) -> AssertSqlSafe<Arc<str>> {
    AssertSqlSafe(Arc::clone(text))
}

impl PostgresDistributedLock {
    /// Connects in lease mode to the database at `url` (`postgres://user:password@host:port/db?sslmode=…`;
    /// `sslmode` is honoured), creating the lease table `public.state_locks` if missing.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a malformed URL; a backend error when the server cannot be reached
    /// or the table cannot be created.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn new(database_url: &str) -> StateResult<Self> {
        Self::builder(database_url).build().await
    }

    /// Connects in advisory mode (table `public.state_advisory_locks`). See the module docs.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn advisory(database_url: &str) -> StateResult<Self> {
        Self::builder(database_url)
            .with_mode(PostgresLockMode::Advisory)
            .build()
            .await
    }

    /// A builder for non-default schema, table, mode, pool size or timeouts.
    pub fn builder(database_url: &str) -> PostgresLockBuilder {
        PostgresLockBuilder {
            url: database_url.to_owned(),
            pool: None,
            schema: DEFAULT_SCHEMA.to_owned(),
            table: None,
            mode: PostgresLockMode::Lease,
            retry: RetryConfig::default(),
            pool_size: DEFAULT_POOL_SIZE,
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
        }
    }

    /// A builder over the application's own pool: lease mode runs its statements on it (so the lock
    /// tables live next to the data it protects, and no second pool is opened); advisory mode opens
    /// its bounded session pool with the same connect options. `with_pool_size` then sizes only the
    /// advisory sessions. Errors name the server as `(application pool)`.
    pub fn builder_from_pool(pool: PgPool) -> PostgresLockBuilder {
        let mut builder = Self::builder("");
        builder.pool = Some(pool);
        builder
    }

    /// Sets the retry policy of [`acquire`](DistributedLock::acquire).
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// The mode in use.
    pub fn mode(&self) -> PostgresLockMode {
        self.inner.mode
    }

    /// The connection pool, for writing protected data in the same database.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Shuts the backend down: waits (at most twice the operation timeout) for the background
    /// clean-ups of cancelled acquires, then closes its pools (never the application's own, from
    /// [`builder_from_pool`](Self::builder_from_pool)). Call it before the process exits so that
    /// no lease a cancelled acquire may have taken outlives it for a whole TTL.
    pub async fn shutdown(&self) {
        self.inner.cleanups.close();
        let drained =
            tokio::time::timeout(self.inner.operation_timeout * 2, self.inner.cleanups.wait())
                .await;
        if drained.is_err() {
            tracing::warn!(server = %self.inner.address, "shutdown: lease clean-ups still running; leases left expire by their TTL");
        }
        if self.inner.owns_pool {
            self.inner.pool.close().await;
        }
        if let Some(advisory) = &self.inner.advisory_pool {
            advisory.close().await;
        }
    }

    /// Bounds `fut` by the operation timeout.
    async fn within<T>(
        &self,
        operation: &'static str,
        resource: &str,
        fut: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> StateResult<T> {
        super::bounded(
            self.inner.operation_timeout,
            BACKEND,
            operation,
            resource,
            fut,
        )
        .await
    }

    fn held(&self) -> MutexGuard<'_, HashMap<String, Arc<AdvisoryHold>>> {
        // Every update is a single insert or remove: a panic elsewhere cannot leave it inconsistent.
        self.inner
            .held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl fmt::Debug for PostgresDistributedLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresDistributedLock")
            .field("server", &self.inner.address)
            .field("table", &self.inner.names.qualified)
            .field("mode", &self.inner.mode)
            .field("retry", &self.retry)
            .finish()
    }
}

#[async_trait::async_trait]
impl DistributedLock for PostgresDistributedLock {
    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND))]
    async fn acquire(&self, resource: &str, ttl: Duration) -> StateResult<LockGuard> {
        acquire_with_retry(self, &self.retry, resource, ttl).await
    }

    async fn try_acquire(&self, resource: &str, ttl: Duration) -> StateResult<Option<LockGuard>> {
        telemetry::observe(BACKEND, Operation::Acquire, async move {
            validate_resource(resource)?;
            validate_ttl(ttl)?;
            let service: Arc<dyn DistributedLock> = Arc::new(self.clone());
            match self.inner.mode {
                PostgresLockMode::Lease => self.try_acquire_lease(service, resource, ttl).await,
                PostgresLockMode::Advisory => {
                    self.try_acquire_advisory(service, resource, ttl).await
                }
            }
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip(self, token), fields(backend = BACKEND))]
    async fn release_internal(
        &self,
        resource: &str,
        token: &LockToken,
        _internal: Internal,
    ) -> StateResult<()> {
        telemetry::observe(BACKEND, Operation::Release, async move {
            validate_resource(resource)?;
            let lost = || StateError::LockLost {
                resource: resource.to_owned(),
            };
            if self.inner.mode == PostgresLockMode::Advisory {
                return self.release_advisory(resource, &token.value).await;
            }
            let done = self
                .within(
                    "release",
                    resource,
                    sqlx::query(sql(&self.inner.statements.release))
                        .bind(resource)
                        .bind(&token.value)
                        .execute(&self.inner.pool),
                )
                .await?;
            if done.rows_affected() == 1 {
                Ok(())
            } else {
                Err(lost())
            }
        })
        .await
    }

    async fn is_locked(&self, resource: &str) -> StateResult<bool> {
        Ok(self.get_lock_info(resource).await?.is_some())
    }

    fn retry_policy(&self) -> &RetryConfig {
        &self.retry
    }

    fn backend_name(&self) -> &'static str {
        BACKEND
    }

    fn service_id(&self, _internal: Internal) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    #[tracing::instrument(level = "debug", skip(self, guard), fields(backend = BACKEND, resource = guard.resource()))]
    async fn extend(&self, guard: &mut LockGuard, ttl: Duration) -> StateResult<()> {
        telemetry::observe(BACKEND, Operation::Extend, async move {
            guard.ensure_issued_by(self.service_id(Internal::new()))?;
            validate_ttl(ttl)?;
            let resource = guard.resource().to_owned();
            let owner = guard.token().value.clone();
            let lost = || StateError::LockLost {
                resource: resource.clone(),
            };
            let sent_at = Instant::now();
            let query = sqlx::query(sql(&self.inner.statements.extend))
                .bind(&resource)
                .bind(&owner)
                .bind(ttl_millis(ttl));
            let row = if self.inner.mode == PostgresLockMode::Advisory {
                // Under the hold's mutex: never on a lock being released or expired.
                let timeout = self.inner.operation_timeout;
                let resource_name = resource.clone();
                self.extend_advisory(&owner, sent_at, ttl, move |conn| {
                    Box::pin(async move {
                        // A dead session has lost its advisory lock: a lost lock, not a backend hiccup.
                        super::bounded(
                            timeout,
                            BACKEND,
                            "extend",
                            &resource_name,
                            query.fetch_optional(conn),
                        )
                        .await
                        .map_err(|_| StateError::LockLost {
                            resource: resource_name.clone(),
                        })
                    })
                })
                .await?
            } else {
                self.within("extend", &resource, query.fetch_optional(&self.inner.pool))
                    .await?
            };
            let row = row.ok_or_else(lost)?;
            let token = lease_token(&resource, owner, &row)
                .map_err(|err| StateError::backend(BACKEND, "extend", resource.clone(), err))?;
            guard.record_extension(token.expires_at, safe_deadline(sent_at, ttl));
            Ok(())
        })
        .await
    }

    /// Raises the table's fencing sequence (shared by every resource of the table) under a lock that
    /// keeps acquirers from drawing from it meanwhile, so it is never set below a value already drawn.
    async fn raise_fencing_counter(&self, resource: &str, at_least: u64) -> StateResult<()> {
        validate_resource(resource)?;
        let at_least = i64::try_from(at_least).map_err(|_| {
            StateError::invalid(
                "fencing token",
                format!("{at_least} is beyond PostgreSQL's bigint sequence"),
            )
        })?;
        let (table, sequence) = (&self.inner.names.qualified, &self.inner.names.sequence);
        let raise = async {
            let mut tx = self.inner.pool.begin().await?;
            // The names are the validated, quoted identifiers of this backend's own objects.
            sqlx::query(AssertSqlSafe(format!(
                "LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE"
            )))
            .execute(&mut *tx)
            .await?;
            let last: i64 =
                sqlx::query_scalar(AssertSqlSafe(format!("SELECT last_value FROM {sequence}")))
                    .fetch_one(&mut *tx)
                    .await?;
            if last < at_least {
                sqlx::query("SELECT setval($1::regclass, $2)")
                    .bind(sequence.as_str())
                    .bind(at_least)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        };
        self.within("raise the fencing counter", resource, raise)
            .await
    }

    async fn get_lock_info(&self, resource: &str) -> StateResult<Option<LockToken>> {
        validate_resource(resource)?;
        let row = self
            .within(
                "inspect",
                resource,
                sqlx::query(sql(&self.inner.statements.info))
                    .bind(resource)
                    .fetch_optional(&self.inner.pool),
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        if self.inner.mode == PostgresLockMode::Advisory {
            // The row outlives a session that died; the advisory lock does not.
            let (high, low) = key_halves(advisory_key(&self.inner.names.table, resource));
            let held: bool = self
                .within(
                    "inspect",
                    resource,
                    sqlx::query_scalar(sql(&self.inner.statements.advisory_held))
                        .bind(high)
                        .bind(low)
                        .fetch_one(&self.inner.pool),
                )
                .await?;
            if !held {
                return Ok(None);
            }
        }
        let owner: String = row
            .try_get("owner")
            .map_err(|err| StateError::backend(BACKEND, "inspect", resource, err))?;
        lease_token(resource, owner, &row)
            .map(Some)
            .map_err(|err| StateError::backend(BACKEND, "inspect", resource, err))
    }
}
