//! How long each derivation, by name, took the last time it was built, in SQLite: the
//! scheduler's cost estimates, so a run puts what is known to be long early (a repository's
//! big package, a build that times out) instead of by chance.

use crate::db::{Db, DbError};
use crate::model::{BuildReport, store_name};
use nixfarm_core::BuildOutcome;
use rusqlite::params;
use std::collections::HashMap;

/// Most names remembered (the most recently built are kept).
pub const MAX_KEPT: i64 = 200_000;

/// The time a result says a build took, by derivation name (`relay-0.1`, hash and `.drv`
/// dropped, so the next version of a package inherits the estimate): only a build that
/// really ran here, whatever its outcome, since a timed-out build held its slot as long.
/// Not one whose outputs were there already (a hash-fixing stage's rebuild of what the
/// stage before built): its few milliseconds would replace the real time.
pub fn build_time<'a>(drv: &'a str, r: &BuildReport) -> Option<(&'a str, u64)> {
    let ran = matches!(
        r.kind,
        BuildOutcome::Built
            | BuildOutcome::NotCached
            | BuildOutcome::BuildFailed
            | BuildOutcome::TimedOut
            | BuildOutcome::HashMismatch
    );
    (ran && !r.substituted && !r.already_valid && r.duration_ms > 0)
        .then(|| (store_name(drv), r.duration_ms))
}

impl Db {
    pub(crate) fn note_build_time(
        tx: &rusqlite::Connection,
        drv: &str,
        r: &BuildReport,
    ) -> Result<(), DbError> {
        if let Some((name, ms)) = build_time(drv, r) {
            // REPLACE gives the row a new rowid: rowid order is recency.
            tx.execute(
                "INSERT OR REPLACE INTO build_times(name, ms) VALUES (?1, ?2)",
                params![name, ms as i64],
            )?;
        }
        Ok(())
    }

    /// Every remembered build time (ms by name); forgets all but the newest [`MAX_KEPT`].
    pub fn build_times(&mut self) -> Result<HashMap<String, u64>, DbError> {
        self.conn_mut().execute(
            "DELETE FROM build_times WHERE rowid <= (SELECT rowid FROM build_times ORDER BY rowid DESC LIMIT 1 OFFSET ?1)",
            params![MAX_KEPT],
        )?;
        let mut st = self.conn().prepare("SELECT name, ms FROM build_times")?;
        st.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
        })?
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_builds_that_ran_count() {
        let drv = "/nix/store/00000000000000000000000000000000-relay-0.1.drv";
        let r = |kind, substituted, duration_ms| BuildReport {
            kind,
            substituted,
            duration_ms,
            ..Default::default()
        };
        assert_eq!(
            build_time(drv, &r(BuildOutcome::TimedOut, false, 3100)),
            Some(("relay-0.1", 3100))
        );
        assert_eq!(build_time(drv, &r(BuildOutcome::Built, true, 40)), None);
        assert_eq!(
            build_time(drv, &r(BuildOutcome::InfraFailed, false, 9)),
            None
        );
        assert_eq!(build_time(drv, &r(BuildOutcome::Built, false, 0)), None);
        let there_already = BuildReport {
            already_valid: true,
            ..r(BuildOutcome::Built, false, 2)
        };
        assert_eq!(build_time(drv, &there_already), None);
    }
}
