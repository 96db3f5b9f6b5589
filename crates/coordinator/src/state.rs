//! The persistence boundary: every durable operation of the engine, typed. The SQLite
//! implementation ([`crate::db::Db`]) holds every SQL statement and the schema; another
//! backend (Postgres, for a farm that outgrows one coordinator) is one new module
//! implementing [`StateStore`]. Rows that cannot be read are errors, never defaults.

use crate::db::{AttemptRow, Db, DbError, DrvRow, MetricsCounts, RunRow};
use crate::model::{
    AttemptKind, AttemptState, BuildReport, DrvNode, DrvState, EvalOpinion, EvaluatedAttr,
    OwedChecks, PackageInfo, PendingCheck, Registration, StorePath,
};
use nixfarm_core::RunState;
use nixfarm_core::report::RepoCheck;
use std::collections::BTreeMap;

/// A failure of the state store (its backend's error, or a record it cannot read).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StateError(Box<dyn std::error::Error + Send + Sync>);

impl StateError {
    /// A stored value that cannot be read as what it should be (written by an older
    /// version, or damaged), as opposed to the store itself failing.
    pub fn is_unreadable(&self) -> bool {
        matches!(
            self.0.downcast_ref::<DbError>(),
            Some(DbError::FromSqlConversionFailure(..) | DbError::InvalidColumnType(..))
        )
    }
}

impl From<DbError> for StateError {
    fn from(e: DbError) -> StateError {
        StateError(Box::new(e))
    }
}

pub type StateResult<T> = Result<T, StateError>;

/// Whether an upload claim held by (agent, since ms) has lapsed.
pub type Lapsed<'a> = &'a dyn Fn(&str, i64) -> bool;

/// Everything the engine keeps across restarts.
pub trait StateStore: Send {
    /// Starts a batch: everything stored until [`end_batch`] lands together, or (the
    /// process dies first) none of it does: one engine step, such as an attempt's end with
    /// its outcome. Batches do not nest; the operations' own transactions nest in them.
    ///
    /// [`end_batch`]: StateStore::end_batch
    fn begin_batch(&mut self) -> StateResult<()>;
    /// Stores the batch; an error when the backend dropped it meanwhile (what was stored
    /// after that was stored operation by operation).
    fn end_batch(&mut self) -> StateResult<()>;
    /// Drops the batch: nothing stored since [`StateStore::begin_batch`] lands.
    fn abandon_batch(&mut self) -> StateResult<()>;
    /// Refuses every write from now on (reads go on): the engine's memory went where the
    /// store did not, and nothing it does after may land.
    fn freeze(&mut self) -> StateResult<()>;
    // Runs.
    fn insert_run(&mut self, r: &RunRow) -> StateResult<()>;
    fn set_run_state(
        &mut self,
        id: &str,
        state: RunState,
        error: &str,
        finished_ms: i64,
    ) -> StateResult<()>;
    fn run(&self, id: &str) -> StateResult<Option<RunRow>>;
    fn runs(&self) -> StateResult<Vec<RunRow>>;
    /// Records run `stage` as a hash-fixing stage of run `root` (the session's first).
    fn add_stage(&mut self, root: &str, stage: &str) -> StateResult<()>;
    /// The stages of run `root`, in the order they were submitted.
    fn stages(&self, root: &str) -> StateResult<Vec<String>>;
    /// The run `stage` is a stage of, if any.
    fn root_of(&self, stage: &str) -> StateResult<Option<String>>;
    // Evaluation.
    fn record_eval_tasks(&mut self, run: &str, tasks: &[&[String]]) -> StateResult<()>;
    fn record_eval_chunk(
        &mut self,
        run: &str,
        task: i64,
        attrs: &[EvaluatedAttr],
        drvs: &BTreeMap<StorePath, DrvNode>,
    ) -> StateResult<()>;
    fn eval_task_infra_failure(&mut self, run: &str, task: i64) -> StateResult<i64>;
    fn eval_tasks(&self, run: &str) -> StateResult<Vec<(i64, Vec<String>, bool)>>;
    fn record_eval_opinion(&mut self, run: &str, opinion: &EvalOpinion) -> StateResult<()>;
    fn replace_eval_opinion(&mut self, run: &str, opinion: &EvalOpinion) -> StateResult<()>;
    fn eval_opinions(&self, run: &str) -> StateResult<Vec<EvalOpinion>>;
    fn record_build_check(&mut self, run: &str, check: &PendingCheck) -> StateResult<()>;
    fn build_checks(&self, run: &str) -> StateResult<Vec<PendingCheck>>;
    fn drop_build_check(&mut self, run: &str, drv: &str) -> StateResult<()>;
    fn packages(&self, run: &str) -> StateResult<Vec<(String, PackageInfo)>>;
    // Derivations.
    fn set_drv_state(
        &mut self,
        run: &str,
        drv: &str,
        state: DrvState,
        result: Option<&BuildReport>,
    ) -> StateResult<()>;
    /// A build's end: its state and result, its dependents' failure, and the run's event
    /// saying so (kind, JSON), in one transaction (a crash leaves all or none of them).
    /// Returns the event's sequence number.
    #[allow(clippy::too_many_arguments)]
    fn finish_drv(
        &mut self,
        run: &str,
        drv: &str,
        state: DrvState,
        result: &BuildReport,
        dependents: &[String],
        dep: &BuildReport,
        event: (&str, &str),
    ) -> StateResult<i64>;
    fn drv_infra_failure(&mut self, run: &str, drv: &str) -> StateResult<i64>;
    fn drvs(&self, run: &str) -> StateResult<Vec<DrvRow>>;
    // Attempts.
    fn insert_attempt(&mut self, a: &AttemptRow, started_ms: i64) -> StateResult<()>;
    fn finish_attempt(
        &mut self,
        id: &str,
        state: AttemptState,
        outcome: &str,
        finished_ms: i64,
    ) -> StateResult<bool>;
    fn running_attempts(&self) -> StateResult<Vec<AttemptRow>>;
    fn build_attempts(&self, run: &str, drv: &str) -> StateResult<i64>;
    fn failed_attempts(&self, run: &str, kind: AttemptKind) -> StateResult<i64>;
    /// Whether an agent that failed evaluation task `task` of `run` evaluated another of its
    /// tasks after that failure: that machine evaluates, so the task's failure is its own.
    fn failed_where_others_evaluated(&self, run: &str, task: i64) -> StateResult<bool>;
    fn lost_attempts(&self, run: &str, target: &str) -> StateResult<i64>;
    // Events.
    fn append_event(&mut self, run: &str, kind: &str, json: &str) -> StateResult<i64>;
    fn events_after(&self, run: &str, after: i64) -> StateResult<Vec<(i64, String, String)>>;
    // Agents and upload claims.
    fn upsert_agent(&mut self, reg: &Registration, now_ms: i64) -> StateResult<()>;
    fn agents(&self) -> StateResult<Vec<(Registration, i64)>>;
    fn forget_agent(&mut self, name: &str) -> StateResult<()>;
    fn claim_uploads(
        &mut self,
        cache: &str,
        agent: &str,
        paths: &[String],
        now_ms: i64,
        lapsed: Lapsed<'_>,
    ) -> StateResult<Vec<bool>>;
    fn release_upload_claims(
        &mut self,
        agent: &str,
        cache: &str,
        paths: &[String],
    ) -> StateResult<()>;
    fn release_all_upload_claims(&mut self, agent: &str) -> StateResult<()>;
    fn prune_upload_claims(&mut self, agent: &str, before_ms: i64) -> StateResult<usize>;
    // Metrics.
    fn metrics_counts(&self) -> StateResult<MetricsCounts>;
    // Repository checks.
    /// A run's repository checks: replacing those before, or with `merge` joining them (a
    /// check passes only if every report of it passed).
    fn record_repo_checks(
        &mut self,
        run: &str,
        checks: &[RepoCheck],
        merge: bool,
    ) -> StateResult<()>;
    fn repo_checks(&self, run: &str) -> StateResult<Vec<RepoCheck>>;
    /// That a listing agent owes a run its repository checks for `attempt`, until a time
    /// in ms; kept across restarts.
    fn owe_repo_checks(
        &mut self,
        run: &str,
        attempt: &str,
        agent: &str,
        until_ms: i64,
    ) -> StateResult<()>;
    /// The checks owed for `attempt` came or will not (None: nothing is owed the run).
    fn repo_checks_settled(&mut self, run: &str, attempt: Option<&str>) -> StateResult<()>;
    /// The repository checks still owed, by run: what each listing that follows owes.
    fn repo_owed(&self) -> StateResult<BTreeMap<String, Vec<OwedChecks>>>;
    /// How long each derivation (by name) took when last built, in ms: cost estimates.
    fn build_times(&mut self) -> StateResult<std::collections::HashMap<String, u64>>;
    /// A read-only handle of its own on the same state, for reads that need not wait for
    /// the engine (reports); None when the backend has none (an in-memory database).
    fn reader(&self) -> StateResult<Option<Box<dyn StateStore>>> {
        Ok(None)
    }
    /// Starts reading one consistent snapshot (a reader's reads until [`end_snapshot`]
    /// see the same state, whatever the engine commits meanwhile).
    ///
    /// [`end_snapshot`]: StateStore::end_snapshot
    fn begin_snapshot(&self) -> StateResult<()> {
        Ok(())
    }
    fn end_snapshot(&self) -> StateResult<()> {
        Ok(())
    }
}

/// The SQLite store: each operation is the inherent method of the same name (`w`: takes
/// `&mut self`, `r`: `&self`).
macro_rules! delegate {
    ($($kind:ident fn $name:ident($($arg:ident : $ty:ty),*) -> $ret:ty;)*) => {
        impl StateStore for Db {
            $( delegate!(@$kind $name($($arg: $ty),*) -> $ret); )*

            fn reader(&self) -> StateResult<Option<Box<dyn StateStore>>> {
                Ok(Db::open_reader(self)?.map(|d| Box::new(d) as Box<dyn StateStore>))
            }
            fn begin_snapshot(&self) -> StateResult<()> {
                // A snapshot left open (its end failed) would refuse every later one.
                if !self.conn().is_autocommit() {
                    self.conn().execute_batch("COMMIT")?;
                }
                Ok(self.conn().execute_batch("BEGIN DEFERRED")?)
            }
            fn end_snapshot(&self) -> StateResult<()> {
                Ok(self.conn().execute_batch("COMMIT")?)
            }
        }
    };
    (@w $name:ident($($arg:ident : $ty:ty),*) -> $ret:ty) => {
        fn $name(&mut self, $($arg: $ty),*) -> StateResult<$ret> {
            Ok(Db::$name(self, $($arg),*)?)
        }
    };
    (@r $name:ident($($arg:ident : $ty:ty),*) -> $ret:ty) => {
        fn $name(&self, $($arg: $ty),*) -> StateResult<$ret> {
            Ok(Db::$name(self, $($arg),*)?)
        }
    };
}

delegate! {
    w fn begin_batch() -> ();
    w fn end_batch() -> ();
    w fn abandon_batch() -> ();
    w fn freeze() -> ();
    w fn insert_run(r: &RunRow) -> ();
    w fn set_run_state(id: &str, state: RunState, error: &str, finished_ms: i64) -> ();
    r fn run(id: &str) -> Option<RunRow>;
    r fn runs() -> Vec<RunRow>;
    w fn add_stage(root: &str, stage: &str) -> ();
    r fn stages(root: &str) -> Vec<String>;
    r fn root_of(stage: &str) -> Option<String>;
    w fn record_eval_tasks(run: &str, tasks: &[&[String]]) -> ();
    w fn record_eval_chunk(run: &str, task: i64, attrs: &[EvaluatedAttr], drvs: &BTreeMap<StorePath, DrvNode>) -> ();
    w fn eval_task_infra_failure(run: &str, task: i64) -> i64;
    r fn eval_tasks(run: &str) -> Vec<(i64, Vec<String>, bool)>;
    w fn record_eval_opinion(run: &str, opinion: &EvalOpinion) -> ();
    w fn replace_eval_opinion(run: &str, opinion: &EvalOpinion) -> ();
    r fn eval_opinions(run: &str) -> Vec<EvalOpinion>;
    w fn record_build_check(run: &str, check: &PendingCheck) -> ();
    r fn build_checks(run: &str) -> Vec<PendingCheck>;
    w fn drop_build_check(run: &str, drv: &str) -> ();
    r fn packages(run: &str) -> Vec<(String, PackageInfo)>;
    w fn set_drv_state(run: &str, drv: &str, state: DrvState, result: Option<&BuildReport>) -> ();
    w fn finish_drv(run: &str, drv: &str, state: DrvState, result: &BuildReport, dependents: &[String], dep: &BuildReport, event: (&str, &str)) -> i64;
    w fn drv_infra_failure(run: &str, drv: &str) -> i64;
    r fn drvs(run: &str) -> Vec<DrvRow>;
    w fn insert_attempt(a: &AttemptRow, started_ms: i64) -> ();
    w fn finish_attempt(id: &str, state: AttemptState, outcome: &str, finished_ms: i64) -> bool;
    r fn running_attempts() -> Vec<AttemptRow>;
    r fn build_attempts(run: &str, drv: &str) -> i64;
    r fn failed_attempts(run: &str, kind: AttemptKind) -> i64;
    r fn failed_where_others_evaluated(run: &str, task: i64) -> bool;
    r fn lost_attempts(run: &str, target: &str) -> i64;
    w fn append_event(run: &str, kind: &str, json: &str) -> i64;
    r fn events_after(run: &str, after: i64) -> Vec<(i64, String, String)>;
    w fn upsert_agent(reg: &Registration, now_ms: i64) -> ();
    r fn agents() -> Vec<(Registration, i64)>;
    w fn forget_agent(name: &str) -> ();
    w fn claim_uploads(cache: &str, agent: &str, paths: &[String], now_ms: i64, lapsed: Lapsed<'_>) -> Vec<bool>;
    w fn release_upload_claims(agent: &str, cache: &str, paths: &[String]) -> ();
    w fn release_all_upload_claims(agent: &str) -> ();
    w fn prune_upload_claims(agent: &str, before_ms: i64) -> usize;
    r fn metrics_counts() -> MetricsCounts;
    w fn record_repo_checks(run: &str, checks: &[RepoCheck], merge: bool) -> ();
    r fn repo_checks(run: &str) -> Vec<RepoCheck>;
    w fn owe_repo_checks(run: &str, attempt: &str, agent: &str, until_ms: i64) -> ();
    w fn repo_checks_settled(run: &str, attempt: Option<&str>) -> ();
    r fn repo_owed() -> BTreeMap<String, Vec<OwedChecks>>;
    w fn build_times() -> std::collections::HashMap<String, u64>;
}
