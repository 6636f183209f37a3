//! The manifest of one checkpoint: which partition, up to which offset, under which owner, and every file
//! with its size and SHA-256.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ProcessorError, ProcessorResult};

/// The current manifest format.
pub const FORMAT: u32 = 1;

/// One file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// The file name inside the snapshot directory.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256, hex.
    pub sha256: String,
}

/// One checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The first offset *not* covered: consumption resumes here after a restore.
    pub next_offset: i64,
    /// The fencing token of the owner that wrote it.
    pub fencing_token: u64,
    /// When it was written (ms since the epoch, informational).
    pub created_at_ms: u64,
    /// The snapshot's files.
    pub files: Vec<ManifestFile>,
}

impl Manifest {
    /// The manifest's name in the store: ordered by fencing token, then offset, so the newest owner's
    /// newest checkpoint sorts last.
    pub fn id(&self) -> String {
        format!("{:020}-{:020}", self.fencing_token, self.next_offset.max(0))
    }

    /// The fencing token and next offset an [`id`](Self::id) names; `None` for anything else.
    pub fn parse_id(id: &str) -> Option<(u64, i64)> {
        let (token, offset) = id.split_once('-')?;
        Some((token.parse().ok()?, offset.parse().ok()?))
    }

    /// Checks that every file the manifest names is a plain file name and every digest a SHA-256: a
    /// restore joins the names onto its target directory and the store joins `sha256-name` onto its own,
    /// so a name such as `../x` or `/etc/x` (or a digest with a `/`) would write or read outside them.
    /// Whoever can write the checkpoint store must not be able to write files on every host that
    /// restores. A name appearing twice is refused too (one file would overwrite the other).
    ///
    /// # Errors
    /// What is wrong with which entry (the caller makes it a `CorruptCheckpoint` naming the manifest).
    pub fn check_names(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::with_capacity(self.files.len());
        for file in &self.files {
            if !is_plain_file_name(&file.name) {
                return Err(format!(
                    "file name {:?} is not a plain file name (no path separators, no `.` or `..`, 1 to 255 bytes)",
                    file.name
                ));
            }
            if file.sha256.len() != 64 || !file.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "the digest of {:?} is not a SHA-256 in hex: {:?}",
                    file.name, file.sha256
                ));
            }
            if !seen.insert(file.name.as_str()) {
                return Err(format!("file name {:?} appears twice", file.name));
            }
        }
        Ok(())
    }

    /// The store name of `file`: content-addressed, so identical SST files are stored once.
    pub fn blob_name(file: &ManifestFile) -> String {
        format!("{}-{}", file.sha256, file.name)
    }

    /// Reads a manifest stored at `path` (for errors), whatever store held it: a newer format is
    /// refused as too new (never skipped as corrupt, which would restore an older checkpoint silently),
    /// anything unreadable or naming a file outside the store's layout is corrupt.
    ///
    /// # Errors
    /// [`ProcessorError::CheckpointTooNew`]; [`ProcessorError::CorruptCheckpoint`].
    pub(crate) fn decode(bytes: &[u8], path: &Path) -> ProcessorResult<Manifest> {
        // The format first, alone: a newer format may change the rest's shape, and must be refused as
        // too new, not skipped as corrupt.
        #[derive(Deserialize)]
        struct FormatOnly {
            format: u32,
        }
        if let Ok(FormatOnly { format }) = serde_json::from_slice::<FormatOnly>(bytes)
            && format > FORMAT
        {
            return Err(ProcessorError::CheckpointTooNew {
                path: path.to_path_buf(),
                format,
                reads: FORMAT,
            });
        }
        let corrupt = |reason: String| ProcessorError::CorruptCheckpoint {
            path: path.to_path_buf(),
            reason,
        };
        let manifest: Manifest = serde_json::from_slice(bytes)
            .map_err(|err| corrupt(format!("unreadable manifest: {err}")))?;
        if manifest.format != FORMAT {
            return Err(corrupt(format!(
                "unknown manifest format {}",
                manifest.format
            )));
        }
        manifest.check_names().map_err(corrupt)?;
        Ok(manifest)
    }
}

/// The fencing token in a manifest's name (`{token:020}-{offset:020}.json`, see [`Manifest::id`]).
pub(crate) fn token_of_name(name: &str) -> Option<u64> {
    name.strip_suffix(".json")?.split_once('-')?.0.parse().ok()
}

/// Checks that `topic` is a Kafka topic name, and so a safe path component in any store.
///
/// # Errors
/// [`ProcessorError::InvalidInput`] naming the topic.
pub(crate) fn valid_topic(topic: &str) -> ProcessorResult<()> {
    let ok = !topic.is_empty()
        && topic.len() <= 249
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && topic != "."
        && topic != "..";
    if ok {
        Ok(())
    } else {
        Err(ProcessorError::InvalidInput {
            what: "topic",
            reason: format!("`{topic}` is not a valid Kafka topic name"),
        })
    }
}

/// A name that stays inside the directory it is joined onto, on every platform.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0', ':'])
}

/// Size and SHA-256 of the file at `path`.
///
/// # Errors
/// An I/O error.
pub fn digest_file(path: &Path) -> ProcessorResult<(u64, String)> {
    let mut file = std::fs::File::open(path).map_err(ProcessorError::io(path))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let read = file.read(&mut buffer).map_err(ProcessorError::io(path))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_order_by_token_then_offset() {
        let manifest = |token, offset| Manifest {
            format: FORMAT,
            topic: "t".into(),
            partition: 0,
            next_offset: offset,
            fencing_token: token,
            created_at_ms: 0,
            files: vec![],
        };
        let mut ids = vec![
            manifest(2, 5).id(),
            manifest(10, 1).id(),
            manifest(2, 40).id(),
        ];
        ids.sort();
        assert_eq!(
            ids,
            vec![
                manifest(2, 5).id(),
                manifest(2, 40).id(),
                manifest(10, 1).id()
            ]
        );
    }

    #[test]
    fn names_that_leave_the_directory_are_refused() {
        let manifest = |name: &str, sha: &str| Manifest {
            format: FORMAT,
            topic: "t".into(),
            partition: 0,
            next_offset: 1,
            fencing_token: 1,
            created_at_ms: 0,
            files: vec![ManifestFile {
                name: name.into(),
                size: 1,
                sha256: sha.into(),
            }],
        };
        let sha = "a".repeat(64);
        for name in ["000007.sst", "MANIFEST-000005", "OPTIONS-000009", "CURRENT"] {
            assert_eq!(manifest(name, &sha).check_names(), Ok(()), "{name}");
        }
        let long = "x".repeat(256);
        for name in [
            "../x", "/etc/x", "a/b", "..", ".", "", "a\\b", "c:x", "a\0b", &long,
        ] {
            let err = manifest(name, &sha).check_names().unwrap_err();
            assert!(err.contains("not a plain file name"), "{name:?}: {err}");
        }
        for digest in ["../../../x", &"g".repeat(64), "abc"] {
            assert!(
                manifest("000007.sst", digest).check_names().is_err(),
                "{digest}"
            );
        }
        let mut twice = manifest("000007.sst", &sha);
        twice.files.push(twice.files[0].clone());
        assert!(twice.check_names().unwrap_err().contains("twice"));
    }

    #[test]
    fn digests_match_known_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let (size, sha) = digest_file(&path).unwrap();
        assert_eq!(size, 3);
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
