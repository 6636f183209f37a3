//! Every lock backend beside its raw floor and its peers, in one run on the same servers, as one table.
//!
//! For each backend — in-process, Redis, Redlock over 3 and 5 nodes, PostgreSQL (lease and advisory
//! modes), etcd — and each client of it (ours; the **raw floor**: the same server commands sent by hand
//! on the same connection type, with no fencing, no cancel safety, no bookkeeping; and the peers users
//! pick today: `rslock` 0.10 over 1, 3 and 5 nodes and `async-redis-lock` 0.4):
//! - acquire + release pair latency, p50 and p99, one task;
//! - pairs/s of 32 tasks, each on its own resource;
//! - acquisitions/s of 16 tasks contending for one resource, each library waiting its own way;
//! - extend latency, p50.
//!
//! Then Redlock-3 under faults (ours and rslock-3): one node frozen (SIGSTOP) and one node slowed by
//! +5 ms each way (the harness's TCP proxy); a pair not completed within 500 ms is abandoned and counts
//! 0, so a stalled library shows as 0 pairs/s rather than hanging the run. And pgbench's select-only
//! transactions/s on the same PostgreSQL, for scale.
//!
//! ```text
//! cargo bench -p benches --bench lockbench             # full run (about 4 minutes)
//! cargo bench -p benches --bench lockbench -- --quick  # a smoke run with small counts (under 2 minutes)
//! cargo test  -p benches --bench lockbench             # the same smoke run, as the test command does
//! benches/callgrind.sh                                 # client instructions per pair (valgrind)
//! ```
//!
//! `--only NAME` runs the clients whose label contains NAME; `--callgrind LABEL PAIRS` runs `PAIRS`
//! sequential pairs of the one client labelled LABEL and nothing else (for `callgrind.sh`).

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use benches::measure::{latency, ms, throughput};
use futures::FutureExt;
use futures::future::BoxFuture;
use integration_tests::{EtcdCluster, FaultProxy, PostgresServer, RedisCluster, RedisServer};
use state::{
    DistributedLock, EtcdDistributedLock, InMemoryDistributedLock, LockGuard,
    PostgresDistributedLock, PostgresLockMode, RedisDistributedLock, RedlockDistributedLock,
};
use tokio::sync::Mutex;

const TTL: Duration = Duration::from_secs(10);
const TASKS: usize = 32;
const CONTENDERS: usize = 16;
/// A pair not done in this time is abandoned (fault rows).
const PAIR_CAP: Duration = Duration::from_millis(500);

const COMPARE_AND_DELETE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";
const COMPARE_AND_EXPIRE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0";

struct Sizes {
    samples: usize,
    run_for: Duration,
}

fn sizes() -> Sizes {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--quick") {
        Sizes {
            samples: 2_000,
            run_for: Duration::from_secs(3),
        }
    } else {
        Sizes {
            samples: 100,
            run_for: Duration::from_millis(300),
        }
    }
}

type Op = Arc<dyn Fn(String) -> BoxFuture<'static, bool> + Send + Sync>;

/// One client of one backend, as the bench drives it.
struct Client {
    label: String,
    /// Acquire + release of an uncontended resource.
    pair: Op,
    /// Acquire (waiting its own way) + release of a contended resource.
    waiting: Option<Op>,
    /// One extension of a held lock.
    extend: Option<Op>,
}

fn op<F, Fut>(f: F) -> Op
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    Arc::new(move |resource| f(resource).boxed())
}

/// Ours: `try_acquire` + `release`, `acquire` (its retry policy) for the contended row, `extend` of
/// a held guard.
async fn ours(label: &str, lock: Arc<dyn DistributedLock>) -> Client {
    // Held for the whole run (an hour), extended to `TTL` by the extend row.
    let held: Arc<Mutex<LockGuard>> = Arc::new(Mutex::new(
        lock.acquire(
            &format!("bench:held:{}", label.replace(' ', "-")),
            Duration::from_secs(3_600),
        )
        .await
        .unwrap(),
    ));
    let (a, b) = (Arc::clone(&lock), Arc::clone(&lock));
    Client {
        label: label.to_owned(),
        pair: op(move |resource| {
            let lock = Arc::clone(&a);
            async move {
                match lock.try_acquire(&resource, TTL).await {
                    Ok(Some(guard)) => guard.release().await.is_ok(),
                    _ => false,
                }
            }
        }),
        waiting: Some(op(move |resource| {
            let lock = Arc::clone(&b);
            async move {
                match lock.acquire(&resource, TTL).await {
                    Ok(guard) => guard.release().await.is_ok(),
                    Err(_) => false,
                }
            }
        })),
        extend: Some(op(move |_| {
            let held = Arc::clone(&held);
            async move { held.lock().await.extend(TTL).await.is_ok() }
        })),
    }
}

/// How a hand-written Redis floor issues fencing tokens on acquire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fencing {
    /// None: a bare `SET NX PX` (the textbook floor; no token).
    None,
    /// The same Lua script ours sends (`SET NX PX`, then `INCR` of the counter when granted), sent by
    /// hand: the floor of a fencing lock on Redis 7.
    Script,
    /// `MULTI` / `SET NX PX` / `INCR` / `EXEC`: no script, but every *refused* attempt increments the
    /// counter too, so the counter no longer equals the holder's token and `get_lock_info` could not
    /// report it — the alternative tried, not one we ship.
    Multi,
}

/// The acquire script ours sends (the same text, compiled in).
const ACQUIRE_WITH_FENCE: &str = include_str!("../../state/src/backends/redis/scripts/acquire.lua");

/// One node's acquire of `resource` by a hand-written floor.
async fn floor_acquire(
    conn: &mut redis::aio::ConnectionManager,
    resource: &str,
    fencing: Fencing,
    script: &redis::Script,
) -> bool {
    let fence = || format!("{resource}:fence");
    match fencing {
        Fencing::None => redis::cmd("SET")
            .arg(resource)
            .arg("owner")
            .arg("NX")
            .arg("PX")
            .arg(10_000)
            .query_async::<Option<String>>(conn)
            .await
            .ok()
            .flatten()
            .is_some(),
        Fencing::Script => script
            .key(resource)
            .key(fence())
            .arg("owner")
            .arg(10_000)
            .invoke_async::<Option<u64>>(conn)
            .await
            .ok()
            .flatten()
            .is_some(),
        Fencing::Multi => redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(resource)
            .arg("owner")
            .arg("NX")
            .arg("PX")
            .arg(10_000)
            .cmd("INCR")
            .arg(fence())
            .query_async::<(Option<String>, u64)>(conn)
            .await
            .is_ok_and(|(granted, _)| granted.is_some()),
    }
}

/// The floor of Redis over `urls` (one node, or Redlock's majority over several): an acquire as
/// `fencing` says + compare-and-delete by `EVALSHA`, on a `ConnectionManager` as ours uses.
async fn redis_floor(label: &str, urls: &[String], fencing: Fencing) -> Client {
    let mut conns = Vec::new();
    for url in urls {
        conns.push(
            redis::Client::open(url.as_str())
                .unwrap()
                .get_connection_manager()
                .await
                .unwrap(),
        );
    }
    let conns = Arc::new(conns);
    let quorum = conns.len() / 2 + 1;
    let (cad, cae, acquire) = (
        Arc::new(redis::Script::new(COMPARE_AND_DELETE)),
        Arc::new(redis::Script::new(COMPARE_AND_EXPIRE)),
        Arc::new(redis::Script::new(ACQUIRE_WITH_FENCE)),
    );
    let held_key = format!("bench:held:{label}");
    for conn in conns.iter() {
        let _: () = redis::cmd("SET")
            .arg(&held_key)
            .arg("me")
            .arg("PX")
            .arg(10_000_000)
            .query_async(&mut conn.clone())
            .await
            .unwrap();
    }
    let pair_conns = Arc::clone(&conns);
    let extend_conns = Arc::clone(&conns);
    Client {
        label: label.to_owned(),
        pair: op(move |resource| {
            let (conns, cad, acquire) = (
                Arc::clone(&pair_conns),
                Arc::clone(&cad),
                Arc::clone(&acquire),
            );
            async move {
                if let [conn] = conns.as_slice() {
                    // One node: two round trips in sequence, nothing else.
                    let mut conn = conn.clone();
                    let granted = floor_acquire(&mut conn, &resource, fencing, &acquire).await;
                    let deleted = cad
                        .key(&resource)
                        .arg("owner")
                        .invoke_async::<i64>(&mut conn)
                        .await
                        .is_ok();
                    return granted && deleted;
                }
                // Fanned out concurrently to every node; granted on a majority.
                let sets = conns.iter().map(|conn| {
                    let (mut conn, resource, acquire) = (conn.clone(), resource.clone(), &acquire);
                    async move { floor_acquire(&mut conn, &resource, fencing, acquire).await }
                });
                let granted = futures::future::join_all(sets)
                    .await
                    .into_iter()
                    .filter(|ok| *ok)
                    .count();
                let deletes = conns.iter().map(|conn| {
                    let (mut conn, resource, cad) = (conn.clone(), resource.clone(), &cad);
                    async move {
                        cad.key(&resource)
                            .arg("owner")
                            .invoke_async::<i64>(&mut conn)
                            .await
                            .is_ok()
                    }
                });
                futures::future::join_all(deletes).await;
                granted >= quorum
            }
        }),
        waiting: None,
        extend: Some(op(move |_| {
            let (conns, cae, key) = (
                Arc::clone(&extend_conns),
                Arc::clone(&cae),
                held_key.clone(),
            );
            async move {
                let extends = conns.iter().map(|conn| {
                    let (mut conn, cae, key) = (conn.clone(), &cae, &key);
                    async move {
                        cae.key(key)
                            .arg("me")
                            .arg(10_000_000)
                            .invoke_async::<i64>(&mut conn)
                            .await
                            .is_ok_and(|extended| extended == 1)
                    }
                });
                let extended = futures::future::join_all(extends)
                    .await
                    .into_iter()
                    .filter(|ok| *ok)
                    .count();
                extended >= quorum
            }
        })),
    }
}

/// rslock 0.10 over `urls`. Its `lock` always waits with its own retries, so the uncontended pair and the
/// contended one are the same call.
fn rslock_client(label: &str, urls: &[String]) -> Client {
    let manager = Arc::new(rslock::LockManager::new(urls.to_vec()));
    let pair = op(move |resource| {
        let manager = Arc::clone(&manager);
        async move {
            match manager.lock(resource.as_str(), TTL).await {
                Ok(lock) => {
                    manager.unlock(&lock).await;
                    true
                }
                Err(_) => false,
            }
        }
    });
    Client {
        label: label.to_owned(),
        pair: Arc::clone(&pair),
        waiting: Some(pair),
        extend: None,
    }
}

/// async-redis-lock 0.4 on one node (`acquire` waits with its own retries; it renews in the background).
async fn async_redis_lock_client(label: &str, url: &str) -> Client {
    let locker = Arc::new(async_redis_lock::Locker::from_redis_url(url).await.unwrap());
    let options = async_redis_lock::Options::new()
        .ttl(TTL)
        .timeout(Some(Duration::from_millis(1)));
    let waiting_options = async_redis_lock::Options::new()
        .ttl(TTL)
        .timeout(Some(Duration::from_secs(10)));
    let (a, b) = (Arc::clone(&locker), Arc::clone(&locker));
    Client {
        label: label.to_owned(),
        pair: op(move |resource| {
            let (locker, options) = (Arc::clone(&a), options.clone());
            async move {
                match locker.acquire_with_options(&options, &resource).await {
                    Ok(lock) => lock.release().await.is_ok(),
                    Err(_) => false,
                }
            }
        }),
        waiting: Some(op(move |resource| {
            let (locker, options) = (Arc::clone(&b), waiting_options.clone());
            async move {
                match locker.acquire_with_options(&options, &resource).await {
                    Ok(lock) => lock.release().await.is_ok(),
                    Err(_) => false,
                }
            }
        })),
        extend: None,
    }
}

/// PostgreSQL lease floor: our lease statements (one upsert to acquire, one update to release), sent by
/// hand with sqlx (prepared, cached per connection) on a table of its own.
async fn postgres_lease_floor(label: &str, url: &str) -> Client {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .connect(url)
        .await
        .unwrap();
    for ddl in [
        "CREATE TABLE IF NOT EXISTS bench_floor (resource text PRIMARY KEY, owner text NOT NULL, \
         fence int8 NOT NULL, acquired_at timestamptz NOT NULL, expires_at timestamptz NOT NULL)",
        "CREATE SEQUENCE IF NOT EXISTS bench_floor_fence",
        "INSERT INTO bench_floor VALUES ('bench:held', 'me', 1, now(), now() + interval '1 day') \
         ON CONFLICT DO NOTHING",
    ] {
        sqlx::query(ddl).execute(&pool).await.unwrap();
    }
    const ACQUIRE: &str = "INSERT INTO bench_floor AS l (resource, owner, fence, acquired_at, expires_at) \
        VALUES ($1, $2, nextval('bench_floor_fence'), clock_timestamp(), clock_timestamp() + $3::int8 * interval '1 millisecond') \
        ON CONFLICT (resource) DO UPDATE SET owner = EXCLUDED.owner, fence = nextval('bench_floor_fence'), \
        acquired_at = clock_timestamp(), expires_at = clock_timestamp() + $3::int8 * interval '1 millisecond' \
        WHERE l.expires_at <= clock_timestamp() RETURNING fence";
    const RELEASE: &str = "UPDATE bench_floor SET expires_at = '-infinity' \
        WHERE resource = $1 AND owner = $2 AND expires_at > clock_timestamp()";
    const EXTEND: &str = "UPDATE bench_floor SET expires_at = clock_timestamp() + $3::int8 * interval '1 millisecond' \
        WHERE resource = $1 AND owner = $2 AND expires_at > clock_timestamp() RETURNING fence";
    let (a, b) = (pool.clone(), pool);
    Client {
        label: label.to_owned(),
        pair: op(move |resource| {
            let pool = a.clone();
            async move {
                let granted: Option<i64> = sqlx::query_scalar(ACQUIRE)
                    .bind(&resource)
                    .bind("owner")
                    .bind(10_000_i64)
                    .fetch_optional(&pool)
                    .await
                    .ok()
                    .flatten();
                granted.is_some()
                    && sqlx::query(RELEASE)
                        .bind(&resource)
                        .bind("owner")
                        .execute(&pool)
                        .await
                        .is_ok()
            }
        }),
        waiting: None,
        extend: Some(op(move |_| {
            let pool = b.clone();
            async move {
                sqlx::query(EXTEND)
                    .bind("bench:held")
                    .bind("me")
                    .bind(86_400_000_i64)
                    .fetch_optional(&pool)
                    .await
                    .is_ok_and(|row| row.is_some())
            }
        })),
    }
}

/// etcd floor: our four requests sent by hand — lease grant, put-if-absent transaction with the lease,
/// delete-if-owner transaction, lease revoke.
async fn etcd_floor(label: &str, endpoints: Vec<String>) -> Client {
    use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
    let client = etcd_client::Client::connect(endpoints, None).await.unwrap();
    Client {
        label: label.to_owned(),
        pair: op(move |resource| {
            let mut client = client.clone();
            async move {
                let Ok(lease) = client.lease_grant(10, None).await else {
                    return false;
                };
                let key = format!("bench-floor/{resource}");
                let put = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        key.clone(),
                        "owner",
                        Some(PutOptions::new().with_lease(lease.id())),
                    )]);
                let granted = client.txn(put).await.is_ok_and(|r| r.succeeded());
                let delete = Txn::new()
                    .when([Compare::value(key.clone(), CompareOp::Equal, "owner")])
                    .and_then([TxnOp::delete(key, None)]);
                let deleted = client.txn(delete).await.is_ok();
                let _ = client.lease_revoke(lease.id()).await;
                granted && deleted
            }
        }),
        waiting: None,
        extend: None,
    }
}

/// What one client measured.
struct Row {
    label: String,
    p50: Duration,
    p99: Duration,
    pairs_per_second: f64,
    contended_per_second: Option<f64>,
    extend_p50: Option<Duration>,
}

async fn measure(client: &Client, sizes: &Sizes) -> Row {
    let pair = Arc::clone(&client.pair);
    let prefix = format!("bench:{}", client.label.replace(' ', "-"));
    let (p50, p99) = {
        let (pair, resource) = (Arc::clone(&pair), format!("{prefix}:lat"));
        latency(sizes.samples, || pair(resource.clone())).await
    };
    let pairs_per_second = {
        let pair = Arc::clone(&pair);
        throughput(
            TASKS,
            sizes.run_for,
            &format!("{prefix}:tp"),
            false,
            move |r| pair(r),
        )
        .await
    };
    let contended_per_second = match &client.waiting {
        Some(waiting) => {
            let waiting = Arc::clone(waiting);
            Some(
                throughput(
                    CONTENDERS,
                    sizes.run_for,
                    &format!("{prefix}:shared"),
                    true,
                    move |r| waiting(r),
                )
                .await,
            )
        }
        None => None,
    };
    let extend_p50 = match &client.extend {
        Some(extend) => {
            let (extend, label) = (Arc::clone(extend), client.label.clone());
            // A failed extension returns early: timing it would flatter the client, so it stops the run.
            Some(
                latency(sizes.samples, || {
                    let (extend, label) = (Arc::clone(&extend), label.clone());
                    async move {
                        assert!(extend(String::new()).await, "{label}: extend failed");
                        true
                    }
                })
                .await
                .0,
            )
        }
        None => None,
    };
    Row {
        label: client.label.clone(),
        p50,
        p99,
        pairs_per_second,
        contended_per_second,
        extend_p50,
    }
}

/// Pairs/s of 32 tasks with every pair capped at [`PAIR_CAP`] (a stalled pair counts 0).
async fn capped_throughput(client: &Client, run_for: Duration, prefix: &str) -> f64 {
    let pair = Arc::clone(&client.pair);
    throughput(TASKS, run_for, prefix, false, move |resource| {
        let pair = Arc::clone(&pair);
        async move {
            tokio::time::timeout(PAIR_CAP, pair(resource))
                .await
                .unwrap_or(false)
        }
    })
    .await
}

/// The single Redis server's per-command profile since `CONFIG RESETSTAT`: calls and microseconds of
/// server CPU per call (`INFO commandstats`), for commands called at least `min_calls` times.
async fn redis_command_profile(url: &str, min_calls: u64) -> Vec<(String, u64, f64)> {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut profile: Vec<(String, u64, f64)> = info
        .lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |key: &str| {
                stats
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|v| v.parse::<f64>().ok())
            };
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let calls = field("calls")? as u64;
            Some((name.to_owned(), calls, field("usec_per_call")?))
        })
        .filter(|(_, calls, _)| *calls >= min_calls)
        .collect();
    profile.sort_by_key(|entry| std::cmp::Reverse(entry.1));
    profile
}

/// Resets the single Redis server's command statistics.
async fn reset_redis_stats(url: &str) {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// pgbench's select-only transactions/s with 32 clients on the server at `port`.
fn pgbench_select_only(server: &PostgresServer, seconds: u32) -> Option<f64> {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("bin").join("pgbench"))
        .find(|path| path.is_file())?;
    let port = server.port().to_string();
    let base = ["-h", "127.0.0.1", "-p", &port, "-U", "postgres"];
    let init = std::process::Command::new(&bin)
        .args(base)
        .args(["-i", "-q", "postgres"])
        .output()
        .ok()?;
    if !init.status.success() {
        return None;
    }
    let run = std::process::Command::new(&bin)
        .args(base)
        .args([
            "-S",
            "-c",
            "32",
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            "postgres",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&run.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

struct Servers {
    single: RedisServer,
    three: RedisCluster,
    five: RedisCluster,
    postgres: PostgresServer,
    etcd: EtcdCluster,
}

async fn clients(servers: &Servers) -> Vec<Client> {
    let single = vec![servers.single.url()];
    let (three, five) = (servers.three.urls(), servers.five.urls());
    let refs = |urls: &[String]| urls.iter().map(String::clone).collect::<Vec<_>>();
    let redlock = |urls: Vec<String>| async move {
        let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
        Arc::new(RedlockDistributedLock::new(&refs).await.unwrap()) as Arc<dyn DistributedLock>
    };
    let pg = servers.postgres.url();
    let lease: Arc<dyn DistributedLock> =
        Arc::new(PostgresDistributedLock::new(&pg).await.unwrap());
    let advisory: Arc<dyn DistributedLock> = Arc::new(
        PostgresDistributedLock::builder(&pg)
            .with_mode(PostgresLockMode::Advisory)
            .build()
            .await
            .unwrap(),
    );
    let etcd_url = servers.etcd.url("bench");
    let endpoints: Vec<String> = etcd_url
        .trim_start_matches("etcd://")
        .trim_end_matches("/bench")
        .split(',')
        .map(|host| format!("http://{host}"))
        .collect();
    vec![
        ours("in-process", Arc::new(InMemoryDistributedLock::new())).await,
        redis_floor("Redis raw floor", &single, Fencing::None).await,
        redis_floor("Redis raw floor + fencing script", &single, Fencing::Script).await,
        redis_floor("Redis raw floor + fencing MULTI", &single, Fencing::Multi).await,
        ours(
            "Redis ours",
            Arc::new(RedisDistributedLock::new(&single[0]).await.unwrap()),
        )
        .await,
        rslock_client("Redis rslock-1", &single),
        async_redis_lock_client("Redis async-redis-lock", &single[0]).await,
        redis_floor("Redlock-3 raw floor", &three, Fencing::None).await,
        redis_floor(
            "Redlock-3 raw floor + fencing script",
            &three,
            Fencing::Script,
        )
        .await,
        ours("Redlock-3 ours", redlock(refs(&three)).await).await,
        rslock_client("Redlock-3 rslock-3", &three),
        redis_floor("Redlock-5 raw floor", &five, Fencing::None).await,
        ours("Redlock-5 ours", redlock(refs(&five)).await).await,
        rslock_client("Redlock-5 rslock-5", &five),
        postgres_lease_floor("PostgreSQL lease raw floor", &pg).await,
        ours("PostgreSQL lease ours", lease).await,
        ours("PostgreSQL advisory ours", advisory).await,
        etcd_floor("etcd raw floor", endpoints).await,
        ours(
            "etcd ours",
            Arc::new(EtcdDistributedLock::new(&etcd_url).await.unwrap()),
        )
        .await,
    ]
}

fn print_table(rows: &[Row]) {
    println!(
        "| client | pair p50 | pair p99 | {TASKS} tasks, own resource: pairs/s | {CONTENDERS} tasks, one resource: acquisitions/s | extend p50 |"
    );
    println!("|---|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {} | {} | {:.0} | {} | {} |",
            row.label,
            ms(row.p50),
            ms(row.p99),
            row.pairs_per_second,
            row.contended_per_second
                .map_or_else(|| "–".to_owned(), |n| format!("{n:.0}")),
            row.extend_p50.map_or_else(|| "–".to_owned(), ms),
        );
    }
}

fn ratio(rows: &[Row], a: &str, b: &str, what: impl Fn(&Row) -> f64) -> String {
    let find = |label: &str| rows.iter().find(|row| row.label == label);
    match (find(a), find(b)) {
        (Some(a), Some(b)) if what(b) > 0.0 => format!("{:.2}", what(a) / what(b)),
        _ => "–".to_owned(),
    }
}

/// Redlock-3 under faults: node 3 behind a proxy; healthy, slowed by +5 ms, frozen.
async fn fault_rows(run_for: Duration) -> Vec<(String, f64, f64)> {
    let cluster = RedisCluster::new(3);
    let urls = cluster.urls();
    let proxy = FaultProxy::start(cluster.node(2).port()).await;
    let through_proxy = vec![urls[0].clone(), urls[1].clone(), proxy.redis_url()];
    let refs: Vec<&str> = through_proxy.iter().map(String::as_str).collect();
    let ours_client = ours(
        "Redlock-3 ours (faults)",
        Arc::new(RedlockDistributedLock::new(&refs).await.unwrap()),
    )
    .await;
    let theirs = rslock_client("Redlock-3 rslock-3 (faults)", &through_proxy);
    let mut rows = Vec::new();
    for (condition, setup) in [
        ("healthy", 0),
        ("one node +5 ms each way", 1),
        ("one node frozen (SIGSTOP)", 2),
    ] {
        match setup {
            1 => proxy.delay(Duration::from_millis(5)),
            2 => {
                proxy.pass();
                cluster.node(2).pause();
            }
            _ => proxy.pass(),
        }
        let ours_tp = capped_throughput(&ours_client, run_for, "bench:fault:ours").await;
        let theirs_tp = capped_throughput(&theirs, run_for, "bench:fault:rs").await;
        rows.push((condition.to_owned(), ours_tp, theirs_tp));
    }
    cluster.node(2).resume();
    rows
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sizes = sizes();
    let servers = Servers {
        single: RedisServer::start_new(),
        three: RedisCluster::new(3),
        five: RedisCluster::new(5),
        postgres: PostgresServer::start_new(),
        etcd: EtcdCluster::single(),
    };
    let clients = clients(&servers).await;

    if let Some(at) = args.iter().position(|a| a == "--callgrind") {
        let label = &args[at + 1];
        let pairs: usize = args[at + 2].parse().unwrap();
        let client = clients
            .iter()
            .find(|c| &c.label == label)
            .unwrap_or_else(|| panic!("no client labelled {label}"));
        for _ in 0..pairs {
            assert!((client.pair)("bench:callgrind".to_owned()).await);
        }
        return;
    }
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|at| args.get(at + 1).cloned());

    let started = Instant::now();
    let mut rows = Vec::new();
    // The server-side cost of one pair, ours against the floor: each measured alone on the single
    // node, its command statistics taken right after.
    let mut profiles = Vec::new();
    for client in clients
        .iter()
        .filter(|c| only.as_ref().is_none_or(|o| c.label.contains(o.as_str())))
    {
        let single_node = client.label.starts_with("Redis ");
        if single_node {
            reset_redis_stats(&servers.single.url()).await;
        }
        rows.push(measure(client, &sizes).await);
        if single_node {
            profiles.push((
                client.label.clone(),
                redis_command_profile(&servers.single.url(), 100).await,
            ));
        }
    }
    let faults = if only.is_none() {
        fault_rows(sizes.run_for).await
    } else {
        Vec::new()
    };
    let pgbench = if only.is_none() {
        pgbench_select_only(
            &servers.postgres,
            u32::try_from(sizes.run_for.as_secs().max(1)).unwrap_or(1),
        )
    } else {
        None
    };

    println!(
        "lockbench: {} sequential pairs per latency row, {:?} per throughput row; servers on loopback, sharing the machine's cores with the client",
        sizes.samples, sizes.run_for
    );
    print_table(&rows);
    println!();
    println!(
        "| Redlock-3 under a fault ({TASKS} tasks, pairs/s; a pair not done in {PAIR_CAP:?} counts 0) | ours | rslock-3 | ours / rslock-3 |"
    );
    println!("|---|---|---|---|");
    for (condition, ours_tp, theirs_tp) in &faults {
        println!(
            "| {condition} | {ours_tp:.0} | {theirs_tp:.0} | {} |",
            if *theirs_tp > 0.0 {
                format!("{:.1}", ours_tp / theirs_tp)
            } else {
                "∞".to_owned()
            }
        );
    }
    println!();
    println!("| single-node Redis server, per client | command: calls, server µs per call |");
    println!("|---|---|");
    for (label, profile) in &profiles {
        let shown: Vec<String> = profile
            .iter()
            .map(|(name, calls, usec)| format!("{name}: {calls}, {usec:.2} µs"))
            .collect();
        println!("| {label} | {} |", shown.join("; "));
    }
    println!();
    let pairs = |row: &Row| row.pairs_per_second;
    let p50 = |row: &Row| row.p50.as_secs_f64();
    println!("ratios (same run):");
    println!(
        "- Redis ours / raw floor, {TASKS}-task pairs/s: {}",
        ratio(&rows, "Redis ours", "Redis raw floor", pairs)
    );
    println!(
        "- Redis ours / raw floor + fencing script (the same server commands by hand), {TASKS}-task pairs/s: {}",
        ratio(
            &rows,
            "Redis ours",
            "Redis raw floor + fencing script",
            pairs
        )
    );
    println!(
        "- Redis raw floor + fencing script / raw floor, {TASKS}-task pairs/s: {} (MULTI instead of the script: {})",
        ratio(
            &rows,
            "Redis raw floor + fencing script",
            "Redis raw floor",
            pairs
        ),
        ratio(
            &rows,
            "Redis raw floor + fencing MULTI",
            "Redis raw floor",
            pairs
        )
    );
    println!(
        "- Redlock-3 ours / raw floor + fencing script, {TASKS}-task pairs/s: {}",
        ratio(
            &rows,
            "Redlock-3 ours",
            "Redlock-3 raw floor + fencing script",
            pairs
        )
    );
    println!(
        "- Redlock-3 raw floor + fencing script / rslock-3, {TASKS}-task pairs/s: {}",
        ratio(
            &rows,
            "Redlock-3 raw floor + fencing script",
            "Redlock-3 rslock-3",
            pairs
        )
    );
    println!(
        "- Redlock-3 ours / rslock-3, {TASKS}-task pairs/s: {}",
        ratio(&rows, "Redlock-3 ours", "Redlock-3 rslock-3", pairs)
    );
    println!(
        "- Redlock-3 ours p50 / Redis ours p50: {}",
        ratio(&rows, "Redlock-3 ours", "Redis ours", p50)
    );
    println!(
        "- PostgreSQL lease ours / raw floor, pair p50: {}",
        ratio(
            &rows,
            "PostgreSQL lease ours",
            "PostgreSQL lease raw floor",
            p50
        )
    );
    println!(
        "- etcd ours / raw floor, pair p50: {}",
        ratio(&rows, "etcd ours", "etcd raw floor", p50)
    );
    if let Some(tps) = pgbench {
        println!("- pgbench select-only, 32 clients, same server: {tps:.0} transactions/s");
    }
    println!("(run took {:.0} s)", started.elapsed().as_secs_f64());
}
