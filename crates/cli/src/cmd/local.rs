//! `nixfarm local`: a whole farm on this machine (an embedded coordinator and local agents),
//! for one run.

use crate::cmd::submit::submit_and_watch;
use crate::{Client, LocalArgs, source};
use anyhow::bail;
use std::path::PathBuf;
use std::time::Duration;

/// The run's settings, with the public half of the key the local agents sign with among
/// the keys its cache is checked by when none is given: what they push is signed by it, and
/// a path in the cache signed by another key (an old one, before a rotation) is not theirs
/// to count as cached.
fn with_own_key(
    run: &crate::RunArgs,
    key_file: Option<&std::path::Path>,
) -> anyhow::Result<crate::RunArgs> {
    let mut run = run.clone();
    if let (Some(file), Some(_), true) = (key_file, &run.cache, run.trusted_public_keys.is_empty())
    {
        let key = nixfarm_store::narinfo::Key::from_file(file)
            .map_err(|e| anyhow::anyhow!("--signing-key-file {}: {e}", file.display()))?;
        run.trusted_public_keys.push(key.public());
    }
    Ok(run)
}

pub async fn local(args: &LocalArgs) -> anyhow::Result<i32> {
    // Ctrl-C from here on stops the farm and cancels its runs (below), whatever the command
    // is doing when it comes.
    crate::watch::interrupt();
    // Nix must be here: asked while the farm starts, said plainly before the run is
    // submitted.
    let version = tokio::spawn(
        tokio::process::Command::new("nix")
            .arg("--version")
            .kill_on_drop(true)
            .output(),
    );
    // Check the source before starting a farm for it.
    source::check_local_or_ref(&args.source)?;
    let run = with_own_key(&args.run, args.signing_key_file.as_deref())?;
    if args.run.cross_check_builds && args.agents < 2 {
        bail!(
            "--cross-check-builds has a second agent build everything again: run with --agents 2 or more"
        );
    }
    let state_dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".local/state/nixfarm/local"))
            .unwrap_or_else(|| PathBuf::from(".nixfarm")),
    };
    let config = nixfarm_coordinator::Config {
        listen: "127.0.0.1:0".into(),
        state_dir: state_dir.clone(),
        // One user's own machine: a path: reference reads nothing that user cannot.
        allow_local_flake_refs: true,
        agents_share_store: true,
        // The local agents share this machine's store: nothing needs to travel.
        farm_cache: nixfarm_coordinator::config::FarmCacheConfig {
            enabled: false,
            ..Default::default()
        },
        http: nixfarm_coordinator::config::HttpConfig {
            listen: args.http_listen.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    let coordinator = match nixfarm_coordinator::server::start(&config).await {
        Ok(c) => c,
        // Another `nixfarm local` (or a coordinator) keeps its state there: its runs are
        // its own. Said in this command's words.
        Err(e) if e.is::<nixfarm_coordinator::state_lock::StateInUse>() => bail!(
            "another nixfarm local is running with its state in {}{}: wait for it to end, or give this one --state-dir DIR",
            state_dir.display(),
            e.downcast_ref::<nixfarm_coordinator::state_lock::StateInUse>()
                .and_then(|u| u.pid)
                .map(|p| format!(" (process {p})"))
                .unwrap_or_default()
        ),
        Err(e) => return Err(e.context("cannot start the embedded coordinator")),
    };
    let url = format!("http://{}", coordinator.addr);
    if let Some(h) = coordinator.http_addr {
        note!("web UI: http://{h}/runs");
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let n = args.agents.max(1);
    let jobs = args.jobs.unwrap_or((cpus / n).max(1));
    // The Cachix API the run names (--cachix-api-url, or ?api= on the cache URL).
    let cachix_api = match args
        .run
        .cache
        .as_deref()
        .map(nixfarm_core::cache_url::CacheTarget::parse)
    {
        Some(Ok(nixfarm_core::cache_url::CacheTarget::Cachix { api, .. })) => {
            args.run.cachix_api_url.clone().or(Some(api))
        }
        _ => args.run.cachix_api_url.clone(),
    };
    // Stopped following (Ctrl-C), the runs stop with this farm: see below.
    crate::watch::farm_stops_with_this_command();
    let shutdown = tokio_util_token();
    let mut agents = Vec::new();
    // Whatever ends it, the agents and the coordinator are stopped after.
    let engine = coordinator.engine.clone();
    let work = async {
        for i in 1..=n {
            let cfg = nixfarm_agent::AgentConfig {
                coordinator: url.clone(),
                name: format!("local-{i}"),
                max_jobs: jobs,
                work_dir: state_dir.join("agents").join(format!("local-{i}")),
                signing_key_file: args.signing_key_file.clone(),
                allow_local_flake_refs: true,
                // This user's own agents: the Cachix API they named gets their token.
                cachix_api_urls: cachix_api.iter().cloned().collect(),
                ..Default::default()
            };
            let agent = nixfarm_agent::Agent::new(cfg)?;
            let token = shutdown.clone();
            agents.push(tokio::spawn(async move { agent.run(token).await }));
        }
        let client = Client::connect(&url, None).await?;
        note!(
            "{n} local agent(s), {jobs} job(s) each; state in {}",
            state_dir.display()
        );
        if !matches!(version.await, Ok(Ok(o)) if o.status.success()) {
            bail!(
                "Nix is not installed (no working `nix` on PATH); on Debian: apt-get install nix-bin"
            );
        }
        submit_and_watch(&client, &args.source, &run, &args.fix, &args.out).await
    };
    let result = tokio::select! {
        r = work => match r {
            // A Ctrl-C from the terminal reaches this command's children too (Nix, git):
            // the step one of them was in fails first, and that failure is the interrupt.
            Err(e) => match tokio::time::timeout(
                Duration::from_millis(300),
                crate::watch::interrupt().cancelled(),
            )
            .await
            {
                Ok(()) => {
                    crate::watch::say_local_farm_stops();
                    Ok(130)
                }
                Err(_) => Err(e),
            },
            ok => ok,
        },
        why = engine.halted() => Err(anyhow::anyhow!(
            "the embedded coordinator stopped: {why}; run the same command again once that is mended: it goes on from its state"
        )),
        // Not while a run is followed: its follower says so, and the command ends after.
        () = crate::watch::interrupted_outside_watch() => {
            crate::watch::say_local_farm_stops();
            Ok(130)
        }
    };
    // Interrupted: the user stopped the farm, so its runs end here, cancelled (their builds
    // stopped), rather than be taken up by the next `nixfarm local` of this state.
    // Before the agents stop, so their builds are stopped rather than waited for.
    let mut cancelled = Vec::new();
    if crate::watch::interrupted() {
        cancel_active(&engine, &mut cancelled);
    }
    shutdown.cancel();
    for a in agents {
        let _ = tokio::time::timeout(Duration::from_secs(10), a).await;
    }
    let mut coordinator = coordinator;
    coordinator.stop_serving().await;
    if crate::watch::interrupted() {
        // A submit the interrupt cut short may have been taken meanwhile: nothing more can
        // come now.
        cancel_active(&engine, &mut cancelled);
        if !cancelled.is_empty() {
            note!(
                "cancelled {} unfinished run(s): {}; what was built stays in the store",
                cancelled.len(),
                cancelled.join(" ")
            );
        }
    }
    drop(coordinator);
    result
}

/// Cancels the farm's unfinished runs (the user stopped the farm: the next `nixfarm local` of
/// this state is not to take them up), adding those it cancelled to `cancelled`.
fn cancel_active(engine: &nixfarm_coordinator::Engine, cancelled: &mut Vec<String>) {
    for run in engine.active_runs() {
        match engine.cancel(&run) {
            Ok(true) => cancelled.push(run),
            // Ended meanwhile.
            Ok(false) => {}
            Err(e) => note!("cannot cancel run {run}: {e}"),
        }
    }
}

fn tokio_util_token() -> tokio_util::sync::CancellationToken {
    tokio_util::sync::CancellationToken::new()
}
