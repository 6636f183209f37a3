//! Redlock: one lock over N independent Redis nodes, held while a majority holds it.
//!
//! The algorithm as redis.io specifies it, with three changes that make it faster and safer:
//! - all nodes are asked **at once** on multiplexed connections, and the call decides as soon as the
//!   quorum outcome is known (a majority granted, or too many refused or failed for one to be possible),
//!   so a healthy acquire costs about one round trip and a slow node never delays it;
//! - every request has a per-node timeout much smaller than the TTL, so a dead or paused node costs at most
//!   that timeout;
//! - **fencing tokens** across nodes (below).
//!
//! # Validity
//! A lease counts from the instant the first request was sent: it is valid for
//! `ttl - elapsed - (ttl * drift_factor + drift_constant)` (defaults 0.01 and 2 ms). If that is not
//! positive once a quorum granted, the acquire fails and is released on **all** nodes (also those that did
//! not answer), then retried after a jittered delay per the [`RetryConfig`].
//!
//! # Fencing tokens
//! Each node keeps its own counter, incremented by the acquire script when it grants — and moved by
//! nothing else while a lease is held there: only the lease holder may raise it. Counters drift apart (a
//! node that was down, or granted a failed attempt, counts differently), so the values an attempt's
//! grants return differ; the token is their maximum. When fewer than a majority of the granting nodes
//! already returned it, the attempt raises the others *that it holds* to it and waits until a majority
//! of its nodes hold it, before the token is handed out. The counters of the nodes an attempt holds are
//! its alone until it releases them, so on each node a token value is entered by one holder only; any
//! two majorities share a node, so no two holders get the same token; and the next holder's majority
//! includes one of this holder's nodes, which it increments past the token only after this holder's
//! lease there is gone. With counters in step (the normal case) no extra round trip is needed.
//!
//! (An earlier version raised the counters of *every* node and counted any node at or above the
//! token. That let two attempts hand out the same token after a node restart: one counted a node whose
//! counter another attempt — holding its lease, on its way to a quorum — had just incremented to that
//! value. The torture suite found it under load: `integration-tests/tests/torture.rs`, Redlock with a
//! minority of nodes killed and restarted.)
//!
//! This is monotonic **as long as a majority of nodes keeps its counters**: a node that restarts without
//! its data forgets its counter (and its leases). Run the nodes with `appendonly yes` and
//! `appendfsync always`, or keep a restarted node out for longer than the maximum TTL before it rejoins
//! (the "delayed restart" of the Redlock spec, which protects leases but not counters). If a majority
//! loses its data at once, tokens may repeat.

pub(crate) mod roster;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use redis::aio::ConnectionManager;
use tokio::time::Instant;

use super::redis::{
    ACQUIRE, DEFAULT_PREFIX, EXTEND, INFO, RAISE_FENCE, RELEASE, RawLeaseInfo, SETTLE_FENCE,
    StoredLease, acquire_command, extend_command, fence_key, info_command, invoke, lazy_manager,
    lock_key, new_lease_value, parse_redis_url, release_command, server_time, validate_prefix,
    wall_clock_ms,
};
use crate::guard::PendingAcquire;
use crate::lock::{Internal, validate_resource, validate_ttl};
use crate::retry::acquire_with_retry;
use crate::telemetry::{self, Operation};
use crate::{DistributedLock, LockGuard, LockToken, RetryConfig, StateError, StateResult};

const BACKEND: &str = "redlock";
const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_millis(250);
const DEFAULT_DRIFT_FACTOR: f64 = 0.01;
const DEFAULT_DRIFT_CONSTANT: Duration = Duration::from_millis(2);
/// A lock over several independent Redis nodes (3, 5, 7, ...); held while a majority holds it.
/// Cheap to clone; clones share the connections.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> state::StateResult<()> {
/// use std::time::Duration;
/// use state::{DistributedLock, RedlockDistributedLock};
///
/// let locks = RedlockDistributedLock::new(&[
///     "redis://10.0.0.1:6379", "redis://10.0.0.2:6379", "redis://10.0.0.3:6379",
/// ])
/// .await?
/// .with_node_timeout(Duration::from_millis(50))?;
/// let guard = locks.acquire("payments:settle", Duration::from_secs(10)).await?;
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedlockDistributedLock {
    nodes: Arc<[Node]>,
    prefix: Arc<str>,
    retry: RetryConfig,
    node_timeout: Duration,
    drift_factor: f64,
    drift_constant: Duration,
}

struct Node {
    conn: ConnectionManager,
    address: String,
}

/// What the nodes said to one request.
struct Tally<T> {
    granted: Vec<(usize, T)>,
    refused: usize,
    failed: Vec<String>,
}

impl<T> Tally<T> {
    fn new() -> Self {
        Tally {
            granted: Vec::new(),
            refused: 0,
            failed: Vec::new(),
        }
    }

    /// Counts one node's reply; returns whether the quorum outcome is now known.
    fn record(&mut self, nodes: &[Node], index: usize, reply: StateResult<Option<T>>) -> bool {
        match reply {
            Ok(Some(value)) => self.granted.push((index, value)),
            Ok(None) => self.refused += 1,
            Err(err) => {
                tracing::debug!(node = %nodes[index].address, error = %err, "redlock node failed");
                // The driver's error says what happened to this node; the wrapper would only repeat
                // the node's name.
                let what = std::error::Error::source(&err)
                    .map_or_else(|| err.to_string(), ToString::to_string);
                self.failed
                    .push(format!("{}: {what}", nodes[index].address));
            }
        }
        let (total, quorum) = (nodes.len(), quorum_of(nodes.len()));
        self.granted.len() >= quorum || self.refused + self.failed.len() > total - quorum
    }

    fn failure(&self, resource: &str, operation: &'static str, nodes: usize) -> StateError {
        StateError::QuorumNotReached {
            resource: resource.to_owned(),
            operation,
            failed_nodes: self.failed.clone(),
            granted: self.granted.len(),
            nodes,
            needed: quorum_of(nodes),
        }
    }
}

/// How many nodes make a majority of `n`.
fn quorum_of(n: usize) -> usize {
    n / 2 + 1
}

impl RedlockDistributedLock {
    /// Builds the lock over the Redis nodes at `urls` (each as in
    /// [`RedisDistributedLock::new`](crate::RedisDistributedLock::new)). Nodes are connected at once;
    /// a majority must answer now, the others are reconnected to in the background as they come up.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for no URLs, a malformed URL or the same node listed twice (it would
    /// count twice toward the majority); [`StateError::QuorumNotReached`] when fewer than a majority of
    /// the nodes answer, naming the ones that did not.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is held until it returns.
    pub async fn new(urls: &[&str]) -> StateResult<Self> {
        if urls.is_empty() {
            return Err(StateError::invalid(
                "redlock nodes",
                "at least one node URL is needed",
            ));
        }
        let mut nodes = Vec::with_capacity(urls.len());
        for url in urls {
            let target = parse_redis_url(url)?;
            if nodes
                .iter()
                .any(|node: &Node| node.address == target.redacted)
            {
                return Err(StateError::invalid(
                    "redlock nodes",
                    format!("{} is listed twice", target.redacted),
                ));
            }
            nodes.push(Node {
                conn: lazy_manager(&target, DEFAULT_NODE_TIMEOUT)?,
                address: target.redacted,
            });
        }
        let lock = RedlockDistributedLock {
            nodes: nodes.into(),
            prefix: Arc::from(DEFAULT_PREFIX),
            retry: RetryConfig::default(),
            node_timeout: DEFAULT_NODE_TIMEOUT,
            drift_factor: DEFAULT_DRIFT_FACTOR,
            drift_constant: DEFAULT_DRIFT_CONSTANT,
        };
        lock.ping_quorum().await?;
        tracing::debug!(nodes = lock.nodes.len(), "redlock backend connected");
        Ok(lock)
    }

    /// Sets the retry policy of [`acquire`](DistributedLock::acquire).
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the prefix of every key (default `state:`), as for the single-node backend.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] when the prefix is longer than 256 bytes.
    pub fn with_key_prefix(mut self, prefix: &str) -> StateResult<Self> {
        validate_prefix(prefix)?;
        self.prefix = Arc::from(prefix);
        Ok(self)
    }

    /// Bounds each request to one node (default 250 ms). Per call it is further capped at a quarter of the
    /// TTL, so that a lease is never mostly spent waiting for a slow node.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a zero timeout.
    pub fn with_node_timeout(mut self, timeout: Duration) -> StateResult<Self> {
        if timeout.is_zero() {
            return Err(StateError::invalid("node timeout", "must not be zero"));
        }
        self.node_timeout = timeout;
        Ok(self)
    }

    /// Sets the clock-drift allowance: `ttl * factor + constant` is subtracted from every lease's validity
    /// (defaults 0.01 and 2 ms, as the Redlock spec suggests).
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a factor outside `[0, 0.5)`.
    pub fn with_drift(mut self, factor: f64, constant: Duration) -> StateResult<Self> {
        if !(0.0..0.5).contains(&factor) {
            return Err(StateError::invalid(
                "drift factor",
                format!("{factor} is outside [0, 0.5)"),
            ));
        }
        if constant > crate::lock::MAX_TTL {
            return Err(StateError::invalid(
                "drift constant",
                format!(
                    "{constant:?} is longer than the longest lock ({:?})",
                    crate::lock::MAX_TTL
                ),
            ));
        }
        self.drift_factor = factor;
        self.drift_constant = constant;
        Ok(self)
    }

    /// The number of nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The majority size: `nodes / 2 + 1`.
    pub fn quorum(&self) -> usize {
        quorum_of(self.nodes.len())
    }

    /// The retry policy in use.
    pub fn retry_config(&self) -> &RetryConfig {
        &self.retry
    }

    fn timeout_for(&self, ttl: Duration) -> Duration {
        self.node_timeout.min(ttl / 4).max(Duration::from_millis(1))
    }

    /// The instant until which a lease for `ttl`, requested at `sent_at`, is safely held.
    fn valid_until(&self, sent_at: Instant, ttl: Duration) -> Instant {
        let drift = ttl
            .mul_f64(self.drift_factor)
            .saturating_add(self.drift_constant);
        sent_at + ttl.saturating_sub(drift)
    }

    async fn ping_quorum(&self) -> StateResult<()> {
        let tally = self
            .ask_nodes(
                "connect to",
                "",
                self.node_timeout,
                false,
                |mut conn, timeout| async move {
                    let cmd = redis::cmd("PING");
                    let ping = cmd.query_async::<String>(&mut conn);
                    match tokio::time::timeout(timeout, ping).await {
                        Ok(Ok(_)) => Ok(Some(())),
                        Ok(Err(err)) => Err(StateError::backend(BACKEND, "connect to", "", err)),
                        Err(_) => Err(StateError::Timeout {
                            backend: BACKEND,
                            operation: "connect to",
                            resource: String::new(),
                            timeout,
                        }),
                    }
                },
            )
            .await;
        if tally.granted.len() >= self.quorum() {
            Ok(())
        } else {
            Err(tally.failure("(connect)", "connect", self.nodes.len()))
        }
    }

    /// Sends one request per node concurrently. With `early`, returns as soon as the quorum outcome is
    /// known (the remaining requests are dropped); otherwise waits for every node (each bounded by
    /// `timeout`). `request` returns `Ok(Some(_))` for a yes, `Ok(None)` for a no.
    async fn ask_nodes<T, F, Fut>(
        &self,
        operation: &'static str,
        resource: &str,
        timeout: Duration,
        early: bool,
        request: F,
    ) -> Tally<T>
    where
        F: Fn(ConnectionManager, Duration) -> Fut,
        Fut: Future<Output = StateResult<Option<T>>>,
    {
        let mut pending: FuturesUnordered<_> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(index, node)| {
                let reply = request(node.conn.clone(), timeout);
                async move { (index, reply.await) }
            })
            .collect();
        let mut tally = Tally::new();
        while let Some((index, reply)) = pending.next().await {
            let decided = tally.record(&self.nodes, index, reply);
            if early && decided {
                tracing::trace!(operation, resource, "quorum outcome known");
                break;
            }
        }
        tally
    }

    /// Compare-and-delete of `owner`'s lease on every node. Returns as soon as the quorum outcome is
    /// known; the requests to the remaining nodes run on to completion in one background task (each
    /// bounded by `timeout`), so a slow node delays neither the caller nor the release on it.
    async fn release_everywhere(
        &self,
        resource: &str,
        owner: &str,
        timeout: Duration,
    ) -> Tally<()> {
        let release = release_command(&self.prefix, resource, owner);
        let (release, resource) = (Arc::new(release), Arc::<str>::from(resource));
        let mut pending: FuturesUnordered<_> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(index, node)| {
                let (mut conn, release, resource) = (
                    node.conn.clone(),
                    Arc::clone(&release),
                    Arc::clone(&resource),
                );
                async move {
                    let released: StateResult<i64> = RELEASE
                        .run(&mut conn, timeout, BACKEND, "release", &resource, &release)
                        .await;
                    (index, released.map(|n| (n == 1).then_some(())))
                }
            })
            .collect();
        let mut tally = Tally::new();
        while let Some((index, reply)) = pending.next().await {
            if tally.record(&self.nodes, index, reply) {
                break;
            }
        }
        if !pending.is_empty() {
            // Nobody needs these replies: the lease just must not outlive its TTL on those nodes.
            tokio::spawn(async move { while pending.next().await.is_some() {} });
        }
        tally
    }

    /// Settles `token` (the highest value the attempt's grants returned) on the nodes that granted
    /// it, so that it is entered on a majority before it is handed out (see the module docs). Those
    /// nodes' counters are this attempt's own while it holds their leases: the raise only moves a
    /// counter under the caller's lease.
    async fn settle_fence(
        &self,
        resource: &str,
        owner: &str,
        token: u64,
        granted: &[(usize, u64)],
        timeout: Duration,
    ) -> StateResult<()> {
        let quorum = self.quorum();
        let at_token = granted.iter().filter(|(_, fence)| *fence == token).count();
        if at_token >= quorum {
            return Ok(());
        }
        let (lease, fence) = (
            lock_key(&self.prefix, resource),
            fence_key(&self.prefix, resource),
        );
        let mut pending: FuturesUnordered<_> = granted
            .iter()
            .filter(|(_, fence)| *fence != token)
            .map(|(index, _)| {
                let (mut conn, lease, fence) = (
                    self.nodes[*index].conn.clone(),
                    lease.clone(),
                    fence.clone(),
                );
                async move {
                    let mut invocation = SETTLE_FENCE.prepare_invoke();
                    invocation.key(lease).key(fence).arg(owner).arg(token);
                    let reply: StateResult<i64> = invoke(
                        &mut conn,
                        timeout,
                        BACKEND,
                        "acquire",
                        resource,
                        &invocation,
                    )
                    .await;
                    (*index, reply)
                }
            })
            .collect();
        let mut entered = at_token;
        let mut failed = Vec::new();
        while let Some((index, reply)) = pending.next().await {
            match reply {
                Ok(counter) if u64::try_from(counter) == Ok(token) => entered += 1,
                Ok(-1) => failed.push(format!("{}: the lease expired", self.nodes[index].address)),
                Ok(counter) => failed.push(format!(
                    "{}: the counter moved to {counter} under this attempt's lease",
                    self.nodes[index].address
                )),
                Err(err) => failed.push(format!("{}: {err}", self.nodes[index].address)),
            }
            if entered >= quorum {
                return Ok(());
            }
        }
        Err(StateError::QuorumNotReached {
            resource: resource.to_owned(),
            operation: "acquire",
            failed_nodes: failed,
            granted: entered,
            nodes: self.nodes.len(),
            needed: quorum,
        })
    }

    /// One Redlock attempt. `Ok(None)` when other owners hold a majority.
    async fn attempt(
        &self,
        service: &Arc<dyn DistributedLock>,
        resource: &str,
        ttl: Duration,
    ) -> StateResult<Option<LockGuard>> {
        let now_ms = wall_clock_ms();
        let owner = new_lease_value(now_ms);
        let pending = PendingAcquire::arm(service, resource, &owner);
        let timeout = self.timeout_for(ttl);
        let acquire = &acquire_command(&self.prefix, resource, &owner, ttl);
        let sent_at = Instant::now();
        let tally = self
            .ask_nodes(
                "acquire",
                resource,
                timeout,
                true,
                |mut conn, timeout| async move {
                    ACQUIRE
                        .run::<Option<u64>>(
                            &mut conn, timeout, BACKEND, "acquire", resource, acquire,
                        )
                        .await
                },
            )
            .await;
        let valid_until = self.valid_until(sent_at, ttl);
        let outcome = if tally.granted.len() >= self.quorum() {
            let token = tally
                .granted
                .iter()
                .map(|(_, fence)| *fence)
                .max()
                .unwrap_or(0);
            tracing::debug!(resource, granted = ?tally.granted, token, "redlock quorum granted");
            match self
                .settle_fence(resource, &owner, token, &tally.granted, timeout)
                .await
            {
                Ok(()) if Instant::now() < valid_until => {
                    let acquired_at = server_time(now_ms);
                    let token = LockToken::new(
                        resource,
                        owner.clone(),
                        token,
                        acquired_at,
                        acquired_at + ttl,
                    );
                    Ok(Some(LockGuard::new(
                        Arc::clone(service),
                        token,
                        valid_until,
                    )))
                }
                Ok(()) => Err(StateError::Timeout {
                    backend: BACKEND,
                    operation: "acquire (validity spent before a quorum answered)",
                    resource: resource.to_owned(),
                    timeout: ttl,
                }),
                Err(err) => Err(err),
            }
        } else if tally.granted.len() + tally.failed.len() >= self.quorum() {
            Err(tally.failure(resource, "acquire", self.nodes.len()))
        } else {
            Ok(None)
        };
        if !matches!(outcome, Ok(Some(_))) {
            // Undo partial grants on every node, including those that did not answer.
            self.release_everywhere(resource, &owner, timeout).await;
        }
        pending.disarm();
        outcome
    }
}

impl fmt::Debug for RedlockDistributedLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<&str> = self
            .nodes
            .iter()
            .map(|node| node.address.as_str())
            .collect();
        f.debug_struct("RedlockDistributedLock")
            .field("nodes", &nodes)
            .field("quorum", &self.quorum())
            .field("prefix", &self.prefix)
            .field("node_timeout", &self.node_timeout)
            .field("retry", &self.retry)
            .finish()
    }
}

#[async_trait::async_trait]
impl DistributedLock for RedlockDistributedLock {
    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND))]
    async fn acquire(&self, resource: &str, ttl: Duration) -> StateResult<LockGuard> {
        acquire_with_retry(self, &self.retry, resource, ttl).await
    }

    async fn try_acquire(&self, resource: &str, ttl: Duration) -> StateResult<Option<LockGuard>> {
        telemetry::observe(BACKEND, Operation::Acquire, async move {
            validate_resource(resource)?;
            validate_ttl(ttl)?;
            let service: Arc<dyn DistributedLock> = Arc::new(self.clone());
            self.attempt(&service, resource, ttl).await
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip(self, token), fields(backend = BACKEND))]
    async fn release_internal(
        &self,
        resource: &str,
        token: &LockToken,
        _internal: Internal,
    ) -> StateResult<()> {
        telemetry::observe(BACKEND, Operation::Release, async move {
            validate_resource(resource)?;
            let tally = self
                .release_everywhere(resource, &token.value, self.node_timeout)
                .await;
            if tally.granted.len() >= self.quorum() {
                Ok(())
            } else if tally.granted.len() + tally.failed.len() >= self.quorum() {
                Err(tally.failure(resource, "release", self.nodes.len()))
            } else {
                Err(StateError::LockLost {
                    resource: resource.to_owned(),
                })
            }
        })
        .await
    }

    async fn is_locked(&self, resource: &str) -> StateResult<bool> {
        Ok(self.get_lock_info(resource).await?.is_some())
    }

    fn retry_policy(&self) -> &RetryConfig {
        &self.retry
    }

    fn backend_name(&self) -> &'static str {
        BACKEND
    }

    fn service_id(&self, _internal: Internal) -> usize {
        Arc::as_ptr(&self.nodes).cast::<u8>() as usize
    }

    #[tracing::instrument(level = "debug", skip(self, guard), fields(backend = BACKEND, resource = guard.resource()))]
    async fn extend(&self, guard: &mut LockGuard, ttl: Duration) -> StateResult<()> {
        telemetry::observe(BACKEND, Operation::Extend, async move {
            guard.ensure_issued_by(self.service_id(Internal::new()))?;
            validate_ttl(ttl)?;
            let resource = guard.resource().to_owned();
            let extend = &extend_command(&self.prefix, &resource, &guard.token().value, ttl);
            let resource_ref = resource.as_str();
            let timeout = self.timeout_for(ttl);
            let now_ms = wall_clock_ms();
            let sent_at = Instant::now();
            let tally = self
                .ask_nodes(
                    "extend",
                    &resource,
                    timeout,
                    true,
                    |mut conn, timeout| async move {
                        let extended: i64 = EXTEND
                            .run(&mut conn, timeout, BACKEND, "extend", resource_ref, extend)
                            .await?;
                        Ok((extended == 1).then_some(()))
                    },
                )
                .await;
            let valid_until = self.valid_until(sent_at, ttl);
            if tally.granted.len() >= self.quorum() && Instant::now() < valid_until {
                guard.record_extension(server_time(now_ms) + ttl, valid_until);
                Ok(())
            } else if tally.refused > self.nodes.len() - self.quorum() {
                Err(StateError::LockLost { resource })
            } else {
                Err(tally.failure(&resource, "extend", self.nodes.len()))
            }
        })
        .await
    }

    /// Raises the counter on every node and returns once a majority holds at least `at_least`: the
    /// next grant's majority overlaps it in a node whose increment exceeds it (see the module docs).
    async fn raise_fencing_counter(&self, resource: &str, at_least: u64) -> StateResult<()> {
        validate_resource(resource)?;
        let fence = fence_key(&self.prefix, resource);
        let tally = self
            .ask_nodes(
                "raise the fencing counter",
                resource,
                self.node_timeout,
                true,
                |mut conn, timeout| {
                    let fence = fence.clone();
                    async move {
                        let mut invocation = RAISE_FENCE.prepare_invoke();
                        invocation.key(fence).arg(at_least);
                        let counter: u64 = invoke(
                            &mut conn,
                            timeout,
                            BACKEND,
                            "raise the fencing counter",
                            resource,
                            &invocation,
                        )
                        .await?;
                        Ok((counter >= at_least).then_some(()))
                    }
                },
            )
            .await;
        if tally.granted.len() >= self.quorum() {
            Ok(())
        } else {
            Err(tally.failure(resource, "raise the fencing counter", self.nodes.len()))
        }
    }

    /// Decides on a majority, as acquire does: answers as soon as one owner holds the lease on a
    /// majority of the nodes that answered, or a majority answered and no owner can reach one with the
    /// nodes still to answer — a hung minority node adds nothing to the call.
    async fn get_lock_info(&self, resource: &str) -> StateResult<Option<LockToken>> {
        validate_resource(resource)?;
        let info = &info_command(&self.prefix, resource);
        let timeout = self.node_timeout;
        let mut pending: FuturesUnordered<_> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(index, node)| {
                let mut conn = node.conn.clone();
                async move {
                    let info: StateResult<Option<RawLeaseInfo>> = INFO
                        .run(&mut conn, timeout, BACKEND, "inspect", resource, info)
                        .await;
                    // A free node is an answer too: only failures count as failures.
                    (
                        index,
                        info.map(|info| Some(info.as_ref().and_then(StoredLease::parse))),
                    )
                }
            })
            .collect();
        let (total, quorum) = (self.nodes.len(), self.quorum());
        let mut tally = Tally::new();
        while let Some((index, reply)) = pending.next().await {
            tally.record(&self.nodes, index, reply);
            let leases: Vec<StoredLease> = tally
                .granted
                .iter()
                .filter_map(|(_, lease)| lease.clone())
                .collect();
            if let Some(holder) = majority_holder(&leases, quorum) {
                return Ok(Some(holder.into_token(resource)));
            }
            let still_to_answer = total - tally.granted.len() - tally.failed.len();
            if tally.granted.len() >= quorum && best_count(&leases) + still_to_answer < quorum {
                return Ok(None);
            }
            if tally.failed.len() > total - quorum {
                break;
            }
        }
        Err(tally.failure(resource, "inspect", total))
    }
}

/// How many of `leases` the most represented owner has.
fn best_count(leases: &[StoredLease]) -> usize {
    leases
        .iter()
        .map(|lease| {
            leases
                .iter()
                .filter(|other| other.owner == lease.owner)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// The lease of the owner that holds `resource` on at least `quorum` nodes, merged into one: the fence
/// value a majority of its leases record (stragglers granted after the decision may record their own),
/// the earliest acquisition and the earliest expiry.
fn majority_holder(leases: &[StoredLease], quorum: usize) -> Option<StoredLease> {
    let owner = leases
        .iter()
        .map(|lease| &lease.owner)
        .find(|owner| leases.iter().filter(|lease| &lease.owner == *owner).count() >= quorum)?;
    let mine: Vec<&StoredLease> = leases
        .iter()
        .filter(|lease| &lease.owner == owner)
        .collect();
    let fence = mine
        .iter()
        .map(|lease| lease.fence)
        .find(|fence| mine.iter().filter(|lease| lease.fence == *fence).count() >= quorum)
        .or_else(|| mine.iter().map(|lease| lease.fence).max())?;
    Some(StoredLease {
        owner: owner.clone(),
        fence,
        acquired_ms: mine.iter().map(|lease| lease.acquired_ms).min()?,
        expires_ms: mine.iter().map(|lease| lease.expires_ms).min()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_is_a_strict_majority() {
        assert_eq!(quorum_of(1), 1);
        assert_eq!(quorum_of(2), 2);
        assert_eq!(quorum_of(3), 2);
        assert_eq!(quorum_of(4), 3);
        assert_eq!(quorum_of(5), 3);
        assert_eq!(quorum_of(7), 4);
    }

    fn lease(owner: &str, fence: u64, expires_ms: u64) -> StoredLease {
        StoredLease {
            owner: owner.to_owned(),
            fence,
            acquired_ms: 1_000,
            expires_ms,
        }
    }

    #[test]
    fn majority_holder_needs_a_quorum_of_one_owner() {
        let split = [lease("a", 1, 5_000), lease("b", 1, 5_000)];
        assert!(majority_holder(&split, 2).is_none());
        let held = [
            lease("a", 7, 7_000),
            lease("a", 7, 6_000),
            lease("a", 9, 8_000),
        ];
        let merged = majority_holder(&held, 2).unwrap();
        assert_eq!(merged.owner, "a");
        assert_eq!(
            merged.fence, 7,
            "the fence a majority records, not a straggler's"
        );
        assert_eq!(merged.expires_ms, 6_000, "the earliest expiry");
    }
}
