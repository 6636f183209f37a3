//! The conformance suite's hung-backend check against every network backend, each behind the harness's
//! fault proxy: with the backend frozen mid-lease (requests go out, nothing comes back), a kept lock,
//! work under `with_lock` and a leader are told they lost the lock by their safe deadline (+ 100 ms),
//! not when the backend's own operation timeout (Redis 2 s, PostgreSQL 5 s, etcd 2 s) gives up.

use integration_tests::adapters::{
    FreezeControl, ProxiedEtcd, ProxiedPostgres, ProxiedRedis, ProxiedRedlock,
};
use state::PostgresLockMode;
use state::conformance::hung_backend_reports_lost_by_the_safe_deadline;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_frozen_mid_lease() {
    let fixture = ProxiedRedis::start().await;
    hung_backend_reports_lost_by_the_safe_deadline(&fixture, &FreezeControl(vec![&fixture.proxy]))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redlock_majority_frozen_mid_lease() {
    let fixture = ProxiedRedlock::start(3).await;
    hung_backend_reports_lost_by_the_safe_deadline(&fixture, &FreezeControl(fixture.majority()))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_lease_frozen_mid_lease() {
    let fixture = ProxiedPostgres::start(PostgresLockMode::Lease).await;
    hung_backend_reports_lost_by_the_safe_deadline(&fixture, &FreezeControl(vec![&fixture.proxy]))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_advisory_frozen_mid_lease() {
    let fixture = ProxiedPostgres::start(PostgresLockMode::Advisory).await;
    hung_backend_reports_lost_by_the_safe_deadline(&fixture, &FreezeControl(vec![&fixture.proxy]))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_frozen_mid_lease() {
    let fixture = ProxiedEtcd::start().await;
    hung_backend_reports_lost_by_the_safe_deadline(&fixture, &FreezeControl(vec![&fixture.proxy]))
        .await;
}
