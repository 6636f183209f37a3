//! The Redis [`FencedStore`](crate::recipes::fenced::FencedStore): storage that rejects stale fencing tokens (recipe [`fenced`](crate::recipes::fenced)).

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;

use crate::StateResult;
use crate::backends::redis::{connect_manager, invoke, parse_redis_url, query};
use crate::stores::fenced::{FencedStore, FencedValue, stale};

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
