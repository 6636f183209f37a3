//! Embedding the backends in an application that already has its connections: a PostgreSQL pool and a
//! Redis `ConnectionManager` handed in, shared by the lock and the recipe stores, and left open.

use std::sync::Arc;
use std::time::Duration;

use integration_tests::{PostgresServer, RedisServer};
use state::recipes::fenced::{FencedStore, RedisFencedStore};
use state::recipes::tasks::{RedisTaskStore, TaskQueue};
use state::{DistributedLock, PostgresDistributedLock, RedisDistributedLock};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applications_postgres_pool_is_used_and_left_open() {
    let server = PostgresServer::start_new();
    let app_pool = sqlx::PgPool::connect(&server.url()).await.unwrap();
    let locks = PostgresDistributedLock::builder_from_pool(app_pool.clone())
        .build()
        .await
        .unwrap();
    let guard = locks
        .acquire("invoice:7", Duration::from_secs(5))
        .await
        .unwrap();
    // The lock table lives in the application's database, next to its data.
    let rows: (i64,) =
        sqlx::query_as("SELECT count(*) FROM state_locks WHERE resource = 'invoice:7'")
            .fetch_one(&app_pool)
            .await
            .unwrap();
    assert_eq!(rows.0, 1);
    guard.release().await.unwrap();
    assert!(format!("{locks:?}").contains("(application pool)"));
    locks.shutdown().await;
    let still_open: (i32,) = sqlx::query_as("SELECT 1")
        .fetch_one(&app_pool)
        .await
        .unwrap();
    assert_eq!(
        still_open.0, 1,
        "shutdown never closes the application's pool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applications_redis_connection_is_shared_by_lock_and_stores() {
    let server = RedisServer::start_new();
    let client = redis::Client::open(server.url()).unwrap();
    let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    let lock: Arc<dyn DistributedLock> =
        Arc::new(RedisDistributedLock::from_connection_manager(conn.clone()));
    let fenced = RedisFencedStore::from_connection_manager(conn.clone());
    let tasks = Arc::new(RedisTaskStore::from_connection_manager(conn));
    let guard = lock
        .acquire("orders:3", Duration::from_secs(5))
        .await
        .unwrap();
    fenced
        .write("orders:3", guard.fencing_token(), b"1200")
        .await
        .unwrap();
    let queue = TaskQueue::new(Arc::clone(&lock), tasks, Duration::from_secs(5));
    assert!(queue.submit("email:1", b"").await.unwrap());
    guard.release().await.unwrap();
    assert_eq!(
        fenced.read("orders:3").await.unwrap().unwrap().value,
        b"1200"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipe_stores_live_under_the_applications_names() {
    use state::recipes::fenced::PostgresFencedStore;
    use state::recipes::tasks::{PostgresTaskStore, TaskStore};

    // Redis: two applications on one server, each under its own prefix, never see each other's tasks.
    let redis = RedisServer::start_new();
    let client = redis::Client::open(redis.url()).unwrap();
    let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    let lock: Arc<dyn DistributedLock> =
        Arc::new(RedisDistributedLock::from_connection_manager(conn.clone()));
    let billing = Arc::new(
        RedisTaskStore::from_connection_manager(conn.clone())
            .with_key_prefix("billing:")
            .unwrap(),
    );
    let search = Arc::new(
        RedisTaskStore::from_connection_manager(conn.clone())
            .with_key_prefix("search:")
            .unwrap(),
    );
    let billing_queue = TaskQueue::new(Arc::clone(&lock), billing.clone(), Duration::from_secs(5));
    assert!(billing_queue.submit("job", b"").await.unwrap());
    assert!(search.get("job").await.unwrap().is_none());
    assert!(billing.get("job").await.unwrap().is_some());
    let mut raw = conn.clone();
    let exists: bool = redis::cmd("EXISTS")
        .arg("billing:task:job")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(exists, "the task lives under the application's prefix");

    // PostgreSQL: the stores' tables in the application's schema, beside the lock table.
    let postgres = PostgresServer::start_new();
    let locks = PostgresDistributedLock::builder(&postgres.url())
        .with_schema("app")
        .build()
        .await
        .unwrap();
    let tasks = PostgresTaskStore::in_table(locks.pool().clone(), "app", "jobs")
        .await
        .unwrap();
    let fenced = PostgresFencedStore::in_table(locks.pool().clone(), "app", "records")
        .await
        .unwrap();
    let queue = TaskQueue::new(
        Arc::new(locks.clone()),
        Arc::new(tasks),
        Duration::from_secs(5),
    );
    assert!(queue.submit("job", b"").await.unwrap());
    fenced.write("k", 1, b"v").await.unwrap();
    for table in ["app.jobs", "app.records"] {
        let rows: (i64,) =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(locks.pool())
                .await
                .unwrap();
        assert_eq!(rows.0, 1, "{table}");
    }
    assert!(matches!(
        PostgresTaskStore::in_table(locks.pool().clone(), "app", "Robert'); DROP").await,
        Err(state::StateError::InvalidInput { .. })
    ));
}
