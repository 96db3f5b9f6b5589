//! `submit`, `warm`, `watch` and `report`: sending a run, following it, and its report
//! (checked against the cache it was published to).

use crate::{
    CacheCheckArgs, Client, OutputArgs, RunArgs, SubmitArgs, WarmArgs, fix, print_report, source,
    status_error, watch,
};
use anyhow::{Context, bail};
use nixfarm_core::report::Report;
use nixfarm_proto::v1 as pb;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// `nixfarm submit`.
pub async fn submit_cmd(client: &Client, args: SubmitArgs) -> anyhow::Result<i32> {
    // What is about the report needs the report: a CI gate (`--fail-under 90`) that passed
    // because nothing was waited for would pass every time.
    let reported = args.out.format.is_some()
        || args.out.fail_under.is_some()
        || args.out.wide
        || args.run.verify_nars;
    if args.watch || args.fix.enabled() || reported {
        submit_and_watch(client, &args.source, &args.run, &args.fix, &args.out).await
    } else {
        let id = submit(
            client,
            &args.source,
            &args.run,
            &BTreeMap::new(),
            &args.run.attrs,
            None,
        )
        .await?;
        out!("{id}");
        Ok(0)
    }
}

/// `nixfarm warm`: a run that builds and pushes only what the cache lacks.
pub async fn warm_cmd(client: &Client, mut args: WarmArgs) -> anyhow::Result<i32> {
    if args.run.cache.is_none() {
        bail!("warm needs --cache: the cache to fill (cachix://NAME, file:///path, http(s)://…)");
    }
    args.run.skip_cached = true;
    submit_and_watch(
        client,
        &args.source,
        &args.run,
        &fix::FixArgs::default(),
        &args.out,
    )
    .await
}

/// `nixfarm report`.
pub async fn report_cmd(
    client: &Client,
    run: &str,
    check: &CacheCheckArgs,
    out: &OutputArgs,
) -> anyhow::Result<i32> {
    let mut report = get_report(client, run).await?;
    check_cached(&mut report, check).await?;
    Ok(print_report(&report, out))
}

pub(crate) async fn submit(
    client: &Client,
    source: &str,
    run: &RunArgs,
    overrides: &BTreeMap<PathBuf, Vec<u8>>,
    attrs: &[String],
    stage_of: Option<&str>,
) -> anyhow::Result<String> {
    let entry = match source::check_local_or_ref(source)? {
        source::Named::Dir(dir) => source::entry_file(&dir, run.file.as_deref())?,
        source::Named::FlakeRef(_) if run.file.is_some() => {
            bail!("--file evaluates a file of a local checkout, not of a flake reference")
        }
        source::Named::FlakeRef(_) => None,
    };
    if entry.is_none() && !(run.args.is_empty() && run.argstrs.is_empty()) {
        bail!("--arg and --argstr are for a Nix file (--file or a default.nix), not a flake");
    }
    let mut nix_args = Vec::new();
    for (pairs, literal) in [(&run.args, false), (&run.argstrs, true)] {
        for pair in pairs.chunks(2) {
            if let [name, value] = pair {
                nixfarm_core::entry::check_arg(name, value).map_err(|e| anyhow::anyhow!("{e}"))?;
                nix_args.push(pb::NixArg {
                    name: name.clone(),
                    value: value.clone(),
                    literal,
                });
            }
        }
    }
    let reader = match entry {
        Some(_) => source::Reader::File,
        None => source::Reader::Flake,
    };
    // Checked before a snapshot is uploaded: a mistyped cache costs no upload, and one that
    // cannot be reached fails here rather than every build's push, minutes later.
    let cache = run_cache(run)?;
    // Once per session: a stage's cache is its first run's.
    if !cache.is_empty() && stage_of.is_none() {
        probe_cache(&cache).await?;
    }
    let (src, label, flake_dir) = source::prepare(client, source, reader, overrides).await?;
    let req = pb::SubmitRunRequest {
        source: Some(src),
        attr_path: run.attr_path.clone().unwrap_or_default(),
        entry: match entry {
            Some(file) => {
                if !run.override_inputs.is_empty() {
                    bail!("--override-input applies to a flake, not to a Nix file (--file)");
                }
                Some(pb::NixEntry {
                    file,
                    args: nix_args,
                    overrides: vec![],
                    flake_dir: String::new(),
                })
            }
            None if run.override_inputs.is_empty() && flake_dir.is_empty() => None,
            None => Some(pb::NixEntry {
                file: String::new(),
                args: vec![],
                flake_dir,
                overrides: run
                    .override_inputs
                    .chunks(2)
                    .filter_map(|p| match p {
                        [name, reference] => Some(pb::NixArg {
                            name: name.clone(),
                            value: reference.clone(),
                            literal: true,
                        }),
                        _ => None,
                    })
                    .collect(),
            }),
        },
        label,
        cache,
        trusted_public_keys: run.trusted_public_keys.clone(),
        timeout_secs: run.timeout,
        max_silent_secs: run.max_silent,
        attrs: attrs.to_vec(),
        skip_cached: run.skip_cached,
        skip_listing: stage_of.is_some() && !attrs.is_empty(),
        stage_of: stage_of.unwrap_or_default().to_string(),
        smoke: run.smoke,
        cross_check_builds: run.cross_check_builds,
    };
    let resp = client
        .raw()
        .submit_run(client.req(req))
        .await
        .map_err(status_error)?;
    // Printed, and named in later calls: the coordinator's answer is checked like any input.
    let run_id = resp.into_inner().run_id;
    if !nixfarm_core::limits::is_run_id(&run_id) {
        anyhow::bail!(
            "the coordinator answered with '{}', which is not a run id",
            nixfarm_core::fit::one_line(nixfarm_core::limits::clip(&run_id, 80))
        );
    }
    Ok(run_id)
}

pub(crate) async fn get_report(client: &Client, run: &str) -> anyhow::Result<Report> {
    report_of(client, run, false).await
}

/// The report of `run`; `alone`: its own, not read over the hash-fixing stages it began.
pub(crate) async fn report_of(client: &Client, run: &str, alone: bool) -> anyhow::Result<Report> {
    let r = client
        .raw()
        .get_report(client.req(pb::GetReportRequest {
            run_id: run.to_string(),
            alone,
        }))
        .await
        .map_err(status_error)?;
    Ok(Report::try_from(r.into_inner())?)
}

/// The run's cache URL as agents get it (a cachix:// URL carries its API root), checked.
fn run_cache(run: &RunArgs) -> anyhow::Result<String> {
    cache_url(&CacheCheckArgs::from(run))
}

/// Checks the cache-check flags before anything is asked of the coordinator.
pub(crate) fn check_args(check: &CacheCheckArgs) -> anyhow::Result<()> {
    cache_url(check).map(drop)
}

/// [`run_cache`] of what names a cache.
fn cache_url(run: &CacheCheckArgs) -> anyhow::Result<String> {
    let Some(url) = &run.cache else {
        if run.cachix_api_url.is_some() {
            bail!("--cachix-api-url needs --cache cachix://NAME");
        }
        if run.verify_nars {
            bail!("--verify-nars checks the cache given with --cache: name one");
        }
        return Ok(String::new());
    };
    let target = nixfarm_store::Target::parse(url)?;
    // A NAR is read only as far as its signed narinfo says: keys bound the download.
    let cachix = matches!(target, nixfarm_store::Target::Cachix { .. });
    if run.verify_nars && run.trusted_public_keys.is_empty() && !cachix {
        bail!(
            "--verify-nars needs --trusted-public-key: the cache's narinfos are checked by it, and their signed sizes bound what is downloaded"
        );
    }
    Ok(match (target, &run.cachix_api_url) {
        (nixfarm_store::Target::Cachix { name, .. }, Some(api)) => {
            nixfarm_store::cachix_url(&name, Some(api))
        }
        _ => url.clone(),
    })
}

/// How long the cache is given to answer before a run is submitted to it.
const CACHE_PROBE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Says at once when the run's cache does not answer from here (a mistyped host, a cache
/// that is down), where otherwise nothing would until every build's push had waited out its
/// retries on it. Only said: the agents may reach what this machine cannot (a cache on the
/// farm's own network, a private CA they are given).
async fn probe_cache(url: &str) -> anyhow::Result<()> {
    let pusher = nixfarm_store::Pusher::for_url(url, nixfarm_nix::Nix::default(), None, None)?;
    if let Err(why) = pusher.reachable(CACHE_PROBE_WAIT).await {
        note!(
            "warning: the cache {} does not answer from here: {}; if the agents cannot reach it either, each build's push fails after its retries (about 90 s) and its package is not-cached",
            nixfarm_core::fit::one_line(nixfarm_core::limits::clip(url, 200)),
            nixfarm_core::fit::one_line(nixfarm_core::limits::clip(&why, 500))
        );
    }
    Ok(())
}

/// Checks "cached" against the cache itself, as a user substituting from it would: a ready
/// package whose outputs the cache does not have becomes not-cached, and so does one whose
/// outputs' narinfos are signed by none of the keys users check it by (`--trusted-public-key`,
/// a Cachix cache's own), when there are any: something else was uploaded under its path
/// before the farm's push (which uploads only what the cache lacks), or the agents sign with
/// a key users do not check by. So does one whose narinfo cannot be read, and with
/// `--verify-nars` one whose NAR is missing or not what its narinfo says.
pub(crate) async fn check_cached(report: &mut Report, run: &CacheCheckArgs) -> anyhow::Result<()> {
    let url = cache_url(run)?;
    if url.is_empty() {
        return Ok(());
    }
    let token = std::env::var("CACHIX_AUTH_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty());
    let pusher = nixfarm_store::Pusher::for_url(&url, nixfarm_nix::Nix::default(), None, token)?;
    let outs: Vec<String> = report
        .packages
        .iter()
        .filter(|p| p.status() == nixfarm_core::PackageStatus::Ready)
        .flat_map(|p| p.outputs.values().filter_map(|o| o.known()))
        .map(ToString::to_string)
        .collect();
    let missing: std::collections::HashSet<String> = pusher
        .missing(&outs)
        .await
        .with_context(|| {
            format!(
                "cannot check the cache {}",
                run.cache.as_deref().unwrap_or_default()
            )
        })?
        .into_iter()
        .collect();
    let mut keys = run.trusted_public_keys.clone();
    let present: Vec<String> = outs.into_iter().filter(|o| !missing.contains(o)).collect();
    if !present.is_empty() {
        let (_, cache_keys) = pusher.substituter().await.with_context(|| {
            format!(
                "cannot read the keys of the cache {}",
                run.cache.as_deref().unwrap_or_default()
            )
        })?;
        keys.extend(cache_keys);
    }
    // Each present output's narinfo is read as a substituting client reads it. One that
    // still cannot be read after a pause (a CDN answering from before the push, a cache
    // that says "present" to a HEAD and then serves nothing, another path's narinfo, a
    // malformed one) is not proven cached: a client could not substitute it either.
    let why_not: std::collections::HashMap<String, String> = pusher
        .signed_by_settled(&present, &keys)
        .await
        .into_iter()
        .zip(present.iter())
        .filter_map(|(signed, path)| match signed {
            Ok(true) => None,
            Ok(false) if keys.is_empty() => None,
            Ok(false) => Some((path.clone(), format!("{path} is in the cache, but signed by none of the keys it is checked by ({}): a client that checks signatures refuses it (something else was uploaded under its path, or the agents sign with another key)", keys.join(", ")))),
            Err(e) => Some((path.clone(), format!("the cache says it has {path}, but its narinfo cannot be read ({e}): a client could not substitute it"))),
        })
        .collect();
    let mut why_not = why_not;
    if run.verify_nars {
        // What passed so far is downloaded whole, as a client installing it would.
        let whole: Vec<String> = present
            .iter()
            .filter(|p| !why_not.contains_key(*p))
            .cloned()
            .collect();
        if !whole.is_empty() {
            note!("checking {} NAR(s) in the cache…", whole.len());
        }
        let checked = if whole.is_empty() {
            Vec::new()
        } else {
            pusher.verify_nars(&whole, &keys).await.with_context(|| {
                format!(
                    "--verify-nars: cannot check the NARs of {}",
                    run.cache.as_deref().unwrap_or_default()
                )
            })?
        };
        for (path, r) in whole.iter().zip(checked) {
            match r {
                Ok(nixfarm_store::NarCheck::Whole) => {}
                Ok(nixfarm_store::NarCheck::Unchecked(why)) => {
                    note!("not checked: {why}");
                }
                Err(e) => {
                    why_not.insert(
                        path.clone(),
                        format!("{e}: a client could not substitute {path}"),
                    );
                }
            }
        }
    }
    let mut changed = 0;
    for p in &mut report.packages {
        if p.status() != nixfarm_core::PackageStatus::Ready {
            continue;
        }
        let reason = p.outputs.values().find_map(|o| {
            if missing.contains(o.as_str()) {
                Some(format!("{o} is not in the cache"))
            } else {
                why_not.get(o.as_str()).cloned()
            }
        });
        if let Some(reason) = reason {
            p.status = nixfarm_core::PackageStatus::NotCached;
            p.reason = nixfarm_core::fit::one_line(&reason);
            changed += 1;
        }
    }
    if changed > 0 {
        report.resummarize();
        // The run's own line above counted them ready; said, so the two do not disagree
        // unexplained.
        note!(
            "checked against the cache: {changed} package(s) the run built are not-cached there (the run's record, as the web page and `nixfarm report` without --cache show it, keeps them ready)"
        );
    }
    Ok(())
}

/// Submits a source and follows it to its report. A local checkout goes through the hash
/// fixer, which fills in each needs-hash package's `hash_fixes` (and, with `--fix-hashes`,
/// runs further rounds).
pub(crate) async fn submit_and_watch(
    client: &Client,
    source: &str,
    run: &RunArgs,
    fix: &fix::FixArgs,
    out: &OutputArgs,
) -> anyhow::Result<i32> {
    if let Some(m) = &run.matrix {
        if fix.enabled() {
            bail!("--matrix runs each value once: fix hashes without it first (--fix-hashes)");
        }
        return crate::cmd::matrix::matrix(client, source, run, m, out).await;
    }
    match source::check_local_or_ref(source)? {
        source::Named::Dir(dir) => {
            if let Some(p) = &fix.patch_out {
                crate::checkout::check_patch_out(p)?;
            }
            let mut outcome = fix::run(client, &dir, run, fix).await?;
            if outcome.detached {
                return Ok(130);
            }
            check_cached(&mut outcome.report, &run.into()).await?;
            let code = print_report(&outcome.report, out);
            // The report and its fixes are shown even when they could not be written.
            match outcome.not_applied {
                Some(e) => Err(e),
                None => Ok(code),
            }
        }
        source::Named::FlakeRef(f) => {
            if fix.enabled() {
                bail!(
                    "--fix-hashes edits files, so it needs a local checkout; clone {f} and point nixfarm at the directory"
                );
            }
            let id = submit(client, source, run, &BTreeMap::new(), &run.attrs, None).await?;
            note!("submitted run {id}");
            match watch::watch(client, &id).await? {
                watch::End::Detached => {
                    crate::watch::say_detached(std::slice::from_ref(&id));
                    Ok(130)
                }
                watch::End::Finished => {
                    let mut report = get_report(client, &id).await?;
                    check_cached(&mut report, &run.into()).await?;
                    Ok(print_report(&report, out))
                }
            }
        }
    }
}

pub async fn watch_and_report(
    client: &Client,
    run: &str,
    check: &CacheCheckArgs,
    out: &OutputArgs,
) -> anyhow::Result<i32> {
    match watch::watch(client, run).await? {
        watch::End::Detached => {
            crate::watch::say_detached(&[run.to_string()]);
            Ok(130)
        }
        watch::End::Finished => report_cmd(client, run, check, out).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixfarm_core::report::PackageReport;
    use nixfarm_core::{OutputPath, PackageStatus, RunState};

    /// A narinfo for `path` in the file cache `dir` (of a one-file NAR), as `edit` leaves it.
    fn narinfo(
        dir: &std::path::Path,
        path: &str,
        edit: impl FnOnce(&mut nixfarm_store::narinfo::NarInfo),
    ) {
        // Only the narinfo is read: any well-formed hash and size do.
        let nar = b"not a real NAR";
        let hash = "1".repeat(52);
        let text = format!(
            "StorePath: {path}\nURL: nar/{hash}.nar\nCompression: none\nFileHash: sha256:{hash}\nFileSize: {n}\nNarHash: sha256:{hash}\nNarSize: {n}\nReferences: \n",
            n = nar.len()
        );
        let mut ni = nixfarm_store::narinfo::NarInfo::parse(&text).unwrap();
        edit(&mut ni);
        let name = &path["/nix/store/".len()..][..32];
        std::fs::write(dir.join(format!("{name}.narinfo")), ni.render()).unwrap();
    }

    /// The end-of-run check, as a substituting client would judge each ready output: one
    /// signed by a run key stays ready; unsigned, not served right (another path's
    /// narinfo), or missing, it is not-cached, each saying why.
    #[tokio::test]
    async fn ready_outputs_the_cache_cannot_serve_signed_are_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let key = nixfarm_store::narinfo::Key::generate("farm-1").unwrap();
        let path = |c: char| format!("/nix/store/{}-{c}", c.to_string().repeat(32));
        let (good, unsigned, wrong, missing) = (path('a'), path('b'), path('c'), path('d'));
        narinfo(dir.path(), &good, |ni| ni.sign(&key));
        narinfo(dir.path(), &unsigned, |_| {});
        narinfo(dir.path(), &wrong, |ni| {
            ni.store_path = path('f');
            ni.sign(&key);
        });
        let packages = [&good, &unsigned, &wrong, &missing]
            .iter()
            .map(|p| PackageReport {
                attr: p[44..].to_string(),
                status: PackageStatus::Ready,
                outputs: [("out".to_string(), OutputPath::parse(p).unwrap())].into(),
                ..Default::default()
            })
            .collect();
        let mut report = Report::new(
            "r1".into(),
            RunState::Finished,
            "repo".into(),
            String::new(),
            packages,
        );
        let args = CacheCheckArgs {
            cache: Some(format!("file://{}", dir.path().display())),
            cachix_api_url: None,
            trusted_public_keys: vec![key.public()],
            verify_nars: false,
        };
        check_cached(&mut report, &args).await.unwrap();
        let by: std::collections::BTreeMap<&str, &PackageReport> = report
            .packages
            .iter()
            .map(|p| (p.attr.as_str(), p))
            .collect();
        assert_eq!(by["a"].status, PackageStatus::Ready);
        for (attr, why) in [
            ("b", "signed by none of the keys it is checked by (farm-1:"),
            (
                "c",
                "but its narinfo cannot be read (the cache answered for /nix/store/fff",
            ),
            ("d", "is not in the cache"),
        ] {
            assert_eq!(by[attr].status, PackageStatus::NotCached, "{attr}");
            assert!(by[attr].reason.contains(why), "{attr}: {}", by[attr].reason);
        }
        assert_eq!(report.summary.ready, 1);
    }
}
