//! Lock backends, one module each. The in-process backend is always built; the others sit behind
//! the cargo feature of the same name.

pub mod memory;

#[cfg(feature = "redis")]
pub mod redis;

#[cfg(feature = "redis")]
pub mod redlock;

#[cfg(feature = "postgres")]
pub mod postgres;
