//! The conformance suite against a real PostgreSQL (one cluster per test), in lease and in advisory
//! mode, unchanged.

mod lease {
    use integration_tests::adapters::{CounterServer, PostgresFixture};
    use state::PostgresLockMode;
    state::conformance_tests!(
        PostgresFixture::start(PostgresLockMode::Lease),
        CounterServer::start().await
    );
}

mod advisory {
    use integration_tests::adapters::{CounterServer, PostgresFixture};
    use state::PostgresLockMode;
    state::conformance_tests!(
        PostgresFixture::start(PostgresLockMode::Advisory),
        CounterServer::start().await
    );
}
