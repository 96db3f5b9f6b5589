//! Cross-checked builds in SQLite: a derivation one agent built, kept until another agent has
//! built it again (a restart between the two loses neither the first result nor the wait).

use crate::db::{Db, DbError, from_json, store_path, to_json};
use crate::model::{Hold, PendingCheck};
use rusqlite::params;

impl Db {
    /// Records a build awaiting its check (a second record for the same derivation is
    /// ignored: the first build stays the one checked).
    pub fn record_build_check(&mut self, run: &str, c: &PendingCheck) -> Result<(), DbError> {
        let (report, credential) = (to_json(&c.report)?, to_json(&c.credential)?);
        self.conn_mut().execute(
            "INSERT OR IGNORE INTO build_checks(run_id, drv_path, built_by, credential, report, queued_ms, hold) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![run, c.drv.as_str(), c.built_by, credential, report, c.queued_ms, c.hold as i64],
        )?;
        Ok(())
    }

    pub fn build_checks(&self, run: &str) -> Result<Vec<PendingCheck>, DbError> {
        let mut st = self.conn().prepare(
            "SELECT drv_path, built_by, credential, report, queued_ms, hold FROM build_checks WHERE run_id = ?1 ORDER BY queued_ms, drv_path",
        )?;
        st.query_map([run], |r| {
            Ok(PendingCheck {
                drv: store_path(0, r.get(0)?)?,
                built_by: r.get(1)?,
                credential: from_json(2, r.get(2)?)?,
                report: from_json(3, r.get(3)?)?,
                queued_ms: r.get(4)?,
                // A value a newer coordinator wrote: held somewhere, so never taken as
                // pushed to the run's cache.
                hold: Hold::try_from(r.get::<_, i64>(5)?).unwrap_or_else(|n| {
                    tracing::warn!(
                        n,
                        "a pending check held in an unknown way: taken as the farm cache"
                    );
                    Hold::FarmCache
                }),
            })
        })?
        .collect()
    }

    /// Forgets a check once it is settled (whichever way).
    pub fn drop_build_check(&mut self, run: &str, drv: &str) -> Result<(), DbError> {
        self.conn_mut().execute(
            "DELETE FROM build_checks WHERE run_id = ?1 AND drv_path = ?2",
            params![run, drv],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BuildReport, op, sp};
    use nixfarm_core::BuildOutcome;

    #[test]
    fn a_pending_check_survives_until_dropped_and_the_first_build_stays() {
        let mut db = Db::open_in_memory().unwrap();
        db.insert_run(&crate::db::test_run("r1")).unwrap();
        let first = PendingCheck {
            drv: sp("/nix/store/00000000000000000000000000000000-hello.drv"),
            built_by: "a".into(),
            credential: crate::credentials::Credential::Certificate("ab12".into()),
            report: BuildReport {
                kind: BuildOutcome::Built,
                duration_ms: 1200,
                outputs: [(
                    "out".to_string(),
                    op("/nix/store/11111111111111111111111111111111-hello"),
                )]
                .into(),
                ..Default::default()
            },
            queued_ms: 5,
            hold: Hold::FarmCache,
        };
        db.record_build_check("r1", &first).unwrap();
        let again = PendingCheck {
            built_by: "b".into(),
            ..first.clone()
        };
        db.record_build_check("r1", &again).unwrap();
        assert_eq!(db.build_checks("r1").unwrap(), vec![first.clone()]);
        assert!(db.build_checks("r2").unwrap().is_empty());
        db.drop_build_check("r1", &first.drv).unwrap();
        assert!(db.build_checks("r1").unwrap().is_empty());
    }

    /// A database from before held outputs: opened again, the column is there, and a
    /// check stored before reads as not held (its build pushed to the run's cache).
    #[test]
    fn an_older_database_gains_the_hold_column() {
        let (_dir, db) = crate::db::reopened_after(
            r#"ALTER TABLE build_checks DROP COLUMN hold;
             INSERT INTO build_checks(run_id, drv_path, built_by, credential, report, queued_ms) VALUES ('r1', '/nix/store/00000000000000000000000000000000-x.drv', 'a', '"open"', '{"kind":"built"}', 1);"#,
        );
        let old = db.build_checks("r1").unwrap();
        assert_eq!(old.len(), 1);
        assert_eq!(old[0].hold, Hold::No);
    }
}
