//! Hash-fixing sessions in SQLite: which runs are stages of which (the session's first run,
//! its root), so the root's report can be read over all of them.

use crate::db::{Db, DbError};
use rusqlite::{OptionalExtension as _, params};

impl Db {
    pub fn add_stage(&self, root: &str, stage: &str) -> Result<(), DbError> {
        self.conn().execute(
            "INSERT INTO run_stages(stage, root) VALUES (?1, ?2)",
            params![stage, root],
        )?;
        Ok(())
    }

    pub fn stages(&self, root: &str) -> Result<Vec<String>, DbError> {
        let mut st = self
            .conn()
            .prepare("SELECT stage FROM run_stages WHERE root = ?1 ORDER BY rowid")?;
        st.query_map([root], |r| r.get(0))?.collect()
    }

    pub fn root_of(&self, stage: &str) -> Result<Option<String>, DbError> {
        self.conn()
            .query_row(
                "SELECT root FROM run_stages WHERE stage = ?1",
                [stage],
                |r| r.get(0),
            )
            .optional()
    }
}
