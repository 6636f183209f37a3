//! The conformance suite against real etcd: a single member, and a three-member cluster (every handle a
//! client of all three members). The contention check's counter is a plain GET-then-SET value in Redis.

mod single {
    use integration_tests::adapters::{CounterServer, EtcdFixture};

    state::conformance_tests!(EtcdFixture::single(), CounterServer::start().await);
}

mod three_members {
    use integration_tests::adapters::{CounterServer, EtcdFixture};

    state::conformance_tests!(EtcdFixture::three(), CounterServer::start().await);
}
