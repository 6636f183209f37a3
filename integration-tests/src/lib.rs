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
pub mod s3_server;
pub mod torture;
pub mod verifier;

pub use certificates::Certificates;
pub use etcd_server::{EtcdCluster, EtcdMember};
pub use kafka_server::{KafkaCluster, KafkaNode, SecureListener};
pub use postgres_server::PostgresServer;
pub use proxy::{FaultProxy, ProxyMode};
pub use redis_server::{RedisCluster, RedisServer};
pub use s3_server::S3Server;

use std::net::TcpListener;
use std::path::PathBuf;

/// A port that was free on 127.0.0.1 a moment ago; see [`free_ports`].
///
/// # Panics
/// If no port can be bound at all.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct ports, each free on 127.0.0.1 a moment ago, for servers a test starts.
///
/// They are taken *below the kernel's ephemeral range* (`net.ipv4.ip_local_port_range`), one after
/// another from a process-wide cursor that starts at a place picked from the process id. A port the
/// kernel handed out for `:0` is in the ephemeral range, so between its release and the server's bind
/// any outgoing connection of any test may take it as its local port (a CI run lost an etcd member to
/// `bind: address already in use` that way); below that range only a listener asked for by number
/// can, and this cursor never gives the same number twice in one process.
///
/// # Panics
/// If no port in the range can be bound.
pub fn free_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| next_free_port()).collect()
}

fn next_free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CURSOR: AtomicU32 = AtomicU32::new(0);
    let (low, high) = fixed_port_range();
    let span = u32::from(high - low);
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let step = CURSOR.fetch_add(1, Ordering::Relaxed);
        let port = low + ((start + step) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 between {low} and {high}")
}

/// The ports test servers take: from 10 000 up to the start of the ephemeral range, or this lane's
/// slice of it when the test command runs suites side by side (see [`port_lane`]).
fn fixed_port_range() -> (u16, u16) {
    const LOW: u16 = 10_000;
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let high = ephemeral_start.max(LOW + 1_000);
    match port_lane() {
        Some((lane, lanes)) => {
            let width = (high - LOW) / lanes;
            let low = LOW + lane * width;
            (low, low + width)
        }
        None => (LOW, high),
    }
}

/// `TEST_PORT_LANE=i/n` (set by `scripts/test.sh` for each of the n lanes of suites it runs at once):
/// this process takes ports only from the i-th of n disjoint slices, so two test processes running
/// side by side never pick the same port, whatever their cursors. Unset or malformed: the whole range.
fn port_lane() -> Option<(u16, u16)> {
    let value = std::env::var("TEST_PORT_LANE").ok()?;
    let (lane, lanes) = value.split_once('/')?;
    let (lane, lanes) = (
        lane.trim().parse::<u16>().ok()?,
        lanes.trim().parse::<u16>().ok()?,
    );
    (lanes > 0 && lane < lanes).then_some((lane, lanes))
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
