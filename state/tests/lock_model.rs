//! A model-based property test of the lock contract: random sequences of acquire, extend, release,
//! inspection and clock advances (on a paused tokio clock, so expiry is exact) run against the
//! in-process backend and against a reference model of what the contract promises; every answer must
//! agree, and fencing tokens must strictly increase.
//!
//! The model: a resource is held by the guard that last got it until its deadline (grant or extension
//! time + TTL) or its release; `try_acquire` gets it exactly when nobody holds it; `extend` and `release`
//! succeed exactly for the current holder and fail with `LockLost` otherwise.

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use state::{DistributedLock, InMemoryDistributedLock, LockGuard, StateError};
use tokio::time::Instant;

const RESOURCES: [&str; 2] = ["a", "b"];

#[derive(Debug, Clone)]
enum Op {
    Acquire { resource: usize, ttl_ms: u64 },
    Extend { guard: usize, ttl_ms: u64 },
    Release { guard: usize },
    IsLocked { resource: usize },
    Info { resource: usize },
    Advance { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..RESOURCES.len(), 1u64..400).prop_map(|(resource, ttl_ms)| Op::Acquire { resource, ttl_ms }),
        2 => (0usize..16, 1u64..400).prop_map(|(guard, ttl_ms)| Op::Extend { guard, ttl_ms }),
        2 => (0usize..16).prop_map(|guard| Op::Release { guard }),
        1 => (0..RESOURCES.len()).prop_map(|resource| Op::IsLocked { resource }),
        1 => (0..RESOURCES.len()).prop_map(|resource| Op::Info { resource }),
        3 => (0u64..300).prop_map(|ms| Op::Advance { ms }),
    ]
}

/// The reference model.
#[derive(Default)]
struct Model {
    /// resource → (guard index, deadline)
    holders: HashMap<usize, (usize, Instant)>,
    last_token: u64,
}

impl Model {
    fn holder(&mut self, resource: usize, now: Instant) -> Option<usize> {
        match self.holders.get(&resource) {
            Some(&(guard, deadline)) if deadline > now => Some(guard),
            Some(_) => {
                self.holders.remove(&resource);
                None
            }
            None => None,
        }
    }
}

/// A guard the test obtained: its resource, and the guard until it is released.
struct Held {
    resource: usize,
    guard: Option<LockGuard>,
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let locks = InMemoryDistributedLock::new();
    let mut model = Model::default();
    let mut guards: Vec<Held> = Vec::new();
    for op in ops {
        let now = Instant::now();
        match op {
            Op::Acquire { resource, ttl_ms } => {
                let ttl = Duration::from_millis(ttl_ms);
                let expected = model.holder(resource, now).is_none();
                let got = locks
                    .try_acquire(RESOURCES[resource], ttl)
                    .await
                    .map_err(|err| TestCaseError::fail(format!("try_acquire: {err}")))?;
                prop_assert_eq!(
                    got.is_some(),
                    expected,
                    "try_acquire {}",
                    RESOURCES[resource]
                );
                if let Some(guard) = got {
                    prop_assert!(
                        guard.fencing_token() > model.last_token,
                        "tokens must increase"
                    );
                    model.last_token = guard.fencing_token();
                    model.holders.insert(resource, (guards.len(), now + ttl));
                    guards.push(Held {
                        resource,
                        guard: Some(guard),
                    });
                }
            }
            Op::Extend { guard, ttl_ms } => {
                let ttl = Duration::from_millis(ttl_ms);
                let Some(held) = guards.get_mut(guard) else {
                    continue;
                };
                let Some(lock_guard) = held.guard.as_mut() else {
                    continue;
                };
                let holds = model.holder(held.resource, now) == Some(guard);
                match locks.extend(lock_guard, ttl).await {
                    Ok(()) => {
                        prop_assert!(holds, "extend succeeded for a guard that does not hold");
                        model.holders.insert(held.resource, (guard, now + ttl));
                    }
                    Err(StateError::LockLost { .. }) => {
                        prop_assert!(!holds, "extend lost a lock the guard holds");
                    }
                    Err(err) => return Err(TestCaseError::fail(format!("extend: {err}"))),
                }
            }
            Op::Release { guard } => {
                let Some(held) = guards.get_mut(guard) else {
                    continue;
                };
                let Some(lock_guard) = held.guard.take() else {
                    continue;
                };
                let holds = model.holder(held.resource, now) == Some(guard);
                match lock_guard.release().await {
                    Ok(()) => {
                        prop_assert!(holds, "release succeeded for a guard that does not hold");
                        model.holders.remove(&held.resource);
                    }
                    Err(StateError::LockLost { .. }) => {
                        prop_assert!(!holds, "release refused the holder");
                    }
                    Err(err) => return Err(TestCaseError::fail(format!("release: {err}"))),
                }
            }
            Op::IsLocked { resource } => {
                let expected = model.holder(resource, now).is_some();
                let got = locks
                    .is_locked(RESOURCES[resource])
                    .await
                    .map_err(|err| TestCaseError::fail(format!("is_locked: {err}")))?;
                prop_assert_eq!(got, expected, "is_locked {}", RESOURCES[resource]);
            }
            Op::Info { resource } => {
                let expected = model.holder(resource, now);
                let got = locks
                    .get_lock_info(RESOURCES[resource])
                    .await
                    .map_err(|err| TestCaseError::fail(format!("get_lock_info: {err}")))?;
                match (got, expected) {
                    (None, None) => {}
                    (Some(info), Some(guard)) => {
                        let holder = guards[guard].guard.as_ref().map(LockGuard::fencing_token);
                        prop_assert_eq!(Some(info.fencing_token), holder, "the holder's token");
                    }
                    (got, expected) => {
                        return Err(TestCaseError::fail(format!(
                            "get_lock_info: {got:?}, the model says guard {expected:?}"
                        )));
                    }
                }
            }
            Op::Advance { ms } => tokio::time::advance(Duration::from_millis(ms)).await,
        }
    }
    for held in guards {
        if let Some(guard) = held.guard {
            let _ = guard.leak();
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_in_process_lock_follows_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .map_err(|err| TestCaseError::fail(format!("runtime: {err}")))?;
        runtime.block_on(run(ops))?;
    }
}
