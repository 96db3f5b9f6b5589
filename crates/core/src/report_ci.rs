//! The report where CI shows it: GitHub workflow annotations that put each package that is
//! not ready on the line of the repository that needs the change (the hash binding to fill
//! in, else the package's definition).

use crate::report::{PackageReport, Report};
use crate::status::PackageStatus;
use std::fmt::Write as _;

/// Where a package's problem is in the repository: its first hash fix, else its position
/// when that is a repository-relative `file:line`.
pub fn place(p: &PackageReport) -> Option<(String, usize)> {
    if let Some(f) = p.hash_fixes.first() {
        return Some((f.file.clone(), f.line));
    }
    let (file, line) = p.position.rsplit_once(':')?;
    let line: usize = line.parse().ok()?;
    // An absolute path is a store path or another input's: not a file of the pull request.
    if file.is_empty() || file.starts_with('/') || file.split('/').any(|c| c == "..") {
        return None;
    }
    Some((file.to_string(), line))
}

/// A workflow command's message: `%`, CR and LF escaped.
fn data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// A workflow command's property value: also `:` and `,`.
fn prop(s: &str) -> String {
    data(s).replace(':', "%3A").replace(',', "%2C")
}

impl Report {
    /// GitHub workflow commands: one annotation per package that is not ready (an error for
    /// failures and missing hashes, a warning for unpinned and not-cached), one per hash fix
    /// with the new value, and a notice with the totals.
    pub fn to_github(&self) -> String {
        self.to_github_for(None)
    }

    /// [`Report::to_github`] of one cell of a matrix (`nixpkgs=github:…`): every title
    /// names it, so an annotation says which input value it is of.
    pub fn to_github_for(&self, cell: Option<&str>) -> String {
        let nixfarm = match cell {
            Some(c) => format!("nixfarm [{c}]"),
            None => "nixfarm".to_string(),
        };
        let mut out = String::new();
        for p in &self.packages {
            let level = match p.status {
                PackageStatus::Ready | PackageStatus::Pending => continue,
                PackageStatus::Unpinned | PackageStatus::NotCached => "warning",
                _ => "error",
            };
            let title = format!("{nixfarm}: {} {}", p.attr, p.status);
            if !p.hash_fixes.is_empty() {
                for f in &p.hash_fixes {
                    let _ = writeln!(
                        out,
                        "::{level} file={},line={},title={}::{}",
                        prop(&f.file),
                        f.line,
                        prop(&title),
                        data(&format!(
                            "{} should be \"{}\" (it is {}); nixfarm local --fix-hashes --apply writes it",
                            f.attribute,
                            f.new,
                            f.was()
                        ))
                    );
                }
                continue;
            }
            let at = match place(p) {
                Some((file, line)) => format!("file={},line={line},", prop(&file)),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "::{level} {at}title={}::{}",
                prop(&title),
                data(&p.reason)
            );
        }
        for c in self.repository.iter().filter(|c| !c.ok) {
            let _ = writeln!(
                out,
                "::error title={}::{}",
                prop(&format!("{nixfarm}: repository {}", c.name)),
                data(&c.message)
            );
        }
        if let Some(why) = self.run_unfinished() {
            let _ = writeln!(
                out,
                "::error title={}::{}",
                prop(&format!("{nixfarm}: run {}", self.run_id)),
                data(&why)
            );
        }
        let _ = writeln!(
            out,
            "::notice title={}::{}",
            prop(&format!("{nixfarm} readiness")),
            data(&self.summary_line())
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::HashFix;
    use crate::status::RunState;

    #[test]
    fn annotations_point_at_the_line_to_change() {
        let fix = PackageReport {
            attr: "rsky".into(),
            status: PackageStatus::NeedsHash,
            reason: "hash mismatch".into(),
            position: "pkgs/rsky.nix:3".into(),
            hash_fixes: vec![HashFix {
                file: "pkgs/rsky.nix".into(),
                line: 9,
                attribute: "hash".into(),
                old: crate::Sri::parse("sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
                    .unwrap(),
                new: crate::Sri::parse("sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=")
                    .unwrap(),
                written: "\"sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"".into(),
            }],
            ..Default::default()
        };
        // Nix calls an empty hash the all-zero one; the annotation says what the file has.
        let empty = PackageReport {
            attr: "empty".into(),
            status: PackageStatus::NeedsHash,
            hash_fixes: vec![HashFix {
                file: "pkgs/empty.nix".into(),
                line: 4,
                attribute: "vendorHash".into(),
                old: crate::Sri::parse("sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
                    .unwrap(),
                new: crate::Sri::parse("sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=")
                    .unwrap(),
                written: "\"\"".into(),
            }],
            ..Default::default()
        };
        let failed = PackageReport {
            attr: "ozone".into(),
            status: PackageStatus::BuildFailed,
            reason: "exit 1\nsecond: line, 100%".into(),
            position: "pkgs/ozone.nix:12".into(),
            ..Default::default()
        };
        let remote = PackageReport {
            attr: "x".into(),
            status: PackageStatus::EvalFailed,
            reason: "throw".into(),
            position: "/nix/store/abc-source/x.nix:1".into(),
            ..Default::default()
        };
        let ok = PackageReport {
            attr: "fine".into(),
            status: PackageStatus::Ready,
            ..Default::default()
        };
        let r = Report::new(
            "r".into(),
            RunState::Finished,
            "l".into(),
            String::new(),
            vec![fix, empty, failed, remote, ok],
        );
        let g = r.to_github();
        let lines: Vec<&str> = g.lines().collect();
        assert!(lines.contains(
            &"::error file=pkgs/ozone.nix,line=12,title=nixfarm%3A ozone build-failed::exit 1%0Asecond: line, 100%25"
        ), "{g}");
        assert!(lines.contains(
            &"::error file=pkgs/rsky.nix,line=9,title=nixfarm%3A rsky needs-hash::hash should be \"sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=\" (it is sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=); nixfarm local --fix-hashes --apply writes it"
        ), "{g}");
        assert!(lines.contains(
            &"::error file=pkgs/empty.nix,line=4,title=nixfarm%3A empty needs-hash::vendorHash should be \"sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=\" (it is \"\"); nixfarm local --fix-hashes --apply writes it"
        ), "{g}");
        assert!(
            lines.contains(&"::error title=nixfarm%3A x eval-failed::throw"),
            "{g}"
        );
        assert!(!g.contains("fine"));
        assert!(
            lines
                .last()
                .unwrap()
                .starts_with("::notice title=nixfarm readiness::Ready: 1/5")
        );
    }
}
