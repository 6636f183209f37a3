//! Credentials never leave the crate: with every log line captured (TRACE), connections given secrets in
//! every form (URL user-info, `?password=`, Redlock's shared user-info), succeeding and failing, show the
//! secret in no `Debug` output, no error and no log line.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration_tests::{PostgresServer, RedisServer};
use state::{PostgresDistributedLock, RedisDistributedLock};

const SECRET: &str = "hunter2-do-not-print";

/// Captured log output.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_appears_in_debug_output_errors_or_logs() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .init();
    let mut shown = Vec::new();

    let redis = RedisServer::start_new();
    // A password the server does not expect: refused.
    let wrong = format!("redis://:{SECRET}@127.0.0.1:{}", redis.port());
    let refused = RedisDistributedLock::new(&wrong).await;
    shown.push(format!("{refused:?}"));
    if let Err(err) = &refused {
        shown.push(err.to_string());
    }
    // Every scheme through the one-URL entry point, reachable or not.
    for url in [
        format!("redis://:{SECRET}@127.0.0.1:1"),
        format!("redlock://user:{SECRET}@127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"),
        format!("postgres://app:{SECRET}@127.0.0.1:1/app?connect_timeout=1"),
        format!("postgres://app@127.0.0.1:1/app?password={SECRET}"),
        format!("zookeeper://app:{SECRET}@zk:2181"),
    ] {
        let outcome = tokio::time::timeout(Duration::from_secs(20), state::connect(&url)).await;
        shown.push(format!("{outcome:?}"));
        if let Ok(Err(err)) = &outcome {
            shown.push(err.to_string());
            let mut source = std::error::Error::source(err);
            while let Some(cause) = source {
                shown.push(cause.to_string());
                source = cause.source();
            }
        }
    }
    // A working PostgreSQL connection whose URL carries the (ignored by trust auth) password.
    let postgres = PostgresServer::start_new();
    let url = postgres
        .url()
        .replace("postgres@", &format!("postgres:{SECRET}@"));
    let connected = PostgresDistributedLock::new(&url).await.unwrap();
    shown.push(format!("{connected:?}"));
    let guard = state::DistributedLock::acquire(&connected, "r", Duration::from_secs(5))
        .await
        .unwrap();
    shown.push(format!("{guard:?}"));
    guard.release().await.unwrap();

    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        !logs.is_empty(),
        "the test must capture log lines to check them"
    );
    for line in logs.lines().chain(shown.iter().map(String::as_str)) {
        assert!(!line.contains(SECRET), "a secret was shown: {line}");
    }
}
