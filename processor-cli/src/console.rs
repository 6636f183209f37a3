//! The demo's terminal UI: progress bars (records produced, records covered by checkpoints) and one line
//! per instance on a terminal; a plain status line every few seconds elsewhere (CI logs, pipes).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use processor::InstanceStatus;
use processor::dev::demo::DemoObserver;

/// The demo's console: progress bars on a terminal, periodic plain lines elsewhere.
pub struct Console {
    bars: MultiProgress,
    produced: ProgressBar,
    checkpointed: ProgressBar,
    lines: BTreeMap<String, ProgressBar>,
    plain: bool,
    last_plain: Instant,
}

impl Console {
    /// A console for a workload of `records`; bars only when `progress` and stderr is a terminal.
    pub fn new(records: u64, progress: bool) -> Self {
        let plain = !(progress && std::io::stderr().is_terminal());
        let bars = MultiProgress::with_draw_target(if plain {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        });
        let style = ProgressStyle::with_template(
            "{prefix:>13} [{bar:40.cyan/blue}] {human_pos:>7}/{human_len:7} {elapsed:>4} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let produced = bars.add(ProgressBar::new(records).with_style(style.clone()));
        produced.set_prefix("produced");
        let checkpointed = bars.add(ProgressBar::new(records).with_style(style));
        checkpointed.set_prefix("checkpointed");
        Console {
            bars,
            produced,
            checkpointed,
            lines: BTreeMap::new(),
            plain,
            last_plain: Instant::now(),
        }
    }

    fn instance_line(&mut self, id: &str) -> &ProgressBar {
        let bars = &self.bars;
        self.lines.entry(id.to_owned()).or_insert_with(|| {
            let line = bars.add(
                ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{prefix:>13} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                ),
            );
            line.set_prefix(format!("instance {id}"));
            line
        })
    }
}

impl DemoObserver for Console {
    fn event(&mut self, message: &str) {
        if self.plain {
            eprintln!("[demo] {message}");
        } else {
            let _ = self.bars.println(format!("  » {message}"));
        }
    }

    fn progress(
        &mut self,
        produced: u64,
        checkpointed: u64,
        statuses: &BTreeMap<String, (InstanceStatus, bool)>,
    ) {
        self.produced.set_position(produced);
        self.checkpointed.set_position(checkpointed);
        let mut summary = Vec::new();
        for (id, (status, alive)) in statuses {
            let line = describe(status, *alive);
            summary.push(format!("{id}: {line}"));
            self.instance_line(id).set_message(line);
        }
        if self.plain && self.last_plain.elapsed() >= Duration::from_secs(3) {
            self.last_plain = Instant::now();
            eprintln!("[demo] produced {produced}, checkpointed {checkpointed}");
            for line in summary {
                eprintln!("[demo]   {line}");
            }
        }
    }

    fn finish(&mut self) {
        self.produced.finish();
        self.checkpointed.finish();
        for line in self.lines.values() {
            line.finish();
        }
    }
}

fn describe(status: &InstanceStatus, alive: bool) -> String {
    if !alive {
        return "KILLED (no shutdown: its claims lapse and others take over)".to_owned();
    }
    let owned: Vec<String> = status.owned.keys().map(ToString::to_string).collect();
    format!(
        "{:<8} partitions [{}]  applied {}  checkpoints {}  restores {}  task claims {}  compactions {}",
        if status.leader { "LEADER" } else { "follower" },
        owned.join(","),
        status.processed,
        status.checkpoints,
        status.restores,
        status.task_claims,
        status.compactions,
    )
}
