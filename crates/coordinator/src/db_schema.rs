//! The coordinator's SQLite schema: the tables a new database is made with, and the
//! columns an older database gains when opened (nothing is ever dropped).

use crate::db::DbError;
use rusqlite::Connection;

const SCHEMA: &str = r#"
PRAGMA journal_mode = WAL;
-- FULL: a commit is on disk before it is acknowledged (a submit's run id, a cancel, an
-- event's number), through a power cut too; NORMAL kept it only through a process crash.
PRAGMA synchronous = FULL;
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
  id TEXT PRIMARY KEY,
  state TEXT NOT NULL,
  label TEXT NOT NULL,
  spec TEXT NOT NULL,
  error TEXT NOT NULL DEFAULT '',
  created_ms INTEGER NOT NULL,
  finished_ms INTEGER NOT NULL DEFAULT 0,
  eval_chunks_total INTEGER NOT NULL DEFAULT -1
);
CREATE TABLE IF NOT EXISTS eval_tasks (
  run_id TEXT NOT NULL REFERENCES runs(id),
  task INTEGER NOT NULL,
  attrs TEXT NOT NULL,
  done INTEGER NOT NULL DEFAULT 0,
  infra_failures INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (run_id, task)
);
CREATE TABLE IF NOT EXISTS eval_opinions (
  run_id TEXT NOT NULL REFERENCES runs(id),
  task INTEGER NOT NULL,
  agent TEXT NOT NULL,
  credential TEXT NOT NULL DEFAULT '"open"',
  digest TEXT NOT NULL,
  evaluated TEXT,
  present TEXT NOT NULL,
  summary TEXT NOT NULL,
  one_sided INTEGER NOT NULL DEFAULT 0,
  positions TEXT NOT NULL DEFAULT '{}',
  PRIMARY KEY (run_id, task)
);
CREATE TABLE IF NOT EXISTS build_checks (
  run_id TEXT NOT NULL REFERENCES runs(id),
  drv_path TEXT NOT NULL,
  built_by TEXT NOT NULL,
  credential TEXT NOT NULL,
  report TEXT NOT NULL,
  queued_ms INTEGER NOT NULL,
  hold INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (run_id, drv_path)
);
CREATE TABLE IF NOT EXISTS packages (
  run_id TEXT NOT NULL REFERENCES runs(id),
  attr TEXT NOT NULL,
  info TEXT NOT NULL,
  PRIMARY KEY (run_id, attr)
);
CREATE TABLE IF NOT EXISTS drvs (
  run_id TEXT NOT NULL REFERENCES runs(id),
  drv_path TEXT NOT NULL,
  node TEXT NOT NULL,
  state TEXT NOT NULL DEFAULT 'waiting',
  result TEXT NOT NULL DEFAULT '',
  infra_failures INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (run_id, drv_path)
);
CREATE TABLE IF NOT EXISTS attempts (
  id TEXT PRIMARY KEY,
  run_id TEXT NOT NULL,
  kind TEXT NOT NULL,
  target TEXT NOT NULL,
  agent TEXT NOT NULL,
  state TEXT NOT NULL,
  outcome TEXT NOT NULL DEFAULT '',
  started_ms INTEGER NOT NULL,
  finished_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS attempts_run ON attempts(run_id, kind, target);
CREATE TABLE IF NOT EXISTS events (
  run_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  kind TEXT NOT NULL,
  json TEXT NOT NULL,
  PRIMARY KEY (run_id, seq)
);
CREATE TABLE IF NOT EXISTS agents (
  name TEXT PRIMARY KEY,
  info TEXT NOT NULL,
  last_seen_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS repo_checks (
  run_id TEXT NOT NULL REFERENCES runs(id),
  name TEXT NOT NULL,
  ok INTEGER NOT NULL,
  message TEXT NOT NULL,
  PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS repo_owed (
  run_id TEXT NOT NULL REFERENCES runs(id),
  attempt TEXT NOT NULL,
  agent TEXT NOT NULL,
  until_ms INTEGER NOT NULL,
  PRIMARY KEY (run_id, attempt)
);
CREATE TABLE IF NOT EXISTS run_stages (
  stage TEXT PRIMARY KEY REFERENCES runs(id),
  root TEXT NOT NULL REFERENCES runs(id)
);
CREATE INDEX IF NOT EXISTS run_stages_root ON run_stages(root);
CREATE TABLE IF NOT EXISTS build_times (
  name TEXT PRIMARY KEY,
  ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS upload_claims (
  cache TEXT NOT NULL,
  path TEXT NOT NULL,
  agent TEXT NOT NULL,
  claimed_ms INTEGER NOT NULL,
  PRIMARY KEY (cache, path)
);
CREATE INDEX IF NOT EXISTS upload_claims_by_agent ON upload_claims(agent, claimed_ms);
"#;

/// Makes the tables `conn` lacks and adds the columns added since an older coordinator
/// made them.
pub(crate) fn create(conn: &Connection) -> Result<(), DbError> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // Reading the schema first turns a corrupt file into an error here, at start-up.
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    })?;
    conn.execute_batch(SCHEMA)?;
    conn.execute(
        "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', '1')",
        [],
    )?;
    // Repository checks owed, from when one listing per run owed them.
    let old_owed: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'repo_pending'",
        [],
        |r| r.get(0),
    )?;
    if old_owed > 0 {
        conn.execute_batch(
            "INSERT OR IGNORE INTO repo_owed(run_id, attempt, agent, until_ms)
               SELECT run_id, attempt, agent, until_ms FROM repo_pending;
             DROP TABLE repo_pending;",
        )?;
    }
    // Columns added since a table was first made (CREATE TABLE IF NOT EXISTS leaves an
    // existing table as it was).
    for (table, column, decl) in [
        (
            "eval_opinions",
            "credential",
            "TEXT NOT NULL DEFAULT '\"open\"'",
        ),
        ("build_checks", "hold", "INTEGER NOT NULL DEFAULT 0"),
        ("eval_opinions", "one_sided", "INTEGER NOT NULL DEFAULT 0"),
        ("eval_opinions", "positions", "TEXT NOT NULL DEFAULT '{}'"),
    ] {
        let has: i64 = conn.query_row(
            "SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2",
            [table, column],
            |r| r.get(0),
        )?;
        if has == 0 {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    Ok(())
}
