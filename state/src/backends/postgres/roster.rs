//! The PostgreSQL [`RosterStore`](crate::recipes::roster::RosterStore) (recipe [`roster`](crate::recipes::roster)): one row per member, live while
//! `expires_at` is ahead of the server's clock; the members are one `SELECT`.

use std::time::Duration;

use sqlx::PgPool;

use crate::stores::roster::{
    RosterEntry, RosterLease, RosterStore, RosterVersion, lease_to_join, validate,
};
use crate::{StateError, StateResult};

/// How long a lapsed member's row stays before a join to its roster deletes it (rows of members that
/// never come back would pile up otherwise).
const KEEP_LAPSED: &str = "interval '60 seconds'";

/// A [`RosterStore`] in PostgreSQL: table `state_roster (roster, member, holder, record, token,
/// expires_at)` keyed by (roster, member) and a token sequence. A join is one
/// `INSERT … ON CONFLICT DO UPDATE … WHERE` the old entry's lease ended; listing is one `SELECT`.
#[derive(Debug, Clone)]
pub struct PostgresRosterStore {
    pool: PgPool,
    /// The (quoted) table and token sequence.
    table: String,
    sequence: String,
}

impl PostgresRosterStore {
    /// Uses `pool` (for example [`PostgresDistributedLock::pool`](crate::PostgresDistributedLock::pool)),
    /// creating the table `state_roster` and sequence `state_roster_tokens` (in the connection's search
    /// path) if missing.
    ///
    /// # Errors
    /// A backend error when the table cannot be created.
    pub async fn new(pool: PgPool) -> StateResult<Self> {
        Self::create(
            pool,
            "state_roster".to_owned(),
            "state_roster_tokens".to_owned(),
        )
        .await
    }

    /// As [`new`](Self::new), with the table `schema.table` and the sequence `schema.table_tokens`
    /// (the schema must exist: the lock backend's `with_schema` creates it).
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a bad name; a backend error.
    pub async fn in_table(pool: PgPool, schema: &str, table: &str) -> StateResult<Self> {
        let (qualified, _) = crate::backends::postgres::recipe_table(schema, table)?;
        let (sequence, _) =
            crate::backends::postgres::recipe_table(schema, &format!("{table}_tokens"))?;
        Self::create(pool, qualified, sequence).await
    }

    async fn create(pool: PgPool, table: String, sequence: String) -> StateResult<Self> {
        let ddl = format!(
            "CREATE SEQUENCE IF NOT EXISTS {sequence} AS bigint; \
             CREATE TABLE IF NOT EXISTS {table} (roster text NOT NULL, member text NOT NULL, \
             holder text NOT NULL, record bytea NOT NULL, token bigint NOT NULL, \
             expires_at timestamptz NOT NULL, PRIMARY KEY (roster, member));"
        );
        crate::backends::postgres::create_serialized(&pool, ddl, &table).await?;
        Ok(PostgresRosterStore {
            pool,
            table,
            sequence,
        })
    }
}

fn millis(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

#[async_trait::async_trait]
impl RosterStore for PostgresRosterStore {
    async fn join(
        &self,
        roster: &str,
        member: &str,
        record: &[u8],
        ttl: Duration,
    ) -> StateResult<Option<RosterLease>> {
        let mut lease = lease_to_join(roster, member, record, ttl)?;
        let token: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "WITH lapsed AS (DELETE FROM {table} WHERE roster = $1 AND member <> $2 \
               AND expires_at < clock_timestamp() - {KEEP_LAPSED}) \
             INSERT INTO {table} AS r (roster, member, holder, record, token, expires_at) \
             VALUES ($1, $2, $3, $4, nextval('{sequence}'), \
                     clock_timestamp() + $5 * interval '1 millisecond') \
             ON CONFLICT (roster, member) DO UPDATE SET holder = EXCLUDED.holder, \
               record = EXCLUDED.record, token = EXCLUDED.token, expires_at = EXCLUDED.expires_at \
             WHERE r.expires_at <= clock_timestamp() \
             RETURNING token",
            table = self.table,
            sequence = self.sequence.replace('\'', "''"),
        )))
        .bind(roster)
        .bind(member)
        .bind(&lease.holder)
        .bind(&lease.record)
        .bind(millis(ttl))
        .fetch_optional(&self.pool)
        .await
        .map_err(|err| StateError::backend("postgres", "join the roster as", member, err))?;
        Ok(token.map(|token| {
            lease.token = to_u64(token);
            lease
        }))
    }

    async fn renew(&self, lease: &RosterLease, ttl: Duration) -> StateResult<bool> {
        validate(&lease.roster, &lease.member, ttl)?;
        let renewed = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET expires_at = clock_timestamp() + $4 * interval '1 millisecond' \
             WHERE roster = $1 AND member = $2 AND holder = $3 AND expires_at > clock_timestamp()",
            self.table
        )))
        .bind(&lease.roster)
        .bind(&lease.member)
        .bind(&lease.holder)
        .bind(millis(ttl))
        .execute(&self.pool)
        .await
        .map_err(|err| {
            StateError::backend("postgres", "renew the roster entry of", &lease.member, err)
        })?;
        Ok(renewed.rows_affected() == 1)
    }

    async fn leave(&self, lease: &RosterLease) -> StateResult<bool> {
        let left = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {} WHERE roster = $1 AND member = $2 AND holder = $3 \
             AND expires_at > clock_timestamp()",
            self.table
        )))
        .bind(&lease.roster)
        .bind(&lease.member)
        .bind(&lease.holder)
        .execute(&self.pool)
        .await
        .map_err(|err| {
            StateError::backend("postgres", "leave the roster as", &lease.member, err)
        })?;
        Ok(left.rows_affected() == 1)
    }

    async fn members(&self, roster: &str) -> StateResult<Vec<RosterEntry>> {
        let rows: Vec<(String, Vec<u8>, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT member, record, token FROM {} \
             WHERE roster = $1 AND expires_at > clock_timestamp() ORDER BY member",
            self.table
        )))
        .bind(roster)
        .fetch_all(&self.pool)
        .await
        .map_err(|err| StateError::backend("postgres", "list the roster", roster, err))?;
        Ok(rows
            .into_iter()
            .map(|(member, record, token)| RosterEntry {
                member,
                record,
                token: to_u64(token),
            })
            .collect())
    }

    async fn version(&self, roster: &str) -> StateResult<RosterVersion> {
        // Every join's token is above all earlier ones: a join raises the newest live token, a
        // departure without a join lowers the count.
        let (members, newest): (i64, Option<i64>) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT count(*), max(token) FROM {} \
             WHERE roster = $1 AND expires_at > clock_timestamp()",
            self.table
        )))
        .bind(roster)
        .fetch_one(&self.pool)
        .await
        .map_err(|err| {
            StateError::backend("postgres", "read the roster version of", roster, err)
        })?;
        Ok(RosterVersion::new(
            to_u64(members),
            newest.map_or(0, to_u64),
        ))
    }
}
