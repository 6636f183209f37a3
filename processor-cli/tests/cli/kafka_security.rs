//! The processor on a SASL_SSL listener (TLS with a CA of its own, SASL PLAIN), configured only through
//! the client-settings passthrough (`--kafka-config KEY=VALUE`): with the right password it processes the
//! topic and stops cleanly; with a wrong one it exits with one clear line; the password appears in no
//! log or error either way.

// A test: helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::support::{Proc, TOPIC, fails_with, offsets, processor, produce, wait_for};
use integration_tests::{KafkaCluster, SecureListener};
use nix::sys::signal::Signal;
use processor::dev::{Workload, admin};

const PARTITIONS: i32 = 2;

/// `processor run` alone on the secure listener with `password`, its log in `{root}/p1.log`.
fn run_args(secure: &SecureListener, root: &Path, password: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--brokers",
        &secure.address,
        "--topic",
        TOPIC,
        "--group",
        "procs",
        "--instance-id",
        "p1",
        "--single-instance",
        "--lock-url",
        "memory",
        "--create-checkpoint-dir",
        "--checkpoint-interval-secs",
        "0.5",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend([
        "--state-dir".to_owned(),
        root.join("state").display().to_string(),
    ]);
    args.extend([
        "--checkpoint-dir".to_owned(),
        root.join("checkpoints").display().to_string(),
    ]);
    for setting in [
        "security.protocol=SASL_SSL".to_owned(),
        "sasl.mechanism=PLAIN".to_owned(),
        format!("sasl.username={}", SecureListener::USERNAME),
        format!("sasl.password={password}"),
        format!("ssl.ca.location={}", secure.ca_location.display()),
    ] {
        args.extend(["--kafka-config".to_owned(), setting]);
    }
    args
}

#[test]
fn sasl_ssl_through_the_passthrough_works_and_a_wrong_password_is_one_clear_line() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let cluster = KafkaCluster::single_with_sasl_ssl();
    let plain = cluster.bootstrap_servers();
    let secure = cluster.secure_listener().unwrap().clone();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(admin::create_topic(&plain, TOPIC, PARTITIONS, 1, &[]))
        .unwrap();
    let workload = Workload {
        records: 2_000,
        keys: 20,
        seed: 9,
        partitions: PARTITIONS,
    };
    produce(&plain, &workload, 0..workload.records);

    // The right password: everything processed over TLS + SASL, then a clean stop.
    let log = std::fs::File::create(root.join("p1.log")).unwrap();
    let args = run_args(&secure, root, SecureListener::PASSWORD);
    let mut proc = Proc(
        processor(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_for(
        "the secure instance to process the topic",
        Duration::from_secs(60),
        root,
        || {
            let done = offsets(&root.join("checkpoints"));
            done.values().sum::<i64>() == 2_000
        },
    );
    proc.signal(Signal::SIGTERM);
    assert!(proc.wait_exit(Duration::from_secs(30)).success());
    let log = std::fs::read_to_string(root.join("p1.log")).unwrap();
    assert!(log.contains("partition started"), "{log}");
    assert!(
        !log.contains(SecureListener::PASSWORD),
        "the password is in the debug log"
    );

    // A wrong password: one clear line, a non-zero exit, and the password nowhere.
    let wrong = "wrong-Passw0rd-91c2";
    let args = run_args(&secure, &root.join("wrong"), wrong);
    let err = fails_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        err.to_lowercase().contains("authentication"),
        "the error does not say authentication failed: {err}"
    );
    assert!(!err.contains(wrong), "the password is in the error: {err}");
}
