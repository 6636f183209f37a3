//! The table of bad inputs at the `state` API: each is refused with one clear error — which setting,
//! which value (never a secret), what to do — within a bound, never a panic and never a hang. Run with
//! `--nocapture` to print the table (it is copied into the README's reliability section); the
//! processor's command-line mistakes are in `processor-cli/tests/cli/fleet_processes.rs`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use integration_tests::RedisServer;
use state::recipes::semaphore::Semaphore;
use state::{
    DistributedLock, InMemoryDistributedLock, PostgresDistributedLock, RedisDistributedLock,
    RetryConfig, StateError, StateResult,
};
use tokio::time::Instant;

const SECRET: &str = "hunter2-secret";
const TTL: Duration = Duration::from_secs(5);

type Case = (
    &'static str,
    Pin<Box<dyn Future<Output = StateResult<()>> + Send>>,
);

fn case<F>(input: &'static str, run: F) -> Case
where
    F: Future<Output = StateResult<()>> + Send + 'static,
{
    (input, Box::pin(run))
}

async fn lock_of(url: String) -> StateResult<()> {
    state::connect(&url).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_one_clear_error() {
    integration_tests::init_tracing();
    let redis = RedisServer::start_new();
    let mut admin = redis::Client::open(redis.url())
        .expect("a client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("right-password")
        .query_async(&mut admin)
        .await
        .expect("set a password");
    let port = redis.port();
    let memory = Arc::new(InMemoryDistributedLock::new());
    let other_service = InMemoryDistributedLock::new();

    let cases: Vec<Case> = vec![
        case("resource name `\"\"`", {
            let memory = Arc::clone(&memory);
            async move { memory.try_acquire("", TTL).await.map(|_| ()) }
        }),
        case("resource name of 10 000 bytes", {
            let memory = Arc::clone(&memory);
            async move {
                memory
                    .try_acquire(&"x".repeat(10_000), TTL)
                    .await
                    .map(|_| ())
            }
        }),
        case("resource name with a NUL", {
            let memory = Arc::clone(&memory);
            async move { memory.try_acquire("a\0b", TTL).await.map(|_| ()) }
        }),
        case("TTL of 0", {
            let memory = Arc::clone(&memory);
            async move { memory.try_acquire("r", Duration::ZERO).await.map(|_| ()) }
        }),
        case("TTL of 10 years", {
            let memory = Arc::clone(&memory);
            async move {
                memory
                    .try_acquire("r", Duration::from_secs(10 * 365 * 86_400))
                    .await
                    .map(|_| ())
            }
        }),
        case("retry policy: initial delay above the max delay", async {
            InMemoryDistributedLock::new()
                .with_retry(RetryConfig {
                    initial_delay: Duration::from_secs(5),
                    max_delay: Duration::from_secs(1),
                    ..RetryConfig::default()
                })
                .acquire("r", TTL)
                .await
                .map(|_| ())
        }),
        case("retry policy: NaN backoff multiplier", async {
            InMemoryDistributedLock::new()
                .with_retry(RetryConfig {
                    backoff_multiplier: f64::NAN,
                    ..RetryConfig::default()
                })
                .acquire("r", TTL)
                .await
                .map(|_| ())
        }),
        case("`acquire_within` a wait of u64::MAX seconds", {
            let memory = Arc::clone(&memory);
            async move {
                memory
                    .acquire_within("r", TTL, Duration::from_secs(u64::MAX))
                    .await
                    .map(|_| ())
            }
        }),
        case("extend with a guard from another lock service", {
            let memory = Arc::clone(&memory);
            async move {
                let mut foreign = other_service.acquire("foreign", TTL).await?;
                memory.extend(&mut foreign, TTL).await
            }
        }),
        case("semaphore of 0 permits", {
            let memory: Arc<dyn DistributedLock> = memory.clone();
            async move { Semaphore::new(memory, "seats", 0, TTL).map(|_| ()) }
        }),
        case(
            "lock URL `zookeeper://…`",
            lock_of(format!("zookeeper://u:{SECRET}@h:2181")),
        ),
        case("lock URL `memory://x`", lock_of("memory://x".to_owned())),
        case(
            "Redis URL without a host",
            lock_of(format!("redis://:{SECRET}@")),
        ),
        case(
            "Redis URL `rediss://…?ca=` a missing file",
            lock_of("rediss://127.0.0.1:6380?ca=/nonexistent/ca.pem".to_owned()),
        ),
        case(
            "Redis URL with `cert=` but no `key=`",
            lock_of("rediss://127.0.0.1:6380?ca=/c.pem&cert=/c.pem".to_owned()),
        ),
        case("Redis key prefix of 1 000 bytes", async move {
            RedisDistributedLock::new(&format!("redis://:right-password@127.0.0.1:{port}"))
                .await?
                .with_key_prefix(&"p".repeat(1_000))
                .map(|_| ())
        }),
        case(
            "Redis: nothing listens on the port",
            lock_of(format!("redis://:{SECRET}@127.0.0.1:1")),
        ),
        case(
            "Redis: wrong password",
            lock_of(format!("redis://:{SECRET}@127.0.0.1:{port}")),
        ),
        case(
            "Redis: no password where one is required",
            lock_of(format!("redis://127.0.0.1:{port}")),
        ),
        case(
            "Redlock URL with no nodes",
            lock_of("redlock://".to_owned()),
        ),
        case(
            "Redlock: 2 of 3 nodes unreachable",
            lock_of(format!(
                "redlock://:right-password@127.0.0.1:{port},127.0.0.1:1,127.0.0.1:2"
            )),
        ),
        case(
            "PostgreSQL URL that does not parse",
            lock_of(format!("postgres://u:{SECRET}@[::1")),
        ),
        case(
            "PostgreSQL: nothing listens on the port",
            lock_of(format!("postgres://u:{SECRET}@127.0.0.1:1/db")),
        ),
        case("PostgreSQL table name `Locks; DROP TABLE x`", async {
            PostgresDistributedLock::builder("postgres://u@127.0.0.1:1/db")
                .with_table("Locks; DROP TABLE x")
                .build()
                .await
                .map(|_| ())
        }),
        case(
            "etcd URL without a port",
            lock_of(format!("etcd://u:{SECRET}@h1")),
        ),
        case(
            "etcd URL `etcds://` without `ca=`",
            lock_of("etcds://127.0.0.1:2379".to_owned()),
        ),
        case(
            "etcd URL with an unknown parameter",
            lock_of("etcds://127.0.0.1:2379?ca=/c.pem&pasword=x".to_owned()),
        ),
        case(
            "etcd: nothing listens on the port",
            lock_of(format!("etcd://u:{SECRET}@127.0.0.1:1")),
        ),
        case("PostgreSQL pool of 0 connections", async {
            PostgresDistributedLock::builder("postgres://u@127.0.0.1:1/db")
                .with_pool_size(0)
                .build()
                .await
                .map(|_| ())
        }),
        case("PostgreSQL operation timeout of 0", async {
            PostgresDistributedLock::builder("postgres://u@127.0.0.1:1/db")
                .with_operation_timeout(Duration::ZERO)
                .build()
                .await
                .map(|_| ())
        }),
    ];
    assert!(cases.len() >= 25, "the table has {} rows", cases.len());

    let mut table = String::from("| bad input | answered in | error |\n|---|---:|---|\n");
    for (input, run) in cases {
        let started = Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(10), run).await;
        let elapsed = started.elapsed();
        let err = match outcome {
            Err(_) => panic!("{input}: no answer within 10 s"),
            Ok(Ok(())) => panic!("{input}: accepted"),
            Ok(Err(err)) => err,
        };
        let shown = format!("{err} {err:?}");
        assert!(
            !shown.contains(SECRET),
            "{input}: the secret shows: {shown}"
        );
        // Bounded by the backend's connect timeout at most (PostgreSQL's pool retries a refused
        // connection until its 5 s acquire timeout; 3 s of slack for a loaded machine).
        assert!(
            elapsed < Duration::from_secs(8),
            "{input}: took {elapsed:?}"
        );
        let cause = std::error::Error::source(&err)
            .map(|source| format!(" ({source})"))
            .unwrap_or_default();
        let kind = match &err {
            StateError::InvalidInput { .. } => "InvalidInput",
            StateError::Backend { .. } => "Backend",
            StateError::Timeout { .. } => "Timeout",
            StateError::QuorumNotReached { .. } => "QuorumNotReached",
            _ => "other",
        };
        assert_ne!(kind, "other", "{input}: {err:?}");
        let line = format!("{err}{cause}")
            .replace('|', "\\|")
            .replace('\n', " ");
        table.push_str(&format!(
            "| {input} | {} ms | `{kind}`: {line} |\n",
            elapsed.as_millis()
        ));
    }
    println!("{table}");
}
