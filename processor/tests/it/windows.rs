//! Event time and windows on the typed job API, through the partition processor and its stores:
//! out-of-order input within the grace period gives exactly the recomputed window results (across
//! commits and a restart from the store), late input follows its policy, closed windows leave no state,
//! and state stays bounded over a long run while keys keep changing. The typed API's poison policy too.

// Test code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use processor::ProcessorError;
use processor::aggregation::Aggregate;
use processor::job::window::{EmitMode, LatePolicy, WindowResult, WindowedAggregation, Windows};
use processor::job::{Context, Input, Job, JobError, JobOperator, OnError, codec};
use processor::operator::{OutputMode, Record};
use processor::partition::PartitionProcessor;
use processor::store::PartitionStore;
use processor::store::rocksdb::RocksDbStores;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One input event: key, timestamp (ms), amount.
type Event = (String, i64, i64);

fn resume(store: &Arc<dyn PartitionStore>, job: WindowedAggregation) -> PartitionProcessor {
    PartitionProcessor::resume(
        store.clone(),
        Arc::new(JobOperator::new(job)),
        1,
        Default::default(),
    )
    .unwrap()
    .with_outputs(true, OutputMode::PerRecord)
}

fn rocksdb_store(dir: &std::path::Path) -> Arc<dyn PartitionStore> {
    Arc::new(RocksDbStores::new(8 << 20, 8 << 20).open(0, dir).unwrap())
}

/// Runs `events` from offset 0 in commits of `per_commit` records, restarting from the store (a
/// partition that moved) after `restart_at` records; returns every final result and every dead letter.
fn run(
    store_dir: &std::path::Path,
    job: WindowedAggregation,
    events: &[Event],
    per_commit: usize,
    restart_at: usize,
) -> (Vec<(String, WindowResult)>, Vec<String>) {
    let mut store = rocksdb_store(store_dir);
    let mut processor = resume(&store, job);
    let (mut finals, mut dead) = (Vec::new(), Vec::new());
    let values: Vec<String> = events.iter().map(|e| e.2.to_string()).collect();
    let mut at = 0;
    while at < events.len() {
        if at >= restart_at && at - per_commit < restart_at {
            drop(processor);
            drop(store);
            store = rocksdb_store(store_dir);
            processor = resume(&store, job);
        }
        let end = (at + per_commit).min(events.len());
        let records: Vec<Record<'_>> = (at..end)
            .map(|i| {
                Record::new(
                    0,
                    i as i64,
                    Some(events[i].0.as_bytes()),
                    Some(values[i].as_bytes()),
                )
                .with_timestamp(events[i].1)
            })
            .collect();
        let report = processor.process(&records).unwrap();
        for (key, value) in report.outputs {
            let result: WindowResult = serde_json::from_slice(&value).unwrap();
            if result.is_final {
                finals.push((String::from_utf8(key).unwrap(), result));
            }
        }
        dead.extend(report.dead_letters.into_iter().map(|(_, reason)| reason));
        at = end;
    }
    (finals, dead)
}

/// The window results recomputed from `events` in arrival order, for windows of `size` every `advance`.
fn recompute(events: &[Event], size: i64, advance: i64) -> BTreeMap<(String, i64), Aggregate> {
    let mut expected: BTreeMap<(String, i64), Aggregate> = BTreeMap::new();
    for (key, timestamp, amount) in events {
        let mut start = timestamp.div_euclid(advance) * advance;
        while start + size > *timestamp {
            let window = expected.entry((key.clone(), start)).or_default();
            *window = window.with_amount(*amount);
            start -= advance;
        }
    }
    expected
}

/// Events in time order for `keys` keys over `span` ms, then shuffled: each moved back by less than
/// `disorder` ms relative to the highest timestamp before it.
fn disordered_events(seed: u64, count: usize, keys: usize, span: i64, disorder: i64) -> Vec<Event> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut events: Vec<Event> = (0..count)
        .map(|i| {
            let timestamp = span * i as i64 / count as i64;
            let late_by = rng.random_range(0..disorder);
            (
                format!("acct-{}", rng.random_range(0..keys)),
                (timestamp - late_by).max(0),
                rng.random_range(-1_000..1_000),
            )
        })
        .collect();
    // Timestamps out of order by up to `disorder`, offsets in arrival order.
    events.sort_by_cached_key(|e| e.1 + rng.random_range(0..disorder / 2));
    events
}

/// A record far in the future on a key of its own: the watermark passes every earlier window's grace.
fn flush_record(at: i64) -> Event {
    ("~flush".to_owned(), at, 0)
}

#[test]
fn out_of_order_input_within_the_grace_period_is_exact_across_commits_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (size, advance, grace) = (1_000, 250, 400);
    let windows = Windows::hopping(
        Duration::from_millis(size as u64),
        Duration::from_millis(advance as u64),
    )
    .unwrap()
    .with_grace(Duration::from_millis(grace as u64))
    .unwrap();
    let job = WindowedAggregation::new(windows).with_emit(EmitMode::OnClose);
    // Disorder below the grace: nothing is late.
    let mut events = disordered_events(7, 20_000, 50, 60_000, grace / 2);
    events.push(flush_record(1_000_000));
    let (finals, dead) = run(dir.path(), job, &events, 700, 9_000);
    assert!(dead.is_empty(), "nothing is late: {dead:?}");

    let expected = recompute(&events[..events.len() - 1], size, advance);
    let got: BTreeMap<(String, i64), Aggregate> = finals
        .iter()
        .map(|(key, result)| ((key.clone(), result.start), result.aggregate))
        .collect();
    assert_eq!(
        got.len(),
        finals.len(),
        "one final result per key and window"
    );
    assert_eq!(got.len(), expected.len());
    for (window, aggregate) in &expected {
        assert_eq!(got.get(window), Some(aggregate), "window {window:?}");
    }
}

#[test]
fn late_input_is_dead_lettered_or_dropped_by_policy_and_never_changes_a_closed_window() {
    let dir = tempfile::tempdir().unwrap();
    let windows = Windows::tumbling(Duration::from_secs(1))
        .unwrap()
        .with_grace(Duration::from_millis(100))
        .unwrap();
    let events: Vec<Event> = vec![
        ("a".into(), 100, 1),
        ("a".into(), 1_050, 2), // watermark 1 050: [0, 1 000) still open (grace)
        ("a".into(), 900, 4),   // within the grace: counted in [0, 1 000)
        ("a".into(), 1_200, 8), // watermark 1 200: [0, 1 000) closes
        ("a".into(), 950, 16),  // late
        ("b".into(), 10, 32),   // late, a key never seen
        flush_record(10_000),
    ];
    for policy in [LatePolicy::DeadLetter, LatePolicy::Drop] {
        let dir = dir.path().join(format!("{policy:?}"));
        let job = WindowedAggregation::new(windows)
            .with_emit(EmitMode::OnClose)
            .with_late_policy(policy);
        let (finals, dead) = run(&dir, job, &events, 2, usize::MAX);
        let sums: Vec<(String, i64, i64)> = finals
            .iter()
            .map(|(key, r)| (key.clone(), r.start, r.aggregate.sum))
            .collect();
        assert_eq!(
            sums,
            vec![("a".to_owned(), 0, 5), ("a".to_owned(), 1_000, 10)],
            "{policy:?}"
        );
        match policy {
            LatePolicy::DeadLetter => {
                assert_eq!(dead.len(), 2, "{dead:?}");
                assert!(dead[0].contains("late: timestamp 950 ms"), "{dead:?}");
            }
            _ => assert!(dead.is_empty(), "{dead:?}"),
        }
    }
}

#[test]
fn closed_windows_leave_no_state_and_state_stays_bounded_over_a_long_run() {
    let dir = tempfile::tempdir().unwrap();
    let store = rocksdb_store(dir.path());
    let windows = Windows::hopping(Duration::from_secs(10), Duration::from_secs(5))
        .unwrap()
        .with_grace(Duration::from_secs(2))
        .unwrap();
    let mut processor = resume(&store, WindowedAggregation::new(windows));
    // 300 000 records over 3 000 s of record time; keys change every 30 s (every key is new there):
    // without expiry, state would grow with the run.
    let mut entries_by_phase = Vec::new();
    let per_commit = 1_000;
    for commit in 0..300 {
        let batch: Vec<(String, i64)> = (0..per_commit)
            .map(|i| {
                let n = commit * per_commit + i;
                let timestamp = n as i64 * 10;
                (
                    format!("user-{}-{}", timestamp / 30_000, n % 200),
                    timestamp,
                )
            })
            .collect();
        let records: Vec<Record<'_>> = batch
            .iter()
            .enumerate()
            .map(|(i, (key, timestamp))| {
                Record::new(
                    0,
                    (commit * per_commit + i) as i64,
                    Some(key.as_bytes()),
                    Some(b"1"),
                )
                .with_timestamp(*timestamp)
            })
            .collect();
        processor.process(&records).unwrap();
        if commit % 30 == 29 {
            let entries = store.entries().unwrap();
            let bytes: usize = entries.iter().map(|(k, v)| k.len() + v.len()).sum();
            entries_by_phase.push((entries.len(), bytes));
        }
    }
    println!("state (entries, bytes) every 300 s of record time: {entries_by_phase:?}");
    // Open at any time: ~3 windows per key of the current 30 s (200 keys) plus the previous key set's
    // in their grace, and the index and meta entries.
    let (max_entries, _) = *entries_by_phase.iter().max().unwrap();
    assert!(
        max_entries < 200 * 3 * 2 + 100,
        "state grew: {entries_by_phase:?}"
    );
    let (first, last) = (entries_by_phase[0], *entries_by_phase.last().unwrap());
    assert!(
        last.1 <= first.1 * 11 / 10,
        "state grew over the run: {entries_by_phase:?}"
    );
}

/// A typed job that refuses odd amounts: its policy decides what happens to them.
struct EvenOnly(OnError);

impl Job for EvenOnly {
    type Key = String;
    type KeyCodec = codec::Utf8;
    type Value = i64;
    type ValueCodec = codec::DecimalI64;
    type State = i64;
    type StateCodec = codec::Bincode;
    type Output = i64;
    type OutputCodec = codec::Json;

    fn process(
        &self,
        input: Input<'_, String, i64>,
        ctx: &mut Context<'_, Self>,
    ) -> Result<(), JobError> {
        if input.value % 2 != 0 {
            return Err(JobError::reject(format!("{} is odd", input.value)));
        }
        let total = ctx
            .update_state(|sum| Some(sum.unwrap_or(0) + input.value))?
            .unwrap_or(0);
        ctx.set_state_of(&format!("{}-seen-by", input.key), &input.offset)?;
        ctx.emit(&total)?;
        Ok(())
    }

    fn on_error(&self) -> OnError {
        self.0
    }
}

#[test]
fn a_poison_record_is_dead_lettered_or_stops_the_partition_by_policy_never_a_panic() {
    let records = [
        Record::new(0, 0, Some(b"k"), Some(b"2")),
        Record::new(0, 1, Some(b"k"), Some(b"3")),
        Record::new(0, 2, Some(b"k"), Some(b"not a number")),
        Record::new(0, 3, Some(&[0xff]), Some(b"2")),
        Record::new(0, 4, None, Some(b"2")),
        Record::new(0, 5, Some(b"k"), Some(b"4")),
    ];
    let store: Arc<dyn PartitionStore> =
        Arc::new(processor::store::memory::InMemoryPartitionStore::new(0));
    let operator = Arc::new(JobOperator::new(EvenOnly(OnError::DeadLetter)));
    let mut partition =
        PartitionProcessor::resume(store.clone(), operator, 1, Default::default()).unwrap();
    let report = partition.process(&records).unwrap();
    let reasons: Vec<&str> = report
        .dead_letters
        .iter()
        .map(|(_, r)| r.as_str())
        .collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert_eq!(reasons[0], "3 is odd");
    assert!(reasons[1].contains("not a decimal i64"), "{reasons:?}");
    assert!(reasons[2].contains("key does not decode"), "{reasons:?}");
    assert_eq!(reasons[3], "no key");
    assert_eq!(report.outputs.last().unwrap().1, b"6");
    assert_eq!(store.get(b"k-seen-by").unwrap().unwrap(), {
        let mut bytes = Vec::new();
        <codec::Bincode as codec::Codec<i64>>::encode(&5, &mut bytes).unwrap();
        bytes
    });

    let store: Arc<dyn PartitionStore> =
        Arc::new(processor::store::memory::InMemoryPartitionStore::new(0));
    let operator = Arc::new(JobOperator::new(EvenOnly(OnError::Stop)));
    let mut partition =
        PartitionProcessor::resume(store.clone(), operator, 1, Default::default()).unwrap();
    let err = partition.process(&records).unwrap_err();
    assert!(
        matches!(err, ProcessorError::Rejected { partition: 0, offset: 1, ref reason } if reason == "3 is odd"),
        "{err}"
    );
    assert!(err.to_string().contains("offset 1"), "{err}");
    assert_eq!(
        store.meta().unwrap(),
        None,
        "nothing of the batch was written"
    );
}
