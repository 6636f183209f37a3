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

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use sqlx::pool::PoolOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgRow};
use sqlx::{AssertSqlSafe, PgConnection, Postgres, Row};
use tokio::time::Instant;

use crate::guard::PendingAcquire;
use crate::lock::{safe_deadline, validate_resource, validate_ttl};
use crate::retry::acquire_with_retry;
use crate::{DistributedLock, LockGuard, LockToken, RetryConfig, StateError, StateResult};

const BACKEND: &str = "postgres";
const DEFAULT_SCHEMA: &str = "public";
const DEFAULT_LEASE_TABLE: &str = "state_locks";
const DEFAULT_ADVISORY_TABLE: &str = "state_advisory_locks";
const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_POOL_SIZE: u32 = 16;
/// Serialises concurrent migrations of one database (an arbitrary constant key).
const MIGRATION_LOCK_KEY: i64 = 0x5354_4154_455f_4d49; // "STATE_MI"

/// Which locking primitive a [`PostgresDistributedLock`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PostgresLockMode {
    /// A lease row per resource, expired by the server's clock. Pool- and PgBouncer-friendly.
    Lease,
    /// A session advisory lock on a dedicated connection per held lock, plus the lease row for fencing.
    Advisory,
}

/// Builds a [`PostgresDistributedLock`] with a non-default schema, table, mode or pool.
#[derive(Clone)]
pub struct PostgresLockBuilder {
    url: String,
    schema: String,
    table: Option<String>,
    mode: PostgresLockMode,
    retry: RetryConfig,
    pool_size: u32,
    operation_timeout: Duration,
}

impl fmt::Debug for PostgresLockBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresLockBuilder")
            .field("url", &redact(&self.url))
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

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

    /// The most pooled connections (default 16). Advisory mode opens one more per held lock.
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
        let scheme_ok = ["postgres://", "postgresql://"]
            .iter()
            .any(|scheme| self.url.starts_with(scheme));
        if !scheme_ok {
            return Err(StateError::invalid(
                "postgres url",
                "must start with postgres:// or postgresql://",
            ));
        }
        let options = PgConnectOptions::from_str(&self.url).map_err(|err| {
            StateError::invalid("postgres url", format!("not a PostgreSQL URL ({err})"))
        })?;
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
        let address = redact(&self.url);
        let pool = PoolOptions::<Postgres>::new()
            .max_connections(self.pool_size)
            .acquire_timeout(self.operation_timeout)
            .test_before_acquire(false)
            .connect_lazy_with(options.clone());
        let advisory_pool = (self.mode == PostgresLockMode::Advisory).then(|| {
            PoolOptions::<Postgres>::new()
                .max_connections(self.pool_size)
                .acquire_timeout(self.operation_timeout)
                .test_before_acquire(false)
                // A connection only returns here without a lock: attempts that were refused, or cut
                // short (cancelled, failed) before their lock was handed to a guard. Scrub it anyway, so a
                // pooled connection can never carry a session lock.
                .after_release(|conn, _| {
                    Box::pin(async move {
                        sqlx::query("SELECT pg_advisory_unlock_all()")
                            .execute(&mut *conn)
                            .await?;
                        Ok(true)
                    })
                })
                .connect_lazy_with(options)
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
            }),
            retry: self.retry,
        };
        let address = lock.inner.address.clone();
        lock.within("connect to", &address, lock.migrate()).await?;
        tracing::debug!(server = %lock.inner.address, table = %lock.inner.names.table, mode = ?lock.inner.mode, "postgres lock backend ready");
        Ok(lock)
    }
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
    held: Mutex<HashMap<String, AdvisoryHold>>,
}

/// A held advisory lock: its own connection, and the monitor that enforces its TTL.
struct AdvisoryHold {
    conn: Arc<tokio::sync::Mutex<PgConnection>>,
    key: i64,
    resource: String,
    deadline: tokio::sync::watch::Sender<Instant>,
    monitor: tokio::task::AbortHandle,
}

/// Validated, quoted identifiers.
#[derive(Debug, Clone)]
struct TableNames {
    schema: String,
    table: String,
    /// `"schema"."table"`
    qualified: String,
    /// `"schema"."table_fence"`
    sequence: String,
    /// `"schema"."table_schema_version"`
    versions: String,
}

impl TableNames {
    fn new(schema: &str, table: &str) -> StateResult<Self> {
        for (what, name) in [("schema name", schema), ("table name", table)] {
            let valid_start = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
            let valid_rest = name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !valid_start || !valid_rest || name.len() > 48 {
                return Err(StateError::invalid(
                    what,
                    format!(
                        "`{name}` must be 1 to 48 characters of a-z, 0-9 and _, not starting with a digit"
                    ),
                ));
            }
        }
        Ok(TableNames {
            schema: schema.to_owned(),
            table: table.to_owned(),
            qualified: format!("\"{schema}\".\"{table}\""),
            sequence: format!("\"{schema}\".\"{table}_fence\""),
            versions: format!("\"{schema}\".\"{table}_schema_version\""),
        })
    }
}

/// The SQL of every operation, built once with the validated table names; all data is bound.
struct Statements {
    acquire: Arc<str>,
    take_over: Arc<str>,
    release: Arc<str>,
    extend: Arc<str>,
    info: Arc<str>,
    advisory_held: Arc<str>,
}

/// `fence, acquired_ms, expires_ms` of a lease row.
const LEASE_COLUMNS: &str = "fence, (extract(epoch from acquired_at) * 1000)::int8 AS acquired_ms, \
                             (extract(epoch from expires_at) * 1000)::int8 AS expires_ms";

impl Statements {
    fn new(names: &TableNames) -> Self {
        let (table, sequence) = (&names.qualified, &names.sequence);
        let upsert = |condition: &str| -> Arc<str> {
            format!(
                "INSERT INTO {table} AS l (resource, owner, fence, acquired_at, expires_at) \
                 VALUES ($1, $2, nextval('{sequence}'), clock_timestamp(), \
                         clock_timestamp() + $3::int8 * interval '1 millisecond') \
                 ON CONFLICT (resource) DO UPDATE SET owner = EXCLUDED.owner, \
                     fence = nextval('{sequence}'), acquired_at = clock_timestamp(), \
                     expires_at = clock_timestamp() + $3::int8 * interval '1 millisecond' \
                 {condition} RETURNING {LEASE_COLUMNS}"
            )
            .into()
        };
        Statements {
            acquire: upsert("WHERE l.expires_at <= clock_timestamp()"),
            take_over: upsert(""),
            release: format!(
                "UPDATE {table} SET expires_at = '-infinity' \
                 WHERE resource = $1 AND owner = $2 AND expires_at > clock_timestamp()"
            )
            .into(),
            extend: format!(
                "UPDATE {table} SET expires_at = clock_timestamp() + $3::int8 * interval '1 millisecond' \
                 WHERE resource = $1 AND owner = $2 AND expires_at > clock_timestamp() \
                 RETURNING {LEASE_COLUMNS}"
            )
            .into(),
            info: format!(
                "SELECT owner, {LEASE_COLUMNS} FROM {table} \
                 WHERE resource = $1 AND expires_at > clock_timestamp()"
            )
            .into(),
            advisory_held: "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND classid::int8 = $1 AND objid::int8 = $2 AND objsubid = 1 AND granted)"
                .into(),
        }
    }
}

/// The URL with its password replaced, for `Debug` and errors.
fn redact(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "(unparsable url)".to_owned(),
    }
}

/// Stable 64-bit FNV-1a of the table and resource name: the advisory lock key. Different resources can
/// share a key (about one pair in 2^32 among 2^32 names); a collision only makes two resources exclude
/// each other, it never lets two holders share one.
fn advisory_key(table: &str, resource: &str) -> i64 {
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
fn key_halves(key: i64) -> (i64, i64) {
    let bits = u64::from_ne_bytes(key.to_ne_bytes());
    ((bits >> 32) as i64, (bits & 0xffff_ffff) as i64)
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
            schema: DEFAULT_SCHEMA.to_owned(),
            table: None,
            mode: PostgresLockMode::Lease,
            retry: RetryConfig::default(),
            pool_size: DEFAULT_POOL_SIZE,
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
        }
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

    /// Creates or upgrades the tables; concurrent starters wait for each other.
    async fn migrate(&self) -> Result<(), sqlx::Error> {
        let names = &self.inner.names;
        let mut tx = self.inner.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK_KEY)
            .execute(&mut *tx)
            .await?;
        let setup = format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\"; \
             CREATE TABLE IF NOT EXISTS {versions} (version int PRIMARY KEY, \
                 applied_at timestamptz NOT NULL DEFAULT clock_timestamp());",
            schema = names.schema,
            versions = names.versions,
        );
        sqlx::raw_sql(AssertSqlSafe(setup))
            .execute(&mut *tx)
            .await?;
        let applied: Option<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT max(version) FROM {}",
            names.versions
        )))
        .fetch_one(&mut *tx)
        .await?;
        for (version, ddl) in MIGRATIONS.iter().enumerate() {
            let version = i32::try_from(version + 1).unwrap_or(i32::MAX);
            if applied.is_some_and(|applied| applied >= version) {
                continue;
            }
            let ddl = ddl
                .replace("{table}", &names.qualified)
                .replace("{sequence}", &names.sequence)
                .replace("{index}", &format!("\"{}_expires_at\"", names.table));
            sqlx::raw_sql(AssertSqlSafe(ddl)).execute(&mut *tx).await?;
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {} (version) VALUES ($1)",
                names.versions
            )))
            .bind(version)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    fn held(&self) -> MutexGuard<'_, HashMap<String, AdvisoryHold>> {
        // Every update is a single insert or remove: a panic elsewhere cannot leave it inconsistent.
        self.inner
            .held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn try_acquire_lease(
        &self,
        service: Arc<dyn DistributedLock>,
        resource: &str,
        ttl: Duration,
    ) -> StateResult<Option<LockGuard>> {
        let owner = LockToken::new_owner_value();
        // A cancelled INSERT may still commit after a release sent on another pooled connection: keep
        // the cleanup going for as long as this call could have run.
        let pending = PendingAcquire::arm(Arc::clone(&service), resource, &owner)
            .retrying_for(self.inner.operation_timeout * 2);
        let sent_at = Instant::now();
        let row = self
            .within(
                "acquire",
                resource,
                sqlx::query(sql(&self.inner.statements.acquire))
                    .bind(resource)
                    .bind(&owner)
                    .bind(ttl_millis(ttl))
                    .fetch_optional(&self.inner.pool),
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

    async fn try_acquire_advisory(
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
    async fn unlock_advisory(&self, owner: &str, hold: AdvisoryHold) -> StateResult<()> {
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
        validate_resource(resource)?;
        validate_ttl(ttl)?;
        let service: Arc<dyn DistributedLock> = Arc::new(self.clone());
        match self.inner.mode {
            PostgresLockMode::Lease => self.try_acquire_lease(service, resource, ttl).await,
            PostgresLockMode::Advisory => self.try_acquire_advisory(service, resource, ttl).await,
        }
    }

    #[tracing::instrument(level = "debug", skip(self, token), fields(backend = BACKEND))]
    async fn release_internal(&self, resource: &str, token: &LockToken) -> StateResult<()> {
        validate_resource(resource)?;
        let lost = || StateError::LockLost {
            resource: resource.to_owned(),
        };
        if self.inner.mode == PostgresLockMode::Advisory {
            let hold = self.held().remove(&token.value).ok_or_else(lost)?;
            return self.unlock_advisory(&token.value, hold).await;
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
    }

    async fn is_locked(&self, resource: &str) -> StateResult<bool> {
        Ok(self.get_lock_info(resource).await?.is_some())
    }

    #[tracing::instrument(level = "debug", skip(self, guard), fields(backend = BACKEND, resource = guard.resource()))]
    async fn extend(&self, guard: &mut LockGuard, ttl: Duration) -> StateResult<()> {
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
            let (conn, deadline) = {
                let held = self.held();
                let hold = held.get(&owner).ok_or_else(lost)?;
                (Arc::clone(&hold.conn), hold.deadline.clone())
            };
            let mut conn = conn.lock().await;
            // A dead session has lost its advisory lock: that is a lost lock, not a backend hiccup.
            let row = self
                .within("extend", &resource, query.fetch_optional(&mut *conn))
                .await
                .map_err(|_| lost())?;
            if row.is_some() {
                deadline.send_replace(sent_at + ttl);
            }
            row
        } else {
            self.within("extend", &resource, query.fetch_optional(&self.inner.pool))
                .await?
        };
        let row = row.ok_or_else(lost)?;
        let token = lease_token(&resource, owner, &row)
            .map_err(|err| StateError::backend(BACKEND, "extend", resource.clone(), err))?;
        guard.record_extension(token.expires_at, safe_deadline(sent_at, ttl));
        Ok(())
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

/// The schema migrations, in order; `{table}`, `{sequence}` and `{index}` are replaced by quoted names.
const MIGRATIONS: &[&str] = &[include_str!("migrations/postgres_v1.sql")];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_validated() {
        assert!(TableNames::new("public", "state_locks").is_ok());
        for (schema, table) in [
            ("public", ""),
            ("public", "Locks"),
            ("public", "locks; DROP TABLE x"),
            ("pub\"lic", "locks"),
            ("public", "1locks"),
            ("public", &"x".repeat(49)),
        ] {
            assert!(
                matches!(
                    TableNames::new(schema, table),
                    Err(StateError::InvalidInput { .. })
                ),
                "{schema}.{table}"
            );
        }
    }

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

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact("postgres://app:hunter2@db:5432/app?sslmode=require"),
            "postgres://app:***@db:5432/app?sslmode=require"
        );
        assert_eq!(redact("::"), "(unparsable url)");
    }
}
