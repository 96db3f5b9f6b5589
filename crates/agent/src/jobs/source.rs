//! A run's flake on this host: remote references checked, snapshots fetched as a stream, checked whole and unpacked read-only in a directory of the run's own.

use super::flake_ref::{FLAKE_TAR, flake_in_dir, local_flake};
use super::*;
use std::collections::VecDeque;

/// Makes the run's flake available locally and returns a flake reference to it.
pub(super) async fn prepare_source(
    shared: &Arc<Shared>,
    channel: Channel,
    run_id: &str,
    source: Option<pb::Source>,
) -> Result<String, NixError> {
    match source.and_then(|s| s.kind) {
        Some(pb::source::Kind::FlakeRef(f)) => {
            // Checked here too: a reference that reads this host's disk is refused whatever
            // the coordinator let through.
            nixfarm_core::flakeref::validate_for_farm(&f, shared.cfg.allow_local_flake_refs)
                .map_err(|e| NixError::Failed {
                    message: e.to_string(),
                    log: String::new(),
                })?;
            Ok(f)
        }
        Some(pb::source::Kind::Snapshot(digest)) => {
            let dir = fetch_snapshot(shared, channel, run_id, &digest).await?;
            Ok(format!("path:{}", dir.display()))
        }
        None => Err(NixError::Infra("the job names no source".into())),
    }
}

/// What to evaluate: the flake, or a Nix file of the unpacked snapshot (checked again here:
/// inside the tree, a regular file) with the run's arguments.
/// Before a flake is listed: every input Nix would lock is locked by its `flake.lock`, and
/// all that lock locks is remote (unless this agent allows local references). Nix fetches an
/// input to lock it, a path on this host too, before anything could check it: that is the
/// way an input could read this host's credentials into its store. A remote flake's source
/// is fetched alone to read them.
pub(super) async fn check_flake_inputs(
    shared: &Arc<Shared>,
    entry: &Entry,
) -> Result<(), NixError> {
    let Entry::Flake(reference, overrides) = entry else {
        return Ok(());
    };
    if shared.cfg.allow_local_flake_refs {
        // A user's own machine: what the inputs are is theirs; only an override that names
        // no input of the flake is said (Nix would only warn, and a matrix over it would
        // compare a run with itself).
        if overrides.is_empty() {
            return Ok(());
        }
        let dir = match local_flake(reference) {
            Some((_, flake)) => flake,
            None => shared.nix.prefetch_flake(reference).await?,
        };
        let declared = shared.nix.flake_inputs(&dir).await?;
        let names: Vec<String> = overrides.iter().map(|(n, _)| n.clone()).collect();
        return overrides_named(&declared, &names);
    }
    // A run's evaluation tasks name the same uploaded tree (the run's own, read-only):
    // checked once here. A remote reference may name another commit each time: each time.
    let key = format!("{reference} {overrides:?}");
    // An override may name another commit each time too (Nix fetches it again after its
    // tarball-ttl): only a run's own tree without overrides is checked once.
    let cached = local_flake(reference).is_some() && overrides.is_empty();
    if cached && shared.checked_flakes.lock().is_ok_and(|c| c.contains(&key)) {
        return Ok(());
    }
    let dir = match local_flake(reference) {
        Some((_, flake)) => flake,
        None => shared.nix.prefetch_flake(reference).await?,
    };
    let overridden: Vec<String> = overrides.iter().map(|(n, _)| n.clone()).collect();
    check_flake_dir(shared, &dir, &overridden).await?;
    // A flake that overrides an input is fetched as its override says (checked remote),
    // and its own inputs as its lock says: checked the same way, but for the inputs
    // overridden below it (`dep/sub`).
    for (name, with) in overrides {
        let dir = shared.nix.prefetch_flake(with).await?;
        let below: Vec<String> = overridden
            .iter()
            .filter_map(|o| o.strip_prefix(&format!("{name}/")).map(str::to_string))
            .collect();
        // Not a flake (`flake = false`): a tree of files, with no inputs of its own.
        if !dir.join("flake.nix").is_file() {
            continue;
        }
        check_flake_dir(shared, &dir, &below)
            .await
            .map_err(|e| match e {
                NixError::Failed { message, log } => NixError::Failed {
                    message: format!(
                        "the flake overriding input '{}' ({}): {message}",
                        nixfarm_core::limits::clip(name, 80),
                        nixfarm_core::limits::clip(with, 200)
                    ),
                    log,
                },
                other => other,
            })?;
    }
    if cached && let Ok(mut c) = shared.checked_flakes.lock() {
        c.push_back(key);
        while c.len() > 64 {
            c.pop_front();
        }
    }
    Ok(())
}

/// The flake at `dir`: everything its lock locks is remote, and so is every input its
/// `flake.nix` declares, each locked; but for the inputs in `overridden`.
async fn check_flake_dir(
    shared: &Arc<Shared>,
    dir: &std::path::Path,
    overridden: &[String],
) -> Result<(), NixError> {
    let refuse = |message: String| NixError::Failed {
        message,
        log: String::new(),
    };
    check_lock_file(dir, overridden, false).map_err(refuse)?;
    let locked = match std::fs::read_to_string(dir.join("flake.lock")) {
        Ok(text) => nixfarm_core::flakeref::locked_root_inputs(&text),
        Err(_) => Vec::new(),
    };
    let declared = shared.nix.flake_inputs(dir).await?;
    overrides_named(&declared, overridden)?;
    // As declared, each is remote too: Nix fetches it again when the lock does not lock it
    // as flake.nix says (an override, say, turns off the lock's refusal).
    for (name, spec) in &declared {
        if overridden.contains(name) {
            nixfarm_core::flakeref::check_declared_below(name, spec)
        } else {
            nixfarm_core::flakeref::check_declared(name, spec)
        }
        .map_err(|e| refuse(e.to_string()))?;
    }
    if let Some(name) = declared
        .keys()
        .find(|n| !locked.contains(n) && !overridden.contains(n))
    {
        return Err(refuse(format!(
            "the flake's input '{}' is not in its flake.lock: Nix would fetch it to lock it, on the agent, before anything checked what it is. Lock it (nix flake lock) and commit flake.lock",
            nixfarm_core::limits::clip(name, 80)
        )));
    }
    Ok(())
}

/// Refuses an override (`--override-input NAME`, `--matrix NAME=…`) whose input, or the
/// first of its path (`dep/sub`), the flake does not declare.
fn overrides_named(
    declared: &std::collections::BTreeMap<String, serde_json::Value>,
    overridden: &[String],
) -> Result<(), NixError> {
    let Some(name) = overridden
        .iter()
        .find(|n| !declared.contains_key(n.split('/').next().unwrap_or(n)))
    else {
        return Ok(());
    };
    let has: Vec<&str> = declared.keys().map(String::as_str).take(20).collect();
    Err(NixError::Failed {
        message: format!(
            "--override-input {}: the flake has no input of that name ({})",
            nixfarm_core::limits::clip(name, 80),
            if has.is_empty() {
                "it has no inputs".to_string()
            } else {
                format!("its inputs: {}", has.join(", "))
            }
        ),
        log: String::new(),
    })
}

/// Checks the `flake.lock` of the checkout at `root`, when it has one (see
/// [`nixfarm_core::flakeref::check_lock`]).
fn check_lock_file(
    root: &std::path::Path,
    overridden: &[String],
    allow_local: bool,
) -> Result<(), String> {
    use nixfarm_core::flakeref::{MAX_LOCK_BYTES, check_lock};
    let path = root.join("flake.lock");
    let Ok(meta) = std::fs::metadata(&path) else {
        return Ok(());
    };
    if !meta.is_file() || meta.len() > MAX_LOCK_BYTES {
        return Err(format!(
            "flake.lock is not a file of at most {MAX_LOCK_BYTES} bytes"
        ));
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the checkout's flake.lock: {e}"))?;
    check_lock(&text, overridden, allow_local).map_err(|e| e.to_string())
}

pub(super) fn entry_for(
    flake: &str,
    entry: Option<pb::NixEntry>,
    allow_local: bool,
) -> Result<Entry, NixError> {
    let refuse = |message: String| NixError::Failed {
        message,
        log: String::new(),
    };
    if entry.as_ref().is_none_or(|e| e.file.is_empty()) {
        // Overridden inputs are fetched here: checked like the run's own reference.
        let mut overrides = Vec::new();
        for o in entry_overrides(entry.as_ref()) {
            nixfarm_core::entry::check_override(&o.name, &o.value, allow_local)
                .map_err(|x| refuse(x.0))?;
            overrides.push((o.name.clone(), o.value.clone()));
        }
        // A flake in a subdirectory of the uploaded tree (its git repository's): Nix reads
        // the whole tree and evaluates the directory's flake, as it reads `./sub`.
        let dir = entry.as_ref().map_or("", |e| e.flake_dir.as_str());
        if dir.is_empty() {
            // The flake's own inputs are checked by `check_flake_inputs`, before Nix runs.
            return Ok(Entry::Flake(flake.to_string(), overrides));
        }
        nixfarm_core::entry::check_flake_dir(dir).map_err(|x| refuse(x.0))?;
        let Some((root, _)) = local_flake(flake) else {
            return Err(refuse(
                "a flake's directory applies to an uploaded checkout, not to a flake reference"
                    .into(),
            ));
        };
        if !std::fs::symlink_metadata(root.join(dir).join("flake.nix")).is_ok_and(|m| m.is_file()) {
            return Err(refuse(format!(
                "{dir}/flake.nix is not a file of the checkout"
            )));
        }
        let reference = flake_in_dir(&root, dir).map_err(NixError::Infra)?;
        return Ok(Entry::Flake(reference, overrides));
    }
    let Some(e) = entry else {
        return Err(refuse("no entry".into()));
    };
    nixfarm_core::entry::check_file(&e.file).map_err(|x| refuse(x.0))?;
    let mut args = Vec::new();
    for a in e.args.into_iter().take(nixfarm_core::entry::MAX_ARGS) {
        nixfarm_core::entry::check_arg(&a.name, &a.value).map_err(|x| refuse(x.0))?;
        args.push((a.name, a.value, a.literal));
    }
    let Some(root) = flake.strip_prefix("path:").map(std::path::PathBuf::from) else {
        return Err(refuse(
            "--file evaluates a file of an uploaded checkout, not of a flake reference".into(),
        ));
    };
    let meta = std::fs::symlink_metadata(root.join(&e.file));
    if !meta.is_ok_and(|m| m.is_file()) {
        return Err(refuse(format!(
            "{} is not a file of the checkout (--file)",
            e.file
        )));
    }
    Ok(Entry::File {
        root,
        file: e.file,
        args,
    })
}

fn entry_overrides(e: Option<&pb::NixEntry>) -> impl Iterator<Item = &pb::NixArg> {
    e.into_iter()
        .flat_map(|e| e.overrides.iter())
        .take(nixfarm_core::entry::MAX_ARGS)
}

/// Runs whose unpacked sources are kept at once (least recently used go first).
pub(super) const KEPT_RUN_SOURCES: usize = 8;

/// Fetches a snapshot and unpacks it into a directory of the run's own: streamed to a file
/// while hashed, held to the coordinator's limits, checked whole, then written without
/// following any link and left read-only. Nothing one run sends can touch another's tree.
pub(super) async fn fetch_snapshot(
    shared: &Arc<Shared>,
    channel: Channel,
    run_id: &str,
    digest: &str,
) -> Result<PathBuf, NixError> {
    if !snapshot::is_digest(digest) {
        return Err(NixError::Infra("bad snapshot digest".into()));
    }
    if !nixfarm_core::limits::is_run_id(run_id) {
        return Err(NixError::Infra("bad run id".into()));
    }
    let sources = shared.cfg.work_dir.join("sources");
    let dir = sources.join(format!("{run_id}-{digest}"));
    let _guard = shared.source_lock.lock().await;
    touch_run_source(shared, &sources, &dir);
    if dir.is_dir() {
        return Ok(dir);
    }
    let infra = |e: String| NixError::Infra(format!("cannot fetch source {digest}: {e}"));
    std::fs::create_dir_all(&sources).map_err(|e| infra(e.to_string()))?;
    let limits = shared
        .snapshot_limits
        .lock()
        .map(|l| *l)
        .unwrap_or_default();
    // Names of this fetch's own: one a cancel left unpacking cannot meet another's.
    let own = format!(".tmp-{run_id}-{digest}-{:016x}", fastrand::u64(..));
    let tar = sources.join(format!("{own}.tar"));
    let tmp = sources.join(&own);
    // The tar goes however this ends (a cancel drops this future anywhere in it); the tree
    // is the unpacking's own to remove or to put in place, which goes on after a cancel.
    let _temporary = Temporary(vec![tar.clone()]);
    download(shared, channel, digest, &tar, limits).await?;
    let (t, d, done) = (tar.clone(), tmp.clone(), dir.clone());
    tokio::task::spawn_blocking(move || {
        let unpacked = std::fs::create_dir_all(&d)
            .map_err(|e| e.to_string())
            .and_then(|()| snapshot::unpack_file(&t, &d, limits).map_err(|e| e.to_string()))
            .and_then(|_| match std::fs::rename(&d, &done) {
                // Another fetch of the same put it in place first: the same tree.
                Err(_) if done.is_dir() => Err(String::new()),
                r => r.map_err(|e| e.to_string()),
            });
        if unpacked.is_err() {
            let _ = snapshot::remove_tree(&d);
        }
        match unpacked {
            Err(e) if e.is_empty() => Ok(()),
            r => r,
        }
    })
    .await
    .map_err(|e| infra(e.to_string()))?
    .map_err(infra)?;
    Ok(dir)
}

/// Files and trees a fetch leaves only while it runs: removed when it ends, or is dropped.
struct Temporary(Vec<PathBuf>);

impl Drop for Temporary {
    fn drop(&mut self) {
        for p in &self.0 {
            if p.is_dir() {
                let _ = snapshot::remove_tree(p);
            } else {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Streams a snapshot from the coordinator into `to`, checking its size on the way and its
/// digest at the end.
pub(super) async fn download(
    shared: &Arc<Shared>,
    channel: Channel,
    digest: &str,
    to: &std::path::Path,
    limits: snapshot::Limits,
) -> Result<(), NixError> {
    use sha2::Digest as _;
    use tokio::io::AsyncWriteExt;
    let infra = |e: String| NixError::Infra(format!("cannot fetch source {digest}: {e}"));
    let mut client = AgentServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let mut req = tonic::Request::new(pb::FetchSourceRequest {
        digest: digest.to_string(),
    });
    add_token(&mut req, &shared.token);
    let mut stream = client
        .fetch_source(req)
        .await
        .map_err(|e| infra(e.to_string()))?
        .into_inner();
    let file = tokio::fs::File::create(to)
        .await
        .map_err(|e| infra(e.to_string()))?;
    let mut out = tokio::io::BufWriter::new(file);
    let mut hasher = sha2::Sha256::new();
    let (mut size, cap) = (0u64, snapshot::max_tar_bytes(limits));
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .map_err(|_| infra("the coordinator sent nothing for 60 s".into()))?
            .map_err(|e| infra(e.to_string()))?;
        let Some(chunk) = chunk else { break };
        size += chunk.data.len() as u64;
        if size > cap {
            return Err(infra(format!(
                "larger than the limit of {} bytes",
                limits.max_bytes
            )));
        }
        hasher.update(&chunk.data);
        out.write_all(&chunk.data)
            .await
            .map_err(|e| infra(e.to_string()))?;
    }
    out.flush().await.map_err(|e| infra(e.to_string()))?;
    if data_encoding::HEXLOWER.encode(&hasher.finalize()) != digest {
        return Err(infra("digest mismatch".into()));
    }
    Ok(())
}

/// Removes the unpacked sources of a run that ended.
pub(crate) fn drop_run_sources(shared: &Shared, run_id: &str) {
    if !nixfarm_core::limits::is_run_id(run_id) {
        return;
    }
    let sources = shared.cfg.work_dir.join("sources");
    let prefix = format!("{run_id}-");
    let partial = format!(".tmp-{run_id}-");
    if let Ok(mut lru) = shared.run_sources.lock() {
        lru.retain(|n| !n.starts_with(&prefix));
    }
    if let Ok(entries) = std::fs::read_dir(&sources) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) || name.starts_with(&partial) {
                if e.path().is_dir() {
                    let _ = snapshot::remove_tree(&e.path());
                } else {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// A job of a run going on here: the run's unpacked source is not swept while one is.
pub(crate) struct RunInUse {
    shared: Arc<Shared>,
    run: String,
}

impl RunInUse {
    pub(crate) fn new(shared: &Arc<Shared>, run: &str) -> RunInUse {
        if let Ok(mut m) = shared.runs_in_use.lock() {
            *m.entry(run.to_string()).or_insert(0) += 1;
        }
        RunInUse {
            shared: shared.clone(),
            run: run.to_string(),
        }
    }
}

impl Drop for RunInUse {
    fn drop(&mut self) {
        if let Ok(mut m) = self.shared.runs_in_use.lock()
            && let Some(n) = m.get_mut(&self.run)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.run);
            }
        }
    }
}

/// Marks the run's source as used now, and removes the least recently used ones beyond
/// [`KEPT_RUN_SOURCES`] (a run that needs one again fetches it again), but none of a run
/// with a job going on here (an evaluation reading it).
pub(super) fn touch_run_source(shared: &Shared, sources: &std::path::Path, dir: &std::path::Path) {
    let Some(name) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let Ok(mut lru) = shared.run_sources.lock() else {
        return;
    };
    lru.retain(|n| *n != name);
    lru.push_back(name);
    let keep = KEPT_RUN_SOURCES.max(2 * shared.cfg.max_jobs as usize);
    let in_use = shared
        .runs_in_use
        .lock()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    for old in sweep(&mut lru, keep, &in_use) {
        if let Err(e) = snapshot::remove_tree(&sources.join(&old)) {
            tracing::warn!("cannot remove the old source {old}: {e}");
        }
        let _ = std::fs::remove_file(sources.join(format!("{old}{FLAKE_TAR}")));
        // And a packing a crash left half done.
        if let Ok(dir) = std::fs::read_dir(sources) {
            let half = format!("{old}.flake.tmp-");
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with(&half) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// Takes out of `lru` (least recently used first; names `RUN-DIGEST`) the oldest beyond
/// `keep` whose run is not `in_use`, and returns them.
fn sweep(
    lru: &mut VecDeque<String>,
    keep: usize,
    in_use: &std::collections::HashSet<String>,
) -> Vec<String> {
    let mut gone = Vec::new();
    while lru.len() > keep {
        let run = |n: &String| n.split_once('-').map_or(n.clone(), |(r, _)| r.to_string());
        let Some(i) = lru.iter().position(|n| !in_use.contains(&run(n))) else {
            break;
        };
        gone.extend(lru.remove(i));
    }
    gone
}

/// Largest file compared when deciding whether a position lies in the run's own tree.
const MAX_POSITION_FILE: u64 = 4 << 20;

/// A `meta.position` relative to the repository (`pkgs/foo.nix:12`) when it points into the
/// run's own source: Nix's store copy of the tree (the same file, byte for byte, at the same
/// place in the tree) or the tree itself. Anything else (nixpkgs, another input, a remote
/// flake this host holds no tree of) stays as Nix gave it.
pub(super) fn repo_position(position: &str, flake: &str) -> String {
    relative_in(position, flake, std::path::Path::new("/nix/store"))
        .unwrap_or_else(|| position.to_string())
}

fn relative_in(position: &str, flake: &str, store: &std::path::Path) -> Option<String> {
    // The tree's root, whatever directory of it the flake is in: positions are the
    // repository's.
    let (root, _) = local_flake(flake)?;
    let root = root.as_path();
    if !root.is_absolute() {
        return None;
    }
    let (file, line) = match position.rsplit_once(':') {
        Some((f, l)) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => (f, Some(l)),
        _ => (position, None),
    };
    let file = std::path::Path::new(file);
    let rel = match file.strip_prefix(root) {
        Ok(rel) => rel.to_path_buf(),
        Err(_) => {
            // /nix/store/<hash>-<name>/<rel>
            let mut parts = file.strip_prefix(store).ok()?.components();
            parts.next()?;
            let rel = parts.as_path().to_path_buf();
            let (a, b) = (
                std::fs::metadata(file).ok()?,
                std::fs::metadata(root.join(&rel)).ok()?,
            );
            if !a.is_file() || !b.is_file() || a.len() != b.len() || a.len() > MAX_POSITION_FILE {
                return None;
            }
            if std::fs::read(file).ok()? != std::fs::read(root.join(&rel)).ok()? {
                return None;
            }
            rel
        }
    };
    if rel.as_os_str().is_empty()
        || !rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return None;
    }
    let rel = rel.to_str()?;
    Some(match line {
        Some(l) => format!("{rel}:{l}"),
        None => rel.to_string(),
    })
}

#[cfg(test)]
#[path = "source_tests.rs"]
mod tests;
