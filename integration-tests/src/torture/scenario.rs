//! One torture scenario — a backend, a fault, fenced or not — run end to end: start the servers (and
//! a separate `redis-server` for the fenced store), spawn the worker processes, inject the fault on a
//! schedule while they contend, wait for them, read the store's final counters, and hand the history
//! to the checker ([`super::checker`]). [`table`] formats the results.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::Rng;
use state::recipes::fenced::{FencedStore, RedisFencedStore};
use tokio::time::Instant;

use super::checker::{self, Verdict};
use super::history::{Event, HistoryWriter, monotonic_ns, read_dir};
use crate::clock_skew::skew_clock;
use crate::{EtcdCluster, FaultProxy, PostgresServer, RedisCluster, RedisServer};

/// The lock backends under torture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Backend {
    /// In-process locks: one worker process, its tasks contending.
    Memory,
    /// One durable `redis-server`.
    Redis,
    /// Redlock over three durable nodes.
    Redlock3,
    /// Redlock over five durable nodes.
    Redlock5,
    /// PostgreSQL, lease table.
    PostgresLease,
    /// PostgreSQL, session advisory locks.
    PostgresAdvisory,
    /// One etcd member.
    Etcd,
    /// Three etcd members.
    Etcd3,
}

impl Backend {
    /// Every backend.
    pub const ALL: [Backend; 8] = [
        Backend::Memory,
        Backend::Redis,
        Backend::Redlock3,
        Backend::Redlock5,
        Backend::PostgresLease,
        Backend::PostgresAdvisory,
        Backend::Etcd,
        Backend::Etcd3,
    ];

    /// The name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Memory => "in-process",
            Backend::Redis => "redis",
            Backend::Redlock3 => "redlock-3",
            Backend::Redlock5 => "redlock-5",
            Backend::PostgresLease => "postgres-lease",
            Backend::PostgresAdvisory => "postgres-advisory",
            Backend::Etcd => "etcd",
            Backend::Etcd3 => "etcd-3",
        }
    }

    /// The faults that apply to this backend.
    pub fn faults(self) -> &'static [Fault] {
        use Fault::*;
        match self {
            Backend::Memory => &[None],
            Backend::Redis => &[
                None,
                KillHolder,
                StopHolderPastTtl,
                RestartServer,
                FreezeClient,
                CutClient,
                DelayClient,
                ClockSkew,
            ],
            Backend::Redlock3 => &[
                KillHolder,
                StopHolderPastTtl,
                RestartMinority,
                RestartMajority,
                FreezeMinority,
                ClockSkew,
            ],
            Backend::Redlock5 => &[StopHolderPastTtl, RestartMinority, RestartMajority],
            Backend::PostgresLease => &[
                StopHolderPastTtl,
                RestartServer,
                TerminateSessions,
                FreezeClient,
                ClockSkew,
            ],
            Backend::PostgresAdvisory => &[KillHolder, StopHolderPastTtl, TerminateSessions],
            Backend::Etcd => &[KillHolder, StopHolderPastTtl, FreezeClient],
            Backend::Etcd3 => &[KillLeader],
        }
    }

    /// The lock TTL of a run: etcd leases count whole seconds.
    fn ttl(self) -> Duration {
        match self {
            Backend::Etcd | Backend::Etcd3 => Duration::from_secs(2),
            _ => Duration::from_secs(1),
        }
    }

    /// How long after its TTL a lock may still be held by the server (etcd's lease rounding and sweep).
    fn expiry_slack(self) -> Duration {
        match self {
            Backend::Etcd | Backend::Etcd3 => Duration::from_millis(1_500),
            _ => Duration::from_millis(300),
        }
    }
}

/// The faults a scenario injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// None: contention only.
    None,
    /// SIGKILL a random worker (a holder, most of the time) every second and start a new one.
    KillHolder,
    /// A worker stops itself (SIGSTOP) between its read and its write; it is continued after its TTL.
    StopHolderPastTtl,
    /// Kill the lock server (SIGKILL; PostgreSQL an immediate stop) and start it again (same data).
    RestartServer,
    /// Kill a minority of the Redlock nodes and start them again.
    RestartMinority,
    /// Kill a majority of the Redlock nodes (nothing can be granted meanwhile) and start them again.
    RestartMajority,
    /// Freeze a minority of the Redlock nodes (the proxy holds every byte) past the TTL.
    FreezeMinority,
    /// Freeze one worker's connections (its own proxy) past the TTL.
    FreezeClient,
    /// Cut one worker's connections.
    CutClient,
    /// Delay one worker's traffic by 200 ms for two seconds.
    DelayClient,
    /// Two workers run with their wall clocks an hour ahead and an hour behind (libfaketime).
    ClockSkew,
    /// `pg_terminate_backend` every worker session.
    TerminateSessions,
    /// SIGKILL the etcd leader and start it again.
    KillLeader,
}

impl Fault {
    /// The name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::None => "none (contention)",
            Fault::KillHolder => "SIGKILL holders",
            Fault::StopHolderPastTtl => "SIGSTOP holder past TTL",
            Fault::RestartServer => "server killed + restarted",
            Fault::RestartMinority => "minority nodes killed + restarted",
            Fault::RestartMajority => "majority nodes killed + restarted",
            Fault::FreezeMinority => "minority nodes frozen (proxy)",
            Fault::FreezeClient => "client frozen past TTL (proxy)",
            Fault::CutClient => "client connections cut (proxy)",
            Fault::DelayClient => "client +200 ms latency (proxy)",
            Fault::ClockSkew => "wall clocks ±1 h (libfaketime)",
            Fault::TerminateSessions => "pg_terminate_backend",
            Fault::KillLeader => "leader killed + restarted",
        }
    }

    /// Whether each worker needs a proxy of its own.
    fn per_worker_proxy(self) -> bool {
        matches!(
            self,
            Fault::FreezeClient | Fault::CutClient | Fault::DelayClient
        )
    }
}

/// One run to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scenario {
    /// The backend.
    pub backend: Backend,
    /// The fault.
    pub fault: Fault,
    /// Whether writes carry their real tokens (`false`: the negative control).
    pub fenced: bool,
}

impl Scenario {
    /// Every backend × its faults, fenced; then the negative control (Redis, a holder stopped past its
    /// TTL, fencing off), which must report violations.
    pub fn all() -> Vec<Scenario> {
        let mut all: Vec<Scenario> = Backend::ALL
            .iter()
            .flat_map(|&backend| {
                backend.faults().iter().map(move |&fault| Scenario {
                    backend,
                    fault,
                    fenced: true,
                })
            })
            .collect();
        all.push(Scenario::control());
        all
    }

    /// The negative control.
    pub fn control() -> Scenario {
        Scenario {
            backend: Backend::Redis,
            fault: Fault::StopHolderPastTtl,
            fenced: false,
        }
    }
}

/// How big a run is.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `torture` binary (its `worker` subcommand is a worker).
    pub binary: PathBuf,
    /// Worker processes (the in-process backend always runs one, with `processes × tasks` tasks).
    pub processes: u32,
    /// Tasks per process.
    pub tasks: u32,
    /// Contended resources.
    pub resources: u32,
    /// Hold between read and write.
    pub hold: Duration,
    /// How long the workers run.
    pub duration: Duration,
}

impl Settings {
    /// The test command's short mode: 3 processes × 2 tasks on 2 resources for 5 s.
    pub fn short(binary: impl Into<PathBuf>) -> Settings {
        Settings {
            binary: binary.into(),
            processes: 3,
            tasks: 2,
            resources: 2,
            hold: Duration::from_millis(3),
            duration: Duration::from_secs(5),
        }
    }
}

/// The outcome of one run.
#[derive(Debug, Clone)]
pub struct Row {
    /// What ran.
    pub scenario: Scenario,
    /// The checker's verdict.
    pub verdict: Verdict,
    /// Faults injected.
    pub faults: u32,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// The servers of one run.
struct Servers {
    /// The fenced store's own server (never faulted).
    store: RedisServer,
    redis: Option<RedisServer>,
    redlock: Option<RedisCluster>,
    /// One proxy per Redlock node (for freezes).
    node_proxies: Vec<FaultProxy>,
    postgres: Option<PostgresServer>,
    etcd: Option<EtcdCluster>,
}

impl Servers {
    async fn start(backend: Backend) -> Servers {
        let mut servers = Servers {
            store: RedisServer::start_new(),
            redis: None,
            redlock: None,
            node_proxies: Vec::new(),
            postgres: None,
            etcd: None,
        };
        match backend {
            Backend::Memory => {}
            Backend::Redis => servers.redis = Some(RedisServer::start_durable()),
            Backend::Redlock3 | Backend::Redlock5 => {
                let nodes = if backend == Backend::Redlock3 { 3 } else { 5 };
                let cluster = RedisCluster::new_durable(nodes);
                for i in 0..nodes {
                    servers
                        .node_proxies
                        .push(FaultProxy::start(cluster.node(i).port()).await);
                }
                servers.redlock = Some(cluster);
            }
            Backend::PostgresLease | Backend::PostgresAdvisory => {
                servers.postgres = Some(PostgresServer::start_new());
            }
            Backend::Etcd => servers.etcd = Some(EtcdCluster::single()),
            Backend::Etcd3 => servers.etcd = Some(EtcdCluster::three()),
        }
        servers
    }

    /// The port a single-server backend listens on (for a per-worker proxy).
    fn server_port(&self) -> Option<u16> {
        if let Some(redis) = &self.redis {
            return Some(redis.port());
        }
        if let Some(postgres) = &self.postgres {
            return Some(postgres.port());
        }
        self.etcd
            .as_ref()
            .filter(|etcd| etcd.len() == 1)
            .map(|etcd| etcd.member(0).port())
    }

    /// The lock URL, through `proxy_port` when given (single-server backends).
    fn lock_url(&self, backend: Backend, proxy_port: Option<u16>) -> String {
        match backend {
            Backend::Memory => "memory".to_owned(),
            Backend::Redis => {
                let port = proxy_port.or(self.server_port()).unwrap_or_default();
                format!("redis://127.0.0.1:{port}")
            }
            Backend::Redlock3 | Backend::Redlock5 => {
                let hosts: Vec<String> = self
                    .node_proxies
                    .iter()
                    .map(|proxy| format!("127.0.0.1:{}", proxy.port()))
                    .collect();
                format!("redlock://{}", hosts.join(","))
            }
            Backend::PostgresLease | Backend::PostgresAdvisory => {
                let port = proxy_port.or(self.server_port()).unwrap_or_default();
                format!("postgres://postgres@127.0.0.1:{port}/postgres")
            }
            Backend::Etcd | Backend::Etcd3 => match proxy_port {
                Some(port) => format!("etcd://127.0.0.1:{port}/torture"),
                None => self
                    .etcd
                    .as_ref()
                    .map(|etcd| etcd.url("torture"))
                    .unwrap_or_default(),
            },
        }
    }
}

/// A running worker process.
struct Worker {
    process: u32,
    child: Child,
    proxy: Option<FaultProxy>,
}

impl Worker {
    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX))
    }

    /// Whether the process is stopped (state `T` in `/proc/PID/stat`).
    fn is_stopped(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned))
            })
            .is_some_and(|state| state == "T")
    }
}

/// Everything a run needs to spawn workers.
struct Run<'a> {
    scenario: Scenario,
    settings: &'a Settings,
    servers: &'a Servers,
    dir: &'a Path,
    ends_at: Instant,
    next_process: u32,
}

impl Run<'_> {
    async fn spawn(&mut self, skew: Option<&str>, stop_self: bool) -> Worker {
        let process = self.next_process;
        self.next_process += 1;
        let backend = self.scenario.backend;
        let proxy = match (
            self.scenario.fault.per_worker_proxy(),
            self.servers.server_port(),
        ) {
            (true, Some(port)) => Some(FaultProxy::start(port).await),
            _ => None,
        };
        let lock_url = self
            .servers
            .lock_url(backend, proxy.as_ref().map(FaultProxy::port));
        let tasks = match backend {
            Backend::Memory => self.settings.tasks * self.settings.processes,
            _ => self.settings.tasks,
        };
        let remaining = self.ends_at.saturating_duration_since(Instant::now());
        let mut command = Command::new(&self.settings.binary);
        command
            .arg("worker")
            .args(["--lock-url", &lock_url])
            .args(["--store-url", &self.servers.store.url()])
            .args(["--process", &process.to_string()])
            .args(["--tasks", &tasks.to_string()])
            .args(["--resources", &self.settings.resources.to_string()])
            .args(["--ttl-ms", &backend.ttl().as_millis().to_string()])
            .args(["--hold-ms", &self.settings.hold.as_millis().to_string()])
            .args(["--duration-ms", &remaining.as_millis().to_string()])
            .arg("--history")
            .arg(self.dir.join(format!("worker-{process:04}.jsonl")))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if backend == Backend::PostgresAdvisory {
            command.arg("--postgres-advisory");
        }
        if !self.scenario.fenced {
            command.arg("--unfenced");
        }
        if stop_self {
            command.args(["--stop-self-every", "25"]);
        }
        if let Some(offset) = skew {
            skew_clock(&mut command, offset);
        }
        let child = command.spawn().expect("spawn a torture worker");
        Worker {
            process,
            child,
            proxy,
        }
    }
}

/// Runs `scenario` with `settings`: the row for the table.
///
/// # Panics
/// When a server or a worker cannot be started, or a worker exits with an error.
pub async fn run(scenario: Scenario, settings: &Settings) -> Row {
    let started = Instant::now();
    let backend = scenario.backend;
    let servers = Servers::start(backend).await;
    let dir = tempfile::Builder::new()
        .prefix("torture-")
        .tempdir()
        .expect("a history dir");
    let mut run = Run {
        scenario,
        settings,
        servers: &servers,
        dir: dir.path(),
        ends_at: Instant::now() + settings.duration,
        next_process: 0,
    };
    let processes = if backend == Backend::Memory {
        1
    } else {
        settings.processes
    };
    let mut workers = Vec::new();
    for i in 0..processes {
        let skew = match (scenario.fault, i) {
            (Fault::ClockSkew, 0) => Some("+1h"),
            (Fault::ClockSkew, 1) => Some("-1h"),
            _ => None,
        };
        let stop_self = scenario.fault == Fault::StopHolderPastTtl && i == 0;
        workers.push(run.spawn(skew, stop_self).await);
    }
    let mut orchestrator = HistoryWriter::open(&dir.path().join("orchestrator.jsonl"))
        .expect("open the orchestrator log");
    let faults = inject(&mut run, &mut workers, &mut orchestrator).await;
    finish(&mut workers, run.ends_at + Duration::from_secs(60)).await;

    let events = read_dir(dir.path()).expect("read the history");
    let final_counters = final_counters(&servers.store, settings.resources).await;
    let verdict = checker::check(&checker::sections(&events), &final_counters);
    Row {
        scenario,
        verdict,
        faults,
        elapsed: started.elapsed(),
    }
}

/// Injects the scenario's fault until the run ends; how many times.
async fn inject(run: &mut Run<'_>, workers: &mut [Worker], log: &mut HistoryWriter) -> u32 {
    let backend = run.scenario.backend;
    let past_ttl = backend.ttl() + backend.expiry_slack() + Duration::from_millis(500);
    let mut injected = 0;
    tokio::time::sleep(Duration::from_millis(800)).await;
    while Instant::now() + Duration::from_millis(700) < run.ends_at {
        let victim = rand::rng().random_range(0..workers.len());
        match run.scenario.fault {
            Fault::None | Fault::ClockSkew => break,
            Fault::KillHolder => {
                let worker = &mut workers[victim];
                log.append(&Event::Killed {
                    process: worker.process,
                    at_ns: monotonic_ns(),
                })
                .expect("log a kill");
                let _ = worker.child.kill();
                let _ = worker.child.wait();
                workers[victim] = run.spawn(None, false).await;
                injected += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Fault::StopHolderPastTtl => {
                if let Some(stopped) = workers.iter().find(|worker| worker.is_stopped()) {
                    tokio::time::sleep(past_ttl).await;
                    let _ = kill(stopped.pid(), Signal::SIGCONT);
                    injected += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Fault::RestartServer => {
                restart_server(run.servers).await;
                injected += 1;
                tokio::time::sleep(Duration::from_millis(1_500)).await;
            }
            Fault::RestartMinority | Fault::RestartMajority => {
                if let Some(cluster) = &run.servers.redlock {
                    let minority = (cluster.len() - 1) / 2;
                    let killed = match run.scenario.fault {
                        Fault::RestartMinority => minority,
                        _ => minority + 1,
                    };
                    (0..killed).for_each(|i| cluster.node(i).stop());
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    (0..killed).for_each(|i| cluster.node(i).start());
                }
                injected += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Fault::FreezeMinority => {
                let minority = (run.servers.node_proxies.len() - 1) / 2;
                let frozen = &run.servers.node_proxies[..minority];
                frozen.iter().for_each(FaultProxy::freeze);
                tokio::time::sleep(past_ttl).await;
                frozen.iter().for_each(FaultProxy::pass);
                injected += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Fault::FreezeClient | Fault::CutClient | Fault::DelayClient => {
                let Some(proxy) = &workers[victim].proxy else {
                    break;
                };
                match run.scenario.fault {
                    Fault::FreezeClient => {
                        proxy.freeze();
                        tokio::time::sleep(past_ttl).await;
                    }
                    Fault::CutClient => proxy.cut(),
                    _ => {
                        proxy.delay(Duration::from_millis(200));
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
                proxy.pass();
                injected += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Fault::TerminateSessions => {
                if let Some(postgres) = &run.servers.postgres {
                    terminate_sessions(postgres).await;
                }
                injected += 1;
                tokio::time::sleep(Duration::from_millis(1_000)).await;
            }
            Fault::KillLeader => {
                if let Some(etcd) = &run.servers.etcd
                    && let Some(leader) = (0..etcd.len()).find(|&i| etcd.member(i).is_leader())
                {
                    etcd.member(leader).kill();
                    tokio::time::sleep(Duration::from_millis(1_500)).await;
                    etcd.member(leader).start();
                    injected += 1;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    injected
}

async fn restart_server(servers: &Servers) {
    if let Some(redis) = &servers.redis {
        redis.stop();
        tokio::time::sleep(Duration::from_millis(300)).await;
        redis.start();
    }
    if let Some(postgres) = &servers.postgres {
        postgres.restart();
    }
    if let Some(etcd) = &servers.etcd {
        etcd.member(0).kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        etcd.member(0).start();
    }
}

async fn terminate_sessions(postgres: &PostgresServer) {
    let Ok(admin) = sqlx::PgPool::connect(&postgres.url()).await else {
        return;
    };
    let terminated = sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
    )
    .execute(&admin)
    .await;
    if let Err(err) = terminated {
        tracing::warn!(error = %err, "pg_terminate_backend failed");
    }
    admin.close().await;
}

/// Waits for every worker to exit (continuing any that stopped themselves), killing what is still
/// running at `deadline`.
///
/// # Panics
/// When a worker exits with an error.
async fn finish(workers: &mut [Worker], deadline: Instant) {
    for worker in workers.iter_mut() {
        loop {
            if worker.is_stopped() {
                let _ = kill(worker.pid(), Signal::SIGCONT);
            }
            match worker.child.try_wait() {
                Ok(Some(status)) => {
                    assert!(
                        status.success(),
                        "worker {} failed: {status}",
                        worker.process
                    );
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => {
                    let _ = worker.child.kill();
                    let _ = worker.child.wait();
                    panic!("worker {} did not finish in time", worker.process);
                }
            }
        }
    }
}

async fn final_counters(store: &RedisServer, resources: u32) -> BTreeMap<String, u64> {
    let fenced = RedisFencedStore::new(&store.url())
        .await
        .expect("connect to the fenced store");
    let mut counters = BTreeMap::new();
    for i in 0..resources {
        let resource = format!("r{i}");
        let value = fenced
            .read(&resource)
            .await
            .expect("read a final counter")
            .map(|stored| {
                String::from_utf8_lossy(&stored.value)
                    .parse::<u64>()
                    .expect("a counter")
            })
            .unwrap_or(0);
        counters.insert(resource, value);
    }
    counters
}

/// The results as a Markdown table: per backend and fault, the sections run, how many pairs of them
/// overlapped in time, writes accepted and rejected, faults injected and violations found.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| backend | fault | fencing | critical sections | overlapping pairs | accepted | rejected (stale) | unknown | faults | violations |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let verdict = &row.verdict;
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.scenario.backend.name(),
            row.scenario.fault.name(),
            if row.scenario.fenced {
                "on"
            } else {
                "**off** (control)"
            },
            verdict.sections,
            verdict.overlaps,
            verdict.accepted,
            verdict.rejected,
            verdict.unknown,
            row.faults,
            verdict.violations.len(),
        ));
    }
    out
}
