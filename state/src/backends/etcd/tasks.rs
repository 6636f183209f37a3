//! Tasks in etcd: one key per task (`{prefix}task/{id}`, the record as JSON) and, while it is pending,
//! one index key by due time (`{prefix}tasks-due/{due_ms, 20 digits}/{id}`). Every change is a
//! compare-and-swap on the record's mod revision, retried on conflict, applying the same step as the
//! other stores ([`TaskRecord::complete_run`] and friends) and moving the index key in the same
//! transaction. `due` reads only the index's due range and then the records it names, in one
//! transaction: its cost follows the page, not the number of tasks stored. `dead_letters` (an operator's
//! call) still reads every task.
//!
//! A store written before the index existed is indexed once, by the first `due` of a process that finds
//! no `{prefix}tasks-due-indexed` marker; an index key that no longer matches its record (a change that
//! raced that one-time indexing) is deleted when a page meets it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};

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
    /// Whether this process has seen the due index built (the marker key).
    indexed: Arc<AtomicBool>,
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
            indexed: Arc::new(AtomicBool::new(false)),
        }
    }

    fn key_of(&self, id: &str) -> String {
        format!("{}task/{id}", self.prefix)
    }

    fn due_prefix(&self) -> String {
        format!("{}tasks-due/", self.prefix)
    }

    /// The index key of `task` while it is pending.
    fn due_key_of(&self, task: &TaskRecord) -> Option<String> {
        task.pending
            .then(|| format!("{}{:020}/{}", self.due_prefix(), task.due_ms, task.id))
    }

    fn marker_key(&self) -> String {
        format!("{}tasks-due-indexed", self.prefix)
    }

    /// The operations that move `task`'s index key from `before` to `after`.
    fn reindex(&self, before: Option<&TaskRecord>, after: &TaskRecord) -> Vec<TxnOp> {
        let old = before.and_then(|task| self.due_key_of(task));
        let new = self.due_key_of(after);
        if old == new {
            return Vec::new();
        }
        let mut ops = Vec::new();
        if let Some(old) = old {
            ops.push(TxnOp::delete(old, None));
        }
        if let Some(new) = new {
            ops.push(TxnOp::put(new, Vec::new(), None));
        }
        ops
    }

    /// Builds the due index of a store written before it existed, once (then the marker says so).
    async fn ensure_indexed(&self) -> StateResult<()> {
        if self.indexed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let marker = self
            .read_keys(
                "read",
                "tasks",
                self.marker_key(),
                Some(GetOptions::new().with_count_only()),
            )
            .await?;
        if marker.count() == 0 {
            for task in self.all().await? {
                if let Some(key) = self.due_key_of(&task) {
                    let txn = Txn::new().and_then([TxnOp::put(key, Vec::new(), None)]);
                    self.commit("index", &task.id, txn).await?;
                }
            }
            let txn = Txn::new().and_then([TxnOp::put(self.marker_key(), Vec::new(), None)]);
            self.commit("index", "tasks", txn).await?;
            tracing::info!(prefix = %self.prefix, "etcd task store: due index built");
        }
        self.indexed.store(true, Ordering::Relaxed);
        Ok(())
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
            let before = Self::decode(id, kv.value())?;
            let mut task = before.clone();
            if !step(&mut task) {
                return Ok(false);
            }
            let mut ops = vec![TxnOp::put(key.clone(), Self::encode(&task)?, None)];
            ops.extend(self.reindex(Some(&before), &task));
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then(ops);
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
        let mut ops = vec![TxnOp::put(key.clone(), Self::encode(task)?, None)];
        ops.extend(self.reindex(None, task));
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then(ops);
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
        self.ensure_indexed().await?;
        let start = self.due_prefix();
        let end = format!("{start}{:020}", now_ms.saturating_add(1));
        let page = self
            .read_keys(
                "list",
                "tasks",
                start.clone(),
                Some(
                    GetOptions::new()
                        .with_range(end)
                        .with_keys_only()
                        .with_limit(i64::try_from(limit).unwrap_or(i64::MAX)),
                ),
            )
            .await?;
        let listed: Vec<(String, String)> = page
            .kvs()
            .iter()
            .filter_map(|kv| {
                let index_key = String::from_utf8_lossy(kv.key()).into_owned();
                let id = index_key
                    .strip_prefix(&start)?
                    .split_once('/')?
                    .1
                    .to_owned();
                Some((index_key, id))
            })
            .collect();
        if listed.is_empty() {
            return Ok(Vec::new());
        }
        let reads = Txn::new().and_then(
            listed
                .iter()
                .map(|(_, id)| TxnOp::get(self.key_of(id), None))
                .collect::<Vec<_>>(),
        );
        let records = self.commit("list", "tasks", reads).await?;
        let mut due = Vec::with_capacity(listed.len());
        for ((index_key, id), answer) in listed.into_iter().zip(records.op_responses()) {
            let TxnOpResponse::Get(get) = answer else {
                continue;
            };
            let (task, revision) = match get.kvs().first() {
                Some(kv) => (Some(Self::decode(&id, kv.value())?), kv.mod_revision()),
                None => (None, 0),
            };
            match task {
                Some(task) if self.due_key_of(&task).as_deref() == Some(index_key.as_str()) => {
                    due.push(task);
                }
                // The record moved on without this key (a change that raced the one-time indexing):
                // the key is stale — deleted unless the record changed since it was read.
                _ => {
                    let unchanged = if revision == 0 {
                        Compare::create_revision(self.key_of(&id), CompareOp::Equal, 0)
                    } else {
                        Compare::mod_revision(self.key_of(&id), CompareOp::Equal, revision)
                    };
                    let txn = Txn::new()
                        .when([unchanged])
                        .and_then([TxnOp::delete(index_key, None)]);
                    self.commit("index", &id, txn).await?;
                }
            }
        }
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
