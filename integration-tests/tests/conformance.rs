//! The lock conformance suite (`state::conformance`), one module per backend, against real servers:
//! the in-process backend; a real `redis-server` (one per test); Redlock over 3 and over 5 real
//! `redis-server` nodes; a real PostgreSQL (one cluster per test) in lease and in advisory mode; real
//! etcd on a single member and on a three-member cluster (every handle a client of all three). The
//! contention check's counter is a plain GET-then-SET value in another Redis, so each lock is seen
//! protecting external storage. One test binary: `cargo test -p integration-tests --test conformance
//! -- redis::` runs one backend.

mod memory {
    use integration_tests::adapters::{CounterServer, MemoryBackend};

    state::conformance_tests!(MemoryBackend::default(), CounterServer::start().await);
}

mod redis {
    use integration_tests::adapters::{CounterServer, RedisFixture};

    state::conformance_tests!(RedisFixture::start(), CounterServer::start().await);
}

mod redlock {
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
}

mod postgres {
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
}

mod etcd {
    mod single {
        use integration_tests::adapters::{CounterServer, EtcdFixture};

        state::conformance_tests!(EtcdFixture::single(), CounterServer::start().await);
    }

    mod three_members {
        use integration_tests::adapters::{CounterServer, EtcdFixture};

        state::conformance_tests!(EtcdFixture::three(), CounterServer::start().await);
    }
}
