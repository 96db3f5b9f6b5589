//! Printing reports and listings: the format the user chose, and the exit code CI reads.

use crate::{Format, OutputArgs};
use nixfarm_core::TableWidth;
use nixfarm_core::fit;
use nixfarm_core::report::Report;

/// Prints a report in the chosen format on stdout; returns the exit code.
pub fn print_report(report: &Report, out: &OutputArgs) -> i32 {
    let format = out.format.unwrap_or(Format::Table);
    let github = matches!(format, Format::Github);
    // A run that did not finish is an error for CI, whatever its packages say: cancelled
    // too (from the CLI or the web page), so a job whose run was stopped does not pass.
    let failed = match report.state {
        nixfarm_core::RunState::Failed => Some(format!(
            "error: run {} failed: {}",
            report.run_id,
            nixfarm_core::fit::printable(&report.error)
        )),
        nixfarm_core::RunState::Cancelled => Some(format!(
            "error: run {} was cancelled before it finished: its report is partial",
            report.run_id
        )),
        _ => None,
    };
    // The run's error is the repository's text: said while workflow commands are still
    // stopped, before --format github resumes them for its annotations.
    if github && let Some(line) = &failed {
        note!("{line}");
    }
    let text = match format {
        Format::Table => report.to_table_in(if out.wide {
            TableWidth::Wide
        } else {
            match stdout_columns() {
                Some(c) => TableWidth::Columns(c),
                None => TableWidth::Default,
            }
        }),
        Format::Json => report.to_json() + "\n",
        Format::Markdown => report.to_markdown(),
        Format::Junit => report.to_junit(),
        Format::Github => {
            // Its own annotations are commands the runner must read; the rest of the
            // output (progress, errors) was printed with commands stopped.
            crate::ci::resume_commands(true);
            report.to_github()
        }
    };
    out_raw!("{text}");
    step_summary(report);
    if let Some(line) = failed {
        if !github {
            note!("{line}");
        }
        return 2;
    }
    if let Some(pct) = out.fail_under
        && report.summary.below(pct)
    {
        note!(
            "readiness {:.1}% is below --fail-under {pct}%",
            report.summary.percent
        );
        return 1;
    }
    0
}

/// In a GitHub Actions job, appends the Markdown report to the job's summary page. A file
/// that cannot be written costs a warning, not the report.
fn step_summary(report: &Report) {
    let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY").filter(|p| !p.is_empty()) else {
        return;
    };
    let written = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, format!("{}\n", report.to_markdown()).as_bytes())
        });
    if let Err(e) = written {
        note!(
            "warning: cannot append the report to GITHUB_STEP_SUMMARY ({}): {e}",
            std::path::Path::new(&path).display()
        );
    }
}

/// Columns of the terminal stdout is, if it is one.
pub(crate) fn stdout_columns() -> Option<usize> {
    console::Term::stdout()
        .size_checked()
        .map(|(_, cols)| usize::from(cols))
        .filter(|c| *c > 0)
}

/// Columns of the terminal stderr is, if it is one.
pub(crate) fn stderr_columns() -> Option<usize> {
    console::Term::stderr()
        .size_checked()
        .map(|(_, cols)| usize::from(cols))
        .filter(|c| *c > 0)
}

/// A listing: no borders, a rule under the header, columns two spaces apart, flush left
/// (lines start with their first cell, for grep). On a terminal the `flex` column gives up
/// width first so every line fits.
pub(crate) struct Listing {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
    flex: usize,
}

impl Listing {
    pub(crate) fn new(header: &[&'static str], flex: usize) -> Listing {
        Listing {
            header: header.to_vec(),
            rows: Vec::new(),
            flex,
        }
    }

    pub(crate) fn add_row(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    pub(crate) fn render(&self) -> String {
        fit::columns(&self.header, &self.rows, self.flex, stdout_columns())
    }
}
