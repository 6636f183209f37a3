//! The measurement loops the lock benchmarks share: sequential latency percentiles and completed
//! operations per second of concurrent tasks for a fixed time.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// p50 and p99 of `samples` sequential runs of `op`, after a warm-up of a tenth as many (connections
/// and script caches).
pub async fn latency<F, Fut>(samples: usize, mut op: F) -> (Duration, Duration)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..samples / 10 {
        op().await;
    }
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples.max(1) {
        let started = Instant::now();
        op().await;
        times.push(started.elapsed());
    }
    times.sort();
    (times[times.len() / 2], times[times.len() * 99 / 100])
}

/// Completed operations per second of `tasks` tasks looping for `run_for`, each on its own resource
/// (`{prefix}:{task}`), or all on `prefix` itself when `shared`; `op` says whether its operation
/// completed (a failed or abandoned one counts 0).
pub async fn throughput<F, Fut>(
    tasks: usize,
    run_for: Duration,
    prefix: &str,
    shared: bool,
    op: F,
) -> f64
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let (op, done) = (Arc::clone(&op), Arc::clone(&done));
            let resource = if shared {
                prefix.to_owned()
            } else {
                format!("{prefix}:{task}")
            };
            tokio::spawn(async move {
                while started.elapsed() < run_for {
                    if op(resource.clone()).await {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for handle in handles {
        let _ = handle.await;
    }
    #[allow(clippy::cast_precision_loss)]
    let per_second = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    per_second
}

/// `d` in milliseconds with three decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}
