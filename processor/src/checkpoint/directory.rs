//! [`CheckpointStore`] in a shared directory (standing in for object storage):
//!
//! ```text
//! {root}/{topic}/{partition}/files/{sha256}-{name}        content-addressed: each distinct file once
//! {root}/{topic}/{partition}/manifests/{token}-{offset}.json   written last: temp file, fsync, rename
//! ```
//!
//! A checkpoint exists once its manifest does; files without a manifest are garbage that
//! [`retain`](CheckpointStore::retain) removes once they have been unused for its grace period (an upload
//! that reuses a file touches it first, so a concurrent retention cannot pull it from under a manifest
//! about to be written).
//!
//! **One clock.** "Unused for the grace period" is measured on the store's clock only, never by comparing
//! the clocks of the machine that used a file and the machine that cleans: a touch changes the file's
//! status-change time (`ctime`), which the file system (the file server, for a network mount) stamps with
//! its own time whatever the toucher's clock says, and "now" is the modification time of a probe file the
//! cleaner writes into the store just before it decides. Temp files are only ever written, so their
//! modification time is the store's clock too.
//!
//! Manifests are named by fencing token first, so the newest
//! owner's checkpoints always sort last: an old owner that uploads late cannot hide a newer owner's
//! checkpoint, and is refused outright when the newer one is already there.

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::digests::{DigestCache, immutable};
use super::manifest::{Manifest, ManifestFile, digest_file, token_of_name, valid_topic};
use super::{CheckpointStore, RestoreReport, UploadReport, snapshot_files, take_if_valid};
use crate::error::{ProcessorError, ProcessorResult};

/// Checkpoints under one root directory.
#[derive(Debug, Clone)]
pub struct DirectoryCheckpointStore {
    root: PathBuf,
    digests: std::sync::Arc<DigestCache>,
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory, fsync, rename, fsync the dir.
/// Marks a temp file: `.{name}{TEMP_MARK}{pid}-{random}`.
const TEMP_MARK: &str = ".tmp-";

/// How old a temp file must be before retention deletes it as a leftover of a crashed writer: far
/// longer than any write takes, so a live write is never pulled from under its writer.
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

/// A temp name beside `path` that no other writer uses: the pid alone repeats across containers (every
/// one of them can be pid 1), so 64 random bits follow it.
fn temp_path(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new("."));
    dir.join(format!(
        ".{}{TEMP_MARK}{}-{:016x}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id(),
        rand::random::<u64>()
    ))
}

/// Deletes the temp files in `dir` last written more than [`STALE_TEMP_AGE`] before `now` (left by
/// writers that crashed between creating and renaming them); returns how many.
fn remove_stale_temps(dir: &Path, now: StoreTime) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with('.') && name.contains(TEMP_MARK)
        })
        .filter(|entry| {
            entry
                .metadata()
                .is_ok_and(|meta| now - modified(&meta) > STALE_TEMP_AGE.as_nanos() as i128)
        })
        .filter(|entry| fs::remove_file(entry.path()).is_ok())
        .count()
}

/// The fencing token in a manifest's file name.
fn token_of(manifest_path: &Path) -> Option<u64> {
    token_of_name(manifest_path.file_name()?.to_str()?)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> ProcessorResult<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temp_path(path);
    let mut file = fs::File::create(&tmp).map_err(ProcessorError::io(&tmp))?;
    file.write_all(bytes).map_err(ProcessorError::io(&tmp))?;
    file.sync_all().map_err(ProcessorError::io(&tmp))?;
    fs::rename(&tmp, path).map_err(ProcessorError::io(path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> ProcessorResult<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ProcessorError::io(dir))
}

/// Copies `from` to `to` atomically (temp + fsync + rename).
fn copy_atomically(from: &Path, to: &Path) -> ProcessorResult<u64> {
    let tmp = temp_path(to);
    let copied = fs::copy(from, &tmp).map_err(ProcessorError::io(from))?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(ProcessorError::io(&tmp))?;
    fs::rename(&tmp, to).map_err(ProcessorError::io(to))?;
    Ok(copied)
}

/// Marks `path` as just used: any change of its attributes makes the store stamp its `ctime` with the
/// store's own clock (the time set here is irrelevant); `false` if it vanished meanwhile.
fn touch(path: &Path) -> bool {
    fs::File::options()
        .append(true)
        .open(path)
        .and_then(|file| file.set_modified(SystemTime::now()))
        .is_ok()
}

/// A point on the store's clock (nanoseconds since the epoch).
type StoreTime = i128;

fn status_changed(meta: &fs::Metadata) -> StoreTime {
    use std::os::unix::fs::MetadataExt;
    i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec())
}

fn modified(meta: &fs::Metadata) -> StoreTime {
    use std::os::unix::fs::MetadataExt;
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

/// "Now" on the clock of the store holding `dir`: the modification time of a probe file written there.
fn store_now(dir: &Path) -> ProcessorResult<StoreTime> {
    let probe = temp_path(&dir.join("clock-probe"));
    fs::write(&probe, b"now").map_err(ProcessorError::io(&probe))?;
    let now = fs::metadata(&probe).map(|meta| modified(&meta));
    let _ = fs::remove_file(&probe);
    now.map_err(ProcessorError::io(&probe))
}

/// Whether `path` was last used (touched or written) more than `grace` before `now`, all on the store's
/// clock.
fn unused_for(path: &Path, grace: Duration, now: StoreTime) -> bool {
    fs::metadata(path).is_ok_and(|meta| now - status_changed(&meta) > grace.as_nanos() as i128)
}

impl DirectoryCheckpointStore {
    /// A store under `root` (created if missing).
    ///
    /// # Errors
    /// An I/O error when `root` cannot be created or is not writable.
    pub fn new(root: impl Into<PathBuf>) -> ProcessorResult<Self> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(ProcessorError::io(&root))?;
        let probe = temp_path(&root.join("write-probe"));
        fs::write(&probe, b"").map_err(ProcessorError::io(&root))?;
        let _ = fs::remove_file(&probe);
        Ok(DirectoryCheckpointStore {
            root,
            digests: std::sync::Arc::default(),
        })
    }

    fn partition_dir(&self, topic: &str, partition: i32) -> PathBuf {
        self.root.join(topic).join(partition.to_string())
    }

    pub(crate) fn files_dir(&self, topic: &str, partition: i32) -> PathBuf {
        self.partition_dir(topic, partition).join("files")
    }

    pub(crate) fn manifests_dir(&self, topic: &str, partition: i32) -> PathBuf {
        self.partition_dir(topic, partition).join("manifests")
    }

    /// Manifest paths of the partition, newest last.
    fn manifest_paths(&self, topic: &str, partition: i32) -> ProcessorResult<Vec<PathBuf>> {
        let dir = self.manifests_dir(topic, partition);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(ProcessorError::io(&dir)(err)),
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .filter(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.'))
            })
            .collect();
        paths.sort();
        Ok(paths)
    }

    fn read_manifest(path: &Path) -> ProcessorResult<Manifest> {
        let bytes = fs::read(path).map_err(ProcessorError::io(path))?;
        Manifest::decode(&bytes, path)
    }

    /// [`Manifest::check_names`] for a manifest handed in (not read here): nothing is written outside
    /// the target directory whoever built it.
    fn check_names(&self, manifest: &Manifest) -> ProcessorResult<()> {
        manifest
            .check_names()
            .map_err(|reason| ProcessorError::CorruptCheckpoint {
                path: self
                    .manifests_dir(&manifest.topic, manifest.partition)
                    .join(format!("{}.json", manifest.id())),
                reason,
            })
    }

    /// Checks that every file of `manifest` is present with its size and checksum.
    fn verify(&self, manifest: &Manifest) -> ProcessorResult<()> {
        let files = self.files_dir(&manifest.topic, manifest.partition);
        for file in &manifest.files {
            let blob = files.join(Manifest::blob_name(file));
            let corrupt = |reason: String| ProcessorError::CorruptCheckpoint {
                path: blob.clone(),
                reason,
            };
            let (size, sha) = digest_file(&blob).map_err(|err| match err {
                // A missing file is damage; any other read error is the store failing, not corruption.
                ProcessorError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    corrupt("file missing".to_owned())
                }
                other => other,
            })?;
            if size != file.size {
                return Err(corrupt(format!("size {size}, manifest says {}", file.size)));
            }
            if sha != file.sha256 {
                return Err(corrupt("checksum mismatch".to_owned()));
            }
        }
        Ok(())
    }
}

impl CheckpointStore for DirectoryCheckpointStore {
    fn upload(
        &self,
        topic: &str,
        partition: i32,
        snapshot_dir: &Path,
        next_offset: i64,
        fencing_token: u64,
    ) -> ProcessorResult<UploadReport> {
        valid_topic(topic)?;
        if let Some(newest) = self.manifest_paths(topic, partition)?.last() {
            // The token is in the manifest's name (`{token}-{offset}`, written by its uploader), so a
            // damaged newest manifest neither hides a newer owner nor blocks every later upload.
            let highest = match token_of(newest) {
                Some(token) => token,
                None => Self::read_manifest(newest)?.fencing_token,
            };
            if highest > fencing_token {
                return Err(ProcessorError::StaleOwner {
                    partition,
                    token: fencing_token,
                    highest,
                });
            }
        }
        let files_dir = self.files_dir(topic, partition);
        let manifests_dir = self.manifests_dir(topic, partition);
        for dir in [&files_dir, &manifests_dir] {
            fs::create_dir_all(dir).map_err(ProcessorError::io(dir))?;
        }
        let mut uploaded = Vec::new();
        for (name, path) in snapshot_files(snapshot_dir)? {
            let (size, sha256, hashed) = self.digests.digest(&path, &name)?;
            let file = ManifestFile { name, size, sha256 };
            let blob = files_dir.join(Manifest::blob_name(&file));
            let present = fs::metadata(&blob).is_ok_and(|m| m.len() == size);
            // Touched: retention leaves recently used files alone for its grace period, so it cannot
            // delete this file between now and our manifest becoming visible.
            let copied = if present && touch(&blob) {
                None
            } else {
                Some(copy_atomically(&path, &blob)?)
            };
            uploaded.push((file, hashed, copied));
        }
        sync_dir(&files_dir)?;
        let report = UploadReport::of(topic, partition, next_offset, fencing_token, uploaded);
        let bytes = serde_json::to_vec_pretty(&report.manifest)
            .map_err(|err| ProcessorError::encode("a checkpoint manifest", err))?;
        write_atomically(
            &manifests_dir.join(format!("{}.json", report.manifest.id())),
            &bytes,
        )?;
        report.log_published();
        Ok(report)
    }

    fn latest_valid(
        &self,
        topic: &str,
        partition: i32,
    ) -> ProcessorResult<(Option<Manifest>, Vec<ProcessorError>)> {
        valid_topic(topic)?;
        let mut skipped = Vec::new();
        for path in self.manifest_paths(topic, partition)?.iter().rev() {
            let checked = Self::read_manifest(path).and_then(|m| self.verify(&m).map(|()| m));
            if let Some(manifest) = take_if_valid(checked, &mut skipped, topic, partition)? {
                return Ok((Some(manifest), skipped));
            }
        }
        Ok((None, skipped))
    }

    fn checkpoint(&self, topic: &str, partition: i32, id: &str) -> ProcessorResult<Manifest> {
        valid_topic(topic)?;
        let path = self
            .manifests_dir(topic, partition)
            .join(format!("{id}.json"));
        let manifest = Self::read_manifest(&path)?;
        self.verify(&manifest)?;
        Ok(manifest)
    }

    fn confirm(&self, manifest: &Manifest) -> ProcessorResult<()> {
        valid_topic(&manifest.topic)?;
        let files = self.files_dir(&manifest.topic, manifest.partition);
        for file in &manifest.files {
            let blob = files.join(Manifest::blob_name(file));
            match fs::metadata(&blob) {
                Ok(meta) if meta.len() == file.size => {}
                Ok(meta) => {
                    return Err(ProcessorError::CorruptCheckpoint {
                        path: blob,
                        reason: format!("size {}, manifest says {}", meta.len(), file.size),
                    });
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ProcessorError::CorruptCheckpoint {
                        path: blob,
                        reason: "file missing".to_owned(),
                    });
                }
                Err(err) => return Err(ProcessorError::io(&blob)(err)),
            }
        }
        Ok(())
    }

    fn restore(&self, manifest: &Manifest, dest: &Path) -> ProcessorResult<()> {
        valid_topic(&manifest.topic)?;
        self.check_names(manifest)?;
        fs::create_dir_all(dest).map_err(ProcessorError::io(dest))?;
        let files = self.files_dir(&manifest.topic, manifest.partition);
        for file in &manifest.files {
            let blob = files.join(Manifest::blob_name(file));
            let target = dest.join(&file.name);
            fs::copy(&blob, &target).map_err(ProcessorError::io(&blob))?;
            let (size, sha) = digest_file(&target)?;
            if size != file.size || sha != file.sha256 {
                return Err(ProcessorError::CorruptCheckpoint {
                    path: blob,
                    reason: "file changed while restoring".to_owned(),
                });
            }
        }
        Ok(())
    }

    fn manifest(&self, topic: &str, partition: i32, id: &str) -> ProcessorResult<Manifest> {
        valid_topic(topic)?;
        Self::read_manifest(
            &self
                .manifests_dir(topic, partition)
                .join(format!("{id}.json")),
        )
    }

    fn restore_incremental(
        &self,
        manifest: &Manifest,
        dest: &Path,
        previous: &Path,
    ) -> ProcessorResult<RestoreReport> {
        valid_topic(&manifest.topic)?;
        self.check_names(manifest)?;
        fs::create_dir_all(dest).map_err(ProcessorError::io(dest))?;
        let files = self.files_dir(&manifest.topic, manifest.partition);
        let mut report = RestoreReport::default();
        for file in &manifest.files {
            let target = dest.join(&file.name);
            let local = previous.join(&file.name);
            // Immutable files only: RocksDB appends to the others (MANIFEST, OPTIONS, ...) in a live
            // directory, and a hard link would share those appends.
            if immutable(&file.name) && local.is_file() {
                let (size, sha256, _) = self.digests.digest(&local, &file.name)?;
                if size == file.size && sha256 == file.sha256 {
                    if fs::hard_link(&local, &target).is_err() {
                        fs::copy(&local, &target).map_err(ProcessorError::io(&local))?;
                    }
                    report.reused_files += 1;
                    continue;
                }
            }
            let blob = files.join(Manifest::blob_name(file));
            fs::copy(&blob, &target).map_err(ProcessorError::io(&blob))?;
            // Remembered by the digest cache: the next refresh takes this file without hashing it.
            let (size, sha256, _) = self.digests.digest(&target, &file.name)?;
            if size != file.size || sha256 != file.sha256 {
                return Err(ProcessorError::CorruptCheckpoint {
                    path: blob,
                    reason: "file differs from its digest in the manifest".to_owned(),
                });
            }
            report.copied_files += 1;
            report.copied_bytes += size;
        }
        Ok(report)
    }

    fn retain(
        &self,
        topic: &str,
        partition: i32,
        keep: usize,
        grace: Duration,
        recorded: Option<&str>,
    ) -> ProcessorResult<usize> {
        valid_topic(topic)?;
        let paths = self.manifest_paths(topic, partition)?;
        // Keep the newest `keep` *valid* checkpoints, and every (damaged) one newer than the oldest of
        // them: damaged checkpoints never push a valid one out. A checkpoint that cannot be read at all
        // stops the run (retention never guesses).
        let mut valid = 0;
        let mut kept_count = 0;
        for path in paths.iter().rev() {
            if valid >= keep.max(1) {
                break;
            }
            kept_count += 1;
            match Self::read_manifest(path).and_then(|m| self.verify(&m)) {
                Ok(()) => valid += 1,
                Err(ProcessorError::CorruptCheckpoint { .. }) => {}
                Err(err) => return Err(err),
            }
        }
        let (old, kept) = paths.split_at(paths.len() - kept_count);
        let recorded = recorded.map(|id| format!("{id}.json"));
        let is_recorded = |path: &PathBuf| {
            recorded
                .as_deref()
                .is_some_and(|name| path.file_name() == Some(OsStr::new(name)))
        };
        let mut removed = 0;
        for path in old.iter().filter(|path| !is_recorded(path)) {
            fs::remove_file(path).map_err(ProcessorError::io(path))?;
            removed += 1;
        }
        let mut referenced = std::collections::HashSet::new();
        for path in kept
            .iter()
            .chain(old.iter().filter(|path| is_recorded(path)))
        {
            if let Ok(manifest) = Self::read_manifest(path) {
                referenced.extend(manifest.files.iter().map(Manifest::blob_name));
            }
        }
        let files = self.files_dir(topic, partition);
        if !files.is_dir() {
            return Ok(removed);
        }
        // Read the store's clock after the listing above: a file touched since is younger still.
        let now = store_now(&files)?;
        let stale = remove_stale_temps(&files, now)
            + remove_stale_temps(&self.manifests_dir(topic, partition), now);
        if stale > 0 {
            tracing::info!(
                topic,
                partition,
                stale,
                "removed temp files left by crashed writers"
            );
        }
        if let Ok(entries) = fs::read_dir(&files) {
            for entry in entries.filter_map(Result::ok) {
                let name = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                if !name.starts_with('.')
                    && !referenced.contains(&name)
                    && unused_for(&path, grace, now)
                {
                    match fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                        Err(err) => return Err(ProcessorError::io(&path)(err)),
                    }
                }
            }
        }
        Ok(removed)
    }

    fn partitions(&self, topic: &str) -> ProcessorResult<Vec<i32>> {
        valid_topic(topic)?;
        let dir = self.root.join(topic);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(ProcessorError::io(&dir)(err)),
        };
        let mut partitions: Vec<i32> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect();
        partitions.sort_unstable();
        Ok(partitions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::manifest::FORMAT;
    use crate::store::rocksdb::RocksDbStores;
    use crate::store::{PartitionStore, StateBatch};

    fn fill(store: &dyn PartitionStore, from: u32, to: u32, token: u64) {
        for chunk in (from..to).collect::<Vec<_>>().chunks(500) {
            let mut batch = StateBatch::new(i64::from(*chunk.last().unwrap()) + 1, token);
            for i in chunk {
                batch.put(format!("key-{i:08}"), vec![b'x'; 100]);
            }
            store.apply(&batch).unwrap();
        }
    }

    /// A checkpoint written in the next manifest format (a newer processor in the fleet) is refused by
    /// name, never restored and never skipped as corrupt (an older checkpoint would be restored silently).
    #[test]
    fn a_checkpoint_in_a_newer_format_is_refused_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let stores = RocksDbStores::new(8 << 20, 4 << 20);
        let db = stores.open(0, &dir.path().join("db")).unwrap();
        let shared = DirectoryCheckpointStore::new(dir.path().join("shared")).unwrap();
        fill(&db, 0, 100, 1);
        db.snapshot_to(&dir.path().join("snap1")).unwrap();
        shared
            .upload("orders", 0, &dir.path().join("snap1"), 100, 1)
            .unwrap();
        fill(&db, 100, 200, 1);
        db.snapshot_to(&dir.path().join("snap2")).unwrap();
        let newer = shared
            .upload("orders", 0, &dir.path().join("snap2"), 200, 1)
            .unwrap()
            .manifest;
        let path = shared
            .manifests_dir("orders", 0)
            .join(format!("{}.json", newer.id()));
        let mut json: serde_json::Value =
            serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        json["format"] = serde_json::json!(FORMAT + 1);
        json["files"] = serde_json::json!({"moved": "elsewhere in the next format"});
        fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
        for outcome in [
            shared.checkpoint("orders", 0, &newer.id()).map(|_| ()),
            shared.latest_valid("orders", 0).map(|_| ()),
        ] {
            let err = outcome.unwrap_err();
            assert!(
                matches!(err, ProcessorError::CheckpointTooNew { format, .. } if format == FORMAT + 1),
                "{err}"
            );
        }
    }

    #[test]
    fn upload_is_incremental_restore_round_trips_and_retention_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let stores = RocksDbStores::new(8 << 20, 4 << 20);
        let db = stores.open(0, &dir.path().join("db")).unwrap();
        let shared = DirectoryCheckpointStore::new(dir.path().join("shared")).unwrap();

        fill(&db, 0, 5_000, 1);
        db.snapshot_to(&dir.path().join("snap1")).unwrap();
        let first = shared
            .upload("orders", 0, &dir.path().join("snap1"), 5_000, 1)
            .unwrap();
        assert!(first.copied_files > 0);
        assert_eq!(first.reused_files, 0);

        fill(&db, 5_000, 6_000, 1);
        db.snapshot_to(&dir.path().join("snap2")).unwrap();
        let second = shared
            .upload("orders", 0, &dir.path().join("snap2"), 6_000, 1)
            .unwrap();
        assert!(
            second.reused_files > 0,
            "SST files of the first checkpoint are not copied again"
        );
        assert!(second.copied_bytes < first.copied_bytes + 1);
        let first_ssts: Vec<&str> = first
            .manifest
            .files
            .iter()
            .filter(|f| f.name.ends_with(".sst"))
            .map(|f| f.name.as_str())
            .collect();
        let total: u64 = second.manifest.files.iter().map(|f| f.size).sum();
        let already_hashed: u64 = second
            .manifest
            .files
            .iter()
            .filter(|f| first_ssts.contains(&f.name.as_str()))
            .map(|f| f.size)
            .sum();
        assert!(already_hashed > 0);
        assert!(
            second.hashed_bytes + already_hashed <= total,
            "the SST files already uploaded are not read again: {} of {total} bytes hashed, {already_hashed} known",
            second.hashed_bytes,
        );

        let (latest, skipped) = shared.latest_valid("orders", 0).unwrap();
        let latest = latest.unwrap();
        assert!(skipped.is_empty());
        assert_eq!(latest.next_offset, 6_000);
        shared
            .restore(&latest, &dir.path().join("restored"))
            .unwrap();
        let restored = stores.open(0, &dir.path().join("restored")).unwrap();
        assert_eq!(restored.entries().unwrap().len(), 6_000);
        assert_eq!(restored.meta().unwrap().unwrap().next_offset, 6_000);

        // Within the grace period nothing unreferenced is deleted; after it, the first checkpoint's
        // own files go.
        let blobs = || fs::read_dir(shared.files_dir("orders", 0)).unwrap().count();
        let before = blobs();
        assert_eq!(
            shared
                .retain("orders", 0, 1, Duration::from_secs(3600), None)
                .unwrap(),
            1
        );
        assert_eq!(blobs(), before, "files used within the grace period stay");
        assert_eq!(
            shared.retain("orders", 0, 1, Duration::ZERO, None).unwrap(),
            0
        );
        assert!(
            blobs() < before,
            "unreferenced files go once the grace period is over"
        );
        let (still, _) = shared.latest_valid("orders", 0).unwrap();
        assert_eq!(
            still.unwrap().next_offset,
            6_000,
            "retention keeps the newest and its files"
        );
        assert_eq!(shared.partitions("orders").unwrap(), vec![0]);
    }

    #[test]
    fn corrupt_checkpoints_are_skipped_and_stale_owners_refused() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = dir.path().join("snap");
        fs::create_dir_all(&snapshot).unwrap();
        fs::write(snapshot.join("a.sst"), b"first").unwrap();
        let shared = DirectoryCheckpointStore::new(dir.path().join("shared")).unwrap();
        shared.upload("t", 3, &snapshot, 10, 5).unwrap();
        fs::write(snapshot.join("b.sst"), b"second").unwrap();
        let newer = shared.upload("t", 3, &snapshot, 20, 5).unwrap().manifest;

        // Damage a file only the newer checkpoint has: it is skipped with a clear error.
        let blob = shared
            .files_dir("t", 3)
            .join(Manifest::blob_name(&newer.files[1]));
        fs::write(&blob, b"bit rot").unwrap();
        let (latest, skipped) = shared.latest_valid("t", 3).unwrap();
        assert_eq!(
            latest.unwrap().next_offset,
            10,
            "the older valid checkpoint is used"
        );
        assert!(matches!(
            skipped.as_slice(),
            [ProcessorError::CorruptCheckpoint { .. }]
        ));

        // A newer owner checkpoints; the old owner's late upload is refused.
        shared.upload("t", 3, &snapshot, 25, 6).unwrap();
        match shared.upload("t", 3, &snapshot, 30, 5) {
            Err(ProcessorError::StaleOwner {
                token: 5,
                highest: 6,
                ..
            }) => {}
            other => panic!("stale upload accepted: {other:?}"),
        }
        assert!(shared.upload("../etc", 0, &snapshot, 1, 1).is_err());
    }

    #[test]
    fn temp_names_are_unique_and_stale_temps_are_cleaned_by_retention() {
        let target = Path::new("/x/manifests/m.json");
        assert_ne!(
            temp_path(target),
            temp_path(target),
            "same pid, two writers"
        );

        let dir = tempfile::tempdir().unwrap();
        let shared = DirectoryCheckpointStore::new(dir.path()).unwrap();
        let files = shared.files_dir("orders", 0);
        let manifests = shared.manifests_dir("orders", 0);
        fs::create_dir_all(&files).unwrap();
        fs::create_dir_all(&manifests).unwrap();
        let stale = temp_path(&files.join("000123.sst"));
        let stale_manifest = temp_path(&manifests.join("m.json"));
        let fresh = temp_path(&files.join("000124.sst"));
        for path in [&stale, &stale_manifest, &fresh] {
            fs::write(path, b"partial").unwrap();
        }
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        for path in [&stale, &stale_manifest] {
            fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(two_hours_ago)
                .unwrap();
        }
        shared
            .retain("orders", 0, 3, Duration::from_secs(60), None)
            .unwrap();
        assert!(
            !stale.exists() && !stale_manifest.exists(),
            "leftovers of crashed writers go"
        );
        assert!(fresh.exists(), "a write that may be in progress stays");
    }

    #[test]
    fn retention_with_the_newest_checkpoints_corrupt_keeps_a_valid_one() {
        let dir = tempfile::tempdir().unwrap();
        let stores = RocksDbStores::new(8 << 20, 4 << 20);
        let db = stores.open(0, &dir.path().join("db")).unwrap();
        let shared = DirectoryCheckpointStore::new(dir.path().join("shared")).unwrap();
        for round in 1..=4u32 {
            fill(&db, (round - 1) * 100, round * 100, 1);
            let snap = dir.path().join(format!("snap{round}"));
            db.snapshot_to(&snap).unwrap();
            shared
                .upload("orders", 0, &snap, i64::from(round * 100), 1)
                .unwrap();
        }
        // The two newest manifests are damaged.
        let manifests = shared.manifest_paths("orders", 0).unwrap();
        assert_eq!(manifests.len(), 4);
        for path in &manifests[2..] {
            fs::write(path, b"{ damaged").unwrap();
        }
        shared.retain("orders", 0, 2, Duration::ZERO, None).unwrap();
        let (latest, skipped) = shared.latest_valid("orders", 0).unwrap();
        assert_eq!(skipped.len(), 2);
        assert_eq!(
            latest.map(|m| m.next_offset),
            Some(200),
            "a valid checkpoint survives retention"
        );
        let restored = dir.path().join("restored");
        let (latest, _) = shared.latest_valid("orders", 0).unwrap();
        shared.restore(&latest.unwrap(), &restored).unwrap();
        assert_eq!(
            stores.open(0, &restored).unwrap().entries().unwrap().len(),
            200
        );
    }
}
