//! The conformance suite against a real `redis-server` (one per test). The contention check's counter
//! is a plain GET-then-SET value in another Redis.

use integration_tests::adapters::{CounterServer, RedisFixture};

state::conformance_tests!(RedisFixture::start(), CounterServer::start().await);
