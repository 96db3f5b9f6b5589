//! Following a run: a live progress bar on a terminal, plain lines otherwise. The stream
//! resumes from the last event seen after a disconnect, so no event is missed or repeated.

use crate::{Client, status_error};
use indicatif::{ProgressBar, ProgressStyle};
use nixfarm_core::{BuildOutcome, RunEvent};
use nixfarm_proto::v1 as pb;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

/// Whether the farm stops with this command (`nixfarm local`): then a run the user stops
/// following is cancelled, not left to go on.
static FARM_STOPS_WITH_COMMAND: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Cancelled when the user presses Ctrl-C ([`interrupt`]).
static INTERRUPT: std::sync::OnceLock<tokio_util::sync::CancellationToken> =
    std::sync::OnceLock::new();

/// How many runs are being followed now ([`watch_with`]).
static FOLLOWING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The user's Ctrl-C, from the first call on (until then it ends the process, as it does
/// any program's): the first cancels the token, a second ends the process at once (exit
/// code 130), for a command that does not stop when asked.
pub(crate) fn interrupt() -> tokio_util::sync::CancellationToken {
    INTERRUPT
        .get_or_init(|| {
            let token = tokio_util::sync::CancellationToken::new();
            let t = token.clone();
            tokio::spawn(async move {
                while tokio::signal::ctrl_c().await.is_ok() {
                    if t.is_cancelled() {
                        std::process::exit(130);
                    }
                    t.cancel();
                }
            });
            token
        })
        .clone()
}

/// Whether the user pressed Ctrl-C (whatever came of the command after).
pub(crate) fn interrupted() -> bool {
    INTERRUPT.get().is_some_and(|t| t.is_cancelled())
}

/// Ends when the user pressed Ctrl-C while no run was followed (starting up, uploading a
/// snapshot, between hash-fixing rounds), or once none has been for [`FOLLOWER_GRACE`] after
/// it: a follower says what becomes of its run itself, and the command ends soon after
/// (or, a follower that ended as the run did, goes on too long).
pub(crate) async fn interrupted_outside_watch() {
    interrupt().cancelled().await;
    // No run followed when it came: nothing else will say so.
    if FOLLOWING.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        return;
    }
    let mut quiet_since: Option<std::time::Instant> = None;
    loop {
        if FOLLOWING.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            quiet_since = None;
        } else if quiet_since
            .get_or_insert_with(std::time::Instant::now)
            .elapsed()
            >= FOLLOWER_GRACE
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long a command whose followers ended on a Ctrl-C has to end by itself.
const FOLLOWER_GRACE: Duration = Duration::from_millis(1500);

/// Waits `d`; true when the user's Ctrl-C came first.
async fn pause(interrupt: &tokio_util::sync::CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        () = interrupt.cancelled() => true,
    }
}

/// Says once that the local farm stops with this command, whoever notices the Ctrl-C first.
pub(crate) fn say_local_farm_stops() {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, std::sync::atomic::Ordering::SeqCst) {
        note!("interrupted: the local farm stops with this command");
    }
}

/// Counts a run as followed while it lives.
struct Following;

impl Following {
    fn start() -> Self {
        FOLLOWING.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Following
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        FOLLOWING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Marks this command as running its own farm ([`say_detached`]).
pub(crate) fn farm_stops_with_this_command() {
    FARM_STOPS_WITH_COMMAND.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Says what becomes of `runs` now that the user stopped following them (Ctrl-C).
pub(crate) fn say_detached(runs: &[String]) {
    let ids = runs.join(" ");
    if FARM_STOPS_WITH_COMMAND.load(std::sync::atomic::Ordering::Relaxed) {
        // `nixfarm local` says which runs it cancels.
        say_local_farm_stops();
    } else if let [run] = runs {
        note!("detached; the run continues. Follow it again with: nixfarm watch {run}");
    } else {
        note!("detached; the runs continue: {ids}");
    }
}

/// How a watch ended.
pub enum End {
    Finished,
    /// Ctrl-C: the run goes on.
    Detached,
}

/// What a watch shows: a progress bar (or a line per build), or only the run's end.
pub struct View {
    bar: Option<ProgressBar>,
    /// Only the run's end is said (a run followed beside another's bar).
    quiet: Option<Printer>,
    built: u64,
    failed: u64,
    building: BTreeMap<String, Vec<String>>,
    /// Derivations being built again to check another agent's build (cross-checked builds).
    checking: std::collections::BTreeSet<String>,
}

/// Prints a line above another watch's live bar while it shows, plainly once it is gone.
#[derive(Clone, Default)]
pub struct Printer(Option<ProgressBar>);

impl Printer {
    pub fn say(&self, s: String) {
        match &self.0 {
            Some(b) if !b.is_finished() => b.println(match crate::output::stderr_columns() {
                Some(c) => nixfarm_core::fit::fit(&nixfarm_core::fit::one_line(&s), c),
                None => s,
            }),
            _ => note!("{}", nixfarm_core::fit::printable(&s)),
        }
    }
}

impl View {
    /// A view that says only how the run ended, through `printer`.
    pub fn quiet(printer: Printer) -> View {
        View {
            bar: None,
            quiet: Some(printer),
            built: 0,
            failed: 0,
            building: BTreeMap::new(),
            checking: Default::default(),
        }
    }

    /// Where other lines go while this view's bar shows.
    pub fn printer(&self) -> Printer {
        Printer(self.bar.clone())
    }

    /// A live bar on a terminal, a line per build otherwise.
    pub fn live() -> View {
        let bar = std::io::stderr().is_terminal().then(|| {
            // No bar until there is something to count: a bar at 0/0 would show full.
            let b = ProgressBar::new(0);
            b.set_style(style("{spinner} {elapsed_precise} {wide_msg}"));
            b.set_message("submitted");
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        View {
            bar,
            quiet: None,
            built: 0,
            failed: 0,
            building: BTreeMap::new(),
            checking: Default::default(),
        }
    }

    fn line(&self, s: String) {
        match &self.bar {
            // On a terminal a line that wrapped would break the display: cut it (the report
            // has the whole text).
            Some(b) => b.println(match crate::output::stderr_columns() {
                Some(c) => nixfarm_core::fit::fit(&nixfarm_core::fit::one_line(&s), c),
                None => s,
            }),
            None => note!("{}", nixfarm_core::fit::printable(&s)),
        }
    }

    fn refresh(&self) {
        if let Some(b) = &self.bar {
            let now: Vec<String> = self
                .building
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(a, v)| format!("{a}: {}", v.join(", ")))
                .collect();
            let mut msg = if b.length().unwrap_or(0) == 0 {
                "evaluating".to_string()
            } else {
                format!("built {} failed {}", self.built, self.failed)
            };
            if !now.is_empty() {
                msg = format!("{msg} | {}", now.join("; "));
            }
            b.set_message(msg);
        }
    }

    fn event(&mut self, run_id: &str, e: RunEvent) {
        if let Some(p) = &self.quiet {
            match e {
                RunEvent::RunFailed { error } => p.say(format!("run {run_id} failed: {error}")),
                RunEvent::RunFinished { state, summary } => p.say(format!(
                    "run {run_id} {state}: {}/{} packages ready",
                    summary.ready, summary.total
                )),
                _ => {}
            }
            return;
        }
        match e {
            RunEvent::RunStarted { attr_path, .. } => {
                self.line(format!("run {run_id}: evaluating {attr_path}"))
            }
            RunEvent::EvalListed { attrs, tasks } => {
                self.line(format!("{attrs} attributes, evaluated in {tasks} task(s)"))
            }
            RunEvent::EvalProgress { .. } => {}
            RunEvent::EvalDone { packages, drvs } => {
                self.line(format!(
                    "evaluated {packages} packages: {drvs} derivations to realise"
                ));
                if let Some(b) = &self.bar {
                    b.set_length(drvs);
                    b.set_style(style(
                        "{spinner} {elapsed_precise} {bar:20} {pos}/{len} {wide_msg}",
                    ));
                }
            }
            RunEvent::JobStarted { name, agent, .. } => {
                if self.bar.is_none() {
                    self.line(format!("building {name} on {agent}"));
                }
                self.building.entry(agent).or_default().push(name);
            }
            RunEvent::JobFinished {
                name,
                agent,
                outcome,
                message,
                duration_ms,
                substituted,
                dependency_failed,
                done,
                total,
                ..
            } => {
                if let Some(list) = self.building.get_mut(&agent)
                    && let Some(i) = list.iter().position(|x| *x == name)
                {
                    list.remove(i);
                }
                let secs = duration_ms as f64 / 1000.0;
                let progress = format!("[{done}/{total}]");
                if outcome.produced_outputs() {
                    // Not cached still built: the push is what failed, and it says so.
                    self.built += 1;
                    let how = if substituted { "fetched" } else { "built" };
                    if self.checking.remove(&name) {
                        self.line(format!("{progress} checked {name}: {message}"));
                    } else if outcome == BuildOutcome::NotCached {
                        self.line(format!(
                            "{progress} {how} {name} on {agent}, not cached: {message}"
                        ));
                    } else if self.bar.is_none() {
                        self.line(format!("{progress} {how} {name} on {agent} ({secs:.1}s)"));
                    }
                } else {
                    self.checking.remove(&name);
                    self.failed += 1 + dependency_failed;
                    self.line(format!(
                        "{progress} {outcome}: {name} on {agent}: {message}"
                    ));
                }
                if let Some(b) = &self.bar {
                    b.set_position(done);
                }
            }
            RunEvent::EvalAwaitingCheck { task, agent } => {
                let what = if task < 0 {
                    "the listing".to_string()
                } else {
                    format!("evaluation task {task}")
                };
                self.line(format!(
                    "{what} answered by {agent}; waiting for another agent to check it"
                ))
            }
            RunEvent::JobAwaitingCheck {
                name,
                agent,
                duration_ms,
                ..
            } => {
                if let Some(list) = self.building.get_mut(&agent)
                    && let Some(i) = list.iter().position(|x| *x == name)
                {
                    list.remove(i);
                }
                let secs = duration_ms as f64 / 1000.0;
                self.line(format!(
                    "built {name} on {agent} ({secs:.1}s); waiting for another agent to check it"
                ))
            }
            RunEvent::JobCheckStarted {
                name,
                agent,
                built_by,
                ..
            } => {
                self.line(format!(
                    "checking {name} on {agent}: building again what {built_by} built"
                ));
                self.checking.insert(name.clone());
                self.building.entry(agent).or_default().push(name);
            }
            RunEvent::JobRetry { drv, message, .. } => {
                self.line(format!("retrying {}: {message}", crate::short_name(&drv)))
            }
            RunEvent::RunFailed { error } => self.line(format!("run failed: {error}")),
            RunEvent::RunFinished { state, summary } => self.line(format!(
                "run {run_id} {state}: {}/{} packages ready",
                summary.ready, summary.total
            )),
        }
        self.refresh();
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A progress style; `{wide_msg}` takes what is left of the line and is cut to fit it.
fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// Streams a run's events until it ends; reconnects and resumes after the last event seen.
pub async fn watch(client: &Client, run: &str) -> anyhow::Result<End> {
    watch_with(client, run, View::live(), |_| {}).await
}

/// `watch` through `view`, handing each event to `seen` as well.
pub async fn watch_with(
    client: &Client,
    run: &str,
    mut view: View,
    mut seen: impl FnMut(&RunEvent),
) -> anyhow::Result<End> {
    let _following = Following::start();
    let interrupt = interrupt();
    let mut last = 0u64;
    let mut failures = 0u32;
    loop {
        // Asking, and waiting to ask again, give way to the user's Ctrl-C too.
        let mut raw = client.raw();
        let asked = raw.watch_run(client.req(pb::WatchRunRequest {
            run_id: run.to_string(),
            after_seq: last,
        }));
        let stream = tokio::select! {
            s = asked => s,
            () = interrupt.cancelled() => {
                view.finish();
                return Ok(End::Detached);
            }
        };
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown => {
                failures += 1;
                if failures > 60 {
                    view.finish();
                    return Err(status_error(s));
                }
                if pause(&interrupt, Duration::from_secs(1)).await {
                    view.finish();
                    return Ok(End::Detached);
                }
                continue;
            }
            Err(s) => {
                view.finish();
                return Err(status_error(s));
            }
        };
        loop {
            tokio::select! {
                m = stream.message() => match m {
                    Ok(Some(e)) => {
                        failures = 0;
                        if e.seq <= last {
                            continue;
                        }
                        last = e.seq;
                        // A kind this CLI does not know (a newer coordinator) is skipped.
                        if let Ok(ev) = RunEvent::from_parts(&e.kind, &e.json) {
                            seen(&ev);
                            view.event(&e.run_id, ev);
                        }
                        if RunEvent::is_terminal_kind(&e.kind) {
                            view.finish();
                            return Ok(End::Finished);
                        }
                    }
                                        Ok(None) => break,
                    // Refused, not dropped (its token replaced): asking again with the same
                    // token would only count as a wrong guess.
                    Err(s) if s.code() == tonic::Code::Unauthenticated => {
                        view.finish();
                        return Err(status_error(s));
                    }
                    Err(_) => break,
                },
                () = interrupt.cancelled() => {
                    view.finish();
                    return Ok(End::Detached);
                }
            }
        }
        // The stream ended without the run ending: the coordinator restarted or the network
        // dropped. Resume from the last event seen.
        failures += 1;
        if failures > 60 {
            view.finish();
            anyhow::bail!(
                "lost the coordinator while watching run {run}; resume with: nixfarm watch {run}"
            );
        }
        if pause(&interrupt, Duration::from_millis(500)).await {
            view.finish();
            return Ok(End::Detached);
        }
    }
}
