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
//! **Retries** ([`TaskRetryPolicy`]): a handler that fails is retried with exponential backoff and jitter
//! (the task is due again later, so a poison task never runs back to back and never starves the others);
//! each failure is counted in [`TaskRecord::attempts`] with its error. After `max_attempts` failures a
//! one-shot task moves to the **dead letters** ([`TaskQueue::dead_letters`], [`TaskQueue::requeue`]); a
//! recurring job skips to its next period instead, so its schedule survives. A run lost mid-way (crash,
//! lost claim) is not a failure: it is run again at once.
//!
//! **Idempotent enqueue**: a task's id is its idempotency key — submitting the same id twice makes one
//! task (the first payload wins); [`TaskQueue::enqueue`] takes the key, or makes a unique id.
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// Failed attempts of the current run (reset when a run completes or the task is requeued).
    pub attempts: u32,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
    /// Moved to the dead letters after too many failed attempts (then also not `pending`).
    pub dead: bool,
}

impl TaskRecord {
    /// Completes run `run` (only while pending at that run): whether it did. A recurring task becomes
    /// due at `next_due_ms`; a one-shot one is done. Every store applies this same step.
    pub(crate) fn complete_run(&mut self, run: u64, next_due_ms: Option<u64>) -> bool {
        if !self.pending || self.completions != run {
            return false;
        }
        self.completions += 1;
        self.attempts = 0;
        match next_due_ms {
            Some(next) => self.due_ms = next,
            None => self.pending = false,
        }
        true
    }

    /// Records a failed attempt of run `run` (only while pending at that run): whether it did.
    pub(crate) fn fail_run(&mut self, run: u64, error: &str, then: &AfterFailure) -> bool {
        if !self.pending || self.completions != run {
            return false;
        }
        self.last_error = Some(error.to_owned());
        match then {
            AfterFailure::RetryAt(at) => {
                self.attempts = self.attempts.saturating_add(1);
                self.due_ms = *at;
            }
            AfterFailure::NextPeriod(at) => {
                self.attempts = 0;
                self.due_ms = *at;
            }
            AfterFailure::DeadLetter => {
                self.attempts = self.attempts.saturating_add(1);
                self.pending = false;
                self.dead = true;
            }
        }
        true
    }

    /// Moves a dead-lettered task back to the queue, due at `due_ms`: whether it was dead.
    pub(crate) fn requeue_dead(&mut self, due_ms: u64) -> bool {
        if !self.dead {
            return false;
        }
        self.dead = false;
        self.pending = true;
        self.attempts = 0;
        self.due_ms = due_ms;
        true
    }

    /// A new task, due at `due_ms`.
    pub fn new(id: &str, payload: &[u8], every_ms: Option<u64>, due_ms: u64) -> Self {
        TaskRecord {
            id: id.to_owned(),
            payload: payload.to_vec(),
            pending: true,
            every_ms,
            due_ms,
            completions: 0,
            attempts: 0,
            last_error: None,
            dead: false,
        }
    }
}

/// What to do with a failed attempt of run `run` (see [`TaskStore::fail`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AfterFailure {
    /// Due again at this time (ms since the epoch).
    RetryAt(u64),
    /// A recurring job out of attempts: skip to its next period, due at this time.
    NextPeriod(u64),
    /// A one-shot task out of attempts: to the dead letters.
    DeadLetter,
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

    /// Records a failed attempt of run `run` of `id` (only while it is pending at that run): counts it,
    /// keeps `error`, and then does what `then` says. `Ok(true)` when recorded.
    ///
    /// # Errors
    /// A backend error.
    async fn fail(&self, id: &str, run: u64, error: &str, then: &AfterFailure)
    -> StateResult<bool>;

    /// Up to `limit` dead-lettered tasks, by id.
    ///
    /// # Errors
    /// A backend error.
    async fn dead_letters(&self, limit: usize) -> StateResult<Vec<TaskRecord>>;

    /// Moves the dead-lettered task `id` back to the queue, due at `due_ms` with no attempts counted:
    /// `Ok(false)` when it is not dead-lettered.
    ///
    /// # Errors
    /// A backend error.
    async fn requeue(&self, id: &str, due_ms: u64) -> StateResult<bool>;
}

/// How failed tasks are retried: exponential backoff with jitter, then the dead letters.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TaskRetryPolicy {
    /// Failed attempts of one run before it is given up (dead-lettered, or skipped for recurring jobs).
    pub max_attempts: u32,
    /// The delay after the first failure (before jitter).
    pub initial_backoff: Duration,
    /// The longest delay (before jitter).
    pub max_backoff: Duration,
}

impl Default for TaskRetryPolicy {
    /// 5 attempts, 1 s doubling up to 5 min.
    fn default() -> Self {
        TaskRetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
        }
    }
}

impl TaskRetryPolicy {
    /// A policy of `max_attempts` attempts, backing off from `initial_backoff` (doubling) up to
    /// `max_backoff`.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for zero attempts, a zero initial backoff, or a maximum below the
    /// initial backoff or above a day.
    pub fn new(
        max_attempts: u32,
        initial_backoff: Duration,
        max_backoff: Duration,
    ) -> StateResult<Self> {
        if max_attempts == 0 {
            return Err(StateError::invalid(
                "task max attempts",
                "must be at least 1",
            ));
        }
        if initial_backoff.is_zero() || max_backoff < initial_backoff {
            return Err(StateError::invalid(
                "task backoff",
                format!(
                    "{initial_backoff:?}..{max_backoff:?} must be a non-empty range above zero"
                ),
            ));
        }
        if max_backoff > Duration::from_secs(86_400) {
            return Err(StateError::invalid(
                "task backoff",
                format!("{max_backoff:?} is longer than a day"),
            ));
        }
        Ok(TaskRetryPolicy {
            max_attempts,
            initial_backoff,
            max_backoff,
        })
    }

    /// The jittered delay after failed attempt `attempt` (1-based): `initial * 2^(attempt-1)`, capped,
    /// then a random point in its upper half.
    pub fn backoff(&self, attempt: u32) -> Duration {
        crate::RetryConfig {
            max_attempts: self.max_attempts,
            initial_delay: self.initial_backoff,
            max_delay: self.max_backoff,
            backoff_multiplier: 2.0,
        }
        .jittered_delay(attempt)
    }

    fn after_failure(&self, task: &TaskRecord, now_ms: u64) -> AfterFailure {
        let attempt = task.attempts.saturating_add(1);
        if attempt < self.max_attempts {
            let delay = u64::try_from(self.backoff(attempt).as_millis()).unwrap_or(u64::MAX);
            return AfterFailure::RetryAt(now_ms.saturating_add(delay));
        }
        match task.every_ms {
            Some(every) => AfterFailure::NextPeriod(now_ms.saturating_add(every)),
            None => AfterFailure::DeadLetter,
        }
    }
}

/// How one claimed task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TaskOutcome {
    /// The handler succeeded and this worker completed the task.
    Completed,
    /// The handler succeeded but the run had been completed elsewhere meanwhile; nothing was recorded.
    AlreadyCompleted,
    /// The handler failed; the task is due again after a backoff (or, for a recurring job out of
    /// attempts, at its next period).
    Failed(String),
    /// The handler failed for the last allowed time: the task moved to the dead letters.
    DeadLettered(String),
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
    retry: TaskRetryPolicy,
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
            retry: TaskRetryPolicy::default(),
        }
    }

    /// Retries failed tasks per `retry` (default [`TaskRetryPolicy::default`]).
    pub fn with_retry_policy(mut self, retry: TaskRetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Enqueues a one-shot task, due now, under the idempotency key `key` (the same key twice is one
    /// task: the first payload wins), or under a fresh time-ordered UUID (v7) when `key` is `None`. Returns the id
    /// and whether this call created it.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a bad key; a backend error.
    pub async fn enqueue(&self, payload: &[u8], key: Option<&str>) -> StateResult<(String, bool)> {
        let id = match key {
            Some(key) => key.to_owned(),
            None => uuid::Uuid::now_v7().to_string(),
        };
        let created = self.submit(&id, payload).await?;
        Ok((id, created))
    }

    /// Up to `limit` tasks in the dead letters, with their attempts and last error.
    ///
    /// # Errors
    /// A backend error.
    pub async fn dead_letters(&self, limit: usize) -> StateResult<Vec<TaskRecord>> {
        self.store.dead_letters(limit).await
    }

    /// Moves the dead-lettered task `id` back to the queue, due now, attempts reset; `Ok(false)` when it
    /// is not in the dead letters.
    ///
    /// # Errors
    /// A backend error.
    pub async fn requeue(&self, id: &str) -> StateResult<bool> {
        let requeued = self.store.requeue(id, now_ms()).await?;
        if requeued {
            crate::telemetry::task_event("requeued");
        }
        Ok(requeued)
    }

    /// Submits a one-shot task, due now; `Ok(false)` if the id exists (submitting is idempotent).
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a bad id; a backend error.
    pub async fn submit(&self, id: &str, payload: &[u8]) -> StateResult<bool> {
        validate_resource(&claim_resource(id))?;
        self.store
            .insert_if_missing(&TaskRecord::new(id, payload, None, now_ms()))
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
            .insert_if_missing(&TaskRecord::new(id, payload, Some(every_ms), now_ms()))
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
            crate::telemetry::task_event("claimed");
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
        let claimed = task.clone();
        let outcome = run_kept(kept, |ctx| async move {
            handler(task, ctx).await?;
            let next_due = every_ms.map(|every| now_ms().saturating_add(every));
            store.complete(&completing, run, next_due).await
        })
        .await;
        let outcome = match outcome {
            Ok(Ok(true)) => {
                crate::telemetry::task_event("completed");
                TaskOutcome::Completed
            }
            Ok(Ok(false)) => TaskOutcome::AlreadyCompleted,
            Ok(Err(err)) => self.record_failure(&claimed, &err.to_string()).await?,
            Err(StateError::LockLost { .. }) => {
                crate::telemetry::task_event("claim_lost");
                TaskOutcome::Lost
            }
            Err(err) => return Err(err),
        };
        Ok(TaskRun {
            id,
            fencing_token,
            outcome,
        })
    }

    /// Counts a failed attempt of `task` and schedules what follows it (see [`TaskRetryPolicy`]).
    async fn record_failure(&self, task: &TaskRecord, error: &str) -> StateResult<TaskOutcome> {
        let then = self.retry.after_failure(task, now_ms());
        let attempt = task.attempts.saturating_add(1);
        self.store
            .fail(&task.id, task.completions, error, &then)
            .await?;
        Ok(match then {
            AfterFailure::DeadLetter => {
                crate::telemetry::task_event("dead_lettered");
                tracing::warn!(id = %task.id, attempt, error, "task dead-lettered after its last attempt");
                TaskOutcome::DeadLettered(error.to_owned())
            }
            AfterFailure::NextPeriod(_) => {
                tracing::warn!(id = %task.id, attempt, error, "recurring job failed its last attempt; it runs again next period");
                TaskOutcome::Failed(error.to_owned())
            }
            AfterFailure::RetryAt(at) => {
                crate::telemetry::task_event("retried");
                tracing::debug!(id = %task.id, attempt, error, retry_at_ms = at, "task failed; retrying later");
                TaskOutcome::Failed(error.to_owned())
            }
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
        Ok(self
            .tasks()
            .get_mut(id)
            .is_some_and(|task| task.complete_run(run, next_due_ms)))
    }

    async fn fail(
        &self,
        id: &str,
        run: u64,
        error: &str,
        then: &AfterFailure,
    ) -> StateResult<bool> {
        Ok(self
            .tasks()
            .get_mut(id)
            .is_some_and(|task| task.fail_run(run, error, then)))
    }

    async fn dead_letters(&self, limit: usize) -> StateResult<Vec<TaskRecord>> {
        let mut dead: Vec<TaskRecord> = self.tasks().values().filter(|t| t.dead).cloned().collect();
        dead.sort_by(|a, b| a.id.cmp(&b.id));
        dead.truncate(limit);
        Ok(dead)
    }

    async fn requeue(&self, id: &str, due_ms: u64) -> StateResult<bool> {
        Ok(self
            .tasks()
            .get_mut(id)
            .is_some_and(|task| task.requeue_dead(due_ms)))
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

    use super::{AfterFailure, TaskRecord, TaskStore};
    use crate::StateResult;
    use crate::backends::redis::{connect_manager, invoke, parse_redis_url, query};

    static INSERT: LazyLock<Script> =
        LazyLock::new(|| Script::new(include_str!("scripts/task_insert.lua")));
    static COMPLETE: LazyLock<Script> =
        LazyLock::new(|| Script::new(include_str!("scripts/task_complete.lua")));
    static FAIL: LazyLock<Script> =
        LazyLock::new(|| Script::new(include_str!("scripts/task_fail.lua")));
    static REQUEUE: LazyLock<Script> =
        LazyLock::new(|| Script::new(include_str!("scripts/task_requeue.lua")));
    const TIMEOUT: Duration = Duration::from_secs(2);
    const DEFAULT_PREFIX: &str = "state:";

    /// A [`TaskStore`] in Redis: a hash `state:task:{id}` per task, a sorted set `state:tasks:due` of
    /// pending ids by due time and `state:tasks:dead` of dead-lettered ids by when; insert, complete,
    /// fail and requeue are Lua scripts.
    #[derive(Clone)]
    pub struct RedisTaskStore {
        conn: ConnectionManager,
        prefix: String,
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
            RedisTaskStore {
                conn,
                prefix: DEFAULT_PREFIX.to_owned(),
            }
        }

        /// Writes its keys under `prefix` (`{prefix}task:{id}`, `{prefix}tasks:due`,
        /// `{prefix}tasks:dead`; default `state:`), for example the lock backend's own prefix.
        ///
        /// # Errors
        /// [`StateError::InvalidInput`](crate::StateError::InvalidInput) for a prefix over 256 bytes.
        pub fn with_key_prefix(mut self, prefix: &str) -> StateResult<Self> {
            crate::backends::redis::validate_prefix(prefix)?;
            prefix.clone_into(&mut self.prefix);
            Ok(self)
        }

        fn key_of(&self, id: &str) -> String {
            format!("{}task:{id}", self.prefix)
        }

        fn due_key(&self) -> String {
            format!("{}tasks:due", self.prefix)
        }

        fn dead_key(&self) -> String {
            format!("{}tasks:dead", self.prefix)
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
                .key(self.key_of(&task.id))
                .key(self.due_key())
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
            cmd.arg(self.key_of(id)).arg(
                &[
                    "payload",
                    "status",
                    "every_ms",
                    "due_ms",
                    "completions",
                    "attempts",
                    "last_error",
                ][..],
            );
            type Fields = (
                Option<Vec<u8>>,
                Option<String>,
                Option<u64>,
                Option<u64>,
                Option<u64>,
                Option<u32>,
                Option<String>,
            );
            let (payload, status, every_ms, due_ms, completions, attempts, last_error): Fields =
                self.query(cmd, id).await?;
            let (Some(payload), Some(status), Some(due_ms)) = (payload, status, due_ms) else {
                return Ok(None);
            };
            let mut task =
                TaskRecord::new(id, &payload, every_ms.filter(|every| *every > 0), due_ms);
            task.pending = status == "pending";
            task.dead = status == "dead";
            task.completions = completions.unwrap_or(0);
            task.attempts = attempts.unwrap_or(0);
            task.last_error = last_error;
            Ok(Some(task))
        }

        async fn due(&self, now_ms: u64, limit: usize) -> StateResult<Vec<TaskRecord>> {
            let mut cmd = redis::cmd("ZRANGE");
            cmd.arg(self.due_key())
                .arg("-inf")
                .arg(now_ms)
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(0)
                .arg(limit);
            let ids: Vec<String> = self.query(cmd, "tasks:due").await?;
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
                .key(self.key_of(id))
                .key(self.due_key())
                .arg(id)
                .arg(run)
                .arg(next);
            let done: i64 =
                invoke(&mut conn, TIMEOUT, "redis", "complete", id, &invocation).await?;
            Ok(done == 1)
        }

        async fn fail(
            &self,
            id: &str,
            run: u64,
            error: &str,
            then: &AfterFailure,
        ) -> StateResult<bool> {
            let (what, at) = match then {
                AfterFailure::RetryAt(at) => ("retry", *at),
                AfterFailure::NextPeriod(at) => ("next", *at),
                AfterFailure::DeadLetter => ("dead", super::now_ms()),
            };
            let mut conn = self.conn.clone();
            let mut invocation = FAIL.prepare_invoke();
            invocation
                .key(self.key_of(id))
                .key(self.due_key())
                .key(self.dead_key())
                .arg(id)
                .arg(run)
                .arg(error)
                .arg(what)
                .arg(at);
            let done: i64 = invoke(&mut conn, TIMEOUT, "redis", "fail", id, &invocation).await?;
            Ok(done == 1)
        }

        async fn dead_letters(&self, limit: usize) -> StateResult<Vec<TaskRecord>> {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let mut cmd = redis::cmd("ZRANGE");
            cmd.arg(self.dead_key()).arg(0).arg(limit.saturating_sub(1));
            let mut ids: Vec<String> = self.query(cmd, "tasks:dead").await?;
            ids.sort();
            let mut tasks = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(task) = self.get(&id).await? {
                    tasks.push(task);
                }
            }
            Ok(tasks)
        }

        async fn requeue(&self, id: &str, due_ms: u64) -> StateResult<bool> {
            let mut conn = self.conn.clone();
            let mut invocation = REQUEUE.prepare_invoke();
            invocation
                .key(self.key_of(id))
                .key(self.due_key())
                .key(self.dead_key())
                .arg(id)
                .arg(due_ms);
            let done: i64 = invoke(&mut conn, TIMEOUT, "redis", "requeue", id, &invocation).await?;
            Ok(done == 1)
        }
    }
}

#[cfg(feature = "etcd")]
pub use self::etcd_store::EtcdTaskStore;

#[cfg(feature = "etcd")]
mod etcd_store {
    //! Tasks in etcd: one key per task (`{prefix}task/{id}`, the record as JSON). Every change is a
    //! compare-and-swap on the key's mod revision, retried on conflict, applying the same step as the
    //! other stores ([`TaskRecord::complete_run`] and friends). `due` and `dead_letters` read every task
    //! of the prefix: fine for the hundreds of recurring jobs a fleet schedules, not for a work queue of
    //! millions.

    use std::time::Duration;

    use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};

    use super::{AfterFailure, TaskRecord, TaskStore};
    use crate::backends::etcd::etcd_call;
    use crate::{StateError, StateResult};

    const TIMEOUT: Duration = Duration::from_secs(2);
    /// Compare-and-swap attempts before a change is reported as contended.
    const ATTEMPTS: usize = 32;

    /// Tasks in an etcd cluster.
    #[derive(Clone)]
    pub struct EtcdTaskStore {
        client: Client,
        prefix: String,
    }

    impl std::fmt::Debug for EtcdTaskStore {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("EtcdTaskStore")
                .field("prefix", &self.prefix)
                .finish_non_exhaustive()
        }
    }

    impl EtcdTaskStore {
        /// Tasks under `prefix` (e.g. the lock backend's, `state/`) through `client`.
        pub fn new(client: Client, prefix: &str) -> Self {
            EtcdTaskStore {
                client,
                prefix: prefix.to_owned(),
            }
        }

        fn key_of(&self, id: &str) -> String {
            format!("{}task/{id}", self.prefix)
        }

        /// A get of `key` (with `options`), bounded, re-authenticating once if the token expired.
        async fn read_keys(
            &self,
            operation: &'static str,
            what: &str,
            key: String,
            options: Option<GetOptions>,
        ) -> StateResult<etcd_client::GetResponse> {
            etcd_call(&self.client, TIMEOUT, operation, what, |mut client| {
                let (key, options) = (key.clone(), options.clone());
                async move { client.get(key, options).await }
            })
            .await
        }

        /// A transaction, bounded, re-authenticating once if the token expired.
        async fn commit(
            &self,
            operation: &'static str,
            what: &str,
            txn: Txn,
        ) -> StateResult<etcd_client::TxnResponse> {
            etcd_call(&self.client, TIMEOUT, operation, what, |mut client| {
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await
        }

        fn decode(id: &str, bytes: &[u8]) -> StateResult<TaskRecord> {
            serde_json::from_slice(bytes).map_err(|err| {
                StateError::backend(
                    "etcd",
                    "decode",
                    id,
                    format!("a malformed task record: {err}"),
                )
            })
        }

        fn encode(task: &TaskRecord) -> StateResult<Vec<u8>> {
            serde_json::to_vec(task)
                .map_err(|err| StateError::backend("etcd", "encode", &task.id, err))
        }

        #[cfg(test)]
        fn encoded(task: &TaskRecord) -> Vec<u8> {
            Self::encode(task).unwrap_or_default()
        }

        /// Every task under the prefix.
        async fn all(&self) -> StateResult<Vec<TaskRecord>> {
            let prefix = format!("{}task/", self.prefix);
            let response = self
                .read_keys(
                    "list",
                    "tasks",
                    prefix,
                    Some(GetOptions::new().with_prefix()),
                )
                .await?;
            response
                .kvs()
                .iter()
                .map(|kv| Self::decode(&String::from_utf8_lossy(kv.key()), kv.value()))
                .collect()
        }

        /// Applies `step` to task `id` with compare-and-swap: `Ok(false)` when the task is missing or
        /// `step` declines.
        async fn update(
            &self,
            id: &str,
            mut step: impl FnMut(&mut TaskRecord) -> bool + Send,
        ) -> StateResult<bool> {
            let key = self.key_of(id);
            for _ in 0..ATTEMPTS {
                let response = self.read_keys("read", id, key.clone(), None).await?;
                let Some(kv) = response.kvs().first() else {
                    return Ok(false);
                };
                let mut task = Self::decode(id, kv.value())?;
                if !step(&mut task) {
                    return Ok(false);
                }
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        kv.mod_revision(),
                    )])
                    .and_then([TxnOp::put(key.clone(), Self::encode(&task)?, None)]);
                if self.commit("update", id, txn).await?.succeeded() {
                    return Ok(true);
                }
            }
            Err(StateError::backend(
                "etcd",
                "update",
                id,
                format!("still contended after {ATTEMPTS} compare-and-swap attempts"),
            ))
        }
    }

    #[cfg(test)]
    proptest::proptest! {
        /// A task record read from etcd decodes or is an error, whatever bytes a foreign writer left
        /// (cut, flipped, extended); one this store wrote reads back equal.
        #[test]
        fn stored_task_records_decode_or_are_refused(
            id in "[a-z0-9:]{1,12}",
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..16),
            due_ms in proptest::prelude::any::<u64>(),
            at in proptest::prelude::any::<usize>(),
            flip in 1u8..=255,
        ) {
            let task = TaskRecord {
                id: id.clone(),
                payload,
                pending: true,
                every_ms: None,
                due_ms,
                completions: 0,
                attempts: 0,
                last_error: None,
                dead: false,
            };
            let bytes = EtcdTaskStore::encoded(&task);
            proptest::prop_assert_eq!(EtcdTaskStore::decode(&id, &bytes).ok(), Some(task));
            let mut damaged = bytes.clone();
            let at = at % damaged.len().max(1);
            if let Some(byte) = damaged.get_mut(at) {
                *byte ^= flip;
            }
            let _ = EtcdTaskStore::decode(&id, &damaged);
            let _ = EtcdTaskStore::decode(&id, &bytes[..at]);
        }
    }

    #[async_trait::async_trait]
    impl TaskStore for EtcdTaskStore {
        async fn insert_if_missing(&self, task: &TaskRecord) -> StateResult<bool> {
            let key = self.key_of(&task.id);
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, Self::encode(task)?, None)]);
            Ok(self.commit("insert", &task.id, txn).await?.succeeded())
        }

        async fn get(&self, id: &str) -> StateResult<Option<TaskRecord>> {
            let response = self.read_keys("read", id, self.key_of(id), None).await?;
            response
                .kvs()
                .first()
                .map(|kv| Self::decode(id, kv.value()))
                .transpose()
        }

        async fn due(&self, now_ms: u64, limit: usize) -> StateResult<Vec<TaskRecord>> {
            let mut due: Vec<TaskRecord> = self
                .all()
                .await?
                .into_iter()
                .filter(|t| t.pending && t.due_ms <= now_ms)
                .collect();
            due.sort_by_key(|t| t.due_ms);
            due.truncate(limit);
            Ok(due)
        }

        async fn complete(
            &self,
            id: &str,
            run: u64,
            next_due_ms: Option<u64>,
        ) -> StateResult<bool> {
            self.update(id, |task| task.complete_run(run, next_due_ms))
                .await
        }

        async fn fail(
            &self,
            id: &str,
            run: u64,
            error: &str,
            then: &AfterFailure,
        ) -> StateResult<bool> {
            self.update(id, |task| task.fail_run(run, error, then))
                .await
        }

        async fn dead_letters(&self, limit: usize) -> StateResult<Vec<TaskRecord>> {
            let mut dead: Vec<TaskRecord> =
                self.all().await?.into_iter().filter(|t| t.dead).collect();
            dead.sort_by(|a, b| a.id.cmp(&b.id));
            dead.truncate(limit);
            Ok(dead)
        }

        async fn requeue(&self, id: &str, due_ms: u64) -> StateResult<bool> {
            self.update(id, |task| task.requeue_dead(due_ms)).await
        }
    }
}

#[cfg(feature = "postgres")]
pub use self::postgres_store::PostgresTaskStore;

#[cfg(feature = "postgres")]
mod postgres_store {
    use sqlx::PgPool;

    use super::{AfterFailure, TaskRecord, TaskStore};
    use crate::{StateError, StateResult};

    /// A [`TaskStore`] in PostgreSQL: table `state_tasks`; completion is one conditional `UPDATE`.
    #[derive(Debug, Clone)]
    pub struct PostgresTaskStore {
        pool: PgPool,
        /// The (quoted) table.
        table: String,
    }

    type Row = (
        String,
        Vec<u8>,
        bool,
        Option<i64>,
        i64,
        i64,
        i64,
        Option<String>,
        bool,
    );

    fn to_u64(value: i64) -> u64 {
        u64::try_from(value).unwrap_or(0)
    }

    fn to_i64(value: u64) -> i64 {
        i64::try_from(value).unwrap_or(i64::MAX)
    }

    fn record(
        (id, payload, pending, every_ms, due_ms, completions, attempts, last_error, dead): Row,
    ) -> TaskRecord {
        let mut task = TaskRecord::new(&id, &payload, every_ms.map(to_u64), to_u64(due_ms));
        task.pending = pending;
        task.completions = to_u64(completions);
        task.attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
        task.last_error = last_error;
        task.dead = dead;
        task
    }

    const COLUMNS: &str =
        "id, payload, pending, every_ms, due_ms, completions, attempts, last_error, dead";

    impl PostgresTaskStore {
        /// Uses `pool`, creating the table if missing.
        ///
        /// # Errors
        /// A backend error.
        pub async fn new(pool: PgPool) -> StateResult<Self> {
            Self::create(pool, "state_tasks".to_owned(), "state_tasks".to_owned()).await
        }

        /// As [`new`](Self::new), with the table `schema.table` (the schema must exist: the lock
        /// backend's `with_schema` creates it).
        ///
        /// # Errors
        /// [`StateError::InvalidInput`] for a bad name; a backend error.
        pub async fn in_table(pool: PgPool, schema: &str, table: &str) -> StateResult<Self> {
            let (qualified, name) = crate::backends::postgres::recipe_table(schema, table)?;
            Self::create(pool, qualified, name).await
        }

        async fn create(pool: PgPool, table: String, name: String) -> StateResult<Self> {
            let ddl = format!(
                "CREATE TABLE IF NOT EXISTS {table} (id text PRIMARY KEY, payload bytea NOT NULL, \
                     pending boolean NOT NULL, every_ms bigint, due_ms bigint NOT NULL, \
                     completions bigint NOT NULL); \
                 CREATE INDEX IF NOT EXISTS \"{name}_due\" ON {table} (due_ms) WHERE pending; \
                 ALTER TABLE {table} ADD COLUMN IF NOT EXISTS attempts bigint NOT NULL DEFAULT 0, \
                     ADD COLUMN IF NOT EXISTS last_error text, \
                     ADD COLUMN IF NOT EXISTS dead boolean NOT NULL DEFAULT false;"
            );
            crate::backends::postgres::create_serialized(&pool, ddl, &table).await?;
            Ok(PostgresTaskStore { pool, table })
        }

        /// `statement` with the store's table in place of `state_tasks`.
        fn sql(&self, statement: &str) -> sqlx::AssertSqlSafe<String> {
            sqlx::AssertSqlSafe(statement.replace("state_tasks", &self.table))
        }
    }

    #[async_trait::async_trait]
    impl TaskStore for PostgresTaskStore {
        async fn insert_if_missing(&self, task: &TaskRecord) -> StateResult<bool> {
            let done = sqlx::query(self.sql(
                "INSERT INTO state_tasks (id, payload, pending, every_ms, due_ms, completions)                  VALUES ($1, $2, true, $3, $4, 0) ON CONFLICT (id) DO NOTHING",
            ))
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
            let row: Option<Row> = sqlx::query_as(
                self.sql(&format!("SELECT {COLUMNS} FROM state_tasks WHERE id = $1")),
            )
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|err| StateError::backend("postgres", "read", id, err))?;
            Ok(row.map(record))
        }

        async fn due(&self, now_ms: u64, limit: usize) -> StateResult<Vec<TaskRecord>> {
            let rows: Vec<Row> = sqlx::query_as(self.sql(&format!(
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
            let done = sqlx::query(self.sql(
                "UPDATE state_tasks SET completions = completions + 1, attempts = 0,                      pending = ($3::int8 IS NOT NULL), due_ms = coalesce($3::int8, due_ms)                  WHERE id = $1 AND pending AND completions = $2",
            ))
            .bind(id)
            .bind(to_i64(run))
            .bind(next_due_ms.map(to_i64))
            .execute(&self.pool)
            .await
            .map_err(|err| StateError::backend("postgres", "complete", id, err))?;
            Ok(done.rows_affected() == 1)
        }

        async fn fail(
            &self,
            id: &str,
            run: u64,
            error: &str,
            then: &AfterFailure,
        ) -> StateResult<bool> {
            // One conditional UPDATE per outcome: only while pending at this run.
            let (statement, at) = match then {
                AfterFailure::RetryAt(at) => (
                    "UPDATE state_tasks SET attempts = attempts + 1, last_error = $3, due_ms = $4                      WHERE id = $1 AND pending AND completions = $2",
                    Some(*at),
                ),
                AfterFailure::NextPeriod(at) => (
                    "UPDATE state_tasks SET attempts = 0, last_error = $3, due_ms = $4                      WHERE id = $1 AND pending AND completions = $2",
                    Some(*at),
                ),
                AfterFailure::DeadLetter => (
                    "UPDATE state_tasks SET attempts = attempts + 1, last_error = $3, pending = false,                          dead = true, due_ms = coalesce($4, due_ms)                      WHERE id = $1 AND pending AND completions = $2",
                    None,
                ),
            };
            let done = sqlx::query(self.sql(statement))
                .bind(id)
                .bind(to_i64(run))
                .bind(error)
                .bind(at.map(to_i64))
                .execute(&self.pool)
                .await
                .map_err(|err| StateError::backend("postgres", "fail", id, err))?;
            Ok(done.rows_affected() == 1)
        }

        async fn dead_letters(&self, limit: usize) -> StateResult<Vec<TaskRecord>> {
            let rows: Vec<Row> = sqlx::query_as(self.sql(&format!(
                "SELECT {COLUMNS} FROM state_tasks WHERE dead ORDER BY id LIMIT $1"
            )))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(|err| StateError::backend("postgres", "list", "state_tasks", err))?;
            Ok(rows.into_iter().map(record).collect())
        }

        async fn requeue(&self, id: &str, due_ms: u64) -> StateResult<bool> {
            let done = sqlx::query(self.sql(
                "UPDATE state_tasks SET dead = false, pending = true, attempts = 0, due_ms = $2                  WHERE id = $1 AND dead",
            ))
            .bind(id)
            .bind(to_i64(due_ms))
            .execute(&self.pool)
            .await
            .map_err(|err| StateError::backend("postgres", "requeue", id, err))?;
            Ok(done.rows_affected() == 1)
        }
    }
}
