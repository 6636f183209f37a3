//! Your own job on the fleet: a typed [`Job`] declares its key, value, state and output types with the
//! [codecs](codec) that carry them, and processes one typed [`Input`] at a time through a [`Context`]:
//! typed state per key (read-your-writes across the whole partition, written at each commit in ONE
//! atomic batch with the offset and the fencing token), typed outputs, the record's timestamp and
//! headers. [`JobOperator`] runs a job wherever an [`Operator`] runs: set it as
//! [`Services::operator`](crate::Services) and the fleet, its checkpoints and its exactly-once outputs
//! work for it unchanged.
//!
//! A record the job cannot take — its key or value does not decode, or [`Job::process`] returns
//! [`JobError::Reject`] — follows the job's [`OnError`] policy: dead-lettered with the reason (the
//! default; the partition moves on), or the partition stops with [`ProcessorError::Rejected`] naming the
//! offset. A [`JobError::Fatal`] (a store error behind the state, say) always stops the partition. Never a
//! panic.
//!
//! ```
//! use std::sync::Arc;
//! use processor::job::{Context, Input, Job, JobError, JobOperator, codec};
//! use processor::operator::Record;
//! use processor::partition::PartitionProcessor;
//! use processor::store::{PartitionStore, memory::InMemoryPartitionStore};
//!
//! /// Page views per user, published as `{"views": n}`.
//! struct ViewsPerUser;
//!
//! #[derive(serde::Serialize)]
//! struct Views {
//!     views: u64,
//! }
//!
//! impl Job for ViewsPerUser {
//!     type Key = String;
//!     type KeyCodec = codec::Utf8;
//!     type Value = serde_json::Value;
//!     type ValueCodec = codec::Json;
//!     type State = u64;
//!     type StateCodec = codec::Bincode;
//!     type Output = serde_json::Value;
//!     type OutputCodec = codec::Json;
//!
//!     fn process(&self, input: Input<'_, String, serde_json::Value>, ctx: &mut Context<'_, Self>) -> Result<(), JobError> {
//!         if input.value.get("page").is_none() {
//!             return Err(JobError::reject("a view without a page"));
//!         }
//!         let views = ctx.update_state(|views| Some(views.unwrap_or(0) + 1))?.unwrap_or(0);
//!         ctx.emit(&serde_json::json!({ "user": input.key, "views": views }))?;
//!         Ok(())
//!     }
//! }
//!
//! # fn main() -> processor::ProcessorResult<()> {
//! let store: Arc<dyn PartitionStore> = Arc::new(InMemoryPartitionStore::new(0));
//! let mut partition = PartitionProcessor::resume(store, Arc::new(JobOperator::new(ViewsPerUser)), 1, Default::default())?;
//! let report = partition.process(&[
//!     Record::new(0, 0, Some(b"ada"), Some(br#"{"page": "/"}"#)),
//!     Record::new(0, 1, Some(b"ada"), Some(br#"{"page": "/docs"}"#)),
//!     Record::new(0, 2, Some(b"bob"), Some(b"{}")),
//! ])?;
//! assert_eq!(report.outputs.len(), 2);
//! assert_eq!(report.outputs[1].1, br#"{"user":"ada","views":2}"#);
//! assert_eq!(report.dead_letters, vec![(2, "a view without a page".to_owned())]);
//! # Ok(())
//! # }
//! ```

pub mod codec;
pub mod window;

use std::marker::PhantomData;

pub use codec::Codec;

use crate::error::{ProcessorError, ProcessorResult};
use crate::operator::{Emitter, Header, Operator, Outcome, Record};
use crate::store::PartitionState;

/// What happens to a record the job cannot take (undecodable, or rejected by [`Job::process`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnError {
    /// It goes to the dead letters with the reason, and the partition moves on.
    #[default]
    DeadLetter,
    /// The partition stops at it ([`ProcessorError::Rejected`]): nothing after it is processed; the
    /// instance releases the partition and leaves it unclaimed for
    /// [`InstanceConfig::rejected_record_pause`](crate::InstanceConfig::rejected_record_pause) (30 s by
    /// default) before trying again (a fixed job deployed meanwhile starts it at once).
    Stop,
}

/// Why [`Job::process`] did not take a record.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The record is bad (a poison record): it follows the job's [`OnError`] policy. Writes the job made
    /// for it before rejecting it stay (reject before writing).
    #[error("{0}")]
    Reject(String),
    /// Something other than the record failed (the store, a stored value that does not decode): the
    /// partition stops, whatever the policy.
    #[error(transparent)]
    Fatal(#[from] ProcessorError),
}

impl JobError {
    /// A rejection of the record, with the reason dead letters carry.
    pub fn reject(reason: impl std::fmt::Display) -> Self {
        JobError::Reject(reason.to_string())
    }
}

/// A typed record: the decoded key and value, and where and when it was produced.
#[derive(Debug)]
#[non_exhaustive]
pub struct Input<'r, K, V> {
    /// The decoded key.
    pub key: K,
    /// The decoded value.
    pub value: V,
    /// The record's timestamp (milliseconds since the Unix epoch), if it has one.
    pub timestamp: Option<i64>,
    /// Its headers.
    pub headers: &'r [Header<'r>],
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The key's bytes as consumed.
    pub raw_key: &'r [u8],
}

impl<K, V> Input<'_, K, V> {
    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|header| header.name == name)
            .and_then(|header| header.value)
    }
}

/// A typed job: what the fleet runs for you, one record at a time, per partition. Must be deterministic
/// (the same records in the same order give the same state and outputs, on whichever instance), since
/// a partition that moves replays from its last checkpoint.
pub trait Job: Send + Sync + Sized + 'static {
    /// The records' key type.
    type Key;
    /// How keys are carried.
    type KeyCodec: Codec<Self::Key>;
    /// The records' value type.
    type Value;
    /// How values are carried.
    type ValueCodec: Codec<Self::Value>;
    /// The state kept per key.
    type State;
    /// How state is stored.
    type StateCodec: Codec<Self::State>;
    /// What the job publishes.
    type Output;
    /// How outputs are published.
    type OutputCodec: Codec<Self::Output>;

    /// Processes one record.
    ///
    /// # Errors
    /// [`JobError::Reject`] for a bad record (the [`on_error`](Self::on_error) policy applies);
    /// [`JobError::Fatal`] (what `?` makes of the context's errors) stops the partition.
    fn process(
        &self,
        input: Input<'_, Self::Key, Self::Value>,
        ctx: &mut Context<'_, Self>,
    ) -> Result<(), JobError>;

    /// What happens to a record the job cannot take. Dead letters unless overridden.
    fn on_error(&self) -> OnError {
        OnError::DeadLetter
    }

    /// A key's state as JSON, for queries of live state (`GET /state/{key}`); `None` (the default):
    /// the query shows the stored bytes in hex.
    fn render_state(&self, state: &Self::State) -> Option<serde_json::Value> {
        let _ = state;
        None
    }

    /// Whether [`process`](Self::process) reads [`Input::headers`] (the default: yes). A job that never
    /// does says `false` and is handed every record without headers, which spares an allocation per
    /// record in the Kafka client (see [`Operator::reads_headers`]).
    fn reads_headers(&self) -> bool {
        true
    }
}

/// What [`Job::process`] works with: the partition's typed state and outputs, for the record's key or
/// any other.
pub struct Context<'c, J: Job> {
    raw_key: &'c [u8],
    state: &'c mut PartitionState,
    out: Emitter<'c>,
    scratch: Vec<u8>,
    job: PhantomData<fn() -> J>,
}

impl<J: Job> std::fmt::Debug for Context<'_, J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("state", &self.state)
            .field("out", &self.out)
            .finish_non_exhaustive()
    }
}

fn decode_state<J: Job>(bytes: &[u8]) -> ProcessorResult<J::State> {
    J::StateCodec::decode(bytes).map_err(|err| ProcessorError::decode("a job's stored state", err))
}

impl<J: Job> Context<'_, J> {
    /// The state of the record's key.
    ///
    /// # Errors
    /// A store error, or stored state that does not decode.
    pub fn state(&mut self) -> ProcessorResult<Option<J::State>> {
        self.state
            .get(self.raw_key)?
            .map(decode_state::<J>)
            .transpose()
    }

    /// Sets the state of the record's key (written at the next commit).
    ///
    /// # Errors
    /// The state does not encode.
    pub fn set_state(&mut self, state: &J::State) -> ProcessorResult<()> {
        self.encode_state(state)?;
        self.state.put_slice(self.raw_key, &self.scratch);
        Ok(())
    }

    /// Replaces the state of the record's key with `f(current)` (`None` deletes it) with one lookup,
    /// and returns the new state.
    ///
    /// # Errors
    /// A store error, or state that does not decode or encode.
    pub fn update_state(
        &mut self,
        f: impl FnOnce(Option<J::State>) -> Option<J::State>,
    ) -> ProcessorResult<Option<J::State>> {
        let mut entry = self.state.entry(self.raw_key)?;
        let current = entry.value().map(decode_state::<J>).transpose()?;
        let next = f(current);
        match &next {
            Some(state) => {
                self.scratch.clear();
                J::StateCodec::encode(state, &mut self.scratch)
                    .map_err(|err| ProcessorError::encode("a job's state", err))?;
                entry.set(&self.scratch);
            }
            None => entry.delete(),
        }
        Ok(next)
    }

    /// Removes the state of the record's key.
    pub fn delete_state(&mut self) {
        self.state.delete(self.raw_key);
    }

    /// The state of another `key`.
    ///
    /// # Errors
    /// The key does not encode; a store error; stored state that does not decode.
    pub fn state_of(&mut self, key: &J::Key) -> ProcessorResult<Option<J::State>> {
        let key = encode_key::<J>(key)?;
        self.state.get(&key)?.map(decode_state::<J>).transpose()
    }

    /// Sets the state of another `key`.
    ///
    /// # Errors
    /// The key or the state does not encode.
    pub fn set_state_of(&mut self, key: &J::Key, state: &J::State) -> ProcessorResult<()> {
        let key = encode_key::<J>(key)?;
        self.encode_state(state)?;
        self.state.put_slice(&key, &self.scratch);
        Ok(())
    }

    /// Removes the state of another `key`.
    ///
    /// # Errors
    /// The key does not encode.
    pub fn delete_state_of(&mut self, key: &J::Key) -> ProcessorResult<()> {
        let key = encode_key::<J>(key)?;
        self.state.delete(&key);
        Ok(())
    }

    /// Whether outputs go anywhere (the partition has an output topic): skip building them if not.
    pub fn outputs_enabled(&self) -> bool {
        self.out.enabled()
    }

    /// Publishes `output` under the record's key (at the next commit; per the partition's
    /// [`OutputMode`](crate::operator::OutputMode)).
    ///
    /// # Errors
    /// The output does not encode.
    pub fn emit(&mut self, output: &J::Output) -> ProcessorResult<()> {
        if self.out.enabled() {
            let value = encode_output::<J>(output)?;
            self.out.emit(self.raw_key, value);
        }
        Ok(())
    }

    /// Publishes `output` under another `key`.
    ///
    /// # Errors
    /// The key or the output does not encode.
    pub fn emit_to(&mut self, key: &J::Key, output: &J::Output) -> ProcessorResult<()> {
        if self.out.enabled() {
            let key = encode_key::<J>(key)?;
            let value = encode_output::<J>(output)?;
            self.out.emit(&key, value);
        }
        Ok(())
    }

    /// The partition's state as bytes, for state a job lays out itself (composite keys: windows, say).
    /// Shares the cache and the atomic commit with the typed state; keys must not collide with the
    /// typed state's (prefix them).
    pub fn raw_state(&mut self) -> &mut PartitionState {
        self.state
    }

    /// Publishes raw bytes (a job laying out its outputs itself).
    pub fn emit_raw(&mut self, key: &[u8], value: Vec<u8>) {
        self.out.emit(key, value);
    }

    fn encode_state(&mut self, state: &J::State) -> ProcessorResult<()> {
        self.scratch.clear();
        J::StateCodec::encode(state, &mut self.scratch)
            .map_err(|err| ProcessorError::encode("a job's state", err))
    }
}

fn encode_key<J: Job>(key: &J::Key) -> ProcessorResult<Vec<u8>> {
    let mut bytes = Vec::new();
    J::KeyCodec::encode(key, &mut bytes)
        .map_err(|err| ProcessorError::encode("a job's key", err))?;
    Ok(bytes)
}

fn encode_output<J: Job>(output: &J::Output) -> ProcessorResult<Vec<u8>> {
    let mut bytes = Vec::new();
    J::OutputCodec::encode(output, &mut bytes)
        .map_err(|err| ProcessorError::encode("a job's output", err))?;
    Ok(bytes)
}

/// Runs a [`Job`] as an [`Operator`]: decodes each record, calls the job, applies its error policy.
#[derive(Debug, Clone, Default)]
pub struct JobOperator<J> {
    job: J,
}

impl<J: Job> JobOperator<J> {
    /// The operator running `job`.
    pub fn new(job: J) -> Self {
        JobOperator { job }
    }

    /// The job.
    pub fn job(&self) -> &J {
        &self.job
    }

    /// What the policy makes of a record the job could not take.
    fn refuse(&self, record: &Record<'_>, reason: String) -> ProcessorResult<Outcome> {
        metrics::counter!("processor_job_rejected_total").increment(1);
        match self.job.on_error() {
            OnError::DeadLetter => Ok(Outcome::DeadLetter { reason }),
            OnError::Stop => Err(ProcessorError::Rejected {
                partition: record.partition,
                offset: record.offset,
                reason,
            }),
        }
    }
}

impl<J: Job> Operator for JobOperator<J> {
    fn apply(
        &self,
        record: &Record<'_>,
        state: &mut PartitionState,
        out: &mut Emitter<'_>,
    ) -> ProcessorResult<Outcome> {
        let Some(raw_key) = record.key else {
            return self.refuse(record, "no key".to_owned());
        };
        let key = match J::KeyCodec::decode(raw_key) {
            Ok(key) => key,
            Err(err) => return self.refuse(record, format!("key does not decode: {err}")),
        };
        let Some(raw_value) = record.value else {
            return self.refuse(record, "no value".to_owned());
        };
        let value = match J::ValueCodec::decode(raw_value) {
            Ok(value) => value,
            Err(err) => return self.refuse(record, err.to_string()),
        };
        let input = Input {
            key,
            value,
            timestamp: record.timestamp,
            headers: record.headers,
            partition: record.partition,
            offset: record.offset,
            raw_key,
        };
        let mut ctx = Context::<J> {
            raw_key,
            state,
            out: out.reborrow(),
            // One encoding buffer per thread, reused record after record.
            scratch: SCRATCH.take(),
            job: PhantomData,
        };
        let processed = self.job.process(input, &mut ctx);
        SCRATCH.set(ctx.scratch);
        match processed {
            Ok(()) => Ok(Outcome::Applied),
            Err(JobError::Reject(reason)) => self.refuse(record, reason),
            Err(JobError::Fatal(err)) => Err(err),
        }
    }

    fn render_state(&self, value: &[u8]) -> Option<serde_json::Value> {
        self.job.render_state(&J::StateCodec::decode(value).ok()?)
    }

    fn reads_headers(&self) -> bool {
        self.job.reads_headers()
    }
}

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}
