//! The repository checks of a run (its flake's outputs beside the packages), in SQLite.

use crate::db::{Db, DbError};
use nixfarm_core::report::RepoCheck;
use rusqlite::params;

impl Db {
    /// Records a run's repository checks (a retried listing replaces them).
    pub fn record_repo_checks(&mut self, run: &str, checks: &[RepoCheck]) -> Result<(), DbError> {
        let tx = self.conn_mut().transaction()?;
        tx.execute("DELETE FROM repo_checks WHERE run_id = ?1", params![run])?;
        for c in checks {
            tx.execute(
                "INSERT OR REPLACE INTO repo_checks(run_id, name, ok, message) VALUES (?1, ?2, ?3, ?4)",
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
}
