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

    /// A checkpoint is damaged (checksum or size mismatch, missing file, unreadable manifest); it is never
    /// loaded.
    #[error("checkpoint {path} is corrupt: {reason}")]
    CorruptCheckpoint {
        /// The manifest or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
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

    /// Bad input (a flag, a name, a value).
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// What was invalid.
        what: &'static str,
        /// Why.
        reason: String,
    },

    /// The coordination layer failed.
    #[error(transparent)]
    State(#[from] state::StateError),
}

impl ProcessorError {
    /// An [`ProcessorError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ProcessorError {
        let path = path.into();
        move |source| ProcessorError::Io { path, source }
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
