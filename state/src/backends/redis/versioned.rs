//! The Redis [`VersionedStore`](crate::recipes::versioned::VersionedStore): optimistic versioned updates (recipe [`versioned`](crate::recipes::versioned)).

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;

use crate::StateResult;
use crate::backends::redis::{connect_manager, invoke, parse_redis_url, query};
use crate::stores::versioned::{CasWrite, Versioned, VersionedStore};

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
