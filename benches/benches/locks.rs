//! Acquire+release pairs per backend, each beside the raw floor on the same server in the same run:
//! a Redis pair is at least a `SET NX PX` plus an `EVAL` compare-and-delete, so that is the baseline.
//!
//! ```text
//! cargo bench -p benches --bench locks            # full run
//! cargo bench -p benches --bench locks -- --quick # quick
//! ```

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use integration_tests::RedisServer;
use state::{DistributedLock, InMemoryDistributedLock, RedisDistributedLock};
use tokio::runtime::Runtime;

const TTL: Duration = Duration::from_secs(10);
const COMPARE_AND_DELETE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

async fn pair(lock: &dyn DistributedLock, resource: &str) {
    let guard = lock
        .try_acquire(resource, TTL)
        .await
        .expect("acquire")
        .expect("uncontended");
    guard.release().await.expect("release");
}

async fn raw_pair(conn: &mut redis::aio::MultiplexedConnection, script: &redis::Script) {
    let ok: Option<String> = redis::cmd("SET")
        .arg("bench:raw")
        .arg("owner")
        .arg("NX")
        .arg("PX")
        .arg(10_000)
        .query_async(conn)
        .await
        .expect("SET NX PX");
    assert!(ok.is_some());
    let deleted: i64 = script
        .key("bench:raw")
        .arg("owner")
        .invoke_async(conn)
        .await
        .expect("compare-and-delete");
    assert_eq!(deleted, 1);
}

fn uncontended(c: &mut Criterion) {
    let rt = Runtime::new().expect("tokio runtime");
    let server = RedisServer::start_new();
    let memory: Arc<dyn DistributedLock> = Arc::new(InMemoryDistributedLock::new());
    let redis_lock: Arc<dyn DistributedLock> = Arc::new(
        rt.block_on(RedisDistributedLock::new(&server.url()))
            .expect("connect"),
    );
    let raw = rt
        .block_on(async {
            redis::Client::open(server.url())?
                .get_multiplexed_async_connection()
                .await
        })
        .expect("raw connection");
    let script = redis::Script::new(COMPARE_AND_DELETE);

    let mut group = c.benchmark_group("uncontended_pair");
    group.bench_function("memory", |b| {
        b.to_async(&rt)
            .iter(|| pair(memory.as_ref(), "bench:memory"))
    });
    group.bench_function("redis_raw_floor", |b| {
        b.to_async(&rt).iter(|| {
            let (mut conn, script) = (raw.clone(), &script);
            async move { raw_pair(&mut conn, script).await }
        })
    });
    group.bench_function("redis", |b| {
        b.to_async(&rt)
            .iter(|| pair(redis_lock.as_ref(), "bench:redis"))
    });
    group.finish();
}

criterion_group!(benches, uncontended);
criterion_main!(benches);
