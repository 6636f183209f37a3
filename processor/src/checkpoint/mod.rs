//! Checkpoints of partition state in a shared store behind [`CheckpointStore`] — object storage (S3,
//! GCS, Azure: [`ObjectCheckpointStore`]) or a shared directory ([`DirectoryCheckpointStore`]) — with a [`Manifest`] per checkpoint written last and atomically, and the fenced
//! [`CheckpointRecord`] that names a partition's newest published checkpoint.

mod compaction_lock;
pub mod conformance;
mod digests;
pub mod directory;
pub mod manifest;
pub mod object;
pub mod record;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub(crate) use compaction_lock::hold_compaction_lock;
pub use directory::DirectoryCheckpointStore;
pub use manifest::{Manifest, ManifestFile};
pub use object::ObjectCheckpointStore;
pub use record::{CheckpointRecord, CheckpointRecords};

use crate::error::ProcessorResult;

/// What one upload did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UploadReport {
    /// The manifest written.
    pub manifest: Manifest,
    /// Files copied into the store.
    pub copied_files: usize,
    /// Files already in the store (incremental: not copied again).
    pub reused_files: usize,
    /// Bytes copied.
    pub copied_bytes: u64,
    /// Bytes read to compute digests (files whose digest was known from an earlier upload are not
    /// read again).
    pub hashed_bytes: u64,
}

/// One snapshot file an upload handled: its manifest entry, the bytes hashed for it, and the bytes
/// copied into the store (`None`: it was there already).
pub(crate) type UploadedFile = (ManifestFile, u64, Option<u64>);

impl UploadReport {
    /// The report, and the manifest, of an upload of `files` as the checkpoint of `partition` of
    /// `topic` covering offsets below `next_offset` under `fencing_token`.
    pub(crate) fn of(
        topic: &str,
        partition: i32,
        next_offset: i64,
        fencing_token: u64,
        files: Vec<UploadedFile>,
    ) -> Self {
        let mut report = UploadReport {
            manifest: Manifest {
                format: manifest::FORMAT,
                topic: topic.to_owned(),
                partition,
                next_offset,
                fencing_token,
                created_at_ms: now_ms(),
                files: Vec::with_capacity(files.len()),
            },
            copied_files: 0,
            reused_files: 0,
            copied_bytes: 0,
            hashed_bytes: 0,
        };
        for (file, hashed, copied) in files {
            report.hashed_bytes += hashed;
            match copied {
                Some(bytes) => {
                    report.copied_files += 1;
                    report.copied_bytes += bytes;
                }
                None => report.reused_files += 1,
            }
            report.manifest.files.push(file);
        }
        report
    }

    /// Logs the published upload (debug).
    pub(crate) fn log_published(&self) {
        let m = &self.manifest;
        tracing::debug!(
            topic = m.topic,
            partition = m.partition,
            next_offset = m.next_offset,
            fencing_token = m.fencing_token,
            copied_files = self.copied_files,
            reused_files = self.reused_files,
            "checkpoint uploaded"
        );
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One candidate of a `latest_valid` search, newest first: a valid checkpoint ends the search; a corrupt
/// one is logged and kept in `skipped`; any other error (the store failing) stops it.
///
/// # Errors
/// That other error.
pub(crate) fn take_if_valid(
    checked: ProcessorResult<Manifest>,
    skipped: &mut Vec<crate::error::ProcessorError>,
    topic: &str,
    partition: i32,
) -> ProcessorResult<Option<Manifest>> {
    match checked {
        Ok(manifest) => Ok(Some(manifest)),
        Err(err @ crate::error::ProcessorError::CorruptCheckpoint { .. }) => {
            tracing::warn!(topic, partition, error = %err, "skipping a corrupt checkpoint");
            skipped.push(err);
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// The regular files of a snapshot directory as `(name, path)`, sorted.
///
/// # Errors
/// An I/O error; [`ProcessorError::InvalidInput`](crate::error::ProcessorError::InvalidInput) for a
/// name that is not UTF-8.
pub(crate) fn snapshot_files(dir: &Path) -> ProcessorResult<Vec<(String, PathBuf)>> {
    use crate::error::ProcessorError;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(ProcessorError::io(dir))? {
        let path = entry.map_err(ProcessorError::io(dir))?.path();
        if !path.is_file() {
            continue;
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| ProcessorError::InvalidInput {
                what: "snapshot file name",
                reason: format!("{} is not UTF-8", path.display()),
            })?
            .to_owned();
        files.push((name, path));
    }
    files.sort();
    Ok(files)
}

/// What one restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreReport {
    /// Files copied from the store (each verified against its digest).
    pub copied_files: usize,
    /// Files taken from the earlier local copy (their digests match the manifest's).
    pub reused_files: usize,
    /// Bytes copied.
    pub copied_bytes: u64,
}

/// The shared store of checkpoints.
pub trait CheckpointStore: Send + Sync {
    /// Uploads the local snapshot in `snapshot_dir` as the checkpoint of `partition` of `topic` covering
    /// offsets below `next_offset`, written under `fencing_token`. Files already in the store are not
    /// copied again; the manifest is written last, atomically.
    ///
    /// # Errors
    /// [`ProcessorError::StaleOwner`](crate::error::ProcessorError::StaleOwner) when a checkpoint with a
    /// higher fencing token exists (a newer owner checkpointed); an I/O error.
    fn upload(
        &self,
        topic: &str,
        partition: i32,
        snapshot_dir: &Path,
        next_offset: i64,
        fencing_token: u64,
    ) -> ProcessorResult<UploadReport>;

    /// The newest checkpoint of the partition whose files are all present and match their checksums,
    /// plus the errors of the newer ones that did not (corrupt checkpoints are skipped, never loaded).
    ///
    /// # Errors
    /// An I/O error listing or reading the store: a store that cannot be read is an error, never "no
    /// checkpoint" (only corruption — a bad checksum, a missing file, an unreadable manifest — is
    /// skipped).
    fn latest_valid(
        &self,
        topic: &str,
        partition: i32,
    ) -> ProcessorResult<(Option<Manifest>, Vec<crate::error::ProcessorError>)>;

    /// The checkpoint `id` ([`Manifest::id`]) of the partition, verified.
    ///
    /// # Errors
    /// [`ProcessorError::CorruptCheckpoint`](crate::error::ProcessorError::CorruptCheckpoint) when it is
    /// damaged; an I/O error when it cannot be read (a missing manifest included).
    fn checkpoint(&self, topic: &str, partition: i32, id: &str) -> ProcessorResult<Manifest>;

    /// Checks that every file of the just-uploaded `manifest` is in the store with its size: the cheap
    /// check an uploader makes before it records the checkpoint, which catches a file a cleaner removed
    /// under the upload (a cleaner whose lock expired while it was paused) before anyone can resume from
    /// a checkpoint that lacks it.
    ///
    /// # Errors
    /// [`ProcessorError::CorruptCheckpoint`](crate::error::ProcessorError::CorruptCheckpoint) naming the
    /// first missing or short file; an I/O error.
    fn confirm(&self, manifest: &Manifest) -> ProcessorResult<()>;

    /// Copies the files of `manifest` into the new directory `dest`, verifying each checksum.
    ///
    /// # Errors
    /// [`ProcessorError::CorruptCheckpoint`](crate::error::ProcessorError::CorruptCheckpoint) on a
    /// mismatch; an I/O error.
    fn restore(&self, manifest: &Manifest, dest: &Path) -> ProcessorResult<()>;

    /// The manifest of checkpoint `id`, read but not verified: for a caller that verifies every file it
    /// uses itself ([`restore_incremental`](Self::restore_incremental)).
    ///
    /// # Errors
    /// [`ProcessorError::CorruptCheckpoint`](crate::error::ProcessorError::CorruptCheckpoint) for an
    /// unreadable manifest; an I/O error.
    fn manifest(&self, topic: &str, partition: i32, id: &str) -> ProcessorResult<Manifest> {
        self.checkpoint(topic, partition, id)
    }

    /// As [`restore`](Self::restore) into the new directory `dest`, taking every immutable file
    /// (SST, blob) whose digest matches the manifest's from `previous` — an earlier local copy of the
    /// same partition — instead of the store: a standby replica refreshing its copy, or a new owner
    /// starting from one, reads only what changed. Every file in `dest` is verified either way.
    ///
    /// # Errors
    /// As [`restore`](Self::restore).
    fn restore_incremental(
        &self,
        manifest: &Manifest,
        dest: &Path,
        previous: &Path,
    ) -> ProcessorResult<RestoreReport> {
        let _ = previous;
        self.restore(manifest, dest)?;
        Ok(RestoreReport {
            copied_files: manifest.files.len(),
            reused_files: 0,
            copied_bytes: manifest.files.iter().map(|f| f.size).sum(),
        })
    }

    /// Keeps the newest `keep` *valid* checkpoints of the partition (at least one; damaged ones never
    /// push a valid one out) **and the `recorded` one** — the checkpoint the partition's fenced record
    /// names ([`Manifest::id`]), whatever its age — and deletes the older ones, and every file no
    /// remaining checkpoint references that has not been used for `grace` (so an upload in flight keeps
    /// the files it reuses). Returns how many checkpoints were removed.
    ///
    /// Why the recorded one: an owner uploads, then records. A record write that failed, or a crash
    /// between the two, leaves newer checkpoints than the recorded one; deleting the recorded one would
    /// leave a record naming nothing, and every later owner would refuse the partition.
    ///
    /// # Errors
    /// An I/O error.
    fn retain(
        &self,
        topic: &str,
        partition: i32,
        keep: usize,
        grace: Duration,
        recorded: Option<&str>,
    ) -> ProcessorResult<usize>;

    /// The partitions of `topic` that have checkpoints.
    ///
    /// # Errors
    /// An I/O error.
    fn partitions(&self, topic: &str) -> ProcessorResult<Vec<i32>>;
}

/// Where a fleet keeps its checkpoints: a shared directory, or object storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointLocation {
    /// A directory every instance reaches (one machine, or a network mount).
    Directory(PathBuf),
    /// Object storage: `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`
    /// ([`ObjectCheckpointStore::from_url`]); `file:///path` is the directory form.
    Url(String),
}

impl CheckpointLocation {
    /// The location of one fleet's checkpoints under this one: `{dir}/{group}` or `{url}/{group}`, so
    /// fleets (groups) sharing a store never touch each other's.
    pub fn for_group(&self, group: &str) -> CheckpointLocation {
        match self {
            CheckpointLocation::Directory(dir) => {
                CheckpointLocation::Directory(crate::resources::checkpoint_root(dir, group))
            }
            CheckpointLocation::Url(url) => {
                CheckpointLocation::Url(crate::resources::checkpoint_url_root(url, group))
            }
        }
    }

    /// Opens the store: a [`DirectoryCheckpointStore`] (created if missing: check that a mount is there
    /// first) or an [`ObjectCheckpointStore`] configured from the environment.
    ///
    /// # Errors
    /// [`ProcessorError::InvalidInput`](crate::error::ProcessorError::InvalidInput) (`checkpoint url`)
    /// for a URL no store serves; an I/O error for a directory that cannot be made or written.
    pub fn open(&self) -> ProcessorResult<Arc<dyn CheckpointStore>> {
        match self {
            CheckpointLocation::Directory(dir) => Ok(Arc::new(DirectoryCheckpointStore::new(dir)?)),
            CheckpointLocation::Url(url) => match url.strip_prefix("file://") {
                Some(path) => Ok(Arc::new(DirectoryCheckpointStore::new(path)?)),
                None => Ok(Arc::new(ObjectCheckpointStore::from_url(url)?)),
            },
        }
    }
}

impl std::fmt::Display for CheckpointLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckpointLocation::Directory(dir) => write!(f, "{}", dir.display()),
            CheckpointLocation::Url(url) => f.write_str(url),
        }
    }
}
