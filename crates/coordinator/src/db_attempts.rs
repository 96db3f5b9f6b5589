//! Attempts in SQLite: each hand-out of a job to an agent, finished once, and what they
//! add up to (retries, infrastructure failures, lost attempts).

use crate::db::{Db, DbError, bad_column};
use crate::model::{AttemptKind, AttemptState};
use rusqlite::params;

/// A stored attempt row.
#[derive(Debug, Clone)]
pub struct AttemptRow {
    pub id: String,
    pub run_id: String,
    pub kind: AttemptKind,
    pub target: String,
    pub agent: String,
    pub state: AttemptState,
}

impl Db {
    pub fn insert_attempt(&self, a: &AttemptRow, started_ms: i64) -> Result<(), DbError> {
        self.conn().execute(
            "INSERT INTO attempts(id, run_id, kind, target, agent, state, started_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                a.id,
                a.run_id,
                a.kind.as_str(),
                a.target,
                a.agent,
                a.state.as_str(),
                started_ms
            ],
        )?;
        Ok(())
    }

    /// Finishes an attempt once: returns false when it was already finished (a duplicate).
    pub fn finish_attempt(
        &self,
        id: &str,
        state: AttemptState,
        outcome: &str,
        finished_ms: i64,
    ) -> Result<bool, DbError> {
        Ok(self.conn().execute(
            "UPDATE attempts SET state = ?2, outcome = ?3, finished_ms = ?4 WHERE id = ?1 AND state = 'running'",
            params![id, state.as_str(), outcome, finished_ms],
        )? > 0)
    }

    pub fn running_attempts(&self) -> Result<Vec<AttemptRow>, DbError> {
        let mut st = self.conn().prepare(
            "SELECT id, run_id, kind, target, agent, state FROM attempts WHERE state = 'running' ORDER BY started_ms",
        )?;
        st.query_map([], |r| {
            let (kind, state): (String, String) = (r.get(2)?, r.get(5)?);
            Ok(AttemptRow {
                id: r.get(0)?,
                run_id: r.get(1)?,
                kind: AttemptKind::parse(&kind)
                    .ok_or_else(|| bad_column(2, "attempt kind", &kind))?,
                target: r.get(3)?,
                agent: r.get(4)?,
                state: AttemptState::parse(&state)
                    .ok_or_else(|| bad_column(5, "attempt state", &state))?,
            })
        })?
        .collect()
    }

    /// How many build attempts a run made for a derivation (for "built once" checks).
    pub fn build_attempts(&self, run: &str, drv: &str) -> Result<i64, DbError> {
        self.conn().query_row(
            "SELECT count(*) FROM attempts WHERE run_id = ?1 AND kind = 'build' AND target = ?2",
            params![run, drv],
            |r| r.get(0),
        )
    }

    /// Attempts of `kind` in `run` that ended with an error.
    pub fn failed_attempts(&self, run: &str, kind: AttemptKind) -> Result<i64, DbError> {
        self.conn().query_row(
            "SELECT count(*) FROM attempts WHERE run_id = ?1 AND kind = ?2 AND state = 'done' AND outcome != 'ok'",
            params![run, kind.as_str()],
            |r| r.get(0),
        )
    }

    /// Whether an agent that failed evaluation task `task` of `run` evaluated another of its
    /// tasks after that failure.
    pub fn failed_where_others_evaluated(&self, run: &str, task: i64) -> Result<bool, DbError> {
        // Another task evaluated by that agent after the failure: its machine still works
        // (one whose store broke partway fails everything after).
        self.conn().query_row(
            "SELECT EXISTS(SELECT 1 FROM attempts f JOIN attempts o ON o.run_id = f.run_id AND o.agent = f.agent \
             WHERE f.run_id = ?1 AND f.kind = ?2 AND f.target = ?3 AND f.state = 'done' AND f.outcome != 'ok' \
             AND o.kind = ?2 AND o.target != ?3 AND o.state = 'done' AND o.outcome = 'ok' \
             AND o.finished_ms >= f.finished_ms)",
            params![run, AttemptKind::EvalChunk.as_str(), task.to_string()],
            |r| r.get(0),
        )
    }

    /// Attempts at `target` in `run` given up because their agent vanished.
    pub fn lost_attempts(&self, run: &str, target: &str) -> Result<i64, DbError> {
        self.conn().query_row(
            "SELECT count(*) FROM attempts WHERE run_id = ?1 AND target = ?2 AND state = 'lost'",
            params![run, target],
            |r| r.get(0),
        )
    }
}
