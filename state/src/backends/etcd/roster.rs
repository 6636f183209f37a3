//! The etcd [`RosterStore`](crate::recipes::roster::RosterStore) (recipe [`roster`](crate::recipes::roster)): one key per member under the roster's
//! prefix, attached to a lease of the member's TTL — etcd deletes it when the lease ends; listing is one
//! range read over the prefix. A member's token is its key's create revision.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};

use crate::backends::etcd::{etcd_call, lease_seconds};
use crate::stores::roster::{
    RosterEntry, RosterLease, RosterStore, RosterVersion, lease_to_join, validate,
};
use crate::{StateError, StateResult};

const TIMEOUT: Duration = Duration::from_secs(2);

/// A [`RosterStore`] in an etcd cluster: `{prefix}roster/{len}:{roster}/{member}` = holder, newline,
/// record, on a lease of the TTL (etcd counts leases in whole seconds); `{prefix}roster/{len}:{roster}`
/// is rewritten by every join, so that its mod revision and the member count are the roster's
/// [`RosterVersion`] (one transaction of two count reads).
#[derive(Clone)]
pub struct EtcdRosterStore {
    client: Client,
    prefix: String,
}

impl std::fmt::Debug for EtcdRosterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRosterStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdRosterStore {
    /// Rosters under `prefix` (e.g. the lock backend's, `state/`) through `client`.
    pub fn new(client: Client, prefix: &str) -> Self {
        EtcdRosterStore {
            client,
            prefix: prefix.to_owned(),
        }
    }

    /// The key rewritten by each join; the members' keys are under it and a slash. The roster's
    /// length in front keeps one roster's keys out of every other's prefix.
    fn joins_key(&self, roster: &str) -> String {
        format!("{}roster/{}:{roster}", self.prefix, roster.len())
    }

    fn member_key(&self, roster: &str, member: &str) -> String {
        format!("{}/{member}", self.joins_key(roster))
    }

    async fn call<T, F>(
        &self,
        operation: &'static str,
        resource: &str,
        call: impl Fn(Client) -> F,
    ) -> StateResult<T>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        etcd_call(&self.client, TIMEOUT, operation, resource, call).await
    }

    async fn grant(&self, member: &str, ttl: Duration) -> StateResult<i64> {
        let seconds = lease_seconds(ttl);
        let granted = self
            .call(
                "grant a roster lease for",
                member,
                |mut client| async move { client.lease_grant(seconds, None).await },
            )
            .await?;
        Ok(granted.id())
    }

    /// Revokes `lease`, best effort (it ends by itself otherwise).
    async fn revoke(&self, member: &str, lease: i64) {
        let revoked = self
            .call(
                "revoke a roster lease for",
                member,
                |mut client| async move { client.lease_revoke(lease).await },
            )
            .await;
        if let Err(err) = revoked {
            tracing::debug!(member, lease, error = %err, "roster lease not revoked (it ends by itself)");
        }
    }

    async fn txn(
        &self,
        operation: &'static str,
        member: &str,
        txn: Txn,
    ) -> StateResult<etcd_client::TxnResponse> {
        self.call(operation, member, |mut client| {
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })
        .await
    }

    /// The comparisons that hold while `lease`'s entry is its holder's.
    fn still_held(&self, lease: &RosterLease) -> [Compare; 2] {
        let key = self.member_key(&lease.roster, &lease.member);
        [
            Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                i64::try_from(lease.token).unwrap_or(i64::MAX),
            ),
            Compare::value(key, CompareOp::Equal, encode(lease)),
        ]
    }
}

fn encode(lease: &RosterLease) -> Vec<u8> {
    let mut value = lease.holder.as_bytes().to_vec();
    value.push(b'\n');
    value.extend_from_slice(&lease.record);
    value
}

fn to_u64(revision: i64) -> u64 {
    u64::try_from(revision).unwrap_or(0)
}

#[async_trait::async_trait]
impl RosterStore for EtcdRosterStore {
    async fn join(
        &self,
        roster: &str,
        member: &str,
        record: &[u8],
        ttl: Duration,
    ) -> StateResult<Option<RosterLease>> {
        let mut lease = lease_to_join(roster, member, record, ttl)?;
        let lease_id = self.grant(member, ttl).await?;
        let key = self.member_key(roster, member);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(
                    key,
                    encode(&lease),
                    Some(PutOptions::new().with_lease(lease_id)),
                ),
                TxnOp::put(self.joins_key(roster), member, None),
            ]);
        let response = self.txn("join the roster as", member, txn).await?;
        if !response.succeeded() {
            self.revoke(member, lease_id).await;
            return Ok(None);
        }
        let revision = response.header().map(|header| header.revision());
        lease.token = to_u64(revision.unwrap_or(0));
        Ok(Some(lease))
    }

    async fn renew(&self, lease: &RosterLease, ttl: Duration) -> StateResult<bool> {
        validate(&lease.roster, &lease.member, ttl)?;
        // A fresh lease of `ttl` attached while the entry is still this holder's (a put keeps the
        // key's create revision, its token); the old lease is then revoked.
        let fresh = self.grant(&lease.member, ttl).await?;
        let key = self.member_key(&lease.roster, &lease.member);
        let txn = Txn::new().when(self.still_held(lease)).and_then([
            TxnOp::get(key.clone(), None),
            TxnOp::put(
                key,
                encode(lease),
                Some(PutOptions::new().with_lease(fresh)),
            ),
        ]);
        let response = self
            .txn("renew the roster entry of", &lease.member, txn)
            .await?;
        if !response.succeeded() {
            self.revoke(&lease.member, fresh).await;
            return Ok(false);
        }
        let old = response.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.lease()),
            _ => None,
        });
        if let Some(old) = old.filter(|old| *old != 0 && *old != fresh) {
            self.revoke(&lease.member, old).await;
        }
        Ok(true)
    }

    async fn leave(&self, lease: &RosterLease) -> StateResult<bool> {
        let key = self.member_key(&lease.roster, &lease.member);
        let txn = Txn::new()
            .when(self.still_held(lease))
            .and_then([TxnOp::delete(key, None)]);
        let response = self.txn("leave the roster as", &lease.member, txn).await?;
        Ok(response.succeeded())
    }

    async fn members(&self, roster: &str) -> StateResult<Vec<RosterEntry>> {
        let members_prefix = format!("{}/", self.joins_key(roster));
        let response = self
            .call("list the roster", roster, |mut client| {
                let members_prefix = members_prefix.clone();
                async move {
                    client
                        .get(members_prefix, Some(GetOptions::new().with_prefix()))
                        .await
                }
            })
            .await?;
        let malformed =
            || StateError::backend("etcd", "decode", roster, "a malformed roster entry");
        let mut entries = Vec::with_capacity(response.kvs().len());
        for kv in response.kvs() {
            let member = kv
                .key()
                .strip_prefix(members_prefix.as_bytes())
                .and_then(|name| std::str::from_utf8(name).ok())
                .ok_or_else(malformed)?;
            let (_holder, record) = kv.value().split_at(
                kv.value()
                    .iter()
                    .position(|b| *b == b'\n')
                    .ok_or_else(malformed)?,
            );
            entries.push(RosterEntry {
                member: member.to_owned(),
                record: record[1..].to_vec(),
                token: to_u64(kv.create_revision()),
            });
        }
        Ok(entries)
    }

    async fn version(&self, roster: &str) -> StateResult<RosterVersion> {
        let joins = self.joins_key(roster);
        let txn = Txn::new().and_then([
            TxnOp::get(
                format!("{joins}/"),
                Some(GetOptions::new().with_prefix().with_count_only()),
            ),
            TxnOp::get(joins, Some(GetOptions::new().with_keys_only())),
        ]);
        let response = self.txn("read the roster version of", roster, txn).await?;
        let mut answers = response
            .op_responses()
            .into_iter()
            .filter_map(|op| match op {
                TxnOpResponse::Get(get) => Some(get),
                _ => None,
            });
        let members = answers.next().map_or(0, |get| get.count());
        let newest = answers
            .next()
            .and_then(|get| get.kvs().first().map(|kv| kv.mod_revision()))
            .unwrap_or(0);
        Ok(RosterVersion::new(to_u64(members), to_u64(newest)))
    }
}
