//! The checker: a verdict over a torture history and the fenced store's final counters that does not
//! trust the code under test — only the recorded times (one monotonic clock), the tokens the lock
//! handed out, what the store said to each write, and what the store holds at the end.
//!
//! For every resource:
//! 1. **Tokens never repeat**: two sections never got the same fencing token.
//! 2. **Mutual exclusion, or fencing**: when two sections overlap in time, the one with the lower token
//!    must not have had a write accepted that it sent after the other had fenced (read) the key — that
//!    write must be *rejected* (a section whose outcome is unknown counts as accepted). Overlaps whose
//!    stale write went out before the newer holder's read are resolved in token order and only counted.
//! 3. **Accepted writes carry increasing tokens**: in the order the writes were sent, every accepted
//!    write's token is higher than the previous accepted one.
//! 4. **No lost update**: no two accepted writes wrote the same counter value.
//! 5. **The counter is exact**: the store's final counter lies between the accepted writes and the
//!    accepted writes plus those whose outcome is unknown (holders killed mid-write).

use std::collections::{BTreeMap, HashMap};

use super::history::{Event, WriteOutcome};

/// One critical section, assembled from its intent and outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// The worker process.
    pub process: u32,
    /// The task within it.
    pub task: u32,
    /// The locked resource.
    pub resource: String,
    /// The fencing token.
    pub token: u64,
    /// When the lock was granted.
    pub start_ns: u64,
    /// When its read (a fence of the key) returned.
    pub read_ns: u64,
    /// When its write was sent.
    pub write_ns: u64,
    /// When the section ended: its write returned, or its process was killed; `None` when neither is
    /// known (it then lasts forever, which can only make the verdict stricter).
    pub end_ns: Option<u64>,
    /// The value it wrote.
    pub value: u64,
    /// What the store said; `None` when unknown (killed mid-write).
    pub write: Option<WriteOutcome>,
}

impl Section {
    /// Whether the store may have taken the write.
    fn maybe_accepted(&self) -> bool {
        !matches!(self.write, Some(WriteOutcome::Rejected))
    }

    fn end(&self) -> u64 {
        self.end_ns.unwrap_or(u64::MAX)
    }
}

/// The checker's verdict on one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Critical sections recorded.
    pub sections: usize,
    /// Writes the store took.
    pub accepted: usize,
    /// Writes the store refused (stale tokens).
    pub rejected: usize,
    /// Sections whose write outcome is unknown (failed, or killed mid-write).
    pub unknown: usize,
    /// Pairs of sections that overlapped in time (faults at work), whether fencing refused the stale
    /// write or it went out before the newer holder's read.
    pub overlaps: usize,
    /// What went wrong, one line each.
    pub violations: Vec<String>,
}

/// Assembles sections from `events`: each intent with the outcome of the same process, task and
/// token; a section without an outcome ends when its process was killed.
pub fn sections(events: &[Event]) -> Vec<Section> {
    let mut killed: HashMap<u32, u64> = HashMap::new();
    let mut outcomes: HashMap<(u32, u32, String, u64), (u64, WriteOutcome)> = HashMap::new();
    for event in events {
        match event {
            Event::Killed { process, at_ns } => {
                killed.insert(*process, *at_ns);
            }
            Event::Outcome {
                process,
                task,
                resource,
                token,
                end_ns,
                write,
            } => {
                outcomes.insert(
                    (*process, *task, resource.clone(), *token),
                    (*end_ns, *write),
                );
            }
            Event::Intent { .. } => {}
        }
    }
    events
        .iter()
        .filter_map(|event| match event {
            Event::Intent {
                process,
                task,
                resource,
                token,
                start_ns,
                read_ns,
                write_ns,
                value,
            } => {
                let outcome = outcomes.get(&(*process, *task, resource.clone(), *token));
                let write = outcome
                    .map(|(_, write)| *write)
                    .filter(|w| *w != WriteOutcome::Failed);
                let end_ns = outcome
                    .map(|(end, _)| *end)
                    .or_else(|| killed.get(process).copied());
                Some(Section {
                    process: *process,
                    task: *task,
                    resource: resource.clone(),
                    token: *token,
                    start_ns: *start_ns,
                    read_ns: *read_ns,
                    write_ns: *write_ns,
                    end_ns,
                    value: *value,
                    write,
                })
            }
            _ => None,
        })
        .collect()
}

/// Checks `sections` against the store's `final_counters` (resource → counter; a resource missing from
/// it counts as 0).
pub fn check(sections: &[Section], final_counters: &BTreeMap<String, u64>) -> Verdict {
    let mut verdict = Verdict {
        sections: sections.len(),
        ..Verdict::default()
    };
    for section in sections {
        match section.write {
            Some(WriteOutcome::Accepted) => verdict.accepted += 1,
            Some(WriteOutcome::Rejected) => verdict.rejected += 1,
            _ => verdict.unknown += 1,
        }
    }
    let mut by_resource: BTreeMap<&str, Vec<&Section>> = BTreeMap::new();
    for section in sections {
        by_resource
            .entry(&section.resource)
            .or_default()
            .push(section);
    }
    let resources: std::collections::BTreeSet<&str> = by_resource
        .keys()
        .copied()
        .chain(final_counters.keys().map(String::as_str))
        .collect();
    for resource in resources {
        let mut history = by_resource.remove(resource).unwrap_or_default();
        history.sort_by_key(|section| (section.start_ns, section.token));
        let final_counter = final_counters.get(resource).copied().unwrap_or(0);
        verdict.overlaps +=
            check_resource(resource, &history, final_counter, &mut verdict.violations);
    }
    verdict
}

/// Checks one resource's sections (sorted by start); how many pairs overlapped.
fn check_resource(
    resource: &str,
    history: &[&Section],
    final_counter: u64,
    violations: &mut Vec<String>,
) -> usize {
    let mut seen_tokens: HashMap<u64, &Section> = HashMap::new();
    for section in history {
        if let Some(first) = seen_tokens.insert(section.token, section) {
            violations.push(format!(
                "{resource}: token {} granted twice (process {} task {}, process {} task {})",
                section.token, first.process, first.task, section.process, section.task
            ));
        }
    }
    let mut overlaps = 0;
    for (i, earlier) in history.iter().enumerate() {
        for later in &history[i + 1..] {
            if later.start_ns >= earlier.end() {
                continue;
            }
            overlaps += 1;
            let (lower, higher) = if earlier.token <= later.token {
                (earlier, later)
            } else {
                (later, earlier)
            };
            if lower.maybe_accepted() && lower.write_ns > higher.read_ns {
                violations.push(format!(
                    "{resource}: holders with tokens {} and {} overlapped and token {}'s write, sent after \
                     token {} had read the key, was not rejected",
                    earlier.token, later.token, lower.token, higher.token
                ));
            }
        }
    }
    let mut accepted: Vec<&&Section> = history
        .iter()
        .filter(|section| section.write == Some(WriteOutcome::Accepted))
        .collect();
    accepted.sort_by_key(|section| section.write_ns);
    for pair in accepted.windows(2) {
        if pair[1].token <= pair[0].token {
            violations.push(format!(
                "{resource}: accepted writes went from token {} to {}",
                pair[0].token, pair[1].token
            ));
        }
    }
    let mut written: HashMap<u64, u64> = HashMap::new();
    for section in &accepted {
        if let Some(other) = written.insert(section.value, section.token) {
            violations.push(format!(
                "{resource}: tokens {other} and {} both wrote {} (a lost update)",
                section.token, section.value
            ));
        }
    }
    let sure = accepted.len() as u64;
    let unknown = history
        .iter()
        .filter(|section| section.write.is_none())
        .count() as u64;
    if final_counter < sure || final_counter > sure + unknown {
        violations.push(format!(
            "{resource}: the counter ended at {final_counter} after {sure} accepted writes \
             ({unknown} of unknown outcome)"
        ));
    }
    overlaps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(token: u64, start: u64, end: u64, value: u64, write: WriteOutcome) -> Section {
        Section {
            process: (token % 3) as u32,
            task: 0,
            resource: "r".to_owned(),
            token,
            start_ns: start,
            read_ns: start + 1,
            write_ns: end.saturating_sub(1),
            end_ns: Some(end),
            value,
            write: Some(write),
        }
    }

    fn counters(value: u64) -> BTreeMap<String, u64> {
        BTreeMap::from([("r".to_owned(), value)])
    }

    use WriteOutcome::{Accepted, Rejected};

    #[test]
    fn a_clean_sequential_history_passes() {
        let history = [
            section(1, 0, 10, 1, Accepted),
            section(2, 11, 20, 2, Accepted),
            section(5, 21, 30, 3, Accepted),
        ];
        let verdict = check(&history, &counters(3));
        assert_eq!(verdict.violations, Vec::<String>::new());
        assert_eq!((verdict.sections, verdict.accepted), (3, 3));
    }

    #[test]
    fn an_overlap_is_fine_only_when_the_lower_token_was_rejected() {
        // A holder paused past its TTL (token 1) overlaps the next holder (token 2); its late write loses.
        let fenced = [
            section(1, 0, 100, 1, Rejected),
            section(2, 50, 60, 1, Accepted),
        ];
        assert!(check(&fenced, &counters(1)).violations.is_empty());
        // The same overlap with the stale write taken: a violation (and a lost update).
        let unfenced = [
            section(1, 0, 100, 1, Accepted),
            section(2, 50, 60, 1, Accepted),
        ];
        let verdict = check(&unfenced, &counters(1));
        assert!(
            verdict.violations.iter().any(|v| v.contains("overlapped")),
            "{verdict:?}"
        );
        assert!(
            verdict.violations.iter().any(|v| v.contains("lost update")),
            "{verdict:?}"
        );
    }

    #[test]
    fn a_stale_write_sent_before_the_newer_read_is_an_ordered_overlap() {
        // Token 1 resumes and sends its write (at 49) just before token 2 reads (at 51): both accepted
        // in token order, both counted — an overlap, not a violation.
        let mut history = [
            section(1, 0, 50, 1, Accepted),
            section(2, 48, 60, 2, Accepted),
        ];
        history[1].read_ns = 51;
        let verdict = check(&history, &counters(2));
        assert!(verdict.violations.is_empty(), "{verdict:?}");
        assert_eq!(verdict.overlaps, 1);
    }

    #[test]
    fn a_repeated_token_is_a_violation() {
        let history = [
            section(4, 0, 10, 1, Accepted),
            section(4, 20, 30, 2, Rejected),
        ];
        let verdict = check(&history, &counters(1));
        assert!(
            verdict
                .violations
                .iter()
                .any(|v| v.contains("granted twice")),
            "{verdict:?}"
        );
    }

    #[test]
    fn accepted_tokens_must_increase_in_time_order() {
        let history = [
            section(7, 0, 10, 1, Accepted),
            section(3, 20, 30, 2, Accepted),
        ];
        let verdict = check(&history, &counters(2));
        assert!(
            verdict
                .violations
                .iter()
                .any(|v| v.contains("went from token 7 to 3")),
            "{verdict:?}"
        );
    }

    #[test]
    fn the_counter_must_match_the_accepted_writes() {
        let history = [
            section(1, 0, 10, 1, Accepted),
            section(2, 20, 30, 2, Accepted),
        ];
        assert!(
            check(&history, &counters(1))
                .violations
                .iter()
                .any(|v| v.contains("ended at 1"))
        );
        assert!(
            check(&history, &counters(3))
                .violations
                .iter()
                .any(|v| v.contains("ended at 3"))
        );
    }

    #[test]
    fn a_holder_killed_mid_write_may_or_may_not_have_counted() {
        let events = vec![
            Event::Intent {
                process: 1,
                task: 0,
                resource: "r".to_owned(),
                token: 1,
                start_ns: 0,
                read_ns: 1,
                write_ns: 30,
                value: 1,
            },
            Event::Killed {
                process: 1,
                at_ns: 40,
            },
            Event::Intent {
                process: 2,
                task: 0,
                resource: "r".to_owned(),
                token: 2,
                start_ns: 50,
                read_ns: 51,
                write_ns: 52,
                value: 2,
            },
            Event::Outcome {
                process: 2,
                task: 0,
                resource: "r".to_owned(),
                token: 2,
                end_ns: 60,
                write: Accepted,
            },
        ];
        let assembled = sections(&events);
        assert_eq!(assembled[0].end_ns, Some(40));
        assert_eq!(assembled[0].write, None);
        for counter in [1, 2] {
            let verdict = check(&assembled, &counters(counter));
            assert!(verdict.violations.is_empty(), "{counter}: {verdict:?}");
            assert_eq!(verdict.unknown, 1);
        }
        // Had the killed holder sent its write after the next one read, that is a violation.
        let mut late_kill = events.clone();
        late_kill[1] = Event::Killed {
            process: 1,
            at_ns: 55,
        };
        if let Event::Intent { write_ns, .. } = &mut late_kill[0] {
            *write_ns = 53;
        }
        let verdict = check(&sections(&late_kill), &counters(2));
        assert!(
            verdict.violations.iter().any(|v| v.contains("overlapped")),
            "{verdict:?}"
        );
    }

    #[test]
    fn a_section_that_never_ended_overlaps_everything_after_it() {
        let mut open = section(1, 0, 0, 1, Accepted);
        open.end_ns = None;
        open.write = None;
        open.write_ns = 1_005;
        let history = [open, section(2, 1_000, 1_010, 2, Accepted)];
        let verdict = check(&history, &counters(2));
        assert!(
            verdict.violations.iter().any(|v| v.contains("overlapped")),
            "{verdict:?}"
        );
    }
}
