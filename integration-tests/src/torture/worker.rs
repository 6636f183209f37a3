//! One contending process of a torture run (`torture worker …`): `tasks` tasks take locks on
//! `resources` resources over and over for `duration`; inside each critical section a task reads the
//! resource's counter from a fenced store on a server the lock does not use — through a fence of the key
//! with its token — holds a moment, and writes the counter + 1 with its token, recording the section to
//! the history.
//!
//! The worker never checks its own lease before writing: the fencing is what is under test. With
//! `unfenced`, reads are plain and every write carries the same token, so the store takes stale writes
//! (the negative control). With `stop_self_every`, task 0 stops the whole process (SIGSTOP) between its read and its
//! write in its third section and every that many sections after; the orchestrator continues it after the
//! TTL has run out. (The third, not only the n-th: on a loaded machine a worker may complete few sections
//! in the run, and a scenario that injected no fault tested nothing.)

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rand::Rng;
use state::recipes::fenced::{FencedStore, RedisFencedStore};
use state::{DistributedLock, PostgresDistributedLock, PostgresLockMode, RetryConfig, StateError};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::history::{Event, HistoryWriter, WriteOutcome, monotonic_ns};

/// What one worker does.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The lock backend (`state::connect` URL).
    pub lock_url: String,
    /// For a `postgres://` lock: the advisory mode instead of the lease table.
    pub postgres_advisory: bool,
    /// The Redis server of the fenced store (not the lock's).
    pub store_url: String,
    /// This process's number in the history.
    pub process: u32,
    /// Concurrent tasks.
    pub tasks: u32,
    /// Resources `r0`, `r1`, ….
    pub resources: u32,
    /// The lock TTL.
    pub ttl: Duration,
    /// How long a section holds between its read and its write.
    pub hold: Duration,
    /// How long to run.
    pub duration: Duration,
    /// The history file.
    pub history: PathBuf,
    /// Every write with the same token (the negative control).
    pub unfenced: bool,
    /// Task 0 stops the process inside its third section and every n-th one.
    pub stop_self_every: Option<u32>,
}

/// Runs the worker to the end of its duration; the number of sections it completed.
///
/// # Errors
/// When the lock or the store cannot be reached at start, or the history cannot be written.
pub async fn run(config: WorkerConfig) -> Result<u32, Box<dyn std::error::Error + Send + Sync>> {
    let lock = connect_lock(&config).await?;
    let store: Arc<dyn FencedStore> = Arc::new(RedisFencedStore::new(&config.store_url).await?);
    let history = Arc::new(Mutex::new(HistoryWriter::open(&config.history)?));
    let config = Arc::new(config);
    let done = Arc::new(AtomicU32::new(0));
    let until = Instant::now() + config.duration;
    let mut tasks = Vec::new();
    for task in 0..config.tasks {
        let (lock, store, history, config, done) = (
            Arc::clone(&lock),
            Arc::clone(&store),
            Arc::clone(&history),
            Arc::clone(&config),
            Arc::clone(&done),
        );
        tasks.push(tokio::spawn(async move {
            contend(task, &*lock, &*store, &history, &config, &done, until).await
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(done.load(Ordering::SeqCst))
}

async fn connect_lock(
    config: &WorkerConfig,
) -> Result<Arc<dyn DistributedLock>, Box<dyn std::error::Error + Send + Sync>> {
    let retry = RetryConfig {
        max_attempts: 1_000,
        initial_delay: Duration::from_millis(2),
        max_delay: Duration::from_millis(50),
        backoff_multiplier: 1.5,
    };
    if config.postgres_advisory {
        let lock = PostgresDistributedLock::builder(&config.lock_url)
            .with_mode(PostgresLockMode::Advisory)
            .with_retry(retry)
            .build()
            .await?;
        return Ok(Arc::new(lock));
    }
    Ok(state::connect_with_retry(&config.lock_url, retry)
        .await?
        .lock)
}

async fn contend(
    task: u32,
    lock: &dyn DistributedLock,
    store: &dyn FencedStore,
    history: &Mutex<HistoryWriter>,
    config: &WorkerConfig,
    done: &AtomicU32,
    until: Instant,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut mine = 0u32;
    while Instant::now() < until {
        let resource = format!("r{}", rand::rng().random_range(0..config.resources.max(1)));
        let guard = match lock
            .acquire_within(&resource, config.ttl, Duration::from_secs(1))
            .await
        {
            Ok(guard) => guard,
            Err(err) => {
                tracing::debug!(error = %err, "acquire failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let start_ns = monotonic_ns();
        let token = guard.fencing_token();
        // A read-modify-write under a lock reads through a fence: from here on a write with a lower
        // token (a predecessor paused past its lease) is refused. The control reads plainly.
        let read = if config.unfenced {
            store.read(&resource).await
        } else {
            store.fence(&resource, token).await
        };
        let read_ns = monotonic_ns();
        let read = match read {
            Ok(read) => read,
            Err(err) => {
                tracing::debug!(error = %err, "store read failed");
                let _ = guard.release().await;
                continue;
            }
        };
        let counter = read
            .map(|stored| String::from_utf8_lossy(&stored.value).parse::<u64>())
            .transpose()?
            .unwrap_or(0);
        mine += 1;
        if task == 0
            && config
                .stop_self_every
                .is_some_and(|every| mine == 3 || mine.is_multiple_of(every))
        {
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP)?;
        }
        tokio::time::sleep(config.hold).await;
        let value = counter + 1;
        history.lock().await.append(&Event::Intent {
            process: config.process,
            task,
            resource: resource.clone(),
            token,
            start_ns,
            read_ns,
            write_ns: monotonic_ns(),
            value,
        })?;
        let written_token = if config.unfenced { 1 } else { token };
        let write = match store
            .write(&resource, written_token, value.to_string().as_bytes())
            .await
        {
            Ok(()) => WriteOutcome::Accepted,
            Err(StateError::StaleFencingToken { .. }) => WriteOutcome::Rejected,
            Err(err) => {
                tracing::debug!(error = %err, "store write failed");
                WriteOutcome::Failed
            }
        };
        history.lock().await.append(&Event::Outcome {
            process: config.process,
            task,
            resource,
            token,
            end_ns: monotonic_ns(),
            write,
        })?;
        done.fetch_add(1, Ordering::SeqCst);
        if let Err(err) = guard.release().await {
            tracing::debug!(error = %err, "release failed");
        }
    }
    Ok(())
}
