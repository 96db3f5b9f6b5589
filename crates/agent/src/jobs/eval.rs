//! Evaluation jobs: the listing, evaluation tasks (isolated by `isolate`), their derivations rooted and read, pushed to the run's cache.

use super::isolate::eval_isolated;
use super::*;

pub(super) fn outputs_to_wire(o: &BTreeMap<String, String>) -> Vec<pb::DrvOutput> {
    super::outputs_wire(o.iter().map(|(n, p)| (n.clone(), p.clone())))
}

/// What a listing found: the attribute names, and those it evaluated too (a small
/// repository: `None` when it had more than it was asked to evaluate).
pub(super) type Listed = (Vec<String>, Option<BTreeMap<String, Option<AttrInfo>>>);

/// Lists `attr_path` and, when it has at most `up_to` attributes, evaluates them in the same
/// Nix process. If that process fails (an error `tryEval` cannot catch, the memory cap), the
/// attributes are listed alone: evaluation tasks then isolate what failed.
async fn list_maybe_eval(
    shared: &Arc<Shared>,
    entry: &Entry,
    attr_path: &str,
    up_to: usize,
    mem: u64,
) -> Result<Listed, NixError> {
    if up_to > 0 {
        match shared.nix.list_and_eval(entry, attr_path, up_to, mem).await {
            Ok(l) => return Ok((l.names, l.evaluated)),
            Err(e) => tracing::info!(
                "listing {attr_path} alone: evaluating it with its listing failed: {e}"
            ),
        }
    }
    Ok((shared.nix.list_attrs(entry, attr_path, mem).await?, None))
}

/// The packages under `attr_path`, and for a flake's `packages.<system>` also its
/// `checks.<system>` (as `checks.<name>`); the packages evaluated too when there are at most
/// `up_to` of them. For such a flake also the system whose other outputs are still to be
/// checked ([`other_outputs`]), with what listing the checks found wrong: the packages'
/// evaluation need not wait for those checks.
pub(super) async fn list_with_checks(
    shared: &Arc<Shared>,
    entry: &Entry,
    attr_path: &str,
    up_to: usize,
    mem: u64,
) -> Result<(Listed, Option<(String, Vec<pb::RepoCheck>)>), NixError> {
    let system = attr_path
        .strip_prefix("packages.")
        .filter(|s| !s.contains('.'));
    let (Entry::Flake(..), Some(system)) = (entry, system) else {
        return Ok((
            list_maybe_eval(shared, entry, attr_path, up_to, mem).await?,
            None,
        ));
    };
    let checks_path = format!("checks.{system}");
    // Side by side: the agent opened its store when it started (`Nix::open_store`), so two
    // Nix processes do not race to create a fresh store's database.
    let (listed, checks) = tokio::join!(
        list_maybe_eval(shared, entry, attr_path, up_to, mem),
        shared.nix.list_attrs(entry, &checks_path, mem),
    );
    fn no_such<T>(r: &Result<T, NixError>) -> bool {
        matches!(r, Err(NixError::Failed { message, .. }) if message.contains("does not provide attribute"))
    }
    // A flake of checks only has no packages: its checks are the run. One with neither is
    // said in the flake's own terms (Nix's words name the agent's copy of it, and the
    // attribute paths it tried in its stead).
    let checks_only = no_such(&listed) && matches!(&checks, Ok(names) if !names.is_empty());
    let listed = match (no_such(&listed), &checks) {
        _ if checks_only => Ok((Vec::new(), None)),
        (true, _) if no_such(&checks) => Err(NixError::Failed {
            message: format!("the flake has no {attr_path} and no {checks_path}"),
            log: String::new(),
        }),
        _ => listed,
    };
    let (mut attrs, evaluated) = listed?;
    let mut repository = Vec::new();
    // Said, so a flake whose packages went missing (or live elsewhere) is not taken for one
    // whose every package is ready.
    if checks_only {
        repository.push(pb::RepoCheck {
            name: attr_path.to_string(),
            ok: false,
            message: format!(
                "the flake has no {attr_path}: the run is its checks (packages elsewhere, say legacyPackages, are built with --attr-path)"
            ),
        });
    }
    match checks {
        Ok(names) => attrs.extend(
            names
                .into_iter()
                .map(|n| format!("{}{n}", nixfarm_core::report::CHECK_PREFIX)),
        ),
        Err(NixError::Failed { message, .. }) if message.contains("does not provide attribute") => {
        }
        Err(e) if e.is_infra() => return Err(e),
        Err(e) => repository.push(pb::RepoCheck {
            name: checks_path,
            ok: false,
            message: e.to_string(),
        }),
    }
    Ok(((attrs, evaluated), Some((system.to_string(), repository))))
}

/// Takes the attribute names the coordinator does not accept (empty, over
/// [`nixfarm_core::limits::MAX_ATTR`] bytes, with control characters) out of a listing, and
/// out of what it evaluated: a check of `attr_path` that names them (a few, escaped), or
/// None when every name is fine.
pub(super) fn leave_out_unnamable(
    attr_path: &str,
    attrs: &mut Vec<String>,
    evaluated: &mut Option<BTreeMap<String, Option<AttrInfo>>>,
) -> Option<pb::RepoCheck> {
    use nixfarm_core::limits::{MAX_ATTR, clip};
    let bad = |a: &String| !nixfarm_core::limits::is_attr_name(a);
    let (left_out, kept): (Vec<String>, Vec<String>) =
        std::mem::take(attrs).into_iter().partition(bad);
    *attrs = kept;
    if left_out.is_empty() {
        return None;
    }
    if let Some(e) = evaluated {
        e.retain(|a, _| !bad(a));
    }
    let mut named: Vec<String> = left_out
        .iter()
        .take(5)
        .map(|a| match clip(a, 60) {
            c if c.len() < a.len() => format!("{:?}…", c),
            c => format!("{c:?}"),
        })
        .collect();
    if left_out.len() > 5 {
        named.push(format!("and {} more", left_out.len() - 5));
    }
    Some(pb::RepoCheck {
        name: attr_path.to_string(),
        ok: false,
        message: format!(
            "{} attribute(s) left out of the run, their names not ones nixfarm accepts (1 to {MAX_ATTR} bytes, no control characters): {}",
            left_out.len(),
            named.join(", ")
        ),
    })
}

/// The flake's overlays, modules, formatter, dev shells and apps for `system`, checked.
pub(super) async fn other_outputs(
    shared: &Arc<Shared>,
    entry: &Entry,
    system: &str,
    mem: u64,
) -> Vec<pb::RepoCheck> {
    shared
        .nix
        .check_outputs(entry, system, mem)
        .await
        .into_iter()
        .map(|c| pb::RepoCheck {
            ok: c.problem.is_none(),
            message: c.problem.unwrap_or_default(),
            name: c.name,
        })
        .collect()
}

/// Like [`eval_isolated`], with the flake's checks (`checks.<name>`) evaluated under
/// `checks.<system>` beside the packages.
async fn eval_with_checks(
    shared: &Arc<Shared>,
    entry: &Entry,
    attr_path: &str,
    (attrs, listed_as_throwing): (&[String], bool),
    mem: u64,
) -> Result<BTreeMap<String, Result<AttrInfo, String>>, NixError> {
    let prefix = nixfarm_core::report::CHECK_PREFIX;
    let system = attr_path
        .strip_prefix("packages.")
        .filter(|_| !entry.is_file());
    // A Nix file's `checks.NAME` is a package of a `checks` set it recurses into.
    let (checks, packages): (Vec<String>, Vec<String>) = attrs
        .iter()
        .cloned()
        .partition(|a| system.is_some() && a.starts_with(prefix));
    let mut out = if packages.is_empty() {
        BTreeMap::new()
    } else {
        eval_isolated(
            shared,
            entry,
            attr_path,
            (vec![packages], listed_as_throwing),
            mem,
        )
        .await?
    };
    if let (Some(system), false) = (system, checks.is_empty()) {
        let names: Vec<String> = checks
            .iter()
            .map(|c| c[prefix.len()..].to_string())
            .collect();
        let checked = eval_isolated(
            shared,
            entry,
            &format!("checks.{system}"),
            (vec![names], listed_as_throwing),
            mem,
        )
        .await?;
        out.extend(
            checked
                .into_iter()
                .map(|(k, v)| (format!("{prefix}{k}"), v)),
        );
    }
    Ok(out)
}

/// Evaluates a chunk and roots its derivations for the run. The host's garbage collector may
/// strike between Nix writing a `.drv` and the root being made: then the chunk is evaluated
/// once more (the roots already exist, so what it writes stays).
pub(super) async fn eval_rooted(
    shared: &Arc<Shared>,
    run_id: &str,
    entry: &Entry,
    j: &pb::EvalChunkJob,
) -> Result<BTreeMap<String, Result<AttrInfo, String>>, NixError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let evaluated = eval_with_checks(
            shared,
            entry,
            &j.attr_path,
            (&j.attrs, j.listed_as_throwing),
            j.eval_memory_mib,
        )
        .await?;
        let gone = root(shared, run_id, &evaluated).await?;
        if gone.is_empty() {
            return Ok(evaluated);
        }
        if tries >= 3 {
            return Err(NixError::Infra(format!(
                "{} derivation(s) were garbage-collected as soon as they were evaluated (e.g. {})",
                gone.len(),
                gone[0]
            )));
        }
        tracing::info!(
            run = run_id,
            gone = gone.len(),
            "derivations collected before they were rooted; evaluating again"
        );
    }
}

/// Roots the evaluated derivations for the run; those the host's garbage collector took
/// before they were rooted.
async fn root(
    shared: &Arc<Shared>,
    run_id: &str,
    evaluated: &BTreeMap<String, Result<AttrInfo, String>>,
) -> Result<Vec<String>, NixError> {
    let tops: Vec<String> = evaluated
        .values()
        .filter_map(|r| r.as_ref().ok().map(|i| i.drv_path.clone()))
        .collect();
    if let Err(e) = shared.roots.add(run_id, &tops) {
        // Without roots the run still works, unless the host collects garbage meanwhile.
        tracing::warn!(
            "cannot add GC roots in {}: {e}",
            shared.roots.dir().display()
        );
    }
    shared.nix.invalid_paths(&tops).await
}

/// What a listing evaluated, made into an evaluation task's result: the derivations are
/// rooted, read and pushed as a task's are. What threw is left out, for the coordinator to
/// evaluate by tasks (alone, for its message): the builds of the rest need not wait for
/// that. `None` when any of it fails: then tasks evaluate every attribute.
pub(super) async fn listing_evaluation(
    shared: &Arc<Shared>,
    channel: Channel,
    attempt: &str,
    run_id: &str,
    flake: &str,
    j: &pb::EvalListJob,
    caught: BTreeMap<String, Option<AttrInfo>>,
) -> Option<pb::EvalChunkResult> {
    let evaluated: BTreeMap<String, Result<AttrInfo, String>> = caught
        .into_iter()
        .filter_map(|(k, v)| v.map(|i| (k, Ok(i))))
        .collect();
    if evaluated.is_empty() {
        return None;
    }
    match root(shared, run_id, &evaluated).await {
        Ok(gone) if gone.is_empty() => {}
        Ok(_) => return None, // collected meanwhile: tasks evaluate them again
        Err(e) => {
            tracing::info!("the listing's evaluation is left to tasks: {e}");
            return None;
        }
    }
    let names: Vec<String> = evaluated.keys().cloned().collect();
    let r = chunk_result(
        shared,
        (channel, attempt),
        flake,
        &names,
        &evaluated,
        j.skip_cached,
        &j.cache,
    )
    .await;
    r.error.is_empty().then_some(r)
}

pub(super) async fn eval_chunk(
    shared: &Arc<Shared>,
    channel: Channel,
    attempt: &str,
    run_id: &str,
    j: pb::EvalChunkJob,
) -> pb::EvalChunkResult {
    let fail = |e: NixError| chunk_failure(shared, e);
    let flake = match prepare_source(shared, channel.clone(), run_id, j.source.clone()).await {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    let entry = match super::source::entry_for(
        &flake,
        j.entry.clone(),
        shared.cfg.allow_local_flake_refs,
    ) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    // A run may come without a listing (a hash-fixing stage names its attributes): its
    // tasks check the flake's inputs themselves.
    if let Err(e) = super::source::check_flake_inputs(shared, &entry).await {
        return fail(e);
    }
    let started = std::time::Instant::now();
    let evaluated = match eval_rooted(shared, run_id, &entry, &j).await {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    tracing::debug!(
        attrs = j.attrs.len(),
        ms = started.elapsed().as_millis() as u64,
        "evaluation task: evaluated"
    );
    chunk_result(
        shared,
        (channel, attempt),
        &flake,
        &j.attrs,
        &evaluated,
        j.skip_cached,
        &j.cache,
    )
    .await
}

/// An evaluation task's result saying it failed (and pausing the agent if its disk is full).
pub(super) fn chunk_failure(shared: &Shared, e: NixError) -> pb::EvalChunkResult {
    let error = e.to_string();
    pause_if_disk_full(shared, &error);
    pb::EvalChunkResult {
        error,
        infra: e.is_infra(),
        ..Default::default()
    }
}

/// An evaluation task's result for `names`, from what was evaluated: the attributes, and
/// their derivations read, marked present in the cache (warm mode) and pushed to it.
async fn chunk_result(
    shared: &Arc<Shared>,
    // The coordinator, and the attempt its upload claims are made for.
    (channel, attempt): (Channel, &str),
    flake: &str,
    names: &[String],
    evaluated: &BTreeMap<String, Result<AttrInfo, String>>,
    skip_cached: bool,
    run_cache: &str,
) -> pb::EvalChunkResult {
    let fail = |e: NixError| chunk_failure(shared, e);
    let mut attrs = Vec::new();
    let mut tops = Vec::new();
    for name in names {
        match evaluated.get(name) {
            Some(Ok(info)) => {
                tops.push(info.drv_path.clone());
                attrs.push(pb::EvaluatedAttr {
                    attr: name.clone(),
                    drv_path: info.drv_path.clone(),
                    outputs: outputs_to_wire(&info.outputs),
                    pname: info.pname.clone(),
                    version: info.version.clone(),
                    position: super::source::repo_position(&info.position, flake),
                    rev: info.rev.clone(),
                    system: info.system.clone(),
                    error: String::new(),
                    timeout_secs: info.timeout,
                    max_silent_secs: info.max_silent,
                    main_program: info.main_program.clone(),
                });
            }
            Some(Err(e)) => attrs.push(pb::EvaluatedAttr {
                attr: name.clone(),
                error: e.clone(),
                ..Default::default()
            }),
            None => attrs.push(pb::EvaluatedAttr {
                attr: name.clone(),
                error: "attribute vanished during evaluation".into(),
                ..Default::default()
            }),
        }
    }
    let started = std::time::Instant::now();
    let drvs = match shared.nix.show_derivations(&tops).await {
        Ok(d) => d,
        Err(e) => return fail(NixError::Infra(format!("cannot read derivations: {e}"))),
    };
    tracing::debug!(
        drvs = drvs.len(),
        ms = started.elapsed().as_millis() as u64,
        "evaluation task: derivations read"
    );
    // Warm mode: derivations whose outputs the cache (or, without one, this store) has.
    let mut present = std::collections::HashSet::new();
    if skip_cached {
        let outs: Vec<String> = drvs
            .iter()
            .flat_map(|d| d.outputs.iter().map(|(_, p)| p.clone()))
            .filter(|p| !p.is_empty())
            .collect();
        let missing: std::collections::HashSet<String> = if run_cache.is_empty() {
            match shared.nix.invalid_paths(&outs).await {
                Ok(m) => m.into_iter().collect(),
                Err(e) => return fail(e),
            }
        } else {
            match pusher(shared, run_cache).await {
                Ok(p) => match p.missing(&outs).await {
                    Ok(m) => m.into_iter().collect(),
                    Err(e) => return fail(NixError::Infra(format!("cannot query the cache: {e}"))),
                },
                Err(e) => return fail(e),
            }
        };
        for d in &drvs {
            if !d.outputs.is_empty()
                && d.outputs
                    .iter()
                    .all(|(_, p)| !p.is_empty() && !missing.contains(p))
            {
                present.insert(d.path.clone());
            }
        }
        // A fixed output present under another derivation's name may hold that package's
        // content (a copied hash): it and everything built on it are built after all, so the
        // build's copied-hash check runs (build.rs, `copied_hash`).
        let suspects = super::warm::copied_suspects(shared, &drvs, &present, run_cache).await;
        super::warm::unmark_dependents(&mut present, &drvs, suspects);
    }
    let cache = transport_cache(shared, run_cache);
    if !cache.is_empty() {
        // Builders on other hosts fetch the derivations (and their sources) from the cache.
        let claims = Claims::new(shared, channel, &cache, attempt);
        let pushing = std::time::Instant::now();
        let pushed = match pusher(shared, &cache).await {
            Ok(p) => p
                .push_closure_with(&tops, &claims)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        tracing::debug!(
            ms = pushing.elapsed().as_millis() as u64,
            "evaluation task: derivations pushed"
        );
        if let Err(e) = pushed {
            // A cache that refuses uploads costs the packages their "cached", not the run:
            // the evaluation stands, builds here go on, and each push failure is reported
            // against its package (not-cached).
            nixfarm_store::PUSH_WARNINGS.warn(&format!(
                "cannot push the derivations to {}: {e}",
                cache.split('?').next().unwrap_or_default()
            ));
        }
    }
    let drvs = drvs
        .into_iter()
        .map(|d| pb::DrvNode {
            present: present.contains(&d.path),
            drv_path: d.path,
            system: d.system,
            features: d.features,
            outputs: super::outputs_wire(d.outputs),
            input_drvs: d.input_drvs,
            fixed_output: d.fixed_output,
            output_hash: d.output_hash,
            hints: d.hints,
        })
        .collect();
    pb::EvalChunkResult {
        attempt_id: String::new(),
        attrs,
        drvs,
        error: String::new(),
        infra: false,
    }
}
