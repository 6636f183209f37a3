//! Optimistic versioned updates: read a value with its version, compute the new value, write it only if
//! the version has not moved (compare-and-set), and retry with exponential backoff otherwise — the
//! row-version pattern, without holding a lock while computing. A batch form updates several keys
//! atomically.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> state::StateResult<()> {
//! use state::recipes::versioned::{optimistic_update, InMemoryVersionedStore};
//! use state::RetryConfig;
//!
//! let store = InMemoryVersionedStore::default();
//! let jackpot = optimistic_update(&store, "jackpot", &RetryConfig::default(), |old| {
//!     let cents: u64 = old.map_or(0, |v| String::from_utf8_lossy(v).parse().unwrap_or(0));
//!     (cents + 250).to_string().into_bytes()
//! })
//! .await?;
//! assert_eq!(jackpot.version, 1);
//! assert_eq!(jackpot.value, b"250");
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::Mutex;

use crate::retry::{Budget, Retried, retry_loop};
use crate::{RetryConfig, StateError, StateResult};

/// A value and its version (1 for the first write; 0 means "absent" in compare-and-set).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Versioned {
    /// Incremented by every successful write.
    pub version: u64,
    /// The bytes.
    pub value: Vec<u8>,
}

/// One conditional write: set `key` to `value` if its version is still `expected` (0 = absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasWrite {
    /// The key.
    pub key: String,
    /// The version the writer read (0 when the key was absent).
    pub expected: u64,
    /// The new value.
    pub value: Vec<u8>,
}

/// A store of versioned values with an atomic multi-key compare-and-set.
#[async_trait::async_trait]
pub trait VersionedStore: Send + Sync + std::fmt::Debug {
    /// The current value and version of `key`.
    ///
    /// # Errors
    /// A backend error.
    async fn get(&self, key: &str) -> StateResult<Option<Versioned>>;

    /// Applies every write if every expectation holds, else none: `Ok(false)` on a conflict.
    ///
    /// # Errors
    /// A backend error.
    async fn compare_and_set(&self, writes: &[CasWrite]) -> StateResult<bool>;
}

/// Reads `key`, computes `update(old)`, and writes it if nobody wrote in between; retries per `retry`.
///
/// # Errors
/// [`StateError::ConcurrencyConflict`] when every attempt collided; a backend error.
pub async fn optimistic_update<S, F>(
    store: &S,
    key: &str,
    retry: &RetryConfig,
    mut update: F,
) -> StateResult<Versioned>
where
    S: VersionedStore + ?Sized,
    F: FnMut(Option<&[u8]>) -> Vec<u8>,
{
    let keys = [key];
    let mut written = optimistic_update_many(store, &keys, retry, |old| {
        vec![update(old[0].as_ref().map(|v| v.value.as_slice()))]
    })
    .await?;
    written.pop().ok_or_else(|| StateError::KeyNotFound {
        key: key.to_owned(),
    })
}

/// The batch form: reads every key, computes all new values from all old ones, and writes them together
/// or not at all; retries per `retry`. `update` gets the old values in the order of `keys` and returns
/// the new ones in the same order.
///
/// # Errors
/// [`StateError::ConcurrencyConflict`] when every attempt collided; [`StateError::InvalidInput`] when
/// `update` returns the wrong number of values or `keys` is empty; a backend error.
pub async fn optimistic_update_many<S, F>(
    store: &S,
    keys: &[&str],
    retry: &RetryConfig,
    mut update: F,
) -> StateResult<Vec<Versioned>>
where
    S: VersionedStore + ?Sized,
    F: FnMut(&[Option<Versioned>]) -> Vec<Vec<u8>>,
{
    if keys.is_empty() {
        return Err(StateError::invalid("keys", "at least one key is needed"));
    }
    // Called once per attempt, never across an await.
    let update = std::sync::Mutex::new(&mut update);
    let retried = retry_loop(retry, Budget::default(), |attempt| {
        let update = &update;
        async move {
            let mut old = Vec::with_capacity(keys.len());
            for key in keys {
                old.push(store.get(key).await?);
            }
            let new = (update.lock().unwrap_or_else(|p| p.into_inner()))(&old);
            if new.len() != keys.len() {
                return Err(StateError::invalid(
                    "update",
                    format!("returned {} values for {} keys", new.len(), keys.len()),
                ));
            }
            let writes: Vec<CasWrite> = keys
                .iter()
                .zip(&old)
                .zip(new)
                .map(|((key, old), value)| CasWrite {
                    key: (*key).to_owned(),
                    expected: old.as_ref().map_or(0, |v| v.version),
                    value,
                })
                .collect();
            if store.compare_and_set(&writes).await? {
                return Ok(Some(
                    writes
                        .into_iter()
                        .map(|w| Versioned {
                            version: w.expected + 1,
                            value: w.value,
                        })
                        .collect(),
                ));
            }
            tracing::trace!(attempt, keys = ?keys, "optimistic update conflicted");
            Ok(None)
        }
    })
    .await?;
    match retried {
        Retried::Done(written) => Ok(written),
        Retried::GaveUp {
            attempts,
            last_error,
        } => Err(
            last_error.unwrap_or_else(|| StateError::ConcurrencyConflict {
                key: keys.join(","),
                attempts,
            }),
        ),
        Retried::Cancelled => Err(StateError::Cancelled {
            operation: "optimistic update",
            resource: keys.join(","),
        }),
    }
}

/// A [`VersionedStore`] in process memory.
#[derive(Debug, Default)]
pub struct InMemoryVersionedStore {
    values: Mutex<HashMap<String, Versioned>>,
}

#[async_trait::async_trait]
impl VersionedStore for InMemoryVersionedStore {
    async fn get(&self, key: &str) -> StateResult<Option<Versioned>> {
        let values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        Ok(values.get(key).cloned())
    }

    async fn compare_and_set(&self, writes: &[CasWrite]) -> StateResult<bool> {
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        let holds = writes
            .iter()
            .all(|w| values.get(&w.key).map_or(0, |v| v.version) == w.expected);
        if holds {
            for w in writes {
                values.insert(
                    w.key.clone(),
                    Versioned {
                        version: w.expected + 1,
                        value: w.value.clone(),
                    },
                );
            }
        }
        Ok(holds)
    }
}

#[cfg(feature = "redis")]
pub use self::redis_store::RedisVersionedStore;

#[cfg(feature = "redis")]
mod redis_store {
    use std::sync::LazyLock;
    use std::time::Duration;

    use redis::Script;
    use redis::aio::ConnectionManager;

    use super::{CasWrite, Versioned, VersionedStore};
    use crate::StateResult;
    use crate::backends::redis::{connect_manager, invoke, parse_redis_url, query};

    static CAS: LazyLock<Script> =
        LazyLock::new(|| Script::new(include_str!("scripts/versioned_cas.lua")));
    const TIMEOUT: Duration = Duration::from_secs(2);

    /// A [`VersionedStore`] in Redis: a hash `state:versioned:{key}` = `{version, value}` per key; the
    /// multi-key compare-and-set is one Lua script (single node; keys must share a slot on a cluster).
    #[derive(Clone)]
    pub struct RedisVersionedStore {
        conn: ConnectionManager,
    }

    impl std::fmt::Debug for RedisVersionedStore {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("RedisVersionedStore")
        }
    }

    fn key_of(key: &str) -> String {
        format!("state:versioned:{key}")
    }

    impl RedisVersionedStore {
        /// Connects to Redis at `url`.
        ///
        /// # Errors
        /// [`StateError::InvalidInput`](crate::StateError::InvalidInput) for a malformed URL; a backend error.
        pub async fn new(url: &str) -> StateResult<Self> {
            let target = parse_redis_url(url)?;
            Ok(RedisVersionedStore {
                conn: connect_manager(&target, TIMEOUT).await?,
            })
        }
    }

    #[async_trait::async_trait]
    impl VersionedStore for RedisVersionedStore {
        async fn get(&self, key: &str) -> StateResult<Option<Versioned>> {
            let mut conn = self.conn.clone();
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(key_of(key)).arg("version").arg("value");
            let read: (Option<u64>, Option<Vec<u8>>) =
                query(&mut conn, TIMEOUT, "redis", "read", key, &cmd).await?;
            Ok(read
                .0
                .zip(read.1)
                .map(|(version, value)| Versioned { version, value }))
        }

        async fn compare_and_set(&self, writes: &[CasWrite]) -> StateResult<bool> {
            let mut conn = self.conn.clone();
            let mut invocation = CAS.prepare_invoke();
            for w in writes {
                invocation
                    .key(key_of(&w.key))
                    .arg(w.expected)
                    .arg(w.value.as_slice());
            }
            let label = writes.first().map_or("", |w| w.key.as_str());
            let done: i64 = invoke(
                &mut conn,
                TIMEOUT,
                "redis",
                "compare-and-set",
                label,
                &invocation,
            )
            .await?;
            Ok(done == 1)
        }
    }
}

#[cfg(feature = "postgres")]
pub use self::postgres_store::PostgresVersionedStore;

#[cfg(feature = "postgres")]
mod postgres_store {
    use sqlx::PgPool;

    use super::{CasWrite, Versioned, VersionedStore};
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
}

#[cfg(feature = "etcd")]
pub use self::etcd_store::EtcdVersionedStore;

#[cfg(feature = "etcd")]
mod etcd_store {
    use std::time::Duration;

    use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};

    use super::{CasWrite, Versioned, VersionedStore};
    use crate::backends::etcd::etcd_call;
    use crate::{StateError, StateResult};

    const TIMEOUT: Duration = Duration::from_secs(2);

    /// A [`VersionedStore`] in etcd: one key `{prefix}versioned/{key}` per value, whose version is etcd's
    /// own per-key `version` (1 at creation, +1 per write); the multi-key compare-and-set is one
    /// transaction comparing every key's version (create revision 0 for "absent") before any put.
    #[derive(Clone)]
    pub struct EtcdVersionedStore {
        client: Client,
        prefix: String,
    }

    impl std::fmt::Debug for EtcdVersionedStore {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("EtcdVersionedStore")
                .field("prefix", &self.prefix)
                .finish_non_exhaustive()
        }
    }

    impl EtcdVersionedStore {
        /// Values under `prefix` (e.g. the lock backend's, `state/`) through `client`.
        pub fn new(client: Client, prefix: &str) -> Self {
            EtcdVersionedStore {
                client,
                prefix: prefix.to_owned(),
            }
        }

        fn key_of(&self, key: &str) -> String {
            format!("{}versioned/{key}", self.prefix)
        }
    }

    #[async_trait::async_trait]
    impl VersionedStore for EtcdVersionedStore {
        async fn get(&self, key: &str) -> StateResult<Option<Versioned>> {
            let stored_key = self.key_of(key);
            let response = etcd_call(&self.client, TIMEOUT, "read", key, |mut client| {
                let stored_key = stored_key.clone();
                async move { client.get(stored_key, None).await }
            })
            .await?;
            Ok(response.kvs().first().map(|kv| Versioned {
                version: u64::try_from(kv.version()).unwrap_or(0),
                value: kv.value().to_vec(),
            }))
        }

        async fn compare_and_set(&self, writes: &[CasWrite]) -> StateResult<bool> {
            let label = writes.first().map_or("", |w| w.key.as_str());
            let mut compares = Vec::with_capacity(writes.len());
            let mut puts = Vec::with_capacity(writes.len());
            for write in writes {
                let key = self.key_of(&write.key);
                let expected = i64::try_from(write.expected).map_err(|_| {
                    StateError::invalid(
                        "expected version",
                        format!("{} of `{}` is out of range", write.expected, write.key),
                    )
                })?;
                compares.push(match expected {
                    0 => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                    _ => Compare::version(key.clone(), CompareOp::Equal, expected),
                });
                puts.push(TxnOp::put(key, write.value.clone(), None));
            }
            let txn = Txn::new().when(compares).and_then(puts);
            let response = etcd_call(
                &self.client,
                TIMEOUT,
                "compare-and-set",
                label,
                |mut client| {
                    let txn = txn.clone();
                    async move { client.txn(txn).await }
                },
            )
            .await?;
            Ok(response.succeeded())
        }
    }
}
