//! Tasks in etcd: one key per task (`{prefix}task/{id}`, the record as JSON). Every change is a
//! compare-and-swap on the key's mod revision, retried on conflict, applying the same step as the
//! other stores ([`TaskRecord::complete_run`] and friends). `due` and `dead_letters` read every task
//! of the prefix: fine for the hundreds of recurring jobs a fleet schedules, not for a work queue of
//! millions.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};

use crate::backends::etcd::etcd_call;
use crate::stores::tasks::{AfterFailure, TaskRecord, TaskStore};
use crate::{StateError, StateResult};

const TIMEOUT: Duration = Duration::from_secs(2);
/// Compare-and-swap attempts before a change is reported as contended.
const ATTEMPTS: usize = 32;

/// Tasks in an etcd cluster.
#[derive(Clone)]
pub struct EtcdTaskStore {
    client: Client,
    prefix: String,
}

impl std::fmt::Debug for EtcdTaskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTaskStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdTaskStore {
    /// Tasks under `prefix` (e.g. the lock backend's, `state/`) through `client`.
    pub fn new(client: Client, prefix: &str) -> Self {
        EtcdTaskStore {
            client,
            prefix: prefix.to_owned(),
        }
    }

    fn key_of(&self, id: &str) -> String {
        format!("{}task/{id}", self.prefix)
    }

    /// A get of `key` (with `options`), bounded, re-authenticating once if the token expired.
    async fn read_keys(
        &self,
        operation: &'static str,
        what: &str,
        key: String,
        options: Option<GetOptions>,
    ) -> StateResult<etcd_client::GetResponse> {
        etcd_call(&self.client, TIMEOUT, operation, what, |mut client| {
            let (key, options) = (key.clone(), options.clone());
            async move { client.get(key, options).await }
        })
        .await
    }

    /// A transaction, bounded, re-authenticating once if the token expired.
    async fn commit(
        &self,
        operation: &'static str,
        what: &str,
        txn: Txn,
    ) -> StateResult<etcd_client::TxnResponse> {
        etcd_call(&self.client, TIMEOUT, operation, what, |mut client| {
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })
        .await
    }

    fn decode(id: &str, bytes: &[u8]) -> StateResult<TaskRecord> {
        serde_json::from_slice(bytes).map_err(|err| {
            StateError::backend(
                "etcd",
                "decode",
                id,
                format!("a malformed task record: {err}"),
            )
        })
    }

    fn encode(task: &TaskRecord) -> StateResult<Vec<u8>> {
        serde_json::to_vec(task).map_err(|err| StateError::backend("etcd", "encode", &task.id, err))
    }

    #[cfg(test)]
    fn encoded(task: &TaskRecord) -> Vec<u8> {
        Self::encode(task).unwrap_or_default()
    }

    /// Every task under the prefix.
    async fn all(&self) -> StateResult<Vec<TaskRecord>> {
        let prefix = format!("{}task/", self.prefix);
        let response = self
            .read_keys(
                "list",
                "tasks",
                prefix,
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        response
            .kvs()
            .iter()
            .map(|kv| Self::decode(&String::from_utf8_lossy(kv.key()), kv.value()))
            .collect()
    }

    /// Applies `step` to task `id` with compare-and-swap: `Ok(false)` when the task is missing or
    /// `step` declines.
    async fn update(
        &self,
        id: &str,
        mut step: impl FnMut(&mut TaskRecord) -> bool + Send,
    ) -> StateResult<bool> {
        let key = self.key_of(id);
        for _ in 0..ATTEMPTS {
            let response = self.read_keys("read", id, key.clone(), None).await?;
            let Some(kv) = response.kvs().first() else {
                return Ok(false);
            };
            let mut task = Self::decode(id, kv.value())?;
            if !step(&mut task) {
                return Ok(false);
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([TxnOp::put(key.clone(), Self::encode(&task)?, None)]);
            if self.commit("update", id, txn).await?.succeeded() {
                return Ok(true);
            }
        }
        Err(StateError::backend(
            "etcd",
            "update",
            id,
            format!("still contended after {ATTEMPTS} compare-and-swap attempts"),
        ))
    }
}

#[cfg(test)]
proptest::proptest! {
    /// A task record read from etcd decodes or is an error, whatever bytes a foreign writer left
    /// (cut, flipped, extended); one this store wrote reads back equal.
    #[test]
    fn stored_task_records_decode_or_are_refused(
        id in "[a-z0-9:]{1,12}",
        payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..16),
        due_ms in proptest::prelude::any::<u64>(),
        at in proptest::prelude::any::<usize>(),
        flip in 1u8..=255,
    ) {
        let task = TaskRecord {
            id: id.clone(),
            payload,
            pending: true,
            every_ms: None,
            due_ms,
            completions: 0,
            attempts: 0,
            last_error: None,
            dead: false,
        };
        let bytes = EtcdTaskStore::encoded(&task);
        proptest::prop_assert_eq!(EtcdTaskStore::decode(&id, &bytes).ok(), Some(task));
        let mut damaged = bytes.clone();
        let at = at % damaged.len().max(1);
        if let Some(byte) = damaged.get_mut(at) {
            *byte ^= flip;
        }
        let _ = EtcdTaskStore::decode(&id, &damaged);
        let _ = EtcdTaskStore::decode(&id, &bytes[..at]);
    }
}

#[async_trait::async_trait]
impl TaskStore for EtcdTaskStore {
    async fn insert_if_missing(&self, task: &TaskRecord) -> StateResult<bool> {
        let key = self.key_of(&task.id);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, Self::encode(task)?, None)]);
        Ok(self.commit("insert", &task.id, txn).await?.succeeded())
    }

    async fn get(&self, id: &str) -> StateResult<Option<TaskRecord>> {
        let response = self.read_keys("read", id, self.key_of(id), None).await?;
        response
            .kvs()
            .first()
            .map(|kv| Self::decode(id, kv.value()))
            .transpose()
    }

    async fn due(&self, now_ms: u64, limit: usize) -> StateResult<Vec<TaskRecord>> {
        let mut due: Vec<TaskRecord> = self
            .all()
            .await?
            .into_iter()
            .filter(|t| t.pending && t.due_ms <= now_ms)
            .collect();
        due.sort_by_key(|t| t.due_ms);
        due.truncate(limit);
        Ok(due)
    }

    async fn defer(&self, id: &str, run: u64, until_ms: u64) -> StateResult<bool> {
        self.update(id, |task| task.defer_run(run, until_ms)).await
    }

    async fn complete(&self, id: &str, run: u64, next_due_ms: Option<u64>) -> StateResult<bool> {
        self.update(id, |task| task.complete_run(run, next_due_ms))
            .await
    }

    async fn fail(
        &self,
        id: &str,
        run: u64,
        error: &str,
        then: &AfterFailure,
    ) -> StateResult<bool> {
        self.update(id, |task| task.fail_run(run, error, then))
            .await
    }

    async fn dead_letters(&self, limit: usize) -> StateResult<Vec<TaskRecord>> {
        let mut dead: Vec<TaskRecord> = self.all().await?.into_iter().filter(|t| t.dead).collect();
        dead.sort_by(|a, b| a.id.cmp(&b.id));
        dead.truncate(limit);
        Ok(dead)
    }

    async fn requeue(&self, id: &str, due_ms: u64) -> StateResult<bool> {
        self.update(id, |task| task.requeue_dead(due_ms)).await
    }
}
