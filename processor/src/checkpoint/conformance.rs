//! The checkpoint-store conformance suite: the behaviours every [`CheckpointStore`] must show, written
//! once and run against every store — the directory store here, and any store of yours.
//!
//! Each check is a public function that panics with a message on a violation; it takes the store under
//! test through [`StoreUnderTest`] (the store, and the means to damage what it holds the way a failing
//! disk, a crashed cleaner or a hostile writer would) and a scratch directory. Every check uses a topic
//! of its own, so checks can share one store and run in parallel. The
//! [`checkpoint_store_conformance_tests!`](crate::checkpoint_store_conformance_tests) macro expands to
//! one `#[test]` per check:
//!
//! ```ignore
//! use processor::checkpoint::conformance::DirectoryStoreUnderTest;
//!
//! processor::checkpoint_store_conformance_tests!(DirectoryStoreUnderTest::new());
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{
    CheckpointStore, DirectoryCheckpointStore, Manifest, ManifestFile, ObjectCheckpointStore,
};
use crate::error::ProcessorError;

/// The store under test, and the means to damage what it holds.
pub trait StoreUnderTest: Send + Sync {
    /// The store. Every call returns a handle to the same stored data.
    fn store(&self) -> Arc<dyn CheckpointStore>;

    /// Overwrites the stored copy of `file` of `manifest` with other bytes of the same length (a
    /// failing disk, a bad copy).
    fn damage_file(&self, manifest: &Manifest, file: &ManifestFile);

    /// Deletes the stored copy of `file` of `manifest` (a cleaner that paused past its lock).
    fn remove_file(&self, manifest: &Manifest, file: &ManifestFile);

    /// Stores `manifest` as it is, and each `(file, bytes)` where the store would look for that file —
    /// what someone with write access to the store, but not the processor's code, can do.
    fn plant(&self, manifest: &Manifest, files: &[(&ManifestFile, &[u8])]);
}

/// Runs one check with a scratch directory of its own (removed afterwards).
///
/// # Panics
/// When the check finds a violation, or the scratch directory cannot be made.
pub fn run(check: Check, store: &dyn StoreUnderTest) {
    let scratch = tempfile::tempdir().expect("a scratch directory for the check");
    check(store, scratch.path());
}

/// One check of the suite.
pub type Check = fn(&dyn StoreUnderTest, &Path);

/// Every check of the suite by name, for a runner of its own (one server for all of them).
pub const CHECKS: [(&str, Check); 8] = [
    (
        "upload_then_restore_round_trips",
        upload_then_restore_round_trips,
    ),
    (
        "uploads_reuse_the_files_already_stored",
        uploads_reuse_the_files_already_stored,
    ),
    (
        "an_incremental_restore_takes_unchanged_files_from_the_previous_copy",
        an_incremental_restore_takes_unchanged_files_from_the_previous_copy,
    ),
    (
        "damaged_or_missing_files_make_a_checkpoint_skipped_never_restored",
        damaged_or_missing_files_make_a_checkpoint_skipped_never_restored,
    ),
    (
        "a_stale_owner_cannot_publish_after_a_newer_one",
        a_stale_owner_cannot_publish_after_a_newer_one,
    ),
    (
        "racing_owners_leave_the_newest_owners_checkpoint_latest",
        racing_owners_leave_the_newest_owners_checkpoint_latest,
    ),
    (
        "retention_keeps_k_valid_checkpoints_and_the_recorded_one",
        retention_keeps_k_valid_checkpoints_and_the_recorded_one,
    ),
    (
        "a_manifest_naming_a_path_outside_the_store_is_corrupt_and_writes_nothing",
        a_manifest_naming_a_path_outside_the_store_is_corrupt_and_writes_nothing,
    ),
];

/// One `#[test]` per check of the suite, each on the [`StoreUnderTest`] that `$store` makes.
#[macro_export]
macro_rules! checkpoint_store_conformance_tests {
    ($store:expr) => {
        $crate::checkpoint_store_conformance_tests!(@each $store;
            upload_then_restore_round_trips,
            uploads_reuse_the_files_already_stored,
            an_incremental_restore_takes_unchanged_files_from_the_previous_copy,
            damaged_or_missing_files_make_a_checkpoint_skipped_never_restored,
            a_stale_owner_cannot_publish_after_a_newer_one,
            racing_owners_leave_the_newest_owners_checkpoint_latest,
            retention_keeps_k_valid_checkpoints_and_the_recorded_one,
            a_manifest_naming_a_path_outside_the_store_is_corrupt_and_writes_nothing);
    };
    (@each $store:expr; $($check:ident),*) => {
        $(
            #[test]
            fn $check() {
                let store = $store;
                $crate::checkpoint::conformance::run($crate::checkpoint::conformance::$check, &store);
            }
        )*
    };
}

/// A topic no other check uses.
fn fresh_topic(check: &str) -> String {
    format!("{check}-{}", uuid::Uuid::now_v7().simple())
}

/// A snapshot directory in `scratch` holding `files` (name, bytes).
fn snapshot(scratch: &Path, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let dir = scratch.join(name);
    std::fs::create_dir_all(&dir).expect("snapshot directory");
    for (file, bytes) in files {
        std::fs::write(dir.join(file), bytes).expect("snapshot file");
    }
    dir
}

fn read_dir_sorted(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("restored directory")
        .map(|entry| {
            let entry = entry.expect("restored entry");
            (
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(entry.path()).expect("restored file"),
            )
        })
        .collect();
    files.sort();
    files
}

/// Uploads `dir` as a checkpoint and returns its manifest; a refused upload fails the check.
fn published(
    store: &dyn CheckpointStore,
    topic: &str,
    partition: i32,
    dir: &Path,
    next_offset: i64,
    token: u64,
) -> Manifest {
    store
        .upload(topic, partition, dir, next_offset, token)
        .unwrap_or_else(|err| panic!("upload of {topic}/{partition} up to {next_offset}: {err}"))
        .manifest
}

fn file<'m>(manifest: &'m Manifest, name: &str) -> &'m ManifestFile {
    manifest
        .files
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("{name} is not in the manifest: {manifest:?}"))
}

const FILES: [(&str, &[u8]); 3] = [
    ("000007.sst", b"sorted data of the first table"),
    ("MANIFEST-000005", b"rocksdb manifest"),
    ("CURRENT", b"MANIFEST-000005\n"),
];

/// An uploaded checkpoint is the latest valid one, verifies, confirms, restores byte for byte, and its
/// partition is listed.
pub fn upload_then_restore_round_trips(under_test: &dyn StoreUnderTest, scratch: &Path) {
    let (store, topic) = (under_test.store(), fresh_topic("round-trip"));
    let dir = snapshot(scratch, "snap", &FILES);
    let report = store.upload(&topic, 3, &dir, 10, 1).expect("upload");
    assert_eq!(report.manifest.next_offset, 10);
    assert_eq!(report.manifest.files.len(), FILES.len());
    let (latest, skipped) = store.latest_valid(&topic, 3).expect("latest_valid");
    assert_eq!(latest.as_ref(), Some(&report.manifest));
    assert!(skipped.is_empty(), "{skipped:?}");
    store
        .checkpoint(&topic, 3, &report.manifest.id())
        .expect("checkpoint by id");
    store.confirm(&report.manifest).expect("confirm");
    let dest = scratch.join("restored");
    store.restore(&report.manifest, &dest).expect("restore");
    assert_eq!(read_dir_sorted(&dest), read_dir_sorted(&dir));
    assert_eq!(store.partitions(&topic).expect("partitions"), vec![3]);
}

/// A second upload copies only what is new.
pub fn uploads_reuse_the_files_already_stored(under_test: &dyn StoreUnderTest, scratch: &Path) {
    let (store, topic) = (under_test.store(), fresh_topic("reuse"));
    let dir = snapshot(scratch, "snap", &FILES);
    let first = store.upload(&topic, 0, &dir, 10, 1).expect("first upload");
    assert_eq!((first.copied_files, first.reused_files), (FILES.len(), 0));
    std::fs::write(dir.join("000009.sst"), b"a newer table").expect("new file");
    let second = store.upload(&topic, 0, &dir, 20, 1).expect("second upload");
    assert_eq!(
        (second.copied_files, second.reused_files),
        (1, FILES.len()),
        "only the new file is copied"
    );
}

/// `restore_incremental` takes the immutable files that did not change from the earlier local copy,
/// and the result is the checkpoint byte for byte.
pub fn an_incremental_restore_takes_unchanged_files_from_the_previous_copy(
    under_test: &dyn StoreUnderTest,
    scratch: &Path,
) {
    let (store, topic) = (under_test.store(), fresh_topic("incremental"));
    let dir = snapshot(scratch, "snap", &FILES);
    let first = store.upload(&topic, 0, &dir, 10, 1).expect("first upload");
    let previous = scratch.join("previous");
    store.restore(&first.manifest, &previous).expect("restore");
    std::fs::write(dir.join("000009.sst"), b"a newer table").expect("new file");
    let second = store.upload(&topic, 0, &dir, 20, 1).expect("second upload");
    let dest = scratch.join("refreshed");
    let report = store
        .restore_incremental(&second.manifest, &dest, &previous)
        .expect("incremental restore");
    assert_eq!(read_dir_sorted(&dest), read_dir_sorted(&dir));
    assert!(
        report.reused_files >= 1 && report.copied_files >= 1,
        "the unchanged table comes from the previous copy, the new one from the store: {report:?}"
    );
}

/// A checkpoint with a damaged or a missing file is skipped by `latest_valid` (with its error),
/// refused by `checkpoint` and never restored; the newest complete one is returned instead.
pub fn damaged_or_missing_files_make_a_checkpoint_skipped_never_restored(
    under_test: &dyn StoreUnderTest,
    scratch: &Path,
) {
    let (store, topic) = (under_test.store(), fresh_topic("damaged"));
    let dir = snapshot(scratch, "snap", &FILES);
    let complete = published(&*store, &topic, 0, &dir, 10, 1);
    for (round, harm) in ["damaged", "removed"].into_iter().enumerate() {
        let name = format!("00001{round}.sst");
        std::fs::write(dir.join(&name), format!("table only the {harm} one has")).expect("file");
        let newer = published(&*store, &topic, 0, &dir, 20 + round as i64, 1);
        std::fs::remove_file(dir.join(&name)).expect("file");
        match harm {
            "damaged" => under_test.damage_file(&newer, file(&newer, &name)),
            _ => under_test.remove_file(&newer, file(&newer, &name)),
        }
        let (latest, skipped) = store.latest_valid(&topic, 0).expect("latest_valid");
        assert_eq!(
            latest.map(|m| m.id()),
            Some(complete.id()),
            "the {harm} checkpoint is skipped"
        );
        assert!(
            skipped
                .iter()
                .all(|err| matches!(err, ProcessorError::CorruptCheckpoint { .. }))
                && skipped.len() == round + 1,
            "each skipped checkpoint is reported as corrupt: {skipped:?}"
        );
        assert!(
            store.checkpoint(&topic, 0, &newer.id()).is_err(),
            "the {harm} checkpoint is refused by id"
        );
        assert!(
            store
                .restore(&newer, &scratch.join(format!("restore-{harm}")))
                .is_err(),
            "the {harm} checkpoint is not restored"
        );
    }
}

/// Once an owner with a higher fencing token published, an upload under a lower token is refused
/// ([`ProcessorError::StaleOwner`]) and changes nothing.
pub fn a_stale_owner_cannot_publish_after_a_newer_one(
    under_test: &dyn StoreUnderTest,
    scratch: &Path,
) {
    let (store, topic) = (under_test.store(), fresh_topic("stale"));
    let dir = snapshot(scratch, "snap", &FILES);
    let newer = published(&*store, &topic, 1, &dir, 10, 5);
    match store.upload(&topic, 1, &dir, 99, 4) {
        Err(ProcessorError::StaleOwner {
            token: 4,
            highest: 5,
            ..
        }) => {}
        other => panic!("a stale owner's upload must be refused, got {other:?}"),
    }
    let (latest, _) = store.latest_valid(&topic, 1).expect("latest_valid");
    assert_eq!(latest.map(|m| m.id()), Some(newer.id()));
}

/// Two owners uploading at once, the newer one with a higher token: whatever the interleaving, the
/// newer owner's checkpoint is the latest valid one afterwards, and the older owner's later uploads
/// are refused.
pub fn racing_owners_leave_the_newest_owners_checkpoint_latest(
    under_test: &dyn StoreUnderTest,
    scratch: &Path,
) {
    let (store, topic) = (under_test.store(), fresh_topic("race"));
    for round in 0..8u64 {
        let (old_token, new_token) = (10 * round + 1, 10 * round + 2);
        let old_dir = snapshot(
            scratch,
            &format!("old-{round}"),
            &[("000007.sst", format!("old {round}").as_bytes())],
        );
        let new_dir = snapshot(
            scratch,
            &format!("new-{round}"),
            &[("000007.sst", format!("new {round}").as_bytes())],
        );
        let newer = std::thread::scope(|scope| {
            let old = scope.spawn(|| store.upload(&topic, 0, &old_dir, 100, old_token));
            let new = scope.spawn(|| store.upload(&topic, 0, &new_dir, 50, new_token));
            let old = old.join().expect("old owner's thread");
            assert!(
                matches!(old, Ok(_) | Err(ProcessorError::StaleOwner { .. })),
                "the older owner either published first or was refused: {old:?}"
            );
            new.join()
                .expect("new owner's thread")
                .expect("the newer owner publishes")
        });
        let (latest, _) = store.latest_valid(&topic, 0).expect("latest_valid");
        assert_eq!(
            latest.map(|m| m.id()),
            Some(newer.manifest.id()),
            "round {round}"
        );
        assert!(
            matches!(
                store.upload(&topic, 0, &old_dir, 200, old_token),
                Err(ProcessorError::StaleOwner { .. })
            ),
            "round {round}: the older owner is refused once the newer one published"
        );
    }
}

/// Retention keeps the newest `keep` valid checkpoints (a damaged newer one does not count) and the
/// checkpoint the partition's record names however old, and deletes the rest.
pub fn retention_keeps_k_valid_checkpoints_and_the_recorded_one(
    under_test: &dyn StoreUnderTest,
    scratch: &Path,
) {
    let (store, topic) = (under_test.store(), fresh_topic("retention"));
    let dir = snapshot(scratch, "snap", &[]);
    let mut manifests = Vec::new();
    for offset in 1..=5 {
        std::fs::write(dir.join("000007.sst"), format!("table at {offset}")).expect("file");
        manifests.push(published(&*store, &topic, 0, &dir, offset, 1));
    }
    let newest = &manifests[4];
    under_test.damage_file(newest, &newest.files[0]);
    let removed = store
        .retain(&topic, 0, 2, Duration::ZERO, Some(&manifests[0].id()))
        .expect("retain");
    assert_eq!(removed, 1, "only the second checkpoint goes");
    for kept in [&manifests[0], &manifests[2], &manifests[3]] {
        store
            .checkpoint(&topic, 0, &kept.id())
            .unwrap_or_else(|err| panic!("{} must be kept whole: {err}", kept.id()));
    }
    assert!(store.checkpoint(&topic, 0, &manifests[1].id()).is_err());
}

/// A manifest naming `../escaped.sst`, with that file planted where the store would look for it, is
/// corrupt: skipped, refused by id, never restored — and nothing is written outside the target.
pub fn a_manifest_naming_a_path_outside_the_store_is_corrupt_and_writes_nothing(
    under_test: &dyn StoreUnderTest,
    scratch: &Path,
) {
    let (store, topic) = (under_test.store(), fresh_topic("escape"));
    let dir = snapshot(scratch, "snap", &FILES[..1]);
    let honest = published(&*store, &topic, 0, &dir, 10, 1);
    let mut evil = honest.clone();
    evil.next_offset = 20;
    evil.files[0].name = "../escaped.sst".to_owned();
    under_test.plant(&evil, &[(&evil.files[0], FILES[0].1)]);
    let (latest, skipped) = store.latest_valid(&topic, 0).expect("latest_valid");
    assert_eq!(latest.map(|m| m.id()), Some(honest.id()));
    assert!(
        matches!(&skipped[..], [ProcessorError::CorruptCheckpoint { .. }]),
        "{skipped:?}"
    );
    assert!(store.checkpoint(&topic, 0, &evil.id()).is_err());
    let dest = scratch.join("restore").join("into");
    assert!(store.restore(&evil, &dest).is_err());
    assert!(store.restore_incremental(&evil, &dest, &dir).is_err());
    assert!(!scratch.join("restore").join("escaped.sst").exists());
}

/// The directory store in a temporary directory, damaged through the file system.
#[derive(Debug)]
pub struct DirectoryStoreUnderTest {
    /// Removed with the value.
    _root: tempfile::TempDir,
    store: Arc<DirectoryCheckpointStore>,
}

impl DirectoryStoreUnderTest {
    /// A new store in a new temporary directory.
    ///
    /// # Panics
    /// When the directory cannot be made.
    pub fn new() -> Self {
        let root = tempfile::tempdir().expect("a directory for the store");
        let store = Arc::new(DirectoryCheckpointStore::new(root.path()).expect("the store"));
        DirectoryStoreUnderTest { _root: root, store }
    }

    fn blob(&self, manifest: &Manifest, file: &ManifestFile) -> PathBuf {
        self.store
            .files_dir(&manifest.topic, manifest.partition)
            .join(Manifest::blob_name(file))
    }
}

impl Default for DirectoryStoreUnderTest {
    fn default() -> Self {
        Self::new()
    }
}

impl StoreUnderTest for DirectoryStoreUnderTest {
    fn store(&self) -> Arc<dyn CheckpointStore> {
        self.store.clone()
    }

    fn damage_file(&self, manifest: &Manifest, file: &ManifestFile) {
        let blob = self.blob(manifest, file);
        let len = usize::try_from(file.size).expect("a small file");
        std::fs::write(&blob, vec![b'!'; len]).expect("damage the stored file");
    }

    fn remove_file(&self, manifest: &Manifest, file: &ManifestFile) {
        std::fs::remove_file(self.blob(manifest, file)).expect("remove the stored file");
    }

    fn plant(&self, manifest: &Manifest, files: &[(&ManifestFile, &[u8])]) {
        for (file, bytes) in files {
            let blob = self.blob(manifest, file);
            std::fs::create_dir_all(blob.parent().expect("a parent")).expect("plant a directory");
            std::fs::write(blob, bytes).expect("plant a file");
        }
        let path = self
            .store
            .manifests_dir(&manifest.topic, manifest.partition)
            .join(format!("{}.json", manifest.id()));
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("manifests directory");
        std::fs::write(path, serde_json::to_vec(manifest).expect("json"))
            .expect("plant a manifest");
    }
}

/// An [`ObjectCheckpointStore`], damaged through a client of its own (as someone with write access to
/// the bucket would): an in-memory object store ([`ObjectStoreUnderTest::in_memory`]) or any URL
/// ([`ObjectStoreUnderTest::at_url`], an S3 server in the tests).
pub struct ObjectStoreUnderTest {
    store: Arc<ObjectCheckpointStore>,
    raw: Arc<dyn object_store::ObjectStore>,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for ObjectStoreUnderTest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStoreUnderTest")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl ObjectStoreUnderTest {
    /// A store over `object_store`'s in-memory store (conditional writes and metadata as S3's).
    ///
    /// # Panics
    /// When the store's runtime cannot start.
    pub fn in_memory() -> Self {
        let raw: Arc<dyn object_store::ObjectStore> =
            Arc::new(object_store::memory::InMemory::new());
        let prefix = object_store::path::Path::from("checkpoints");
        let store = ObjectCheckpointStore::new(raw.clone(), prefix, "memory://checkpoints")
            .expect("the store");
        Self::with(store, raw)
    }

    /// A store at `url` configured with `options` (see [`ObjectCheckpointStore::from_url_with`]), with
    /// a second client for the damage.
    ///
    /// # Panics
    /// When the URL is refused.
    pub fn at_url(url: &str, options: &[(&str, &str)]) -> Self {
        let store = ObjectCheckpointStore::from_url_with(url, options).expect("the store");
        let (raw, _, _) =
            ObjectCheckpointStore::open_url_with(url, options).expect("a second client");
        Self::with(store, raw)
    }

    fn with(store: ObjectCheckpointStore, raw: Arc<dyn object_store::ObjectStore>) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the damage");
        ObjectStoreUnderTest {
            store: Arc::new(store),
            raw,
            runtime,
        }
    }

    fn put(&self, path: &object_store::path::Path, bytes: Vec<u8>) {
        use object_store::ObjectStoreExt;
        self.runtime
            .block_on(self.raw.put(path, bytes.into()))
            .unwrap_or_else(|err| panic!("write {path}: {err}"));
    }
}

impl StoreUnderTest for ObjectStoreUnderTest {
    fn store(&self) -> Arc<dyn CheckpointStore> {
        self.store.clone()
    }

    fn damage_file(&self, manifest: &Manifest, file: &ManifestFile) {
        let len = usize::try_from(file.size).expect("a small file");
        self.put(&self.store.blob_path(manifest, file), vec![b'!'; len]);
    }

    fn remove_file(&self, manifest: &Manifest, file: &ManifestFile) {
        use object_store::ObjectStoreExt;
        let path = self.store.blob_path(manifest, file);
        self.runtime
            .block_on(self.raw.delete(&path))
            .unwrap_or_else(|err| panic!("delete {path}: {err}"));
    }

    fn plant(&self, manifest: &Manifest, files: &[(&ManifestFile, &[u8])]) {
        for (file, bytes) in files {
            self.put(&self.store.blob_path(manifest, file), bytes.to_vec());
        }
        self.put(
            &self.store.manifest_path(manifest),
            serde_json::to_vec(manifest).expect("json"),
        );
    }
}
