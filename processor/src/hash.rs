//! Stable hashes that must agree across processes and releases: the rendezvous weights of the partition
//! assignment and the deterministic workload both derive from them.

/// The splitmix64 finaliser: a strong 64-bit mix of `z`.
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64-bit FNV-1a over `parts` (each followed by a 0xff separator), finished with [`splitmix64`] so that
/// similar inputs do not get correlated values.
pub(crate) fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.iter().chain([0xffu8].iter()) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    splitmix64(hash)
}
