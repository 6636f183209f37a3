//! Shared set-up of the examples: the lock service and stores named by `--lock-url`.
//!
//! Run an example with `cargo run -p examples --example NAME [-- --lock-url URL]`, where `URL` is
//! `memory` (the default, in-process), `redis://host:port`, `redlock://h1:p1,h2:p2,h3:p3` or
//! `postgres://user@host/db` — any URL `state::connect` accepts.

pub mod fraud;

use std::time::Duration;

use anyhow::Context;
use state::RetryConfig;

pub use state::Backend;

/// A retry policy for examples that contend on purpose.
pub fn patient() -> RetryConfig {
    RetryConfig {
        max_attempts: 5_000,
        initial_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(20),
        backoff_multiplier: 1.5,
    }
}

/// The backend named by `--lock-url` (any URL [`state::connect()`] accepts), with the [`patient`]
/// retry policy.
///
/// # Errors
/// The URL's or the backend's error.
pub async fn backend(url: &str) -> anyhow::Result<Backend> {
    state::connect_with_retry(url, patient())
        .await
        .with_context(|| format!("connecting to the lock backend `{url}`"))
}

/// Installs a log subscriber driven by `RUST_LOG`.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}
