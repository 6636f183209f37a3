//! Fleet-scale simulation: N instances × P partitions coordinating through one real backend exactly as
//! the processor's fleet does (`processor/src/fleet`), without Kafka or RocksDB — how many instances and
//! partitions can one Redis or one PostgreSQL coordinate?
//!
//! Each simulated instance runs the processor's rounds every `tick` (250 ms, the processor's default):
//! - **membership** (`--membership roster`, the processor's since the fleet-at-scale round): a
//!   [`KeptMember`] of the job's roster; every tick it reads the roster's version (one request, a
//!   constant-size answer) and lists the members only when it changed — as `Membership::live_members`
//!   does. `--membership slots` runs the design it replaced, for the before rows: a kept lock on the first
//!   free member slot `member:{group}:{topic}:{slot}` and its id in the fenced registry, every slot read
//!   (holder + registry entry) every tick;
//! - **assignment**: rendezvous hashing with bounded loads over the live members (the processor's
//!   algorithm), recomputed when the member list changes;
//! - **claims**: a kept lock (renewed every third of the TTL) per partition it should own; released when
//!   it should no longer own it;
//! - **leadership** (on a task of its own, as the processor's duties are): one campaign per tick; the
//!   leader schedules one recurring maintenance job per partition (every 10 s), and the others claim and
//!   run one due job per tick.
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
//! cargo bench -p benches --bench fleet                       # 10×100, 100×1 000, 1 000×10 000 on Redis, etcd, PostgreSQL
//! cargo bench -p benches --bench fleet -- --sizes 50x1000 --backend redis
//! cargo bench -p benches --bench fleet -- --membership roster,slots   # after and before, same run
//! cargo bench -p benches --bench fleet -- --task-queue        # 100 workers, 500 due tasks of 1 s each
//! cargo bench -p benches --bench fleet -- --membership-every 1.67   # members read every third of the TTL
//! cargo test  -p benches --bench fleet                       # smoke run: 10×100, short windows
//! ```

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::cpu::cpu_seconds;
use integration_tests::{EtcdCluster, FaultProxy, PostgresServer, RedisServer};
use state::DistributedLock;
use state::recipes::fenced::FencedStore;
use state::recipes::keeper::{KeptLock, RenewalPolicy};
use state::recipes::leader::LeaderElection;
use state::recipes::roster::{KeptMember, RosterStore, RosterVersion};
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
    Etcd,
    Postgres,
}

/// How the instances know each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Design {
    /// The job's roster: a version read per tick, a listing when it changed.
    Roster,
    /// The member slots it replaced: every slot read every tick.
    Slots,
}

struct Options {
    scales: Vec<Scale>,
    kinds: Vec<Kind>,
    designs: Vec<Design>,
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
                vec![(10, 100), (100, 1_000), (1_000, 10_000)]
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
    let kinds = value("--backend").map_or_else(
        || vec![Kind::Redis, Kind::Etcd, Kind::Postgres],
        |names| {
            names
                .split(',')
                .filter_map(|name| match name {
                    "redis" => Some(Kind::Redis),
                    "etcd" => Some(Kind::Etcd),
                    "postgres" => Some(Kind::Postgres),
                    _ => None,
                })
                .collect()
        },
    );
    let designs = value("--membership").map_or_else(
        || vec![Design::Roster],
        |names| {
            names
                .split(',')
                .filter_map(|name| match name {
                    "roster" => Some(Design::Roster),
                    "slots" => Some(Design::Slots),
                    _ => None,
                })
                .collect()
        },
    );
    Options {
        scales: scales
            .into_iter()
            .map(|(instances, partitions)| Scale {
                instances,
                partitions,
            })
            .collect(),
        kinds,
        designs,
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
    roster: Arc<dyn RosterStore>,
}

async fn client(url: &str) -> Client {
    let backend = state::connect(url).await.expect("connect the backend");
    Client {
        lock: backend.lock,
        registry: backend.fenced,
        tasks: backend.tasks,
        roster: backend.roster,
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

/// The splitmix64 finaliser (the processor's `hash::splitmix64`).
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The processor's assignment: rendezvous hashing with loads bounded by `ceil(P / N)`, each weight the
/// mix of the partition's hash and the member's.
fn assignment(partitions: u32, members: &[String]) -> HashMap<u32, String> {
    let mut owners = HashMap::new();
    if members.is_empty() {
        return owners;
    }
    let cap = (partitions as usize).div_ceil(members.len());
    let mut load = vec![0usize; members.len()];
    let hashes: Vec<u64> = members
        .iter()
        .map(|m| stable_hash(&[m.as_bytes()]))
        .collect();
    for partition in 0..partitions {
        let of_partition = stable_hash(&[TOPIC.as_bytes(), &partition.to_be_bytes()]);
        let owner = (0..members.len())
            .filter(|m| load[*m] < cap)
            .max_by_key(|m| (splitmix64(of_partition ^ hashes[*m]), members[*m].as_str()));
        if let Some(owner) = owner {
            load[owner] += 1;
            owners.insert(partition, members[owner].clone());
        }
    }
    owners
}

/// The assignments computed so far, shared by the simulated instances: each instance of a real fleet
/// computes the assignment of a member list on its own machine (O(partitions × members) hashes, 0.3 s
/// at 1 000 × 10 000); computed a thousand times over on this one machine's two cores, it would be the
/// simulation that saturates, not the backend.
#[derive(Clone, Default)]
struct Assignments(Arc<Mutex<Vec<Computed>>>);

/// A member list's hash, the list and its assignment.
type Computed = (u64, Vec<String>, Owners);

/// The owner of each partition.
type Owners = Arc<HashMap<u32, String>>;

impl Assignments {
    fn of(&self, partitions: u32, members: &[String]) -> Owners {
        let parts: Vec<&[u8]> = members.iter().map(String::as_bytes).collect();
        let hash = stable_hash(&parts);
        if let Some((_, _, known)) = self
            .0
            .lock()
            .unwrap()
            .iter()
            .find(|(h, m, _)| *h == hash && m == members)
        {
            return Arc::clone(known);
        }
        let computed = Arc::new(assignment(partitions, members));
        let mut known = self.0.lock().unwrap();
        if known.len() >= 64 {
            known.remove(0);
        }
        known.push((hash, members.to_vec(), Arc::clone(&computed)));
        computed
    }
}

/// Claims held by every instance, for the hand-off measurement.
type Held = Arc<Mutex<HashMap<String, HashSet<u32>>>>;

/// Ticks run and membership requests made, fleet-wide.
#[derive(Default)]
struct Counters {
    ticks: AtomicU64,
    member_requests: AtomicU64,
}

struct Instance {
    id: String,
    client: Client,
    design: Design,
    max_members: u32,
    partitions: u32,
    slot: Option<KeptLock>,
    kept: Option<KeptMember>,
    roster_seen: Option<RosterVersion>,
    counters: Arc<Counters>,
    assignments: Assignments,
    claims: HashMap<u32, KeptLock>,
    members: Vec<String>,
    membership_every: Duration,
    members_read_at: Option<Instant>,
    desired: HashSet<u32>,
    held: Held,
    errors: Arc<AtomicU64>,
}

const ROSTER: &str = "members:sim:orders";

impl Instance {
    fn count(&self, requests: u64) {
        self.counters
            .member_requests
            .fetch_add(requests, Ordering::Relaxed);
    }

    async fn announce(&mut self) -> state::StateResult<()> {
        match self.design {
            Design::Roster => self.join_roster().await,
            Design::Slots => self.take_slot().await,
        }
    }

    async fn live_members(&mut self) -> state::StateResult<Option<Vec<String>>> {
        match self.design {
            Design::Roster => self.roster_members().await,
            Design::Slots => self.slot_members().await.map(Some),
        }
    }

    async fn join_roster(&mut self) -> state::StateResult<()> {
        if self.kept.as_ref().is_some_and(|kept| !kept.is_lost()) {
            return Ok(());
        }
        self.count(1);
        self.kept = KeptMember::join(&self.client.roster, ROSTER, &self.id, b"", CLAIM_TTL).await?;
        Ok(())
    }

    /// The members when the roster's version moved since the last listing, `None` when it did not.
    async fn roster_members(&mut self) -> state::StateResult<Option<Vec<String>>> {
        self.count(1);
        let version = self.client.roster.version(ROSTER).await?;
        if self.roster_seen == Some(version) {
            return Ok(None);
        }
        self.count(1);
        let members = self.client.roster.members(ROSTER).await?;
        self.roster_seen = Some(version);
        Ok(Some(
            members.into_iter().map(|entry| entry.member).collect(),
        ))
    }

    async fn take_slot(&mut self) -> state::StateResult<()> {
        if self.slot.as_ref().is_some_and(|kept| !kept.is_lost()) {
            return Ok(());
        }
        self.slot = None;
        for slot in 0..self.max_members {
            let resource = format!("member:{GROUP}:{TOPIC}:{slot}");
            self.count(1);
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

    async fn slot_members(&self) -> state::StateResult<Vec<String>> {
        let mut members = Vec::new();
        for slot in 0..self.max_members {
            let resource = format!("member:{GROUP}:{TOPIC}:{slot}");
            self.count(1);
            let Some(holder) = self.client.lock.get_lock_info(&resource).await? else {
                continue;
            };
            self.count(1);
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
        self.counters.ticks.fetch_add(1, Ordering::Relaxed);
        self.announce().await?;
        // The member list is read every `membership_every` (every tick by default, as the processor
        // does), and at once when this instance's own slot or a claim was just lost.
        let due = self
            .members_read_at
            .is_none_or(|at| at.elapsed() >= self.membership_every);
        let read = if due || self.claims.values().any(KeptLock::is_lost) {
            self.members_read_at = Some(Instant::now());
            self.live_members().await?
        } else {
            None
        };
        if let Some(members) = read.filter(|members| *members != self.members) {
            self.desired = self
                .assignments
                .of(self.partitions, &members)
                .iter()
                .filter(|(_, owner)| **owner == self.id)
                .map(|(partition, _)| *partition)
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
        Ok(())
    }

    async fn run(mut self, duties: Duties, stop: CancellationToken) {
        // Instances start spread over a tick, as a fleet's do.
        tokio::time::sleep(TICK.mul_f64(rand_fraction(&self.id))).await;
        // The fleet duties on a task of their own, as the processor runs them: a new leader scheduling
        // every partition's job does not hold up this instance's claims. Aborted with the instance.
        let duties =
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(duties.run(stop.clone())));
        while !stop.is_cancelled() {
            let started = Instant::now();
            if let Err(err) = self.round().await {
                // The first few say why rounds fail (on stderr, beside the table).
                if self.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("{}: round failed: {err:?}", self.id);
                }
            }
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(TICK.saturating_sub(started.elapsed())) => {}
            }
        }
        drop(duties);
        self.held.lock().unwrap().remove(&self.id);
    }
}

/// An instance's fleet duties: campaign for leadership every tick; as leader, make sure every
/// partition's maintenance job exists once per term; as follower, run one due job per tick.
struct Duties {
    id: String,
    election: LeaderElection,
    queue: TaskQueue,
    partitions: u32,
    scheduled_term: Option<u64>,
    errors: Arc<AtomicU64>,
}

impl Duties {
    async fn round(&mut self) -> state::StateResult<()> {
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
        while !stop.is_cancelled() {
            let started = Instant::now();
            if let Err(err) = self.round().await
                && self.errors.fetch_add(1, Ordering::Relaxed) < 5
            {
                eprintln!("{}: duties failed: {err:?}", self.id);
            }
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(TICK.saturating_sub(started.elapsed())) => {}
            }
        }
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
    etcd: Option<EtcdCluster>,
    postgres: Option<PostgresServer>,
}

impl Server {
    fn start(kind: Kind) -> Self {
        let mut server = Server {
            kind,
            redis: None,
            etcd: None,
            postgres: None,
        };
        match kind {
            Kind::Redis => server.redis = Some(RedisServer::start_new()),
            Kind::Etcd => server.etcd = Some(EtcdCluster::single()),
            Kind::Postgres => server.postgres = Some(PostgresServer::start_new()),
        }
        server
    }

    fn port(&self) -> u16 {
        match (&self.redis, &self.etcd, &self.postgres) {
            (Some(redis), _, _) => redis.port(),
            (_, Some(etcd), _) => etcd.member(0).port(),
            (_, _, Some(postgres)) => postgres.port(),
            _ => unreachable!("a server is running"),
        }
    }

    fn url_on(&self, port: u16) -> String {
        match self.kind {
            Kind::Redis => format!("redis://127.0.0.1:{port}"),
            Kind::Etcd => format!("etcd://127.0.0.1:{port}/fleet/"),
            Kind::Postgres => format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        }
    }

    fn cpu(&self) -> f64 {
        match (&self.redis, &self.etcd, &self.postgres) {
            (Some(redis), _, _) => cpu_seconds(&redis.pid().into_iter().collect::<Vec<_>>()),
            (_, Some(etcd), _) => {
                cpu_seconds(&etcd.member(0).pid().into_iter().collect::<Vec<_>>())
            }
            (_, _, Some(postgres)) => cpu_seconds(&postgres.pids()),
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
            Kind::Etcd => Probe::Etcd,
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
    /// etcd's own counters, from its `/metrics`.
    Etcd,
    Postgres(sqlx::PgPool),
}

/// The requests an etcd member has answered: the sum of its `grpc_server_handled_total` series.
fn etcd_requests(metrics: &str) -> Option<u64> {
    let mut total = 0.0;
    for line in metrics.lines() {
        if line.starts_with("grpc_server_handled_total{") {
            total += line.rsplit(' ').next()?.parse::<f64>().ok()?;
        }
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some(total as u64)
}

impl Probe {
    /// Commands (Redis), answered requests (etcd) or committed transactions (PostgreSQL) so far;
    /// `None` when the server does not answer within a minute.
    async fn operations(&mut self, server: &Server) -> Option<u64> {
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
                Probe::Etcd => etcd_requests(&server.etcd.as_ref()?.member(0).metrics()?),
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
    member_requests_per_tick: f64,
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

/// How far from settled: partitions claimed, instances reporting, instances outside their share.
fn where_it_stands(held: &Held, scale: Scale) -> String {
    let held = held.lock().unwrap();
    let claimed: HashSet<u32> = held.values().flatten().copied().collect();
    let (low, high) = (
        scale.partitions as usize / scale.instances,
        (scale.partitions as usize).div_ceil(scale.instances),
    );
    let outside: Vec<usize> = held
        .values()
        .map(HashSet::len)
        .filter(|n| !(low..=high).contains(n))
        .collect();
    format!(
        "{} of {} partitions claimed, {} of {} instances reporting, {} outside their share {low}..={high} (e.g. {:?})",
        claimed.len(),
        scale.partitions,
        held.len(),
        scale.instances,
        outside.len(),
        &outside[..outside.len().min(8)]
    )
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

async fn simulate(kind: Kind, design: Design, scale: Scale, options: &Options) -> Report {
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
    let counters = Arc::new(Counters::default());
    let assignments = Assignments::default();
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..scale.instances {
        let id = format!("i{i:04}");
        let client = if i == 0 {
            victim_client.clone()
        } else {
            shared[i / PER_CLIENT].clone()
        };
        let duties = Duties {
            election: LeaderElection::new(
                client.lock.clone(),
                &format!("{GROUP}:{TOPIC}"),
                &id,
                CLAIM_TTL,
            )
            .unwrap(),
            queue: TaskQueue::new(client.lock.clone(), client.tasks.clone(), CLAIM_TTL),
            id: id.clone(),
            partitions: scale.partitions,
            scheduled_term: None,
            errors: Arc::clone(&errors),
        };
        let instance = Instance {
            id,
            client,
            design,
            max_members: u32::try_from(scale.instances).unwrap(),
            partitions: scale.partitions,
            slot: None,
            kept: None,
            roster_seen: None,
            counters: Arc::clone(&counters),
            assignments: assignments.clone(),
            claims: HashMap::new(),
            members: Vec::new(),
            membership_every: options.membership_every,
            members_read_at: None,
            desired: HashSet::new(),
            held: Arc::clone(&held),
            errors: Arc::clone(&errors),
        };
        tasks.push(tokio::spawn(instance.run(duties, stop.child_token())));
    }

    let settled = wait_until(options.settle_within, || {
        all_held(&held, scale.partitions, None) && balanced(&held, scale)
    })
    .await;
    if settled.is_none() {
        eprintln!("{scale}: not settled: {}", where_it_stands(&held, scale));
    }
    let (ops_before, cpu_before, at) = (
        probe.operations(&server).await,
        server.cpu(),
        Instant::now(),
    );
    let (ticks_before, requests_before) = (
        counters.ticks.load(Ordering::Relaxed),
        counters.member_requests.load(Ordering::Relaxed),
    );
    tokio::time::sleep(options.measure_for).await;
    let ops_after = probe.operations(&server).await;
    #[allow(clippy::cast_precision_loss)]
    let member_requests_per_tick = (counters.member_requests.load(Ordering::Relaxed)
        - requests_before) as f64
        / (counters.ticks.load(Ordering::Relaxed) - ticks_before).max(1) as f64;
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
        member_requests_per_tick,
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

/// 100 workers and 500 due tasks of 1 s each on one backend: the wall time until all ran (ideal 5 s:
/// five rounds of 100), and the most tasks that ran at once.
async fn task_queue(kind: Kind) -> (Duration, usize) {
    const WORKERS: usize = 100;
    const TASKS: usize = 500;
    let server = Server::start(kind);
    let backend = client(&server.url_on(server.port())).await;
    let queue = TaskQueue::new(backend.lock.clone(), backend.tasks.clone(), CLAIM_TTL);
    for i in 0..TASKS {
        queue.submit(&format!("job-{i}"), b"").await.unwrap();
    }
    let running = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (queue, running, peak, done) =
            (queue.clone(), running.clone(), peak.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            while done.load(Ordering::SeqCst) < TASKS as u64 {
                let (running, peak, done) = (running.clone(), peak.clone(), done.clone());
                let ran = queue
                    .run_next(|_task, _ctx| async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                        done.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    })
                    .await;
                if !matches!(ran, Ok(Some(_))) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    #[allow(clippy::cast_possible_truncation)]
    let peak = peak.load(Ordering::SeqCst) as usize;
    (started.elapsed(), peak)
}

#[tokio::main]
async fn main() {
    let options = options();
    if std::env::args().any(|a| a == "--task-queue") {
        println!(
            "| backend | 100 workers, 500 due tasks of 1 s: all done after | most running at once |"
        );
        println!("|---|---|---|");
        for kind in &options.kinds {
            let (wall, peak) = task_queue(*kind).await;
            println!("| {kind:?} | {:.1} s | {peak} |", wall.as_secs_f64());
        }
        return;
    }
    println!(
        "fleet simulation: tick {TICK:?}, members read every {:?}, claim TTL {CLAIM_TTL:?} (renewed every third), maintenance every {MAINTENANCE_EVERY:?} per partition, {}-instance client groups; steady state measured over {:?}",
        options.membership_every, PER_CLIENT, options.measure_for
    );
    println!(
        "| backend | membership | instances × partitions | all claimed and balanced after | membership requests per instance per tick | backend load | backend CPU (cores) | hand-off after a death (its partitions) | failed rounds |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for kind in &options.kinds {
        for scale in &options.scales {
            for design in &options.designs {
                let report = simulate(*kind, *design, *scale, &options).await;
                let (server_name, unit) = match kind {
                    Kind::Redis => ("Redis", "commands/s"),
                    Kind::Etcd => ("etcd", "requests/s"),
                    Kind::Postgres => ("PostgreSQL", "transactions/s"),
                };
                let design_name = match design {
                    Design::Roster => "roster",
                    Design::Slots => "slots (before)",
                };
                println!(
                    "| {server_name} | {design_name} | {scale} | {} | {:.2} | {} | {:.2} | {} ({}) | {} |",
                    secs(report.settled),
                    report.member_requests_per_tick,
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
}
