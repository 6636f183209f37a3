//! Fenced values in etcd: one key per value (`{prefix}fenced/{key}`: the highest token as 8
//! big-endian bytes, then the value if one was written), changed with a compare-and-swap on the key's
//! mod revision — a write or fence whose token is below the stored one is refused, whatever
//! interleaving.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};

use crate::backends::etcd::etcd_call;
use crate::stores::fenced::{FencedStore, FencedValue, stale};
use crate::{StateError, StateResult};

const TIMEOUT: Duration = Duration::from_secs(2);
const ATTEMPTS: usize = 32;

/// Fenced values in an etcd cluster.
#[derive(Clone)]
pub struct EtcdFencedStore {
    client: Client,
    prefix: String,
}

impl std::fmt::Debug for EtcdFencedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdFencedStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdFencedStore {
    /// Values under `prefix` (e.g. the lock backend's, `state/`) through `client`.
    pub fn new(client: Client, prefix: &str) -> Self {
        EtcdFencedStore {
            client,
            prefix: prefix.to_owned(),
        }
    }

    fn key_of(&self, key: &str) -> String {
        format!("{}fenced/{key}", self.prefix)
    }
}

/// A stored record: the highest accepted token (8 big-endian bytes), then `1` and the value, or `0`
/// when the key was fenced before any write.
fn decode(key: &str, bytes: &[u8]) -> StateResult<(u64, Option<Vec<u8>>)> {
    let malformed = || StateError::backend("etcd", "decode", key, "a malformed fenced record");
    let (token, rest) = bytes.split_first_chunk::<8>().ok_or_else(malformed)?;
    let value = match rest.split_first() {
        Some((0, [])) => None,
        Some((1, value)) => Some(value.to_vec()),
        _ => return Err(malformed()),
    };
    Ok((u64::from_be_bytes(*token), value))
}

fn encode(token: u64, value: Option<&[u8]>) -> Vec<u8> {
    let mut bytes = token.to_be_bytes().to_vec();
    match value {
        Some(value) => {
            bytes.push(1);
            bytes.extend_from_slice(value);
        }
        None => bytes.push(0),
    }
    bytes
}

#[cfg(test)]
proptest::proptest! {
    /// Whatever bytes sit under a fenced key, reading them never panics; what the store writes reads
    /// back.
    #[test]
    fn stored_fenced_records_decode_or_are_refused(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
        token in proptest::prelude::any::<u64>(),
        fenced_only in proptest::prelude::any::<bool>(),
    ) {
        let _ = decode("k", &bytes);
        let value = (!fenced_only).then_some(bytes.as_slice());
        let read = decode("k", &encode(token, value)).expect("a stored record decodes");
        proptest::prop_assert_eq!(read, (token, value.map(<[u8]>::to_vec)));
    }
}

impl EtcdFencedStore {
    /// Raises `key`'s highest token to `token` (refused if lower) and, with `value`, writes it; the
    /// value before. One compare-and-swap on the key's mod revision, retried on contention.
    async fn raise(
        &self,
        key: &str,
        token: u64,
        value: Option<&[u8]>,
    ) -> StateResult<Option<FencedValue>> {
        let stored_key = self.key_of(key);
        for _ in 0..ATTEMPTS {
            let current = etcd_call(&self.client, TIMEOUT, "read", key, |mut client| {
                let stored_key = stored_key.clone();
                async move { client.get(stored_key, None).await }
            })
            .await?;
            let (compare, before) = match current.kvs().first() {
                Some(kv) => {
                    let (highest, before) = decode(key, kv.value())?;
                    if token < highest {
                        return Err(stale(key, token, highest));
                    }
                    let compare = Compare::mod_revision(
                        stored_key.clone(),
                        CompareOp::Equal,
                        kv.mod_revision(),
                    );
                    (compare, before)
                }
                None => (
                    Compare::create_revision(stored_key.clone(), CompareOp::Equal, 0),
                    None,
                ),
            };
            let record = encode(token, value.or(before.as_deref()));
            let txn =
                Txn::new()
                    .when([compare])
                    .and_then([TxnOp::put(stored_key.clone(), record, None)]);
            let written = etcd_call(&self.client, TIMEOUT, "write", key, |mut client| {
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await?;
            if written.succeeded() {
                return Ok(before.map(|value| FencedValue { token, value }));
            }
        }
        Err(StateError::backend(
            "etcd",
            "write",
            key,
            format!("still contended after {ATTEMPTS} compare-and-swap attempts"),
        ))
    }
}

#[async_trait::async_trait]
impl FencedStore for EtcdFencedStore {
    async fn write(&self, key: &str, token: u64, value: &[u8]) -> StateResult<()> {
        self.raise(key, token, Some(value)).await.map(|_| ())
    }

    async fn read(&self, key: &str) -> StateResult<Option<FencedValue>> {
        let stored_key = self.key_of(key);
        let current = etcd_call(&self.client, TIMEOUT, "read", key, |mut client| {
            let stored_key = stored_key.clone();
            async move { client.get(stored_key, None).await }
        })
        .await?;
        let Some(kv) = current.kvs().first() else {
            return Ok(None);
        };
        let (token, value) = decode(key, kv.value())?;
        Ok(value.map(|value| FencedValue { token, value }))
    }

    async fn fence(&self, key: &str, token: u64) -> StateResult<Option<FencedValue>> {
        self.raise(key, token, None).await
    }
}
