//! The repository checks of a run (its flake's outputs beside the packages), in SQLite.

use crate::db::{Db, DbError};
use nixfarm_core::report::RepoCheck;
use rusqlite::params;
use std::collections::BTreeMap;

impl Db {
    /// Records a run's repository checks (a retried listing replaces them).
    pub fn record_repo_checks(&mut self, run: &str, checks: &[RepoCheck]) -> Result<(), DbError> {
        let tx = self.conn_mut().savepoint()?;
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

    /// Records that a run's listing agent still owes its repository checks, for that
    /// attempt, until `until_ms` (None: they came, or will not).
    pub fn set_repo_pending(
        &mut self,
        run: &str,
        pending: Option<(&str, &str, i64)>,
    ) -> Result<(), DbError> {
        match pending {
            Some((attempt, agent, until_ms)) => self.conn().execute(
                "INSERT OR REPLACE INTO repo_pending(run_id, attempt, agent, until_ms) VALUES (?1, ?2, ?3, ?4)",
                params![run, attempt, agent, until_ms],
            ),
            None => self
                .conn()
                .execute("DELETE FROM repo_pending WHERE run_id = ?1", params![run]),
        }
        .map(drop)
    }

    /// The repository checks still owed, by run: (attempt, agent, until_ms).
    pub fn repo_pending(&self) -> Result<BTreeMap<String, (String, String, i64)>, DbError> {
        let mut st = self
            .conn()
            .prepare("SELECT run_id, attempt, agent, until_ms FROM repo_pending")?;
        st.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?))))?
            .collect()
    }
}
