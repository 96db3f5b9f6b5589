//! What a run builds: a snapshot of a local checkout, as what evaluates it reads the
//! checkout (uncommitted changes included; of a git flake only the files git tracks, as Nix
//! reads one), or a flake reference agents fetch.

use crate::{Client, status_error};
use anyhow::{Context, bail};
use nixfarm_core::{flakeref, snapshot};
use nixfarm_proto::v1 as pb;
use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

/// What the user named.
pub enum Named {
    Dir(PathBuf),
    FlakeRef(String),
}

/// Decides whether `s` is a local flake directory or a flake reference, with a clear error
/// for anything else.
pub fn check_local_or_ref(s: &str) -> anyhow::Result<Named> {
    let p = Path::new(s);
    if p.exists() {
        let dir = p
            .canonicalize()
            .with_context(|| format!("cannot read {s}"))?;
        if !dir.is_dir() {
            bail!("{s} is not a directory: point nixfarm at the directory holding flake.nix");
        }
        if std::fs::read_dir(&dir).is_err() {
            bail!("cannot read directory {s}: permission denied");
        }
        // A flake, or a classic repository whose default.nix returns the packages.
        let Some(top) = ["flake.nix", "default.nix"]
            .into_iter()
            .find(|f| dir.join(f).is_file())
        else {
            bail!(
                "{s} is not a flake: it has no flake.nix (nor a default.nix, which --file would evaluate)"
            );
        };
        if let Err(e) = std::fs::File::open(dir.join(top)) {
            bail!("cannot read {}: {e}", dir.join(top).display());
        }
        return Ok(Named::Dir(dir));
    }
    let looks_like_ref = s.contains(':') && !s.starts_with('/') && !s.starts_with('.');
    if !looks_like_ref {
        bail!(
            "{s}: no such file or directory (and not a flake reference such as github:owner/repo)"
        );
    }
    flakeref::validate(s)?;
    Ok(Named::FlakeRef(s.to_string()))
}

/// `git -C dir ls-files -z` with `args` (its stderr kept).
fn git_ls_files(dir: &Path, args: &[&str]) -> std::io::Result<std::process::Output> {
    std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["ls-files", "-z"])
        .args(args)
        .stderr(std::process::Stdio::piped())
        .output()
}

/// The names in `git ls-files -z` output. Names are bytes: a name that is not UTF-8 is
/// carried exactly, never dropped.
fn git_names(stdout: &[u8]) -> impl Iterator<Item = PathBuf> + '_ {
    stdout
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| PathBuf::from(std::ffi::OsStr::from_bytes(s)))
}

/// Whether `dir` is in a git work tree (a `.git` in it or above it).
fn in_git_tree(dir: &Path) -> bool {
    dir.canonicalize()
        .is_ok_and(|d| d.ancestors().any(|a| a.join(".git").exists()))
}

/// The files of a checkout, relative to it: git's view when it is a git work tree.
pub fn list_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let git = git_ls_files(dir, &["--cached", "--others", "--exclude-standard"]);
    // A git checkout is read as git sees it (what it ignores stays home: .env, secrets);
    // if git cannot say, nothing is sent rather than every file.
    if in_git_tree(dir) && !git.as_ref().is_ok_and(|o| o.status.success()) {
        let why = match &git {
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => format!("cannot run git: {e}"),
        };
        anyhow::bail!(
            "{} is a git checkout, but git cannot list its files, so nothing is sent (files git ignores would go too): {}",
            dir.display(),
            nixfarm_core::fit::one_line(nixfarm_core::limits::clip(&why, 500))
        );
    }
    if let Ok(out) = git
        && out.status.success()
    {
        let files = git_names(&out.stdout)
            // Deleted but not yet committed: not part of the working tree.
            .filter(|p| dir.join(p).symlink_metadata().is_ok())
            .collect();
        return Ok(files);
    }
    let mut out = Vec::new();
    walk(dir, Path::new(""), &mut out)?;
    Ok(out)
}

/// What evaluates a checkout, so what of it a run sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// Nix reading a flake: of a git work tree, only the files git tracks (added ones too,
    /// as they are now): a file never `git add`ed is not there, for `nix build` on this
    /// checkout nor for anyone who clones it.
    Flake,
    /// A Nix file read as `nix-build` reads it: every file but those git ignores.
    File,
}

/// The files a snapshot of `dir` holds, and what was left out.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub files: Vec<PathBuf>,
    /// Links git does not track that point out of the tree (a `nix build` result link git
    /// does not ignore: `result` → /nix/store/…), which no snapshot may hold and no
    /// tracked file can mean.
    pub links_out: Vec<PathBuf>,
    /// Of a git flake, the files git does not track (nor ignore).
    pub untracked: Vec<PathBuf>,
}

/// The files a snapshot of `dir` holds: [`list_files`], less, in a git work tree, what
/// git does not track of a flake, and the links out of the tree that git does not track.
/// A tracked link out stays, for the snapshot to refuse by name, and so does every such
/// link of a tree that is not git's (its top-level `result` links aside, which
/// [`list_files`] leaves out): nothing there tells a build's link from the repository's
/// own.
pub fn snapshot_files(dir: &Path, reader: Reader) -> anyhow::Result<Snapshot> {
    let files = list_files(dir)?;
    let links_out = |rel: &PathBuf| {
        std::fs::read_link(dir.join(rel))
            .is_ok_and(|target| !snapshot::link_stays_inside(rel, &target))
    };
    if reader == Reader::File && !files.iter().any(links_out) {
        return Ok(Snapshot {
            files,
            ..Default::default()
        });
    }
    let untracked: std::collections::HashSet<PathBuf> =
        match git_ls_files(dir, &["--others", "--exclude-standard"]) {
            Ok(o) if o.status.success() => git_names(&o.stdout).collect(),
            // Not a git work tree (list_files refused one git cannot list).
            _ => {
                return Ok(Snapshot {
                    files,
                    ..Default::default()
                });
            }
        };
    let mut s = Snapshot::default();
    for f in files {
        if !untracked.contains(&f) {
            s.files.push(f);
        } else if links_out(&f) {
            s.links_out.push(f);
        } else if reader == Reader::Flake {
            s.untracked.push(f);
        } else {
            s.files.push(f);
        }
    }
    Ok(s)
}

/// "a, b, c and 4 more": the first few of `paths`.
fn first_few(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths
        .iter()
        .take(5)
        .map(|p| p.display().to_string())
        .collect();
    let more = match paths.len() {
        n if n > 5 => format!(" and {} more", n - 5),
        _ => String::new(),
    };
    format!("{}{more}", names.join(", "))
}

/// Why a checkout is larger than a snapshot may be: the limit and its largest files.
fn too_large(dir: &Path, files: &[PathBuf], limit: u64) -> String {
    let mut sizes: Vec<(u64, &PathBuf)> = files
        .iter()
        .filter_map(|f| {
            let m = std::fs::symlink_metadata(dir.join(f)).ok()?;
            m.is_file().then_some((m.len(), f))
        })
        .collect();
    sizes.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    let size = |b: u64| match b {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} bytes"),
    };
    let largest: Vec<String> = sizes
        .iter()
        .take(3)
        .map(|(n, f)| format!("{} ({})", f.display(), size(*n)))
        .collect();
    let in_git = in_git_tree(dir);
    format!(
        "cannot snapshot {}: its files come to more than the coordinator's limit of {} (largest: {}); {}",
        dir.display(),
        size(limit),
        largest.join(", "),
        if in_git {
            "files git does not ignore are sent too, so ignore build products in .gitignore"
        } else {
            "every file under it is sent (it is no git work tree, whose .gitignore would leave some out)"
        }
    )
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(root.join(rel))
        .with_context(|| format!("cannot read {}", root.join(rel).display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        let ft = entry.file_type()?;
        // `nix build`'s links (`result`, `result-dev`, …) at the top.
        let nix_result = ft.is_symlink() && {
            let n = name.as_encoded_bytes();
            n == b"result" || n.starts_with(b"result-")
        };
        if name == ".git" || (rel.as_os_str().is_empty() && (nix_result || name == ".nixfarm")) {
            continue;
        }
        let r = rel.join(&name);
        if ft.is_dir() {
            walk(root, &r, out)?;
        } else {
            out.push(r);
        }
    }
    Ok(())
}

/// The snapshot limits of the coordinator (an older one that cannot say: the defaults).
async fn server_limits(client: &Client) -> anyhow::Result<snapshot::Limits> {
    match client
        .raw()
        .get_limits(client.req(pb::GetLimitsRequest {}))
        .await
    {
        Ok(l) => {
            let l = l.into_inner();
            Ok(snapshot::Limits {
                max_bytes: l.snapshot_max_bytes,
                max_entries: usize::try_from(l.snapshot_max_files).unwrap_or(usize::MAX),
            })
        }
        Err(s) if s.code() == tonic::Code::Unimplemented => Ok(snapshot::Limits::default()),
        Err(s) => Err(status_error(s)).context("cannot ask the coordinator for its limits"),
    }
}

/// A run's label for a checkout: its path, the end of it when the path is very long.
fn label_of(dir: &Path) -> String {
    let full = dir.display().to_string();
    let max = nixfarm_core::limits::MAX_LABEL;
    if full.len() <= max {
        return full;
    }
    let mut start = full.len() - (max - 3);
    while !full.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &full[start..])
}

/// The Nix file a run of `dir` evaluates instead of its flake: `--file`, else `default.nix`
/// when there is no flake.nix; None for a flake.
pub fn entry_file(dir: &Path, file: Option<&str>) -> anyhow::Result<Option<String>> {
    match file {
        Some(f) => {
            nixfarm_core::entry::check_file(f).map_err(|e| anyhow::anyhow!("{e}"))?;
            if !dir.join(f).is_file() {
                bail!("--file {f}: no such file in {}", dir.display());
            }
            Ok(Some(f.to_string()))
        }
        None if !dir.join("flake.nix").is_file() && dir.join("default.nix").is_file() => {
            Ok(Some("default.nix".into()))
        }
        None => Ok(None),
    }
}

/// Where a snapshot of the checkout `dir` is taken from, and the flake's directory in it
/// (empty: the root). A git flake in a subdirectory of its repository is read with the
/// whole repository, as Nix reads `./sub` (`git+file:…?dir=sub`): its expressions may read
/// `../`, and paths in reports and patches are the repository's. Anything else is `dir`.
pub fn snapshot_root(dir: &Path, reader: Reader) -> anyhow::Result<(PathBuf, String)> {
    let alone = || Ok((dir.to_path_buf(), String::new()));
    if reader != Reader::Flake || !in_git_tree(dir) {
        return alone();
    }
    let Ok(out) = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "--show-toplevel", "--show-prefix"])
        .stderr(std::process::Stdio::null())
        .output()
    else {
        return alone();
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let (Some(top), prefix) = (lines.next(), lines.next().unwrap_or_default()) else {
        return alone();
    };
    let prefix = prefix.trim_end_matches('/');
    if !out.status.success() || prefix.is_empty() {
        return alone();
    }
    nixfarm_core::entry::check_flake_dir(prefix).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((PathBuf::from(top), prefix.to_string()))
}

/// Uploads a local checkout (or passes a flake reference through) and returns the run's
/// source, its label, and the flake's directory in the snapshot (see [`snapshot_root`]).
pub async fn prepare(
    client: &Client,
    s: &str,
    reader: Reader,
    overrides: &BTreeMap<PathBuf, Vec<u8>>,
) -> anyhow::Result<(pb::Source, String, String)> {
    match check_local_or_ref(s)? {
        Named::FlakeRef(f) => Ok((
            pb::Source {
                kind: Some(pb::source::Kind::FlakeRef(f.clone())),
            },
            f,
            String::new(),
        )),
        Named::Dir(named) => {
            let label = label_of(&named);
            let (dir, flake_dir) = snapshot_root(&named, reader)?;
            let Snapshot {
                files,
                links_out,
                untracked,
            } = snapshot_files(&dir, reader)?;
            // Said once per session: a fixing session's later stages upload edits only.
            if !links_out.is_empty() && overrides.is_empty() {
                note!(
                    "left out of the snapshot: {} (links git does not track that point out of the checkout, such as nix build's result)",
                    first_few(&links_out)
                );
            }
            // Without it nothing evaluates: said here, not as an agent's puzzle.
            if untracked
                .iter()
                .any(|f| *f == Path::new(&flake_dir).join("flake.nix"))
            {
                bail!(
                    "{}/flake.nix is not tracked by git, and Nix reads only tracked files of a git flake: `git add flake.nix` (and the files it reads)",
                    named.display()
                );
            }
            if !untracked.is_empty() && overrides.is_empty() {
                note!(
                    "left out of the snapshot: {} file(s) git does not track: {} (Nix reads only tracked files of a git flake; `git add` them to build with them)",
                    untracked.len(),
                    first_few(&untracked)
                );
            }
            let limits = server_limits(client).await?;
            let bytes = match snapshot::pack_with(&dir, &files, overrides, limits) {
                Ok(b) => b,
                Err(snapshot::SnapshotError::TooLarge { limit }) => {
                    bail!("{}", too_large(&dir, &files, limit))
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot snapshot {}", dir.display()));
                }
            };
            let chunks: Vec<pb::SourceChunk> = bytes
                .chunks(1 << 20)
                .map(|c| pb::SourceChunk { data: c.to_vec() })
                .collect();
            let resp = client
                .raw()
                .upload_source(client.req(tokio_stream::iter(chunks)))
                .await
                .map_err(status_error)
                .context("uploading the source snapshot failed")?
                .into_inner();
            // What runs is what the coordinator names: the snapshot sent, or nothing.
            let sent = snapshot::digest(&bytes);
            if resp.digest != sent || resp.size != bytes.len() as u64 {
                anyhow::bail!(
                    "the coordinator answered the upload with another snapshot ({} bytes, digest {}) than the one sent ({} bytes, digest {sent}); nothing was submitted",
                    resp.size,
                    nixfarm_core::fit::one_line(nixfarm_core::limits::clip(&resp.digest, 80)),
                    bytes.len()
                );
            }
            let whose = if flake_dir.is_empty() {
                String::new()
            } else {
                format!(" with its git repository, {}", dir.display())
            };
            note!(
                "uploaded {}{whose} ({} files, {} bytes)",
                named.display(),
                files.len(),
                resp.size
            );
            Ok((
                pb::Source {
                    kind: Some(pb::source::Kind::Snapshot(resp.digest)),
                },
                label,
                flake_dir,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_errors_for_bad_sources() {
        let e = check_local_or_ref("/definitely/not/here")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no such file or directory"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let e = check_local_or_ref(d.path().to_str().unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("is not a flake"), "{e}");
        let e = check_local_or_ref("github:only-owner")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a flake reference"), "{e}");
        assert!(matches!(
            check_local_or_ref("github:o/r").unwrap(),
            Named::FlakeRef(_)
        ));
    }

    #[test]
    fn a_very_long_path_makes_a_label_within_the_limit() {
        let long = PathBuf::from(format!("/{}", "d/".repeat(2000)));
        let l = label_of(&long);
        assert!(l.len() <= nixfarm_core::limits::MAX_LABEL, "{}", l.len());
        assert!(l.starts_with('…'));
        assert_eq!(label_of(Path::new("/src/x")), "/src/x");
    }

    /// A `nix build` result link git does not ignore would fail every snapshot (it points
    /// into /nix/store): it is left out. A tracked link out of the tree stays, for the
    /// snapshot to refuse by name.
    #[test]
    fn untracked_links_out_of_the_checkout_are_left_out_tracked_ones_refused() {
        let d = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| {
            let ok = std::process::Command::new("git")
                .arg("-C")
                .arg(d.path())
                .args(["-c", "user.email=t@t", "-c", "user.name=t"])
                .args(args)
                .status()
                .unwrap()
                .success();
            assert!(ok, "git {args:?}");
        };
        git(&["init", "-q"]);
        std::fs::write(d.path().join("flake.nix"), "{}").unwrap();
        std::fs::create_dir(d.path().join("pkgs")).unwrap();
        std::os::unix::fs::symlink("../flake.nix", d.path().join("pkgs/inside")).unwrap();
        git(&["add", "."]);
        let store = "/nix/store/00000000000000000000000000000000-x";
        std::os::unix::fs::symlink(store, d.path().join("result")).unwrap();
        std::os::unix::fs::symlink(store, d.path().join("pkgs/result-dev")).unwrap();
        let Snapshot {
            files,
            links_out: skipped,
            ..
        } = snapshot_files(d.path(), Reader::Flake).unwrap();
        let names = |v: &[PathBuf]| {
            let mut n: Vec<String> = v.iter().map(|p| p.display().to_string()).collect();
            n.sort();
            n
        };
        assert_eq!(names(&files), ["flake.nix", "pkgs/inside"]);
        assert_eq!(names(&skipped), ["pkgs/result-dev", "result"]);
        snapshot::pack(d.path(), &files, snapshot::Limits::default()).unwrap();
        // Tracked, the same link is the checkout's own: refused by name, not dropped.
        std::os::unix::fs::symlink("/etc", d.path().join("etc")).unwrap();
        git(&["add", "etc"]);
        let files = snapshot_files(d.path(), Reader::Flake).unwrap().files;
        assert!(files.iter().any(|f| f == Path::new("etc")));
        let e = snapshot::pack(d.path(), &files, snapshot::Limits::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("'etc' is a link that points outside"),
            "{e}"
        );
        // No git: nothing tells a build's link from the tree's own, so only the top-level
        // result links are left out; any other link out is refused by name.
        std::fs::remove_dir_all(d.path().join(".git")).unwrap();
        let Snapshot {
            files,
            links_out: skipped,
            ..
        } = snapshot_files(d.path(), Reader::Flake).unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        assert!(!files.iter().any(|f| f == Path::new("result")), "{files:?}");
        assert!(files.iter().any(|f| f == Path::new("pkgs/result-dev")));
    }

    #[test]
    fn a_checkout_too_large_to_send_names_its_largest_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("flake.nix"), "{}").unwrap();
        std::fs::write(d.path().join("big.bin"), vec![0u8; 3 << 20]).unwrap();
        let files = list_files(d.path()).unwrap();
        let limit = 1 << 20;
        let e = snapshot::pack(
            d.path(),
            &files,
            snapshot::Limits {
                max_bytes: limit,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, snapshot::SnapshotError::TooLarge { .. }), "{e}");
        let m = too_large(d.path(), &files, limit);
        assert!(
            m.contains("limit of 1.0 MiB (largest: big.bin (3.0 MiB), flake.nix (2 bytes))"),
            "{m}"
        );
        assert!(m.contains("every file under it is sent"), "{m}");
    }

    /// Nix reads a git flake's tracked files only; `nix-build` reads a file's whole tree.
    #[test]
    fn untracked_files_are_listed_ignored_ones_are_not_and_a_flake_leaves_them_out() {
        let d = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            std::process::Command::new("git")
                .arg("-C")
                .arg(d.path())
                .args(args)
                .output()
                .unwrap();
        };
        run(&["init", "-q"]);
        std::fs::write(d.path().join("flake.nix"), "{}").unwrap();
        std::fs::write(d.path().join(".gitignore"), "ignored.txt\n").unwrap();
        run(&["add", "flake.nix", ".gitignore"]);
        std::fs::write(d.path().join("new.nix"), "1").unwrap();
        std::fs::write(d.path().join("ignored.txt"), "x").unwrap();
        let mut files = list_files(d.path()).unwrap();
        files.sort();
        let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(names, vec![".gitignore", "flake.nix", "new.nix"]);
        let flake = snapshot_files(d.path(), Reader::Flake).unwrap();
        assert_eq!(flake.untracked, [PathBuf::from("new.nix")]);
        assert!(!flake.files.iter().any(|f| f == Path::new("new.nix")));
        let file = snapshot_files(d.path(), Reader::File).unwrap();
        assert!(file.untracked.is_empty());
        assert!(file.files.iter().any(|f| f == Path::new("new.nix")));
        // Added, it is the flake's, uncommitted as it is.
        run(&["add", "new.nix"]);
        let flake = snapshot_files(d.path(), Reader::Flake).unwrap();
        assert!(flake.untracked.is_empty());
        assert!(flake.files.iter().any(|f| f == Path::new("new.nix")));
        // When git cannot list them, nothing goes (every file, ignored ones too, did).
        std::fs::write(d.path().join(".git/HEAD"), "garbage").unwrap();
        let e = list_files(d.path()).unwrap_err().to_string();
        assert!(e.contains("git cannot list its files"), "{e}");
    }

    /// A tracked file under a directory that became a link out of the tree: refused, not
    /// read through the link.
    #[test]
    fn a_file_beneath_a_link_out_of_the_tree_is_not_packed() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("passwd"), "SECRET").unwrap();
        std::fs::write(d.path().join("flake.nix"), "{}").unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("sub")).unwrap();
        let files = vec![PathBuf::from("flake.nix"), PathBuf::from("sub/passwd")];
        let packed = nixfarm_core::snapshot::pack(d.path(), &files, Default::default());
        assert!(
            matches!(
                packed,
                Err(nixfarm_core::snapshot::SnapshotError::ThroughLink(_))
            ),
            "{:?}",
            packed.map(|b| b.len())
        );
    }

    #[test]
    fn names_that_are_not_utf8_are_carried_exactly() {
        use std::ffi::OsStr;
        let d = tempfile::tempdir().unwrap();
        let git = |args: &[&OsStr]| {
            let out = std::process::Command::new("git")
                .arg("-C")
                .arg(d.path())
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        };
        git(&[OsStr::new("init"), OsStr::new("-q")]);
        let tracked = OsStr::from_bytes(b"caf\xe9.nix");
        let untracked = OsStr::from_bytes(b"na\xefve.txt");
        std::fs::write(d.path().join("flake.nix"), "{}").unwrap();
        std::fs::write(d.path().join(tracked), "latin-1").unwrap();
        std::fs::write(d.path().join(untracked), "untracked").unwrap();
        git(&[OsStr::new("add"), OsStr::new("flake.nix"), tracked]);
        let files = list_files(d.path()).unwrap();
        assert!(files.iter().any(|f| f.as_os_str() == tracked), "{files:?}");
        assert!(
            files.iter().any(|f| f.as_os_str() == untracked),
            "{files:?}"
        );
        // Through a snapshot and back: the same bytes, the same content.
        let tar = snapshot::pack(d.path(), &files, snapshot::Limits::default()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("t");
        std::fs::create_dir(&dest).unwrap();
        snapshot::unpack(&tar, &dest, snapshot::Limits::default()).unwrap();
        assert_eq!(std::fs::read(dest.join(tracked)).unwrap(), b"latin-1");
        assert_eq!(std::fs::read(dest.join(untracked)).unwrap(), b"untracked");
    }
}
