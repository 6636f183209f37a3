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

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::lock::validate_resource;
use crate::recipes::keeper::{KeptLock, LockContext, RenewalPolicy, run_kept};
use crate::{DistributedLock, StateError, StateResult};

use crate::stores::tasks::now_ms;
pub use crate::stores::tasks::{AfterFailure, TaskRecord, TaskStore};

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

/// Workers and producers of one queue.
#[derive(Clone)]
pub struct TaskQueue {
    lock: Arc<dyn DistributedLock>,
    store: Arc<dyn TaskStore>,
    claim_ttl: Duration,
    batch: usize,
    retry: TaskRetryPolicy,
    /// Which of the store's tasks this queue's workers take (see [`TaskQueue::only_tasks`]).
    takes: Option<TaskFilter>,
}

/// A predicate on task ids: the tasks a [`TaskQueue`]'s workers take.
pub type TaskFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

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
            takes: None,
        }
    }

    /// Workers of this queue take only the tasks whose id `takes` accepts; the others are left, unclaimed,
    /// to the queues they belong to. Several applications (or several jobs of one) can then share one
    /// task store without running each other's tasks.
    ///
    /// The store still lists due tasks store-wide, so a filtered queue looks at the same first tasks
    /// due as every other queue of the store.
    pub fn only_tasks(mut self, takes: TaskFilter) -> Self {
        self.takes = Some(takes);
        self
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
        let mut page = self.store.due(now_ms(), self.batch).await?;
        // Every worker reads the same page: in page order they would all race for its first task,
        // the k-th worker claiming only after k refusals. In a random order of its own, each mostly
        // claims at its first try (the page is the earliest due, so order within it matters little).
        {
            use rand::seq::SliceRandom;
            page.shuffle(&mut rand::rng());
        }
        for listed in page {
            if self.takes.as_ref().is_some_and(|takes| !takes(&listed.id)) {
                continue;
            }
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
            // Hidden from the other workers' `due` pages while it runs (so 100 workers run 100
            // tasks, not the 32 first due ones): due again a claim TTL after the last renewal, as
            // its claim lapses, if this worker dies.
            if !task.pending
                || task.due_ms > now_ms()
                || !self
                    .store
                    .defer(&task.id, task.completions, self.hidden_until())
                    .await?
            {
                let _ = kept.release().await;
                continue;
            }
            crate::telemetry::task_event("claimed");
            return self.run_claimed(kept, task, handler).await.map(Some);
        }
        Ok(None)
    }

    /// When a task claimed now becomes visible to other workers again, unless renewed.
    fn hidden_until(&self) -> u64 {
        let ttl = u64::try_from(self.claim_ttl.as_millis()).unwrap_or(u64::MAX);
        now_ms().saturating_add(ttl)
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
        let hidden = Arc::clone(&self.store);
        let (hiding, claim_ttl) = (id.clone(), self.claim_ttl);
        let outcome = run_kept(kept, |ctx| async move {
            // Kept hidden from the other workers while the handler runs, as its claim is renewed.
            let keep_hidden = async {
                loop {
                    tokio::time::sleep(claim_ttl / 3).await;
                    let ttl = u64::try_from(claim_ttl.as_millis()).unwrap_or(u64::MAX);
                    let _ = hidden
                        .defer(&hiding, run, now_ms().saturating_add(ttl))
                        .await;
                }
            };
            tokio::select! {
                handled = handler(task, ctx) => handled?,
                () = keep_hidden => {}
            }
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

pub use crate::backends::memory::tasks::InMemoryTaskStore;

#[cfg(feature = "redis")]
pub use crate::backends::redis::tasks::RedisTaskStore;

#[cfg(feature = "etcd")]
pub use crate::backends::etcd::tasks::EtcdTaskStore;

#[cfg(feature = "postgres")]
pub use crate::backends::postgres::tasks::PostgresTaskStore;
