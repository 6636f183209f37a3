//! A partition's progress clock: when its task last moved and what it was doing then. The task beats
//! it (every batch applied, every commit, every step of its start); the fleet's progress watchdog
//! ([`crate::fleet`]) reads it and gives up a partition that holds its claim without moving.
//!
//! Lock-free (two atomics): the consume loop beats it once per batch.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// What a partition's task is doing: named in the watchdog's verdict, so that an operator reads which
/// step hung ("committing outputs", "restoring"), not only that one did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Reading its checkpoint record, checking the log bounds, creating its Kafka clients.
    Starting,
    /// Opening its local state or restoring it from a checkpoint.
    Restoring,
    /// Initialising its transactional producer (which fences earlier owners).
    InitialisingOutputs,
    /// Replaying records whose outputs are already committed.
    Replaying,
    /// Fetching and applying records.
    Consuming,
    /// Publishing a commit's outputs and committing it.
    Committing,
    /// Taking a checkpoint.
    Checkpointing,
    /// Handing the partition off (final checkpoint, release).
    HandingOff,
}

impl Phase {
    const ALL: [Phase; 8] = [
        Phase::Starting,
        Phase::Restoring,
        Phase::InitialisingOutputs,
        Phase::Replaying,
        Phase::Consuming,
        Phase::Committing,
        Phase::Checkpointing,
        Phase::HandingOff,
    ];

    /// The phase in words, as logs, errors and metric labels carry it.
    pub fn describe(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Restoring => "restoring its state",
            Phase::InitialisingOutputs => "initialising its transactional producer",
            Phase::Replaying => "replaying committed outputs",
            Phase::Consuming => "consuming",
            Phase::Committing => "committing outputs and state",
            Phase::Checkpointing => "checkpointing",
            Phase::HandingOff => "handing off",
        }
    }

    fn index(self) -> u8 {
        Phase::ALL
            .iter()
            .position(|phase| *phase == self)
            .map_or(0, |at| u8::try_from(at).unwrap_or(0))
    }
}

/// When a partition's task last made progress, and in which phase it is.
#[derive(Debug)]
pub struct Progress {
    origin: Instant,
    /// Milliseconds after `origin` of the last beat (may lie ahead: see [`allow_silence`](Self::allow_silence)).
    beat_ms: AtomicU64,
    phase: AtomicU8,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Progress {
    /// A clock that beat just now, in [`Phase::Starting`].
    pub fn new() -> Self {
        Progress {
            origin: Instant::now(),
            beat_ms: AtomicU64::new(0),
            phase: AtomicU8::new(Phase::Starting.index()),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The task moved: a batch applied, a commit written, a step finished.
    pub fn beat(&self) {
        self.beat_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The task finished a step and begins `phase`: a beat, and the phase named.
    pub fn advance_to(&self, phase: Phase) {
        self.enter(phase);
        self.beat();
    }

    /// The task is now in `phase`, without having moved (a routine switch, such as taking a checkpoint
    /// between two consume segments: not progress of the records).
    pub fn enter(&self, phase: Phase) {
        self.phase.store(phase.index(), Ordering::Relaxed);
    }

    /// The task is about to do work that may rightly be silent for up to `silence` (a restore of a
    /// large checkpoint): the watchdog counts from its end.
    pub fn allow_silence(&self, silence: Duration) {
        let ahead = u64::try_from(silence.as_millis()).unwrap_or(u64::MAX);
        self.beat_ms
            .store(self.now_ms().saturating_add(ahead), Ordering::Relaxed);
    }

    /// How long since the last beat (zero while an allowed silence lasts).
    pub fn silent_for(&self) -> Duration {
        let beat = self.beat_ms.load(Ordering::Relaxed);
        Duration::from_millis(self.now_ms().saturating_sub(beat))
    }

    /// The phase the task is in.
    pub fn phase(&self) -> Phase {
        let at = usize::from(self.phase.load(Ordering::Relaxed));
        Phase::ALL.get(at).copied().unwrap_or(Phase::Starting)
    }
}

/// Whether the log end `high` lies past both the committed `next_offset` and the consumer's fetch
/// position (an unknown log end: no). The one rule of "has work" for the watchdog and for the
/// partition's own caught-up beat.
pub(crate) fn records_past(
    next_offset: i64,
    fetch_position: Option<i64>,
    high: Option<i64>,
) -> bool {
    let position = fetch_position.map_or(next_offset, |fetch| fetch.max(next_offset));
    high.is_some_and(|high| high > position)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn silence_counts_from_the_last_beat_and_an_allowed_silence_from_its_end() {
        let progress = Progress::new();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(progress.silent_for(), Duration::from_secs(3));
        progress.enter(Phase::Committing);
        assert_eq!(
            progress.silent_for(),
            Duration::from_secs(3),
            "a switch is no progress"
        );
        progress.advance_to(Phase::Committing);
        assert_eq!(progress.silent_for(), Duration::ZERO);
        assert_eq!(progress.phase(), Phase::Committing);
        progress.allow_silence(Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(8)).await;
        assert_eq!(progress.silent_for(), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(progress.silent_for(), Duration::from_secs(2));
        for phase in Phase::ALL {
            progress.enter(phase);
            assert_eq!(progress.phase(), phase, "{}", phase.describe());
        }
    }
}
