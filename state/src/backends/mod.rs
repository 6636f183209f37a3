//! Lock backends, one module each. The in-process backend is always built; the others sit behind
//! the cargo feature of the same name.

pub mod memory;

#[cfg(feature = "redis")]
pub mod redis;

#[cfg(feature = "redis")]
pub mod redlock;

#[cfg(feature = "postgres")]
pub mod postgres;

#[cfg(feature = "etcd")]
pub mod etcd;

use std::future::Future;
use std::time::Duration;

use crate::error::BoxError;
use crate::{StateError, StateResult};

/// Runs one backend call bounded by `timeout`, mapping the driver's error and the timeout to
/// [`StateError`]s that name the backend, operation and resource. Shared by every network backend.
#[cfg_attr(
    not(any(feature = "redis", feature = "postgres", feature = "etcd")),
    allow(dead_code)
)]
pub(crate) async fn bounded<T, E>(
    timeout: Duration,
    backend: &'static str,
    operation: &'static str,
    resource: &str,
    call: impl Future<Output = Result<T, E>>,
) -> StateResult<T>
where
    E: Into<BoxError>,
{
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(StateError::backend(backend, operation, resource, err)),
        Err(_) => Err(StateError::Timeout {
            backend,
            operation,
            resource: resource.to_owned(),
            timeout,
        }),
    }
}
