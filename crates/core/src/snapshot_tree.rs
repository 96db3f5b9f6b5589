//! A snapshot's whole-tree rules: no duplicate paths, nothing beneath a file or a link, and
//! every link resolving inside the tree without stepping through another link.

use super::{Kind, SnapshotError, shown};
use std::path::{Component, Path, PathBuf};

/// The whole-tree rules, which no entry-by-entry check can see: entries that come later may
/// replace or redirect what earlier ones created.
///
/// The paths are put in a tree first, one node per path (listed or implied), so each check
/// walks a path a component at a time: it costs what the path's bytes are, where hashing
/// each of its prefixes whole cost their square (thousands of deep entries or long link
/// targets were minutes of work).
pub(super) fn check_tree(
    entries: &[(PathBuf, Kind, Option<PathBuf>)],
) -> Result<(), SnapshotError> {
    use std::ffi::OsStr;
    // Node 0 is the root; a node's kind is None while it is only implied (a directory).
    let mut children: std::collections::HashMap<(u32, &OsStr), u32> =
        std::collections::HashMap::with_capacity(entries.len());
    let mut kinds: Vec<Option<Kind>> = vec![Some(Kind::Dir)];
    // Each entry's path as nodes, the entry's own last.
    let mut chains: Vec<Vec<u32>> = Vec::with_capacity(entries.len());
    for (p, k, _) in entries {
        let mut chain = Vec::new();
        let mut at = 0u32;
        for c in p.components() {
            let next =
                u32::try_from(kinds.len()).map_err(|_| SnapshotError::UnsafePath(shown(p)))?;
            at = *children.entry((at, c.as_os_str())).or_insert_with(|| {
                kinds.push(None);
                next
            });
            chain.push(at);
        }
        if kinds[at as usize].replace(*k).is_some() {
            return Err(SnapshotError::Duplicate(shown(p)));
        }
        chains.push(chain);
    }
    for ((p, _, target), chain) in entries.iter().zip(&chains) {
        // Every ancestor is a real directory (listed as one, or implied); the nearest
        // offender is named.
        let ancestors = &chain[..chain.len().saturating_sub(1)];
        for &anc in ancestors.iter().rev() {
            match kinds[anc as usize] {
                Some(Kind::Link) => return Err(SnapshotError::ThroughLink(shown(p))),
                Some(Kind::File) => return Err(SnapshotError::BeneathFile(shown(p))),
                _ => {}
            }
        }
        if let Some(t) = target {
            check_link_target(p, t, ancestors, &children, &kinds)?;
        }
    }
    Ok(())
}

/// A link is safe when its target, walked from the link's own (real) directory, stays inside
/// the tree and steps through no other link: a link's `..` is its target's parent, not the
/// lexical one. The last component may itself be a link (it is checked on its own).
/// `dir` is the link's directory as nodes of the tree (see [`check_tree`]).
fn check_link_target<'a>(
    link: &Path,
    target: &'a Path,
    dir: &[u32],
    children: &std::collections::HashMap<(u32, &'a std::ffi::OsStr), u32>,
    kinds: &[Option<Kind>],
) -> Result<(), SnapshotError> {
    let bad = || SnapshotError::UnsafeLink(shown(link));
    if target.is_absolute() {
        return Err(bad());
    }
    // Where the walk is, as nodes from the root's child down; None: a path the tree does
    // not have (beneath it there is nothing either, until a `..` climbs back out).
    let mut cur: Vec<Option<u32>> = dir.iter().map(|&n| Some(n)).collect();
    let comps: Vec<Component<'_>> = target.components().collect();
    let last = comps.iter().rposition(|c| !matches!(c, Component::CurDir));
    for (i, c) in comps.iter().enumerate() {
        match c {
            Component::CurDir => continue,
            Component::ParentDir => {
                if cur.pop().is_none() {
                    return Err(bad());
                }
            }
            Component::Normal(n) => {
                let parent = cur.last().copied().unwrap_or(Some(0));
                cur.push(parent.and_then(|id| children.get(&(id, *n)).copied()));
            }
            _ => return Err(bad()),
        }
        let more = last.is_some_and(|l| l > i);
        if more
            && let Some(Some(id)) = cur.last()
            && kinds[*id as usize] == Some(Kind::Link)
        {
            return Err(bad());
        }
    }
    Ok(())
}
