//! A separate process that contends for one PostgreSQL lease lock, for tests that need a client with a
//! different wall clock (run it under `faketime`). Each round: acquire, mark "inside" in a shared table
//! (an overlap shows as a count above 1), hold briefly, unmark, release.
//!
//! Usage: `lock_contender URL RESOURCE ROUNDS HOLD_MS TTL_MS [leak]`; prints
//! `wall_clock_ms=… rounds=… overlaps=… fence=…`. With `leak`, it takes the lock once and exits without
//! releasing it, so the lease can only end by expiring.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use state::{DistributedLock, PostgresDistributedLock, RetryConfig};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (url, resource, rounds, hold_ms, ttl_ms, leak) = match args.as_slice() {
        [_, url, resource, rounds, hold_ms, ttl_ms] => {
            (url, resource, rounds, hold_ms, ttl_ms, false)
        }
        [_, url, resource, rounds, hold_ms, ttl_ms, leak] if leak == "leak" => {
            (url, resource, rounds, hold_ms, ttl_ms, true)
        }
        _ => return Err("usage: lock_contender URL RESOURCE ROUNDS HOLD_MS TTL_MS [leak]".into()),
    };
    let (rounds, hold, ttl): (u32, u64, u64) = (rounds.parse()?, hold_ms.parse()?, ttl_ms.parse()?);
    let locks = PostgresDistributedLock::new(url)
        .await?
        .with_retry(RetryConfig {
            max_attempts: 10_000,
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(10),
            backoff_multiplier: 1.5,
        });
    let pool = locks.pool().clone();
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
    };
    if leak {
        let token = locks
            .acquire(resource, Duration::from_millis(ttl))
            .await?
            .leak();
        println!(
            "wall_clock_ms={} rounds=1 overlaps=0 fence={}",
            now()?,
            token.fencing_token
        );
        return Ok(());
    }
    let mut overlaps = 0;
    let mut fence = 0;
    for _ in 0..rounds {
        let guard = locks.acquire(resource, Duration::from_millis(ttl)).await?;
        fence = guard.fencing_token();
        let inside: i32 =
            sqlx::query_scalar("UPDATE contention SET inside = inside + 1 RETURNING inside")
                .fetch_one(&pool)
                .await?;
        if inside != 1 {
            overlaps += 1;
        }
        tokio::time::sleep(Duration::from_millis(hold)).await;
        sqlx::query("UPDATE contention SET inside = inside - 1")
            .execute(&pool)
            .await?;
        guard.release().await?;
    }
    println!(
        "wall_clock_ms={} rounds={rounds} overlaps={overlaps} fence={fence}",
        now()?
    );
    Ok(())
}
