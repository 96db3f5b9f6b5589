//! Several runs of one repository, one per value of a flake input (`--matrix
//! nixpkgs=REF1,REF2`): a package × cell table with each cell's summary, and the packages
//! whose status differs between cells marked.

use crate::fit::{columns, fit};
use crate::report::{PackageReport, Report};
use serde_json::json;
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// One cell: the input's value and its run's report.
#[derive(Debug, Clone)]
pub struct MatrixCell {
    pub reference: String,
    pub report: Report,
}

#[derive(Debug, Clone)]
pub struct Matrix {
    /// The overridden input.
    pub input: String,
    pub cells: Vec<MatrixCell>,
}

impl Matrix {
    /// GitHub annotations of every cell, each titled with its input value.
    pub fn to_github(&self) -> String {
        self.cells
            .iter()
            .map(|c| {
                c.report
                    .to_github_for(Some(&format!("{}={}", self.input, c.reference)))
            })
            .collect()
    }

    /// Every package of any cell, by name.
    pub fn attrs(&self) -> BTreeSet<&str> {
        self.cells
            .iter()
            .flat_map(|c| c.report.packages.iter().map(|p| p.attr.as_str()))
            .collect()
    }

    fn package<'a>(cell: &'a MatrixCell, attr: &str) -> Option<&'a PackageReport> {
        cell.report.packages.iter().find(|p| p.attr == attr)
    }

    /// Whether the package's status is not the same in every cell.
    pub fn differs(&self, attr: &str) -> bool {
        let statuses: BTreeSet<Option<String>> = self
            .cells
            .iter()
            .map(|c| Self::package(c, attr).map(|p| p.status.to_string()))
            .collect();
        statuses.len() > 1
    }

    /// The lowest readiness of any cell, percent.
    /// Whether a cell has fewer than `pct` percent of its packages ready
    /// ([`crate::report::Summary::below`]).
    pub fn below(&self, pct: f64) -> bool {
        self.cells.iter().any(|c| c.report.summary.below(pct))
    }

    pub fn min_percent(&self) -> f64 {
        self.cells
            .iter()
            .map(|c| c.report.summary.percent)
            .fold(f64::INFINITY, f64::min)
    }

    pub fn to_json(&self) -> String {
        let cells: Vec<serde_json::Value> = self
            .cells
            .iter()
            .map(|c| {
                json!({
                    "ref": c.reference,
                    "run_id": c.report.run_id,
                    "state": c.report.state,
                    "error": c.report.error,
                    "summary": c.report.summary,
                    "repository": c.report.repository,
                })
            })
            .collect();
        let packages: Vec<serde_json::Value> = self
            .attrs()
            .into_iter()
            .map(|attr| {
                let per: Vec<serde_json::Value> = self
                    .cells
                    .iter()
                    .map(|c| match Self::package(c, attr) {
                        Some(p) => json!({ "status": p.status, "reason": p.reason }),
                        None => serde_json::Value::Null,
                    })
                    .collect();
                json!({ "attr": attr, "differs": self.differs(attr), "cells": per })
            })
            .collect();
        serde_json::to_string_pretty(&json!({
            "input": self.input,
            "cells": cells,
            "packages": packages,
        }))
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The table; `max` fits it to a terminal's width.
    pub fn to_table(&self, max: Option<usize>) -> String {
        let names: Vec<String> = self
            .cells
            .iter()
            .enumerate()
            .map(|(i, _)| format!("[{}]", i + 1))
            .collect();
        let mut header: Vec<&str> = vec!["package"];
        header.extend(names.iter().map(String::as_str));
        header.push("differs");
        let rows: Vec<Vec<String>> = self
            .attrs()
            .into_iter()
            .map(|attr| {
                let mut row = vec![attr.to_string()];
                for c in &self.cells {
                    row.push(Self::package(c, attr).map_or("-".into(), |p| p.status.to_string()));
                }
                row.push(if self.differs(attr) {
                    "*".into()
                } else {
                    String::new()
                });
                row
            })
            .collect();
        let mut out = String::new();
        let _ = writeln!(out, "Matrix over input {}:", self.input);
        for (i, c) in self.cells.iter().enumerate() {
            let line = format!(
                "  [{}] {} = {}: run {} ({}), {}",
                i + 1,
                self.input,
                c.reference,
                c.report.run_id,
                c.report.state,
                c.report.summary_line()
            );
            let _ = writeln!(out, "{}", max.map_or(line.clone(), |m| fit(&line, m)));
        }
        out.push('\n');
        out.push_str(&columns(&header, &rows, 0, max));
        let differing = rows
            .iter()
            .filter(|r| r.last().is_some_and(|d| !d.is_empty()))
            .count();
        let _ = writeln!(
            out,
            "\n{differing} package(s) differ between cells (marked *)"
        );
        out
    }

    pub fn to_markdown(&self) -> String {
        let mut out = format!("## nixfarm readiness matrix over `{}`\n\n", self.input);
        out.push_str("| cell | ready | run |\n|---|---|---|\n");
        for c in &self.cells {
            let _ = writeln!(
                out,
                "| `{}` | {:.1}% ({}/{}) | `{}` |",
                c.reference.replace('|', "\\|").replace('`', "'"),
                c.report.summary.percent,
                c.report.summary.ready,
                c.report.summary.total,
                c.report.run_id
            );
        }
        out.push_str("\n| package |");
        for (i, _) in self.cells.iter().enumerate() {
            let _ = write!(out, " [{}] |", i + 1);
        }
        out.push_str(" differs |\n|---|");
        for _ in &self.cells {
            out.push_str("---|");
        }
        out.push_str("---|\n");
        for attr in self.attrs() {
            let _ = write!(out, "| {} |", crate::report::md_code(attr));
            for c in &self.cells {
                let _ = write!(
                    out,
                    " {} |",
                    Self::package(c, attr).map_or("-".into(), |p| p.status.to_string())
                );
            }
            let _ = writeln!(
                out,
                " {} |",
                if self.differs(attr) { "**yes**" } else { "" }
            );
        }
        out
    }

    /// JUnit: a test suite per cell.
    pub fn to_junit(&self) -> String {
        let mut out = String::from(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"nixfarm\">\n",
        );
        for c in &self.cells {
            let one = c.report.to_junit();
            // Each cell's suite, renamed after its input value.
            for line in one.lines().filter(|l| {
                !l.starts_with("<?xml")
                    && !l.starts_with("<testsuites")
                    && !l.starts_with("</testsuites")
            }) {
                if let Some(rest) = line.trim_start().strip_prefix("<testsuite name=\"") {
                    let after = rest.split_once('"').map_or("", |(_, a)| a);
                    let _ = writeln!(
                        out,
                        "  <testsuite name=\"{}={}\"{after}",
                        xml(&self.input),
                        xml(&c.reference)
                    );
                } else {
                    let _ = writeln!(out, "{line}");
                }
            }
        }
        out.push_str("</testsuites>\n");
        out
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{PackageStatus, RunState};

    fn report(id: &str, varies: PackageStatus) -> Report {
        let p = |attr: &str, status| PackageReport {
            attr: attr.into(),
            status,
            ..Default::default()
        };
        Report::new(
            id.into(),
            RunState::Finished,
            "l".into(),
            String::new(),
            vec![p("same", PackageStatus::Ready), p("varies", varies)],
        )
    }

    #[test]
    fn what_differs_between_cells_is_marked() {
        let m = Matrix {
            input: "nixpkgs".into(),
            cells: vec![
                MatrixCell {
                    reference: "github:NixOS/nixpkgs/nixos-24.05".into(),
                    report: report("r1", PackageStatus::Ready),
                },
                MatrixCell {
                    reference: "github:NixOS/nixpkgs/nixos-unstable".into(),
                    report: report("r2", PackageStatus::BuildFailed),
                },
            ],
        };
        assert!(m.differs("varies") && !m.differs("same"));
        assert_eq!(m.min_percent(), 50.0);
        let v: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(v["packages"][1]["cells"][1]["status"], "build-failed");
        assert_eq!(v["packages"][1]["differs"], true);
        let t = m.to_table(Some(80));
        assert!(t.lines().all(|l| crate::fit::width(l) <= 80), "{t}");
        assert!(
            t.lines()
                .any(|l| l.starts_with("varies") && l.ends_with('*')),
            "{t}"
        );
        assert!(
            m.to_markdown()
                .contains("| `varies` | ready | build-failed | **yes** |")
        );
        let j = m.to_junit();
        assert_eq!(j.matches("<testsuite name=\"nixpkgs=").count(), 2, "{j}");
        // Each annotation says which value of the input it is of.
        let g = m.to_github();
        assert!(
            g.contains("::error title=nixfarm [nixpkgs=github%3ANixOS/nixpkgs/nixos-unstable]%3A varies build-failed::"),
            "{g}"
        );
        assert!(
            g.contains("::notice title=nixfarm [nixpkgs=github%3ANixOS/nixpkgs/nixos-24.05] readiness::Ready: 2/2"),
            "{g}"
        );
    }
}
