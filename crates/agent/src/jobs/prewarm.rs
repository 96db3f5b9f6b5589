//! Nix daemons started ahead of a run's builds while it is evaluated, with the settings its builds will ask for.

use super::*;

/// The limits a build job gets, as the coordinator sets them (the package's own, else the
/// run's; seconds, 0: none), read as a build job's are.
fn limits((timeout, max_silent): (u64, u64)) -> (Option<Duration>, Option<Duration>) {
    use super::assigned::limit;
    (limit(timeout), limit(max_silent))
}

/// Most sets of package limits daemons are started ahead for, per evaluation.
const PREWARMED_LIMITS: usize = 4;

/// Has daemons started for the builds of a run being evaluated, while it is: its first
/// builds then wait for none. `run_limits` are the run's limits for builds; once `packages`
/// are evaluated, those that set limits of their own get one daemon per distinct set too
/// (a package with `meta.timeout` is often the long one the run waits on), and the run's
/// own are started again where a long evaluation outlasted the first ones' idle time. A
/// run's builds substitute from its cache (or the farm's) with the settings its builds
/// will get ([`super::substitution`]); working them out may ask the cache, so that goes on
/// beside the evaluation.
pub(super) fn prewarm_builds(
    shared: &Arc<Shared>,
    (run_cache, run_keys): (&str, &[String]),
    run_limits: (u64, u64),
    packages: Option<&[pb::EvaluatedAttr]>,
) {
    let mut sets = vec![(run_limits, shared.cfg.max_jobs as usize)];
    if let Some(packages) = packages {
        sets.extend(
            package_limits(run_limits, packages)
                .into_iter()
                .map(|l| (l, 1)),
        );
    }
    // Keys a build job would be refused for start nothing ahead of it either.
    if super::assigned::check_keys(run_keys).is_err() {
        return;
    }
    let (shared, run_cache, run_keys) = (shared.clone(), run_cache.to_string(), run_keys.to_vec());
    tokio::spawn(async move {
        // A cache that cannot be reached now is the build's to report.
        let Ok(s) = super::substitution(&shared, &run_cache, &run_keys).await else {
            return;
        };
        for (l, n) in sets {
            shared.nix.prewarm(&s.nix_options(&shared, limits(l)), n);
        }
    });
}

/// The distinct limits evaluated packages' builds will get where they differ from the run's
/// (a package's own limit wins, as the coordinator sets it), at most [`PREWARMED_LIMITS`].
fn package_limits(run_limits: (u64, u64), packages: &[pb::EvaluatedAttr]) -> Vec<(u64, u64)> {
    let pick = |own: u64, run: u64| if own > 0 { own } else { run };
    let mut own: Vec<(u64, u64)> = packages
        .iter()
        .filter(|p| p.error.is_empty())
        .map(|p| {
            (
                pick(p.timeout_secs, run_limits.0),
                pick(p.max_silent_secs, run_limits.1),
            )
        })
        .filter(|l| *l != run_limits)
        .collect();
    own.sort();
    own.dedup();
    own.truncate(PREWARMED_LIMITS);
    own
}

#[cfg(test)]
mod prewarm_tests {
    use super::*;

    fn pkg(timeout_secs: u64, max_silent_secs: u64, error: &str) -> pb::EvaluatedAttr {
        pb::EvaluatedAttr {
            timeout_secs,
            max_silent_secs,
            error: error.into(),
            ..Default::default()
        }
    }

    #[test]
    fn daemons_are_started_ahead_for_the_limits_packages_set_themselves() {
        // relay-like (20 s, 3 s silent) twice, one with only a silence limit, the rest none.
        let packages = [
            pkg(20, 3, ""),
            pkg(0, 0, ""),
            pkg(20, 3, ""),
            pkg(0, 7, ""),
            pkg(9, 9, "does not evaluate"),
        ];
        assert_eq!(package_limits((0, 0), &packages), [(0, 7), (20, 3)]);
        // The run's own limits fill in what a package leaves unset; those equal to the
        // run's are its daemons already.
        assert_eq!(package_limits((3600, 0), &packages), [(20, 3), (3600, 7)]);
        assert_eq!(package_limits((20, 3), &[pkg(0, 3, "")]), []);
        let many: Vec<_> = (1..=10).map(|t| pkg(t, 0, "")).collect();
        assert_eq!(package_limits((0, 0), &many).len(), PREWARMED_LIMITS);
    }
}
