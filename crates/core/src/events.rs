//! A run's events: what the coordinator emits, stores and streams, and what `watch` shows.
//! One typed enum, so producer and consumer cannot drift apart; the wire carries its kind and
//! its JSON.

use crate::report::Summary;
use crate::status::{BuildOutcome, RunState};
use crate::store_path::StorePath;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RunEvent {
    RunStarted {
        label: String,
        attr_path: String,
    },
    /// The attribute names are known; evaluation goes on in `tasks` tasks.
    EvalListed {
        attrs: u64,
        tasks: u64,
    },
    EvalProgress {
        task: i64,
        attrs: u64,
        eval_failed: u64,
        tasks_done: u64,
        tasks: u64,
    },
    /// Cross-checked evaluation: `agent` answered evaluation task `task` (-1: the listing),
    /// and another agent must give the same answer before it is taken.
    EvalAwaitingCheck {
        task: i64,
        agent: String,
    },
    /// Evaluation is complete: `drvs` derivations to realise for `packages` packages.
    EvalDone {
        packages: u64,
        drvs: u64,
    },
    JobStarted {
        drv: StorePath,
        name: String,
        agent: String,
    },
    /// Cross-checked builds: `agent` built it in `duration_ms`; it counts once another
    /// agent has built it again and got the same outputs.
    JobAwaitingCheck {
        drv: StorePath,
        name: String,
        agent: String,
        duration_ms: u64,
    },
    /// Cross-checked builds: `agent` builds again what `built_by` built, to compare.
    JobCheckStarted {
        drv: StorePath,
        name: String,
        agent: String,
        built_by: String,
    },
    /// An infrastructure failure; the job is queued again.
    JobRetry {
        drv: StorePath,
        message: String,
        retry: i64,
    },
    JobFinished {
        drv: StorePath,
        name: String,
        agent: String,
        outcome: BuildOutcome,
        message: String,
        duration_ms: u64,
        substituted: bool,
        /// Dependents that can now never build.
        dependency_failed: u64,
        done: u64,
        total: u64,
    },
    RunFinished {
        state: RunState,
        summary: Summary,
    },
    RunFailed {
        error: String,
    },
}

/// The kinds that end a run's stream, spelled once.
const RUN_FINISHED: &str = "run-finished";
const RUN_FAILED: &str = "run-failed";

impl RunEvent {
    /// The event's kind as the wire and the database carry it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RunStarted { .. } => "run-started",
            Self::EvalListed { .. } => "eval-listed",
            Self::EvalProgress { .. } => "eval-progress",
            Self::EvalAwaitingCheck { .. } => "eval-awaiting-check",
            Self::EvalDone { .. } => "eval-done",
            Self::JobStarted { .. } => "job-started",
            Self::JobAwaitingCheck { .. } => "job-awaiting-check",
            Self::JobCheckStarted { .. } => "job-check-started",
            Self::JobRetry { .. } => "job-retry",
            Self::JobFinished { .. } => "job-finished",
            Self::RunFinished { .. } => RUN_FINISHED,
            Self::RunFailed { .. } => RUN_FAILED,
        }
    }

    /// Whether a kind ends the run's stream.
    pub fn is_terminal_kind(kind: &str) -> bool {
        [RUN_FINISHED, RUN_FAILED].contains(&kind)
    }

    /// The JSON the wire and the database carry (the kind included).
    pub fn to_json(&self) -> String {
        // A derived Serialize of plain fields cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads an event from its kind and JSON (JSON stored before the kind was part of it
    /// is read too).
    pub fn from_parts(kind: &str, json: &str) -> Result<RunEvent, serde_json::Error> {
        let mut v: serde_json::Value = serde_json::from_str(json)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("kind".into(), serde_json::Value::String(kind.into()));
        }
        serde_json::from_value(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_old_payloads_still_read() {
        let e = RunEvent::JobFinished {
            drv: StorePath::parse_drv("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a.drv").unwrap(),
            name: "a".into(),
            agent: "a1".into(),
            outcome: BuildOutcome::NotCached,
            message: "push failed".into(),
            duration_ms: 5,
            substituted: false,
            dependency_failed: 0,
            done: 1,
            total: 2,
        };
        assert_eq!(RunEvent::from_parts(e.kind(), &e.to_json()).unwrap(), e);
        let old = r#"{"error":"boom"}"#;
        assert_eq!(
            RunEvent::from_parts("run-failed", old).unwrap(),
            RunEvent::RunFailed {
                error: "boom".into()
            }
        );
        assert!(RunEvent::from_parts("no-such-kind", "{}").is_err());
        assert!(RunEvent::is_terminal_kind("run-finished"));
        assert!(!RunEvent::is_terminal_kind("job-finished"));
    }
}
