//! Hash-fixing sessions: a run submitted as a stage of another (the session's first, its
//! root) is checked to be one before it is taken, and the root's report reads over its
//! stages, so the id a session prints shows what the session came to.
//!
//! A stage is what the CLI submits once a package's hashes are filled in: the root's
//! settings, some of its packages, and its snapshot with nothing changed but hash values,
//! each now one the session's runs got. Anything else (another tree, another cache, a
//! package the root does not have) is refused: a stage speaks in the root's name.

use super::*;
use crate::model::SourceSpec;
use std::io::Read as _;
use std::path::Path;

/// Largest text file of a snapshot compared for hash edits (bytes); a larger one must be
/// byte for byte the root's.
const MAX_EDITED_FILE: u64 = 4 << 20;

/// Longest value a hash edit replaces (`lib.fakeSha256`, a stale literal), bytes.
const MAX_OLD_VALUE: usize = 200;

impl Engine {
    /// Refuses `spec` as a stage of run `root` unless it is one (see the module's doc).
    pub(super) fn check_stage(&self, root: &str, spec: &RunSpec) -> Result<(), EngineError> {
        let invalid = |why: String| Err(EngineError::Invalid(why));
        let (root_spec, packages, stages) = {
            let g = self.lock();
            let Some(row) = g.db.run(root)? else {
                return invalid(format!("no run {root} to be a stage of"));
            };
            if g.db.root_of(root)?.is_some() {
                return invalid(format!(
                    "run {root} is itself a stage of another run: name the session's first"
                ));
            }
            let root_spec: RunSpec = serde_json::from_str(&row.spec).map_err(|e| {
                EngineError::Invalid(format!("run {root}'s settings cannot be read: {e}"))
            })?;
            let packages: HashSet<String> =
                g.db.packages(root)?.into_iter().map(|(a, _)| a).collect();
            (root_spec, packages, g.db.stages(root)?)
        };
        if stages.len() + 1 >= nixfarm_core::limits::MAX_FIX_ROUNDS {
            return invalid(format!(
                "run {root} has {} stages already, the most a session may have",
                stages.len()
            ));
        }
        let same = [
            ("attribute path", root_spec.attr_path == spec.attr_path),
            ("label", root_spec.label == spec.label),
            ("cache", root_spec.cache == spec.cache),
            (
                "trusted public keys",
                root_spec.trusted_public_keys == spec.trusted_public_keys,
            ),
            ("timeout", root_spec.timeout_secs == spec.timeout_secs),
            (
                "max-silent time",
                root_spec.max_silent_secs == spec.max_silent_secs,
            ),
            ("skip-cached", root_spec.skip_cached == spec.skip_cached),
            ("smoke tests", root_spec.smoke == spec.smoke),
            (
                "cross-checked builds",
                root_spec.cross_check_builds == spec.cross_check_builds,
            ),
            (
                "Nix file, its arguments and overrides",
                root_spec.entry == spec.entry,
            ),
        ];
        if let Some((what, _)) = same.iter().find(|(_, same)| !same) {
            return invalid(format!(
                "a stage of run {root} runs with its settings: its {what} differs"
            ));
        }
        if spec.attrs.is_empty() || !spec.skip_listing {
            return invalid(format!(
                "a stage of run {root} names the packages it goes on with"
            ));
        }
        if let Some(a) = spec.attrs.iter().find(|a| !packages.contains(*a)) {
            return invalid(format!(
                "{} is no package of run {root}",
                nixfarm_core::limits::clip(a, 100)
            ));
        }
        let (SourceSpec::Snapshot(was), SourceSpec::Snapshot(now)) =
            (&root_spec.source, &spec.source)
        else {
            return invalid(format!(
                "a stage of run {root} is an uploaded snapshot, as its first run is"
            ));
        };
        // The values a stage may write: what the session's runs got.
        let mut got = HashSet::new();
        for run in std::iter::once(root.to_string()).chain(stages) {
            for p in self.report(&run)?.packages {
                got.extend(p.hash_mismatches.into_iter().map(|m| m.got.to_string()));
            }
        }
        let tar = |d: &str| self.sources_dir.join(format!("{d}.tar"));
        only_hashes_filled(&tar(was), &tar(now), &got).or_else(|why| {
            invalid(format!(
                "a stage of run {root} changes its snapshot only by hashes its runs got: {why}"
            ))
        })
    }

    /// `report` (run `root`'s own) read over `stages`, in order: each package as the
    /// latest of them that ran it, with every hash fix found for it on the way; the state
    /// of the session (a stage still going on, one that failed or was cancelled).
    pub(super) fn over_stages(
        &self,
        root: Report,
        stages: &[String],
    ) -> Result<Report, EngineError> {
        let mut rounds = vec![root.run_id.clone()];
        // A session whose first run failed as a whole went no further.
        if root.state == RunState::Failed {
            let mut root = root;
            root.fix_rounds = rounds;
            return Ok(root);
        }
        let mut packages: BTreeMap<String, PackageReport> = root
            .packages
            .iter()
            .map(|p| (p.attr.clone(), p.clone()))
            .collect();
        let (mut state, mut error) = (root.state, root.error.clone());
        for id in stages {
            let stage = self.report_alone_with_fixes(id)?;
            rounds.push(id.clone());
            for p in stage.packages {
                let mut fixes = packages
                    .get(&p.attr)
                    .map(|was| was.hash_fixes.clone())
                    .unwrap_or_default();
                // A place filled in again later (a value corrected) shows its last value,
                // from what the file had first.
                for f in &p.hash_fixes {
                    match fixes
                        .iter_mut()
                        .find(|k| k.file == f.file && k.line == f.line)
                    {
                        Some(k) => {
                            k.new = f.new.clone();
                        }
                        None => fixes.push(f.clone()),
                    }
                }
                // A stage's row stands for its package only once it came to something: a
                // stage cancelled, or not built yet, leaves the row before it.
                if matches!(p.status, PackageStatus::Pending | PackageStatus::Cancelled)
                    && packages.contains_key(&p.attr)
                {
                    continue;
                }
                let mut p = p;
                p.hash_fixes = fixes;
                if p.status == PackageStatus::Ready && !p.hash_fixes.is_empty() {
                    p.reason = format!(
                        "builds with {} filled-in hash(es) (see hash_fixes)",
                        p.hash_fixes.len()
                    );
                }
                packages.insert(p.attr.clone(), p);
            }
            // Going on beats ended; of ended ones, failed beats finished. A cancelled stage
            // left its rows as they were (above), and so the session's state.
            let rank = |s: RunState| match s {
                s if !s.is_terminal() => 3,
                RunState::Failed => 2,
                RunState::Cancelled => 0,
                _ => 0,
            };
            if rank(stage.state) > rank(state) {
                state = stage.state;
                error = stage.error.clone();
            }
        }
        let mut report = Report::new(
            root.run_id,
            state,
            root.label,
            error,
            packages.into_values().collect(),
        );
        report.repository = root.repository;
        report.fix_rounds = rounds;
        Ok(report)
    }
}

/// Whether the snapshot `now` is `was` with nothing changed but hash values set to one of
/// `got` (quoted): the same entries, kinds, modes and links, every file the same bytes but
/// text files where a value (a string literal, or a fake-hash name such as `lib.fakeHash`)
/// became a quoted hash of `got`. Why not, when not.
pub(crate) fn only_hashes_filled(
    was: &Path,
    now: &Path,
    got: &HashSet<String>,
) -> Result<(), String> {
    let was = entries(was).map_err(|e| format!("cannot read the first run's snapshot: {e}"))?;
    let now = entries(now).map_err(|e| format!("cannot read the snapshot: {e}"))?;
    let names = |m: &BTreeMap<String, Entry>| m.keys().cloned().collect::<Vec<_>>();
    if names(&was) != names(&now) {
        let diff = was
            .keys()
            .filter(|k| !now.contains_key(*k))
            .chain(now.keys().filter(|k| !was.contains_key(*k)))
            .next()
            .cloned()
            .unwrap_or_default();
        return Err(format!(
            "{} is in one and not the other",
            nixfarm_core::limits::clip(&diff, 200)
        ));
    }
    for (name, a) in &was {
        let Some(b) = now.get(name) else {
            continue;
        };
        let name = nixfarm_core::limits::clip(name, 200);
        if (a.kind, a.mode, &a.link) != (b.kind, b.mode, &b.link) {
            return Err(format!(
                "{name} is another kind of entry, or has another mode"
            ));
        }
        if a.digest == b.digest {
            continue;
        }
        let edited = match (&a.text, &b.text) {
            (Some(x), Some(y)) => hash_edits_only(x, y, got),
            _ => false,
        };
        if !edited {
            return Err(format!("{name} differs by more than hash values"));
        }
    }
    Ok(())
}

/// One entry of a snapshot: what is compared.
struct Entry {
    kind: u8,
    mode: u32,
    link: Option<Vec<u8>>,
    /// Of the content and the name's exact bytes.
    digest: [u8; 32],
    /// The text of a UTF-8 file of at most [`MAX_EDITED_FILE`] bytes.
    text: Option<String>,
}

/// A snapshot's entries by name (it was checked against the limits when it was uploaded).
fn entries(tar: &Path) -> std::io::Result<BTreeMap<String, Entry>> {
    use sha2::Digest as _;
    let mut out = BTreeMap::new();
    let mut archive = tar::Archive::new(std::fs::File::open(tar)?);
    for entry in archive.entries()? {
        let mut entry = entry?;
        // Names as bytes, as the upload's check reads them (`./x` is `x`); one name twice
        // could hide a file behind another.
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(raw.strip_prefix(b"./").unwrap_or(&raw))
            .trim_end_matches('/')
            .to_string();
        let header = entry.header();
        let (kind, mode) = (header.entry_type().as_byte(), header.mode()?);
        // The size the entry really has (a PAX header may say another than the plain one).
        let size = entry.size();
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        let mut hasher = sha2::Sha256::new();
        let mut text = None;
        if size <= MAX_EDITED_FILE {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            hasher.update(&bytes);
            text = String::from_utf8(bytes).ok();
        } else {
            std::io::copy(&mut entry, &mut hasher)?;
        }
        hasher.update(&raw);
        let e = Entry {
            kind,
            mode,
            link,
            digest: hasher.finalize().into(),
            text,
        };
        if out.insert(name.clone(), e).is_some() {
            return Err(std::io::Error::other(format!(
                "{} is in it twice",
                nixfarm_core::limits::clip(&name, 200)
            )));
        }
    }
    Ok(out)
}

/// Whether `new` is `old` with some values (a string literal, or a name of a fake hash:
/// `lib.fakeHash`) replaced by quoted hashes of `got`, and nothing else changed.
pub(crate) fn hash_edits_only(old: &str, new: &str, got: &HashSet<String>) -> bool {
    let mut spots: Vec<(usize, usize)> = got
        .iter()
        .flat_map(|h| {
            let quoted = format!("\"{h}\"");
            new.match_indices(&quoted)
                .map(|(i, q)| (i, i + q.len()))
                .collect::<Vec<_>>()
        })
        .collect();
    spots.sort_unstable();
    spots.dedup_by_key(|s| s.0);
    let (mut o, mut n) = (0, 0);
    for (start, end) in spots {
        if start < n {
            return false;
        }
        let same = &new[n..start];
        if !old[o..].starts_with(same) {
            return false;
        }
        o += same.len();
        let Some(len) = value_len(&old[o..]) else {
            return false;
        };
        o += len;
        n = end;
    }
    old[o..] == new[n..]
}

/// The length of the value `s` starts with that a hash fix may replace: a string literal
/// that is empty or a hash in any spelling Nix takes (what the fixer replaces: `""`, a
/// stale hash), or a name that is a fake hash (`lib.fakeHash`, `pkgs.lib.fakeSha256`).
/// No other string (a URL, a builder) can become a hash in a stage.
fn value_len(s: &str) -> Option<usize> {
    if let Some(rest) = s.strip_prefix('"') {
        let end = rest.find(['"', '\\', '$', '\n'])?;
        let text = &rest[..end];
        let hashy = text.is_empty() || nixfarm_core::hash::Hash::parse(text, None).is_some();
        return (rest[end..].starts_with('"') && end + 2 <= MAX_OLD_VALUE && hashy)
            .then_some(end + 2);
    }
    // A name of identifiers joined by dots whose last is a fake hash's: nothing else (a
    // `''` that closes a string, say) is taken for one.
    let len = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.')))
        .unwrap_or(s.len());
    let name = &s[..len];
    let parts_ok = name.split('.').all(|p| {
        p.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
    });
    let fake = matches!(
        name.rsplit('.').next(),
        Some("fakeHash" | "fakeSha256" | "fakeSha512" | "fakeSha1")
    );
    (len <= MAX_OLD_VALUE && parts_ok && fake).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=";
    const B: &str = "sha256-jw7+guB6otkQxOFby0tTP00dfpRRmo/Vo7hZ5rmsG8E=";

    #[test]
    fn only_hash_values_may_change_and_only_to_what_was_got() {
        let got: HashSet<String> = [A.to_string(), B.to_string()].into();
        let old = "{ lib }: {\n  src = fetch { url = \"u\"; hash = lib.fakeHash; };\n  deps = \"\";\n  other = \"sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\";\n}\n";
        let new = old
            .replace("lib.fakeHash", &format!("\"{A}\""))
            .replace("deps = \"\"", &format!("deps = \"{B}\""));
        assert!(hash_edits_only(old, &new, &got));
        // Nothing changed at all; a value already one of them and left.
        assert!(hash_edits_only(old, old, &got));
        assert!(hash_edits_only(&new, &new, &got));
        // A hash nobody got.
        let other = old.replace(
            "lib.fakeHash",
            "\"sha256-zqC7zKYlRoICNsJufack/zUb7YKR6eyLXhdeNfMqdxw=\"",
        );
        assert!(!hash_edits_only(old, &other, &got));
        // Code changed beside a hash.
        let code = new.replace("url = \"u\"", "url = \"evil\"");
        assert!(!hash_edits_only(old, &code, &got));
        // Quotes that close one string and open the next are no value: the text between
        // them (code) cannot be cut out for a hash; nor can a `''` after a "fake" word.
        let script = "{ check = ''\n  echo \"ok\"; exit 1; echo \"done\"\n''; }";
        let cut = script.replace("\"; exit 1; echo \"", &format!("\"{A}\""));
        assert!(!hash_edits_only(script, &cut, &got));
        let indented = "{ a = ''run --fake''; b = 1; }";
        let closed = indented.replace("fake''", &format!("\"{A}\""));
        assert!(!hash_edits_only(indented, &closed, &got));
        // pkgs.lib.fakeSha256 is a fake hash's name.
        let long = "{ sha256 = pkgs.lib.fakeSha256; }";
        let filled = long.replace("pkgs.lib.fakeSha256", &format!("\"{A}\""));
        assert!(hash_edits_only(long, &filled, &got));
        // A string that is no hash (a URL) made one.
        let url = old.replace("url = \"u\"", &format!("url = \"{A}\""));
        assert!(!hash_edits_only(old, &url, &got));
        // An expression that is no fake hash made a hash.
        let expr = "{ x = builtins.readFile ./h; }";
        assert!(!hash_edits_only(expr, &format!("{{ x = \"{A}\"; }}"), &got));
        // A string with an interpolation is no plain value.
        let interp = "{ x = \"${y}\"; }";
        assert!(!hash_edits_only(
            interp,
            &format!("{{ x = \"{A}\"; }}"),
            &got
        ));
        // Text added after a hash.
        assert!(!hash_edits_only(old, &format!("{new}# more\n"), &got));
    }

    /// Snapshots as the CLI packs them: a stage's may differ from its first run's only in
    /// hash values, whatever else of the tree it carries.
    #[test]
    fn a_stages_snapshot_is_its_first_runs_with_hashes_filled_in() {
        let d = tempfile::tempdir().unwrap();
        let got: HashSet<String> = [A.to_string()].into();
        let snapshot = |name: &str, files: &[(&str, &str)], exec: bool| {
            let root = d.path().join(name);
            for (f, text) in files {
                let p = root.join(f);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, text).unwrap();
                if exec && f.ends_with(".sh") {
                    use std::os::unix::fs::PermissionsExt as _;
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
                }
            }
            let list: Vec<std::path::PathBuf> = files.iter().map(|(f, _)| f.into()).collect();
            let tar = d.path().join(format!("{name}.tar"));
            std::fs::write(
                &tar,
                nixfarm_core::snapshot::pack(&root, &list, Default::default()).unwrap(),
            )
            .unwrap();
            tar
        };
        let nix = "{ hash = lib.fakeHash; }\n";
        let fixed = format!("{{ hash = \"{A}\"; }}\n");
        let was = snapshot("was", &[("a.nix", nix), ("b.sh", "echo\n")], false);
        let ok = snapshot("ok", &[("a.nix", &fixed), ("b.sh", "echo\n")], false);
        assert_eq!(only_hashes_filled(&was, &ok, &got), Ok(()));
        let code = snapshot("code", &[("a.nix", nix), ("b.sh", "rm -rf /\n")], false);
        let e = only_hashes_filled(&was, &code, &got).unwrap_err();
        assert!(e.contains("b.sh differs by more than hash values"), "{e}");
        let added = snapshot(
            "added",
            &[("a.nix", &fixed), ("b.sh", "echo\n"), ("c.nix", "{ }")],
            false,
        );
        let e = only_hashes_filled(&was, &added, &got).unwrap_err();
        assert!(e.contains("c.nix is in one and not the other"), "{e}");
        let mode = snapshot("mode", &[("a.nix", &fixed), ("b.sh", "echo\n")], true);
        let e = only_hashes_filled(&was, &mode, &got).unwrap_err();
        assert!(
            e.contains("b.sh is another kind of entry, or has another mode"),
            "{e}"
        );
    }
}
