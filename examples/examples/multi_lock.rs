//! Multi-resource locking: eight tellers make 200 random transfers between five accounts. Each transfer
//! locks both accounts at once — in one canonical order, so two tellers moving money in opposite
//! directions never deadlock — and reads and writes balances with no other synchronisation. The total
//! is conserved.
//!
//! ```text
//! cargo run -p examples --example multi_lock
//! cargo run -p examples --example multi_lock -- --lock-url redis://127.0.0.1:6379
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::ensure;
use clap::Parser;
use examples::init_logs;
use state::recipes::multi::MultiLock;
use tokio::sync::Mutex;

#[derive(Parser)]
struct Args {
    /// `memory`, `redis://…` or `postgres://…`.
    #[arg(long, env = "LOCK_URL", default_value = "memory")]
    lock_url: String,
}

const ACCOUNTS: [&str; 5] = [
    "acct:alice",
    "acct:bob",
    "acct:carol",
    "acct:dave",
    "acct:erin",
];

/// Balances with deliberately split read and write steps: only the locks keep them consistent.
#[derive(Default)]
struct Ledger(Mutex<HashMap<&'static str, i64>>);

impl Ledger {
    async fn read(&self, account: &'static str) -> i64 {
        let balance = *self.0.lock().await.get(account).unwrap_or(&0);
        tokio::task::yield_now().await;
        balance
    }
    async fn write(&self, account: &'static str, balance: i64) {
        tokio::task::yield_now().await;
        self.0.lock().await.insert(account, balance);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logs();
    let args = Args::parse();
    let backend = examples::backend(&args.lock_url).await?;
    let ledger = Arc::new(Ledger::default());
    for account in ACCOUNTS {
        ledger.write(account, 1_000).await;
    }
    let mut tellers = Vec::new();
    for teller in 0..8usize {
        let (lock, ledger) = (backend.lock.clone(), ledger.clone());
        tellers.push(tokio::spawn(async move {
            for n in 0..25usize {
                let from = ACCOUNTS[(teller + n) % ACCOUNTS.len()];
                let to = ACCOUNTS[(teller * 3 + n * 7 + 1) % ACCOUNTS.len()];
                if from == to {
                    continue;
                }
                let held = MultiLock::acquire(&lock, &[from, to], Duration::from_secs(10)).await?;
                let amount = ((teller * 31 + n * 17) % 50) as i64 + 1;
                let (a, b) = (ledger.read(from).await, ledger.read(to).await);
                ledger.write(from, a - amount).await;
                ledger.write(to, b + amount).await;
                held.release().await?;
            }
            anyhow::Ok(())
        }));
    }
    for teller in tellers {
        tokio::time::timeout(Duration::from_secs(120), teller)
            .await
            .map_err(|_| anyhow::anyhow!("deadlock"))???;
    }
    let mut total = 0;
    for account in ACCOUNTS {
        let balance = ledger.read(account).await;
        println!("{account}: {balance}");
        total += balance;
    }
    ensure!(total == 5_000, "money appeared or vanished: total {total}");
    println!("total 5000 conserved over 8 concurrent tellers");
    println!("verdict: OK");
    Ok(())
}
