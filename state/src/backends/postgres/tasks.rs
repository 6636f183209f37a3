//! The PostgreSQL [`TaskStore`](crate::recipes::tasks::TaskStore): the task queue and recurring jobs (recipe [`tasks`](crate::recipes::tasks)).

use sqlx::PgPool;

use crate::stores::tasks::{AfterFailure, TaskRecord, TaskStore};
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
        let row: Option<Row> =
            sqlx::query_as(self.sql(&format!("SELECT {COLUMNS} FROM state_tasks WHERE id = $1")))
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

    async fn defer(&self, id: &str, run: u64, until_ms: u64) -> StateResult<bool> {
        let done = sqlx::query(self.sql(
            "UPDATE state_tasks SET due_ms = $3 WHERE id = $1 AND pending AND completions = $2",
        ))
        .bind(id)
        .bind(to_i64(run))
        .bind(to_i64(until_ms))
        .execute(&self.pool)
        .await
        .map_err(|err| StateError::backend("postgres", "defer", id, err))?;
        Ok(done.rows_affected() == 1)
    }

    async fn complete(&self, id: &str, run: u64, next_due_ms: Option<u64>) -> StateResult<bool> {
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
