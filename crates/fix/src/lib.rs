//! Locating fixed-output hashes in a repository's Nix files, rewriting them, and the unified
//! diff that carries the edits.
//!
//! Everything here is a pure text operation on an in-memory tree: the caller decides where
//! the tree comes from and whether the result is written anywhere.

mod lex;
pub mod locate;
pub mod report;

use nixfarm_nix::hash::Sri;
use std::collections::{BTreeMap, BTreeSet};

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
    pub old: Sri,
    /// What is written between quotes: a hash, and nothing else can be.
    pub new: Sri,
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
}

/// Maps a `meta.position` to a path relative to the repository root, when that file is in
/// `tree`. Agents make a position in the run's own tree relative (`pkgs/a/b.nix:12`); one
/// still absolute is another input's (nixpkgs', say): never the repository's, even when a
/// file of the same name is there (a package overriding nixpkgs' `pkgs/tools/p/default.nix`
/// in a repository with a `pkgs/tools/p/default.nix` of its own, or a root `default.nix`,
/// would otherwise have its hash written into that file).
pub fn relative_position(position: &str, tree: &Tree) -> Option<String> {
    let file = match position.rsplit_once(':') {
        Some((f, l)) if l.chars().all(|c| c.is_ascii_digit()) => f,
        _ => position,
    };
    if file.starts_with('/') {
        return None;
    }
    let rel = file.trim_start_matches("./").to_string();
    tree.contains_key(&rel).then_some(rel)
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
    let scanned = Scanned::new(tree);
    // (file, start) → (fix, score, first fod) to detect conflicts.
    let mut places: BTreeMap<(String, usize), (Fix, u32, nixfarm_nix::StorePath)> = BTreeMap::new();
    let mut wanted: Vec<(String, (String, usize), Mismatch)> = Vec::new();
    // Places that fit several fetches of different contents equally well.
    let mut shared: BTreeSet<(String, usize)> = BTreeSet::new();
    let mut plan = Plan::default();
    for p in packages {
        for m in &p.mismatches {
            if m.specified == m.got {
                continue;
            }
            let found = locate_one(&scanned, p.own_file.as_deref(), m).and_then(|f| {
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
                            // Same place, different answers: keep the better fit. As good a
                            // fit is the same binding serving both: one value cannot do.
                            if score > *s {
                                shared.remove(&key);
                                places.insert(key.clone(), (fix, score, m.fod_drv.clone()));
                            } else if score == *s {
                                shared.insert(key.clone());
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
    let contents = |key: &(String, usize)| -> usize {
        wanted
            .iter()
            .filter(|(_, k, _)| k == key)
            .map(|(_, _, m)| &m.got)
            .collect::<BTreeSet<_>>()
            .len()
    };
    let shared: BTreeMap<(String, usize), usize> = shared
        .into_iter()
        .map(|k| (k.clone(), contents(&k)))
        .collect();
    for (attr, key, m) in wanted {
        let Some((fix, _, _)) = places.get(&key) else {
            continue;
        };
        if let Some(n) = shared.get(&key) {
            plan.unlocated.push(Unlocated {
                attr,
                why: format!(
                    "{}:{} ({} = {}) is the hash of {n} fetches with different contents (a binding they share, in a function that makes them, say): no one value fits them all, so none is written there; give each fetch its own hash (an argument of that function)",
                    fix.file,
                    fix.line,
                    fix.attribute,
                    nixfarm_core::fit::one_line(nixfarm_core::limits::clip(&fix.old_text, 80))
                ),
                mismatch: m,
            });
            continue;
        }
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

/// A tree's files, each read for hash bindings once per plan however many mismatches are
/// looked for in it (a tree of thousands of bindings, read again per mismatch, cost its size
/// times their number).
struct Scanned<'t> {
    tree: &'t Tree,
    read: std::cell::RefCell<std::collections::HashMap<&'t str, std::rc::Rc<Vec<Candidate>>>>,
}

impl<'t> Scanned<'t> {
    fn new(tree: &'t Tree) -> Scanned<'t> {
        Scanned {
            tree,
            read: Default::default(),
        }
    }

    /// [`locate::find`] in `file`, whose text is `text`.
    fn find(&self, file: &'t str, text: &str, m: &Mismatch, min_score: u32) -> Found {
        let cands = self
            .read
            .borrow_mut()
            .entry(file)
            .or_insert_with(|| std::rc::Rc::new(locate::candidates(text)))
            .clone();
        locate::find_among(&cands, m, min_score)
    }
}

fn locate_one(
    scanned: &Scanned<'_>,
    own: Option<&str>,
    m: &Mismatch,
) -> Result<(String, Candidate, u32), String> {
    let tree = scanned.tree;
    if let Some(own) = own
        && let Some((file, text)) = tree.get_key_value(own)
    {
        match scanned.find(file, text, m, 0) {
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
        match scanned.find(file, text, m, 8) {
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
        [] => by_name(scanned, own, m),
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

/// The first place (file, 1-based line) of the tree where `specified` is written as a
/// string literal, in any spelling Nix takes (SRI, `sha256:` with base-32 or hex, a bare
/// base-32 or hex digest).
fn written_as_is(tree: &Tree, specified: &Sri) -> Option<(String, usize)> {
    let h = nixfarm_core::hash::Hash::parse(specified, None)?;
    let hex: String = h.digest.iter().map(|b| format!("{b:02x}")).collect();
    let nix32 = nixfarm_core::hash::nix32_encode(&h.digest);
    let spellings = [specified.to_string(), nix32, hex];
    tree.iter()
        .filter(|(f, _)| f.ends_with(".nix"))
        .find_map(|(file, text)| {
            let at = spellings
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()?;
            Some((file.clone(), text[..at].matches('\n').count() + 1))
        })
}

/// Nothing corroborated a binding (no literal of the derivation beside it, and no position
/// for the package): the file that defines the derivation's name (a string literal that
/// begins it, such as the package's `pname` in `pname-deno-deps`) decides, when exactly one
/// such file holds a binding with the stated value. A tie is never guessed.
fn by_name(
    scanned: &Scanned<'_>,
    own: Option<&str>,
    m: &Mismatch,
) -> Result<(String, Candidate, u32), String> {
    let stems = name_stems(m.fod_name());
    let mut named: Vec<(String, Candidate, u32)> = Vec::new();
    for (file, text) in scanned.tree {
        if !file.ends_with(".nix") || !stems.iter().any(|s| text.contains(&format!("\"{s}\""))) {
            continue;
        }
        match scanned.find(file, text, m, 0) {
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
        [] => Err(match written_as_is(scanned.tree, &m.specified) {
            // There, but not as a binding the fixer knows for a hash: said where.
            Some((file, line)) => format!(
                "{file}:{line} holds the value {}, but not as a hash binding the fixer edits (an attribute named hash, sha256 or ...Hash, beside a literal of the fetch such as its rev or url): fill it in there by hand",
                m.specified
            ),
            None => format!(
                "no binding with the value {} found{}",
                m.specified,
                own.map(|o| format!(" in {o} or elsewhere in the repository"))
                    .unwrap_or_default()
            ),
        }),
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
#[path = "lib_tests.rs"]
mod tests;
