//! The conformance suite against the in-process backend. The contention check's counter is a plain
//! GET-then-SET value in a real Redis, so the lock is seen protecting external storage.

use integration_tests::adapters::{CounterServer, MemoryBackend};

state::conformance_tests!(MemoryBackend::default(), CounterServer::start().await);
