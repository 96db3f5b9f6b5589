//! Package statuses, job outcomes and run states, with their stable spellings.

use std::fmt;
use std::str::FromStr;

/// The readiness status of one package, the report's main column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PackageStatus {
    /// Evaluates, pinned, all hashes right, builds; outputs are where users pull from.
    Ready,
    /// A fixed-output hash is missing or wrong.
    NeedsHash,
    /// Builds, but its source is a branch or tag name rather than a commit.
    Unpinned,
    BuildFailed,
    DependencyFailed,
    EvalFailed,
    TimedOut,
    Cancelled,
    /// The agent or Nix broke more often than the retry bound allows.
    InfraFailed,
    /// Builds, but its outputs are not in the run's binary cache (the push failed).
    NotCached,
    /// Not finished yet (only seen in reports of runs still going).
    Pending,
}

impl PackageStatus {
    pub const ALL: [PackageStatus; 11] = [
        Self::Ready,
        Self::NeedsHash,
        Self::Unpinned,
        Self::BuildFailed,
        Self::DependencyFailed,
        Self::EvalFailed,
        Self::TimedOut,
        Self::Cancelled,
        Self::InfraFailed,
        Self::NotCached,
        Self::Pending,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::NeedsHash => "needs-hash",
            Self::Unpinned => "unpinned",
            Self::BuildFailed => "build-failed",
            Self::DependencyFailed => "dependency-failed",
            Self::EvalFailed => "eval-failed",
            Self::TimedOut => "timed-out",
            Self::Cancelled => "cancelled",
            Self::InfraFailed => "infra-failed",
            Self::NotCached => "not-cached",
            Self::Pending => "pending",
        }
    }

    /// Whether the package failed (for JUnit and exit codes); `unpinned` builds but is not ready.
    pub fn is_failure(self) -> bool {
        !matches!(self, Self::Ready | Self::Pending)
    }
}

impl fmt::Display for PackageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no status.
#[derive(Debug, thiserror::Error)]
#[error("unknown status '{0}'")]
pub struct UnknownStatus(pub String);

impl FromStr for PackageStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// The typed outcome of one derivation's build job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    Built,
    BuildFailed {
        message: String,
    },
    HashMismatch {
        specified: String,
        got: String,
    },
    TimedOut {
        message: String,
    },
    /// Nix or the agent broke; retried with backoff up to a bound.
    InfraFailed {
        message: String,
    },
    Cancelled,
}

impl JobOutcome {
    /// Deterministic failures are never retried; infrastructure failures may be.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::InfraFailed { .. })
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Built => "built",
            Self::BuildFailed { .. } => "build-failed",
            Self::HashMismatch { .. } => "hash-mismatch",
            Self::TimedOut { .. } => "timed-out",
            Self::InfraFailed { .. } => "infra-failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// The state of a whole run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Queued,
    Evaluating,
    Building,
    Finished,
    /// The run could not start: its source or attribute path is wrong.
    Failed,
    Cancelled,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Evaluating => "evaluating",
            Self::Building => "building",
            Self::Finished => "finished",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Finished | Self::Failed | Self::Cancelled)
    }
}

impl FromStr for RunState {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Self::Queued,
            Self::Evaluating,
            Self::Building,
            Self::Finished,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
        .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip() {
        for st in PackageStatus::ALL {
            assert_eq!(st.as_str().parse::<PackageStatus>().unwrap(), st);
        }
        assert!("bogus".parse::<PackageStatus>().is_err());
    }

    #[test]
    fn only_infra_failures_retry() {
        assert!(
            JobOutcome::InfraFailed {
                message: String::new()
            }
            .is_retryable()
        );
        assert!(
            !JobOutcome::BuildFailed {
                message: String::new()
            }
            .is_retryable()
        );
        assert!(
            !JobOutcome::HashMismatch {
                specified: String::new(),
                got: String::new()
            }
            .is_retryable()
        );
    }
}
