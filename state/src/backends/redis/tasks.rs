//! The Redis [`TaskStore`](crate::recipes::tasks::TaskStore): the task queue and recurring jobs (recipe [`tasks`](crate::recipes::tasks)).

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;

use crate::StateResult;
use crate::backends::redis::{connect_manager, invoke, parse_redis_url, query};
use crate::stores::tasks::{AfterFailure, TaskRecord, TaskStore};

static INSERT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/task_insert.lua")));
static COMPLETE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/task_complete.lua")));
static FAIL: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/task_fail.lua")));
static DUE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/task_due.lua")));
static DEFER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/task_defer.lua")));
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

    async fn query<T: redis::FromRedisValue>(&self, cmd: redis::Cmd, what: &str) -> StateResult<T> {
        let mut conn = self.conn.clone();
        query(&mut conn, TIMEOUT, "redis", "query", what, &cmd).await
    }
}

/// The fields of a task's hash, in [`Fields`] order.
const FIELDS: [&str; 7] = [
    "payload",
    "status",
    "every_ms",
    "due_ms",
    "completions",
    "attempts",
    "last_error",
];

type Fields = (
    Option<Vec<u8>>,
    Option<String>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
    Option<u32>,
    Option<String>,
);

/// The record of task `id` from its hash's [`FIELDS`]; `None` when it has none.
fn record_of(
    id: &str,
    (payload, status, every_ms, due_ms, completions, attempts, last_error): Fields,
) -> Option<TaskRecord> {
    let (Some(payload), Some(status), Some(due_ms)) = (payload, status, due_ms) else {
        return None;
    };
    let mut task = TaskRecord::new(id, &payload, every_ms.filter(|every| *every > 0), due_ms);
    task.pending = status == "pending";
    task.dead = status == "dead";
    task.completions = completions.unwrap_or(0);
    task.attempts = attempts.unwrap_or(0);
    task.last_error = last_error;
    Some(task)
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
        cmd.arg(self.key_of(id)).arg(&FIELDS[..]);
        let fields: Fields = self.query(cmd, id).await?;
        Ok(record_of(id, fields))
    }

    /// One script: the due ids and their records (was a command per task).
    async fn due(&self, now_ms: u64, limit: usize) -> StateResult<Vec<TaskRecord>> {
        let mut conn = self.conn.clone();
        let mut invocation = DUE.prepare_invoke();
        invocation
            .key(self.due_key())
            .arg(now_ms)
            .arg(limit)
            .arg(self.key_of(""));
        let listed: Vec<(String, Fields)> = invoke(
            &mut conn,
            TIMEOUT,
            "redis",
            "list",
            "tasks:due",
            &invocation,
        )
        .await?;
        Ok(listed
            .into_iter()
            .filter_map(|(id, fields)| record_of(&id, fields))
            .collect())
    }

    async fn defer(&self, id: &str, run: u64, until_ms: u64) -> StateResult<bool> {
        let mut conn = self.conn.clone();
        let mut invocation = DEFER.prepare_invoke();
        invocation
            .key(self.key_of(id))
            .key(self.due_key())
            .arg(id)
            .arg(run)
            .arg(until_ms);
        let done: i64 = invoke(&mut conn, TIMEOUT, "redis", "defer", id, &invocation).await?;
        Ok(done == 1)
    }

    async fn complete(&self, id: &str, run: u64, next_due_ms: Option<u64>) -> StateResult<bool> {
        let mut conn = self.conn.clone();
        let next = next_due_ms.map_or(-1, |next| i64::try_from(next).unwrap_or(i64::MAX));
        let mut invocation = COMPLETE.prepare_invoke();
        invocation
            .key(self.key_of(id))
            .key(self.due_key())
            .arg(id)
            .arg(run)
            .arg(next);
        let done: i64 = invoke(&mut conn, TIMEOUT, "redis", "complete", id, &invocation).await?;
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
            AfterFailure::DeadLetter => ("dead", crate::stores::tasks::now_ms()),
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
