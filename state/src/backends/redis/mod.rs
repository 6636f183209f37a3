//! The single-node Redis backend.
//!
//! # Keys
//! For a resource `R` and the key prefix `P` (default `state:`):
//! - `P` `lock:` `R` — the lease value `"{secret}:{acquired_ms}"` written with `SET … NX PX ttl`, so it
//!   expires with the lease (the acquired time is the client's wall clock, informational only). The whole
//!   string is the holder's [`LockToken::value`], so release and extend compare it exactly, as the
//!   textbook compare-and-delete does, with no string work in the scripts;
//! - `P` `fence:` `R` — the fencing counter, **without** TTL, so tokens keep increasing across expiry.
//!   One small key per distinct resource name ever locked. While a lease exists nobody else can `INCR`
//!   it, so its value is the holder's fencing token.
//!
//! Acquire is one Lua script, one round trip, two commands: `SET lock value NX PX ttl` and, when granted,
//! `INCR` of the counter (`scripts/acquire.lua`). Release and extend are owner-checked scripts
//! (compare-and-`DEL`, compare-and-`PEXPIRE` on the exact lease value); `info` reads the value,
//! the counter and `PTTL` with the server's `TIME`. Scripts are sent as `EVALSHA` with an automatic `EVAL`
//! fallback.
//!
//! # Durability of fencing tokens
//! The fence counter is as durable as the Redis server: with persistence off, a restarted server
//! starts counting from 1 again. Where fencing tokens guard storage, run Redis with `appendonly yes`
//! and `appendfsync always` (or `everysec`, accepting one second of exposure), or use the PostgreSQL
//! backend.
//!
//! # Connections
//! One multiplexed `ConnectionManager` per backend handle (clones share it); it reconnects by itself
//! after a server restart. Every operation is bounded by the operation timeout (default 2 s), so a dead
//! or paused server gives an error, never a hang.

pub(crate) mod fenced;
pub(crate) mod roster;
pub(crate) mod tasks;
pub(crate) mod versioned;

mod commands;
pub(crate) use commands::*;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Cmd;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;

use crate::guard::PendingAcquire;
use crate::lock::{Internal, safe_deadline, validate_resource, validate_ttl};
use crate::redact::redact_url;
use crate::retry::acquire_with_retry;
use crate::telemetry::{self, Operation};
use crate::{DistributedLock, LockGuard, LockToken, RetryConfig, StateError, StateResult};

const BACKEND: &str = "redis";
pub(crate) const DEFAULT_PREFIX: &str = "state:";
pub(crate) const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_PREFIX_LEN: usize = 256;

/// A lock service on one Redis server. Cheap to clone; clones share the connection.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> state::StateResult<()> {
/// use std::time::Duration;
/// use state::{DistributedLock, RedisDistributedLock, RetryConfig};
///
/// let locks = RedisDistributedLock::new("redis://:secret@127.0.0.1:6379/0")
///     .await?
///     .with_key_prefix("billing:")?
///     .with_retry(RetryConfig::aggressive());
/// let guard = locks.acquire("invoice:7", Duration::from_secs(10)).await?;
/// // ... write, passing guard.fencing_token() along ...
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisDistributedLock {
    conn: ConnectionManager,
    prefix: Arc<str>,
    retry: RetryConfig,
    operation_timeout: Duration,
    /// The server URL with any password replaced, for `Debug` and errors.
    address: Arc<str>,
}

/// A parsed, validated Redis URL and its printable form.
pub(crate) struct RedisTarget {
    pub(crate) client: redis::Client,
    pub(crate) redacted: String,
    /// `rediss://`: the connection needs a rustls crypto provider.
    pub(crate) tls: bool,
}

/// redis-rs builds its TLS configuration from rustls' process-level crypto provider. Install `ring` only
/// when the application has installed none — at the first TLS connection, never while parsing a URL —
/// so an application that wants its own provider installs it before connecting.
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // An Err means another thread installed one meanwhile: that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
        tracing::debug!("installed rustls' ring crypto provider (the application had none)");
    }
}

/// Parses a `redis://`, `rediss://` (TLS) or `unix://` URL without ever echoing a password.
///
/// A `rediss://` URL may name PEM files: `?ca=/path/ca.pem` trusts that CA instead of the public roots
/// (a private CA), and `&cert=/path/client.pem&key=/path/client-key.pem` presents a client certificate
/// (servers with `tls-auth-clients yes`).
pub(crate) fn parse_redis_url(raw: &str) -> StateResult<RedisTarget> {
    let mut parsed = url::Url::parse(raw)
        .map_err(|err| StateError::invalid("redis url", format!("not a URL ({err})")))?;
    let scheme = parsed.scheme().to_owned();
    if !matches!(scheme.as_str(), "redis" | "rediss" | "unix" | "redis+unix") {
        return Err(StateError::invalid(
            "redis url",
            format!("unsupported scheme `{scheme}` (use redis://, rediss:// or unix://)"),
        ));
    }
    if scheme.starts_with("redis") && !scheme.ends_with("unix") && parsed.host_str().is_none() {
        return Err(StateError::invalid("redis url", "has no host"));
    }
    let tls_files = take_tls_files(&mut parsed)?;
    if tls_files.is_some() && scheme != "rediss" {
        return Err(StateError::invalid(
            "redis url",
            "ca, cert and key are for rediss:// (TLS) URLs",
        ));
    }
    let rejected = |err: redis::RedisError| {
        // The driver's message may quote the URL: keep only its kind.
        StateError::invalid(
            "redis url",
            format!("rejected by the driver ({:?})", err.kind()),
        )
    };
    let client = match tls_files {
        None => redis::Client::open(parsed.as_str()).map_err(rejected)?,
        Some(files) => redis::Client::build_with_tls(parsed.as_str(), files.certificates()?)
            .map_err(rejected)?,
    };
    Ok(RedisTarget {
        client,
        redacted: redact_url(parsed.as_str()),
        tls: scheme == "rediss",
    })
}

/// The `ca`, `cert` and `key` files named in a Redis URL's query.
struct TlsFiles {
    ca: Option<String>,
    identity: Option<(String, String)>,
}

impl TlsFiles {
    fn certificates(&self) -> StateResult<redis::TlsCertificates> {
        let read = |what: &'static str, path: &str| {
            std::fs::read(path)
                .map_err(|err| StateError::invalid(what, format!("cannot read {path}: {err}")))
        };
        let root_cert = self
            .ca
            .as_deref()
            .map(|ca| read("redis ca file", ca))
            .transpose()?;
        let client_tls = match &self.identity {
            Some((cert, key)) => Some(redis::ClientTlsConfig {
                client_cert: read("redis client certificate file", cert)?,
                client_key: read("redis client key file", key)?,
            }),
            None => None,
        };
        Ok(redis::TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

/// Removes `ca`, `cert` and `key` from the query of `url` (the driver does not know them).
fn take_tls_files(url: &mut url::Url) -> StateResult<Option<TlsFiles>> {
    let (mut ca, mut cert, mut key) = (None, None, None);
    let mut others = Vec::new();
    for (name, value) in url.query_pairs() {
        match name.as_ref() {
            "ca" => ca = Some(value.into_owned()),
            "cert" => cert = Some(value.into_owned()),
            "key" => key = Some(value.into_owned()),
            _ => others.push((name.into_owned(), value.into_owned())),
        }
    }
    if ca.is_none() && cert.is_none() && key.is_none() {
        return Ok(None);
    }
    if others.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(others);
    }
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => {
            return Err(StateError::invalid(
                "redis url",
                "a client certificate needs both cert= and key=",
            ));
        }
    };
    Ok(Some(TlsFiles { ca, identity }))
}

/// A `ConnectionManager` whose connects and responses are bounded by `timeout`, so a dead server
/// fails fast and a restarted one is reconnected to by the next operation.
pub(crate) async fn connect_manager(
    target: &RedisTarget,
    timeout: Duration,
) -> StateResult<ConnectionManager> {
    if target.tls {
        ensure_crypto_provider();
    }
    let connect =
        ConnectionManager::new_with_config(target.client.clone(), manager_config(timeout));
    let mut conn =
        super::bounded(timeout, BACKEND, "connect to", &target.redacted, connect).await?;
    // Connecting sends no command when the URL has no credentials: ask once, so a server that wants a
    // password (NOAUTH) or refuses this user is an error here, not at the first lock.
    let ping = redis::cmd("PING");
    let pong = ping.query_async::<String>(&mut conn);
    super::bounded(timeout, BACKEND, "reach", &target.redacted, pong).await?;
    Ok(conn)
}

/// The lease key of `resource`.
pub(crate) fn lock_key(prefix: &str, resource: &str) -> String {
    joined(&[prefix, "lock:", resource])
}

/// `parts` concatenated into one allocation (`format!` costs more, on every lock operation).
fn joined(parts: &[&str]) -> String {
    let mut key = String::with_capacity(parts.iter().map(|part| part.len()).sum());
    for part in parts {
        key.push_str(part);
    }
    key
}

/// The fencing-counter key of `resource`.
pub(crate) fn fence_key(prefix: &str, resource: &str) -> String {
    joined(&[prefix, "fence:", resource])
}

/// Checks a key prefix.
pub(crate) fn validate_prefix(prefix: &str) -> StateResult<()> {
    if prefix.len() > MAX_PREFIX_LEN {
        return Err(StateError::invalid(
            "key prefix",
            format!("is {} bytes, the limit is {MAX_PREFIX_LEN}", prefix.len()),
        ));
    }
    Ok(())
}

/// A `ConnectionManager` that connects on first use (and reconnects after failures), for nodes that may
/// be down when the backend is built. Same timeouts as [`connect_manager`].
pub(crate) fn lazy_manager(
    target: &RedisTarget,
    timeout: Duration,
) -> StateResult<ConnectionManager> {
    ConnectionManager::new_lazy_with_config(target.client.clone(), manager_config(timeout))
        .map_err(|err| StateError::backend(BACKEND, "connect to", target.redacted.clone(), err))
}

fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(10))
        .set_max_delay(Duration::from_millis(100))
}

/// This host's wall-clock time in ms since the epoch, for the informational timestamps of a lease.
pub(crate) fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What the info script returns: the stored lease string, the fencing counter, the lease's remaining ms
/// and the server's time in ms.
pub(crate) type RawLeaseInfo = (String, u64, i64, u64);

/// A lease as stored (`"<secret>:<acquired_ms>"`: the whole string is the owner value; the acquired time
/// is parsed from the right) with the fencing counter beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredLease {
    pub(crate) owner: String,
    pub(crate) fence: u64,
    pub(crate) acquired_ms: u64,
    pub(crate) expires_ms: u64,
}

impl StoredLease {
    pub(crate) fn parse((raw, fence, remaining_ms, now_ms): &RawLeaseInfo) -> Option<Self> {
        let (_, acquired_ms) = raw.rsplit_once(':')?;
        let (owner, acquired_ms, fence) = (raw.clone(), acquired_ms.parse().ok()?, *fence);
        let expires_ms = now_ms.saturating_add(u64::try_from(*remaining_ms).unwrap_or(0));
        Some(StoredLease {
            owner,
            fence,
            acquired_ms,
            expires_ms,
        })
    }

    pub(crate) fn into_token(self, resource: &str) -> LockToken {
        LockToken::new(
            resource,
            self.owner,
            self.fence,
            server_time(self.acquired_ms),
            server_time(self.expires_ms),
        )
    }
}

/// A fresh lease value: an unguessable owner secret ([`LockToken::new_owner_value`]) and the acquire
/// time in ms, `"<secret>:<acquired_ms>"`. It is stored as is and is the token's `value`, so the scripts
/// compare it exactly.
pub(crate) fn new_lease_value(now_ms: u64) -> String {
    let mut digits = itoa::Buffer::new();
    let acquired_ms = digits.format(now_ms);
    let mut value = String::with_capacity(33 + acquired_ms.len());
    crate::lock::push_owner_secret(&mut value);
    value.push(':');
    value.push_str(acquired_ms);
    value
}

/// Converts a server time in ms since the epoch into a `SystemTime`.
pub(crate) fn server_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The TTL in whole milliseconds; `validate_ttl` has already bounded it.
pub(crate) fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

impl RedisDistributedLock {
    /// Connects to the Redis server at `url` (`redis://[:password@]host:port[/db]`, `rediss://` for TLS,
    /// `unix:///path`), with the key prefix `state:` and the default [`RetryConfig`].
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a malformed URL; a backend error or timeout when the server cannot
    /// be reached or refuses the credentials.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is held until it returns.
    pub async fn new(url: &str) -> StateResult<Self> {
        let target = parse_redis_url(url)?;
        let conn = connect_manager(&target, DEFAULT_OPERATION_TIMEOUT).await?;
        tracing::debug!(server = %target.redacted, "redis lock backend connected");
        Ok(RedisDistributedLock {
            conn,
            prefix: Arc::from(DEFAULT_PREFIX),
            retry: RetryConfig::default(),
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            address: Arc::from(target.redacted),
        })
    }

    /// Uses an existing connection of the application's: no connection of its own, no URL. Every call
    /// is still bounded by the operation timeout. Errors name the server as `(application connection)`.
    pub fn from_connection_manager(conn: ConnectionManager) -> Self {
        RedisDistributedLock {
            conn,
            prefix: Arc::from(DEFAULT_PREFIX),
            retry: RetryConfig::default(),
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            address: Arc::from("(application connection)"),
        }
    }

    /// The connection this backend uses, to share with the Redis recipe stores
    /// ([`RedisFencedStore::from_connection_manager`](crate::recipes::fenced::RedisFencedStore::from_connection_manager),
    /// [`RedisTaskStore::from_connection_manager`](crate::recipes::tasks::RedisTaskStore::from_connection_manager)).
    pub fn connection_manager(&self) -> &ConnectionManager {
        &self.conn
    }

    /// Sets the retry policy of [`acquire`](DistributedLock::acquire).
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the prefix of every key this backend writes (default `state:`), so several applications can
    /// share one server.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] when the prefix is longer than 256 bytes.
    pub fn with_key_prefix(mut self, prefix: &str) -> StateResult<Self> {
        validate_prefix(prefix)?;
        self.prefix = Arc::from(prefix);
        Ok(self)
    }

    /// Bounds every server round trip (default 2 s). Keep it well below your lock TTLs.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a zero timeout.
    pub fn with_operation_timeout(mut self, timeout: Duration) -> StateResult<Self> {
        if timeout.is_zero() {
            return Err(StateError::invalid("operation timeout", "must not be zero"));
        }
        self.operation_timeout = timeout;
        Ok(self)
    }

    /// The retry policy in use.
    pub fn retry_config(&self) -> &RetryConfig {
        &self.retry
    }

    fn lock_key(&self, resource: &str) -> String {
        lock_key(&self.prefix, resource)
    }

    /// One acquire attempt: one round trip. (Metrics are recorded by the caller, without another layer
    /// of future: this and [`release_once`](Self::release_once) are the hottest paths of the backend.)
    async fn acquire_once(&self, resource: &str, ttl: Duration) -> StateResult<Option<LockGuard>> {
        validate_resource(resource)?;
        validate_ttl(ttl)?;
        let now_ms = wall_clock_ms();
        let owner = new_lease_value(now_ms);
        let service: Arc<dyn DistributedLock> = Arc::new(self.clone());
        let pending = PendingAcquire::arm(&service, resource, &owner);
        let sent_at = Instant::now();
        let acquire = acquire_command(&self.prefix, resource, &owner, ttl);
        let mut conn = self.conn.clone();
        let timeout = self.operation_timeout;
        let granted: Option<u64> = ACQUIRE
            .run(&mut conn, timeout, BACKEND, "acquire", resource, &acquire)
            .await?;
        pending.disarm();
        tracing::trace!(resource, granted = granted.is_some(), elapsed = ?sent_at.elapsed(), "redis try_acquire");
        Ok(granted.map(|fence| {
            let acquired_at = server_time(now_ms);
            let token = LockToken::new(resource, owner, fence, acquired_at, acquired_at + ttl);
            LockGuard::new(service, token, safe_deadline(sent_at, ttl))
        }))
    }

    /// Compare-and-delete of `token`'s lease: one round trip.
    async fn release_once(&self, resource: &str, token: &LockToken) -> StateResult<()> {
        validate_resource(resource)?;
        let release = release_command(&self.prefix, resource, &token.value);
        let mut conn = self.conn.clone();
        let timeout = self.operation_timeout;
        let released: i64 = RELEASE
            .run(&mut conn, timeout, BACKEND, "release", resource, &release)
            .await?;
        if released == 1 {
            tracing::trace!(resource, "redis lock released");
            Ok(())
        } else {
            Err(StateError::LockLost {
                resource: resource.to_owned(),
            })
        }
    }

    /// Runs one lock script under the operation timeout, mapping errors with context.
    async fn run<T: redis::FromRedisValue + Send>(
        &self,
        script: &LockScript,
        operation: &'static str,
        resource: &str,
        cmd: &Cmd,
    ) -> StateResult<T> {
        let mut conn = self.conn.clone();
        script
            .run(
                &mut conn,
                self.operation_timeout,
                BACKEND,
                operation,
                resource,
                cmd,
            )
            .await
    }
}

/// Runs one command on `conn`, bounded by `timeout`, mapping driver errors and timeouts to
/// [`StateError`]s that name the backend, operation and resource.
pub(crate) async fn query<T: redis::FromRedisValue>(
    conn: &mut ConnectionManager,
    timeout: Duration,
    backend: &'static str,
    operation: &'static str,
    resource: &str,
    cmd: &redis::Cmd,
) -> StateResult<T> {
    super::bounded(timeout, backend, operation, resource, cmd.query_async(conn)).await
}

/// Runs one script invocation on `conn`, bounded by `timeout`, mapping driver errors and timeouts to
/// [`StateError`]s that name the backend, operation and resource.
pub(crate) async fn invoke<T: redis::FromRedisValue>(
    conn: &mut ConnectionManager,
    timeout: Duration,
    backend: &'static str,
    operation: &'static str,
    resource: &str,
    invocation: &redis::ScriptInvocation<'_>,
) -> StateResult<T> {
    super::bounded(
        timeout,
        backend,
        operation,
        resource,
        invocation.invoke_async(conn),
    )
    .await
}

impl fmt::Debug for RedisDistributedLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisDistributedLock")
            .field("server", &self.address)
            .field("prefix", &self.prefix)
            .field("retry", &self.retry)
            .field("operation_timeout", &self.operation_timeout)
            .finish()
    }
}

#[async_trait::async_trait]
impl DistributedLock for RedisDistributedLock {
    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND))]
    async fn acquire(&self, resource: &str, ttl: Duration) -> StateResult<LockGuard> {
        acquire_with_retry(self, &self.retry, resource, ttl).await
    }

    async fn try_acquire(&self, resource: &str, ttl: Duration) -> StateResult<Option<LockGuard>> {
        let started = std::time::Instant::now();
        let result = self.acquire_once(resource, ttl).await;
        telemetry::finish(BACKEND, Operation::Acquire, started, &result);
        result
    }

    async fn release_internal(
        &self,
        resource: &str,
        token: &LockToken,
        _internal: Internal,
    ) -> StateResult<()> {
        let started = std::time::Instant::now();
        let result = self.release_once(resource, token).await;
        telemetry::finish(BACKEND, Operation::Release, started, &result);
        result
    }

    async fn is_locked(&self, resource: &str) -> StateResult<bool> {
        validate_resource(resource)?;
        let mut conn = self.conn.clone();
        let mut exists = redis::cmd("EXISTS");
        exists.arg(self.lock_key(resource));
        let count: i64 = query(
            &mut conn,
            self.operation_timeout,
            BACKEND,
            "inspect",
            resource,
            &exists,
        )
        .await?;
        Ok(count > 0)
    }

    fn retry_policy(&self) -> &RetryConfig {
        &self.retry
    }

    fn backend_name(&self) -> &'static str {
        BACKEND
    }

    fn service_id(&self, _internal: Internal) -> usize {
        Arc::as_ptr(&self.address).cast::<u8>() as usize
    }

    #[tracing::instrument(level = "debug", skip(self, guard), fields(backend = BACKEND, resource = guard.resource()))]
    async fn extend(&self, guard: &mut LockGuard, ttl: Duration) -> StateResult<()> {
        telemetry::observe(BACKEND, Operation::Extend, async move {
            guard.ensure_issued_by(self.service_id(Internal::new()))?;
            validate_ttl(ttl)?;
            let resource = guard.resource().to_owned();
            let sent_at = Instant::now();
            let now_ms = wall_clock_ms();
            let extend = extend_command(&self.prefix, &resource, &guard.token().value, ttl);
            let extended: i64 = self.run(&EXTEND, "extend", &resource, &extend).await?;
            if extended != 1 {
                return Err(StateError::LockLost { resource });
            }
            guard.record_extension(server_time(now_ms) + ttl, safe_deadline(sent_at, ttl));
            Ok(())
        })
        .await
    }

    async fn raise_fencing_counter(&self, resource: &str, at_least: u64) -> StateResult<()> {
        validate_resource(resource)?;
        let mut conn = self.conn.clone();
        let mut invocation = RAISE_FENCE.prepare_invoke();
        invocation
            .key(fence_key(&self.prefix, resource))
            .arg(at_least);
        let _counter: u64 = invoke(
            &mut conn,
            self.operation_timeout,
            BACKEND,
            "raise the fencing counter",
            resource,
            &invocation,
        )
        .await?;
        Ok(())
    }

    async fn get_lock_info(&self, resource: &str) -> StateResult<Option<LockToken>> {
        validate_resource(resource)?;
        let info = info_command(&self.prefix, resource);
        let info: Option<RawLeaseInfo> = self.run(&INFO, "inspect", resource, &info).await?;
        Ok(info
            .as_ref()
            .and_then(StoredLease::parse)
            .map(|lease| lease.into_token(resource)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The lease script's answer comes from the server: any value, fence and times parse or are
        /// refused, never panic; a well-formed one round-trips.
        #[test]
        fn lease_info_from_the_server_never_panics(
            raw in ".{0,40}",
            fence in proptest::prelude::any::<u64>(),
            remaining in proptest::prelude::any::<i64>(),
            now in proptest::prelude::any::<u64>(),
            owner in "[0-9a-f]{32}",
            acquired in proptest::prelude::any::<u64>(),
        ) {
            let _ = StoredLease::parse(&(raw, fence, remaining, now));
            let well_formed = (format!("{owner}:{acquired}"), fence, remaining, now);
            let lease = StoredLease::parse(&well_formed).expect("a well-formed lease parses");
            proptest::prop_assert_eq!(lease.owner, format!("{owner}:{acquired}"));
            proptest::prop_assert_eq!(lease.acquired_ms, acquired);
            proptest::prop_assert!(lease.expires_ms >= now);
        }
    }

    #[test]
    fn malformed_urls_are_invalid_input() {
        for bad in [
            "",
            "not a url",
            "http://127.0.0.1:6379",
            "redis://",
            "redis://:pw@[::1",
        ] {
            match parse_redis_url(bad) {
                Err(StateError::InvalidInput { what, reason }) => {
                    assert_eq!(what, "redis url");
                    assert!(!reason.contains("pw"), "no secret in `{reason}`");
                }
                Err(other) => panic!("{bad:?}: unexpected {other:?}"),
                Ok(_) => panic!("{bad:?} was accepted"),
            }
        }
    }

    #[test]
    fn stored_leases_parse_from_the_right() {
        let raw = (
            "a:b:c:1700000000000".to_owned(),
            42,
            1_500,
            1_700_000_000_500,
        );
        let lease = StoredLease::parse(&raw).unwrap();
        assert_eq!(lease.owner, "a:b:c:1700000000000");
        assert_eq!(lease.fence, 42);
        assert_eq!(lease.acquired_ms, 1_700_000_000_000);
        assert_eq!(lease.expires_ms, 1_700_000_002_000);
        assert!(StoredLease::parse(&("garbage".to_owned(), 1, 1, 1)).is_none());
        assert!(StoredLease::parse(&("o:x".to_owned(), 1, 1, 1)).is_none());
    }

    #[test]
    fn parsing_a_tls_url_installs_no_crypto_provider() {
        let target = parse_redis_url("rediss://:hunter2@localhost:6390").unwrap();
        assert!(target.tls);
        assert!(
            rustls::crypto::CryptoProvider::get_default().is_none(),
            "an application must still be able to install its own provider"
        );
    }

    #[test]
    fn passwords_are_redacted() {
        let target = parse_redis_url("redis://user:hunter2@127.0.0.1:6390/3").unwrap();
        assert_eq!(target.redacted, "redis://user:***@127.0.0.1:6390/3");
        let tls = parse_redis_url("rediss://:hunter2@localhost:6390").unwrap();
        assert!(!tls.redacted.contains("hunter2"));
    }
}
