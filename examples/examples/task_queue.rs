//! A distributed task queue: 30 one-shot tasks and one recurring job, four workers. One worker "crashes"
//! mid-task (its runtime dies with it, so it never releases its claim): the task is reclaimed by another
//! worker once the claim expires. At the end every task has completed exactly once.
//!
//! ```text
//! cargo run -p examples --example task_queue
//! cargo run -p examples --example task_queue -- --lock-url redis://127.0.0.1:6379
//! cargo run -p examples --example task_queue -- --lock-url postgres://postgres@127.0.0.1/postgres
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::ensure;
use clap::Parser;
use examples::init_logs;
use state::recipes::tasks::TaskQueue;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// `memory`, `redis://…` or `postgres://…`.
    #[arg(long, env = "LOCK_URL", default_value = "memory")]
    lock_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logs();
    let args = Args::parse();
    let backend = examples::backend(&args.lock_url).await?;
    let run = format!("{:08x}", rand_suffix());
    let queue = TaskQueue::new(
        backend.lock.clone(),
        backend.tasks.clone(),
        Duration::from_millis(800),
    );
    for i in 0..30 {
        queue
            .submit(
                &format!("example-{run}-{i}"),
                format!("item {i}").as_bytes(),
            )
            .await?;
    }
    let recurring = format!("example-{run}-hourly-report");
    queue
        .ensure_recurring(&recurring, Duration::from_secs(3600), b"report")
        .await?;

    // Worker "crashy" claims one task and dies mid-way, without releasing its claim.
    let crashy = queue.clone();
    std::thread::spawn(move || -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let _ = tokio::time::timeout(
                Duration::from_millis(100),
                crashy.run_next(|task, _| async move {
                    println!("crashy worker claimed {} and crashes", task.id);
                    std::future::pending::<()>().await;
                    Ok(())
                }),
            )
            .await;
        });
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("crashy worker thread panicked"))??;

    let completed: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let stop = CancellationToken::new();
    let workers: Vec<_> = (0..4)
        .map(|worker| {
            let (queue, completed, stop) = (queue.clone(), completed.clone(), stop.clone());
            tokio::spawn(async move {
                queue
                    .run_worker(Duration::from_millis(50), stop, move |task, ctx| {
                        let completed = completed.clone();
                        async move {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            tracing::info!(worker, task = %task.id, token = ctx.fencing_token(), "done");
                            *completed.lock().unwrap_or_else(|p| p.into_inner()).entry(task.id).or_default() += 1;
                            Ok(())
                        }
                    })
                    .await
            })
        })
        .collect();

    // Wait until all 31 tasks ran (the crashed one after its claim expired).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while completed.lock().unwrap_or_else(|p| p.into_inner()).len() < 31 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "tasks did not all complete in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    for worker in workers {
        worker.await??;
    }
    let completed = completed.lock().unwrap_or_else(|p| p.into_inner()).clone();
    ensure!(
        completed.values().all(|n| *n == 1),
        "a task completed twice: {completed:?}"
    );
    let report = queue
        .task(&recurring)
        .await?
        .expect("the recurring job exists");
    println!(
        "31 tasks completed exactly once each (the crashed worker's task was reclaimed); \
         the recurring job ran {} time(s) and is due again in an hour",
        report.completions
    );
    println!("verdict: OK");
    Ok(())
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default()
}
