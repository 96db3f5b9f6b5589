//! nginx as the binary cache users download from: agents on separate stores publish to it
//! with PUT (a WebDAV location), nixfarm writes the `nix-cache-info` such a server lacks,
//! and real Nix reading a GET-only location substitutes every ready output with signatures
//! required. `scripts/setup` installs nginx (Debian's package); this test starts its own.

use nixfarm_tests::*;
use std::path::Path;
use std::process::Command;

/// nginx on 127.0.0.1, serving `root` read-write under /rw/ (PUT) and read-only under /ro/,
/// and under /redir/ its narinfos, redirecting each NAR to /ro/ (as a CDN in front of an
/// object store does).
struct Nginx {
    proc: Proc,
    port: u16,
}

impl Nginx {
    fn start(dir: &Path, root: &Path) -> Nginx {
        let r = root.display();
        let (proc, port) = start_nginx(
            dir,
            &format!(
                r#"    location /rw/ {{
      alias {r}/;
      dav_methods PUT;
      create_full_put_path on;
      dav_access user:rw group:r all:r;
    }}
    location /ro/ {{
      alias {r}/;
      limit_except GET {{ deny all; }}
    }}
    location /redir/ {{
      rewrite ^/redir/(nar/.*)$ /ro/$1 redirect;
      alias {r}/;
      limit_except GET {{ deny all; }}
    }}
"#
            ),
        );
        Nginx { proc, port }
    }
}

#[test]
fn outputs_published_to_nginx_are_substituted_by_real_nix_from_a_get_only_location() {
    let dir = scratch();
    let root = dir.path().join("cache");
    std::fs::create_dir_all(&root).unwrap();
    set_mode(&root, 0o755);
    let nginx = Nginx::start(&dir.path().join("nginx"), &root);
    let (sk, pk) = cache_key(dir.path(), "nginx-cache-1");
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).unwrap();
    let mut agents = Vec::new();
    for i in 0..2 {
        let host = Host::new(&dir.path().join(format!("host{i}")));
        agents.push((
            host.start_agent(&format!("pub{i}"), &coordinator.url, Some(&sk), 2)
                .unwrap(),
            host,
        ));
    }
    let rw = format!("http://127.0.0.1:{}/rw", nginx.port);
    let out = cli(
        &coordinator.url,
        &[
            "submit",
            example_repo().to_str().unwrap(),
            "--cache",
            &rw,
            "--trusted-public-key",
            &pk,
            "--watch",
            "--format",
            "json",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            stderr(&out),
            nginx.proc.log_text()
        )
    });
    let got = packages_by_attr(&report);
    for (attr, e) in expected().as_object().unwrap() {
        assert_eq!(
            got[attr]["status"], e["status"],
            "{attr}: {}",
            got[attr]["reason"]
        );
    }
    // nginx keeps only what it is sent: nixfarm wrote the nix-cache-info Nix needs.
    let info = std::fs::read_to_string(root.join("nix-cache-info")).unwrap();
    assert!(info.contains("StoreDir: /nix/store"), "{info}");
    let ro = format!("http://127.0.0.1:{}/ro", nginx.port);
    let ready: Vec<&serde_json::Value> = got.values().filter(|p| p["status"] == "ready").collect();
    assert!(!ready.is_empty());
    substitute_into_fresh_store(&dir.path().join("fresh"), &ready, &ro, &pk);
    // The GET-only location really is: a PUT there is refused.
    let put = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "exec 3<>/dev/tcp/127.0.0.1/{}; printf 'PUT /ro/x HTTP/1.0\\r\\nContent-Length: 1\\r\\n\\r\\nx' >&3; head -c 12 <&3",
            nginx.port
        ))
        .output()
        .unwrap();
    assert!(stdout(&put).contains("403"), "{}", stdout(&put));
    let redir = format!("http://127.0.0.1:{}/redir", nginx.port);
    nars_lost_or_damaged_behind_the_narinfos_are_found(
        &dir.path().join("after"),
        &coordinator.url,
        &report,
        &root,
        &redir,
        &pk,
    );
    drop(agents);
}

/// What a cache can lose behind a good narinfo (its NAR deleted, or damaged on disk) only a
/// download finds: `report --verify-nars` reports those packages not-cached, as real Nix
/// refuses to substitute them, while a narinfo-only check still says ready. The cache at
/// `uri` redirects its NARs: the rest, followed there, are whole.
fn nars_lost_or_damaged_behind_the_narinfos_are_found(
    dir: &Path,
    coordinator: &str,
    report: &serde_json::Value,
    root: &Path,
    uri: &str,
    pk: &str,
) {
    let got = packages_by_attr(report);
    let mut ready: Vec<&String> = got
        .iter()
        .filter(|(_, p)| p["status"] == "ready" && p["outputs"].as_object().unwrap().len() == 1)
        .map(|(a, _)| a)
        .collect();
    ready.sort();
    assert!(ready.len() >= 3, "{report}");
    let nar_of = |attr: &str| {
        let out = got[attr]["outputs"]["out"].as_str().unwrap();
        let narinfo = root.join(format!("{}.narinfo", &out["/nix/store/".len()..][..32]));
        let text = std::fs::read_to_string(&narinfo).unwrap();
        let url = text.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
        root.join(url)
    };
    let (lost, damaged) = (ready[0].as_str(), ready[1].as_str());
    std::fs::remove_file(nar_of(lost)).unwrap();
    let mut bytes = std::fs::read(nar_of(damaged)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(nar_of(damaged), &bytes).unwrap();
    let run = report["run_id"].as_str().unwrap();
    let check = |extra: &[&str]| {
        let mut args = vec![
            "report",
            run,
            "--cache",
            uri,
            "--trusted-public-key",
            pk,
            "--format",
            "json",
        ];
        args.extend_from_slice(extra);
        let out = cli(coordinator, &args);
        let r: serde_json::Value = serde_json::from_str(&stdout(&out))
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stderr(&out)));
        (packages_by_attr(&r), stderr(&out))
    };
    // The narinfos are whole and signed: read alone, everything is still there.
    let (narinfos_only, _) = check(&[]);
    for attr in &ready {
        assert_eq!(narinfos_only[attr.as_str()]["status"], "ready", "{attr}");
    }
    let (nars, said) = check(&["--verify-nars"]);
    // The run counted them ready: the check says how many it found otherwise.
    assert!(
        said.contains("checked against the cache: 2 package(s) the run built are not-cached"),
        "{said}"
    );
    for attr in &ready {
        let (p, attr) = (&nars[attr.as_str()], attr.as_str());
        let want = if attr == lost || attr == damaged {
            "not-cached"
        } else {
            "ready"
        };
        assert_eq!(p["status"], want, "{attr}: {}", p["reason"]);
    }
    let reason = |attr: &str| nars[attr]["reason"].as_str().unwrap().to_string();
    assert!(
        reason(lost).contains("the cache has no nar/"),
        "{}",
        reason(lost)
    );
    let damaged_why = reason(damaged);
    assert!(
        damaged_why.contains("does not decompress")
            || damaged_why.contains("where its narinfo says"),
        "{damaged_why}"
    );
    // Real Nix agrees: the damaged one cannot be substituted, an intact one can.
    let fresh = Host::new(dir);
    let realise = |attr: &str| {
        let path = got[attr]["outputs"]["out"].as_str().unwrap();
        fresh.run(&[
            "nix-store",
            "--realise",
            path,
            "--option",
            "substituters",
            uri,
            "--option",
            "trusted-public-keys",
            pk,
            "--option",
            "require-sigs",
            "true",
        ])
    };
    assert!(!realise(damaged).status.success());
    let intact = realise(ready[2]);
    assert!(intact.status.success(), "{}", stderr(&intact));
}

#[test]
fn a_cache_that_refuses_uploads_costs_packages_their_cached_not_the_run() {
    let dir = scratch();
    let root = dir.path().join("cache");
    std::fs::create_dir_all(&root).unwrap();
    set_mode(&root, 0o755);
    let nginx = Nginx::start(&dir.path().join("nginx"), &root);
    let (sk, pk) = cache_key(dir.path(), "nginx-cache-2");
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).unwrap();
    let host = Host::new(&dir.path().join("host"));
    let agent = host
        .start_agent("refused", &coordinator.url, Some(&sk), 2)
        .unwrap();
    // The read-only location: every PUT is answered 403 with nginx's HTML page.
    let ro = format!("http://127.0.0.1:{}/ro", nginx.port);
    let out = cli(
        &coordinator.url,
        &[
            "submit",
            example_repo().to_str().unwrap(),
            "--cache",
            &ro,
            "--trusted-public-key",
            &pk,
            "--watch",
            "--format",
            "json",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stderr(&out)));
    assert_eq!(report["state"], "finished", "{report}");
    let got = packages_by_attr(&report);
    let expected = expected();
    assert_eq!(
        got.len(),
        expected.as_object().unwrap().len(),
        "every package reported"
    );
    for (attr, e) in expected.as_object().unwrap() {
        let p = &got[attr];
        // What builds (ready, or unpinned but built) is not-cached: the push is what failed.
        if e["status"] == "ready" || e["status"] == "unpinned" {
            assert_eq!(p["status"], "not-cached", "{attr}: {}", p["reason"]);
            let reason = p["reason"].as_str().unwrap();
            assert!(
                reason.contains("403") && !reason.contains('<') && !reason.contains('\n'),
                "{attr}: {reason}"
            );
        } else {
            assert_eq!(p["status"], e["status"], "{attr}: {}", p["reason"]);
        }
    }
    assert!(
        stderr(&out).len() < 20_000,
        "{} bytes of progress and warnings",
        stderr(&out).len()
    );
    // The agent's log says each distinct refusal once (a 403 is not retried either), not
    // once per path.
    let log = agent.log_text();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("403"))
        .collect();
    assert!(
        !refusals.is_empty() && refusals.len() <= 4,
        "{} warnings about the 403:\n{}",
        refusals.len(),
        refusals.join("\n")
    );
    assert!(!log.contains("starting the path again"), "{log}");
}
