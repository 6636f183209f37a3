//! The storage contract of the [`tasks`](crate::recipes::tasks) recipe: task records, and the steps that
//! change them (insert, complete, fail, requeue) as each backend applies them atomically in its own
//! folder (`backends/*/tasks.rs`).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::StateResult;

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

    /// Hides run `run` (only while pending at that run) from [`TaskStore::due`] until `until_ms`: a
    /// claimed task's visibility timeout. Whether it did.
    pub(crate) fn defer_run(&mut self, run: u64, until_ms: u64) -> bool {
        if !self.pending || self.completions != run {
            return false;
        }
        self.due_ms = until_ms;
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

    /// Makes run `run` of `id` due at `until_ms` (only while it is pending at that run): what a worker
    /// that claimed it does, so that the others' [`due`](TaskStore::due) pages skip it while it runs
    /// (a visibility timeout). `Ok(true)` when it did.
    ///
    /// # Errors
    /// A backend error.
    async fn defer(&self, id: &str, run: u64, until_ms: u64) -> StateResult<bool>;

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

/// This host's wall clock in ms: schedules only (claims and completion never depend on it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
