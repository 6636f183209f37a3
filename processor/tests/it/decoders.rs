//! Every decoder of bytes that come from outside the process, fed hostile input (proptest): arbitrary
//! bytes, and valid encodings with bytes flipped, cut short or extended. None may panic; every refusal is
//! an error; every valid encoding round-trips.
//!
//! - state values (`Aggregate`, bincode in RocksDB),
//! - input records (`parse_amount`, the record value as Kafka delivered it),
//! - checkpoint records (`CheckpointRecord`, JSON in the checkpoint topic),
//! - checkpoint manifests (`Manifest`, JSON files a shared directory or object store hands back), read
//!   through the directory store as a restore would.

use processor::aggregation::{Aggregate, parse_amount};
use processor::checkpoint::CheckpointStore;
use processor::checkpoint::{CheckpointRecord, DirectoryCheckpointStore, Manifest};
use proptest::prelude::*;

fn aggregate() -> impl Strategy<Value = Aggregate> {
    (
        any::<u64>(),
        any::<i64>(),
        any::<i64>(),
        any::<i64>(),
        any::<u64>(),
    )
        .prop_map(|(count, sum, min, max, chain)| Aggregate {
            count,
            sum,
            min,
            max,
            chain,
        })
}

/// `bytes` damaged by `edit`: flip one byte, cut the tail, or append junk.
fn damaged(bytes: &[u8], edit: (u8, usize, u8)) -> Vec<u8> {
    let (kind, at, with) = edit;
    let mut out = bytes.to_vec();
    if out.is_empty() {
        return vec![with];
    }
    let at = at % out.len();
    match kind % 3 {
        0 => out[at] ^= with.max(1),
        1 => out.truncate(at),
        _ => out.extend(std::iter::repeat_n(with, at % 9 + 1)),
    }
    out
}

fn manifest_json(topic: &str, partition: i32, next_offset: i64, token: u64) -> Vec<u8> {
    serde_json::json!({
        "format": 1,
        "topic": topic,
        "partition": partition,
        "next_offset": next_offset,
        "fencing_token": token,
        "created_at_ms": 1,
        "files": [],
    })
    .to_string()
    .into_bytes()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn aggregates_round_trip_and_garbage_is_an_error(value in aggregate(), junk in proptest::collection::vec(any::<u8>(), 0..64), edit in any::<(u8, usize, u8)>()) {
        let bytes = value.encode();
        prop_assert_eq!(Aggregate::decode(&bytes).expect("decode"), value);
        let _ = Aggregate::decode(&junk);
        let _ = Aggregate::decode(&damaged(&bytes, edit));
    }

    #[test]
    fn amounts_parse_exactly_and_anything_else_is_a_reason(amount in any::<i64>(), pad in "[ \t]{0,3}", junk in proptest::collection::vec(any::<u8>(), 0..32)) {
        let text = format!("{pad}{amount}{pad}");
        prop_assert_eq!(parse_amount(Some(text.as_bytes())), Ok(amount));
        if let Ok(parsed) = parse_amount(Some(&junk)) {
            // Only bytes that spell a decimal i64 parse.
            let spelled = std::str::from_utf8(&junk).map(str::trim).map(str::parse::<i64>);
            prop_assert_eq!(spelled, Ok(Ok(parsed)));
        }
        prop_assert!(parse_amount(None).is_err());
    }

    #[test]
    fn checkpoint_records_refuse_garbage_and_newer_formats(next_offset in 0i64..1_000_000, token in 1u64..1_000, instance in ".{0,20}", format in 0u32..10, edit in any::<(u8, usize, u8)>()) {
        let manifest: Manifest = serde_json::from_slice(&manifest_json("topic", 0, next_offset, token)).expect("a manifest");
        let record = CheckpointRecord::new(&manifest, &instance);
        let bytes = record.encode().expect("encode");
        prop_assert_eq!(CheckpointRecord::decode(&bytes).expect("decode"), record);
        let _ = CheckpointRecord::decode(&damaged(&bytes, edit));
        let mut versioned: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
        versioned["format"] = serde_json::json!(format);
        let decoded = CheckpointRecord::decode(versioned.to_string().as_bytes());
        prop_assert_eq!(decoded.is_ok(), format <= 1, "format {}", format);
    }

    #[test]
    fn damaged_manifests_are_refused_never_trusted(partition in 0i32..4, next_offset in 0i64..1_000_000, token in 1u64..1_000, edit in any::<(u8, usize, u8)>()) {
        let dir = tempfile::tempdir().expect("a temp dir");
        let store = DirectoryCheckpointStore::new(dir.path()).expect("a store");
        let manifests = dir.path().join("topic").join(partition.to_string()).join("manifests");
        std::fs::create_dir_all(&manifests).expect("create");
        let valid = manifest_json("topic", partition, next_offset, token);
        let id = format!("{token:020}-{next_offset:020}");
        std::fs::write(manifests.join(format!("{id}.json")), &valid).expect("write");
        let read: Manifest = store.checkpoint("topic", partition, &id).expect("a valid manifest reads");
        prop_assert_eq!(read.next_offset, next_offset);

        let bad = damaged(&valid, edit);
        std::fs::write(manifests.join(format!("{id}.json")), &bad).expect("write");
        // Either the damage left a valid manifest (a digit changed inside a number, say) or it is
        // refused with an error: never a panic.
        if let Ok(read) = store.checkpoint("topic", partition, &id) {
            prop_assert!(serde_json::from_slice::<serde_json::Value>(&bad).is_ok(), "accepted invalid JSON: {read:?}");
        }
    }
}
