//! The conformance suite against Redlock over 3 and over 5 real `redis-server` nodes.

mod three_nodes {
    use integration_tests::adapters::{CounterServer, RedlockFixture};
    state::conformance_tests!(RedlockFixture::start(3), CounterServer::start().await);
}

mod five_nodes {
    use integration_tests::adapters::{CounterServer, RedlockFixture};
    state::conformance_tests!(RedlockFixture::start(5), CounterServer::start().await);
}

mod dead_majority {
    use integration_tests::adapters::{ClusterControl, RedlockFixture};

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn dead_cluster_errors_in_bounded_time_then_recovers() {
        let fixture = RedlockFixture::start(3);
        state::conformance::dead_server_errors_then_recovers(
            &fixture,
            &ClusterControl(&fixture.cluster),
        )
        .await;
    }
}
