//! A job whose policy is to stop at a record it refuses: the partition stops there (its error names the
//! offset), is released, and is not claimed again in a hot loop of claim, restore and refuse.

// Test code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use processor::dev::DevBroker;
use processor::job::{Context, Input, Job, JobError, JobOperator, OnError, codec};
use processor::{InstanceConfig, Services};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::{start_instance, wait_for};

const TOPIC: &str = "amounts";

/// Sums amounts per key; a value that is not a decimal stops the partition.
struct StrictSum;

impl Job for StrictSum {
    type Key = ();
    type KeyCodec = codec::Skip;
    type Value = i64;
    type ValueCodec = codec::DecimalI64;
    type State = i64;
    type StateCodec = codec::Bincode;
    type Output = i64;
    type OutputCodec = codec::Json;

    fn process(
        &self,
        input: Input<'_, (), i64>,
        ctx: &mut Context<'_, Self>,
    ) -> Result<(), JobError> {
        ctx.update_state(|sum| Some(sum.unwrap_or(0) + input.value))?;
        Ok(())
    }

    fn on_error(&self) -> OnError {
        OnError::Stop
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_stopped_by_its_job_is_released_and_claimed_again_only_after_the_pause() {
    integration_tests::init_tracing();
    let broker = DevBroker::start(TOPIC, 1).unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .unwrap();
    for i in 0..100 {
        let value = if i == 50 {
            "fifty".to_owned()
        } else {
            i.to_string()
        };
        producer
            .send(
                FutureRecord::to(TOPIC)
                    .partition(0)
                    .key("k")
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let root = tempfile::tempdir().unwrap();
    let mut services = Services::in_memory(root.path().join("checkpoints")).unwrap();
    services.operator = Arc::new(JobOperator::new(StrictSum));
    let config = InstanceConfig::new(
        "a",
        TOPIC,
        1,
        &broker.bootstrap_servers(),
        root.path().join("a"),
    )
    .with_rejected_record_pause(Duration::from_secs(4));
    let (run, stop, status) = start_instance(services, config);
    let stopped = wait_for(
        &status,
        "the partition to stop at the refused record",
        Duration::from_secs(30),
        |s| {
            s.partition_errors
                .get(&0)
                .is_some_and(|e| e.contains("offset 50"))
        },
    )
    .await;
    assert!(
        stopped.partition_errors[&0].contains("policy `stop`"),
        "{stopped:?}"
    );
    // Several ticks later: still released, claimed only the once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = status.borrow().clone();
    let claims = later
        .hand_offs
        .iter()
        .filter(|h| h.event == "claimed")
        .count();
    assert_eq!(claims, 1, "claimed again: {:?}", later.hand_offs);
    assert!(later.owned.is_empty(), "{later:?}");
    // Once the pause (4 s here, 30 s by default) is over, it is tried again — and stops again.
    wait_for(
        &status,
        "the partition to be claimed again after the pause",
        Duration::from_secs(15),
        |s| s.hand_offs.iter().filter(|h| h.event == "claimed").count() >= 2,
    )
    .await;
    stop.cancel();
    run.await.unwrap().unwrap();
}
