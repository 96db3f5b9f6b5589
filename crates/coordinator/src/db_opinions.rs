//! Cross-checked evaluation in SQLite: the first answer to each evaluation task, kept until
//! a second agent's answer is compared with it (a restart between the two loses neither).

use crate::db::{Db, DbError, from_json, to_json};
use crate::model::EvalOpinion;
use rusqlite::params;

impl Db {
    /// Records the first answer to an evaluation task (the first one stays).
    pub fn record_eval_opinion(&mut self, run: &str, o: &EvalOpinion) -> Result<(), DbError> {
        self.write_eval_opinion(run, o, "INSERT OR IGNORE")
    }

    /// Makes `o` the answer a task's next one is compared with (one that failed fewer of
    /// the attributes the two disagreed on).
    pub fn replace_eval_opinion(&mut self, run: &str, o: &EvalOpinion) -> Result<(), DbError> {
        self.write_eval_opinion(run, o, "INSERT OR REPLACE")
    }

    fn write_eval_opinion(
        &mut self,
        run: &str,
        o: &EvalOpinion,
        verb: &str,
    ) -> Result<(), DbError> {
        let summary = to_json(&o.summary)?;
        let present = to_json(&o.present)?;
        let credential = to_json(&o.credential)?;
        let positions = to_json(&o.positions)?;
        self.conn_mut().execute(
            &format!("{verb} INTO eval_opinions(run_id, task, agent, credential, digest, evaluated, present, summary, one_sided, positions) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
            params![run, o.task, o.agent, credential, o.digest, o.evaluated, present, summary, o.one_sided, positions],
        )?;
        Ok(())
    }

    pub fn eval_opinions(&self, run: &str) -> Result<Vec<EvalOpinion>, DbError> {
        let mut st = self.conn().prepare(
            "SELECT task, agent, digest, evaluated, present, summary, credential, one_sided, positions FROM eval_opinions WHERE run_id = ?1 ORDER BY task",
        )?;
        st.query_map([run], |r| {
            Ok(EvalOpinion {
                task: r.get(0)?,
                agent: r.get(1)?,
                digest: r.get(2)?,
                evaluated: r.get(3)?,
                present: from_json(4, r.get(4)?)?,
                summary: from_json(5, r.get(5)?)?,
                credential: from_json(6, r.get(6)?)?,
                one_sided: r.get(7)?,
                positions: from_json(8, r.get(8)?)?,
            })
        })?
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sp;

    #[test]
    fn the_first_answer_stays_and_comes_back() {
        let mut db = Db::open_in_memory().unwrap();
        db.insert_run(&crate::db::test_run("r1")).unwrap();
        let first = EvalOpinion {
            task: 3,
            agent: "a".into(),
            credential: crate::credentials::Credential::NamedToken("a".into()),
            digest: "d1".into(),
            evaluated: Some("e1".into()),
            present: vec![sp("/nix/store/00000000000000000000000000000000-hello.drv")],
            summary: [("hello".to_string(), "/nix/store/x-hello.drv".to_string())].into(),
            one_sided: 1,
            positions: [("hello".to_string(), "pkgs/hello.nix:3".to_string())].into(),
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

    /// A database from before answers kept their agent's credential: opened again, the
    /// column is there, and an answer stored before reads as admitted by no credential
    /// (told apart by name, as it then was).
    #[test]
    fn an_older_database_gains_the_credential_column() {
        let (_dir, db) = crate::db::reopened_after(
            "ALTER TABLE eval_opinions DROP COLUMN credential;
             INSERT INTO eval_opinions(run_id, task, agent, digest, evaluated, present, summary) VALUES ('r1', -1, 'a', 'd', NULL, '[]', '{}');",
        );
        let old = db.eval_opinions("r1").unwrap();
        assert_eq!(old.len(), 1);
        assert_eq!(old[0].credential, crate::credentials::Credential::Open);
    }

    /// A database from before the count and the positions were kept: opened again, the
    /// columns are there, and an answer stored before reads as asked again never, with no
    /// position to match (none is kept).
    #[test]
    fn an_older_database_gains_the_one_sided_column() {
        let (_dir, db) = crate::db::reopened_after(
            r#"ALTER TABLE eval_opinions DROP COLUMN one_sided;
             ALTER TABLE eval_opinions DROP COLUMN positions;
             INSERT INTO eval_opinions(run_id, task, agent, credential, digest, evaluated, present, summary) VALUES ('r1', -1, 'a', '"open"', 'd1', NULL, '[]', '{}');"#,
        );
        let old = db.eval_opinions("r1").unwrap();
        assert_eq!(old.len(), 1);
        assert_eq!(old[0].one_sided, 0);
        assert!(old[0].positions.is_empty());
    }
}
