//! Coordinated checkpoints: three instances of a job keep a running total and try to checkpoint it every
//! 50 ms; the coordinator lets one at a time through and records each checkpoint with its lock's fencing
//! token. An instance that took a checkpoint and then stalled tries to record it late: rejected.
//!
//! ```text
//! cargo run -p examples --example checkpoint
//! cargo run -p examples --example checkpoint -- --lock-url redis://127.0.0.1:6379
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, ensure};
use clap::Parser;
use examples::init_logs;
use state::recipes::checkpoint::{CheckpointCoordinator, CheckpointTarget};
use state::recipes::keeper::LockContext;
use state::{StateError, StateResult};

#[derive(Parser)]
struct Args {
    /// `memory`, `redis://…` or `postgres://…`.
    #[arg(long, env = "LOCK_URL", default_value = "memory")]
    lock_url: String,
}

/// The state being checkpointed, and a check that checkpoints never run at the same time.
struct RunningTotal {
    total: Arc<AtomicU64>,
    inside: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl CheckpointTarget for RunningTotal {
    async fn create_checkpoint(&self, ctx: &LockContext) -> StateResult<Vec<u8>> {
        if self.inside.fetch_add(1, Ordering::SeqCst) != 0 {
            return Err(StateError::invalid(
                "checkpoint",
                "two checkpoints ran at once",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // copy files, ...
        self.inside.fetch_sub(1, Ordering::SeqCst);
        let total = self.total.load(Ordering::SeqCst);
        Ok(format!("total={total} token={}", ctx.fencing_token()).into_bytes())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logs();
    let args = Args::parse();
    let backend = examples::backend(&args.lock_url).await?;
    let total = Arc::new(AtomicU64::new(0));
    let inside = Arc::new(AtomicUsize::new(0));
    let coordinator = CheckpointCoordinator::new(
        backend.lock.clone(),
        backend.fenced.clone(),
        Duration::from_secs(5),
    )
    .with_scope("example");

    let mut instances = Vec::new();
    for instance in 0..3 {
        let coordinator = coordinator.clone();
        let target = RunningTotal {
            total: total.clone(),
            inside: inside.clone(),
        };
        instances.push(tokio::spawn(async move {
            let (mut taken, mut skipped) = (0, 0);
            for _ in 0..10 {
                target.total.fetch_add(1, Ordering::SeqCst);
                match coordinator.checkpoint(&target).await? {
                    Some(_) => taken += 1,
                    None => skipped += 1,
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            println!("instance {instance}: {taken} checkpoints taken, {skipped} skipped (another was running)");
            anyhow::Ok(taken)
        }));
    }
    let mut taken = 0;
    for instance in instances {
        taken += instance.await??;
    }
    ensure!(taken > 0, "no checkpoint was taken");
    let latest = coordinator
        .latest()
        .await?
        .expect("a checkpoint was recorded");
    println!(
        "latest checkpoint: {} (token {})",
        String::from_utf8_lossy(&latest.value),
        latest.token
    );

    // A stalled instance that took a checkpoint under an older token records it late.
    match coordinator
        .record(latest.token - 1, b"stale checkpoint")
        .await
    {
        Err(StateError::StaleFencingToken { highest, .. }) => {
            println!(
                "a stalled instance records with token {}: rejected (store has seen {highest})",
                latest.token - 1
            )
        }
        other => bail!("a stale checkpoint was accepted: {other:?}"),
    }
    println!("verdict: OK");
    Ok(())
}
