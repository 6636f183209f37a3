//! Blocking librdkafka calls under the processor's own clock, and Kafka clients dropped where their
//! destruction cannot stall the async workers.
//!
//! librdkafka takes a timeout for each blocking call, but does not always keep it: a transactional
//! `send_offsets_to_transaction` whose group coordinator went away (a broker restarted) waits on a
//! condition variable with no deadline (librdkafka issues 5456 and 5511, open in 2.12). A partition
//! whose call never returns holds its claim and makes no progress — worse than a crash, which the
//! fleet takes over within the claim's TTL. So every such call runs on a thread of its own and the
//! processor waits for it no longer than its own bound: past it the thread is written off (a thread
//! cannot be cancelled; it ends whenever librdkafka lets it), counted in
//! `processor_kafka_calls_abandoned_total`, and the caller gets
//! [`ProcessorError::KafkaCallTimedOut`] — the partition restarts with new clients.

use std::time::Duration;

use crate::error::{ProcessorError, ProcessorResult};

/// Runs `call` on a thread of its own and waits for it at most `bound`.
///
/// A thread of its own, not the runtime's blocking pool: a call written off past its bound goes on
/// until librdkafka lets it return, and a runtime's shutdown waits for every blocking task — the
/// process could not exit while one hung. A detached thread ends with the call, or with the process.
///
/// # Errors
/// `call`'s own error; [`ProcessorError::KafkaCallTimedOut`] when it did not return in time (it goes
/// on running, written off); [`ProcessorError::KafkaCallFailed`] when it panicked (or no thread could be started).
pub(crate) async fn bounded<T, F>(
    operation: &'static str,
    bound: Duration,
    call: F,
) -> ProcessorResult<T>
where
    T: Send + 'static,
    F: FnOnce() -> ProcessorResult<T> + Send + 'static,
{
    let (answer, answered) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("kafka: {operation}"))
        .spawn(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(call));
            let _ = answer.send(outcome);
        })
        .map_err(|err| ProcessorError::KafkaCallFailed {
            operation,
            reason: format!("no thread to run it on: {err}"),
        })?;
    match tokio::time::timeout(bound, answered).await {
        Ok(Ok(Ok(outcome))) => outcome,
        Ok(Ok(Err(panic))) => Err(ProcessorError::KafkaCallFailed {
            operation,
            reason: format!("panicked: {}", panic_message(panic.as_ref())),
        }),
        // The thread ended without answering: only a panic while sending does that.
        Ok(Err(_)) => Err(ProcessorError::KafkaCallFailed {
            operation,
            reason: "its thread ended without an answer".to_owned(),
        }),
        Err(_) => {
            metrics::counter!("processor_kafka_calls_abandoned_total", "operation" => operation)
                .increment(1);
            tracing::warn!(
                operation,
                ?bound,
                "a Kafka call did not return within its bound: abandoned (its thread is written off)"
            );
            Err(ProcessorError::KafkaCallTimedOut {
                operation,
                after: bound,
            })
        }
    }
}

/// The text of a panic's payload (a `&str` or a `String`, as `panic!` makes them).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// A Kafka client destroyed on a thread of its own when dropped. Destroying a librdkafka client joins
/// its threads and closes its connections, which waits on brokers that may not answer; dropped on an
/// async worker, that would stall every task of the worker (lock renewals among them), and on the
/// runtime's blocking pool it would hold up the runtime's shutdown for as long as it takes.
pub(crate) struct DropOffRuntime<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> DropOffRuntime<T> {
    /// Wraps `client`.
    pub(crate) fn new(client: T) -> Self {
        DropOffRuntime(Some(client))
    }
}

impl<T: Send + 'static> DropOffRuntime<T> {
    /// The client itself, no longer dropped off the runtime by this wrapper.
    pub(crate) fn into_inner(mut self) -> T {
        self.0
            .take()
            .unwrap_or_else(|| unreachable!("a DropOffRuntime holds its client until dropped"))
    }

    /// Destroys the client on a thread of its own and waits for that at most `bound` (then it is
    /// written off, as a [`bounded`] call is). The normal end of a client's life: a consumer's close
    /// leaves its group cleanly while the brokers are there — a detached drop could still be closing
    /// when they are gone, and wait for ever.
    pub(crate) async fn close(self, operation: &'static str, bound: Duration) {
        let client = self.into_inner();
        let _ = bounded(operation, bound, move || {
            drop(client);
            Ok(())
        })
        .await;
    }
}

/// Drops `client` on a thread of its own. Not the runtime's blocking pool: a runtime's shutdown waits
/// for every blocking task, and a client whose brokers are gone may take for ever to close — the
/// process could never exit. A detached thread ends with the close, or with the process.
fn drop_on_own_thread<T: Send + 'static>(client: T) {
    let dropping = std::thread::Builder::new()
        .name("kafka-client-drop".to_owned())
        .spawn(move || drop(client));
    if let Err(err) = dropping {
        // The client went down with the closure, on this thread.
        tracing::warn!(error = %err, "no thread to drop a Kafka client on: dropped in place");
    }
}

impl<T: Send + 'static> std::ops::Deref for DropOffRuntime<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // Only `drop` takes the client out.
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("a DropOffRuntime holds its client until dropped"))
    }
}

impl<T: Send + 'static> Drop for DropOffRuntime<T> {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop_on_own_thread(client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_past_its_bound_is_abandoned_and_named() {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let started = std::time::Instant::now();
        let outcome = bounded("hang", Duration::from_millis(100), move || {
            let _ = held.recv();
            Ok(())
        })
        .await;
        assert!(
            matches!(
                outcome,
                Err(ProcessorError::KafkaCallTimedOut {
                    operation: "hang",
                    ..
                })
            ),
            "{outcome:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(release);
        let answered = bounded("answer", Duration::from_secs(5), || Ok(7)).await;
        assert_eq!(answered.ok(), Some(7));
    }

    /// A client whose brokers are gone may never finish closing (rdkafka's consumer drop polls until
    /// its close completes). Dropped off the runtime, it must not hold up the runtime's shutdown: a
    /// process could never exit, a test never end (seen in CI: a test's runtime waited 25 minutes on a
    /// consumer dropped after the test's mock cluster was gone). The client here is one whose drop
    /// cannot finish until the test lets it.
    #[test]
    fn a_client_that_cannot_close_never_holds_up_the_runtimes_shutdown() {
        struct NeverCloses(std::sync::mpsc::Receiver<()>);
        impl Drop for NeverCloses {
            fn drop(&mut self) {
                let _ = self.0.recv();
            }
        }
        let (let_it_close, closing) = std::sync::mpsc::channel();
        let (finished, finishes) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async { drop(DropOffRuntime::new(NeverCloses(closing))) });
            drop(runtime);
            let _ = finished.send(());
        });
        let shut_down = finishes.recv_timeout(Duration::from_secs(10));
        drop(let_it_close);
        assert!(
            shut_down.is_ok(),
            "the runtime's shutdown waited on a Kafka client that could not close"
        );
    }

    /// A call that panics is an error naming it, never a panic of the caller.
    #[tokio::test]
    async fn a_call_that_panics_is_an_error_naming_it() {
        let outcome: ProcessorResult<()> =
            bounded("explode", Duration::from_secs(5), || panic!("boom")).await;
        match outcome {
            Err(ProcessorError::KafkaCallFailed {
                operation: "explode",
                reason,
            }) => assert!(reason.contains("boom"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    /// A call written off past its bound must not hold up the runtime's shutdown either (on the
    /// blocking pool it did: the runtime waits for every blocking task).
    #[test]
    fn an_abandoned_call_never_holds_up_the_runtimes_shutdown() {
        let (let_it_return, held) = std::sync::mpsc::channel::<()>();
        let (finished, finishes) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let outcome = runtime.block_on(bounded("hang", Duration::from_millis(50), move || {
                let _ = held.recv();
                Ok(())
            }));
            drop(runtime);
            let _ = finished.send(outcome.is_err());
        });
        let shut_down = finishes.recv_timeout(Duration::from_secs(10));
        drop(let_it_return);
        assert_eq!(
            shut_down,
            Ok(true),
            "the runtime's shutdown waited on an abandoned call"
        );
    }
}
