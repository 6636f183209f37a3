//! Leader election on a kept lock: at most one leader per election at a time, with a fencing token per
//! term, heartbeats, a watch of leadership changes, and a leader that steps down *before* its lease can
//! run out when it cannot renew.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> state::StateResult<()> {
//! use std::{sync::Arc, time::Duration};
//! use state::recipes::leader::LeaderElection;
//! use state::{DistributedLock, InMemoryDistributedLock};
//!
//! let locks: Arc<dyn DistributedLock> = Arc::new(InMemoryDistributedLock::new());
//! let a = LeaderElection::new(Arc::clone(&locks), "scheduler", "node-a", Duration::from_secs(3))?;
//! let b = LeaderElection::new(Arc::clone(&locks), "scheduler", "node-b", Duration::from_secs(3))?;
//! assert!(a.try_become_leader().await?);
//! assert!(!b.try_become_leader().await?);
//! let term = a.fencing_token().unwrap();
//! a.resign().await?;                       // hands over at once
//! assert!(b.try_become_leader().await?);
//! assert!(b.fencing_token().unwrap() > term);
//! # Ok(()) }
//! ```

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::lock::{validate_resource, validate_ttl};
use crate::recipes::keeper::{KeptLock, LockContext, RenewalPolicy};
use crate::{DistributedLock, StateError, StateResult};

/// Where a candidate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Leadership {
    /// Not the leader.
    Follower,
    /// The leader, for the term with this fencing token.
    Leader {
        /// The term's fencing token: pass it with every write the leader makes.
        fencing_token: u64,
    },
}

/// One candidate in the election `name` (lock resource `leader:{name}`).
pub struct LeaderElection {
    lock: Arc<dyn DistributedLock>,
    resource: String,
    candidate: String,
    ttl: Duration,
    policy: RenewalPolicy,
    state: watch::Sender<Leadership>,
    term: Mutex<Option<Term>>,
}

/// One term. The watcher comes first so that it is aborted before the kept lock is dropped (which
/// cancels the lost-token the watcher waits on): a dropped election ends its watcher quietly.
struct Term {
    watcher: AbortOnDropHandle<()>,
    kept: KeptLock,
}

impl std::fmt::Debug for LeaderElection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElection")
            .field("resource", &self.resource)
            .field("candidate", &self.candidate)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl LeaderElection {
    /// A candidate `candidate` (for logs) in election `name`, holding terms as leases of `ttl`, renewed
    /// every `ttl / 3`.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a bad name or TTL.
    pub fn new(
        lock: Arc<dyn DistributedLock>,
        name: &str,
        candidate: &str,
        ttl: Duration,
    ) -> StateResult<Self> {
        let resource = format!("leader:{name}");
        validate_resource(&resource)?;
        validate_ttl(ttl)?;
        let (state, _) = watch::channel(Leadership::Follower);
        Ok(LeaderElection {
            lock,
            resource,
            candidate: candidate.to_owned(),
            ttl,
            policy: RenewalPolicy::default(),
            state,
            term: Mutex::new(None),
        })
    }

    /// Uses `policy` for the heartbeats.
    pub fn with_renewal_policy(mut self, policy: RenewalPolicy) -> Self {
        self.policy = policy;
        self
    }

    fn term(&self) -> MutexGuard<'_, Option<Term>> {
        self.term.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One attempt to become leader; `Ok(true)` if this candidate leads now (also if it already did).
    ///
    /// # Errors
    /// A backend error.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn try_become_leader(&self) -> StateResult<bool> {
        if self.is_leader() {
            return Ok(true);
        }
        let Some(kept) =
            KeptLock::try_acquire(&self.lock, &self.resource, self.ttl, self.policy.clone())
                .await?
        else {
            return Ok(false);
        };
        let fencing_token = kept.fencing_token();
        let lost = kept.lost_token();
        let state = self.state.clone();
        let (resource, candidate) = (self.resource.clone(), self.candidate.clone());
        let watcher = AbortOnDropHandle::new(tokio::spawn(async move {
            lost.cancelled().await;
            tracing::warn!(resource, candidate, fencing_token, "leadership lost");
            crate::telemetry::leadership_changed(&resource, None);
            state.send_replace(Leadership::Follower);
        }));
        if let Some(old) = self.term().replace(Term { watcher, kept }) {
            old.watcher.abort();
        }
        tracing::info!(resource = %self.resource, candidate = %self.candidate, fencing_token, "became leader");
        crate::telemetry::leadership_changed(&self.resource, Some(fencing_token));
        self.state
            .send_replace(Leadership::Leader { fencing_token });
        Ok(true)
    }

    /// Whether this candidate still leads (heartbeats run in the background; this checks they have
    /// not failed). A leader that could not renew has stepped down by its safe deadline.
    pub fn maintain_leadership(&self) -> bool {
        let mut term = self.term();
        let lost = term.as_ref().is_none_or(|t| t.kept.is_lost());
        if lost {
            if let Some(old) = term.take() {
                old.watcher.abort();
            }
            self.state.send_if_modified(|state| {
                let changed = *state != Leadership::Follower;
                *state = Leadership::Follower;
                changed
            });
        }
        !lost
    }

    /// Whether this candidate leads now.
    pub fn is_leader(&self) -> bool {
        matches!(*self.state.borrow(), Leadership::Leader { .. }) && self.maintain_leadership()
    }

    /// The current term's fencing token, while leading.
    pub fn fencing_token(&self) -> Option<u64> {
        match *self.state.borrow() {
            Leadership::Leader { fencing_token } => Some(fencing_token),
            Leadership::Follower => None,
        }
    }

    /// A token cancelled when the current term ends (`None` when not leading): hand it to leader-only work.
    pub fn term_token(&self) -> Option<CancellationToken> {
        self.term().as_ref().map(|t| t.kept.lost_token())
    }

    /// The current term's context — fencing token, lost-token and safe deadline — while leading.
    pub fn term_context(&self) -> Option<LockContext> {
        self.term().as_ref().map(|t| t.kept.context())
    }

    /// Leadership changes, starting with the current state.
    pub fn watch(&self) -> watch::Receiver<Leadership> {
        self.state.subscribe()
    }

    /// Steps down at once and releases the lock so another candidate can take over without waiting
    /// for the TTL.
    ///
    /// # Errors
    /// [`StateError::LockLost`] if leadership had already been lost; a backend error.
    pub async fn resign(&self) -> StateResult<()> {
        let term = self.term().take();
        self.state.send_replace(Leadership::Follower);
        match term {
            Some(term) => {
                term.watcher.abort();
                term.kept.release().await
            }
            None => Ok(()),
        }
    }

    /// Campaigns until `cancel` fires: tries to lead every `retry_every` while following, watches the term
    /// while leading. Resigns when cancelled.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`] for a zero `retry_every`. Backend errors are logged and retried.
    ///
    /// # Cancel safety
    /// Dropping the future leaves the current term to its heartbeats; cancel through `cancel` to resign.
    pub async fn campaign(
        &self,
        retry_every: Duration,
        cancel: CancellationToken,
    ) -> StateResult<()> {
        if retry_every.is_zero() {
            return Err(StateError::invalid("retry interval", "must not be zero"));
        }
        let mut state = self.watch();
        loop {
            if !self.is_leader()
                && let Err(err) = self.try_become_leader().await
            {
                tracing::debug!(resource = %self.resource, error = %err, "campaign attempt failed");
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(retry_every), if !self.is_leader() => {}
                _ = state.changed() => {}
            }
        }
        let _ = self.resign().await;
        Ok(())
    }
}
