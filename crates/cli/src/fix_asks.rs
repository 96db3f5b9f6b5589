//! When a fixing session asks each run for its report mid-run.

use std::collections::{BTreeMap, BTreeSet};

/// When each run's report may be asked for mid-run. A large run's report takes a while to
/// compute, so a run is asked again only after twice as long as its last answer took (at
/// least 50 ms); a question that comes sooner is held back until then, never dropped: the
/// build that raised it may be the run's last for seconds (a long build), and the packages
/// it settled would wait for the run's end to go on.
#[derive(Default)]
pub(crate) struct Asks {
    /// Per run: when it was last asked and how long the answer took.
    last: BTreeMap<String, (std::time::Instant, std::time::Duration)>,
    /// Runs with a question held back, and when it may be asked.
    held: BTreeMap<String, std::time::Instant>,
}

impl Asks {
    /// Whether `run` may be asked at `now`; if not, the question is held back until it may.
    pub(crate) fn may_ask(&mut self, run: &str, now: std::time::Instant) -> bool {
        match self.last.get(run) {
            Some((at, took)) => {
                let next = *at + (*took * 2).max(std::time::Duration::from_millis(50));
                if now < next {
                    self.held.insert(run.to_string(), next);
                    return false;
                }
                true
            }
            None => true,
        }
    }

    /// `run` was asked at `at` and answered after `took`.
    pub(crate) fn asked(&mut self, run: &str, at: std::time::Instant, took: std::time::Duration) {
        self.held.remove(run);
        self.last.insert(run.to_string(), (at, took));
    }

    /// The runs whose held-back question is due at `now` (no longer held).
    pub(crate) fn due(&mut self, now: std::time::Instant) -> BTreeSet<String> {
        let due: BTreeSet<String> = self
            .held
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(run, _)| run.clone())
            .collect();
        for run in &due {
            self.held.remove(run);
        }
        due
    }

    /// The earliest moment a held-back question is due.
    pub(crate) fn next_due(&self) -> Option<std::time::Instant> {
        self.held.values().min().copied()
    }

    /// `run` ended: its end's report answers every question.
    pub(crate) fn forget(&mut self, run: &str) {
        self.held.remove(run);
        self.last.remove(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_question_too_soon_after_the_last_answer_is_held_back_not_dropped() {
        let mut asks = Asks::default();
        let t0 = Instant::now();
        assert!(asks.may_ask("r1", t0));
        asks.asked("r1", t0, Duration::from_millis(10));
        // 20 ms later: too soon (at least 50 ms between questions), so held until t0 + 50 ms.
        assert!(!asks.may_ask("r1", t0 + Duration::from_millis(20)));
        assert_eq!(asks.next_due(), Some(t0 + Duration::from_millis(50)));
        assert!(asks.due(t0 + Duration::from_millis(49)).is_empty());
        let due = asks.due(t0 + Duration::from_millis(50));
        assert_eq!(due.into_iter().collect::<Vec<_>>(), ["r1"]);
        assert_eq!(asks.next_due(), None);
        assert!(asks.may_ask("r1", t0 + Duration::from_millis(50)));
    }

    #[test]
    fn a_slow_answer_spaces_the_questions_and_an_ended_run_is_not_asked_again() {
        let mut asks = Asks::default();
        let t0 = Instant::now();
        asks.asked("big", t0, Duration::from_millis(400));
        assert!(!asks.may_ask("big", t0 + Duration::from_millis(500)));
        assert_eq!(asks.next_due(), Some(t0 + Duration::from_millis(800)));
        // Another run is not held back by this one.
        assert!(asks.may_ask("small", t0 + Duration::from_millis(500)));
        asks.forget("big");
        assert_eq!(asks.next_due(), None);
        assert!(asks.due(t0 + Duration::from_secs(5)).is_empty());
    }
}
