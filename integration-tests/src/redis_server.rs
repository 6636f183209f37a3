//! Throwaway `redis-server` processes: one ([`RedisServer`]) or several ([`RedisCluster`], for Redlock).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::{Certificates, free_port, require_binary};

const READY_WITHIN: Duration = Duration::from_secs(10);

/// One `redis-server` on a free loopback port, in its own temp dir: no persistence, or (durable) an
/// append-only file synced on every write.
pub struct RedisServer {
    port: u16,
    dir: TempDir,
    binary: PathBuf,
    durable: bool,
    /// TLS only (no plain port), with these certificates; whether clients must present one.
    tls: Option<(Certificates, bool)>,
    child: Mutex<Option<Child>>,
}

impl RedisServer {
    /// Starts a server and waits until it answers `PING`.
    ///
    /// # Panics
    /// When `redis-server` is missing or does not become ready (its log is in the message).
    pub fn start_new() -> Self {
        Self::start_with(false, None)
    }

    /// As [`start_new`](Self::start_new), with `appendonly yes` and `appendfsync always` (the setting the
    /// guide recommends for locks): keys and the token counter survive a SIGKILL and restart.
    ///
    /// # Panics
    /// As [`start_new`](Self::start_new).
    pub fn start_durable() -> Self {
        Self::start_with(true, None)
    }

    /// A server that speaks only TLS, with a certificate for `127.0.0.1` signed by a throwaway CA
    /// ([`certificates`](Self::certificates)); with `client_auth`, clients must present a certificate
    /// signed by it too. [`url`](Self::url) is then `rediss://…?ca=…` (with `&cert=…&key=…`).
    ///
    /// # Panics
    /// As [`start_new`](Self::start_new); when `openssl` is missing.
    pub fn start_tls(client_auth: bool) -> Self {
        Self::start_with(false, Some(client_auth))
    }

    fn start_with(durable: bool, tls: Option<bool>) -> Self {
        let binary = require_binary("redis-server", "apt-get install redis-server");
        let dir = tempfile::Builder::new()
            .prefix("redis-fixture-")
            .tempdir()
            .expect("create a temp dir for redis-server");
        let tls = tls.map(|client_auth| {
            let certificates = Certificates::make(&dir.path().join("certificates"));
            (certificates, client_auth)
        });
        let server = RedisServer {
            port: free_port(),
            dir,
            tls,
            binary,
            durable,
            child: Mutex::new(None),
        };
        server.start();
        server
    }

    /// The server's `redis://127.0.0.1:PORT` URL; for a TLS server `rediss://127.0.0.1:PORT?ca=…`, with
    /// the client certificate when the server asks for one.
    pub fn url(&self) -> String {
        match &self.tls {
            None => format!("redis://127.0.0.1:{}", self.port),
            Some((certificates, client_auth)) => {
                let mut url = format!(
                    "rediss://127.0.0.1:{}?ca={}",
                    self.port,
                    certificates.ca().display()
                );
                if *client_auth {
                    url.push_str(&format!(
                        "&cert={}&key={}",
                        certificates.client_cert().display(),
                        certificates.client_key().display()
                    ));
                }
                url
            }
        }
    }

    /// The CA and certificates of a [`start_tls`](Self::start_tls) server.
    pub fn certificates(&self) -> Option<&Certificates> {
        self.tls.as_ref().map(|(certificates, _)| certificates)
    }

    /// The server's process id while it runs (for its CPU time: [`crate::cpu::cpu_seconds`]).
    pub fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(Child::id)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_else(|err| format!("(no log: {err})"))
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// (Re)starts the server on its port; a no-op when it runs already. Waits until it answers.
    ///
    /// # Panics
    /// When it does not become ready.
    pub fn start(&self) {
        let mut child = self.child();
        if child.is_some() {
            return;
        }
        let mut command = Command::new(&self.binary);
        match &self.tls {
            None => {
                command.args(["--port", &self.port.to_string()]);
            }
            Some((certificates, client_auth)) => {
                command
                    .args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(certificates.server_cert())
                    .arg("--tls-key-file")
                    .arg(certificates.server_key())
                    .arg("--tls-ca-cert-file")
                    .arg(certificates.ca())
                    .args([
                        "--tls-auth-clients",
                        if *client_auth { "yes" } else { "no" },
                    ]);
            }
        }
        let spawned = command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(match self.durable {
                true => ["--appendonly", "yes", "--appendfsync", "always"],
                false => ["--appendonly", "no", "--appendfsync", "everysec"],
            })
            .args(["--daemonize", "no", "--protected-mode", "yes"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        *child = Some(spawned);
        drop(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let started = Instant::now();
        while started.elapsed() < READY_WITHIN {
            let ready = match self.tls {
                None => ping(self.port),
                Some(_) => self.log().contains("Ready to accept connections"),
            };
            if ready {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server on port {} not ready after {READY_WITHIN:?}; log:\n{}",
            self.port,
            self.log()
        );
    }

    /// Kills the server (SIGKILL) and waits for it to exit: every key is lost unless it is durable.
    pub fn stop(&self) {
        if let Some(mut child) = self.child().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts the server on the same port.
    pub fn restart(&self) {
        self.stop();
        self.start();
    }

    /// Freezes the server with SIGSTOP: connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal(Signal::SIGSTOP);
    }

    /// Thaws a paused server with SIGCONT.
    pub fn resume(&self) {
        self.signal(Signal::SIGCONT);
    }

    fn signal(&self, signal: Signal) {
        let child = self.child();
        let child = child.as_ref().expect("the server is running");
        let pid = i32::try_from(child.id()).expect("pid fits in i32");
        kill(Pid::from_raw(pid), signal).expect("signal redis-server");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a Redis server answers `PING` on the port within a short timeout.
fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// Several independent `redis-server`s, as the nodes of a Redlock deployment.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `n` servers.
    pub fn new(n: usize) -> Self {
        RedisCluster {
            nodes: (0..n).map(|_| RedisServer::start_new()).collect(),
        }
    }

    /// Starts `n` durable servers (see [`RedisServer::start_durable`]).
    pub fn new_durable(n: usize) -> Self {
        RedisCluster {
            nodes: (0..n).map(|_| RedisServer::start_durable()).collect(),
        }
    }

    /// The nodes' URLs, in order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }

    /// How many nodes there are.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}
