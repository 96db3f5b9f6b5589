//! The readiness report: per package status and reason, overall percentage, and its
//! renderings (table for people, JSON for scripts, Markdown for READMEs, JUnit for CI).

use crate::hash::Sri;
use crate::status::{PackageStatus, RunState, Smoke};
use crate::store_path::{OutputPath, StorePath};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One fixed-output hash to fill in: the value of `attribute` in `file` goes from `old` to
/// `new` (both SRI).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashFix {
    /// Relative to the repository root.
    pub file: String,
    pub attribute: String,
    pub old: Sri,
    pub new: Sri,
    /// 1-based line of the value in the submitted file.
    #[serde(default)]
    pub line: usize,
    /// The value as the file has it (`lib.fakeHash`, `""`); empty: the literal `old`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub written: String,
}

impl HashFix {
    /// What the file has now, as a reader finds it there: `""` or `lib.fakeHash` where that
    /// is what is written (Nix calls both the all-zero hash `old`), else `old`.
    pub fn was(&self) -> String {
        let w = self.written.trim();
        if w.is_empty() || self.old == w.trim_matches('"') {
            self.old.to_string()
        } else {
            crate::fit::one_line(w)
        }
    }
}

/// A fixed-output derivation in the package's closure whose hash did not match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashMismatch {
    pub fod_drv: StorePath,
    pub specified: Sri,
    pub got: Sri,
    /// What the derivation says about itself (name, rev, url…), used to find it in the source.
    #[serde(default)]
    pub hints: Vec<String>,
}

/// One package's line in the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PackageReport {
    pub attr: String,
    /// A package, or one of the flake's checks (`checks.<name>`).
    #[serde(default)]
    pub kind: PackageKind,
    pub status: PackageStatus,
    pub reason: String,
    #[serde(default)]
    pub pname: String,
    #[serde(default)]
    pub version: String,
    /// Absent when it did not evaluate.
    #[serde(default, with = "crate::store_path::or_empty")]
    pub drv_path: Option<StorePath>,
    /// Output name to store path.
    #[serde(default)]
    pub outputs: BTreeMap<String, OutputPath>,
    pub pinned: bool,
    #[serde(default)]
    pub rev: String,
    #[serde(default)]
    pub position: String,
    pub duration_ms: u64,
    #[serde(default)]
    pub agent: String,
    #[serde(default)]
    pub failed_dependency: String,
    /// Every hash mismatch in the package's closure in this run.
    #[serde(default)]
    pub hash_mismatches: Vec<HashMismatch>,
    /// The edits that fill in its hashes (found by the CLI from the submitted tree).
    #[serde(default)]
    pub hash_fixes: Vec<HashFix>,
    #[serde(default)]
    pub log_tail: String,
    /// With `--smoke`: what running its main program showed.
    #[serde(default)]
    pub smoke: Smoke,
}

impl PackageReport {
    pub fn status(&self) -> PackageStatus {
        self.status
    }
}

/// Totals over a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub total: usize,
    pub ready: usize,
    /// Ready packages as a percentage of all, rounded to one decimal.
    pub percent: f64,
    pub by_status: BTreeMap<PackageStatus, usize>,
    /// With `--smoke`: packages per smoke outcome (passed, failed, skipped).
    #[serde(default)]
    pub smoke: BTreeMap<Smoke, usize>,
}

impl Summary {
    /// Whether fewer than `pct` percent of the packages are ready, counted exactly (not from
    /// the rounded `percent`: 2500 of 2501 is below 100). No package at all is below any
    /// positive gate.
    pub fn below(&self, pct: f64) -> bool {
        (self.ready as f64) * 100.0 < pct * self.total as f64 || (self.total == 0 && pct > 0.0)
    }
}

/// A run's readiness report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub run_id: String,
    pub state: RunState,
    pub label: String,
    #[serde(default)]
    pub error: String,
    pub summary: Summary,
    pub packages: Vec<PackageReport>,
    /// With `--fix-hashes`: the run of each round, first to last (the first is `run_id`).
    #[serde(default)]
    pub fix_rounds: Vec<String>,
    /// The flake's other outputs, checked as `nix flake check` would (overlays, modules,
    /// formatter, dev shells, apps).
    #[serde(default)]
    pub repository: Vec<RepoCheck>,
}

/// One repository check: an output of the flake (`overlays.default`,
/// `nixosModules.server`, `formatter.x86_64-linux`) and whether it is what it should be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RepoCheck {
    pub name: String,
    pub ok: bool,
    /// Why not (empty when ok).
    #[serde(default)]
    pub message: String,
}

/// Attribute names of the flake's `checks.<system>`, reported beside its packages.
pub const CHECK_PREFIX: &str = "checks.";

/// What a report line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PackageKind {
    #[default]
    Package,
    /// One of the flake's `checks.<system>.*`.
    Check,
}

impl PackageKind {
    /// The kind of a report line by its attribute name.
    pub fn of(attr: &str) -> PackageKind {
        if attr.starts_with(CHECK_PREFIX) {
            PackageKind::Check
        } else {
            PackageKind::Package
        }
    }
}

impl Report {
    pub fn new(
        run_id: String,
        state: RunState,
        label: String,
        error: String,
        mut packages: Vec<PackageReport>,
    ) -> Self {
        packages.sort_by(|a, b| a.attr.cmp(&b.attr));
        let summary = summarize(&packages);
        Report {
            run_id,
            state,
            label,
            error,
            summary,
            packages,
            fix_rounds: Vec::new(),
            repository: Vec::new(),
        }
    }

    /// Recomputes the summary after packages changed.
    pub fn resummarize(&mut self) {
        self.packages.sort_by(|a, b| a.attr.cmp(&b.attr));
        self.summary = summarize(&self.packages);
    }

    /// Every hash fix, once each, in file order.
    pub fn all_fixes(&self) -> Vec<&HashFix> {
        let mut v: Vec<&HashFix> = self.packages.iter().flat_map(|p| &p.hash_fixes).collect();
        v.sort_by(|a, b| (&a.file, a.line, &a.new).cmp(&(&b.file, b.line, &b.new)));
        v.dedup();
        v
    }

    pub(crate) fn fixes_text(&self, bullet: &str, code: bool) -> String {
        let fixes = self.all_fixes();
        if fixes.is_empty() && self.fix_rounds.is_empty() {
            return String::new();
        }
        let q = if code { "`" } else { "" };
        let mut out = String::new();
        let files: std::collections::BTreeSet<&str> =
            fixes.iter().map(|f| f.file.as_str()).collect();
        let _ = writeln!(
            out,
            "Hash fixes: {} in {} file(s){}",
            fixes.len(),
            files.len(),
            if self.fix_rounds.is_empty() {
                String::new()
            } else {
                format!(", {} round(s)", self.fix_rounds.len())
            }
        );
        for f in fixes {
            // A name of the user's repository: one line, and no backtick to end a span.
            // So are the binding and the hashes, as a coordinator reported them.
            let cell = |s: &str| crate::fit::one_line(s).replace('`', "'");
            let file = cell(&f.file);
            let _ = writeln!(
                out,
                "{bullet}{q}{file}:{}{q} {q}{}{q}: {} -> {q}{}{q}",
                f.line,
                cell(&f.attribute),
                cell(&f.was()),
                cell(&f.new)
            );
        }
        out
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Why the run ended without finishing (failed, with its error, or cancelled): what CI
    /// formats show as a failure of their own, so an empty or partial report is not green.
    pub fn run_unfinished(&self) -> Option<String> {
        match self.state {
            crate::RunState::Failed => Some(format!("the run failed: {}", self.error)),
            crate::RunState::Cancelled => {
                Some("the run was cancelled before it finished".to_string())
            }
            _ => None,
        }
    }

    pub fn summary_line(&self) -> String {
        let counts: Vec<String> = self
            .summary
            .by_status
            .iter()
            .filter(|(k, _)| **k != PackageStatus::Ready)
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        let mut s = format!(
            "Ready: {}/{} ({:.1}%)",
            self.summary.ready, self.summary.total, self.summary.percent
        );
        if !counts.is_empty() {
            let _ = write!(s, "; {}", counts.join(", "));
        }
        if !self.repository.is_empty() {
            let ok = self.repository.iter().filter(|c| c.ok).count();
            let _ = write!(s, "; repository checks: {ok}/{} ok", self.repository.len());
        }
        if !self.summary.smoke.is_empty() {
            let smoke: Vec<String> = self
                .summary
                .smoke
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect();
            let _ = write!(s, "; smoke tests: {}", smoke.join(", "));
        }
        s
    }

    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "## nixfarm readiness: {:.1}% ({}/{} ready)\n",
            self.summary.percent, self.summary.ready, self.summary.total
        );
        if !self.error.is_empty() {
            let _ = writeln!(out, "> **error:** {}\n", md_escape(&self.error));
        }
        let _ = writeln!(out, "| package | status | reason |");
        let _ = writeln!(out, "|---|---|---|");
        for p in &self.packages {
            let icon = match p.status() {
                PackageStatus::Ready => "✅",
                PackageStatus::Unpinned | PackageStatus::NeedsHash => "⚠️",
                PackageStatus::Pending => "⏳",
                _ => "❌",
            };
            let _ = writeln!(
                out,
                "| {} | {icon} {} | {} |",
                md_code(&p.attr),
                p.status,
                md_escape(&truncate(&p.reason, 200))
            );
        }
        let fixes = self.fixes_text("- ", true);
        if !fixes.is_empty() {
            let _ = write!(out, "\n{fixes}");
        }
        if !self.repository.is_empty() {
            let _ = writeln!(out, "\n### Repository\n\n| output | check |\n|---|---|");
            for c in &self.repository {
                let _ = writeln!(
                    out,
                    "| {} | {} |",
                    md_code(&c.name),
                    if c.ok {
                        "✅ ok".to_string()
                    } else {
                        format!("❌ {}", md_escape(&c.message))
                    }
                );
            }
        }
        let failures: Vec<&PackageReport> = self
            .packages
            .iter()
            .filter(|p| !p.log_tail.is_empty() && p.status().is_failure())
            .collect();
        for p in failures {
            let _ = writeln!(
                out,
                "\n<details><summary><code>{}</code> log tail</summary>\n\n```\n{}\n```\n</details>",
                xml_escape(&p.attr),
                crate::fit::printable(p.log_tail.trim_end()).replace("```", "'''")
            );
        }
        out
    }

    pub fn to_junit(&self) -> String {
        let unfinished = self.run_unfinished();
        let failures = self
            .packages
            .iter()
            .filter(|p| p.status().is_failure())
            .count()
            + self.repository.iter().filter(|c| !c.ok).count()
            + usize::from(unfinished.is_some());
        // Every test case below is counted: CI shows these totals beside the cases.
        let tests = self.packages.len() + self.repository.len() + usize::from(unfinished.is_some());
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            out,
            "<testsuites name=\"nixfarm\" tests=\"{tests}\" failures=\"{failures}\">"
        );
        let _ = writeln!(
            out,
            "  <testsuite name=\"{}\" tests=\"{tests}\" failures=\"{failures}\">",
            xml_escape(&self.label),
        );
        if let Some(why) = &unfinished {
            let _ = writeln!(
                out,
                "    <testcase classname=\"nixfarm.run\" name=\"{}\">\n      <failure type=\"{}\" message=\"{}\"/>\n    </testcase>",
                xml_escape(&self.run_id),
                xml_escape(self.state.as_str()),
                xml_escape(why)
            );
        }
        for p in &self.packages {
            let secs = p.duration_ms as f64 / 1000.0;
            let _ = write!(
                out,
                "    <testcase classname=\"nixfarm\" name=\"{}\" time=\"{secs:.3}\"",
                xml_escape(&p.attr)
            );
            // Where to look: CI systems link a test case's file and line to the source.
            if let Some((file, line)) = crate::report_ci::place(p) {
                let _ = write!(out, " file=\"{}\" line=\"{line}\"", xml_escape(&file));
            }
            if p.status().is_failure() {
                let _ = writeln!(out, ">");
                let _ = writeln!(
                    out,
                    "      <failure type=\"{}\" message=\"{}\">{}</failure>",
                    xml_escape(p.status.as_str()),
                    xml_escape(&p.reason),
                    xml_escape(&p.log_tail)
                );
                let _ = writeln!(out, "    </testcase>");
            } else {
                let _ = writeln!(out, "/>");
            }
        }
        for c in &self.repository {
            let _ = write!(
                out,
                "    <testcase classname=\"nixfarm.repository\" name=\"{}\"",
                xml_escape(&c.name)
            );
            if c.ok {
                let _ = writeln!(out, "/>");
            } else {
                let _ = writeln!(
                    out,
                    ">\n      <failure type=\"repository\" message=\"{}\"/>\n    </testcase>",
                    xml_escape(&c.message)
                );
            }
        }
        out.push_str("  </testsuite>\n</testsuites>\n");
        out
    }
}

fn summarize(packages: &[PackageReport]) -> Summary {
    let mut by_status = BTreeMap::new();
    let mut smoke = BTreeMap::new();
    for p in packages {
        *by_status.entry(p.status).or_insert(0) += 1;
        if p.smoke != Smoke::NotRun {
            *smoke.entry(p.smoke).or_insert(0) += 1;
        }
    }
    let total = packages.len();
    let ready = packages
        .iter()
        .filter(|p| p.status == PackageStatus::Ready)
        .count();
    let percent = if total == 0 {
        0.0
    } else {
        (ready as f64 * 1000.0 / total as f64).round() / 10.0
    };
    Summary {
        total,
        ready,
        percent,
        by_status,
        smoke,
    }
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    let line = s.lines().next().unwrap_or_default();
    if line.chars().count() <= max {
        line.to_string()
    } else {
        let mut t: String = line.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Text for a Markdown table cell: one line, pipes escaped, no raw HTML.
fn md_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '|' => out.push_str("\\|"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A code span for a table cell: one line, pipes escaped (GFM splits cells on them even in
/// code), fenced with one backtick more than its longest run of them (so a name with a
/// backtick reads as itself), spaced from a backtick at either end.
pub(crate) fn md_code(s: &str) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .replace('|', "\\|");
    let mut longest = 0;
    let mut run = 0;
    for c in one_line.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let fence = "`".repeat(longest + 1);
    let pad = if one_line.starts_with('`') || one_line.ends_with('`') {
        " "
    } else {
        ""
    };
    format!("{fence}{pad}{one_line}{pad}{fence}")
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 allows no other control characters, surrogates or U+FFFE/U+FFFF, even
            // escaped: one of them makes the whole file unreadable to a strict parser.
            c if matches!(c, '\n' | '\r' | '\t')
                || ('\u{20}'..='\u{D7FF}').contains(&c)
                || ('\u{E000}'..='\u{FFFD}').contains(&c)
                || c >= '\u{10000}' =>
            {
                out.push(c)
            }
            _ => {}
        }
    }
    out
}

/// Formats a duration in milliseconds for people.
pub fn format_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
