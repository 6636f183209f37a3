//! Fleet-scale simulation: N instances × P partitions coordinating through one real backend exactly as
//! the processor's fleet does (`processor/src/fleet`), without Kafka or RocksDB — how many instances and
//! partitions can one Redis or one PostgreSQL coordinate?
//!
//! Each simulated instance runs the processor's rounds every `tick` (250 ms, the processor's default):
//! - **membership**: a kept lock on a member slot `member:{group}:{topic}:{slot}` (the first free one) and its
//!   id in the fenced registry; every tick it reads every slot (holder + registry entry) to list the
//!   live members — as `Membership::live_members` does;
//! - **assignment**: rendezvous hashing with bounded loads over the live members (the processor's
//!   algorithm), recomputed when the member list changes;
//! - **claims**: a kept lock (renewed every third of the TTL) per partition it should own; released when
//!   it should no longer own it;
//! - **leadership**: one campaign per tick; the leader schedules one recurring maintenance job per
//!   partition (every 10 s), and the others claim and run one due job per tick.
//!
//! Reported per size, in steady state (every partition held): the backend's commands (Redis) or
//! transactions (PostgreSQL) per second, its CPU use (from `/proc/<pid>/stat` of `redis-server`, or of
//! the postmaster and its backends), and the hand-off time: from one instance's death (its connection
//! cut at a TCP proxy, so its leases lapse as a crash's would) until its partitions are held by others.
//!
//! The instances share clients in groups of ten (one connection or pool per group), as ten processes
//! of a real fleet would not: the backend's connection count is lower than a real fleet's.
//!
//! ```text
//! cargo bench -p benches --bench fleet                       # 10×100, 50×1 000, 200×10 000 on Redis and PostgreSQL
//! cargo bench -p benches --bench fleet -- --sizes 50x1000 --backend redis
//! cargo bench -p benches --bench fleet -- --membership-every 1.67   # members read every third of the TTL
//! cargo test  -p benches --bench fleet                       # smoke run: 10×100, short windows
//! ```

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::cpu::cpu_seconds;
use integration_tests::{FaultProxy, PostgresServer, RedisServer};
use state::DistributedLock;
use state::recipes::fenced::FencedStore;
use state::recipes::keeper::{KeptLock, RenewalPolicy};
use state::recipes::leader::LeaderElection;
use state::recipes::tasks::{TaskQueue, TaskStore};
use tokio_util::sync::CancellationToken;

const GROUP: &str = "sim";
const TOPIC: &str = "orders";
/// The processor's defaults.
const TICK: Duration = Duration::from_millis(250);
const CLAIM_TTL: Duration = Duration::from_secs(5);
const MAINTENANCE_EVERY: Duration = Duration::from_secs(10);
/// Instances per shared client (connection or pool).
const PER_CLIENT: usize = 10;

#[derive(Debug, Clone, Copy)]
struct Scale {
    instances: usize,
    partitions: u32,
}

impl std::fmt::Display for Scale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}×{}", self.instances, self.partitions)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Redis,
    Postgres,
}

struct Options {
    scales: Vec<Scale>,
    kinds: Vec<Kind>,
    measure_for: Duration,
    settle_within: Duration,
    /// How often the member slots are read (the processor: every tick). `--membership-every SECS`
    /// measures the proposed fix's cadence half: list the members every third of the TTL instead.
    membership_every: Duration,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench");
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let scales = value("--sizes").map_or_else(
        || {
            if full {
                vec![(10, 100), (50, 1_000), (200, 10_000)]
            } else {
                vec![(10, 100)]
            }
        },
        |text| {
            text.split(',')
                .filter_map(|size| {
                    let (n, p) = size.split_once('x')?;
                    Some((n.parse().ok()?, p.parse().ok()?))
                })
                .collect()
        },
    );
    let kinds = match value("--backend").as_deref() {
        Some("redis") => vec![Kind::Redis],
        Some("postgres") => vec![Kind::Postgres],
        _ => vec![Kind::Redis, Kind::Postgres],
    };
    Options {
        scales: scales
            .into_iter()
            .map(|(instances, partitions)| Scale {
                instances,
                partitions,
            })
            .collect(),
        kinds,
        measure_for: if full {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(2)
        },
        membership_every: value("--membership-every")
            .and_then(|secs| secs.parse::<f64>().ok())
            .filter(|secs| *secs > 0.0)
            .map_or(TICK, Duration::from_secs_f64),
        settle_within: if full {
            Duration::from_secs(180)
        } else {
            Duration::from_secs(60)
        },
    }
}

/// One backend connection (or pool) shared by a group of instances.
#[derive(Clone)]
struct Client {
    lock: Arc<dyn DistributedLock>,
    registry: Arc<dyn FencedStore>,
    tasks: Arc<dyn TaskStore>,
}

async fn client(url: &str) -> Client {
    let backend = state::connect(url).await.expect("connect the backend");
    Client {
        lock: backend.lock,
        registry: backend.fenced,
        tasks: backend.tasks,
    }
}

/// FNV-1a, 64 bits: a stable hash (the processor's `stable_hash` plays the same role).
fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The processor's assignment: rendezvous hashing with loads bounded by `ceil(P / N)`.
fn assignment(partitions: u32, members: &[String]) -> HashMap<u32, String> {
    let mut owners = HashMap::new();
    if members.is_empty() {
        return owners;
    }
    let cap = (partitions as usize).div_ceil(members.len());
    let mut load: HashMap<&str, usize> = HashMap::new();
    for partition in 0..partitions {
        let owner = members
            .iter()
            .filter(|m| load.get(m.as_str()).copied().unwrap_or(0) < cap)
            .max_by_key(|m| {
                (
                    stable_hash(&[TOPIC.as_bytes(), &partition.to_be_bytes(), m.as_bytes()]),
                    m.as_str(),
                )
            });
        if let Some(owner) = owner {
            *load.entry(owner.as_str()).or_insert(0) += 1;
            owners.insert(partition, owner.clone());
        }
    }
    owners
}

/// Claims held by every instance, for the hand-off measurement.
type Held = Arc<Mutex<HashMap<String, HashSet<u32>>>>;

struct Instance {
    id: String,
    client: Client,
    max_members: u32,
    partitions: u32,
    slot: Option<KeptLock>,
    claims: HashMap<u32, KeptLock>,
    election: LeaderElection,
    queue: TaskQueue,
    members: Vec<String>,
    membership_every: Duration,
    members_read_at: Option<Instant>,
    desired: HashSet<u32>,
    scheduled_term: Option<u64>,
    held: Held,
    errors: Arc<AtomicU64>,
}

impl Instance {
    async fn announce(&mut self) -> state::StateResult<()> {
        if self.slot.as_ref().is_some_and(|kept| !kept.is_lost()) {
            return Ok(());
        }
        self.slot = None;
        for slot in 0..self.max_members {
            let resource = format!("member:{GROUP}:{TOPIC}:{slot}");
            if let Some(kept) = KeptLock::try_acquire(
                &self.client.lock,
                &resource,
                CLAIM_TTL,
                RenewalPolicy::default(),
            )
            .await?
            {
                self.client
                    .registry
                    .write(&resource, kept.fencing_token(), self.id.as_bytes())
                    .await?;
                self.slot = Some(kept);
                return Ok(());
            }
        }
        Ok(())
    }

    async fn live_members(&self) -> state::StateResult<Vec<String>> {
        let mut members = Vec::new();
        for slot in 0..self.max_members {
            let resource = format!("member:{GROUP}:{TOPIC}:{slot}");
            let Some(holder) = self.client.lock.get_lock_info(&resource).await? else {
                continue;
            };
            if let Some(entry) = self.client.registry.read(&resource).await?
                && entry.token == holder.fencing_token
            {
                members.push(String::from_utf8_lossy(&entry.value).into_owned());
            }
        }
        members.sort();
        members.dedup();
        Ok(members)
    }

    async fn round(&mut self) -> state::StateResult<()> {
        self.announce().await?;
        // The member list is read every `membership_every` (every tick by default, as the processor
        // does), and at once when this instance's own slot or a claim was just lost.
        let due = self
            .members_read_at
            .is_none_or(|at| at.elapsed() >= self.membership_every);
        let members = if due || self.claims.values().any(KeptLock::is_lost) {
            self.members_read_at = Some(Instant::now());
            self.live_members().await?
        } else {
            self.members.clone()
        };
        if members != self.members {
            self.desired = assignment(self.partitions, &members)
                .into_iter()
                .filter(|(_, owner)| *owner == self.id)
                .map(|(partition, _)| partition)
                .collect();
            self.members = members;
        }
        let leaving: Vec<u32> = self
            .claims
            .keys()
            .filter(|p| !self.desired.contains(p))
            .copied()
            .collect();
        for partition in leaving {
            if let Some(kept) = self.claims.remove(&partition) {
                let _ = kept.release().await;
            }
        }
        self.claims.retain(|_, kept| !kept.is_lost());
        let wanted: Vec<u32> = self
            .desired
            .iter()
            .filter(|p| !self.claims.contains_key(p))
            .copied()
            .collect();
        for partition in wanted {
            let resource = format!("partition:{GROUP}:{TOPIC}:{partition}");
            if let Some(kept) = KeptLock::try_acquire(
                &self.client.lock,
                &resource,
                CLAIM_TTL,
                RenewalPolicy::default(),
            )
            .await?
            {
                self.claims.insert(partition, kept);
            }
        }
        self.held
            .lock()
            .unwrap()
            .insert(self.id.clone(), self.claims.keys().copied().collect());
        self.election.try_become_leader().await?;
        let term = self.election.fencing_token();
        if term.is_some() && self.scheduled_term != term {
            for partition in 0..self.partitions {
                self.queue
                    .ensure_recurring(
                        &format!("maintain:{GROUP}:{TOPIC}:{partition}"),
                        MAINTENANCE_EVERY,
                        b"retain",
                    )
                    .await?;
            }
            self.scheduled_term = term;
        } else if term.is_none() {
            self.queue.run_next(|_, _| async { Ok(()) }).await?;
        }
        Ok(())
    }

    async fn run(mut self, stop: CancellationToken) {
        // Instances start spread over a tick, as a fleet's do.
        tokio::time::sleep(TICK.mul_f64(rand_fraction(&self.id))).await;
        while !stop.is_cancelled() {
            let started = Instant::now();
            if self.round().await.is_err() {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(TICK.saturating_sub(started.elapsed())) => {}
            }
        }
        self.held.lock().unwrap().remove(&self.id);
    }
}

fn rand_fraction(id: &str) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let fraction = (stable_hash(&[id.as_bytes()]) % 1000) as f64 / 1000.0;
    fraction
}

/// A running backend server: where clients connect, and how to read its load.
struct Server {
    kind: Kind,
    redis: Option<RedisServer>,
    postgres: Option<PostgresServer>,
}

impl Server {
    fn start(kind: Kind) -> Self {
        match kind {
            Kind::Redis => Server {
                kind,
                redis: Some(RedisServer::start_new()),
                postgres: None,
            },
            Kind::Postgres => Server {
                kind,
                redis: None,
                postgres: Some(PostgresServer::start_new()),
            },
        }
    }

    fn port(&self) -> u16 {
        match (&self.redis, &self.postgres) {
            (Some(redis), _) => redis.port(),
            (_, Some(postgres)) => postgres.port(),
            _ => unreachable!("a server is running"),
        }
    }

    fn url_on(&self, port: u16) -> String {
        match self.kind {
            Kind::Redis => format!("redis://127.0.0.1:{port}"),
            Kind::Postgres => format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        }
    }

    fn cpu(&self) -> f64 {
        match (&self.redis, &self.postgres) {
            (Some(redis), _) => cpu_seconds(&redis.pid().into_iter().collect::<Vec<_>>()),
            (_, Some(postgres)) => cpu_seconds(&postgres.pids()),
            _ => 0.0,
        }
    }

    /// A connection of the bench's own for reading the server's counters, opened before the fleet
    /// starts (a saturated server may not accept a new one later).
    async fn probe(&self) -> Probe {
        match self.kind {
            Kind::Redis => Probe::Redis(
                redis::Client::open(self.url_on(self.port()))
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap(),
            ),
            Kind::Postgres => Probe::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .min_connections(1)
                    .acquire_timeout(Duration::from_secs(120))
                    .connect(&self.url_on(self.port()))
                    .await
                    .unwrap(),
            ),
        }
    }
}

/// The bench's own connection to the server.
enum Probe {
    Redis(redis::aio::MultiplexedConnection),
    Postgres(sqlx::PgPool),
}

impl Probe {
    /// Commands (Redis) or committed transactions (PostgreSQL) so far; `None` when the server does not
    /// answer within a minute.
    async fn operations(&mut self) -> Option<u64> {
        let read = async {
            match self {
                Probe::Redis(conn) => {
                    let info: String = redis::cmd("INFO")
                        .arg("stats")
                        .query_async(conn)
                        .await
                        .ok()?;
                    info.lines()
                        .find_map(|line| line.strip_prefix("total_commands_processed:"))
                        .and_then(|n| n.trim().parse().ok())
                }
                Probe::Postgres(pool) => {
                    let committed: i64 =
                        sqlx::query_scalar("SELECT sum(xact_commit)::bigint FROM pg_stat_database")
                            .fetch_one(&*pool)
                            .await
                            .ok()?;
                    u64::try_from(committed).ok()
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), read)
            .await
            .ok()
            .flatten()
    }
}

struct Report {
    settled: Option<Duration>,
    operations_per_second: Option<f64>,
    cpu_share: f64,
    hand_off: Option<Duration>,
    victim_partitions: usize,
    round_errors: u64,
}

/// Every partition held by exactly one live instance.
fn all_held(held: &Held, partitions: u32, without: Option<&str>) -> bool {
    let held = held.lock().unwrap();
    let mut owners: BTreeMap<u32, usize> = BTreeMap::new();
    for (id, claims) in held.iter() {
        if Some(id.as_str()) == without {
            continue;
        }
        for partition in claims {
            *owners.entry(*partition).or_default() += 1;
        }
    }
    owners.len() == partitions as usize && owners.values().all(|n| *n == 1)
}

/// Every instance holds its fair share: `floor(P / N)` or `ceil(P / N)` partitions (the assignment has
/// converged, not only every partition claimed by whoever came first).
fn balanced(held: &Held, scale: Scale) -> bool {
    let held = held.lock().unwrap();
    let (low, high) = (
        scale.partitions as usize / scale.instances,
        (scale.partitions as usize).div_ceil(scale.instances),
    );
    held.len() == scale.instances
        && held
            .values()
            .all(|claims| (low..=high).contains(&claims.len()))
}

async fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if done() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

async fn simulate(kind: Kind, scale: Scale, options: &Options) -> Report {
    let server = Server::start(kind);
    let mut probe = server.probe().await;
    // The victim (instance 0) reaches the server through a proxy of its own, cut to kill it.
    let proxy = FaultProxy::start(server.port()).await;
    let victim_client = client(&server.url_on(proxy.port())).await;
    let mut shared = Vec::new();
    for _ in 0..scale.instances.div_ceil(PER_CLIENT) {
        shared.push(client(&server.url_on(server.port())).await);
    }
    let held: Held = Arc::default();
    let errors = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..scale.instances {
        let id = format!("i{i:04}");
        let client = if i == 0 {
            victim_client.clone()
        } else {
            shared[i / PER_CLIENT].clone()
        };
        let instance = Instance {
            election: LeaderElection::new(
                client.lock.clone(),
                &format!("{GROUP}:{TOPIC}"),
                &id,
                CLAIM_TTL,
            )
            .unwrap(),
            queue: TaskQueue::new(client.lock.clone(), client.tasks.clone(), CLAIM_TTL),
            id,
            client,
            max_members: u32::try_from(scale.instances).unwrap(),
            partitions: scale.partitions,
            slot: None,
            claims: HashMap::new(),
            members: Vec::new(),
            membership_every: options.membership_every,
            members_read_at: None,
            desired: HashSet::new(),
            scheduled_term: None,
            held: Arc::clone(&held),
            errors: Arc::clone(&errors),
        };
        tasks.push(tokio::spawn(instance.run(stop.child_token())));
    }

    let settled = wait_until(options.settle_within, || {
        all_held(&held, scale.partitions, None) && balanced(&held, scale)
    })
    .await;
    let (ops_before, cpu_before, at) = (probe.operations().await, server.cpu(), Instant::now());
    tokio::time::sleep(options.measure_for).await;
    let ops_after = probe.operations().await;
    let elapsed = at.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let operations_per_second = match (ops_before, ops_after) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before) as f64 / elapsed),
        _ => None,
    };
    let cpu_share = (server.cpu() - cpu_before) / elapsed;

    let victim_partitions = held.lock().unwrap().get("i0000").map_or(0, HashSet::len);
    proxy.cut();
    tasks[0].abort();
    let hand_off = wait_until(options.settle_within, || {
        all_held(&held, scale.partitions, Some("i0000"))
    })
    .await;
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    Report {
        settled,
        operations_per_second,
        cpu_share,
        hand_off,
        victim_partitions,
        round_errors: errors.load(Ordering::Relaxed),
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(
        || "not reached".to_owned(),
        |d| format!("{:.1} s", d.as_secs_f64()),
    )
}

#[tokio::main]
async fn main() {
    let options = options();
    println!(
        "fleet simulation: tick {TICK:?}, member slots read every {:?}, claim TTL {CLAIM_TTL:?} (renewed every third), maintenance every {MAINTENANCE_EVERY:?} per partition, {}-instance client groups; steady state measured over {:?}",
        options.membership_every, PER_CLIENT, options.measure_for
    );
    println!(
        "| backend | instances × partitions | all claimed after | backend load | backend CPU (cores) | hand-off after a death (its partitions) | failed rounds |"
    );
    println!("|---|---|---|---|---|---|---|");
    for kind in &options.kinds {
        for scale in &options.scales {
            let report = simulate(*kind, *scale, &options).await;
            let server_name = match kind {
                Kind::Redis => "Redis",
                Kind::Postgres => "PostgreSQL",
            };
            let unit = match kind {
                Kind::Redis => "commands/s",
                Kind::Postgres => "transactions/s",
            };
            println!(
                "| {server_name} | {scale} | {} | {} | {:.2} | {} ({}) | {} |",
                secs(report.settled),
                report
                    .operations_per_second
                    .map_or_else(|| "no answer".to_owned(), |n| format!("{n:.0} {unit}")),
                report.cpu_share,
                secs(report.hand_off),
                report.victim_partitions,
                report.round_errors,
            );
        }
    }
}
