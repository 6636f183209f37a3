//! Throwaway etcd members (Debian's `etcd-server`, v3.4): one ([`EtcdCluster::single`]) or three
//! ([`EtcdCluster::three`]), each a separate process on free loopback ports in its own temp dir, killed
//! on drop. Elections are tuned short (20 ms heartbeats, 200 ms election timeout) so a killed leader is
//! replaced within a second. Fault injection per member: [`EtcdMember::kill`], [`EtcdMember::start`]
//! (same ports and data), [`EtcdMember::pause`] (SIGSTOP) and [`EtcdMember::resume`].

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::process::ServerProcess;
use crate::{Certificates, free_ports, require_binary};

const READY_WITHIN: Duration = Duration::from_secs(30);

/// One etcd member.
pub struct EtcdMember {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `/health` and `/metrics`, also when clients speak TLS.
    metrics_port: u16,
    tls: Option<Certificates>,
    /// More command-line flags for every start.
    extra_args: Vec<String>,
    dir: PathBuf,
    initial_cluster: String,
    binary: PathBuf,
    process: ServerProcess,
}

impl EtcdMember {
    /// The member's client address, `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The member's client port on loopback.
    pub fn port(&self) -> u16 {
        self.client_port
    }

    /// The member's name (`m1`, `m2`, …).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The running process's id (for its CPU use).
    pub fn pid(&self) -> Option<u32> {
        self.process.child().as_ref().map(std::process::Child::id)
    }

    /// The member's Prometheus text (`/metrics` on its plain-HTTP metrics port); `None` when it does
    /// not answer.
    pub fn metrics(&self) -> Option<String> {
        http_get(self.metrics_port, "/metrics")
    }

    fn spawn(&self, state: &str) {
        if self.process.is_running() {
            return;
        }
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .expect("open etcd.log");
        let err = log.try_clone().expect("clone etcd.log");
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let metrics = format!("http://127.0.0.1:{}", self.metrics_port);
        let mut command = Command::new(&self.binary);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(tls.server_cert())
                .arg("--key-file")
                .arg(tls.server_key())
                .arg("--trusted-ca-file")
                .arg(tls.ca())
                .arg("--client-cert-auth");
        }
        let spawned = command
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--listen-metrics-urls", &metrics])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", "state-tests"])
            .args(["--heartbeat-interval", "20", "--election-timeout", "200"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("spawn etcd");
        self.process.set(spawned);
    }

    fn wait_ready(&self) {
        let started = Instant::now();
        while started.elapsed() < READY_WITHIN {
            if healthy(self.metrics_port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "etcd member {} not healthy after {READY_WITHIN:?}; log:\n{}",
            self.name,
            std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
        );
    }

    /// Starts the member again after [`kill`](Self::kill) (same ports, same data) and waits until the
    /// cluster answers through it.
    pub fn start(&self) {
        self.spawn("existing");
        self.wait_ready();
    }

    /// Kills the member (SIGKILL) and waits for it to exit.
    pub fn kill(&self) {
        self.process.kill();
    }

    /// Freezes the member with SIGSTOP.
    pub fn pause(&self) {
        self.process.signal(Signal::SIGSTOP);
    }

    /// Thaws a paused member.
    pub fn resume(&self) {
        self.process.signal(Signal::SIGCONT);
    }

    /// Whether this member is the cluster's leader now (its v3 status over the HTTP gateway names
    /// itself as the leader; plain-HTTP members only).
    pub fn is_leader(&self) -> bool {
        let Some(body) = http_request(self.client_port, "POST", "/v3/maintenance/status") else {
            return false;
        };
        let Ok(status) = serde_json::from_str::<serde_json::Value>(&body) else {
            return false;
        };
        let member = status.pointer("/header/member_id");
        member.is_some() && member == status.get("leader")
    }
}

/// An etcd cluster of one or three members.
pub struct EtcdCluster {
    members: Vec<EtcdMember>,
    tls: Option<Certificates>,
    _dir: TempDir,
}

impl EtcdCluster {
    /// One member.
    ///
    /// # Panics
    /// When `etcd` is missing or does not become healthy.
    pub fn single() -> Self {
        Self::start(1, false, &[])
    }

    /// One member started with more `flags` (e.g. `["--auth-token-ttl", "1"]`).
    ///
    /// # Panics
    /// As [`single`](Self::single).
    pub fn single_with_flags(flags: &[&str]) -> Self {
        Self::start(1, false, flags)
    }

    /// Three members (a majority of two).
    ///
    /// # Panics
    /// As [`single`](Self::single).
    pub fn three() -> Self {
        Self::start(3, false, &[])
    }

    /// One member that speaks only TLS to clients and requires a client certificate signed by its CA
    /// ([`certificates`](Self::certificates)); [`url`](Self::url) is then an `etcds://` URL with them.
    ///
    /// # Panics
    /// As [`single`](Self::single); when `openssl` is missing.
    pub fn single_with_tls() -> Self {
        Self::start(1, true, &[])
    }

    fn start(n: usize, tls: bool, flags: &[&str]) -> Self {
        let binary = require_binary("etcd", "apt-get install etcd-server");
        let dir = tempfile::Builder::new()
            .prefix("etcd-fixture-")
            .tempdir()
            .expect("create a temp dir for etcd");
        let ports = free_ports(3 * n);
        let tls = tls.then(|| Certificates::make(&dir.path().join("certificates")));
        let initial_cluster = (0..n)
            .map(|i| format!("m{}=http://127.0.0.1:{}", i + 1, ports[3 * i + 1]))
            .collect::<Vec<_>>()
            .join(",");
        let members: Vec<EtcdMember> = (0..n)
            .map(|i| {
                let member_dir = dir.path().join(format!("m{}", i + 1));
                std::fs::create_dir_all(&member_dir).expect("create the member dir");
                EtcdMember {
                    name: format!("m{}", i + 1),
                    client_port: ports[3 * i],
                    peer_port: ports[3 * i + 1],
                    metrics_port: ports[3 * i + 2],
                    tls: tls.clone(),
                    extra_args: flags.iter().map(|flag| (*flag).to_owned()).collect(),
                    dir: member_dir,
                    initial_cluster: initial_cluster.clone(),
                    binary: binary.clone(),
                    process: ServerProcess::default(),
                }
            })
            .collect();
        for member in &members {
            member.spawn("new");
        }
        for member in &members {
            member.wait_ready();
        }
        EtcdCluster {
            members,
            tls,
            _dir: dir,
        }
    }

    /// `etcd://h1:p1,h2:p2,…` with `prefix`; for a TLS cluster `etcds://…/prefix?ca=…&cert=…&key=…`.
    pub fn url(&self, prefix: &str) -> String {
        let hosts: Vec<String> = self.members.iter().map(EtcdMember::address).collect();
        let hosts = hosts.join(",");
        match &self.tls {
            None => format!("etcd://{hosts}/{prefix}"),
            Some(tls) => format!(
                "etcds://{hosts}/{prefix}?ca={}&cert={}&key={}",
                tls.ca().display(),
                tls.client_cert().display(),
                tls.client_key().display()
            ),
        }
    }

    /// How many leases the cluster holds now (`LeaseLeases` through the first member's JSON gateway).
    ///
    /// # Panics
    /// When the member does not answer (a TLS cluster's gateway is not reached this way).
    pub fn lease_count(&self) -> usize {
        let port = self.members[0].client_port;
        let body = http_request(port, "POST", "/v3/lease/leases")
            .unwrap_or_else(|| panic!("etcd on port {port} did not list its leases"));
        let listed: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|err| panic!("lease list {body:?}: {err}"));
        listed
            .get("leases")
            .and_then(serde_json::Value::as_array)
            .map_or(0, Vec::len)
    }

    /// The CA and certificates of a [`single_with_tls`](Self::single_with_tls) cluster.
    pub fn certificates(&self) -> Option<&Certificates> {
        self.tls.as_ref()
    }

    /// Member `i` (0-based).
    pub fn member(&self, i: usize) -> &EtcdMember {
        &self.members[i]
    }

    /// The current leader, if one is known.
    pub fn leader(&self) -> Option<&EtcdMember> {
        self.members.iter().find(|member| member.is_leader())
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are none (never, once started).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// `GET path` on the member's client port; the body when it answers 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    http_request(port, "GET", path)
}

/// `method path` (with an empty JSON body) on the member's client port; the body when it answers 200.
fn http_request(port: u16, method: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    stream
        .write_all(
            format!(
                "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
                 Content-Length: 2\r\n\r\n{{}}"
            )
            .as_bytes(),
        )
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200")
        .then(|| body.to_owned())
        .or_else(|| head.starts_with("HTTP/1.1 200").then(|| body.to_owned()))
}

/// Whether the member reports itself healthy (it has a leader and serves reads).
fn healthy(port: u16) -> bool {
    http_get(port, "/health").is_some_and(|body| body.contains("\"health\":\"true\""))
}
