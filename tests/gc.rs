//! A run survives the host's garbage collector: with `nix-store --gc` running every 4 s on
//! the agent's host (as `nix.gc` timers do on spare machines) and one build in three failing
//! once with a machine error (its Nix process killed), every package of a 150-package run
//! ends ready and the report agrees with itself. The run's GC roots go when it ends.

use nixfarm_tests::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// 150 packages in a DAG (each depends on the one before and on the one at half its index);
/// every third one kills its Nix process the first time it builds.
fn dag_repo(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
    let repo = dir.join("dag");
    std::fs::create_dir_all(&repo).unwrap();
    let marks = dir.join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    set_mode(&marks, 0o777);
    std::fs::write(
        repo.join("flake.nix"),
        format!(
            r#"{{ outputs = {{ self }}: let
      mk = i: deps: derivation {{
        name = "p${{toString i}}"; system = "x86_64-linux"; builder = "/bin/sh";
        PATH = "/usr/bin:/bin"; inherit deps;
        flaky = if i - (i / 3) * 3 == 0 then "1" else "";
        args = [ "-c" ''
          if [ -n "$flaky" ] && [ ! -e {marks}/$name ]; then
            touch {marks}/$name; kill -9 $PPID; exit 1
          fi
          (echo $name; for d in $deps; do cat $d; done) | sort -u > $out
        '' ];
      }};
      p = builtins.genList (i: mk i (if i == 0 then [] else [ (p' (i - 1)) (p' (i / 2)) ])) {n};
      p' = i: builtins.elemAt p i;
    in {{ packages.x86_64-linux = builtins.listToAttrs
      (builtins.genList (i: {{ name = "p${{toString i}}"; value = p' i; }}) {n}); }}; }}"#,
            marks = marks.display(),
        ),
    )
    .unwrap();
    repo
}

#[test]
fn a_run_survives_the_hosts_garbage_collector_and_machine_errors() {
    let dir = scratch();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).unwrap();
    let host = Arc::new(Host::new(&dir.path().join("host")));
    let _agent = host.start_agent("gc1", &coordinator.url, None, 2).unwrap();
    let repo = dag_repo(dir.path(), 150);

    let stop = Arc::new(AtomicBool::new(false));
    let (collections, deleted) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let gc = {
        let (host, stop, collections, deleted) = (
            host.clone(),
            stop.clone(),
            collections.clone(),
            deleted.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let out = host.run(&["nix-store", "--gc"]);
                collections.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8_lossy(&out.stdout).to_string()
                    + &String::from_utf8_lossy(&out.stderr);
                // "N store paths deleted, X MiB freed"
                if let Some(n) = text
                    .lines()
                    .find(|l| l.contains("store paths deleted"))
                    .and_then(|l| l.split_whitespace().next())
                    .and_then(|n| n.parse::<usize>().ok())
                {
                    deleted.fetch_add(n, Ordering::SeqCst);
                }
                for _ in 0..40 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
    };
    let out = cli(
        &coordinator.url,
        &[
            "submit",
            repo.to_str().unwrap(),
            "--watch",
            "--format",
            "json",
        ],
    );
    stop.store(true, Ordering::SeqCst);
    gc.join().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let packages = packages_by_attr(&report);
    assert_eq!(packages.len(), 150);
    let not_ready: Vec<String> = packages
        .iter()
        .filter(|(_, p)| p["status"] != "ready")
        .map(|(a, p)| format!("{a}: {} ({})", p["status"], p["reason"]))
        .collect();
    assert!(not_ready.is_empty(), "{}", not_ready.join("\n"));
    // The report agrees with itself.
    assert_eq!(report["summary"]["ready"], 150);
    assert_eq!(report["summary"]["by_status"]["ready"], 150);
    assert_eq!(report["summary"]["total"], 150);
    let collections = collections.load(Ordering::SeqCst);
    let deleted = deleted.load(Ordering::SeqCst);
    eprintln!("{collections} collections deleted {deleted} store paths during the run");
    assert!(collections >= 2, "the collector ran {collections} time(s)");
    // Every third builder killed its Nix once: those are retried, not failures.
    let marks = std::fs::read_dir(dir.path().join("marks")).unwrap().count();
    assert_eq!(marks, 50);
    let last = &packages["p149"]["outputs"]["out"];
    assert!(host.has_path(last.as_str().unwrap()));

    // The run's roots go when it ends (the outputs then belong to the collector again).
    let run = report["run_id"].as_str().unwrap();
    let default = nixfarm_agent::roots::Roots::default_dir("gc1");
    let roots = host.root.join(default.strip_prefix("/").unwrap()).join(run);
    wait_for(Duration::from_secs(10), "the run's GC roots to go", || {
        (!roots.exists()).then_some(())
    });
}
