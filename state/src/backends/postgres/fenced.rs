//! The PostgreSQL [`FencedStore`](crate::recipes::fenced::FencedStore): storage that rejects stale fencing tokens (recipe [`fenced`](crate::recipes::fenced)).

use sqlx::PgPool;

use crate::stores::fenced::{FencedStore, FencedValue, stale};
use crate::{StateError, StateResult};

/// A [`FencedStore`] in PostgreSQL: table `state_fenced (key text PRIMARY KEY, token bigint, value
/// bytea)`, written by one `INSERT … ON CONFLICT DO UPDATE … WHERE token <= new token`.
#[derive(Debug, Clone)]
pub struct PostgresFencedStore {
    pool: PgPool,
    /// The (quoted) table.
    table: String,
}

impl PostgresFencedStore {
    /// Uses `pool` (for example [`PostgresDistributedLock::pool`](crate::PostgresDistributedLock::pool)),
    /// creating the table `state_fenced` (in the connection's search path) if missing.
    ///
    /// # Errors
    /// A backend error when the table cannot be created.
    pub async fn new(pool: PgPool) -> StateResult<Self> {
        Self::create(pool, "state_fenced".to_owned()).await
    }

    /// As [`new`](Self::new), with the table `schema.table` (the schema must exist: the lock
    /// backend's `with_schema` creates it).
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a bad name; a backend error.
    pub async fn in_table(pool: PgPool, schema: &str, table: &str) -> StateResult<Self> {
        let (qualified, _) = crate::backends::postgres::recipe_table(schema, table)?;
        Self::create(pool, qualified).await
    }

    async fn create(pool: PgPool, table: String) -> StateResult<Self> {
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {table} \
             (key text PRIMARY KEY, token bigint NOT NULL, value bytea); \
             ALTER TABLE {table} ALTER COLUMN value DROP NOT NULL;"
        );
        crate::backends::postgres::create_serialized(&pool, ddl, &table).await?;
        Ok(PostgresFencedStore { pool, table })
    }
}

fn as_i64(token: u64) -> i64 {
    i64::try_from(token).unwrap_or(i64::MAX)
}

impl PostgresFencedStore {
    /// The highest token accepted for `key`, written or fenced.
    async fn highest(&self, key: &str) -> StateResult<Option<u64>> {
        let token: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT token FROM {} WHERE key = $1",
            self.table
        )))
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(|err| StateError::backend("postgres", "read", key, err))?;
        Ok(token.map(|token| u64::try_from(token).unwrap_or(0)))
    }
}

#[async_trait::async_trait]
impl FencedStore for PostgresFencedStore {
    async fn write(&self, key: &str, token: u64, value: &[u8]) -> StateResult<()> {
        let written = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {} AS f (key, token, value) VALUES ($1, $2, $3) \
             ON CONFLICT (key) DO UPDATE SET token = EXCLUDED.token, value = EXCLUDED.value \
             WHERE f.token <= EXCLUDED.token",
            self.table
        )))
        .bind(key)
        .bind(as_i64(token))
        .bind(value)
        .execute(&self.pool)
        .await
        .map_err(|err| StateError::backend("postgres", "write", key, err))?;
        if written.rows_affected() == 1 {
            return Ok(());
        }
        Err(stale(key, token, self.highest(key).await?.unwrap_or(token)))
    }

    async fn fence(&self, key: &str, token: u64) -> StateResult<Option<FencedValue>> {
        let row: Option<(i64, Option<Vec<u8>>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {} AS f (key, token, value) VALUES ($1, $2, NULL) \
             ON CONFLICT (key) DO UPDATE SET token = EXCLUDED.token \
             WHERE f.token <= EXCLUDED.token RETURNING f.token, f.value",
            self.table
        )))
        .bind(key)
        .bind(as_i64(token))
        .fetch_optional(&self.pool)
        .await
        .map_err(|err| StateError::backend("postgres", "fence", key, err))?;
        match row {
            Some((_, value)) => Ok(value.map(|value| FencedValue { token, value })),
            None => Err(stale(key, token, self.highest(key).await?.unwrap_or(token))),
        }
    }

    async fn read(&self, key: &str) -> StateResult<Option<FencedValue>> {
        let row: Option<(i64, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT token, value FROM {} WHERE key = $1 AND value IS NOT NULL",
            self.table
        )))
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(|err| StateError::backend("postgres", "read", key, err))?;
        Ok(row.map(|(token, value)| FencedValue {
            token: u64::try_from(token).unwrap_or(0),
            value,
        }))
    }
}
