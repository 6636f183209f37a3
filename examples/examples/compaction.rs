//! Per-partition compaction: three workers each walk all 8 partitions and try to compact them. A partition
//! that another worker is compacting is skipped (not waited for); no partition is ever compacted by two
//! workers at once.
//!
//! ```text
//! cargo run -p examples --example compaction
//! cargo run -p examples --example compaction -- --lock-url redis://127.0.0.1:6379
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::ensure;
use clap::Parser;
use examples::init_logs;
use state::StateError;
use state::recipes::compaction::{CompactionOutcome, compact_partition};

#[derive(Parser)]
struct Args {
    /// `memory`, `redis://…` or `postgres://…`.
    #[arg(long, env = "LOCK_URL", default_value = "memory")]
    lock_url: String,
}

const PARTITIONS: u32 = 8;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logs();
    let args = Args::parse();
    let backend = examples::backend(&args.lock_url).await?;
    let busy: Arc<Vec<AtomicUsize>> =
        Arc::new((0..PARTITIONS).map(|_| AtomicUsize::new(0)).collect());
    let compacted: Arc<Vec<AtomicUsize>> =
        Arc::new((0..PARTITIONS).map(|_| AtomicUsize::new(0)).collect());

    let mut workers = Vec::new();
    for worker in 0..3u32 {
        let (lock, busy, compacted) = (backend.lock.clone(), busy.clone(), compacted.clone());
        workers.push(tokio::spawn(async move {
            let (mut done, mut skipped) = (0, 0);
            for step in 0..PARTITIONS {
                let partition = step; // all workers walk the same order, so they collide
                let (busy, compacted) = (busy.clone(), compacted.clone());
                let outcome =
                    compact_partition(&lock, partition, Duration::from_secs(5), |ctx| async move {
                        let slot = &busy[partition as usize];
                        if slot.fetch_add(1, Ordering::SeqCst) != 0 {
                            return Err(StateError::invalid(
                                "compaction",
                                "partition compacted twice at once",
                            ));
                        }
                        tokio::time::sleep(Duration::from_millis(30)).await; // merge files
                        slot.fetch_sub(1, Ordering::SeqCst);
                        compacted[partition as usize].fetch_add(1, Ordering::SeqCst);
                        Ok(ctx.fencing_token())
                    })
                    .await;
                match outcome {
                    Ok(CompactionOutcome::Completed(_)) => done += 1,
                    Ok(CompactionOutcome::Skipped) => skipped += 1,
                    Ok(other) => anyhow::bail!("unexpected outcome {other:?}"),
                    Err(err) => return Err(err.into()),
                }
            }
            println!(
                "worker {worker}: compacted {done} partitions, skipped {skipped} claimed elsewhere"
            );
            anyhow::Ok(())
        }));
    }
    for worker in workers {
        worker.await??;
    }
    for (partition, count) in compacted.iter().enumerate() {
        ensure!(
            count.load(Ordering::SeqCst) >= 1,
            "partition {partition} was never compacted"
        );
    }
    println!("every partition compacted at least once, never twice at the same time");
    println!("verdict: OK");
    Ok(())
}
