//! Commits coalesced before they are written key by key.
//!
//! A RocksDB memtable insert costs 0.4–1.2 µs per key on this workload (a skip-list search through every
//! version the memtable holds), and a partition committing every 100 ms rewrites most of its keys at
//! each commit. So a commit is written as ONE *delta record* — every changed key and value, encoded
//! back to back — in the meta column family, in the same atomic batch as the offset and the fencing
//! token: one insert instead of thousands, and just as durable. The latest value of each key changed by
//! a pending delta is kept here, in memory, for reads; when the deltas reach their byte bound the next
//! commit *folds* them: it writes each key they changed once (its latest value, in key order) and
//! deletes the delta records, again in one batch. A key changed by every commit is written once per
//! fold instead of once per commit.
//!
//! On open the delta records are read back (oldest first), so a crash between two folds loses nothing:
//! the state is the last fold plus every delta after it, exactly what was committed.

use hashbrown::HashMap;

use crate::store::cache::LOOKUPS_AHEAD;
use crate::store::inline::{HeldKey, HeldValue};

/// Prefix of a delta record's key in the meta column family; the record's sequence number follows
/// (big-endian, so the records iterate in commit order).
pub(super) const DELTA_PREFIX: &[u8] = b"delta/";

/// The meta key of delta record `sequence`.
pub(super) fn delta_key(sequence: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(DELTA_PREFIX.len() + 8);
    key.extend_from_slice(DELTA_PREFIX);
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

/// The sequence number of a delta record's meta key (`None`: not a delta record's key).
pub(super) fn delta_sequence(key: &[u8]) -> Option<u64> {
    key.strip_prefix(DELTA_PREFIX)
        .and_then(|rest| rest.try_into().ok())
        .map(u64::from_be_bytes)
}

/// One change: a key and its new value (`None`: deleted).
pub(super) type Change<'a> = (&'a [u8], Option<&'a [u8]>);

/// Receives each change of a decoded delta record.
pub(super) type ChangeVisitor<'v> = dyn FnMut(&[u8], Option<&[u8]>) + 'v;

/// Tags of an encoded change.
const PUT: u8 = 1;
const DELETE: u8 = 0;

/// `changes` as one delta record: for each, the key's length (u32 LE) and bytes, a tag (put or
/// delete), and for a put the value's length (u32 LE) and bytes.
pub(super) fn encode(changes: &[Change<'_>]) -> Vec<u8> {
    let size: usize = changes
        .iter()
        .map(|(key, value)| 9 + key.len() + value.map_or(0, <[u8]>::len))
        .sum();
    let mut record = Vec::with_capacity(size);
    for (key, value) in changes {
        record.extend_from_slice(&len_u32(key.len()).to_le_bytes());
        record.extend_from_slice(key);
        match value {
            Some(value) => {
                record.push(PUT);
                record.extend_from_slice(&len_u32(value.len()).to_le_bytes());
                record.extend_from_slice(value);
            }
            None => record.push(DELETE),
        }
    }
    record
}

/// Keys and values longer than 4 GiB cannot be committed through RocksDB anyway (its slices are
/// 32-bit sized in the write batch); saturate rather than wrap so decoding fails loudly.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Visits the changes of a delta record in the order they were committed.
///
/// # Errors
/// What is malformed, when the record is not one [`encode`] wrote (a damaged database).
pub(super) fn decode(mut record: &[u8], visit: &mut ChangeVisitor<'_>) -> Result<(), String> {
    while !record.is_empty() {
        let key = take_sized(&mut record).ok_or("a key runs past the end of the record")?;
        let (&tag, rest) = record.split_first().ok_or("a change has no tag")?;
        record = rest;
        match tag {
            PUT => {
                let value =
                    take_sized(&mut record).ok_or("a value runs past the end of the record")?;
                visit(key, Some(value));
            }
            DELETE => visit(key, None),
            other => return Err(format!("unknown change tag {other}")),
        }
    }
    Ok(())
}

/// A u32 LE length and that many bytes, taken from the front of `record`.
fn take_sized<'r>(record: &mut &'r [u8]) -> Option<&'r [u8]> {
    let (len, rest) = record.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
    if rest.len() < len {
        return None;
    }
    let (bytes, rest) = rest.split_at(len);
    *record = rest;
    Some(bytes)
}

/// The delta records written since the last fold, and the latest value of each key they changed.
#[derive(Debug, Default)]
pub(super) struct PendingCommits {
    latest: HashMap<HeldKey, Option<HeldValue>>,
    /// Sequence number of the oldest delta record not folded yet (`next` when there is none).
    first: u64,
    /// Sequence number of the next delta record.
    next: u64,
    /// Bytes of the delta records not folded yet.
    bytes: usize,
}

impl PendingCommits {
    /// No delta record; the next one gets sequence number `next`.
    pub(super) fn starting_at(next: u64) -> Self {
        PendingCommits {
            first: next,
            next,
            ..PendingCommits::default()
        }
    }

    /// Whether no commit waits for a fold.
    pub(super) fn is_empty(&self) -> bool {
        self.first == self.next
    }

    /// Bytes of the delta records not folded yet.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The sequence number the next delta record gets.
    pub(super) fn next_sequence(&self) -> u64 {
        self.next
    }

    /// The sequence numbers of the delta records not folded yet.
    pub(super) fn sequences(&self) -> std::ops::Range<u64> {
        self.first..self.next
    }

    /// What a pending commit set `key` to: `Some(None)` when it deleted it, `None` when no pending
    /// commit changed it.
    pub(super) fn get(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        self.latest.get(key).map(Option::as_deref)
    }

    /// Records delta record `sequence` (`bytes` long), whose changes are `changes`, as written.
    pub(super) fn push(&mut self, sequence: u64, bytes: usize, changes: &[Change<'_>]) {
        for group in changes.chunks(LOOKUPS_AHEAD) {
            // Independent lookups first: their cache misses overlap (see `PartitionState::prefetch`).
            for (key, _) in group {
                std::hint::black_box(self.latest.contains_key(*key));
            }
            for (key, value) in group {
                self.set(key, *value);
            }
        }
        if self.is_empty() {
            self.first = sequence;
        }
        self.next = sequence + 1;
        self.bytes += bytes;
    }

    /// Records one change of a delta record being read back.
    pub(super) fn set(&mut self, key: &[u8], value: Option<&[u8]>) {
        match self.latest.get_mut(key) {
            // Reuse the buffer: a key changed by every commit allocates nothing.
            Some(Some(held)) if value.is_some() => {
                held.clear();
                held.extend_from_slice(value.unwrap_or_default());
            }
            Some(held) => *held = value.map(HeldValue::from_slice),
            None => {
                self.latest
                    .insert(HeldKey::from_slice(key), value.map(HeldValue::from_slice));
            }
        }
    }

    /// Every key a pending commit changed, with its latest value, in key order (how a fold writes
    /// them: RocksDB's skip list inserts ascending keys from where the previous insert ended).
    pub(super) fn sorted(&self) -> Vec<Change<'_>> {
        let mut changes: Vec<Change<'_>> = self
            .latest
            .iter()
            .map(|(key, value)| (&**key, value.as_deref()))
            .collect();
        changes.sort_unstable_by(|a, b| a.0.cmp(b.0)); // one change per key: no order to keep
        changes
    }

    /// Everything was folded into the keys: nothing is pending any more.
    pub(super) fn folded(&mut self) {
        self.latest.clear();
        self.first = self.next;
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Owned = Vec<(Vec<u8>, Option<Vec<u8>>)>;

    fn decoded(record: &[u8]) -> Result<Owned, String> {
        let mut changes = Vec::new();
        decode(record, &mut |key, value| {
            changes.push((key.to_vec(), value.map(<[u8]>::to_vec)));
        })?;
        Ok(changes)
    }

    #[test]
    fn a_delta_record_decodes_to_the_changes_encoded() {
        let changes: Vec<Change<'_>> = vec![
            (b"a", Some(b"1")),
            (b"", Some(b"")),
            (&[0, 255, 0], None),
            (b"long", Some(&[7; 300])),
        ];
        let expected: Vec<_> = changes
            .iter()
            .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(decoded(&encode(&changes)).unwrap(), expected);
        assert_eq!(decoded(&encode(&[])).unwrap(), vec![]);
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_panic() {
        let record = encode(&[(b"key", Some(b"value")), (b"gone", None)]);
        for cut in 1..record.len() {
            // Any prefix ending inside a change is refused (or, at a change boundary, decodes fewer).
            let _ = decoded(&record[..cut]);
        }
        assert!(decoded(&record[..5]).is_err());
        let mut bad_tag = record.clone();
        bad_tag[7] = 9;
        assert_eq!(decoded(&bad_tag).unwrap_err(), "unknown change tag 9");
    }

    #[test]
    fn the_latest_change_of_each_key_wins_and_a_fold_forgets_them() {
        let mut pending = PendingCommits::starting_at(5);
        assert!(pending.is_empty());
        pending.push(5, 10, &[(b"b", Some(b"1")), (b"a", Some(b"1"))]);
        pending.push(6, 20, &[(b"b", Some(b"22")), (b"a", None)]);
        assert_eq!(pending.get(b"b"), Some(Some(&b"22"[..])));
        assert_eq!(pending.get(b"a"), Some(None));
        assert_eq!(pending.get(b"c"), None);
        assert_eq!(
            pending.sorted(),
            vec![(&b"a"[..], None), (&b"b"[..], Some(&b"22"[..]))]
        );
        assert_eq!((pending.sequences(), pending.bytes()), (5..7, 30));
        pending.folded();
        assert!(pending.is_empty());
        assert_eq!((pending.get(b"b"), pending.next_sequence()), (None, 7));
    }

    #[test]
    fn delta_keys_sort_in_commit_order() {
        let keys: Vec<_> = [0u64, 1, 255, 256, u64::MAX].map(delta_key).to_vec();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(delta_sequence(&delta_key(256)), Some(256));
        assert_eq!(delta_sequence(b"next_offset"), None);
    }
}
