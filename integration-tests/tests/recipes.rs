//! The coordination recipes, each against the in-process backend and real servers (Redis for all,
//! PostgreSQL for the store-backed ones).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use integration_tests::recipe_env::RecipeEnv;
use state::recipes::checkpoint::{CheckpointCoordinator, CheckpointTarget};
use state::recipes::compaction::{CompactionOutcome, compact_partition, compaction_resource};
use state::recipes::keeper::{KeptLock, LockContext, RenewalPolicy, with_lock};
use state::recipes::leader::{LeaderElection, Leadership};
use state::recipes::multi::MultiLock;
use state::recipes::roster::{KeptMember, RosterEntry};
use state::recipes::semaphore::Semaphore;
use state::recipes::tasks::{TaskOutcome, TaskQueue, TaskRetryPolicy};
use state::recipes::versioned::{optimistic_update, optimistic_update_many};
use state::{RetryConfig, StateError, StateResult};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------- keeper (watchdog)

async fn keeper_renews_past_the_ttl(env: RecipeEnv) {
    let ttl = Duration::from_millis(300);
    let kept = KeptLock::acquire(&env.lock, "kept", ttl, RenewalPolicy::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(!kept.is_lost(), "{}: renewed lock reported lost", env.name);
    assert!(
        kept.renewals() >= 2,
        "{}: only {} renewals",
        env.name,
        kept.renewals()
    );
    assert!(env.lock.try_acquire("kept", ttl).await.unwrap().is_none());
    kept.release().await.unwrap();
    assert!(!env.lock.is_locked("kept").await.unwrap());
}

async fn keeper_signals_loss_by_the_safe_deadline(env: RecipeEnv) {
    // A holder that stops renewing (max_renewals 0, like a paused process) is told its lock is lost no
    // later than the guard's safe deadline, before anyone else can take it.
    let ttl = Duration::from_millis(400);
    let guard = env.lock.acquire("stalled", ttl).await.unwrap();
    let deadline = guard.valid_until();
    let kept = KeptLock::keep(guard, ttl, RenewalPolicy::default().with_max_renewals(0)).unwrap();
    kept.lost().await;
    let noticed = Instant::now();
    assert!(
        noticed <= deadline + Duration::from_millis(100),
        "{}: lost fired late",
        env.name
    );
    assert!(kept.is_lost());
    let other = loop {
        if let Some(other) = env.lock.try_acquire("stalled", ttl).await.unwrap() {
            break other;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        Instant::now() >= noticed,
        "the new holder came after the loss was signalled"
    );
    assert!(matches!(
        kept.release().await,
        Err(StateError::LockLost { .. })
    ));
    other.release().await.unwrap();
}

async fn with_lock_drops_work_when_the_lock_is_lost(env: RecipeEnv) {
    let finished = Arc::new(AtomicBool::new(false));
    let ttl = Duration::from_millis(300);
    let guard = env.lock.acquire("with-lock", ttl).await.unwrap();
    let kept = KeptLock::keep(
        guard,
        ttl,
        RenewalPolicy::default().with_max_hold(Duration::ZERO),
    )
    .unwrap();
    let done = Arc::clone(&finished);
    let outcome = state::recipes::keeper::run_kept(kept, |_ctx| async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        done.store(true, Ordering::SeqCst);
    })
    .await;
    assert!(
        matches!(outcome, Err(StateError::LockLost { .. })),
        "{outcome:?}"
    );
    assert!(
        !finished.load(Ordering::SeqCst),
        "the work ran on without the lock"
    );
    let value = with_lock(&env.lock, "with-lock", ttl, |ctx| async move {
        ctx.fencing_token()
    })
    .await
    .unwrap();
    assert!(value > 0);
}

// ---------------------------------------------------------------- leader election

async fn paused_leader_is_replaced_and_fenced_off(env: RecipeEnv) {
    let ttl = Duration::from_millis(400);
    let paused = LeaderElection::new(env.lock.clone(), "orders", "a", ttl)
        .unwrap()
        .with_renewal_policy(RenewalPolicy::default().with_max_renewals(0));
    let successor = LeaderElection::new(env.lock.clone(), "orders", "b", ttl).unwrap();
    assert!(paused.try_become_leader().await.unwrap());
    let old_term = paused.fencing_token().unwrap();
    env.fenced
        .write("orders:state", old_term, b"from a")
        .await
        .unwrap();
    assert!(!successor.try_become_leader().await.unwrap());

    // a stops renewing (paused); its term ends by its safe deadline and b takes over.
    let mut changes = paused.watch();
    while *changes.borrow_and_update() != Leadership::Follower {
        changes.changed().await.unwrap();
    }
    let cancel = CancellationToken::new();
    let campaign = {
        let cancel = cancel.clone();
        let successor = Arc::new(successor);
        let running = Arc::clone(&successor);
        (
            tokio::spawn(async move { running.campaign(Duration::from_millis(20), cancel).await }),
            successor,
        )
    };
    let mut watch = campaign.1.watch();
    let new_term = loop {
        if let Leadership::Leader { fencing_token } = *watch.borrow_and_update() {
            break fencing_token;
        }
        watch.changed().await.unwrap();
    };
    assert!(
        new_term > old_term,
        "{}: term {new_term} after {old_term}",
        env.name
    );
    env.fenced
        .write("orders:state", new_term, b"from b")
        .await
        .unwrap();
    // a wakes up and writes with its old term: rejected.
    match env
        .fenced
        .write("orders:state", old_term, b"late from a")
        .await
    {
        Err(StateError::StaleFencingToken { highest, .. }) => assert_eq!(highest, new_term),
        other => panic!("{}: stale leader write accepted: {other:?}", env.name),
    }
    assert_eq!(
        env.fenced
            .read("orders:state")
            .await
            .unwrap()
            .unwrap()
            .value,
        b"from b"
    );
    assert!(!paused.is_leader());
    cancel.cancel();
    campaign.0.await.unwrap().unwrap();
    assert!(!campaign.1.is_leader(), "campaign resigns when cancelled");
}

async fn leaders_never_overlap(env: RecipeEnv) {
    let inside = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let terms = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut candidates = Vec::new();
    for name in ["a", "b", "c"] {
        let election = LeaderElection::new(
            env.lock.clone(),
            "overlap",
            name,
            Duration::from_millis(500),
        )
        .unwrap();
        let (inside, overlaps, terms) = (inside.clone(), overlaps.clone(), terms.clone());
        candidates.push(tokio::spawn(async move {
            for _ in 0..40 {
                if election.try_become_leader().await.unwrap() {
                    if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                        overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                    terms
                        .lock()
                        .unwrap()
                        .push(election.fencing_token().unwrap());
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    election.resign().await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    for candidate in candidates {
        candidate.await.unwrap();
    }
    let terms = terms.lock().unwrap().clone();
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "{}: two leaders at once",
        env.name
    );
    assert!(
        terms.len() >= 10,
        "{}: only {} terms",
        env.name,
        terms.len()
    );
    let mut sorted = terms.clone();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        terms.len(),
        "{}: a term token was reused",
        env.name
    );
}

// ---------------------------------------------------------------- checkpoints and compaction

struct Snapshot(Arc<AtomicUsize>);

#[async_trait::async_trait]
impl CheckpointTarget for Snapshot {
    async fn create_checkpoint(&self, ctx: &LockContext) -> StateResult<Vec<u8>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(format!("token={}", ctx.fencing_token()).into_bytes())
    }
}

async fn checkpoints_are_exclusive_and_fenced(env: RecipeEnv) {
    let made = Arc::new(AtomicUsize::new(0));
    let coordinator =
        CheckpointCoordinator::new(env.lock.clone(), env.fenced.clone(), Duration::from_secs(5))
            .with_scope("partition-0");
    let target = Snapshot(made.clone());
    let (first, second) = tokio::join!(
        coordinator.checkpoint(&target),
        coordinator.checkpoint(&target)
    );
    let outcomes = [first.unwrap(), second.unwrap()];
    assert_eq!(
        outcomes.iter().filter(|o| o.is_some()).count(),
        1,
        "one checkpoint at a time"
    );
    assert_eq!(made.load(Ordering::SeqCst), 1);
    let taken = outcomes.into_iter().flatten().next().unwrap();
    let later = coordinator.checkpoint(&target).await.unwrap().unwrap();
    assert!(later.fencing_token > taken.fencing_token);
    // A writer still holding the first token (paused through the second checkpoint) is rejected.
    assert!(matches!(
        coordinator.record(taken.fencing_token, b"stale").await,
        Err(StateError::StaleFencingToken { .. })
    ));
    assert_eq!(
        coordinator.latest().await.unwrap().unwrap().token,
        later.fencing_token
    );
}

async fn compaction_is_skipped_when_claimed_and_stopped_when_lost(env: RecipeEnv) {
    let started = Arc::new(tokio::sync::Notify::new());
    let (lock, signal) = (env.lock.clone(), started.clone());
    let running = tokio::spawn(async move {
        compact_partition(&lock, 7, Duration::from_secs(5), |_ctx| async move {
            signal.notify_one();
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(1)
        })
        .await
    });
    started.notified().await;
    let skipped = compact_partition(&env.lock, 7, Duration::from_secs(5), |_| async { Ok(2) })
        .await
        .unwrap();
    assert_eq!(skipped, CompactionOutcome::Skipped);
    assert_eq!(
        running.await.unwrap().unwrap(),
        CompactionOutcome::Completed(1)
    );

    // A compaction whose lock is taken away mid-way stops.
    let guard = env
        .lock
        .acquire(&compaction_resource(8), Duration::from_millis(300))
        .await
        .unwrap();
    let kept = KeptLock::keep(
        guard,
        Duration::from_millis(300),
        RenewalPolicy::default().with_max_renewals(0),
    )
    .unwrap();
    let finished = Arc::new(AtomicBool::new(false));
    let done = finished.clone();
    let lost = state::recipes::keeper::run_kept(kept, |_| async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        done.store(true, Ordering::SeqCst);
    })
    .await;
    assert!(matches!(lost, Err(StateError::LockLost { .. })));
    assert!(!finished.load(Ordering::SeqCst));
}

// ---------------------------------------------------------------- task queue

async fn dropped_worker_task_runs_once_to_completion_elsewhere(env: RecipeEnv) {
    let ttl = Duration::from_millis(500);
    let queue = TaskQueue::new(env.lock.clone(), env.tasks.clone(), ttl);
    assert!(queue.submit("job-1", b"payload").await.unwrap());
    assert!(
        !queue.submit("job-1", b"again").await.unwrap(),
        "submitting is idempotent"
    );
    let completions = Arc::new(AtomicUsize::new(0));

    // Worker A claims it on a runtime that then dies with it (a crash: no release is ever sent). On
    // PostgreSQL it has a client of its own, as a crashed process would: a connection it opened on its
    // runtime must not be left in the pool worker B draws from (it dies with that runtime).
    let postgres_url = env.postgres.as_ref().map(|server| server.url());
    let crashed = {
        let shared_queue = queue.clone();
        let started = Arc::new(tokio::sync::Notify::new());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let signal = started.clone();
        std::thread::spawn(move || {
            runtime.block_on(async move {
                let queue = match postgres_url {
                    Some(url) => {
                        let lock = state::PostgresDistributedLock::builder(&url)
                            .build()
                            .await
                            .unwrap();
                        let tasks =
                            state::recipes::tasks::PostgresTaskStore::new(lock.pool().clone())
                                .await
                                .unwrap();
                        TaskQueue::new(Arc::new(lock), Arc::new(tasks), ttl)
                    }
                    None => shared_queue,
                };
                let _ = tokio::time::timeout(
                    Duration::from_millis(200),
                    queue.run_next(|_task, _ctx| async move {
                        signal.notify_one();
                        std::future::pending::<()>().await;
                        Ok(())
                    }),
                )
                .await;
            });
            drop(runtime);
        })
    };
    crashed.join().unwrap();
    assert!(
        env.lock.is_locked("task:job-1").await.unwrap(),
        "the crashed worker's claim lingers"
    );

    // Worker B gets it once the claim expires, runs it to completion, exactly once.
    let deadline = Instant::now() + Duration::from_secs(10);
    let run = loop {
        let counter = completions.clone();
        let run = queue
            .run_next(|task, _ctx| async move {
                assert_eq!(task.payload, b"payload");
                counter.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .await
            .unwrap();
        if let Some(run) = run {
            break run;
        }
        assert!(
            Instant::now() < deadline,
            "{}: the task was never reclaimed",
            env.name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(run.outcome, TaskOutcome::Completed);
    assert_eq!(completions.load(Ordering::SeqCst), 1);
    assert!(
        queue
            .run_next(|_, _| async { Ok(()) })
            .await
            .unwrap()
            .is_none(),
        "nothing left"
    );
    assert!(!queue.task("job-1").await.unwrap().unwrap().pending);
}

async fn competing_workers_complete_every_task_exactly_once(env: RecipeEnv) {
    let queue = TaskQueue::new(env.lock.clone(), env.tasks.clone(), Duration::from_secs(5));
    for i in 0..20 {
        queue.submit(&format!("t{i}"), b"").await.unwrap();
    }
    let runs = Arc::new(std::sync::Mutex::new(HashMap::<String, usize>::new()));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (queue, runs) = (queue.clone(), runs.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let runs = runs.clone();
                let run = queue
                    .run_next(|task, _ctx| async move {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        *runs.lock().unwrap().entry(task.id).or_default() += 1;
                        Ok(())
                    })
                    .await
                    .unwrap();
                if run.is_none() {
                    break;
                }
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let runs = runs.lock().unwrap();
    assert_eq!(runs.len(), 20, "{}: every task ran", env.name);
    assert!(
        runs.values().all(|n| *n == 1),
        "{}: a task ran twice: {runs:?}",
        env.name
    );
}

/// As many tasks run at once as there are workers: a claimed task is hidden from the others' pages of
/// due tasks (before, every worker looked only at the 32 earliest due, claimed ones included, so no
/// more than 32 ran at once however many workers there were). 64 workers, 64 tasks of 3 s: at least
/// 48 must run at once (the old queue's ceiling is 32; a loaded etcd claims slowly, hence not all 64).
async fn workers_run_as_many_tasks_at_once_as_there_are_workers(env: RecipeEnv) {
    const WORKERS: usize = 64;
    let queue = TaskQueue::new(env.lock.clone(), env.tasks.clone(), Duration::from_secs(5));
    for i in 0..WORKERS {
        queue.submit(&format!("wide-{i}"), b"").await.unwrap();
    }
    let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let runs = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (queue, running, peak, runs) =
            (queue.clone(), running.clone(), peak.clone(), runs.clone());
        workers.push(tokio::spawn(async move {
            let mut idle = 0;
            while idle < 3 {
                let (running, peak, runs) = (running.clone(), peak.clone(), runs.clone());
                let run = queue
                    .run_next(|_task, _ctx| async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        // Long enough for every worker to claim one on a loaded machine.
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    })
                    .await
                    .unwrap();
                if run.is_none() {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        WORKERS,
        "{}: every task ran once",
        env.name
    );
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        peak >= WORKERS * 3 / 4,
        "{}: at most {peak} of {WORKERS} workers ran a task at once",
        env.name
    );
}

/// etcd's task store lists due tasks from its index by due time: a store written before the index
/// existed (records only) is indexed by the first page, later changes move their index keys, and tasks
/// due later never come back in a page.
async fn etcd_due_index_is_built_once_and_kept(env: RecipeEnv) {
    let cluster = env.etcd.as_ref().expect("an etcd backend");
    let mut client = etcd_client::Client::connect([cluster.member(0).address()], None)
        .await
        .unwrap();
    let now = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    for (id, due) in [("old-due", now - 1_000), ("old-later", now + 3_600_000)] {
        let record = serde_json::json!({
            "id": id, "payload": [], "pending": true, "every_ms": null, "due_ms": due,
            "completions": 0, "attempts": 0, "last_error": null, "dead": false
        });
        client
            .put(format!("recipes/task/{id}"), record.to_string(), None)
            .await
            .unwrap();
    }
    let queue = TaskQueue::new(env.lock.clone(), env.tasks.clone(), Duration::from_secs(5));
    for i in 0..50 {
        queue
            .ensure_recurring(&format!("later-{i}"), Duration::from_secs(3600), b"")
            .await
            .unwrap();
    }
    let ran = Arc::new(std::sync::Mutex::new(Vec::new()));
    loop {
        let ran = ran.clone();
        let run = queue
            .run_next(|task, _ctx| async move {
                ran.lock().unwrap().push(task.id);
                Ok(())
            })
            .await
            .unwrap();
        if run.is_none() {
            break;
        }
    }
    let mut ran = ran.lock().unwrap().clone();
    ran.sort();
    assert_eq!(ran.len(), 51, "every due task ran once: {ran:?}");
    assert!(
        ran.contains(&"old-due".to_owned()),
        "the old store's due task was indexed"
    );
    assert!(!ran.contains(&"old-later".to_owned()));
    let index = client
        .get(
            "recipes/tasks-due/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(
        index.kvs().len(),
        51,
        "one index key per pending task (50 recurring, moved to their next run, and old-later)"
    );
}

async fn recurring_jobs_survive_restarts_and_run_once_per_period(env: RecipeEnv) {
    let queue = TaskQueue::new(env.lock.clone(), env.tasks.clone(), Duration::from_secs(5));
    assert!(
        queue
            .ensure_recurring("nightly", Duration::from_secs(3600), b"")
            .await
            .unwrap()
    );
    let run = queue
        .run_next(|_, _| async { Ok(()) })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.outcome, TaskOutcome::Completed);
    // A restarted instance re-declares the job: it already exists and is not due again yet.
    let restarted = TaskQueue::new(env.lock.clone(), env.tasks.clone(), Duration::from_secs(5));
    assert!(
        !restarted
            .ensure_recurring("nightly", Duration::from_secs(3600), b"")
            .await
            .unwrap()
    );
    assert!(
        restarted
            .run_next(|_, _| async { Ok(()) })
            .await
            .unwrap()
            .is_none()
    );
    let task = restarted.task("nightly").await.unwrap().unwrap();
    assert!(task.pending && task.completions == 1 && task.every_ms == Some(3_600_000));
    // A failing handler leaves a task pending for another try.
    restarted.submit("flaky", b"").await.unwrap();
    let failed = restarted
        .run_next(|_, _| async { Err(StateError::invalid("work", "boom")) })
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(failed.outcome, TaskOutcome::Failed(_)));
    assert!(restarted.task("flaky").await.unwrap().unwrap().pending);
}

async fn poison_tasks_back_off_dead_letter_and_requeue(env: RecipeEnv) {
    let policy =
        TaskRetryPolicy::new(3, Duration::from_millis(200), Duration::from_secs(2)).unwrap();
    let queue = TaskQueue::new(env.lock.clone(), env.tasks.clone(), Duration::from_secs(5))
        .with_retry_policy(policy);
    // The same idempotency key twice is one task; the first payload wins.
    assert!(queue.enqueue(b"poison", Some("poison")).await.unwrap().1);
    assert!(!queue.enqueue(b"another", Some("poison")).await.unwrap().1);
    assert_eq!(
        queue.task("poison").await.unwrap().unwrap().payload,
        b"poison"
    );
    let (fresh, created) = queue.enqueue(b"", None).await.unwrap();
    assert!(created && fresh != "poison");
    for i in 0..5 {
        queue.submit(&format!("good-{i}"), b"").await.unwrap();
    }
    let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let dead_lettered = loop {
        assert!(
            Instant::now() < deadline,
            "{}: the poison task never dead-lettered",
            env.name
        );
        let seen = Arc::clone(&attempts);
        let run = queue
            .run_next(|task, _| async move {
                if task.id == "poison" {
                    seen.lock().unwrap().push(Instant::now());
                    Err(StateError::invalid("work", "poison pill"))
                } else {
                    Ok(())
                }
            })
            .await
            .unwrap();
        match run {
            Some(run) if matches!(run.outcome, TaskOutcome::DeadLettered(_)) => break run,
            Some(_) => {}
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    assert_eq!(dead_lettered.id, "poison");
    // The others were never starved, and the poison task was retried with growing delays.
    for i in 0..5 {
        let task = queue.task(&format!("good-{i}")).await.unwrap().unwrap();
        assert!(!task.pending, "{}: good-{i} starved", env.name);
    }
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(
        attempts.len(),
        3,
        "{}: three attempts, then the dead letters",
        env.name
    );
    let (first_gap, second_gap) = (attempts[1] - attempts[0], attempts[2] - attempts[1]);
    assert!(
        first_gap >= Duration::from_millis(100) && second_gap >= Duration::from_millis(200),
        "{}: backoff gaps {first_gap:?}, {second_gap:?}",
        env.name
    );
    let dead = queue.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1, "{}: {dead:?}", env.name);
    assert!(dead[0].dead && !dead[0].pending && dead[0].attempts == 3);
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("poison pill"))
    );
    assert!(
        queue
            .run_next(|_, _| async { Ok(()) })
            .await
            .unwrap()
            .is_none(),
        "{}: a dead letter is never due",
        env.name
    );
    // Requeued by the API, it runs again from zero attempts.
    assert!(queue.requeue("poison").await.unwrap());
    assert!(
        !queue.requeue("poison").await.unwrap(),
        "only dead letters are requeued"
    );
    let again = queue.task("poison").await.unwrap().unwrap();
    assert!(again.pending && !again.dead && again.attempts == 0);
    let run = queue
        .run_next(|_, _| async { Ok(()) })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (run.id.as_str(), run.outcome),
        ("poison", TaskOutcome::Completed)
    );
    assert!(queue.dead_letters(10).await.unwrap().is_empty());
}

// ---------------------------------------------------------------- multi, semaphore, versioned, fenced

async fn multi_lock_is_all_or_nothing_and_deadlock_free(env: RecipeEnv) {
    let held = env
        .lock
        .acquire("acct:2", Duration::from_secs(5))
        .await
        .unwrap();
    let attempt = MultiLock::try_acquire(
        &env.lock,
        &["acct:1", "acct:2", "acct:3"],
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert!(attempt.is_none());
    assert!(
        !env.lock.is_locked("acct:1").await.unwrap(),
        "all or nothing: acct:1 was let go"
    );
    held.release().await.unwrap();

    // Opposite orders from many tasks: canonical ordering means no deadlock, and exclusion holds.
    let inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (lock, inside) = (env.lock.clone(), inside.clone());
        tasks.push(tokio::spawn(async move {
            let set: [&str; 2] = if i % 2 == 0 {
                ["acct:a", "acct:b"]
            } else {
                ["acct:b", "acct:a"]
            };
            for _ in 0..10 {
                let both = MultiLock::acquire(&lock, &set, Duration::from_secs(5))
                    .await
                    .unwrap();
                assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                tokio::task::yield_now().await;
                inside.fetch_sub(1, Ordering::SeqCst);
                both.release().await.unwrap();
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("deadlock")
            .unwrap();
    }
    assert!(matches!(
        MultiLock::acquire(&env.lock, &[], Duration::from_secs(1)).await,
        Err(StateError::InvalidInput { .. })
    ));
}

async fn semaphore_admits_exactly_its_permits(env: RecipeEnv) {
    let seats = Semaphore::new(env.lock.clone(), "players", 10, Duration::from_secs(30)).unwrap();
    let mut registrations = Vec::new();
    for _ in 0..100 {
        let seats = seats.clone();
        registrations.push(tokio::spawn(async move { seats.try_acquire().await }));
    }
    let mut admitted = Vec::new();
    for registration in registrations {
        if let Some(permit) = registration.await.unwrap().unwrap() {
            admitted.push(permit);
        }
    }
    assert_eq!(
        admitted.len(),
        10,
        "{}: exactly 10 of 100 admitted",
        env.name
    );
    assert_eq!(seats.available_permits().await.unwrap(), 0);
    let mut slots: Vec<u32> = admitted.iter().map(|p| p.slot()).collect();
    slots.sort_unstable();
    assert_eq!(slots, (0..10).collect::<Vec<_>>());
    let freed = admitted.pop().unwrap();
    freed.release().await.unwrap();
    assert_eq!(seats.available_permits().await.unwrap(), 1);
    assert!(seats.try_acquire().await.unwrap().is_some());
    assert!(Semaphore::new(env.lock.clone(), "none", 0, Duration::from_secs(1)).is_err());
}

async fn optimistic_increments_are_exact(env: RecipeEnv) {
    let retry = RetryConfig {
        max_attempts: 500,
        ..RetryConfig::aggressive()
    };
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (store, retry) = (env.versioned.clone(), retry.clone());
        tasks.push(tokio::spawn(async move {
            optimistic_update(store.as_ref(), "counter", &retry, |old| {
                let n: u64 = old.map_or(0, |v| String::from_utf8_lossy(v).parse().unwrap());
                (n + 1).to_string().into_bytes()
            })
            .await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let end = env.versioned.get("counter").await.unwrap().unwrap();
    assert_eq!(end.value, b"50", "{}", env.name);
    assert_eq!(end.version, 50);

    // Batch: concurrent transfers between two accounts keep the total.
    let put = |store: Arc<dyn state::recipes::versioned::VersionedStore>, key: &'static str| async move {
        optimistic_update(store.as_ref(), key, &RetryConfig::default(), |_| {
            b"100".to_vec()
        })
        .await
    };
    put(env.versioned.clone(), "a").await.unwrap();
    put(env.versioned.clone(), "b").await.unwrap();
    let mut transfers = Vec::new();
    for i in 0..20 {
        let (store, retry) = (env.versioned.clone(), retry.clone());
        transfers.push(tokio::spawn(async move {
            let keys = if i % 2 == 0 { ["a", "b"] } else { ["b", "a"] };
            optimistic_update_many(store.as_ref(), &keys, &retry, |old| {
                let n = |v: &Option<state::recipes::versioned::Versioned>| -> i64 {
                    String::from_utf8_lossy(&v.as_ref().unwrap().value)
                        .parse()
                        .unwrap()
                };
                vec![
                    (n(&old[0]) - 3).to_string().into_bytes(),
                    (n(&old[1]) + 3).to_string().into_bytes(),
                ]
            })
            .await
        }));
    }
    for transfer in transfers {
        transfer.await.unwrap().unwrap();
    }
    let read = |v: Option<state::recipes::versioned::Versioned>| -> i64 {
        String::from_utf8_lossy(&v.unwrap().value).parse().unwrap()
    };
    let total =
        read(env.versioned.get("a").await.unwrap()) + read(env.versioned.get("b").await.unwrap());
    assert_eq!(total, 200, "{}: money appeared or vanished", env.name);

    // Out of retries: a clear ConcurrencyConflict.
    let store = env.versioned.clone();
    let conflicted = optimistic_update(
        store.as_ref(),
        "contended",
        &RetryConfig::no_retry(),
        |_| {
            // Someone else writes between our read and our write, every time.
            let store = store.clone();
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(optimistic_update(
                        store.as_ref(),
                        "contended",
                        &RetryConfig::default(),
                        |_| b"x".to_vec(),
                    ))
            })
            .join()
            .unwrap()
            .unwrap();
            b"mine".to_vec()
        },
    )
    .await;
    assert!(
        matches!(
            conflicted,
            Err(StateError::ConcurrencyConflict { attempts: 1, .. })
        ),
        "{conflicted:?}"
    );
}

async fn fenced_store_rejects_stale_tokens(env: RecipeEnv) {
    env.fenced.write("k", 5, b"five").await.unwrap();
    env.fenced.write("k", 5, b"five again").await.unwrap();
    match env.fenced.write("k", 4, b"four").await {
        Err(StateError::StaleFencingToken {
            token: 4,
            highest: 5,
            ..
        }) => {}
        other => panic!("{}: {other:?}", env.name),
    }
    env.fenced.write("k", 6, b"six").await.unwrap();
    let read = env.fenced.read("k").await.unwrap().unwrap();
    assert_eq!((read.token, read.value.as_slice()), (6, b"six".as_slice()));
    assert!(env.fenced.read("absent").await.unwrap().is_none());

    // A read-modify-write fences the key as it reads: a stale holder's write that lands after the
    // fence and before the new holder's own write is refused, though its token is above the last write's.
    let fenced = env.fenced.fence("k", 9).await.unwrap().unwrap();
    assert_eq!(fenced.value, b"six", "{}", env.name);
    match env.fenced.write("k", 7, b"stale, after the fence").await {
        Err(StateError::StaleFencingToken {
            token: 7,
            highest: 9,
            ..
        }) => {}
        other => panic!("{}: {other:?}", env.name),
    }
    match env.fenced.fence("k", 8).await {
        Err(StateError::StaleFencingToken {
            token: 8,
            highest: 9,
            ..
        }) => {}
        other => panic!("{}: {other:?}", env.name),
    }
    env.fenced.write("k", 9, b"nine").await.unwrap();
    let read = env.fenced.read("k").await.unwrap().unwrap();
    assert_eq!((read.token, read.value.as_slice()), (9, b"nine".as_slice()));
    // Fencing a key nobody wrote: nothing to read yet, but lower tokens are refused from now on.
    assert!(env.fenced.fence("new", 3).await.unwrap().is_none());
    assert!(env.fenced.read("new").await.unwrap().is_none());
    assert!(matches!(
        env.fenced.write("new", 2, b"late").await,
        Err(StateError::StaleFencingToken { highest: 3, .. })
    ));
    env.fenced.write("new", 3, b"three").await.unwrap();
    assert_eq!(
        env.fenced.read("new").await.unwrap().unwrap().value,
        b"three"
    );
}

// ---------------------------------------------------------------- roster (group membership)

/// How long a lapsed member may stay listed past its TTL: etcd counts leases in whole seconds and
/// sweeps expired ones every 500 ms.
fn roster_slack(env: &RecipeEnv) -> Duration {
    if env.etcd.is_some() {
        Duration::from_millis(2_500)
    } else {
        Duration::from_millis(200)
    }
}

fn names(entries: &[RosterEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.member.as_str()).collect()
}

async fn roster_lists_live_members_and_versions_change_only_with_them(env: RecipeEnv) {
    let roster = &env.roster;
    let ttl = Duration::from_secs(10);
    let a = roster
        .join("fleet", "a", b"http://a", ttl)
        .await
        .unwrap()
        .unwrap();
    let b = roster
        .join("fleet", "b", b"http://b", ttl)
        .await
        .unwrap()
        .unwrap();
    let c = roster.join("fleet", "c", b"", ttl).await.unwrap().unwrap();
    assert!(
        a.token < b.token && b.token < c.token,
        "{}: tokens increase",
        env.name
    );
    assert!(
        roster
            .join("fleet", "a", b"again", ttl)
            .await
            .unwrap()
            .is_none(),
        "{}: a live name is taken",
        env.name
    );
    roster.join("other", "z", b"", ttl).await.unwrap().unwrap();
    let listed = roster.members("fleet").await.unwrap();
    assert_eq!(
        names(&listed),
        ["a", "b", "c"],
        "{}: other rosters stay out",
        env.name
    );
    assert_eq!(listed[0].record, b"http://a");
    assert_eq!(listed[1].token, b.token);

    let seen = roster.version("fleet").await.unwrap();
    assert_eq!(seen.members, 3);
    assert!(roster.renew(&a, ttl).await.unwrap());
    assert_eq!(
        roster.version("fleet").await.unwrap(),
        seen,
        "{}: a renewal changes nothing",
        env.name
    );

    assert!(roster.leave(&b).await.unwrap());
    let after_leave = roster.version("fleet").await.unwrap();
    assert_ne!(
        after_leave, seen,
        "{}: a departure changes the version",
        env.name
    );
    assert!(
        !roster.renew(&b, ttl).await.unwrap(),
        "{}: a left member cannot renew",
        env.name
    );
    assert!(!roster.leave(&b).await.unwrap());
    let b2 = roster
        .join("fleet", "b", b"http://b2", ttl)
        .await
        .unwrap()
        .unwrap();
    assert!(b2.token > c.token);
    assert_ne!(
        roster.version("fleet").await.unwrap(),
        after_leave,
        "{}: a join changes the version",
        env.name
    );
    assert!(
        !roster.renew(&b, ttl).await.unwrap(),
        "{}: the old holder cannot renew the new holder's entry",
        env.name
    );
    assert!(
        !roster.leave(&b).await.unwrap(),
        "{}: nor remove it",
        env.name
    );
    assert_eq!(
        names(&roster.members("fleet").await.unwrap()),
        ["a", "b", "c"]
    );
    for lease in [&a, &b2, &c] {
        assert!(roster.leave(lease).await.unwrap());
    }
    assert!(roster.members("fleet").await.unwrap().is_empty());
    assert!(matches!(
        roster.join("fleet", "", b"", ttl).await,
        Err(StateError::InvalidInput {
            what: "member name",
            ..
        })
    ));
}

async fn roster_member_lapses_after_its_ttl_and_its_late_renewal_is_refused(env: RecipeEnv) {
    let roster = &env.roster;
    let ttl = Duration::from_secs(1);
    let stale = roster.join("lapse", "a", b"", ttl).await.unwrap().unwrap();
    let other = roster
        .join("lapse", "b", b"", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let seen = roster.version("lapse").await.unwrap();
    let gone_by = tokio::time::Instant::now() + ttl + roster_slack(&env);
    loop {
        let listed = roster.members("lapse").await.unwrap();
        if names(&listed) == ["b"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < gone_by,
            "{}: a lapsed member is still listed",
            env.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(
        roster.version("lapse").await.unwrap(),
        seen,
        "{}: an expiry changes the version",
        env.name
    );
    assert!(
        !roster.renew(&stale, ttl).await.unwrap(),
        "{}: a lapsed member's renewal is refused",
        env.name
    );
    let again = roster.join("lapse", "a", b"", ttl).await.unwrap().unwrap();
    assert!(again.token > other.token);
}

async fn kept_member_stays_listed_past_its_ttl_and_leaves_at_once(env: RecipeEnv) {
    let ttl = Duration::from_millis(1_500);
    let kept = KeptMember::join(&env.roster, "kept", "a", b"endpoint", ttl)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(ttl * 2 + roster_slack(&env)).await;
    assert!(
        !kept.is_lost(),
        "{}: renewed membership reported lost",
        env.name
    );
    assert_eq!(names(&env.roster.members("kept").await.unwrap()), ["a"]);
    kept.leave().await.unwrap();
    assert!(env.roster.members("kept").await.unwrap().is_empty());
}

async fn concurrent_joins_of_one_name_admit_one(env: RecipeEnv) {
    let joins = (0..8).map(|_| {
        let roster = Arc::clone(&env.roster);
        tokio::spawn(async move { roster.join("race", "x", b"", Duration::from_secs(10)).await })
    });
    let mut admitted = 0;
    for join in joins {
        if join.await.unwrap().unwrap().is_some() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 1, "{}: one name, one member", env.name);
}

macro_rules! recipe_tests {
    ($backend:ident: $($test:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::$test(integration_tests::recipe_env::RecipeEnv::$backend().await).await;
                }
            )*
        }
    };
}

recipe_tests!(memory:
    poison_tasks_back_off_dead_letter_and_requeue,
    keeper_renews_past_the_ttl,
    keeper_signals_loss_by_the_safe_deadline,
    with_lock_drops_work_when_the_lock_is_lost,
    paused_leader_is_replaced_and_fenced_off,
    leaders_never_overlap,
    checkpoints_are_exclusive_and_fenced,
    compaction_is_skipped_when_claimed_and_stopped_when_lost,
    dropped_worker_task_runs_once_to_completion_elsewhere,
    competing_workers_complete_every_task_exactly_once,
    recurring_jobs_survive_restarts_and_run_once_per_period,
    multi_lock_is_all_or_nothing_and_deadlock_free,
    semaphore_admits_exactly_its_permits,
    optimistic_increments_are_exact,
    fenced_store_rejects_stale_tokens,
    roster_lists_live_members_and_versions_change_only_with_them,
    roster_member_lapses_after_its_ttl_and_its_late_renewal_is_refused,
    kept_member_stays_listed_past_its_ttl_and_leaves_at_once,
    concurrent_joins_of_one_name_admit_one,
    workers_run_as_many_tasks_at_once_as_there_are_workers,
);

recipe_tests!(redis:
    poison_tasks_back_off_dead_letter_and_requeue,
    keeper_renews_past_the_ttl,
    keeper_signals_loss_by_the_safe_deadline,
    with_lock_drops_work_when_the_lock_is_lost,
    paused_leader_is_replaced_and_fenced_off,
    leaders_never_overlap,
    checkpoints_are_exclusive_and_fenced,
    compaction_is_skipped_when_claimed_and_stopped_when_lost,
    dropped_worker_task_runs_once_to_completion_elsewhere,
    competing_workers_complete_every_task_exactly_once,
    recurring_jobs_survive_restarts_and_run_once_per_period,
    multi_lock_is_all_or_nothing_and_deadlock_free,
    semaphore_admits_exactly_its_permits,
    optimistic_increments_are_exact,
    fenced_store_rejects_stale_tokens,
    roster_lists_live_members_and_versions_change_only_with_them,
    roster_member_lapses_after_its_ttl_and_its_late_renewal_is_refused,
    kept_member_stays_listed_past_its_ttl_and_leaves_at_once,
    concurrent_joins_of_one_name_admit_one,
    workers_run_as_many_tasks_at_once_as_there_are_workers,
);

recipe_tests!(postgres:
    poison_tasks_back_off_dead_letter_and_requeue,
    paused_leader_is_replaced_and_fenced_off,
    checkpoints_are_exclusive_and_fenced,
    dropped_worker_task_runs_once_to_completion_elsewhere,
    competing_workers_complete_every_task_exactly_once,
    recurring_jobs_survive_restarts_and_run_once_per_period,
    semaphore_admits_exactly_its_permits,
    optimistic_increments_are_exact,
    fenced_store_rejects_stale_tokens,
    roster_lists_live_members_and_versions_change_only_with_them,
    roster_member_lapses_after_its_ttl_and_its_late_renewal_is_refused,
    kept_member_stays_listed_past_its_ttl_and_leaves_at_once,
    concurrent_joins_of_one_name_admit_one,
    workers_run_as_many_tasks_at_once_as_there_are_workers,
);

// etcd: every recipe.
recipe_tests!(etcd:
    poison_tasks_back_off_dead_letter_and_requeue,
    keeper_renews_past_the_ttl,
    keeper_signals_loss_by_the_safe_deadline,
    with_lock_drops_work_when_the_lock_is_lost,
    paused_leader_is_replaced_and_fenced_off,
    leaders_never_overlap,
    checkpoints_are_exclusive_and_fenced,
    compaction_is_skipped_when_claimed_and_stopped_when_lost,
    dropped_worker_task_runs_once_to_completion_elsewhere,
    competing_workers_complete_every_task_exactly_once,
    recurring_jobs_survive_restarts_and_run_once_per_period,
    multi_lock_is_all_or_nothing_and_deadlock_free,
    semaphore_admits_exactly_its_permits,
    optimistic_increments_are_exact,
    fenced_store_rejects_stale_tokens,
    roster_lists_live_members_and_versions_change_only_with_them,
    roster_member_lapses_after_its_ttl_and_its_late_renewal_is_refused,
    kept_member_stays_listed_past_its_ttl_and_leaves_at_once,
    concurrent_joins_of_one_name_admit_one,
    workers_run_as_many_tasks_at_once_as_there_are_workers,
    etcd_due_index_is_built_once_and_kept,
);
