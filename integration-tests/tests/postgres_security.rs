//! PostgreSQL with the security a production database has: TLS required for the application's role and
//! SCRAM-SHA-256 password authentication. The lock works with `sslmode=require` and with
//! `sslmode=verify-full` against the cluster's CA; a wrong password, a plain-text connection and a CA
//! that did not sign the server each fail fast with one error that never shows the password.

use std::time::Duration;

use integration_tests::{Certificates, PostgresServer};
use state::{DistributedLock, PostgresDistributedLock};
use tokio::time::Instant;

const PASSWORD: &str = "scram-S3cret";
const TTL: Duration = Duration::from_secs(5);

/// Connecting with `url` fails within 10 s; the error and its cause, which must not show the password.
async fn refused(url: &str) -> String {
    let started = Instant::now();
    let err = match PostgresDistributedLock::new(url).await {
        Err(err) => err,
        Ok(_) => panic!("{url} was accepted"),
    };
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{url} took {:?} to fail",
        started.elapsed()
    );
    let shown = format!("{err} / {err:?} / {:?}", std::error::Error::source(&err));
    assert!(!shown.contains(PASSWORD), "the password shows: {shown}");
    shown
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_scram_work_and_each_refusal_is_one_clear_error() {
    integration_tests::init_tracing();
    let server = PostgresServer::start_new();
    let certificates = server.require_tls_and_scram("app", PASSWORD);
    let port = server.port();
    let base = format!("postgres://app:{PASSWORD}@127.0.0.1:{port}/postgres");

    for url in [
        format!("{base}?sslmode=require"),
        format!(
            "{base}?sslmode=verify-full&sslrootcert={}",
            certificates.ca().display()
        ),
    ] {
        let lock = PostgresDistributedLock::new(&url)
            .await
            .unwrap_or_else(|err| panic!("connect with TLS and SCRAM: {err:?}"));
        let guard = lock.acquire("secure", TTL).await.expect("acquire");
        assert!(
            lock.try_acquire("secure", TTL)
                .await
                .expect("ask")
                .is_none()
        );
        guard.release().await.expect("release");
        assert!(!format!("{lock:?}").contains(PASSWORD));
    }

    let wrong = refused(&format!(
        "postgres://app:not-{PASSWORD}@127.0.0.1:{port}/postgres?sslmode=require"
    ))
    .await;
    assert!(wrong.contains("password authentication failed"), "{wrong}");
    let plain = refused(&format!("{base}?sslmode=disable")).await;
    assert!(
        plain.contains("no encryption") || plain.contains("pg_hba"),
        "{plain}"
    );
    let elsewhere = tempfile::tempdir().expect("a temp dir");
    let stranger = Certificates::make(elsewhere.path());
    refused(&format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        stranger.ca().display()
    ))
    .await;
}
