//! The torture suite from the command line.
//!
//! ```text
//! torture run                         # every backend × fault once (about 5 s each), then the table
//! torture run --soak 30m              # repeat the scenarios for 30 minutes, one table of the totals
//! torture run --backend redis --fault "SIGSTOP holder past TTL" --seconds 20
//! torture worker …                    # one contending process (started by `run`)
//! ```
//!
//! Exits non-zero when a fenced scenario found a violation or the negative control found none.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use integration_tests::torture::scenario::{self, Backend, Row, Scenario, Settings};
use integration_tests::torture::worker::{self, WorkerConfig};

#[derive(Parser)]
#[command(
    about = "Lock and fencing torture runs against real servers, with an independent checker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run scenarios and print the results table.
    Run {
        /// Keep repeating the scenarios for this long (e.g. `30m`, `2h`, `90s`); once each by default.
        #[arg(long, value_parser = parse_duration)]
        soak: Option<Duration>,
        /// Only this backend (repeatable): in-process, redis, redlock-3, redlock-5, postgres-lease,
        /// postgres-advisory, etcd, etcd-3.
        #[arg(long)]
        backend: Vec<String>,
        /// Only faults whose name contains this (repeatable), e.g. `SIGSTOP`.
        #[arg(long)]
        fault: Vec<String>,
        /// How long each scenario's workers run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// One contending worker process (the orchestrator starts these).
    Worker {
        #[arg(long)]
        lock_url: String,
        #[arg(long)]
        postgres_advisory: bool,
        #[arg(long)]
        store_url: String,
        #[arg(long)]
        process: u32,
        #[arg(long)]
        tasks: u32,
        #[arg(long)]
        resources: u32,
        #[arg(long)]
        ttl_ms: u64,
        #[arg(long)]
        hold_ms: u64,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long)]
        history: PathBuf,
        #[arg(long)]
        unfenced: bool,
        #[arg(long)]
        stop_self_every: Option<u32>,
    },
}

/// `90s`, `30m`, `2h` or a number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |at| text.split_at(at));
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: use e.g. 90s, 30m or 2h"))?;
    let seconds = match unit {
        "" | "s" => number,
        "m" => number * 60,
        "h" => number * 3_600,
        _ => return Err(format!("`{text}`: the unit must be s, m or h")),
    };
    Ok(Duration::from_secs(seconds))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // To stderr: the workers' stdout is discarded, their stderr is the run's (`RUST_LOG` applies).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    match Cli::parse().command {
        Command::Worker {
            lock_url,
            postgres_advisory,
            store_url,
            process,
            tasks,
            resources,
            ttl_ms,
            hold_ms,
            duration_ms,
            history,
            unfenced,
            stop_self_every,
        } => {
            worker::run(WorkerConfig {
                lock_url,
                postgres_advisory,
                store_url,
                process,
                tasks,
                resources,
                ttl: Duration::from_millis(ttl_ms),
                hold: Duration::from_millis(hold_ms),
                duration: Duration::from_millis(duration_ms),
                history,
                unfenced,
                stop_self_every,
            })
            .await?;
            Ok(())
        }
        Command::Run {
            soak,
            backend,
            fault,
            seconds,
        } => run(soak, &backend, &fault, seconds).await,
    }
}

async fn run(
    soak: Option<Duration>,
    backends: &[String],
    faults: &[String],
    seconds: u64,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    for name in backends {
        if !Backend::ALL.iter().any(|backend| backend.name() == name) {
            let known: Vec<&str> = Backend::ALL.iter().map(|backend| backend.name()).collect();
            return Err(
                format!("unknown backend `{name}`: use one of {}", known.join(", ")).into(),
            );
        }
    }
    let scenarios: Vec<Scenario> = Scenario::all()
        .into_iter()
        .filter(|s| backends.is_empty() || backends.iter().any(|b| b == s.backend.name()))
        .filter(|s| faults.is_empty() || faults.iter().any(|f| s.fault.name().contains(f.as_str())))
        .collect();
    if scenarios.is_empty() {
        return Err("no scenario matches the --backend and --fault filters".into());
    }
    let mut settings = Settings::short(std::env::current_exe()?);
    settings.duration = Duration::from_secs(seconds);
    let until = soak.map(|soak| tokio::time::Instant::now() + soak);
    let mut totals: BTreeMap<(Backend, scenario::Fault, bool), Row> = BTreeMap::new();
    loop {
        for &scenario in &scenarios {
            let row = scenario::run(scenario, &settings).await;
            eprintln!(
                "{} / {} / fencing {}: {} sections, {} violations ({:.1} s)",
                scenario.backend.name(),
                scenario.fault.name(),
                if scenario.fenced { "on" } else { "off" },
                row.verdict.sections,
                row.verdict.violations.len(),
                row.elapsed.as_secs_f64()
            );
            for violation in row.verdict.violations.iter().take(3) {
                eprintln!("    {violation}");
            }
            accumulate(&mut totals, row);
        }
        if until.is_none_or(|until| tokio::time::Instant::now() >= until) {
            break;
        }
    }
    let rows: Vec<Row> = totals.into_values().collect();
    println!("{}", scenario::table(&rows));
    let wrong: Vec<String> = rows
        .iter()
        .filter(|row| row.scenario.fenced != row.verdict.violations.is_empty())
        .map(|row| {
            format!(
                "{} / {}",
                row.scenario.backend.name(),
                row.scenario.fault.name()
            )
        })
        .collect();
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "unexpected verdicts (violations where fenced, or none in the control): {}",
            wrong.join("; ")
        )
        .into())
    }
}

fn accumulate(totals: &mut BTreeMap<(Backend, scenario::Fault, bool), Row>, row: Row) {
    let key = (
        row.scenario.backend,
        row.scenario.fault,
        row.scenario.fenced,
    );
    match totals.get_mut(&key) {
        None => {
            totals.insert(key, row);
        }
        Some(total) => {
            total.verdict.sections += row.verdict.sections;
            total.verdict.accepted += row.verdict.accepted;
            total.verdict.rejected += row.verdict.rejected;
            total.verdict.unknown += row.verdict.unknown;
            total.verdict.overlaps += row.verdict.overlaps;
            total.verdict.violations.extend(row.verdict.violations);
            total.faults += row.faults;
            total.elapsed += row.elapsed;
        }
    }
}
