//! The PostgreSQL [`VersionedStore`](crate::recipes::versioned::VersionedStore): optimistic versioned updates (recipe [`versioned`](crate::recipes::versioned)).

use sqlx::PgPool;

use crate::stores::versioned::{CasWrite, Versioned, VersionedStore};
use crate::{StateError, StateResult};

/// A [`VersionedStore`] in PostgreSQL: table `state_versioned (key text PRIMARY KEY, version bigint,
/// value bytea)`; the compare-and-set is one transaction of conditional writes, rolled back on the
/// first conflict.
#[derive(Debug, Clone)]
pub struct PostgresVersionedStore {
    pool: PgPool,
}

impl PostgresVersionedStore {
    /// Uses `pool`, creating the table if missing.
    ///
    /// # Errors
    /// A backend error.
    pub async fn new(pool: PgPool) -> StateResult<Self> {
        let ddl = "CREATE TABLE IF NOT EXISTS state_versioned \
             (key text PRIMARY KEY, version bigint NOT NULL, value bytea NOT NULL)";
        crate::backends::postgres::create_serialized(&pool, ddl.to_owned(), "state_versioned")
            .await?;
        Ok(PostgresVersionedStore { pool })
    }
}

fn fail(key: &str) -> impl FnOnce(sqlx::Error) -> StateError + '_ {
    move |err| StateError::backend("postgres", "compare-and-set", key, err)
}

#[async_trait::async_trait]
impl VersionedStore for PostgresVersionedStore {
    async fn get(&self, key: &str) -> StateResult<Option<Versioned>> {
        let row: Option<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT version, value FROM state_versioned WHERE key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await
                .map_err(|err| StateError::backend("postgres", "read", key, err))?;
        Ok(row.map(|(version, value)| Versioned {
            version: u64::try_from(version).unwrap_or(0),
            value,
        }))
    }

    async fn compare_and_set(&self, writes: &[CasWrite]) -> StateResult<bool> {
        let label = writes.first().map_or("", |w| w.key.as_str());
        let mut tx = self.pool.begin().await.map_err(fail(label))?;
        // A fixed order of row locks, so concurrent batches cannot deadlock.
        let mut ordered: Vec<&CasWrite> = writes.iter().collect();
        ordered.sort_by(|a, b| a.key.cmp(&b.key));
        for w in ordered {
            let expected = i64::try_from(w.expected).unwrap_or(i64::MAX);
            let changed = if w.expected == 0 {
                sqlx::query(
                    "INSERT INTO state_versioned (key, version, value) VALUES ($1, 1, $2) \
                     ON CONFLICT (key) DO NOTHING",
                )
                .bind(&w.key)
                .bind(&w.value)
                .execute(&mut *tx)
                .await
            } else {
                sqlx::query(
                    "UPDATE state_versioned SET version = version + 1, value = $3 \
                     WHERE key = $1 AND version = $2",
                )
                .bind(&w.key)
                .bind(expected)
                .bind(&w.value)
                .execute(&mut *tx)
                .await
            }
            .map_err(fail(&w.key))?;
            if changed.rows_affected() != 1 {
                tx.rollback().await.map_err(fail(&w.key))?;
                return Ok(false);
            }
        }
        tx.commit().await.map_err(fail(label))?;
        Ok(true)
    }
}
