//! One URL, one backend set: [`connect`] builds the lock service, the fenced store and the task store an
//! application coordinates through from a single URL, on one backend, sharing its connections — so every
//! backend works wherever a URL is accepted (the processor, its demo, the examples).
//!
//! | URL | lock | fenced store and task store |
//! |---|---|---|
//! | `memory` | [`InMemoryDistributedLock`] (one process) | in process |
//! | `redis://[user:password@]host:port[/db]`, `rediss://…[?ca=ca.pem[&cert=c.pem&key=k.pem]]` (TLS) | [`RedisDistributedLock`] | the same server, the same connection |
//! | `redlock://[user:password@]h1:p1,h2:p2,h3:p3[/db]`, `redlocks://…` (TLS) | [`RedlockDistributedLock`] over every host | the **first** host (see below) |
//! | `postgres://…`, `postgresql://…` | `PostgresDistributedLock` (lease mode) | the same database, the same pool |
//! | `etcd://[user:password@]h1:p1,h2:p2[/prefix]`, `etcds://…?ca=ca.pem[&cert=c.pem&key=k.pem]` (TLS) | `EtcdDistributedLock` | the same cluster, the same client |
//!
//! Redlock has no replicated record store: fenced records (checkpoint records) and tasks live on the
//! first host. If it is down, they are unavailable (errors, never wrong answers) until it returns; the
//! locks and the roster (group membership, [`RedlockRosterStore`](crate::recipes::roster::RedlockRosterStore))
//! keep working on the quorum.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> state::StateResult<()> {
//! let backend = state::connect("memory").await?;
//! let guard = backend.lock.acquire("orders:3", std::time::Duration::from_secs(5)).await?;
//! backend.fenced.write("orders:3", guard.fencing_token(), b"offset 1200").await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;

use crate::recipes::fenced::{FencedStore, InMemoryFencedStore};
use crate::recipes::roster::{InMemoryRosterStore, RosterStore};
use crate::recipes::tasks::{InMemoryTaskStore, TaskStore};
use crate::{DistributedLock, InMemoryDistributedLock, RetryConfig, StateError, StateResult};

#[cfg(feature = "redis")]
use crate::{RedisDistributedLock, RedlockDistributedLock};

/// The coordination structures of one backend.
#[derive(Clone)]
#[non_exhaustive]
pub struct Backend {
    /// The lock service.
    pub lock: Arc<dyn DistributedLock>,
    /// Fenced records (a write carrying a lower token than one already written is refused).
    pub fenced: Arc<dyn FencedStore>,
    /// The distributed task queue's store.
    pub tasks: Arc<dyn TaskStore>,
    /// Group membership (rosters of leased members, listed in one request).
    pub roster: Arc<dyn RosterStore>,
    /// The backend and its servers, credentials redacted (for logs).
    pub description: String,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

/// The schemes [`connect`] accepts, for error messages.
const SCHEMES: &str = "memory, redis://, rediss://, redlock://h1:p1,h2:p2,h3:p3, redlocks://…, postgres://, etcd://h1:p1,h2:p2, etcds://…?ca=…";

/// Connects the backend named by `url` (see the module docs for the forms).
///
/// # Errors
/// [`StateError::InvalidInput`] (`what` = `lock url`) for an unknown scheme, a malformed URL or a scheme
/// whose cargo feature is off; the backend's error when it cannot be reached.
///
/// # Cancel safety
/// Cancel safe: nothing is held until it returns.
pub async fn connect(url: &str) -> StateResult<Backend> {
    connect_with_retry(url, RetryConfig::default()).await
}

/// As [`connect`], with `retry` as the lock's [`acquire`](DistributedLock::acquire) policy.
///
/// # Errors
/// As [`connect`].
///
/// # Cancel safety
/// Cancel safe.
pub async fn connect_with_retry(url: &str, retry: RetryConfig) -> StateResult<Backend> {
    let scheme = url.split("://").next().unwrap_or_default();
    match scheme {
        "memory" if url == "memory" || url == "memory://" => Ok(memory(retry)),
        "redis" | "rediss" | "unix" => redis(url, retry).await,
        "redlock" | "redlocks" => redlock(url, retry).await,
        "postgres" | "postgresql" => postgres(url, retry).await,
        "etcd" | "etcds" => etcd(url, retry).await,
        _ => Err(StateError::invalid(
            "lock url",
            format!(
                "unknown scheme in `{}`: use one of {SCHEMES}",
                crate::redact::redact_url(url)
            ),
        )),
    }
}

fn memory(retry: RetryConfig) -> Backend {
    Backend {
        lock: Arc::new(InMemoryDistributedLock::new().with_retry(retry)),
        fenced: Arc::new(InMemoryFencedStore::default()),
        tasks: Arc::new(InMemoryTaskStore::default()),
        roster: Arc::new(InMemoryRosterStore::default()),
        description: "memory (one process)".to_owned(),
    }
}

#[cfg(not(feature = "redis"))]
async fn redis(_url: &str, _retry: RetryConfig) -> StateResult<Backend> {
    Err(feature_off("redis"))
}

#[cfg(not(feature = "redis"))]
async fn redlock(_url: &str, _retry: RetryConfig) -> StateResult<Backend> {
    Err(feature_off("redis"))
}

#[cfg(not(feature = "postgres"))]
async fn postgres(_url: &str, _retry: RetryConfig) -> StateResult<Backend> {
    Err(feature_off("postgres"))
}

#[cfg(not(feature = "etcd"))]
async fn etcd(_url: &str, _retry: RetryConfig) -> StateResult<Backend> {
    Err(feature_off("etcd"))
}

/// The lock, fenced values and tasks all in the one etcd cluster, over one client, under the URL's
/// prefix.
#[cfg(feature = "etcd")]
async fn etcd(url: &str, retry: RetryConfig) -> StateResult<Backend> {
    use crate::backends::etcd::{connect_client, parse_etcd_url};
    use crate::recipes::fenced::EtcdFencedStore;
    use crate::recipes::tasks::EtcdTaskStore;

    let target = parse_etcd_url(url)?;
    let client = connect_client(&target, std::time::Duration::from_secs(2)).await?;
    let lock = crate::EtcdDistributedLock::from_client(client.clone(), &target);
    Ok(Backend {
        description: format!("etcd {}", target.redacted()),
        fenced: Arc::new(EtcdFencedStore::new(client.clone(), &target.prefix)),
        roster: Arc::new(crate::recipes::roster::EtcdRosterStore::new(
            client.clone(),
            &target.prefix,
        )),
        tasks: Arc::new(EtcdTaskStore::new(client, &target.prefix)),
        lock: Arc::new(lock.with_retry(retry)),
    })
}

#[cfg(any(
    not(feature = "redis"),
    not(feature = "postgres"),
    not(feature = "etcd")
))]
fn feature_off(feature: &str) -> StateError {
    StateError::invalid(
        "lock url",
        format!("this build of `state` has no `{feature}` feature: enable it in Cargo.toml"),
    )
}

#[cfg(feature = "redis")]
async fn redis(url: &str, retry: RetryConfig) -> StateResult<Backend> {
    use crate::recipes::fenced::RedisFencedStore;
    use crate::recipes::tasks::RedisTaskStore;

    let lock = RedisDistributedLock::new(url).await?;
    let conn = lock.connection_manager().clone();
    Ok(Backend {
        description: format!("redis {}", crate::redact::redact_url(url)),
        fenced: Arc::new(RedisFencedStore::from_connection_manager(conn.clone())),
        roster: Arc::new(
            crate::recipes::roster::RedisRosterStore::from_connection_manager(conn.clone()),
        ),
        tasks: Arc::new(RedisTaskStore::from_connection_manager(conn)),
        lock: Arc::new(lock.with_retry(retry)),
    })
}

/// The node URLs of `redlock://[userinfo@]h1:p1,h2:p2[/db]` (`redlocks://` for TLS).
#[cfg(feature = "redis")]
fn redlock_nodes(url: &str) -> StateResult<Vec<String>> {
    let invalid = |reason: String| StateError::invalid("lock url", reason);
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| invalid("a redlock URL is redlock://h1:p1,h2:p2,h3:p3".to_owned()))?;
    let node_scheme = if scheme == "redlocks" {
        "rediss"
    } else {
        "redis"
    };
    let (userinfo, rest) = match rest.rsplit_once('@') {
        Some((userinfo, rest)) => (Some(userinfo), rest),
        None => (None, rest),
    };
    // The query (`?ca=/path/…` for TLS) may hold slashes: split it off before the path.
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest, None),
    };
    let (hosts, path) = match rest.split_once('/') {
        Some((hosts, path)) => (hosts, Some(path)),
        None => (rest, None),
    };
    let nodes: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|host| !host.is_empty())
        .map(|host| {
            let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
            let path = path.map(|p| format!("/{p}")).unwrap_or_default();
            let query = query.map(|q| format!("?{q}")).unwrap_or_default();
            format!("{node_scheme}://{userinfo}{host}{path}{query}")
        })
        .collect();
    if nodes.is_empty() {
        return Err(invalid(
            "a redlock URL names its nodes: redlock://h1:p1,h2:p2,h3:p3".to_owned(),
        ));
    }
    Ok(nodes)
}

#[cfg(feature = "redis")]
async fn redlock(url: &str, retry: RetryConfig) -> StateResult<Backend> {
    use crate::recipes::fenced::RedisFencedStore;
    use crate::recipes::tasks::RedisTaskStore;

    let nodes = redlock_nodes(url)?;
    let node_refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let lock = RedlockDistributedLock::new(&node_refs).await?;
    // The records live on the first node (see the module docs), on one connection of their own.
    let first = crate::backends::redis::parse_redis_url(&nodes[0])?;
    let conn = crate::backends::redis::connect_manager(
        &first,
        crate::backends::redis::DEFAULT_OPERATION_TIMEOUT,
    )
    .await?;
    let shown: Vec<String> = nodes.iter().map(|n| crate::redact::redact_url(n)).collect();
    Ok(Backend {
        description: format!(
            "redlock over {} nodes [{}], membership on a majority, records on the first",
            nodes.len(),
            shown.join(", ")
        ),
        roster: Arc::new(lock.roster_store()),
        lock: Arc::new(lock.with_retry(retry)),
        fenced: Arc::new(RedisFencedStore::from_connection_manager(conn.clone())),
        tasks: Arc::new(RedisTaskStore::from_connection_manager(conn)),
    })
}

#[cfg(feature = "postgres")]
async fn postgres(url: &str, retry: RetryConfig) -> StateResult<Backend> {
    use crate::PostgresDistributedLock;
    use crate::recipes::fenced::PostgresFencedStore;
    use crate::recipes::tasks::PostgresTaskStore;

    let lock = PostgresDistributedLock::new(url).await?;
    Ok(Backend {
        description: format!("postgres {}", crate::redact::redact_url(url)),
        fenced: Arc::new(PostgresFencedStore::new(lock.pool().clone()).await?),
        tasks: Arc::new(PostgresTaskStore::new(lock.pool().clone()).await?),
        roster: Arc::new(
            crate::recipes::roster::PostgresRosterStore::new(lock.pool().clone()).await?,
        ),
        lock: Arc::new(lock.with_retry(retry)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_schemes_are_one_clear_error_without_secrets() {
        for url in [
            "zookeeper://u:hunter2@zk:2181",
            "",
            "memoryx",
            "consul://h:8500",
        ] {
            match connect(url).await {
                Err(StateError::InvalidInput { what, reason }) => {
                    assert_eq!(what, "lock url");
                    assert!(reason.contains("redis://"), "{reason}");
                    assert!(!reason.contains("hunter2"), "{reason}");
                }
                other => panic!("{url}: {other:?}"),
            }
        }
        assert!(connect("memory").await.is_ok());
    }

    /// An etcd that refuses connections, or accepts them and never answers (a hung server: the client
    /// would connect lazily), is an error at start, as for every other backend — not at the first lock.
    #[cfg(feature = "etcd")]
    #[tokio::test]
    async fn an_unreachable_or_silent_etcd_is_an_error_at_connect() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let silent_url = format!("etcd://root:hunter2@{}", silent.local_addr().unwrap());
        for url in ["etcd://root:hunter2@127.0.0.1:1", silent_url.as_str()] {
            match connect(url).await {
                Err(err) => assert!(!err.to_string().contains("hunter2"), "{err}"),
                Ok(backend) => panic!("{url}: connected to nothing: {backend:?}"),
            }
        }
    }

    #[cfg(feature = "redis")]
    #[test]
    fn redlock_urls_name_every_node() {
        assert_eq!(
            redlock_nodes("redlock://:pw@h1:6379,h2:6380, h3:6381/2").unwrap(),
            vec![
                "redis://:pw@h1:6379/2",
                "redis://:pw@h2:6380/2",
                "redis://:pw@h3:6381/2"
            ]
        );
        assert_eq!(
            redlock_nodes("redlocks://h1:1,h2:2").unwrap(),
            vec!["rediss://h1:1", "rediss://h2:2"]
        );
        // The CA file's path holds slashes: it stays in each node's query, not in its path.
        assert_eq!(
            redlock_nodes("redlocks://h1:1,h2:2?ca=/etc/redis/ca.pem").unwrap(),
            vec![
                "rediss://h1:1?ca=/etc/redis/ca.pem",
                "rediss://h2:2?ca=/etc/redis/ca.pem"
            ]
        );
        assert!(redlock_nodes("redlock://").is_err());
    }
}
