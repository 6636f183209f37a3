//! The etcd backend: consensus-grade locks whose fencing tokens survive any single failure.
//!
//! # Keys
//! For a resource `R` and the key prefix `P` (default `state/`), the lock is the key `P` `lock/` `R`, whose
//! value is the holder's owner value, attached to an etcd **lease of its own** (one per guard, granted with
//! the guard's TTL — never etcd's `Lock` RPC, whose server-side default lease nobody would renew).
//!
//! - **Acquire** is one transaction: *if the key's create revision is 0 (absent), put it with our lease*.
//!   The **fencing token is the key's create revision** — the cluster-wide revision of that transaction:
//!   linearizable, strictly increasing across holders, expiry and leader changes, never reset (etcd's
//!   revision survives restarts and failovers; only a restore from an old backup could roll it back).
//! - **Extend** grants a new lease of the new TTL and, in one transaction *if the value is still ours*,
//!   re-attaches the key to it (the create revision — the token — is unchanged).
//! - **Release** deletes the key *if the value is still ours*.
//! - **Waiting** (`acquire`, `acquire_within`, `acquire_cancellable`) watches the key from the revision at
//!   which it was found held and tries again at its delete event (a release, or the holder's lease
//!   expiring) — no polling. `acquire` waits as long as its retry policy's delays add up to
//!   ([`RetryConfig::total_wait`]); failures (an unreachable cluster) back off as on every backend. A
//!   watch that stays silent for [`WATCH_RECHECK`] is re-checked once with a fresh attempt, in case the
//!   stream was lost without an error.
//!
//! # TTL granularity
//! etcd leases count whole seconds, and the server raises a TTL below its minimum (1.5 × the election
//! timeout, 1.5 s by default) to that minimum. A guard's own deadline stays the TTL you asked for (so a
//! holder stops early, never late), but the lock is free for others only once etcd expires the lease:
//! up to the next whole second after the TTL (plus up to 0.5 s for the leader's expiry sweep). Ask for
//! TTLs of seconds on this backend.
//!
//! # Connections
//! One `etcd_client::Client` per handle (clones share its channel), load-balanced over every endpoint of
//! the URL; each call is bounded by the operation timeout (default 2 s), so a hung or partitioned cluster
//! gives errors, never a hang.

pub(crate) mod fenced;
pub(crate) mod roster;
pub(crate) mod tasks;
pub(crate) mod versioned;

mod client;
pub(crate) use client::*;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchFilterType,
    WatchOptions,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::lock::{Internal, safe_deadline, validate_resource, validate_ttl, wait_deadline};
use crate::retry::{Budget, acquired, retry_loop};
use crate::telemetry::{self, Operation};
use crate::{DistributedLock, LockGuard, LockToken, RetryConfig, StateError, StateResult};

const BACKEND: &str = "etcd";
const DEFAULT_PREFIX: &str = "state/";
const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a waiter trusts a silent watch before it tries again anyway (a safety net against a stream
/// lost without an error; every release and expiry arrives as an event long before).
pub const WATCH_RECHECK: Duration = Duration::from_secs(10);

/// What one acquisition attempt found.
enum Attempt {
    Acquired(LockGuard),
    /// Somebody holds the lock as of this store revision.
    Held {
        revision: i64,
    },
}

/// An etcd lease length for `ttl`: whole seconds, rounded up.
pub(crate) fn lease_seconds(ttl: Duration) -> i64 {
    let millis = ttl.as_millis().max(1);
    i64::try_from(millis.div_ceil(1_000)).unwrap_or(i64::MAX)
}

/// A lock service on an etcd cluster. Cheap to clone; clones share the connection.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> state::StateResult<()> {
/// use std::time::Duration;
/// use state::{DistributedLock, EtcdDistributedLock};
///
/// let locks = EtcdDistributedLock::new("etcd://127.0.0.1:2379,127.0.0.1:22379/billing").await?;
/// let guard = locks.acquire("invoice:7", Duration::from_secs(10)).await?;
/// // ... write, passing guard.fencing_token() (the key's create revision) along ...
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EtcdDistributedLock {
    client: Client,
    prefix: Arc<str>,
    retry: RetryConfig,
    operation_timeout: Duration,
    /// The URL with the password replaced, for `Debug` and errors.
    address: Arc<str>,
}

impl fmt::Debug for EtcdDistributedLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdDistributedLock")
            .field("cluster", &self.address)
            .field("prefix", &self.prefix)
            .field("retry", &self.retry)
            .field("operation_timeout", &self.operation_timeout)
            .finish()
    }
}

impl EtcdDistributedLock {
    /// Connects to the cluster of `url` (`etcd://[user:password@]h1:p1,h2:p2[/prefix]`, key prefix
    /// `state/` by default).
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a malformed URL (never echoing its password); a backend error or
    /// timeout when no endpoint answers.
    pub async fn new(url: &str) -> StateResult<Self> {
        let target = parse_etcd_url(url)?;
        let client = connect_client(&target, DEFAULT_OPERATION_TIMEOUT).await?;
        Ok(Self::from_client(client, &target))
    }

    pub(crate) fn from_client(client: Client, target: &EtcdTarget) -> Self {
        EtcdDistributedLock {
            client,
            prefix: Arc::from(target.prefix.as_str()),
            retry: RetryConfig::default(),
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            address: Arc::from(target.redacted()),
        }
    }

    /// Uses `retry` for [`acquire`](DistributedLock::acquire).
    pub fn with_retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// Bounds every call to the cluster by `timeout` (default 2 s).
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

    /// The etcd client (for fenced and task stores on the same cluster).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// One acquisition: a lease, then the create-if-absent transaction.
    async fn attempt(&self, resource: &str, ttl: Duration) -> StateResult<Attempt> {
        let owner = LockToken::new_owner_value();
        let service: Arc<dyn DistributedLock> = Arc::new(self.clone());
        let sent_at = Instant::now();
        let lease = self.grant(resource, ttl).await?;
        // From here a cancelled future must not leave the key behind: the lease is revoked, which takes a
        // key put with it along, and makes a put still in flight fail.
        let pending = RevokeOnCancel::arm(self, resource, lease);
        let key = self.lock_key(resource);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                owner.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let response = self
            .call("acquire", resource, |mut client| {
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await;
        let response = match response {
            Ok(response) => response,
            Err(err) => {
                self.revoke(resource, lease).await;
                pending.disarm();
                return Err(err);
            }
        };
        pending.disarm();
        let revision = response.header().map(|header| header.revision());
        let revision = revision.ok_or_else(|| {
            StateError::backend(BACKEND, "acquire", resource, "the response has no revision")
        })?;
        if !response.succeeded() {
            self.revoke(resource, lease).await;
            return Ok(Attempt::Held { revision });
        }
        let revision = u64::try_from(revision).map_err(|_| {
            StateError::backend(BACKEND, "acquire", resource, "the revision is negative")
        })?;
        let acquired_at = SystemTime::now();
        let token = LockToken::new(resource, owner, revision, acquired_at, acquired_at + ttl);
        Ok(Attempt::Acquired(LockGuard::new(
            service,
            token,
            safe_deadline(sent_at, ttl),
        )))
    }

    /// Waits until the key may be free: its delete event after `revision`, `until`, or
    /// [`WATCH_RECHECK`], whichever comes first.
    async fn wait_for_release(
        &self,
        resource: &str,
        revision: i64,
        until: Instant,
    ) -> StateResult<()> {
        let now = Instant::now();
        let until = until.min(now + WATCH_RECHECK);
        if until <= now {
            return Ok(());
        }
        let key = self.lock_key(resource);
        let options = WatchOptions::new()
            .with_start_revision(revision.saturating_add(1))
            .with_filters([WatchFilterType::NoPut]);
        let mut stream = self
            .call("watch", resource, |mut client| {
                let (key, options) = (key.clone(), options.clone());
                async move { client.watch(key, Some(options)).await }
            })
            .await?;
        let released = async {
            loop {
                let response = match stream.message().await {
                    Ok(Some(response)) => response,
                    Ok(None) => {
                        let ended = "the cluster ended the watch";
                        return Err(StateError::backend(BACKEND, "watch", resource, ended));
                    }
                    Err(err) => return Err(StateError::backend(BACKEND, "watch", resource, err)),
                };
                // A cancelled watch (the revision was compacted away) says nothing: try again.
                let deleted = response
                    .events()
                    .iter()
                    .any(|event| event.event_type() == EventType::Delete);
                if deleted || response.canceled() {
                    return Ok(());
                }
            }
        };
        tokio::time::timeout_at(until, released)
            .await
            .unwrap_or(Ok(()))
    }

    /// Acquires within `until` (and `cancel`), waiting on the key's watch between attempts.
    async fn acquire_watching(
        &self,
        resource: &str,
        ttl: Duration,
        until: Instant,
        cancel: Option<&CancellationToken>,
    ) -> StateResult<LockGuard> {
        let budget = Budget {
            until: Some(until),
            cancel,
            wake: None,
            attempt_waits: true,
        };
        validate_resource(resource)?;
        validate_ttl(ttl)?;
        let retried = retry_loop(&self.retry, budget, |attempt| async move {
            if attempt > 1 {
                telemetry::acquire_retried(BACKEND);
            }
            let attempted =
                telemetry::observe(BACKEND, Operation::Acquire, self.attempt(resource, ttl));
            match attempted.await? {
                Attempt::Acquired(guard) => Ok(Some(guard)),
                Attempt::Held { revision } => {
                    self.wait_for_release(resource, revision, until).await?;
                    Ok(None)
                }
            }
        })
        .await?;
        acquired(resource, retried)
    }

    fn lock_key(&self, resource: &str) -> String {
        format!("{}lock/{resource}", self.prefix)
    }

    async fn call<T, F>(
        &self,
        operation: &'static str,
        resource: &str,
        call: impl Fn(Client) -> F,
    ) -> StateResult<T>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        etcd_call(
            &self.client,
            self.operation_timeout,
            operation,
            resource,
            call,
        )
        .await
    }

    /// Grants a lease of `ttl` (rounded up to whole seconds); its id.
    async fn grant(&self, resource: &str, ttl: Duration) -> StateResult<i64> {
        let seconds = lease_seconds(ttl);
        let granted = self
            .call("grant a lease for", resource, |mut client| async move {
                client.lease_grant(seconds, None).await
            })
            .await?;
        Ok(granted.id())
    }

    /// Revokes `lease`, best effort (it expires by itself otherwise).
    async fn revoke(&self, resource: &str, lease: i64) {
        let revoked = self
            .call("revoke a lease for", resource, |mut client| async move {
                client.lease_revoke(lease).await
            })
            .await;
        if let Err(err) = revoked {
            tracing::debug!(resource, lease, error = %err, "lease not revoked (it expires by itself)");
        }
    }

    /// Puts the key with `lease` if its value is still `owner`: the lease it had until then when it
    /// was (read in the same transaction, before the put), `None` when the key is no longer `owner`'s.
    async fn reattach(&self, resource: &str, owner: &str, lease: i64) -> StateResult<Option<i64>> {
        let key = self.lock_key(resource);
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, owner)])
            .and_then([
                TxnOp::get(key.clone(), None),
                TxnOp::put(key, owner, Some(PutOptions::new().with_lease(lease))),
            ]);
        let response = self
            .call("extend", resource, |mut client| {
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await?;
        if !response.succeeded() {
            return Ok(None);
        }
        Ok(Some(lease_of_first_get(&response).unwrap_or(0)))
    }
}

/// The lease of the key the transaction's first `get` read (`None` when it read nothing).
fn lease_of_first_get(response: &etcd_client::TxnResponse) -> Option<i64> {
    response.op_responses().into_iter().find_map(|op| match op {
        etcd_client::TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.lease()),
        _ => None,
    })
}

#[async_trait::async_trait]
impl DistributedLock for EtcdDistributedLock {
    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND))]
    async fn acquire(&self, resource: &str, ttl: Duration) -> StateResult<LockGuard> {
        let until = wait_deadline(self.retry.total_wait())?;
        self.acquire_watching(resource, ttl, until, None).await
    }

    async fn acquire_within(
        &self,
        resource: &str,
        ttl: Duration,
        wait: Duration,
    ) -> StateResult<LockGuard> {
        self.acquire_watching(resource, ttl, wait_deadline(wait)?, None)
            .await
    }

    async fn acquire_cancellable(
        &self,
        resource: &str,
        ttl: Duration,
        cancel: &CancellationToken,
    ) -> StateResult<LockGuard> {
        let until = wait_deadline(crate::lock::MAX_TTL)?;
        self.acquire_watching(resource, ttl, until, Some(cancel))
            .await
    }

    fn retry_policy(&self) -> &RetryConfig {
        &self.retry
    }

    fn backend_name(&self) -> &'static str {
        BACKEND
    }

    async fn try_acquire(&self, resource: &str, ttl: Duration) -> StateResult<Option<LockGuard>> {
        telemetry::observe(BACKEND, Operation::Acquire, async move {
            validate_resource(resource)?;
            validate_ttl(ttl)?;
            Ok(match self.attempt(resource, ttl).await? {
                Attempt::Acquired(guard) => Some(guard),
                Attempt::Held { .. } => None,
            })
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
            let key = self.lock_key(resource);
            let txn = Txn::new()
                .when([Compare::value(
                    key.clone(),
                    CompareOp::Equal,
                    token.value.as_str(),
                )])
                .and_then([TxnOp::get(key.clone(), None), TxnOp::delete(key, None)]);
            let response = self
                .call("release", resource, |mut client| {
                    let txn = txn.clone();
                    async move { client.txn(txn).await }
                })
                .await?;
            if !response.succeeded() {
                return Err(StateError::LockLost {
                    resource: resource.to_owned(),
                });
            }
            // The key is gone; its lease can go too (best effort).
            if let Some(lease) = lease_of_first_get(&response).filter(|lease| *lease != 0) {
                self.revoke(resource, lease).await;
            }
            Ok(())
        })
        .await
    }

    fn service_id(&self, _internal: Internal) -> usize {
        Arc::as_ptr(&self.address).cast::<u8>() as usize
    }

    async fn is_locked(&self, resource: &str) -> StateResult<bool> {
        validate_resource(resource)?;
        let key = self.lock_key(resource);
        let response = self
            .call("inspect", resource, |mut client| {
                let key = key.clone();
                async move {
                    client
                        .get(key, Some(GetOptions::new().with_count_only()))
                        .await
                }
            })
            .await?;
        Ok(response.count() > 0)
    }

    #[tracing::instrument(level = "debug", skip(self, guard), fields(backend = BACKEND, resource = guard.resource()))]
    async fn extend(&self, guard: &mut LockGuard, ttl: Duration) -> StateResult<()> {
        telemetry::observe(BACKEND, Operation::Extend, async move {
            guard.ensure_issued_by(self.service_id(Internal::new()))?;
            validate_ttl(ttl)?;
            let resource = guard.resource().to_owned();
            let sent_at = Instant::now();
            let lease = self.grant(&resource, ttl).await?;
            let owner = guard.token().value.clone();
            let previous = match self.reattach(&resource, &owner, lease).await {
                Ok(Some(previous)) => previous,
                Ok(None) => {
                    self.revoke(&resource, lease).await;
                    return Err(StateError::LockLost { resource });
                }
                Err(err) => {
                    self.revoke(&resource, lease).await;
                    return Err(err);
                }
            };
            guard.record_extension(SystemTime::now() + ttl, safe_deadline(sent_at, ttl));
            // The key now lives on the new lease; the one it left holds nothing and would linger in the
            // cluster until it ran out (one per extend: a lease leak in a long-held lock's renewals).
            if previous != 0 && previous != lease {
                self.revoke(&resource, previous).await;
            }
            Ok(())
        })
        .await
    }

    /// etcd's tokens are the cluster's revision (the lock key's `create_revision`), shared by every key:
    /// it is raised by writing a marker key until the revision passes `at_least`, one revision per
    /// write, at most [`MAX_ETCD_REVISION_RAISE`] of them (a cluster rebuilt from nothing is further
    /// behind than that: restore it from a snapshot instead, which keeps its revision).
    async fn raise_fencing_counter(&self, resource: &str, at_least: u64) -> StateResult<()> {
        validate_resource(resource)?;
        let marker = format!("{}fence-raise", self.prefix);
        let revision_after_write = |marker: String| {
            self.call("raise the fencing counter", resource, move |mut client| {
                let marker = marker.clone();
                async move { client.put(marker, "", None).await }
            })
        };
        let mut revision = revision_after_write(marker.clone())
            .await?
            .header()
            .map_or(0, |header| u64::try_from(header.revision()).unwrap_or(0));
        if at_least.saturating_sub(revision) > MAX_ETCD_REVISION_RAISE {
            return Err(StateError::invalid(
                "fencing token",
                format!(
                    "etcd's revision is {revision}, {at_least} is more than {MAX_ETCD_REVISION_RAISE} writes away: restore the cluster from a snapshot (it keeps its revision) rather than raise it by writing"
                ),
            ));
        }
        while revision <= at_least {
            revision = revision_after_write(marker.clone())
                .await?
                .header()
                .map_or(revision + 1, |header| {
                    u64::try_from(header.revision()).unwrap_or(revision + 1)
                });
        }
        Ok(())
    }

    async fn get_lock_info(&self, resource: &str) -> StateResult<Option<LockToken>> {
        validate_resource(resource)?;
        let key = self.lock_key(resource);
        let response = self
            .call("inspect", resource, |mut client| {
                let key = key.clone();
                async move { client.get(key, None).await }
            })
            .await?;
        let Some(kv) = response.kvs().first() else {
            return Ok(None);
        };
        let owner = String::from_utf8_lossy(kv.value()).into_owned();
        let fencing_token = u64::try_from(kv.create_revision()).unwrap_or(0);
        let lease = kv.lease();
        let alive = self
            .call("inspect", resource, |mut client| async move {
                client.lease_time_to_live(lease, None).await
            })
            .await?;
        let (granted, remaining) = (
            Duration::from_secs(u64::try_from(alive.granted_ttl()).unwrap_or(0)),
            Duration::from_secs(u64::try_from(alive.ttl()).unwrap_or(0)),
        );
        // etcd keeps no timestamps: the lease's remaining and granted seconds place it in time.
        let expires_at = SystemTime::now() + remaining;
        let acquired_at = expires_at.checked_sub(granted).unwrap_or(expires_at);
        Ok(Some(LockToken::new(
            resource,
            owner,
            fencing_token,
            acquired_at,
            expires_at,
        )))
    }
}

/// The most revisions [`EtcdDistributedLock`]'s `raise_fencing_counter` writes its way up (about a
/// second per thousand on a healthy cluster).
pub const MAX_ETCD_REVISION_RAISE: u64 = 10_000;

/// Revokes the lease of an acquisition dropped before it finished. A key put with the lease goes with it,
/// and a put that reaches the cluster after the revoke fails (its lease is gone) — whatever order the two
/// requests take through a cluster of several members. An owner-checked delete would not do: a put still
/// in flight through another member can land after it and keep the lock held until the lease runs out.
struct RevokeOnCancel {
    lock: Option<EtcdDistributedLock>,
    resource: String,
    lease: i64,
}

impl RevokeOnCancel {
    fn arm(lock: &EtcdDistributedLock, resource: &str, lease: i64) -> Self {
        RevokeOnCancel {
            lock: Some(lock.clone()),
            resource: resource.to_owned(),
            lease,
        }
    }

    /// The acquisition finished: nothing to undo.
    fn disarm(mut self) {
        self.lock = None;
    }
}

impl Drop for RevokeOnCancel {
    fn drop(&mut self) {
        let Some(lock) = self.lock.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let (resource, lease) = (std::mem::take(&mut self.resource), self.lease);
                runtime.spawn(async move { lock.revoke(&resource, lease).await });
            }
            Err(_) => {
                tracing::debug!(resource = %self.resource, lease = self.lease, "acquisition dropped outside a runtime: its lease expires by itself");
            }
        }
    }
}

impl telemetry::Outcome for StateResult<Attempt> {
    fn outcome(&self) -> &'static str {
        match self {
            Ok(Attempt::Acquired(_)) => "acquired",
            Ok(Attempt::Held { .. }) => "contended",
            Err(_) => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_every_endpoint_and_hide_the_password() {
        let target = parse_etcd_url("etcd://root:hunter2@h1:2379, h2:22379/jobs").unwrap();
        assert_eq!(target.endpoints, ["http://h1:2379", "http://h2:22379"]);
        assert_eq!(
            target.credentials,
            Some(("root".to_owned(), "hunter2".to_owned()))
        );
        assert_eq!(target.prefix, "jobs/");
        assert_eq!(target.redacted(), "etcd://root:***@h1:2379,h2:22379/jobs/");
        assert!(!format!("{target:?}").contains("hunter2"));
        assert_eq!(parse_etcd_url("etcd://h1:2379").unwrap().prefix, "state/");
        let secure =
            parse_etcd_url("etcds://u:pw@h1:2379/jobs?ca=/c/ca.pem&cert=/c/me.pem&key=/c/me.key")
                .unwrap();
        assert_eq!(secure.endpoints, ["https://h1:2379"]);
        assert_eq!(secure.prefix, "jobs/");
        assert_eq!(
            secure.tls,
            Some(TlsFiles {
                ca: "/c/ca.pem".into(),
                identity: Some(("/c/me.pem".into(), "/c/me.key".into())),
            })
        );
        assert_eq!(secure.redacted(), "etcds://u:***@h1:2379/jobs/");
        let no_path = parse_etcd_url("etcds://h1:2379?ca=/c/ca.pem").unwrap();
        assert_eq!(
            (no_path.prefix.as_str(), no_path.tls.unwrap().identity),
            ("state/", None)
        );
        for bad in [
            "",
            "redis://h:1",
            "etcd://",
            "etcd://h1",
            "etcd://:pw@h1:2379",
            "etcd://h1:x",
            "etcd://h1:2379?ca=/c/ca.pem",
            "etcds://h1:2379",
            "etcds://h1:2379?ca=",
            "etcds://h1:2379?ca=/c/ca.pem&cert=/c/me.pem",
            "etcds://h1:2379?ca=/c/ca.pem&bogus=1",
        ] {
            match parse_etcd_url(bad) {
                Err(StateError::InvalidInput {
                    what: "etcd url",
                    reason,
                }) => {
                    assert!(!reason.contains("pw"), "{reason}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn leases_are_whole_seconds_rounded_up() {
        assert_eq!(lease_seconds(Duration::from_millis(300)), 1);
        assert_eq!(lease_seconds(Duration::from_secs(10)), 10);
        assert_eq!(lease_seconds(Duration::from_millis(10_001)), 11);
    }
}
