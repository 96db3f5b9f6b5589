//! Hostile derivations: an agent that holds the run's cache key (any agent of a farm that
//! pushes to a cache signs with it) puts a forged derivation there under a real one's path
//! and has it built elsewhere.

use super::*;
use sha2::Digest as _;

/// What Nix 2.8's `nix-instantiate` wrote for a fixed-output
/// `derivation { name = "src"; ... echo hi > $out; outputHash = sha256 of "hi\n"; }`, and the
/// paths it gave it and its output. A fixed output's path depends on its hash alone, so Nix
/// takes a derivation with another builder under this path as valid: only its own text
/// address tells it is not this one.
const GENUINE: &str = r#"Derive([("out","/nix/store/8v9s2bfgfgbv8q1kzlnl0gchbrzq046c-src","sha256","98ea6e4f216f2fb4b69fff9b3a44842c38686ca685f3f55dc48c5d3fb1107be4")],[],[],"x86_64-linux","/bin/sh",["-c","echo hi > $out"],[("builder","/bin/sh"),("name","src"),("out","/nix/store/8v9s2bfgfgbv8q1kzlnl0gchbrzq046c-src"),("outputHash","98ea6e4f216f2fb4b69fff9b3a44842c38686ca685f3f55dc48c5d3fb1107be4"),("outputHashAlgo","sha256"),("outputHashMode","flat"),("system","x86_64-linux")])"#;
const DRV: &str = "/nix/store/m5qmzvxz5afq05h5cqj8d7ph5hv32nrk-src.drv";
const OUT: &str = "/nix/store/8v9s2bfgfgbv8q1kzlnl0gchbrzq046c-src";

/// Writes `content` into the file:// cache `dir` as the path `path`, signed with `key`.
fn plant(dir: &Path, key: &Path, path: &str, content: &str) {
    let nar = single_file_nar(content.as_bytes());
    let digest = sha2::Sha256::digest(&nar).to_vec();
    let file = nixfarm_nix::hash::nix32_encode(&digest);
    std::fs::create_dir_all(dir.join("nar")).unwrap();
    std::fs::write(dir.join(format!("nar/{file}.nar")), &nar).unwrap();
    let mut ni = nixfarm_store::narinfo::NarInfo {
        store_path: path.into(),
        url: format!("nar/{file}.nar"),
        compression: "none".into(),
        file_hash: digest.clone(),
        file_size: nar.len() as u64,
        nar_hash: digest,
        nar_size: nar.len() as u64,
        references: vec![],
        deriver: None,
        sigs: vec![],
        ca: None,
    };
    ni.sign(&nixfarm_store::narinfo::Key::from_file(key).unwrap());
    let hash = &path["/nix/store/".len()..][..32];
    std::fs::write(dir.join(format!("{hash}.narinfo")), ni.render()).unwrap();
    std::fs::write(dir.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
}

/// A fake agent evaluates a run to a fixed-output derivation whose forged text (another
/// builder, same output hash) it planted in the run's cache, signed with the cache's key.
/// The real agent given the build fetches it, finds its content does not give its path, and
/// runs nothing: the package ends infra-failed saying so, and the forged builder never ran.
/// (Without the check Nix runs it, and the package even ends ready: the output hash is the
/// real one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_derivation_fetched_from_the_cache_is_not_built() {
    let dir = scratch();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    set_mode(&cache, 0o755);
    let (sk, pk) = cache_key(dir.path(), "forged-1");
    let ran = dir.path().join("forged-builder-ran");
    let forged = GENUINE.replace(
        "echo hi > $out",
        &format!("touch {}; echo hi > $out", ran.display()),
    );
    plant(&cache, &sk, DRV, &forged);
    // A short lease: the fake agent leaves holding the build it was handed.
    let coordinator = Coordinator::start_with_config(
        dir.path(),
        "[scheduler]\nlease_secs = 2\nheartbeat_secs = 1\n",
    )
    .unwrap();
    let url = coordinator.url.clone();

    // The fake agent: registers, takes the listing and answers it with the derivation.
    let mut fake = FakeAgent::register(&url, "fake", "x86_64-linux").await;
    let repo = flake(dir.path(), "src", "hi", 0);
    let cache_url = format!("file://{}", cache.display());
    let out = cli(
        &url,
        &[
            "submit",
            repo.to_str().unwrap(),
            "--cache",
            &cache_url,
            "--trusted-public-key",
            &pk,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let run = stdout(&out).trim().to_string();
    fake.answer_listing(
        "src",
        pb::DrvNode {
            drv_path: DRV.into(),
            system: "x86_64-linux".into(),
            outputs: vec![pb::DrvOutput {
                name: "out".into(),
                path: OUT.into(),
                ..Default::default()
            }],
            fixed_output: true,
            output_hash: "sha256:98ea6e4f216f2fb4b69fff9b3a44842c38686ca685f3f55dc48c5d3fb1107be4"
                .into(),
            ..Default::default()
        },
    )
    .await;
    // Then gone: the build it may have been handed goes to the real agent.
    wait_for(
        Duration::from_secs(30),
        "the evaluation to be taken in",
        || (report_json(&url, &run)["packages"][0]["attr"] == "src").then_some(()),
    );
    drop(fake);
    let host = Host::new(&dir.path().join("host"));
    let _real = host.start_agent("real", &url, Some(&sk), 1).unwrap();
    let r = wait_terminal(&url, &run, Duration::from_secs(120));
    let p = &r["packages"][0];
    assert_eq!(p["status"], "infra-failed", "{r}");
    let reason = p["reason"].as_str().unwrap();
    assert!(
        reason.contains("is not what its store path says"),
        "{reason}"
    );
    assert!(!ran.exists(), "the forged builder ran");
    assert!(!host.has_path(OUT), "the forged derivation was built");
    assert!(
        !host.has_path(DRV),
        "the forged derivation was left in the agent's store"
    );
}
