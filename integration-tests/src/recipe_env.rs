//! One environment per backend for the recipe tests: a lock service plus the matching stores, over the
//! in-process backend, a real `redis-server`, a real PostgreSQL, or a real etcd.

use std::sync::Arc;

use state::recipes::fenced::{
    FencedStore, InMemoryFencedStore, PostgresFencedStore, RedisFencedStore,
};
use state::recipes::roster::{
    InMemoryRosterStore, PostgresRosterStore, RedisRosterStore, RosterStore,
};
use state::recipes::tasks::{InMemoryTaskStore, PostgresTaskStore, RedisTaskStore, TaskStore};
use state::recipes::versioned::{
    InMemoryVersionedStore, PostgresVersionedStore, RedisVersionedStore, VersionedStore,
};
use state::{
    DistributedLock, InMemoryDistributedLock, PostgresDistributedLock, RedisDistributedLock,
    RetryConfig,
};

use crate::{EtcdCluster, PostgresServer, RedisServer};

/// A lock service and the stores of one backend; the servers live as long as the environment.
pub struct RecipeEnv {
    /// The backend's name, for messages.
    pub name: &'static str,
    /// The lock service.
    pub lock: Arc<dyn DistributedLock>,
    /// Fenced writes on the same backend.
    pub fenced: Arc<dyn FencedStore>,
    /// Versioned values on the same backend.
    pub versioned: Arc<dyn VersionedStore>,
    /// Tasks on the same backend.
    pub tasks: Arc<dyn TaskStore>,
    /// Rosters (group membership) on the same backend.
    pub roster: Arc<dyn RosterStore>,
    /// The Redis server, when the backend is Redis.
    pub redis: Option<RedisServer>,
    /// The PostgreSQL server, when the backend is PostgreSQL.
    pub postgres: Option<PostgresServer>,
    /// The etcd member, when the backend is etcd.
    pub etcd: Option<EtcdCluster>,
}

/// Waits patiently: recipes under test contend a lot.
pub fn patient() -> RetryConfig {
    RetryConfig {
        max_attempts: 2_000,
        initial_delay: std::time::Duration::from_millis(1),
        max_delay: std::time::Duration::from_millis(20),
        backoff_multiplier: 1.5,
    }
}

impl RecipeEnv {
    /// The in-process backend and stores.
    pub async fn memory() -> Self {
        crate::init_tracing();
        RecipeEnv {
            name: "memory",
            lock: Arc::new(InMemoryDistributedLock::new().with_retry(patient())),
            fenced: Arc::new(InMemoryFencedStore::default()),
            versioned: Arc::new(InMemoryVersionedStore::default()),
            tasks: Arc::new(InMemoryTaskStore::default()),
            roster: Arc::new(InMemoryRosterStore::default()),
            redis: None,
            postgres: None,
            etcd: None,
        }
    }

    /// A fresh etcd member with the etcd backend and stores through `state::connect`, and an
    /// [`EtcdVersionedStore`](state::recipes::versioned::EtcdVersionedStore) on a client of its own.
    pub async fn etcd() -> Self {
        crate::init_tracing();
        let cluster = EtcdCluster::single();
        let url = cluster.url("recipes");
        let backend = state::connect_with_retry(&url, patient())
            .await
            .expect("etcd backend");
        let client = state::EtcdDistributedLock::new(&url)
            .await
            .expect("etcd client")
            .client()
            .clone();
        RecipeEnv {
            name: "etcd",
            lock: backend.lock,
            fenced: backend.fenced,
            versioned: Arc::new(state::recipes::versioned::EtcdVersionedStore::new(
                client, "recipes/",
            )),
            tasks: backend.tasks,
            roster: backend.roster,
            redis: None,
            postgres: None,
            etcd: Some(cluster),
        }
    }

    /// A fresh `redis-server` with the Redis backend and stores.
    pub async fn redis() -> Self {
        crate::init_tracing();
        let server = RedisServer::start_new();
        let url = server.url();
        RecipeEnv {
            name: "redis",
            lock: Arc::new(
                RedisDistributedLock::new(&url)
                    .await
                    .expect("redis lock")
                    .with_retry(patient()),
            ),
            fenced: Arc::new(RedisFencedStore::new(&url).await.expect("redis fenced")),
            versioned: Arc::new(
                RedisVersionedStore::new(&url)
                    .await
                    .expect("redis versioned"),
            ),
            tasks: Arc::new(RedisTaskStore::new(&url).await.expect("redis tasks")),
            roster: Arc::new(RedisRosterStore::new(&url).await.expect("redis roster")),
            redis: Some(server),
            postgres: None,
            etcd: None,
        }
    }

    /// A fresh PostgreSQL with the lease-mode backend and stores.
    pub async fn postgres() -> Self {
        crate::init_tracing();
        let server = PostgresServer::start_new();
        let lock = PostgresDistributedLock::builder(&server.url())
            .with_retry(patient())
            .with_pool_size(32)
            .build()
            .await
            .expect("postgres lock");
        let pool = lock.pool().clone();
        RecipeEnv {
            name: "postgres",
            fenced: Arc::new(
                PostgresFencedStore::new(pool.clone())
                    .await
                    .expect("pg fenced"),
            ),
            versioned: Arc::new(
                PostgresVersionedStore::new(pool.clone())
                    .await
                    .expect("pg versioned"),
            ),
            roster: Arc::new(
                PostgresRosterStore::new(pool.clone())
                    .await
                    .expect("pg roster"),
            ),
            tasks: Arc::new(PostgresTaskStore::new(pool).await.expect("pg tasks")),
            lock: Arc::new(lock),
            redis: None,
            postgres: Some(server),
            etcd: None,
        }
    }
}
