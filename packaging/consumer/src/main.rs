//! A tiny service built from the packaged crates, as a user depends on them: a lock on the in-process
//! backend, one on Redis (feature `redis`, at `REDIS_URL`), and a tiny job run through the processor's
//! `PartitionProcessor` (feature `processor`). It prints what it did and fails on any surprise.

use std::time::Duration;

use state::{DistributedLock, InMemoryDistributedLock};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let locks = InMemoryDistributedLock::new();
    let guard = locks.acquire("consumer:memory", Duration::from_secs(10)).await?;
    println!("in-process lock: fencing token {}", guard.fencing_token());
    guard.release().await?;
    #[cfg(feature = "redis")]
    redis_lock().await?;
    #[cfg(feature = "processor")]
    views::run()?;
    Ok(())
}

#[cfg(feature = "redis")]
async fn redis_lock() -> Result<()> {
    let url = std::env::var("REDIS_URL").map_err(|_| "REDIS_URL is not set (redis://host:port)")?;
    let backend = state::connect(&url).await?;
    let first = backend.lock.acquire("consumer:redis", Duration::from_secs(10)).await?;
    let token = first.fencing_token();
    first.release().await?;
    let second = backend.lock.acquire("consumer:redis", Duration::from_secs(10)).await?;
    if second.fencing_token() <= token {
        return Err(format!("fencing token went from {token} to {}", second.fencing_token()).into());
    }
    println!("redis lock: fencing tokens {token} then {}", second.fencing_token());
    second.release().await?;
    Ok(())
}

#[cfg(feature = "processor")]
mod views {
    use std::sync::Arc;

    use processor::job::{Context, Input, Job, JobError, JobOperator, codec};
    use processor::operator::Record;
    use processor::partition::PartitionProcessor;
    use processor::store::{PartitionStore, memory::InMemoryPartitionStore};

    /// Page views per user: the value is the page.
    struct ViewsPerUser;

    impl Job for ViewsPerUser {
        type Key = String;
        type KeyCodec = codec::Utf8;
        type Value = String;
        type ValueCodec = codec::Utf8;
        type State = u64;
        type StateCodec = codec::Bincode;
        type Output = u64;
        type OutputCodec = codec::Json;

        fn process(
            &self,
            input: Input<'_, String, String>,
            ctx: &mut Context<'_, Self>,
        ) -> Result<(), JobError> {
            if input.value.is_empty() {
                return Err(JobError::reject("a view without a page"));
            }
            let views = ctx.update_state(|views| Some(views.unwrap_or(0) + 1))?;
            ctx.emit(&views.unwrap_or(0))?;
            Ok(())
        }
    }

    pub fn run() -> super::Result<()> {
        let store: Arc<dyn PartitionStore> = Arc::new(InMemoryPartitionStore::new(0));
        let job = Arc::new(JobOperator::new(ViewsPerUser));
        let mut partition = PartitionProcessor::resume(store, job, 1, Default::default())?;
        let report = partition.process(&[
            Record::new(0, 0, Some(b"ada"), Some(b"/")),
            Record::new(0, 1, Some(b"ada"), Some(b"/docs")),
            Record::new(0, 2, Some(b"bob"), Some(b"")),
        ])?;
        let outputs: Vec<&[u8]> = report.outputs.iter().map(|(_, value)| &value[..]).collect();
        if outputs != [b"1", b"2"] || report.dead_letters.len() != 1 {
            return Err(format!("unexpected job result: {report:?}").into());
        }
        println!("job: 2 outputs, 1 dead letter ({})", report.dead_letters[0].1);
        Ok(())
    }
}
