//! The processor's one error type.

use std::path::PathBuf;

/// A boxed source error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of the processor.
pub type ProcessorResult<T> = Result<T, ProcessorError>;

/// What went wrong, and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessorError {
    /// The local state store failed.
    #[error("state store of partition {partition} failed to {operation}")]
    Store {
        /// The partition.
        partition: i32,
        /// What was being done.
        operation: &'static str,
        /// The store's error.
        #[source]
        source: BoxError,
    },

    /// Kafka (the client or the broker) failed.
    #[error("kafka failed to {operation}")]
    Kafka {
        /// What was being done.
        operation: &'static str,
        /// The client's error.
        #[source]
        source: BoxError,
    },

    /// A write or checkpoint carried a fencing token lower than one already recorded: this instance no
    /// longer owns the partition.
    #[error(
        "stale owner of partition {partition}: fencing token {token} < {highest} already recorded"
    )]
    StaleOwner {
        /// The partition.
        partition: i32,
        /// This writer's token.
        token: u64,
        /// The highest recorded token.
        highest: u64,
    },

    /// The partition's claim was lost (its lease expired or was taken over) while this instance was
    /// processing it under `token`: it stopped writing and gave the partition up.
    #[error(
        "stale owner of partition {partition}: its claim with fencing token {token} expired or was taken over"
    )]
    OwnershipLost {
        /// The partition.
        partition: i32,
        /// The fencing token of the claim that was lost.
        token: u64,
    },

    /// A step of a partition (`start`, `commit`, `checkpoint`, `hand-off`) was about to act after its
    /// claim's safe deadline: the lease may have run out and another owner may hold the partition, so
    /// the step was not taken and the partition given up (the runtime was too busy to renew in time).
    #[error(
        "stale owner of partition {partition}: its claim with fencing token {token} lapsed {late_by:?} before the {step} step could act (not renewed in time); the step was not taken"
    )]
    ClaimLapsed {
        /// The partition.
        partition: i32,
        /// The claim's fencing token.
        token: u64,
        /// The step that was refused.
        step: &'static str,
        /// How long after the claim's safe deadline the step came.
        late_by: std::time::Duration,
    },

    /// A fresh claim of `partition` got fencing token `granted`, below the `recorded` one already
    /// written for it: the lock backend's fencing counter went back. With `repaired`, the counter was
    /// raised past `recorded` and the partition is claimed again under a larger token; without, an
    /// operator must raise it (the backend could not).
    #[error(
        "partition {partition}: the lock backend's fencing counter went back (a fresh claim got token {granted}, {recorded} is recorded){}",
        if *repaired { "; it was raised past the recorded token and the partition is claimed again" } else { "; it could not be raised: raise it by hand (DISTRIBUTED_LOCKING.md section 5.2)" }
    )]
    FencingCounterReset {
        /// The partition.
        partition: i32,
        /// The token of the fresh claim.
        granted: u64,
        /// The highest token recorded for the partition.
        recorded: u64,
        /// Whether the counter was raised.
        repaired: bool,
    },

    /// A job refused a record and its policy is to stop ([`OnError::Stop`](crate::job::OnError)): the
    /// partition processes nothing from that offset on.
    #[error(
        "partition {partition}: the job refused the record at offset {offset} ({reason}); the partition stops there (policy `stop`) — fix the record or the job, or dead-letter such records"
    )]
    Rejected {
        /// The partition.
        partition: i32,
        /// The record's offset.
        offset: i64,
        /// Why the job refused it.
        reason: String,
    },

    /// The brokers answered but refused this client: a failed SASL login or TLS handshake.
    #[error(
        "the brokers {brokers} refused the connection: {reason} (check the sasl.* and ssl.* client settings)"
    )]
    BrokersRefused {
        /// The bootstrap servers.
        brokers: String,
        /// librdkafka's reason, secrets cut out.
        reason: String,
    },

    /// A newer owner of the partition initialised its transactional producer (same `transactional.id`),
    /// which fenced this one: nothing this instance produces for the partition can commit any more, and
    /// it stops processing it.
    #[error(
        "partition {partition}: fenced by a newer owner's producer (transactional id `{transactional_id}`): this instance stops processing it"
    )]
    OutputFenced {
        /// The partition.
        partition: i32,
        /// The transactional id both producers share.
        transactional_id: String,
    },

    /// A transactional call of a partition's exactly-once outputs failed (see [`TransactionFault`] for
    /// each class's handling): the batch's state was not written, and the partition restarts with a new
    /// producer, whose initialisation settles the transaction.
    #[error(
        "partition {partition}: could not {operation} ({fault}): the batch's state was not written; the partition restarts with a new producer, whose initialisation settles the transaction"
    )]
    TransactionFailed {
        /// The partition.
        partition: i32,
        /// The call that failed.
        operation: &'static str,
        /// librdkafka's class of the failure.
        fault: TransactionFault,
        /// The client's error.
        #[source]
        source: BoxError,
    },

    /// The offset stored with a partition's state is outside the topic's log: records it never processed
    /// were deleted (below the start), or the topic was recreated (above the end). Nothing was processed.
    #[error(
        "partition {partition}: the stored offset {offset} is outside the log [{low}, {high}) — records were deleted by retention or the topic was recreated; nothing was processed (check, then choose --on-missing-offsets earliest|latest to skip)"
    )]
    OffsetOutOfRange {
        /// The partition.
        partition: i32,
        /// The offset stored with its state.
        offset: i64,
        /// The log start.
        low: i64,
        /// The log end.
        high: i64,
    },

    /// The checkpoint a partition's record names cannot be read: the partition refuses to start rather
    /// than start from older or empty state.
    #[error(
        "partition {partition}: the checkpoint of record {checkpoint} cannot be read ({cause}); refusing to start from older or empty state — fix the checkpoint store (mount, permissions), or pass --restore-older-checkpoint to accept losing it"
    )]
    CheckpointUnreadable {
        /// The partition.
        partition: i32,
        /// The checkpoint id the record names.
        checkpoint: String,
        /// Why it cannot be read.
        cause: Box<ProcessorError>,
    },

    /// Encoding or decoding a value failed (an aggregate, a manifest, a checkpoint record).
    #[error("could not {operation} {what}")]
    Codec {
        /// What was being encoded or decoded.
        what: &'static str,
        /// `encode` or `decode`.
        operation: &'static str,
        /// The codec's error.
        #[source]
        source: BoxError,
    },

    /// A background task of the processor panicked or was cancelled.
    #[error("background task `{task}` failed")]
    TaskFailed {
        /// Which task.
        task: String,
        /// The runtime's error.
        #[source]
        source: tokio::task::JoinError,
    },

    /// A blocking Kafka call did not return within the processor's own bound. librdkafka takes a
    /// timeout for each such call but does not always keep it (a transactional call waiting for a
    /// group coordinator that went away can wait forever), so the processor keeps the time itself: the
    /// call's thread is written off, its client dropped, and the partition restarts from its stored
    /// offset with new clients (fencing and replay make that safe).
    #[error(
        "kafka did not answer `{operation}` within {after:?}: the call was abandoned; the partition restarts from its stored offset with new Kafka clients"
    )]
    KafkaCallTimedOut {
        /// The call.
        operation: &'static str,
        /// The bound it was given.
        after: std::time::Duration,
    },

    /// A blocking Kafka call got no thread to run on, or panicked on it: the partition restarts with
    /// new Kafka clients.
    #[error("kafka call `{operation}` failed: {reason}")]
    KafkaCallFailed {
        /// The call.
        operation: &'static str,
        /// What happened (the panic's message, or why no thread could be started).
        reason: String,
    },

    /// The progress watchdog gave a partition up: it had records to process past its position (or was
    /// still starting) and neither a batch nor a commit completed for longer than the bound. Its task
    /// was abandoned and its claim released; it is claimed again with new Kafka clients.
    #[error(
        "partition {partition} made no progress for {silent_for:?} while {phase} (watchdog bound {bound:?}, see --stall-timeout-secs): abandoned and released; it restarts from its stored offset with new Kafka clients"
    )]
    PartitionStalled {
        /// The partition.
        partition: i32,
        /// What its task was doing (see [`Phase::describe`](crate::progress::Phase::describe)).
        phase: &'static str,
        /// How long it had not moved.
        silent_for: std::time::Duration,
        /// The watchdog's bound.
        bound: std::time::Duration,
    },

    /// A stop did not finish within its bound: the partitions named were abandoned mid-way — their
    /// claims are released in the background or lapse by their TTL, and their next owner resumes
    /// from their stored offsets (nothing acknowledged is lost: only a final checkpoint is missing).
    #[error(
        "stopped after {after:?} without finishing partitions {partitions:?} (see --shutdown-timeout-secs): their claims lapse and their next owners resume from the stored offsets"
    )]
    ShutdownAbandoned {
        /// The partitions whose tasks did not end in time.
        partitions: Vec<i32>,
        /// The bound.
        after: std::time::Duration,
    },

    /// The instance is shutting down: `what` could not be done.
    #[error("the instance is shutting down: cannot {what}")]
    ShuttingDown {
        /// What could not be done.
        what: &'static str,
    },

    /// A checkpoint is damaged (checksum or size mismatch, missing file, unreadable manifest); it is never
    /// loaded.
    #[error("checkpoint {path} is corrupt: {reason}")]
    CorruptCheckpoint {
        /// The manifest or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A checkpoint was written by a newer processor in a format this one does not read (a rolling
    /// upgrade in progress, or a downgrade): it is neither restored nor skipped as corrupt.
    #[error(
        "checkpoint {path} is in format {format}, newer than this processor reads ({reads}): upgrade this instance (a newer one in the fleet wrote it), or start it with --restore-older-checkpoint to restore an older checkpoint and replay"
    )]
    CheckpointTooNew {
        /// The manifest.
        path: PathBuf,
        /// Its format.
        format: u32,
        /// The newest format this processor reads.
        reads: u32,
    },

    /// Reading or writing a file failed.
    #[error("i/o error on {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },

    /// The object store holding the checkpoints refused a request or kept failing it past its retries
    /// (credentials refused, a missing bucket, the service unreachable).
    #[error("checkpoint store {location}: could not {operation} it")]
    ObjectStore {
        /// What was being done.
        operation: &'static str,
        /// The object (`s3://bucket/prefix/...`).
        location: String,
        /// What the store said (boxed: it is large, and errors travel by value).
        #[source]
        source: Box<object_store::Error>,
    },

    /// Bad input (a flag, a name, a value).
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// What was invalid.
        what: &'static str,
        /// Why.
        reason: String,
    },

    /// The disk under the state or checkpoint directory refuses writes (full, read-only, no
    /// permission, over quota): nothing more can be stored safely, so the instance stops — its claims
    /// lapse and the fleet takes its partitions over — instead of retrying the partition forever.
    #[error(
        "stopping: {reason} ({context}): free space or fix the disk of --state-dir {state_dir} and --checkpoint-dir, then restart"
    )]
    DiskUnusable {
        /// What the operating system said.
        reason: &'static str,
        /// The failure it ended (which store or file).
        context: String,
        /// The instance's state directory.
        state_dir: PathBuf,
    },

    /// The coordination layer failed.
    #[error(transparent)]
    State(#[from] state::StateError),
}

/// What the operating system says when a disk refuses writes, as it appears in error messages.
const DISK_FAILURES: [&str; 4] = [
    "No space left on device",
    "Read-only file system",
    "Permission denied",
    "Disk quota exceeded",
];

impl ProcessorError {
    /// The disk-level cause (no space, read-only file system, permission denied, quota exceeded) of a
    /// failed local store or file operation: a failure retrying cannot fix. Only [`Store`](Self::Store)
    /// and [`Io`](Self::Io) errors are disk errors — a Kafka, coordination or unreadable-checkpoint error
    /// whose text happens to say "Permission denied" is not (an unreadable checkpoint refuses its
    /// partition, as documented, rather than stopping the instance).
    pub fn disk_failure(&self) -> Option<&'static str> {
        if !matches!(
            self,
            ProcessorError::Store { .. } | ProcessorError::Io { .. }
        ) {
            return None;
        }
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        DISK_FAILURES
            .into_iter()
            .find(|failure| text.contains(failure))
    }

    /// An [`ProcessorError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ProcessorError {
        let path = path.into();
        move |source| ProcessorError::Io { path, source }
    }

    /// Maps a Kafka client error to [`ProcessorError::Kafka`] naming what was being done.
    pub fn kafka(
        operation: &'static str,
    ) -> impl FnOnce(rdkafka::error::KafkaError) -> ProcessorError {
        move |err| ProcessorError::Kafka {
            operation,
            source: Box::new(err),
        }
    }

    /// A [`ProcessorError::Codec`] for encoding `what`.
    pub fn encode(what: &'static str, source: impl Into<BoxError>) -> Self {
        ProcessorError::Codec {
            what,
            operation: "encode",
            source: source.into(),
        }
    }

    /// A [`ProcessorError::Codec`] for decoding `what`.
    pub fn decode(what: &'static str, source: impl Into<BoxError>) -> Self {
        ProcessorError::Codec {
            what,
            operation: "decode",
            source: source.into(),
        }
    }

    /// A [`ProcessorError::TaskFailed`] for the background task `task`.
    pub fn task(task: impl Into<String>) -> impl FnOnce(tokio::task::JoinError) -> ProcessorError {
        let task = task.into();
        move |source| ProcessorError::TaskFailed { task, source }
    }

    /// A [`ProcessorError::Store`] wrapping a store error.
    pub fn store(partition: i32, operation: &'static str, source: impl Into<BoxError>) -> Self {
        ProcessorError::Store {
            partition,
            operation,
            source: source.into(),
        }
    }
}

/// How a transactional call failed, in librdkafka's classes (its `rd_kafka_error_t` flags). Each class's
/// handling is explicit in
/// [`TransactionalSink::commit_batch`](crate::sink::TransactionalSink::commit_batch); whatever the
/// class, the batch's state is not written and the partition restarts with a new producer, whose
/// initialisation fences this one and settles the open transaction (a commit whose outcome was
/// unknown has either landed or is aborted by then). The group's committed offset then tells the new owner where the outputs stand (replay with
/// outputs discarded, DISTRIBUTED_LOCKING.md §11). This is the advice of Jepsen's 2024 analysis of
/// Kafka transactions: never carry on with a producer after an error whose outcome is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransactionFault {
    /// A newer owner's producer took the transactional id (`PRODUCER_FENCED`,
    /// `INVALID_PRODUCER_EPOCH`): reported as [`ProcessorError::OutputFenced`]; no abort is tried (a
    /// fenced producer cannot), the partition is someone else's.
    Fenced,
    /// librdkafka's fatal error: the producer is unusable; no abort is tried, it is dropped.
    Fatal,
    /// The transaction must be aborted (librdkafka's "requires abort", e.g. a record the broker
    /// refused): it is aborted, so nothing of the batch is visible.
    Abortable,
    /// The call might succeed if retried (a coordinator moving, librdkafka's own timeout). It is not
    /// retried in place: for a commit the outcome is unknown. An abort is tried, and the next producer's
    /// initialisation settles whatever the broker decided.
    Retriable,
    /// The processor's own bound passed with the call still inside librdkafka
    /// ([`ProcessorError::KafkaCallTimedOut`]): the producer is never called again, not even to abort.
    TimedOut,
    /// Any other Kafka error: the transaction is aborted.
    Other,
}

impl TransactionFault {
    /// The class's name: the `fault` label of `processor_transaction_faults_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransactionFault::Fenced => "fenced",
            TransactionFault::Fatal => "fatal",
            TransactionFault::Abortable => "abortable",
            TransactionFault::Retriable => "retriable",
            TransactionFault::TimedOut => "timed_out",
            TransactionFault::Other => "other",
        }
    }

    /// Whether `abort_transaction` is called on the producer after a fault of this class.
    pub(crate) fn is_aborted(self) -> bool {
        matches!(
            self,
            TransactionFault::Abortable | TransactionFault::Retriable | TransactionFault::Other
        )
    }

    /// The class of `err`, a failed transactional call's error.
    pub(crate) fn of(err: &ProcessorError) -> Self {
        match err {
            ProcessorError::OutputFenced { .. } => TransactionFault::Fenced,
            ProcessorError::KafkaCallTimedOut { .. } => TransactionFault::TimedOut,
            ProcessorError::TransactionFailed { fault, .. } => *fault,
            _ => TransactionFault::Other,
        }
    }
}

impl std::fmt::Display for TransactionFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_store_and_file_errors_are_disk_failures() {
        let full = std::io::Error::other("IO error: No space left on device: While appending");
        assert_eq!(
            ProcessorError::store(3, "write a batch", full).disk_failure(),
            Some("No space left on device")
        );
        let read_only = std::io::Error::from(std::io::ErrorKind::ReadOnlyFilesystem);
        let io = ProcessorError::io("/state/x")(std::io::Error::other(format!(
            "{read_only}: Read-only file system"
        )));
        assert_eq!(io.disk_failure(), Some("Read-only file system"));
        // Not a disk: a checkpoint the partition cannot read refuses that partition only.
        let unreadable = ProcessorError::CheckpointUnreadable {
            partition: 0,
            checkpoint: "m".to_owned(),
            cause: Box::new(ProcessorError::io("/ck/m")(std::io::Error::other(
                "Permission denied",
            ))),
        };
        assert_eq!(unreadable.disk_failure(), None);
        let invalid = ProcessorError::InvalidInput {
            what: "kafka property",
            reason: "Permission denied".to_owned(),
        };
        assert_eq!(invalid.disk_failure(), None);
    }
}
