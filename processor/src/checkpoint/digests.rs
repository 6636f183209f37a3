//! Digests of immutable snapshot files, remembered between uploads: an SST file never changes once
//! written, and every checkpoint of a partition hard-links most of the previous one's files, so hashing
//! them again would make each upload cost as much as the whole state. Only `.sst` and `.blob` files are
//! remembered (RocksDB rewrites the others: MANIFEST, OPTIONS, CURRENT).
//!
//! A file is known by its device, inode, size and modification time to the nanosecond: a hard link in
//! a new snapshot is the same file; a different file under a reused inode differs in its times. (Restore
//! verifies every digest again, so a wrong one could never go unnoticed.)

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;

use super::manifest::digest_file;
use crate::error::{ProcessorError, ProcessorResult};

/// Entries kept before the ones unused for the longest are dropped.
const CAPACITY: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileIdentity {
    device: u64,
    inode: u64,
    size: u64,
    modified_ns: i128,
}

#[derive(Debug)]
struct Known {
    sha256: String,
    last_used: u64,
}

/// Remembered digests of immutable files (see the [module docs](self)).
#[derive(Debug, Default)]
pub(crate) struct DigestCache {
    known: Mutex<(HashMap<FileIdentity, Known>, u64)>,
}

/// Whether RocksDB never rewrites a file of this name once it exists.
pub(crate) fn immutable(name: &str) -> bool {
    name.ends_with(".sst") || name.ends_with(".blob")
}

impl DigestCache {
    /// Size and SHA-256 of the file at `path` named `name`, and how many bytes were hashed for it (0
    /// when its digest was known).
    pub(crate) fn digest(&self, path: &Path, name: &str) -> ProcessorResult<(u64, String, u64)> {
        if !immutable(name) {
            let (size, sha256) = digest_file(path)?;
            return Ok((size, sha256, size));
        }
        let metadata = std::fs::metadata(path).map_err(ProcessorError::io(path))?;
        let identity = FileIdentity {
            device: metadata.dev(),
            inode: metadata.ino(),
            size: metadata.len(),
            modified_ns: i128::from(metadata.mtime()) * 1_000_000_000
                + i128::from(metadata.mtime_nsec()),
        };
        {
            let mut guard = self.known.lock().unwrap_or_else(|p| p.into_inner());
            let (known, clock) = &mut *guard;
            *clock += 1;
            let now = *clock;
            if let Some(entry) = known.get_mut(&identity) {
                entry.last_used = now;
                return Ok((identity.size, entry.sha256.clone(), 0));
            }
        }
        let (size, sha256) = digest_file(path)?;
        if size == identity.size {
            let mut guard = self.known.lock().unwrap_or_else(|p| p.into_inner());
            let (known, clock) = &mut *guard;
            if known.len() >= CAPACITY {
                // Drop the older half: files of checkpoints long gone.
                let mut ages: Vec<u64> = known.values().map(|k| k.last_used).collect();
                ages.sort_unstable();
                let cutoff = ages[ages.len() / 2];
                known.retain(|_, k| k.last_used > cutoff);
            }
            known.insert(
                identity,
                Known {
                    sha256: sha256.clone(),
                    last_used: *clock,
                },
            );
        }
        Ok((size, sha256, size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_immutable_file_is_hashed_once_even_through_a_new_hard_link() {
        let dir = tempfile::tempdir().unwrap();
        let (sst, link, options) = (
            dir.path().join("000012.sst"),
            dir.path().join("000012-link.sst"),
            dir.path().join("OPTIONS-000007"),
        );
        std::fs::write(&sst, vec![7u8; 10_000]).unwrap();
        std::fs::hard_link(&sst, &link).unwrap();
        std::fs::write(&options, b"options").unwrap();
        let cache = DigestCache::default();
        let first = cache.digest(&sst, "000012.sst").unwrap();
        assert_eq!(first.2, 10_000, "hashed the first time");
        let again = cache.digest(&link, "000012.sst").unwrap();
        assert_eq!((again.0, &again.1, again.2), (10_000, &first.1, 0));
        assert_eq!(
            cache.digest(&options, "OPTIONS-000007").unwrap().2,
            7,
            "mutable files are always hashed"
        );
        // Another file (another inode) of the same name and size is hashed.
        std::fs::remove_file(&sst).unwrap();
        std::fs::remove_file(&link).unwrap();
        std::fs::write(&sst, vec![8u8; 10_000]).unwrap();
        let other = cache.digest(&sst, "000012.sst").unwrap();
        assert_ne!(other.1, first.1);
    }
}
