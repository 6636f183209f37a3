//! The Redis [`RosterStore`](crate::recipes::roster::RosterStore) (recipe [`roster`](crate::recipes::roster)): one sorted set of lease ends
//! per roster, read by one Lua script.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;

use crate::StateResult;
use crate::backends::redis::{connect_manager, invoke, parse_redis_url, ttl_millis};
use crate::stores::roster::{
    RosterEntry, RosterLease, RosterStore, RosterVersion, lease_to_join, validate,
};

macro_rules! roster_script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("scripts/roster_prelude.lua"),
                include_str!($file)
            ))
        })
    };
}

static JOIN: LazyLock<Script> = roster_script!("scripts/roster_join.lua");
static RENEW: LazyLock<Script> = roster_script!("scripts/roster_renew.lua");
static LEAVE: LazyLock<Script> = roster_script!("scripts/roster_leave.lua");
static READ: LazyLock<Script> = roster_script!("scripts/roster_read.lua");
const TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_PREFIX: &str = "state:";

/// A [`RosterStore`] in Redis: per roster, a sorted set `{prefix}roster:{name}:deadlines` of members
/// by lease end (the server's clock), a hash `…:entries` of `token:holder:record` per member, and a
/// token counter. Every call is one script that first drops the members whose lease ended; listing is one
/// script whatever the roster's size, and [`version`](RosterStore::version) answers two numbers.
#[derive(Clone)]
pub struct RedisRosterStore {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
}

impl std::fmt::Debug for RedisRosterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRosterStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// An entry as one node stores it, with its holder (Redlock counts a member on a majority of nodes
/// only when the same holder has it there).
#[derive(Debug, Clone)]
pub(crate) struct HeldEntry {
    pub(crate) entry: RosterEntry,
    pub(crate) holder: String,
}

impl RedisRosterStore {
    /// Connects to Redis at `url`.
    ///
    /// # Errors
    /// [`StateError::InvalidInput`](crate::StateError::InvalidInput) for a malformed URL; a backend
    /// error when the server cannot be reached.
    pub async fn new(url: &str) -> StateResult<Self> {
        let target = parse_redis_url(url)?;
        Ok(Self::from_connection_manager(
            connect_manager(&target, TIMEOUT).await?,
        ))
    }

    /// Uses an existing connection (the application's own, or a lock backend's: see
    /// [`RedisDistributedLock::connection_manager`](crate::RedisDistributedLock::connection_manager)).
    pub fn from_connection_manager(conn: ConnectionManager) -> Self {
        RedisRosterStore {
            conn,
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: TIMEOUT,
        }
    }

    /// Writes its keys under `prefix` (`{prefix}roster:{name}:…`; default `state:`).
    ///
    /// # Errors
    /// [`StateError::InvalidInput`](crate::StateError::InvalidInput) for a prefix over 256 bytes.
    pub fn with_key_prefix(mut self, prefix: &str) -> StateResult<Self> {
        crate::backends::redis::validate_prefix(prefix)?;
        self.prefix = prefix.to_owned();
        Ok(self)
    }

    /// Bounds each call by `timeout` (default 2 s; Redlock uses its node timeout).
    pub(crate) fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn invocation<'a>(&self, script: &'a Script, roster: &str) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        for part in ["deadlines", "entries", "counter"] {
            invocation.key(format!("{}roster:{roster}:{part}", self.prefix));
        }
        invocation
    }

    /// Joins as `holder`, handing out a token of at least `at_least`; the token, `None` when taken.
    pub(crate) async fn join_as(
        &self,
        lease: &RosterLease,
        ttl: Duration,
        at_least: u64,
    ) -> StateResult<Option<u64>> {
        let mut invocation = self.invocation(&JOIN, &lease.roster);
        invocation
            .arg(&lease.member)
            .arg(&lease.holder)
            .arg(&lease.record)
            .arg(ttl_millis(ttl))
            .arg(at_least);
        let mut conn = self.conn.clone();
        let (joined, token): (i64, u64) = invoke(
            &mut conn,
            self.timeout,
            "redis",
            "join the roster",
            &lease.roster,
            &invocation,
        )
        .await?;
        Ok((joined == 1).then_some(token))
    }

    /// The live entries with their holders, in lease order.
    pub(crate) async fn held_entries(&self, roster: &str) -> StateResult<Vec<HeldEntry>> {
        let mut invocation = self.invocation(&READ, roster);
        invocation.arg("members");
        let mut conn = self.conn.clone();
        let flat: Vec<(String, Vec<u8>)> = invoke(
            &mut conn,
            self.timeout,
            "redis",
            "list the roster",
            roster,
            &invocation,
        )
        .await?;
        flat.into_iter()
            .map(|(member, packed)| {
                unpack(&member, &packed).ok_or_else(|| {
                    crate::StateError::backend(
                        "redis",
                        "decode",
                        roster,
                        format!("a malformed roster entry for `{member}`"),
                    )
                })
            })
            .collect()
    }
}

/// An entry as the scripts store it: `token:holder:record`.
fn unpack(member: &str, packed: &[u8]) -> Option<HeldEntry> {
    let mut parts = packed.splitn(3, |byte| *byte == b':');
    let token = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let holder = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let record = parts.next()?.to_vec();
    Some(HeldEntry {
        entry: RosterEntry {
            member: member.to_owned(),
            record,
            token,
        },
        holder,
    })
}

#[async_trait::async_trait]
impl RosterStore for RedisRosterStore {
    async fn join(
        &self,
        roster: &str,
        member: &str,
        record: &[u8],
        ttl: Duration,
    ) -> StateResult<Option<RosterLease>> {
        let mut lease = lease_to_join(roster, member, record, ttl)?;
        Ok(self.join_as(&lease, ttl, 0).await?.map(|token| {
            lease.token = token;
            lease
        }))
    }

    async fn renew(&self, lease: &RosterLease, ttl: Duration) -> StateResult<bool> {
        validate(&lease.roster, &lease.member, ttl)?;
        let mut invocation = self.invocation(&RENEW, &lease.roster);
        invocation
            .arg(&lease.member)
            .arg(&lease.holder)
            .arg(ttl_millis(ttl));
        let mut conn = self.conn.clone();
        let renewed: i64 = invoke(
            &mut conn,
            self.timeout,
            "redis",
            "renew the roster entry of",
            &lease.member,
            &invocation,
        )
        .await?;
        Ok(renewed == 1)
    }

    async fn leave(&self, lease: &RosterLease) -> StateResult<bool> {
        let mut invocation = self.invocation(&LEAVE, &lease.roster);
        invocation.arg(&lease.member).arg(&lease.holder);
        let mut conn = self.conn.clone();
        let left: i64 = invoke(
            &mut conn,
            self.timeout,
            "redis",
            "leave the roster as",
            &lease.member,
            &invocation,
        )
        .await?;
        Ok(left == 1)
    }

    async fn members(&self, roster: &str) -> StateResult<Vec<RosterEntry>> {
        let mut entries: Vec<RosterEntry> = self
            .held_entries(roster)
            .await?
            .into_iter()
            .map(|held| held.entry)
            .collect();
        entries.sort_by(|a, b| a.member.cmp(&b.member));
        Ok(entries)
    }

    async fn version(&self, roster: &str) -> StateResult<RosterVersion> {
        let mut invocation = self.invocation(&READ, roster);
        invocation.arg("version");
        let mut conn = self.conn.clone();
        let (members, newest_token): (u64, u64) = invoke(
            &mut conn,
            self.timeout,
            "redis",
            "read the roster version of",
            roster,
            &invocation,
        )
        .await?;
        Ok(RosterVersion::new(members, newest_token))
    }
}
