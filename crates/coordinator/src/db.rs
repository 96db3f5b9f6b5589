//! Durable coordinator state in SQLite: runs, packages, the derivation graph, attempts,
//! events and agents. Every state change is written here before it is acted on, so a
//! restarted coordinator resumes each run where it stood.

use crate::model::{BuildReport, DrvNode, DrvState, EvaluatedAttr, PackageInfo, StorePath};
use nixfarm_core::RunState;
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::BTreeMap;
use std::path::Path;

pub use crate::db_attempts::AttemptRow;
pub use rusqlite::Error as DbError;

/// Appends a run's event with the next sequence number: (run, kind, json) -> seq.
const APPEND_EVENT: &str = "INSERT INTO events(run_id, seq, kind, json)
     VALUES (?1, (SELECT coalesce(max(seq), 0) + 1 FROM events WHERE run_id = ?1), ?2, ?3)
     RETURNING seq";

/// The coordinator's database.
pub struct Db {
    conn: Connection,
    /// A batch is open ([`Db::begin_batch`]).
    in_batch: bool,
    /// Tests: while set, storing a build's end panics, as a coordinator killed there
    /// would stop.
    #[cfg(test)]
    pub(crate) die_in_finish_drv: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Db {
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

/// A stored run row.
#[derive(Debug, Clone)]
pub struct RunRow {
    pub id: String,
    pub state: RunState,
    pub label: String,
    pub spec: String,
    pub error: String,
    pub created_ms: i64,
    pub finished_ms: i64,
    pub eval_tasks_total: i64,
}

/// A stored derivation row.
#[derive(Debug, Clone)]
pub struct DrvRow {
    pub drv_path: StorePath,
    pub node: DrvNode,
    pub state: DrvState,
    /// The last result recorded for it (none while it waits).
    pub result: Option<BuildReport>,
    pub infra_failures: i64,
}

/// A column that does not hold what it should: an error, never a silent default.
/// A value stored as JSON in a text column.
pub(crate) fn to_json(v: &impl serde::Serialize) -> Result<String, DbError> {
    serde_json::to_string(v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// A JSON text column read back; an unreadable one is that column's error.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    column: usize,
    text: String,
) -> rusqlite::Result<T> {
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// A store path read back from a column; one that does not parse fails the read.
pub(crate) fn store_path(column: usize, text: String) -> rusqlite::Result<crate::model::StorePath> {
    crate::model::StorePath::try_from(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// A database as an older coordinator left it: made with run `r1`, then `sql` (which drops a
/// column added since, and writes a row as it then was), then opened again.
#[cfg(test)]
pub(crate) fn reopened_after(sql: &str) -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.sqlite");
    let db = Db::open(&path).unwrap();
    db.insert_run(&test_run("r1")).unwrap();
    db.conn().execute_batch(sql).unwrap();
    drop(db);
    let db = Db::open(&path).unwrap();
    (dir, db)
}

/// A run row for store tests: `id`, evaluating, nothing listed yet.
#[cfg(test)]
pub(crate) fn test_run(id: &str) -> RunRow {
    RunRow {
        id: id.into(),
        state: nixfarm_core::RunState::Evaluating,
        label: String::new(),
        spec: "{}".into(),
        error: String::new(),
        created_ms: 0,
        finished_ms: 0,
        eval_tasks_total: -1,
    }
}

pub(crate) fn bad_column(col: usize, what: &str, e: impl std::fmt::Display) -> DbError {
    DbError::FromSqlConversionFailure(
        col,
        rusqlite::types::Type::Text,
        format!("unreadable {what}: {e}").into(),
    )
}

pub(crate) fn json_column<T: serde::de::DeserializeOwned>(
    r: &rusqlite::Row<'_>,
    col: usize,
    what: &str,
) -> Result<T, DbError> {
    let text: String = r.get(col)?;
    serde_json::from_str(&text).map_err(|e| bad_column(col, what, e))
}

/// Totals the metrics endpoint shows.
#[derive(Debug, Clone, Default)]
pub struct MetricsCounts {
    /// (run state, runs).
    pub runs_by_state: Vec<(String, i64)>,
    /// (outcome, finished build attempts, their total milliseconds).
    pub builds: Vec<(String, i64, i64)>,
    /// Jobs requeued after an infrastructure failure.
    pub retries: i64,
    /// Attempts lost with their agent.
    pub lost: i64,
}

impl Db {
    /// Opens (creating if needed) the database; a file that is not a nixfarm database is refused.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// A second connection to the same file, read-only, for reads that need not wait for
    /// the engine (reports of large runs): in WAL mode it sees every committed write and
    /// blocks none. None for an in-memory database.
    pub fn open_reader(&self) -> Result<Option<Db>, DbError> {
        let Some(path) = self.conn.path().filter(|p| !p.is_empty()) else {
            return Ok(None);
        };
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(Some(Db::with(conn)))
    }

    pub fn open_in_memory() -> Result<Db, DbError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn with(conn: Connection) -> Db {
        Db {
            conn,
            in_batch: false,
            #[cfg(test)]
            die_in_finish_drv: None,
        }
    }

    fn init(conn: Connection) -> Result<Db, DbError> {
        crate::db_schema::create(&conn)?;
        Ok(Db::with(conn))
    }

    /// Runs `f` in one transaction: a savepoint, so that it nests in an engine batch
    /// ([`Db::begin_batch`]) and lands with it.
    pub(crate) fn tx<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Savepoint<'_>) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let tx = self.conn.savepoint()?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Starts a batch: what is stored until [`Db::end_batch`] lands together, or not at all
    /// if the process dies first.
    pub fn begin_batch(&mut self) -> Result<(), DbError> {
        // A transaction left open (a batch whose end failed): what it stored lands.
        self.in_batch = false;
        if !self.conn.is_autocommit() {
            self.conn.execute_batch("COMMIT")?;
        }
        self.conn.execute_batch("SAVEPOINT engine_batch")?;
        self.in_batch = true;
        Ok(())
    }

    /// Commits the batch [`Db::begin_batch`] started. An error when SQLite rolled it back
    /// on its own meanwhile (a full disk, an I/O error): what followed was stored statement
    /// by statement, and the step's events may be missing.
    pub fn freeze(&mut self) -> Result<(), DbError> {
        self.conn.execute_batch("PRAGMA query_only = 1")
    }

    pub fn abandon_batch(&mut self) -> Result<(), DbError> {
        if !std::mem::take(&mut self.in_batch) || self.conn.is_autocommit() {
            return Ok(());
        }
        self.conn
            .execute_batch("ROLLBACK TO engine_batch; RELEASE engine_batch")
    }

    pub fn end_batch(&mut self) -> Result<(), DbError> {
        if !std::mem::take(&mut self.in_batch) {
            return Ok(());
        }
        if self.conn.is_autocommit() {
            return Err(DbError::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                Some("SQLite rolled back a step's transaction (disk full or I/O error?)".into()),
            ));
        }
        self.conn.execute_batch("RELEASE engine_batch")
    }

    /// Records the evaluation tasks of a run (the attribute names of each) and their number.
    pub fn record_eval_tasks(&mut self, run: &str, tasks: &[&[String]]) -> Result<(), DbError> {
        let rows: Vec<String> = tasks
            .iter()
            .map(|t| serde_json::to_string(t).map_err(|e| bad_column(2, "attribute list", e)))
            .collect::<Result<_, _>>()?;
        self.tx(|tx| {
            for (i, attrs) in rows.iter().enumerate() {
                tx.execute(
                    "INSERT OR IGNORE INTO eval_tasks(run_id, task, attrs) VALUES (?1, ?2, ?3)",
                    params![run, i as i64, attrs],
                )?;
            }
            tx.execute(
                "UPDATE runs SET eval_chunks_total = ?2 WHERE id = ?1",
                params![run, rows.len() as i64],
            )?;
            Ok(())
        })
    }

    /// Records what one evaluation task found (packages and derivations) and marks it done,
    /// in one transaction.
    pub fn record_eval_chunk(
        &mut self,
        run: &str,
        task: i64,
        attrs: &[EvaluatedAttr],
        drvs: &BTreeMap<StorePath, DrvNode>,
    ) -> Result<(), DbError> {
        let json = |r: Result<String, serde_json::Error>| r.map_err(|e| bad_column(2, "record", e));
        let packages: Vec<(String, String)> = attrs
            .iter()
            .map(|a| Ok((a.attr.clone(), json(serde_json::to_string(&a.info))?)))
            .collect::<Result<_, DbError>>()?;
        let nodes: Vec<(String, String)> = drvs
            .iter()
            .map(|(p, n)| Ok((p.to_string(), json(serde_json::to_string(n))?)))
            .collect::<Result<_, DbError>>()?;
        self.tx(|tx| {
            for (attr, info) in &packages {
                tx.execute(
                    "INSERT INTO packages(run_id, attr, info) VALUES (?1, ?2, ?3)
                     ON CONFLICT(run_id, attr) DO UPDATE SET info = excluded.info",
                    params![run, attr, info],
                )?;
            }
            for (path, node) in &nodes {
                tx.execute(
                    "INSERT OR IGNORE INTO drvs(run_id, drv_path, node) VALUES (?1, ?2, ?3)",
                    params![run, path, node],
                )?;
            }
            tx.execute(
                "UPDATE eval_tasks SET done = 1 WHERE run_id = ?1 AND task = ?2",
                params![run, task],
            )?;
            Ok(())
        })
    }

    /// Totals for `/metrics`.
    pub fn metrics_counts(&self) -> Result<MetricsCounts, DbError> {
        let mut st = self
            .conn
            .prepare("SELECT state, count(*) FROM runs GROUP BY state")?;
        let runs_by_state = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut st = self.conn.prepare(
            "SELECT outcome, count(*), coalesce(sum(finished_ms - started_ms), 0) FROM attempts WHERE kind = 'build' AND state = 'done' GROUP BY outcome",
        )?;
        let builds = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let scalar =
            |sql: &str| -> Result<i64, DbError> { self.conn.query_row(sql, [], |r| r.get(0)) };
        Ok(MetricsCounts {
            runs_by_state,
            builds,
            retries: scalar("SELECT coalesce(sum(infra_failures), 0) FROM drvs")?,
            lost: scalar("SELECT count(*) FROM attempts WHERE state = 'lost'")?,
        })
    }

    pub fn insert_run(&self, r: &RunRow) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO runs(id, state, label, spec, error, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![r.id, r.state.as_str(), r.label, r.spec, r.error, r.created_ms],
        )?;
        Ok(())
    }

    pub fn set_run_state(
        &self,
        id: &str,
        state: RunState,
        error: &str,
        finished_ms: i64,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE runs SET state = ?2, error = ?3, finished_ms = ?4 WHERE id = ?1",
            params![id, state.as_str(), error, finished_ms],
        )?;
        Ok(())
    }

    fn run_from_row(r: &rusqlite::Row<'_>) -> Result<RunRow, DbError> {
        let state: String = r.get(1)?;
        Ok(RunRow {
            id: r.get(0)?,
            state: state.parse().map_err(|e| bad_column(1, "run state", e))?,
            label: r.get(2)?,
            spec: r.get(3)?,
            error: r.get(4)?,
            created_ms: r.get(5)?,
            finished_ms: r.get(6)?,
            eval_tasks_total: r.get(7)?,
        })
    }

    const RUN_COLS: &'static str =
        "id, state, label, spec, error, created_ms, finished_ms, eval_chunks_total";

    pub fn run(&self, id: &str) -> Result<Option<RunRow>, DbError> {
        self.conn
            .query_row(
                &format!("SELECT {} FROM runs WHERE id = ?1", Self::RUN_COLS),
                [id],
                Self::run_from_row,
            )
            .optional()
    }

    pub fn runs(&self) -> Result<Vec<RunRow>, DbError> {
        let mut st = self.conn.prepare(&format!(
            "SELECT {} FROM runs ORDER BY created_ms, id",
            Self::RUN_COLS
        ))?;
        st.query_map([], Self::run_from_row)?.collect()
    }

    pub fn eval_task_infra_failure(&self, run: &str, task: i64) -> Result<i64, DbError> {
        self.conn.query_row(
            "UPDATE eval_tasks SET infra_failures = infra_failures + 1 WHERE run_id = ?1 AND task = ?2 RETURNING infra_failures",
            params![run, task],
            |r| r.get(0),
        )
    }

    /// (task, its attribute names, done) for a run.
    pub fn eval_tasks(&self, run: &str) -> Result<Vec<(i64, Vec<String>, bool)>, DbError> {
        let mut st = self
            .conn
            .prepare("SELECT task, attrs, done FROM eval_tasks WHERE run_id = ?1 ORDER BY task")?;
        st.query_map([run], |r| {
            Ok((
                r.get(0)?,
                json_column(r, 1, "attribute list")?,
                r.get::<_, i64>(2)? != 0,
            ))
        })?
        .collect()
    }

    pub fn packages(&self, run: &str) -> Result<Vec<(String, PackageInfo)>, DbError> {
        let mut st = self
            .conn
            .prepare("SELECT attr, info FROM packages WHERE run_id = ?1 ORDER BY attr")?;
        st.query_map([run], |r| Ok((r.get(0)?, json_column(r, 1, "package")?)))?
            .collect()
    }

    pub fn set_drv_state(
        &self,
        run: &str,
        drv: &str,
        state: DrvState,
        result: Option<&BuildReport>,
    ) -> Result<(), DbError> {
        let result = match result {
            Some(r) => serde_json::to_string(r).map_err(|e| bad_column(4, "build result", e))?,
            None => String::new(),
        };
        self.conn.execute(
            "UPDATE drvs SET state = ?3, result = ?4 WHERE run_id = ?1 AND drv_path = ?2",
            params![run, drv, state.as_str(), result],
        )?;
        Ok(())
    }

    /// Records a build's end: the derivation's state and result, and the dependents that
    /// can now never build, each with `dep` (naming the failed one), in one transaction.
    #[allow(clippy::too_many_arguments)] // one transaction's worth: what StateStore says
    pub fn finish_drv(
        &mut self,
        run: &str,
        drv: &str,
        state: DrvState,
        result: &BuildReport,
        dependents: &[String],
        dep: &BuildReport,
        (kind, event): (&str, &str),
    ) -> Result<i64, DbError> {
        let json = |r: &BuildReport| {
            serde_json::to_string(r).map_err(|e| bad_column(4, "build result", e))
        };
        let (json_result, dep) = (json(result)?, json(dep)?);
        #[cfg(test)]
        if self
            .die_in_finish_drv
            .as_ref()
            .is_some_and(|d| d.load(std::sync::atomic::Ordering::SeqCst))
        {
            panic!("the coordinator dies here (test)");
        }
        let tx = self.conn.savepoint()?;
        Db::note_build_time(&tx, drv, result)?;
        tx.execute(
            "UPDATE drvs SET state = ?3, result = ?4 WHERE run_id = ?1 AND drv_path = ?2",
            params![run, drv, state.as_str(), json_result],
        )?;
        for d in dependents {
            tx.execute(
                "UPDATE drvs SET state = ?3, result = ?4 WHERE run_id = ?1 AND drv_path = ?2",
                params![run, d, DrvState::DependencyFailed.as_str(), dep],
            )?;
        }
        let seq = tx.query_row(APPEND_EVENT, params![run, kind, event], |r| r.get(0))?;
        tx.commit()?;
        Ok(seq)
    }

    pub fn drv_infra_failure(&self, run: &str, drv: &str) -> Result<i64, DbError> {
        self.conn.query_row(
            "UPDATE drvs SET infra_failures = infra_failures + 1 WHERE run_id = ?1 AND drv_path = ?2 RETURNING infra_failures",
            params![run, drv],
            |r| r.get(0),
        )
    }

    pub fn drvs(&self, run: &str) -> Result<Vec<DrvRow>, DbError> {
        let mut st = self.conn.prepare(
            "SELECT drv_path, node, state, result, infra_failures FROM drvs WHERE run_id = ?1 ORDER BY drv_path",
        )?;
        st.query_map([run], |r| {
            let state: String = r.get(2)?;
            let result: String = r.get(3)?;
            Ok(DrvRow {
                drv_path: store_path(0, r.get(0)?)?,
                node: json_column(r, 1, "derivation")?,
                state: DrvState::parse(&state)
                    .ok_or_else(|| bad_column(2, "derivation state", &state))?,
                result: if result.is_empty() {
                    None
                } else {
                    Some(
                        serde_json::from_str(&result)
                            .map_err(|e| bad_column(3, "build result", e))?,
                    )
                },
                infra_failures: r.get(4)?,
            })
        })?
        .collect()
    }

    /// Appends an event and returns its sequence number (1-based, per run).
    pub fn append_event(&self, run: &str, kind: &str, json: &str) -> Result<i64, DbError> {
        self.conn
            .query_row(APPEND_EVENT, params![run, kind, json], |r| r.get(0))
    }

    pub fn events_after(
        &self,
        run: &str,
        after: i64,
    ) -> Result<Vec<(i64, String, String)>, DbError> {
        let mut st = self.conn.prepare(
            "SELECT seq, kind, json FROM events WHERE run_id = ?1 AND seq > ?2 ORDER BY seq",
        )?;
        st.query_map(params![run, after], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AttemptKind, AttemptState};

    #[test]
    fn events_are_numbered_per_run() {
        let db = Db::open_in_memory().unwrap();
        assert_eq!(db.append_event("a", "x", "{}").unwrap(), 1);
        assert_eq!(db.append_event("a", "y", "{}").unwrap(), 2);
        assert_eq!(db.append_event("b", "x", "{}").unwrap(), 1);
        let ev = db.events_after("a", 1).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].1, "y");
    }

    #[test]
    fn attempts_finish_once() {
        let db = Db::open_in_memory().unwrap();
        let a = AttemptRow {
            id: "t1".into(),
            run_id: "r".into(),
            kind: AttemptKind::Build,
            target: "/nix/store/x.drv".into(),
            agent: "a".into(),
            state: AttemptState::Running,
        };
        db.insert_attempt(&a, 1).unwrap();
        assert!(
            db.finish_attempt("t1", AttemptState::Done, "built", 2)
                .unwrap()
        );
        assert!(
            !db.finish_attempt("t1", AttemptState::Done, "built", 3)
                .unwrap()
        );
        assert_eq!(db.build_attempts("r", "/nix/store/x.drv").unwrap(), 1);
    }

    #[test]
    fn corrupt_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.db");
        std::fs::write(
            &p,
            b"this is not a database, just some bytes that are long enough to matter....",
        )
        .unwrap();
        let err = Db::open(&p)
            .err()
            .expect("corrupt database must be refused");
        assert!(err.to_string().contains("not a database"), "{err}");
    }

    /// What is acknowledged is on disk: write-ahead log, each commit synced (FULL, 2).
    #[test]
    fn a_commit_is_synced_before_it_counts() {
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("state.db")).unwrap();
        let mode: String = db
            .conn()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        let sync: i64 = db
            .conn()
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!((mode.as_str(), sync), ("wal", 2));
    }
}
