//! Topic administration on a real broker, for tests, benches and the demo on an existing cluster:
//! create topics, add partitions, delete records (move a partition's log start), find a partition's
//! leader. The processor itself never administers topics.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::error::{ProcessorError, ProcessorResult};

/// How long an admin request may take (a broker that just started can take a few seconds to elect
/// partition leaders).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

fn admin(brokers: &str) -> ProcessorResult<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(ProcessorError::kafka("create an admin client"))
}

fn options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT))
}

fn admin_failed(operation: &'static str, reason: String) -> ProcessorError {
    ProcessorError::Kafka {
        operation,
        source: reason.into(),
    }
}

/// Creates `topic` with `partitions` partitions replicated `replication` times, with the topic configs
/// `configs` (e.g. `("retention.ms", "1000")`), and waits until every partition has a leader.
///
/// # Errors
/// A Kafka error (the topic exists already, too few brokers for the replication, …).
pub async fn create_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
    replication: i32,
    configs: &[(&str, &str)],
) -> ProcessorResult<()> {
    let mut new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
    for (key, value) in configs {
        new_topic = new_topic.set(key, value);
    }
    let results = admin(brokers)?
        .create_topics([&new_topic], &options())
        .await
        .map_err(ProcessorError::kafka("create a topic"))?;
    for result in results {
        result.map_err(|(name, code)| {
            admin_failed("create a topic", format!("`{name}`: {code:?}"))
        })?;
    }
    wait_for_leaders(brokers, topic, partitions).await
}

/// Grows `topic` to `total` partitions and waits until the new ones have leaders.
///
/// # Errors
/// A Kafka error (fewer than today, an unknown topic, …).
pub async fn add_partitions(brokers: &str, topic: &str, total: i32) -> ProcessorResult<()> {
    let count = usize::try_from(total).map_err(|_| ProcessorError::InvalidInput {
        what: "partitions",
        reason: format!("{total} must be positive"),
    })?;
    let results = admin(brokers)?
        .create_partitions([&NewPartitions::new(topic, count)], &options())
        .await
        .map_err(ProcessorError::kafka("add partitions"))?;
    for result in results {
        result.map_err(|(name, code)| {
            admin_failed("add partitions", format!("`{name}`: {code:?}"))
        })?;
    }
    wait_for_leaders(brokers, topic, total).await
}

/// Deletes the records of `partition` of `topic` below `before` (the log then starts at `before`), as
/// retention would; returns the new log start.
///
/// # Errors
/// A Kafka error.
pub async fn delete_records(
    brokers: &str,
    topic: &str,
    partition: i32,
    before: i64,
) -> ProcessorResult<i64> {
    let mut offsets = TopicPartitionList::new();
    offsets
        .add_partition_offset(topic, partition, Offset::Offset(before))
        .map_err(ProcessorError::kafka("delete records"))?;
    let result = admin(brokers)?
        .delete_records(&offsets, &options())
        .await
        .map_err(ProcessorError::kafka("delete records"))?;
    let element = result
        .find_partition(topic, partition)
        .ok_or_else(|| admin_failed("delete records", "no result for the partition".to_owned()))?;
    element
        .error()
        .map_err(ProcessorError::kafka("delete records"))?;
    Ok(match element.offset() {
        Offset::Offset(start) => start,
        _ => before,
    })
}

/// The broker id leading each partition of `topic` (index = partition), `-1` where none does.
///
/// # Errors
/// A Kafka error; [`ProcessorError::InvalidInput`] when the topic does not exist.
pub fn partition_leaders(brokers: &str, topic: &str) -> ProcessorResult<Vec<i32>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(ProcessorError::kafka("create a consumer"))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(ProcessorError::kafka("fetch the topic's metadata"))?;
    let found = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .ok_or_else(|| ProcessorError::InvalidInput {
            what: "topic",
            reason: format!("`{topic}` does not exist on {brokers}"),
        })?;
    let mut leaders = vec![-1; found.partitions().len()];
    for partition in found.partitions() {
        if let Some(slot) = usize::try_from(partition.id())
            .ok()
            .and_then(|i| leaders.get_mut(i))
        {
            *slot = if partition.error().is_none() {
                partition.leader()
            } else {
                -1
            };
        }
    }
    Ok(leaders)
}

/// Waits until `topic` reports `partitions` partitions, each with a leader.
async fn wait_for_leaders(brokers: &str, topic: &str, partitions: i32) -> ProcessorResult<()> {
    let deadline = tokio::time::Instant::now() + ADMIN_TIMEOUT;
    loop {
        let (brokers_owned, topic_owned) = (brokers.to_owned(), topic.to_owned());
        let leaders =
            tokio::task::spawn_blocking(move || partition_leaders(&brokers_owned, &topic_owned))
                .await
                .map_err(ProcessorError::task(format!("read the leaders of {topic}")))?;
        if let Ok(leaders) = &leaders
            && leaders.len() == usize::try_from(partitions).unwrap_or(0)
            && leaders.iter().all(|leader| *leader >= 0)
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(admin_failed(
                "wait for partition leaders",
                format!("{topic}: {leaders:?} after {ADMIN_TIMEOUT:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
