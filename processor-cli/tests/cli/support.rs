//! Helpers of the multi-process tests: `processor` child processes (killed on drop), the broker they
//! share (the mock cluster in `processor dev-broker`, or a real Apache Kafka), producing, reading the
//! checkpointed offsets and what each instance's log says it owns.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use processor::dev::Workload;

pub const BIN: &str = env!("CARGO_BIN_EXE_processor");
pub const TOPIC: &str = "orders";
pub const PARTITIONS: i32 = 8;

/// A child process killed on drop (a failing test leaves nothing running).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.0.id()).unwrap());
        kill(pid, signal).unwrap();
    }

    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit in {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn processor(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args).env(
        "RUST_LOG",
        std::env::var("FLEET_TEST_LOG").unwrap_or_else(|_| "info".to_owned()),
    );
    command
}

/// The broker of the multi-process scenario: `processor dev-broker` (the mock cluster, in its own
/// process) by default, or a real Apache Kafka node with `PROCESSOR_TEST_BROKER=kafka`.
pub enum Broker {
    Dev(Proc),
    /// Held for its `Drop`, which stops the broker.
    Kafka(#[allow(dead_code)] integration_tests::KafkaCluster),
}

impl Broker {
    pub fn start() -> (Broker, String) {
        match std::env::var("PROCESSOR_TEST_BROKER").as_deref() {
            Ok("kafka") => {
                let cluster = integration_tests::KafkaCluster::single();
                let brokers = cluster.bootstrap_servers();
                tokio::runtime::Runtime::new()
                    .unwrap()
                    .block_on(processor::dev::admin::create_topic(
                        &brokers,
                        TOPIC,
                        PARTITIONS,
                        1,
                        &[],
                    ))
                    .unwrap();
                (Broker::Kafka(cluster), brokers)
            }
            Ok("mock") | Err(_) => {
                let (proc, brokers) = dev_broker();
                (Broker::Dev(proc), brokers)
            }
            Ok(other) => panic!("PROCESSOR_TEST_BROKER={other}: use `mock` or `kafka`"),
        }
    }

    /// Stops the broker; the dev broker must exit cleanly on SIGTERM.
    pub fn stop(self) {
        if let Broker::Dev(mut proc) = self {
            proc.signal(Signal::SIGTERM);
            assert!(proc.wait_exit(Duration::from_secs(10)).success());
        }
    }
}

/// `processor dev-broker` for the topic, and the bootstrap address it printed first.
pub fn dev_broker() -> (Proc, String) {
    dev_broker_with(&[])
}

/// [`dev_broker`] with `extra` flags (`--also-create clicks`, say).
pub fn dev_broker_with(extra: &[&str]) -> (Proc, String) {
    let mut broker = Proc(
        processor(&["dev-broker", "--topic", TOPIC])
            .args(["--partitions", &PARTITIONS.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut first_line = String::new();
    BufReader::new(broker.0.stdout.take().unwrap())
        .read_line(&mut first_line)
        .unwrap();
    (broker, first_line.trim().to_owned())
}

/// `processor run` as instance `id` of group `procs`, with `extra` flags; its log goes to
/// `{root}/{id}.log` (appended: a restarted instance continues the same log).
pub fn run_instance_with(
    id: &str,
    brokers: &str,
    redis: &str,
    root: &Path,
    extra: &[&str],
) -> Proc {
    let job = Job {
        topic: TOPIC,
        group: Some("procs"),
    };
    run_job_instance(&job, id, brokers, redis, root, extra)
}

/// Which job an instance runs: its topic, and its `--group` (`None`: the default group).
pub struct Job<'a> {
    pub topic: &'a str,
    pub group: Option<&'a str>,
}

impl Job<'_> {
    /// The group `processor state` reads: the job's, or the default one.
    pub fn group(&self) -> &str {
        self.group.unwrap_or("processor")
    }
}

/// Where a test fleet keeps its checkpoints.
#[derive(Debug, Clone)]
pub enum CheckpointsAt {
    /// `--checkpoint-dir` (created by the first instance).
    Dir(PathBuf),
    /// `--checkpoint-url`, with the environment that reaches the server (endpoint, keys).
    Url {
        url: String,
        env: Vec<(&'static str, String)>,
    },
}

impl CheckpointsAt {
    /// Adds the flags (and environment) naming this location to `command`.
    pub fn apply(&self, command: &mut Command) {
        match self {
            CheckpointsAt::Dir(dir) => {
                command.arg("--checkpoint-dir").arg(dir);
            }
            CheckpointsAt::Url { url, env } => {
                command
                    .arg("--checkpoint-url")
                    .arg(url)
                    .envs(env.iter().map(|(key, value)| (*key, value.as_str())));
            }
        }
    }
}

/// `processor run` of `job` as instance `id` (see [`run_instance_with`]).
pub fn run_job_instance(
    job: &Job<'_>,
    id: &str,
    brokers: &str,
    redis: &str,
    root: &Path,
    extra: &[&str],
) -> Proc {
    let at = CheckpointsAt::Dir(root.join("checkpoints"));
    run_job_instance_at(job, id, brokers, redis, root, extra, &at)
}

/// [`run_job_instance`] with its checkpoints `at`.
pub fn run_job_instance_at(
    job: &Job<'_>,
    id: &str,
    brokers: &str,
    redis: &str,
    root: &Path,
    extra: &[&str],
    at: &CheckpointsAt,
) -> Proc {
    let state_dir = root.join("state").join(id);
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(root.join(format!("{id}.log")))
        .unwrap();
    // No --partitions: the count comes from the brokers. Checkpoints every 0.5 s unless `extra` says.
    let interval: &[&str] = if extra.contains(&"--checkpoint-interval-secs") {
        &[]
    } else {
        &["--checkpoint-interval-secs", "0.5"]
    };
    let group: &[&str] = match job.group {
        Some(group) => &["--group", group],
        None => &[],
    };
    let mut command = processor(&["run", "--brokers", brokers, "--topic", job.topic]);
    command
        .args(group)
        .args(["--instance-id", id, "--lock-url", redis])
        .arg("--state-dir")
        .arg(&state_dir);
    at.apply(&mut command);
    if matches!(at, CheckpointsAt::Dir(_)) {
        command.arg("--create-checkpoint-dir");
    }
    let child = command
        .args(interval)
        .args(["--maintenance-interval-secs", "1", "--claim-ttl-secs", "2"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

pub fn produce(brokers: &str, workload: &Workload, range: std::ops::Range<u64>) {
    produce_to(brokers, TOPIC, workload, range);
}

/// [`produce`] into `topic`.
pub fn produce_to(brokers: &str, topic: &str, workload: &Workload, range: std::ops::Range<u64>) {
    let status = processor(&["produce", "--brokers", brokers, "--topic", topic])
        .args(["--partitions", &workload.partitions.to_string()])
        .args(["--records", &range.end.to_string()])
        .args(["--start-at", &range.start.to_string()])
        .args(["--keys", &workload.keys.to_string()])
        .args(["--seed", &workload.seed.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "produce failed");
}

/// The offset each partition's checkpoint reaches once all of `workload` is processed.
pub fn end_offsets(workload: &Workload) -> BTreeMap<i32, i64> {
    let mut ends = BTreeMap::new();
    for i in 0..workload.records {
        *ends.entry(workload.record(i).0).or_insert(0) += 1;
    }
    ends
}

/// `processor state offsets`: partition -> checkpointed offset.
pub fn offsets(checkpoint_dir: &Path) -> BTreeMap<i32, i64> {
    offsets_of(checkpoint_dir, TOPIC, "procs")
}

/// [`offsets`] of `topic` in fleet `group`.
pub fn offsets_of(checkpoint_dir: &Path, topic: &str, group: &str) -> BTreeMap<i32, i64> {
    offsets_at(
        &CheckpointsAt::Dir(checkpoint_dir.to_path_buf()),
        topic,
        group,
    )
}

/// The JSON lines `processor state {what}` prints for `topic` in fleet `group`, checkpoints `at`.
fn state_lines(what: &str, at: &CheckpointsAt, topic: &str, group: &str) -> Vec<serde_json::Value> {
    let mut command = processor(&["state", what, "--topic", topic, "--group", group]);
    at.apply(&mut command);
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "state {what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// [`offsets_of`] the checkpoints `at`.
pub fn offsets_at(at: &CheckpointsAt, topic: &str, group: &str) -> BTreeMap<i32, i64> {
    state_lines("offsets", at, topic, group)
        .into_iter()
        .map(|v| {
            (
                i32::try_from(v["partition"].as_i64().unwrap()).unwrap(),
                v["offset"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// The partitions `id` owns now, by its log: started since its process last joined the fleet, and
/// neither handed off nor ended since.
pub fn owned_by_log(root: &Path, id: &str) -> std::collections::BTreeSet<i32> {
    let log = std::fs::read_to_string(root.join(format!("{id}.log"))).unwrap_or_default();
    let mut owned = std::collections::BTreeSet::new();
    for line in log.lines() {
        let plain: String = line
            .split('\u{1b}')
            .map(|part| part.split_once('m').map_or(part, |(_, rest)| rest))
            .collect();
        // A restarted process (the log is appended to) starts owning nothing: a SIGKILLed one never
        // logged handing its partitions off.
        if plain.contains("joined the fleet") {
            owned.clear();
            continue;
        }
        let Some(partition) = plain
            .split_whitespace()
            .find_map(|word| word.strip_prefix("partition="))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if plain.contains("partition started") {
            owned.insert(partition);
        } else if plain.contains("partition handed off") || plain.contains("partition task ended") {
            owned.remove(&partition);
        }
    }
    owned
}

/// Whether `log` holds its keeper's report that a partition's claim was lost (`kept lock lost …
/// partition:…`): how an owner thawed inside a backend call whose deadline passed learns of its loss.
pub fn reports_a_lost_partition_claim(log: &str) -> bool {
    log.lines()
        .any(|line| line.contains("kept lock lost") && line.contains("partition:"))
}

pub fn wait_for(what: &str, within: Duration, logs: &Path, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() > deadline {
            let mut tails = String::new();
            for id in ["p1", "p2", "p3"] {
                let log =
                    std::fs::read_to_string(logs.join(format!("{id}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                tails.push_str(&format!(
                    "\n--- {id} ---\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
            panic!("timed out waiting for {what}{tails}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `processor` with `args`, which must fail at start (within 30 s): its stderr.
pub fn fails_with(args: &[&str]) -> String {
    // A mistake must be refused at start: a process still running after 30 s was not refused (killed, so
    // the test fails instead of hanging).
    let mut child = processor(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} was not refused: still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "{args:?}: no error message");
    stderr
}

/// A scratch directory for a multi-process test: removed when the test passes, kept (and named on
/// stderr) when it fails, for the instances' logs.
pub struct Scratch(Option<tempfile::TempDir>);

impl Scratch {
    pub fn new() -> Self {
        Scratch(Some(tempfile::tempdir().unwrap()))
    }

    pub fn path(&self) -> std::path::PathBuf {
        self.0.as_ref().unwrap().path().to_path_buf()
    }
}

impl Drop for Scratch {
    #[allow(clippy::print_stderr)]
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.0.take()
        {
            eprintln!(
                "the test failed: its files are kept in {}",
                dir.keep().display()
            );
        }
    }
}

/// Asserts that `processor state dump` of group `procs` in `checkpoint_dir` equals the recomputation of
/// `workload`: every key, with count, sum, min, max and the order-sensitive chain.
pub fn assert_state_is_exact(checkpoint_dir: &Path, workload: &Workload) {
    assert_state_is_exact_of(checkpoint_dir, workload, TOPIC, "procs");
}

/// [`assert_state_is_exact`] for `topic` in fleet `group`.
pub fn assert_state_is_exact_of(
    checkpoint_dir: &Path,
    workload: &Workload,
    topic: &str,
    group: &str,
) {
    let at = CheckpointsAt::Dir(checkpoint_dir.to_path_buf());
    assert_state_is_exact_at(&at, workload, topic, group);
}

/// [`assert_state_is_exact_of`] the checkpoints `at`.
pub fn assert_state_is_exact_at(at: &CheckpointsAt, workload: &Workload, topic: &str, group: &str) {
    let dumped: BTreeMap<String, serde_json::Value> = state_lines("dump", at, topic, group)
        .into_iter()
        .map(|v| (v["key"].as_str().unwrap().to_owned(), v))
        .collect();
    let expected = workload.expected();
    assert_eq!(dumped.len(), expected.len(), "keys");
    for (key, a) in &expected {
        let got = &dumped[key];
        assert_eq!(
            (
                got["count"].as_u64(),
                got["sum"].as_i64(),
                got["min"].as_i64(),
                got["max"].as_i64(),
                got["chain"].as_u64()
            ),
            (
                Some(a.count),
                Some(a.sum),
                Some(a.min),
                Some(a.max),
                Some(a.chain)
            ),
            "{topic} key {key}: lost, duplicated or reordered"
        );
    }
}

/// `GET http://{addr}{path}` (HTTP/1.1, one request per connection): the status code and the body.
/// Small on purpose: the tests need no HTTP client crate.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, path, &[]).map(|(code, _, body)| (code, body))
}

/// `GET http://{addr}{path}` with extra header lines (`Host` is `addr` unless one is given): the
/// status code, the response head (lower-cased) and the body.
pub fn http_request(
    addr: &str,
    path: &str,
    headers: &[&str],
) -> std::io::Result<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers
        .iter()
        .any(|header| header.to_ascii_lowercase().starts_with("host:"))
    {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let head = head.to_ascii_lowercase();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((code, head, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// `processor run` as instance `id` with `--http 127.0.0.1:{port}` and `extra` flags (see
/// [`run_instance_with`]).
pub fn run_instance_with_http(
    id: &str,
    brokers: &str,
    lock_url: &str,
    root: &Path,
    port: u16,
    extra: &[&str],
) -> Proc {
    let http = format!("127.0.0.1:{port}");
    let mut flags = vec!["--http", http.as_str()];
    flags.extend_from_slice(extra);
    run_instance_with(id, brokers, lock_url, root, &flags)
}
