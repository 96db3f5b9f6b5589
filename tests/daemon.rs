//! Builds go through long-lived `nix-daemon --stdio` processes (no Nix process start per
//! build); what a build comes to must be exactly what `nix-store --realise` says of the same
//! derivation: built with the same outputs and GC roots, failed, timed out, a hash mismatch
//! with the hash Nix got, a failed dependency, cancelled. Real Nix, fresh derivations.

use nixfarm_nix::messages::Failure;
use nixfarm_nix::{BuildOptions, Nix};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn instantiate(expr: &str) -> String {
    let out = std::process::Command::new("nix-instantiate")
        .args(["--expr", expr])
        .env("NIX_CONFIG", "build-users-group = ")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A derivation with several outputs is printed as `DRV!OUTPUT` lines.
    let text = String::from_utf8(out.stdout).unwrap();
    let first = text.lines().next().unwrap_or_default();
    first.split('!').next().unwrap_or_default().to_string()
}

fn expr(name: &str, script: &str, extra: &str, tag: &str) -> String {
    format!(
        r#"derivation {{ name = "{name}"; system = "x86_64-linux"; builder = "/bin/sh"; PATH = "/usr/bin:/bin"; args = [ "-c" "{script}" ]; tag = "{tag}"; {extra} }}"#
    )
}

/// A tag no earlier run of these tests used: fresh derivations, built for real.
fn unique_tag() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn drv(name: &str, script: &str, extra: &str, tag: &str) -> String {
    instantiate(&expr(name, script, extra, tag))
}

/// Builds `drv` with no options, its log dropped.
async fn realise_plain(nix: &Nix, drv: &str) -> nixfarm_nix::BuildRun {
    nix.realise(
        drv,
        &BuildOptions::default(),
        CancellationToken::new(),
        |_| {},
    )
    .await
}

#[tokio::test]
async fn a_build_through_the_daemon_comes_to_what_nix_store_says() {
    let tag = unique_tag();
    let roots = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let daemon = Nix::default().with_daemon(work.path());
    assert!(
        daemon.daemon_active(),
        "this machine's store is the test's own"
    );
    let plain = Nix::default();
    for (i, nix) in [&daemon, &plain].into_iter().enumerate() {
        let t = format!("{tag}-{i}");
        let opts = BuildOptions {
            gc_root: Some(roots.path().join(format!("two-{i}"))),
            ..Default::default()
        };
        // Two outputs, each rooted: R (out) and R-dev, as nix-store names them.
        let two = drv(
            "two",
            "echo building two; mkdir $out $dev; echo a > $out/a; echo b > $dev/b",
            r#"outputs = [ "dev" "out" ];"#,
            &t,
        );
        let mut log = Vec::new();
        let run = nix
            .realise(&two, &opts, CancellationToken::new(), |b| {
                log.extend_from_slice(b)
            })
            .await;
        let paths = run.result.clone().unwrap();
        assert_eq!(paths.len(), 2, "{paths:?}");
        assert!(run.built, "{}", run.log_tail);
        assert!(!run.already_valid, "{}", run.log_tail);
        assert!(
            String::from_utf8_lossy(&log).contains("building two"),
            "the builder's log streams"
        );
        let root = roots.path().join(format!("two-{i}"));
        let mut linked = vec![
            std::fs::read_link(&root).unwrap(),
            std::fs::read_link(format!("{}-dev", root.display())).unwrap(),
        ];
        linked.sort();
        let mut want: Vec<std::path::PathBuf> = paths.iter().map(Into::into).collect();
        want.sort();
        assert_eq!(linked, want);
        // What a push reads of the closure: the same through the daemon as from
        // `nix path-info --recursive --json`.
        let mut ours = nix.closure_infos(&paths).await.unwrap();
        let mut theirs = plain.closure_infos(&paths).await.unwrap();
        ours.sort_by(|a, b| a.path.cmp(&b.path));
        theirs.sort_by(|a, b| a.path.cmp(&b.path));
        for t in &mut theirs {
            t.references.sort();
            t.nar_hash = nixfarm_nix::hash::to_sri(&t.nar_hash, None);
        }
        assert_eq!(ours, theirs);
        // Validity as the GC check after an evaluation asks it: the same through the daemon
        // as from `nix-store --check-validity`.
        let mut asked: Vec<String> = paths.clone();
        asked.push(format!("/nix/store/{}-never-built-{t}", "0".repeat(32)));
        asked.push(two.clone());
        let want = vec![asked[asked.len() - 2].clone()];
        assert_eq!(nix.invalid_paths(&asked).await.unwrap(), want);
        assert_eq!(plain.invalid_paths(&asked).await.unwrap(), want);
        // Again: already valid, nothing built.
        let again = realise_plain(nix, &two).await;
        assert_eq!(again.result.unwrap().len(), 2);
        assert!(!again.built);
        assert!(again.already_valid, "its time is no build time");

        let failing = drv("failing", "echo oops; exit 3", "", &t);
        let r = realise_plain(nix, &failing).await;
        match r.result {
            Err(Failure::BuildFailed(m)) => assert!(m.contains("exit code 3"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(!r.already_valid);
        assert!(r.log_tail.contains("oops"), "{}", r.log_tail);

        // The builder prints a look-alike of Nix's message first, with a well-formed hash
        // of its choosing: only Nix's own counts, on either path.
        let fod = drv(
            "fod",
            "printf 'error: hash mismatch in fixed-output derivation %s:\\n  specified: sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\\n  got:    sha256-BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBE=\\n' $out >&2; echo x > $out",
            r#"outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";"#,
            &t,
        );
        let r = realise_plain(nix, &fod).await;
        match r.result {
            Err(Failure::HashMismatch(m)) => {
                assert_eq!(m.got, "sha256-c8s4WKaHqElMozIwUwFigvPa051Cz2LKTnndoqrH2aw=")
            }
            other => panic!("{other:?}"),
        }

        // A builder that says it timed out, and fails: a failure, not a timeout.
        let says = drv(
            "says-timeout",
            "echo building of $out timed out after 3 seconds of silence >&2; exit 1",
            "",
            &t,
        );
        let r = realise_plain(nix, &says).await;
        assert!(
            matches!(r.result, Err(Failure::BuildFailed(_))),
            "{:?}",
            r.result
        );

        // A fixed-output builder (a fetcher) whose download timed out: its failure is
        // transient to Nix (exit 1, no timeout verdict), and it is a failed build.
        let fetch = drv(
            "fetch-timeout",
            "echo curl: Operation timed out after 300000 milliseconds >&2; exit 1",
            r#"outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";"#,
            &t,
        );
        let r = realise_plain(nix, &fetch).await;
        assert!(
            matches!(r.result, Err(Failure::BuildFailed(_))),
            "{:?}",
            r.result
        );

        let silent = drv("silent", "sleep 30; echo > $out", "", &t);
        let opts = BuildOptions {
            max_silent: Some(Duration::from_secs(1)),
            ..Default::default()
        };
        let r = nix
            .realise(&silent, &opts, CancellationToken::new(), |_| {})
            .await;
        assert!(
            matches!(r.result, Err(Failure::TimedOut(_))),
            "{:?}",
            r.result
        );

        // Its input is the derivation above (the same expression, the same .drv).
        let input = expr("failing", "echo oops; exit 3", "", &t);
        let dep = drv(
            "dep",
            "echo $failing > $out",
            &format!("failing = {input};"),
            &t,
        );
        let r = realise_plain(nix, &dep).await;
        assert!(
            matches!(r.result, Err(Failure::BuildFailed(_))),
            "{:?}",
            r.result
        );

        let long = drv("long", "sleep 30; echo > $out", "", &t);
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            c.cancel();
        });
        let r = nix
            .realise(&long, &BuildOptions::default(), cancel, |_| {})
            .await;
        assert!(r.cancelled && r.duration < Duration::from_secs(20), "{r:?}");
    }
    assert!(
        daemon.daemon_active(),
        "every build above went through a daemon"
    );
}

/// Two daemons that start at once and substitute from one cache, as a new agent's first
/// builds do. Nix 2.8 registers a cache it has not seen with `insert or replace`: the second
/// daemon's row replaces the first's, the first's next write refers to a row that is gone,
/// and its build fails ("constraint failed", from its narinfo cache's SQLite). So each
/// daemon keeps its own narinfo cache, under the agent's work directory.
#[tokio::test]
async fn daemons_keep_their_narinfo_caches_apart() {
    let tag = unique_tag();
    let work = tempfile::tempdir().unwrap();
    // An HTTP binary cache that has nothing (Nix keeps no narinfo cache for file:// ones),
    // slow to describe itself so that both daemons find it new before either registers it.
    let app = axum::Router::new()
        .route(
            "/nix-cache-info",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "StoreDir: /nix/store\nPriority: 30\n"
            }),
        )
        .fallback(|| async { axum::http::StatusCode::NOT_FOUND });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let nix = Nix::default().with_daemon(work.path());
    let build = |i: usize, secs: u64| {
        // Two sets of settings (timeouts): two daemons.
        let d = drv(
            &format!("cached-{i}"),
            "sleep 0.3; mkdir $out",
            "",
            &format!("{tag}-{i}"),
        );
        let opts = BuildOptions {
            substituter: url.clone(),
            // A cache is asked only with a key to check what it serves.
            trusted_public_keys: vec!["test-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()],
            timeout: Some(Duration::from_secs(secs)),
            ..Default::default()
        };
        let nix = nix.clone();
        async move {
            let run = nix
                .realise(&d, &opts, CancellationToken::new(), |_| {})
                .await;
            assert!(run.result.is_ok(), "build {i}: {}", run.log_tail);
            assert!(run.built, "build {i} was not built: {}", run.log_tail);
        }
    };
    tokio::join!(build(0, 10), build(1, 11));
    tokio::join!(build(2, 10), build(3, 11));
    for n in 0..2 {
        let db = work
            .path()
            .join(format!("nix-cache/daemon-{n}/nix/binary-cache-v6.sqlite"));
        assert!(db.exists(), "{} is missing", db.display());
    }
}

/// A build off its run's longest chain runs at a lower CPU priority, through the daemon and
/// through `nix-store` alike, and a build on it does not: what the builder itself sees.
#[tokio::test]
async fn a_background_build_runs_at_a_lower_cpu_priority() {
    let tag = unique_tag();
    let work = tempfile::tempdir().unwrap();
    let daemon = Nix::default().with_daemon(work.path());
    let plain = Nix::default();
    let own = String::from_utf8(std::process::Command::new("nice").output().unwrap().stdout)
        .unwrap()
        .trim()
        .parse::<i32>()
        .unwrap();
    for (i, nix) in [&daemon, &plain].into_iter().enumerate() {
        for background in [true, false] {
            // coreutils' `nice` without a command prints the niceness it runs at.
            let d = drv(
                "niceness",
                "mkdir $out; nice > $out/nice",
                "",
                &format!("{tag}-{i}-{background}"),
            );
            let opts = BuildOptions {
                background,
                ..Default::default()
            };
            let run = nix
                .realise(&d, &opts, CancellationToken::new(), |_| {})
                .await;
            let out = run
                .result
                .unwrap_or_else(|e| panic!("{e:?}: {}", run.log_tail));
            let nice = std::fs::read_to_string(format!("{}/nice", out[0])).unwrap();
            let want = if background { (own + 10).min(19) } else { own };
            assert_eq!(
                nice.trim(),
                want.to_string(),
                "background {background}, nix {i}"
            );
        }
    }
}

/// The `nix-daemon` processes this test process started with `--option max-silent-time
/// {silent}` (a value no other test uses), by pid.
fn daemons_with_silence(silent: u64) -> Vec<u32> {
    let me = std::process::id().to_string();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let dir = e.path();
            let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
            // pid (comm) state ppid ...
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().nth(1));
            ppid == Some(me.as_str())
                && args.first().is_some_and(|a| a.ends_with(b"nix-daemon"))
                && args
                    .windows(2)
                    .any(|w| w[0] == b"max-silent-time" && w[1] == silent.to_string().as_bytes())
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort();
    pids
}

/// Daemons started ahead of a run's builds (while it is evaluated) are the ones its builds
/// take: a build that comes while they start waits for one rather than start another, and
/// a later one takes one that waits idle.
#[tokio::test]
async fn a_build_takes_a_daemon_started_ahead_for_it() {
    let tag = unique_tag();
    let work = tempfile::tempdir().unwrap();
    let nix = Nix::default().with_daemon(work.path());
    let silent = 4242;
    let opts = BuildOptions {
        max_silent: Some(Duration::from_secs(silent)),
        ..Default::default()
    };
    let first = drv("ahead", "echo built > $out", "", &tag);
    let second = drv("ahead-2", "echo built > $out", "", &tag);
    // Asked twice while starting: the second ask starts nothing more.
    nix.prewarm(&opts, 2);
    nix.prewarm(&opts, 2);
    // At once, while they start.
    let run = nix
        .realise(&first, &opts, CancellationToken::new(), |_| {})
        .await;
    run.result
        .unwrap_or_else(|e| panic!("{e:?}: {}", run.log_tail));
    assert!(run.built && nix.daemon_active());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut ahead = daemons_with_silence(silent);
    while ahead.len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        ahead = daemons_with_silence(silent);
    }
    assert_eq!(
        ahead.len(),
        2,
        "the build started a daemon of its own: {ahead:?}"
    );
    // Later, with both waiting idle.
    let run = nix
        .realise(&second, &opts, CancellationToken::new(), |_| {})
        .await;
    assert!(run.built, "{:?}: {}", run.result, run.log_tail);
    assert_eq!(daemons_with_silence(silent), ahead);
    // Builds with other settings get daemons of their own.
    let other = drv("other", "echo built > $out", "", &format!("{tag}-other"));
    let run = realise_plain(&nix, &other).await;
    assert!(run.result.is_ok(), "{}", run.log_tail);
    assert_eq!(daemons_with_silence(silent), ahead);
    assert!(nix.daemon_active());
}

/// A failed build's log tail, through the daemon or `nix-store`, keeps what a user reads it
/// for: the builder's lines before a very long one (cut, with how much was left out) and
/// Nix's error after it, without Nix's colour codes.
#[tokio::test]
async fn a_long_log_line_does_not_push_the_error_out_of_the_tail() {
    let tag = unique_tag();
    let work = tempfile::tempdir().unwrap();
    let daemon = Nix::default().with_daemon(work.path());
    for (i, nix) in [&daemon, &Nix::default()].into_iter().enumerate() {
        let failing = drv(
            "long-line",
            "echo starting; head -c 2000000 /dev/zero | tr '\\\\0' x; echo; exit 1",
            "",
            &format!("{tag}-{i}"),
        );
        let run = realise_plain(nix, &failing).await;
        assert!(run.result.is_err(), "{i}: {}", run.log_tail);
        let t = &run.log_tail;
        assert!(t.len() < 20_000, "{i}: {} bytes", t.len());
        assert!(t.contains("starting"), "{i}: {t}");
        assert!(t.contains("more bytes of this line left out"), "{i}: {t}");
        assert!(t.contains("failed with exit code 1"), "{i}: {t}");
        assert!(!t.contains('\u{1b}'), "{i}: {t}");
    }
}
