//! [`CheckpointStore`] in object storage — Amazon S3 and S3-compatible servers, Google Cloud Storage,
//! Azure Blob Storage — through the `object_store` crate:
//!
//! ```text
//! {prefix}/{topic}/{partition}/files/{sha256}-{name}             content-addressed: each distinct file once
//! {prefix}/{topic}/{partition}/manifests/{token}-{offset}.json   written last, with `If-None-Match: *`
//! {prefix}/{topic}/{partition}/fence.json                        the newest publication: token and manifest
//! ```
//!
//! **Fencing at the store.** An upload reads `fence.json` first — the highest fencing token that
//! published, and its manifest — and stops at once if it is higher than its own. It publishes in two
//! conditional writes: its manifest is created (`If-None-Match: *`, [`PutMode::Create`]), then the fence
//! is replaced with `If-Match: <the ETag read as the upload began>` ([`PutMode::Update`]). A stale owner
//! that read the fence before a successor published, and resumes however much later, has that write
//! refused by the store itself (412 Precondition Failed): it reads the fence again, finds the higher
//! token, deletes its own manifest and fails with [`ProcessorError::StaleOwner`]. The lock-token fencing of the partition's
//! checkpoint record stays on top: the record names the checkpoint to restore, the fence keeps the
//! store's own view from going backwards (see the guide, §9, for which failure each layer covers). Every
//! refusal is logged at WARN and counted in `processor_checkpoint_publications_refused_total`.
//!
//! **Files.** Uploaded and downloaded `parallelism` at a time, large ones in parts (multipart uploads of
//! [`PART_BYTES`]); each object carries its SHA-256 as user metadata (`x-amz-meta-sha256` on S3), which
//! the cheap verification of [`latest_valid`](CheckpointStore::latest_valid) compares against the
//! manifest (a file overwritten by anyone but this code lacks it or differs), and every download is hashed
//! as it streams and refused on a mismatch.
//!
//! **One clock.** Retention's grace period is measured on the store's clock only: an object's
//! `last_modified` against the `last_modified` of a probe object the cleaner writes just before it decides,
//! never the host's clock. An upload does not refresh the objects it reuses (an object store has no
//! "touch"); what protects them is that uploads and retention of a partition hold its compaction lock,
//! and that an upload [`confirm`](CheckpointStore::confirm)s every file before the checkpoint is recorded
//! (a cleaner whose lock expired while it was paused cannot make a recorded checkpoint incomplete).
//!
//! In a few lines — here over `object_store`'s in-memory store; in production
//! `ObjectCheckpointStore::from_url("s3://my-bucket/processor")?` (or `gs://`, `az://`):
//!
//! ```
//! use std::sync::Arc;
//! use processor::checkpoint::object::object_store::{memory::InMemory, path::Path};
//! use processor::checkpoint::{CheckpointStore, ObjectCheckpointStore};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bucket = Arc::new(InMemory::new());
//! let store = ObjectCheckpointStore::new(bucket, Path::from("processor"), "memory://processor")?;
//! let snapshot = tempfile::tempdir()?; // a RocksDB checkpoint, in the processor
//! std::fs::write(snapshot.path().join("000007.sst"), b"a table")?;
//!
//! store.upload("orders", 3, snapshot.path(), 1_200, 7)?; // the owner, fencing token 7
//! store.upload("orders", 3, snapshot.path(), 1_500, 8)?; // its successor publishes ...
//! assert!(store.upload("orders", 3, snapshot.path(), 1_300, 7).is_err()); // ... the old owner cannot
//!
//! let (latest, _skipped) = store.latest_valid("orders", 3)?;
//! let latest = latest.expect("a checkpoint");
//! assert_eq!((latest.fencing_token, latest.next_offset), (8, 1_500));
//! let restored = tempfile::tempdir()?;
//! store.restore(&latest, &restored.path().join("orders-3"))?; // every file's SHA-256 checked
//! # Ok(()) }
//! ```
//!
//! **Requests** are retried with exponential backoff on 5xx answers (S3's `SlowDown` included),
//! timeouts and cut connections (`object_store`'s retry, bounded by [`RETRY_TIMEOUT`]); anything else —
//! credentials refused, a missing bucket — fails at once with [`ProcessorError::ObjectStore`] naming
//! the object and the operation.

use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig, UpdateVersion,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use tokio::io::AsyncWriteExt;

/// The `object_store` crate this store is built on: for [`ObjectCheckpointStore::new`] over a store of
/// your own.
pub use object_store;

use super::digests::{DigestCache, immutable};
use super::manifest::{Manifest, ManifestFile, valid_topic};
use super::{CheckpointStore, RestoreReport, UploadReport, snapshot_files, take_if_valid};
use crate::error::{ProcessorError, ProcessorResult};

/// Files at least this large are uploaded in parts of this size (S3's smallest part is 5 MiB).
pub const PART_BYTES: usize = 16 << 20;

/// Files uploaded or downloaded at once by default.
pub const DEFAULT_PARALLELISM: usize = 8;

/// How long one request is retried (with backoff) before it fails.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(60);

/// The user-metadata key holding each stored file's SHA-256.
const SHA256_KEY: &str = "sha256";

/// How often a publication re-reads the fence after another writer changed it between read and write.
const FENCE_ATTEMPTS: usize = 8;

/// Checkpoints in an object store (see the [module docs](self)).
pub struct ObjectCheckpointStore {
    inner: Arc<Inner>,
    io: IoRuntime,
}

impl std::fmt::Debug for ObjectCheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectCheckpointStore")
            .field("url", &self.inner.url)
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// `scheme://bucket/prefix`, for messages (never credentials: those come from the environment).
    url: String,
    digests: DigestCache,
    parallelism: usize,
    refused: AtomicU64,
}

/// The newest publication of a partition: what `fence.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Fence {
    token: u64,
    manifest: String,
}

/// The store's own runtime: the store's calls are synchronous (its callers sit on blocking threads) and
/// its requests need a runtime whatever thread calls. Shut down in the background when the store is
/// dropped, so dropping it never blocks an async caller.
struct IoRuntime(Option<tokio::runtime::Runtime>);

impl IoRuntime {
    fn new() -> ProcessorResult<Self> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("checkpoint-io")
            .enable_all()
            .build()
            .map(|runtime| IoRuntime(Some(runtime)))
            .map_err(ProcessorError::io("the checkpoint store's runtime"))
    }

    /// Runs `work` on the store's runtime and waits for it, from any thread.
    fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = ProcessorResult<T>> + Send + 'static,
    ) -> ProcessorResult<T> {
        let Some(runtime) = &self.0 else {
            return Err(ProcessorError::ShuttingDown {
                what: "use the checkpoint store",
            });
        };
        let handle = runtime.spawn(work);
        futures::executor::block_on(handle)
            .map_err(ProcessorError::task("a checkpoint store request"))?
    }
}

impl Drop for IoRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Installs rustls' `ring` crypto provider for the HTTPS clients when the application installed none
/// (as the Redis backend does): an application that wants another installs it before building a store.
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Request timeouts applied before the caller's options (a configuration key of every cloud's builder;
/// `with_client_options` would replace what the environment set, `AWS_ALLOW_HTTP` included).
const DEFAULT_OPTIONS: [(&str, &str); 2] = [("timeout", "30s"), ("connect_timeout", "5s")];

/// The retry policy: [`RETRY_TIMEOUT`] and 10 retries, or what the options `retry_timeout` (seconds)
/// and `max_retries` say; returns the other options, for the cloud's builder.
fn retry_config<'o>(
    url: &str,
    options: &'o [(&'o str, &'o str)],
) -> ProcessorResult<(RetryConfig, Vec<(&'o str, &'o str)>)> {
    let mut retry = RetryConfig {
        max_retries: 10,
        retry_timeout: RETRY_TIMEOUT,
        ..RetryConfig::default()
    };
    let mut rest = Vec::new();
    for &(key, value) in options {
        let bad = |what: &str| invalid_url(url, format!("option `{key}`: `{value}` is not {what}"));
        match key {
            "retry_timeout" => {
                let secs: f64 = value.parse().map_err(|_| bad("a number of seconds"))?;
                retry.retry_timeout =
                    Duration::try_from_secs_f64(secs).map_err(|_| bad("a number of seconds"))?;
            }
            "max_retries" => retry.max_retries = value.parse().map_err(|_| bad("a count"))?,
            _ => rest.push((key, value)),
        }
    }
    Ok((retry, rest))
}

fn invalid_url(url: &str, reason: impl std::fmt::Display) -> ProcessorError {
    ProcessorError::InvalidInput {
        what: "checkpoint url",
        reason: format!("`{url}`: {reason}"),
    }
}

impl ObjectCheckpointStore {
    /// A store at `url`: `s3://bucket/prefix` (Amazon S3 or an S3-compatible server), `gs://bucket/prefix`
    /// (Google Cloud Storage) or `az://container/prefix` (Azure Blob Storage; also `abfs://`,
    /// `azure://`). Credentials, region and endpoint come from the standard environment variables of
    /// each cloud — `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
    /// `AWS_ALLOW_HTTP`; `GOOGLE_SERVICE_ACCOUNT`/`GOOGLE_APPLICATION_CREDENTIALS`;
    /// `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, … — or the instance's metadata
    /// service (an EC2 instance role, a GKE/GCE service account, an Azure managed identity). They are
    /// never printed.
    ///
    /// # Errors
    /// [`ProcessorError::InvalidInput`] (`checkpoint url`) for another scheme, a missing bucket name or
    /// a configuration the cloud's builder refuses.
    pub fn from_url(url: &str) -> ProcessorResult<Self> {
        Self::from_url_with(url, &[])
    }

    /// As [`from_url`](Self::from_url), with configuration `options` applied over the environment's:
    /// the keys of `object_store`'s builders (`aws_endpoint`, `aws_allow_http`, `aws_region`,
    /// `google_service_account`, `azure_storage_account_name`, `timeout`, …), and `retry_timeout`
    /// (seconds a request is retried, [`RETRY_TIMEOUT`] by default) and `max_retries` (10).
    ///
    /// # Errors
    /// As [`from_url`](Self::from_url); an unknown key.
    pub fn from_url_with(url: &str, options: &[(&str, &str)]) -> ProcessorResult<Self> {
        let (store, prefix, described) = Self::open_url_with(url, options)?;
        Self::new(store, prefix, described)
    }

    /// The object store, the prefix and the printable form of `url`, as [`from_url`](Self::from_url)
    /// opens them: for tools and tests that read or damage the stored objects directly, on a client of
    /// their own.
    ///
    /// # Errors
    /// As [`from_url`](Self::from_url).
    pub fn open_url_with(
        url: &str,
        options: &[(&str, &str)],
    ) -> ProcessorResult<(Arc<dyn ObjectStore>, ObjectPath, String)> {
        fn configured<B, K: std::str::FromStr>(
            url: &str,
            builder: B,
            options: &[(&str, &str)],
            with: impl Fn(B, K, &str) -> B,
        ) -> ProcessorResult<B> {
            DEFAULT_OPTIONS
                .iter()
                .chain(options)
                .try_fold(builder, |builder, (key, value)| {
                    let parsed = key
                        .to_ascii_lowercase()
                        .parse::<K>()
                        .map_err(|_| invalid_url(url, format!("unknown option `{key}`")))?;
                    Ok(with(builder, parsed, value))
                })
        }
        let parsed = url::Url::parse(url).map_err(|err| invalid_url(url, err))?;
        let bucket = parsed
            .host_str()
            .filter(|bucket| !bucket.is_empty())
            .ok_or_else(|| invalid_url(url, "no bucket (write s3://bucket/prefix)"))?;
        let (retry, options) = retry_config(url, options)?;
        let options = &options[..];
        ensure_crypto_provider();
        let store: Arc<dyn ObjectStore> = match parsed.scheme() {
            "s3" | "s3a" => Arc::new(
                configured(
                    url,
                    object_store::aws::AmazonS3Builder::from_env(),
                    options,
                    |b, k: object_store::aws::AmazonS3ConfigKey, v| b.with_config(k, v),
                )?
                .with_bucket_name(bucket)
                .with_retry(retry.clone())
                .build()
                .map_err(|err| invalid_url(url, err))?,
            ),
            "gs" => Arc::new(
                configured(
                    url,
                    object_store::gcp::GoogleCloudStorageBuilder::from_env(),
                    options,
                    |b, k: object_store::gcp::GoogleConfigKey, v| b.with_config(k, v),
                )?
                .with_bucket_name(bucket)
                .with_retry(retry.clone())
                .build()
                .map_err(|err| invalid_url(url, err))?,
            ),
            "az" | "azure" | "abfs" | "abfss" => Arc::new(
                configured(
                    url,
                    object_store::azure::MicrosoftAzureBuilder::from_env(),
                    options,
                    |b, k: object_store::azure::AzureConfigKey, v| b.with_config(k, v),
                )?
                .with_url(url)
                .with_retry(retry.clone())
                .build()
                .map_err(|err| invalid_url(url, err))?,
            ),
            other => {
                return Err(invalid_url(
                    url,
                    format!(
                        "unknown scheme `{other}`: use s3://, gs:// or az:// (or --checkpoint-dir for a directory)"
                    ),
                ));
            }
        };
        let prefix = ObjectPath::parse(parsed.path().trim_matches('/'))
            .map_err(|err| invalid_url(url, format!("bad prefix: {err}")))?;
        let described = format!(
            "{}://{bucket}/{}",
            parsed.scheme(),
            parsed.path().trim_matches('/')
        );
        Ok((store, prefix, described))
    }

    /// A store over `store` under `prefix` (any `object_store` implementation: an in-memory one in
    /// tests, a store the application configured itself); `url` names it in messages.
    ///
    /// # Errors
    /// An I/O error when the store's runtime cannot be started.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
        url: impl Into<String>,
    ) -> ProcessorResult<Self> {
        Ok(ObjectCheckpointStore {
            inner: Arc::new(Inner {
                store,
                prefix,
                url: url.into().trim_end_matches('/').to_owned(),
                digests: DigestCache::default(),
                parallelism: DEFAULT_PARALLELISM,
                refused: AtomicU64::new(0),
            }),
            io: IoRuntime::new()?,
        })
    }

    /// Files uploaded or downloaded at once (at least 1; [`DEFAULT_PARALLELISM`] by default).
    #[must_use]
    pub fn with_parallelism(mut self, parallelism: usize) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.parallelism = parallelism.max(1);
        }
        self
    }

    /// Publications this store refused because a newer owner had published (see the
    /// [module docs](self)).
    pub fn refused_publications(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Where the store keeps `file` of `manifest`.
    pub fn blob_path(&self, manifest: &Manifest, file: &ManifestFile) -> ObjectPath {
        self.inner
            .files_dir(&manifest.topic, manifest.partition)
            .join(Manifest::blob_name(file))
    }

    /// Where the store keeps the manifest of `manifest`.
    pub fn manifest_path(&self, manifest: &Manifest) -> ObjectPath {
        self.inner.manifest_location(manifest)
    }

    /// Runs `work` on the store's runtime and waits for its answer.
    fn call<T: Send + 'static, F>(&self, work: impl FnOnce(Arc<Inner>) -> F) -> ProcessorResult<T>
    where
        F: Future<Output = ProcessorResult<T>> + Send + 'static,
    {
        self.io.run(work(self.inner.clone()))
    }
}

impl Inner {
    fn partition_dir(&self, topic: &str, partition: i32) -> ObjectPath {
        self.prefix.clone().join(topic).join(partition.to_string())
    }

    fn files_dir(&self, topic: &str, partition: i32) -> ObjectPath {
        self.partition_dir(topic, partition).join("files")
    }

    fn manifests_dir(&self, topic: &str, partition: i32) -> ObjectPath {
        self.partition_dir(topic, partition).join("manifests")
    }

    fn fence_path(&self, topic: &str, partition: i32) -> ObjectPath {
        self.partition_dir(topic, partition).join("fence.json")
    }

    /// `path` as a location a person can find: `s3://bucket/prefix/...`.
    fn location(&self, path: &ObjectPath) -> PathBuf {
        let relative = path
            .as_ref()
            .strip_prefix(self.prefix.as_ref())
            .unwrap_or(path.as_ref())
            .trim_start_matches('/');
        PathBuf::from(format!("{}/{relative}", self.url))
    }

    fn failed(
        &self,
        operation: &'static str,
        path: &ObjectPath,
    ) -> impl FnOnce(object_store::Error) -> ProcessorError {
        let location = self.location(path).display().to_string();
        move |source| ProcessorError::ObjectStore {
            operation,
            location,
            source: Box::new(source),
        }
    }

    fn corrupt(&self, path: &ObjectPath, reason: impl Into<String>) -> ProcessorError {
        ProcessorError::CorruptCheckpoint {
            path: self.location(path),
            reason: reason.into(),
        }
    }

    /// Names of the objects directly under `dir`, sorted.
    async fn names(
        &self,
        dir: &ObjectPath,
    ) -> ProcessorResult<Vec<(String, object_store::ObjectMeta)>> {
        let listed: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(dir))
            .try_collect()
            .await
            .map_err(self.failed("list", dir))?;
        let mut names: Vec<(String, object_store::ObjectMeta)> = listed
            .into_iter()
            .filter_map(|meta| {
                let name = meta.location.filename()?.to_owned();
                let direct = meta.location.prefix_match(dir)?.count() == 1;
                direct.then_some((name, meta))
            })
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(names)
    }

    /// Manifest names of the partition (`{id}.json`), oldest first.
    async fn manifest_names(&self, topic: &str, partition: i32) -> ProcessorResult<Vec<String>> {
        Ok(self
            .names(&self.manifests_dir(topic, partition))
            .await?
            .into_iter()
            .map(|(name, _)| name)
            .filter(|name| name.ends_with(".json"))
            .collect())
    }

    async fn read_manifest(
        &self,
        topic: &str,
        partition: i32,
        name: &str,
    ) -> ProcessorResult<Manifest> {
        let path = self.manifests_dir(topic, partition).join(name);
        let bytes = self
            .store
            .get(&path)
            .await
            .map_err(self.failed("read", &path))?
            .bytes()
            .await
            .map_err(self.failed("read", &path))?;
        let manifest = Manifest::decode(&bytes, &self.location(&path))?;
        if manifest.topic != topic || manifest.partition != partition {
            return Err(self.corrupt(&path, "the manifest is of another partition"));
        }
        Ok(manifest)
    }

    /// Every file of `manifest` is stored with its size and its SHA-256 (the digest the uploader stored
    /// with it): one metadata request per file, `parallelism` at a time.
    async fn verify(self: &Arc<Self>, manifest: &Manifest) -> ProcessorResult<()> {
        manifest
            .check_names()
            .map_err(|reason| self.corrupt(&self.manifest_location(manifest), reason))?;
        // Collected first: a stream over a borrowing closure is not `Send` for every lifetime.
        let checks: Vec<_> = manifest
            .files
            .iter()
            .map(|file| {
                let (this, files_dir, file) = (
                    Arc::clone(self),
                    self.files_dir(&manifest.topic, manifest.partition),
                    file.clone(),
                );
                async move { this.verify_file(&files_dir, &file).await }
            })
            .collect();
        futures::stream::iter(checks)
            .buffer_unordered(self.parallelism)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }

    fn manifest_location(&self, manifest: &Manifest) -> ObjectPath {
        self.manifests_dir(&manifest.topic, manifest.partition)
            .join(format!("{}.json", manifest.id()))
    }

    async fn verify_file(
        &self,
        files_dir: &ObjectPath,
        file: &ManifestFile,
    ) -> ProcessorResult<()> {
        let path = files_dir.clone().join(Manifest::blob_name(file));
        let head = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        let found = match self.store.get_opts(&path, head).await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(self.corrupt(&path, "file missing"));
            }
            Err(err) => return Err(self.failed("read the metadata of", &path)(err)),
        };
        if found.meta.size != file.size {
            return Err(self.corrupt(
                &path,
                format!("size {}, manifest says {}", found.meta.size, file.size),
            ));
        }
        match found
            .attributes
            .get(&Attribute::Metadata(SHA256_KEY.into()))
        {
            Some(sha) if sha.as_ref() == file.sha256 => Ok(()),
            Some(_) => Err(self.corrupt(&path, "checksum mismatch")),
            None => Err(self.corrupt(
                &path,
                "no stored checksum: the object was not written by a checkpoint upload",
            )),
        }
    }

    /// The fence of the partition and the version to replace it at, if there is one.
    async fn read_fence(
        &self,
        topic: &str,
        partition: i32,
    ) -> ProcessorResult<Option<(Fence, UpdateVersion)>> {
        let path = self.fence_path(topic, partition);
        let found = match self.store.get(&path).await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(err) => return Err(self.failed("read", &path)(err)),
        };
        let version = UpdateVersion {
            e_tag: found.meta.e_tag.clone(),
            version: found.meta.version.clone(),
        };
        let bytes = found.bytes().await.map_err(self.failed("read", &path))?;
        let fence: Fence = serde_json::from_slice(&bytes)
            .map_err(|err| self.corrupt(&path, format!("unreadable fence: {err}")))?;
        Ok(Some((fence, version)))
    }

    /// A publication refused because `highest` published: logged, counted, [`ProcessorError::StaleOwner`].
    fn refuse(
        &self,
        partition: i32,
        token: u64,
        highest: u64,
        how: &'static str,
    ) -> ProcessorError {
        self.refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("processor_checkpoint_publications_refused_total", "by" => how)
            .increment(1);
        tracing::warn!(
            partition,
            token,
            highest,
            by = how,
            "the checkpoint store refused a stale owner's publication: a newer owner published"
        );
        ProcessorError::StaleOwner {
            partition,
            token,
            highest,
        }
    }

    /// Moves the fence to `manifest` (see the [module docs](self)), conditional on the fence being as
    /// `read` when the upload began (`None`: there was none). The store refuses the write (412) when
    /// anyone published since: a higher token then refuses this publication; the same or a lower one (an
    /// earlier upload of this owner, a straggler refused meanwhile) is written over.
    async fn advance_fence(
        &self,
        manifest: &Manifest,
        read: Option<UpdateVersion>,
    ) -> ProcessorResult<()> {
        let (topic, partition, token) =
            (&manifest.topic, manifest.partition, manifest.fencing_token);
        let path = self.fence_path(topic, partition);
        let next = serde_json::to_vec(&Fence {
            token,
            manifest: manifest.id(),
        })
        .map_err(|err| ProcessorError::encode("a checkpoint fence", err))?;
        let mut expected = read;
        for _ in 0..FENCE_ATTEMPTS {
            let put = PutOptions {
                mode: expected.take().map_or(PutMode::Create, PutMode::Update),
                ..PutOptions::default()
            };
            match self
                .store
                .put_opts(&path, PutPayload::from(next.clone()), put)
                .await
            {
                Ok(_) => return Ok(()),
                // 412: someone published since the fence was read. Who?
                Err(
                    object_store::Error::Precondition { .. }
                    | object_store::Error::AlreadyExists { .. },
                ) => {
                    metrics::counter!("processor_checkpoint_fence_conflicts_total").increment(1);
                    match self.read_fence(topic, partition).await? {
                        Some((fence, _)) if fence.token > token => {
                            return Err(self.refuse(partition, token, fence.token, "precondition"));
                        }
                        Some((_, version)) => expected = Some(version),
                        None => expected = None,
                    }
                }
                Err(err) => return Err(self.failed("write", &path)(err)),
            }
        }
        Err(self.failed("write", &path)(object_store::Error::Generic {
            store: "checkpoint fence",
            source: format!("{FENCE_ATTEMPTS} conditional writes in a row lost to other writers")
                .into(),
        }))
    }

    async fn upload(
        self: Arc<Self>,
        topic: String,
        partition: i32,
        snapshot_dir: PathBuf,
        next_offset: i64,
        fencing_token: u64,
    ) -> ProcessorResult<UploadReport> {
        valid_topic(&topic)?;
        // The fence as the upload begins: the publication is conditional on it (If-Match).
        let fence = self.read_fence(&topic, partition).await?;
        if let Some((fence, _)) = &fence
            && fence.token > fencing_token
        {
            return Err(self.refuse(partition, fencing_token, fence.token, "fence"));
        }
        let files_dir = self.files_dir(&topic, partition);
        let stored: std::collections::HashMap<String, u64> = self
            .names(&files_dir)
            .await?
            .into_iter()
            .map(|(name, meta)| (name, meta.size))
            .collect();
        let local = snapshot_files(&snapshot_dir)?;
        let uploads = futures::stream::iter(local)
            .map(|(name, path)| {
                let (this, files_dir, stored) = (&self, &files_dir, &stored);
                async move {
                    let (size, sha256, hashed) = {
                        let (this, path, name) = (Arc::clone(this), path.clone(), name.clone());
                        tokio::task::spawn_blocking(move || this.digests.digest(&path, &name))
                            .await
                            .map_err(ProcessorError::task("hash a snapshot file"))??
                    };
                    let file = ManifestFile { name, size, sha256 };
                    let blob = files_dir.clone().join(Manifest::blob_name(&file));
                    let copied = if stored.get(blob.filename().unwrap_or_default()) == Some(&size) {
                        None
                    } else {
                        Some(this.put_file(&path, &blob, &file.sha256).await?)
                    };
                    Ok::<_, ProcessorError>((file, hashed, copied))
                }
            })
            .buffered(self.parallelism)
            .try_collect::<Vec<_>>()
            .await?;
        let report = UploadReport::of(&topic, partition, next_offset, fencing_token, uploads);
        self.publish(&report.manifest, fence.map(|(_, version)| version))
            .await?;
        report.log_published();
        Ok(report)
    }

    /// Writes the manifest (created, never overwriting another owner's) and then moves the fence to it;
    /// a refused fence takes the manifest back out.
    async fn publish(
        &self,
        manifest: &Manifest,
        fence_read: Option<UpdateVersion>,
    ) -> ProcessorResult<()> {
        let path = self.manifest_location(manifest);
        let bytes = serde_json::to_vec_pretty(manifest)
            .map_err(|err| ProcessorError::encode("a checkpoint manifest", err))?;
        let create = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from(bytes.clone()), create)
            .await
        {
            Ok(_) => {}
            // The same id is the same token and offset: this owner's own earlier upload of the same
            // state (a retry after a failed confirm), which it may replace.
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => {
                self.store
                    .put(&path, PutPayload::from(bytes))
                    .await
                    .map_err(self.failed("write", &path))?;
            }
            Err(err) => return Err(self.failed("write", &path)(err)),
        }
        if let Err(err) = self.advance_fence(manifest, fence_read).await {
            if matches!(err, ProcessorError::StaleOwner { .. }) {
                // Best effort: a manifest left behind has a lower token than the fence's, so it is never
                // taken for newer than the successor's, and retention removes it.
                let _ = self.store.delete(&path).await;
            }
            return Err(err);
        }
        Ok(())
    }

    /// Uploads the local file at `path` to `blob` with its digest as metadata; returns the bytes sent.
    async fn put_file(&self, path: &Path, blob: &ObjectPath, sha256: &str) -> ProcessorResult<u64> {
        let mut local = tokio::fs::File::open(path)
            .await
            .map_err(ProcessorError::io(path))?;
        let mut attributes = Attributes::new();
        attributes.insert(
            Attribute::Metadata(SHA256_KEY.into()),
            sha256.to_owned().into(),
        );
        let mut writer = BufWriter::with_capacity(self.store.clone(), blob.clone(), PART_BYTES)
            .with_attributes(attributes)
            .with_max_concurrency(2);
        // The writer's errors are the store's (an `io::Error` wrapping an `object_store::Error`), or the
        // snapshot file's read failing.
        let failed = |err: std::io::Error| {
            self.failed("upload", blob)(object_store::Error::Generic {
                store: "checkpoint upload",
                source: Box::new(err),
            })
        };
        let copied = match tokio::io::copy(&mut local, &mut writer).await {
            Ok(copied) => copied,
            Err(err) => {
                let _ = writer.abort().await;
                return Err(failed(err));
            }
        };
        writer.shutdown().await.map_err(failed)?;
        Ok(copied)
    }

    /// Downloads `file` of `manifest` to `target`, hashing it as it streams; a mismatch is corruption.
    async fn get_file(
        &self,
        files_dir: &ObjectPath,
        file: &ManifestFile,
        target: &Path,
    ) -> ProcessorResult<u64> {
        let blob = files_dir.clone().join(Manifest::blob_name(file));
        let found = match self.store.get(&blob).await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(self.corrupt(&blob, "file missing"));
            }
            Err(err) => return Err(self.failed("download", &blob)(err)),
        };
        // The file is written and hashed on a blocking thread of its own, in large writes, while the
        // download streams on: the async workers only move chunks (a write per small chunk through
        // `tokio::fs`, each a hop to the blocking pool, cost more than the hashing).
        let (chunks_tx, mut chunks_rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        let path = target.to_path_buf();
        let writer = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, String)> {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
            let (mut hasher, mut size) = (Sha256::new(), 0u64);
            while let Some(chunk) = chunks_rx.blocking_recv() {
                hasher.update(&chunk);
                size += chunk.len() as u64;
                out.write_all(&chunk)?;
            }
            out.flush()?;
            Ok((size, hex::encode(hasher.finalize())))
        });
        let mut chunks = found.into_stream();
        let mut streamed = Ok(());
        while let Some(chunk) = chunks.next().await {
            match chunk {
                Ok(chunk) => {
                    if chunks_tx.send(chunk).await.is_err() {
                        break; // the writer failed: its error is below
                    }
                }
                Err(err) => {
                    streamed = Err(self.failed("download", &blob)(err));
                    break;
                }
            }
        }
        drop(chunks_tx);
        let written = writer
            .await
            .map_err(ProcessorError::task("write a downloaded file"))?
            .map_err(ProcessorError::io(target));
        let (size, sha256) = match (streamed, written) {
            (Ok(()), Ok(written)) => written,
            (Err(err), _) | (Ok(()), Err(err)) => {
                let _ = tokio::fs::remove_file(target).await;
                return Err(err);
            }
        };
        if size != file.size || sha256 != file.sha256 {
            let _ = tokio::fs::remove_file(target).await;
            return Err(self.corrupt(&blob, "file differs from its digest in the manifest"));
        }
        Ok(size)
    }

    /// Restores `manifest` into `dest`, taking matching immutable files from `previous` when given.
    async fn restore(
        self: Arc<Self>,
        manifest: Manifest,
        dest: PathBuf,
        previous: Option<PathBuf>,
    ) -> ProcessorResult<RestoreReport> {
        valid_topic(&manifest.topic)?;
        manifest
            .check_names()
            .map_err(|reason| self.corrupt(&self.manifest_location(&manifest), reason))?;
        tokio::fs::create_dir_all(&dest)
            .await
            .map_err(ProcessorError::io(&dest))?;
        let files_dir = self.files_dir(&manifest.topic, manifest.partition);
        let copies: Vec<_> = manifest
            .files
            .iter()
            .map(|file| {
                let (this, files_dir, file) = (Arc::clone(&self), files_dir.clone(), file.clone());
                let target = dest.join(&file.name);
                let local = previous.as_ref().map(|previous| previous.join(&file.name));
                async move {
                    if let Some(local) = local
                        && this.reuse_local(&file, &local, &target).await?
                    {
                        return Ok::<_, ProcessorError>(None);
                    }
                    this.get_file(&files_dir, &file, &target).await.map(Some)
                }
            })
            .collect();
        let outcomes = futures::stream::iter(copies)
            .buffer_unordered(self.parallelism)
            .try_collect::<Vec<_>>()
            .await?;
        let mut report = RestoreReport::default();
        for outcome in outcomes {
            match outcome {
                Some(bytes) => {
                    report.copied_files += 1;
                    report.copied_bytes += bytes;
                }
                None => report.reused_files += 1,
            }
        }
        Ok(report)
    }

    /// Links (or copies) `local` to `target` when it is an immutable file with `file`'s digest.
    async fn reuse_local(
        self: &Arc<Self>,
        file: &ManifestFile,
        local: &Path,
        target: &Path,
    ) -> ProcessorResult<bool> {
        if !immutable(&file.name) || !local.is_file() {
            return Ok(false);
        }
        let (this, local, target, file) = (
            Arc::clone(self),
            local.to_path_buf(),
            target.to_path_buf(),
            file.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let (size, sha256, _) = this.digests.digest(&local, &file.name)?;
            if size != file.size || sha256 != file.sha256 {
                return Ok(false);
            }
            if std::fs::hard_link(&local, &target).is_err() {
                std::fs::copy(&local, &target).map_err(ProcessorError::io(&local))?;
            }
            Ok(true)
        })
        .await
        .map_err(ProcessorError::task("reuse a local file"))?
    }

    async fn latest_valid(
        self: Arc<Self>,
        topic: String,
        partition: i32,
    ) -> ProcessorResult<(Option<Manifest>, Vec<ProcessorError>)> {
        valid_topic(&topic)?;
        let mut skipped = Vec::new();
        for name in self.manifest_names(&topic, partition).await?.iter().rev() {
            let checked = match self.read_manifest(&topic, partition, name).await {
                Ok(manifest) => self.verify(&manifest).await.map(|()| manifest),
                Err(err) => Err(err),
            };
            if let Some(manifest) = take_if_valid(checked, &mut skipped, &topic, partition)? {
                return Ok((Some(manifest), skipped));
            }
        }
        Ok((None, skipped))
    }

    /// "Now" on the store's clock: the `last_modified` of a probe object written for it.
    async fn store_now(&self, dir: &ObjectPath) -> ProcessorResult<chrono::DateTime<chrono::Utc>> {
        let probe = dir
            .clone()
            .join(format!(".clock-probe-{:016x}", rand::random::<u64>()));
        self.store
            .put(&probe, PutPayload::from_static(b"now"))
            .await
            .map_err(self.failed("write", &probe))?;
        let now = self
            .store
            .head(&probe)
            .await
            .map_err(self.failed("read the metadata of", &probe));
        let _ = self.store.delete(&probe).await;
        Ok(now?.last_modified)
    }

    async fn retain(
        self: Arc<Self>,
        topic: String,
        partition: i32,
        keep: usize,
        grace: Duration,
        recorded: Option<String>,
    ) -> ProcessorResult<usize> {
        valid_topic(&topic)?;
        let names = self.manifest_names(&topic, partition).await?;
        // As the directory store: the newest `keep` valid ones, every damaged one newer than the oldest
        // of them, and the recorded one; a checkpoint that cannot be read at all stops the run.
        let (mut valid, mut kept_count) = (0, 0);
        let mut referenced = std::collections::HashSet::new();
        for name in names.iter().rev() {
            if valid >= keep.max(1) {
                break;
            }
            kept_count += 1;
            match self.read_manifest(&topic, partition, name).await {
                Ok(manifest) => {
                    referenced.extend(manifest.files.iter().map(Manifest::blob_name));
                    match self.verify(&manifest).await {
                        Ok(()) => valid += 1,
                        Err(ProcessorError::CorruptCheckpoint { .. }) => {}
                        Err(err) => return Err(err),
                    }
                }
                Err(ProcessorError::CorruptCheckpoint { .. }) => {}
                Err(err) => return Err(err),
            }
        }
        let recorded = recorded.map(|id| format!("{id}.json"));
        let old = &names[..names.len() - kept_count];
        let mut removed = 0;
        for name in old {
            if recorded.as_deref() == Some(name.as_str()) {
                if let Ok(manifest) = self.read_manifest(&topic, partition, name).await {
                    referenced.extend(manifest.files.iter().map(Manifest::blob_name));
                }
                continue;
            }
            let path = self.manifests_dir(&topic, partition).join(name.as_str());
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => removed += 1,
                Err(err) => return Err(self.failed("delete", &path)(err)),
            }
        }
        // The store's clock after the listing: a file written since is younger still.
        let files_dir = self.files_dir(&topic, partition);
        let now = self
            .store_now(&self.partition_dir(&topic, partition))
            .await?;
        let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
        for (name, meta) in self.names(&files_dir).await? {
            if referenced.contains(&name) || now.signed_duration_since(meta.last_modified) <= grace
            {
                continue;
            }
            match self.store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(err) => return Err(self.failed("delete", &meta.location)(err)),
            }
        }
        Ok(removed)
    }

    async fn partitions(self: Arc<Self>, topic: String) -> ProcessorResult<Vec<i32>> {
        valid_topic(&topic)?;
        let dir = self.prefix.clone().join(topic.as_str());
        let listed = self
            .store
            .list_with_delimiter(Some(&dir))
            .await
            .map_err(self.failed("list", &dir))?;
        let mut partitions: Vec<i32> = listed
            .common_prefixes
            .iter()
            .filter_map(|prefix| prefix.filename()?.parse().ok())
            .collect();
        partitions.sort_unstable();
        Ok(partitions)
    }
}

impl CheckpointStore for ObjectCheckpointStore {
    fn upload(
        &self,
        topic: &str,
        partition: i32,
        snapshot_dir: &Path,
        next_offset: i64,
        fencing_token: u64,
    ) -> ProcessorResult<UploadReport> {
        let (topic, snapshot_dir) = (topic.to_owned(), snapshot_dir.to_path_buf());
        self.call(|inner| inner.upload(topic, partition, snapshot_dir, next_offset, fencing_token))
    }

    fn latest_valid(
        &self,
        topic: &str,
        partition: i32,
    ) -> ProcessorResult<(Option<Manifest>, Vec<ProcessorError>)> {
        let topic = topic.to_owned();
        self.call(|inner| inner.latest_valid(topic, partition))
    }

    fn checkpoint(&self, topic: &str, partition: i32, id: &str) -> ProcessorResult<Manifest> {
        let (topic, name) = (topic.to_owned(), format!("{id}.json"));
        self.call(|inner| async move {
            valid_topic(&topic)?;
            let manifest = inner.read_manifest(&topic, partition, &name).await?;
            inner.verify(&manifest).await?;
            Ok(manifest)
        })
    }

    fn manifest(&self, topic: &str, partition: i32, id: &str) -> ProcessorResult<Manifest> {
        let (topic, name) = (topic.to_owned(), format!("{id}.json"));
        self.call(|inner| async move {
            valid_topic(&topic)?;
            inner.read_manifest(&topic, partition, &name).await
        })
    }

    fn confirm(&self, manifest: &Manifest) -> ProcessorResult<()> {
        let manifest = manifest.clone();
        self.call(|inner| async move {
            valid_topic(&manifest.topic)?;
            inner.verify(&manifest).await
        })
    }

    fn restore(&self, manifest: &Manifest, dest: &Path) -> ProcessorResult<()> {
        let (manifest, dest) = (manifest.clone(), dest.to_path_buf());
        self.call(|inner| inner.restore(manifest, dest, None))
            .map(|_| ())
    }

    fn restore_incremental(
        &self,
        manifest: &Manifest,
        dest: &Path,
        previous: &Path,
    ) -> ProcessorResult<RestoreReport> {
        let (manifest, dest, previous) =
            (manifest.clone(), dest.to_path_buf(), previous.to_path_buf());
        self.call(|inner| inner.restore(manifest, dest, Some(previous)))
    }

    fn retain(
        &self,
        topic: &str,
        partition: i32,
        keep: usize,
        grace: Duration,
        recorded: Option<&str>,
    ) -> ProcessorResult<usize> {
        let (topic, recorded) = (topic.to_owned(), recorded.map(str::to_owned));
        self.call(|inner| inner.retain(topic, partition, keep, grace, recorded))
    }

    fn partitions(&self, topic: &str) -> ProcessorResult<Vec<i32>> {
        let topic = topic.to_owned();
        self.call(|inner| inner.partitions(topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_memory() -> ObjectCheckpointStore {
        let raw: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        ObjectCheckpointStore::new(raw, ObjectPath::from("checkpoints"), "memory://checkpoints")
            .unwrap()
    }

    fn snapshot(dir: &Path, bytes: &[u8]) -> PathBuf {
        let snapshot = dir.join(format!("snap-{}", bytes.len()));
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(snapshot.join("000007.sst"), bytes).unwrap();
        snapshot
    }

    /// The paused uploader of the module docs, step by step: it reads the fence as its upload begins,
    /// a newer owner publishes meanwhile, and its own publication — conditional on what it read — is
    /// refused by the store (412), its manifest taken back out; the newer owner's stays the latest.
    #[test]
    fn a_publication_after_a_newer_owners_is_refused_by_the_conditional_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = in_memory();
        let older = store
            .upload("t", 0, &snapshot(dir.path(), b"first"), 10, 1)
            .unwrap()
            .manifest;
        let inner = store.inner.clone();
        let read_as_it_began = store
            .io
            .run(async move { inner.read_fence("t", 0).await })
            .unwrap()
            .map(|(fence, version)| {
                assert_eq!(fence.token, 1);
                version
            });
        let newer = store
            .upload("t", 0, &snapshot(dir.path(), b"the newer owner's"), 20, 2)
            .unwrap()
            .manifest;
        let late = Manifest {
            next_offset: 30,
            ..older
        };
        let (inner, published) = (store.inner.clone(), late.clone());
        let outcome = store
            .io
            .run(async move { inner.publish(&published, read_as_it_began).await });
        assert!(
            matches!(
                outcome,
                Err(ProcessorError::StaleOwner {
                    token: 1,
                    highest: 2,
                    ..
                })
            ),
            "the late publication must be refused: {outcome:?}"
        );
        assert_eq!(store.refused_publications(), 1);
        assert!(
            store.manifest("t", 0, &late.id()).is_err(),
            "the refused manifest is taken back out"
        );
        let (latest, _) = store.latest_valid("t", 0).unwrap();
        assert_eq!(latest.map(|m| m.id()), Some(newer.id()));
    }

    /// A restore whose download differs from the manifest's digest (an object replaced after the cheap
    /// verification) fails as corrupt and leaves no file with the wrong bytes behind.
    #[test]
    fn a_download_that_differs_from_its_digest_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = in_memory();
        let manifest = store
            .upload("t", 0, &snapshot(dir.path(), b"table"), 10, 1)
            .unwrap()
            .manifest;
        let (raw, path) = (
            store.inner.store.clone(),
            store.blob_path(&manifest, &manifest.files[0]),
        );
        store
            .io
            .run(async move {
                raw.put(&path, PutPayload::from_static(b"TABLE"))
                    .await
                    .map(|_| ())
                    .map_err(|err| ProcessorError::InvalidInput {
                        what: "test",
                        reason: err.to_string(),
                    })
            })
            .unwrap();
        let dest = dir.path().join("restored");
        let err = store.restore(&manifest, &dest).unwrap_err();
        assert!(
            matches!(err, ProcessorError::CorruptCheckpoint { .. }),
            "{err}"
        );
        assert!(!dest.join("000007.sst").exists());
    }

    #[test]
    fn urls_of_other_schemes_and_without_a_bucket_are_refused_by_name() {
        for (url, says) in [
            ("ftp://bucket/x", "unknown scheme `ftp`"),
            ("s3:///prefix", "no bucket"),
            ("not a url", "checkpoint url"),
        ] {
            let err = ObjectCheckpointStore::from_url(url).unwrap_err();
            assert!(err.to_string().contains(says), "{url}: {err}");
        }
    }
}
