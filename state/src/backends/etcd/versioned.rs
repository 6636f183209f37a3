//! The etcd [`VersionedStore`](crate::recipes::versioned::VersionedStore): optimistic versioned updates (recipe [`versioned`](crate::recipes::versioned)).

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};

use crate::backends::etcd::etcd_call;
use crate::stores::versioned::{CasWrite, Versioned, VersionedStore};
use crate::{StateError, StateResult};

const TIMEOUT: Duration = Duration::from_secs(2);

/// A [`VersionedStore`] in etcd: one key `{prefix}versioned/{key}` per value, whose version is etcd's
/// own per-key `version` (1 at creation, +1 per write); the multi-key compare-and-set is one
/// transaction comparing every key's version (create revision 0 for "absent") before any put.
#[derive(Clone)]
pub struct EtcdVersionedStore {
    client: Client,
    prefix: String,
}

impl std::fmt::Debug for EtcdVersionedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdVersionedStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdVersionedStore {
    /// Values under `prefix` (e.g. the lock backend's, `state/`) through `client`.
    pub fn new(client: Client, prefix: &str) -> Self {
        EtcdVersionedStore {
            client,
            prefix: prefix.to_owned(),
        }
    }

    fn key_of(&self, key: &str) -> String {
        format!("{}versioned/{key}", self.prefix)
    }
}

#[async_trait::async_trait]
impl VersionedStore for EtcdVersionedStore {
    async fn get(&self, key: &str) -> StateResult<Option<Versioned>> {
        let stored_key = self.key_of(key);
        let response = etcd_call(&self.client, TIMEOUT, "read", key, |mut client| {
            let stored_key = stored_key.clone();
            async move { client.get(stored_key, None).await }
        })
        .await?;
        Ok(response.kvs().first().map(|kv| Versioned {
            version: u64::try_from(kv.version()).unwrap_or(0),
            value: kv.value().to_vec(),
        }))
    }

    async fn compare_and_set(&self, writes: &[CasWrite]) -> StateResult<bool> {
        let label = writes.first().map_or("", |w| w.key.as_str());
        let mut compares = Vec::with_capacity(writes.len());
        let mut puts = Vec::with_capacity(writes.len());
        for write in writes {
            let key = self.key_of(&write.key);
            let expected = i64::try_from(write.expected).map_err(|_| {
                StateError::invalid(
                    "expected version",
                    format!("{} of `{}` is out of range", write.expected, write.key),
                )
            })?;
            compares.push(match expected {
                0 => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                _ => Compare::version(key.clone(), CompareOp::Equal, expected),
            });
            puts.push(TxnOp::put(key, write.value.clone(), None));
        }
        let txn = Txn::new().when(compares).and_then(puts);
        let response = etcd_call(
            &self.client,
            TIMEOUT,
            "compare-and-set",
            label,
            |mut client| {
                let txn = txn.clone();
                async move { client.txn(txn).await }
            },
        )
        .await?;
        Ok(response.succeeded())
    }
}
