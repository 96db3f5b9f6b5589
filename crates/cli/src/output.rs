//! Printing reports and listings: the format the user chose, and the exit code CI reads.

use crate::{Format, OutputArgs};
use nixfarm_core::report::Report;

/// Prints a report in the chosen format on stdout; returns the exit code.
pub fn print_report(report: &Report, out: &OutputArgs) -> i32 {
    let format = out.format.unwrap_or(Format::Table);
    let text = match format {
        Format::Table => report.to_table(),
        Format::Json => report.to_json() + "\n",
        Format::Markdown => report.to_markdown(),
        Format::Junit => report.to_junit(),
    };
    print!("{text}");
    if report.state == nixfarm_core::RunState::Failed {
        eprintln!("error: run {} failed: {}", report.run_id, report.error);
        return 2;
    }
    if let Some(pct) = out.fail_under
        && report.summary.percent < pct
    {
        eprintln!(
            "readiness {:.1}% is below --fail-under {pct}%",
            report.summary.percent
        );
        return 1;
    }
    0
}

/// A listing table: no borders, a rule under the header, columns two spaces apart.
pub(crate) fn table(header: &[&str]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_style(
        comfy_table::TableStyle::new()
            .header_separator(comfy_table::LineStyle::none().fill('-').junction(' ')),
    );
    t.set_header(header.to_vec());
    // Flush left, two spaces between columns: lines start with their first cell, for grep.
    for c in t.column_iter_mut() {
        c.set_padding((0, 2));
    }
    t
}
