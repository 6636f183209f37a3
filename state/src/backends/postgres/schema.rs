//! The lock tables: validated, quoted identifiers, the SQL of every operation (built once, all data
//! bound), and the versioned migrations that create or upgrade the tables.

use std::sync::Arc;

use sqlx::AssertSqlSafe;

use super::PostgresDistributedLock;
use crate::{StateError, StateResult};

/// Serialises migrations between concurrent starters (a transaction-scoped advisory lock).
const MIGRATION_LOCK_KEY: i64 = 0x5354_4154_455f_4d49; // "STATE_MI"

/// Validated, quoted identifiers.
#[derive(Debug, Clone)]
pub(super) struct TableNames {
    pub(super) schema: String,
    pub(super) table: String,
    /// `"schema"."table"`
    pub(super) qualified: String,
    /// `"schema"."table_fence"`
    pub(super) sequence: String,
    /// `"schema"."table_schema_version"`
    pub(super) versions: String,
}

impl TableNames {
    pub(super) fn new(schema: &str, table: &str) -> StateResult<Self> {
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
pub(super) struct Statements {
    pub(super) acquire: Arc<str>,
    pub(super) take_over: Arc<str>,
    pub(super) release: Arc<str>,
    pub(super) extend: Arc<str>,
    pub(super) info: Arc<str>,
    pub(super) advisory_held: Arc<str>,
}

/// `fence, acquired_ms, expires_ms` of a lease row.
const LEASE_COLUMNS: &str = "fence, (extract(epoch from acquired_at) * 1000)::int8 AS acquired_ms, \
                             (extract(epoch from expires_at) * 1000)::int8 AS expires_ms";

impl Statements {
    pub(super) fn new(names: &TableNames) -> Self {
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

/// Runs `ddl` (one or more `… IF NOT EXISTS` statements) in a transaction that first takes the
/// migration lock. PostgreSQL's `CREATE TABLE IF NOT EXISTS` is not safe against itself: two sessions can
/// both find the table missing and one then fails on the catalog's unique index — what a fleet starting
/// at once on a fresh database does. Serialized, the second sees the first's table.
pub(crate) async fn create_serialized(
    pool: &sqlx::PgPool,
    ddl: String,
    what: &str,
) -> StateResult<()> {
    let fail = |err: sqlx::Error| StateError::backend("postgres", "create", what.to_owned(), err);
    let mut tx = pool.begin().await.map_err(fail)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut *tx)
        .await
        .map_err(fail)?;
    sqlx::raw_sql(AssertSqlSafe(ddl))
        .execute(&mut *tx)
        .await
        .map_err(fail)?;
    tx.commit().await.map_err(fail)
}

/// The schema migrations, in order; `{table}`, `{sequence}` and `{index}` are replaced by quoted names.
const MIGRATIONS: &[&str] = &[include_str!("migrations/postgres_v1.sql")];

impl PostgresDistributedLock {
    /// Creates or upgrades the tables; concurrent starters wait for each other.
    pub(super) async fn migrate(&self) -> Result<(), sqlx::Error> {
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
}

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
}
