//! Metrics through the [`metrics`] facade: the crate records, the application chooses the exporter (a
//! Prometheus endpoint, StatsD, nothing). Without an installed recorder every call is a no-op.
//!
//! | series | type | labels | what |
//! |---|---|---|---|
//! | `state_lock_operation_duration_seconds` | histogram | `backend`, `operation`, `outcome` | one backend round trip: `acquire` (one attempt), `release`, `extend` |
//! | `state_lock_acquire_attempts_total` | counter | `backend`, `outcome` | attempts: `acquired`, `contended` (held by another), `error` |
//! | `state_lock_acquire_retries_total` | counter | `backend` | attempts after the first within one `acquire` |
//! | `state_lock_extends_total` | counter | `backend`, `outcome` | extensions: `ok`, `lost`, `error` |
//! | `state_lock_releases_total` | counter | `backend`, `outcome` | releases: `ok`, `lost` (no longer ours), `error` |
//! | `state_locks_lost_total` | counter | `backend` | kept locks reported lost by their keeper |
//! | `state_leader_changes_total` | counter | `election` | terms this process won or lost |
//! | `state_leader_term` | gauge | `election` | the fencing token of this process's current term (0: not leading) |
//! | `state_tasks_total` | counter | `event` | task queue: `claimed`, `completed`, `retried` (failed, tried again later), `dead_lettered`, `claim_lost` (the worker's claim lapsed mid-run: another worker runs it again), `requeued` |
//!
//! Labels stay low-cardinality on purpose: resources (lock names) are never labels.

use std::future::Future;

use crate::error::{StateError, StateResult};

/// A backend operation whose duration and outcome are recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Acquire,
    Release,
    Extend,
}

/// How an operation ended, as a label value.
pub(crate) trait Outcome {
    /// `acquired`/`contended`, `ok`/`lost`, or `error`.
    fn outcome(&self) -> &'static str;
}

impl<T> Outcome for StateResult<Option<T>> {
    fn outcome(&self) -> &'static str {
        match self {
            Ok(Some(_)) => "acquired",
            Ok(None) => "contended",
            Err(_) => "error",
        }
    }
}

impl Outcome for StateResult<()> {
    fn outcome(&self) -> &'static str {
        match self {
            Ok(()) => "ok",
            Err(StateError::LockLost { .. }) => "lost",
            Err(_) => "error",
        }
    }
}

/// Runs one backend operation and records its duration and outcome.
pub(crate) async fn observe<R: Outcome>(
    backend: &'static str,
    operation: Operation,
    work: impl Future<Output = R>,
) -> R {
    let started = std::time::Instant::now();
    let result = work.await;
    finish(backend, operation, started, &result);
    result
}

/// Records one operation that began at `started` and ended with `result`: [`observe`] without a future
/// around the work, for the hottest paths (every layer of future is copied when it is created).
pub(crate) fn finish<R: Outcome>(
    backend: &'static str,
    operation: Operation,
    started: std::time::Instant,
    result: &R,
) {
    record(
        backend,
        operation,
        result.outcome(),
        started.elapsed().as_secs_f64(),
    );
}

/// Records one operation. Every label is a literal here, so the `metrics` macros build static keys
/// (hashed once, no allocation): this runs on every lock operation, recorder or not.
fn record(backend: &'static str, operation: Operation, outcome: &'static str, seconds: f64) {
    macro_rules! emit {
        ($backend:literal) => {
            match (operation, outcome) {
                (Operation::Acquire, "acquired") => {
                    metrics::histogram!("state_lock_operation_duration_seconds", "backend" => $backend, "operation" => "acquire", "outcome" => "acquired").record(seconds);
                    metrics::counter!("state_lock_acquire_attempts_total", "backend" => $backend, "outcome" => "acquired").increment(1);
                }
                (Operation::Acquire, "contended") => {
                    metrics::histogram!("state_lock_operation_duration_seconds", "backend" => $backend, "operation" => "acquire", "outcome" => "contended").record(seconds);
                    metrics::counter!("state_lock_acquire_attempts_total", "backend" => $backend, "outcome" => "contended").increment(1);
                }
                (Operation::Acquire, _) => {
                    metrics::histogram!("state_lock_operation_duration_seconds", "backend" => $backend, "operation" => "acquire", "outcome" => "error").record(seconds);
                    metrics::counter!("state_lock_acquire_attempts_total", "backend" => $backend, "outcome" => "error").increment(1);
                }
                (Operation::Release, "ok") => {
                    metrics::histogram!("state_lock_operation_duration_seconds", "backend" => $backend, "operation" => "release", "outcome" => "ok").record(seconds);
                    metrics::counter!("state_lock_releases_total", "backend" => $backend, "outcome" => "ok").increment(1);
                }
                (Operation::Release, "lost") => {
                    metrics::histogram!("state_lock_operation_duration_seconds", "backend" => $backend, "operation" => "release", "outcome" => "lost").record(seconds);
                    metrics::counter!("state_lock_releases_total", "backend" => $backend, "outcome" => "lost").increment(1);
                }
                (Operation::Release, _) => {
                    metrics::histogram!("state_lock_operation_duration_seconds", "backend" => $backend, "operation" => "release", "outcome" => "error").record(seconds);
                    metrics::counter!("state_lock_releases_total", "backend" => $backend, "outcome" => "error").increment(1);
                }
                (Operation::Extend, "ok") => {
                    metrics::histogram!("state_lock_operation_duration_seconds", "backend" => $backend, "operation" => "extend", "outcome" => "ok").record(seconds);
                    metrics::counter!("state_lock_extends_total", "backend" => $backend, "outcome" => "ok").increment(1);
                }
                (Operation::Extend, "lost") => {
                    metrics::histogram!("state_lock_operation_duration_seconds", "backend" => $backend, "operation" => "extend", "outcome" => "lost").record(seconds);
                    metrics::counter!("state_lock_extends_total", "backend" => $backend, "outcome" => "lost").increment(1);
                }
                (Operation::Extend, _) => {
                    metrics::histogram!("state_lock_operation_duration_seconds", "backend" => $backend, "operation" => "extend", "outcome" => "error").record(seconds);
                    metrics::counter!("state_lock_extends_total", "backend" => $backend, "outcome" => "error").increment(1);
                }
            }
        };
    }
    match backend {
        "memory" => emit!("memory"),
        "redis" => emit!("redis"),
        "redlock" => emit!("redlock"),
        "postgres" => emit!("postgres"),
        "etcd" => emit!("etcd"),
        _ => emit!("custom"),
    }
}

/// One more attempt than the first within an `acquire`.
pub(crate) fn acquire_retried(backend: &'static str) {
    metrics::counter!("state_lock_acquire_retries_total", "backend" => backend).increment(1);
}

/// A kept lock was reported lost.
pub(crate) fn lock_lost(backend: &'static str) {
    metrics::counter!("state_locks_lost_total", "backend" => backend).increment(1);
}

/// This process won (`Some(term)`) or lost (`None`) leadership of `election`.
pub(crate) fn leadership_changed(election: &str, term: Option<u64>) {
    let election = election.to_owned();
    metrics::counter!("state_leader_changes_total", "election" => election.clone()).increment(1);
    // A gauge holds an f64: terms up to 2^53 are exact, far beyond any real count of terms.
    #[allow(clippy::cast_precision_loss)]
    metrics::gauge!("state_leader_term", "election" => election).set(term.unwrap_or(0) as f64);
}

/// A task queue event: `claimed`, `completed`, `retried`, `dead_lettered`, `claim_lost`, `requeued`.
pub(crate) fn task_event(event: &'static str) {
    metrics::counter!("state_tasks_total", "event" => event).increment(1);
}
