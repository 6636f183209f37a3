//! Redlock over 3 nodes vs. the single-node backend vs. `rslock` (the Redlock crate users pick today),
//! all on the same `redis-server`s in the same run, reported as ratios.
//!
//! - latency: one task doing acquire+release pairs back to back; p50 and p99 per pair;
//! - throughput: 32 tasks, each on its own resource, pairs per second for a fixed time;
//! - contended throughput: 32 tasks on one shared resource (each waits with the library's own retry
//!   policy: ours `acquire` with the default `RetryConfig`, rslock's `lock` with its defaults), completed
//!   pairs per second — how fast a lock changes hands.
//!
//! ```text
//! cargo bench -p benches --bench redlock       # full run (5 000 pairs, 5 s per throughput run)
//! cargo test  -p benches --bench redlock       # smoke run (small counts), as CI does
//! ```

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use integration_tests::{RedisCluster, RedisServer};
use state::{DistributedLock, RedisDistributedLock, RedlockDistributedLock};

const TTL: Duration = Duration::from_secs(10);
const TASKS: usize = 32;

struct Sizes {
    pairs: usize,
    run_for: Duration,
}

fn sizes() -> Sizes {
    if std::env::args().any(|arg| arg == "--bench") {
        Sizes {
            pairs: 5_000,
            run_for: Duration::from_secs(5),
        }
    } else {
        Sizes {
            pairs: 200,
            run_for: Duration::from_millis(500),
        }
    }
}

async fn ours(lock: &dyn DistributedLock, resource: &str) {
    let guard = lock
        .try_acquire(resource, TTL)
        .await
        .expect("acquire")
        .expect("uncontended");
    guard.release().await.expect("release");
}

/// One contended pair with the library's own waiting: `false` when it gave up (retries exhausted).
async fn ours_waiting(lock: &dyn DistributedLock, resource: &str) -> bool {
    match lock.acquire(resource, TTL).await {
        Ok(guard) => guard.release().await.is_ok(),
        Err(_) => false,
    }
}

async fn theirs_waiting(manager: &rslock::LockManager, resource: &str) -> bool {
    match manager.lock(resource, TTL).await {
        Ok(lock) => {
            manager.unlock(&lock).await;
            true
        }
        Err(_) => false,
    }
}

async fn theirs(manager: &rslock::LockManager, resource: &str) {
    let lock = manager.lock(resource, TTL).await.expect("rslock acquire");
    manager.unlock(&lock).await;
}

/// p50 and p99 of `pairs` sequential pairs.
async fn latency<F, Fut>(pairs: usize, mut pair: F) -> (Duration, Duration)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    for _ in 0..pairs / 10 {
        pair().await; // warm up connections and script caches
    }
    let mut samples = Vec::with_capacity(pairs);
    for _ in 0..pairs {
        let started = Instant::now();
        pair().await;
        samples.push(started.elapsed());
    }
    samples.sort();
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

/// Completed pairs per second of `TASKS` tasks, each looping on its own resource for `run_for`; `pair`
/// says whether its pair completed.
async fn throughput<F, Fut>(run_for: Duration, pair: F) -> f64
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    throughput_on(run_for, None, pair).await
}

/// As [`throughput`], but every task on `shared` when given.
async fn throughput_on<F, Fut>(run_for: Duration, shared: Option<&str>, pair: F) -> f64
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let pair = Arc::new(pair);
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (pair, done) = (Arc::clone(&pair), Arc::clone(&done));
            let resource = shared.map_or_else(|| format!("bench:tp:{task}"), str::to_owned);
            tokio::spawn(async move {
                while started.elapsed() < run_for {
                    if pair(resource.clone()).await {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("bench task");
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main]
async fn main() {
    let sizes = sizes();
    let single_server = RedisServer::start_new();
    let cluster = RedisCluster::new(3);
    let urls = cluster.urls();
    let url_refs: Vec<&str> = urls.iter().map(String::as_str).collect();

    let single: Arc<dyn DistributedLock> = Arc::new(
        RedisDistributedLock::new(&single_server.url())
            .await
            .expect("single"),
    );
    let redlock: Arc<dyn DistributedLock> = Arc::new(
        RedlockDistributedLock::new(&url_refs)
            .await
            .expect("redlock"),
    );
    let rslock = Arc::new(rslock::LockManager::new(urls.clone()));

    let (single_p50, single_p99) =
        latency(sizes.pairs, || ours(single.as_ref(), "bench:lat")).await;
    let (ours_p50, ours_p99) = latency(sizes.pairs, || ours(redlock.as_ref(), "bench:lat")).await;
    let (rs_p50, rs_p99) = latency(sizes.pairs, || theirs(&rslock, "bench:lat:rs")).await;

    let ours_tp = {
        let redlock = Arc::clone(&redlock);
        throughput(sizes.run_for, move |resource| {
            let redlock = Arc::clone(&redlock);
            async move {
                ours(redlock.as_ref(), &resource).await;
                true
            }
        })
        .await
    };
    let rs_tp = {
        let rslock = Arc::clone(&rslock);
        throughput(sizes.run_for, move |resource| {
            let rslock = Arc::clone(&rslock);
            async move {
                theirs(&rslock, &format!("{resource}:rs")).await;
                true
            }
        })
        .await
    };

    let ours_shared = {
        let redlock = Arc::clone(&redlock);
        throughput_on(sizes.run_for, Some("bench:shared"), move |resource| {
            let redlock = Arc::clone(&redlock);
            async move { ours_waiting(redlock.as_ref(), &resource).await }
        })
        .await
    };
    let rs_shared = {
        let rslock = Arc::clone(&rslock);
        throughput_on(sizes.run_for, Some("bench:shared:rs"), move |resource| {
            let rslock = Arc::clone(&rslock);
            async move { theirs_waiting(&rslock, &resource).await }
        })
        .await
    };

    // One node frozen (SIGSTOP): the quorum is still there; who keeps serving?
    cluster.node(2).pause();
    let bounded = Duration::from_millis(500);
    let ours_paused = {
        let redlock = Arc::clone(&redlock);
        throughput(sizes.run_for, move |resource| {
            let redlock = Arc::clone(&redlock);
            async move {
                tokio::time::timeout(bounded, ours(redlock.as_ref(), &resource))
                    .await
                    .is_ok()
            }
        })
        .await
    };
    let rs_paused = {
        let rslock = Arc::clone(&rslock);
        throughput(sizes.run_for, move |resource| {
            let rslock = Arc::clone(&rslock);
            async move {
                let resource = format!("{resource}:rs");
                tokio::time::timeout(bounded, theirs(&rslock, &resource))
                    .await
                    .is_ok()
            }
        })
        .await
    };
    cluster.node(2).resume();

    println!(
        "acquire+release pairs, {} sequential pairs per latency row, {TASKS} tasks for {:?} per throughput row",
        sizes.pairs, sizes.run_for
    );
    println!("| backend | p50 | p99 |");
    println!("|---|---|---|");
    println!(
        "| single node (RedisDistributedLock) | {} | {} |",
        ms(single_p50),
        ms(single_p99)
    );
    println!(
        "| Redlock, 3 nodes (RedlockDistributedLock) | {} | {} |",
        ms(ours_p50),
        ms(ours_p99)
    );
    println!("| rslock 0.10, 3 nodes | {} | {} |", ms(rs_p50), ms(rs_p99));
    println!();
    println!("| {TASKS} tasks | pairs/s |");
    println!("|---|---|");
    println!("| Redlock, 3 nodes (ours) | {ours_tp:.0} |");
    println!("| rslock 0.10, 3 nodes | {rs_tp:.0} |");
    println!(
        "| Redlock, 3 nodes, all {TASKS} on one resource (ours, `acquire`) | {ours_shared:.0} |"
    );
    println!("| rslock 0.10, 3 nodes, all {TASKS} on one resource (`lock`) | {rs_shared:.0} |");
    println!(
        "| Redlock, 3 nodes, one node frozen (ours) | {ours_paused:.0} (completed pairs/s; a pair not done within {bounded:?} is abandoned) |"
    );
    println!(
        "| rslock 0.10, 3 nodes, one node frozen | {rs_paused:.0} (completed pairs/s; a pair not done within {bounded:?} is abandoned) |"
    );
    println!();
    let latency_ratio = ours_p50.as_secs_f64() / single_p50.as_secs_f64();
    let throughput_ratio = ours_tp / rs_tp;
    println!("ratio: our 3-node p50 / our single-node p50 = {latency_ratio:.2} (target <= 1.5)");
    println!(
        "ratio: our 3-node pairs/s / rslock pairs/s  = {throughput_ratio:.2} (target >= 2.0), own resource per task"
    );
    println!(
        "ratio: our 3-node pairs/s / rslock pairs/s  = {:.2} (target >= 2.0), one shared resource",
        ours_shared / rs_shared.max(f64::MIN_POSITIVE)
    );
}
