//! When a partition this instance gave up may be claimed again: after a failure, an exponential,
//! capped and jittered pause per partition (a persistent failure — a stored offset outside the log
//! under `fail`, an unreadable checkpoint, a stale owner — otherwise re-claims, re-opens RocksDB and
//! logs a warning every tick, for ever); after a record its job refused, the configured pause.
//!
//! A partition's failure streak ends when one of its tasks ends cleanly, or when its last failure is
//! older than twice the cap (it ran for a while in between).

use std::collections::HashMap;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::status::instant_to_unix_ms;

/// The pause after a partition's first failure in a streak.
pub const FIRST_PAUSE: Duration = Duration::from_millis(500);

/// The longest pause between two attempts at a failing partition.
pub const MAX_PAUSE: Duration = Duration::from_secs(30);

/// A partition not to be claimed before `until`, and how many failures in a row led there.
#[derive(Debug, Clone, Copy)]
struct Pause {
    until: Instant,
    /// `until` on the wall clock, fixed when the pause is set (for the status).
    until_ms: u64,
    failures: u32,
    last_failure: Instant,
}

/// The partitions this instance holds back from claiming, and until when.
#[derive(Debug, Default)]
pub(super) struct PartitionBackoff {
    paused: HashMap<i32, Pause>,
}

impl PartitionBackoff {
    /// Records a failure of `partition` now: the next pause of its streak (doubling from
    /// [`FIRST_PAUSE`] up to [`MAX_PAUSE`], ±20 %), and the streak's length.
    pub(super) fn failed(&mut self, partition: i32, now: Instant) -> (Duration, u32) {
        let failures = match self.paused.get(&partition) {
            Some(pause) if now.duration_since(pause.last_failure) < 2 * MAX_PAUSE => {
                pause.failures.saturating_add(1)
            }
            _ => 1,
        };
        let pause = jittered(pause_after(failures));
        self.paused.insert(
            partition,
            Pause {
                until: now + pause,
                until_ms: instant_to_unix_ms(now + pause),
                failures,
                last_failure: now,
            },
        );
        (pause, failures)
    }

    /// Holds `partition` back until at least `until` (a refused record's pause), keeping its streak.
    pub(super) fn hold_until(&mut self, partition: i32, until: Instant) {
        let pause = self.paused.entry(partition).or_insert(Pause {
            until,
            until_ms: 0,
            failures: 0,
            last_failure: Instant::now(),
        });
        pause.until = pause.until.max(until);
        pause.until_ms = instant_to_unix_ms(pause.until);
    }

    /// A task of `partition` ended cleanly: its streak is over.
    pub(super) fn succeeded(&mut self, partition: i32) {
        self.paused.remove(&partition);
    }

    /// Whether `partition` is held back at `now`.
    pub(super) fn holds(&self, partition: i32, now: Instant) -> bool {
        self.paused
            .get(&partition)
            .is_some_and(|pause| now < pause.until)
    }

    /// The partitions held back at `now`: their failures in a row and when they may be claimed again
    /// (milliseconds since the Unix epoch).
    pub(super) fn held(&self, now: Instant) -> impl Iterator<Item = (i32, u32, u64)> + '_ {
        self.paused
            .iter()
            .filter(move |(_, pause)| now < pause.until)
            .map(|(partition, pause)| (*partition, pause.failures, pause.until_ms))
    }
}

/// [`FIRST_PAUSE`] doubled for each failure after the first, at most [`MAX_PAUSE`].
fn pause_after(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_PAUSE.saturating_mul(1 << doublings).min(MAX_PAUSE)
}

/// `pause` ±20 %: partitions that failed together (a broker went away) do not return together.
fn jittered(pause: Duration) -> Duration {
    pause.mul_f64(rand::rng().random_range(0.8..=1.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_and_a_clean_end_resets_them() {
        assert_eq!(pause_after(1), FIRST_PAUSE);
        assert_eq!(pause_after(2), 2 * FIRST_PAUSE);
        assert_eq!(pause_after(40), MAX_PAUSE);
        let mut backoff = PartitionBackoff::default();
        let now = Instant::now();
        let (first, streak) = backoff.failed(3, now);
        assert_eq!(streak, 1);
        assert!(first >= FIRST_PAUSE.mul_f64(0.8) && first <= FIRST_PAUSE.mul_f64(1.2));
        assert!(backoff.holds(3, now) && !backoff.holds(4, now));
        assert!(!backoff.holds(3, now + first));
        assert_eq!(backoff.failed(3, now + first).1, 2);
        backoff.succeeded(3);
        assert_eq!(backoff.failed(3, now + first).1, 1, "a new streak");
        let later = now + 3 * MAX_PAUSE;
        assert_eq!(backoff.failed(3, later).1, 1, "an old failure is forgotten");
    }

    #[test]
    fn a_refused_records_pause_is_kept_whole() {
        let mut backoff = PartitionBackoff::default();
        let now = Instant::now();
        backoff.hold_until(1, now + Duration::from_secs(30));
        assert!(backoff.holds(1, now + Duration::from_secs(29)));
        assert_eq!(backoff.held(now).count(), 1);
    }
}
