//! Keys and values held in memory by the state cache and the RocksDB store's pending commits: small
//! ones inside the hash map's own slot, larger ones on the heap.
//!
//! A lookup is memory-bound: with keys and values behind their own pointers, a hit cost up to four
//! cache misses (the control bytes, the slot, the key to compare, the value to read) — the largest
//! single cost of the processor's hot path in the throughput profile. Held inline in the entries of
//! the cache's index map, a hit touches its small index table and one entry.

use smallvec::SmallVec;

/// Keys up to this many bytes are held inline.
pub(crate) const INLINE_KEY: usize = 24;

/// Values up to this many bytes are held inline (the built-in aggregate takes 41).
pub(crate) const INLINE_VALUE: usize = 48;

/// A key held in memory. Hashes and compares as the `[u8]` it holds, so maps keyed by it are looked
/// up with a plain `&[u8]`.
pub(crate) type HeldKey = SmallVec<[u8; INLINE_KEY]>;

/// A value held in memory.
pub(crate) type HeldValue = SmallVec<[u8; INLINE_VALUE]>;

/// `value` as held in memory: copied inline when small, its buffer kept when large.
pub(crate) fn held(value: Vec<u8>) -> HeldValue {
    if value.len() <= INLINE_VALUE {
        HeldValue::from_slice(&value)
    } else {
        HeldValue::from_vec(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_values_move_inline_and_large_ones_keep_their_buffer() {
        let small = held(vec![7; INLINE_VALUE]);
        assert!(!small.spilled());
        assert_eq!(&small[..], &[7; INLINE_VALUE][..]);
        let large = held(vec![9; INLINE_VALUE + 1]);
        assert!(large.spilled());
        assert_eq!(large.len(), INLINE_VALUE + 1);
        let key = HeldKey::from_slice(b"k");
        let mut map = hashbrown::HashMap::new();
        map.insert(key, 1);
        assert_eq!(map.get(&b"k"[..]), Some(&1), "looked up by a plain slice");
    }
}
