//! Cross-checked evaluation in SQLite: the first answer to each evaluation task, kept until
//! a second agent's answer is compared with it (a restart between the two loses neither).

use crate::db::{Db, DbError};
use crate::model::EvalOpinion;
use rusqlite::params;

impl Db {
    /// Records the first answer to an evaluation task (the first one stays).
    pub fn record_eval_opinion(&mut self, run: &str, o: &EvalOpinion) -> Result<(), DbError> {
        let summary = serde_json::to_string(&o.summary).map_err(to_sql)?;
        let present = serde_json::to_string(&o.present).map_err(to_sql)?;
        self.conn_mut().execute(
            "INSERT OR IGNORE INTO eval_opinions(run_id, task, agent, digest, evaluated, present, summary) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![run, o.task, o.agent, o.digest, o.evaluated, present, summary],
        )?;
        Ok(())
    }

    pub fn eval_opinions(&self, run: &str) -> Result<Vec<EvalOpinion>, DbError> {
        let mut st = self.conn().prepare(
            "SELECT task, agent, digest, evaluated, present, summary FROM eval_opinions WHERE run_id = ?1 ORDER BY task",
        )?;
        st.query_map([run], |r| {
            Ok(EvalOpinion {
                task: r.get(0)?,
                agent: r.get(1)?,
                digest: r.get(2)?,
                evaluated: r.get(3)?,
                present: json(4, r.get(4)?)?,
                summary: json(5, r.get(5)?)?,
            })
        })?
        .collect()
    }
}

fn json<T: serde::de::DeserializeOwned>(column: usize, text: String) -> Result<T, DbError> {
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn to_sql(e: serde_json::Error) -> DbError {
    rusqlite::Error::ToSqlConversionFailure(Box::new(e))
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
            evaluated: Some("e1".into()),
            present: vec!["/nix/store/x-hello.drv".into()],
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
