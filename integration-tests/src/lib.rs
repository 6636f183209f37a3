//! Real-server fixtures shared by every integration test and benchmark: redis-server, PostgreSQL and
//! Apache Kafka (as processes; no Kafka client lives here).
//!
//! Each fixture starts a real server process on a free loopback port in its own temp dir and kills it
//! (and removes the dir) on `Drop`, also when a test panics. PostgreSQL runs as the `postgres` user when the
//! tests run as root. A missing server binary is a loud failure,
//! never a silently skipped test. Fault injection: [`RedisServer::stop`] (SIGKILL),
//! [`RedisServer::pause`] (SIGSTOP), [`RedisServer::resume`] (SIGCONT) and [`RedisServer::start`] (same
//! port again), and [`FaultProxy`] between a client and any server: delay, freeze (a hung server) and cut.

pub mod adapters;
pub mod certificates;
pub mod clock_skew;
pub mod cpu;
pub mod etcd_server;
pub mod kafka_server;
pub mod postgres_server;
pub mod process;
pub mod proxy;
pub mod recipe_env;
pub mod redis_server;
pub mod torture;
pub mod verifier;

pub use certificates::Certificates;
pub use etcd_server::{EtcdCluster, EtcdMember};
pub use kafka_server::{KafkaCluster, KafkaNode, SecureListener};
pub use postgres_server::PostgresServer;
pub use proxy::{FaultProxy, ProxyMode};
pub use redis_server::{RedisCluster, RedisServer};

use std::net::TcpListener;
use std::path::PathBuf;

/// A port that was free on 127.0.0.1 a moment ago (bound to `:0`, then released).
///
/// # Panics
/// If no port can be bound at all.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind 127.0.0.1:0 to find a free port")
}

/// `n` distinct ports that were free on 127.0.0.1 a moment ago (all bound at once, then released, so
/// none repeats).
///
/// # Panics
/// If the ports cannot be bound.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port"))
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().expect("a bound address").port())
        .collect()
}

/// The full path of a server binary on `PATH` (or in the usual system dirs).
///
/// # Panics
/// With an install hint when it is missing: tests never pass without the server they need.
pub fn require_binary(name: &str, install_hint: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/local/bin", "/usr/bin", "/usr/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` not found: the integration tests need it ({install_hint}; scripts/test.sh installs it)")
        })
}

/// Installs a `tracing` subscriber driven by `RUST_LOG` (once per test binary; later calls are no-ops).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
