//! A distributed task queue and persistent scheduler: tasks live in a [`TaskStore`] (in-process, Redis or
//! PostgreSQL), workers claim one with `try_acquire("task:{id}")`, keep the claim alive with heartbeats
//! while running it, and complete it exactly once. A worker that crashes mid-task stops renewing; its claim
//! expires and another worker runs the task. Recurring jobs are created at start-up if missing and run by
//! one instance per period.
//!
//! Execution is at-least-once (a crashed run is run again); **completion is exactly-once**: completing is a
//! compare-and-set on the task's completion count, so of two runs of the same period only one completes,
//! and a worker that lost its claim is stopped (its work future is dropped) before it can complete.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> state::StateResult<()> {
//! use std::{sync::Arc, time::Duration};
//! use state::recipes::tasks::{InMemoryTaskStore, TaskOutcome, TaskQueue};
//! use state::InMemoryDistributedLock;
//!
//! let queue = TaskQueue::new(
//!     Arc::new(InMemoryDistributedLock::new()),
//!     Arc::new(InMemoryTaskStore::default()),
//!     Duration::from_secs(10),
//! );
//! queue.submit("email:42", b"welcome").await?;
//! queue.ensure_recurring("compact-all", Duration::from_secs(3600), b"").await?;
//! let run = queue
//!     .run_next(|task, ctx| async move {
//!         println!("running {} under token {}", task.id, ctx.fencing_token());
//!         Ok(())
//!     })
//!     .await?
//!     .expect("a task was due");
//! assert_eq!(run.outcome, TaskOutcome::Completed);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::lock::validate_resource;
use crate::recipes::keeper::{KeptLock, LockContext, RenewalPolicy, run_kept};
use crate::{DistributedLock, StateError, StateResult};

/// A stored task.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskRecord {
    /// Unique id (also names the claim lock `task:{id}`).
    pub id: String,
    /// What the handler needs.
    pub payload: Vec<u8>,
    /// `false` once a one-shot task completed.
    pub pending: bool,
    /// For a recurring task, its period in ms.
    pub every_ms: Option<u64>,
    /// When it is due, in ms since the epoch.
    pub due_ms: u64,
    /// How many runs completed; completing run `n` requires `completions == n`.
    pub completions: u64,
}

/// Where tasks persist.
#[async_trait::async_trait]
pub trait TaskStore: Send + Sync + std::fmt::Debug {
    /// Creates `task` unless a task with its id exists: `Ok(true)` when created.
    ///
    /// # Errors
    /// A backend error.
    async fn insert_if_missing(&self, task: &TaskRecord) -> StateResult<bool>;

    /// The task `id`.
    ///
    /// # Errors
    /// A backend error.
    async fn get(&self, id: &str) -> StateResult<Option<TaskRecord>>;

    /// Up to `limit` pending tasks due at `now_ms`, earliest first.
    ///
    /// # Errors
    /// A backend error.
    async fn due(&self, now_ms: u64, limit: usize) -> StateResult<Vec<TaskRecord>>;

    /// Completes run `run` of `id` exactly once: `Ok(true)` for the one call that did. A recurring task
    /// becomes due again at `next_due_ms`; a one-shot one (`None`) is done.
    ///
    /// # Errors
    /// A backend error.
    async fn complete(&self, id: &str, run: u64, next_due_ms: Option<u64>) -> StateResult<bool>;
}

/// How one claimed task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TaskOutcome {
    /// The handler succeeded and this worker completed the task.
    Completed,
    /// The handler succeeded but the run had been completed elsewhere meanwhile; nothing was recorded.
    AlreadyCompleted,
    /// The handler failed; the task stays pending.
    Failed(String),
    /// The claim was lost mid-run; the handler was stopped and the task stays pending.
    Lost,
}

/// One claimed task and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskRun {
    /// The task id.
    pub id: String,
    /// The claim's fencing token.
    pub fencing_token: u64,
    /// How it ended.
    pub outcome: TaskOutcome,
}

/// This host's wall clock in ms: schedules only (claims and completion never depend on it).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Workers and producers of one queue.
#[derive(Clone)]
pub struct TaskQueue {
    lock: Arc<dyn DistributedLock>,
    store: Arc<dyn TaskStore>,
    claim_ttl: Duration,
    batch: usize,
}

impl std::fmt::Debug for TaskQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskQueue")
            .field("store", &self.store)
            .field("claim_ttl", &self.claim_ttl)
            .finish()
    }
}

fn claim_resource(id: &str) -> String {
    format!("task:{id}")
}

impl TaskQueue {
    /// A queue whose workers claim tasks for `claim_ttl` at a time (renewed while running).
    pub fn new(
        lock: Arc<dyn DistributedLock>,
        store: Arc<dyn TaskStore>,
        claim_ttl: Duration,
    ) -> Self {
        TaskQueue {
            lock,
            store,
            claim_ttl,
            batch: 32,
        }
    }

    /// Submits a one-shot task, due now; `Ok(false)` if the id exists (submitting is idempotent).
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a bad id; a backend error.
    pub async fn submit(&self, id: &str, payload: &[u8]) -> StateResult<bool> {
        validate_resource(&claim_resource(id))?;
        self.store
            .insert_if_missing(&TaskRecord {
                id: id.to_owned(),
                payload: payload.to_vec(),
                pending: true,
                every_ms: None,
                due_ms: now_ms(),
                completions: 0,
            })
            .await
    }

    /// Makes sure the recurring job `id` exists (call it at every start-up): created due now if missing,
    /// left as it is otherwise.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a bad id or a zero period; a backend error.
    pub async fn ensure_recurring(
        &self,
        id: &str,
        every: Duration,
        payload: &[u8],
    ) -> StateResult<bool> {
        validate_resource(&claim_resource(id))?;
        let every_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        if every_ms == 0 {
            return Err(StateError::invalid("period", "must be at least 1 ms"));
        }
        self.store
            .insert_if_missing(&TaskRecord {
                id: id.to_owned(),
                payload: payload.to_vec(),
                pending: true,
                every_ms: Some(every_ms),
                due_ms: now_ms(),
                completions: 0,
            })
            .await
    }

    /// The stored task `id`.
    ///
    /// # Errors
    /// A backend error.
    pub async fn task(&self, id: &str) -> StateResult<Option<TaskRecord>> {
        self.store.get(id).await
    }

    /// Claims the first due task nobody else holds and runs `handler` on it under a kept claim; `Ok(None)`
    /// when nothing is due (or everything due is claimed).
    ///
    /// # Errors
    /// A backend error from the store or the lock.
    ///
    /// # Cancel safety
    /// Dropping the future drops the handler and releases the claim; the task stays pending.
    pub async fn run_next<F, Fut>(&self, handler: F) -> StateResult<Option<TaskRun>>
    where
        F: FnOnce(TaskRecord, LockContext) -> Fut,
        Fut: Future<Output = StateResult<()>>,
    {
        for listed in self.store.due(now_ms(), self.batch).await? {
            let resource = claim_resource(&listed.id);
            let Some(kept) = KeptLock::try_acquire(
                &self.lock,
                &resource,
                self.claim_ttl,
                RenewalPolicy::default(),
            )
            .await?
            else {
                continue;
            };
            // Re-read under the claim: it may have been completed since it was listed.
            let Some(task) = self.store.get(&listed.id).await? else {
                continue;
            };
            if !task.pending || task.due_ms > now_ms() {
                let _ = kept.release().await;
                continue;
            }
            return self.run_claimed(kept, task, handler).await.map(Some);
        }
        Ok(None)
    }

    async fn run_claimed<F, Fut>(
        &self,
        kept: KeptLock,
        task: TaskRecord,
        handler: F,
    ) -> StateResult<TaskRun>
    where
        F: FnOnce(TaskRecord, LockContext) -> Fut,
        Fut: Future<Output = StateResult<()>>,
    {
        let (id, run, every_ms) = (task.id.clone(), task.completions, task.every_ms);
        let fencing_token = kept.fencing_token();
        let store = Arc::clone(&self.store);
        let completing = id.clone();
        let outcome = run_kept(kept, |ctx| async move {
            handler(task, ctx).await?;
            let next_due = every_ms.map(|every| now_ms().saturating_add(every));
            store.complete(&completing, run, next_due).await
        })
        .await;
        let outcome = match outcome {
            Ok(Ok(true)) => TaskOutcome::Completed,
            Ok(Ok(false)) => TaskOutcome::AlreadyCompleted,
            Ok(Err(err)) => TaskOutcome::Failed(err.to_string()),
            Err(StateError::LockLost { .. }) => TaskOutcome::Lost,
            Err(err) => return Err(err),
        };
        Ok(TaskRun {
            id,
            fencing_token,
            outcome,
        })
    }

    /// Runs tasks until `cancel` fires, polling every `poll_every` when idle.
    ///
    /// # Errors
    /// Never for task failures (they are logged); backend errors are logged and retried.
    ///
    /// # Cancel safety
    /// Cancel through `cancel` to finish the current task first; dropping the future stops it at once.
    pub async fn run_worker<F, Fut>(
        &self,
        poll_every: Duration,
        cancel: CancellationToken,
        handler: F,
    ) -> StateResult<()>
    where
        F: Fn(TaskRecord, LockContext) -> Fut,
        Fut: Future<Output = StateResult<()>>,
    {
        while !cancel.is_cancelled() {
            match self.run_next(&handler).await {
                Ok(Some(run)) => tracing::debug!(id = %run.id, outcome = ?run.outcome, "task run"),
                Ok(None) => {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = tokio::time::sleep(poll_every) => {}
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "task worker iteration failed");
                    tokio::time::sleep(poll_every).await;
                }
            }
        }
        Ok(())
    }
}

/// A [`TaskStore`] in process memory.
#[derive(Debug, Default)]
pub struct InMemoryTaskStore {
    tasks: Mutex<HashMap<String, TaskRecord>>,
}

impl InMemoryTaskStore {
    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<String, TaskRecord>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl TaskStore for InMemoryTaskStore {
    async fn insert_if_missing(&self, task: &TaskRecord) -> StateResult<bool> {
        let mut tasks = self.tasks();
        if tasks.contains_key(&task.id) {
            return Ok(false);
        }
        tasks.insert(task.id.clone(), task.clone());
        Ok(true)
    }

    async fn get(&self, id: &str) -> StateResult<Option<TaskRecord>> {
        Ok(self.tasks().get(id).cloned())
    }

    async fn due(&self, now_ms: u64, limit: usize) -> StateResult<Vec<TaskRecord>> {
        let mut due: Vec<TaskRecord> = self
            .tasks()
            .values()
            .filter(|t| t.pending && t.due_ms <= now_ms)
            .cloned()
            .collect();
        due.sort_by_key(|t| t.due_ms);
        due.truncate(limit);
        Ok(due)
    }

    async fn complete(&self, id: &str, run: u64, next_due_ms: Option<u64>) -> StateResult<bool> {
        let mut tasks = self.tasks();
        let Some(task) = tasks.get_mut(id) else {
            return Ok(false);
        };
        if !task.pending || task.completions != run {
            return Ok(false);
        }
        task.completions += 1;
        match next_due_ms {
            Some(next) => task.due_ms = next,
            None => task.pending = false,
        }
        Ok(true)
    }
}

#[cfg(feature = "redis")]
pub use self::redis_store::RedisTaskStore;

#[cfg(feature = "redis")]
mod redis_store {
    use std::sync::LazyLock;
    use std::time::Duration;

    use redis::Script;
    use redis::aio::ConnectionManager;

    use super::{TaskRecord, TaskStore};
    use crate::StateResult;
    use crate::backends::redis::{connect_manager, invoke, parse_redis_url, query};

    static INSERT: LazyLock<Script> =
        LazyLock::new(|| Script::new(include_str!("scripts/task_insert.lua")));
    static COMPLETE: LazyLock<Script> =
        LazyLock::new(|| Script::new(include_str!("scripts/task_complete.lua")));
    const TIMEOUT: Duration = Duration::from_secs(2);
    const DUE: &str = "state:tasks:due";

    fn key_of(id: &str) -> String {
        format!("state:task:{id}")
    }

    /// A [`TaskStore`] in Redis: a hash `state:task:{id}` per task and a sorted set `state:tasks:due` of
    /// pending ids by due time; insert and complete are Lua scripts.
    #[derive(Clone)]
    pub struct RedisTaskStore {
        conn: ConnectionManager,
    }

    impl std::fmt::Debug for RedisTaskStore {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("RedisTaskStore")
        }
    }

    impl RedisTaskStore {
        /// Connects to Redis at `url`.
        ///
        /// # Errors
        /// [`StateError::InvalidInput`](crate::StateError::InvalidInput) for a malformed URL; a backend error.
        pub async fn new(url: &str) -> StateResult<Self> {
            let target = parse_redis_url(url)?;
            Ok(Self::from_connection_manager(
                connect_manager(&target, TIMEOUT).await?,
            ))
        }

        /// Uses an existing connection (the application's own, or a lock backend's: see
        /// [`RedisDistributedLock::connection_manager`](crate::RedisDistributedLock::connection_manager)).
        pub fn from_connection_manager(conn: ConnectionManager) -> Self {
            RedisTaskStore { conn }
        }

        async fn query<T: redis::FromRedisValue>(
            &self,
            cmd: redis::Cmd,
            what: &str,
        ) -> StateResult<T> {
            let mut conn = self.conn.clone();
            query(&mut conn, TIMEOUT, "redis", "query", what, &cmd).await
        }
    }

    #[async_trait::async_trait]
    impl TaskStore for RedisTaskStore {
        async fn insert_if_missing(&self, task: &TaskRecord) -> StateResult<bool> {
            let mut conn = self.conn.clone();
            let mut invocation = INSERT.prepare_invoke();
            invocation
                .key(key_of(&task.id))
                .key(DUE)
                .arg(&task.id)
                .arg(task.payload.as_slice())
                .arg(task.every_ms.unwrap_or(0))
                .arg(task.due_ms);
            let created: i64 =
                invoke(&mut conn, TIMEOUT, "redis", "insert", &task.id, &invocation).await?;
            Ok(created == 1)
        }

        async fn get(&self, id: &str) -> StateResult<Option<TaskRecord>> {
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(key_of(id))
                .arg(&["payload", "status", "every_ms", "due_ms", "completions"][..]);
            let (payload, status, every_ms, due_ms, completions): (
                Option<Vec<u8>>,
                Option<String>,
                Option<u64>,
                Option<u64>,
                Option<u64>,
            ) = self.query(cmd, id).await?;
            let (Some(payload), Some(status), Some(due_ms)) = (payload, status, due_ms) else {
                return Ok(None);
            };
            Ok(Some(TaskRecord {
                id: id.to_owned(),
                payload,
                pending: status == "pending",
                every_ms: every_ms.filter(|every| *every > 0),
                due_ms,
                completions: completions.unwrap_or(0),
            }))
        }

        async fn due(&self, now_ms: u64, limit: usize) -> StateResult<Vec<TaskRecord>> {
            let mut cmd = redis::cmd("ZRANGE");
            cmd.arg(DUE)
                .arg("-inf")
                .arg(now_ms)
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(0)
                .arg(limit);
            let ids: Vec<String> = self.query(cmd, DUE).await?;
            let mut tasks = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(task) = self.get(&id).await? {
                    tasks.push(task);
                }
            }
            Ok(tasks)
        }

        async fn complete(
            &self,
            id: &str,
            run: u64,
            next_due_ms: Option<u64>,
        ) -> StateResult<bool> {
            let mut conn = self.conn.clone();
            let next = next_due_ms.map_or(-1, |next| i64::try_from(next).unwrap_or(i64::MAX));
            let mut invocation = COMPLETE.prepare_invoke();
            invocation
                .key(key_of(id))
                .key(DUE)
                .arg(id)
                .arg(run)
                .arg(next);
            let done: i64 =
                invoke(&mut conn, TIMEOUT, "redis", "complete", id, &invocation).await?;
            Ok(done == 1)
        }
    }
}

#[cfg(feature = "postgres")]
pub use self::postgres_store::PostgresTaskStore;

#[cfg(feature = "postgres")]
mod postgres_store {
    use sqlx::PgPool;

    use super::{TaskRecord, TaskStore};
    use crate::{StateError, StateResult};

    /// A [`TaskStore`] in PostgreSQL: table `state_tasks`; completion is one conditional `UPDATE`.
    #[derive(Debug, Clone)]
    pub struct PostgresTaskStore {
        pool: PgPool,
    }

    type Row = (String, Vec<u8>, bool, Option<i64>, i64, i64);

    fn to_u64(value: i64) -> u64 {
        u64::try_from(value).unwrap_or(0)
    }

    fn to_i64(value: u64) -> i64 {
        i64::try_from(value).unwrap_or(i64::MAX)
    }

    fn record((id, payload, pending, every_ms, due_ms, completions): Row) -> TaskRecord {
        TaskRecord {
            id,
            payload,
            pending,
            every_ms: every_ms.map(to_u64),
            due_ms: to_u64(due_ms),
            completions: to_u64(completions),
        }
    }

    const COLUMNS: &str = "id, payload, pending, every_ms, due_ms, completions";

    impl PostgresTaskStore {
        /// Uses `pool`, creating the table if missing.
        ///
        /// # Errors
        /// A backend error.
        pub async fn new(pool: PgPool) -> StateResult<Self> {
            sqlx::raw_sql(
                "CREATE TABLE IF NOT EXISTS state_tasks (id text PRIMARY KEY, payload bytea NOT NULL,                  pending boolean NOT NULL, every_ms bigint, due_ms bigint NOT NULL,                  completions bigint NOT NULL);                  CREATE INDEX IF NOT EXISTS state_tasks_due ON state_tasks (due_ms) WHERE pending;",
            )
            .execute(&pool)
            .await
            .map_err(|err| StateError::backend("postgres", "create", "state_tasks", err))?;
            Ok(PostgresTaskStore { pool })
        }
    }

    #[async_trait::async_trait]
    impl TaskStore for PostgresTaskStore {
        async fn insert_if_missing(&self, task: &TaskRecord) -> StateResult<bool> {
            let done = sqlx::query(
                "INSERT INTO state_tasks (id, payload, pending, every_ms, due_ms, completions)                  VALUES ($1, $2, true, $3, $4, 0) ON CONFLICT (id) DO NOTHING",
            )
            .bind(&task.id)
            .bind(&task.payload)
            .bind(task.every_ms.map(to_i64))
            .bind(to_i64(task.due_ms))
            .execute(&self.pool)
            .await
            .map_err(|err| StateError::backend("postgres", "insert", task.id.clone(), err))?;
            Ok(done.rows_affected() == 1)
        }

        async fn get(&self, id: &str) -> StateResult<Option<TaskRecord>> {
            let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM state_tasks WHERE id = $1"
            )))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|err| StateError::backend("postgres", "read", id, err))?;
            Ok(row.map(record))
        }

        async fn due(&self, now_ms: u64, limit: usize) -> StateResult<Vec<TaskRecord>> {
            let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM state_tasks WHERE pending AND due_ms <= $1                  ORDER BY due_ms LIMIT $2"
            )))
            .bind(to_i64(now_ms))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(|err| StateError::backend("postgres", "list", "state_tasks", err))?;
            Ok(rows.into_iter().map(record).collect())
        }

        async fn complete(
            &self,
            id: &str,
            run: u64,
            next_due_ms: Option<u64>,
        ) -> StateResult<bool> {
            let done = sqlx::query(
                "UPDATE state_tasks SET completions = completions + 1,                      pending = ($3::int8 IS NOT NULL), due_ms = coalesce($3::int8, due_ms)                  WHERE id = $1 AND pending AND completions = $2",
            )
            .bind(id)
            .bind(to_i64(run))
            .bind(next_due_ms.map(to_i64))
            .execute(&self.pool)
            .await
            .map_err(|err| StateError::backend("postgres", "complete", id, err))?;
            Ok(done.rows_affected() == 1)
        }
    }
}
