//! The repository checks of a run (its flake's outputs beside the packages), in SQLite.

use crate::db::{Db, DbError};
use crate::model::OwedChecks;
use nixfarm_core::report::RepoCheck;
use rusqlite::params;
use std::collections::BTreeMap;

impl Db {
    /// Records a run's repository checks: they replace those recorded before (a retried
    /// listing's), or with `merge` join them (two agents' checks of one listing): a check
    /// passes only if every report of it passed.
    pub fn record_repo_checks(
        &mut self,
        run: &str,
        checks: &[RepoCheck],
        merge: bool,
    ) -> Result<(), DbError> {
        let tx = self.conn_mut().savepoint()?;
        if !merge {
            tx.execute("DELETE FROM repo_checks WHERE run_id = ?1", params![run])?;
        }
        for c in checks {
            // A failure stays: merged, a pass never overwrites one.
            tx.execute(
                "INSERT INTO repo_checks(run_id, name, ok, message) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(run_id, name) DO UPDATE SET ok = excluded.ok, message = excluded.message
                 WHERE repo_checks.ok AND NOT excluded.ok",
                params![run, c.name, c.ok, c.message],
            )?;
        }
        tx.commit()
    }

    pub fn repo_checks(&self, run: &str) -> Result<Vec<RepoCheck>, DbError> {
        let mut st = self
            .conn()
            .prepare("SELECT name, ok, message FROM repo_checks WHERE run_id = ?1 ORDER BY name")?;
        st.query_map([run], |r| {
            Ok(RepoCheck {
                name: r.get(0)?,
                ok: r.get(1)?,
                message: r.get(2)?,
            })
        })?
        .collect()
    }

    /// Records that a listing agent owes a run its repository checks, for that attempt,
    /// until `until_ms`.
    pub fn owe_repo_checks(
        &mut self,
        run: &str,
        attempt: &str,
        agent: &str,
        until_ms: i64,
    ) -> Result<(), DbError> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO repo_owed(run_id, attempt, agent, until_ms) VALUES (?1, ?2, ?3, ?4)",
                params![run, attempt, agent, until_ms],
            )
            .map(drop)
    }

    /// Checks owed for `attempt` came, or will not (None: none are owed the run any more).
    pub fn repo_checks_settled(&mut self, run: &str, attempt: Option<&str>) -> Result<(), DbError> {
        match attempt {
            Some(a) => self.conn().execute(
                "DELETE FROM repo_owed WHERE run_id = ?1 AND attempt = ?2",
                params![run, a],
            ),
            None => self
                .conn()
                .execute("DELETE FROM repo_owed WHERE run_id = ?1", params![run]),
        }
        .map(drop)
    }

    /// The repository checks still owed, by run: what each listing that follows owes.
    pub fn repo_owed(&self) -> Result<BTreeMap<String, Vec<OwedChecks>>, DbError> {
        let mut st = self.conn().prepare(
            "SELECT run_id, attempt, agent, until_ms FROM repo_owed ORDER BY run_id, until_ms",
        )?;
        let mut owed: BTreeMap<String, Vec<OwedChecks>> = BTreeMap::new();
        for row in st.query_map([], |r| {
            let o = OwedChecks {
                attempt: r.get(1)?,
                agent: r.get(2)?,
                until_ms: r.get(3)?,
            };
            Ok((r.get::<_, String>(0)?, o))
        })? {
            let (run, o) = row?;
            owed.entry(run).or_default().push(o);
        }
        Ok(owed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database from when one listing per run owed its repository checks: opened again,
    /// what was owed is still owed, in the table that holds several.
    #[test]
    fn checks_owed_in_an_older_database_are_still_owed() {
        let (_dir, db) = crate::db::reopened_after(
            "CREATE TABLE repo_pending (run_id TEXT PRIMARY KEY REFERENCES runs(id), attempt TEXT NOT NULL, agent TEXT NOT NULL, until_ms INTEGER NOT NULL);
             INSERT INTO repo_pending VALUES ('r1', 'l1', 'a', 5);",
        );
        let owed = db.repo_owed().unwrap();
        let want = OwedChecks {
            attempt: "l1".into(),
            agent: "a".into(),
            until_ms: 5,
        };
        assert_eq!(owed["r1"], vec![want]);
        let old: i64 = db
            .conn()
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'repo_pending'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old, 0);
    }

    #[test]
    fn merged_checks_keep_every_failure_and_replaced_ones_go() {
        let mut db = Db::open_in_memory().unwrap();
        db.insert_run(&crate::db::test_run("r1")).unwrap();
        let c = |name: &str, ok: bool| RepoCheck {
            name: name.into(),
            ok,
            message: if ok {
                String::new()
            } else {
                format!("{name} broke")
            },
        };
        db.record_repo_checks("r1", &[c("x", false), c("y", true)], false)
            .unwrap();
        db.record_repo_checks("r1", &[c("x", true), c("y", false), c("z", true)], true)
            .unwrap();
        assert_eq!(
            db.repo_checks("r1").unwrap(),
            vec![c("x", false), c("y", false), c("z", true)]
        );
        db.record_repo_checks("r1", &[c("x", true)], false).unwrap();
        assert_eq!(db.repo_checks("r1").unwrap(), vec![c("x", true)]);
    }
}
