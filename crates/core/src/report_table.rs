//! The report as a table for people: borderless columns that fit the terminal they are
//! printed on, reasons cut with `…` there (the full text is in JSON, Markdown and `--wide`).

use crate::fit::{columns, fit, one_line, wrap};
use crate::report::{Report, format_ms, truncate};

/// How wide a table may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableWidth {
    /// Not a terminal: reasons cut at 90 characters, lines as long as that makes them.
    Default,
    /// `--wide`: every reason whole (on one line).
    Wide,
    /// A terminal this many columns wide: no line is wider.
    Columns(usize),
}

/// Below this many columns the agent column is left out.
const NARROW: usize = 110;

/// The narrowest layout attempted; a narrower terminal gets lines cut at its width.
const MIN_COLUMNS: usize = 20;

impl Report {
    /// The table for a pipe or a file (reasons cut at 90 characters).
    pub fn to_table(&self) -> String {
        self.to_table_in(TableWidth::Default)
    }

    /// The table laid out for `width`.
    pub fn to_table_in(&self, width: TableWidth) -> String {
        let max = match width {
            TableWidth::Columns(c) => Some(c.max(MIN_COLUMNS)),
            _ => None,
        };
        let rows: Vec<Vec<String>> = self
            .packages
            .iter()
            .map(|p| {
                let reason = match width {
                    TableWidth::Default => truncate(&p.reason, 90),
                    _ => one_line(&p.reason),
                };
                vec![
                    p.attr.clone(),
                    p.status.to_string(),
                    reason,
                    if p.duration_ms > 0 {
                        format_ms(p.duration_ms)
                    } else {
                        String::new()
                    },
                    p.agent.clone(),
                ]
            })
            .collect();
        let mut header = vec!["package", "status", "reason", "time", "agent"];
        // On a narrow terminal the reason needs the room more than the agent's name (which
        // `--wide` and JSON still show).
        let rows = match max {
            Some(m) if m < NARROW => {
                header.pop();
                rows.into_iter()
                    .map(|mut r| {
                        r.pop();
                        r
                    })
                    .collect()
            }
            _ => rows,
        };
        let mut out = String::new();
        let mut put = |line: String| {
            let line = match max {
                Some(m) => fit(&line, m),
                None => line,
            };
            out.push_str(&line);
            out.push('\n');
        };
        put(format!(
            "Run {} ({}): {}",
            one_line(&self.run_id),
            self.state,
            one_line(&self.label)
        ));
        if !self.error.is_empty() {
            for l in self.wrapped(&format!("error: {}", one_line(&self.error)), max) {
                put(l);
            }
        }
        for l in columns(&header, &rows, 2, max).lines() {
            put(l.to_string());
        }
        put(String::new());
        for l in self.fixes_lines(max) {
            put(l);
        }
        if !self.repository.is_empty() {
            let ok = self.repository.iter().filter(|c| c.ok).count();
            put(format!(
                "Repository checks: {ok} of {} ok",
                self.repository.len()
            ));
            for c in self.repository.iter().filter(|c| !c.ok) {
                let line = format!("  {}: {}", one_line(&c.name), one_line(&c.message));
                for l in self.wrapped(&line, max) {
                    put(l);
                }
            }
        }
        for l in self.wrapped(&self.summary_line(), max) {
            put(l);
        }
        out
    }

    fn wrapped(&self, s: &str, max: Option<usize>) -> Vec<String> {
        match max {
            Some(m) => wrap(s, m, "  "),
            None => vec![s.to_string()],
        }
    }

    /// The hash fixes: one line each, or on a narrow terminal the place on one line and the
    /// old and new hash on their own lines (a hash cut short is of no use).
    fn fixes_lines(&self, max: Option<usize>) -> Vec<String> {
        let text = self.fixes_text("  ", false);
        let Some(max) = max else {
            return text.lines().map(str::to_string).collect();
        };
        let mut lines: Vec<String> = text.lines().take(1).map(str::to_string).collect();
        for f in self.all_fixes() {
            let (file, attribute) = (one_line(&f.file), one_line(&f.attribute));
            let (old, new) = (f.was(), one_line(&f.new));
            let one = format!("  {file}:{} {attribute}: {old} -> {new}", f.line);
            if crate::fit::width(&one) <= max {
                lines.push(one);
            } else {
                lines.push(format!("  {file}:{} {attribute}", f.line));
                lines.push(format!("    old {old}"));
                lines.push(format!("    new {new}"));
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::width;
    use crate::report::{HashFix, PackageReport};
    use crate::status::{PackageStatus, RunState};

    fn report() -> Report {
        let mut a = PackageReport {
            attr: "bluesky-pds-with-a-rather-long-attribute-name".into(),
            status: PackageStatus::BuildFailed,
            reason: format!("builder failed: {}\nsecond line", "error ".repeat(40)),
            duration_ms: 61_000,
            agent: "builder-host-number-one".into(),
            ..Default::default()
        };
        a.hash_fixes.push(HashFix {
            file: "pkgs/bluesky-pds/default.nix".into(),
            attribute: "npmDepsHash".into(),
            old: crate::Sri::parse("sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").unwrap(),
            new: crate::Sri::parse("sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=").unwrap(),
            line: 12,
            written: String::new(),
        });
        let b = PackageReport {
            attr: "ok".into(),
            status: PackageStatus::Ready,
            ..Default::default()
        };
        let mut r = Report::new(
            "r-1".into(),
            RunState::Finished,
            "label\nwith a newline".into(),
            String::new(),
            vec![a, b],
        );
        r.fix_rounds = vec!["r-1".into(), "r-2".into()];
        r
    }

    #[test]
    fn at_80_columns_no_line_is_wider_and_hashes_stay_whole() {
        let r = report();
        let t = r.to_table_in(TableWidth::Columns(80));
        for l in t.lines() {
            assert!(width(l) <= 80, "{} columns: {l:?}", width(l));
        }
        assert!(!t.contains("builder-host-number-one"), "{t}");
        assert!(t.contains("1m01s"), "{t}");
        assert!(t.contains('…'), "{t}");
        assert!(
            t.contains("new sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ="),
            "{t}"
        );
        assert!(t.contains("label with a newline"));
        assert!(t.lines().last().unwrap().starts_with("Ready: 1/2"));
    }

    #[test]
    fn wide_keeps_every_reason_whole_on_one_line() {
        let r = report();
        let t = r.to_table_in(TableWidth::Wide);
        assert!(t.contains(&"error ".repeat(39)));
        assert!(t.contains("second line"));
        assert!(!t.contains('…'));
        assert!(t.contains("builder-host-number-one"), "{t}");
        let t = r.to_table_in(TableWidth::Columns(120));
        assert!(t.contains("builder-host-number-one"), "{t}");
        assert!(t.lines().all(|l| width(l) <= 120), "{t}");
        // The default (a pipe) cuts reasons at 90 characters.
        assert!(!r.to_table().contains("second line"));
    }
}
