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
#[path = "source_tests.rs"]
mod tests;
