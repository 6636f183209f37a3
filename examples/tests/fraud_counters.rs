//! The example user job (per-account fraud counters, `examples/src/fraud.rs`) through the demo's kill
//! and join: one instance killed abruptly mid-stream (no hand-off), one joining; every account's state
//! must equal the recomputation — on in-process locks and on a real Redis.

// Test code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use examples::fraud::{FraudCounters, PaymentsDemo};
use processor::dev::demo::{DemoConfig, DemoJob, Quiet, run_demo};

fn demo() -> PaymentsDemo {
    PaymentsDemo {
        job: FraudCounters::default(),
        payments: 20_000,
        accounts: 300,
    }
}

async fn check(lock_url: &str) {
    let job = demo();
    let mut config = DemoConfig::default();
    config.lock_url = lock_url.to_owned();
    config.topic = "payments".to_owned();
    config.partitions = 4;
    config.job = Some(Arc::new(job) as Arc<dyn DemoJob>);
    let report = run_demo(config, &mut Quiet).await.unwrap();
    assert!(report.exact(), "{:?}", report.mismatches);
    assert_eq!(report.expected_keys, job.expected_accounts().len());
    let alerts: u32 = job.expected_accounts().values().map(|a| a.alerts).sum();
    assert!(
        alerts > 0,
        "the input crosses the limits: the check sees alerts"
    );
    assert!(report.applied_with_replays >= 20_000 * 6 / 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_job_survives_a_kill_and_a_join_exactly_on_in_process_locks() {
    check("memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_job_survives_a_kill_and_a_join_exactly_on_redis() {
    let redis = integration_tests::RedisServer::start_new();
    check(&redis.url()).await;
}

/// The check can fail: a recomputation that differs from what the job does (a lower payment limit)
/// is reported as mismatches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_recomputation_is_reported_as_mismatches() {
    struct Skewed(PaymentsDemo);
    impl DemoJob for Skewed {
        fn records(&self) -> u64 {
            self.0.records()
        }
        fn operator(&self) -> Arc<dyn processor::operator::Operator> {
            self.0.operator()
        }
        fn produce<'a>(
            &'a self,
            brokers: &'a str,
            topic: &'a str,
            range: std::ops::Range<u64>,
        ) -> futures::future::BoxFuture<'a, processor::ProcessorResult<()>> {
            self.0.produce(brokers, topic, range)
        }
        fn expected_state(&self) -> processor::ProcessorResult<processor::inspect::StateEntries> {
            let mut other = self.0;
            other.job.max_payments = 3;
            other.expected_state()
        }
    }
    let mut config = DemoConfig::default();
    config.topic = "payments".to_owned();
    config.partitions = 2;
    config.job = Some(Arc::new(Skewed(PaymentsDemo {
        payments: 5_000,
        ..demo()
    })));
    let report = run_demo(config, &mut Quiet).await.unwrap();
    assert!(!report.exact());
    assert!(!report.mismatches.is_empty());
}
