//! Following a run: a live progress bar on a terminal, plain lines otherwise. The stream
//! resumes from the last event seen after a disconnect, so no event is missed or repeated.

use crate::{Client, status_error};
use indicatif::{ProgressBar, ProgressStyle};
use nixfarm_proto::v1 as pb;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

/// How a watch ended.
pub enum End {
    Finished,
    /// Ctrl-C: the run goes on.
    Detached,
}

struct View {
    bar: Option<ProgressBar>,
    built: u64,
    failed: u64,
    building: BTreeMap<String, Vec<String>>,
}

impl View {
    fn new() -> View {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        View {
            bar,
            built: 0,
            failed: 0,
            building: BTreeMap::new(),
        }
    }

    fn line(&self, s: String) {
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
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
            b.set_message(format!(
                "built {} failed {} | {}",
                self.built,
                self.failed,
                now.join("; ")
            ));
        }
    }

    fn event(&mut self, e: &pb::RunEvent) {
        let v: Value = serde_json::from_str(&e.json).unwrap_or(Value::Null);
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        match e.kind.as_str() {
            "run-started" => self.line(format!("run {}: evaluating {}", e.run_id, s("attr_path"))),
            "eval-listed" => self.line(format!(
                "{} attributes, evaluated in {} task(s)",
                n("attrs"),
                n("tasks")
            )),
            "eval-done" => {
                self.line(format!(
                    "evaluated {} packages: {} derivations to realise",
                    n("packages"),
                    n("drvs")
                ));
                if let Some(b) = &self.bar {
                    b.set_length(n("drvs"));
                }
            }
            "job-started" => {
                self.building.entry(s("agent")).or_default().push(s("name"));
                if self.bar.is_none() {
                    self.line(format!("building {} on {}", s("name"), s("agent")));
                }
            }
            "job-finished" => {
                if let Some(list) = self.building.get_mut(&s("agent"))
                    && let Some(i) = list.iter().position(|x| *x == s("name"))
                {
                    list.remove(i);
                }
                let outcome = s("outcome");
                let secs = n("duration_ms") as f64 / 1000.0;
                let progress = format!("[{}/{}]", n("done"), n("total"));
                if outcome == "built" {
                    self.built += 1;
                    let how = if v
                        .get("substituted")
                        .and_then(Value::as_bool)
                        .unwrap_or(false)
                    {
                        "fetched"
                    } else {
                        "built"
                    };
                    if self.bar.is_none() {
                        self.line(format!(
                            "{progress} {how} {} on {} ({secs:.1}s)",
                            s("name"),
                            s("agent")
                        ));
                    }
                } else {
                    self.failed += 1 + n("dependency_failed");
                    self.line(format!(
                        "{progress} {outcome}: {} on {}: {}",
                        s("name"),
                        s("agent"),
                        s("message")
                    ));
                }
                if let Some(b) = &self.bar {
                    b.set_position(n("done"));
                }
            }
            "job-retry" => self.line(format!(
                "retrying {}: {}",
                crate::short_name(&s("drv")),
                s("message")
            )),
            "run-failed" => self.line(format!("run failed: {}", s("error"))),
            "run-finished" => {
                let sum = v.get("summary").cloned().unwrap_or(Value::Null);
                let ready = sum.get("ready").and_then(Value::as_u64).unwrap_or(0);
                let total = sum.get("total").and_then(Value::as_u64).unwrap_or(0);
                self.line(format!(
                    "run {} {}: {ready}/{total} packages ready",
                    e.run_id,
                    s("state")
                ));
            }
            _ => {}
        }
        self.refresh();
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Streams a run's events until it ends; reconnects and resumes after the last event seen.
pub async fn watch(client: &Client, run: &str) -> anyhow::Result<End> {
    let mut view = View::new();
    let mut last = 0u64;
    let mut failures = 0u32;
    loop {
        let stream = client
            .raw()
            .watch_run(client.req(pb::WatchRunRequest {
                run_id: run.to_string(),
                after_seq: last,
            }))
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown => {
                failures += 1;
                if failures > 60 {
                    view.finish();
                    return Err(status_error(s));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
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
                        view.event(&e);
                        if e.kind == "run-finished" || e.kind == "run-failed" {
                            view.finish();
                            return Ok(End::Finished);
                        }
                    }
                    Ok(None) => break,
                    Err(_) => break,
                },
                _ = tokio::signal::ctrl_c() => {
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
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
