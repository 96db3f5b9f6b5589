//! Hostile sources: snapshots that reach outside their tree, flake references that read an
//! agent's disk, uploads that never end or never stop.

use super::*;

// ----- snapshots --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_snapshot_writes_outside_its_tree_and_every_run_builds_its_own_sources() {
    let dir = scratch();
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let victim = outside.join("X");
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).unwrap();
    let url = coordinator.url.clone();
    let host = Host::new(&dir.path().join("host"));
    let _agent = host.start_agent("a1", &url, None, 2).unwrap();
    let mut c = run_client(&url).await;

    // Every shape of escape is refused at the upload.
    let variants: Vec<(&str, Vec<u8>)> = vec![
        (
            "a link to '.' then a deep '..' chain",
            self_link_escape(&victim),
        ),
        (
            "a directory replaced by a link later",
            raw_tar(&[
                ("flake.nix", F, "{}"),
                ("d", D, ""),
                ("d", L, &"../".repeat(8)),
                (&format!("d{}", victim.display()), F, "pwned"),
            ]),
        ),
        (
            "a link made after the file beneath it",
            raw_tar(&[
                ("flake.nix", F, "{}"),
                ("sub/d/x", F, "1"),
                ("sub/d", L, ".."),
            ]),
        ),
        (
            "a hard link to a file outside",
            raw_tar(&[("flake.nix", F, "{}"), ("h", H, "/etc/shadow")]),
        ),
        (
            "an absolute link target",
            raw_tar(&[
                ("flake.nix", F, "{}"),
                ("abs", L, outside.to_str().unwrap()),
                ("abs/X", F, "pwned"),
            ]),
        ),
        (
            "a deep '..' chain",
            raw_tar(&[("flake.nix", F, "{}"), ("p/q/r", L, &"../".repeat(40))]),
        ),
        (
            "'..' through another link",
            raw_tar(&[
                ("flake.nix", F, "{}"),
                ("p/q/x", L, "../.."),
                ("p/q/y", L, "x/../../../../.."),
            ]),
        ),
        (
            "a FIFO",
            raw_tar(&[("flake.nix", F, "{}"), ("fifo", tar::EntryType::Fifo, "")]),
        ),
    ];
    for (what, bytes) in &variants {
        let e = upload(&mut c, bytes).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e}");
    }
    assert!(!victim.exists(), "an upload wrote outside the tree");

    // A snapshot that reached the coordinator's disk some other way: the agent checks it
    // whole too, and writes nothing.
    let planted = self_link_escape(&victim);
    let digest = nixfarm_core::snapshot::digest(&planted);
    std::fs::write(
        dir.path().join(format!("coordinator/sources/{digest}.tar")),
        &planted,
    )
    .unwrap();
    let run = c
        .submit_run(pb::SubmitRunRequest {
            source: Some(pb::Source {
                kind: Some(pb::source::Kind::Snapshot(digest)),
            }),
            label: "planted".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let r = wait_terminal(&url, &run, Duration::from_secs(90));
    assert_eq!(r["state"], "failed", "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(error.contains("beneath a symbolic link"), "{error}");
    assert!(!victim.exists(), "the agent wrote outside its work dir");

    // An honest client's run builds its own sources, before and after an attacker aims an
    // escape at that run's unpacked tree.
    let repo = flake(dir.path(), "mine", "from-the-owner", 0);
    for round in 0..2 {
        let out = cli(
            &url,
            &[
                "submit",
                repo.to_str().unwrap(),
                "--watch",
                "--format",
                "json",
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        let p = &report["packages"][0];
        assert_eq!(p["status"], "ready", "{report}");
        let path = p["outputs"]["out"].as_str().unwrap();
        let text = host.run(&["cat", path]);
        assert_eq!(
            String::from_utf8_lossy(&text.stdout).trim(),
            "from-the-owner"
        );
        if round == 0 {
            let theirs = host
                .root
                .join("work/sources")
                .join(format!("{}-*", report["run_id"].as_str().unwrap()));
            let attack = self_link_escape(&theirs.join("flake.nix"));
            let e = upload(&mut c, &attack).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        }
    }
}

// ----- flake references -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flake_references_that_read_an_agents_disk_are_refused() {
    let dir = scratch();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).unwrap();
    let url = coordinator.url.clone();
    for r in [
        "path:/etc",
        "path:/",
        "git+file:///srv/repo",
        "file:///etc/shadow",
        "flake:nixpkgs",
    ] {
        let out = cli(&url, &["submit", r]);
        assert_eq!(out.status.code(), Some(2), "{r} was accepted");
        let err = stderr(&out);
        assert!(err.contains("agent's own disk"), "{r}: {err}");
    }
    let mut c = run_client(&url).await;
    let e = c
        .submit_run(pb::SubmitRunRequest {
            source: Some(pb::Source {
                kind: Some(pb::source::Kind::FlakeRef("path:/".into())),
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let runs = stdout(&cli(&url, &["runs"]));
    assert_eq!(runs.lines().count(), 2, "a run was created: {runs}");
}

// ----- bounded uploads --------------------------------------------------------------------

/// A valid snapshot of one file of `size` zero bytes, generated chunk by chunk.
fn zeros_snapshot_chunks(size: u64) -> impl Iterator<Item = pb::SourceChunk> {
    let mut h = tar::Header::new_gnu();
    h.set_path("flake.nix").unwrap();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let header = h.as_bytes().to_vec();
    let pad = (512 - size % 512) % 512 + 1024;
    let body = (0..size.div_ceil(1 << 20)).map(move |i| {
        let n = (size - i * (1 << 20)).min(1 << 20) as usize;
        pb::SourceChunk { data: vec![0u8; n] }
    });
    std::iter::once(pb::SourceChunk { data: header })
        .chain(body)
        .chain(std::iter::once(pb::SourceChunk {
            data: vec![0u8; pad as usize],
        }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_are_streamed_and_capped_and_the_coordinator_keeps_answering() {
    let dir = scratch();
    let coordinator = Coordinator::start_with_config(
        dir.path(),
        "[limits]\nsnapshot_max_bytes = 268435456\nmax_concurrent_uploads = 12\nmax_uploads_per_client = 8\nupload_idle_secs = 2\n",
    )
    .unwrap();
    let url = coordinator.url.clone();
    let pid = coordinator.proc.child.id();
    let before = peak_rss_kib(pid);

    // 8 parallel uploads of 200 MiB each, on their own connections.
    const SIZE: u64 = 200 << 20;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = run_client(&url).await;
            c.upload_source(tokio_stream::iter(zeros_snapshot_chunks(SIZE)))
                .await
                .map(|r| r.into_inner().size)
        }));
    }
    // Meanwhile other clients are served: `nixfarm runs` answers, and a ninth upload from
    // the same address is refused at once rather than queued.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    let out = tokio::task::spawn_blocking({
        let url = url.clone();
        move || cli(&url, &["runs"])
    })
    .await
    .unwrap();
    let runs_took = t.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    let mut c = run_client(&url).await;
    let ninth = c
        .upload_source(tokio_stream::iter(zeros_snapshot_chunks(1 << 20)))
        .await;
    let mut sizes = Vec::new();
    for t in tasks {
        sizes.push(t.await.unwrap().expect("upload"));
    }
    assert!(sizes.iter().all(|s| *s > SIZE), "{sizes:?}");
    let peak_mib = peak_rss_kib(pid) / 1024;
    eprintln!(
        "8 x 200 MiB uploads: coordinator peak RSS {peak_mib} MiB (before: {} MiB); `nixfarm runs` answered in {runs_took:?} meanwhile",
        before / 1024
    );
    assert!(peak_mib < 150, "peak RSS {peak_mib} MiB");
    assert!(runs_took < Duration::from_secs(10), "{runs_took:?}");
    if let Err(e) = ninth {
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    }

    // Idle uploads are aborted after upload_idle_secs, and free their places.
    let mut idle = Vec::new();
    for _ in 0..8 {
        let url = url.clone();
        idle.push(tokio::spawn(async move {
            let mut c = run_client(&url).await;
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::SourceChunk>(1);
            tx.send(pb::SourceChunk { data: vec![0; 10] })
                .await
                .unwrap();
            let r = c
                .upload_source(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await;
            drop(tx);
            r.err().map(|e| e.code())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The idle ones hold this client's places: one more is refused at once.
    let e = c
        .upload_source(tokio_stream::iter(zeros_snapshot_chunks(10)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    for t in idle {
        assert_eq!(
            t.await.unwrap(),
            Some(tonic::Code::DeadlineExceeded),
            "an idle upload was not aborted"
        );
    }
    // Many idle connections that never speak do not starve new clients.
    let addr = url.trim_start_matches("http://").to_string();
    let _silent: Vec<std::net::TcpStream> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
        .collect();
    let ok = c
        .upload_source(tokio_stream::iter(zeros_snapshot_chunks(10)))
        .await
        .expect("an upload after the idle ones were aborted");
    assert!(ok.into_inner().size > 0);
    let out = tokio::task::spawn_blocking(move || cli(&url, &["runs"]))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // Nothing partial is left behind.
    let partial = std::fs::read_dir(dir.path().join("coordinator/sources"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".upload-"))
        .count();
    assert_eq!(partial, 0);
}
