//! Quickstart: mutual exclusion and fencing tokens, on the in-process backend by default.
//!
//! What it shows:
//! 1. 8 workers increment a deliberately unsynchronised counter (read, pause, write) 25 times each
//!    under one lock: the total is exact.
//! 2. Why fencing tokens matter: a worker whose lease expires while it is "paused" (think GC pause)
//!    tries to write afterwards; a storage register that keeps the highest fencing token it has seen
//!    rejects the stale write, while the new holder's write lands.
//!
//! Run it:
//! ```text
//! cargo run -p examples --example quickstart
//! cargo run -p examples --example quickstart -- --lock-url redis://127.0.0.1:6379
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use state::DistributedLock;
use tokio::sync::Mutex;

#[derive(Parser, Debug)]
#[command(about = "Distributed lock quickstart: mutual exclusion and fencing tokens")]
struct Args {
    /// `memory` (in-process) or a `redis://` URL.
    #[arg(long, env = "LOCK_URL", default_value = "memory")]
    lock_url: String,
    /// Concurrent workers.
    #[arg(long, default_value_t = 8)]
    workers: u64,
    /// Increments per worker.
    #[arg(long, default_value_t = 25)]
    increments: u64,
}

async fn lock_service(url: &str) -> anyhow::Result<Arc<dyn DistributedLock>> {
    Ok(examples::backend(url).await?.lock)
}

/// A storage register that accepts a write only with a fencing token at least as high as any it has
/// seen: the storage side of fencing.
#[derive(Default)]
struct FencedRegister {
    inner: Mutex<(u64, String)>,
}

impl FencedRegister {
    async fn write(&self, fencing_token: u64, value: &str) -> Result<(), u64> {
        let mut inner = self.inner.lock().await;
        if fencing_token < inner.0 {
            return Err(inner.0);
        }
        *inner = (fencing_token, value.to_owned());
        Ok(())
    }
}

async fn counter_under_lock(locks: &Arc<dyn DistributedLock>, args: &Args) -> anyhow::Result<()> {
    let counter = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.workers {
        let (locks, counter, increments) =
            (Arc::clone(locks), Arc::clone(&counter), args.increments);
        workers.push(tokio::spawn(async move {
            for _ in 0..increments {
                let guard = locks
                    .acquire("quickstart:counter", Duration::from_secs(5))
                    .await?;
                let read = counter.load(Ordering::SeqCst);
                tokio::task::yield_now().await; // the race window a lock must close
                counter.store(read + 1, Ordering::SeqCst);
                guard.release().await?;
            }
            anyhow::Ok(())
        }));
    }
    for worker in workers {
        worker.await??;
    }
    let expected = args.workers * args.increments;
    let got = counter.load(Ordering::SeqCst);
    println!(
        "1. {} workers x {} increments under the lock: counter = {got} (expected {expected}) in {:?}",
        args.workers,
        args.increments,
        started.elapsed()
    );
    if got != expected {
        bail!("lost updates: the lock did not exclude");
    }
    Ok(())
}

async fn fencing_rejects_a_paused_holder(locks: &Arc<dyn DistributedLock>) -> anyhow::Result<()> {
    let register = FencedRegister::default();
    let old = locks
        .acquire("quickstart:register", Duration::from_millis(300))
        .await?;
    println!(
        "2. worker A holds the lock with fencing token {}",
        old.fencing_token()
    );
    tokio::time::sleep(Duration::from_millis(400)).await; // A is "paused" past its lease
    let new = locks
        .acquire("quickstart:register", Duration::from_secs(5))
        .await?;
    println!(
        "   A's lease expired; worker B took over with fencing token {}",
        new.fencing_token()
    );
    register
        .write(new.fencing_token(), "written by B")
        .await
        .map_err(|seen| anyhow::anyhow!("B's write was rejected (highest seen {seen})"))?;
    match register.write(old.fencing_token(), "written by A").await {
        Err(seen) => println!(
            "   A wakes up and writes with token {}: rejected, the register has seen {seen}",
            old.fencing_token()
        ),
        Ok(()) => bail!("the stale write was accepted"),
    }
    match old.release().await {
        Err(err) => println!("   A's release reports: {err}"),
        Ok(()) => bail!("a false unlock passed silently"),
    }
    new.release().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let locks = lock_service(&args.lock_url).await?;
    println!("lock service: {locks:?}");
    counter_under_lock(&locks, &args).await?;
    fencing_rejects_a_paused_holder(&locks).await?;
    println!("verdict: OK");
    Ok(())
}
