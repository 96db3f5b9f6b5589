//! Package statuses, job outcomes and run states, with their stable spellings.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Writes an enum's one spelling per variant (what is stored, sent and shown) once:
/// `ALL`, `as_str`, `Display` and `FromStr` (unknown words are an error, never a default).
macro_rules! spelled {
    ($ty:ident { $($variant:ident => $word:literal),* $(,)? }) => {
        impl $ty {
            pub const ALL: [$ty; [$($word),*].len()] = [$(Self::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $word,)*
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = UnknownStatus;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::ALL
                    .into_iter()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| UnknownStatus(s.to_string()))
            }
        }
    };
}

/// The readiness status of one package, the report's main column.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
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
    /// Builds, but its main program dies at start (`--version` and `--help` both fail).
    SmokeFailed,
    /// Cross-checked builds: two agents built it and got different outputs, so neither is
    /// vouched for.
    NotReproducible,
    /// Not finished yet (only seen in reports of runs still going).
    #[default]
    Pending,
}

spelled!(PackageStatus {
    Ready => "ready",
    NeedsHash => "needs-hash",
    Unpinned => "unpinned",
    BuildFailed => "build-failed",
    DependencyFailed => "dependency-failed",
    EvalFailed => "eval-failed",
    TimedOut => "timed-out",
    Cancelled => "cancelled",
    InfraFailed => "infra-failed",
    NotCached => "not-cached",
    SmokeFailed => "smoke-failed",
    NotReproducible => "not-reproducible",
    Pending => "pending",
});

impl PackageStatus {
    /// Whether the package failed (for JUnit and exit codes); `unpinned` builds but is not ready.
    pub fn is_failure(self) -> bool {
        !matches!(self, Self::Ready | Self::Pending)
    }
}

/// A string that names no status.
#[derive(Debug, thiserror::Error)]
#[error("unknown status '{0}'")]
pub struct UnknownStatus(pub String);

/// What running a ready package's main program (`--version`, else `--help`) showed.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Smoke {
    /// Not asked for (no `--smoke`), or not built.
    #[default]
    NotRun,
    Passed,
    Failed,
    /// No program to run: no `meta.mainProgram` and not exactly one executable in `bin/`.
    Skipped,
}

spelled!(Smoke {
    NotRun => "not-run",
    Passed => "passed",
    Failed => "failed",
    Skipped => "skipped",
});

/// The outcome of one derivation's build, as an agent reports it and the coordinator
/// records it (its kebab-case spelling is what is stored and shown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BuildOutcome {
    Built,
    /// Built, but the push to the run's cache failed after retries.
    NotCached,
    BuildFailed,
    HashMismatch,
    TimedOut,
    /// Nix or the agent broke (a machine error, a lost agent); retried up to a bound.
    /// Also what an outcome nobody stated counts as: never "built" by default.
    #[default]
    InfraFailed,
    Cancelled,
    /// Not built because a dependency failed (recorded against the dependent).
    DependencyFailed,
    /// Cross-checked builds: another agent built it again and got different outputs (a
    /// build that is not reproducible, or an agent that lied about what it built).
    NotReproducible,
}

spelled!(BuildOutcome {
    Built => "built",
    NotCached => "not-cached",
    BuildFailed => "build-failed",
    HashMismatch => "hash-mismatch",
    TimedOut => "timed-out",
    InfraFailed => "infra-failed",
    Cancelled => "cancelled",
    DependencyFailed => "dependency-failed",
    NotReproducible => "not-reproducible",
});

impl BuildOutcome {
    /// The outputs exist (whether or not they reached the cache): dependents can build.
    pub fn produced_outputs(self) -> bool {
        matches!(self, Self::Built | Self::NotCached)
    }

    /// Only infrastructure failures are retried; the rest are the package's own.
    pub fn is_retryable(self) -> bool {
        self == Self::InfraFailed
    }
}

/// The state of a whole run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Queued,
    Evaluating,
    Building,
    Finished,
    /// The run could not start: its source or attribute path is wrong.
    Failed,
    Cancelled,
}

spelled!(RunState {
    Queued => "queued",
    Evaluating => "evaluating",
    Building => "building",
    Finished => "finished",
    Failed => "failed",
    Cancelled => "cancelled",
});

impl RunState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Finished | Self::Failed | Self::Cancelled)
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
    fn outcomes_and_states_keep_their_spellings_in_json() {
        for o in BuildOutcome::ALL {
            assert_eq!(o.as_str().parse::<BuildOutcome>().unwrap(), o);
            assert_eq!(serde_json::to_string(&o).unwrap(), format!("\"{o}\""));
        }
        for st in PackageStatus::ALL {
            assert_eq!(serde_json::to_string(&st).unwrap(), format!("\"{st}\""));
        }
        for st in [
            RunState::Evaluating,
            RunState::Finished,
            RunState::Cancelled,
        ] {
            let json = serde_json::to_string(&st).unwrap();
            assert_eq!(json, format!("\"{st}\""));
            assert_eq!(serde_json::from_str::<RunState>(&json).unwrap(), st);
        }
        assert!(BuildOutcome::InfraFailed.is_retryable());
        assert!(!BuildOutcome::BuildFailed.is_retryable());
        assert!(BuildOutcome::NotCached.produced_outputs());
        assert_eq!(BuildOutcome::default(), BuildOutcome::InfraFailed);
    }
}
