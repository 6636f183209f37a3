//! A throwaway S3-compatible server: SeaweedFS (`weed server` with its filer and S3 gateway, Apache-2.0),
//! one process on free loopback ports in its own temp dir, killed on drop. `scripts/test.sh` builds the
//! `weed` binary once from the Go module proxy into `~/.cache/state-coordination/go-bin` (or set
//! `WEED_BIN`). It answers S3 about 2–3 s after its start and enforces `If-None-Match: *` and `If-Match`
//! on PUT, also under concurrent writers (`processor/tests/it/s3_server.rs` shows it).
//!
//! Without credentials configured it accepts any key pair; [`S3Server::start_with_credentials`] makes it
//! check them (for the "credentials refused" test). Fault injection: [`S3Server::kill`],
//! [`S3Server::start`] (same ports and data), [`S3Server::pause`] (SIGSTOP), [`S3Server::resume`].

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::free_ports;
use crate::process::ServerProcess;

const READY_WITHIN: Duration = Duration::from_secs(60);

/// The bucket every server is started with.
pub const BUCKET: &str = "checkpoints";

/// The key pair a server started with credentials accepts.
pub const ACCESS_KEY: &str = "test-access-key";
/// See [`ACCESS_KEY`].
pub const SECRET_KEY: &str = "test-secret-key";

/// One SeaweedFS server with an S3 gateway.
pub struct S3Server {
    dir: TempDir,
    binary: PathBuf,
    /// master, volume, filer, S3 — and their gRPC ports, in that order.
    ports: Vec<u16>,
    credentials: bool,
    process: ServerProcess,
}

/// The `weed` binary: `WEED_BIN`, else the test command's cache, else `PATH`.
///
/// # Panics
/// When there is none, with how to get it.
pub fn weed_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WEED_BIN") {
        return PathBuf::from(path);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    let cached = home.join(".cache/state-coordination/go-bin/weed");
    if cached.is_file() {
        return cached;
    }
    crate::require_binary(
        "weed",
        "SeaweedFS; `bash scripts/test.sh` builds it from the Go module proxy",
    )
}

impl S3Server {
    /// Starts a server that accepts any credentials, with the bucket [`BUCKET`].
    ///
    /// # Panics
    /// When `weed` is missing or the server does not answer in time (its log is in the message).
    pub fn start_new() -> Self {
        Self::start_with(false)
    }

    /// As [`start_new`](Self::start_new), but only the key pair [`ACCESS_KEY`]/[`SECRET_KEY`] is accepted.
    ///
    /// # Panics
    /// As [`start_new`](Self::start_new).
    pub fn start_with_credentials() -> Self {
        Self::start_with(true)
    }

    fn start_with(credentials: bool) -> Self {
        let binary = weed_binary();
        let dir = tempfile::Builder::new()
            .prefix("s3-server-")
            .tempdir()
            .expect("temp dir for the S3 server");
        std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
        if credentials {
            let config = serde_json::json!({
                "identities": [{
                    "name": "tests",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }]
            });
            std::fs::write(dir.path().join("s3.json"), config.to_string()).expect("s3.json");
        }
        let mut server = S3Server {
            dir,
            binary,
            ports: free_ports(8),
            credentials: false,
            process: ServerProcess::default(),
        };
        server.start();
        server.create_bucket(BUCKET);
        if credentials {
            // The bucket is made while anyone may (a bare PUT), then the server restarts checking keys.
            server.kill();
            server.credentials = true;
            server.start();
        }
        server
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port())
    }

    /// The S3 gateway's port.
    pub fn s3_port(&self) -> u16 {
        self.ports[3]
    }

    /// `s3://checkpoints/{prefix}`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The `object_store` options that reach this server (endpoint, plain HTTP, region, keys).
    pub fn options(&self) -> Vec<(&'static str, String)> {
        self.options_for(&self.endpoint())
    }

    /// As [`options`](Self::options), with another endpoint (a proxy in front of this server).
    pub fn options_for(&self, endpoint: &str) -> Vec<(&'static str, String)> {
        vec![
            ("aws_endpoint", endpoint.to_owned()),
            ("aws_allow_http", "true".to_owned()),
            ("aws_region", "us-east-1".to_owned()),
            ("aws_access_key_id", ACCESS_KEY.to_owned()),
            ("aws_secret_access_key", SECRET_KEY.to_owned()),
        ]
    }

    /// The same as environment variables, for a `processor` process.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        self.env_for(&self.endpoint())
    }

    /// As [`env`](Self::env), with another endpoint (a proxy in front of this server).
    pub fn env_for(&self, endpoint: &str) -> Vec<(&'static str, String)> {
        self.options_for(endpoint)
            .into_iter()
            .map(|(key, value)| {
                let name = match key {
                    "aws_endpoint" => "AWS_ENDPOINT_URL",
                    "aws_allow_http" => "AWS_ALLOW_HTTP",
                    "aws_region" => "AWS_REGION",
                    "aws_access_key_id" => "AWS_ACCESS_KEY_ID",
                    _ => "AWS_SECRET_ACCESS_KEY",
                };
                (name, value)
            })
            .collect()
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.process.child().as_ref().map(std::process::Child::id)
    }

    /// Starts the server (again, after [`kill`](Self::kill): same ports, same data) and waits until
    /// its S3 gateway answers.
    ///
    /// # Panics
    /// When it does not answer in time.
    pub fn start(&self) {
        if self.process.is_running() {
            return;
        }
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("weed.log"))
            .expect("open weed.log");
        let err = log.try_clone().expect("clone weed.log");
        let [
            master,
            volume,
            filer,
            s3,
            master_grpc,
            volume_grpc,
            filer_grpc,
            s3_grpc,
        ] = self.ports[..]
        else {
            unreachable!("eight ports")
        };
        let mut command = Command::new(&self.binary);
        command
            .arg("server")
            .arg(format!("-dir={}", self.dir.path().join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={master}"))
            .arg(format!("-master.port.grpc={master_grpc}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-volume.port.grpc={volume_grpc}"))
            .arg("-filer")
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-filer.port.grpc={filer_grpc}"))
            .arg("-s3")
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-s3.port.grpc={s3_grpc}"));
        if self.credentials {
            command.arg(format!(
                "-s3.config={}",
                self.dir.path().join("s3.json").display()
            ));
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("spawn weed");
        self.process.set(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let started = Instant::now();
        while started.elapsed() < READY_WITHIN {
            if http(self.s3_port(), "GET", "/").is_some_and(|status| status > 0) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "SeaweedFS S3 gateway not answering after {READY_WITHIN:?}; log:\n{}",
            self.log()
        );
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }

    /// Creates `bucket` (retried while the filer behind the gateway comes up), on a server that accepts
    /// any credentials.
    ///
    /// # Panics
    /// When it cannot be created within the start timeout.
    pub fn create_bucket(&self, bucket: &str) {
        let started = Instant::now();
        let mut last = None;
        while started.elapsed() < READY_WITHIN {
            let status = http(self.s3_port(), "PUT", &format!("/{bucket}"));
            if matches!(status, Some(200 | 409)) {
                return;
            }
            last = status;
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "bucket {bucket} not created (last status {last:?}); log:\n{}",
            self.log()
        );
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&self) {
        self.process.kill();
    }

    /// Freezes the server with SIGSTOP.
    pub fn pause(&self) {
        self.process.signal(Signal::SIGSTOP);
    }

    /// Thaws a paused server.
    pub fn resume(&self) {
        self.process.signal(Signal::SIGCONT);
    }
}

/// The status of a bare HTTP/1.1 request with an empty body, or `None` when nothing answers.
fn http(port: u16, method: &str, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 64];
    let read = stream.read(&mut head).ok()?;
    let line = std::str::from_utf8(&head[..read]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}
