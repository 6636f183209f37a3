//! Leader election: three candidates campaign for one election; the leader writes "heartbeats" to a
//! fenced store with its term's fencing token. Mid-way the leader is paused (it stops renewing, as in a
//! long GC pause): it steps down by its safe deadline, another candidate takes over with a higher term,
//! and the paused leader's late write is rejected by the fenced store. Finally the new leader resigns and
//! hands over at once.
//!
//! ```text
//! cargo run -p examples --example leader_election
//! cargo run -p examples --example leader_election -- --lock-url redis://127.0.0.1:6379
//! cargo run -p examples --example leader_election -- --lock-url postgres://postgres@127.0.0.1/postgres
//! ```

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure};
use clap::Parser;
use examples::init_logs;
use state::StateError;
use state::recipes::keeper::RenewalPolicy;
use state::recipes::leader::{LeaderElection, Leadership};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// `memory`, `redis://…` or `postgres://…`.
    #[arg(long, env = "LOCK_URL", default_value = "memory")]
    lock_url: String,
}

async fn wait_for_leader(candidates: &[Arc<LeaderElection>]) -> (usize, u64) {
    loop {
        for (i, candidate) in candidates.iter().enumerate() {
            if let Some(term) = candidate.fencing_token() {
                return (i, term);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logs();
    let args = Args::parse();
    let backend = examples::backend(&args.lock_url).await?;
    let ttl = Duration::from_millis(600);

    // Candidate 0 will "pause": it renews at most twice, then stops renewing.
    let candidates: Vec<Arc<LeaderElection>> = (0..3)
        .map(|i| {
            let election =
                LeaderElection::new(backend.lock.clone(), "example", &format!("node-{i}"), ttl)?;
            let election = if i == 0 {
                election.with_renewal_policy(RenewalPolicy::default().with_max_renewals(2))
            } else {
                election
            };
            Ok(Arc::new(election))
        })
        .collect::<Result<_, StateError>>()?;
    ensure!(
        candidates[0].try_become_leader().await?,
        "node-0 should win the first term"
    );

    let stop = CancellationToken::new();
    let campaigns: Vec<_> = candidates[1..]
        .iter()
        .map(|c| {
            let (c, stop) = (Arc::clone(c), stop.clone());
            tokio::spawn(async move { c.campaign(Duration::from_millis(25), stop).await })
        })
        .collect();

    let first_term = candidates[0].fencing_token().unwrap_or_default();
    backend
        .fenced
        .write("example:leader-state", first_term, b"node-0 was here")
        .await?;
    println!("node-0 leads, term {first_term}; it will stop renewing (a pause)");

    let mut watch = candidates[0].watch();
    while *watch.borrow_and_update() != Leadership::Follower {
        watch.changed().await?;
    }
    println!("node-0 stepped down by its safe deadline");
    let (leader, term) = wait_for_leader(&candidates[1..]).await;
    println!("node-{} took over, term {term}", leader + 1);
    ensure!(term > first_term, "terms must increase");
    backend
        .fenced
        .write("example:leader-state", term, b"new leader")
        .await?;
    match backend
        .fenced
        .write(
            "example:leader-state",
            first_term,
            b"late write from node-0",
        )
        .await
    {
        Err(StateError::StaleFencingToken { highest, .. }) => {
            println!(
                "node-0 wakes up and writes with term {first_term}: rejected (store has seen {highest})"
            )
        }
        other => bail!("the paused leader's write was not rejected: {other:?}"),
    }

    candidates[leader + 1].resign().await?;
    let (next, next_term) = wait_for_leader(&candidates[1..]).await;
    println!(
        "node-{} resigned; node-{} leads at once, term {next_term}",
        leader + 1,
        next + 1
    );
    ensure!(next_term > term);

    stop.cancel();
    for campaign in campaigns {
        campaign.await??;
    }
    println!("verdict: OK");
    Ok(())
}
