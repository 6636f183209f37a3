//! Adapters that plug the backends and fixtures into the `state` conformance suite.

use std::sync::Arc;

use redis::AsyncCommands;
use state::conformance::{ConformanceBackend, ServerControl, UnsyncCounter};
use state::{
    DistributedLock, InMemoryDistributedLock, RedisDistributedLock, RedlockDistributedLock,
    RetryConfig,
};

use state::{PostgresDistributedLock, PostgresLockMode};

use crate::{EtcdCluster, FaultProxy, PostgresServer, RedisCluster, RedisServer};

/// The in-process backend: every handle is a clone of one instance.
#[derive(Debug, Default, Clone)]
pub struct MemoryBackend(pub InMemoryDistributedLock);

#[async_trait::async_trait]
impl ConformanceBackend for MemoryBackend {
    async fn lock(&self, retry: RetryConfig) -> Arc<dyn DistributedLock> {
        Arc::new(self.0.clone().with_retry(retry))
    }
}

/// The single-node Redis backend: every handle is a new client (own connection) to one server.
#[derive(Debug, Clone)]
pub struct RedisBackend {
    /// The server URL.
    pub url: String,
}

#[async_trait::async_trait]
impl ConformanceBackend for RedisBackend {
    async fn lock(&self, retry: RetryConfig) -> Arc<dyn DistributedLock> {
        let lock = RedisDistributedLock::new(&self.url)
            .await
            .unwrap_or_else(|err| panic!("connect to {}: {err}", self.url));
        Arc::new(lock.with_retry(retry))
    }
}

/// An unsynchronised counter stored in Redis: a plain `GET` then `SET`, a network round trip apart.
pub struct RedisCounter {
    conn: redis::aio::MultiplexedConnection,
    key: String,
}

impl RedisCounter {
    /// A counter under a random key on the server at `url`.
    pub async fn connect(url: &str) -> Self {
        let client = redis::Client::open(url).expect("valid redis url");
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect the counter");
        RedisCounter {
            conn,
            key: format!("test:counter:{:016x}", rand_suffix()),
        }
    }
}

fn rand_suffix() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}

#[async_trait::async_trait]
impl UnsyncCounter for RedisCounter {
    async fn reset(&self) {
        let mut conn = self.conn.clone();
        let _: () = conn.set(&self.key, 0u64).await.expect("SET counter");
    }
    async fn get(&self) -> u64 {
        let mut conn = self.conn.clone();
        let value: Option<u64> = conn.get(&self.key).await.expect("GET counter");
        value.unwrap_or(0)
    }
    async fn set(&self, value: u64) {
        let mut conn = self.conn.clone();
        let _: () = conn.set(&self.key, value).await.expect("SET counter");
    }
}

/// Kills and restarts a [`RedisServer`] for the dead-server check.
pub struct RedisControl<'a>(pub &'a RedisServer);

#[async_trait::async_trait]
impl ServerControl for RedisControl<'_> {
    async fn stop(&self) {
        self.0.stop();
    }
    async fn start(&self) {
        self.0.start();
    }
}

/// A [`RedisCounter`] on a `redis-server` of its own, which lives as long as the counter.
pub struct CounterServer {
    counter: RedisCounter,
    _server: RedisServer,
}

impl CounterServer {
    /// Starts the server and connects the counter.
    pub async fn start() -> Self {
        let server = RedisServer::start_new();
        CounterServer {
            counter: RedisCounter::connect(&server.url()).await,
            _server: server,
        }
    }
}

#[async_trait::async_trait]
impl UnsyncCounter for CounterServer {
    async fn reset(&self) {
        self.counter.reset().await
    }
    async fn get(&self) -> u64 {
        self.counter.get().await
    }
    async fn set(&self, value: u64) {
        self.counter.set(value).await
    }
}

/// A backend adapter bundled with the `redis-server` it talks to, so the server dies with the test.
pub struct RedisFixture {
    /// The adapter.
    pub backend: RedisBackend,
    /// The server.
    pub server: RedisServer,
}

impl RedisFixture {
    /// Starts a server for one test.
    pub fn start() -> Self {
        crate::init_tracing();
        let server = RedisServer::start_new();
        RedisFixture {
            backend: RedisBackend { url: server.url() },
            server,
        }
    }
}

#[async_trait::async_trait]
impl ConformanceBackend for RedisFixture {
    async fn lock(&self, retry: RetryConfig) -> Arc<dyn DistributedLock> {
        self.backend.lock(retry).await
    }
}

/// A Redlock backend over a [`RedisCluster`] of its own; every handle is a new client to all nodes.
pub struct RedlockFixture {
    /// The nodes.
    pub cluster: RedisCluster,
}

impl RedlockFixture {
    /// Starts `nodes` servers for one test.
    pub fn start(nodes: usize) -> Self {
        crate::init_tracing();
        RedlockFixture {
            cluster: RedisCluster::new(nodes),
        }
    }

    /// A new client over all nodes.
    pub async fn client(&self) -> RedlockDistributedLock {
        let urls = self.cluster.urls();
        let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
        RedlockDistributedLock::new(&urls)
            .await
            .unwrap_or_else(|err| panic!("connect redlock: {err}"))
    }
}

#[async_trait::async_trait]
impl ConformanceBackend for RedlockFixture {
    async fn lock(&self, retry: RetryConfig) -> Arc<dyn DistributedLock> {
        Arc::new(self.client().await.with_retry(retry))
    }
}

/// Stops and restarts every node of a cluster: a Redlock "server" is dead when its majority is.
pub struct ClusterControl<'a>(pub &'a RedisCluster);

#[async_trait::async_trait]
impl ServerControl for ClusterControl<'_> {
    async fn stop(&self) {
        for i in 0..self.0.len() {
            self.0.node(i).stop();
        }
    }
    async fn start(&self) {
        for i in 0..self.0.len() {
            self.0.node(i).start();
        }
    }
}

/// A PostgreSQL backend in one mode over a cluster of its own; every handle is a new pool.
pub struct PostgresFixture {
    /// The cluster.
    pub server: PostgresServer,
    /// The mode every handle uses.
    pub mode: PostgresLockMode,
}

impl PostgresFixture {
    /// Starts a cluster for one test.
    pub fn start(mode: PostgresLockMode) -> Self {
        crate::init_tracing();
        PostgresFixture {
            server: PostgresServer::start_new(),
            mode,
        }
    }

    /// A new backend handle (own pool) with `retry`.
    pub async fn client(&self, retry: RetryConfig) -> PostgresDistributedLock {
        PostgresDistributedLock::builder(&self.server.url())
            .with_mode(self.mode)
            .with_retry(retry)
            .with_pool_size(4)
            .build()
            .await
            .unwrap_or_else(|err| panic!("connect postgres: {err}"))
    }
}

#[async_trait::async_trait]
impl ConformanceBackend for PostgresFixture {
    async fn lock(&self, retry: RetryConfig) -> Arc<dyn DistributedLock> {
        Arc::new(self.client(retry).await)
    }
}

/// Stops (immediate mode: every connection dies) and restarts a [`PostgresServer`].
pub struct PostgresControl<'a>(pub &'a PostgresServer);

#[async_trait::async_trait]
impl ServerControl for PostgresControl<'_> {
    async fn stop(&self) {
        self.0.stop();
    }
    async fn start(&self) {
        self.0.start();
    }
}

/// Freezes (and thaws) the [`FaultProxy`]s in front of a backend: `stop` makes the backend hang —
/// requests go out, no answer comes back, connections stay open — for the hung-backend check.
pub struct FreezeControl<'a>(pub Vec<&'a FaultProxy>);

#[async_trait::async_trait]
impl ServerControl for FreezeControl<'_> {
    async fn stop(&self) {
        for proxy in &self.0 {
            proxy.freeze();
        }
    }
    async fn start(&self) {
        for proxy in &self.0 {
            proxy.pass();
        }
    }
}

/// A single-node Redis reached through a [`FaultProxy`].
pub struct ProxiedRedis {
    /// The proxy every handle connects through.
    pub proxy: FaultProxy,
    /// The server.
    pub server: RedisServer,
}

impl ProxiedRedis {
    /// Starts a server and a proxy in front of it.
    pub async fn start() -> Self {
        crate::init_tracing();
        let server = RedisServer::start_new();
        ProxiedRedis {
            proxy: FaultProxy::start(server.port()).await,
            server,
        }
    }
}

#[async_trait::async_trait]
impl ConformanceBackend for ProxiedRedis {
    async fn lock(&self, retry: RetryConfig) -> Arc<dyn DistributedLock> {
        RedisBackend {
            url: self.proxy.redis_url(),
        }
        .lock(retry)
        .await
    }
}

/// Redlock over nodes each reached through its own [`FaultProxy`].
pub struct ProxiedRedlock {
    /// One proxy per node, in node order.
    pub proxies: Vec<FaultProxy>,
    /// The nodes.
    pub cluster: RedisCluster,
}

impl ProxiedRedlock {
    /// Starts `nodes` servers, each behind a proxy.
    pub async fn start(nodes: usize) -> Self {
        crate::init_tracing();
        let cluster = RedisCluster::new(nodes);
        let mut proxies = Vec::with_capacity(nodes);
        for i in 0..nodes {
            proxies.push(FaultProxy::start(cluster.node(i).port()).await);
        }
        ProxiedRedlock { proxies, cluster }
    }

    /// The proxies of a majority of the nodes (the first `n / 2 + 1`).
    pub fn majority(&self) -> Vec<&FaultProxy> {
        self.proxies
            .iter()
            .take(self.proxies.len() / 2 + 1)
            .collect()
    }
}

#[async_trait::async_trait]
impl ConformanceBackend for ProxiedRedlock {
    async fn lock(&self, retry: RetryConfig) -> Arc<dyn DistributedLock> {
        let urls: Vec<String> = self.proxies.iter().map(FaultProxy::redis_url).collect();
        let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
        let lock = RedlockDistributedLock::new(&urls)
            .await
            .unwrap_or_else(|err| panic!("connect redlock: {err}"));
        Arc::new(lock.with_retry(retry))
    }
}

/// PostgreSQL in one mode, reached through a [`FaultProxy`].
pub struct ProxiedPostgres {
    /// The proxy every handle connects through.
    pub proxy: FaultProxy,
    /// The cluster.
    pub server: PostgresServer,
    /// The mode every handle uses.
    pub mode: PostgresLockMode,
}

impl ProxiedPostgres {
    /// Starts a cluster and a proxy in front of it.
    pub async fn start(mode: PostgresLockMode) -> Self {
        crate::init_tracing();
        let server = PostgresServer::start_new();
        ProxiedPostgres {
            proxy: FaultProxy::start(server.port()).await,
            server,
            mode,
        }
    }

    /// The server's URL with the proxy's port.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            self.proxy.port()
        )
    }
}

#[async_trait::async_trait]
impl ConformanceBackend for ProxiedPostgres {
    async fn lock(&self, retry: RetryConfig) -> Arc<dyn DistributedLock> {
        let lock = PostgresDistributedLock::builder(&self.url())
            .with_mode(self.mode)
            .with_retry(retry)
            .with_pool_size(4)
            .build()
            .await
            .unwrap_or_else(|err| panic!("connect postgres through the proxy: {err}"));
        Arc::new(lock)
    }
}

/// The etcd backend over an [`EtcdCluster`] of its own (one or three members); every handle is a new
/// client to every member.
pub struct EtcdFixture {
    /// The members.
    pub cluster: EtcdCluster,
}

impl EtcdFixture {
    /// One member, for one test.
    pub fn single() -> Self {
        crate::init_tracing();
        EtcdFixture {
            cluster: EtcdCluster::single(),
        }
    }

    /// Three members, for one test.
    pub fn three() -> Self {
        crate::init_tracing();
        EtcdFixture {
            cluster: EtcdCluster::three(),
        }
    }

    /// The cluster's `etcd://` URL.
    pub fn url(&self) -> String {
        self.cluster.url("conformance")
    }
}

#[async_trait::async_trait]
impl ConformanceBackend for EtcdFixture {
    async fn lock(&self, retry: RetryConfig) -> Arc<dyn DistributedLock> {
        let url = self.url();
        let lock = state::EtcdDistributedLock::new(&url)
            .await
            .unwrap_or_else(|err| panic!("connect to {url}: {err}"));
        Arc::new(lock.with_retry(retry))
    }

    /// Leases count whole seconds (a 300 ms TTL is a 1 s lease) and the leader sweeps expired leases
    /// every 500 ms.
    fn expiry_slack(&self) -> std::time::Duration {
        std::time::Duration::from_millis(1_500)
    }
}

/// A single etcd member reached through a [`FaultProxy`].
pub struct ProxiedEtcd {
    /// The proxy every handle connects through.
    pub proxy: FaultProxy,
    /// The member.
    pub cluster: EtcdCluster,
}

impl ProxiedEtcd {
    /// Starts one member and a proxy in front of it.
    pub async fn start() -> Self {
        crate::init_tracing();
        let cluster = EtcdCluster::single();
        ProxiedEtcd {
            proxy: FaultProxy::start(cluster.member(0).port()).await,
            cluster,
        }
    }

    /// The `etcd://` URL through the proxy, with `prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://127.0.0.1:{}/{prefix}", self.proxy.port())
    }
}

#[async_trait::async_trait]
impl ConformanceBackend for ProxiedEtcd {
    async fn lock(&self, retry: RetryConfig) -> Arc<dyn DistributedLock> {
        let url = self.url("conformance");
        let lock = state::EtcdDistributedLock::new(&url)
            .await
            .unwrap_or_else(|err| panic!("connect to {url}: {err}"));
        Arc::new(lock.with_retry(retry))
    }

    fn expiry_slack(&self) -> std::time::Duration {
        std::time::Duration::from_millis(1_500)
    }
}
