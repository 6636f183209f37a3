//! Shared set-up of the examples: the lock service and stores named by `--lock-url`.
//!
//! Run an example with `cargo run -p examples --example NAME [-- --lock-url URL]`, where `URL` is
//! `memory` (the default, in-process), `redis://host:port` or `postgres://user@host/db`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use state::recipes::fenced::{
    FencedStore, InMemoryFencedStore, PostgresFencedStore, RedisFencedStore,
};
use state::recipes::tasks::{InMemoryTaskStore, PostgresTaskStore, RedisTaskStore, TaskStore};
use state::{
    DistributedLock, InMemoryDistributedLock, PostgresDistributedLock, RedisDistributedLock,
    RetryConfig,
};

/// The lock service and the stores of one backend.
pub struct Backend {
    /// The lock service.
    pub lock: Arc<dyn DistributedLock>,
    /// Fenced writes on the same backend.
    pub fenced: Arc<dyn FencedStore>,
    /// Tasks on the same backend.
    pub tasks: Arc<dyn TaskStore>,
}

/// A retry policy for examples that contend on purpose.
pub fn patient() -> RetryConfig {
    RetryConfig {
        max_attempts: 5_000,
        initial_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(20),
        backoff_multiplier: 1.5,
    }
}

impl Backend {
    /// `memory`, `redis://…` or `postgres://…`.
    pub async fn from_url(url: &str) -> anyhow::Result<Backend> {
        if url == "memory" {
            return Ok(Backend {
                lock: Arc::new(InMemoryDistributedLock::new().with_retry(patient())),
                fenced: Arc::new(InMemoryFencedStore::default()),
                tasks: Arc::new(InMemoryTaskStore::default()),
            });
        }
        if url.starts_with("redis") {
            let lock = RedisDistributedLock::new(url)
                .await
                .context("connecting to Redis")?;
            return Ok(Backend {
                lock: Arc::new(lock.with_retry(patient())),
                fenced: Arc::new(RedisFencedStore::new(url).await?),
                tasks: Arc::new(RedisTaskStore::new(url).await?),
            });
        }
        if url.starts_with("postgres") {
            let lock = PostgresDistributedLock::new(url)
                .await
                .context("connecting to PostgreSQL")?;
            let pool = lock.pool().clone();
            return Ok(Backend {
                lock: Arc::new(lock.with_retry(patient())),
                fenced: Arc::new(PostgresFencedStore::new(pool.clone()).await?),
                tasks: Arc::new(PostgresTaskStore::new(pool).await?),
            });
        }
        bail!("--lock-url must be memory, redis://… or postgres://…")
    }
}

/// Installs a log subscriber driven by `RUST_LOG`.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}
