//! The lock's Lua scripts and the commands that call them, shared by the one-node lock and Redlock:
//! each lock operation is one `EVALSHA` written straight into one command buffer.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Cmd, Script};

use super::ttl_millis;
use crate::StateResult;

pub(crate) static ACQUIRE: LazyLock<LockScript> =
    LazyLock::new(|| LockScript::new(include_str!("scripts/acquire.lua")));
pub(crate) static RELEASE: LazyLock<LockScript> =
    LazyLock::new(|| LockScript::new(include_str!("scripts/release.lua")));
pub(crate) static EXTEND: LazyLock<LockScript> =
    LazyLock::new(|| LockScript::new(include_str!("scripts/extend.lua")));
pub(crate) static INFO: LazyLock<LockScript> =
    LazyLock::new(|| LockScript::new(include_str!("scripts/info.lua")));
/// Raises a fencing counter, never lowering it (a repair, not on any hot path: a plain `Script`).
pub(crate) static RAISE_FENCE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("scripts/raise_fence.lua")));
/// Raises a fencing counter while the caller holds the lease (Redlock's settling of a token).
pub(crate) static SETTLE_FENCE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("scripts/settle_fence.lua")));

/// A Lua script of the lock backends, sent as `EVALSHA` with its keys and arguments written straight
/// into one command buffer. redis-rs' `ScriptInvocation` first copies every key and argument into a
/// vector of its own and then into the command; these scripts run on every lock operation (on every
/// node, for Redlock), so they skip that.
pub(crate) struct LockScript {
    script: Script,
}

impl LockScript {
    fn new(code: &str) -> Self {
        LockScript {
            script: Script::new(code),
        }
    }

    /// `EVALSHA <sha1> <key_count>`: the caller appends the keys, then the arguments.
    pub(crate) fn command(&self, key_count: usize) -> Cmd {
        let mut cmd = Cmd::with_capacity(3 + 2 * key_count + 2, 160);
        cmd.arg("EVALSHA")
            .arg(self.script.get_hash())
            .arg(key_count);
        cmd
    }

    /// Sends `cmd` (built by [`command`](Self::command)) on `conn`, bounded by `timeout`. A server that
    /// does not know the script (restarted, or `SCRIPT FLUSH`) gets it loaded once and the command again.
    pub(crate) fn run<'a, T: redis::FromRedisValue + Send + 'a>(
        &'a self,
        conn: &'a mut ConnectionManager,
        timeout: Duration,
        backend: &'static str,
        operation: &'static str,
        resource: &'a str,
        cmd: &'a Cmd,
    ) -> impl Future<Output = StateResult<T>> + Send + 'a {
        let call = async move {
            match cmd.query_async(conn).await {
                Err(err)
                    if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    self.script.load_async(conn).await?;
                    cmd.query_async(conn).await
                }
                reply => reply,
            }
        };
        crate::backends::bounded(timeout, backend, operation, resource, call)
    }
}

/// A key of this backend, `<prefix><kind><resource>`, written straight into a command's buffer
/// (no `String` of its own).
#[derive(Clone, Copy)]
pub(crate) struct KeyArg<'a> {
    prefix: &'a str,
    kind: &'static str,
    resource: &'a str,
}

impl KeyArg<'_> {
    fn len(&self) -> usize {
        self.prefix.len() + self.kind.len() + self.resource.len()
    }
}

/// The lease key of `resource`, as a command argument.
pub(crate) fn lock_key_arg<'a>(prefix: &'a str, resource: &'a str) -> KeyArg<'a> {
    KeyArg {
        prefix,
        kind: "lock:",
        resource,
    }
}

/// The fencing-counter key of `resource`, as a command argument.
pub(crate) fn fence_key_arg<'a>(prefix: &'a str, resource: &'a str) -> KeyArg<'a> {
    KeyArg {
        prefix,
        kind: "fence:",
        resource,
    }
}

/// `acquire.lua` for `resource` with `lease_value` for `ttl`: the command one node (or each Redlock node)
/// gets.
pub(crate) fn acquire_command(
    prefix: &str,
    resource: &str,
    lease_value: &str,
    ttl: Duration,
) -> Cmd {
    let mut cmd = ACQUIRE.command(2);
    cmd.arg(lock_key_arg(prefix, resource))
        .arg(fence_key_arg(prefix, resource))
        .arg(lease_value)
        .arg(ttl_millis(ttl));
    cmd
}

/// `release.lua`: compare-and-delete of `lease_value`'s lease on `resource`.
pub(crate) fn release_command(prefix: &str, resource: &str, lease_value: &str) -> Cmd {
    let mut cmd = RELEASE.command(1);
    cmd.arg(lock_key_arg(prefix, resource)).arg(lease_value);
    cmd
}

/// `extend.lua`: compare-and-`PEXPIRE` of `lease_value`'s lease on `resource` to `ttl`.
pub(crate) fn extend_command(
    prefix: &str,
    resource: &str,
    lease_value: &str,
    ttl: Duration,
) -> Cmd {
    let mut cmd = EXTEND.command(1);
    cmd.arg(lock_key_arg(prefix, resource))
        .arg(lease_value)
        .arg(ttl_millis(ttl));
    cmd
}

/// `info.lua`: who holds `resource`, with which token.
pub(crate) fn info_command(prefix: &str, resource: &str) -> Cmd {
    let mut cmd = INFO.command(2);
    cmd.arg(lock_key_arg(prefix, resource))
        .arg(fence_key_arg(prefix, resource));
    cmd
}

impl redis::ToRedisArgs for KeyArg<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        out.reserve_space_for_args([self.len()]);
        let mut arg = out.writer_for_next_arg();
        // Writing into the command's in-memory buffer cannot fail.
        for part in [self.prefix, self.kind, self.resource] {
            let _ = std::io::Write::write_all(&mut arg, part.as_bytes());
        }
    }
}

impl redis::ToSingleRedisArg for KeyArg<'_> {}
