//! Checkpoints in object storage beside the raw floor: a RocksDB partition of 2 M keys is snapshotted,
//! uploaded through `ObjectCheckpointStore` to a real S3 server (SeaweedFS on loopback, started here)
//! and restored from it — and, in the same run, the same files are put and fetched with `object_store`
//! alone (no digests, no manifest, no fence: the floor of moving those bytes through that client to
//! that server, with the same parallelism). Each figure is the median of its rounds, ours and the
//! floor's taken in turn.
//!
//! ```text
//! cargo bench -p fenced-processor --bench checkpoint_store             # 100 k and 2 M keys
//! cargo bench -p fenced-processor --bench checkpoint_store -- --quick  # 100 k keys
//! cargo test  -p fenced-processor --bench checkpoint_store             # a smoke run (the test command's)
//! ```
//!
//! Printed per size: the snapshot (the checkpoint's pause: RocksDB's hard-linked checkpoint, flat in
//! state size), and upload and restore time per GiB, ours and the floor's, and their ratio.

// Benchmark code: a failed step is a failed run, so helpers unwrap.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use processor::checkpoint::object::{DEFAULT_PARALLELISM, PART_BYTES};
use processor::checkpoint::{CheckpointStore, ObjectCheckpointStore};
use processor::store::rocksdb::RocksDbStores;
use processor::store::{PartitionStore, StateBatch};
use tokio::io::AsyncWriteExt;

struct Row {
    keys: u64,
    bytes: u64,
    files: usize,
    snapshot: Duration,
    upload: Duration,
    upload_floor: Duration,
    restore: Duration,
    restore_floor: Duration,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let smoke = !args.iter().any(|a| a == "--bench");
    let (sizes, rounds): (&[u64], usize) = if smoke {
        (&[20_000], 1)
    } else if quick {
        (&[100_000], 3)
    } else {
        (&[100_000, 2_000_000], 3)
    };
    let server = integration_tests::S3Server::start_new();
    let options = server.options();
    let options: Vec<(&str, &str)> = options.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (raw, _, _) = ObjectCheckpointStore::open_url_with(&server.url("floor"), &options).unwrap();
    // SeaweedFS grows its volumes at the first writes (seconds): not part of anyone's figure.
    runtime.block_on(async {
        for i in 0..16 {
            let warm = ObjectPath::from(format!("warm-up/{i}"));
            raw.put(&warm, vec![0u8; 1 << 20].into()).await.unwrap();
        }
    });
    println!(
        "checkpoints in object storage: SeaweedFS on loopback, {DEFAULT_PARALLELISM} files at a time, parts of {} MiB; {} cores; median of {rounds}",
        PART_BYTES >> 20,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut rows = Vec::new();
    for &keys in sizes {
        let scratch = tempfile::tempdir().unwrap();
        let (snapshot_dir, snapshot) = fill_and_snapshot(scratch.path(), keys);
        let files = local_files(&snapshot_dir);
        let bytes: u64 = files.iter().map(|(_, size)| size).sum();
        let (mut ours_up, mut floor_up, mut ours_down, mut floor_down) =
            (vec![], vec![], vec![], vec![]);
        for round in 0..rounds {
            // A fresh prefix each round: every upload copies every file (nothing to reuse).
            let ours = ObjectCheckpointStore::from_url_with(
                &server.url(&format!("ours-{keys}-{round}")),
                &options,
            )
            .unwrap();
            let started = Instant::now();
            let report = ours.upload("bench", 0, &snapshot_dir, 1, 1).unwrap();
            ours_up.push(started.elapsed());
            assert_eq!(report.copied_bytes, bytes);

            let prefix = ObjectPath::from(format!("floor/{keys}-{round}"));
            let started = Instant::now();
            runtime.block_on(put_all(&raw, &prefix, &files));
            floor_up.push(started.elapsed());

            let dest = scratch.path().join(format!("restored-{round}"));
            let started = Instant::now();
            ours.restore(&report.manifest, &dest).unwrap();
            ours_down.push(started.elapsed());
            std::fs::remove_dir_all(&dest).unwrap();

            let dest = scratch.path().join(format!("fetched-{round}"));
            std::fs::create_dir_all(&dest).unwrap();
            let started = Instant::now();
            runtime.block_on(get_all(&raw, &prefix, &files, &dest));
            floor_down.push(started.elapsed());
            std::fs::remove_dir_all(&dest).unwrap();
        }
        let row = Row {
            keys,
            bytes,
            files: files.len(),
            snapshot,
            upload: median(ours_up),
            upload_floor: median(floor_up),
            restore: median(ours_down),
            restore_floor: median(floor_down),
        };
        eprintln!(
            "{keys} keys: upload {:?} (floor {:?}), restore {:?} (floor {:?})",
            row.upload, row.upload_floor, row.restore, row.restore_floor
        );
        rows.push(row);
    }
    println!(
        "{:>10} {:>9} {:>6} {:>9} {:>12} {:>12} {:>7} {:>12} {:>12} {:>7}",
        "keys",
        "MiB",
        "files",
        "snapshot",
        "upload s/GiB",
        "floor s/GiB",
        "ratio",
        "restore s/GiB",
        "floor s/GiB",
        "ratio"
    );
    for row in &rows {
        let per_gib = |d: Duration| d.as_secs_f64() / (row.bytes as f64 / f64::from(1u32 << 30));
        println!(
            "{:>10} {:>9.1} {:>6} {:>7.1}ms {:>12.2} {:>12.2} {:>6.2}x {:>12.2} {:>12.2} {:>6.2}x",
            row.keys,
            row.bytes as f64 / f64::from(1u32 << 20),
            row.files,
            row.snapshot.as_secs_f64() * 1e3,
            per_gib(row.upload),
            per_gib(row.upload_floor),
            row.upload.as_secs_f64() / row.upload_floor.as_secs_f64(),
            per_gib(row.restore),
            per_gib(row.restore_floor),
            row.restore.as_secs_f64() / row.restore_floor.as_secs_f64(),
        );
    }
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// A RocksDB partition of `keys` keys (100-byte values that do not compress), and a snapshot of it;
/// returns the snapshot's directory and how long taking it took.
fn fill_and_snapshot(dir: &Path, keys: u64) -> (PathBuf, Duration) {
    let stores = RocksDbStores::new(64 << 20, 64 << 20);
    let db = stores.open(0, &dir.join("db")).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for chunk in (0..keys).collect::<Vec<_>>().chunks(10_000) {
        let mut batch = StateBatch::new(i64::try_from(*chunk.last().unwrap()).unwrap() + 1, 1);
        for key in chunk {
            let value: Vec<u8> = (0..100)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            batch.put(format!("key-{key:010}"), value);
        }
        db.apply(&batch).unwrap();
    }
    let snapshot = dir.join("snapshot");
    let started = Instant::now();
    db.snapshot_to(&snapshot).unwrap();
    (snapshot, started.elapsed())
}

fn local_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut files: Vec<(PathBuf, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let size = std::fs::metadata(&path).unwrap().len();
            (path, size)
        })
        .collect();
    files.sort();
    files
}

/// The floor of an upload: every file put under `prefix` as `object_store` puts it (multipart in parts
/// of the same size), the same number at a time.
async fn put_all(store: &Arc<dyn ObjectStore>, prefix: &ObjectPath, files: &[(PathBuf, u64)]) {
    let puts: Vec<_> = files
        .iter()
        .map(|(path, _)| {
            let (store, path) = (store.clone(), path.clone());
            let location = prefix
                .clone()
                .join(path.file_name().unwrap().to_str().unwrap());
            async move {
                let mut local = tokio::fs::File::open(&path).await.unwrap();
                let mut writer =
                    object_store::buffered::BufWriter::with_capacity(store, location, PART_BYTES)
                        .with_max_concurrency(2);
                tokio::io::copy(&mut local, &mut writer).await.unwrap();
                writer.shutdown().await.unwrap();
            }
        })
        .collect();
    futures::stream::iter(puts)
        .buffer_unordered(DEFAULT_PARALLELISM)
        .collect::<Vec<()>>()
        .await;
}

/// The floor of a restore: every file fetched and written, the same number at a time, unverified.
async fn get_all(
    store: &Arc<dyn ObjectStore>,
    prefix: &ObjectPath,
    files: &[(PathBuf, u64)],
    dest: &Path,
) {
    let gets: Vec<_> = files
        .iter()
        .map(|(path, _)| {
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            let (store, location, target) = (
                store.clone(),
                prefix.clone().join(name.as_str()),
                dest.join(&name),
            );
            async move {
                let mut out = tokio::fs::File::create(&target).await.unwrap();
                let mut chunks = store.get(&location).await.unwrap().into_stream();
                while let Some(chunk) = chunks.try_next().await.unwrap() {
                    out.write_all(&chunk).await.unwrap();
                }
                out.flush().await.unwrap();
            }
        })
        .collect();
    futures::stream::iter(gets)
        .buffer_unordered(DEFAULT_PARALLELISM)
        .collect::<Vec<()>>()
        .await;
}
