//! The object store's failures, on a real S3 server (SeaweedFS) and through the harness's TCP proxy:
//! refused credentials and a missing bucket are one clear error naming the store (never "no
//! checkpoint"); a connection cut mid-upload, a store that hangs past the request timeout and `503
//! SlowDown` answers are retried with backoff; and whatever happens, no checkpoint is published that is
//! not whole.

// A test: helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use integration_tests::{FaultProxy, S3Server};
use processor::ProcessorError;
use processor::checkpoint::{CheckpointStore, ObjectCheckpointStore};

fn store(url: &str, options: &[(&'static str, String)]) -> ObjectCheckpointStore {
    let options: Vec<(&str, &str)> = options.iter().map(|(k, v)| (*k, v.as_str())).collect();
    ObjectCheckpointStore::from_url_with(url, &options).expect("the store")
}

fn snapshot(dir: &Path, big: usize) -> PathBuf {
    let snapshot = dir.join("snap");
    std::fs::create_dir_all(&snapshot).unwrap();
    let table: Vec<u8> = (0..big).map(|i| (i % 251) as u8).collect();
    std::fs::write(snapshot.join("000009.sst"), table).unwrap();
    std::fs::write(snapshot.join("CURRENT"), b"MANIFEST-000005\n").unwrap();
    snapshot
}

/// The whole error chain, for matching on what the server said.
fn chain(err: &ProcessorError) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(" / ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[test]
fn refused_credentials_are_one_clear_error_and_nothing_is_written() {
    let server = S3Server::start_with_credentials();
    let mut wrong = server.options();
    for (key, value) in &mut wrong {
        if *key == "aws_secret_access_key" {
            *value = "not-the-secret".to_owned();
        }
    }
    let url = server.url("refused");
    let refused = store(&url, &wrong);
    let dir = tempfile::tempdir().unwrap();
    let err = refused
        .upload("t", 0, &snapshot(dir.path(), 1024), 10, 1)
        .unwrap_err();
    let text = chain(&err);
    assert!(
        matches!(err, ProcessorError::ObjectStore { .. })
            && text.contains("s3://checkpoints/refused"),
        "one error naming the store: {text}"
    );
    assert!(
        text.contains("403") || text.contains("AccessDenied") || text.contains("Signature"),
        "the server's refusal is in the message: {text}"
    );
    assert!(
        !text.contains("not-the-secret"),
        "no secret in the message: {text}"
    );
    assert!(
        refused.latest_valid("t", 0).is_err(),
        "a store that refuses reads is an error, never \"no checkpoint\""
    );
    let allowed = store(&url, &server.options());
    assert_eq!(
        allowed.latest_valid("t", 0).unwrap().0,
        None,
        "nothing was written"
    );
    allowed
        .upload("t", 0, &snapshot(dir.path(), 1024), 10, 1)
        .expect("the right key pair is accepted");
}

#[test]
fn a_missing_bucket_is_an_error_never_an_empty_store() {
    let server = S3Server::start_new();
    let missing = store("s3://no-such-bucket/x", &server.options());
    let dir = tempfile::tempdir().unwrap();
    for (what, outcome) in [
        ("latest_valid", missing.latest_valid("t", 0).map(|_| ())),
        ("partitions", missing.partitions("t").map(|_| ())),
        (
            "upload",
            missing
                .upload("t", 0, &snapshot(dir.path(), 10), 1, 1)
                .map(|_| ()),
        ),
    ] {
        let err = outcome.expect_err(what);
        let text = chain(&err);
        assert!(
            matches!(err, ProcessorError::ObjectStore { .. })
                && text.contains("s3://no-such-bucket/x"),
            "{what}: one error naming the store: {text}"
        );
    }
}

/// Uploads `snapshot` through `proxy` on a thread while `fault` acts on the proxy, then checks that
/// the store holds either that checkpoint whole (it restores byte for byte) or none.
fn upload_through_a_fault(
    server: &S3Server,
    proxy: &FaultProxy,
    options: &[(&'static str, &'static str)],
    fault: impl FnOnce(),
) -> Result<(), ProcessorError> {
    let mut through = server.options_for(&format!("http://127.0.0.1:{}", proxy.port()));
    through.extend(options.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let url = server.url(&format!("fault-{}", proxy.port()));
    let uploader = Arc::new(store(&url, &through));
    let dir = tempfile::tempdir().unwrap();
    let snap = snapshot(dir.path(), 40 << 20);
    let upload = {
        let (uploader, snap) = (uploader.clone(), snap.clone());
        std::thread::spawn(move || uploader.upload("t", 0, &snap, 10, 1).map(|_| ()))
    };
    fault();
    let outcome = upload.join().unwrap();
    let reader = store(&url, &server.options());
    match reader.latest_valid("t", 0).unwrap() {
        (Some(manifest), _) => {
            assert!(
                outcome.is_ok(),
                "a checkpoint is published only by an upload that succeeded"
            );
            let restored = dir.path().join("restored");
            reader.restore(&manifest, &restored).unwrap();
            for name in ["000009.sst", "CURRENT"] {
                assert_eq!(
                    std::fs::read(restored.join(name)).unwrap(),
                    std::fs::read(snap.join(name)).unwrap(),
                    "{name} restored byte for byte"
                );
            }
        }
        (None, skipped) => {
            assert!(
                outcome.is_err(),
                "an upload that succeeded published its checkpoint"
            );
            assert!(
                skipped.is_empty(),
                "nothing incomplete is visible: {skipped:?}"
            );
        }
    }
    outcome
}

fn wait_for_bytes(proxy: &FaultProxy, bytes: u64) {
    let started = std::time::Instant::now();
    while proxy.forwarded_bytes() < bytes && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_connection_cut_mid_upload_is_retried_and_the_checkpoint_is_whole() {
    let server = S3Server::start_new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let proxy = runtime.block_on(FaultProxy::start(server.s3_port()));
    let outcome = upload_through_a_fault(&server, &proxy, &[], || {
        wait_for_bytes(&proxy, 8 << 20);
        proxy.cut();
    });
    outcome.expect("a cut connection is retried on a new one");
}

#[test]
fn a_store_that_hangs_past_the_request_timeout_is_retried() {
    let server = S3Server::start_new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let proxy = runtime.block_on(FaultProxy::start(server.s3_port()));
    let outcome = upload_through_a_fault(&server, &proxy, &[("timeout", "2s")], || {
        wait_for_bytes(&proxy, 4 << 20);
        proxy.freeze();
        std::thread::sleep(Duration::from_secs(5));
        proxy.pass();
    });
    outcome.expect("a request that timed out is retried");
}

#[test]
fn a_store_that_never_answers_fails_the_upload_within_its_retry_bound() {
    let server = S3Server::start_new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let proxy = runtime.block_on(FaultProxy::start(server.s3_port()));
    let outcome = upload_through_a_fault(
        &server,
        &proxy,
        &[
            ("timeout", "1s"),
            ("retry_timeout", "4"),
            ("max_retries", "3"),
        ],
        || {
            wait_for_bytes(&proxy, 4 << 20);
            proxy.freeze();
        },
    );
    proxy.pass();
    let err = outcome.expect_err("a store that never answers fails the upload");
    assert!(
        matches!(err, ProcessorError::ObjectStore { .. }),
        "{}",
        chain(&err)
    );
}

/// An S3 endpoint that answers every request `503 Slow Down` (S3's throttling answer); counts them.
fn slow_down_endpoint() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            counted.fetch_add(1, Ordering::SeqCst);
            let body = "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
            let _ = write!(
                stream,
                "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, requests)
}

#[test]
fn slow_down_answers_are_retried_with_backoff_then_one_clear_error() {
    let (port, requests) = slow_down_endpoint();
    let options: Vec<(&'static str, String)> = vec![
        ("aws_endpoint", format!("http://127.0.0.1:{port}")),
        ("aws_allow_http", "true".to_owned()),
        ("aws_region", "us-east-1".to_owned()),
        ("aws_access_key_id", "k".to_owned()),
        ("aws_secret_access_key", "s".to_owned()),
        ("max_retries", "3".to_owned()),
        ("retry_timeout", "30".to_owned()),
    ];
    let throttled = store("s3://checkpoints/throttled", &options);
    let dir = tempfile::tempdir().unwrap();
    let err = throttled
        .upload("t", 0, &snapshot(dir.path(), 10), 1, 1)
        .unwrap_err();
    let text = chain(&err);
    assert!(matches!(err, ProcessorError::ObjectStore { .. }), "{text}");
    assert!(text.contains("503") || text.contains("SlowDown"), "{text}");
    assert_eq!(
        requests.load(Ordering::SeqCst),
        4,
        "the first request and its 3 retries, then the error: {text}"
    );
}
