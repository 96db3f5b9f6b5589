//! Cross-checked evaluation in SQLite: the first answer to each evaluation task, kept until
//! a second agent's answer is compared with it (a restart between the two loses neither).

use crate::db::{Db, DbError};
use crate::model::EvalOpinion;
use rusqlite::params;

impl Db {
    /// Records the first answer to an evaluation task (the first one stays).
    pub fn record_eval_opinion(&mut self, run: &str, o: &EvalOpinion) -> Result<(), DbError> {
        let summary = serde_json::to_string(&o.summary)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        self.conn_mut().execute(
            "INSERT OR IGNORE INTO eval_opinions(run_id, task, agent, digest, summary) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![run, o.task, o.agent, o.digest, summary],
        )?;
        Ok(())
    }

    pub fn eval_opinions(&self, run: &str) -> Result<Vec<EvalOpinion>, DbError> {
        let mut st = self.conn().prepare(
            "SELECT task, agent, digest, summary FROM eval_opinions WHERE run_id = ?1 ORDER BY task",
        )?;
        st.query_map([run], |r| {
            let summary: String = r.get(3)?;
            Ok(EvalOpinion {
                task: r.get(0)?,
                agent: r.get(1)?,
                digest: r.get(2)?,
                summary: serde_json::from_str(&summary).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        3,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })?,
            })
        })?
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_answer_stays_and_comes_back() {
        let mut db = Db::open_in_memory().unwrap();
        db.insert_run(&crate::db::RunRow {
            id: "r1".into(),
            state: nixfarm_core::RunState::Evaluating,
            label: String::new(),
            spec: "{}".into(),
            error: String::new(),
            created_ms: 0,
            finished_ms: 0,
            eval_tasks_total: -1,
        })
        .unwrap();
        let first = EvalOpinion {
            task: 3,
            agent: "a".into(),
            digest: "d1".into(),
            summary: [("hello".to_string(), "/nix/store/x-hello.drv".to_string())].into(),
        };
        db.record_eval_opinion("r1", &first).unwrap();
        let again = EvalOpinion {
            agent: "b".into(),
            digest: "d2".into(),
            ..first.clone()
        };
        db.record_eval_opinion("r1", &again).unwrap();
        assert_eq!(db.eval_opinions("r1").unwrap(), vec![first]);
        assert!(db.eval_opinions("r2").unwrap().is_empty());
    }
}
