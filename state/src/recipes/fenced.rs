//! Fenced writes: storage that accepts a write only if its fencing token is at least the highest it has
//! seen for that key, atomically. This is how fencing tokens become safety: a holder whose lease ran out
//! (paused, partitioned, slow) is refused once a newer holder has written.
//!
//! A read-modify-write needs one more step: the new holder **fences** the key as it reads it
//! ([`FencedStore::fence`]), so a stale holder's write is refused even when it lands between the new
//! holder's read and its write (plain fenced writes would take it: its token is still the highest
//! *written*). The torture suite found exactly that interleaving with PostgreSQL advisory locks, whose
//! TTL is enforced by the stale holder's own process when it resumes.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> state::StateResult<()> {
//! use state::recipes::fenced::{FencedStore, InMemoryFencedStore};
//! use state::StateError;
//!
//! let store = InMemoryFencedStore::default();
//! store.write("checkpoint:orders", 7, b"offset=100").await?;
//! store.write("checkpoint:orders", 9, b"offset=180").await?;
//! let stale = store.write("checkpoint:orders", 8, b"offset=150").await;
//! assert!(matches!(stale, Err(StateError::StaleFencingToken { highest: 9, .. })));
//! assert_eq!(store.read("checkpoint:orders").await?.unwrap().value, b"offset=180");
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::Mutex;

use crate::{StateError, StateResult};

/// A value and the highest fencing token accepted for its key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FencedValue {
    /// The highest token accepted for the key, by a write or a [`fence`](FencedStore::fence).
    pub token: u64,
    /// The bytes written.
    pub value: Vec<u8>,
}

/// A key-value store whose writes are fenced.
#[async_trait::async_trait]
pub trait FencedStore: Send + Sync + std::fmt::Debug {
    /// Stores `value` under `key` if `token` is at least the highest token accepted for `key`
    /// (equal tokens are the same holder writing again).
    ///
    /// # Errors
    /// [`StateError::StaleFencingToken`] when a higher token has written; a backend error.
    async fn write(&self, key: &str, token: u64, value: &[u8]) -> StateResult<()>;

    /// The last accepted value and the highest accepted token.
    ///
    /// # Errors
    /// A backend error.
    async fn read(&self, key: &str) -> StateResult<Option<FencedValue>>;

    /// Raises the highest token accepted for `key` to `token` — from now on a write with a lower token is
    /// refused — and returns the current value: the read of a read-modify-write under a lock.
    ///
    /// # Errors
    /// [`StateError::StaleFencingToken`] when a higher token was accepted; a backend error.
    async fn fence(&self, key: &str, token: u64) -> StateResult<Option<FencedValue>>;
}

fn stale(key: &str, token: u64, highest: u64) -> StateError {
    StateError::StaleFencingToken {
        key: key.to_owned(),
        token,
        highest,
    }
}

/// The highest accepted token of a key, and its last written value.
type Entry = (u64, Option<Vec<u8>>);

/// A [`FencedStore`] in process memory.
#[derive(Debug, Default)]
pub struct InMemoryFencedStore {
    values: Mutex<HashMap<String, Entry>>,
}

impl InMemoryFencedStore {
    /// Raises `key`'s highest token to `token` unless it is lower; the entry.
    fn raise<'a>(
        values: &'a mut HashMap<String, Entry>,
        key: &str,
        token: u64,
    ) -> StateResult<&'a mut Entry> {
        let entry = values.entry(key.to_owned()).or_insert((0, None));
        if token < entry.0 {
            return Err(stale(key, token, entry.0));
        }
        entry.0 = token;
        Ok(entry)
    }
}

fn value_of((token, value): &Entry) -> Option<FencedValue> {
    value.as_ref().map(|value| FencedValue {
        token: *token,
        value: value.clone(),
    })
}

#[async_trait::async_trait]
impl FencedStore for InMemoryFencedStore {
    async fn write(&self, key: &str, token: u64, value: &[u8]) -> StateResult<()> {
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        Self::raise(&mut values, key, token)?.1 = Some(value.to_vec());
        Ok(())
    }

    async fn read(&self, key: &str) -> StateResult<Option<FencedValue>> {
        let values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        Ok(values.get(key).and_then(value_of))
    }

    async fn fence(&self, key: &str, token: u64) -> StateResult<Option<FencedValue>> {
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        Ok(value_of(Self::raise(&mut values, key, token)?))
    }
}

#[cfg(feature = "redis")]
pub use self::redis_store::RedisFencedStore;

#[cfg(feature = "redis")]
mod redis_store {
    use std::sync::LazyLock;
    use std::time::Duration;

    use redis::Script;
    use redis::aio::ConnectionManager;

    use super::{FencedStore, FencedValue, stale};
    use crate::StateResult;
    use crate::backends::redis::{connect_manager, invoke, parse_redis_url, query};

    static WRITE: LazyLock<Script> =
        LazyLock::new(|| Script::new(include_str!("scripts/fenced_write.lua")));
    static FENCE: LazyLock<Script> =
        LazyLock::new(|| Script::new(include_str!("scripts/fenced_fence.lua")));
    const TIMEOUT: Duration = Duration::from_secs(2);

    /// A [`FencedStore`] in Redis: one hash `{prefix}{key}` = `{token, value}` per key, written by a Lua
    /// compare-and-set.
    #[derive(Clone)]
    pub struct RedisFencedStore {
        conn: ConnectionManager,
        prefix: String,
    }

    impl std::fmt::Debug for RedisFencedStore {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RedisFencedStore")
                .field("prefix", &self.prefix)
                .finish()
        }
    }

    impl RedisFencedStore {
        /// Connects to Redis at `url`; keys are written as `state:fenced:{key}`.
        ///
        /// # Errors
        /// [`StateError::InvalidInput`](crate::StateError::InvalidInput) for a malformed URL; a backend
        /// error when the server cannot be reached.
        pub async fn new(url: &str) -> StateResult<Self> {
            let target = parse_redis_url(url)?;
            Ok(Self::from_connection_manager(
                connect_manager(&target, TIMEOUT).await?,
            ))
        }

        /// Uses an existing connection (the application's own, or a lock backend's: see
        /// [`RedisDistributedLock::connection_manager`](crate::RedisDistributedLock::connection_manager)).
        pub fn from_connection_manager(conn: ConnectionManager) -> Self {
            RedisFencedStore {
                conn,
                prefix: "state:fenced:".to_owned(),
            }
        }

        /// Writes its keys under `prefix` (as `{prefix}fenced:{key}`; default `state:`), for example the
        /// lock backend's own prefix so that one application's keys share one namespace.
        ///
        /// # Errors
        /// [`StateError::InvalidInput`](crate::StateError::InvalidInput) for a prefix over 256 bytes.
        pub fn with_key_prefix(mut self, prefix: &str) -> StateResult<Self> {
            crate::backends::redis::validate_prefix(prefix)?;
            self.prefix = format!("{prefix}fenced:");
            Ok(self)
        }
    }

    #[async_trait::async_trait]
    impl FencedStore for RedisFencedStore {
        async fn write(&self, key: &str, token: u64, value: &[u8]) -> StateResult<()> {
            let mut conn = self.conn.clone();
            let mut invocation = WRITE.prepare_invoke();
            invocation
                .key(format!("{}{key}", self.prefix))
                .arg(token)
                .arg(value);
            let (written, highest): (i64, u64) =
                invoke(&mut conn, TIMEOUT, "redis", "write", key, &invocation).await?;
            if written == 1 {
                Ok(())
            } else {
                Err(stale(key, token, highest))
            }
        }

        async fn read(&self, key: &str) -> StateResult<Option<FencedValue>> {
            let mut conn = self.conn.clone();
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(format!("{}{key}", self.prefix))
                .arg("token")
                .arg("value");
            let (token, value): (Option<u64>, Option<Vec<u8>>) =
                query(&mut conn, TIMEOUT, "redis", "read", key, &cmd).await?;
            Ok(token
                .zip(value)
                .map(|(token, value)| FencedValue { token, value }))
        }

        async fn fence(&self, key: &str, token: u64) -> StateResult<Option<FencedValue>> {
            let mut conn = self.conn.clone();
            let mut invocation = FENCE.prepare_invoke();
            invocation.key(format!("{}{key}", self.prefix)).arg(token);
            let reply: Vec<redis::Value> =
                invoke(&mut conn, TIMEOUT, "redis", "fence", key, &invocation).await?;
            match reply.as_slice() {
                [redis::Value::Int(1)] => Ok(None),
                [redis::Value::Int(1), redis::Value::BulkString(value)] => Ok(Some(FencedValue {
                    token,
                    value: value.clone(),
                })),
                [redis::Value::Int(0), redis::Value::Int(highest)] => Err(stale(
                    key,
                    token,
                    u64::try_from(*highest).unwrap_or(u64::MAX),
                )),
                other => Err(crate::StateError::backend(
                    "redis",
                    "fence",
                    key,
                    format!("an unexpected script reply {other:?}"),
                )),
            }
        }
    }
}

#[cfg(feature = "etcd")]
pub use self::etcd_store::EtcdFencedStore;

#[cfg(feature = "etcd")]
mod etcd_store {
    //! Fenced values in etcd: one key per value (`{prefix}fenced/{key}`: the highest token as 8
    //! big-endian bytes, then the value if one was written), changed with a compare-and-swap on the key's
    //! mod revision — a write or fence whose token is below the stored one is refused, whatever
    //! interleaving.

    use std::time::Duration;

    use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};

    use super::{FencedStore, FencedValue, stale};
    use crate::backends::etcd::etcd_call;
    use crate::{StateError, StateResult};

    const TIMEOUT: Duration = Duration::from_secs(2);
    const ATTEMPTS: usize = 32;

    /// Fenced values in an etcd cluster.
    #[derive(Clone)]
    pub struct EtcdFencedStore {
        client: Client,
        prefix: String,
    }

    impl std::fmt::Debug for EtcdFencedStore {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("EtcdFencedStore")
                .field("prefix", &self.prefix)
                .finish_non_exhaustive()
        }
    }

    impl EtcdFencedStore {
        /// Values under `prefix` (e.g. the lock backend's, `state/`) through `client`.
        pub fn new(client: Client, prefix: &str) -> Self {
            EtcdFencedStore {
                client,
                prefix: prefix.to_owned(),
            }
        }

        fn key_of(&self, key: &str) -> String {
            format!("{}fenced/{key}", self.prefix)
        }
    }

    /// A stored record: the highest accepted token (8 big-endian bytes), then `1` and the value, or `0`
    /// when the key was fenced before any write.
    fn decode(key: &str, bytes: &[u8]) -> StateResult<(u64, Option<Vec<u8>>)> {
        let malformed = || StateError::backend("etcd", "decode", key, "a malformed fenced record");
        let (token, rest) = bytes.split_first_chunk::<8>().ok_or_else(malformed)?;
        let value = match rest.split_first() {
            Some((0, [])) => None,
            Some((1, value)) => Some(value.to_vec()),
            _ => return Err(malformed()),
        };
        Ok((u64::from_be_bytes(*token), value))
    }

    fn encode(token: u64, value: Option<&[u8]>) -> Vec<u8> {
        let mut bytes = token.to_be_bytes().to_vec();
        match value {
            Some(value) => {
                bytes.push(1);
                bytes.extend_from_slice(value);
            }
            None => bytes.push(0),
        }
        bytes
    }

    #[cfg(test)]
    proptest::proptest! {
        /// Whatever bytes sit under a fenced key, reading them never panics; what the store writes reads
        /// back.
        #[test]
        fn stored_fenced_records_decode_or_are_refused(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
            token in proptest::prelude::any::<u64>(),
            fenced_only in proptest::prelude::any::<bool>(),
        ) {
            let _ = decode("k", &bytes);
            let value = (!fenced_only).then_some(bytes.as_slice());
            let read = decode("k", &encode(token, value)).expect("a stored record decodes");
            proptest::prop_assert_eq!(read, (token, value.map(<[u8]>::to_vec)));
        }
    }

    impl EtcdFencedStore {
        /// Raises `key`'s highest token to `token` (refused if lower) and, with `value`, writes it; the
        /// value before. One compare-and-swap on the key's mod revision, retried on contention.
        async fn raise(
            &self,
            key: &str,
            token: u64,
            value: Option<&[u8]>,
        ) -> StateResult<Option<FencedValue>> {
            let stored_key = self.key_of(key);
            for _ in 0..ATTEMPTS {
                let current = etcd_call(&self.client, TIMEOUT, "read", key, |mut client| {
                    let stored_key = stored_key.clone();
                    async move { client.get(stored_key, None).await }
                })
                .await?;
                let (compare, before) = match current.kvs().first() {
                    Some(kv) => {
                        let (highest, before) = decode(key, kv.value())?;
                        if token < highest {
                            return Err(stale(key, token, highest));
                        }
                        let compare = Compare::mod_revision(
                            stored_key.clone(),
                            CompareOp::Equal,
                            kv.mod_revision(),
                        );
                        (compare, before)
                    }
                    None => (
                        Compare::create_revision(stored_key.clone(), CompareOp::Equal, 0),
                        None,
                    ),
                };
                let record = encode(token, value.or(before.as_deref()));
                let txn = Txn::new().when([compare]).and_then([TxnOp::put(
                    stored_key.clone(),
                    record,
                    None,
                )]);
                let written = etcd_call(&self.client, TIMEOUT, "write", key, |mut client| {
                    let txn = txn.clone();
                    async move { client.txn(txn).await }
                })
                .await?;
                if written.succeeded() {
                    return Ok(before.map(|value| FencedValue { token, value }));
                }
            }
            Err(StateError::backend(
                "etcd",
                "write",
                key,
                format!("still contended after {ATTEMPTS} compare-and-swap attempts"),
            ))
        }
    }

    #[async_trait::async_trait]
    impl FencedStore for EtcdFencedStore {
        async fn write(&self, key: &str, token: u64, value: &[u8]) -> StateResult<()> {
            self.raise(key, token, Some(value)).await.map(|_| ())
        }

        async fn read(&self, key: &str) -> StateResult<Option<FencedValue>> {
            let stored_key = self.key_of(key);
            let current = etcd_call(&self.client, TIMEOUT, "read", key, |mut client| {
                let stored_key = stored_key.clone();
                async move { client.get(stored_key, None).await }
            })
            .await?;
            let Some(kv) = current.kvs().first() else {
                return Ok(None);
            };
            let (token, value) = decode(key, kv.value())?;
            Ok(value.map(|value| FencedValue { token, value }))
        }

        async fn fence(&self, key: &str, token: u64) -> StateResult<Option<FencedValue>> {
            self.raise(key, token, None).await
        }
    }
}

#[cfg(feature = "postgres")]
pub use self::postgres_store::PostgresFencedStore;

#[cfg(feature = "postgres")]
mod postgres_store {
    use sqlx::PgPool;

    use super::{FencedStore, FencedValue, stale};
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
}
